//! Inflight I/O tracking for a packed ring: the counterpart of [`crate::inflight`] for
//! virtio 1.1's one-ring layout (vhost-user spec, "Inflight I/O tracking", packed part).
//!
//! A packed ring has no used ring of its own: the device writes used descriptors over the
//! slots the driver made available, in completion order, so a chain completed early
//! overwrites slots of chains still in flight. The region therefore keeps a copy of every
//! popped descriptor. It is a header ([`QueueRegionPacked`]) and `desc_num` entries
//! ([`DescStatePacked`]). The entries form a *free list* (`free_head`, linked by `next`,
//! ended by the value `desc_num`); a popped chain of `k` descriptors takes the first `k`
//! entries of the free list, one per descriptor in ring order, and its first entry (the
//! *head*) also holds `inflight`, `counter` (pop order), `num = k` and `last` (its last
//! entry). Completed chains go back to the front of the free list.
//!
//! vblk keeps its own copy of the free list and of every head's `num` and `last`: while
//! the queue runs the region is only written, never read back.
//!
//! ## What vblk writes, and when
//!
//! Between operations `old_free_head == free_head` and the used position
//! `(used_idx, used_wrap_counter)` equals `(old_used_idx, old_used_wrap_counter)`.
//!
//! - **pop** ([`InflightPacked::mark`], a chain of `k` ring descriptors, head entry
//!   `h = free_head`): the descriptors' `addr, len, id, flags` into the `k` entries from `h`
//!   along the free list; `h`'s `counter`, `num = k`, `last`; `free_head` = the entry after
//!   them; `h.inflight = 1`; then `old_free_head = free_head`, the pop's commit. (The spec
//!   sets `inflight` at the chain's first descriptor; vblk sets it once the chain is
//!   complete, so that a flagged entry off the free list always has a whole chain. Both
//!   recover alike, rule 2.)
//! - **complete** ([`InflightPacked::completed`]): nothing yet; the chain joins the batch.
//! - **publish**, step 1 ([`InflightPacked::publishing`]), before the device stores the
//!   flags of the batch's first used descriptor: for every chain of the batch
//!   `desc[last].next = free_head` (and `free_head = head` in vblk's copy), then the
//!   region's `free_head`, then `used_idx`, then `used_wrap_counter` (the batch's end).
//! - the device stores the used descriptors, the flags of the batch's first one last: the
//!   guest sees the whole batch at that store.
//! - **publish**, step 2 ([`InflightPacked::published`]): `inflight = 0` on every head of
//!   the batch, then `old_free_head = free_head`, then `old_used_idx`, then
//!   `old_used_wrap_counter`.
//!
//! Between commits the list from `old_free_head` is never written: a pop writes only the
//! copies and head fields of entries on it, never `next`; a publish writes `next` only in
//! the last entries of chains in flight. No pop happens between the two publish steps.
//!
//! ## Recovery rule (a crash at any instruction)
//!
//! 1. **A publish cut short.** If `(used_idx, used_wrap_counter)` differs from
//!    `(old_used_idx, old_used_wrap_counter)`, the batch was published if
//!    `free_head == old_free_head` (step 2's commit had begun: before it, `free_head`
//!    names a head of the batch, which is not on the old free list) or if the ring slot at
//!    `old_used_idx` no longer holds the flags the driver makes a slot available with in lap
//!    `old_used_wrap_counter` (the device stored the batch's first used flags, or the guest
//!    has even taken it and offered the slot again in the next lap). Published: `old_*` =
//!    the current values (`old_free_head` first). Not published: the used position goes
//!    back to the old one. The spec compares only the indices and always reads the ring;
//!    vblk compares the wrap counters too (a batch of exactly `desc_num` slots leaves
//!    `used_idx` where it was) and trusts `free_head == old_free_head` first (a crash
//!    between the stores of `old_used_idx` and `old_used_wrap_counter` leaves a torn old
//!    position, whose slot must not be read).
//! 2. **Roll back.** `free_head = old_free_head`: this undoes a pop that did not commit and
//!    the links of a batch that was not published. The `inflight` flag of every entry on
//!    the free list is cleared (a pop cut after its flag, a batch published before its
//!    flags were cleared).
//! 3. **Resubmit.** Every entry still flagged heads a chain popped and not used as far as
//!    the guest can tell. They are resubmitted in `counter` order with the region's copies
//!    of their descriptors, and the used position is the recovered one. Every popped chain
//!    is either used (up to that position) or resubmitted, and a pop cut short is popped
//!    again, so the device resumes popping at the used position plus the slots of the
//!    resubmitted chains, whatever vring base the frontend sends.
//! 4. **The device scrubs the ring.** The slots from the recovered used position to that
//!    avail position may hold used flags the dead process stored for a batch it never
//!    published (the flags of a batch's later descriptors go first). Before it publishes
//!    anything, the device rewrites their flags to `packed_avail_flags(wrap of the slot)`:
//!    the guest would take them for used descriptors when it gets there, and rule 1 would
//!    read one at `old_used_idx` as a published batch after the next crash.
//!
//! Recovery stores in the same order (the used position committed or rolled back before
//! `free_head`, flags last), so a crash during recovery recovers the same.
//!
//! Nothing read from the region is trusted: it is guest-reachable shared memory of a
//! frontend that may be hostile. It is read once into a private copy, and refused
//! (nothing written) unless: the version is [`INFLIGHT_VERSION`], `desc_num` is the queue
//! size, the used positions are in the ring, the free list ends within `desc_num` steps
//! with every link in range, every flagged chain has `num` in `1..=desc_num` entries
//! following `next` in range and ending at `last`, chains and free list do not overlap,
//! and together they hold every entry (so the slots in flight never exceed the ring).

