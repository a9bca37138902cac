//! Raw ring access to a packed virtqueue (virtio 1.2 §2.8), written by hand.
//!
//! A [`RawPackedQueue`] takes over one queue of a [`Device`] connected with packed rings
//! (`Options::ring = RingChoice::Packed`: `VIRTIO_F_RING_PACKED` negotiated,
//! `SET_VRING_ADDR` with desc = the descriptor ring, avail = the driver event suppression
//! area, used = the device's, `SET_VRING_BASE` in QEMU's packed encoding,
//! [`PackedBase::encode`]) and exposes every field a guest controls, with no validation:
//!
//! - any slot, with any `addr`, `len`, buffer `id` and `flags`, the AVAIL/USED bits
//!   included (§2.8.1): [`RawPackedQueue::write_slot`], [`RawPackedQueue::set_slot_flags`];
//! - chains made available the way a driver must (§2.8.21.1: every other slot first, the
//!   head's flags last, each slot's AVAIL/USED for the lap it is in):
//!   [`RawPackedQueue::add_chain`], [`RawPackedQueue::add_indirect`], or any descriptors
//!   with [`RawPackedQueue::make_available`]; several chains shown to the device at once
//!   with [`RawPackedQueue::stage`] + [`RawPackedQueue::expose`];
//! - the driver's own positions ([`RawPackedQueue::set_avail_pos`]), and the ring restarted
//!   at any vring base ([`RawPackedQueue::restart_at`], [`RawPackedQueue::set_vring_base`]);
//! - both event suppression structures (§2.8.10): [`RawPackedQueue::set_driver_event`],
//!   [`RawPackedQueue::device_event`];
//! - the used descriptors the device wrote ([`RawPackedQueue::pop_used`],
//!   [`RawPackedQueue::used_at`], [`RawPackedQueue::wait_used`]), the kick, the call
//!   eventfd and the vring error eventfd (`VHOST_USER_SET_VRING_ERR`).
//!
//! A used descriptor says which buffer id came back, not how many slots its chain took
//! (§2.8.7): [`RawPackedQueue::pop_used`] moves on by the slots the queue recorded when it
//! made that id available (the last chain made available with it).

use std::os::fd::OwnedFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vblk_queue::layout::{packed_avail_flags, packed_is_used, packed_used_flags, DESC_SIZE};
use vblk_queue::layout::{EVENT_FLAGS, EVENT_OFF_WRAP, PACKED_DESC_ALIGN, PACKED_EVENT_ALIGN, PACKED_EVENT_LEN};
use vblk_queue::{Buffer, RingAddrs, RingFeatures, RingKind};
use vblk_virtio::features as vf;
use vblk_virtio::GuestArea;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::VhostBackend;
use vmm_sys_util::eventfd::EventFd;

use super::ring::{wait_fd, UsedElem};
use super::RawMemory;
use crate::memory::{IoBuf, SharedMemory, SLOT_SIZE};
use crate::session::Session;
use crate::{Device, DriverError, QueueHandle};

/// What a test needs to write slots and event structures: re-exported from `vblk-queue`.
pub use vblk_queue::layout::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
pub use vblk_queue::layout::{EVENT_FLAG_DESC, EVENT_FLAG_DISABLE, EVENT_FLAG_ENABLE};
pub use vblk_queue::layout::{PACKED_DESC_F_AVAIL, PACKED_DESC_F_USED};
pub use vblk_queue::{PackedBase, PackedDescriptor, RingPos};

/// A chain written into the ring but not shown to the device yet (its head slot's flags
/// withheld): [`RawPackedQueue::expose`] stores them.
#[must_use = "the chain is invisible to the device until exposed"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Staged {
    /// The head slot and its lap.
    pub head: RingPos,
    /// The flags the head slot gets when exposed.
    pub flags: u16,
    /// Slots the chain takes.
    pub slots: u16,
    /// The buffer id of its last slot (the one the device reads, §2.8.6).
    pub id: u16,
}

/// One packed virtqueue under the test's complete control. See the module docs.
pub struct RawPackedQueue {
    index: u16,
    shared: Arc<SharedMemory>,
    size: u16,
    addrs: RingAddrs,
    features: RingFeatures,
    ring: GuestArea,
    driver_event: GuestArea,
    device_event: GuestArea,
    kick: EventFd,
    call: EventFd,
    err: EventFd,
    socket: Arc<OwnedFd>,
    session: Arc<Session>,
    reply_ack: bool,
    /// Where the next chain goes.
    next_avail: RingPos,
    /// Where the next used descriptor is expected.
    next_used: RingPos,
    /// Slots of the last chain made available with each buffer id (0: none in flight).
    slots_of: Vec<u16>,
    in_flight: usize,
}

