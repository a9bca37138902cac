//! Raw vhost-user messages: a frontend that can send anything.
//!
//! The wire format (vhost-user spec, "Message Specification"): a 12-byte header —
//! `request: u32`, `flags: u32` (bits 0–1 the version, 1; bit 2 REPLY; bit 3 NEED_REPLY),
//! `size: u32` (payload bytes) — then the payload, all in native (little) endian; file
//! descriptors travel as `SCM_RIGHTS` ancillary data of the same `sendmsg`.
//!
//! [`RawFrontend::send`] writes any [`Header`] (its `size` need not match the payload) with
//! any payload and any number of fds in one `sendmsg`; [`RawFrontend::send_bytes`] writes
//! arbitrary bytes (half a header, a payload that follows late). [`RawFrontend::recv`]
//! reads one reply with a timeout and reports a disconnect (EOF or `ECONNRESET`) as an
//! [`Outcome`] rather than an error. The payload builders below write the spec's message
//! bodies field by field, so a test can put any value in any field.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vblk_queue::{PackedBase, RingKind};
use vblk_virtio::features as vf;
use vblk_virtio::RegionSpec;
pub use vhost::vhost_user::message::FrontendReq;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::DriverError;

/// Size of the vhost-user message header.
pub const HEADER_SIZE: usize = 12;

/// The largest reply payload [`RawFrontend::recv`] accepts (the `vhost` crate's limit is 4 KiB).
const MAX_REPLY: u32 = 64 << 10;

/// File descriptors accepted with one reply.
const MAX_REPLY_FDS: usize = 8;

/// A vhost-user message header, field by field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub request: u32,
    pub flags: u32,
    pub size: u32,
}

impl Header {
    /// Protocol version 1 (flags bits 0–1).
    pub const VERSION: u32 = 0x1;
    /// The message is a reply.
    pub const REPLY: u32 = 0x4;
    /// The sender wants a reply (with `REPLY_ACK`: a u64, 0 for success).
    pub const NEED_REPLY: u32 = 0x8;

    /// A well-formed request for `code` with a `payload_len`-byte payload, asking for a reply.
    pub fn request(code: FrontendReq, payload_len: usize) -> Header {
        Header {
            request: u32::from(code),
            flags: Self::VERSION | Self::NEED_REPLY,
            size: u32::try_from(payload_len).unwrap_or(u32::MAX),
        }
    }

    pub fn to_bytes(self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&self.request.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8; HEADER_SIZE]) -> Header {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header { request: word(0), flags: word(4), size: word(8) }
    }
}

/// A message the backend sent.
#[derive(Debug)]
pub struct Reply {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Reply {
    /// The payload as one u64 (`REPLY_ACK` status, features, ...), if it is 8 bytes.
    pub fn u64(&self) -> Option<u64> {
        Some(u64::from_le_bytes(self.payload.as_slice().try_into().ok()?))
    }
}

/// What came back after a message.
#[derive(Debug)]
pub enum Outcome {
    Reply(Reply),
    /// The backend closed the connection (EOF or `ECONNRESET`), possibly mid-reply.
    Disconnected,
    /// Nothing (or only part of a reply) arrived in time.
    Timeout,
}

impl Outcome {
    /// The `REPLY_ACK` status: `Some(0)` success, `Some(non-zero)` an error reply.
    pub fn ack(&self) -> Option<u64> {
        match self {
            Outcome::Reply(r) => r.u64(),
            _ => None,
        }
    }

    pub fn is_disconnect(&self) -> bool {
        matches!(self, Outcome::Disconnected)
    }
}

/// A vhost-user frontend that writes raw messages.
pub struct RawFrontend {
    sock: UnixStream,
}

fn is_gone(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPIPE) | Some(libc::ECONNRESET))
}

impl RawFrontend {
    pub fn connect(path: &Path) -> Result<RawFrontend, DriverError> {
        let sock = UnixStream::connect(path).map_err(|e| DriverError::Connect(path.to_owned(), e))?;
        Ok(RawFrontend { sock })
    }

    pub fn from_stream(sock: UnixStream) -> RawFrontend {
        RawFrontend { sock }
    }

    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// Send `header`, then `payload`, with `fds` attached, in one `sendmsg`.
    pub fn send(&self, header: Header, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), DriverError> {
        let h = header.to_bytes();
        self.send_iovecs(&[&h[..], payload], fds)
    }

    /// Send arbitrary bytes with `fds` attached, in one `sendmsg`.
    pub fn send_bytes(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), DriverError> {
        self.send_iovecs(&[bytes], fds)
    }

