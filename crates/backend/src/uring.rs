//! The io_uring engine: one ring per worker thread.
//!
//! Every in-flight op occupies a *slot*; the slot index is the SQE's
//! `user_data`, so a CQE leads straight back to its op. The slot owns
//! everything the kernel may touch until the CQE arrives: the `IoOp` (whose
//! `iovs` heap array the SQE points at; moving a `Vec` does not move its
//! heap buffer), the bounce buffer if any, and a scratch iovec list for
//! continuing short transfers.
//!
//! An op may need several SQEs in a row; the slot's [`Stage`] says which one
//! is in flight:
//!
//! ```text
//! Read/Write:        Rw ──short──▶ Rw (remainder) ──▶ done
//! Flush:             Flush ──▶ done
//! Discard/WrZeroes:  Fallocate ──fua──▶ FuaSync ──▶ done
//! ```
//!
//! Follow-up SQEs are queued while reaping and submitted at the end of
//! [`UringEngine::reap`]. Because at most one SQE per slot is ever queued and
//! there are as many SQ entries as slots, the SQ can never overflow, and
//! the CQ (twice as large) neither.
//!
//! The completion eventfd is registered with the ring, so the kernel signals
//! it for each CQE; the worker `poll()`s it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use io_uring::{opcode, register::Restriction, squeue, types, IoUring, Probe};

use crate::bounce::{self, advance_iovecs, BounceBuf};
use crate::disk::{Disk, FdChoice, Flusher};
use crate::{sync, BackendError, Completion, IoOp, OpKind};

/// How often an op is resubmitted after `EAGAIN`/`EINTR` before giving up.
const MAX_RETRIES: u32 = 16;

/// Which SQE of an op is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Readv/Writev of the (remaining) data.
    Rw,
    /// `fallocate` for discard/write-zeroes.
    Fallocate,
    /// `fdatasync` making a fua discard/write-zeroes durable.
    FuaSync,
    /// `fdatasync` for a Flush op.
    Flush,
}

/// One in-flight op and the resources the kernel may touch.
#[derive(Debug)]
struct Slot {
    op: Option<IoOp>,
    stage: Stage,
    fd: FdChoice,
    /// Bytes transferred so far (Rw).
    done: u64,
    bounce: Option<BounceBuf>,
    /// When `use_work`, the SQE points at `work` instead of `op.iovs`: the
    /// bounce buffer's iovec and/or the remainder after a short transfer.
    work: Vec<libc::iovec>,
    use_work: bool,
    retries: u32,
}

// SAFETY: `Slot` is `!Send` only through the raw pointers in `work`'s
// iovecs, which point into the slot's own bounce buffer or into memory
// covered by `Engine::push`'s contract, valid from any thread.
unsafe impl Send for Slot {}

impl Slot {
    fn empty() -> Slot {
        Slot {
            op: None,
            stage: Stage::Rw,
            fd: FdChoice::Main,
            done: 0,
            bounce: None,
            work: Vec::new(),
            use_work: false,
            retries: 0,
        }
    }
}

/// What to do with a slot after its CQE.
enum Next {
    Resubmit,
    Done(Result<u64, BackendError>),
}

/// The io_uring engine. See the module docs.
pub(crate) struct UringEngine {
    ring: IoUring,
    /// This engine's description for `fdatasync` (see `disk.rs`); the main fd if none.
    /// Dropped after the ring has drained (field order).
    flusher: Option<Flusher>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Scratch for draining the CQ (`user_data`, `result`).
    cqes: Vec<(u64, i32)>,
}

