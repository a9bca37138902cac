//! The listening socket and the connection loop: one frontend at a time, then the next
//! (QEMU's `reconnect=` re-attaches to the same daemon).
//!
//! Between messages the loop waits for the frontend without a time limit (an idle VM sends
//! nothing for hours). Once a message has started, the rest of it must arrive within the
//! message timeout ([`DEFAULT_MESSAGE_TIMEOUT`]), or the frontend is disconnected: a
//! frontend that stops mid-message would otherwise block the daemon, which serves one
//! frontend at a time, forever.

use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, TryLockError};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::{BackendReqHandler, Error as VuError};

use crate::device::VblkDevice;

/// Errors of the server layer.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("socket {0} is in use by another process")]
    SocketInUse(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("poll failed: {0}")]
    Poll(std::io::Error),
}

/// Why [`Server::serve_one`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// The frontend closed the connection (or broke the protocol): accept the next one.
    Disconnected,
    /// The shutdown fd became readable.
    Shutdown,
}

/// How long a frontend may take to deliver the rest of a message once its first byte has
/// arrived. Frontends send a message's header, payload and fds in one `sendmsg` (the
/// vhost-user spec's framing: a 12-byte header whose `size` field gives the payload
/// length), so any time limit well above a scheduling delay is safe.
pub const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Make `path` free for a listening socket: a live socket there (someone accepts on it) is
/// an error; a stale one, left by a process that died, is removed.
pub fn claim_socket_path(path: &Path) -> Result<(), ServerError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ServerError::SocketInUse(path.to_owned()));
        }
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// A vhost-user-blk server on a unix socket.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    device: Arc<Mutex<VblkDevice>>,
    message_timeout: Option<Duration>,
    /// A frontend is attached (between accept and disconnect).
    connected: Arc<AtomicBool>,
}

impl Server {
    /// Listen on `path` with permission bits `mode`. A stale socket file (nobody
    /// accepting on it) is replaced; a live one is an error.
    pub fn bind(path: &Path, mode: u32, device: VblkDevice) -> Result<Self, ServerError> {
        claim_socket_path(path)?;
        let bind_err = |source| ServerError::Bind { path: path.to_owned(), source };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_err)?;
        Ok(Server {
            listener,
            path: path.to_owned(),
            device: Arc::new(Mutex::new(device)),
            message_timeout: Some(DEFAULT_MESSAGE_TIMEOUT),
            connected: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Set the message timeout (`None`: wait forever for the rest of a message).
    pub fn set_message_timeout(&mut self, timeout: Option<Duration>) {
        self.message_timeout = timeout;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn device(&self) -> &Arc<Mutex<VblkDevice>> {
        &self.device
    }

    /// True while a frontend is attached (for status displays).
    pub fn connected(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.connected)
    }

    /// Serve frontends one after another until `shutdown` becomes readable.
    pub fn run(&self, shutdown: RawFd) -> Result<(), ServerError> {
        loop {
            if self.serve_one(shutdown)? == ConnectionEnd::Shutdown {
                return Ok(());
            }
        }
    }

    /// Accept one frontend and serve it until it disconnects or `shutdown` fires.
    pub fn serve_one(&self, shutdown: RawFd) -> Result<ConnectionEnd, ServerError> {
        if !wait_readable(self.listener.as_raw_fd(), shutdown)? {
            return Ok(ConnectionEnd::Shutdown);
        }
        let stream = match self.listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                // E.g. EMFILE: the listener stays readable, so back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(std::time::Duration::from_millis(100));
                return Ok(ConnectionEnd::Disconnected);
            }
        };
        tracing::info!("frontend connected");
        self.connected.store(true, Ordering::Relaxed);
        let end = serve_stream_with_timeout(&self.device, stream, shutdown, self.message_timeout);
        self.connected.store(false, Ordering::Relaxed);
        Ok(end)
    }
}

fn lock(device: &Mutex<VblkDevice>) -> std::sync::MutexGuard<'_, VblkDevice> {
    // A panic while holding the lock would be a vblk bug; the state is still usable.
    device.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serve one connected frontend on `stream` until it disconnects or `shutdown` becomes
/// readable; then release everything it set up. Used by in-process loopback (a socketpair
/// instead of a listening socket): no message timeout.
pub fn serve_stream(device: &Arc<Mutex<VblkDevice>>, stream: UnixStream, shutdown: RawFd) -> ConnectionEnd {
    serve_stream_with_timeout(device, stream, shutdown, None)
}

