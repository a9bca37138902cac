//! `merge`: `MergeBuffer::drain_runs` over arbitrary batches of staged reads and writes.
//!
//! Checked: every staged request is submitted in exactly one run; a run is one direction
//! and contiguous (`prev.offset + prev.len == next.offset`); a run of more than one
//! request stays within `MAX_MERGE_SEGS` / `MAX_MERGE_BYTES`; with merging off every run
//! is one request, in arrival order; with merging on, runs come in (direction, offset)
//! order and every split between two runs is justified (the greedy merge never misses a
//! join it was allowed to make).

use vblk_blk::merge::{MergeBuffer, Staged, MAX_MERGE_BYTES, MAX_MERGE_SEGS};

use crate::{fuzz_enum, fuzz_struct};

/// Offsets and lengths come from validated requests: inside a disk of at most
/// `i64::MAX` bytes, so `offset + len` never overflows.
const LIMIT: u64 = (1 << 62) - 1;

fuzz_enum! {
    pub enum Offset {
        /// Sector `x` (small offsets collide and touch often).
        Sector(u16),
        /// Right after staged request `k % i` (contiguous on purpose).
        After(u8),
        /// Right before staged request `k % i` by this request's length.
        Before(u8),
        Raw(u64),
    }
}

fuzz_enum! {
    pub enum Length {
        Sectors(u8),
        /// Around the byte limit: `MAX_MERGE_BYTES / 2^(x % 4) ± 512 * (x >> 2 & 3)`.
        NearLimit(u8),
        Raw(u64),
    }
}

fuzz_enum! {
    pub enum Segs {
        Small(u8),
        NearLimit(u8),
        Raw(u16),
    }
}

fuzz_struct! {
    pub struct StagedIn {
        pub write: bool,
        pub offset: Offset,
        pub len: Length,
        pub segs: Segs,
    }
}

fuzz_struct! {
    pub struct MergeInput {
        pub merge: bool,
        /// Drain after this many pushes too (several batches through one buffer).
        pub drain_every: u8,
        pub staged: Vec<StagedIn>,
    }
}

impl Length {
    fn bytes(&self) -> u64 {
        match *self {
            Length::Sectors(n) => n as u64 * 512,
            Length::NearLimit(x) => {
                let base = MAX_MERGE_BYTES >> (x % 4);
                let d = 512 * (x as u64 >> 2 & 3);
                if x & 0x10 != 0 {
                    base + d
                } else {
                    base - d
                }
            }
            Length::Raw(n) => n & LIMIT >> 1,
        }
    }
}

impl Segs {
    fn count(&self) -> usize {
        match *self {
            Segs::Small(n) => n as usize,
            Segs::NearLimit(x) => {
                let base = MAX_MERGE_SEGS >> (x % 4);
                let d = (x as usize >> 2) & 7;
                if x & 0x20 != 0 {
                    base + d
                } else {
                    base.saturating_sub(d)
                }
            }
            Segs::Raw(n) => n as usize,
        }
    }
}

/// Build the batch: heads are the arrival positions.
pub fn staged(input: &MergeInput) -> Vec<Staged> {
    let mut out: Vec<Staged> = Vec::new();
    for (i, s) in input.staged.iter().enumerate().take(4096) {
        let len = s.len.bytes();
        let offset = match s.offset {
            Offset::Sector(x) => x as u64 * 512,
            Offset::After(k) if !out.is_empty() => {
                let p = out[k as usize % out.len()];
                p.offset + p.len
            }
            Offset::Before(k) if !out.is_empty() => out[k as usize % out.len()].offset.saturating_sub(len),
            Offset::After(_) | Offset::Before(_) => 0,
            Offset::Raw(x) => x & LIMIT >> 1,
        };
        out.push(Staged { head: i as u16, write: s.write, offset: offset.min(LIMIT - len), len, segs: s.segs.count() });
    }
    out
}

pub fn run(input: &MergeInput) {
    let all = staged(input);
    let mut buf = MergeBuffer::default();
    let every = input.drain_every as usize;
    let mut batch = Vec::new();
    for (i, s) in all.iter().enumerate() {
        buf.push(*s);
        batch.push(*s);
        if (every != 0 && (i + 1) % every == 0) || i + 1 == all.len() {
            check_batch(&mut buf, &batch, input.merge);
            batch.clear();
        }
    }
    assert!(buf.is_empty());
    let mut called = false;
    buf.drain_runs(input.merge, |_| called = true);
    assert!(!called, "an empty buffer submits nothing");
}

fn check_batch(buf: &mut MergeBuffer, batch: &[Staged], merge: bool) {
    let mut runs: Vec<Vec<Staged>> = Vec::new();
    buf.drain_runs(merge, |r| runs.push(r.to_vec()));
    assert!(buf.is_empty(), "drain empties the buffer");

    // Exactly once each.
    let mut seen = vec![0u32; batch.len()];
    let base = batch[0].head as usize;
    for r in &runs {
        assert!(!r.is_empty(), "empty run");
        for s in r {
            let i = s.head as usize - base;
            assert_eq!(*s, batch[i], "a staged request changed");
            seen[i] += 1;
        }
    }
    assert!(seen.iter().all(|&n| n == 1), "every request in exactly one run: {seen:?}");

    for r in &runs {
        for w in r.windows(2) {
            assert_eq!(w[0].write, w[1].write, "a run mixes reads and writes");
            assert_eq!(w[0].offset + w[0].len, w[1].offset, "a run is not contiguous");
        }
        if r.len() > 1 {
            let segs: usize = r.iter().map(|s| s.segs).sum();
            let bytes: u64 = r.iter().map(|s| s.len).sum();
            assert!(segs <= MAX_MERGE_SEGS, "run of {segs} segments");
            assert!(bytes <= MAX_MERGE_BYTES, "run of {bytes} bytes");
        }
    }

    if !merge {
        assert_eq!(runs.len(), batch.len());
        for (r, s) in runs.iter().zip(batch) {
            assert_eq!(r.as_slice(), std::slice::from_ref(s), "without merging, arrival order");
        }
        return;
    }

    let flat: Vec<Staged> = runs.iter().flatten().copied().collect();
    for w in flat.windows(2) {
        assert!((w[0].write, w[0].offset) <= (w[1].write, w[1].offset), "runs out of (direction, offset) order");
    }
    for w in runs.windows(2) {
        let (a, b) = (&w[0], &w[1][0]);
        let last = a.last().unwrap();
        let segs: usize = a.iter().map(|s| s.segs).sum();
        let bytes: u64 = a.iter().map(|s| s.len).sum();
        let could_join = last.write == b.write
            && last.offset + last.len == b.offset
            && segs + b.segs <= MAX_MERGE_SEGS
            && bytes + b.len <= MAX_MERGE_BYTES;
        assert!(!could_join, "runs split although they could merge: {a:?} | {b:?}");
    }
}
