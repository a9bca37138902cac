//! # vblk-backend: the block-backend layer
//!
//! This crate executes block I/O requests against a *backend*: a raw image
//! file, a host block device, or a `null` device that discards everything.
//!
//! The layer above (the virtio-blk request layer) parses descriptor chains,
//! translates guest-physical addresses into host virtual addresses inside the
//! mmap'd guest memory, and hands us an [`IoOp`] whose data buffers are plain
//! `iovec`s pointing *straight into guest memory*. We never copy data on the
//! normal path: the kernel DMA's (O_DIRECT) or memcpy's (page cache) directly
//! between the guest's pages and the disk.
//!
//! ## Pieces
//!
//! * [`Disk`] (`disk.rs`): an opened backend, shared by every worker thread
//!   through an `Arc<Disk>`. It knows its size, block size, alignment rules,
//!   whether it is read-only, and carries the *sticky flush failure* flag.
//! * [`Engine`] (`engine.rs`): the per-worker submission/completion machinery.
//!   Each worker owns exactly one engine. Three flavours live behind it:
//!   * `uring.rs`: asynchronous, one `io_uring` per engine;
//!   * `sync.rs`: plain blocking syscalls (`preadv`, `pwritev2`,
//!     `fdatasync`, `fallocate`, ioctls), used when io_uring is unavailable,
//!     and also as the helper library for the rare synchronous paths of the
//!     io_uring engine (block-device discard, zero-writing fallback);
//!   * null: completes everything immediately.
//! * `inject.rs`: fault injection for tests ([`FaultSpec`], [`Disk::with_faults`]):
//!   chosen ops fail (EIO, ENOSPC), transfer short, or start late.
//! * `qcow2/`: qcow2 images and backing chains (imago); `rbd.rs`: Ceph RBD images
//!   (librbd, through `crates/rbd`), each behind the same [`Engine`].
//! * `bounce.rs`: aligned bounce buffers and iovec helpers for the rare case
//!   where guest buffers do not satisfy O_DIRECT's alignment rules.
//!
//! ## Life of an op
//!
//! ```text
//! worker: engine.push(op)  (any number of times, up to `depth` in flight)
//!         engine.submit()  (one io_uring_enter for the batch)
//!         poll(engine.completion_fd())
//!         engine.reap(&mut completions)  -> Completion { op, result }
//! ```
//!
//! The `IoOp` (including its `iovs` Vec) is handed back inside the
//! [`Completion`], so the caller can recycle the Vec's allocation and the
//! hot path performs no heap allocation.

#![deny(unsafe_op_in_unsafe_fn)]

mod bounce;
mod disk;
mod engine;
mod inject;
mod mailbox;
pub mod qcow2;
pub mod rbd;
mod sync;
mod sys;
mod uring;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;

pub use disk::{Disk, DiskOptions, Flusher};
pub use engine::{Engine, EngineKind, INLINE_BATCH, MAX_DEPTH};
pub use inject::{FaultSpec, FaultSpecError, Faults};
pub use vblk_rbd::RbdError;

/// What an [`IoOp`] asks the backend to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Read `len` bytes at `offset` into the iovecs.
    Read,
    /// Write `len` bytes from the iovecs at `offset`.
    Write,
    /// Make every previously *completed* write durable (`fdatasync`).
    Flush,
    /// Tell the backend the range is no longer needed. Afterwards the range
    /// reads back as zeros on files (hole punching), but callers must not
    /// rely on that for block devices.
    Discard,
    /// Make the range read back as zeros. With `unmap`, the backend may also
    /// deallocate it (punch a hole) instead of writing zeros.
    WriteZeroes {
        /// Deallocation is allowed (virtio `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`).
        unmap: bool,
    },
}

impl OpKind {
    /// Whether this kind modifies the disk (rejected on read-only disks).
    pub fn is_write_like(self) -> bool {
        matches!(self, OpKind::Write | OpKind::Discard | OpKind::WriteZeroes { .. })
    }

    /// Short lowercase name, used in error contexts and logs.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Discard => "discard",
            OpKind::WriteZeroes { .. } => "write-zeroes",
        }
    }
}

/// One block I/O operation.
///
/// Besides the `iovs` pointers this is plain data; the pointers are only
/// dereferenced by the engine under the contract of [`Engine::push`].
#[derive(Debug)]
pub struct IoOp {
    /// What to do.
    pub kind: OpKind,
    /// Byte offset in the disk (a multiple of 512, range already checked by
    /// the caller; the engine re-checks it anyway).
    pub offset: u64,
    /// Length in bytes. For `Read`/`Write` it must equal the sum of the
    /// iovec lengths; for `Discard`/`WriteZeroes` it is the range length;
    /// ignored for `Flush`.
    pub len: u64,
    /// Data buffers (`Read`/`Write` only), usually pointing into guest
    /// memory. Handed back in the [`Completion`] so callers can recycle the
    /// allocation.
    pub iovs: Vec<libc::iovec>,
    /// Force unit access: a `Write`/`Discard`/`WriteZeroes` must be durable
    /// when it completes (write-through cache mode).
    pub fua: bool,
    /// The caller's cookie, returned untouched.
    pub tag: u64,
}