use std::mem::{offset_of, size_of};
use std::sync::atomic::{compiler_fence, Ordering};

use vblk_virtio::GuestArea;

use crate::inflight::{InflightError, INFLIGHT_VERSION, REGION_ALIGN};
use crate::layout::{
    packed_avail_flags, PackedDescriptor, RingPos, MAX_PACKED_SIZE, PACKED_DESC_F_AVAIL, PACKED_DESC_F_USED,
};

/// `DescStatePacked` of the vhost-user spec: one entry, a copy of one popped descriptor.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DescStatePacked {
    /// 1 while the chain this entry heads is in flight (heads only).
    pub inflight: u8,
    pub padding: u8,
    /// The next entry of the free list, or of a chain.
    pub next: u16,
    /// The chain's last entry (heads only).
    pub last: u16,
    /// The chain's number of descriptors (heads only).
    pub num: u16,
    /// Order of popping: resubmission follows it (heads only).
    pub counter: u64,
    /// The descriptor's buffer id.
    pub id: u16,
    /// The descriptor's flags, as they were in the ring.
    pub flags: u16,
    pub len: u32,
    pub addr: u64,
}

/// `QueueRegionPacked` of the vhost-user spec: the header of one queue's region, followed
/// by `desc_num` [`DescStatePacked`]s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueRegionPacked {
    /// Feature flags of the region: 0.
    pub features: u64,
    /// [`INFLIGHT_VERSION`]; 0 means a fresh (or reset) region.
    pub version: u16,
    /// Number of entries: the queue size.
    pub desc_num: u16,
    /// First entry of the free list (`desc_num`: empty).
    pub free_head: u16,
    /// `free_head` as of the last commit.
    pub old_free_head: u16,
    /// The device's used position: slot index ...
    pub used_idx: u16,
    /// ... as of the last commit.
    pub old_used_idx: u16,
    /// ... and wrap counter (0 or 1).
    pub used_wrap_counter: u8,
    pub old_used_wrap_counter: u8,
    pub padding: [u8; 7],
}

