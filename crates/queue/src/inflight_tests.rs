//! Crash at every step of pop / complete / batch publish, recover from what shared memory
//! held at that instant, and check the recovery yields exactly the unfinished heads.

use std::collections::BTreeSet;
use std::sync::Arc;

use vblk_virtio::memory::memfd;
use vblk_virtio::{GuestMemory, RegionSpec};

use super::*;

const SIZE: u16 = 16;
const MEM: u64 = 0x20000;
/// The used ring of the simulated queue: `idx` at +2, entries `{id, len}` at +4 + 8 i.
const USED: u64 = 0x10000;

fn memory() -> Arc<GuestMemory> {
    let spec = RegionSpec { guest_phys_addr: 0, size: MEM, user_addr: 0x7000_0000, mmap_offset: 0 };
    Arc::new(GuestMemory::from_files(&[(spec, memfd("inflight", MEM).unwrap())]).unwrap())
}

fn area(mem: &Arc<GuestMemory>) -> GuestArea {
    mem.area_at_gpa(0, split_region_size(SIZE), 8).unwrap()
}

fn used_idx(mem: &GuestMemory) -> u16 {
    let mut b = [0u8; 2];
    mem.read_at(USED + 2, &mut b).unwrap();
    u16::from_le_bytes(b)
}

