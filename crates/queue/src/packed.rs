//! The packed virtqueue, device side (virtio 1.2 §2.8): one descriptor ring that the
//! driver and the device both write, told apart by the AVAIL/USED flag bits and a wrap
//! counter on each side, written against a hostile driver like [`crate::split`].
//!
//! - [`PackedQueue::pop`] checks the slot at the device's avail position (§2.8.1: available
//!   when `AVAIL` equals the avail wrap counter and `USED` does not), **copies** the chain's
//!   descriptors out of the ring (used descriptors will overwrite those slots, §2.8.5), then
//!   validates them once into a [`Chain`], like the split ring. The chain's buffer id (from
//!   its last descriptor, §2.8.6) plays the part of the split ring's head.
//! - [`PackedQueue::add_used`] writes one used descriptor per chain at the used position,
//!   in completion order, and skips as many slots as the chain took (§2.8.7); the flags of
//!   the batch's first used descriptor are written last, in
//!   [`PackedQueue::publish_used`], so the driver sees the batch at once.
//! - Event suppression (§2.8.10): the driver's structure says whether we notify after a
//!   publish (ENABLE / DISABLE / DESC with EVENT_IDX); ours says whether it kicks.
//!
//! Failures are split in two as for the split ring. A bad *chain* (a buffer outside
//! memory, a bad indirect table, …) is refused with its status byte located when the
//! chain's structure allows. A bad *ring* breaks the queue: a buffer id out of range or
//! already in flight, a chain with no end inside the ring, a chain's later slot not made
//! available with it, more slots in flight than the ring has.

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use vblk_virtio::{GuestArea, GuestMemory};

use crate::chain::{Chain, StatusByte, StatusSearch};
use crate::inflight_packed::{AttachedPacked, InflightPacked, ResubmitChain};
use crate::layout::{packed_avail_flags, packed_is_avail, packed_need_event, packed_used_flags};
use crate::layout::{PackedDescriptor, RingPos, DESC_SIZE, MAX_PACKED_SIZE};
use crate::layout::{EVENT_FLAGS, EVENT_FLAG_DESC, EVENT_FLAG_DISABLE, EVENT_FLAG_ENABLE, EVENT_OFF_WRAP};
use crate::layout::{PACKED_DESC_ALIGN, PACKED_EVENT_ALIGN, PACKED_EVENT_LEN};
use crate::split::{AddrSpace, IndirectTable, Popped, RingAddrs, RingFeatures};
use crate::{ChainError, QueueError};

/// The device's two positions in a packed ring, as vhost-user carries them in
/// `SET_VRING_BASE` / `GET_VRING_BASE` (QEMU's `virtio_queue_packed_get_last_avail_idx`):
/// bits 0-14 the avail index, 15 its wrap counter, 16-30 the used index, 31 its wrap
/// counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedBase {
    pub avail: RingPos,
    pub used: RingPos,
}

impl PackedBase {
    /// A fresh ring: both sides at slot 0 with wrap counter 1.
    pub const START: PackedBase = PackedBase { avail: RingPos::START, used: RingPos::START };

    pub fn encode(self) -> u32 {
        self.avail.encode() as u32 | (self.used.encode() as u32) << 16
    }

    /// `None` if an index is outside a ring of `size`.
    pub fn decode(v: u32, size: u16) -> Option<PackedBase> {
        Some(PackedBase { avail: RingPos::decode(v as u16, size)?, used: RingPos::decode((v >> 16) as u16, size)? })
    }
}

/// Device side of a packed virtqueue.
pub struct PackedQueue {
    size: u16,
    features: RingFeatures,
    mem: Arc<GuestMemory>,
    /// The descriptor ring (`SET_VRING_ADDR` desc).
    ring: GuestArea,
    /// The driver's event suppression structure (`SET_VRING_ADDR` avail: the driver area).
    driver_event: GuestArea,
    /// Ours (`SET_VRING_ADDR` used: the device area).
    device_event: GuestArea,
    /// Next slot to look at for an available chain.
    next_avail: RingPos,
    /// Next slot to write a used descriptor into.
    next_used: RingPos,
    /// The used position the driver can see (up to the last publish).
    published_used: RingPos,
    /// The first unpublished used descriptor: its slot and the flags to store at publish.
    first_unpublished: Option<(u16, u16)>,
    /// Whether we ever checked the driver's event suppression (the first publish always
    /// notifies with DESC, like Linux vhost's `signalled_used_valid`).
    signalled: bool,
    /// Slots each buffer id in flight occupies (0: not in flight).
    in_flight: Vec<u16>,
    num_in_flight: u16,
    /// Ring slots taken by chains in flight: never more than the ring size.
    slots_in_flight: u32,
    broken: Option<QueueError>,
    /// The descriptors of the chain being popped, copied out of the ring.
    scratch: Vec<PackedDescriptor>,
    /// Inflight tracking shared with the frontend (`crate::inflight_packed`), when
    /// negotiated, and the region entry of each buffer id in flight.
    inflight: Option<InflightPacked>,
    entries: Vec<u16>,
    /// Chains a previous backend process left in flight, popped before the ring.
    resubmit: VecDeque<ResubmitChain>,
}