// The layout is the spec's (C, little endian).
const _: () = {
    assert!(size_of::<DescStatePacked>() == 32);
    assert!(offset_of!(DescStatePacked, inflight) == 0);
    assert!(offset_of!(DescStatePacked, padding) == 1);
    assert!(offset_of!(DescStatePacked, next) == 2);
    assert!(offset_of!(DescStatePacked, last) == 4);
    assert!(offset_of!(DescStatePacked, num) == 6);
    assert!(offset_of!(DescStatePacked, counter) == 8);
    assert!(offset_of!(DescStatePacked, id) == 16);
    assert!(offset_of!(DescStatePacked, flags) == 18);
    assert!(offset_of!(DescStatePacked, len) == 20);
    assert!(offset_of!(DescStatePacked, addr) == 24);
    assert!(size_of::<QueueRegionPacked>() == 32);
    assert!(offset_of!(QueueRegionPacked, version) == 8);
    assert!(offset_of!(QueueRegionPacked, desc_num) == 10);
    assert!(offset_of!(QueueRegionPacked, free_head) == 12);
    assert!(offset_of!(QueueRegionPacked, old_free_head) == 14);
    assert!(offset_of!(QueueRegionPacked, used_idx) == 16);
    assert!(offset_of!(QueueRegionPacked, old_used_idx) == 18);
    assert!(offset_of!(QueueRegionPacked, used_wrap_counter) == 20);
    assert!(offset_of!(QueueRegionPacked, old_used_wrap_counter) == 21);
    assert!(offset_of!(QueueRegionPacked, padding) == 22);
};

const HEADER: usize = size_of::<QueueRegionPacked>();
const DESC: usize = size_of::<DescStatePacked>();
const VERSION: usize = offset_of!(QueueRegionPacked, version);
const DESC_NUM: usize = offset_of!(QueueRegionPacked, desc_num);
const FREE_HEAD: usize = offset_of!(QueueRegionPacked, free_head);
const OLD_FREE_HEAD: usize = offset_of!(QueueRegionPacked, old_free_head);
const USED_IDX: usize = offset_of!(QueueRegionPacked, used_idx);
const OLD_USED_IDX: usize = offset_of!(QueueRegionPacked, old_used_idx);
/// `used_wrap_counter` and `old_used_wrap_counter`, stored together as one `u16`.
const WRAPS: usize = offset_of!(QueueRegionPacked, used_wrap_counter);
/// `inflight` and its padding byte, stored together as one `u16`.
const INFLIGHT: usize = offset_of!(DescStatePacked, inflight);
const NEXT: usize = offset_of!(DescStatePacked, next);
const LAST: usize = offset_of!(DescStatePacked, last);
const NUM: usize = offset_of!(DescStatePacked, num);
const COUNTER: usize = offset_of!(DescStatePacked, counter);
const ID: usize = offset_of!(DescStatePacked, id);
const FLAGS: usize = offset_of!(DescStatePacked, flags);
const LEN: usize = offset_of!(DescStatePacked, len);
const ADDR: usize = offset_of!(DescStatePacked, addr);

/// Bytes of one queue's region for a packed queue of `queue_size` entries (aligned to
/// [`REGION_ALIGN`]).
pub fn packed_region_size(queue_size: u16) -> u64 {
    let raw = (HEADER + DESC * queue_size as usize) as u64;
    raw.div_ceil(REGION_ALIGN) * REGION_ALIGN
}

/// What attaching a region found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttachedPacked {
    /// A fresh region (version 0): initialised, nothing to resubmit.
    Fresh,
    /// A region in use, re-attached by the same process after a drain: initialised again
    /// at the given used position (nothing is in flight).
    Continued,
    /// A region left by a previous process: the used position the guest can see, and the
    /// chains that were in flight, oldest first. The device resumes popping at `used`
    /// advanced by the resubmitted chains' slots, and rewrites the flags of those slots
    /// before it publishes anything (rule 4 of the module docs).
    Recovered { used: RingPos, resubmit: Vec<ResubmitChain> },
}

/// A chain to resubmit: the entry that heads it (for [`InflightPacked::completed`]) and
/// its descriptors as they were in the ring, in ring order (head first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResubmitChain {
    pub entry: u16,
    pub descs: Vec<PackedDescriptor>,
}

