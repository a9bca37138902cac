//! Crash at every store of pop / complete / batch publish on a packed ring (and at every
//! store of recovery itself), recover from what shared memory held at that instant, and
//! check the recovery yields exactly the chains the guest has not seen used, with their
//! descriptors, in pop order, and the used position the guest sees. Devices restarted from
//! such crashes go on, and every request completes exactly once. Then hostile regions.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;

use vblk_virtio::memory::memfd;
use vblk_virtio::{GuestMemory, RegionSpec};

use super::*;
use crate::layout::{packed_is_used, packed_used_flags, DESC_F_NEXT, DESC_F_WRITE};

const SIZE: u16 = 8;

fn memory(size: u16) -> Arc<GuestMemory> {
    let len = packed_region_size(size).next_multiple_of(4096);
    let spec = RegionSpec { guest_phys_addr: 0, size: len, user_addr: 0x7000_0000, mmap_offset: 0 };
    Arc::new(GuestMemory::from_files(&[(spec, memfd("inflight-packed", len).unwrap())]).unwrap())
}

fn area(mem: &Arc<GuestMemory>, size: u16) -> GuestArea {
    mem.area_at_gpa(0, packed_region_size(size), REGION_ALIGN).unwrap()
}

fn image(mem: &GuestMemory, size: u16) -> Vec<u8> {
    let mut v = vec![0u8; packed_region_size(size) as usize];
    mem.read_at(0, &mut v).unwrap();
    v
}

fn u16_at(img: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([img[off], img[off + 1]])
}

