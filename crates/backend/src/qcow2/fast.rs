//! [`Qcow2Engine`]: a worker's engine for a qcow2 image. Each read or write is split along
//! the image's mapping ([`Qcow2Image::map`], no I/O): allocated data goes to the worker's
//! own io_uring at its place in the chain's files, ranges that read as zeros are zeroed in
//! place, and a request the mapping cannot settle (an allocating or copy-on-write write, a
//! compressed cluster, a table not yet cached, a FUA write whose mapping may not be on disk
//! yet) goes whole to the image's service threads, as does every flush, discard and
//! write-zeroes. Reads and overwrites of allocated data therefore cost what they cost on
//! a raw image, plus a lookup in imago's cache.
//!
//! Why a mapping stays valid while its I/O is in flight: vblk only ever calls imago
//! through `&self` (write-zeroes keeps the clusters allocated), and imago frees or moves a
//! data cluster only through `&mut self` (discard, shrink), so a host offset handed out
//! for a cluster keeps belonging to it. A write racing an allocating write or a
//! write-zeroes of the same range is the guest's own race: one of the two wins, as on any
//! disk.
//!
//! A request split into several pieces (a mapping boundary inside it) runs as several
//! io_uring ops and completes once, when its last piece has; a request of one piece (the
//! common case) is the guest's op itself with its offset moved into the file, so the fast
//! path allocates nothing.

use std::os::fd::BorrowedFd;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use super::quiesce::Quiesce;
use super::service::Qcow2Queue;
use super::{Extent, Qcow2Image};
use crate::bounce::{for_each_part, slice_iovecs, IOV_MAX};
use crate::disk::Disk;
use crate::sync::transfer;
use crate::uring::UringEngine;
use crate::{BackendError, Completion, IoOp, OpKind};

/// Where one part of a request goes.
#[derive(Debug, Clone, Copy)]
struct Piece {
    /// Byte range within the request.
    start: u64,
    len: u64,
    /// `None`: reads as zeros.
    file: Option<(std::os::fd::RawFd, u64)>,
}

/// A request the io_uring is working on, waiting for `remaining` pieces.
#[derive(Debug)]
struct Parent {
    /// The request, when it was split (the pieces are separate ops); `None` when the one
    /// piece in flight is the request itself.
    op: Option<IoOp>,
    /// The request's own tag and offset, restored on completion.
    tag: u64,
    offset: u64,
    remaining: usize,
    error: Option<BackendError>,
}

/// See the module docs. Without `uring`, the fast path runs its reads and writes at once
/// with plain syscalls if `inline` (an image in memory: tmpfs, where io_uring would hand
/// every op to a kernel thread; see `EngineKind::Auto`), else every op goes to the service.
pub(crate) struct Qcow2Engine {
    uring: Option<UringEngine>,
    inline: bool,
    /// Inline requests pushed and not yet run (they run at submit, after the whole batch
    /// has been parsed, as on the synchronous raw engine), with their pieces.
    deferred: Vec<(IoOp, std::ops::Range<usize>)>,
    deferred_pieces: Vec<Piece>,
    /// Scratch iovecs for inline transfers.
    work: Vec<libc::iovec>,
    service: Qcow2Queue,
    parents: Vec<Option<Parent>>,
    free: Vec<usize>,
    /// Scratch: the plan of the request being pushed, the io_uring's completions.
    pieces: Vec<Piece>,
    done: Vec<Completion>,
    /// iovec arrays of finished pieces, for reuse.
    spare: Vec<Vec<libc::iovec>>,
    /// Requests started on the io_uring (or completed as zeros), and sent to the service.
    routed: Routes,
    /// This engine's requests using a mapping: raised before the lookup, lowered when
    /// the request completes (see `quiesce.rs`).
    mapped: Arc<AtomicUsize>,
}

/// How many requests took which path ([`crate::Engine::qcow2_routes`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Routes {
    pub fast: u64,
    pub service: u64,
}

// SAFETY: `Qcow2Engine` is `!Send` only through `spare`, whose iovec arrays are kept empty
// (their allocations are reused, no pointer in them is ever read), and through the ops
// it holds, which are `Send` themselves (see `IoOp`).
unsafe impl Send for Qcow2Engine {}

