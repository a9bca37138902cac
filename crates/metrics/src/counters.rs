//! The counters the data plane writes: one [`QueueMetrics`] per virtqueue, one
//! [`WorkerMetrics`] per worker thread.
//!
//! **One writer each.** A queue is served by exactly one worker thread at a time (the
//! control plane stops and joins a worker before it hands its rings to the next one, which
//! orders the two threads' accesses), and a worker's own counters are written only by that
//! worker. So a counter is an `AtomicU64` updated with a relaxed load and a relaxed store:
//! on x86-64 and aarch64 a plain `mov`/`add`/`mov`, no `lock` prefix, no fence. Atomics
//! rather than cells only so that the scraping thread may read them at any time (it sees
//! each counter's value at some recent point; counters of one queue may be a few requests
//! apart from each other while I/O runs).
//!
//! **Own cache lines.** Each `QueueMetrics` and `WorkerMetrics` is aligned to 128 bytes
//! (two lines: the adjacent-line prefetcher pairs them), so no two writers ever share a line;
//! the scrape only reads.
//!
//! **Latency**: a histogram of fixed log-scale buckets, upper bounds 1 µs, 2 µs, 4 µs, …,
//! 2²³ µs (8.4 s), then +Inf: a sample is placed with one `leading_zeros`. The caller measures
//! a request from the moment it was popped from the ring to the moment its status was
//! written, with [`crate::clock`].

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

/// A counter with a single writer (see the module doc). Never decremented.
#[derive(Debug, Default)]
struct Counter(AtomicU64);

impl Counter {
    /// Add `n`. Only the counter's one writer may call this: two concurrent writers would
    /// lose counts (never memory safety).
    #[inline(always)]
    fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    #[inline]
    fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A request's operation, as the `op` label names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    GetId,
    /// Any other request type (answered UNSUPP), or a request whose header could not be read.
    Other,
}

impl Op {
    pub const COUNT: usize = 7;
    pub const ALL: [Op; Op::COUNT] =
        [Op::Read, Op::Write, Op::Flush, Op::Discard, Op::WriteZeroes, Op::GetId, Op::Other];

    /// The `op` label value.
    pub fn label(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write-zeroes",
            Op::GetId => "get-id",
            Op::Other => "other",
        }
    }
}

/// The status of a request that failed, as the `status` label names it (virtio 1.2 §5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorStatus {
    /// `VIRTIO_BLK_S_IOERR`.
    IoErr,
    /// `VIRTIO_BLK_S_UNSUPP`.
    Unsupp,
}

impl ErrorStatus {
    pub const COUNT: usize = 2;
    pub const ALL: [ErrorStatus; ErrorStatus::COUNT] = [ErrorStatus::IoErr, ErrorStatus::Unsupp];

    /// The `status` label value.
    pub fn label(self) -> &'static str {
        match self {
            ErrorStatus::IoErr => "ioerr",
            ErrorStatus::Unsupp => "unsupp",
        }
    }
}

/// Finite latency buckets; one more counts everything above the last (+Inf).
pub const LATENCY_BUCKETS: usize = 24;

/// The upper bound of latency bucket `i < LATENCY_BUCKETS`, in seconds: 2^i µs.
pub fn latency_bound_seconds(i: usize) -> f64 {
    (1u64 << i) as f64 * 1e-6
}

/// The bucket of a latency of `ns` nanoseconds: the first whose bound is at least it
/// (`LATENCY_BUCKETS` for +Inf).
#[inline]
pub fn latency_bucket(ns: u64) -> usize {
    // Whole microseconds, rounded up: `ns <= 2^i µs` exactly when `ceil(ns / 1000) <= 2^i`.
    let us = ns.div_ceil(1000);
    if us <= 1 {
        0
    } else {
        // ceil(log2(us)) for us >= 2.
        ((u64::BITS - (us - 1).leading_zeros()) as usize).min(LATENCY_BUCKETS)
    }
}

