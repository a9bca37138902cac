//! The synchronous engine, and the synchronous building blocks shared with
//! the io_uring engine.
//!
//! [`SyncEngine`] is the fallback when io_uring is unavailable: `push` only
//! queues the op; `submit` executes every queued op with ordinary blocking
//! system calls (`preadv`, `pwritev2`, `fdatasync`, `fallocate`, ioctls) and
//! queues the completions, after which the engine front (`engine.rs`)
//! signals the completion eventfd.
//!
//! The free functions ([`flush`], [`discard_or_zero`], ...) are also used by
//! the io_uring engine for the few things it does synchronously: block-device
//! discard/write-zeroes (there is no io_uring opcode for `BLKDISCARD`) and the
//! write-zeroes fallback when `fallocate` is not supported.

use std::collections::VecDeque;
use std::io;
use std::os::fd::BorrowedFd;

use crate::bounce::{self, advance_iovecs, BounceBuf};
use crate::disk::{Disk, FdChoice, Flusher};
use crate::{sys, BackendError, Completion, IoOp, OpKind};

/// The synchronous engine: see the module docs.
#[derive(Debug)]
pub(crate) struct SyncEngine {
    /// Pushed, not yet executed.
    pending: VecDeque<IoOp>,
    /// Scratch iovec list for continuing short transfers (kept to reuse its
    /// allocation).
    work: Vec<libc::iovec>,
    /// This engine's description for `fdatasync` (see `disk.rs`); the main fd if none.
    flusher: Option<Flusher>,
}

// SAFETY: `SyncEngine` is `!Send` only through the raw pointers in the
// scratch iovecs, which are only meaningful during `submit` and point into
// memory covered by `Engine::push`'s contract, valid from any thread.
unsafe impl Send for SyncEngine {}

impl SyncEngine {
    pub(crate) fn new(depth: usize, flusher: Option<Flusher>) -> SyncEngine {
        SyncEngine { pending: VecDeque::with_capacity(depth), work: Vec::new(), flusher }
    }

    /// Queue `op` for the next [`SyncEngine::submit`].
    ///
    /// # Safety
    /// As for `Engine::push`: the iovecs must stay valid until the op's
    /// completion is handed back.
    pub(crate) unsafe fn push(&mut self, op: IoOp) {
        self.pending.push_back(op);
    }

    /// Number of ops queued but not yet executed.
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Execute every queued op, appending completions to `ready`.
    pub(crate) fn submit(&mut self, disk: &Disk, ready: &mut Vec<Completion>) {
        while let Some(op) = self.pending.pop_front() {
            // SAFETY: every op entered through the unsafe `push`, whose caller
            // guaranteed the iovecs stay valid until the completion is reaped,
            // which happens only after this call.
            let result = unsafe { execute(disk, &op, &mut self.work, self.flusher.as_ref()) };
            ready.push(Completion { op, result });
        }
    }
}

/// Execute one already-validated op synchronously on a file-backed disk.
///
/// # Safety
/// `op.iovs` must be valid for writes (`Read`) or reads (`Write`).
pub(crate) unsafe fn execute(
    disk: &Disk,
    op: &IoOp,
    work: &mut Vec<libc::iovec>,
    flusher: Option<&Flusher>,
) -> Result<u64, BackendError> {
    match op.kind {
        // SAFETY: forwarded caller contract.
        OpKind::Read | OpKind::Write => unsafe { read_write(disk, op, work) },
        OpKind::Flush => flush(disk, flush_fd(disk, flusher)?),
        OpKind::Discard | OpKind::WriteZeroes { .. } => discard_or_zero(disk, op, flusher),
    }
}

/// The descriptor an engine flushes through: its own, or the main fd without one.
pub(crate) fn flush_fd<'a>(disk: &'a Disk, flusher: Option<&'a Flusher>) -> Result<BorrowedFd<'a>, BackendError> {
    match flusher {
        Some(f) => Ok(f.fd()),
        None => disk.fd(FdChoice::Main),
    }
}

/// A read or write, following [`bounce::route`].
///
/// # Safety
/// As for [`execute`].
pub(crate) unsafe fn read_write(disk: &Disk, op: &IoOp, work: &mut Vec<libc::iovec>) -> Result<u64, BackendError> {
    let route = bounce::route(disk, op);
    let write = op.kind == OpKind::Write;
    let flags = if write && op.fua { libc::RWF_DSYNC } else { 0 };
    let mut bounce = match route.bounce {
        true => Some(BounceBuf::new(op.len, disk.dio_mem_align())?),
        false => None,
    };
    let bounce_iov: [libc::iovec; 1];
    let iovs: &[libc::iovec] = match &mut bounce {
        Some(buf) => {
            if write {
                // SAFETY: forwarded caller contract (the iovecs are readable).
                unsafe { buf.gather_from(&op.iovs) };
            }
            bounce_iov = [buf.iovec()];
            &bounce_iov
        }
        None => &op.iovs,
    };
    // SAFETY: `iovs` is either the caller's iovecs (forwarded contract) or
    // describes `bounce`, which lives until the end of this function.
    let mut r = unsafe { transfer(disk.fd(route.fd)?, write, iovs, op.offset, op.len, flags, op.kind, work) };
    if route.fd == FdChoice::Main && disk.is_direct() && matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EINVAL))
    {
        // O_DIRECT rejected an alignment our checks accepted: redo the
        // whole transfer through the buffered fd, which accepts anything.
        tracing::debug!(offset = op.offset, len = op.len, "O_DIRECT EINVAL, retrying buffered");
        // SAFETY: as above.
        r = unsafe { transfer(disk.fd(FdChoice::Buffered)?, write, iovs, op.offset, op.len, flags, op.kind, work) };
    }
    let n = r?;
    if let (Some(buf), false) = (&bounce, write) {
        // SAFETY: forwarded caller contract (the iovecs are writable).
        unsafe { buf.scatter_to(&op.iovs, n) };
    }
    Ok(n)
}

