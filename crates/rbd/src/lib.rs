//! # vblk-rbd: Ceph RBD images through librbd
//!
//! The groundwork for serving RBD images (`rbd:POOL/IMAGE[@SNAP]`): FFI to
//! librados/librbd generated with bindgen from the system headers (Debian's
//! `librbd-dev`), and a small safe wrapper around the parts vblk needs.
//!
//! * [`Cluster`]: a connection to a Ceph cluster (`rados_t`), configured from a
//!   `ceph.conf`, `$CEPH_ARGS` and explicit options. Shared by every image
//!   opened from it; disconnected when the last of them is gone.
//! * [`Image`]: an open image (`rbd_image_t`, with its `rados_ioctx_t`). Its I/O
//!   is asynchronous only: `aio_readv` / `aio_writev` (raw iovecs, `unsafe`: the
//!   buffers must outlive the op), `aio_discard`, `aio_write_zeroes`,
//!   `aio_flush`, each carrying the caller's `u64` tag.
//!
//! ## Completions
//!
//! librbd runs every op on its own threads. The image is bound to an eventfd
//! with `rbd_set_image_notification(.., EVENT_TYPE_EVENTFD)`, so each finished op
//! is queued inside librbd and the eventfd becomes readable; no callback runs on
//! a librbd thread and there is no thread hop on our side. The owner polls
//! [`Image::completion_fd`] with its other fds and collects the finished ops with
//! [`Image::poll_completions`] (`rbd_poll_io_events`), as `(tag, result)` pairs:
//! `result` is `rbd_aio_get_return_value`, the byte count for a read, 0 for the
//! other ops, or a negative errno. Each `rbd_completion_t` is released there.
//!
//! ```text
//! owner: unsafe { image.aio_writev(&iovs, offset, tag) }?   (any number)
//!        poll(image.completion_fd())
//!        image.poll_completions(&mut done)?   -> [(tag, result), ...]
//! ```
//!
//! ## Safety
//!
//! All `unsafe` code is in two modules: `ffi` (the generated declarations) and
//! `client` (the wrapper); the rest of the crate denies `unsafe_code`.

#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

#[allow(unsafe_code)]
mod client;
#[allow(unsafe_code)]
mod ffi;

use std::io;

pub use client::{librbd_version, Cluster, Image};

/// Every error this crate reports. Errors from librados/librbd keep their errno.
#[derive(thiserror::Error, Debug)]
pub enum RbdError {
    /// A librados/librbd call returned a negative errno.
    #[error("{call}({target}) failed: {}", io::Error::from_raw_os_error(*errno))]
    Ceph {
        /// The C function, e.g. `"rbd_open"`.
        call: &'static str,
        /// What it was called on, e.g. `"rbd/disk0@snap"` or a config option's name.
        target: String,
        /// The positive errno (`ENOENT`, `EROFS`, ...).
        errno: i32,
    },
    /// A system call of the wrapper's own failed (eventfd, poll).
    #[error("{call} failed: {source}")]
    Os {
        /// The system call.
        call: &'static str,
        /// The OS error, errno preserved.
        #[source]
        source: io::Error,
    },
    /// An argument the C API cannot take (a name with a NUL byte, too many iovecs).
    #[error("invalid {what}: {value}")]
    InvalidArgument {
        /// Which argument.
        what: &'static str,
        /// Its value, as text.
        value: String,
    },
}

impl RbdError {
    /// The errno behind this error, if there is one (`EINVAL` for an invalid argument).
    pub fn errno(&self) -> Option<i32> {
        match self {
            RbdError::Ceph { errno, .. } => Some(*errno),
            RbdError::Os { source, .. } => source.raw_os_error(),
            RbdError::InvalidArgument { .. } => Some(libc::EINVAL),
        }
    }

    /// Turns a librados/librbd return value (`>= 0` success, `< 0` a negative errno)
    /// into a result.
    pub(crate) fn check(ret: i64, call: &'static str, target: impl FnOnce() -> String) -> Result<i64, RbdError> {
        if ret < 0 {
            let errno = i32::try_from(-ret).unwrap_or(libc::EIO);
            Err(RbdError::Ceph { call, target: target(), errno })
        } else {
            Ok(ret)
        }
    }
}
