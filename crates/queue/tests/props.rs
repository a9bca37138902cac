//! Property tests for the split ring's index arithmetic and notification suppression:
//!
//! - `need_event` against a step-by-step model over wrapping u16 indices;
//! - EVENT_IDX end to end: a side that re-enabled notifications and went to sleep is
//!   always woken, and a notification is sent exactly when the other side's event index
//!   is crossed;
//! - avail-index jump detection: any `avail.idx` relative to `next_avail` is refused iff
//!   it is more than the queue size ahead;
//! - the used ring across the u16 wrap, read back by the driver in completion order;
//! - `DriverQueue` + `SplitQueue` under random add / publish / pop / complete / reap
//!   sequences: every head completes exactly once with its own length, and no descriptor
//!   leaks.

use std::collections::VecDeque;
use std::sync::Arc;

use proptest::prelude::*;
use vblk_queue::layout::{DESC_F_NEXT, DESC_F_WRITE};
use vblk_queue::{
    need_event, AddrSpace, Buffer, Chain, Descriptor, DriverQueue, Popped, QueueError, RingAddrs, RingFeatures,
    SplitLayout, SplitQueue,
};
use vblk_virtio::memory::memfd;
use vblk_virtio::{GuestMemory, RegionSpec};

const MEM: u64 = 1 << 20;
const RINGS: u64 = 0x1000;
const TABLES: u64 = 0x4_0000;
const DATA: u64 = 0x8_0000;

fn memory() -> Arc<GuestMemory> {
    let spec = RegionSpec { guest_phys_addr: 0, size: MEM, user_addr: 0x7f00_0000_0000, mmap_offset: 0 };
    Arc::new(GuestMemory::from_files(&[(spec, memfd("props", MEM).unwrap())]).unwrap())
}

fn addrs(size: u16) -> RingAddrs {
    let l = SplitLayout { size };
    let avail = RINGS + l.desc_table_len();
    let used = (avail + l.avail_len() + 3) & !3;
    RingAddrs { desc: RINGS, avail, used }
}

fn queue_size() -> impl Strategy<Value = u16> {
    (0u32..=8).prop_map(|s| 1 << s)
}

fn write_u16(mem: &GuestMemory, gpa: u64, v: u16) {
    mem.write_at(gpa, &v.to_le_bytes()).unwrap();
}

fn read_u16(mem: &GuestMemory, gpa: u64) -> u16 {
    let mut b = [0u8; 2];
    mem.read_at(gpa, &mut b).unwrap();
    u16::from_le_bytes(b)
}

/// Did moving an index from `old` forward by `steps` (< 2^16) pass `event`, i.e. was the
/// entry at `event` among the ones just added? Walked one step at a time.
fn crossed_by_walking(event: u16, old: u16, steps: u32) -> bool {
    (0..steps).any(|j| old.wrapping_add(j as u16) == event)
}

/// u16 offsets with the edges over-represented: 0..4, -4..0 (wrapping), anything.
fn edge_u16() -> impl Strategy<Value = u16> {
    prop_oneof![0u16..5, 65531u16..=65535, any::<u16>()]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn need_event_matches_a_step_by_step_model(old: u16, steps in 0u32..1024, event_off in -4i32..1030) {
        let new = old.wrapping_add(steps as u16);
        let event = old.wrapping_add(event_off as u16);
        prop_assert_eq!(need_event(event, new, old), crossed_by_walking(event, old, steps));
    }

    #[test]
    fn need_event_matches_the_window_model_for_any_distance(
        old: u16,
        distance in edge_u16(),
        event_off in edge_u16(),
        near_new: bool,
    ) {
        // Any move is taken as forward by `new - old` (mod 2^16): notify iff `event` lies
        // in the half-open window [old, new).
        let new = old.wrapping_add(distance);
        let event = if near_new { new.wrapping_add(event_off) } else { old.wrapping_add(event_off) };
        let crossed = event.wrapping_sub(old) < new.wrapping_sub(old);
        prop_assert_eq!(need_event(event, new, old), crossed);
        prop_assert!(!need_event(event, old, old), "no movement never notifies");
    }

    /// A sequence of batches; before each, the other side may move its event index
    /// anywhere. Notification happens exactly for the batches that add entry `event`.
    #[test]
    fn notifications_happen_exactly_when_the_event_index_is_crossed(
        start: u16,
        batches in prop::collection::vec((0u32..300, prop::option::of(any::<u16>())), 1..60),
    ) {
        let mut idx = start;
        let mut event = start;
        for (n, new_event) in batches {
            if let Some(e) = new_event {
                event = e;
            }
            let old = idx;
            let mut crossed = false;
            for _ in 0..n {
                crossed |= idx == event;
                idx = idx.wrapping_add(1);
            }
            prop_assert_eq!(need_event(event, idx, old), crossed, "{} -> {} event {}", old, idx, event);
        }
    }
}