/// Move `len` bytes between `iovs` and `fd` at `offset`, continuing short
/// transfers with the remainder. A call that makes no progress fails the
/// transfer with `EIO`.
///
/// # Safety
/// `iovs` must be valid for writes (read) or reads (write) and describe at
/// least `len` bytes.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn transfer(
    fd: BorrowedFd<'_>,
    write: bool,
    iovs: &[libc::iovec],
    offset: u64,
    len: u64,
    flags: i32,
    kind: OpKind,
    work: &mut Vec<libc::iovec>,
) -> Result<u64, BackendError> {
    let mut done: u64 = 0;
    let mut use_work = false;
    while done < len {
        let cur: &[libc::iovec] = if use_work { work } else { iovs };
        // SAFETY: `cur` is either the caller's iovecs or a suffix of them
        // (built by `advance_iovecs`), so the caller's contract covers it.
        let r = unsafe {
            if write {
                sys::pwritev2(fd, cur, offset + done, flags)
            } else {
                sys::preadv(fd, cur, offset + done)
            }
        };
        let n = match r {
            Ok(0) => return Err(BackendError::errno(kind.name(), libc::EIO)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(source) => return Err(BackendError::Io { op: kind.name(), source }),
        };
        done += n as u64;
        if done < len {
            tracing::debug!(offset, len, done, "short {}, continuing", kind.name());
            if !use_work {
                work.clear();
                work.extend_from_slice(iovs);
                use_work = true;
            }
            advance_iovecs(work, n);
        }
    }
    Ok(len)
}

/// `fdatasync` honouring the sticky flush-failure flag of `disk`: fails at
/// once if an earlier flush failed, and marks the flag on failure.
pub(crate) fn flush(disk: &Disk, fd: BorrowedFd<'_>) -> Result<u64, BackendError> {
    if disk.flush_failed() {
        return Err(BackendError::FlushFailedEarlier);
    }
    match sys::fdatasync(fd) {
        Ok(()) => flush_succeeded(disk),
        Err(source) => {
            disk.mark_flush_failed();
            Err(BackendError::Io { op: "flush", source })
        }
    }
}

/// What a successful `fdatasync` means: success, unless another engine's
/// flush failed meanwhile (then ours may have "succeeded" only because the
/// kernel already reported the error to them).
pub(crate) fn flush_succeeded(disk: &Disk) -> Result<u64, BackendError> {
    if disk.flush_failed() {
        Err(BackendError::FlushFailedEarlier)
    } else {
        Ok(0)
    }
}

/// The `fallocate` mode implementing a discard/write-zeroes on a file. All
/// three modes make the range read back as zeros and keep the file size.
pub(crate) fn fallocate_mode(kind: OpKind) -> i32 {
    match kind {
        OpKind::WriteZeroes { unmap: false } => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        _ => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    }
}

/// Whether an errno from `fallocate`/ioctl means "not supported here".
pub(crate) fn is_unsupported(errno: Option<i32>) -> bool {
    matches!(errno, Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS))
}

/// A discard or write-zeroes, synchronously: `BLKDISCARD`/`BLKZEROOUT` on
/// block devices, `fallocate` on files (with the zero-writing fallback), then
/// `fdatasync` if `fua`.
pub(crate) fn discard_or_zero(disk: &Disk, op: &IoOp, flusher: Option<&Flusher>) -> Result<u64, BackendError> {
    let fd = disk.fd(FdChoice::Main)?;
    let r = if disk.is_block_device() {
        let req = match op.kind {
            OpKind::Discard => sys::BLKDISCARD,
            _ => sys::BLKZEROOUT,
        };
        sys::blk_range_ioctl(fd, req, op.offset, op.len)
    } else {
        sys::fallocate(fd, fallocate_mode(op.kind), op.offset, op.len)
    };
    match r {
        Ok(()) => {}
        Err(e) if is_unsupported(e.raw_os_error()) => unsupported_fallback(disk, op)?,
        Err(source) => return Err(BackendError::Io { op: op.kind.name(), source }),
    }
    if op.fua {
        flush(disk, flush_fd(disk, flusher)?)?;
    }
    Ok(0)
}

/// What to do when the backend cannot discard/zero natively: a discard is
/// only a hint, so it succeeds doing nothing; write-zeroes writes zeros.
pub(crate) fn unsupported_fallback(disk: &Disk, op: &IoOp) -> Result<(), BackendError> {
    match op.kind {
        OpKind::Discard => {
            tracing::debug!(disk = %disk.describe(), "discard not supported by backend; ignoring");
            Ok(())
        }
        _ => write_zeroes_fallback(disk, op.offset, op.len),
    }
}

/// Write explicit zeros over `offset..offset + len` with `pwrite` through the
/// buffered fd (any alignment is fine there). Durability, if wanted, is the
/// caller's business.
pub(crate) fn write_zeroes_fallback(disk: &Disk, offset: u64, len: u64) -> Result<(), BackendError> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let fd = disk.fd(FdChoice::Buffered)?;
    let mut done = 0;
    while done < len {
        let chunk = (len - done).min(ZEROS.len() as u64) as usize;
        match sys::pwrite(fd, &ZEROS[..chunk], offset + done) {
            Ok(0) => return Err(BackendError::errno("write-zeroes", libc::EIO)),
            Ok(n) => done += n as u64,
            Err(source) => return Err(BackendError::Io { op: "write-zeroes", source }),
        }
    }
    Ok(())
}