/// The counters of one virtqueue, written by the worker that serves it.
///
/// Requests are counted when they finish (status written), with their bytes, their error
/// status and their latency, so at any quiet moment `latency_count == requests`. Chains
/// refused before they became requests (a bad descriptor, no status byte) are counted
/// apart, in `refused`.
#[derive(Debug, Default)]
#[repr(C, align(128))]
pub struct QueueMetrics {
    // In this order (`repr(C)`): a read or write of the common kind touches one cache line,
    // the first (`started`, then reads, writes and flushes: requests and bytes side by side).
    started: Counter,
    ops: [OpCounters; Op::COUNT],
    errors: [Counter; ErrorStatus::COUNT],
    merged: Counter,
    refused: Counter,
    latency: [Counter; LATENCY_BUCKETS + 1],
    latency_sum_ns: Counter,
    throttled_ns: Counter,
    batches: Counter,
    publishes: Counter,
    notifications: Counter,
}

/// The finished requests of one operation, and the bytes they moved.
#[derive(Debug, Default)]
#[repr(C)]
struct OpCounters {
    requests: Counter,
    bytes: Counter,
}

impl QueueMetrics {
    /// A request was parsed and started (it will finish exactly once).
    #[inline]
    pub fn started(&self) {
        self.started.add(1);
    }

    /// A request finished: `error` is its failure status (None: OK), `bytes` the data it
    /// moved (counted only on success), `latency_ns` the time since it was started (None
    /// while the export is not timed: the histogram is left alone).
    #[inline]
    pub fn finished(&self, op: Op, error: Option<ErrorStatus>, bytes: u64, latency_ns: Option<u64>) {
        if let Some(ns) = latency_ns {
            self.latency[latency_bucket(ns)].add(1);
            self.latency_sum_ns.add(ns);
        }
        let c = &self.ops[op as usize];
        match error {
            None => c.bytes.add(bytes),
            Some(e) => self.errors[e as usize].add(1),
        }
        c.requests.add(1);
    }

    /// `n` requests rode along in another request's backend I/O.
    #[inline]
    pub fn merged(&self, n: u64) {
        self.merged.add(n);
    }

    /// A chain was refused before it became a request.
    #[inline]
    pub fn refused(&self) {
        self.refused.add(1);
    }

    /// Requests of this queue waited `ns` for a QoS limit.
    #[inline]
    pub fn throttled(&self, ns: u64) {
        self.throttled_ns.add(ns);
    }

    /// A pass over the avail ring popped at least one chain (requests per batch: started /
    /// batches).
    #[inline]
    pub fn batch(&self) {
        self.batches.add(1);
    }

    /// Used entries were made visible to the driver (one `used.idx` store).
    #[inline]
    pub fn published(&self) {
        self.publishes.add(1);
    }

    /// The driver was notified (a call eventfd write).
    #[inline]
    pub fn notified(&self) {
        self.notifications.add(1);
    }

    /// The counters now. Finished requests are read before started ones, so the in-flight
    /// count derived from them is never negative on a machine that keeps store order.
    pub fn snapshot(&self) -> QueueSnapshot {
        let requests = std::array::from_fn(|i| self.ops[i].requests.get());
        QueueSnapshot {
            requests,
            bytes: std::array::from_fn(|i| self.ops[i].bytes.get()),
            errors: load(&self.errors),
            latency: load(&self.latency),
            latency_sum_ns: self.latency_sum_ns.get(),
            merged: self.merged.get(),
            refused: self.refused.get(),
            throttled_ns: self.throttled_ns.get(),
            batches: self.batches.get(),
            publishes: self.publishes.get(),
            notifications: self.notifications.get(),
            started: self.started.get(),
        }
    }
}

fn load<const N: usize>(c: &[Counter; N]) -> [u64; N] {
    std::array::from_fn(|i| c[i].get())
}

/// One queue's counters at one moment, or several queues' summed ([`QueueSnapshot::add`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueSnapshot {
    pub requests: [u64; Op::COUNT],
    pub bytes: [u64; Op::COUNT],
    pub errors: [u64; ErrorStatus::COUNT],
    pub started: u64,
    pub merged: u64,
    pub refused: u64,
    /// Requests per latency bucket (not cumulative); the last is +Inf.
    pub latency: [u64; LATENCY_BUCKETS + 1],
    pub latency_sum_ns: u64,
    pub throttled_ns: u64,
    /// Passes over the avail ring that popped at least one chain.
    pub batches: u64,
    /// `used.idx` stores (used entries made visible).
    pub publishes: u64,
    /// Notifications sent to the driver (call eventfd writes).
    pub notifications: u64,
}

