//! One virtio-blk queue, from popped chain to used ring.
//!
//! ```text
//!  avail ring ──pop──▶ Chain ──parse──▶ Request ──merge──▶ backend I/O (io_uring)
//!                                         │                        │
//!                                         │ (GET_ID, errors)       ▼ Completion
//!                                         └──────────▶ finish: status byte, used ring
//!                                                              │
//!                                               publish ──▶ "notify?" (caller signals)
//! ```
//!
//! A request lives in the slot of its head descriptor from pop to finish: the queue
//! guarantees a head is never handed out twice while in flight, so at most `size`
//! requests are pending and slots are never allocated on the hot path. A pending slot
//! holds its chain, and the chain holds the guest memory table, so memory stays mapped
//! while the kernel may still write into it.
//!
//! Metrics ([`QueueMetrics`], written by this queue's one thread): a request is counted as
//! started where its `Pending` is made and as finished in [`BlkQueue::finish`], with its
//! latency from the pop to the status write ([`vblk_metrics::now_ns`]) while timing is on
//! ([`BlkQueue::set_timing`]). The clock is read once per batch of pops (at the first chain)
//! and once per batch of completions ([`BlkQueue::complete_at`]), not per request: a latency
//! is exact to within the time it takes to pop or finish the rest of its batch. A request
//! finished at once (GET_ID, an invalid request) takes 0.
//!
//! QoS ([`BlkQueue::set_throttle`], [`crate::qos`]): with limits set, the queue asks the
//! export's [`Throttle`] before it pops each chain (only when the ring has one) and charges
//! it once the request is parsed. When the throttle says wait, the chains stay in the ring,
//! [`BlkQueue::throttled_until`] says until when, and the caller sleeps until then; the time
//! held back is counted ([`QueueMetrics::throttled`]). The batch popped before that is merged
//! and submitted as usual.

use std::sync::Arc;

use vblk_backend::{Completion, Engine, IoOp, OpKind};
use vblk_metrics::{now_ns, ErrorStatus, Op, QueueMetrics};
use vblk_queue::{Chain, ChainError, Popped, QueueError, Ring, StatusByte};
use vblk_virtio::blk::Status;
use vblk_virtio::Iov;

use crate::config::DeviceParams;
use crate::merge::{MergeBuffer, Staged};
use crate::qos::{Admission, Throttle};
use crate::request::{data_buffers, header_type, parse, Parsed, Request, RequestError};

/// Bits of a backend tag that carry the head index; the bits above name the queue.
pub const TAG_HEAD_BITS: u32 = 16;

/// Split a backend tag into (queue id, head).
pub fn split_tag(tag: u64) -> (u64, u16) {
    (tag >> TAG_HEAD_BITS, (tag & 0xffff) as u16)
}

/// A request between start and finish.
#[derive(Debug, Clone, Copy)]
struct Pending {
    status: Iov,
    /// Writable bytes before the status byte.
    data_in: u64,
    /// Bytes the request moves when it succeeds: read or written, discarded or zeroed, ID
    /// bytes written (0 for a request that failed its checks).
    bytes: u64,
    /// The next request merged into the same backend I/O.
    next: Option<u16>,
    op: Op,
}

impl Pending {
    /// Bytes the device writes before the status byte when the request succeeds (read
    /// data, device ID).
    fn data_out(&self) -> u64 {
        match self.op {
            Op::Read | Op::GetId => self.bytes,
            _ => 0,
        }
    }
}

impl Request {
    /// The metrics' name of this request, and the bytes it moves when it succeeds.
    fn metric(&self) -> (Op, u64) {
        match *self {
            Request::Read { len, .. } => (Op::Read, len),
            Request::Write { len, .. } => (Op::Write, len),
            Request::Flush => (Op::Flush, 0),
            Request::GetId { len } => (Op::GetId, len as u64),
            Request::Discard { len, .. } => (Op::Discard, len),
            Request::WriteZeroes { len, .. } => (Op::WriteZeroes, len),
        }
    }
}