/// [`serve_stream`], disconnecting a frontend that starts a message and does not finish it
/// within `message_timeout` (see `MessageTimer` in this module).
pub fn serve_stream_with_timeout(
    device: &Arc<Mutex<VblkDevice>>,
    stream: UnixStream,
    shutdown: RawFd,
    message_timeout: Option<Duration>,
) -> ConnectionEnd {
    let timer = MessageTimer::default();
    let conn = match message_timeout.map(|_| stream.try_clone()).transpose() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the connection for stalled messages: dropping it");
            return ConnectionEnd::Disconnected;
        }
    };
    std::thread::scope(|s| {
        let watching = conn.as_ref().and_then(|conn| {
            let spawned =
                std::thread::Builder::new().name("vblk-msg-timer".into()).spawn_scoped(s, || timer.run(conn, device));
            spawned.map_err(|e| tracing::error!(error = %e, "cannot start the message timer")).ok()
        });
        let timeout = message_timeout.filter(|_| watching.is_some());
        let end = serve_messages(device, stream, shutdown, &timer, timeout);
        timer.stop();
        end
    })
}

fn serve_messages(
    device: &Arc<Mutex<VblkDevice>>,
    stream: UnixStream,
    shutdown: RawFd,
    timer: &MessageTimer,
    timeout: Option<Duration>,
) -> ConnectionEnd {
    let mut handler = BackendReqHandler::from_stream(stream, Arc::clone(device));
    let end = loop {
        match wait_readable(handler.as_raw_fd(), shutdown) {
            Ok(true) => {}
            Ok(false) => break ConnectionEnd::Shutdown,
            Err(e) => {
                tracing::error!(error = %e, "poll on the connection failed");
                break ConnectionEnd::Disconnected;
            }
        }
        // A message has started: the rest of it must arrive in time.
        if let Some(t) = timeout {
            timer.arm(t);
        }
        // The backend channel's socket, for the device's own use (see `peek_backend_socket`).
        let offered = peek_backend_socket(handler.as_raw_fd());
        let offering = offered.is_some();
        if offering {
            lock(device).offer_backend_socket(offered);
        }
        let r = handler.handle_request();
        if offering {
            // Not taken if the crate refused the message: closed here.
            lock(device).offer_backend_socket(None);
        }
        if timer.disarm() {
            tracing::warn!(timeout = ?timeout.unwrap_or_default(), "frontend stalled in the middle of a message: disconnecting it");
            break ConnectionEnd::Disconnected;
        }
        match r {
            Ok(()) => {}
            Err(VuError::ReqHandlerError(e)) if !lock(device).take_fatal() => {
                // Refused, and the frontend got an error reply (REPLY_ACK) or expects
                // none: keep serving.
                tracing::debug!(error = %e, "request refused");
            }
            Err(VuError::Disconnected | VuError::PartialMessage) => {
                tracing::info!("frontend disconnected");
                break ConnectionEnd::Disconnected;
            }
            Err(e) => {
                tracing::warn!(error = %e, "dropping the frontend connection");
                break ConnectionEnd::Disconnected;
            }
        }
    };
    lock(device).disconnect();
    end
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Ends a connection whose frontend started a message and did not finish sending it in time.
///
/// Armed when the socket becomes readable (a message has started), disarmed when
/// `handle_request` returns. If the deadline passes while the `vhost` crate is still
/// receiving the message, the timer shuts the socket down: the blocked `recvmsg` returns
/// and the message fails. This covers every way a receive can block in the crate: a
/// partial header, a payload shorter than the header's `size` field, and the retry after
/// a header carrying more fds than it accepts (it closes them and reads on). Applying a
/// message happens under the device lock and may legitimately take long (draining a ring's
/// I/O on a slow disk): a deadline that passes while the lock is held means the message
/// was received whole, and is not enforced.
#[derive(Default)]
struct MessageTimer {
    state: Mutex<TimerState>,
    wake: Condvar,
}

#[derive(Default)]
struct TimerState {
    deadline: Option<Instant>,
    fired: bool,
    stop: bool,
}

impl MessageTimer {
    fn lock(&self) -> std::sync::MutexGuard<'_, TimerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn arm(&self, timeout: Duration) {
        self.lock().deadline = Some(Instant::now() + timeout);
        self.wake.notify_one();
    }

    /// Disarm; true if the timer fired (the connection was shut down) since `arm`.
    fn disarm(&self) -> bool {
        let mut s = self.lock();
        s.deadline = None;
        std::mem::take(&mut s.fired)
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_one();
    }

    /// The timer thread: shut `conn` down when an armed deadline passes.
    fn run(&self, conn: &UnixStream, device: &Mutex<VblkDevice>) {
        let mut s = self.lock();
        while !s.stop {
            let Some(deadline) = s.deadline else {
                s = self.wake.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            let now = Instant::now();
            if now < deadline {
                s = self.wake.wait_timeout(s, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
                continue;
            }
            s.deadline = None;
            if matches!(device.try_lock(), Err(TryLockError::WouldBlock)) {
                // The message is being applied: it arrived whole.
                continue;
            }
            s.fired = true;
            if let Err(e) = conn.shutdown(Shutdown::Both) {
                tracing::error!(error = %e, "cannot shut down a stalled connection");
            }
        }
    }
}

/// When the message waiting on the connection `conn` is `SET_BACKEND_REQ_FD` with one fd, a
/// duplicate of that fd (the backend channel's socket), the message itself left in place.
///
/// The `vhost` crate (0.18) wraps the channel in a `Backend` that cannot send
/// `CONFIG_CHANGE_MSG` and keeps its socket private (`device.rs`, "Online resize"). On
/// Linux, peeking (`MSG_PEEK`) at data that carries `SCM_RIGHTS` installs duplicates of the
/// fds in the peeking process and leaves the message, fds included, for the next receive:
/// the crate then receives and checks it as usual. The header is peeked first with no
/// room for fds (so other messages' fds are not duplicated: the kernel drops them from a
/// peek without room), and only a `SET_BACKEND_REQ_FD` is peeked again for its fd. Never
/// blocks; anything unexpected (a partial header, no fd, several) gives `None`.
fn peek_backend_socket(conn: RawFd) -> Option<OwnedFd> {
    const HDR: usize = 12;
    let mut hdr = [0u8; HDR];
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
    // SAFETY: a live buffer of HDR bytes.
    let n = unsafe { libc::recv(conn, hdr.as_mut_ptr().cast(), HDR, flags) };
    if n != HDR as isize
        || u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) != u32::from(FrontendReq::SET_BACKEND_REQ_FD)
    {
        return None;
    }
    // Room for one fd; `u64`s for the alignment of `cmsghdr`.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec { iov_base: hdr.as_mut_ptr().cast(), iov_len: HDR };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is arithmetic.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as _;
    debug_assert!(msg.msg_controllen as usize <= std::mem::size_of_val(&control));
    // SAFETY: `msg` points at `iov` and `control`, both live and of the lengths given.
    let n = unsafe { libc::recvmsg(conn, &mut msg, flags | libc::MSG_CMSG_CLOEXEC) };
    if n <= 0 {
        return None;
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to `msg_controllen`; the CMSG_* macros walk
    // it within that length, and an SCM_RIGHTS payload is an array of fds it installed
    // for us (each owned by us from here on).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    // More fds than room (MSG_CTRUNC) or none: the crate refuses such a message anyway.
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() != 1 {
        return None;
    }
    fds.pop()
}

/// Wait until `fd` is readable (`Ok(true)`) or `shutdown` is (`Ok(false)`).
fn wait_readable(fd: RawFd, shutdown: RawFd) -> Result<bool, ServerError> {
    let mut fds = [
        libc::pollfd { fd: shutdown, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd, events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n >= 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(ServerError::Poll(e));
        }
    }
    Ok(fds[0].revents == 0)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    use vblk_backend::{Disk, EngineKind};
    use vblk_blk::DeviceParams;

    use super::*;
    use crate::DataPlaneOptions;

    /// GET_FEATURES (1), version 1, no payload.
    const GET_FEATURES: [u8; 12] = [1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];

    /// The timer tells a message that is slow to arrive (cut after the timeout) from one
    /// that arrived whole and is slow to apply (the device lock is held: never cut).
    #[test]
    fn only_a_message_still_arriving_is_timed_out() {
        let disk = Arc::new(Disk::null(1 << 20));
        let params = Arc::new(DeviceParams::new(disk.size(), false, 512, "t", 1, 64));
        let opts = DataPlaneOptions { threads: 1, engine: EngineKind::Sync, poll_us: 0, throttle: Arc::default() };
        let dev = Arc::new(Mutex::new(VblkDevice::new(params, disk, opts).unwrap()));
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let (stop, _keep) = UnixStream::pair().unwrap();
        let t = Duration::from_millis(200);
        let d = Arc::clone(&dev);
        let server = std::thread::spawn(move || serve_stream_with_timeout(&d, theirs, stop.as_raw_fd(), Some(t)));
        ours.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

        // A whole message, applied slowly (the device is busy for three timeouts): answered.
        let busy = dev.lock().unwrap();
        ours.write_all(&GET_FEATURES).unwrap();
        std::thread::sleep(t * 3);
        drop(busy);
        let mut reply = [0u8; 20];
        ours.read_exact(&mut reply).expect("the reply to a message that was slow to apply");
        assert_eq!(reply[..4], GET_FEATURES[..4]);

        // Half a header, then nothing: disconnected after the timeout.
        let start = Instant::now();
        ours.write_all(&GET_FEATURES[..6]).unwrap();
        assert_eq!(ours.read(&mut reply).unwrap(), 0, "EOF expected");
        assert!(start.elapsed() >= t, "cut after {:?}", start.elapsed());
        assert_eq!(server.join().unwrap(), ConnectionEnd::Disconnected);
    }
}
