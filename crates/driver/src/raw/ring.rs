//! Raw ring access: a split virtqueue (virtio 1.2 §2.7) written by hand, byte by byte.
//!
//! A [`RawQueue`] takes over one queue of a connected [`Device`] (over a socket to any
//! backend, or the in-process [`crate::loopback`]) and exposes every field a guest
//! controls, with no validation at all:
//!
//! - descriptors at any index, with any `addr`, `len`, `flags`, `next` (§2.7.5):
//!   [`RawQueue::write_desc`], or a plain chain with [`RawQueue::write_chain`];
//! - avail ring entries at any position and any avail `idx` (§2.7.6):
//!   [`RawQueue::set_avail_entry`], [`RawQueue::add_avail`] + [`RawQueue::publish`],
//!   [`RawQueue::set_avail_idx`];
//! - any bytes at any guest address inside the shared memory (headers, indirect tables,
//!   discard segments): [`RawQueue::write_mem`], [`RawQueue::read_mem`];
//! - `used_event` / `avail_event` (§2.7.10, EVENT_IDX) and the ring flags;
//! - the kick, the call eventfd ([`RawQueue::wait_call`], [`RawQueue::wait_used`]), the
//!   used ring ([`RawQueue::used_idx`], [`RawQueue::used_elem`], [`RawQueue::pop_used`]),
//!   and the vring error eventfd, registered with `VHOST_USER_SET_VRING_ERR`
//!   ([`RawQueue::err_fired`], [`RawQueue::wait_err`]).
//!
//! Guest addresses are guest-physical addresses of the driver's one memory region,
//! which spans `0..`[`RawQueue::memory_size`]; anything at or above that is outside
//! guest memory.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vblk_queue::layout::{AVAIL_ALIGN, DESC_ALIGN, USED_ALIGN};
use vblk_queue::{RingKind, SplitLayout};
use vblk_virtio::features as vf;
use vblk_virtio::GuestArea;
use vhost::VhostBackend;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::{IoBuf, SharedMemory, SLOT_SIZE};

use crate::{Device, DriverError, QueueHandle};
/// What a test needs to write descriptors and rings: re-exported from `vblk-queue`.
pub use vblk_queue::layout::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE};
pub use vblk_queue::{Buffer, Descriptor, RingAddrs, RingFeatures};

/// One used ring entry, `struct virtq_used_elem` (§2.7.8), as the device wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    /// The head descriptor index (a `le32` on the wire: not checked against anything).
    pub id: u32,
    /// Bytes the device says it wrote into the chain's device-writable buffers.
    pub len: u32,
}

/// One virtqueue under the test's complete control. See the module docs.
pub struct RawQueue {
    index: u16,
    shared: Arc<SharedMemory>,
    layout: SplitLayout,
    addrs: RingAddrs,
    features: RingFeatures,
    desc: GuestArea,
    avail: GuestArea,
    used: GuestArea,
    kick: EventFd,
    call: EventFd,
    err: EventFd,
    socket: Arc<OwnedFd>,
    /// Next avail ring position [`add_avail`](Self::add_avail) writes.
    next_avail: u16,
    /// Next used ring position [`pop_used`](Self::pop_used) reads.
    last_used: u16,
}

