//! `inflight`: an inflight region written by a hostile frontend (`SET_INFLIGHT_FD`: any
//! version, `desc_num`, `used_idx`, flags and counters) and a used ring with any entries,
//! attached and recovered by `InflightSplit`, then driven by pops, completions and publishes.
//!
//! Checked: never a panic; a region is refused or recovered; every resubmitted head is in
//! range and resubmitted once, in counter order, and is exactly what stays flagged; the
//! tracker keeps its invariants under any sequence of calls, and a second recovery of the
//! same memory agrees with the first.

use std::sync::Arc;

use vblk_queue::inflight::{split_region_size, Attached, InflightSplit};
use vblk_virtio::memory::memfd;
use vblk_virtio::{GuestMemory, RegionSpec};

const SIZES: [u16; 4] = [1, 4, 16, 256];
const MEM: u64 = 0x20000;
const USED: u64 = 0x10000;

#[derive(Debug, arbitrary::Arbitrary)]
pub enum Op {
    Mark(u16),
    Completed(u16),
    Published(u16),
}

#[derive(Debug, arbitrary::Arbitrary)]
pub struct InflightInput {
    pub size_sel: u8,
    pub recover: bool,
    /// The used ring's index.
    pub used_idx: u16,
    /// The used ring's entries (heads, any value).
    pub used_heads: Vec<u32>,
    /// The region header as the frontend left it.
    pub version: u16,
    pub desc_num: Option<u16>,
    pub region_used_idx: u16,
    /// Descriptor states: head (mod size), flag byte, counter.
    pub descs: Vec<(u16, u8, u64)>,
    /// Any other bytes of the region.
    pub raw: Vec<(u16, u8)>,
    pub ops: Vec<Op>,
}

fn memory() -> Arc<GuestMemory> {
    let spec = RegionSpec { guest_phys_addr: 0, size: MEM, user_addr: 0x7000_0000, mmap_offset: 0 };
    Arc::new(GuestMemory::from_files(&[(spec, memfd("vblk-fuzz-inflight", MEM).expect("memfd"))]).expect("map"))
}

fn used_head(mem: &GuestMemory, size: u16, i: u16) -> u32 {
    let mut b = [0u8; 4];
    mem.read_at(USED + 4 + 8 * (i % size) as u64, &mut b).expect("used entry");
    u32::from_le_bytes(b)
}

pub fn run(input: &InflightInput) {
    let size = SIZES[input.size_sel as usize % SIZES.len()];
    let len = split_region_size(size);
    let mem = memory();
    for (i, h) in input.used_heads.iter().take(size as usize).enumerate() {
        mem.write_at(USED + 4 + 8 * i as u64, &h.to_le_bytes()).expect("used");
    }
    mem.write_at(8, &input.version.to_le_bytes()).expect("version");
    mem.write_at(10, &input.desc_num.unwrap_or(size).to_le_bytes()).expect("desc_num");
    mem.write_at(14, &input.region_used_idx.to_le_bytes()).expect("used_idx");
    for &(h, flag, counter) in &input.descs {
        let d = 16 + 16 * (h % size) as u64;
        mem.write_at(d, &[flag]).expect("flag");
        mem.write_at(d + 8, &counter.to_le_bytes()).expect("counter");
    }
    for &(off, b) in &input.raw {
        mem.write_at(off as u64 % len, &[b]).expect("raw");
    }
    let attach = |recover: bool| {
        let area = mem.area_at_gpa(0, len, 8).expect("area");
        InflightSplit::attach(area, size, input.used_idx, |i| used_head(&mem, size, i), recover)
    };
    let (mut q, got) = match attach(input.recover) {
        Ok(r) => r,
        Err(_) => return, // refused: fine
    };
    if let Attached::Recovered { resubmit } = &got {
        let mut seen = vec![false; size as usize];
        for &h in resubmit {
            assert!(h < size, "head {h} out of range");
            assert!(!std::mem::replace(&mut seen[h as usize], true), "head {h} resubmitted twice");
        }
        assert_eq!(q.flagged(), {
            let mut v = resubmit.clone();
            v.sort_unstable();
            v
        });
        // Recovering the same memory again finds the same heads.
        let (_, again) = attach(true).expect("a recovered region stays valid");
        assert_eq!(again, got);
    }
    for op in &input.ops {
        match *op {
            Op::Mark(h) => q.mark(h),
            Op::Completed(h) => q.completed(h),
            Op::Published(i) => q.published(i),
        }
        assert!(q.flagged().iter().all(|&h| h < size));
    }
}