/// vblk's copy of one entry's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// On the free list, or a later entry of a chain.
    Plain,
    /// Heads a chain in flight.
    InFlight,
    /// Heads a chain completed, not yet published.
    Completed,
}

/// The inflight region of one packed queue. Called where a chain is popped
/// ([`mark`](Self::mark)), where it is completed ([`completed`](Self::completed)) and
/// around the store that publishes a batch of used descriptors
/// ([`publishing`](Self::publishing), [`published`](Self::published)).
#[derive(Debug)]
pub struct InflightPacked {
    area: GuestArea,
    size: u16,
    /// `next` of every entry, as vblk wrote it.
    next: Vec<u16>,
    /// `last` and `num` of every head.
    last: Vec<u16>,
    num: Vec<u16>,
    role: Vec<Role>,
    free_head: u16,
    /// Entries on the free list.
    free: u16,
    /// The committed used position (`old_used_*`).
    used: RingPos,
    /// The next pop's counter.
    counter: u64,
    /// Heads completed since the last [`publishing`](Self::publishing).
    completed: Vec<u16>,
    /// The batch between [`publishing`](Self::publishing) and
    /// [`published`](Self::published), and its end.
    batch: Vec<u16>,
    publishing: Option<RingPos>,
}

/// The region, read once: nothing in it is trusted.
struct RegionCopy {
    bytes: Vec<u8>,
}

impl RegionCopy {
    fn u16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }
    fn u32(&self, off: usize) -> u32 {
        u32::from_le_bytes([self.bytes[off], self.bytes[off + 1], self.bytes[off + 2], self.bytes[off + 3]])
    }
    fn u64(&self, off: usize) -> u64 {
        self.u32(off) as u64 | (self.u32(off + 4) as u64) << 32
    }
    fn at(&self, e: u16, field: usize) -> usize {
        desc(e) + field
    }
    fn next(&self, e: u16) -> u16 {
        self.u16(self.at(e, NEXT))
    }
    fn flagged(&self, e: u16) -> bool {
        self.bytes[self.at(e, INFLIGHT)] != 0
    }
    fn descriptor(&self, e: u16) -> PackedDescriptor {
        PackedDescriptor {
            addr: self.u64(self.at(e, ADDR)),
            len: self.u32(self.at(e, LEN)),
            id: self.u16(self.at(e, ID)),
            flags: self.u16(self.at(e, FLAGS)),
        }
    }
}

fn desc(e: u16) -> usize {
    HEADER + DESC * e as usize
}

/// Tests: called after every store to a region, to snapshot it (crash simulation).
#[cfg(test)]
type StoreHook = Box<dyn FnMut(&GuestArea)>;

#[cfg(test)]
thread_local! {
    static STORE_HOOK: std::cell::RefCell<Option<StoreHook>> = const { std::cell::RefCell::new(None) };
}

#[inline]
fn stored(_area: &GuestArea) {
    #[cfg(test)]
    STORE_HOOK.with(|h| {
        if let Some(f) = h.borrow_mut().as_mut() {
            f(_area)
        }
    });
}

// Every store is a volatile one: they reach shared memory in program order, which is all
// a crash of this process can observe.
fn st16(area: &GuestArea, off: usize, v: u16) {
    area.store_u16(off, v);
    stored(area);
}

fn st32(area: &GuestArea, off: usize, v: u32) {
    area.store_u32(off, v);
    stored(area);
}

fn st64(area: &GuestArea, off: usize, v: u64) {
    st32(area, off, v as u32);
    st32(area, off + 4, (v >> 32) as u32);
}

fn st_flag(area: &GuestArea, e: u16, on: bool) {
    st16(area, desc(e) + INFLIGHT, on as u16);
}

fn st_wraps(area: &GuestArea, used: bool, old: bool) {
    st16(area, WRAPS, used as u16 | (old as u16) << 8);
}

/// The flags of a ring slot that only the driver has written in lap `wrap`.
fn offered(flags: u16, wrap: bool) -> bool {
    flags & (PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED) == packed_avail_flags(wrap)
}

