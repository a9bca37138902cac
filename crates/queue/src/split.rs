//! The split virtqueue, device side (virtio 1.2 §2.7): QEMU's `virtqueue_pop` /
//! `virtqueue_push` / `virtio_notify`, written against a hostile driver.
//!
//! - [`SplitQueue::pop`] reads the next available head and validates its whole chain once
//!   into a [`Chain`]. Every index and address the driver wrote is checked before use.
//! - [`SplitQueue::add_used`] + [`SplitQueue::publish_used`] return chains to the driver;
//!   `publish_used` tells whether the driver wants an interrupt (EVENT_IDX `used_event`,
//!   or `VRING_AVAIL_F_NO_INTERRUPT`).
//! - [`SplitQueue::enable_notification`] asks for kicks again before the device sleeps
//!   (EVENT_IDX `avail_event`) and reports work that raced with it.
//!
//! Two kinds of failure: a bad *chain* (a loop, a buffer outside memory, …) refuses that
//! request only: [`Popped::Refused`] says where its status byte is, so the caller can
//! answer IOERR; a refused chain whose status byte cannot be located must break the queue
//! (a chain never ends without a status). A bad *ring* (avail index jumping past the queue
//! size, a head out of range, a head made available twice while in flight) breaks the
//! queue: nothing more is read from it until it is set up again.

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use vblk_virtio::{GuestArea, GuestMemory, Iov, MemoryError};

use crate::chain::{Chain, StatusByte, StatusSearch};
use crate::inflight::{Attached, InflightSplit};
use crate::layout::{Descriptor, SplitLayout, DESC_SIZE};
use crate::layout::{AVAIL_ALIGN, AVAIL_F_NO_INTERRUPT, DESC_ALIGN, USED_ALIGN};
use crate::{need_event, ChainError, QueueError};

/// Where a split ring lives and what was negotiated for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// Most entries in one indirect table, whatever the ring size.
pub const MAX_INDIRECT_ENTRIES: u32 = 1024;

/// Which address space [`RingAddrs`] are in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrSpace {
    /// Guest-physical addresses (virtio-pci, in-process tests).
    GuestPhysical,
    /// The frontend's virtual addresses (vhost-user `SET_VRING_ADDR`).
    FrontendVirtual,
}

impl AddrSpace {
    /// The area of `len` bytes at `addr` (in this address space) of `mem`, `align`-aligned:
    /// where a ring part lives, for either ring layout.
    pub(crate) fn area(
        self,
        mem: &Arc<GuestMemory>,
        addr: u64,
        len: u64,
        align: u64,
    ) -> Result<GuestArea, MemoryError> {
        match self {
            AddrSpace::GuestPhysical => mem.area_at_gpa(addr, len, align),
            AddrSpace::FrontendVirtual => mem.area_at_uva(addr, len, align),
        }
    }
}

/// An indirect table (§2.7.5.3.1, §2.8.7), checked once for both ring layouts: a length
/// that is a non-zero multiple of 16, at most `max(ring size, MAX_INDIRECT_ENTRIES)` entries,
/// inside guest memory. A table crossing into an adjacent region is read entry by entry.
pub(crate) struct IndirectTable<'a> {
    mem: &'a GuestMemory,
    addr: u64,
    one_region: Option<Iov>,
    pub(crate) entries: u32,
}

impl<'a> IndirectTable<'a> {
    pub(crate) fn new(mem: &'a GuestMemory, addr: u64, len: u32, ring_size: u16) -> Result<Self, ChainError> {
        if len == 0 || !(len as usize).is_multiple_of(DESC_SIZE) {
            return Err(ChainError::IndirectBadLength(len));
        }
        let entries = len / DESC_SIZE as u32;
        // Linux sizes indirect tables by `seg_max`, not by the ring size, so a small ring
        // may carry tables longer than itself; QEMU allows up to 1024 entries too.
        let limit = (ring_size as u32).max(MAX_INDIRECT_ENTRIES);
        if entries > limit {
            return Err(ChainError::TooLong { limit });
        }
        let one_region = mem.iov(addr, len).ok();
        if one_region.is_none() {
            mem.for_each_iov(addr, len, |_| {})?;
        }
        Ok(IndirectTable { mem, addr, one_region, entries })
    }

