//! A queue handle: what blk-mq's hardware context is for the guest's `virtio_blk`.
//! One per thread; `submit` builds `outhdr` + data + status into descriptors (one
//! indirect descriptor when negotiated), `kick` publishes and notifies if the device
//! wants it, `poll`/`wait` reap completions with the caller's context.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vblk_queue::{Buffer, DriverRing, RingKind};
use vblk_virtio::blk::{req_type, DiscardSegment, OutHdr, Status, ID_BYTES};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::{IoBuf, SharedMemory, SLOT_HDR, SLOT_SEGMENT, SLOT_STATUS, SLOT_TABLE};
use crate::session::Session;
use crate::DriverError;

/// What a request's status byte holds until the device writes it (no virtio status is 0xff).
const STATUS_UNWRITTEN: u8 = 0xff;

/// How long [`QueueHandle::wait`] sleeps on the call eventfd before it checks whether the
/// backend hung up or the timeout passed.
pub const HANGUP_CHECK: Duration = Duration::from_millis(20);

/// A block operation. Offsets and lengths are in bytes (multiples of 512).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `buf.len()` bytes at `offset` into the buffer.
    Read {
        offset: u64,
    },
    /// Write the buffer at `offset`.
    Write {
        offset: u64,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
    /// Read the device ID (up to 20 bytes) into the buffer.
    GetId,
}

/// Why a request failed on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestFailure {
    #[error("I/O error (VIRTIO_BLK_S_IOERR)")]
    IoErr,
    #[error("unsupported (VIRTIO_BLK_S_UNSUPP)")]
    Unsupported,
    #[error("invalid status byte {0}")]
    BadStatus(u8),
    #[error("the device returned the request without a status")]
    NoStatus,
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// The caller's context from `submit`.
    pub user: u64,
    /// The data buffer, handed back.
    pub buf: Option<IoBuf>,
    pub result: Result<(), RequestFailure>,
}

struct Pending {
    user: u64,
    buf: Option<IoBuf>,
}

/// What [`QueueHandle::into_raw_parts`] hands over.
#[cfg(feature = "raw")]
pub(crate) struct RawParts {
    pub index: u16,
    pub shared: Arc<SharedMemory>,
    /// The ring as the handle left it (its positions: where the raw queue continues).
    pub ring: DriverRing,
    pub kick: EventFd,
    pub call: EventFd,
    pub socket: Arc<OwnedFd>,
    /// The connection, for raw vring messages (`SET_VRING_BASE` of a packed ring).
    pub session: Arc<Session>,
}

/// One virtqueue of a [`crate::Device`], used from one thread.
pub struct QueueHandle {
    index: u16,
    shared: Arc<SharedMemory>,
    ring: DriverRing,
    kick: EventFd,
    call: EventFd,
    /// A duplicate of the vhost-user socket: it hangs up when the backend dies.
    socket: Arc<OwnedFd>,
    /// The connection, to reconnect through when the backend restarts.
    session: Arc<Session>,
    indirect: bool,
    poll_mode: bool,
    pending: Vec<Option<Pending>>,
    in_flight: usize,
    timeout: Duration,
}