impl PackedQueue {
    /// Set up a queue of `size` entries (any size in `1..=32768`, §2.8) whose descriptor
    /// ring and event suppression structures are at `addrs` (`desc`, `avail` = driver
    /// area, `used` = device area), starting at `base`.
    pub fn new(
        mem: Arc<GuestMemory>,
        size: u32,
        addrs: RingAddrs,
        space: AddrSpace,
        features: RingFeatures,
    ) -> Result<Self, QueueError> {
        if size == 0 || size > MAX_PACKED_SIZE as u32 {
            return Err(QueueError::InvalidPackedSize(size));
        }
        let area = |addr, len, align| space.area(&mem, addr, len, align);
        let ring = area(addrs.desc, DESC_SIZE as u64 * size as u64, PACKED_DESC_ALIGN)?;
        let driver_event = area(addrs.avail, PACKED_EVENT_LEN, PACKED_EVENT_ALIGN)?;
        let device_event = area(addrs.used, PACKED_EVENT_LEN, PACKED_EVENT_ALIGN)?;
        Ok(PackedQueue {
            size: size as u16,
            features,
            mem,
            ring,
            driver_event,
            device_event,
            next_avail: RingPos::START,
            next_used: RingPos::START,
            published_used: RingPos::START,
            first_unpublished: None,
            signalled: false,
            in_flight: vec![0; size as usize],
            num_in_flight: 0,
            slots_in_flight: 0,
            broken: None,
            scratch: Vec::new(),
            inflight: None,
            entries: vec![0; size as usize],
            resubmit: VecDeque::new(),
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn features(&self) -> RingFeatures {
        self.features
    }

    /// Where the device is (`GET_VRING_BASE`).
    pub fn base(&self) -> PackedBase {
        PackedBase { avail: self.next_avail, used: self.next_used }
    }

    /// Start at `base` (`SET_VRING_BASE`). Only before anything was popped.
    pub fn set_base(&mut self, base: PackedBase) {
        debug_assert_eq!(self.num_in_flight, 0);
        self.next_avail = base.avail;
        self.next_used = base.used;
        self.published_used = base.used;
    }

    /// Requests popped and not yet completed. Never more than the queue size.
    pub fn num_in_flight(&self) -> u16 {
        self.num_in_flight
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    pub fn broken(&self) -> Option<&QueueError> {
        self.broken.as_ref()
    }

    /// Stop the queue for `e`; returns `e` for the caller to report.
    pub fn break_ring(&mut self, e: QueueError) -> QueueError {
        self.broken = Some(e.clone());
        e
    }

    fn slot(&self, pos: RingPos) -> PackedDescriptor {
        let mut b = [0u8; DESC_SIZE];
        self.ring.read(pos.idx as usize * DESC_SIZE, &mut b);
        PackedDescriptor::from_bytes(&b)
    }

    fn slot_flags(&self, pos: RingPos) -> u16 {
        self.ring.load_u16(pos.idx as usize * DESC_SIZE + PackedDescriptor::FLAGS)
    }

    /// Is the slot at our avail position available? (Reads its flags.)
    pub fn has_available(&mut self) -> Result<bool, QueueError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        Ok(!self.resubmit.is_empty() || packed_is_avail(self.slot_flags(self.next_avail), self.next_avail.wrap))
    }

    /// Copy the next available chain's slots into `scratch` and move past them. `false`:
    /// nothing available.
    fn fetch(&mut self) -> Result<bool, QueueError> {
        if !packed_is_avail(self.slot_flags(self.next_avail), self.next_avail.wrap) {
            return Ok(false);
        }
        // The slot's contents only after its flags (pairs with the driver's write barrier
        // before it stores the head's flags, §2.8.21).
        fence(Ordering::Acquire);
        self.scratch.clear();
        let mut pos = self.next_avail;
        loop {
            let d = self.slot(pos);
            // Every slot of a chain is made available before its head (§2.8.21.1): a later
            // slot that is not available means a driver we cannot follow.
            if !self.scratch.is_empty() && !packed_is_avail(d.flags, pos.wrap) {
                return Err(self.break_ring(QueueError::PackedChainNotAvailable { slot: pos.idx }));
            }
            self.scratch.push(d);
            pos = pos.next(self.size);
            if !d.has_next() {
                break;
            }
            if self.scratch.len() >= self.size as usize {
                return Err(self.break_ring(QueueError::PackedChainTooLong { size: self.size }));
            }
        }
        let slots = self.scratch.len() as u32;
        if self.slots_in_flight + slots > self.size as u32 {
            return Err(self.break_ring(QueueError::PackedOverrun {
                in_flight: self.slots_in_flight,
                slots,
                size: self.size,
            }));
        }
        self.next_avail = pos;
        Ok(true)
    }

    /// Pop the next available chain into `chain`.
    pub fn pop(&mut self, chain: &mut Chain) -> Result<Popped, QueueError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let resubmitted = self.resubmit.pop_front();
        if let Some(chain) = &resubmitted {
            self.scratch.clone_from(&chain.descs);
        } else if !self.fetch()? {
            return Ok(Popped::Empty);
        }
        // The buffer id is in the chain's last descriptor (§2.8.6).
        let id = self.scratch.last().map_or(0, |d| d.id);
        if id >= self.size {
            return Err(self.break_ring(QueueError::IdOutOfRange { id, size: self.size }));
        }
        if self.in_flight[id as usize] != 0 {
            return Err(self.break_ring(QueueError::IdInFlight { id }));
        }
        let slots = self.scratch.len() as u16;
        if let Some(t) = &mut self.inflight {
            // Every popped chain is recorded, refused ones too: recovery resumes popping
            // after the used position plus the recorded chains' slots.
            self.entries[id as usize] = match &resubmitted {
                Some(chain) => chain.entry,
                None => t.mark(&self.scratch),
            };
        }
        self.in_flight[id as usize] = slots;
        self.num_in_flight += 1;
        self.slots_in_flight += slots as u32;
        chain.reset(id, &self.mem);
        match self.for_each_desc(|d| chain.push_buffer(&self.mem, d.addr, d.len, d.is_write_only())) {
            Ok(()) => Ok(Popped::Chain),
            Err(error) => {
                chain.release();
                Ok(Popped::Refused { head: id, error, status: self.locate_status() })
            }
        }
    }

    /// Visit the data descriptors of the chain in `scratch`: its slots, or the entries of
    /// the indirect table it consists of (§2.8.7: an indirect descriptor is alone in its
    /// chain; the table's entries are consecutive, only their WRITE flag counts, and a
    /// nested table is refused).
    fn for_each_desc(&self, mut f: impl FnMut(&PackedDescriptor) -> Result<(), ChainError>) -> Result<(), ChainError> {
        let descs = &self.scratch;
        let Some(first) = descs.first() else { return Ok(()) };
        if first.is_indirect() {
            if !self.features.indirect {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if descs.len() > 1 {
                return Err(ChainError::IndirectWithNext);
            }
            return self.for_each_indirect(first, f);
        }
        for d in descs {
            if d.is_indirect() {
                return Err(ChainError::IndirectNotFirst);
            }
            f(d)?;
        }
        Ok(())
    }

    fn for_each_indirect(
        &self,
        table: &PackedDescriptor,
        mut f: impl FnMut(&PackedDescriptor) -> Result<(), ChainError>,
    ) -> Result<(), ChainError> {
        let table = IndirectTable::new(&self.mem, table.addr, table.len, self.size)?;
        for i in 0..table.entries {
            let d = PackedDescriptor::from_bytes(&table.entry(i)?);
            if d.is_indirect() {
                return Err(ChainError::NestedIndirect);
            }
            f(&d)?;
        }
        Ok(())
    }

    /// The status byte of the refused chain in `scratch`: the last byte of its last data
    /// descriptor, if device-writable and in guest memory (see
    /// [`crate::split`]'s `locate_status`).
    fn locate_status(&self) -> Option<StatusByte> {
        let mut search = StatusSearch::default();
        self.for_each_desc(|d| {
            search.visit(d.addr, d.len, d.is_write_only());
            Ok(())
        })
        .ok()?;
        search.found(&self.mem)
    }

    /// Return buffer `id` with `len` bytes written: a used descriptor at the used position
    /// (§2.8.7), not visible to the driver until [`publish_used`](Self::publish_used).
    ///
    /// `id` must come from [`pop`](Self::pop) and not have been completed yet; anything
    /// else is ignored (and reported), so a vblk bug cannot corrupt the ring.
    #[inline(always)]
    pub fn add_used(&mut self, id: u16, len: u32) -> bool {
        let slots = match self.in_flight.get_mut(id as usize) {
            Some(s) if *s != 0 => std::mem::take(s),
            _ => return false,
        };
        self.num_in_flight -= 1;
        self.slots_in_flight -= slots as u32;
        let off = self.next_used.idx as usize * DESC_SIZE;
        self.ring.store_u16(off + PackedDescriptor::ID, id);
        self.ring.store_u32(off + PackedDescriptor::LEN, len);
        let flags = packed_used_flags(self.next_used.wrap);
        if self.first_unpublished.is_none() {
            self.first_unpublished = Some((self.next_used.idx, flags));
        } else {
            // Its id and len before its flags; the driver reads it only after the batch's
            // first flags anyway.
            fence(Ordering::Release);
            self.ring.store_u16(off + PackedDescriptor::FLAGS, flags);
        }
        self.next_used = self.next_used.advance(slots, self.size);
        if let Some(t) = &mut self.inflight {
            t.completed(self.entries[id as usize]);
        }
        true
    }

    /// Make the added used descriptors visible (the batch's first flags, §2.8.21.3) and
    /// decide whether the driver wants a notification (§2.8.10). `true`: signal it.
    pub fn publish_used(&mut self) -> bool {
        let Some((slot, flags)) = self.first_unpublished.take() else { return false };
        if let Some(t) = &mut self.inflight {
            t.publishing(self.next_used);
        }
        fence(Ordering::Release);
        self.ring.store_u16(slot as usize * DESC_SIZE + PackedDescriptor::FLAGS, flags);
        if let Some(t) = &mut self.inflight {
            t.published();
        }
        let moved = self.next_used.distance_from(self.published_used, self.size);
        self.published_used = self.next_used;
        // The flags store before reading the driver's suppression state, or we could miss
        // a notification it now waits for.
        fence(Ordering::SeqCst);
        match self.driver_event.load_u16(EVENT_FLAGS) {
            EVENT_FLAG_DISABLE => false,
            EVENT_FLAG_DESC if self.features.event_idx => {
                let off_wrap = self.driver_event.load_u16(EVENT_OFF_WRAP);
                !std::mem::replace(&mut self.signalled, true)
                    || packed_need_event(off_wrap, self.next_used, moved, self.size)
            }
            // ENABLE, and anything else a driver may write (DESC without EVENT_IDX, the
            // reserved value 3): notify rather than risk a driver waiting forever.
            _ => true,
        }
    }

    /// Ask the driver to kick for anything after what we popped, then check for work that
    /// arrived meanwhile. `true`: more to pop, do not sleep.
    pub fn enable_notification(&mut self) -> Result<bool, QueueError> {
        if self.features.event_idx {
            self.device_event.store_u16(EVENT_OFF_WRAP, self.next_avail.encode());
            fence(Ordering::Release);
            self.device_event.store_u16(EVENT_FLAGS, EVENT_FLAG_DESC);
        } else {
            self.device_event.store_u16(EVENT_FLAGS, EVENT_FLAG_ENABLE);
        }
        fence(Ordering::SeqCst);
        self.has_available()
    }

    /// Tell the driver kicks are not needed (we are polling the ring).
    pub fn disable_notification(&mut self) {
        self.device_event.store_u16(EVENT_FLAGS, EVENT_FLAG_DISABLE);
    }

    /// Track this queue's requests in the frontend's inflight region `area` (see
    /// [`crate::inflight_packed`]). With `recover`, a region left by a previous process is
    /// recovered: the used position is the region's (QEMU's vring base for a packed ring
    /// may be stale after a backend died), its chains in flight are popped again first
    /// from the region's copies of their descriptors, and the ring resumes after their
    /// slots. Returns how many chains will be resubmitted.
    pub fn attach_inflight(&mut self, area: GuestArea, recover: bool) -> Result<usize, QueueError> {
        let ring = &self.ring;
        let flags = |i: u16| ring.load_u16(i as usize * DESC_SIZE + PackedDescriptor::FLAGS);
        let (tracker, attached) = InflightPacked::attach(area, self.size, self.next_used, flags, recover)?;
        self.inflight = Some(tracker);
        let AttachedPacked::Recovered { used, resubmit } = attached else { return Ok(0) };
        let slots: u32 = resubmit.iter().map(|c| c.descs.len() as u32).sum();
        let avail = used.advance(slots as u16, self.size);
        // Rule 4 of the recovery: the dead process may have stored used flags for a batch
        // it never published in the slots of chains still in flight; give them back the
        // flags they were offered with, or the guest would take them for used.
        let mut pos = used;
        for _ in 0..slots {
            self.ring.store_u16(pos.idx as usize * DESC_SIZE + PackedDescriptor::FLAGS, packed_avail_flags(pos.wrap));
            pos = pos.advance(1, self.size);
        }
        self.next_avail = avail;
        self.next_used = used;
        self.published_used = used;
        let n = resubmit.len();
        self.resubmit = resubmit.into();
        Ok(n)
    }
}

#[cfg(test)]
#[path = "packed_tests.rs"]
mod tests;