/// The metrics' name of a request that failed its checks, from its header's type.
fn op_of_type(t: Option<u32>) -> Op {
    use vblk_virtio::blk::req_type;
    match t {
        Some(req_type::IN) => Op::Read,
        Some(req_type::OUT) => Op::Write,
        Some(req_type::FLUSH) => Op::Flush,
        Some(req_type::GET_ID) => Op::GetId,
        Some(req_type::DISCARD) => Op::Discard,
        Some(req_type::WRITE_ZEROES) => Op::WriteZeroes,
        _ => Op::Other,
    }
}

/// The used length of a chain (§2.7.8.2: the device has written at least `len` bytes
/// from the start of the writable part): the data bytes written, plus the status byte
/// when nothing is left unwritten before it.
fn used_len(written: u64, data_in: u64) -> u32 {
    let len = if written >= data_in { data_in + 1 } else { written };
    len.min(u32::MAX as u64) as u32
}

#[derive(Debug, Default)]
struct Slot {
    chain: Chain,
    pending: Option<Pending>,
}

/// The device-side pipeline of one queue.
pub struct BlkQueue {
    queue: Ring,
    params: Arc<DeviceParams>,
    /// Queue id in the high bits of every backend tag this queue issues.
    tag_base: u64,
    slots: Vec<Slot>,
    /// The chain `pop` fills; swapped into the head's slot.
    spare_chain: Chain,
    spare_iovs: Vec<Vec<libc::iovec>>,
    scratch: Vec<Iov>,
    /// Reads and writes of the current batch, waiting to be merged and submitted.
    merge: MergeBuffer,
    backend_errors: ErrorLog,
    metrics: Arc<QueueMetrics>,
    /// The clock ([`now_ns`]) as last read or given: at the first pop of a batch, at a batch
    /// of completions.
    clock: u64,
    /// When each pending request was popped ([`now_ns`]), by head; written and read only
    /// while timing. Not in `Pending`: a slot stays as small as it was before the metrics
    /// (a bigger slot measurably moved the end-to-end figure, see docs/PERFORMANCE.md).
    started: Vec<u64>,
    /// Measure latencies (read the clock); off: the histogram is left alone.
    timing: bool,
    /// The export's QoS limits, if this queue is subject to any.
    throttle: Option<Arc<Throttle>>,
    /// Set while the throttle holds this ring's chains back.
    throttled: Option<Held>,
    /// Used entries were added since the last publish.
    unpublished: bool,
}

/// A ring held back by its throttle.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// Since when ([`now_ns`]).
    since: u64,
    /// When to ask again.
    until: u64,
}

/// Backend failures (the storage, not the guest's request) are logged at `warn`, at most
/// one line per second per queue, saying how many were not shown: a failing disk or a
/// cluster that is down is visible in the log without flooding it.
#[derive(Debug, Default)]
struct ErrorLog {
    last: Option<std::time::Instant>,
    unlogged: u64,
}

impl ErrorLog {
    fn note(&mut self, head: u16, e: &RequestError) {
        let now = std::time::Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(1)) {
            self.unlogged += 1;
            return;
        }
        tracing::warn!(head, error = %e, not_shown_before = self.unlogged, "I/O failed (IOERR to the guest)");
        (self.last, self.unlogged) = (Some(now), 0);
    }
}

impl BlkQueue {
    /// A queue counting into counters of its own ([`BlkQueue::metrics`]).
    pub fn new(queue: impl Into<Ring>, params: Arc<DeviceParams>, queue_id: u16) -> Self {
        Self::with_metrics(queue, params, queue_id, Arc::default())
    }

    /// A queue counting into `metrics`, which no other thread may write while it runs.
    pub fn with_metrics(
        queue: impl Into<Ring>,
        params: Arc<DeviceParams>,
        queue_id: u16,
        metrics: Arc<QueueMetrics>,
    ) -> Self {
        let queue = queue.into();
        let size = queue.size() as usize;
        BlkQueue {
            slots: (0..size).map(|_| Slot::default()).collect(),
            queue,
            params,
            tag_base: (queue_id as u64) << TAG_HEAD_BITS,
            spare_chain: Chain::new(),
            spare_iovs: Vec::new(),
            scratch: Vec::new(),
            merge: MergeBuffer::default(),
            backend_errors: ErrorLog::default(),
            metrics,
            clock: now_ns(),
            started: vec![0; size],
            timing: true,
            throttle: None,
            throttled: None,
            unpublished: false,
        }
    }

