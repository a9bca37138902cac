//! The packed virtqueue, driver side (virtio 1.2 §2.8): what Linux's `virtio_ring.c` does
//! with `VIRTIO_F_RING_PACKED` — the same job as [`crate::driver`] on one descriptor ring
//! that both sides write.
//!
//! - A request takes a free **buffer id** (`< size`, from a free list) and as many
//!   consecutive ring slots as it has buffers (or one slot for an indirect table, §2.8.7),
//!   starting at the driver's avail position. Every slot carries the id (Linux does; the
//!   device reads it from the chain's last slot, §2.8.6), every slot but the last has NEXT,
//!   and a slot is made available with `AVAIL = wrap, USED = !wrap` for the wrap counter of
//!   its lap (§2.8.1), so a chain crossing the end of the ring changes flags half-way.
//! - The head slot's flags are stored last, after a release fence (§2.8.21.1): until then
//!   the device sees nothing of the chain, so it never reads half of one. A chain is thus
//!   visible as soon as [`PackedDriverQueue::add`] returns; [`PackedDriverQueue::publish`]
//!   has nothing left to do and exists for the API shared with the split ring.
//! - The device writes one used descriptor per buffer at its used position and moves on
//!   by the number of slots that buffer took (§2.8.7). [`PackedDriverQueue::pop_used`]
//!   reads the slot at the driver's used position: used when `AVAIL == USED == used wrap
//!   counter`; its flags are read before its id and length (acquire). The device is not
//!   trusted: an id that is not in flight is an error, and how far to move comes from the
//!   driver's own record of the buffer, never from the ring.
//! - Notifications (§2.8.10): the device's event suppression structure says whether to
//!   kick ([`PackedDriverQueue::needs_kick`]: ENABLE / DISABLE / DESC with EVENT_IDX), ours
//!   says when to interrupt ([`PackedDriverQueue::enable_interrupts_after`]).
//!
//! Sizes need not be powers of two (`1..=32768`, §2.8).

use std::sync::atomic::{fence, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;

use vblk_virtio::{GuestArea, GuestMemory};

use crate::driver::{Buffer, DriverError};
use crate::layout::{packed_avail_flags, packed_is_used, packed_need_event, PackedDescriptor, RingPos};
use crate::layout::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE, MAX_PACKED_SIZE};
use crate::layout::{EVENT_FLAGS, EVENT_FLAG_DESC, EVENT_FLAG_DISABLE, EVENT_FLAG_ENABLE, EVENT_OFF_WRAP};
use crate::layout::{PACKED_DESC_ALIGN, PACKED_EVENT_ALIGN, PACKED_EVENT_LEN};
use crate::split::{RingAddrs, RingFeatures};
use crate::QueueError;

/// No next free id (the free list is empty).
const NO_ID: u16 = u16::MAX;

/// How often [`PackedRingWatch::device_used`] retries while the queue's owner keeps
/// reaping under it.
const WATCH_RETRIES: u32 = 10_000;

/// What the queue's owner shares with a [`PackedRingWatch`] on another thread.
struct Shared {
    /// Slots each buffer id in flight occupies (0: not in flight). Only the owner writes.
    slots: Box<[AtomicU16]>,
    /// The owner's used position ([`RingPos::encode`]) in bits 0-15 and the number of
    /// buffers it reaped so far above them: a reader that sees the same value before and
    /// after reading `slots` and the ring saw a consistent state (a seqlock).
    used: AtomicU64,
}

