//! [`Engine`]: the per-worker front end over the three engine flavours.
//!
//! The front end does everything that is the same for all flavours:
//!
//! * counts in-flight ops and enforces the queue depth;
//! * validates each op (range, read-only, length) and completes invalid
//!   ones at once, as well as everything on the null backend;
//! * owns the completion eventfd, and the `ready` queue of completions that
//!   were produced synchronously (errors, null ops, the whole sync engine,
//!   block-device discards under io_uring). Those are ready as soon as
//!   `push`/`submit` returns and are *not* signalled on the eventfd (that would
//!   cost a write and a read syscall per batch for nothing): the caller reaps
//!   after submitting, before it sleeps. Only the kernel signals the eventfd,
//!   for io_uring completions.
//! * applies injected faults (`inject.rs`) when the disk has them: the
//!   decision is taken here, at push time, so every flavour is covered alike;
//!   injected errors and short transfers complete through `ready`, delayed ops
//!   wait in a [`DelayQueue`] until their deadline.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use crate::disk::Disk;
use crate::inject::delay::DelayQueue;
use crate::inject::{self, Outcome};
use crate::qcow2::fast::Qcow2Engine;
use crate::qcow2::service::Qcow2Queue;
use crate::rbd::RbdEngine;
use crate::sync::SyncEngine;
use crate::uring::UringEngine;
use crate::{sys, BackendError, Completion, IoOp, OpKind};

/// Which engine flavour [`Engine::new`] should build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// io_uring, falling back (with a warning) to [`EngineKind::Sync`] if the
    /// kernel refuses io_uring (`ENOSYS`, `EPERM`, missing opcodes). On a
    /// memory-backed image (tmpfs, ...) the synchronous engine: there io_uring
    /// punts every op to a kernel worker, which costs a thread handoff per op and,
    /// with the worker pinned like its caller, competes with a polling worker for
    /// the CPU (`vblk serve` on tmpfs: 4k random reads 1.2x -> see
    /// docs/PERFORMANCE.md; 1 MiB reads 5.3 -> 7.5 GB/s).
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// Blocking syscalls, executed in [`Engine::submit`].
    Sync,
}

enum Flavour {
    Null,
    Sync(SyncEngine),
    Uring(Box<UringEngine>),
    /// A qcow2 image: allocated data on an io_uring, the rest on the image's service
    /// threads (`qcow2/fast.rs`).
    Qcow2(Box<Qcow2Engine>),
    /// A Ceph RBD image: librbd's asynchronous I/O (`rbd.rs`).
    Rbd(Box<RbdEngine>),
}

/// Executes [`IoOp`]s for one worker thread. See the crate docs for the
/// push/submit/poll/reap cycle.
pub struct Engine {
    // Field order matters for drop: the flavour (which, for io_uring, waits
    // for in-flight ops) goes first, the eventfd and the disk after it.
    flavour: Flavour,
    /// Completions produced synchronously, waiting for `reap`.
    ready: Vec<Completion>,
    /// Ops held back by injected delays (only when the disk's faults delay ops).
    delays: Option<DelayQueue>,
    eventfd: OwnedFd,
    disk: Arc<Disk>,
    depth: usize,
    /// Pushed ops whose completion has not yet been handed out.
    in_flight: usize,
}

/// The batch of an engine that completes requests in `submit` ([`Engine::batch_limit`]).
/// Measured with libblkio's client, 4k random reads at QD32 (docs/PERFORMANCE.md): null
/// 1.9 M IOPS unlimited, 3.1 M at 16, 4.7 M at 8, 5.2 M at 4; tmpfs 546k unlimited, 714k-782k
/// at 8-16, 636k at 4.
pub const INLINE_BATCH: usize = 8;

/// The largest accepted queue depth (io_uring's maximum SQ size).
pub const MAX_DEPTH: u32 = 32768;