impl QueueSnapshot {
    pub fn requests(&self, op: Op) -> u64 {
        self.requests[op as usize]
    }

    pub fn bytes(&self, op: Op) -> u64 {
        self.bytes[op as usize]
    }

    pub fn errors(&self, status: ErrorStatus) -> u64 {
        self.errors[status as usize]
    }

    /// Finished requests of every operation.
    pub fn requests_total(&self) -> u64 {
        self.requests.iter().sum()
    }

    /// Requests started and not finished yet.
    pub fn in_flight(&self) -> u64 {
        self.started.saturating_sub(self.requests_total())
    }

    /// Requests in the latency histogram (equals [`requests_total`](Self::requests_total)
    /// whenever no request is finishing at the moment of the snapshot, if the queue was
    /// timed all along).
    pub fn latency_count(&self) -> u64 {
        self.latency.iter().sum()
    }

    /// Sum `other` into `self` (queues of an export, exports of a daemon).
    pub fn add(&mut self, other: &QueueSnapshot) {
        fn sum<const N: usize>(a: &mut [u64; N], b: &[u64; N]) {
            for (x, y) in a.iter_mut().zip(b) {
                *x = x.wrapping_add(*y);
            }
        }
        sum(&mut self.requests, &other.requests);
        sum(&mut self.bytes, &other.bytes);
        sum(&mut self.errors, &other.errors);
        sum(&mut self.latency, &other.latency);
        self.started = self.started.wrapping_add(other.started);
        self.merged = self.merged.wrapping_add(other.merged);
        self.refused = self.refused.wrapping_add(other.refused);
        self.latency_sum_ns = self.latency_sum_ns.wrapping_add(other.latency_sum_ns);
        self.throttled_ns = self.throttled_ns.wrapping_add(other.throttled_ns);
        self.batches = self.batches.wrapping_add(other.batches);
        self.publishes = self.publishes.wrapping_add(other.publishes);
        self.notifications = self.notifications.wrapping_add(other.notifications);
    }
}

/// The counters of one worker thread, written by that thread.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerMetrics {
    poll_ns: Counter,
    sleep_ns: Counter,
}

impl WorkerMetrics {
    /// The worker spent `ns` busy-polling its rings (adaptive polling, work included).
    #[inline]
    pub fn polled(&self, ns: u64) {
        self.poll_ns.add(ns);
    }

    /// The worker spent `ns` in `poll(2)`, waiting for a kick or a completion.
    #[inline]
    pub fn slept(&self, ns: u64) {
        self.sleep_ns.add(ns);
    }

    pub fn snapshot(&self) -> WorkerSnapshot {
        WorkerSnapshot { poll_ns: self.poll_ns.get(), sleep_ns: self.sleep_ns.get() }
    }
}