    /// The raw bytes of entry `i` (`i < entries`).
    pub(crate) fn entry(&self, i: u32) -> Result<[u8; DESC_SIZE], ChainError> {
        let mut b = [0u8; DESC_SIZE];
        let off = i * DESC_SIZE as u32;
        match self.one_region {
            Some(iov) => self.mem.read_iov(iov, off, &mut b)?,
            None => self.mem.read_at(self.addr + off as u64, &mut b)?,
        }
        Ok(b)
    }
}

/// Ring features the queue needs to know about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingFeatures {
    pub event_idx: bool,
    pub indirect: bool,
}

/// What [`SplitQueue::pop`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Popped {
    /// Nothing available.
    Empty,
    /// A valid chain was written into the caller's [`Chain`].
    Chain,
    /// The chain with head `head` is invalid. If its status byte could be located, the
    /// caller writes IOERR there and completes it; if not (`status: None`), the caller must
    /// break the queue: a chain never ends without a status.
    Refused { head: u16, error: ChainError, status: Option<StatusByte> },
}

/// Device side of a split virtqueue.
pub struct SplitQueue {
    layout: SplitLayout,
    features: RingFeatures,
    mem: Arc<GuestMemory>,
    desc: GuestArea,
    avail: GuestArea,
    used: GuestArea,
    /// Next available-ring slot to read (the vhost-user "vring base").
    next_avail: u16,
    /// Last `avail.idx` read (shadow: re-read only when we caught up with it).
    shadow_avail: u16,
    /// Next used-ring slot to fill.
    next_used: u16,
    /// `used.idx` as last published.
    published_used: u16,
    /// `used.idx` at the last notification check (Linux vhost's `signalled_used`).
    signalled_used: Option<u16>,
    /// Heads handed out and not yet completed.
    in_flight: Vec<bool>,
    num_in_flight: u16,
    broken: Option<QueueError>,
    /// Inflight tracking shared with the frontend (`crate::inflight`), when negotiated.
    inflight: Option<InflightSplit>,
    /// Heads a previous backend process left in flight, popped before the avail ring.
    resubmit: VecDeque<u16>,
}

impl SplitQueue {
    /// Set up a queue of `size` entries whose rings are at `addrs`.
    pub fn new(
        mem: Arc<GuestMemory>,
        size: u32,
        addrs: RingAddrs,
        space: AddrSpace,
        features: RingFeatures,
    ) -> Result<Self, QueueError> {
        let layout = SplitLayout::new(size).ok_or(QueueError::InvalidSize(size))?;
        let area = |addr, len, align| space.area(&mem, addr, len, align);
        let desc = area(addrs.desc, layout.desc_table_len(), DESC_ALIGN)?;
        let avail = area(addrs.avail, layout.avail_len(), AVAIL_ALIGN)?;
        let used = area(addrs.used, layout.used_len(), USED_ALIGN)?;
        let next_used = used.load_u16(SplitLayout::IDX);
        Ok(SplitQueue {
            layout,
            features,
            mem,
            desc,
            avail,
            used,
            next_avail: 0,
            shadow_avail: 0,
            next_used,
            published_used: next_used,
            signalled_used: None,
            in_flight: vec![false; size as usize],
            num_in_flight: 0,
            broken: None,
            inflight: None,
            resubmit: VecDeque::new(),
        })
    }

    pub fn size(&self) -> u16 {
        self.layout.size
    }

    pub fn features(&self) -> RingFeatures {
        self.features
    }