    fn send_iovecs(&self, iovecs: &[&[u8]], fds: &[BorrowedFd<'_>]) -> Result<(), DriverError> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let total: usize = iovecs.iter().map(|b| b.len()).sum();
        let sent = self.sock.send_with_fds(iovecs, &raw).map_err(|e| {
            let e = std::io::Error::from_raw_os_error(e.errno());
            if is_gone(&e) {
                DriverError::BackendGone
            } else {
                DriverError::Socket(e)
            }
        })?;
        if sent != total {
            return Err(DriverError::Protocol("sendmsg", format!("sent {sent} of {total} bytes")));
        }
        Ok(())
    }

    /// Send a well-formed request (`NEED_REPLY` set) and read the reply.
    pub fn call(
        &self,
        code: FrontendReq,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<Outcome, DriverError> {
        match self.send(Header::request(code, payload.len()), payload, fds) {
            Err(DriverError::BackendGone) => return Ok(Outcome::Disconnected),
            r => r?,
        }
        self.recv(timeout)
    }

    /// Read one message (header, then `size` payload bytes, fds) within `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Outcome, DriverError> {
        let deadline = Instant::now() + timeout;
        let mut hdr = [0u8; HEADER_SIZE];
        let mut fds = Vec::new();
        if let Some(end) = self.read_exact(&mut hdr, deadline, &mut fds)? {
            return Ok(end);
        }
        let header = Header::from_bytes(&hdr);
        if header.size > MAX_REPLY {
            return Err(DriverError::Protocol("reply", format!("payload size {} too large", header.size)));
        }
        let mut payload = vec![0u8; header.size as usize];
        if let Some(end) = self.read_exact(&mut payload, deadline, &mut fds)? {
            return Ok(end);
        }
        Ok(Outcome::Reply(Reply { header, payload, fds }))
    }

    /// Fill `buf` before `deadline`; `Some(outcome)` if the backend hung up or time ran out.
    fn read_exact(
        &self,
        buf: &mut [u8],
        deadline: Instant,
        fds: &mut Vec<OwnedFd>,
    ) -> Result<Option<Outcome>, DriverError> {
        let mut got = 0;
        while got < buf.len() {
            if !self.wait_readable(deadline)? {
                return Ok(Some(Outcome::Timeout));
            }
            let mut raw = [-1 as RawFd; MAX_REPLY_FDS];
            let rest = &mut buf[got..];
            let mut iov = [libc::iovec { iov_base: rest.as_mut_ptr().cast(), iov_len: rest.len() }];
            // SAFETY: the iovec points into `buf`, which is valid for writes of its length.
            let r = unsafe { self.sock.recv_with_fds(&mut iov, &mut raw) };
            match r {
                Ok((0, _)) => return Ok(Some(Outcome::Disconnected)),
                Ok((n, nfds)) => {
                    // SAFETY: recvmsg installed these `nfds` descriptors for us; nothing else owns them.
                    fds.extend(raw[..nfds].iter().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                    got += n;
                }
                Err(e) if e.errno() == libc::ECONNRESET => return Ok(Some(Outcome::Disconnected)),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => return Err(DriverError::Socket(std::io::Error::from_raw_os_error(e.errno()))),
            }
        }
        Ok(None)
    }

    /// Wait for the socket to become readable (data or hang-up) before `deadline`.
    fn wait_readable(&self, deadline: Instant) -> Result<bool, DriverError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = left.as_millis().min(i32::MAX as u128) as i32 + i32::from(!left.is_zero());
            let mut p = libc::pollfd { fd: self.sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut p, 1, ms) };
            if n > 0 {
                return Ok(true);
            }
            if n == 0 {
                return Ok(false);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(DriverError::Socket(e));
            }
        }
    }

    /// Read and drop whatever the backend sends until it closes the connection: true when
    /// it did within `timeout`, false when the connection is still open.
    pub fn wait_closed(&self, timeout: Duration) -> Result<bool, DriverError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left)? {
                Outcome::Disconnected => return Ok(true),
                Outcome::Timeout => return Ok(false),
                Outcome::Reply(_) => {}
            }
        }
    }

    /// The usual opening, in QEMU's order: GET_FEATURES, GET_PROTOCOL_FEATURES,
    /// SET_PROTOCOL_FEATURES (`REPLY_ACK` and whatever of `protocol` is offered), then
    /// SET_FEATURES (everything offered but `VIRTIO_F_RING_PACKED`: the rings stay split,
    /// as [`crate::raw::ring`] writes them; [`negotiate_ring`](Self::negotiate_ring) for
    /// packed rings). Returns the virtio features acked. From SET_PROTOCOL_FEATURES on,
    /// every well-formed request with `NEED_REPLY` gets a `REPLY_ACK` answer (vhost-user
    /// spec, "REPLY_ACK").
    pub fn negotiate(&self, protocol: u64, timeout: Duration) -> Result<u64, DriverError> {
        self.negotiate_ring(protocol, RingKind::Split, timeout)
    }

    /// [`negotiate`](Self::negotiate) for rings of `ring`'s layout: with
    /// [`RingKind::Packed`], `VIRTIO_F_RING_PACKED` is acked (an error if the backend
    /// does not offer it), and the rings are then set up with [`packed_vring_addr`] and
    /// [`packed_vring_base`].
    pub fn negotiate_ring(&self, protocol: u64, ring: RingKind, timeout: Duration) -> Result<u64, DriverError> {
        let value = |what: &'static str, o: Outcome| match o {
            Outcome::Reply(r) => r.u64().ok_or_else(|| DriverError::Protocol(what, "reply is not a u64".into())),
            o => Err(DriverError::Protocol(what, format!("{o:?}"))),
        };
        let ack = |what: &'static str, o: Outcome| match o.ack() {
            Some(0) => Ok(()),
            _ => Err(DriverError::Protocol(what, format!("{o:?}"))),
        };
        let features = value("GET_FEATURES", self.call(FrontendReq::GET_FEATURES, &[], &[], timeout)?)?;
        let offered =
            value("GET_PROTOCOL_FEATURES", self.call(FrontendReq::GET_PROTOCOL_FEATURES, &[], &[], timeout)?)?;
        let reply_ack = vhost::vhost_user::VhostUserProtocolFeatures::REPLY_ACK.bits();
        if offered & reply_ack == 0 {
            return Err(DriverError::Unsupported("REPLY_ACK"));
        }
        let acked = offered & (protocol | reply_ack);
        let o = self.call(FrontendReq::SET_PROTOCOL_FEATURES, &u64_payload(acked), &[], timeout)?;
        ack("SET_PROTOCOL_FEATURES", o)?;
        let features = match ring {
            RingKind::Split => features & !vf::RING_PACKED,
            RingKind::Packed if features & vf::RING_PACKED == 0 => return Err(DriverError::PackedNotOffered),
            RingKind::Packed => features,
        };
        ack("SET_FEATURES", self.call(FrontendReq::SET_FEATURES, &u64_payload(features), &[], timeout)?)?;
        Ok(features)
    }
}