impl QueueHandle {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        index: u16,
        shared: Arc<SharedMemory>,
        ring: DriverRing,
        kick: EventFd,
        call: EventFd,
        session: Arc<Session>,
        indirect: bool,
        timeout: Duration,
    ) -> Self {
        let n = ring.size() as usize;
        let socket = Arc::clone(&session.conn().socket);
        QueueHandle {
            index,
            shared,
            ring,
            kick,
            call,
            socket,
            session,
            indirect,
            poll_mode: false,
            pending: (0..n).map(|_| None).collect(),
            in_flight: 0,
            timeout,
        }
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    /// Split or packed.
    pub fn ring_kind(&self) -> RingKind {
        self.ring.kind()
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// How many more requests fit right now.
    pub fn room(&self) -> usize {
        let per = if self.indirect { 1 } else { 3 };
        self.ring.num_free() as usize / per
    }

    /// Reap by spinning on the used ring instead of sleeping on the call eventfd.
    pub fn set_poll_mode(&mut self, on: bool) {
        self.poll_mode = on;
        if on {
            self.ring.disable_interrupts();
        } else {
            self.ring.enable_interrupts();
        }
    }

    /// How long `wait` waits before reporting a hung backend.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// Allocate an I/O buffer in memory the backend can see.
    pub fn alloc(&self, len: u32) -> Result<IoBuf, DriverError> {
        self.shared.alloc(len)
    }

    /// Queue a request (visible to the device after [`kick`](Self::kick)).
    pub fn submit(&mut self, op: Op, buf: Option<IoBuf>, user: u64) -> Result<(), DriverError> {
        let (t, sector, data_write) = match op {
            Op::Read { offset } => (req_type::IN, offset / 512, Some(true)),
            Op::Write { offset } => (req_type::OUT, offset / 512, Some(false)),
            Op::Flush => (req_type::FLUSH, 0, None),
            Op::GetId => (req_type::GET_ID, 0, Some(true)),
            Op::Discard { .. } => (req_type::DISCARD, 0, None),
            Op::WriteZeroes { .. } => (req_type::WRITE_ZEROES, 0, None),
        };
        if data_write.is_some() != buf.is_some() {
            return Err(DriverError::BufferMismatch);
        }
        if matches!(op, Op::GetId) && buf.as_ref().is_some_and(|b| b.len() as usize > ID_BYTES) {
            return Err(DriverError::BufferSize(buf.as_ref().map_or(0, |b| b.len())));
        }
        let needed = if self.indirect { 1 } else { 3 };
        if (self.ring.num_free() as usize) < needed {
            return Err(DriverError::QueueFull);
        }
        // The head is the next free descriptor (packed: buffer id); its slot holds header,
        // status, table.
        let mut bufs: [Buffer; 3] = [Buffer { addr: 0, len: 0, write: false }; 3];
        let mut n = 0;
        let push = |b: Buffer, bufs: &mut [Buffer; 3], n: &mut usize| {
            bufs[*n] = b;
            *n += 1;
        };
        let head_guess = self.peek_head();
        let slot = self.shared.layout.slot(self.index, head_guess);
        self.shared.write(slot + SLOT_HDR, &OutHdr { req_type: t, ioprio: 0, sector }.to_bytes())?;
        self.shared.write(slot + SLOT_STATUS, &[STATUS_UNWRITTEN])?;
        push(Buffer { addr: slot + SLOT_HDR, len: 16, write: false }, &mut bufs, &mut n);
        if let Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } = op {
            let flags = match op {
                Op::WriteZeroes { unmap: true, .. } => DiscardSegment::FLAG_UNMAP,
                _ => 0,
            };
            let num_sectors = u32::try_from(len / 512).map_err(|_| DriverError::TooLarge(len))?;
            let seg = DiscardSegment { sector: offset / 512, num_sectors, flags };
            self.shared.write(slot + SLOT_SEGMENT, &seg.to_bytes())?;
            push(Buffer { addr: slot + SLOT_SEGMENT, len: 16, write: false }, &mut bufs, &mut n);
        }
        if let (Some(b), Some(w)) = (&buf, data_write) {
            push(Buffer { addr: b.gpa(), len: b.len(), write: w }, &mut bufs, &mut n);
        }
        push(Buffer { addr: slot + SLOT_STATUS, len: 1, write: true }, &mut bufs, &mut n);
        let head = if self.indirect {
            self.ring.add_indirect(&bufs[..n], slot + SLOT_TABLE)?
        } else {
            self.ring.add(&bufs[..n])?
        };
        debug_assert_eq!(head, head_guess);
        self.pending[head as usize] = Some(Pending { user, buf });
        self.in_flight += 1;
        Ok(())
    }

    /// Give up the handle for the raw API ([`crate::raw::ring::RawQueue`],
    /// [`crate::raw::packed::RawPackedQueue`]): its memory, ring, eventfds and connection,
    /// with nothing in flight.
    #[cfg(feature = "raw")]
    pub(crate) fn into_raw_parts(self) -> Result<RawParts, DriverError> {
        if self.in_flight != 0 {
            return Err(DriverError::BadOptions("a queue handle with requests in flight"));
        }
        Ok(RawParts {
            index: self.index,
            shared: self.shared,
            ring: self.ring,
            kick: self.kick,
            call: self.call,
            socket: self.socket,
            session: self.session,
        })
    }

    /// The descriptor (packed: buffer id) the next `add` will use as its head.
    fn peek_head(&self) -> u16 {
        self.ring.next_free()
    }

    /// Publish submitted requests and kick the device if it asked for it.
    pub fn kick(&mut self) -> Result<(), DriverError> {
        self.ring.publish();
        if self.ring.needs_kick() {
            self.kick.write(1).map_err(DriverError::Eventfd)?;
        }
        Ok(())
    }

    /// Reap completions without blocking. Returns how many were added to `out`.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> Result<usize, DriverError> {
        let mut n = 0;
        while let Some((head, _len)) = self.ring.pop_used()? {
            let p = self.pending[head as usize]
                .take()
                .ok_or(DriverError::Device(vblk_queue::DriverError::BogusUsed(head as u32)))?;
            self.in_flight -= 1;
            // The status byte decides, not the used length: that counts the bytes written
            // from the start of the writable part (§2.7.8.2), 0 for a failed read. The byte
            // was preset to STATUS_UNWRITTEN, which no device writes.
            let mut s = [0u8];
            self.shared.read(self.shared.layout.slot(self.index, head) + SLOT_STATUS, &mut s)?;
            let result = match s[0] {
                x if x == Status::Ok as u8 => Ok(()),
                x if x == Status::IoErr as u8 => Err(RequestFailure::IoErr),
                x if x == Status::Unsupp as u8 => Err(RequestFailure::Unsupported),
                STATUS_UNWRITTEN => Err(RequestFailure::NoStatus),
                x => Err(RequestFailure::BadStatus(x)),
            };
            out.push(Completion { user: p.user, buf: p.buf, result });
            n += 1;
        }
        Ok(n)
    }

    /// Wait until at least `min` completions were reaped (or nothing is in flight),
    /// sleeping on the call eventfd (or spinning in poll mode). A backend that does not
    /// answer within the timeout, or hangs up, is an error.
    ///
    /// Cheap on the common path: the clock is read only when the call first has to sleep
    /// (the deadline starts there), each sleep polls one fd, and the socket (which hangs up
    /// when the backend dies) is only looked at when a slice of [`HANGUP_CHECK`] passes
    /// without an interrupt.
    pub fn wait(&mut self, out: &mut Vec<Completion>, min: usize) -> Result<usize, DriverError> {
        let mut deadline: Option<Instant> = None;
        let mut got = 0;
        let mut spins = 0u32;
        loop {
            got += self.poll(out)?;
            if got >= min || self.in_flight == 0 {
                return Ok(got);
            }
            if self.poll_mode {
                spins += 1;
                if spins.is_multiple_of(4096) {
                    let at = *deadline.get_or_insert_with(|| Instant::now() + self.timeout);
                    if self.sleep(at, Duration::ZERO)? {
                        deadline = None;
                    }
                }
                std::hint::spin_loop();
                continue;
            }
            // Sleep until the rest of `min` is there: the device interrupts once, not per
            // completion (fewer wakeups and eventfd writes on both sides).
            let rest = (min - got).min(self.in_flight);
            if self.ring.enable_interrupts_after(u16::try_from(rest).unwrap_or(u16::MAX)) {
                continue;
            }
            let at = *deadline.get_or_insert_with(|| Instant::now() + self.timeout);
            if self.sleep(at, HANGUP_CHECK)? {
                deadline = None; // a new backend: a new timeout for what is in flight
            }
        }
    }

    /// Sleep until the call eventfd fires (at most `slice`) and consume it. When the slice
    /// passes without an interrupt, fail if `deadline` passed or the backend hung up, unless
    /// the device reconnects (`Options::reconnect`): then `Ok(true)` once the backend's next
    /// process has the rings (it resubmits what its predecessor had taken).
    fn sleep(&mut self, deadline: Instant, slice: Duration) -> Result<bool, DriverError> {
        let mut fd = libc::pollfd { fd: self.call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = slice.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut fd, 1, ms) };
        if n > 0 {
            // Non-blocking eventfd: consume the notification.
            let _ = self.call.read();
            return Ok(false);
        }
        let mut hup = libc::pollfd { fd: self.socket.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd; no waiting.
        let n = unsafe { libc::poll(&mut hup, 1, 0) };
        if n > 0 && hup.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            if !self.session.can_reconnect() {
                return Err(DriverError::BackendGone);
            }
            self.socket = self.session.recover(&self.socket)?;
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Err(DriverError::Timeout(self.timeout));
        }
        Ok(false)
    }
}