impl RawQueue {
    /// Take over queue `handle` of `dev` (nothing may be in flight on it) and register a
    /// vring error eventfd for it (`VHOST_USER_SET_VRING_ERR`). The ring continues from
    /// where the handle left it.
    pub fn new(dev: &Device, handle: QueueHandle) -> Result<RawQueue, DriverError> {
        let parts = handle.into_raw_parts()?;
        if parts.ring.kind() != RingKind::Split {
            return Err(DriverError::BadOptions(
                "RawQueue drives split rings (connect with RingChoice::Split; RawPackedQueue for packed)",
            ));
        }
        let info = dev.info();
        let layout = SplitLayout::new(info.queue_size as u32).ok_or(DriverError::BadOptions("queue size"))?;
        let addrs = parts.shared.layout.rings(parts.index);
        let mem = &parts.shared.mem;
        let desc = mem.area_at_gpa(addrs.desc, layout.desc_table_len(), DESC_ALIGN)?;
        let avail = mem.area_at_gpa(addrs.avail, layout.avail_len(), AVAIL_ALIGN)?;
        let used = mem.area_at_gpa(addrs.used, layout.used_len(), USED_ALIGN)?;
        let err = EventFd::new(libc::EFD_NONBLOCK).map_err(DriverError::Eventfd)?;
        dev.with_frontend(|fe| fe.set_vring_err(parts.index as usize, &err))
            .map_err(|e| DriverError::Protocol("SET_VRING_ERR", e.to_string()))?;
        let features =
            RingFeatures { event_idx: info.has(vf::RING_EVENT_IDX), indirect: info.has(vf::RING_INDIRECT_DESC) };
        let next_avail = avail.load_u16(SplitLayout::IDX);
        let last_used = used.load_u16(SplitLayout::IDX);
        Ok(RawQueue {
            index: parts.index,
            shared: parts.shared,
            layout,
            addrs,
            features,
            desc,
            avail,
            used,
            kick: parts.kick,
            call: parts.call,
            err,
            socket: parts.socket,
            next_avail,
            last_used,
        })
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    /// Queue size (entries in the descriptor table and both rings).
    pub fn size(&self) -> u16 {
        self.layout.size
    }

    /// What was negotiated: EVENT_IDX and INDIRECT_DESC.
    pub fn features(&self) -> RingFeatures {
        self.features
    }

    /// Guest-physical addresses of this queue's descriptor table and rings.
    pub fn ring_addrs(&self) -> RingAddrs {
        self.addrs
    }

    /// Size of guest memory: the first address outside it.
    pub fn memory_size(&self) -> u64 {
        self.shared.layout.total
    }

    /// A 128-byte scratch area reserved for head `head` of this queue (the normal driver
    /// keeps that request's header, status and indirect table there).
    pub fn slot(&self, head: u16) -> u64 {
        self.shared.layout.slot(self.index, head % self.layout.size)
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

    fn check_index(&self, i: u16) -> Result<(), DriverError> {
        if i >= self.layout.size {
            return Err(DriverError::BadOptions("descriptor index outside the table"));
        }
        Ok(())
    }

    /// Write descriptor `i` (`i < size`) exactly as given (§2.7.5).
    pub fn write_desc(&self, i: u16, d: Descriptor) -> Result<(), DriverError> {
        self.check_index(i)?;
        self.desc.write(self.layout.desc(i), &d.to_bytes());
        Ok(())
    }

    pub fn read_desc(&self, i: u16) -> Result<Descriptor, DriverError> {
        self.check_index(i)?;
        let mut b = [0u8; 16];
        self.desc.read(self.layout.desc(i), &mut b);
        Ok(Descriptor::from_bytes(&b))
    }

    /// Write `bufs` as a well-formed chain in descriptors `first, first + 1, ...` (modulo
    /// the queue size), linked with `NEXT`. Returns the head (`first`).
    pub fn write_chain(&self, first: u16, bufs: &[Buffer]) -> Result<u16, DriverError> {
        if bufs.is_empty() || bufs.len() > self.layout.size as usize {
            return Err(DriverError::BadOptions("a chain needs 1..=size buffers"));
        }
        self.check_index(first)?;
        for (k, b) in bufs.iter().enumerate() {
            let i = (first as usize + k) as u16 % self.layout.size;
            let last = k + 1 == bufs.len();
            let flags = (if b.write { DESC_F_WRITE } else { 0 }) | (if last { 0 } else { DESC_F_NEXT });
            let next = if last { 0 } else { (i + 1) % self.layout.size };
            self.write_desc(i, Descriptor { addr: b.addr, len: b.len, flags, next })?;
        }
        Ok(first)
    }

    /// Write `avail.ring[pos % size] = head` (any value, in range or not).
    pub fn set_avail_entry(&self, pos: u16, head: u16) {
        self.avail.store_u16(self.layout.avail_entry(pos), head);
    }

    /// Put `head` at the next avail position (not visible until [`publish`](Self::publish)).
    /// Returns the position used.
    pub fn add_avail(&mut self, head: u16) -> u16 {
        let pos = self.next_avail;
        self.set_avail_entry(pos, head);
        self.next_avail = pos.wrapping_add(1);
        pos
    }

    /// Store the avail index as advanced by [`add_avail`](Self::add_avail), after a write
    /// barrier (§2.7.13.3.1).
    pub fn publish(&self) {
        fence(Ordering::Release);
        self.avail.store_u16(SplitLayout::IDX, self.next_avail);
    }

    /// Store any avail index (and continue [`add_avail`](Self::add_avail) from it).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.next_avail = idx;
        self.publish();
    }

    /// The avail index as last stored.
    pub fn avail_idx(&self) -> u16 {
        self.avail.load_u16(SplitLayout::IDX)
    }

    /// `avail.flags` (`VRING_AVAIL_F_NO_INTERRUPT`, §2.7.7).
    pub fn set_avail_flags(&self, flags: u16) {
        self.avail.store_u16(SplitLayout::FLAGS, flags);
    }

    /// `avail.used_event` (EVENT_IDX, §2.7.10): interrupt once used idx passes it.
    pub fn set_used_event(&self, v: u16) {
        self.avail.store_u16(self.layout.used_event(), v);
        fence(Ordering::SeqCst);
    }

    pub fn used_event(&self) -> u16 {
        self.avail.load_u16(self.layout.used_event())
    }

    /// `used.avail_event` (EVENT_IDX): the avail index the device wants a kick for.
    pub fn avail_event(&self) -> u16 {
        self.used.load_u16(self.layout.avail_event())
    }

    /// `used.flags` (`VRING_USED_F_NO_NOTIFY`).
    pub fn used_flags(&self) -> u16 {
        self.used.load_u16(SplitLayout::FLAGS)
    }

    /// The used index, with a read barrier so entries before it can be read (§2.7.13.6).
    pub fn used_idx(&self) -> u16 {
        let v = self.used.load_u16(SplitLayout::IDX);
        fence(Ordering::Acquire);
        v
    }

    /// `used.ring[pos % size]`.
    pub fn used_elem(&self, pos: u16) -> UsedElem {
        let off = self.layout.used_entry(pos);
        UsedElem { id: self.used.load_u32(off), len: self.used.load_u32(off + 4) }
    }

    /// The next used entry after the last one popped, if the device published it.
    pub fn pop_used(&mut self) -> Option<UsedElem> {
        if self.used_idx() == self.last_used {
            return None;
        }
        let e = self.used_elem(self.last_used);
        self.last_used = self.last_used.wrapping_add(1);
        Some(e)
    }

    /// Used entries published and not popped yet.
    pub fn pending_used(&self) -> u16 {
        self.used_idx().wrapping_sub(self.last_used)
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

    /// Pop `count` used entries, asking for an interrupt (EVENT_IDX `used_event` = the
    /// next entry) and sleeping on the call eventfd while none is there. Fails with
    /// [`DriverError::Timeout`] (entries popped so far are lost to the caller) after
    /// `timeout` without enough entries.
    pub fn wait_used(&mut self, count: usize, timeout: Duration) -> Result<Vec<UsedElem>, DriverError> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            if let Some(e) = self.pop_used() {
                out.push(e);
                continue;
            }
            self.set_used_event(self.last_used);
            if self.pending_used() != 0 {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DriverError::Timeout(timeout));
            }
            self.wait_call(left.min(Duration::from_millis(100)))?;
        }
        Ok(out)
    }
}

/// Sleep until `fd` is readable (then read it) or the socket hangs up, at most `timeout`.
pub(super) fn wait_fd(fd: &EventFd, socket: &OwnedFd, timeout: Duration) -> Result<bool, DriverError> {
    let deadline = Instant::now() + timeout;
    loop {
        if fd.read().is_ok() {
            return Ok(true);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: socket.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 },
        ];
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: a valid array of two pollfd, exclusively borrowed for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(DriverError::Eventfd(e));
            }
        }
        if n > 0 && fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return Err(DriverError::BackendGone);
        }
    }
}

impl super::RawMemory for RawQueue {
    fn slot(&self, id: u16) -> u64 {
        RawQueue::slot(self, id)
    }
    fn write_mem(&self, gpa: u64, data: &[u8]) -> Result<(), DriverError> {
        RawQueue::write_mem(self, gpa, data)
    }
    fn read_mem(&self, gpa: u64, out: &mut [u8]) -> Result<(), DriverError> {
        RawQueue::read_mem(self, gpa, out)
    }
    fn alloc(&self, len: u32) -> Result<IoBuf, DriverError> {
        RawQueue::alloc(self, len)
    }
    fn memory_size(&self) -> u64 {
        RawQueue::memory_size(self)
    }
}
