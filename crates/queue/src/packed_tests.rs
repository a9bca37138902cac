//! Device-side packed ring tests against a driver written by hand into test memory: each
//! test places slots exactly as a driver would (or as a hostile one might) and checks
//! what the device reads and writes.

use super::*;
use crate::layout::{packed_is_used, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, EVENT_FLAG_DESC};
use vblk_virtio::memory::memfd;
use vblk_virtio::{MemoryError, RegionSpec};

const MEM_SIZE: u64 = 1 << 20;
const DATA: u64 = 0x80000;
const RING: u64 = 0x1000;
const DRIVER_EVENT: u64 = 0x100;
const DEVICE_EVENT: u64 = 0x200;

/// The driver's side of a packed ring in a 1 MiB memfd at guest address 0.
struct TestRing {
    mem: Arc<GuestMemory>,
    size: u16,
    /// Where the driver makes the next slot available.
    avail: RingPos,
    /// Where the driver expects the next used descriptor.
    used: RingPos,
}

fn feats(event_idx: bool, indirect: bool) -> RingFeatures {
    RingFeatures { event_idx, indirect }
}

impl TestRing {
    fn new(size: u16) -> Self {
        let spec = RegionSpec { guest_phys_addr: 0, size: MEM_SIZE, user_addr: 0x7f00_0000_0000, mmap_offset: 0 };
        let mem = Arc::new(GuestMemory::from_files(&[(spec, memfd("ring", MEM_SIZE).unwrap())]).unwrap());
        TestRing { mem, size, avail: RingPos::START, used: RingPos::START }
    }

    fn queue(&self, features: RingFeatures) -> PackedQueue {
        let addrs = RingAddrs { desc: RING, avail: DRIVER_EVENT, used: DEVICE_EVENT };
        PackedQueue::new(self.mem.clone(), self.size as u32, addrs, AddrSpace::GuestPhysical, features).unwrap()
    }

    fn slot_gpa(&self, idx: u16) -> u64 {
        RING + 16 * idx as u64
    }

    fn read_slot(&self, idx: u16) -> PackedDescriptor {
        let mut b = [0u8; 16];
        self.mem.read_at(self.slot_gpa(idx), &mut b).unwrap();
        PackedDescriptor::from_bytes(&b)
    }

    fn write_slot(&self, idx: u16, d: PackedDescriptor) {
        self.mem.write_at(self.slot_gpa(idx), &d.to_bytes()).unwrap();
    }

    fn write_u16(&self, gpa: u64, v: u16) {
        self.mem.write_at(gpa, &v.to_le_bytes()).unwrap();
    }