impl Qcow2Engine {
    pub(crate) fn new(
        image: &Qcow2Image,
        uring: Option<UringEngine>,
        inline: bool,
        service: Qcow2Queue,
        depth: usize,
    ) -> Qcow2Engine {
        Qcow2Engine {
            inline: inline && uring.is_none(),
            deferred: Vec::new(),
            deferred_pieces: Vec::new(),
            work: Vec::new(),
            mapped: image.quiesce.register(),
            uring,
            service,
            parents: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            pieces: Vec::new(),
            done: Vec::new(),
            spare: Vec::new(),
            routed: Routes::default(),
        }
    }

    pub(crate) fn routes(&self) -> Routes {
        self.routed
    }

    /// Whether the fast path's reads and writes run in `submit` (inline, on a memory-backed
    /// image): then the queue takes short batches, as on the synchronous raw engine
    /// ([`crate::Engine::batch_limit`]).
    pub(crate) fn runs_at_submit(&self) -> bool {
        self.uring.is_none() && self.inline
    }

    /// `"qcow2+io_uring"`, `"qcow2+sync"` or `"qcow2"` (service threads only).
    pub(crate) fn name(&self) -> &'static str {
        match (&self.uring, self.inline) {
            (Some(_), _) => "qcow2+io_uring",
            (None, true) => "qcow2+sync",
            (None, false) => "qcow2",
        }
    }

    /// Start `op`: on the io_uring if its mapping allows, else on the service threads.
    /// Requests that read only zeros complete into `ready`.
    ///
    /// # Safety
    /// As for [`crate::Engine::push`].
    pub(crate) unsafe fn push(&mut self, disk: &Disk, image: &Qcow2Image, op: IoOp, ready: &mut Vec<Completion>) {
        let op = if self.inline {
            // One count for the whole batch of deferred requests: raised by the first,
            // lowered when the batch has run; the later ones only check `draining` (their
            // lookups come after the raise, so a discard either sees the count or they see
            // `draining`).
            let batch_open = !self.deferred.is_empty();
            let admitted = if batch_open { !image.quiesce.draining() } else { image.quiesce.enter(&self.mapped) };
            if admitted && self.plan(image, &op) {
                let at = self.deferred_pieces.len();
                self.deferred_pieces.extend_from_slice(&self.pieces);
                self.deferred.push((op, at..self.deferred_pieces.len()));
                self.routed.fast += 1;
                return;
            }
            if admitted && !batch_open {
                Quiesce::leave(&self.mapped);
            }
            op
        } else if self.uring.is_some() && image.quiesce.enter(&self.mapped) {
            let started = match self.plan(image, &op) {
                // SAFETY: forwarded caller contract.
                true => unsafe { self.start(disk, op, ready) },
                false => Err(op),
            };
            match started {
                Ok(()) => {
                    self.routed.fast += 1;
                    return;
                }
                Err(op) => {
                    Quiesce::leave(&self.mapped);
                    op
                }
            }
        } else {
            op
        };
        self.routed.service += 1;
        self.service.push(op);
    }

    /// Fill `self.pieces` with where `op` goes; `false` if it must go to the service.
    fn plan(&mut self, image: &Qcow2Image, op: &IoOp) -> bool {
        self.pieces.clear();
        if self.uring.is_none() && !self.inline {
            return false;
        }
        let write = match op.kind {
            OpKind::Read => false,
            // A FUA write's cluster may have been allocated since the last flush: its
            // mapping must be made durable too, which is the service's flush.
            OpKind::Write if !op.fua => true,
            _ => return false,
        };
        let mut start = 0;
        while start < op.len {
            let (extent, n) = image.map(op.offset + start, op.len - start);
            let file = match extent {
                Extent::Data { fd, offset, writable } if writable || !write => Some((fd, offset)),
                Extent::Zero if !write => None,
                _ => return false,
            };
            // Neighbouring pieces in the same file, back to back, are one piece.
            match self.pieces.last_mut() {
                Some(p) if adjoins(p, file) => p.len += n,
                _ => self.pieces.push(Piece { start, len: n, file }),
            }
            start += n;
        }
        let files = self.pieces.iter().filter(|p| p.file.is_some()).count();
        let room = self.uring.as_ref().is_none_or(|u| files <= u.free_slots() && !self.free.is_empty());
        room && op.iovs.len() <= IOV_MAX
    }

    /// Run the deferred inline requests with plain syscalls.
    ///
    /// # Safety
    /// As for [`crate::Engine::push`] (each request came through it).
    unsafe fn run_deferred(&mut self, ready: &mut Vec<Completion>) {
        let mut part = self.spare.pop().unwrap_or_default();
        for (op, range) in self.deferred.drain(..) {
            let write = op.kind == OpKind::Write;
            let mut result = Ok(op.len);
            for p in &self.deferred_pieces[range] {
                // One piece (the common case): the request's own iovecs.
                let iovs = if p.len == op.len {
                    &op.iovs[..]
                } else {
                    part.clear();
                    slice_iovecs(&op.iovs, p.start as usize, p.len as usize, &mut part);
                    &part[..]
                };
                let Some((fd, host)) = p.file else {
                    // SAFETY: the caller's contract: a read's iovecs are writable.
                    unsafe { zero_iovecs(iovs, 0, p.len as usize) };
                    continue;
                };
                // SAFETY: `fd` belongs to the image, which the disk (and so the engine)
                // keeps open for this whole call.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                // SAFETY: `iovs` is (a part of) the request's iovecs: the caller's contract.
                if let Err(e) = unsafe { transfer(fd, write, iovs, host, p.len, 0, op.kind, &mut self.work) } {
                    result = Err(e);
                    break;
                }
            }
            ready.push(Completion { op, result });
        }
        // The batch's one count (see `push`).
        Quiesce::leave(&self.mapped);
        self.deferred_pieces.clear();
        part.clear();
        self.spare.push(part);
    }

    /// Carry out the plan in `self.pieces`. `Err(op)` if the io_uring took nothing.
    ///
    /// # Safety
    /// As for [`crate::Engine::push`].
    unsafe fn start(&mut self, disk: &Disk, mut op: IoOp, ready: &mut Vec<Completion>) -> Result<(), IoOp> {
        let Qcow2Engine { uring, parents, free, pieces, spare, .. } = self;
        let (Some(uring), Some(idx)) = (uring.as_mut(), free.pop()) else { return Err(op) };
        let (tag, offset) = (op.tag, op.offset);
        if let [Piece { start: 0, len, file: Some((fd, host)) }] = pieces[..] {
            if len == op.len {
                // One piece: the request itself goes to the file.
                (op.offset, op.tag) = (host, idx as u64);
                // SAFETY: forwarded caller contract; `fd` belongs to the image, which the
                // disk (and so the engine) keeps open.
                if let Err(mut op) = unsafe { uring.push_at(disk, fd, op) } {
                    free.push(idx);
                    (op.offset, op.tag) = (offset, tag);
                    return Err(op);
                }
                parents[idx] = Some(Parent { op: None, tag, offset, remaining: 1, error: None });
                return Ok(());
            }
        }
        let mut remaining = 0;
        let mut error = None;
        for p in pieces.iter() {
            let Some((fd, host)) = p.file else {
                // SAFETY: the caller's contract makes a read's iovecs writable until its
                // completion is handed back, and these bytes belong to this request.
                unsafe { zero_iovecs(&op.iovs, p.start as usize, p.len as usize) };
                continue;
            };
            let mut iovs = spare.pop().unwrap_or_default();
            slice_iovecs(&op.iovs, p.start as usize, p.len as usize, &mut iovs);
            let piece = IoOp { kind: op.kind, offset: host, len: p.len, iovs, fua: false, tag: idx as u64 };
            // SAFETY: as above; the piece's iovecs are a part of the request's.
            match unsafe { uring.push_at(disk, fd, piece) } {
                Ok(()) => remaining += 1,
                // Cannot happen (`plan` counted the free slots), but never lose a request.
                Err(_) => error = Some(BackendError::errno("qcow2 read/write", libc::EBUSY)),
            }
        }
        if remaining == 0 {
            // Zeros only (or nothing could start): done with the mapping.
            Quiesce::leave(&self.mapped);
            free.push(idx);
            let result = match error {
                Some(e) => Err(e),
                None => Ok(op.len),
            };
            ready.push(Completion { op, result });
        } else {
            parents[idx] = Some(Parent { op: Some(op), tag, offset, remaining, error });
        }
        Ok(())
    }

    /// Hand the pushed requests over: to the service threads, to the io_uring, or (inline)
    /// run them now, completing into `ready`.
    pub(crate) fn submit(&mut self, disk: &Disk, ready: &mut Vec<Completion>) -> Result<(), BackendError> {
        if let Some((_, service)) = disk.qcow2() {
            self.service.submit(service);
        }
        if !self.deferred.is_empty() {
            // SAFETY: every deferred request came through `push`, whose caller's contract
            // holds until its completion is handed back.
            unsafe { self.run_deferred(ready) };
        }
        match &mut self.uring {
            Some(u) => u.submit(),
            None => Ok(()),
        }
    }

    pub(crate) fn unsubmitted(&mut self) -> usize {
        self.service.unsubmitted() + self.deferred.len() + self.uring.as_mut().map_or(0, |u| u.unsubmitted())
    }

    /// Move finished requests to `out`.
    pub(crate) fn reap(&mut self, disk: &Disk, out: &mut Vec<Completion>) {
        self.service.reap(out);
        let Qcow2Engine { uring: Some(uring), parents, free, done, spare, mapped, .. } = self else { return };
        uring.reap(disk, done);
        for Completion { op: mut piece, result } in done.drain(..) {
            let idx = piece.tag as usize;
            let Some(parent) = parents.get_mut(idx).and_then(Option::as_mut) else {
                tracing::error!(tag = piece.tag, "qcow2 completion for an unknown request");
                continue;
            };
            parent.remaining -= 1;
            if let Err(e) = result {
                parent.error.get_or_insert(e);
            }
            if parent.op.is_some() {
                // A piece of a split request: keep its iovec array for the next one.
                let mut iovs = std::mem::take(&mut piece.iovs);
                iovs.clear();
                spare.push(iovs);
                if parent.remaining > 0 {
                    continue;
                }
            }
            let Some(Parent { op: whole, tag, offset, error, .. }) = parents[idx].take() else { continue };
            Quiesce::leave(mapped);
            free.push(idx);
            let mut op = whole.unwrap_or(piece);
            (op.tag, op.offset) = (tag, offset);
            let result = match error {
                Some(e) => Err(e),
                None => Ok(op.len),
            };
            out.push(Completion { op, result });
        }
    }

    /// The io_uring's work in flight, and ops handed to the service and not yet back.
    pub(crate) fn busy(&self) -> usize {
        self.uring.as_ref().map_or(0, |u| u.busy()) + self.service.outstanding()
    }

    /// The eventfd both the io_uring and the service signal.
    pub(crate) fn eventfd(&self) -> BorrowedFd<'_> {
        self.service.eventfd()
    }
}

impl Drop for Qcow2Engine {
    /// Wait for the io_uring's work (its own drop does), then declare that this engine uses
    /// no mapping any more: requests that never get reaped must not hold up a discard.
    fn drop(&mut self) {
        drop(self.uring.take());
        self.mapped.store(0, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Does `file` continue piece `p` (same file, or both zeros, with no gap)?
fn adjoins(p: &Piece, file: Option<(std::os::fd::RawFd, u64)>) -> bool {
    match (p.file, file) {
        (None, None) => true,
        (Some((fd, off)), Some((fd2, off2))) => fd == fd2 && off + p.len == off2,
        _ => false,
    }
}

/// Zero bytes `start..start + len` of the buffers `iovs` describe.
///
/// # Safety
/// Those bytes must be valid for writes.
unsafe fn zero_iovecs(iovs: &[libc::iovec], start: usize, len: usize) {
    // SAFETY: the caller's contract covers every part of the range.
    for_each_part(iovs, start, len, |p, n| unsafe { std::ptr::write_bytes(p, 0, n) });
}