fn put16(img: &mut [u8], off: usize, v: u16) {
    img[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

/// Run `f` and return the region's bytes after each store it made.
fn capture<R>(f: impl FnOnce() -> R) -> (R, Vec<Vec<u8>>) {
    let shots = Rc::new(RefCell::new(Vec::new()));
    let s = Rc::clone(&shots);
    STORE_HOOK.with(|h| {
        *h.borrow_mut() = Some(Box::new(move |a: &GuestArea| {
            let mut v = vec![0u8; a.len()];
            a.read(0, &mut v);
            s.borrow_mut().push(v);
        }))
    });
    let r = f();
    STORE_HOOK.with(|h| *h.borrow_mut() = None);
    let shots = Rc::try_unwrap(shots).expect("hook dropped").into_inner();
    (r, shots)
}

/// What a recovery found: the used position and the resubmitted chains' descriptors.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Outcome {
    used: RingPos,
    chains: Vec<Vec<PackedDescriptor>>,
}

/// A used position no recovery may take: recovery ignores the one it is given.
const BOGUS: RingPos = RingPos { idx: 5, wrap: false };

fn recover(mem: &Arc<GuestMemory>, ring: &[u16]) -> (InflightPacked, RingPos, Vec<ResubmitChain>) {
    let (q, a) = InflightPacked::attach(area(mem, SIZE), SIZE, BOGUS, |i| ring[i as usize], true).unwrap();
    let AttachedPacked::Recovered { used, resubmit } = a else { panic!("a used region must be recovered, got {a:?}") };
    (q, used, resubmit)
}

fn outcome(used: RingPos, resubmit: &[ResubmitChain]) -> Outcome {
    Outcome { used, chains: resubmit.iter().map(|c| c.descs.clone()).collect() }
}

/// Recover `region` (with the ring's slot flags `ring`) on `scratch`. Also checks that a
/// crash after any store of that recovery recovers the same, and that recovering the
/// recovered region again stores nothing and finds the same. Returns the outcome and the
/// number of recoveries done.
fn check(scratch: &Arc<GuestMemory>, region: &[u8], ring: &[u16]) -> (Outcome, usize) {
    scratch.write_at(0, region).unwrap();
    let ((_, used, resubmit), shots) = capture(|| recover(scratch, ring));
    let got = outcome(used, &resubmit);
    let ((_, used, resubmit), none) = capture(|| recover(scratch, ring));
    assert_eq!(outcome(used, &resubmit), got, "recovering a recovered region");
    assert!(none.is_empty(), "recovering a recovered region stores nothing");
    for s in &shots {
        scratch.write_at(0, s).unwrap();
        let (_, used, resubmit) = recover(scratch, ring);
        assert_eq!(outcome(used, &resubmit), got, "a crash during recovery");
    }
    (got, 2 + shots.len())
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One chain the guest made available.
#[derive(Clone, Debug)]
struct Req {
    id: u16,
    descs: Vec<PackedDescriptor>,
    start: RingPos,
}

/// The descriptors of chain `seq` say which chain they are.
fn seq_of(descs: &[PackedDescriptor]) -> usize {
    (descs[0].addr >> 20) as usize
}

/// A state to restart a device from: the region, the ring, and what the guest had seen.
struct Point {
    region: Vec<u8>,
    ring: Vec<u16>,
    ids: Vec<u16>,
    outcome: Outcome,
    visible: usize,
}

/// A guest driver, a device with an inflight region, and the ring between them.
struct Sim {
    rng: Rng,
    seed: u64,
    /// The ring: each slot's flags, and the buffer id of a used descriptor.
    ring: Vec<u16>,
    ids: Vec<u16>,
    /// Every chain made available, in ring order (its index is its `seq`).
    reqs: Vec<Req>,
    // The guest.
    g_avail: RingPos,
    g_used: RingPos,
    g_slots: u16,
    g_free_ids: Vec<u16>,
    g_out: BTreeMap<u16, usize>,
    done: Vec<bool>,
    // The device.
    q: InflightPacked,
    q_mem: Arc<GuestMemory>,
    next_pop: usize,
    /// Popped, not completed: (entry, seq).
    in_flight: Vec<(u16, usize)>,
    /// Completed, not yet published.
    completed: Vec<(u16, usize)>,
    /// The end of the used descriptors written, and the first one's slot and flags.
    d_next_used: RingPos,
    pending_first: Option<(u16, u16)>,
    // What recovery must find.
    unfinished: BTreeSet<usize>,
    /// Chains made visible, in publish order; `is_visible[seq]`.
    visible: Vec<usize>,
    is_visible: Vec<bool>,
    visible_used: RingPos,
    scratch: Arc<GuestMemory>,
    checks: usize,
    restarts: usize,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        // Any vring base: the slots behind it were used in its lap, the others in the last.
        let start = RingPos { idx: rng.below(SIZE as u64) as u16, wrap: rng.below(2) == 0 };
        let ring = (0..SIZE).map(|i| packed_used_flags(if i < start.idx { start.wrap } else { !start.wrap })).collect();
        let q_mem = memory(SIZE);
        let (q, a) = InflightPacked::attach(area(&q_mem, SIZE), SIZE, start, |_| unreachable!(), true).unwrap();
        assert_eq!(a, AttachedPacked::Fresh);
        Sim {
            rng,
            seed,
            ring,
            ids: vec![0; SIZE as usize],
            reqs: Vec::new(),
            g_avail: start,
            g_used: start,
            g_slots: 0,
            g_free_ids: (0..SIZE).collect(),
            g_out: BTreeMap::new(),
            done: Vec::new(),
            q,
            q_mem,
            next_pop: 0,
            in_flight: Vec::new(),
            completed: Vec::new(),
            d_next_used: start,
            pending_first: None,
            unfinished: BTreeSet::new(),
            visible: Vec::new(),
            is_visible: Vec::new(),
            visible_used: start,
            scratch: memory(SIZE),
            checks: 0,
            restarts: 0,
        }
    }

    fn expected(&self) -> Outcome {
        Outcome {
            used: self.visible_used,
            chains: self.unfinished.iter().map(|&s| self.reqs[s].descs.clone()).collect(),
        }
    }

    /// Recover `region` with the ring as it is now.
    fn check(&mut self, region: Vec<u8>) -> Point {
        let (outcome, n) = check(&self.scratch, &region, &self.ring);
        self.checks += n;
        Point { region, ring: self.ring.clone(), ids: self.ids.clone(), outcome, visible: self.visible.len() }
    }

    /// A crash now must recover what the guest can tell.
    fn check_now(&mut self, what: &str) -> Point {
        let p = self.check(image(&self.q_mem, SIZE));
        assert_eq!(p.outcome, self.expected(), "seed {}: {what}", self.seed);
        p
    }

    /// A crash after each of `shots` must recover what the guest can tell.
    fn check_all(&mut self, shots: Vec<Vec<u8>>, what: &str) -> Vec<Point> {
        let want = self.expected();
        shots
            .into_iter()
            .map(|s| {
                let p = self.check(s);
                assert_eq!(p.outcome, want, "seed {}: {what}", self.seed);
                p
            })
            .collect()
    }

    /// The guest offers a chain of `k` descriptors, if it has room.
    fn offer(&mut self, k: u16) {
        if self.g_slots + k > SIZE || self.g_free_ids.is_empty() {
            return;
        }
        let id = self.g_free_ids.swap_remove(self.rng.below(self.g_free_ids.len() as u64) as usize);
        let seq = self.reqs.len();
        let mut descs = Vec::new();
        for j in 0..k {
            let pos = self.g_avail.advance(j, SIZE);
            let mut flags = packed_avail_flags(pos.wrap);
            if j + 1 < k {
                flags |= DESC_F_NEXT;
            } else {
                flags |= DESC_F_WRITE;
            }
            descs.push(PackedDescriptor {
                addr: (seq as u64) << 20 | (j as u64) << 12,
                len: 512 * (j as u32 + 1),
                id,
                flags,
            });
        }
        // Later slots first, the head's flags last (§2.8.21.1).
        for (j, d) in descs.iter().enumerate().rev() {
            self.ring[self.g_avail.advance(j as u16, SIZE).idx as usize] = d.flags;
        }
        self.reqs.push(Req { id, descs, start: self.g_avail });
        self.done.push(false);
        self.is_visible.push(false);
        self.g_avail = self.g_avail.advance(k, SIZE);
        self.g_slots += k;
        self.g_out.insert(id, seq);
    }

    /// The guest takes the used descriptors it can see.
    fn reap(&mut self) {
        while packed_is_used(self.ring[self.g_used.idx as usize], self.g_used.wrap) {
            let id = self.ids[self.g_used.idx as usize];
            let seq =
                self.g_out.remove(&id).unwrap_or_else(|| panic!("seed {}: used id {id} not outstanding", self.seed));
            assert!(self.is_visible[seq], "seed {}: chain {seq} seen used, never published", self.seed);
            assert!(!std::mem::replace(&mut self.done[seq], true), "seed {}: chain {seq} done twice", self.seed);
            let k = self.reqs[seq].descs.len() as u16;
            self.g_used = self.g_used.advance(k, SIZE);
            self.g_slots -= k;
            self.g_free_ids.push(id);
        }
    }

    /// The device pops the next chain. While the pop runs, recovery finds either the state
    /// before it or, from one store on (its commit), the state after it.
    fn pop(&mut self) -> Vec<Point> {
        let seq = self.next_pop;
        let descs = self.reqs[seq].descs.clone();
        let before = self.expected();
        let (entry, shots) = capture(|| self.q.mark(&descs));
        assert!(entry < SIZE, "seed {}: pop not recorded", self.seed);
        self.unfinished.insert(seq);
        let after = self.expected();
        let mut committed = false;
        let mut points = Vec::new();
        for s in shots {
            let p = self.check(s);
            if p.outcome == after {
                committed = true;
            } else {
                assert!(!committed && p.outcome == before, "seed {}: pop of {seq}: {:?}", self.seed, p.outcome);
            }
            points.push(p);
        }
        assert!(committed, "seed {}: the pop's last store commits it", self.seed);
        self.in_flight.push((entry, seq));
        self.next_pop += 1;
        points
    }

    /// The device completes a chain: a used descriptor (its flags now unless it is the
    /// batch's first), then the region.
    fn complete(&mut self) -> Vec<Point> {
        let (entry, seq) = self.in_flight.remove(self.rng.below(self.in_flight.len() as u64) as usize);
        let slot = self.d_next_used.idx;
        self.ids[slot as usize] = self.reqs[seq].id;
        let flags = packed_used_flags(self.d_next_used.wrap);
        let mut points = Vec::new();
        if self.pending_first.is_none() {
            self.pending_first = Some((slot, flags));
        } else {
            self.ring[slot as usize] = flags;
            points.push(self.check_now("a later used descriptor's flags"));
        }
        self.d_next_used = self.d_next_used.advance(self.reqs[seq].descs.len() as u16, SIZE);
        let ((), shots) = capture(|| self.q.completed(entry));
        points.extend(self.check_all(shots, "completed"));
        self.completed.push((entry, seq));
        points
    }

    /// The device publishes the batch: step 1, the first used flags, step 2.
    fn publish(&mut self) -> Vec<Point> {
        let used = self.d_next_used;
        let ((), shots) = capture(|| self.q.publishing(used));
        let mut points = self.check_all(shots, "publishing");
        let (slot, flags) = self.pending_first.take().expect("a batch");
        self.ring[slot as usize] = flags;
        for (_, seq) in self.completed.drain(..) {
            self.unfinished.remove(&seq);
            self.visible.push(seq);
            self.is_visible[seq] = true;
        }
        self.visible_used = used;
        points.push(self.check_now("the batch's first used flags"));
        let ((), shots) = capture(|| self.q.published());
        points.extend(self.check_all(shots, "published"));
        points
    }

    /// A new device process from crash point `p`: recover, scrub the ring (rule 4), and go
    /// on where the dead one left.
    fn restart(&mut self, p: Point) {
        self.restarts += 1;
        self.ring = p.ring;
        self.ids = p.ids;
        for seq in self.visible.drain(p.visible..) {
            self.is_visible[seq] = false;
        }
        let mem = memory(SIZE);
        mem.write_at(0, &p.region).unwrap();
        let (q, used, resubmit) = recover(&mem, &self.ring);
        assert_eq!(outcome(used, &resubmit), p.outcome);
        self.q = q;
        self.q_mem = mem;
        self.visible_used = used;
        self.unfinished = resubmit.iter().map(|c| seq_of(&c.descs)).collect();
        self.in_flight = resubmit.iter().map(|c| (c.entry, seq_of(&c.descs))).collect();
        self.completed.clear();
        self.pending_first = None;
        self.d_next_used = used;
        // Rule 3: the next pop is the used position plus the resubmitted slots.
        let slots: u16 = resubmit.iter().map(|c| c.descs.len() as u16).sum();
        let avail = used.advance(slots, SIZE);
        self.next_pop = self.visible.len() + resubmit.len();
        let want = self.reqs.get(self.next_pop).map_or(self.g_avail, |r| r.start);
        assert_eq!(avail, want, "seed {}: avail position after recovery", self.seed);
        // Rule 4.
        for i in 0..slots {
            let pos = used.advance(i, SIZE);
            self.ring[pos.idx as usize] = packed_avail_flags(pos.wrap);
        }
        // A crash right after the restart recovers the same.
        self.check_now("after a restart");
    }

    fn step(&mut self) {
        let points = match self.rng.below(6) {
            0 | 1 => {
                let k = 1 + self.rng.below(4) as u16;
                self.offer(k);
                return;
            }
            2 if self.next_pop < self.reqs.len() => self.pop(),
            3 if !self.in_flight.is_empty() => self.complete(),
            4 if !self.completed.is_empty() => self.publish(),
            _ => {
                self.reap();
                return;
            }
        };
        if !points.is_empty() && self.rng.below(8) == 0 {
            let k = self.rng.below(points.len() as u64) as usize;
            let p = points.into_iter().nth(k).unwrap();
            self.restart(p);
        }
    }

    /// Pop, complete and publish everything; the guest must see every chain exactly once.
    fn drain(&mut self) {
        loop {
            while self.next_pop < self.reqs.len() {
                self.pop();
            }
            while !self.in_flight.is_empty() {
                self.complete();
            }
            if !self.completed.is_empty() {
                self.publish();
            }
            self.reap();
            if self.next_pop == self.reqs.len() && self.in_flight.is_empty() && self.g_out.is_empty() {
                break;
            }
        }
        assert!(self.done.iter().all(|&d| d), "seed {}: every chain completed", self.seed);
        assert_eq!(self.q.free, SIZE);
    }
}

#[test]
fn recovery_after_a_crash_at_every_store_finds_exactly_the_chains_the_guest_has_not_seen_used() {
    let (mut checks, mut restarts, mut chains) = (0, 0, 0);
    for seed in 0..300 {
        let mut sim = Sim::new(seed);
        for _ in 0..200 {
            sim.step();
        }
        sim.drain();
        checks += sim.checks;
        restarts += sim.restarts;
        chains += sim.reqs.len();
    }
    assert!(checks > 300_000, "{checks} recoveries");
    assert!(restarts > 1_000, "{restarts} restarts");
    assert!(chains > 5_000, "{chains} chains");
    println!("{checks} recoveries, {restarts} restarts, {chains} chains");
}

fn d(n: u64, id: u16, flags: u16) -> PackedDescriptor {
    PackedDescriptor { addr: n << 12, len: 512, id, flags }
}

fn chain(first: u64, k: u16, id: u16) -> Vec<PackedDescriptor> {
    (0..k)
        .map(|j| d(first + j as u64, id, packed_avail_flags(true) | if j + 1 < k { DESC_F_NEXT } else { 0 }))
        .collect()
}

/// The free list as vblk's copy holds it.
fn free_list(q: &InflightPacked) -> Vec<u16> {
    let mut v = Vec::new();
    let mut e = q.free_head;
    while e != q.size {
        v.push(e);
        e = q.next[e as usize];
    }
    v
}

#[test]
fn layout_and_sizes_follow_the_spec() {
    assert_eq!(packed_region_size(1), 64);
    assert_eq!(packed_region_size(16), 576);
    assert_eq!(packed_region_size(256), 8256);
    assert_eq!(packed_region_size(32768), 1_048_640);
    let mem = memory(SIZE);
    let used = RingPos { idx: 5, wrap: false };
    let (mut q, a) = InflightPacked::attach(area(&mem, SIZE), SIZE, used, |_| 0, true).unwrap();
    assert_eq!(a, AttachedPacked::Fresh);
    let descs = vec![
        PackedDescriptor { addr: 0x1122_3344_5566_7788, len: 0x99aa_bbcc, id: 0x0d0e, flags: DESC_F_NEXT },
        PackedDescriptor { addr: 0x0102_0304_0506_0708, len: 16, id: 0x0d0e, flags: DESC_F_WRITE },
    ];
    assert_eq!(q.mark(&descs), 0);
    let img = image(&mem, SIZE);
    // Header: version, desc_num, free_head, old_free_head, used_idx, old_used_idx, wraps.
    let header: Vec<u16> = [8, 10, 12, 14, 16, 18].iter().map(|&o| u16_at(&img, o)).collect();
    assert_eq!(header, [INFLIGHT_VERSION, SIZE, 2, 2, 5, 5]);
    assert_eq!(&img[20..22], &[0, 0]);
    // Entry 0 heads the chain: inflight, next, last, num, counter, then its descriptor.
    let e0 = &img[32..64];
    assert_eq!((e0[0], u16_at(e0, 2), u16_at(e0, 4), u16_at(e0, 6)), (1, 1, 1, 2));
    assert_eq!(u64::from_le_bytes(e0[8..16].try_into().unwrap()), 1);
    assert_eq!((u16_at(e0, 16), u16_at(e0, 18)), (0x0d0e, DESC_F_NEXT));
    assert_eq!(u32::from_le_bytes(e0[20..24].try_into().unwrap()), 0x99aa_bbcc);
    assert_eq!(u64::from_le_bytes(e0[24..32].try_into().unwrap()), 0x1122_3344_5566_7788);
    let e1 = &img[64..96];
    assert_eq!((e1[0], u16_at(e1, 2), u16_at(e1, 18)), (0, 2, DESC_F_WRITE));
    assert_eq!(u64::from_le_bytes(e1[24..32].try_into().unwrap()), 0x0102_0304_0506_0708);
}

#[test]
fn a_fresh_region_is_initialised_and_a_continued_one_initialised_again() {
    let mem = memory(SIZE);
    let used = RingPos { idx: 3, wrap: false };
    let (mut q, a) = InflightPacked::attach(area(&mem, SIZE), SIZE, used, |_| 0, true).unwrap();
    assert_eq!(a, AttachedPacked::Fresh);
    let img = image(&mem, SIZE);
    assert_eq!([8, 10, 12, 14, 16, 18].map(|o| u16_at(&img, o)), [INFLIGHT_VERSION, SIZE, 0, 0, 3, 3]);
    assert_eq!(&img[20..22], &[0, 0]);
    let links: Vec<u16> = (0..SIZE).map(|e| u16_at(&img, 32 + 32 * e as usize + 2)).collect();
    assert_eq!(links, (1..=SIZE).collect::<Vec<_>>());
    assert!(InflightPacked::in_use(&area(&mem, SIZE)));

    // Some traffic, drained; the same process attaches again at another used position.
    let e = q.mark(&chain(1, 3, 0));
    q.completed(e);
    q.publishing(used.advance(3, SIZE));
    q.published();
    let again = RingPos { idx: 6, wrap: true };
    let ((q, a), shots) =
        capture(|| InflightPacked::attach(area(&mem, SIZE), SIZE, again, |_| unreachable!(), false).unwrap());
    assert_eq!(a, AttachedPacked::Continued);
    assert_eq!(free_list(&q), (0..SIZE).collect::<Vec<_>>());
    assert_eq!((q.used, q.counter), (again, 1));
    // A crash while it is initialised again leaves a fresh region, or the new one.
    let last = shots.len() - 1;
    for (k, s) in shots.iter().enumerate() {
        let m = memory(SIZE);
        m.write_at(0, s).unwrap();
        let (_, a) = InflightPacked::attach(area(&m, SIZE), SIZE, BOGUS, |_| 0, true).unwrap();
        if k < last {
            assert_eq!(a, AttachedPacked::Fresh, "store {k}");
        } else {
            assert_eq!(a, AttachedPacked::Recovered { used: again, resubmit: vec![] });
        }
    }
    assert!(InflightPacked::attach(area(&mem, SIZE), SIZE, RingPos { idx: SIZE, wrap: true }, |_| 0, false).is_err());
}

#[test]
fn round_trips_with_out_of_order_completions_and_batches() {
    let mem = memory(SIZE);
    let (mut q, _) = InflightPacked::attach(area(&mem, SIZE), SIZE, RingPos::START, |_| 0, true).unwrap();
    let (a, b, c) = (chain(0x10, 1, 0), chain(0x20, 2, 1), chain(0x30, 3, 2));
    assert_eq!([q.mark(&a), q.mark(&b), q.mark(&c)], [0, 1, 3]);
    assert_eq!((q.free_head, q.free), (6, 2));
    // C then A complete, one batch of 4 slots.
    q.completed(3);
    q.completed(0);
    q.completed(0); // twice: ignored
    q.completed(2); // not a head: ignored
    q.completed(SIZE); // out of range: ignored
    let used = RingPos::START.advance(4, SIZE);
    q.publishing(used);
    q.published();
    assert_eq!(free_list(&q), [0, 3, 4, 5, 6, 7]);
    let img = image(&mem, SIZE);
    assert_eq!([12, 14, 16, 18].map(|o| u16_at(&img, o)), [0, 0, 4, 4]);
    let flags: Vec<u8> = (0..SIZE).map(|e| img[32 + 32 * e as usize]).collect();
    assert_eq!(flags, [0, 1, 0, 0, 0, 0, 0, 0]);
    // D reuses entries 0, 3, 4.
    let dd = chain(0x40, 3, 0);
    assert_eq!(q.mark(&dd), 0);
    assert_eq!((q.last[0], q.free_head), (4, 5));
    // What a new process would resubmit: B then D, from the used position.
    let m = memory(SIZE);
    m.write_at(0, &image(&mem, SIZE)).unwrap();
    let (_, got_used, resubmit) = recover(&m, &[packed_avail_flags(true); SIZE as usize]);
    assert_eq!(got_used, used);
    assert_eq!(resubmit, vec![ResubmitChain { entry: 1, descs: b.clone() }, ResubmitChain { entry: 0, descs: dd }]);
    // Everything back; then one chain the size of the ring, and nothing beside it.
    q.completed(1);
    q.completed(0);
    let used = used.advance(5, SIZE);
    q.publishing(used);
    q.published();
    assert_eq!(q.free, SIZE);
    let whole = chain(0x50, SIZE, 3);
    let e = q.mark(&whole);
    assert_eq!((q.free, q.num[e as usize]), (0, SIZE));
    assert_eq!(q.mark(&a), SIZE, "no free entry: not tracked");
    assert_eq!(q.mark(&[]), SIZE, "no descriptor: not tracked");
    q.completed(SIZE);
    q.completed(e);
    let end = used.advance(SIZE, SIZE);
    assert_eq!((end.idx, end.wrap), (used.idx, !used.wrap));
    q.publishing(end);
    q.published();
    assert_eq!(q.free, SIZE);
    let m = memory(SIZE);
    m.write_at(0, &image(&mem, SIZE)).unwrap();
    let (_, got_used, resubmit) = recover(&m, &[0; SIZE as usize]);
    assert_eq!((got_used, resubmit), (end, vec![]));
}

/// A batch of the whole ring leaves `used_idx` where it was: only the wrap counter tells
/// a publish in progress, before and after the guest can see it.
#[test]
fn a_batch_of_the_whole_ring_is_told_apart_by_its_wrap_counter() {
    let mem = memory(SIZE);
    let start = RingPos { idx: 2, wrap: true };
    let (mut q, _) = InflightPacked::attach(area(&mem, SIZE), SIZE, start, |_| 0, true).unwrap();
    let chains: Vec<_> = (0..SIZE).map(|i| chain(i as u64, 1, i)).collect();
    let entries: Vec<u16> = chains.iter().map(|c| q.mark(c)).collect();
    for &e in entries.iter().rev() {
        q.completed(e);
    }
    let end = start.advance(SIZE, SIZE);
    let mut ring = vec![packed_avail_flags(true); SIZE as usize];
    let ((), before) = capture(|| q.publishing(end));
    ring[start.idx as usize] = packed_used_flags(start.wrap);
    let ((), after) = capture(|| q.published());
    let scratch = memory(SIZE);
    let mut unpublished_ring = ring.clone();
    unpublished_ring[start.idx as usize] = packed_avail_flags(start.wrap);
    for s in &before {
        let (o, _) = check(&scratch, s, &unpublished_ring);
        assert_eq!(o, Outcome { used: start, chains: chains.clone() });
    }
    for s in before.iter().chain(&after) {
        let (o, _) = check(&scratch, s, &ring);
        if after.contains(s) || before.last() == Some(s) {
            assert_eq!(o, Outcome { used: end, chains: vec![] });
        }
    }
}

/// The spec's rule compares only the indices: a crash between the stores of
/// `old_used_idx` and `old_used_wrap_counter` would roll the wrap counter back a lap.
#[test]
fn a_commit_cut_between_old_used_idx_and_its_wrap_counter_is_finished() {
    let mem = memory(SIZE);
    let start = RingPos { idx: 6, wrap: true };
    let (mut q, _) = InflightPacked::attach(area(&mem, SIZE), SIZE, start, |_| 0, true).unwrap();
    let e = q.mark(&chain(1, 4, 0));
    q.completed(e);
    let end = start.advance(4, SIZE);
    assert_eq!(end, RingPos { idx: 2, wrap: false });
    q.publishing(end);
    let ((), shots) = capture(|| q.published());
    // Flag, old_free_head, old_used_idx, the wrap counters.
    assert_eq!(shots.len(), 4);
    let torn = &shots[2];
    assert_eq!((u16_at(torn, 18), torn[20], torn[21]), (2, 0, 1));
    // Whatever the ring says at the torn position.
    for flags in [0, packed_avail_flags(true), packed_avail_flags(false), packed_used_flags(true)] {
        let m = memory(SIZE);
        m.write_at(0, torn).unwrap();
        let (_, used, resubmit) = recover(&m, &[flags; SIZE as usize]);
        assert_eq!((used, resubmit), (end, vec![]));
    }
}

/// A region with chains in flight: A (2 descriptors, entries 0-1), C (3, entries 3-5),
/// B (1, entry 2) completed and published; free list 2, 6, 7.
fn live_region() -> (Arc<GuestMemory>, Vec<u8>) {
    let mem = memory(SIZE);
    let (mut q, _) = InflightPacked::attach(area(&mem, SIZE), SIZE, RingPos::START, |_| 0, true).unwrap();
    assert_eq!([q.mark(&chain(0x10, 2, 0)), q.mark(&chain(0x20, 1, 1)), q.mark(&chain(0x30, 3, 2))], [0, 2, 3]);
    q.completed(2);
    q.publishing(RingPos::START.advance(1, SIZE));
    q.published();
    assert_eq!(free_list(&q), [2, 6, 7]);
    let img = image(&mem, SIZE);
    (mem, img)
}

fn attach_corrupted(img: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Result<AttachedPacked, InflightError> {
    let mut img = img.to_vec();
    f(&mut img);
    let mem = memory(SIZE);
    mem.write_at(0, &img).unwrap();
    let got = InflightPacked::attach(area(&mem, SIZE), SIZE, BOGUS, |_| packed_avail_flags(true), true).map(|(_, a)| a);
    if got.is_err() {
        assert_eq!(image(&mem, SIZE), img, "a refused region is not written");
    }
    got
}

fn entry(e: u16, field: usize) -> usize {
    32 + 32 * e as usize + field
}

fn out_of_range(r: Result<AttachedPacked, InflightError>, what: &str) -> bool {
    matches!(r, Err(InflightError::OutOfRange { what: w, .. }) if w == what)
}

#[test]
fn hostile_regions_are_refused_never_trusted() {
    use InflightError as E;
    let (_, img) = live_region();
    let ok = attach_corrupted(&img, |_| {}).unwrap();
    let AttachedPacked::Recovered { resubmit, .. } = ok else { panic!() };
    assert_eq!(resubmit.iter().map(|c| c.entry).collect::<Vec<_>>(), [0, 3]);

    assert_eq!(attach_corrupted(&img, |i| put16(i, 8, 2)), Err(E::Version(2)));
    assert_eq!(attach_corrupted(&img, |i| put16(i, 10, 4)), Err(E::DescNum { found: 4, size: SIZE }));
    assert!(out_of_range(attach_corrupted(&img, |i| put16(i, 12, SIZE + 1)), "free_head"));
    assert!(out_of_range(attach_corrupted(&img, |i| put16(i, 14, 0xffff)), "old_free_head"));
    assert!(out_of_range(attach_corrupted(&img, |i| put16(i, 16, SIZE)), "used_idx"));
    assert!(out_of_range(attach_corrupted(&img, |i| put16(i, 18, 0x8001)), "old_used_idx"));
    // The free list: a loop, a link out of range.
    assert_eq!(attach_corrupted(&img, |i| put16(i, entry(7, 2), 6)), Err(E::FreeListLoop { at: 6 }));
    assert_eq!(attach_corrupted(&img, |i| put16(i, entry(2, 2), 2)), Err(E::FreeListLoop { at: 2 }));
    assert_eq!(
        attach_corrupted(&img, |i| put16(i, entry(6, 2), 300)),
        Err(E::FreeListLink { at: 6, next: 300, size: SIZE })
    );
    // Chains: num 0 or too large, a link out of range, not ending at last, overlapping
    // another chain or the free list.
    let chain_err = |r: Result<AttachedPacked, InflightError>| matches!(r, Err(E::Chain { .. }));
    assert!(chain_err(attach_corrupted(&img, |i| put16(i, entry(0, 6), 0))));
    assert!(chain_err(attach_corrupted(&img, |i| put16(i, entry(3, 6), SIZE + 1))));
    assert!(chain_err(attach_corrupted(&img, |i| put16(i, entry(3, 2), 9))));
    assert!(chain_err(attach_corrupted(&img, |i| put16(i, entry(0, 4), 0))));
    assert!(chain_err(attach_corrupted(&img, |i| put16(i, entry(3, 2), 1))));
    assert!(chain_err(attach_corrupted(&img, |i| put16(i, entry(0, 2), 6))));
    assert!(chain_err(attach_corrupted(&img, |i| i[entry(1, 0)] = 1)), "a flag inside a chain");
    assert!(chain_err(attach_corrupted(&img, |i| {
        put16(i, entry(3, 6), SIZE);
        put16(i, entry(3, 4), 2);
    })));
    // A chain forgotten: its entries are neither free nor in flight.
    assert_eq!(
        attach_corrupted(&img, |i| i[entry(3, 0)] = 0),
        Err(E::Unaccounted { free: 3, in_flight: 2, size: SIZE })
    );
    // A flag on a free entry is stale: cleared, not resubmitted.
    let got = attach_corrupted(&img, |i| i[entry(6, 0)] = 0xff).unwrap();
    assert!(matches!(got, AttachedPacked::Recovered { resubmit, .. } if resubmit.len() == 2));
    // Sizes.
    let mem = memory(SIZE);
    let small = mem.area_at_gpa(0, 32 + 32 * SIZE as u64 - 1, 64).unwrap();
    assert_eq!(
        InflightPacked::attach(small, SIZE, BOGUS, |_| 0, true).unwrap_err(),
        E::TooSmall { len: 32 + 32 * SIZE as usize - 1, size: SIZE }
    );
    assert_eq!(InflightPacked::attach(area(&mem, SIZE), 0, BOGUS, |_| 0, true).unwrap_err(), E::QueueSize(0));
}

/// Random damage to a live region: refused or recovered, never a panic; what is accepted
/// is whole (chains disjoint, within the ring) and stays whole under vblk's own writes.
#[test]
fn random_damage_is_refused_or_recovered_whole_never_a_panic() {
    let (_, img) = live_region();
    let mut rng = Rng(0x5eed);
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..4000 {
        let mut bad = img.clone();
        for _ in 0..1 + rng.below(4) {
            // Mostly the header and the link fields.
            let off = match rng.below(3) {
                0 => rng.below(32) as usize,
                1 => entry(rng.below(SIZE as u64) as u16, 2 * rng.below(4) as usize),
                _ => rng.below(bad.len() as u64) as usize,
            };
            bad[off] = match rng.below(3) {
                0 => rng.below(SIZE as u64 + 2) as u8,
                1 => bad[off] ^ 1,
                _ => rng.next() as u8,
            };
        }
        let ring: Vec<u16> = (0..SIZE).map(|_| rng.next() as u16).collect();
        let mem = memory(SIZE);
        mem.write_at(0, &bad).unwrap();
        let Ok((mut q, a)) = InflightPacked::attach(area(&mem, SIZE), SIZE, BOGUS, |i| ring[i as usize], true) else {
            refused += 1;
            continue;
        };
        // A version of 0 makes it a fresh region.
        let AttachedPacked::Recovered { used, resubmit } = a else {
            assert_eq!(a, AttachedPacked::Fresh);
            continue;
        };
        accepted += 1;
        let mut seen = BTreeSet::new();
        let mut slots = 0;
        for c in &resubmit {
            assert!(!c.descs.is_empty() && c.entry < SIZE);
            slots += c.descs.len();
            assert!(seen.insert(c.entry));
        }
        assert!(slots <= SIZE as usize);
        assert_eq!(q.free as usize, SIZE as usize - slots);
        // Run it: finish the resubmitted chains, fill the ring, publish.
        let mut pos = used;
        for c in &resubmit {
            q.completed(c.entry);
            q.publishing(pos.advance(c.descs.len() as u16, SIZE));
            pos = pos.advance(c.descs.len() as u16, SIZE);
            q.published();
        }
        let mut marked = Vec::new();
        loop {
            let e = q.mark(&chain(1, 1 + rng.below(3) as u16, 0));
            if e == SIZE {
                break;
            }
            marked.push(e);
        }
        assert!(q.free < 3);
        let ring = vec![packed_avail_flags(pos.wrap); SIZE as usize];
        let (_, again, left) = recover(&mem, &ring);
        assert_eq!(again, pos);
        assert_eq!(left.iter().map(|c| c.entry).collect::<Vec<_>>(), marked);
    }
    assert!(accepted > 100 && refused > 1000, "accepted {accepted}, refused {refused}");
}

/// While the queue runs the region is only written: a frontend scribbling over it changes
/// nothing vblk does.
#[test]
fn the_running_queue_never_reads_the_region() {
    let (clean, dirty) = (memory(SIZE), memory(SIZE));
    let (mut a, _) = InflightPacked::attach(area(&clean, SIZE), SIZE, RingPos::START, |_| 0, true).unwrap();
    let (mut b, _) = InflightPacked::attach(area(&dirty, SIZE), SIZE, RingPos::START, |_| 0, true).unwrap();
    let mut rng = Rng(77);
    let mut used = RingPos::START;
    let mut in_flight: Vec<(u16, u16)> = Vec::new();
    for i in 0..2000u64 {
        let junk: Vec<u8> = (0..packed_region_size(SIZE)).map(|_| rng.next() as u8).collect();
        dirty.write_at(0, &junk).unwrap();
        match rng.below(3) {
            0 => {
                let c = chain(i, 1 + rng.below(3) as u16, 0);
                let (x, y) = (a.mark(&c), b.mark(&c));
                assert_eq!(x, y);
                if x < SIZE {
                    in_flight.push((x, c.len() as u16));
                }
            }
            1 if !in_flight.is_empty() => {
                let (e, k) = in_flight.swap_remove(rng.below(in_flight.len() as u64) as usize);
                a.completed(e);
                b.completed(e);
                used = used.advance(k, SIZE);
            }
            _ => {
                a.publishing(used);
                b.publishing(used);
                a.published();
                b.published();
            }
        }
        assert_eq!((a.free_head, a.free, &a.next), (b.free_head, b.free, &b.next));
    }
}