fn used_head(mem: &GuestMemory, i: u16) -> u32 {
    let mut b = [0u8; 4];
    mem.read_at(USED + 4 + 8 * (i % SIZE) as u64, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn snapshot(mem: &GuestMemory) -> Vec<u8> {
    let mut v = vec![0u8; MEM as usize];
    mem.read_at(0, &mut v).unwrap();
    v
}

/// What the guest can tell at one instant, and what recovery must find.
struct Expect {
    image: Vec<u8>,
    /// Heads flagged by a completed `mark`, in pop order, minus those the guest sees used.
    unfinished: Vec<u16>,
    /// Avail entries consumed by completed marks.
    popped: u16,
}

fn recover(e: &Expect) -> (Vec<u16>, u16) {
    let mem = memory();
    mem.write_at(0, &e.image).unwrap();
    let idx = used_idx(&mem);
    let (q, got) = InflightSplit::attach(area(&mem), SIZE, idx, |i| used_head(&mem, i), true).unwrap();
    let Attached::Recovered { resubmit } = got else { panic!("a used region must be recovered, got {got:?}") };
    assert_eq!(q.flagged().len(), resubmit.len());
    let next_avail = idx.wrapping_add(resubmit.len() as u16);
    (resubmit, next_avail)
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

/// One random run of the device: pops (in avail order, heads chosen by the "guest" among
/// free ones), completions in any order, publishes of batches of any size. After every
/// write to shared memory a crash is simulated.
fn run(seed: u64) -> usize {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mem = memory();
    let (mut q, a) = InflightSplit::attach(area(&mem), SIZE, 0, |i| used_head(&mem, i), true).unwrap();
    assert_eq!(a, Attached::Fresh);
    let mut free: Vec<u16> = (0..SIZE).collect();
    let mut in_flight: Vec<u16> = Vec::new(); // popped and marked, not completed, pop order
    let mut completed: Vec<u16> = Vec::new(); // in the used ring, not yet published
    let mut order: Vec<u16> = Vec::new(); // every marked head, pop order (for unfinished)
    let mut visible: BTreeSet<usize> = BTreeSet::new(); // positions in `order` the guest sees done
    let mut next_used: u16 = 0;
    let mut popped: u16 = 0;
    let mut checks = 0;
    let check = |mem: &GuestMemory, order: &[u16], visible: &BTreeSet<usize>, popped: u16| {
        let unfinished = order.iter().enumerate().filter(|(k, _)| !visible.contains(k)).map(|(_, &h)| h).collect();
        let e = Expect { image: snapshot(mem), unfinished, popped };
        let (resubmit, next_avail) = recover(&e);
        assert_eq!(resubmit, e.unfinished, "seed {seed}: resubmitted heads (in pop order)");
        assert_eq!(next_avail, e.popped, "seed {seed}: next avail entry after recovery");
    };
    for _ in 0..60 {
        match rng.below(3) {
            0 if !free.is_empty() => {
                let head = free.remove(rng.below(free.len() as u64) as usize);
                // Crash right after the pop, before the mark: the entry is popped again.
                check(&mem, &order, &visible, popped);
                q.mark(head);
                popped = popped.wrapping_add(1);
                order.push(head);
                in_flight.push(head);
                check(&mem, &order, &visible, popped);
            }
            1 if !in_flight.is_empty() => {
                let head = in_flight.remove(rng.below(in_flight.len() as u64) as usize);
                // add_used: the entry is written, not yet published.
                let slot = next_used.wrapping_add(completed.len() as u16);
                mem.write_at(USED + 4 + 8 * (slot % SIZE) as u64, &(head as u32).to_le_bytes()).unwrap();
                q.completed(head);
                completed.push(head);
                check(&mem, &order, &visible, popped);
            }
            _ if !completed.is_empty() => {
                // publish: used->idx, then each flag, then the region's used_idx.
                next_used = next_used.wrapping_add(completed.len() as u16);
                mem.write_at(USED + 2, &next_used.to_le_bytes()).unwrap();
                for h in &completed {
                    let k = order.iter().rposition(|x| x == h).unwrap();
                    visible.insert(k);
                }
                check(&mem, &order, &visible, popped);
                // Crashes between clearing one flag and the next: clear a prefix by hand.
                for cut in 1..completed.len() {
                    let mut image = snapshot(&mem);
                    for h in &completed[..cut] {
                        image[16 + 16 * *h as usize] = 0;
                    }
                    let unfinished: Vec<u16> =
                        order.iter().enumerate().filter(|(k, _)| !visible.contains(k)).map(|(_, &h)| h).collect();
                    let e = Expect { image, unfinished, popped };
                    let (resubmit, next_avail) = recover(&e);
                    assert_eq!(resubmit, e.unfinished, "seed {seed}: partial clear of {cut}");
                    assert_eq!(next_avail, e.popped);
                    checks += 1;
                }
                q.published(next_used);
                free.append(&mut completed);
                check(&mem, &order, &visible, popped);
            }
            _ => {}
        }
        checks += 1;
    }
    checks
}

#[test]
fn recovery_after_a_crash_at_every_step_finds_exactly_the_unfinished_heads() {
    let checks: usize = (0..300).map(run).sum();
    assert!(checks > 10_000, "{checks} crash points checked");
}

#[test]
fn a_fresh_region_is_initialised_and_a_hostile_one_refused_or_bounded() {
    let mem = memory();
    let (_, a) = InflightSplit::attach(area(&mem), SIZE, 7, |_| 0, true).unwrap();
    assert_eq!(a, Attached::Fresh);
    let hdr = |off: u64| {
        let mut b = [0u8; 2];
        mem.read_at(off, &mut b).unwrap();
        u16::from_le_bytes(b)
    };
    assert_eq!((hdr(8), hdr(10), hdr(14)), (INFLIGHT_VERSION, SIZE, 7));
    // Another queue size.
    assert_eq!(
        InflightSplit::attach(area(&mem), SIZE / 2, 7, |_| 0, true).unwrap_err(),
        InflightError::DescNum { found: SIZE, size: SIZE / 2 }
    );
    // A used_idx more than the queue size behind the ring.
    assert!(matches!(
        InflightSplit::attach(area(&mem), SIZE, 7 + SIZE + 1, |_| 0, true),
        Err(InflightError::UsedIdx { .. })
    ));
    // Any flag byte and counter: every flagged head comes back once, in counter order; used
    // entries naming heads out of range are ignored.
    for h in 0..SIZE {
        mem.write_at(16 + 16 * h as u64, &[0xff]).unwrap();
        mem.write_at(16 + 16 * h as u64 + 8, &((SIZE - h) as u64).to_le_bytes()).unwrap();
    }
    let (_, a) = InflightSplit::attach(area(&mem), SIZE, 9, |_| u32::MAX, true).unwrap();
    let want: Vec<u16> = (0..SIZE).rev().collect();
    assert_eq!(a, Attached::Recovered { resubmit: want });
    // The same region continued by the same process resubmits nothing.
    let (q, a) = InflightSplit::attach(area(&mem), SIZE, 9, |_| 0, false).unwrap();
    assert_eq!(a, Attached::Continued);
    assert_eq!(q.counter, SIZE as u64 + 1);
}