    /// Index of the next available entry to process (`GET_VRING_BASE`).
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Start processing at available entry `idx` (`SET_VRING_BASE`).
    pub fn set_next_avail(&mut self, idx: u16) {
        self.next_avail = idx;
        self.shadow_avail = idx;
    }

    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Requests popped and not yet completed. Never more than the queue size.
    pub fn num_in_flight(&self) -> u16 {
        self.num_in_flight
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// Why the queue stopped, if it did.
    pub fn broken(&self) -> Option<&QueueError> {
        self.broken.as_ref()
    }

    /// Stop the queue for `e` (the layer above found a chain it cannot answer); returns
    /// `e` for the caller to report.
    pub fn break_ring(&mut self, e: QueueError) -> QueueError {
        self.fail(e)
    }

    fn fail(&mut self, e: QueueError) -> QueueError {
        self.broken = Some(e.clone());
        e
    }

    /// Read `avail.idx` and check the driver did not make more than `size` entries
    /// available beyond what we already consumed.
    fn refresh_avail(&mut self) -> Result<u16, QueueError> {
        let idx = self.avail.load_u16(SplitLayout::IDX);
        // Read ring entries and descriptors only after seeing the index (§2.7.13.3 pairs
        // with the driver's write barrier before publishing it).
        fence(Ordering::Acquire);
        if idx.wrapping_sub(self.next_avail) > self.layout.size {
            return Err(self.fail(QueueError::AvailIdxJump {
                last: self.next_avail,
                now: idx,
                size: self.layout.size,
            }));
        }
        if idx.wrapping_sub(self.shadow_avail) > 1 {
            self.prefetch(self.shadow_avail, idx);
        }
        self.shadow_avail = idx;
        Ok(idx)
    }

    /// Start fetching what popping the entries `[from, to)` of the avail ring will read,
    /// so that their cache misses (lines the driver just wrote, on another CPU) overlap
    /// instead of following one another: the head descriptors of all of them, then, once
    /// those are in, each chain's second descriptor and its first buffer (a block
    /// request's header). Only hints: nothing is validated here, and `pop` reads and
    /// checks everything as before.
    fn prefetch(&self, from: u16, to: u16) {
        let size = self.layout.size;
        let n = to.wrapping_sub(from).min(size);
        for i in 0..n {
            let head = self.avail.load_u16(self.layout.avail_entry(from.wrapping_add(i)));
            if head < size {
                self.desc.prefetch(self.layout.desc(head));
            }
        }
        for i in 0..n {
            let head = self.avail.load_u16(self.layout.avail_entry(from.wrapping_add(i)));
            if head >= size {
                continue;
            }
            let d = self.read_desc(head);
            if d.has_next() && d.next < size {
                self.desc.prefetch(self.layout.desc(d.next));
            }
            if !d.is_indirect() {
                if let Ok(iov) = self.mem.iov(d.addr, d.len.min(64)) {
                    vblk_virtio::memory::prefetch(iov.as_iovec().iov_base as *const u8);
                }
            }
        }
    }

    /// Are there available entries we have not popped? (Re-reads `avail.idx`.)
    pub fn has_available(&mut self) -> Result<bool, QueueError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        Ok(!self.resubmit.is_empty() || self.refresh_avail()? != self.next_avail)
    }

    /// Track this queue's requests in the frontend's inflight region `area` (see
    /// [`crate::inflight`]). With `recover`, a region left by a previous process is
    /// recovered: its unfinished heads are popped again first, and the avail ring resumes
    /// after the entries that were popped (`used->idx` + the unfinished count), whatever
    /// vring base was set. Returns how many heads will be resubmitted.
    pub fn attach_inflight(&mut self, area: GuestArea, recover: bool) -> Result<usize, QueueError> {
        let used_idx = self.used.load_u16(SplitLayout::IDX);
        let used = &self.used;
        let layout = self.layout;
        let head_of = |i: u16| used.load_u32(layout.used_entry(i));
        let (tracker, attached) = InflightSplit::attach(area, layout.size, used_idx, head_of, recover)?;
        self.inflight = Some(tracker);
        let Attached::Recovered { resubmit } = attached else { return Ok(0) };
        let n = resubmit.len();
        self.set_next_avail(used_idx.wrapping_add(n as u16));
        self.resubmit = resubmit.into();
        Ok(n)
    }