impl RawPackedQueue {
    /// Take over queue `handle` of `dev` (a packed ring with nothing in flight) and register
    /// a vring error eventfd for it (`VHOST_USER_SET_VRING_ERR`). The ring continues from
    /// where the handle left it; the driver event structure is set to ENABLE (an interrupt
    /// for every used batch).
    pub fn new(dev: &Device, handle: QueueHandle) -> Result<RawPackedQueue, DriverError> {
        let parts = handle.into_raw_parts()?;
        let Some(packed) = parts.ring.as_packed() else {
            return Err(DriverError::BadOptions(
                "RawPackedQueue drives packed rings (connect with RingChoice::Packed; RawQueue for split)",
            ));
        };
        let (next_avail, next_used) = (packed.avail_pos(), packed.used_pos());
        let info = dev.info();
        debug_assert_eq!(info.ring, RingKind::Packed);
        let size = info.queue_size;
        let addrs = parts.shared.layout.rings(parts.index);
        let mem = &parts.shared.mem;
        let ring = mem.area_at_gpa(addrs.desc, DESC_SIZE as u64 * size as u64, PACKED_DESC_ALIGN)?;
        let driver_event = mem.area_at_gpa(addrs.avail, PACKED_EVENT_LEN, PACKED_EVENT_ALIGN)?;
        let device_event = mem.area_at_gpa(addrs.used, PACKED_EVENT_LEN, PACKED_EVENT_ALIGN)?;
        let err = EventFd::new(libc::EFD_NONBLOCK).map_err(DriverError::Eventfd)?;
        dev.with_frontend(|fe| fe.set_vring_err(parts.index as usize, &err))
            .map_err(|e| DriverError::Protocol("SET_VRING_ERR", e.to_string()))?;
        let features =
            RingFeatures { event_idx: info.has(vf::RING_EVENT_IDX), indirect: info.has(vf::RING_INDIRECT_DESC) };
        let reply_ack = info.protocol_features & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0;
        let q = RawPackedQueue {
            index: parts.index,
            shared: parts.shared,
            size,
            addrs,
            features,
            ring,
            driver_event,
            device_event,
            kick: parts.kick,
            call: parts.call,
            err,
            socket: parts.socket,
            session: parts.session,
            reply_ack,
            next_avail,
            next_used,
            slots_of: vec![0; 1 << 16],
            in_flight: 0,
        };
        q.set_driver_event(0, EVENT_FLAG_ENABLE);
        Ok(q)
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    /// Slots in the ring.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// What was negotiated: EVENT_IDX and INDIRECT_DESC.
    pub fn features(&self) -> RingFeatures {
        self.features
    }

    /// Guest-physical addresses of the descriptor ring (`desc`), the driver event
    /// structure (`avail`) and the device event structure (`used`).
    pub fn ring_addrs(&self) -> RingAddrs {
        self.addrs
    }

    /// Size of guest memory: the first address outside it.
    pub fn memory_size(&self) -> u64 {
        self.shared.layout.total
    }

    /// A 128-byte scratch area reserved for buffer id `id` (modulo the ring size) of this
    /// queue (the normal driver keeps that request's header, status and indirect table
    /// there).
    pub fn slot(&self, id: u16) -> u64 {
        self.shared.layout.slot(self.index, id % self.size)
    }

    /// Bytes in each [`slot`](Self::slot).
    pub const SLOT_SIZE: u64 = SLOT_SIZE;

    /// A buffer in guest memory (4 KiB aligned), freed when dropped.
    pub fn alloc(&self, len: u32) -> Result<IoBuf, DriverError> {
        self.shared.alloc(len)
    }

    /// Write `data` at guest address `gpa` (must lie inside guest memory).
    pub fn write_mem(&self, gpa: u64, data: &[u8]) -> Result<(), DriverError> {
        self.shared.write(gpa, data)
    }

    /// Read guest memory at `gpa`.
    pub fn read_mem(&self, gpa: u64, out: &mut [u8]) -> Result<(), DriverError> {
        self.shared.read(gpa, out)
    }

    /// The flags a driver makes a slot available with in lap `wrap` (`AVAIL = wrap`,
    /// `USED = !wrap`).
    pub fn avail_flags(wrap: bool) -> u16 {
        packed_avail_flags(wrap)
    }

    /// The flags a device marks a slot used with in lap `wrap` (`AVAIL = USED = wrap`).
    pub fn used_flags(wrap: bool) -> u16 {
        packed_used_flags(wrap)
    }

    /// Where the next chain goes (slot and the driver's wrap counter).
    pub fn avail_pos(&self) -> RingPos {
        self.next_avail
    }

    /// Where the next used descriptor is expected.
    pub fn used_pos(&self) -> RingPos {
        self.next_used
    }

    /// Continue making chains available at `pos` (any slot, any lap).
    pub fn set_avail_pos(&mut self, pos: RingPos) {
        self.next_avail = pos;
    }

    /// Look for the next used descriptor at `pos`.
    pub fn set_used_pos(&mut self, pos: RingPos) {
        self.next_used = pos;
    }

    fn check_slot(&self, i: u16) -> Result<usize, DriverError> {
        if i >= self.size {
            return Err(DriverError::BadOptions("slot index outside the ring"));
        }
        Ok(i as usize * DESC_SIZE)
    }

    /// Write slot `i` (`i < size`) exactly as given: `addr`, `len` and `id`, then, after a
    /// write barrier, `flags`.
    pub fn write_slot(&self, i: u16, d: PackedDescriptor) -> Result<(), DriverError> {
        let off = self.check_slot(i)?;
        self.ring.write(off, &d.to_bytes()[..PackedDescriptor::FLAGS]);
        fence(Ordering::Release);
        self.ring.store_u16(off + PackedDescriptor::FLAGS, d.flags);
        Ok(())
    }

    /// Store only the flags of slot `i` (after a write barrier).
    pub fn set_slot_flags(&self, i: u16, flags: u16) -> Result<(), DriverError> {
        let off = self.check_slot(i)?;
        fence(Ordering::Release);
        self.ring.store_u16(off + PackedDescriptor::FLAGS, flags);
        Ok(())
    }

    pub fn read_slot(&self, i: u16) -> Result<PackedDescriptor, DriverError> {
        let off = self.check_slot(i)?;
        let flags = self.ring.load_u16(off + PackedDescriptor::FLAGS);
        fence(Ordering::Acquire);
        let mut b = [0u8; DESC_SIZE];
        self.ring.read(off, &mut b);
        Ok(PackedDescriptor { flags, ..PackedDescriptor::from_bytes(&b) })
    }

    /// `bufs` as the slots of one well-formed chain starting at the avail position: each
    /// slot's AVAIL/USED for the lap it falls in (a chain crossing the end of the ring
    /// changes them half-way), NEXT on all but the last, WRITE as given, `id` in every slot
    /// (as Linux writes it; the device reads the last one's).
    pub fn chain_descs(&self, bufs: &[Buffer], id: u16) -> Vec<PackedDescriptor> {
        let mut pos = self.next_avail;
        let n = bufs.len();
        bufs.iter()
            .enumerate()
            .map(|(k, b)| {
                let flags = packed_avail_flags(pos.wrap)
                    | if b.write { DESC_F_WRITE } else { 0 }
                    | if k + 1 < n { DESC_F_NEXT } else { 0 };
                pos = pos.advance(1, self.size);
                PackedDescriptor { addr: b.addr, len: b.len, id, flags }
            })
            .collect()
    }

    /// Write `descs` into consecutive slots from the avail position (wrapping at the end of
    /// the ring), exactly as given, except that the head slot's flags are withheld: it
    /// holds the flags a device leaves in it one lap earlier, never available in this lap,
    /// until [`expose`](Self::expose). Records the chain's slots under its last buffer id
    /// and moves the avail position past it. At most `size` descriptors.
    pub fn stage(&mut self, descs: &[PackedDescriptor]) -> Result<Staged, DriverError> {
        let Some(last) = descs.last() else { return Err(DriverError::BadOptions("a chain needs a descriptor")) };
        if descs.len() > self.size as usize {
            return Err(DriverError::BadOptions("a chain of more descriptors than the ring has slots"));
        }
        let head = self.next_avail;
        // Hide the head first: whatever the slot held, the device must not take it before
        // the whole chain is written.
        self.set_slot_flags(head.idx, packed_used_flags(!head.wrap))?;
        let mut pos = head;
        for (k, d) in descs.iter().enumerate() {
            if k == 0 {
                self.ring.write(pos.idx as usize * DESC_SIZE, &d.to_bytes()[..PackedDescriptor::FLAGS]);
            } else {
                self.write_slot(pos.idx, *d)?;
            }
            pos = pos.advance(1, self.size);
        }
        self.next_avail = pos;
        let slots = descs.len() as u16;
        if self.slots_of[last.id as usize] == 0 {
            self.in_flight += 1;
        }
        self.slots_of[last.id as usize] = slots;
        Ok(Staged { head, flags: descs[0].flags, slots, id: last.id })
    }

    /// Store a staged chain's head flags, after a write barrier (§2.8.21.1): the device may
    /// take the chain from now on. Exposing several staged chains in reverse order shows
    /// them to the device at once.
    pub fn expose(&self, s: Staged) {
        fence(Ordering::Release);
        self.ring.store_u16(s.head.idx as usize * DESC_SIZE + PackedDescriptor::FLAGS, s.flags);
    }

    /// [`stage`](Self::stage) then [`expose`](Self::expose) `descs`. Returns the head.
    pub fn make_available(&mut self, descs: &[PackedDescriptor]) -> Result<RingPos, DriverError> {
        let s = self.stage(descs)?;
        self.expose(s);
        Ok(s.head)
    }

    /// Make `bufs` available as one well-formed chain with buffer id `id`
    /// ([`chain_descs`](Self::chain_descs)). Returns the head.
    pub fn add_chain(&mut self, bufs: &[Buffer], id: u16) -> Result<RingPos, DriverError> {
        let descs = self.chain_descs(bufs, id);
        self.make_available(&descs)
    }

    /// Make one slot available that points at an indirect table of `len` bytes at `table`
    /// (§2.8.7), with buffer id `id`. Returns the head.
    pub fn add_indirect(&mut self, table: u64, len: u32, id: u16) -> Result<RingPos, DriverError> {
        let flags = packed_avail_flags(self.next_avail.wrap) | DESC_F_INDIRECT;
        self.make_available(&[PackedDescriptor { addr: table, len, id, flags }])
    }

    /// `bufs` as the entries of a packed indirect table: consecutive descriptors, WRITE as
    /// given, no NEXT, id 0 (§2.8.7: only WRITE counts in a table).
    pub fn table_of(bufs: &[Buffer]) -> Vec<PackedDescriptor> {
        bufs.iter()
            .map(|b| PackedDescriptor {
                addr: b.addr,
                len: b.len,
                id: 0,
                flags: if b.write { DESC_F_WRITE } else { 0 },
            })
            .collect()
    }

    /// Write table entries at guest address `addr`.
    pub fn write_table(&self, addr: u64, entries: &[PackedDescriptor]) -> Result<(), DriverError> {
        let bytes: Vec<u8> = entries.iter().flat_map(|d| d.to_bytes()).collect();
        self.write_mem(addr, &bytes)
    }

    /// Write the driver event suppression structure (§2.8.10): `off_wrap` (a slot in bits
    /// 0-14, a wrap counter in bit 15) first, then `flags` (ENABLE, DISABLE, DESC, or
    /// anything else).
    pub fn set_driver_event(&self, off_wrap: u16, flags: u16) {
        self.driver_event.store_u16(EVENT_OFF_WRAP, off_wrap);
        fence(Ordering::Release);
        self.driver_event.store_u16(EVENT_FLAGS, flags);
        fence(Ordering::SeqCst);
    }

    /// The driver event structure as stored: `(off_wrap, flags)`.
    pub fn driver_event(&self) -> (u16, u16) {
        (self.driver_event.load_u16(EVENT_OFF_WRAP), self.driver_event.load_u16(EVENT_FLAGS))
    }

    /// The device event structure: `(off_wrap, flags)`. With EVENT_IDX a device asking for
    /// kicks stores its avail position in `off_wrap` and DESC in `flags`.
    pub fn device_event(&self) -> (u16, u16) {
        let flags = self.device_event.load_u16(EVENT_FLAGS);
        fence(Ordering::Acquire);
        (self.device_event.load_u16(EVENT_OFF_WRAP), flags)
    }

    /// Overwrite the device's event structure (the device's to write: a hostile driver).
    pub fn write_device_event(&self, off_wrap: u16, flags: u16) {
        self.device_event.store_u16(EVENT_OFF_WRAP, off_wrap);
        self.device_event.store_u16(EVENT_FLAGS, flags);
    }

    /// The used descriptor at `pos`, if the slot there is marked used for `pos`'s lap
    /// (`AVAIL == USED == pos.wrap`): `(id, len)`.
    pub fn used_at(&self, pos: RingPos) -> Option<UsedElem> {
        let off = pos.idx as usize * DESC_SIZE;
        if !packed_is_used(self.ring.load_u16(off + PackedDescriptor::FLAGS), pos.wrap) {
            return None;
        }
        fence(Ordering::Acquire);
        let id = self.ring.load_u16(off + PackedDescriptor::ID);
        let len = self.ring.load_u32(off + PackedDescriptor::LEN);
        Some(UsedElem { id: id as u32, len })
    }

    /// Is there a used descriptor at the used position?
    pub fn used_ready(&self) -> bool {
        self.used_at(self.next_used).is_some()
    }

    /// The next used descriptor, if the device wrote one: moves the used position on by
    /// the slots recorded for its id. An id with none recorded (never made available, or
    /// already returned) is [`vblk_queue::DriverError::BogusUsed`], the position unchanged.
    pub fn pop_used(&mut self) -> Result<Option<UsedElem>, DriverError> {
        let Some(e) = self.used_at(self.next_used) else { return Ok(None) };
        let slots = std::mem::take(&mut self.slots_of[e.id as usize]);
        if slots == 0 {
            return Err(vblk_queue::DriverError::BogusUsed(e.id).into());
        }
        self.in_flight -= 1;
        self.next_used = self.next_used.advance(slots, self.size);
        Ok(Some(e))
    }

    /// Buffer ids made available and not returned yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Forget every chain made available (after the ring was restarted).
    pub fn forget_in_flight(&mut self) {
        self.slots_of.iter_mut().for_each(|s| *s = 0);
        self.in_flight = 0;
    }

    /// Notify the device (write the kick eventfd), whatever it asked for.
    pub fn kick(&self) -> Result<(), DriverError> {
        self.kick.write(1).map_err(DriverError::Eventfd)
    }

    /// Wait up to `timeout` for the call eventfd (consuming it). `Ok(false)` on timeout;
    /// [`DriverError::BackendGone`] if the backend hung up meanwhile.
    pub fn wait_call(&self, timeout: Duration) -> Result<bool, DriverError> {
        wait_fd(&self.call, &self.socket, timeout)
    }

    /// Wait up to `timeout` for the vring error eventfd (consuming it).
    pub fn wait_err(&self, timeout: Duration) -> Result<bool, DriverError> {
        wait_fd(&self.err, &self.socket, timeout)
    }

    /// Has the device signalled the vring error eventfd since the last check? (Consumes it.)
    pub fn err_fired(&self) -> bool {
        self.err.read().is_ok()
    }

    /// Pop `count` used descriptors, sleeping on the call eventfd (and looking at the ring
    /// every 10 ms whatever the event structures say) while none is there. Fails with
    /// [`DriverError::Timeout`] (descriptors popped so far are lost to the caller) after
    /// `timeout` without enough of them.
    pub fn wait_used(&mut self, count: usize, timeout: Duration) -> Result<Vec<UsedElem>, DriverError> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            if let Some(e) = self.pop_used()? {
                out.push(e);
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DriverError::Timeout(timeout));
            }
            self.wait_call(left.min(Duration::from_millis(10)))?;
        }
        Ok(out)
    }

    /// Send `SET_VRING_BASE` for this ring with any 32-bit value (a packed base is
    /// [`PackedBase::encode`]); nothing changes on this side. The device stops the ring,
    /// takes the base and starts it again; a base naming a slot outside the ring gets an
    /// error reply ([`DriverError::Protocol`]).
    pub fn set_vring_base(&self, num: u32) -> Result<(), DriverError> {
        self.session.set_vring_base_raw(self.index, num, self.reply_ack)
    }

    /// Restart the ring at `base` (nothing may be in flight): every slot zeroed (never
    /// available, never used), `SET_VRING_BASE` with `base`, and this side's positions set
    /// to it, so a test can put the ring anywhere, e.g. just before its end in either lap.
    pub fn restart_at(&mut self, base: PackedBase) -> Result<(), DriverError> {
        self.ring.write(0, &vec![0u8; self.ring.len()]);
        self.set_vring_base(base.encode())?;
        self.next_avail = base.avail;
        self.next_used = base.used;
        self.forget_in_flight();
        Ok(())
    }
}

impl RawMemory for RawPackedQueue {
    fn slot(&self, id: u16) -> u64 {
        RawPackedQueue::slot(self, id)
    }
    fn write_mem(&self, gpa: u64, data: &[u8]) -> Result<(), DriverError> {
        RawPackedQueue::write_mem(self, gpa, data)
    }
    fn read_mem(&self, gpa: u64, out: &mut [u8]) -> Result<(), DriverError> {
        RawPackedQueue::read_mem(self, gpa, out)
    }
    fn alloc(&self, len: u32) -> Result<IoBuf, DriverError> {
        RawPackedQueue::alloc(self, len)
    }
    fn memory_size(&self) -> u64 {
        RawPackedQueue::memory_size(self)
    }
}
