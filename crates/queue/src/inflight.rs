//! Inflight I/O tracking for a split ring: what lets a restarted backend finish the
//! requests its predecessor had popped (vhost-user spec, "Inflight I/O tracking",
//! `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`).
//!
//! The backend allocates a shared memory area (`GET_INFLIGHT_FD`); the frontend keeps its
//! fd and hands it to the next backend process (`SET_INFLIGHT_FD`). Each queue has a
//! region: a header ([`QueueRegionSplit`]) and one [`DescStateSplit`] per descriptor.
//!
//! ## What vblk writes, and when
//!
//! - **pop**: `desc[head].counter = n` (a counter that only grows), then
//!   `desc[head].inflight = 1`. Pops follow the avail ring in order.
//! - **publish** (a *batch* of used entries, [`InflightSplit::published`]): the used
//!   entries and `used->idx` are written to the ring first (the guest sees them), then the
//!   flag of every head of the batch is cleared, then the region's `used_idx` is set to the
//!   ring's. The worker does the whole publish before it pops anything else.
//!
//! ## Recovery rule (a crash at any instruction)
//!
//! 1. If the region's `used_idx` differs from the ring's `used->idx`, the process died in
//!    the middle of a publish, after the guest could see the batch: the heads named by the
//!    used entries from the region's `used_idx` up to `used->idx` are done. Their flags are
//!    cleared and the region's `used_idx` catches up. (libvhost-user handles batches of one
//!    through `last_batch_head`; this rule covers batches of any size, and vblk leaves
//!    `last_batch_head` alone.)
//! 2. Every head still flagged is in flight: popped, not completed as far as the guest can
//!    tell. They are resubmitted in counter order before anything new is popped.
//! 3. The avail ring was consumed in order and every popped head is either published
//!    (`used->idx` of them) or flagged (`n`), so the next avail entry to pop is
//!    `used->idx + n`, whatever vring base the frontend sends (QEMU rewinds it to
//!    `used->idx` when the backend dies). A crash between popping a head and flagging it
//!    loses nothing: that avail entry is popped again.
//!
//! Nothing read from the region is trusted: it is guest-reachable shared memory of a
//! frontend that may be hostile. A count of published entries above the queue size or a
//! region sized for another queue is refused; a head out of range is ignored; every head is
//! resubmitted at most once.

use std::mem::{offset_of, size_of};

use vblk_virtio::GuestArea;

/// `DescStateSplit` of the vhost-user spec: the state of one descriptor (head).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DescStateSplit {
    /// 1 while the head is in flight.
    pub inflight: u8,
    pub padding: [u8; 5],
    /// The list of the last batch of used descriptors (libvhost-user); vblk does not use it.
    pub next: u16,
    /// Order of fetching: resubmission follows it.
    pub counter: u64,
}

/// `QueueRegionSplit` of the vhost-user spec: the header of one queue's region, followed by
/// `desc_num` [`DescStateSplit`]s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueRegionSplit {
    /// Feature flags of the region: 0.
    pub features: u64,
    /// [`INFLIGHT_VERSION`]; 0 means a fresh (or reset) region.
    pub version: u16,
    /// Number of descriptor states: the queue size.
    pub desc_num: u16,
    pub last_batch_head: u16,
    /// The used ring's `idx` as of the last completed publish.
    pub used_idx: u16,
}

// The layout is the spec's (C, little endian); never the `vhost` crate's packed structs.
const _: () = {
    assert!(size_of::<DescStateSplit>() == 16);
    assert!(offset_of!(DescStateSplit, inflight) == 0);
    assert!(offset_of!(DescStateSplit, next) == 6);
    assert!(offset_of!(DescStateSplit, counter) == 8);
    assert!(size_of::<QueueRegionSplit>() == 16);
    assert!(offset_of!(QueueRegionSplit, version) == 8);
    assert!(offset_of!(QueueRegionSplit, desc_num) == 10);
    assert!(offset_of!(QueueRegionSplit, last_batch_head) == 12);
    assert!(offset_of!(QueueRegionSplit, used_idx) == 14);
};

const HEADER: usize = size_of::<QueueRegionSplit>();
const DESC: usize = size_of::<DescStateSplit>();
const VERSION: usize = offset_of!(QueueRegionSplit, version);
const DESC_NUM: usize = offset_of!(QueueRegionSplit, desc_num);
const USED_IDX: usize = offset_of!(QueueRegionSplit, used_idx);
const FLAG: usize = offset_of!(DescStateSplit, inflight);
const COUNTER: usize = offset_of!(DescStateSplit, counter);

/// The region version vblk writes.
pub const INFLIGHT_VERSION: u16 = 1;
/// Each queue's region starts at a multiple of this.
pub const REGION_ALIGN: u64 = 64;

/// Bytes of one queue's region for a queue of `queue_size` entries (aligned).
pub fn split_region_size(queue_size: u16) -> u64 {
    let raw = (HEADER + DESC * queue_size as usize) as u64;
    raw.div_ceil(REGION_ALIGN) * REGION_ALIGN
}