    /// The next head to pop: a resubmitted one, or the next avail entry (`refresh`: re-read
    /// `avail.idx` when every entry seen so far was popped).
    fn next_head(&mut self, refresh: bool) -> Result<Option<u16>, QueueError> {
        if let Some(head) = self.resubmit.pop_front() {
            return Ok(Some(head));
        }
        if self.shadow_avail == self.next_avail && (!refresh || self.refresh_avail()? == self.next_avail) {
            return Ok(None);
        }
        let head = self.avail.load_u16(self.layout.avail_entry(self.next_avail));
        if head >= self.layout.size {
            return Err(self.fail(QueueError::HeadOutOfRange { head, size: self.layout.size }));
        }
        if self.in_flight[head as usize] {
            return Err(self.fail(QueueError::HeadInFlight { head }));
        }
        self.next_avail = self.next_avail.wrapping_add(1);
        if let Some(t) = &mut self.inflight {
            t.mark(head);
        }
        Ok(Some(head))
    }

    /// Pop the next available chain into `chain`.
    pub fn pop(&mut self, chain: &mut Chain) -> Result<Popped, QueueError> {
        self.pop_from(chain, true)
    }

    /// [`pop`](Self::pop), but only among the entries the last read of `avail.idx` showed:
    /// [`Popped::Empty`] once those are popped, even if the driver has made more available
    /// since. A batch that starts with [`pop`](Self::pop) and goes on with this ends at that
    /// snapshot, so its requests can be completed and published while the driver is still
    /// adding entries one by one (libblkio and Linux store `avail.idx` per request).
    pub fn pop_seen(&mut self, chain: &mut Chain) -> Result<Popped, QueueError> {
        self.pop_from(chain, false)
    }