/// A pair of queues over one ring: the driver side and the device side.
struct Pair {
    mem: Arc<GuestMemory>,
    drv: DriverQueue,
    dev: SplitQueue,
    size: u16,
}

impl Pair {
    fn new(size: u16, features: RingFeatures) -> Pair {
        let mem = memory();
        let a = addrs(size);
        let drv = DriverQueue::new(mem.clone(), size as u32, a, features).unwrap();
        let dev = SplitQueue::new(mem.clone(), size as u32, a, AddrSpace::GuestPhysical, features).unwrap();
        Pair { mem, drv, dev, size }
    }

    /// One single-buffer request; its data slot is its head.
    fn add_one(&mut self) -> u16 {
        let h = self.drv.next_free();
        self.drv.add(&[Buffer { addr: DATA + 64 * h as u64, len: 16, write: true }]).unwrap()
    }

    fn pop_all(&mut self, chain: &mut Chain) -> Vec<u16> {
        let mut heads = Vec::new();
        loop {
            match self.dev.pop(chain).unwrap() {
                Popped::Empty => return heads,
                Popped::Chain => heads.push(chain.head()),
                Popped::Refused { head, error, .. } => panic!("head {head} refused: {error}"),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// EVENT_IDX both ways, end to end, with random batch sizes: a device that re-enabled
    /// kicks (and found no work) is always kicked for the next request, and a driver that
    /// re-enabled interrupts (and found nothing) is always interrupted; every kick or
    /// interrupt decision is exactly `need_event` on the index the other side published.
    #[test]
    fn event_idx_never_loses_a_wakeup(
        size in queue_size(),
        steps in prop::collection::vec((1u16..=256, any::<bool>(), any::<bool>()), 1..40),
    ) {
        let mut p = Pair::new(size, RingFeatures { event_idx: true, indirect: false });
        let l = SplitLayout { size };
        let a = addrs(size);
        let mut chain = Chain::new();
        let mut device_asleep = !p.dev.enable_notification().unwrap();
        let mut driver_asleep = !p.drv.enable_interrupts();
        let mut kicked_at = 0u16;
        let mut signalled_at: Option<u16> = None;
        for (n, device_rearms, driver_rearms) in steps {
            let n = n.min(p.drv.num_free());
            if n == 0 {
                continue;
            }
            // Driver: add, publish, kick?
            for _ in 0..n {
                p.add_one();
            }
            p.drv.publish();
            let avail_idx = read_u16(&p.mem, a.avail + 2);
            let avail_event = read_u16(&p.mem, a.used + l.avail_event() as u64);
            let kick = p.drv.needs_kick();
            prop_assert_eq!(kick, need_event(avail_event, avail_idx, kicked_at));
            kicked_at = avail_idx;
            if device_asleep {
                prop_assert!(kick, "device asleep with kicks enabled was not kicked");
            }
            // Device: pop everything, complete it, publish, interrupt?
            let heads = p.pop_all(&mut chain);
            prop_assert_eq!(heads.len(), n as usize);
            for h in &heads {
                prop_assert!(p.dev.add_used(*h, 1));
            }
            let used_event = read_u16(&p.mem, a.avail + l.used_event() as u64);
            let irq = p.dev.publish_used();
            let used_idx = p.dev.next_used();
            let want = match signalled_at.replace(used_idx) {
                None => true,
                Some(old) => need_event(used_event, used_idx, old),
            };
            prop_assert_eq!(irq, want);
            if driver_asleep {
                prop_assert!(irq, "driver asleep with interrupts enabled was not interrupted");
            }
            // Driver reaps; each side re-arms (and sleeps) or keeps polling.
            let mut reaped = 0;
            while let Some((h, _)) = p.drv.pop_used().unwrap() {
                prop_assert!(heads.contains(&h));
                reaped += 1;
            }
            prop_assert_eq!(reaped, heads.len());
            device_asleep = device_rearms && !p.dev.enable_notification().unwrap();
            if !device_rearms {
                p.dev.disable_notification();
            }
            driver_asleep = driver_rearms && !p.drv.enable_interrupts();
            if !driver_rearms {
                p.drv.disable_interrupts();
            }
        }
    }

    /// Delayed interrupts (`enable_interrupts_after(k)`, Linux's `virtqueue_enable_cb_delayed`):
    /// with `n` requests in flight, a device completing them one by one interrupts exactly
    /// once, at the k-th completion; a driver arming for k when k are already used does not
    /// sleep.
    #[test]
    fn delayed_interrupts_fire_once_at_the_kth_completion(
        size in queue_size(),
        n in 1u16..=256,
        k in 1u16..=256,
        warmup in 0u16..=300,
    ) {
        let mut p = Pair::new(size, RingFeatures { event_idx: true, indirect: false });
        let mut chain = Chain::new();
        // Move the indices somewhere (wrapping included) and past the first publication,
        // which always notifies.
        for _ in 0..=warmup {
            p.add_one();
            p.drv.publish();
            for h in p.pop_all(&mut chain) {
                p.dev.add_used(h, 1);
            }
            p.dev.publish_used();
            while p.drv.pop_used().unwrap().is_some() {}
        }
        let n = n.min(size);
        let k = k.min(n);
        for _ in 0..n {
            p.add_one();
        }
        p.drv.publish();
        prop_assert!(!p.drv.enable_interrupts_after(k), "nothing is used yet");
        let heads = p.pop_all(&mut chain);
        prop_assert_eq!(heads.len(), n as usize);
        for (i, h) in heads.iter().enumerate() {
            p.dev.add_used(*h, 1);
            let irq = p.dev.publish_used();
            prop_assert_eq!(irq, i + 1 == k as usize, "completion {} of {}, k {}", i + 1, n, k);
            if i + 1 == k as usize {
                prop_assert!(p.drv.enable_interrupts_after(k), "k entries are there: do not sleep");
            }
        }
    }

    /// Whatever `avail.idx` the driver writes, relative to where the device is: at most
    /// `size` ahead is work (popped one by one), more is a broken ring.
    #[test]
    fn avail_idx_jumps_are_refused_iff_beyond_the_queue_size(
        size in queue_size(),
        base: u16,
        distance: u16,
    ) {
        let mem = memory();
        let a = addrs(size);
        let l = SplitLayout { size };
        for i in 0..size {
            let d = Descriptor { addr: DATA, len: 16, flags: 0, next: 0 };
            mem.write_at(a.desc + l.desc(i) as u64, &d.to_bytes()).unwrap();
        }
        for k in 0..distance.min(size) {
            let i = base.wrapping_add(k);
            write_u16(&mem, a.avail + l.avail_entry(i) as u64, k);
        }
        let now = base.wrapping_add(distance);
        write_u16(&mem, a.avail + 2, now);
        let mut q = SplitQueue::new(mem.clone(), size as u32, a, AddrSpace::GuestPhysical, RingFeatures::default())
            .unwrap();
        q.set_next_avail(base);
        let mut chain = Chain::new();
        if distance > size {
            prop_assert_eq!(q.has_available().unwrap_err(), QueueError::AvailIdxJump { last: base, now, size });
            prop_assert!(q.pop(&mut chain).is_err());
            prop_assert_eq!(q.num_in_flight(), 0);
        } else {
            prop_assert_eq!(q.has_available().unwrap(), distance != 0);
            for k in 0..distance {
                prop_assert_eq!(q.pop(&mut chain).unwrap(), Popped::Chain);
                prop_assert_eq!(chain.head(), k);
            }
            prop_assert_eq!(q.pop(&mut chain).unwrap(), Popped::Empty);
            prop_assert_eq!(q.num_in_flight(), distance);
            prop_assert_eq!(q.next_avail(), now);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    /// Run well past 65536 requests in random batches (out-of-order completion inside a
    /// batch): the driver reads back every used element, in completion order, with the
    /// length the device wrote, across the u16 wrap of both indices.
    #[test]
    fn the_used_ring_survives_the_u16_wrap(
        size in (2u32..=8).prop_map(|s| 1u16 << s),
        extra in 0u32..3000,
        seed: u64,
    ) {
        let mut p = Pair::new(size, RingFeatures::default());
        let mut chain = Chain::new();
        let mut rng = seed | 1;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let total = 65536 + 2 * size as u32 + extra;
        let mut seq = 0u32;
        let mut done = 0u32;
        while done < total {
            let n = (1 + next() % size as u64) as u16;
            for _ in 0..n {
                p.add_one();
            }
            p.drv.publish();
            let mut heads = p.pop_all(&mut chain);
            prop_assert_eq!(heads.len(), n as usize);
            // Complete in a shuffled order; the used length carries a sequence number.
            for i in (1..heads.len()).rev() {
                heads.swap(i, (next() % (i as u64 + 1)) as usize);
            }
            let mut expected = VecDeque::new();
            for (k, h) in heads.iter().enumerate() {
                let len = seq.wrapping_add(k as u32);
                prop_assert!(p.dev.add_used(*h, len));
                expected.push_back((*h, len));
                // Publish in the middle of the batch sometimes.
                if next() % 4 == 0 {
                    p.dev.publish_used();
                }
            }
            p.dev.publish_used();
            seq = seq.wrapping_add(heads.len() as u32);
            while let Some(got) = p.drv.pop_used().unwrap() {
                prop_assert_eq!(Some(got), expected.pop_front());
            }
            prop_assert!(expected.is_empty());
            prop_assert_eq!(p.drv.num_free(), size);
            done += n as u32;
        }
        prop_assert_eq!(p.dev.next_used(), done as u16);
        prop_assert_eq!(p.dev.next_avail(), done as u16);
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// A request of `readable` + `writable` buffers (at least one), direct or indirect.
    Add {
        readable: u8,
        writable: u8,
        indirect: bool,
    },
    Publish,
    /// The device pops up to `n` chains.
    Pop(u8),
    /// The device completes the popped request at `pick % popped` with `len`.
    Complete {
        pick: u8,
        len: u32,
    },
    DevicePublish,
    /// The driver reaps up to `n` completions.
    Reap(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 0u8..3, any::<bool>()).prop_map(|(r, w, i)| Op::Add { readable: r, writable: w.max((r == 0) as u8), indirect: i }),
        2 => Just(Op::Publish),
        2 => (1u8..8).prop_map(Op::Pop),
        3 => (any::<u8>(), any::<u32>()).prop_map(|(pick, len)| Op::Complete { pick, len }),
        2 => Just(Op::DevicePublish),
        2 => (1u8..8).prop_map(Op::Reap),
    ]
}

/// What the driver put in one request.
#[derive(Clone, Debug)]
struct Sent {
    readable: u64,
    writable: u64,
    descriptors: u16,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn driver_and_device_stay_consistent(
        size in queue_size(),
        event_idx: bool,
        ops in prop::collection::vec(op(), 1..200),
    ) {
        let features = RingFeatures { event_idx, indirect: true };
        let mut p = Pair::new(size, features);
        let mut chain = Chain::new();
        // Driver view: head -> request, for heads added and not reaped.
        let mut sent: Vec<Option<Sent>> = vec![None; size as usize];
        // Device view: popped, not completed; completed, not yet reaped (head, len).
        let mut popped: Vec<u16> = Vec::new();
        let mut completed: VecDeque<(u16, u32)> = VecDeque::new();
        let mut unpublished = 0usize;
        let mut published_avail = 0u16;
        let mut added = 0u16;

        let check_free = |p: &Pair, sent: &[Option<Sent>]| -> Result<(), TestCaseError> {
            let used: u16 = sent.iter().flatten().map(|s| s.descriptors).sum();
            prop_assert_eq!(p.drv.num_free() + used, p.size, "descriptor accounting");
            Ok(())
        };

        for op in ops {
            match op {
                Op::Add { readable, writable, indirect } => {
                    let head = p.drv.next_free();
                    let mut bufs = Vec::new();
                    let mut lens = (0u64, 0u64);
                    for i in 0..(readable + writable) {
                        let write = i >= readable;
                        let len = 1 + (head as u32 * 7 + i as u32) % 61;
                        let addr = DATA + head as u64 * 0x400 + 0x80 * i as u64;
                        bufs.push(Buffer { addr, len, write });
                        if write { lens.1 += len as u64 } else { lens.0 += len as u64 }
                    }
                    let n = bufs.len() as u16;
                    let r = if indirect {
                        p.drv.add_indirect(&bufs, TABLES + head as u64 * 0x100)
                    } else {
                        p.drv.add(&bufs)
                    };
                    let need = if indirect { 1 } else { n };
                    match r {
                        Ok(h) => {
                            prop_assert_eq!(h, head);
                            prop_assert!(sent[h as usize].is_none(), "head {} handed out twice", h);
                            sent[h as usize] = Some(Sent { readable: lens.0, writable: lens.1, descriptors: need });
                            added = added.wrapping_add(1);
                        }
                        Err(_) => prop_assert!(p.drv.num_free() < need, "refused with {} free", p.drv.num_free()),
                    }
                }
                Op::Publish => {
                    p.drv.publish();
                    published_avail = added;
                }
                Op::Pop(n) => {
                    for _ in 0..n {
                        match p.dev.pop(&mut chain).unwrap() {
                            Popped::Empty => {
                                prop_assert_eq!(p.dev.next_avail(), published_avail);
                                break;
                            }
                            Popped::Chain => {
                                let h = chain.head();
                                let s = sent[h as usize].clone();
                                prop_assert!(s.is_some(), "device popped head {} the driver never added", h);
                                let s = s.unwrap();
                                prop_assert_eq!((chain.readable_len(), chain.writable_len()), (s.readable, s.writable));
                                prop_assert!(!popped.contains(&h) && !completed.iter().any(|c| c.0 == h));
                                popped.push(h);
                            }
                            Popped::Refused { head, error, .. } => prop_assert!(false, "head {} refused: {}", head, error),
                        }
                    }
                    prop_assert_eq!(p.dev.num_in_flight() as usize, popped.len());
                }
                Op::Complete { pick, len } => {
                    if !popped.is_empty() {
                        let h = popped.swap_remove(pick as usize % popped.len());
                        prop_assert!(p.dev.add_used(h, len));
                        prop_assert!(!p.dev.add_used(h, len), "completed twice");
                        completed.push_back((h, len));
                        unpublished += 1;
                    }
                }
                Op::DevicePublish => {
                    let _ = p.dev.publish_used();
                    unpublished = 0;
                }
                Op::Reap(n) => {
                    for _ in 0..n {
                        match p.drv.pop_used().unwrap() {
                            None => {
                                prop_assert_eq!(completed.len(), unpublished, "published completions not seen");
                                break;
                            }
                            Some((h, len)) => {
                                prop_assert_eq!(Some((h, len)), completed.pop_front(), "used ring order");
                                prop_assert!(sent[h as usize].take().is_some());
                            }
                        }
                    }
                }
            }
            check_free(&p, &sent)?;
            prop_assert!(p.dev.num_in_flight() <= size);
        }

        // Drain: everything added is popped, completed, published and reaped once.
        p.drv.publish();
        loop {
            match p.dev.pop(&mut chain).unwrap() {
                Popped::Empty => break,
                Popped::Chain => popped.push(chain.head()),
                Popped::Refused { head, error, .. } => prop_assert!(false, "head {} refused: {}", head, error),
            }
        }
        for h in popped.drain(..) {
            prop_assert!(p.dev.add_used(h, 0));
            completed.push_back((h, 0));
        }
        p.dev.publish_used();
        while let Some((h, len)) = p.drv.pop_used().unwrap() {
            prop_assert_eq!(Some((h, len)), completed.pop_front());
            prop_assert!(sent[h as usize].take().is_some());
        }
        prop_assert!(completed.is_empty());
        prop_assert!(sent.iter().all(Option::is_none), "requests never completed");
        prop_assert_eq!(p.drv.num_free(), size, "descriptors leaked");
        prop_assert_eq!(p.drv.in_flight(), 0);
        prop_assert_eq!(p.dev.num_in_flight(), 0);
    }
}

#[test]
fn descriptor_flags_used_by_these_tests_are_the_spec_ones() {
    assert_eq!((DESC_F_NEXT, DESC_F_WRITE), (1, 2));
}
