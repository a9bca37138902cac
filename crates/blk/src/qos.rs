//! Per-export QoS: admission of requests against an IOPS and a bytes-per-second limit.
//!
//! One [`Throttle`] per export, shared (`Arc`) by every worker thread of that export. A
//! worker asks it ([`Throttle::admit`]) before it takes the next chain from an avail ring,
//! and charges it ([`Throttle::charge`]) with what the request turned out to be once parsed.
//! When the answer is [`Admission::Wait`] the worker leaves the ring's chains where they are
//! and sleeps until then (see `vblk-vhost-user`'s `worker.rs`): other rings, other exports
//! and completions are not held up, and nothing spins.
//!
//! # The buckets
//!
//! Each limit is a leaky bucket as in QEMU's throttle groups (`util/throttle.c`), kept in
//! time units (the generic cell rate algorithm): a request of `n` units (1 I/O, or its
//! bytes) costs `n / rate` seconds, its *level* is the debt still to drain at `rate`, and
//! the next request may go while the level is at most the burst allowance, `burst_ms`.
//! So after idling, up to `burst_ms` worth of the rate passes at once, then requests pass at
//! exactly the rate. Admission looks at the level *before* the request (its size is not
//! known until its chain is popped): a request bigger than the whole burst still passes,
//! once the level is within the burst, and its cost is owed afterwards. Whatever the window,
//! at most `rate × (window + burst) + one request per worker` passes.
//!
//! A new bucket starts drained (QEMU's start at level 0): the burst is available at once.
//! The default burst, [`DEFAULT_BURST_MS`] = 100 ms, is QEMU's allowance for a limit without
//! a `-max` (`bucket_size = avg / 10`): it keeps any 10 s window within 1% of the limit, so
//! "within 5% over 10 s" holds even for the first 10 s after idling. (QEMU's 1 s
//! `burst-length` is how long its separate `-max` rate may last, not this allowance.)
//!
//! # What is charged
//!
//! As in QEMU, which throttles reads and writes (`blk_co_preadv`/`blk_co_pwritev` and what
//! goes through them): a read or write costs one I/O and its data bytes. Unlike QEMU, a
//! discard or write-zeroes costs one I/O and no bytes: each is a backend operation (QEMU
//! does not throttle discards at all, so a guest could issue them without limit), but moves
//! no data (QEMU charges write-zeroes its whole range, so an `fstrim`-like zeroing of a big
//! range stalls the disk for size / bps). Flush and GET_ID are free (no data; QEMU does not
//! throttle flushes), and so is a request that failed its checks. Because admission happens
//! before the chain is popped, a free request queued behind throttled ones waits with them.
//!
//! # Cost
//!
//! Without limits a worker pays one relaxed atomic load per batch of pops
//! ([`Throttle::is_limited`]): no lock, no clock read. With limits, the worker reads the
//! clock once per batch, and each request takes the mutex twice (admit, charge). A mutex
//! rather than atomics: admission and charging read and update both buckets and the limits
//! together, and [`Throttle::set_limits`] replaces the limits (rescaling the debt) at any
//! moment from another thread; one lock keeps that a single consistent state, where per-bucket
//! compare-and-swap loops could mix old and new limits. Uncontended it costs about as much as
//! a clock read; it is contended only among the workers of one export, at most at the rate
//! the limit allows, and a throttled worker does not touch it while it sleeps.
//!
//! # Waking up
//!
//! A throttled worker sleeps until the wait it was given, plus up to
//! [`WAKE_BATCH_NS`] so that each wakeup admits a batch (1 ms of the rate) rather than a
//! single request: at most about 1000 wakeups a second per ring, whatever the rate. The
//! debt accounting makes up for the later wakeup (the bucket drained meanwhile), as long as
//! the burst is at least that long; with `burst_ms` 0 there is no slack, and lateness of
//! the wakeup is lost (the rate may come out a little low). [`Throttle::set_limits`] wakes
//! every subscribed worker ([`Throttle::subscribe`]) so a new limit applies at once, also
//! to a worker that is sleeping.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use vblk_metrics::now_ns;