    /// Subject this queue to `throttle` (the export's QoS limits; none by default).
    pub fn set_throttle(&mut self, throttle: Arc<Throttle>) {
        self.throttle = Some(throttle);
    }

    /// While the throttle holds this ring's chains back: when ([`now_ns`]) to call
    /// [`process_available`](Self::process_available) again. (Earlier calls ask the throttle
    /// again, which is how a change of limits applies at once.)
    pub fn throttled_until(&self) -> Option<u64> {
        self.throttled.map(|h| h.until)
    }

    /// The ring is no longer held back (at `now`): count the time it was.
    fn release_throttle(&mut self, now: u64) {
        if let Some(h) = self.throttled.take() {
            let ns = now.saturating_sub(h.since);
            self.metrics.throttled(ns);
            if let Some(t) = &self.throttle {
                t.add_throttled(ns);
            }
        }
    }

    /// Stop counting throttled time (the worker is stopping): a later
    /// [`process_available`](Self::process_available) asks the throttle afresh.
    pub fn end_throttle(&mut self) {
        if self.throttled.is_some() {
            self.release_throttle(now_ns());
        }
    }

    /// May the next chain be popped? With limits only. Reads the clock once per batch
    /// (`stamped`: already read, in `self.clock`), and only when the ring has a chain.
    fn admit(&mut self, stamped: &mut bool) -> Result<bool, QueueError> {
        if !self.queue.has_available()? {
            // Nothing is held back (a held ring can only be emptied by a driver reset).
            if self.throttled.is_some() {
                self.release_throttle(now_ns());
            }
            return Ok(false);
        }
        if !*stamped {
            self.clock = now_ns();
            *stamped = true;
        }
        let now = self.clock;
        let Some(t) = &self.throttle else { return Ok(true) };
        match t.admit(now) {
            Admission::Go => {
                self.release_throttle(now);
                Ok(true)
            }
            Admission::Wait(ns) => {
                let since = self.throttled.map_or(now, |h| h.since);
                self.throttled = Some(Held { since, until: now.saturating_add(ns) });
                Ok(false)
            }
        }
    }

    pub fn queue(&self) -> &Ring {
        &self.queue
    }

    pub fn queue_mut(&mut self) -> &mut Ring {
        &mut self.queue
    }

    /// This queue's counters.
    pub fn metrics(&self) -> &Arc<QueueMetrics> {
        &self.metrics
    }

    /// Measure request latencies (on by default): two clock reads per batch of requests.
    pub fn set_timing(&mut self, on: bool) {
        self.timing = on;
    }

    /// Whether this queue measures latencies (a caller of [`complete_at`](Self::complete_at)
    /// need not read the clock when it does not).
    pub fn timing(&self) -> bool {
        self.timing
    }

    /// Requests started and not finished.
    pub fn in_flight(&self) -> u16 {
        self.queue.num_in_flight()
    }