impl InflightPacked {
    /// Take over `area` for a packed queue of `size` entries.
    ///
    /// `used` is the device's used position (from `SET_VRING_BASE`): a fresh region starts
    /// there. `slot_flags(i)` reads the flags of ring slot `i` (`i < size`), for rule 1 of
    /// the module docs. With `recover`, a region in use is recovered by those rules;
    /// without, it is initialised again (the same process after a drain: nothing in
    /// flight).
    pub fn attach(
        area: GuestArea,
        size: u16,
        used: RingPos,
        slot_flags: impl Fn(u16) -> u16,
        recover: bool,
    ) -> Result<(InflightPacked, AttachedPacked), InflightError> {
        if size == 0 || size > MAX_PACKED_SIZE {
            return Err(InflightError::QueueSize(size));
        }
        if area.len() < HEADER + DESC * size as usize {
            return Err(InflightError::TooSmall { len: area.len(), size });
        }
        let n = size as usize;
        let mut q = InflightPacked {
            area,
            size,
            next: (1..=size).collect(),
            last: vec![0; n],
            num: vec![0; n],
            role: vec![Role::Plain; n],
            free_head: 0,
            free: size,
            used,
            counter: 1,
            completed: Vec::with_capacity(n),
            batch: Vec::with_capacity(n),
            publishing: None,
        };
        let fresh = !Self::in_use(&q.area);
        if fresh || !recover {
            if used.idx >= size {
                return Err(InflightError::OutOfRange { what: "used position", value: used.idx, size });
            }
            q.initialise(!fresh);
            let a = if fresh { AttachedPacked::Fresh } else { AttachedPacked::Continued };
            return Ok((q, a));
        }
        let resubmit = q.recover(slot_flags)?;
        let used = q.used;
        Ok((q, AttachedPacked::Recovered { used, resubmit }))
    }

    /// Whether a region was already used by a backend (its version is set): the same
    /// guest as before, not a fresh area.
    pub fn in_use(area: &GuestArea) -> bool {
        area.len() >= HEADER && area.load_u16(VERSION) != 0
    }

    /// Write the whole region afresh (vblk's copy already is), its version last; a region
    /// in use is first marked fresh, so that a crash in between leaves a fresh region.
    fn initialise(&mut self, in_use: bool) {
        if in_use {
            st16(&self.area, VERSION, 0);
        }
        let mut image = vec![0u8; HEADER + DESC * self.size as usize];
        image[DESC_NUM..DESC_NUM + 2].copy_from_slice(&self.size.to_le_bytes());
        for off in [USED_IDX, OLD_USED_IDX] {
            image[off..off + 2].copy_from_slice(&self.used.idx.to_le_bytes());
        }
        image[WRAPS] = self.used.wrap as u8;
        image[WRAPS + 1] = self.used.wrap as u8;
        for e in 0..self.size {
            image[desc(e) + NEXT..desc(e) + NEXT + 2].copy_from_slice(&(e + 1).to_le_bytes());
        }
        // The bulk copy is not volatile: keep the compiler from moving it past the version.
        compiler_fence(Ordering::SeqCst);
        self.area.write(0, &image);
        stored(&self.area);
        compiler_fence(Ordering::SeqCst);
        st16(&self.area, VERSION, INFLIGHT_VERSION);
    }

