//! Worker threads: the data plane.
//!
//! Each worker owns some queues (ring `i` goes to worker `i % threads`) and one backend
//! [`Engine`] (one io_uring). It sleeps in `ppoll(2)` on:
//!
//! - its stop eventfd (the control plane wants the rings back),
//! - the engine's completion eventfd,
//! - its qos eventfd (the export's limits changed),
//! - the kick eventfd of every ring it serves,
//!
//! with a timeout while a submission waits to be retried or a ring is throttled.
//!
//! A kick runs the queue's pipeline ([`BlkQueue::process_available`]) batch by batch until
//! the ring is empty with notifications re-enabled; completions finish requests; after each
//! batch and each round every queue with finished requests publishes its used ring and, if
//! the driver wants it, signals the call eventfd ([`RingWorker::publish`] is the one place
//! that does). An engine that does the I/O while it submits (null, synchronous, qcow2 in
//! memory) takes short batches ([`Engine::batch_limit`]), so the driver gets completions
//! while the rest of what it queued is still being served, instead of sleeping through the
//! whole ring.
//!
//! With `--poll-us N` a worker that just did work keeps spinning on its avail rings and
//! the io_uring completion queue for up to N µs with kicks disabled (no eventfd writes by
//! the driver, no `poll` wakeups), then re-enables kicks and sleeps: adaptive polling. The
//! window adapts between 0 and N µs to when work actually comes ([`PollWindow`]).
//!
//! QoS: every ring's pipeline asks the export's [`Throttle`] before it pops a chain. A ring
//! the throttle holds back keeps its chains in the avail ring, its kicks off, and is not
//! touched again until the time it was given ([`BlkQueue::throttled_until`]): the worker
//! sleeps in `ppoll(2)` with that as its timeout (nanosecond resolution), still serving its
//! other rings and completions meanwhile. Adaptive polling skips a held ring and stops at
//! once when every live ring is held and no I/O is in flight: a throttled ring never keeps
//! a worker spinning. A change of limits (`Throttle::set_limits`) signals the worker's qos
//! eventfd, and every held ring asks again at once.
//!
//! Stopping drains: the worker waits for every in-flight I/O to complete and be
//! published before it returns its rings' positions, so the control plane may then
//! change the rings or unmap memory.
//!
//! Metrics: each ring's pipeline counts into its queue's `QueueMetrics`. While the export
//! is timed (`vblk serve --metrics`), completions are stamped once per batch and the worker
//! adds the time it spends polling and working, and asleep in `poll(2)`, to its
//! `WorkerMetrics` (one clock read per switch between the two); untimed, the worker reads
//! no clock for the metrics.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vblk_backend::{Completion, Engine};
use vblk_blk::qos::Subscription;
use vblk_blk::{split_tag, BlkQueue, DeviceParams, Throttle};
use vblk_metrics::{now_ns, QueueMetrics, WorkerMetrics};
use vblk_queue::Ring;

/// How long a worker sleeps before retrying a submission the kernel refused.
const SUBMIT_RETRY_NS: u64 = 1_000_000;

/// The worker's `pollfd`s: the stop eventfd, the engine's completion fd, the qos eventfd,
/// then one kick eventfd per ring.
const STOP_FD: usize = 0;
const COMPLETION_FD: usize = 1;
const QOS_FD: usize = 2;
const FIRST_KICK_FD: usize = 3;

/// How a worker runs, beyond its rings and engine.
pub(crate) struct WorkerOptions {
    /// How long to keep polling after the last work (zero: never poll).
    pub poll_budget: Duration,
    /// Measure request latencies.
    pub timing: bool,
    /// The export's QoS limits.
    pub throttle: Arc<Throttle>,
}