    /// Pop every available chain and start it, until the ring is empty or the throttle
    /// says wait ([`throttled_until`](Self::throttled_until)). Returns how many chains were
    /// popped. An error means the ring is broken (the queue stops; the caller reports it).
    pub fn process_available(&mut self, io: &mut Engine) -> Result<usize, QueueError> {
        // Without limits, QoS costs this one relaxed load per batch.
        let limited = self.throttle.as_deref().is_some_and(Throttle::is_limited);
        if !limited && self.throttled.is_some() {
            // The limits were lifted while the ring was held.
            self.release_throttle(now_ns());
        }
        let mut n = 0;
        let mut stamped = false;
        let limit = io.batch_limit();
        let ring = loop {
            if n >= limit {
                break Ok(());
            }
            if limited {
                match self.admit(&mut stamped) {
                    Ok(true) => {}
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(e),
                }
            }
            // The first pop may re-read `avail.idx`; the rest of the batch takes what that read
            // showed, so the batch ends there and is completed and published while the driver
            // may still be adding requests (see `Ring::pop_seen`).
            let popped =
                if n == 0 { self.queue.pop(&mut self.spare_chain) } else { self.queue.pop_seen(&mut self.spare_chain) };
            let popped = match popped {
                Ok(p) => p,
                Err(e) => break Err(e),
            };
            let started = match popped {
                Popped::Empty => break Ok(()),
                Popped::Refused { head, error, status } => self.refuse(head, error, status),
                Popped::Chain => {
                    if !stamped && self.timing {
                        // Once per batch: the start time of every request popped in it.
                        self.clock = now_ns();
                        stamped = true;
                    }
                    let head = self.spare_chain.head();
                    std::mem::swap(&mut self.spare_chain, &mut self.slots[head as usize].chain);
                    self.start(head, io, limited)
                }
            };
            n += 1;
            if let Err(e) = started {
                break Err(e);
            }
        };
        // Requests popped before the ring broke still run to completion: none may be left
        // staged (never submitted, never completed, its memory never released).
        self.submit_staged(io);
        if n > 0 {
            self.metrics.batch();
            if let Err(e) = io.submit() {
                // The ops stay queued; the worker retries before it sleeps.
                tracing::warn!(%e, "backend submit failed");
            }
        }
        ring.map(|()| n)
    }

    /// A chain the ring refused: IOERR in its status byte, or, with no status byte to
    /// write, the queue breaks (never a silent completion).
    fn refuse(&mut self, head: u16, error: ChainError, status: Option<StatusByte>) -> Result<(), QueueError> {
        self.metrics.refused();
        let Some(s) = status else {
            return Err(self.no_status(head, &error));
        };
        tracing::warn!(head, %error, "refusing descriptor chain (IOERR)");
        // The byte was validated against this queue's memory table.
        let _ = self.queue.memory().write_iov(s.iov, 0, &[Status::IoErr as u8]);
        self.queue.add_used(head, used_len(0, s.writable_before));
        self.unpublished = true;
        Ok(())
    }

    /// A chain with nowhere to write its status: completing it would read as success to a
    /// driver that looks at the stale byte, so the queue breaks instead.
    fn no_status(&mut self, head: u16, why: &dyn std::fmt::Display) -> QueueError {
        tracing::warn!(head, reason = %why, "chain without a status byte; stopping the queue");
        self.queue.break_ring(QueueError::NoStatus { head, reason: why.to_string() })
    }