/// One worker's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerSnapshot {
    pub poll_ns: u64,
    pub sleep_ns: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_powers_of_two_microseconds() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1000), 0);
        assert_eq!(latency_bucket(1001), 1);
        assert_eq!(latency_bucket(2000), 1);
        assert_eq!(latency_bucket(2001), 2);
        assert_eq!(latency_bucket(4000), 2);
        assert_eq!(latency_bucket(100_000), 7); // 100 µs <= 128 µs
        let last = (1u64 << (LATENCY_BUCKETS - 1)) * 1000;
        assert_eq!(latency_bucket(last), LATENCY_BUCKETS - 1);
        assert_eq!(latency_bucket(last + 1), LATENCY_BUCKETS);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS);
        // Every sample lands in the first bucket whose bound holds it.
        for ns in [1, 999, 1500, 3999, 65_537, 1_000_000, 7_999_999_999] {
            let b = latency_bucket(ns);
            assert!(ns as f64 <= latency_bound_seconds(b) * 1e9 + 0.5, "{ns} in bucket {b}");
            assert!(b == 0 || ns as f64 > latency_bound_seconds(b - 1) * 1e9 + 0.5, "{ns} in bucket {b}");
        }
    }

    #[test]
    fn a_queue_counts_requests_bytes_errors_and_latency() {
        let m = QueueMetrics::default();
        for _ in 0..5 {
            m.started();
        }
        m.finished(Op::Read, None, 4096, Some(3_000));
        m.finished(Op::Read, Some(ErrorStatus::IoErr), 4096, Some(50_000));
        m.finished(Op::Write, None, 8192, Some(900));
        m.finished(Op::Other, Some(ErrorStatus::Unsupp), 0, Some(10));
        m.merged(3);
        m.refused();
        let s = m.snapshot();
        assert_eq!(s.requests(Op::Read), 2);
        assert_eq!(s.bytes(Op::Read), 4096, "a failed request moved no data");
        assert_eq!((s.requests(Op::Write), s.bytes(Op::Write)), (1, 8192));
        assert_eq!(s.requests(Op::Other), 1);
        assert_eq!((s.errors(ErrorStatus::IoErr), s.errors(ErrorStatus::Unsupp)), (1, 1));
        assert_eq!((s.requests_total(), s.in_flight()), (4, 1));
        assert_eq!(s.latency_count(), 4);
        assert_eq!(s.latency_sum_ns, 53_910);
        assert_eq!((s.latency[0], s.latency[2], s.latency[6]), (2, 1, 1));
        assert_eq!((s.merged, s.refused, s.throttled_ns), (3, 1, 0));
    }

    #[test]
    fn an_untimed_request_is_counted_outside_the_histogram() {
        let m = QueueMetrics::default();
        m.started();
        m.finished(Op::Read, None, 512, None);
        let s = m.snapshot();
        assert_eq!((s.requests(Op::Read), s.bytes(Op::Read), s.in_flight()), (1, 512, 0));
        assert_eq!((s.latency_count(), s.latency_sum_ns), (0, 0));
    }

    #[test]
    fn snapshots_add_up() {
        let (a, b) = (QueueMetrics::default(), QueueMetrics::default());
        a.started();
        a.finished(Op::Flush, None, 0, Some(1));
        b.started();
        b.started();
        b.finished(Op::Discard, None, 1 << 20, Some(5_000_000));
        let mut sum = a.snapshot();
        sum.add(&b.snapshot());
        assert_eq!((sum.requests(Op::Flush), sum.requests(Op::Discard)), (1, 1));
        assert_eq!(sum.bytes(Op::Discard), 1 << 20);
        assert_eq!((sum.started, sum.in_flight(), sum.latency_count()), (3, 1, 2));
    }

    #[test]
    fn one_writer_per_counter_loses_nothing_while_another_thread_reads() {
        let m = std::sync::Arc::new(QueueMetrics::default());
        let w = WorkerMetrics::default();
        let reader = {
            let m = std::sync::Arc::clone(&m);
            std::thread::spawn(move || {
                let mut last = 0;
                for _ in 0..10_000 {
                    let s = m.snapshot();
                    assert!(s.requests(Op::Write) >= last, "a counter went backwards");
                    last = s.requests(Op::Write);
                }
            })
        };
        for _ in 0..200_000 {
            m.started();
            m.finished(Op::Write, None, 512, Some(1));
            w.polled(2);
        }
        reader.join().unwrap();
        let s = m.snapshot();
        assert_eq!((s.requests(Op::Write), s.bytes(Op::Write), s.in_flight()), (200_000, 200_000 * 512, 0));
        assert_eq!(w.snapshot(), WorkerSnapshot { poll_ns: 400_000, sleep_ns: 0 });
    }

    #[test]
    fn counters_own_their_cache_lines() {
        assert_eq!(std::mem::align_of::<QueueMetrics>(), 128);
        assert_eq!(std::mem::align_of::<WorkerMetrics>(), 128);
        assert_eq!(std::mem::size_of::<WorkerMetrics>(), 128);
        // The counters of a read and of a write share the first line.
        let m = QueueMetrics::default();
        let base = &m as *const QueueMetrics as usize;
        for c in [&m.started, &m.ops[Op::Read as usize].bytes, &m.ops[Op::Write as usize].requests] {
            assert!(c as *const Counter as usize - base < 64);
        }
    }
}