/// Driver side of a packed virtqueue whose ring and event suppression structures live in
/// `mem` (guest-physical addresses).
pub struct PackedDriverQueue {
    size: u16,
    features: RingFeatures,
    mem: Arc<GuestMemory>,
    /// The descriptor ring.
    ring: GuestArea,
    /// Our event suppression structure (the driver area, `RingAddrs::avail`).
    driver_event: GuestArea,
    /// The device's (the device area, `RingAddrs::used`).
    device_event: GuestArea,
    /// Free ring slots.
    num_free: u16,
    /// Free buffer ids, linked through `id_next` (`NO_ID` ends the list).
    free_id: u16,
    id_next: Vec<u16>,
    in_flight: u16,
    shared: Arc<Shared>,
    /// Where the next chain goes.
    next_avail: RingPos,
    /// Slots made available since the last kick decision (saturating).
    moved: u32,
    /// Where the next used descriptor is expected.
    next_used: RingPos,
    /// Buffers reaped so far (for `Shared::used`).
    reaped: u64,
    /// The flags last stored in our event suppression structure.
    event_flags: u16,
    /// Reused buffer for building indirect tables (no allocation per request).
    table_scratch: Vec<u8>,
}

impl PackedDriverQueue {
    /// Lay out a fresh packed ring of `size` slots (`1..=32768`) at `addrs`: `desc` = the
    /// descriptor ring, `avail` = the driver event suppression area, `used` = the device
    /// event suppression area (zeroing all three: no slot available, notifications on).
    pub fn new(
        mem: Arc<GuestMemory>,
        size: u32,
        addrs: RingAddrs,
        features: RingFeatures,
    ) -> Result<Self, DriverError> {
        if size == 0 || size > MAX_PACKED_SIZE as u32 {
            return Err(DriverError::InvalidPackedSize(size));
        }
        let ring =
            mem.area_at_gpa(addrs.desc, DESC_SIZE as u64 * size as u64, PACKED_DESC_ALIGN).map_err(QueueError::from)?;
        let driver_event =
            mem.area_at_gpa(addrs.avail, PACKED_EVENT_LEN, PACKED_EVENT_ALIGN).map_err(QueueError::from)?;
        let device_event =
            mem.area_at_gpa(addrs.used, PACKED_EVENT_LEN, PACKED_EVENT_ALIGN).map_err(QueueError::from)?;
        for area in [&ring, &driver_event, &device_event] {
            area.write(0, &vec![0u8; area.len()]);
        }
        let n = size as u16;
        let shared = Shared {
            slots: (0..n).map(|_| AtomicU16::new(0)).collect(),
            used: AtomicU64::new(RingPos::START.encode() as u64),
        };
        Ok(PackedDriverQueue {
            size: n,
            features,
            mem,
            ring,
            driver_event,
            device_event,
            num_free: n,
            free_id: 0,
            id_next: (1..=n).map(|i| if i == n { NO_ID } else { i }).collect(),
            in_flight: 0,
            shared: Arc::new(shared),
            next_avail: RingPos::START,
            moved: 0,
            next_used: RingPos::START,
            reaped: 0,
            event_flags: EVENT_FLAG_ENABLE,
            table_scratch: Vec::new(),
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Free ring slots.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// The buffer id the next [`add`](Self::add) or [`add_indirect`](Self::add_indirect)
    /// will use (meaningful while `num_free() > 0`).
    pub fn next_free(&self) -> u16 {
        self.free_id
    }

    /// Buffers made available and not yet reaped.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// Where the next chain goes (slot and wrap counter).
    pub fn avail_pos(&self) -> RingPos {
        self.next_avail
    }

    /// Where the driver expects the next used descriptor.
    pub fn used_pos(&self) -> RingPos {
        self.next_used
    }

    fn slot_off(pos: RingPos) -> usize {
        pos.idx as usize * DESC_SIZE
    }

    /// Take a buffer id for a chain of `slots` slots (the caller checked there is room:
    /// a free slot implies a free id, since every id in flight holds at least one slot).
    fn alloc_id(&mut self, slots: u16) -> u16 {
        let id = self.free_id;
        debug_assert!(id != NO_ID);
        self.free_id = self.id_next[id as usize];
        // Release: a watch that sees this count also sees the reap that freed the id.
        self.shared.slots[id as usize].store(slots, Ordering::Release);
        self.num_free -= slots;
        self.in_flight += 1;
        self.moved = self.moved.saturating_add(slots as u32);
        id
    }

    /// Make the head slot at `head` available with `flags`: everything else of the chain
    /// first (§2.8.21.1).
    fn expose_head(&self, head: RingPos, flags: u16) {
        fence(Ordering::Release);
        self.ring.store_u16(Self::slot_off(head) + PackedDescriptor::FLAGS, flags);
    }

    /// Put a request's buffers in consecutive ring slots and make them available (the
    /// head slot's flags last). Returns the buffer id.
    pub fn add(&mut self, bufs: &[Buffer]) -> Result<u16, DriverError> {
        if bufs.is_empty() {
            return Err(DriverError::Empty);
        }
        let needed = u16::try_from(bufs.len()).unwrap_or(u16::MAX);
        if bufs.len() > self.num_free as usize {
            return Err(DriverError::Full { free: self.num_free, needed });
        }
        let id = self.alloc_id(needed);
        let head = self.next_avail;
        let mut head_flags = 0;
        let mut pos = head;
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags = packed_avail_flags(pos.wrap)
                | if b.write { DESC_F_WRITE } else { 0 }
                | if last { 0 } else { DESC_F_NEXT };
            let bytes = PackedDescriptor { addr: b.addr, len: b.len, id, flags }.to_bytes();
            if i == 0 {
                // Everything but the flags, which make the chain visible.
                self.ring.write(Self::slot_off(pos), &bytes[..PackedDescriptor::FLAGS]);
                head_flags = flags;
            } else {
                self.ring.write(Self::slot_off(pos), &bytes);
            }
            pos = pos.advance(1, self.size);
        }
        self.expose_head(head, head_flags);
        self.next_avail = pos;
        Ok(id)
    }

    /// Put a request's buffers in an indirect table at `table` (guest-physical, room for
    /// `16 * bufs.len()` bytes: consecutive descriptors, only WRITE meaningful, §2.8.7) and
    /// make one slot pointing at it available. Returns the buffer id.
    pub fn add_indirect(&mut self, bufs: &[Buffer], table: u64) -> Result<u16, DriverError> {
        if bufs.is_empty() {
            return Err(DriverError::Empty);
        }
        if self.num_free == 0 {
            return Err(DriverError::Full { free: 0, needed: 1 });
        }
        let mut bytes = std::mem::take(&mut self.table_scratch);
        bytes.clear();
        for b in bufs {
            let flags = if b.write { DESC_F_WRITE } else { 0 };
            bytes.extend_from_slice(&PackedDescriptor { addr: b.addr, len: b.len, id: 0, flags }.to_bytes());
        }
        let written = self.mem.write_at(table, &bytes);
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        self.table_scratch = bytes;
        written?;
        let id = self.alloc_id(1);
        let head = self.next_avail;
        let flags = packed_avail_flags(head.wrap) | DESC_F_INDIRECT;
        let slot = PackedDescriptor { addr: table, len, id, flags }.to_bytes();
        self.ring.write(Self::slot_off(head), &slot[..PackedDescriptor::FLAGS]);
        self.expose_head(head, flags);
        self.next_avail = head.advance(1, self.size);
        Ok(id)
    }

    /// Nothing to do: [`add`](Self::add) already made each chain visible. Kept so the
    /// packed and the split ring are driven the same way (add, publish, needs_kick).
    pub fn publish(&mut self) {}

    /// Does the device want a kick for what was made available since the last call?
    /// (§2.8.10: the device event suppression structure, read as one 32-bit snapshot like
    /// Linux's `virtqueue_kick_prepare_packed`.)
    pub fn needs_kick(&mut self) -> bool {
        // Our slots before the device's suppression state (pairs with the device's fence
        // between enabling notifications and re-checking the ring).
        fence(Ordering::SeqCst);
        let moved = std::mem::take(&mut self.moved);
        if moved == 0 {
            return false;
        }
        let snapshot = self.device_event.load_u32(EVENT_OFF_WRAP);
        let off_wrap = snapshot as u16;
        let flags = (snapshot >> (8 * EVENT_FLAGS)) as u16;
        match flags {
            EVENT_FLAG_DISABLE => false,
            EVENT_FLAG_DESC if self.features.event_idx => {
                packed_need_event(off_wrap, self.next_avail, moved, self.size)
            }
            // ENABLE, or a value we did not negotiate: kick rather than risk a stall.
            _ => true,
        }
    }

    /// Take one completed request: `(buffer id, bytes written by the device)`.
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>, DriverError> {
        let off = Self::slot_off(self.next_used);
        let flags = self.ring.load_u16(off + PackedDescriptor::FLAGS);
        if !packed_is_used(flags, self.next_used.wrap) {
            return Ok(None);
        }
        // The descriptor's id and length only after its flags (pairs with the device's
        // release before it stores them).
        fence(Ordering::Acquire);
        let id = self.ring.load_u16(off + PackedDescriptor::ID);
        let len = self.ring.load_u32(off + PackedDescriptor::LEN);
        let slots = match self.shared.slots.get(id as usize) {
            Some(s) => s.load(Ordering::Relaxed),
            None => 0,
        };
        if slots == 0 {
            return Err(DriverError::BogusUsed(id as u32));
        }
        self.shared.slots[id as usize].store(0, Ordering::Relaxed);
        self.id_next[id as usize] = self.free_id;
        self.free_id = id;
        self.num_free += slots;
        self.in_flight -= 1;
        self.next_used = self.next_used.advance(slots, self.size);
        self.reaped += 1;
        self.shared.used.store(self.reaped << 16 | self.next_used.encode() as u64, Ordering::Release);
        Ok(Some((id, len)))
    }

    /// Ask the device for an interrupt once anything more is used. Returns `true` if
    /// something is already there.
    pub fn enable_interrupts(&mut self) -> bool {
        self.enable_interrupts_after(1)
    }

    /// Ask for an interrupt only once `n` (≥ 1) more buffers are used: with EVENT_IDX, the
    /// driver event suppression structure asks for the slot `n − 1` past our used position
    /// (DESC, §2.8.10; Linux's `virtqueue_enable_cb_delayed_packed`). That counts slots, not
    /// buffers: with chains of several slots the interrupt comes earlier, never later.
    /// Without EVENT_IDX: ENABLE, an interrupt per completion. Returns `true` if `n`
    /// buffers are already used (do not sleep).
    pub fn enable_interrupts_after(&mut self, n: u16) -> bool {
        let n = n.clamp(1, self.size);
        if self.features.event_idx {
            let at = self.next_used.advance(n - 1, self.size);
            self.driver_event.store_u16(EVENT_OFF_WRAP, at.encode());
            if self.event_flags != EVENT_FLAG_DESC {
                // The offset before the flags that make the device look at it.
                fence(Ordering::Release);
                self.driver_event.store_u16(EVENT_FLAGS, EVENT_FLAG_DESC);
                self.event_flags = EVENT_FLAG_DESC;
            }
        } else if self.event_flags != EVENT_FLAG_ENABLE {
            self.driver_event.store_u16(EVENT_FLAGS, EVENT_FLAG_ENABLE);
            self.event_flags = EVENT_FLAG_ENABLE;
        }
        // Our request before looking at the ring again, or a completion published in
        // between would be missed by both sides.
        fence(Ordering::SeqCst);
        self.used_ready(n)
    }

    /// Are at least `n` buffers used past our used position? (A used descriptor naming an
    /// id not in flight counts as ready: `pop_used` reports it.)
    fn used_ready(&self, n: u16) -> bool {
        let mut pos = self.next_used;
        for _ in 0..n {
            let off = Self::slot_off(pos);
            if !packed_is_used(self.ring.load_u16(off + PackedDescriptor::FLAGS), pos.wrap) {
                return false;
            }
            fence(Ordering::Acquire);
            let id = self.ring.load_u16(off + PackedDescriptor::ID);
            match self.shared.slots.get(id as usize).map(|s| s.load(Ordering::Relaxed)) {
                Some(slots) if slots != 0 => pos = pos.advance(slots, self.size),
                _ => return true,
            }
        }
        true
    }

    /// Tell the device we poll the ring and need no interrupts (DISABLE).
    pub fn disable_interrupts(&mut self) {
        if self.event_flags != EVENT_FLAG_DISABLE {
            self.driver_event.store_u16(EVENT_FLAGS, EVENT_FLAG_DISABLE);
            self.event_flags = EVENT_FLAG_DISABLE;
        }
    }

    /// A view of this ring for another thread, to find the device's used position while
    /// this queue goes on being used (a reconnect: [`PackedRingWatch::device_used`]).
    pub fn watch(&self) -> PackedRingWatch {
        PackedRingWatch {
            size: self.size,
            mem: Arc::clone(&self.mem),
            ring: self.ring.gpa(),
            shared: Arc::clone(&self.shared),
        }
    }
}

/// Where the device is in a packed ring, found from another thread than the queue's
/// owner: for `SET_VRING_BASE` when a backend's next process takes the ring over (both
/// its positions at the device's used position: QEMU's rewind of a packed ring,
/// `virtio_queue_packed_restore_last_avail_idx`).
///
/// The device's used position is not stored anywhere: it is the driver's used position
/// plus the slots of every used descriptor written past it and not reaped yet (the device
/// writes them in ring order, §2.8.7). Walking them needs the slots each buffer took,
/// which only the driver knows; the owner shares that record, and a walk that raced with
/// the owner reaping is retried.
pub struct PackedRingWatch {
    size: u16,
    mem: Arc<GuestMemory>,
    /// Guest-physical address of the descriptor ring.
    ring: u64,
    shared: Arc<Shared>,
}

impl PackedRingWatch {
    /// The slot after the last used descriptor the device wrote.
    pub fn device_used(&self) -> Result<RingPos, DriverError> {
        for _ in 0..WATCH_RETRIES {
            let before = self.shared.used.load(Ordering::Acquire);
            let found = self.walk(RingPos::decode(before as u16, self.size));
            // The reads above before the second look (seqlock).
            fence(Ordering::Acquire);
            if self.shared.used.load(Ordering::Relaxed) == before {
                return found;
            }
            std::thread::yield_now();
        }
        Err(DriverError::RingBusy)
    }

    fn load_u16(&self, pos: RingPos, field: usize) -> Result<u16, DriverError> {
        let mut b = [0u8; 2];
        self.mem.read_at(self.ring + (pos.idx as usize * DESC_SIZE + field) as u64, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    fn walk(&self, from: Option<RingPos>) -> Result<RingPos, DriverError> {
        let mut pos = from.ok_or(DriverError::RingBusy)?;
        let mut total = 0u32;
        loop {
            if !packed_is_used(self.load_u16(pos, PackedDescriptor::FLAGS)?, pos.wrap) {
                return Ok(pos);
            }
            fence(Ordering::Acquire);
            let id = self.load_u16(pos, PackedDescriptor::ID)?;
            let slots = match self.shared.slots.get(id as usize) {
                Some(s) => s.load(Ordering::Relaxed),
                None => 0,
            };
            if slots == 0 {
                return Err(DriverError::BogusUsed(id as u32));
            }
            total += slots as u32;
            if total > self.size as u32 {
                return Err(DriverError::UsedOverrun(self.size));
            }
            pos = pos.advance(slots, self.size);
        }
    }
}

#[cfg(test)]
#[path = "driver_packed_tests.rs"]
mod tests;