impl UringEngine {
    /// Set up a ring for `depth` in-flight ops signalling `eventfd`.
    pub(crate) fn new(
        depth: usize,
        eventfd: BorrowedFd<'_>,
        flusher: Option<Flusher>,
    ) -> Result<UringEngine, BackendError> {
        let entries = depth
            .checked_next_power_of_two()
            .and_then(|d| u32::try_from(d).ok())
            .ok_or(BackendError::InvalidRequest("queue depth too large"))?;
        // Created disabled, so the restrictions below are in force before the first SQE.
        let ring = IoUring::builder().setup_r_disabled().build(entries).map_err(BackendError::UringUnavailable)?;
        let submitter = ring.submitter();
        let mut probe = Probe::new();
        submitter.register_probe(&mut probe).map_err(BackendError::UringUnavailable)?;
        for code in [opcode::Readv::CODE, opcode::Writev::CODE, opcode::Fsync::CODE, opcode::Fallocate::CODE] {
            if !probe.is_supported(code) {
                return Err(BackendError::UringUnavailable(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("kernel lacks io_uring opcode {code}"),
                )));
            }
        }
        submitter.register_eventfd(eventfd.as_raw_fd()).map_err(BackendError::UringUnavailable)?;
        // Hardening (IORING_REGISTER_RESTRICTIONS): this ring may only ever run the four
        // opcodes vblk uses, with no SQE flags, and accepts no further registrations. A
        // bug elsewhere in the daemon cannot turn it into a general syscall gateway.
        let mut allowed = [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_op(opcode::Fallocate::CODE),
            Restriction::sqe_flags_allowed(0),
        ];
        submitter.register_restrictions(&mut allowed).map_err(BackendError::UringUnavailable)?;
        submitter.register_enable_rings().map_err(BackendError::UringUnavailable)?;
        let cq_cap = ring.params().cq_entries() as usize;
        Ok(UringEngine {
            ring,
            flusher,
            slots: (0..depth).map(|_| Slot::empty()).collect(),
            free: (0..depth).rev().collect(),
            cqes: Vec::with_capacity(cq_cap),
        })
    }

    /// Ops owned by the ring (SQE queued or in the kernel).
    pub(crate) fn busy(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queue `op`. Ops completed without the ring (block-device
    /// discard/write-zeroes, bounce allocation failure) go to `ready`.
    /// `Err(op)` only if no slot is free.
    ///
    /// # Safety
    /// As for `Engine::push`: the iovecs stay valid until the completion is
    /// handed back.
    pub(crate) unsafe fn push(&mut self, disk: &Disk, op: IoOp, ready: &mut Vec<Completion>) -> Result<(), IoOp> {
        let data_less = matches!(op.kind, OpKind::Discard | OpKind::WriteZeroes { .. });
        if data_less && disk.is_block_device() {
            // No io_uring opcode for BLKDISCARD/BLKZEROOUT: do it now.
            let result = sync::discard_or_zero(disk, &op, self.flusher.as_ref());
            ready.push(Completion { op, result });
            return Ok(());
        }
        let stage = match op.kind {
            OpKind::Read | OpKind::Write => Stage::Rw,
            OpKind::Flush => Stage::Flush,
            OpKind::Discard | OpKind::WriteZeroes { .. } => Stage::Fallocate,
        };
        let Some(idx) = self.claim(FdChoice::Main, stage) else {
            return Err(op);
        };
        let slot = &mut self.slots[idx];
        if slot.stage == Stage::Rw {
            let route = bounce::route(disk, &op);
            slot.fd = route.fd;
            if route.bounce {
                match BounceBuf::new(op.len, disk.dio_mem_align()) {
                    Ok(mut buf) => {
                        if op.kind == OpKind::Write {
                            // SAFETY: caller's contract: iovecs are readable.
                            unsafe { buf.gather_from(&op.iovs) };
                        }
                        slot.work.clear();
                        slot.work.push(buf.iovec());
                        slot.use_work = true;
                        slot.bounce = Some(buf);
                    }
                    Err(e) => {
                        self.free.push(idx);
                        ready.push(Completion { op, result: Err(e) });
                        return Ok(());
                    }
                }
            }
        }
        slot.op = Some(op);
        if let Err(e) = self.queue_sqe(disk, idx) {
            if let Some(c) = self.finish(idx, Err(e)) {
                ready.push(c);
            }
        }
        Ok(())
    }

    /// A free slot, reset for a new op's first `stage` on `fd`.
    fn claim(&mut self, fd: FdChoice, stage: Stage) -> Option<usize> {
        let idx = self.free.pop()?;
        let slot = &mut self.slots[idx];
        (slot.done, slot.retries, slot.use_work, slot.fd, slot.stage) = (0, 0, false, fd, stage);
        Some(idx)
    }

    /// Slots free for [`UringEngine::push_at`].
    pub(crate) fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Queue a read or write of `op` through `fd` (a file of a qcow2 chain, at the
    /// op's offset in that file), with no bounce buffer. `Err(op)` if no slot is free.
    ///
    /// # Safety
    /// As for [`UringEngine::push`]; and `fd` stays open until the completion is reaped.
    pub(crate) unsafe fn push_at(&mut self, disk: &Disk, fd: RawFd, op: IoOp) -> Result<(), IoOp> {
        debug_assert!(matches!(op.kind, OpKind::Read | OpKind::Write));
        let Some(idx) = self.claim(FdChoice::Image(fd), Stage::Rw) else {
            return Err(op);
        };
        self.slots[idx].op = Some(op);
        if let Err(e) = self.queue_sqe(disk, idx) {
            // Only a full SQ; the slot's op is handed back with the error.
            if let Some(c) = self.finish(idx, Err(e)) {
                return Err(c.op);
            }
        }
        Ok(())
    }

    /// Build the SQE for slot `idx`'s current stage and put it in the SQ.
    fn queue_sqe(&mut self, disk: &Disk, idx: usize) -> Result<(), BackendError> {
        let slot = &self.slots[idx];
        let Some(op) = slot.op.as_ref() else {
            return Err(BackendError::InvalidRequest("empty slot"));
        };
        let fd = match (slot.stage, slot.fd) {
            (Stage::FuaSync | Stage::Flush, _) => sync::flush_fd(disk, self.flusher.as_ref())?.as_raw_fd(),
            (Stage::Rw, FdChoice::Image(fd)) => fd,
            (Stage::Rw | Stage::Fallocate, which) => disk.fd(which)?.as_raw_fd(),
        };
        let fd = types::Fd(fd);
        let entry = match slot.stage {
            Stage::Rw => {
                let iovs = if slot.use_work { &slot.work } else { &op.iovs };
                let (ptr, cnt, offset) = (iovs.as_ptr(), iovs.len() as u32, op.offset + slot.done);
                if op.kind == OpKind::Read {
                    opcode::Readv::new(fd, ptr, cnt).offset(offset).build()
                } else {
                    let flags = if op.fua { libc::RWF_DSYNC } else { 0 };
                    opcode::Writev::new(fd, ptr, cnt).offset(offset).rw_flags(flags).build()
                }
            }
            Stage::Fallocate => {
                opcode::Fallocate::new(fd, op.len).offset(op.offset).mode(sync::fallocate_mode(op.kind)).build()
            }
            Stage::FuaSync | Stage::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
        };
        let entry: squeue::Entry = entry.user_data(idx as u64);
        // SAFETY: everything the SQE points at stays alive and unmoved until
        // its CQE is reaped: the iovec array is the heap buffer of `op.iovs`
        // or `slot.work`, both owned by the slot and not touched until then;
        // the data buffers are the bounce buffer (owned by the slot) or the
        // caller's memory (covered by `Engine::push`'s contract).
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| BackendError::errno("io_uring submission queue full", libc::EBUSY))
    }

    /// Submit everything queued: `io_uring_enter` until the SQ is empty (the kernel may
    /// take fewer SQEs than offered). On a transient failure (`EAGAIN`, `EBUSY`, `ENOMEM`)
    /// or no progress the rest stays queued and the error is returned: the caller must
    /// try again before it sleeps ([`UringEngine::unsubmitted`]), or those ops would wait
    /// for an event that never comes.
    pub(crate) fn submit(&mut self) -> Result<(), BackendError> {
        while !self.ring.submission().is_empty() {
            match self.ring.submit() {
                Ok(0) => return Err(BackendError::errno("io_uring_enter (no SQE taken)", libc::EAGAIN)),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(BackendError::Io { op: "io_uring_enter", source }),
            }
        }
        Ok(())
    }

    /// SQEs queued and not yet taken by the kernel.
    pub(crate) fn unsubmitted(&mut self) -> usize {
        self.ring.submission().len()
    }

    /// Submit anything queued and block until at least one CQE is ready.
    pub(crate) fn wait_cqe(&mut self) -> Result<(), BackendError> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(BackendError::Io { op: "io_uring_enter", source }),
            }
        }
    }

    /// Process every available CQE; finished ops go to `out`.
    pub(crate) fn reap(&mut self, disk: &Disk, out: &mut Vec<Completion>) {
        self.cqes.clear();
        self.cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        let mut resubmitted = false;
        for i in 0..self.cqes.len() {
            let (user_data, res) = self.cqes[i];
            let idx = user_data as usize;
            if self.slots.get(idx).is_none_or(|s| s.op.is_none()) {
                tracing::error!(user_data, "io_uring completion for unknown slot");
                continue;
            }
            let next = match self.on_cqe(disk, idx, res) {
                Next::Resubmit => match self.queue_sqe(disk, idx) {
                    Ok(()) => {
                        resubmitted = true;
                        continue;
                    }
                    Err(e) => Err(e),
                },
                Next::Done(r) => r,
            };
            out.extend(self.finish(idx, next));
        }
        if resubmitted {
            if let Err(e) = self.submit() {
                // The SQEs stay queued; the next submit()/wait() retries.
                tracing::warn!(error = %e, "io_uring resubmission failed");
            }
        }
    }

    /// Advance slot `idx`'s state machine with CQE result `res`.
    fn on_cqe(&mut self, disk: &Disk, idx: usize, res: i32) -> Next {
        let slot = &mut self.slots[idx];
        let Some(op) = slot.op.as_ref() else {
            return Next::Done(Err(BackendError::InvalidRequest("empty slot")));
        };
        if res < 0 {
            let errno = -res;
            if matches!(errno, libc::EAGAIN | libc::EINTR) && slot.retries < MAX_RETRIES {
                slot.retries += 1;
                return Next::Resubmit;
            }
            if errno == libc::EINVAL && slot.stage == Stage::Rw && slot.fd == FdChoice::Main && disk.is_direct() {
                // O_DIRECT rejected an alignment our checks accepted: redo
                // the rest through the buffered fd, which accepts anything.
                tracing::debug!(offset = op.offset, len = op.len, "O_DIRECT EINVAL, retrying buffered");
                slot.fd = FdChoice::Buffered;
                return Next::Resubmit;
            }
            return Next::Done(match slot.stage {
                Stage::Rw => Err(BackendError::errno(op.kind.name(), errno)),
                Stage::Fallocate if sync::is_unsupported(Some(errno)) => {
                    // Runs synchronously; rare (e.g. filesystems without
                    // ZERO_RANGE).
                    sync::unsupported_fallback(disk, op).and_then(|()| {
                        if op.fua {
                            sync::flush(disk, sync::flush_fd(disk, self.flusher.as_ref())?)
                        } else {
                            Ok(0)
                        }
                    })
                }
                Stage::Fallocate => Err(BackendError::errno(op.kind.name(), errno)),
                Stage::FuaSync | Stage::Flush => {
                    disk.mark_flush_failed();
                    Err(BackendError::errno("flush", errno))
                }
            });
        }
        slot.retries = 0;
        match slot.stage {
            Stage::Rw => {
                let n = res as u64;
                let remaining = op.len - slot.done;
                if n == 0 {
                    return Next::Done(Err(BackendError::errno(op.kind.name(), libc::EIO)));
                }
                if n >= remaining {
                    return Next::Done(Ok(op.len));
                }
                tracing::debug!(
                    offset = op.offset,
                    len = op.len,
                    done = slot.done + n,
                    "short {}, continuing",
                    op.kind.name()
                );
                slot.done += n;
                if !slot.use_work {
                    slot.work.clear();
                    slot.work.extend_from_slice(&op.iovs);
                    slot.use_work = true;
                }
                advance_iovecs(&mut slot.work, n as usize);
                Next::Resubmit
            }
            Stage::Fallocate if op.fua => {
                slot.stage = Stage::FuaSync;
                Next::Resubmit
            }
            Stage::Fallocate => Next::Done(Ok(0)),
            Stage::FuaSync | Stage::Flush => Next::Done(sync::flush_succeeded(disk)),
        }
    }

    /// Release slot `idx`, copying bounce data out for successful reads.
    fn finish(&mut self, idx: usize, result: Result<u64, BackendError>) -> Option<Completion> {
        let slot = &mut self.slots[idx];
        let op = slot.op.take()?;
        if let (Ok(n), Some(buf), OpKind::Read) = (&result, &slot.bounce, op.kind) {
            // SAFETY: `Engine::push`'s contract: the iovecs are writable
            // until this completion is handed back.
            unsafe { buf.scatter_to(&op.iovs, *n) };
        }
        slot.bounce = None;
        slot.use_work = false;
        self.free.push(idx);
        Some(Completion { op, result })
    }
}