/// A `u64` payload (features, `SET_VRING_KICK`/`CALL`/`ERR`: index in bits 0–7, bit 8 "no fd").
pub fn u64_payload(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// `struct vhost_vring_state`: `SET_VRING_NUM`, `SET_VRING_BASE`, `GET_VRING_BASE`,
/// `SET_VRING_ENABLE`.
pub fn vring_state(index: u32, num: u32) -> Vec<u8> {
    [index.to_le_bytes(), num.to_le_bytes()].concat()
}

/// `struct vhost_vring_addr` (`SET_VRING_ADDR`), with flags and log address 0.
pub fn vring_addr(index: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut v = vring_state(index, 0);
    for a in [desc, used, avail, 0] {
        v.extend_from_slice(&a.to_le_bytes());
    }
    v
}

/// `SET_VRING_ADDR` for a packed ring (virtio 1.2 §2.8; QEMU's mapping of the three
/// areas onto `struct vhost_vring_addr`): the descriptor ring in the desc field, the
/// driver event suppression structure in the avail field, the device's in the used field.
pub fn packed_vring_addr(index: u32, ring: u64, driver_event: u64, device_event: u64) -> Vec<u8> {
    vring_addr(index, ring, device_event, driver_event)
}

/// `SET_VRING_BASE` for a packed ring: both positions with their wrap counters in `num`
/// ([`PackedBase::encode`], QEMU's encoding).
pub fn packed_vring_base(index: u32, base: PackedBase) -> Vec<u8> {
    vring_state(index, base.encode())
}

/// One memory region description: guest address, size, frontend address, mmap offset.
pub fn region(r: &RegionSpec) -> Vec<u8> {
    [r.guest_phys_addr, r.size, r.user_addr, r.mmap_offset].iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `SET_MEM_TABLE`'s payload: `num_regions` (which may lie), padding, then `regions`.
pub fn mem_table(num_regions: u32, regions: &[RegionSpec]) -> Vec<u8> {
    let mut v = vring_state(num_regions, 0);
    for r in regions {
        v.extend(region(r));
    }
    v
}

/// `ADD_MEM_REG` / `REM_MEM_REG`'s payload: 8 bytes of padding, then one region.
pub fn single_region(r: &RegionSpec) -> Vec<u8> {
    [vec![0u8; 8], region(r)].concat()
}

/// A non-blocking eventfd, for `SET_VRING_KICK` / `CALL` / `ERR`.
pub fn eventfd() -> Result<OwnedFd, DriverError> {
    // SAFETY: eventfd(2) with valid flags; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(DriverError::Eventfd(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