impl Engine {
    /// Build an engine for `disk` accepting up to `depth` (1..=[`MAX_DEPTH`])
    /// in-flight ops.
    /// On a null disk the flavour is always null, whatever `kind` says.
    pub fn new(disk: Arc<Disk>, kind: EngineKind, depth: u32) -> Result<Engine, BackendError> {
        if depth == 0 || depth > MAX_DEPTH {
            return Err(BackendError::InvalidRequest("queue depth must be between 1 and MAX_DEPTH"));
        }
        let depth = depth as usize;
        let eventfd = sys::eventfd().map_err(|source| BackendError::Io { op: "eventfd", source })?;
        // Each engine flushes through its own open file description (see `disk.rs`).
        let flavour = match kind {
            _ if disk.is_null() => Flavour::Null,
            _ if disk.qcow2().is_some() => Flavour::Qcow2(Box::new(qcow2_engine(&disk, kind, depth, eventfd.as_fd())?)),
            _ if disk.rbd().is_some() => match disk.rbd() {
                Some(image) => Flavour::Rbd(Box::new(RbdEngine::new(Arc::clone(image), depth, eventfd.as_fd())?)),
                None => Flavour::Null,
            },
            EngineKind::Sync => Flavour::Sync(SyncEngine::new(depth, disk.flusher()?)),
            EngineKind::Uring => Flavour::Uring(Box::new(UringEngine::new(depth, eventfd.as_fd(), disk.flusher()?)?)),
            EngineKind::Auto if disk.is_memory_backed() => Flavour::Sync(SyncEngine::new(depth, disk.flusher()?)),
            EngineKind::Auto => match UringEngine::new(depth, eventfd.as_fd(), disk.flusher()?) {
                Ok(u) => Flavour::Uring(Box::new(u)),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring unavailable, using the synchronous engine");
                    Flavour::Sync(SyncEngine::new(depth, disk.flusher()?))
                }
            },
        };
        // What signals completions: the eventfd, or for RBD an epoll set over it and the
        // image's eventfd.
        let delays = match (disk.faults(), &flavour) {
            (Some(f), Flavour::Rbd(r)) if f.spec().has_delays() => Some(DelayQueue::new(r.wake_fd())?),
            (Some(f), _) if f.spec().has_delays() => Some(DelayQueue::new(eventfd.as_fd())?),
            _ => None,
        };
        Ok(Engine { disk, flavour, depth, in_flight: 0, ready: Vec::with_capacity(depth), delays, eventfd })
    }

    /// The most requests a queue should take from its ring before it submits them and
    /// publishes their completions. The null and synchronous engines finish each request in
    /// [`Engine::submit`], so a long batch holds back every completion in it until the last
    /// one is done: the driver sleeps meanwhile, and the worker then waits, idle, for it to
    /// wake up and refill the ring (the lockstep of issue 15). Batches of
    /// [`INLINE_BATCH`] overlap the two; the same for a qcow2 image in memory, whose
    /// allocated data is read and written in `submit` too. The other engines only queue
    /// requests in `submit`: their batch is whatever the ring holds (fewer
    /// `io_uring_enter`s, longer merges).
    pub fn batch_limit(&self) -> usize {
        match self.flavour {
            Flavour::Null | Flavour::Sync(_) => INLINE_BATCH,
            Flavour::Qcow2(ref q) if q.runs_at_submit() => INLINE_BATCH,
            _ => usize::MAX,
        }
    }

    /// `"io_uring"`, `"sync"` or `"null"`.
    pub fn kind_name(&self) -> &'static str {
        match &self.flavour {
            Flavour::Null => "null",
            Flavour::Sync(_) => "sync",
            Flavour::Uring(_) => "io_uring",
            Flavour::Qcow2(q) => q.name(),
            Flavour::Rbd(_) => "rbd",
        }
    }

    /// On a qcow2 image: how many requests ran on the io_uring (allocated data, zeros) and
    /// how many on the image's service threads.
    pub fn qcow2_routes(&self) -> Option<crate::qcow2::Routes> {
        match &self.flavour {
            Flavour::Qcow2(q) => Some(q.routes()),
            _ => None,
        }
    }

    /// The disk this engine works on.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// The maximum number of in-flight ops.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// An fd that becomes readable when completions are ready. Poll it
    /// for `POLLIN`, then call [`Engine::reap`] (which also clears it). It is
    /// the completion eventfd, or, when injected faults delay ops, an epoll fd
    /// that also reports the delay timer.
    pub fn completion_fd(&self) -> RawFd {
        match (&self.delays, &self.flavour) {
            (Some(d), _) => d.poll_fd().as_raw_fd(),
            (None, Flavour::Rbd(r)) => r.wake_fd().as_raw_fd(),
            (None, _) => self.eventfd.as_raw_fd(),
        }
    }

    /// Queue `op`. It is executed at the next [`Engine::submit`] (io_uring,
    /// sync) or completes at once (invalid ops, null disk, block-device
    /// discard). Returns `Err(op)` only when `depth` ops are already in
    /// flight.
    ///
    /// # Safety
    /// Every iovec in `op.iovs` must stay valid for reads (Write) / writes
    /// (Read) until its Completion is returned by `reap`/`wait`. (Dropping the
    /// engine waits for in-flight io_uring ops.)
    pub unsafe fn push(&mut self, op: IoOp) -> Result<(), IoOp> {
        if self.in_flight >= self.depth {
            return Err(op);
        }
        if let Some(result) = precheck(&self.disk, &op) {
            self.ready.push(Completion { op, result });
        } else if let Some(faults) = self.disk.faults() {
            let d = faults.decide(&op);
            match &mut self.delays {
                Some(q) if !d.delay.is_zero() => q.hold(op, Instant::now() + d.delay, d.outcome),
                // SAFETY: forwarded caller contract.
                _ => unsafe { self.apply(op, d.outcome) }?,
            }
        } else {
            // SAFETY: forwarded caller contract.
            unsafe { self.start(op) }?;
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Hand a checked op to the flavour. `Err(op)` if it has no room.
    ///
    /// # Safety
    /// As for [`Engine::push`].
    unsafe fn start(&mut self, op: IoOp) -> Result<(), IoOp> {
        match &mut self.flavour {
            Flavour::Null => {
                let result = Ok(if op.kind == OpKind::Read || op.kind == OpKind::Write { op.len } else { 0 });
                self.ready.push(Completion { op, result });
            }
            // SAFETY: forwarded caller contract.
            Flavour::Sync(s) => unsafe { s.push(op) },
            // SAFETY: forwarded caller contract.
            Flavour::Uring(u) => unsafe { u.push(&self.disk, op, &mut self.ready) }?,
            // The service threads keep to the caller's contract: the op's completion is
            // handed back only after they are done with its buffers.
            Flavour::Qcow2(q) => match self.disk.qcow2() {
                // SAFETY: forwarded caller contract.
                Some((image, _)) => unsafe { q.push(&self.disk, image, op, &mut self.ready) },
                None => self.ready.push(Completion { op, result: Err(BackendError::errno("qcow2", libc::EBADF)) }),
            },
            // SAFETY: forwarded caller contract (librbd's ops hold the buffers until their
            // completion is collected, which happens before it is handed back).
            Flavour::Rbd(r) => unsafe { r.push(op, &mut self.ready) }?,
        }
        Ok(())
    }

    /// Carry out an injected-fault decision for `op`.
    ///
    /// # Safety
    /// As for [`Engine::push`].
    unsafe fn apply(&mut self, op: IoOp, outcome: Outcome) -> Result<(), IoOp> {
        let result = match outcome {
            // SAFETY: forwarded caller contract.
            Outcome::Run => return unsafe { self.start(op) },
            Outcome::Fail(errno) => {
                if op.kind == OpKind::Flush {
                    // As after a real failed fdatasync: no later flush may succeed.
                    self.disk.mark_flush_failed();
                }
                Err(inject::injected_error(op.kind, errno))
            }
            // SAFETY: forwarded caller contract.
            Outcome::Short => unsafe { inject::short_transfer(&self.disk, &op) },
        };
        self.ready.push(Completion { op, result });
        Ok(())
    }

    /// Start (or fail) the held ops whose injected delay has passed.
    fn release_due(&mut self) {
        let mut due = Vec::new();
        match &mut self.delays {
            Some(q) => q.take_due(Instant::now(), &mut due),
            None => return,
        }
        let mut started = false;
        for (op, outcome) in due {
            started |= outcome == Outcome::Run;
            // SAFETY: every held op entered through `push`, whose caller's contract holds
            // until its completion is handed back, which has not happened yet.
            if let Err(op) = unsafe { self.apply(op, outcome) } {
                // Cannot happen (in-flight ops never exceed the flavour's room), but an op
                // must never be lost.
                let result = Err(BackendError::errno(op.kind.name(), libc::EBUSY));
                self.ready.push(Completion { op, result });
            }
        }
        if started {
            if let Err(e) = self.submit() {
                tracing::error!(error = %e, "submitting delayed ops failed");
            }
        }
    }

    /// Start everything pushed since the last submit: `io_uring_enter` (io_uring), or
    /// execute it all now (sync). An error means some ops are still waiting to be
    /// submitted ([`Engine::unsubmitted`]): call again before sleeping.
    pub fn submit(&mut self) -> Result<(), BackendError> {
        match &mut self.flavour {
            Flavour::Null => Ok(()),
            Flavour::Uring(u) => {
                if u.unsubmitted() > 0 && self.disk.faults().is_some_and(|f| f.fail_submit()) {
                    return Err(BackendError::errno("io_uring_enter (injected fault)", libc::EAGAIN));
                }
                u.submit()
            }
            Flavour::Sync(s) => {
                if s.pending() > 0 {
                    s.submit(&self.disk, &mut self.ready);
                }
                Ok(())
            }
            Flavour::Qcow2(q) => q.submit(&self.disk, &mut self.ready),
            // librbd takes each op when it is pushed.
            Flavour::Rbd(_) => Ok(()),
        }
    }

    /// Ops pushed but not yet handed to the kernel (io_uring SQEs a failed or partial
    /// submission left queued). Nothing completes them until [`Engine::submit`] succeeds.
    pub fn unsubmitted(&mut self) -> usize {
        match &mut self.flavour {
            Flavour::Uring(u) => u.unsubmitted(),
            Flavour::Sync(s) => s.pending(),
            Flavour::Qcow2(q) => q.unsubmitted(),
            Flavour::Null | Flavour::Rbd(_) => 0,
        }
    }

    /// Append every available completion to `out` without blocking, and
    /// clear the completion eventfd (io_uring: the kernel signals it).
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        let before = out.len();
        self.release_due();
        if let Some(q) = &mut self.delays {
            q.rearm();
        }
        match &mut self.flavour {
            Flavour::Uring(u) => {
                // Clear first: a completion arriving after this re-arms the fd.
                sys::eventfd_clear(self.eventfd.as_fd());
                u.reap(&self.disk, out);
            }
            Flavour::Qcow2(q) => {
                sys::eventfd_clear(self.eventfd.as_fd());
                q.reap(&self.disk, out);
            }
            Flavour::Rbd(r) => {
                sys::eventfd_clear(self.eventfd.as_fd());
                r.reap(out, true);
            }
            _ => {}
        }
        out.append(&mut self.ready); // one memcpy, not an element-wise extend
        self.in_flight -= (out.len() - before).min(self.in_flight);
    }

    /// Like [`Engine::reap`] but without clearing the completion eventfd (no
    /// syscall): for a caller that is busy-polling and will call `reap`
    /// before it sleeps on the eventfd again.
    pub fn poll_completions(&mut self, out: &mut Vec<Completion>) {
        let before = out.len();
        self.release_due();
        match &mut self.flavour {
            Flavour::Uring(u) => u.reap(&self.disk, out),
            Flavour::Qcow2(q) => q.reap(&self.disk, out),
            Flavour::Rbd(r) => r.reap(out, false),
            _ => {}
        }
        out.append(&mut self.ready); // one memcpy, not an element-wise extend
        self.in_flight -= (out.len() - before).min(self.in_flight);
    }

    /// Block until at least one completion is available (returning at once
    /// if nothing is in flight), then reap like [`Engine::reap`]. Submits
    /// anything still unsubmitted. Used to drain before shutdown.
    pub fn wait(&mut self, out: &mut Vec<Completion>) -> Result<(), BackendError> {
        let before = out.len();
        loop {
            self.reap(out);
            if out.len() > before || self.in_flight == 0 {
                return Ok(());
            }
            let unsubmitted = self.unsubmitted();
            match &mut self.flavour {
                Flavour::Uring(u) if u.busy() > 0 => u.wait_cqe()?,
                Flavour::Sync(_) | Flavour::Qcow2(_) if unsubmitted > 0 => self.submit()?,
                Flavour::Qcow2(q) if q.busy() > 0 => sys::wait_readable(q.eventfd()),
                Flavour::Rbd(r) if r.busy() > 0 => sys::wait_readable(r.wake_fd()),
                _ => match self.delays.as_ref().and_then(DelayQueue::next_deadline) {
                    // Held by an injected delay: sleep until the first one is due.
                    Some(t) => std::thread::sleep(t.saturating_duration_since(Instant::now())),
                    // Nothing can complete any more; avoid spinning forever.
                    None => return Ok(()),
                },
            }
        }
    }

    /// Ops pushed whose completion has not been returned yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

/// The engine of a qcow2 image: io_uring for allocated data (unless `kind` says
/// synchronous, or the kernel refuses io_uring), the image's service threads for the rest.
fn qcow2_engine(
    disk: &Disk,
    kind: EngineKind,
    depth: usize,
    eventfd: BorrowedFd<'_>,
) -> Result<Qcow2Engine, BackendError> {
    let Some((image, _)) = disk.qcow2() else { return Err(BackendError::errno("qcow2", libc::EBADF)) };
    let service = Qcow2Queue::new(eventfd).map_err(|source| BackendError::Io { op: "dup eventfd", source })?;
    // A request split at mapping boundaries takes several io_uring slots.
    let uring = match kind {
        EngineKind::Sync => None,
        EngineKind::Auto if image.memory_backed() => None,
        EngineKind::Uring => Some(UringEngine::new(depth * 2, eventfd, None)?),
        EngineKind::Auto => UringEngine::new(depth * 2, eventfd, None)
            .inspect_err(|e| tracing::warn!(error = %e, "io_uring unavailable, qcow2 data I/O on its service threads"))
            .ok(),
    };
    // In memory, reads and writes of mapped data are memory copies: done at once, as the
    // raw engine does (see `EngineKind::Auto`).
    let inline = kind == EngineKind::Auto && image.memory_backed();
    Ok(Qcow2Engine::new(image, uring, inline, service, depth))
}

/// Checks common to every flavour. `Some(result)` means "complete now with
/// this result" (errors, or trivially empty ops).
fn precheck(disk: &Disk, op: &IoOp) -> Option<Result<u64, BackendError>> {
    if op.kind.is_write_like() && disk.readonly() {
        return Some(Err(BackendError::ReadOnly));
    }
    match op.kind {
        OpKind::Flush if disk.flush_failed() => Some(Err(BackendError::FlushFailedEarlier)),
        OpKind::Flush => None,
        kind => {
            if matches!(kind, OpKind::Read | OpKind::Write) {
                let total = op.iovs.iter().try_fold(0u64, |acc, v| acc.checked_add(v.iov_len as u64));
                if total != Some(op.len) {
                    return Some(Err(BackendError::InvalidRequest("length differs from the sum of the iovec lengths")));
                }
            }
            if op.offset.checked_add(op.len).is_none_or(|end| end > disk.size()) {
                return Some(Err(BackendError::OutOfRange { offset: op.offset, len: op.len, size: disk.size() }));
            }
            if op.len == 0 {
                return Some(Ok(0));
            }
            None
        }
    }
}