    fn read_u16(&self, gpa: u64) -> u16 {
        let mut b = [0u8; 2];
        self.mem.read_at(gpa, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    /// Make a chain of `bufs` (addr, len, flags without NEXT/AVAIL/USED) available with
    /// buffer id `id`, the head's flags written last as a driver must.
    fn add(&mut self, id: u16, bufs: &[(u64, u32, u16)]) {
        let start = self.avail;
        let mut pos = self.avail;
        let mut head_flags = 0;
        for (i, &(addr, len, f)) in bufs.iter().enumerate() {
            let next = if i + 1 < bufs.len() { DESC_F_NEXT } else { 0 };
            let flags = f | next | packed_avail_flags(pos.wrap);
            if i == 0 {
                head_flags = flags;
                self.write_slot(pos.idx, PackedDescriptor { addr, len, id, flags: 0 });
                // Keep the head unavailable until the rest is written.
                let stale = packed_used_flags(pos.wrap);
                self.write_u16(self.slot_gpa(pos.idx) + 14, stale);
            } else {
                self.write_slot(pos.idx, PackedDescriptor { addr, len, id, flags });
            }
            pos = pos.advance(1, self.size);
        }
        self.write_u16(self.slot_gpa(start.idx) + 14, head_flags);
        self.avail = pos;
    }

    /// A virtio-blk-like request: 16-byte header, `data` bytes, 1 status byte.
    fn request(&mut self, id: u16, data: u32, data_writable: bool) {
        let f = if data_writable { DESC_F_WRITE } else { 0 };
        self.add(id, &[(DATA, 16, 0), (DATA + 0x1000, data, f), (DATA + 0x3000, 1, DESC_F_WRITE)]);
    }

    /// The next used descriptor, if the device published one: (id, len).
    fn pop_used(&mut self, slots_of: impl Fn(u16) -> u16) -> Option<(u16, u32)> {
        let d = self.read_slot(self.used.idx);
        if !packed_is_used(d.flags, self.used.wrap) {
            return None;
        }
        self.used = self.used.advance(slots_of(d.id), self.size);
        Some((d.id, d.len))
    }

    fn set_driver_event(&self, flags: u16, off_wrap: u16) {
        self.write_u16(DRIVER_EVENT, off_wrap);
        self.write_u16(DRIVER_EVENT + 2, flags);
    }
}

fn pop(q: &mut PackedQueue) -> (Popped, Chain) {
    let mut c = Chain::new();
    let p = q.pop(&mut c).unwrap();
    (p, c)
}

#[test]
fn a_chain_is_popped_used_and_published() {
    let mut r = TestRing::new(8);
    let mut q = r.queue(feats(false, true));
    assert!(!q.has_available().unwrap());
    r.request(5, 512, true);
    let (p, c) = pop(&mut q);
    assert_eq!(p, Popped::Chain);
    assert_eq!((c.head(), c.readable_len(), c.writable_len()), (5, 16, 513));
    assert_eq!(q.num_in_flight(), 1);
    assert_eq!(pop(&mut q).0, Popped::Empty);
    assert!(q.add_used(5, 513));
    // Not visible before the publish.
    assert_eq!(r.pop_used(|_| 3), None);
    assert!(q.publish_used(), "ENABLE: always notify");
    assert_eq!(r.pop_used(|_| 3), Some((5, 513)));
    assert_eq!(q.base(), PackedBase { avail: RingPos { idx: 3, wrap: true }, used: RingPos { idx: 3, wrap: true } });
    // Completing it twice, or an id never popped, is refused.
    assert!(!q.add_used(5, 1));
    assert!(!q.add_used(6, 1));
}

#[test]
fn completions_out_of_order_skip_each_chains_slots() {
    let mut r = TestRing::new(8);
    let mut q = r.queue(feats(false, true));
    r.add(0, &[(DATA, 16, 0), (DATA + 0x3000, 1, DESC_F_WRITE)]); // 2 slots
    r.add(1, &[(DATA + 0x3000, 1, DESC_F_WRITE)]); // 1 slot
    r.request(2, 4096, false); // 3 slots
    for _ in 0..3 {
        assert_eq!(pop(&mut q).0, Popped::Chain);
    }
    let slots = |id: u16| [2, 1, 3][id as usize];
    q.add_used(2, 1);
    q.add_used(0, 1);
    q.publish_used();
    assert_eq!(r.pop_used(slots), Some((2, 1)));
    assert_eq!(r.pop_used(slots), Some((0, 1)));
    assert_eq!(r.pop_used(slots), None);
    q.add_used(1, 1);
    q.publish_used();
    assert_eq!(r.pop_used(slots), Some((1, 1)));
    assert_eq!(r.used, RingPos { idx: 6, wrap: true });
}

#[test]
fn the_wrap_counters_flip_at_the_end_of_the_ring_even_inside_a_chain() {
    for size in [1u16, 2, 3, 5, 8] {
        let mut r = TestRing::new(size);
        let mut q = r.queue(feats(true, true));
        let chain_len = size.min(3);
        // Enough requests to go around the ring several times, chains crossing its end.
        for n in 0..(4 * size as u32 + 7) {
            let id = (n % size as u32) as u16;
            let bufs: Vec<_> = (0..chain_len)
                .map(|i| (DATA + 0x1000 * i as u64, 1, if i + 1 == chain_len { DESC_F_WRITE } else { 0 }))
                .collect();
            r.add(id, &bufs);
            assert_eq!(pop(&mut q).0, Popped::Chain, "size {size} request {n}");
            assert!(q.add_used(id, 1));
            q.publish_used();
            assert_eq!(r.pop_used(|_| chain_len), Some((id, 1)), "size {size} request {n}");
            assert_eq!(q.base().avail, r.avail);
            assert_eq!(q.base().used, r.used);
        }
    }
}

#[test]
fn a_ring_of_32768_wraps_after_65536_requests() {
    let size = 32768u16;
    let mut r = TestRing::new(size);
    let mut q = r.queue(feats(true, true));
    for n in 0..(2 * 65536u32 + 3) {
        let id = (n % 7) as u16;
        r.add(id, &[(DATA, 1, DESC_F_WRITE)]);
        assert_eq!(pop(&mut q).0, Popped::Chain);
        q.add_used(id, 1);
        if n % 5 == 4 {
            q.publish_used();
            while r.pop_used(|_| 1).is_some() {}
        }
    }
    q.publish_used();
    while r.pop_used(|_| 1).is_some() {}
    assert_eq!(r.used, q.base().used);
    assert_eq!(q.base().used, RingPos::START.advance(3, size), "2^17 + 3 slots: four wraps, three slots");
}

#[test]
fn an_indirect_table_is_one_slot() {
    let mut r = TestRing::new(4);
    let mut q = r.queue(feats(false, true));
    let table = DATA + 0x8000;
    let entries = [
        PackedDescriptor { addr: DATA, len: 16, id: 0, flags: 0 },
        PackedDescriptor { addr: DATA + 0x1000, len: 4096, id: 0, flags: DESC_F_WRITE | DESC_F_NEXT },
        PackedDescriptor { addr: DATA + 0x3000, len: 1, id: 0, flags: DESC_F_WRITE },
    ];
    for (i, e) in entries.iter().enumerate() {
        r.mem.write_at(table + 16 * i as u64, &e.to_bytes()).unwrap();
    }
    r.add(3, &[(table, 48, DESC_F_INDIRECT)]);
    let (p, c) = pop(&mut q);
    assert_eq!(p, Popped::Chain);
    assert_eq!((c.head(), c.readable_len(), c.writable_len()), (3, 16, 4097));
    q.add_used(3, 4097);
    q.publish_used();
    assert_eq!(r.pop_used(|_| 1), Some((3, 4097)));
}

#[test]
fn bad_chains_are_refused_with_their_status_byte() {
    let r = TestRing::new(8);
    // Indirect not negotiated; a buffer outside memory; a zero-length buffer; readable
    // after writable; an indirect table of bad length; a nested table.
    let table = DATA + 0x8000;
    let nested = PackedDescriptor { addr: table, len: 16, id: 0, flags: DESC_F_INDIRECT };
    r.mem.write_at(table, &nested.to_bytes()).unwrap();
    let status = (DATA + 0x3000, 1, DESC_F_WRITE);
    // (the chain's buffers, the error, INDIRECT_DESC negotiated, a status byte found)
    type Case = (Vec<(u64, u32, u16)>, ChainError, bool, bool);
    let cases: Vec<Case> = vec![
        (
            vec![(DATA, 16, 0), (MEM_SIZE, 512, 0), status],
            ChainError::Memory(MemoryError::OutOfRange { addr: MEM_SIZE, len: 512 }),
            true,
            true,
        ),
        (vec![(DATA, 16, 0), (DATA + 0x1000, 0, 0), status], ChainError::ZeroLength, true, true),
        (vec![(DATA + 0x1000, 8, DESC_F_WRITE), (DATA, 16, 0), status], ChainError::ReadableAfterWritable, true, true),
        (vec![(table, 24, DESC_F_INDIRECT)], ChainError::IndirectBadLength(24), true, false),
        (vec![(table, 16, DESC_F_INDIRECT)], ChainError::NestedIndirect, true, false),
        (vec![(table, 16, DESC_F_INDIRECT)], ChainError::IndirectNotNegotiated, false, false),
        (vec![(DATA, 16, 0), (table, 16, DESC_F_INDIRECT)], ChainError::IndirectNotFirst, true, false),
    ];
    for (i, (bufs, want, indirect, has_status)) in cases.into_iter().enumerate() {
        let mut r2 = TestRing::new(8);
        r2.mem = r.mem.clone();
        let mut q = r2.queue(feats(false, indirect));
        r2.add(1, &bufs);
        let (p, _) = pop(&mut q);
        let Popped::Refused { head, error, status } = p else { panic!("case {i}: {p:?}") };
        assert_eq!(head, 1, "case {i}");
        if !matches!(want, ChainError::Memory(_)) {
            assert_eq!(error, want, "case {i}");
        }
        assert_eq!(status.is_some(), has_status, "case {i}: {status:?}");
        if let Some(s) = status {
            assert_eq!(s.iov.len(), 1);
        }
    }
}

#[test]
fn hostile_ids_and_chains_break_the_queue() {
    // An id out of range.
    let mut r = TestRing::new(4);
    let mut q = r.queue(feats(false, false));
    r.add(4, &[(DATA, 1, DESC_F_WRITE)]);
    assert_eq!(q.pop(&mut Chain::new()), Err(QueueError::IdOutOfRange { id: 4, size: 4 }));
    assert!(q.broken().is_some());
    assert!(q.has_available().is_err());

    // An id made available again while in flight.
    let mut r = TestRing::new(4);
    let mut q = r.queue(feats(false, false));
    r.add(2, &[(DATA, 1, DESC_F_WRITE)]);
    r.add(2, &[(DATA, 1, DESC_F_WRITE)]);
    assert_eq!(pop(&mut q).0, Popped::Chain);
    assert_eq!(q.pop(&mut Chain::new()), Err(QueueError::IdInFlight { id: 2 }));

    // A chain whose every slot says NEXT: no end within the ring.
    let r = TestRing::new(4);
    let mut q = r.queue(feats(false, false));
    for i in 0..4 {
        let d = PackedDescriptor { addr: DATA, len: 1, id: 0, flags: DESC_F_NEXT | packed_avail_flags(true) };
        r.write_slot(i, d);
    }
    assert_eq!(q.pop(&mut Chain::new()), Err(QueueError::PackedChainTooLong { size: 4 }));

    // A chain continuing into a slot the driver did not make available.
    let r = TestRing::new(4);
    let mut q = r.queue(feats(false, false));
    r.write_slot(0, PackedDescriptor { addr: DATA, len: 1, id: 0, flags: DESC_F_NEXT | packed_avail_flags(true) });
    r.write_slot(1, PackedDescriptor { addr: DATA, len: 1, id: 0, flags: packed_avail_flags(false) });
    assert_eq!(q.pop(&mut Chain::new()), Err(QueueError::PackedChainNotAvailable { slot: 1 }));

    // More slots made available than the ring holds: the driver lapped the device.
    let mut r = TestRing::new(2);
    let mut q = r.queue(feats(false, false));
    r.add(0, &[(DATA, 1, DESC_F_WRITE)]);
    r.add(1, &[(DATA, 1, DESC_F_WRITE)]);
    assert_eq!(pop(&mut q).0, Popped::Chain);
    assert_eq!(pop(&mut q).0, Popped::Chain);
    // Slot 0 offered again in the next lap while both requests are still in flight.
    r.add(3, &[(DATA, 1, DESC_F_WRITE)]);
    assert_eq!(q.pop(&mut Chain::new()), Err(QueueError::PackedOverrun { in_flight: 2, slots: 1, size: 2 }));
    let mut r = TestRing::new(2);
    let mut q = r.queue(feats(false, false));
    r.add(0, &[(DATA, 1, DESC_F_WRITE)]);
    assert_eq!(pop(&mut q).0, Popped::Chain);
    r.add(1, &[(DATA, 1, 0), (DATA, 1, DESC_F_WRITE)]);
    assert_eq!(q.pop(&mut Chain::new()), Err(QueueError::PackedOverrun { in_flight: 1, slots: 2, size: 2 }));
}

#[test]
fn wrap_bits_flipped_arbitrarily_never_pop_a_slot_twice() {
    // A driver that writes random flags into slots: the device pops a slot only when
    // its flags say available for the device's own wrap counter, so whatever the
    // driver does, popped + in flight stay within the ring.
    let mut r = TestRing::new(4);
    let mut q = r.queue(feats(false, false));
    let mut seed = 0x1234_5678u32;
    let mut popped = 0u32;
    for _ in 0..10_000 {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let slot = (seed % 4) as u16;
        let flags = ((seed >> 8) as u16) & (PACKED_DESC_F_AVAIL_USED | DESC_F_WRITE);
        let id = ((seed >> 20) % 4) as u16;
        r.write_slot(slot, PackedDescriptor { addr: DATA, len: 1, id, flags });
        match q.pop(&mut Chain::new()) {
            Ok(Popped::Chain) | Ok(Popped::Refused { .. }) => popped += 1,
            Ok(Popped::Empty) => {}
            Err(_) => break,
        }
        assert!(q.num_in_flight() <= 4);
        // Complete everything at once now and then, as a device would.
        if seed.is_multiple_of(3) {
            for id in 0..4 {
                q.add_used(id, 0);
            }
            q.publish_used();
        }
    }
    r.avail = q.base().avail;
    assert!(popped > 0);
}

const PACKED_DESC_F_AVAIL_USED: u16 = crate::layout::PACKED_DESC_F_AVAIL | crate::layout::PACKED_DESC_F_USED;

#[test]
fn event_suppression_follows_the_driver_structure() {
    let mut r = TestRing::new(8);
    let mut q = r.queue(feats(true, false));
    let round = |q: &mut PackedQueue, r: &mut TestRing, id: u16| {
        r.add(id, &[(DATA, 1, DESC_F_WRITE)]);
        assert_eq!(pop(q).0, Popped::Chain);
        q.add_used(id, 1);
        let n = q.publish_used();
        r.pop_used(|_| 1).unwrap();
        n
    };
    r.set_driver_event(EVENT_FLAG_DISABLE, 0);
    assert!(!round(&mut q, &mut r, 0));
    r.set_driver_event(EVENT_FLAG_ENABLE, 0);
    assert!(round(&mut q, &mut r, 1));
    // DESC: notify when the used descriptor at slot 4 (wrap 1) is written.
    r.set_driver_event(EVENT_FLAG_DESC, 4 | 0x8000);
    assert!(round(&mut q, &mut r, 2), "first DESC check always notifies");
    assert!(!round(&mut q, &mut r, 3), "slot 3");
    assert!(round(&mut q, &mut r, 4), "slot 4");
    assert!(!round(&mut q, &mut r, 5), "slot 5");
    // An event in the next lap (wrap 0), at slot 1: slots 6, 7, 0 do not reach it.
    r.set_driver_event(EVENT_FLAG_DESC, 1);
    assert!(!round(&mut q, &mut r, 6));
    assert!(!round(&mut q, &mut r, 7));
    assert!(!round(&mut q, &mut r, 0));
    assert!(round(&mut q, &mut r, 1));

    // The device's structure: DESC at its avail position with EVENT_IDX, ENABLE without,
    // DISABLE while polling.
    assert!(!q.enable_notification().unwrap());
    assert_eq!(r.read_u16(DEVICE_EVENT + 2), EVENT_FLAG_DESC);
    assert_eq!(r.read_u16(DEVICE_EVENT), q.base().avail.encode());
    q.disable_notification();
    assert_eq!(r.read_u16(DEVICE_EVENT + 2), EVENT_FLAG_DISABLE);
    let mut q2 = r.queue(feats(false, false));
    q2.set_base(q.base());
    q2.enable_notification().unwrap();
    assert_eq!(r.read_u16(DEVICE_EVENT + 2), EVENT_FLAG_ENABLE);
    // Work that raced with enabling is reported.
    r.add(2, &[(DATA, 1, DESC_F_WRITE)]);
    assert!(q2.enable_notification().unwrap());
}

#[test]
fn the_vring_base_encodes_both_positions_with_their_wrap_counters() {
    let b = PackedBase { avail: RingPos { idx: 5, wrap: false }, used: RingPos { idx: 3, wrap: true } };
    assert_eq!(b.encode(), 5 | (3 | 0x8000) << 16);
    assert_eq!(PackedBase::decode(b.encode(), 8), Some(b));
    assert_eq!(PackedBase::START.encode(), 0x8000_8000, "what QEMU sends for a fresh ring");
    assert_eq!(PackedBase::decode(0x8000_8008, 8), None, "avail index 8 in a ring of 8");
    assert_eq!(PackedBase::decode(0x8009_8000, 8), None, "used index 9");
}

#[test]
fn sizes_are_any_number_up_to_32768() {
    let r = TestRing::new(3);
    let addrs = RingAddrs { desc: RING, avail: DRIVER_EVENT, used: DEVICE_EVENT };
    for bad in [0u32, 32769, 65536] {
        assert_eq!(
            PackedQueue::new(r.mem.clone(), bad, addrs, AddrSpace::GuestPhysical, feats(false, false)).err(),
            Some(QueueError::InvalidPackedSize(bad))
        );
    }
    // Event structures must be 4-aligned, the ring 16-aligned.
    let bad = RingAddrs { desc: RING + 8, ..addrs };
    assert!(PackedQueue::new(r.mem.clone(), 3, bad, AddrSpace::GuestPhysical, feats(false, false)).is_err());
    let bad = RingAddrs { avail: DRIVER_EVENT + 2, ..addrs };
    assert!(PackedQueue::new(r.mem.clone(), 3, bad, AddrSpace::GuestPhysical, feats(false, false)).is_err());
    let _ = TestRing::read_u16;
}
