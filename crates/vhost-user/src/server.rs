//! The listening socket and the connection loop: one frontend at a time, then the next
//! (QEMU's `reconnect=` re-attaches to the same daemon).

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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

/// A vhost-user-blk server on a unix socket.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    device: Arc<Mutex<VblkDevice>>,
}

impl Server {
    /// Listen on `path` with permission bits `mode`. A stale socket file (nobody
    /// accepting on it) is replaced; a live one is an error.
    pub fn bind(path: &Path, mode: u32, device: VblkDevice) -> Result<Self, ServerError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::SocketInUse(path.to_owned()));
            }
            let _ = std::fs::remove_file(path);
        }
        let bind_err = |source| ServerError::Bind { path: path.to_owned(), source };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_err)?;
        Ok(Server { listener, path: path.to_owned(), device: Arc::new(Mutex::new(device)) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn device(&self) -> &Arc<Mutex<VblkDevice>> {
        &self.device
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
        Ok(serve_stream(&self.device, stream, shutdown))
    }
}

fn lock(device: &Mutex<VblkDevice>) -> std::sync::MutexGuard<'_, VblkDevice> {
    // A panic while holding the lock would be a vblk bug; the state is still usable.
    device.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serve one connected frontend on `stream` until it disconnects or `shutdown` becomes
/// readable; then release everything it set up. Used by [`Server`] and by in-process
/// loopback (a socketpair instead of a listening socket).
pub fn serve_stream(device: &Arc<Mutex<VblkDevice>>, stream: UnixStream, shutdown: RawFd) -> ConnectionEnd {
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
        match handler.handle_request() {
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
