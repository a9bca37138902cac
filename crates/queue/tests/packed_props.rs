//! Property tests for the packed ring's wrap-counter arithmetic (virtio 1.2 §2.8.1,
//! §2.8.10), against a model over free-running counters: position `c` in a ring of
//! `size` is slot `c % size` in lap `c / size`, and the wrap counter is 1 in even laps
//! (both sides start at slot 0 with wrap counter 1).
//!
//! Sizes include 1, 2 and 32768 (the extremes), and counters run past 65536 so that any
//! arithmetic that silently wraps a u16 would be caught.

use proptest::prelude::*;
use vblk_queue::layout::{packed_need_event, RingPos};

fn pos(c: u64, size: u16) -> RingPos {
    RingPos { idx: (c % size as u64) as u16, wrap: (c / size as u64).is_multiple_of(2) }
}

fn size() -> impl Strategy<Value = u16> {
    prop_oneof![Just(1u16), Just(2), Just(3), Just(256), Just(32767), Just(32768), 1u16..=32768]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Advancing by any amount up to the ring size lands where the model says, from any
    /// position, across any number of laps.
    #[test]
    fn advance_matches_the_model(size in size(), start in 0u64..(1 << 20), steps in proptest::collection::vec(0u16..=32768, 1..20)) {
        let mut c = start;
        let mut p = pos(c, size);
        for s in steps {
            let n = s % (size + 1).max(1);
            let n = n.min(size);
            p = p.advance(n, size);
            c += n as u64;
            prop_assert_eq!(p, pos(c, size));
        }
    }

    /// The distance from a position up to one lap back is the number of slots between.
    #[test]
    fn distance_inverts_advance(size in size(), start in 0u64..(1 << 20), n in 0u16..=32768) {
        let n = n % (size + 1);
        let a = pos(start, size);
        prop_assert_eq!(a.advance(n, size).distance_from(a, size), n as u32);
    }

    /// vhost-user's encoding of a position (index in bits 0-14, wrap in bit 15) round
    /// trips, and an index outside the ring is refused.
    #[test]
    fn encode_decode_round_trip(size in size(), c in 0u64..(1 << 20), raw: u16) {
        let p = pos(c, size);
        prop_assert_eq!(RingPos::decode(p.encode(), size), Some(p));
        let d = RingPos::decode(raw, size);
        prop_assert_eq!(d.is_some(), (raw & 0x7fff) < size);
    }

    /// The packed `need_event`: moving from `old` to `new` crosses an event the peer set at
    /// position `event` (written as slot + wrap counter) iff old <= event < new, for any
    /// event from one lap before new's lap to the end of new's lap (where a driver puts it).
    #[test]
    fn need_event_matches_the_model(size in size(), old in 0u64..(1 << 20), moved in 1u32..32768, event_off in 0u64..65536) {
        let moved = moved % size as u32;
        prop_assume!(moved > 0);
        let new = old + moved as u64;
        let lap_start = new - new % size as u64;
        let lo = lap_start.saturating_sub(size as u64);
        let event = lo + event_off % (lap_start + size as u64 - lo);
        let want = old <= event && event < new;
        let got = packed_need_event(pos(event, size).encode(), pos(new, size), moved, size);
        prop_assert_eq!(got, want, "old {} new {} event {} size {}", old, new, event, size);
    }
}

#[test]
fn a_ring_of_one_slot_flips_its_wrap_counter_every_step() {
    let mut p = RingPos::START;
    for i in 0..70_000u32 {
        assert_eq!(p, RingPos { idx: 0, wrap: i % 2 == 0 });
        p = p.advance(1, 1);
    }
}

#[test]
fn nothing_moved_never_notifies_and_a_whole_lap_always_does() {
    for size in [1u16, 2, 32768] {
        for ev in [0u16, 0x8000, 1, 0x7fff] {
            assert!(!packed_need_event(ev, RingPos::START, 0, size));
            assert!(packed_need_event(ev, RingPos::START, size as u32, size));
        }
    }
}