impl Drop for UringEngine {
    /// The kernel may still be writing into buffers owned by busy slots (and
    /// into guest memory): wait for every CQE before freeing anything. If
    /// waiting fails, leak the slots rather than risk a use-after-free.
    fn drop(&mut self) {
        while self.busy() > 0 {
            if let Err(e) = self.wait_cqe() {
                tracing::error!(error = %e, "cannot drain io_uring on drop; leaking in-flight buffers");
                std::mem::forget(std::mem::take(&mut self.slots));
                return;
            }
            let cqes: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for ud in cqes {
                if let Some(slot) = self.slots.get_mut(ud as usize) {
                    if slot.op.take().is_some() {
                        slot.bounce = None;
                        self.free.push(ud as usize);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod restriction_tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn the_ring_refuses_opcodes_vblk_does_not_use() {
        let efd = crate::sys::eventfd().expect("eventfd");
        let mut u = UringEngine::new(4, efd.as_fd(), None).expect("io_uring");
        // A NOP is harmless, but not on the allow list: the kernel must refuse it.
        let nop = opcode::Nop::new().build().user_data(77);
        // SAFETY: a NOP references no memory.
        unsafe { u.ring.submission().push(&nop) }.expect("room");
        u.ring.submit_and_wait(1).expect("submit");
        let cqe = u.ring.completion().next().expect("a completion");
        assert_eq!(cqe.user_data(), 77);
        assert_eq!(cqe.result(), -libc::EACCES, "restricted ring must refuse IORING_OP_NOP");
        // And no further registrations are accepted.
        assert!(u.ring.submitter().register_files(&[efd.as_raw_fd()]).is_err());
    }
}