    /// Rules 1-3 of the module docs on a private copy; the stores only once it is valid.
    fn recover(&mut self, slot_flags: impl Fn(u16) -> u16) -> Result<Vec<ResubmitChain>, InflightError> {
        let size = self.size;
        let mut r = RegionCopy { bytes: vec![0u8; HEADER + DESC * size as usize] };
        self.area.read(0, &mut r.bytes);
        let version = r.u16(VERSION);
        if version != INFLIGHT_VERSION {
            return Err(InflightError::Version(version));
        }
        let found = r.u16(DESC_NUM);
        if found != size {
            return Err(InflightError::DescNum { found, size });
        }
        let range = |what, value: u16, limit: u16| {
            if value > limit {
                Err(InflightError::OutOfRange { what, value, size })
            } else {
                Ok(value)
            }
        };
        // `size` is an empty free list; a used index is a slot.
        let free_head = range("free_head", r.u16(FREE_HEAD), size)?;
        let old_free_head = range("old_free_head", r.u16(OLD_FREE_HEAD), size)?;
        let used_idx = range("used_idx", r.u16(USED_IDX), size - 1)?;
        let old_used_idx = range("old_used_idx", r.u16(OLD_USED_IDX), size - 1)?;
        let used = RingPos { idx: used_idx, wrap: r.bytes[WRAPS] != 0 };
        let old = RingPos { idx: old_used_idx, wrap: r.bytes[WRAPS + 1] != 0 };

        // Rule 1: a publish cut short.
        let published = used != old && (free_head == old_free_head || !offered(slot_flags(old.idx), old.wrap));
        let (pos, head) = if published { (used, free_head) } else { (old, old_free_head) };

        // Rule 2: the free list from the committed head; flags on it are stale.
        let mut seen = vec![false; size as usize];
        let mut free_list = Vec::with_capacity(size as usize);
        let (mut e, mut prev) = (head, head);
        while e != size {
            if e > size {
                return Err(InflightError::FreeListLink { at: prev, next: e, size });
            }
            if std::mem::replace(&mut seen[e as usize], true) {
                return Err(InflightError::FreeListLoop { at: e });
            }
            free_list.push(e);
            prev = e;
            e = r.next(e);
        }

        // Rule 3: every other flagged entry heads a chain in flight.
        let mut heads: Vec<u16> = (0..size).filter(|&e| !seen[e as usize] && r.flagged(e)).collect();
        heads.sort_by_key(|&h| (r.u64(r.at(h, COUNTER)), h));
        let mut chains = Vec::with_capacity(heads.len());
        let mut slots = free_list.len();
        for &h in &heads {
            let num = r.u16(r.at(h, NUM));
            let bad = |reason| InflightError::Chain { head: h, reason };
            if num == 0 || num > size {
                return Err(bad("num is not in 1..=desc_num"));
            }
            let mut entries = Vec::with_capacity(num as usize);
            let mut e = h;
            for k in 0..num {
                if k > 0 {
                    e = r.next(e);
                }
                if e >= size {
                    return Err(bad("a link out of range"));
                }
                if std::mem::replace(&mut seen[e as usize], true) {
                    return Err(bad("shares an entry with the free list or another chain"));
                }
                entries.push(e);
            }
            if r.u16(r.at(h, LAST)) != e {
                return Err(bad("does not end at its last entry"));
            }
            slots += num as usize;
            chains.push(entries);
        }
        if slots != size as usize {
            return Err(InflightError::Unaccounted {
                free: free_list.len() as u16,
                in_flight: (slots - free_list.len()) as u16,
                size,
            });
        }

        // Valid: the stores, in the order of the module docs.
        let a = &self.area;
        if used != old {
            if published {
                if old_free_head != free_head {
                    st16(a, OLD_FREE_HEAD, free_head);
                }
                if old.idx != used.idx {
                    st16(a, OLD_USED_IDX, used.idx);
                }
                st_wraps(a, used.wrap, used.wrap);
            } else {
                if used.idx != old.idx {
                    st16(a, USED_IDX, old.idx);
                }
                st_wraps(a, old.wrap, old.wrap);
            }
        }
        if free_head != head {
            st16(a, FREE_HEAD, head);
        }
        for &e in &free_list {
            if r.flagged(e) {
                st_flag(a, e, false);
            }
        }

        // vblk's copy from here on.
        self.next = (0..size).map(|e| r.next(e)).collect();
        self.free_head = head;
        self.free = free_list.len() as u16;
        self.used = pos;
        self.counter = heads.iter().map(|&h| r.u64(r.at(h, COUNTER))).max().unwrap_or(0).wrapping_add(1);
        let mut resubmit = Vec::with_capacity(chains.len());
        for entries in chains {
            let h = entries[0];
            self.role[h as usize] = Role::InFlight;
            self.num[h as usize] = entries.len() as u16;
            self.last[h as usize] = *entries.last().expect("num >= 1");
            resubmit.push(ResubmitChain { entry: h, descs: entries.iter().map(|&e| r.descriptor(e)).collect() });
        }
        Ok(resubmit)
    }