    /// Parse the chain in `head`'s slot and start it, or finish it at once (`limited`:
    /// charge the throttle). An error: the chain cannot be answered and the queue is now
    /// broken.
    fn start(&mut self, head: u16, io: &mut Engine, limited: bool) -> Result<(), QueueError> {
        let slot = &mut self.slots[head as usize];
        let (status, data_in, request) = match parse(&slot.chain, &self.params) {
            Parsed::Unanswerable(error) => {
                self.metrics.refused();
                slot.chain.release();
                return Err(self.no_status(head, &error));
            }
            Parsed::Answerable { status, data_in_len, request } => (status, data_in_len, request),
        };
        let (op, bytes) = match &request {
            Ok(r) => r.metric(),
            Err(_) => (op_of_type(header_type(&slot.chain)), 0),
        };
        slot.pending = Some(Pending { status, data_in, bytes, next: None, op });
        self.metrics.started();
        if self.timing {
            self.started[head as usize] = self.clock;
        }
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                self.finish(head, Err(e), 0);
                return Ok(());
            }
        };
        if limited {
            if let Some(t) = &self.throttle {
                t.charge(self.clock, request.qos_cost());
            }
        }
        let fua = !self.params.writeback();
        let tag = self.tag_base | head as u64;
        let op = match request {
            Request::Read { len: 0, .. } | Request::Write { len: 0, .. } => {
                self.finish(head, Ok(()), 0);
                return Ok(());
            }
            Request::Read { offset, len } | Request::Write { offset, len } => {
                // Submitted after the batch is popped, merged with its neighbours. The
                // iov count bounds the data buffers (no need to compute them twice).
                let write = matches!(request, Request::Write { .. });
                let segs = if write { slot.chain.readable().len() } else { slot.chain.writable().len() };
                self.merge.push(Staged { head, write, offset, len, segs });
                return Ok(());
            }
            Request::Flush => IoOp::without_data(OpKind::Flush, 0, 0, false, tag),
            Request::Discard { offset, len } => IoOp::without_data(OpKind::Discard, offset, len, fua, tag),
            Request::WriteZeroes { offset, len, unmap } => {
                IoOp::without_data(OpKind::WriteZeroes { unmap }, offset, len, fua, tag)
            }
            Request::GetId { len } => {
                let serial = self.params.serial;
                let r = slot.chain.writer().write_all(&serial[..len as usize]);
                let written = if r.is_ok() { len as u64 } else { 0 };
                self.finish(head, r.map_err(|e| RequestError::Memory(e.to_string())), written);
                return Ok(());
            }
        };
        self.push(op, io);
        Ok(())
    }

    /// Submit the batch's reads and writes, contiguous ones merged into one I/O.
    fn submit_staged(&mut self, io: &mut Engine) {
        if self.merge.is_empty() {
            return;
        }
        let fua = !self.params.writeback();
        let mut merge = std::mem::take(&mut self.merge);
        merge.drain_runs(self.params.merge, |run| {
            let first = run[0];
            let mut iovs = self.spare_iovs.pop().unwrap_or_default();
            for (i, s) in run.iter().enumerate() {
                let slot = &mut self.slots[s.head as usize];
                let request = if s.write {
                    Request::Write { offset: s.offset, len: s.len }
                } else {
                    Request::Read { offset: s.offset, len: s.len }
                };
                self.scratch.clear();
                data_buffers(&slot.chain, &request, &mut self.scratch);
                iovs.extend(self.scratch.iter().map(Iov::as_iovec));
                if let (Some(p), Some(next)) = (slot.pending.as_mut(), run.get(i + 1)) {
                    p.next = Some(next.head);
                }
            }
            let len = run.iter().map(|s| s.len).sum();
            let kind = if first.write { OpKind::Write } else { OpKind::Read };
            if run.len() > 1 {
                self.metrics.merged(run.len() as u64 - 1);
            }
            let op = IoOp { kind, offset: first.offset, len, iovs, fua, tag: self.tag_base | first.head as u64 };
            self.push(op, io);
        });
        self.merge = merge;
    }

    fn push(&mut self, op: IoOp, io: &mut Engine) {
        let (_, head) = split_tag(op.tag);
        // SAFETY: the iovecs point into guest memory that the chains in the slots of this
        // op's requests keep mapped (each holds an Arc of the memory table). The chains stay
        // in their slots until this op's completion reaches `complete`, and `Drop` leaks the
        // table rather than unmap it if the queue is dropped with I/O still in flight.
        if let Err(op) = unsafe { io.push(op) } {
            tracing::error!(head, "backend queue full; failing request");
            self.recycle(op);
            self.finish_all(head, Err(RequestError::BackendFull), 0);
        }
    }

    /// A backend completion for one of this queue's (possibly merged) requests. A read or
    /// write succeeds only if the backend moved every byte: a short transfer is an I/O error
    /// (§5.2.6: VIRTIO_BLK_S_OK vouches for the whole data buffer, which a short read did
    /// not fill).
    pub fn complete(&mut self, c: Completion) {
        let now = if self.timing { now_ns() } else { 0 };
        self.complete_at(c, now);
    }

    /// [`complete`](Self::complete) with the clock ([`now_ns`]) read by the caller: one read
    /// for a batch of completions.
    pub fn complete_at(&mut self, c: Completion, now: u64) {
        self.clock = now;
        let (_, head) = split_tag(c.op.tag);
        let data = matches!(c.op.kind, OpKind::Read | OpKind::Write);
        let (result, done) = match c.result {
            Ok(done) if data && done != c.op.len => (Err(RequestError::ShortTransfer { done, len: c.op.len }), done),
            Ok(done) => (Ok(()), done),
            Err(e) => (Err(RequestError::Backend(e.to_string())), 0),
        };
        // Only a read puts data in the guest's writable buffers: the kernel wrote them, so
        // a live migration's dirty log is told here (a no-op when not migrating).
        let read = if c.op.kind == OpKind::Read { done } else { 0 };
        if read > 0 {
            self.queue.memory().log_iovecs(&c.op.iovs);
        }
        self.recycle(c.op);
        self.finish_all(head, result, read);
    }

    /// Finish `head` and every request merged after it with the same result. `read`:
    /// bytes the backend read into the run's buffers, which are the requests' buffers in
    /// order (a short read filled the first ones).
    fn finish_all(&mut self, head: u16, result: Result<(), RequestError>, mut read: u64) {
        let mut next = Some(head);
        while let Some(h) = next {
            let p = self.slots.get(h as usize).and_then(|s| s.pending.as_ref());
            next = p.and_then(|p| p.next);
            let written = read.min(p.map_or(0, Pending::data_out));
            read -= written;
            self.finish(h, result.clone(), written);
        }
    }

    fn recycle(&mut self, mut op: IoOp) {
        if op.iovs.capacity() > 0 {
            op.iovs.clear();
            self.spare_iovs.push(op.iovs);
        }
    }

    /// The one place a request ends: write its status byte and put it in the used ring
    /// with the bytes written (`written` data bytes, then the status).
    fn finish(&mut self, head: u16, result: Result<(), RequestError>, written: u64) {
        let Some(slot) = self.slots.get_mut(head as usize) else { return };
        let Some(p) = slot.pending.take() else {
            tracing::error!(head, "completion for a request that is not pending");
            return;
        };
        let status = match &result {
            Ok(()) => Status::Ok,
            Err(e) => {
                match e {
                    RequestError::Backend(_) | RequestError::ShortTransfer { .. } => self.backend_errors.note(head, e),
                    // The guest's own malformed request: its business, not the operator's.
                    _ => tracing::debug!(head, error = %e, "request failed"),
                }
                e.status()
            }
        };
        let error = match status {
            Status::Ok => None,
            Status::IoErr => Some(ErrorStatus::IoErr),
            Status::Unsupp => Some(ErrorStatus::Unsupp),
        };
        let latency = self.timing.then(|| self.clock.saturating_sub(self.started[head as usize]));
        self.metrics.finished(p.op, error, p.bytes, latency);
        if let Some(mem) = slot.chain.memory() {
            // The status iov was validated with this chain's memory; a failure here would
            // be a vblk bug, and the used length then still returns the chain.
            let _ = mem.write_iov(p.status, 0, &[status as u8]);
        }
        slot.chain.release();
        self.queue.add_used(head, used_len(written, p.data_in));
        self.unpublished = true;
    }

    /// Publish finished requests to the used ring. `true`: the driver wants a notification.
    pub fn publish(&mut self) -> bool {
        if !self.unpublished {
            return false;
        }
        self.unpublished = false;
        self.metrics.published();
        let notify = self.queue.publish_used();
        if notify {
            self.metrics.notified();
        }
        notify
    }

    /// Re-enable kicks before sleeping; `true` if more work arrived meanwhile.
    pub fn enable_notification(&mut self) -> Result<bool, QueueError> {
        self.queue.enable_notification()
    }
}

impl Drop for BlkQueue {
    fn drop(&mut self) {
        for slot in &mut self.slots {
            if slot.pending.is_some() {
                // The kernel may still write into this request's buffers: never unmap them.
                if let Some(mem) = slot.chain.memory() {
                    tracing::error!("queue dropped with I/O in flight; leaking its guest memory mapping");
                    std::mem::forget(Arc::clone(mem));
                }
            }
        }
    }
}

#[cfg(all(test, target_pointer_width = "64"))]
mod tests {
    /// The per-request state is as big as it was before the metrics (commit 77e88ae: a
    /// 120-byte slot); a bigger one moved the end-to-end figure (docs/PERFORMANCE.md).
    #[test]
    fn a_slot_is_no_bigger_than_before_the_metrics() {
        assert!(std::mem::size_of::<super::Pending>() <= 40, "{}", std::mem::size_of::<super::Pending>());
        assert!(std::mem::size_of::<super::Slot>() <= 120, "{}", std::mem::size_of::<super::Slot>());
    }
}
