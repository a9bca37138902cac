//! The safe wrapper around the generated bindings: [`Cluster`] and [`Image`].
//!
//! Every FFI call of the crate is in this file. Handles are owned by small RAII
//! types and released in the order librados/librbd require: each image is closed
//! before its I/O context is destroyed, and the cluster is shut down after the
//! last I/O context (an [`Image`] keeps its [`Cluster`] alive through an `Arc`).

use std::ffi::{c_int, c_void, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ffi;
use crate::RbdError;

// Tags travel through librbd as the completion's `void *` argument.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("vblk-rbd passes u64 tags through librbd's `void *` completion argument: 64-bit targets only");

/// How many completions one `rbd_poll_io_events` call may return.
const POLL_BATCH: usize = 64;

/// librbd's version, `(major, minor, extra)`: (1, 16, 0) for Ceph 16 (Pacific).
pub fn librbd_version() -> (i32, i32, i32) {
    let (mut major, mut minor, mut extra) = (0, 0, 0);
    // SAFETY: rbd_version only stores through the three pointers, which point at live locals.
    unsafe { ffi::rbd_version(&mut major, &mut minor, &mut extra) };
    (major, minor, extra)
}

fn cstring(what: &'static str, value: &str) -> Result<CString, RbdError> {
    CString::new(value).map_err(|_| RbdError::InvalidArgument { what, value: value.to_string() })
}

/// An owned `rados_t`, shut down on drop.
struct RadosHandle(ffi::rados_t);

// SAFETY: a `rados_t` is a handle to librados' thread-safe client (its own threads use it
// concurrently); librados documents no thread affinity for it, and after `rados_connect`
// all its calls may come from any thread.
unsafe impl Send for RadosHandle {}
// SAFETY: as above: the librados client object locks internally.
unsafe impl Sync for RadosHandle {}

impl Drop for RadosHandle {
    fn drop(&mut self) {
        // SAFETY: the handle came from a successful rados_create and is shut down once,
        // here; every I/O context made from it is destroyed first (each holds an `Arc` of us).
        unsafe { ffi::rados_shutdown(self.0) };
    }
}

/// A connection to a Ceph cluster.
///
/// Cheap to clone (an `Arc`); the connection is shut down when the last clone and
/// the last [`Image`] opened from it are dropped.
#[derive(Clone)]
pub struct Cluster {
    handle: Arc<RadosHandle>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects to the cluster described by `conf` (a `ceph.conf`), as client `id`
    /// (`"admin"` when `None`, i.e. `client.admin`).
    ///
    /// Without `conf`, librados' default search applies (`$CEPH_CONF`,
    /// `/etc/ceph/ceph.conf`, `~/.ceph/config`, `./ceph.conf`) and finding no file is
    /// not an error by itself. `$CEPH_ARGS` is applied on top in both cases.
    ///
    /// Blocks until the monitors answer, for at most `client_mount_timeout`
    /// (300 s by default; see [`Cluster::connect_with_options`]).
    pub fn connect(conf: Option<&Path>, id: Option<&str>) -> Result<Cluster, RbdError> {
        Cluster::connect_with_options(conf, id, &[], &[])
    }

    /// [`Cluster::connect`] with settings (`rados_conf_set`): `defaults` before the
    /// configuration file and `$CEPH_ARGS` are read (they win over them), `options` after
    /// (e.g. `("client_mount_timeout", "10")`, `("rados_osd_op_timeout", "30")`).
    pub fn connect_with_options(
        conf: Option<&Path>,
        id: Option<&str>,
        defaults: &[(&str, &str)],
        options: &[(&str, &str)],
    ) -> Result<Cluster, RbdError> {
        let id_c = id.map(|s| cstring("client id", s)).transpose()?;
        let conf_c = conf
            .map(|p| {
                let s = p.to_str().ok_or_else(|| RbdError::InvalidArgument {
                    what: "ceph.conf path",
                    value: p.display().to_string(),
                })?;
                cstring("ceph.conf path", s)
            })
            .transpose()?;
        let to_c = |settings: &[(&str, &str)]| {
            settings
                .iter()
                .map(|(k, v)| Ok((cstring("config option", k)?, cstring("config value", v)?)))
                .collect::<Result<Vec<_>, RbdError>>()
        };
        let (defaults_c, options_c) = (to_c(defaults)?, to_c(options)?);

        let mut raw: ffi::rados_t = ptr::null_mut();
        let id_ptr = id_c.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        // SAFETY: `raw` is a valid out-pointer; `id_ptr` is NULL or a NUL-terminated string
        // that outlives the call (librados copies it).
        let ret = unsafe { ffi::rados_create(&mut raw, id_ptr) };
        RbdError::check(ret.into(), "rados_create", || id.unwrap_or("admin").to_string())?;
        // From here on the handle is owned: every early return shuts it down.
        let handle = RadosHandle(raw);

        let set = |settings: &[(CString, CString)], names: &[(&str, &str)]| {
            for ((k, v), (key, _)) in settings.iter().zip(names) {
                // SAFETY: not yet connected; both strings are NUL-terminated and alive for the call.
                let ret = unsafe { ffi::rados_conf_set(handle.0, k.as_ptr(), v.as_ptr()) };
                RbdError::check(ret.into(), "rados_conf_set", || key.to_string())?;
            }
            Ok::<(), RbdError>(())
        };
        set(&defaults_c, defaults)?;
        let conf_ptr = conf_c.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        // SAFETY: the handle is created and not yet connected; `conf_ptr` is NULL (search
        // the default locations) or a NUL-terminated path alive for the call.
        let ret = unsafe { ffi::rados_conf_read_file(handle.0, conf_ptr) };
        if !(conf.is_none() && ret == -libc::ENOENT) {
            RbdError::check(ret.into(), "rados_conf_read_file", || {
                conf.map_or_else(|| "default locations".to_string(), |p| p.display().to_string())
            })?;
        }
        // SAFETY: as above; NULL means the variable `CEPH_ARGS`.
        let ret = unsafe { ffi::rados_conf_parse_env(handle.0, ptr::null()) };
        RbdError::check(ret.into(), "rados_conf_parse_env", || "CEPH_ARGS".to_string())?;
        set(&options_c, options)?;
        // SAFETY: a configured, not yet connected handle.
        let ret = unsafe { ffi::rados_connect(handle.0) };
        RbdError::check(ret.into(), "rados_connect", || {
            conf.map_or_else(|| "default ceph.conf".to_string(), |p| p.display().to_string())
        })?;
        Ok(Cluster { handle: Arc::new(handle) })
    }

    /// Opens `pool/image`, at snapshot `snap` if given, read-only if `readonly`
    /// (`rbd_open_read_only`: no watch on the header, so no exclusive lock is
    /// taken). An image opened at a snapshot is read-only too: librbd fails its
    /// writes with `EROFS`.
    ///
    /// The image is bound to a fresh eventfd ([`Image::completion_fd`]) that
    /// signals finished I/O.
    pub fn open_image(&self, pool: &str, image: &str, snap: Option<&str>, readonly: bool) -> Result<Image, RbdError> {
        let spec = match snap {
            Some(s) => format!("{pool}/{image}@{s}"),
            None => format!("{pool}/{image}"),
        };
        let pool_c = cstring("pool name", pool)?;
        let image_c = cstring("image name", image)?;
        let snap_c = snap.map(|s| cstring("snapshot name", s)).transpose()?;

        let mut raw_ioctx: ffi::rados_ioctx_t = ptr::null_mut();
        // SAFETY: the cluster handle is connected (Cluster only exists after rados_connect);
        // `pool_c` is NUL-terminated and alive; `raw_ioctx` is a valid out-pointer.
        let ret = unsafe { ffi::rados_ioctx_create(self.handle.0, pool_c.as_ptr(), &mut raw_ioctx) };
        RbdError::check(ret.into(), "rados_ioctx_create", || pool.to_string())?;
        let ioctx = IoCtx { raw: raw_ioctx, _cluster: Arc::clone(&self.handle) };

        let mut raw: ffi::rbd_image_t = ptr::null_mut();
        let snap_ptr = snap_c.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        // SAFETY: a live I/O context; NUL-terminated names alive for the call (librbd copies
        // them); `snap_ptr` NULL means the image head; `raw` is a valid out-pointer.
        let ret = unsafe {
            if readonly {
                ffi::rbd_open_read_only(ioctx.raw, image_c.as_ptr(), &mut raw, snap_ptr)
            } else {
                ffi::rbd_open(ioctx.raw, image_c.as_ptr(), &mut raw, snap_ptr)
            }
        };
        let call = if readonly { "rbd_open_read_only" } else { "rbd_open" };
        RbdError::check(ret.into(), call, || spec.clone())?;

        // Completions are signalled on a non-blocking eventfd; on failure below, closing
        // the image undoes the open.
        let close_on_error = |err: RbdError| {
            // SAFETY: `raw` was opened above, has no I/O in flight, and is closed once, here.
            unsafe { ffi::rbd_close(raw) };
            err
        };
        // SAFETY: eventfd takes no pointers.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(close_on_error(RbdError::Os { call: "eventfd", source: std::io::Error::last_os_error() }));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let event_fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an open image and a live eventfd, which the image keeps (in `Image`) for
        // as long as librbd may write to it.
        let ret = unsafe { ffi::rbd_set_image_notification(raw, fd, ffi::EVENT_TYPE_EVENTFD as c_int) };
        RbdError::check(ret.into(), "rbd_set_image_notification", || spec.clone()).map_err(close_on_error)?;

        Ok(Image {
            raw,
            event_fd,
            in_flight: AtomicUsize::new(0),
            read_only: readonly || snap.is_some(),
            spec,
            _ioctx: ioctx,
        })
    }
}

/// An owned `rados_ioctx_t`; it keeps the cluster connected while it lives.
struct IoCtx {
    raw: ffi::rados_ioctx_t,
    _cluster: Arc<RadosHandle>,
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: the context came from a successful rados_ioctx_create, is destroyed once,
        // here, after the image opened on it was closed (Image::drop runs before its fields
        // drop), and before the cluster handle (held by `_cluster`) is shut down.
        unsafe { ffi::rados_ioctx_destroy(self.raw) };
    }
}