use crate::request::Request;

/// The burst allowance of a limit when none is given: 100 ms of the rate (QEMU's bucket
/// for a limit without a `-max`).
pub const DEFAULT_BURST_MS: u32 = 100;

/// The longest extra time a throttled worker sleeps past its wait, so that it admits a
/// batch per wakeup (never more than the burst: see the module doc).
pub const WAKE_BATCH_NS: u64 = 1_000_000;

const NS_PER_S: u128 = 1_000_000_000;

/// An export's limits. `None` (or `Some(0)`, as in QEMU) is no limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Requests per second (reads, writes, discards, write-zeroes).
    pub iops: Option<u64>,
    /// Data bytes read and written per second.
    pub bps: Option<u64>,
    /// How many milliseconds of each rate may be spent at once after idling.
    pub burst_ms: u32,
}

impl Limits {
    /// No limits (and the default burst, for when one is set).
    pub const UNLIMITED: Limits = Limits { iops: None, bps: None, burst_ms: DEFAULT_BURST_MS };

    /// Is any limit set?
    pub fn is_limited(&self) -> bool {
        self.iops.is_some_and(|r| r > 0) || self.bps.is_some_and(|r| r > 0)
    }

    /// `Some(0)` spelled `None`.
    fn normalized(self) -> Limits {
        Limits { iops: self.iops.filter(|&r| r > 0), bps: self.bps.filter(|&r| r > 0), burst_ms: self.burst_ms }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::UNLIMITED
    }
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = self.normalized();
        match (l.iops, l.bps) {
            (None, None) => return f.write_str("unlimited"),
            (Some(i), None) => write!(f, "{i} IOPS")?,
            (None, Some(b)) => write!(f, "{b} bytes/s")?,
            (Some(i), Some(b)) => write!(f, "{i} IOPS, {b} bytes/s")?,
        }
        write!(f, " (burst {} ms)", l.burst_ms)
    }
}

/// What one request costs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub ios: u64,
    pub bytes: u64,
}

impl Request {
    /// What this request is charged (see the module doc: reads and writes one I/O and
    /// their bytes, discard and write-zeroes one I/O, flush and GET_ID nothing).
    pub fn qos_cost(&self) -> Cost {
        match *self {
            Request::Read { len, .. } | Request::Write { len, .. } => Cost { ios: 1, bytes: len },
            Request::Discard { .. } | Request::WriteZeroes { .. } => Cost { ios: 1, bytes: 0 },
            Request::Flush | Request::GetId { .. } => Cost::default(),
        }
    }
}

/// The answer to "may the next request go?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Go,
    /// Not before this many nanoseconds from now: sleep, then ask again.
    Wait(u64),
}

/// One leaky bucket, in time: `tat` (the "theoretical arrival time") is when the debt is
/// paid off; the level at `now` is `tat - now`.
#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// Units per second; 0: off (`tat` stays 0, the level 0).
    rate: u64,
    tat: u64,
    /// `units × 10⁹ mod rate` left over from the last charge: costs are exact over time.
    carry: u64,
}

impl Bucket {
    fn level(&self, now: u64) -> u64 {
        self.tat.saturating_sub(now)
    }

    fn charge(&mut self, now: u64, units: u64) {
        if self.rate == 0 || units == 0 {
            return;
        }
        let rate = self.rate as u128;
        let total = units as u128 * NS_PER_S + self.carry as u128;
        let cost = u64::try_from(total / rate).unwrap_or(u64::MAX);
        self.carry = (total % rate) as u64;
        self.tat = self.tat.max(now).saturating_add(cost);
    }