    /// A chain was popped: its ring descriptors in ring order. Every popped chain, refused
    /// ones too: recovery counts on each being either used or recorded. Returns the entry
    /// that heads it, for [`completed`](Self::completed); `size` if it could not be
    /// recorded (no descriptors, more than the free entries, or inside a publish: the
    /// device's guarantees exclude all three), in which case the chain is not tracked.
    pub fn mark(&mut self, descs: &[PackedDescriptor]) -> u16 {
        debug_assert!(self.publishing.is_none(), "a pop between publishing and published");
        if descs.is_empty() || descs.len() > self.free as usize || self.publishing.is_some() {
            return self.size;
        }
        let a = &self.area;
        let h = self.free_head;
        let mut e = h;
        let mut last = h;
        for d in descs {
            // Within the free list by vblk's own copy: `free` entries from `free_head`.
            last = e;
            let at = desc(e);
            st64(a, at + ADDR, d.addr);
            st32(a, at + LEN, d.len);
            st16(a, at + ID, d.id);
            st16(a, at + FLAGS, d.flags);
            e = self.next[e as usize];
        }
        st64(a, desc(h) + COUNTER, self.counter);
        st16(a, desc(h) + NUM, descs.len() as u16);
        st16(a, desc(h) + LAST, last);
        st16(a, FREE_HEAD, e);
        st_flag(a, h, true);
        st16(a, OLD_FREE_HEAD, e);
        self.counter = self.counter.wrapping_add(1);
        self.free_head = e;
        self.free -= descs.len() as u16;
        self.num[h as usize] = descs.len() as u16;
        self.last[h as usize] = last;
        self.role[h as usize] = Role::InFlight;
        h
    }

    /// The chain headed by `entry` (from [`mark`](Self::mark) or a
    /// [`ResubmitChain`]) is complete; it stays in flight until its batch is published.
    /// Anything else (not in flight, completed twice) is ignored.
    pub fn completed(&mut self, entry: u16) {
        if let Some(r @ Role::InFlight) = self.role.get_mut(entry as usize) {
            *r = Role::Completed;
            self.completed.push(entry);
        }
    }

    /// Publish step 1, before the device stores the flags of the batch's first used
    /// descriptor: the chains completed so far go back on the free list and `used`, the
    /// used position after the batch, is recorded.
    pub fn publishing(&mut self, used: RingPos) {
        if self.publishing.is_some() {
            debug_assert!(false, "publishing twice without published");
            self.published();
        }
        debug_assert!(used.idx < self.size);
        if self.completed.is_empty() && used == self.used {
            return;
        }
        let a = &self.area;
        for &h in &self.completed {
            let l = self.last[h as usize];
            st16(a, desc(l) + NEXT, self.free_head);
            self.next[l as usize] = self.free_head;
            self.free_head = h;
            self.free += self.num[h as usize];
        }
        st16(a, FREE_HEAD, self.free_head);
        st16(a, USED_IDX, used.idx);
        st_wraps(a, used.wrap, self.used.wrap);
        std::mem::swap(&mut self.batch, &mut self.completed);
        self.publishing = Some(used);
    }

    /// Publish step 2, after the device stored the batch's first used flags: clear the
    /// batch's flags and commit.
    pub fn published(&mut self) {
        let Some(used) = self.publishing.take() else { return };
        let a = &self.area;
        for &h in &self.batch {
            st_flag(a, h, false);
            self.role[h as usize] = Role::Plain;
        }
        self.batch.clear();
        st16(a, OLD_FREE_HEAD, self.free_head);
        st16(a, OLD_USED_IDX, used.idx);
        st_wraps(a, used.wrap, used.wrap);
        self.used = used;
    }
}

#[cfg(test)]
#[path = "inflight_packed_tests.rs"]
mod tests;