// SAFETY: `IoOp` is `!Send` only because `libc::iovec` holds a raw pointer.
// Those pointers are addresses into memory whose validity is promised by the
// caller of the `unsafe` `Engine::push`; that promise is about lifetime, not
// about which thread touches the memory (guest memory is shared by all
// threads anyway). Making `IoOp` (and therefore `Engine`) `Send` lets a
// daemon build engines on its main thread and move them into workers.
unsafe impl Send for IoOp {}

impl IoOp {
    /// Convenience constructor for ops without data buffers
    /// (`Flush`, `Discard`, `WriteZeroes`).
    pub fn without_data(kind: OpKind, offset: u64, len: u64, fua: bool, tag: u64) -> IoOp {
        IoOp { kind, offset, len, iovs: Vec::new(), fua, tag }
    }
}

/// A finished [`IoOp`].
#[derive(Debug)]
pub struct Completion {
    /// The op, handed back (with its iovec Vec) for recycling.
    pub op: IoOp,
    /// `Ok(bytes transferred)`: `len` for `Read`/`Write`, 0 for the others.
    pub result: Result<u64, BackendError>,
}

/// Every error this layer reports.
///
/// I/O errors keep their errno (see [`BackendError::raw_os_error`]) so the
/// request layer can decide between `VIRTIO_BLK_S_IOERR` and
/// `VIRTIO_BLK_S_UNSUPP`.
#[derive(thiserror::Error, Debug)]
pub enum BackendError {
    /// A system call failed while doing `op` (e.g. "read", "flush",
    /// "io_uring_enter").
    #[error("{op} failed: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The OS error, errno preserved.
        #[source]
        source: io::Error,
    },
    /// A write-like op on a read-only disk.
    #[error("disk is read-only")]
    ReadOnly,
    /// The op does not fit inside the disk.
    #[error("request out of range: offset {offset} + length {len} exceeds disk size {size}")]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Disk size in bytes.
        size: u64,
    },
    /// An earlier flush failed. The page cache may have dropped dirty data,
    /// so no later flush may report success (see `Disk::flush_failed`).
    #[error("an earlier flush failed; refusing to report durability")]
    FlushFailedEarlier,
    /// Opening (or creating) the backing file failed.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        /// The path we tried to open.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The op is malformed (e.g. `len` differs from the iovec total).
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
    /// A disk size that cannot be: zero, or not a multiple of 512 and of the logical
    /// block size ([`Disk::resize`]).
    #[error("invalid size {size}: a disk size is a non-zero multiple of {align} bytes")]
    BadSize {
        /// The size asked for, in bytes.
        size: u64,
        /// The alignment it must have.
        align: u32,
    },
    /// This backend cannot do what was asked (e.g. shrinking a qcow2 image).
    #[error("{0} is not supported")]
    Unsupported(&'static str),
    /// `io_uring` could not be set up (kernel too old, disabled by sysctl or
    /// seccomp, or missing a required opcode).
    #[error("io_uring unavailable: {0}")]
    UringUnavailable(#[source] io::Error),
}

impl BackendError {
    /// Build a [`BackendError::Io`] from a positive errno value.
    pub(crate) fn errno(op: &'static str, errno: i32) -> BackendError {
        BackendError::Io { op, source: io::Error::from_raw_os_error(errno) }
    }

    /// The errno behind this error, if it came from the OS.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            BackendError::Io { source, .. }
            | BackendError::Open { source, .. }
            | BackendError::UringUnavailable(source) => source.raw_os_error(),
            _ => None,
        }
    }

    /// Whether the op is simply not supported by this backend (`EOPNOTSUPP`
    /// and friends), as opposed to having failed.
    pub fn is_unsupported(&self) -> bool {
        sync::is_unsupported(self.raw_os_error())
    }
}

/// Parse a byte size with an optional binary suffix (K, M, G, T, P; `iB`/`B` allowed):
/// `1G`, `512M`, `4096`, `10GiB`, `1.5T`. Used by fault specs and the command line.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        "p" | "pb" | "pib" => 1 << 50,
        other => return Err(format!("unknown size unit '{other}' in '{s}' (use K, M, G, T)")),
    };
    let bad = || format!("invalid size '{s}'");
    let bytes = if num.contains('.') {
        let v: f64 = num.parse().map_err(|_| bad())?;
        let b = v * mult as f64;
        if !b.is_finite() || b < 0.0 || b >= u64::MAX as f64 {
            return Err(bad());
        }
        b as u64
    } else {
        num.parse::<u64>().map_err(|_| bad())?.checked_mul(mult).ok_or_else(bad)?
    };
    Ok(bytes)
}