/// Why a region cannot be used.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum InflightError {
    #[error("inflight region of {len} bytes is too small for a queue of {size}")]
    TooSmall { len: usize, size: u16 },
    #[error("inflight region describes {found} descriptors, the queue has {size}")]
    DescNum { found: u16, size: u16 },
    #[error("inflight region says {published} used entries were being published, more than the queue size {size}")]
    UsedIdx { published: u16, size: u16 },
    #[error("queue size {0} cannot have an inflight region")]
    QueueSize(u16),
    #[error("inflight region version {0} is not {INFLIGHT_VERSION}")]
    Version(u16),
    #[error("inflight region's {what} is {value}, out of range for a queue of {size}")]
    OutOfRange { what: &'static str, value: u16, size: u16 },
    #[error("inflight region's free list links entry {at} to {next}, out of range for a queue of {size}")]
    FreeListLink { at: u16, next: u16, size: u16 },
    #[error("inflight region's free list loops at entry {at}")]
    FreeListLoop { at: u16 },
    #[error("inflight region's chain at entry {head}: {reason}")]
    Chain { head: u16, reason: &'static str },
    #[error("inflight region's free list ({free} entries) and chains in flight ({in_flight} entries) do not hold the {size} entries")]
    Unaccounted { free: u16, in_flight: u16, size: u16 },
}

/// What attaching a region found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A fresh region (version 0): initialised, nothing to resubmit.
    Fresh,
    /// A region in use: continued as it is (the same process, after a drain).
    Continued,
    /// A region left by a previous process: these heads, in counter order, were in flight.
    Recovered { resubmit: Vec<u16> },
}

/// The inflight region of one split queue. Called where a head is popped
/// ([`mark`](Self::mark)), where it is completed ([`completed`](Self::completed)) and where
/// used entries are published ([`published`](Self::published)).
#[derive(Debug)]
pub struct InflightSplit {
    area: GuestArea,
    size: u16,
    /// The next pop's counter.
    counter: u64,
    /// Heads completed since the last publish.
    batch: Vec<u16>,
}

impl InflightSplit {
    /// Take over `area` for a queue of `size` entries. `used_idx` is the used ring's index
    /// now and `used_head(i)` the head of used entry `i` (any `u16`). With `recover`, a
    /// region in use is recovered by the rule in the module docs; without, it is continued
    /// (same process, nothing in flight after a drain).
    pub fn attach(
        area: GuestArea,
        size: u16,
        used_idx: u16,
        used_head: impl Fn(u16) -> u32,
        recover: bool,
    ) -> Result<(InflightSplit, Attached), InflightError> {
        if area.len() < HEADER + DESC * size as usize {
            return Err(InflightError::TooSmall { len: area.len(), size });
        }
        let mut q = InflightSplit { area, size, counter: 1, batch: Vec::with_capacity(size as usize) };
        if !Self::in_use(&q.area) {
            q.area.write(0, &vec![0u8; HEADER + DESC * size as usize]);
            q.area.store_u16(DESC_NUM, size);
            q.area.store_u16(USED_IDX, used_idx);
            q.area.store_u16(VERSION, INFLIGHT_VERSION);
            return Ok((q, Attached::Fresh));
        }
        let found = q.area.load_u16(DESC_NUM);
        if found != size {
            return Err(InflightError::DescNum { found, size });
        }
        q.counter = (0..size).map(|h| q.counter_of(h)).max().unwrap_or(0).wrapping_add(1);
        if !recover {
            q.area.store_u16(USED_IDX, used_idx);
            return Ok((q, Attached::Continued));
        }
        // Rule 1: a publish cut short; the guest already sees these entries.
        let published = used_idx.wrapping_sub(q.area.load_u16(USED_IDX));
        if published > size {
            return Err(InflightError::UsedIdx { published, size });
        }
        for k in 0..published {
            let i = q.area.load_u16(USED_IDX).wrapping_add(k);
            if let Ok(head) = u16::try_from(used_head(i)) {
                if head < size {
                    q.set_flag(head, false);
                }
            }
        }
        q.area.store_u16(USED_IDX, used_idx);
        // Rule 2: what is still flagged, oldest first.
        let mut resubmit: Vec<u16> = (0..size).filter(|&h| q.flag(h)).collect();
        resubmit.sort_by_key(|&h| (q.counter_of(h), h));
        Ok((q, Attached::Recovered { resubmit }))
    }

    /// Whether a region was already used by a backend (its version is set): the same
    /// guest as before, not a fresh area.
    pub fn in_use(area: &GuestArea) -> bool {
        area.len() >= HEADER && area.load_u16(VERSION) != 0
    }

    fn desc(head: u16) -> usize {
        HEADER + DESC * head as usize
    }

    fn flag(&self, head: u16) -> bool {
        let mut b = [0u8];
        self.area.read(Self::desc(head) + FLAG, &mut b);
        b[0] != 0
    }

    fn set_flag(&self, head: u16, on: bool) {
        self.area.write(Self::desc(head) + FLAG, &[on as u8]);
    }

    fn counter_of(&self, head: u16) -> u64 {
        let mut b = [0u8; 8];
        self.area.read(Self::desc(head) + COUNTER, &mut b);
        u64::from_le_bytes(b)
    }

    /// `head` was popped: its counter, then its flag.
    pub fn mark(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        self.area.write(Self::desc(head) + COUNTER, &self.counter.to_le_bytes());
        self.counter = self.counter.wrapping_add(1);
        self.set_flag(head, true);
    }

    /// `head` went into the used ring; its flag is cleared once the entry is published.
    pub fn completed(&mut self, head: u16) {
        self.batch.push(head);
    }

    /// The ring's `used->idx` is now `used_idx` (the batch is visible): clear the batch's
    /// flags, then record the index.
    pub fn published(&mut self, used_idx: u16) {
        for &h in &self.batch {
            if h < self.size {
                self.set_flag(h, false);
            }
        }
        self.batch.clear();
        self.area.store_u16(USED_IDX, used_idx);
    }

    /// Heads flagged in flight now (tests, diagnostics).
    pub fn flagged(&self) -> Vec<u16> {
        (0..self.size).filter(|&h| self.flag(h)).collect()
    }
}

#[cfg(test)]
#[path = "inflight_tests.rs"]
mod tests;