/// An open RBD image with asynchronous I/O.
///
/// Submit with the `aio_*` methods, then collect the results with
/// [`Image::poll_completions`] once [`Image::completion_fd`] is readable (or with
/// [`Image::wait_completions`]). Dropping the image waits for every op still in
/// flight, then closes it.
///
/// `Send` and `Sync`: several threads may submit and collect on one image (librbd
/// locks internally); a thread may then collect another's completions, so the tags
/// must tell their owner apart (vblk's workers route them, `vblk-backend`'s `rbd.rs`).
pub struct Image {
    raw: ffi::rbd_image_t,
    event_fd: OwnedFd,
    /// Ops submitted and not yet returned by `poll_completions`.
    in_flight: AtomicUsize,
    read_only: bool,
    /// `pool/image[@snap]`, for errors and logs.
    spec: String,
    // Dropped after `Image::drop` closed the image.
    _ioctx: IoCtx,
}

// SAFETY: librbd image handles may be used from any thread (librbd serializes internally;
// the C API has no thread affinity), and the eventfd and in-flight count move with the image.
// The raw iovec pointers of in-flight ops are the submitter's promise (see `aio_readv`),
// which is about lifetime, not about threads.
unsafe impl Send for Image {}
// SAFETY: every librbd call used here may be made concurrently on one image (librbd's
// ImageCtx takes its own locks; its queue of finished ops is a concurrent queue), and the
// wrapper's own state is an atomic counter and an eventfd.
unsafe impl Sync for Image {}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("spec", &self.spec)
            .field("read_only", &self.read_only)
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Which asynchronous op, for submission.
#[derive(Clone, Copy)]
enum AioOp<'a> {
    Readv(&'a [libc::iovec]),
    Writev(&'a [libc::iovec]),
    Discard(u64),
    WriteZeroes(u64),
    Flush,
}

impl Image {
    /// `pool/image` or `pool/image@snap`.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// Whether the image was opened read-only or at a snapshot (librbd fails writes
    /// with `EROFS` then).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The image's current size in bytes (`rbd_get_size`; it changes when the image is resized).
    pub fn size(&self) -> Result<u64, RbdError> {
        let mut size = 0u64;
        // SAFETY: an open image and a valid out-pointer.
        let ret = unsafe { ffi::rbd_get_size(self.raw, &mut size) };
        RbdError::check(ret.into(), "rbd_get_size", || self.spec.clone())?;
        Ok(size)
    }

    /// Resizes the image to `size` bytes (`rbd_resize`, blocking). Growing adds space that
    /// reads as zeros; shrinking deletes the data past the new end. `EROFS` on an image
    /// opened read-only or at a snapshot.
    pub fn resize(&self, size: u64) -> Result<(), RbdError> {
        // SAFETY: an open image.
        let ret = unsafe { ffi::rbd_resize(self.raw, size) };
        RbdError::check(ret.into(), "rbd_resize", || self.spec.clone()).map(drop)
    }

    /// The eventfd that becomes readable when ops finish: poll it for `POLLIN`, then
    /// call [`Image::poll_completions`]. Never read it yourself.
    pub fn completion_fd(&self) -> BorrowedFd<'_> {
        self.event_fd.as_fd()
    }

    /// Ops submitted and not yet returned by [`Image::poll_completions`].
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Takes the image's exclusive lock and keeps it (`rbd_lock_acquire`): librbd then no
    /// longer hands it over when another client asks, so that client's writes fail
    /// (`EROFS`) and its own `lock_exclusive` fails. Fails (`EROFS`, `EBUSY`) if another
    /// client holds the lock and will not release it; `EINVAL` if the image has no
    /// exclusive-lock feature.
    pub fn lock_exclusive(&self) -> Result<(), RbdError> {
        // SAFETY: an open image.
        let ret = unsafe { ffi::rbd_lock_acquire(self.raw, ffi::rbd_lock_mode_t_RBD_LOCK_MODE_EXCLUSIVE) };
        RbdError::check(ret.into(), "rbd_lock_acquire", || self.spec.clone()).map(drop)
    }

    /// Writes back librbd's cache and waits for it (`rbd_flush`, blocking): for shutdown.
    pub fn flush_blocking(&self) -> Result<(), RbdError> {
        // SAFETY: an open image.
        let ret = unsafe { ffi::rbd_flush(self.raw) };
        RbdError::check(ret.into(), "rbd_flush", || self.spec.clone()).map(drop)
    }

    /// Reads `offset..offset + total length of iovs` into `iovs` (`rbd_aio_readv`).
    /// The completion's result is the byte count read, or a negative errno.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that is valid for writes and that nothing
    /// else reads or writes from this call until the completion carrying `tag` has
    /// been returned by [`Image::poll_completions`] or [`Image::wait_completions`]
    /// (dropping the image also waits for it). The iovec array itself need only live
    /// for the call.
    pub unsafe fn aio_readv(&self, iovs: &[libc::iovec], offset: u64, tag: u64) -> Result<(), RbdError> {
        self.submit(AioOp::Readv(iovs), offset, tag)
    }

    /// Writes the bytes of `iovs` at `offset` (`rbd_aio_writev`). The completion's
    /// result is 0, or a negative errno (`EROFS` on a read-only image).
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that is valid for reads and that nothing
    /// writes from this call until the completion carrying `tag` has been returned by
    /// [`Image::poll_completions`] or [`Image::wait_completions`] (dropping the image
    /// also waits for it). The iovec array itself need only live for the call.
    pub unsafe fn aio_writev(&self, iovs: &[libc::iovec], offset: u64, tag: u64) -> Result<(), RbdError> {
        self.submit(AioOp::Writev(iovs), offset, tag)
    }

    /// Discards `offset..offset + len` (`rbd_aio_discard`): the range reads back as
    /// zeros afterwards for whole objects; librbd may zero partial objects instead of
    /// deallocating them.
    pub fn aio_discard(&self, offset: u64, len: u64, tag: u64) -> Result<(), RbdError> {
        self.submit(AioOp::Discard(len), offset, tag)
    }

    /// Makes `offset..offset + len` read back as zeros (`rbd_aio_write_zeroes`, no flags:
    /// librbd may deallocate instead of writing zeros).
    pub fn aio_write_zeroes(&self, offset: u64, len: u64, tag: u64) -> Result<(), RbdError> {
        self.submit(AioOp::WriteZeroes(len), offset, tag)
    }

    /// Makes every write that completed before this call durable (`rbd_aio_flush`;
    /// with the librbd cache on, this writes the cache back).
    pub fn aio_flush(&self, tag: u64) -> Result<(), RbdError> {
        self.submit(AioOp::Flush, 0, tag)
    }

    fn submit(&self, op: AioOp<'_>, offset: u64, tag: u64) -> Result<(), RbdError> {
        let iovcnt = |iovs: &[libc::iovec]| {
            c_int::try_from(iovs.len())
                .map_err(|_| RbdError::InvalidArgument { what: "iovec count", value: iovs.len().to_string() })
        };
        // Check what can fail before creating the completion.
        let (call, count, len) = match op {
            AioOp::Readv(iovs) => ("rbd_aio_readv", iovcnt(iovs)?, 0),
            AioOp::Writev(iovs) => ("rbd_aio_writev", iovcnt(iovs)?, 0),
            AioOp::Discard(len) => ("rbd_aio_discard", 0, len),
            AioOp::WriteZeroes(len) => ("rbd_aio_write_zeroes", 0, len),
            AioOp::Flush => ("rbd_aio_flush", 0, 0),
        };

        let mut comp: ffi::rbd_completion_t = ptr::null_mut();
        // SAFETY: no callback (completions are reaped through the eventfd); the argument is
        // the tag as an opaque pointer-sized value that librbd never dereferences (64-bit
        // targets only, see the compile_error above); `comp` is a valid out-pointer.
        let ret = unsafe { ffi::rbd_aio_create_completion(tag as usize as *mut c_void, None, &mut comp) };
        RbdError::check(ret.into(), "rbd_aio_create_completion", || self.spec.clone())?;

        // SAFETY: an open image and a fresh completion, handed to librbd. For readv/writev,
        // the iovec array is read during the call only, and the memory it describes stays
        // valid until the completion is reaped: that is the contract of the `unsafe`
        // `aio_readv`/`aio_writev`, the only callers passing iovecs. The other ops carry no
        // buffers.
        let ret = unsafe {
            match op {
                AioOp::Readv(iovs) => ffi::rbd_aio_readv(self.raw, iovs.as_ptr(), count, offset, comp),
                AioOp::Writev(iovs) => ffi::rbd_aio_writev(self.raw, iovs.as_ptr(), count, offset, comp),
                AioOp::Discard(_) => ffi::rbd_aio_discard(self.raw, offset, len, comp),
                AioOp::WriteZeroes(_) => ffi::rbd_aio_write_zeroes(self.raw, offset, len as usize, comp, 0, 0),
                AioOp::Flush => ffi::rbd_aio_flush(self.raw, comp),
            }
        };
        if ret < 0 {
            // Refused before being queued (e.g. EINVAL for a bad iovec): librbd did not take
            // the completion, so it is ours to release, and it will never be signalled.
            // SAFETY: the completion is unused by librbd and released once, here.
            unsafe { ffi::rbd_aio_release(comp) };
            return RbdError::check(ret.into(), call, || format!("{} offset {offset}", self.spec)).map(drop);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Appends every finished op to `out` as `(tag, result)` (result: bytes read for a
    /// read, 0 for the others, or a negative errno) and returns how many it appended.
    /// Non-blocking; returns 0 when nothing has finished.
    ///
    /// librbd queues a finished op before it signals the eventfd, so the fd can turn
    /// readable after this call already returned that op: a wake-up may yield nothing.
    pub fn poll_completions(&self, out: &mut Vec<(u64, i64)>) -> Result<usize, RbdError> {
        self.reset_completion_fd()?;
        self.collect(out)
    }

    /// Clears the eventfd (non-blocking). Call before [`Image::collect`]: an op that
    /// finishes after the collection signals it again, so a wake-up is never lost.
    pub fn reset_completion_fd(&self) -> Result<(), RbdError> {
        let mut counter = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from the eventfd we own (non-blocking).
        let n = unsafe { libc::read(self.event_fd.as_raw_fd(), (&mut counter as *mut u64).cast(), 8) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::WouldBlock && err.kind() != std::io::ErrorKind::Interrupted {
                return Err(RbdError::Os { call: "read(eventfd)", source: err });
            }
        }
        Ok(())
    }

    /// Appends the finished ops to `out` like [`Image::poll_completions`], without
    /// touching the eventfd (no system call: for a caller that is busy-polling).
    pub fn collect(&self, out: &mut Vec<(u64, i64)>) -> Result<usize, RbdError> {
        let mut total = 0;
        let mut comps: [ffi::rbd_completion_t; POLL_BATCH] = [ptr::null_mut(); POLL_BATCH];
        loop {
            // SAFETY: an open image; `comps` has room for POLL_BATCH handles.
            let n = unsafe { ffi::rbd_poll_io_events(self.raw, comps.as_mut_ptr(), POLL_BATCH as c_int) };
            let n = RbdError::check(n.into(), "rbd_poll_io_events", || self.spec.clone())? as usize;
            for &comp in &comps[..n] {
                // SAFETY: `comp` is a finished completion that librbd just handed back to us,
                // created by `submit`; it is read, then released once, here.
                let (tag, result) = unsafe {
                    let tag = ffi::rbd_aio_get_arg(comp) as usize as u64;
                    let result = ffi::rbd_aio_get_return_value(comp) as i64;
                    ffi::rbd_aio_release(comp);
                    (tag, result)
                };
                out.push((tag, result));
            }
            total += n;
            self.in_flight.fetch_sub(n, Ordering::AcqRel);
            if n < POLL_BATCH {
                return Ok(total);
            }
        }
    }

    /// Like [`Image::poll_completions`], but when nothing has finished yet, waits for
    /// the eventfd for at most `timeout` (forever with `None`). Returns 0 on a timeout
    /// or when nothing is in flight.
    pub fn wait_completions(&self, out: &mut Vec<(u64, i64)>, timeout: Option<Duration>) -> Result<usize, RbdError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let n = self.poll_completions(out)?;
            if n > 0 || self.in_flight() == 0 {
                return Ok(n);
            }
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(0);
                    }
                    // Round up so a sub-millisecond remainder still waits.
                    c_int::try_from(left.as_micros().div_ceil(1000)).unwrap_or(c_int::MAX)
                }
            };
            let mut pfd = libc::pollfd { fd: self.event_fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one live pollfd.
            let ret = unsafe { libc::poll(&mut pfd, 1, ms) };
            if ret < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(RbdError::Os { call: "poll(eventfd)", source: err });
                }
            }
        }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // librbd would still write into (or read from) the buffers of ops in flight, and
        // their completions would leak: wait for them all first.
        if self.in_flight() > 0 {
            tracing::debug!(image = %self.spec, in_flight = self.in_flight(), "close: waiting for I/O in flight");
        }
        let mut done = Vec::new();
        while self.in_flight() > 0 {
            done.clear();
            if let Err(e) = self.wait_completions(&mut done, None) {
                // Cannot happen with a valid eventfd; closing waits for librbd's ops anyway.
                tracing::warn!(image = %self.spec, "close: {e}");
                break;
            }
        }
        // SAFETY: an open image with nothing in flight, closed once, here; its I/O context
        // (a field) is destroyed after this.
        let ret = unsafe { ffi::rbd_close(self.raw) };
        if ret < 0 {
            tracing::warn!(image = %self.spec, "rbd_close failed: {}", std::io::Error::from_raw_os_error(-ret));
        }
    }
}