    /// A new rate or burst (`cap`, ns; it was `old_cap`). A bucket switched on starts
    /// drained; a changed rate keeps its debt in units (rescaled to the new rate), but never
    /// more than `cap` of it: lowering a limit throttles at the new rate at once instead of
    /// making the export pay the old rate's backlog at the new one. The same limits again
    /// change nothing.
    fn set_rate(&mut self, now: u64, rate: u64, cap: u64, old_cap: u64) {
        if rate == self.rate {
            if cap < old_cap {
                self.tat = self.tat.min(now.saturating_add(cap));
            }
            return;
        }
        if rate == 0 || self.rate == 0 {
            *self = Bucket { rate, tat: 0, carry: 0 };
            return;
        }
        let level = self.level(now) as u128 * self.rate as u128 / rate as u128;
        let level = u64::try_from(level).unwrap_or(u64::MAX).min(cap);
        *self = Bucket { rate, tat: now.saturating_add(level), carry: 0 };
    }
}

/// The buckets and the limits they implement: the state under the mutex.
#[derive(Debug)]
struct State {
    limits: Limits,
    /// The burst allowance, ns.
    cap: u64,
    iops: Bucket,
    bps: Bucket,
}

impl State {
    fn admit(&self, now: u64) -> Admission {
        let level = self.iops.level(now).max(self.bps.level(now));
        if level <= self.cap {
            Admission::Go
        } else {
            Admission::Wait(level - self.cap + self.cap.min(WAKE_BATCH_NS))
        }
    }
}

type Wake = Arc<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct Wakers {
    next: u64,
    list: Vec<(u64, Wake)>,
}

/// The admission control of one export (see the module doc).
pub struct Throttle {
    /// Any limit set: the one thing the unlimited hot path reads.
    limited: AtomicBool,
    state: Mutex<State>,
    /// Time rings of this export spent held back, summed over the rings, ns.
    throttled_ns: AtomicU64,
    wakers: Mutex<Wakers>,
}

impl fmt::Debug for Throttle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Throttle")
            .field("limits", &self.limits())
            .field("throttled_ns", &self.throttled_ns())
            .finish_non_exhaustive()
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(Limits::UNLIMITED)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state is a few integers, consistent after every statement: a panic elsewhere
    // while holding the lock leaves nothing half-done worth refusing.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Throttle {
    /// A throttle enforcing `limits` from now on, its buckets drained.
    pub fn new(limits: Limits) -> Throttle {
        let t = Throttle {
            limited: AtomicBool::new(false),
            state: Mutex::new(State {
                limits: Limits::UNLIMITED,
                cap: 0,
                iops: Bucket::default(),
                bps: Bucket::default(),
            }),
            throttled_ns: AtomicU64::new(0),
            wakers: Mutex::default(),
        };
        t.set_limits_at(limits, 0);
        t
    }

    /// Is any limit set? One relaxed load: the only cost of QoS for an unlimited export.
    #[inline]
    pub fn is_limited(&self) -> bool {
        self.limited.load(Relaxed)
    }

    /// The limits in force (`Some(0)` given is reported as `None`).
    pub fn limits(&self) -> Limits {
        lock(&self.state).limits
    }

    /// Change the limits, from any thread, at any time: they apply to the next admission,
    /// and every subscribed worker is woken to ask again (one sleeping on an old wait too).
    pub fn set_limits(&self, limits: Limits) {
        self.set_limits_at(limits, now_ns());
    }

    /// [`set_limits`](Self::set_limits) at clock reading `now` ([`now_ns`]).
    pub fn set_limits_at(&self, limits: Limits, now: u64) {
        let limits = limits.normalized();
        {
            let mut s = lock(&self.state);
            let cap = limits.burst_ms as u64 * 1_000_000;
            let old_cap = s.cap;
            s.iops.set_rate(now, limits.iops.unwrap_or(0), cap, old_cap);
            s.bps.set_rate(now, limits.bps.unwrap_or(0), cap, old_cap);
            s.limits = limits;
            s.cap = cap;
            self.limited.store(limits.is_limited(), Relaxed);
        }
        for (_, wake) in &lock(&self.wakers).list {
            wake();
        }
    }

    /// May the next request go at clock reading `now` ([`now_ns`])? Always `Go` without
    /// limits.
    pub fn admit(&self, now: u64) -> Admission {
        lock(&self.state).admit(now)
    }

    /// Charge an admitted request's cost at `now`.
    pub fn charge(&self, now: u64, cost: Cost) {
        if cost == Cost::default() {
            return;
        }
        let mut s = lock(&self.state);
        s.iops.charge(now, cost.ios);
        s.bps.charge(now, cost.bytes);
    }

    /// Add time a ring of this export was held back.
    pub fn add_throttled(&self, ns: u64) {
        self.throttled_ns.fetch_add(ns, Relaxed);
    }

    /// Time the rings of this export were held back so far, summed over the rings, ns.
    pub fn throttled_ns(&self) -> u64 {
        self.throttled_ns.load(Relaxed)
    }

    /// Call `wake` on every [`set_limits`](Self::set_limits), until the returned
    /// subscription is dropped. `wake` runs on the caller's thread of `set_limits`: it
    /// should only signal (write an eventfd).
    pub fn subscribe(self: &Arc<Self>, wake: Wake) -> Subscription {
        let mut w = lock(&self.wakers);
        let id = w.next;
        w.next += 1;
        w.list.push((id, wake));
        Subscription { throttle: Arc::clone(self), id }
    }
}