    fn pop_from(&mut self, chain: &mut Chain, refresh: bool) -> Result<Popped, QueueError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let Some(head) = self.next_head(refresh)? else { return Ok(Popped::Empty) };
        self.in_flight[head as usize] = true;
        self.num_in_flight += 1;
        chain.reset(head, &self.mem);
        match self.walk(head, chain) {
            Ok(()) => Ok(Popped::Chain),
            Err(error) => {
                chain.release();
                Ok(Popped::Refused { head, error, status: self.locate_status(head) })
            }
        }
    }

    fn read_desc(&self, i: u16) -> Descriptor {
        let mut b = [0u8; DESC_SIZE];
        self.desc.read(self.layout.desc(i), &mut b);
        Descriptor::from_bytes(&b)
    }

    /// Walk the chain at `head` into `chain`: its structure (§2.7.5, §2.7.5.3) and every
    /// buffer in it.
    fn walk(&self, head: u16, chain: &mut Chain) -> Result<(), ChainError> {
        self.for_each_desc(head, |d| chain.push_buffer(&self.mem, d.addr, d.len, d.is_write_only()))
    }

    /// Visit the descriptors of the chain at `head` in order, checking its structure:
    /// links inside the ring (or table), no loop, the indirect rules (§2.7.5.3.1). `f`
    /// sees each data descriptor (never an indirect one) and may refuse it.
    fn for_each_desc(
        &self,
        head: u16,
        mut f: impl FnMut(&Descriptor) -> Result<(), ChainError>,
    ) -> Result<(), ChainError> {
        let size = self.layout.size;
        let first = self.read_desc(head);
        if first.is_indirect() {
            if !self.features.indirect {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if first.has_next() {
                return Err(ChainError::IndirectWithNext);
            }
            return self.for_each_indirect(first, f);
        }
        let mut d = first;
        let mut count: u32 = 1;
        loop {
            if d.is_indirect() {
                return Err(ChainError::IndirectNotFirst);
            }
            f(&d)?;
            if !d.has_next() {
                return Ok(());
            }
            if d.next >= size {
                return Err(ChainError::NextOutOfRange { next: d.next, limit: size as u32 });
            }
            count += 1;
            // A chain visits each descriptor at most once; more means a loop.
            if count > size as u32 {
                return Err(ChainError::TooLong { limit: size as u32 });
            }
            d = self.read_desc(d.next);
        }
    }

    /// The entries of an indirect table (checked by [`IndirectTable`]), linked by `next`,
    /// no nested tables.
    fn for_each_indirect(
        &self,
        table: Descriptor,
        mut f: impl FnMut(&Descriptor) -> Result<(), ChainError>,
    ) -> Result<(), ChainError> {
        let table = IndirectTable::new(&self.mem, table.addr, table.len, self.layout.size)?;
        let entries = table.entries;
        let mut i = 0u32;
        for _ in 0..entries {
            let d = Descriptor::from_bytes(&table.entry(i)?);
            if d.is_indirect() {
                return Err(ChainError::NestedIndirect);
            }
            f(&d)?;
            if !d.has_next() {
                return Ok(());
            }
            if d.next as u32 >= entries {
                return Err(ChainError::NextOutOfRange { next: d.next, limit: entries });
            }
            i = d.next as u32;
        }
        Err(ChainError::TooLong { limit: entries })
    }

    /// Where the chain at `head`, refused by [`walk`](Self::walk), can still be answered:
    /// its status byte, the last byte of its last descriptor (§5.2.6), if that descriptor
    /// is device-writable and the byte lies in guest memory. Nothing else that failed is
    /// trusted: the chain's structure (links, loops, indirect table) must be sound.
    /// `None`: the chain has nowhere to put a status, and the caller must break the queue
    /// rather than return it silently (a Linux guest takes a stale status byte for OK).
    fn locate_status(&self, head: u16) -> Option<StatusByte> {
        let mut search = StatusSearch::default();
        self.for_each_desc(head, |d| {
            search.visit(d.addr, d.len, d.is_write_only());
            Ok(())
        })
        .ok()?;
        search.found(&self.mem)
    }

    /// Put `head` in the used ring with `len` bytes written. Not visible to the driver
    /// until [`publish_used`](Self::publish_used).
    ///
    /// `head` must come from [`pop`](Self::pop) and not have been completed yet; anything
    /// else is ignored (and reported), so a vblk bug cannot corrupt the ring.
    #[inline(always)]
    pub fn add_used(&mut self, head: u16, len: u32) -> bool {
        match self.in_flight.get_mut(head as usize) {
            Some(f) if *f => *f = false,
            _ => return false,
        }
        self.num_in_flight -= 1;
        let off = self.layout.used_entry(self.next_used);
        self.used.store_u32(off, head as u32);
        self.used.store_u32(off + 4, len);
        self.next_used = self.next_used.wrapping_add(1);
        if let Some(t) = &mut self.inflight {
            t.completed(head);
        }
        true
    }

    /// Make all added used entries visible and decide whether the driver wants to be
    /// notified (§2.7.7.2 / §2.7.10). Returns `true` if the caller must signal it.
    pub fn publish_used(&mut self) -> bool {
        if self.next_used == self.published_used {
            return false;
        }
        // Used entries before the index (§2.7.8 step 5 pairs with the driver's read barrier).
        fence(Ordering::Release);
        self.used.store_u16(SplitLayout::IDX, self.next_used);
        self.published_used = self.next_used;
        if let Some(t) = &mut self.inflight {
            t.published(self.next_used);
        }
        // The index store must be visible before we read the driver's suppression state,
        // or we could miss a notification the driver now waits for.
        fence(Ordering::SeqCst);
        if self.features.event_idx {
            let event = self.avail.load_u16(self.layout.used_event());
            let new = self.next_used;
            match self.signalled_used.replace(new) {
                None => true,
                Some(old) => need_event(event, new, old),
            }
        } else {
            self.avail.load_u16(SplitLayout::FLAGS) & AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Ask the driver to kick us for anything after what we have popped, then check for
    /// work that arrived meanwhile. Returns `true` if there is more to pop: the caller must
    /// process it instead of sleeping.
    pub fn enable_notification(&mut self) -> Result<bool, QueueError> {
        if self.features.event_idx {
            self.used.store_u16(self.layout.avail_event(), self.next_avail);
        } else {
            self.used.store_u16(SplitLayout::FLAGS, 0);
        }
        fence(Ordering::SeqCst);
        self.has_available()
    }

    /// Tell the driver kicks are not needed (we are polling the ring).
    pub fn disable_notification(&mut self) {
        if !self.features.event_idx {
            self.used.store_u16(SplitLayout::FLAGS, crate::layout::USED_F_NO_NOTIFY);
        }
        // With EVENT_IDX, simply not advancing avail_event suppresses kicks.
    }
}

#[cfg(test)]
#[path = "split_tests.rs"]
mod tests;