/// One ring handed to a worker, fully validated by the control plane.
pub(crate) struct RingSetup {
    pub index: usize,
    pub queue: Ring,
    pub kick: Arc<File>,
    pub call: Option<Arc<File>>,
    pub err: Option<Arc<File>>,
    /// The queue's counters (kept by the device across worker restarts).
    pub metrics: Arc<QueueMetrics>,
}

/// Where a ring stopped: the vring base to report in `GET_VRING_BASE`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RingStop {
    pub index: usize,
    /// The vring base (`vblk_queue::Ring::vring_base`).
    pub base: u32,
    pub broken: bool,
}

/// A running worker thread.
pub(crate) struct Worker {
    stop: Arc<File>,
    stopping: Arc<AtomicBool>,
    handle: JoinHandle<Vec<RingStop>>,
}

fn eventfd() -> std::io::Result<File> {
    // SAFETY: plain syscall, result checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Signal an eventfd (a call or err notification, or our stop fd).
pub(crate) fn signal(f: &File) {
    if let Err(e) = (&*f).write_all(&1u64.to_ne_bytes()) {
        if e.kind() != std::io::ErrorKind::WouldBlock {
            tracing::warn!(error = %e, "eventfd write failed");
        }
    }
}

/// Consume an eventfd's counter (kicks).
fn drain(f: &File) {
    let mut b = [0u8; 8];
    let _ = (&*f).read(&mut b);
}

impl Worker {
    pub fn spawn(
        id: usize,
        rings: Vec<RingSetup>,
        engine: Engine,
        params: Arc<DeviceParams>,
        metrics: Arc<WorkerMetrics>,
        opts: WorkerOptions,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(eventfd()?);
        let stop2 = Arc::clone(&stop);
        let stopping = Arc::new(AtomicBool::new(false));
        let stopping2 = Arc::clone(&stopping);
        let qos = Arc::new(eventfd()?);
        let WorkerOptions { poll_budget, timing, throttle } = opts;
        let handle = std::thread::Builder::new().name(format!("vblk-worker-{id}")).spawn(move || {
            let rings = rings
                .into_iter()
                .enumerate()
                .map(|(n, r)| RingWorker {
                    index: r.index,
                    queue: {
                        let mut q = BlkQueue::with_metrics(r.queue, Arc::clone(&params), n as u16, r.metrics);
                        q.set_timing(timing);
                        q.set_throttle(Arc::clone(&throttle));
                        q
                    },
                    kick: r.kick,
                    call: r.call,
                    err: r.err,
                    broken: false,
                })
                .collect();
            let wake = Arc::clone(&qos);
            let subscription = throttle.subscribe(Arc::new(move || signal(&wake)));
            let mut w = WorkerLoop {
                stop: stop2,
                stopping: stopping2,
                qos,
                _subscription: subscription,
                window: PollWindow::new(poll_budget),
                engine,
                rings,
                completions: Vec::new(),
                metrics,
                timing,
            };
            w.run()
        })?;
        Ok(Worker { stop, stopping, handle })
    }

    /// Stop the thread after draining its in-flight I/O; returns where each ring stopped.
    pub fn stop(self) -> Vec<RingStop> {
        self.stopping.store(true, Ordering::Release);
        signal(&self.stop);
        match self.handle.join() {
            Ok(stops) => stops,
            Err(_) => {
                tracing::error!("worker thread panicked");
                Vec::new()
            }
        }
    }
}

struct RingWorker {
    index: usize,
    queue: BlkQueue,
    kick: Arc<File>,
    call: Option<Arc<File>>,
    err: Option<Arc<File>>,
    broken: bool,
}

impl RingWorker {
    /// One batch of the pipeline; once the ring is empty, kicks are re-enabled. `true`: the
    /// ring has more (the batch ended at the engine's limit, or requests came while kicks
    /// were being re-enabled). `false`: empty with kicks on, held back by the throttle
    /// (kicks then stay off: the worker comes back at the time the throttle gave), or broken.
    fn serve_batch(&mut self, engine: &mut Engine) -> bool {
        if self.broken {
            return false;
        }
        let more = self.queue.process_available(engine).and_then(|n| {
            if self.held() {
                self.queue.queue_mut().disable_notification();
                Ok(false)
            } else if n >= engine.batch_limit() {
                Ok(true)
            } else {
                self.queue.enable_notification()
            }
        });
        match more {
            Ok(more) => more,
            Err(e) => {
                self.break_ring(&e);
                false
            }
        }
    }

    /// The ring is broken (the driver broke the protocol): stop serving it and tell the
    /// frontend through the err eventfd, if it gave one.
    fn break_ring(&mut self, e: &dyn std::fmt::Display) {
        tracing::error!(ring = self.index, error = %e, "virtqueue broken; stopping it");
        self.broken = true;
        if let Some(err) = &self.err {
            signal(err);
        }
    }

    /// Is the throttle holding this ring back?
    fn held(&self) -> bool {
        self.queue.throttled_until().is_some()
    }

    /// Held back and not due at `now` ([`now_ns`]).
    fn held_at(&self, now: u64) -> bool {
        self.queue.throttled_until().is_some_and(|t| t > now)
    }

    /// One non-blocking pass while polling (kicks disabled): `true` if there was work. A
    /// ring held back until after `now` is skipped.
    fn poll_once(&mut self, engine: &mut Engine, now: u64) -> bool {
        if self.broken || self.held_at(now) {
            return false;
        }
        match self.queue.process_available(engine) {
            Ok(n) => n > 0,
            Err(e) => {
                self.break_ring(&e);
                false
            }
        }
    }

    /// Publish finished requests and notify the driver if it asked for it.
    fn publish(&mut self) {
        if self.queue.publish() {
            if let Some(call) = &self.call {
                signal(call);
            }
        }
    }
}

/// The adaptive polling window, as QEMU's `aio_poll` adapts its iothreads' (`poll-grow`,
/// `poll-shrink`): how long a worker keeps spinning after its last work, between zero and
/// the `--poll-us` budget. After each sleep the worker reports how long it was idle in all
/// (the spin and the sleep) before work woke it:
///
/// - longer than the budget: no window within the budget would have caught it, so polling
///   only burnt the CPU: the window halves, and below [`PollWindow::GROW_FROM`] drops to
///   zero. A slow frontend (a TCG guest, a driver that sleeps between batches) soon costs no
///   spinning. (QEMU's default `poll-shrink=0` drops to zero at once; halving keeps a fast
///   client's window through a single late wakeup, e.g. a stalled vCPU of this VM);
/// - longer than the window but within the budget: a longer window would have caught it
///   without a wakeup: the window doubles, from [`PollWindow::GROW_FROM`], up to the budget.
///
/// While work keeps coming during a spin, the spin goes on and the window does not matter.
#[derive(Debug, Clone, Copy)]
struct PollWindow {
    budget: Duration,
    current: Duration,
}

impl PollWindow {
    /// The first window after zero (QEMU's: 4 µs).
    const GROW_FROM: Duration = Duration::from_micros(4);

    /// Starts at the full budget (zero: never poll).
    fn new(budget: Duration) -> Self {
        PollWindow { budget, current: budget }
    }

    fn current(&self) -> Duration {
        self.current
    }

    /// Whether there is a budget to adapt within (`--poll-us` > 0).
    fn adaptive(&self) -> bool {
        !self.budget.is_zero()
    }

    /// Work woke the worker after `idle` without any (spinning, then asleep).
    fn woke(&mut self, idle: Duration) {
        if idle > self.budget {
            self.current /= 2;
            if self.current < Self::GROW_FROM {
                self.current = Duration::ZERO;
            }
        } else if idle > self.current {
            self.current = (self.current * 2).max(Self::GROW_FROM).min(self.budget);
        }
    }
}

struct WorkerLoop {
    stop: Arc<File>,
    /// Set before `stop` is signalled, so a busy-polling worker notices without a syscall.
    stopping: Arc<AtomicBool>,
    /// Signalled when the export's limits change (through `_subscription`).
    qos: Arc<File>,
    _subscription: Subscription,
    /// How long to keep polling after the last work: adapts between zero and the
    /// `--poll-us` budget ([`PollWindow`]).
    window: PollWindow,
    engine: Engine,
    rings: Vec<RingWorker>,
    completions: Vec<Completion>,
    metrics: Arc<WorkerMetrics>,
    /// The rings' queues measure latencies (completions need the clock), and the worker
    /// times its polling and sleeping.
    timing: bool,
}

/// Nanoseconds since `mark`, which moves to now (None: not timed, the clock is not read).
fn lap(mark: &mut Option<Instant>) -> Option<u64> {
    let m = mark.as_mut()?;
    let now = Instant::now();
    let ns = u64::try_from(now.saturating_duration_since(*m).as_nanos()).unwrap_or(u64::MAX);
    *m = now;
    Some(ns)
}

impl WorkerLoop {
    fn run(&mut self) -> Vec<RingStop> {
        let mut fds: Vec<libc::pollfd> = [self.stop.as_raw_fd(), self.engine.completion_fd(), self.qos.as_raw_fd()]
            .into_iter()
            .chain(self.rings.iter().map(|r| r.kick.as_raw_fd()))
            .map(|fd: RawFd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        // Work may have been made available while the ring was being (re)configured.
        for i in 0..self.rings.len() {
            self.service(i);
        }
        self.reap();
        self.publish_all();
        // While timed: the end of each stretch of work or sleep, which starts the next one
        // (one clock read per switch, none at all untimed).
        let mut mark = self.timing.then(Instant::now);
        loop {
            // Since when the worker has had nothing to do: the idle time up to the next
            // wakeup tells the polling window whether polling would have caught it.
            let mut idle_since = None;
            if !self.window.current().is_zero() {
                let polled = self.busy_poll();
                // Polling, and the work done since the worker woke up.
                if let Some(ns) = lap(&mut mark) {
                    self.metrics.polled(ns);
                }
                match polled {
                    Some(since) => idle_since = Some(since),
                    None => break,
                }
            }
            let timeout = self.sleep_timeout();
            let ts = timeout.map(|ns| libc::timespec {
                tv_sec: (ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (ns % 1_000_000_000) as libc::c_long,
            });
            let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
            if self.window.current().is_zero() {
                // The work done since the worker woke up.
                if let Some(ns) = lap(&mut mark) {
                    self.metrics.polled(ns);
                }
            }
            // The polling window learns from the length of each sleep (no clock without a
            // --poll-us budget).
            let slept_from = self.window.adaptive().then(Instant::now);
            // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd; `ts_ptr` is null
            // or points to `ts`, alive across the call; no signal mask is given.
            let n = unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ts_ptr, std::ptr::null()) };
            if let Some(ns) = lap(&mut mark) {
                self.metrics.slept(ns);
            }
            if let Some(t) = slept_from {
                if n > 0 && fds[STOP_FD].revents == 0 {
                    // Woken by work (not a timeout, not the stop fd).
                    self.window.woke(Instant::now().saturating_duration_since(idle_since.unwrap_or(t)));
                }
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "poll failed; worker stopping");
                break;
            }
            if fds[STOP_FD].revents != 0 {
                break;
            }
            // New limits: every held ring asks again now.
            let requalify = fds[QOS_FD].revents != 0;
            if requalify {
                drain(&self.qos);
            }
            let now = if self.any_held() { now_ns() } else { 0 };
            let mut serviced = false;
            for i in 0..self.rings.len() {
                let r = &self.rings[i];
                let pfd = &mut fds[FIRST_KICK_FD + i];
                let kicked = pfd.revents != 0;
                if kicked {
                    drain(&r.kick);
                }
                // A held ring is serviced when its time comes (or the limits change), not
                // on kicks (a stray one: its kicks are off).
                let run = if r.held() { requalify || !r.held_at(now) } else { kicked };
                if !run {
                    continue;
                }
                self.service(i);
                serviced = true;
                if self.rings[i].broken {
                    // Stop listening to a broken ring's kicks (poll skips negative fds).
                    pfd.fd = -1;
                }
            }
            // Completions: those the kernel signalled (clearing its eventfd), and those
            // that finished during submission (null disk, sync engine, errors, page-cache
            // hits), which are not signalled at all.
            if fds[COMPLETION_FD].revents != 0 {
                self.reap();
            } else if serviced {
                self.poll_completions();
            }
            self.publish_all();
        }
        self.drain_in_flight();
        self.rings
            .iter()
            .map(|r| RingStop { index: r.index, base: r.queue.queue().vring_base(), broken: r.broken })
            .collect()
    }

    /// Adaptive polling: with kicks disabled, spin on the avail rings and the completion
    /// queue while work keeps arriving; after the polling window without any, re-enable
    /// kicks and return to sleeping. Returns since when the worker has been idle (`None`:
    /// it was asked to stop).
    fn busy_poll(&mut self) -> Option<Instant> {
        let budget = self.window.current();
        for r in &mut self.rings {
            r.queue.queue_mut().disable_notification();
        }
        // The clock is read once when an idle stretch starts and then every 32 idle passes:
        // not at all while work keeps coming (a clock read costs as much as a pass), unless
        // a ring is held back by its throttle (then once a pass, to see when it is due).
        let mut idle_since: Option<Instant> = None;
        let mut idle_passes = 0u32;
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return None;
            }
            let now = if self.any_held() { now_ns() } else { 0 };
            let mut work = false;
            for r in &mut self.rings {
                work |= r.poll_once(&mut self.engine, now);
            }
            self.retry_submit();
            work |= self.poll_completions();
            self.publish_all();
            if work {
                idle_since = None;
            } else if self.all_held() {
                // Nothing can come but the throttle's time, which the worker sleeps until.
                break;
            } else {
                idle_passes = idle_passes.wrapping_add(1);
                match idle_since {
                    None => (idle_since, idle_passes) = (Some(Instant::now()), 0),
                    Some(t) if idle_passes.is_multiple_of(32) && t.elapsed() >= budget => break,
                    Some(_) => {}
                }
            }
            std::hint::spin_loop();
        }
        // Kicks on again; whatever raced with that is serviced before sleeping.
        for i in 0..self.rings.len() {
            self.service(i);
        }
        self.reap();
        self.publish_all();
        // (Throttled rings: no idle stretch was timed; the sleep is then the throttle's.)
        Some(idle_since.unwrap_or_else(Instant::now))
    }

    /// Run ring `i`'s pipeline until the ring is empty and its kicks are re-enabled (or the
    /// throttle holds it back), publishing what completed after every batch: the batches
    /// of an engine that does the I/O in `submit` are short ([`Engine::batch_limit`]), so
    /// the driver gets the first completions while the rest are served.
    fn service(&mut self, i: usize) {
        while self.rings[i].serve_batch(&mut self.engine) {
            self.poll_completions();
            self.rings[i].publish();
        }
    }

    /// Is any ring held back by the throttle?
    fn any_held(&self) -> bool {
        self.rings.iter().any(RingWorker::held)
    }

    /// Is every live ring held back by the throttle (at least one), with no I/O in flight
    /// (pushed ops, submitted or not)? Then polling is pointless.
    fn all_held(&self) -> bool {
        self.engine.in_flight() == 0 && self.any_held() && self.rings.iter().all(|r| r.broken || r.held())
    }

    /// How long to sleep (ns; `None`: until an fd wakes the worker): until a submission
    /// retry is due, or until the first held ring may ask the throttle again.
    fn sleep_timeout(&mut self) -> Option<u64> {
        let retry = self.retry_submit();
        let due = self.rings.iter().filter(|r| !r.broken).filter_map(|r| r.queue.throttled_until()).min();
        let held = due.map(|t| t.saturating_sub(now_ns()));
        match (retry, held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Submit what a failed or partial submission left queued (the kernel refused it for
    /// now: EAGAIN, EBUSY, ENOMEM). Nothing else would: no kick or completion is coming for
    /// those ops. Returns how long to sleep before retrying (ns): `None` when nothing is
    /// left.
    fn retry_submit(&mut self) -> Option<u64> {
        if self.engine.unsubmitted() == 0 {
            return None;
        }
        match self.engine.submit() {
            Ok(()) => {
                // The sync engine completes during submit, without signalling.
                self.poll_completions();
                self.publish_all();
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, left = self.engine.unsubmitted(), "I/O submission failed; retrying");
                Some(SUBMIT_RETRY_NS)
            }
        }
    }

    fn dispatch(&mut self) {
        if self.completions.is_empty() {
            return;
        }
        // One clock read for the batch, after the engine handed it over: the completion time
        // of each of its requests. (Not shared with the pops of the same pass: a synchronous
        // engine, or io_uring on a page-cache hit, did the I/O in between.)
        let now = if self.timing { now_ns() } else { 0 };
        for c in self.completions.drain(..) {
            let (qid, _) = split_tag(c.op.tag);
            match self.rings.get_mut(qid as usize) {
                Some(r) => r.queue.complete_at(c, now),
                None => tracing::error!(tag = c.op.tag, "completion for an unknown queue"),
            }
        }
    }

    /// Reap completions and clear the engine's eventfd (after `poll` reported it).
    fn reap(&mut self) {
        self.engine.reap(&mut self.completions);
        self.dispatch();
    }

    /// Reap completions without a syscall; `true` if there were any.
    fn poll_completions(&mut self) -> bool {
        self.engine.poll_completions(&mut self.completions);
        let any = !self.completions.is_empty();
        self.dispatch();
        any
    }

    fn publish_all(&mut self) {
        for r in &mut self.rings {
            r.publish();
        }
    }

    /// Wait for every started I/O to complete and publish it.
    fn drain_in_flight(&mut self) {
        while self.engine.in_flight() > 0 {
            if let Err(e) = self.engine.wait(&mut self.completions) {
                tracing::error!(error = %e, "waiting for in-flight I/O failed");
                break;
            }
            self.dispatch();
        }
        self.publish_all();
        for r in &mut self.rings {
            r.queue.end_throttle();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn the_poll_window_drops_to_zero_when_work_comes_too_late_and_grows_back() {
        let mut w = PollWindow::new(50 * US);
        assert_eq!(w.current(), 50 * US, "starts at the budget");
        w.woke(30 * US);
        assert_eq!(w.current(), 50 * US, "caught within the window: unchanged");
        w.woke(51 * US);
        assert_eq!(w.current(), 25 * US, "later than any window could catch: halves");
        for _ in 0..3 {
            w.woke(1000 * US);
        }
        assert_eq!(w.current(), Duration::ZERO, "below 4 µs: off");
        w.woke(10 * US);
        assert_eq!(w.current(), 4 * US);
        w.woke(10 * US);
        assert_eq!(w.current(), 8 * US);
        w.woke(10 * US);
        assert_eq!(w.current(), 16 * US, "doubles while work comes after the window");
        w.woke(3 * US);
        assert_eq!(w.current(), 16 * US);
        w.woke(40 * US);
        w.woke(40 * US);
        assert_eq!(w.current(), 50 * US, "never beyond the budget");
        let mut off = PollWindow::new(Duration::ZERO);
        off.woke(US);
        assert_eq!(off.current(), Duration::ZERO, "--poll-us 0: never polls");
    }
}