/// A worker's registration for [`Throttle::set_limits`] wakeups; unregisters when dropped.
pub struct Subscription {
    throttle: Arc<Throttle>,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        lock(&self.throttle.wakers).list.retain(|(id, _)| *id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000 * MS;
    /// An arbitrary start, far from 0.
    const T0: u64 = 1_000 * S;

    fn limits(iops: Option<u64>, bps: Option<u64>, burst_ms: u32) -> Limits {
        Limits { iops, bps, burst_ms }
    }

    /// Run a saturating workload on an injected clock: whenever admitted, a request of
    /// `bytes` is charged at once; otherwise the clock jumps to the end of the wait. Returns
    /// the requests admitted in `[T0, T0 + dur)`.
    fn saturate(t: &Throttle, bytes: u64, start: u64, dur: u64) -> u64 {
        let mut now = start;
        let mut n = 0;
        while now < start + dur {
            match t.admit(now) {
                Admission::Go => {
                    t.charge(now, Cost { ios: 1, bytes });
                    n += 1;
                }
                Admission::Wait(ns) => {
                    assert!(ns > 0);
                    now += ns;
                }
            }
        }
        n
    }

    #[test]
    fn without_limits_everything_goes_and_nothing_is_owed() {
        let t = Throttle::default();
        assert!(!t.is_limited());
        for i in 0..1000 {
            assert_eq!(t.admit(T0), Admission::Go);
            t.charge(T0, Cost { ios: 1, bytes: 1 << 20 });
            assert_eq!(t.admit(T0 + i), Admission::Go);
        }
        assert_eq!(t.limits(), Limits::UNLIMITED);
        assert_eq!(Limits::UNLIMITED.to_string(), "unlimited");
    }

    #[test]
    fn an_iops_limit_passes_the_burst_then_exactly_the_rate() {
        let t = Throttle::new(limits(Some(2000), None, 100));
        assert!(t.is_limited());
        // Drained: 100 ms of 2000 IOPS = 200 requests, plus the one admitted at the cap.
        let mut n = 0;
        while t.admit(T0) == Admission::Go {
            t.charge(T0, Cost { ios: 1, bytes: 4096 });
            n += 1;
        }
        assert_eq!(n, 201);
        // Then 2000 per second, exactly, however the wakeups fall.
        let n = saturate(&t, 4096, T0, 10 * S);
        assert!((19_997..=20_003).contains(&n), "{n}");
    }

    #[test]
    fn ten_seconds_from_idle_stay_within_one_percent_with_the_default_burst() {
        for (l, bytes, rate) in
            [(limits(Some(2000), None, DEFAULT_BURST_MS), 4096, 2000), (limits(None, Some(20 << 20), 100), 65536, 320)]
        {
            let t = Throttle::new(l);
            let n = saturate(&t, bytes, T0, 10 * S);
            let ratio = n as f64 / (10 * rate) as f64;
            assert!((1.0..=1.011).contains(&ratio), "{l}: {n} requests in 10 s, {ratio}");
        }
    }

    #[test]
    fn the_wait_is_the_debt_beyond_the_burst_plus_a_batch() {
        let t = Throttle::new(limits(Some(1000), None, 10));
        // 11 requests: 11 ms of debt, 1 ms over the 10 ms cap.
        for _ in 0..11 {
            assert_eq!(t.admit(T0), Admission::Go);
            t.charge(T0, Cost { ios: 1, bytes: 0 });
        }
        assert_eq!(t.admit(T0), Admission::Wait(MS + WAKE_BATCH_NS));
        assert_eq!(t.admit(T0 + MS / 2), Admission::Wait(MS / 2 + WAKE_BATCH_NS));
        assert_eq!(t.admit(T0 + MS), Admission::Go);
        // Waking a batch later admits the batch: 1 ms of 1000 IOPS, then the one at the cap.
        let now = T0 + 2 * MS;
        let mut n = 0;
        while t.admit(now) == Admission::Go {
            t.charge(now, Cost { ios: 1, bytes: 0 });
            n += 1;
        }
        assert_eq!(n, 2);
    }

    #[test]
    fn a_request_bigger_than_the_burst_passes_and_is_paid_for_after() {
        // 1 MiB/s with a 10 ms burst (10 KiB): a 1 MiB write still goes, then 1 s of nothing.
        let t = Throttle::new(limits(None, Some(1 << 20), 10));
        assert_eq!(t.admit(T0), Admission::Go);
        t.charge(T0, Cost { ios: 1, bytes: 1 << 20 });
        assert_eq!(t.admit(T0), Admission::Wait(S - 10 * MS + WAKE_BATCH_NS));
        assert_eq!(t.admit(T0 + S - 10 * MS), Admission::Go);
        // With no burst at all, one request still passes whenever the debt is paid.
        let t = Throttle::new(limits(None, Some(1 << 20), 0));
        assert_eq!(t.admit(T0), Admission::Go);
        t.charge(T0, Cost { ios: 1, bytes: 4 << 20 });
        assert_eq!(t.admit(T0 + S), Admission::Wait(3 * S), "no batching slack without a burst");
        assert_eq!(t.admit(T0 + 4 * S), Admission::Go);
    }

    #[test]
    fn both_limits_hold_the_stricter_one_wins() {
        // 1000 IOPS and 1 MiB/s: 4 KiB requests hit the bytes (256/s), 512 B ones the I/Os.
        let l = limits(Some(1000), Some(1 << 20), 100);
        let t = Throttle::new(l);
        let n = saturate(&t, 4096, T0, 10 * S);
        assert!((2560..=2560 + 26 + 1).contains(&n), "{n}");
        let t = Throttle::new(l);
        let n = saturate(&t, 512, T0, 10 * S);
        assert!((10_000..=10_101).contains(&n), "{n}");
    }

    #[test]
    fn byte_costs_carry_their_remainders() {
        // 3 bytes/s: a byte costs 333333333.3 ns; 3 of them exactly 1 s.
        let t = Throttle::new(limits(None, Some(3), 0));
        for _ in 0..3 {
            t.charge(T0, Cost { ios: 1, bytes: 1 });
        }
        assert_eq!(t.admit(T0 + S - 1), Admission::Wait(1));
        assert_eq!(t.admit(T0 + S), Admission::Go, "no rounding drift");
    }

    #[test]
    fn free_requests_cost_nothing() {
        use crate::request::Request;
        let t = Throttle::new(limits(Some(1), Some(1), 0));
        assert_eq!(Request::Flush.qos_cost(), Cost::default());
        assert_eq!(Request::GetId { len: 20 }.qos_cost(), Cost::default());
        assert_eq!(Request::Discard { offset: 0, len: 1 << 30 }.qos_cost(), Cost { ios: 1, bytes: 0 });
        assert_eq!(Request::Read { offset: 0, len: 4096 }.qos_cost(), Cost { ios: 1, bytes: 4096 });
        for _ in 0..10 {
            t.charge(T0, Request::Flush.qos_cost());
        }
        assert_eq!(t.admit(T0), Admission::Go);
    }

    #[test]
    fn changing_limits_applies_at_once_and_never_makes_a_backlog() {
        let t = Throttle::new(limits(Some(1000), None, 100));
        let now = T0;
        let mut n = 0;
        while t.admit(now) == Admission::Go {
            t.charge(now, Cost { ios: 1, bytes: 0 });
            n += 1;
        }
        assert_eq!(n, 101);
        // The same limits again: nothing changes.
        t.set_limits_at(limits(Some(1000), None, 100), now);
        assert_eq!(t.admit(now), Admission::Wait(MS + WAKE_BATCH_NS));
        // Lowered to 1 IOPS: the debt (101 requests) is not owed at 1 IOPS (101 s); capped
        // at the burst, the next request goes at once, then one per second.
        t.set_limits_at(limits(Some(1), None, 100), now);
        assert_eq!(t.admit(now), Admission::Go);
        t.charge(now, Cost { ios: 1, bytes: 0 });
        let n = saturate(&t, 0, now, 10 * S);
        assert!((9..=10).contains(&n), "{n}");
        // Raised: the debt shrinks with the rate.
        t.set_limits_at(limits(Some(1_000_000), None, 100), now + 10 * S);
        assert_eq!(t.admit(now + 10 * S), Admission::Go);
        // Removed: everything goes, and nothing is charged.
        t.set_limits_at(limits(Some(0), None, 100), now + 10 * S);
        assert!(!t.is_limited());
        assert_eq!(t.limits().iops, None);
        t.charge(now + 10 * S, Cost { ios: 1_000_000, bytes: 0 });
        assert_eq!(t.admit(now + 10 * S), Admission::Go);
        // Set again: drained, the burst is there.
        t.set_limits_at(limits(Some(10), None, 1000), now + 11 * S);
        let n = saturate(&t, 0, now + 11 * S, 1);
        assert_eq!(n, 11);
    }

    #[test]
    fn a_shorter_burst_caps_the_debt() {
        let t = Throttle::new(limits(Some(1000), None, 1000));
        for _ in 0..1001 {
            t.charge(T0, Cost { ios: 1, bytes: 0 });
        }
        assert_eq!(t.admit(T0), Admission::Wait(MS + WAKE_BATCH_NS));
        t.set_limits_at(limits(Some(1000), None, 10), T0);
        // The same rate, a 10 ms burst: the debt is cut to 10 ms, and the next goes at once.
        assert_eq!(t.admit(T0), Admission::Go);
        t.charge(T0, Cost { ios: 1, bytes: 0 });
        assert_eq!(t.admit(T0), Admission::Wait(MS + WAKE_BATCH_NS));
    }

    #[test]
    fn set_limits_wakes_subscribers_until_they_unsubscribe() {
        let t = Arc::new(Throttle::default());
        let hits = Arc::new(AtomicU64::new(0));
        let h = Arc::clone(&hits);
        let sub = t.subscribe(Arc::new(move || {
            h.fetch_add(1, Relaxed);
        }));
        t.set_limits(limits(Some(5), None, 0));
        assert_eq!(hits.load(Relaxed), 1);
        assert_eq!(t.limits(), limits(Some(5), None, 0));
        assert_eq!(t.limits().to_string(), "5 IOPS (burst 0 ms)");
        drop(sub);
        t.set_limits(Limits::UNLIMITED);
        assert_eq!(hits.load(Relaxed), 1);
        assert!(!t.is_limited());
    }

    #[test]
    fn throttled_time_adds_up() {
        let t = Throttle::default();
        t.add_throttled(5);
        t.add_throttled(7);
        assert_eq!(t.throttled_ns(), 12);
    }
}
