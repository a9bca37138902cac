//! One export's counters, and the registry of the exports a daemon serves.
//!
//! An [`ExportMetrics`] belongs to one device (one disk on one vhost-user socket): a
//! [`QueueMetrics`] per virtqueue and a [`WorkerMetrics`] per worker thread, created with
//! the device and kept across frontend reconnects and worker restarts (a counter never
//! goes back). The [`Registry`] names them: `vblk serve` registers its one disk; an exports
//! layer would register each disk it adds and unregister those it removes. Its mutex is
//! taken to register and to scrape, never by the data plane.
//!
//! **Timing** (the latency histogram) is off until [`ExportMetrics::set_timing`]: it costs
//! two clock reads per batch of requests, which is what a request costs on the null backend
//! when the worker takes them one at a time (docs/PERFORMANCE.md); the counters are always
//! on. `vblk serve --metrics` turns it on before any worker starts; a worker takes the
//! setting when it starts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::counters::{QueueMetrics, QueueSnapshot, WorkerMetrics, WorkerSnapshot};

/// Longest export name.
pub const MAX_NAME_LEN: usize = 128;

/// The counters of one export.
#[derive(Debug)]
pub struct ExportMetrics {
    queues: Vec<Arc<QueueMetrics>>,
    workers: Vec<Arc<WorkerMetrics>>,
    timing: AtomicBool,
}

impl ExportMetrics {
    /// Counters for `num_queues` queues served by `threads` workers (queue `i` by worker
    /// `i % threads`, as the vhost-user device assigns them).
    pub fn new(num_queues: usize, threads: usize) -> Self {
        ExportMetrics {
            queues: (0..num_queues).map(|_| Arc::default()).collect(),
            workers: (0..threads.max(1)).map(|_| Arc::default()).collect(),
            timing: AtomicBool::new(false),
        }
    }

    /// Measure request latencies (the histogram) in workers started from now on.
    pub fn set_timing(&self, on: bool) {
        self.timing.store(on, Ordering::Relaxed);
    }

    /// Whether workers starting now measure latencies.
    pub fn timing(&self) -> bool {
        self.timing.load(Ordering::Relaxed)
    }

    /// Queue `i`'s counters (None past the last queue).
    pub fn queue(&self, i: usize) -> Option<&Arc<QueueMetrics>> {
        self.queues.get(i)
    }

    /// Worker `t`'s counters (None past the last worker).
    pub fn worker(&self, t: usize) -> Option<&Arc<WorkerMetrics>> {
        self.workers.get(t)
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    pub fn num_workers(&self) -> usize {
        self.workers.len()
    }

    /// The worker that serves queue `i`.
    pub fn worker_of(&self, queue: usize) -> usize {
        queue % self.workers.len()
    }

    /// Every counter now.
    pub fn snapshot(&self) -> ExportSnapshot {
        ExportSnapshot {
            queues: self.queues.iter().map(|q| q.snapshot()).collect(),
            workers: self.workers.iter().map(|w| w.snapshot()).collect(),
        }
    }
}

/// An export's counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportSnapshot {
    pub queues: Vec<QueueSnapshot>,
    pub workers: Vec<WorkerSnapshot>,
}

impl ExportSnapshot {
    /// The export's queues summed.
    pub fn total(&self) -> QueueSnapshot {
        let mut t = QueueSnapshot::default();
        for q in &self.queues {
            t.add(q);
        }
        t
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("export name {0:?} is invalid (1 to {MAX_NAME_LEN} characters among A-Z a-z 0-9 . _ - @ : +)")]
    BadName(String),
    #[error("an export named {0:?} is already registered")]
    Duplicate(String),
}

/// Check an export name: what labels and (later) the control API accept.
pub fn check_name(name: &str) -> Result<(), RegistryError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-@:+".contains(c);
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(allowed) {
        return Err(RegistryError::BadName(name.to_string()));
    }
    Ok(())
}

/// The exports whose counters a scrape reports, by name, in registration order.
#[derive(Debug, Default)]
pub struct Registry {
    exports: Mutex<Vec<(String, Arc<ExportMetrics>)>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(String, Arc<ExportMetrics>)>> {
        // The list stays consistent even if a holder panicked: every change is one push or
        // one remove.
        self.exports.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Report `metrics` as export `name`.
    pub fn register(&self, name: &str, metrics: Arc<ExportMetrics>) -> Result<(), RegistryError> {
        check_name(name)?;
        let mut exports = self.lock();
        if exports.iter().any(|(n, _)| n == name) {
            return Err(RegistryError::Duplicate(name.to_string()));
        }
        exports.push((name.to_string(), metrics));
        Ok(())
    }

    /// Stop reporting export `name`; `false` if there was none.
    pub fn unregister(&self, name: &str) -> bool {
        let mut exports = self.lock();
        let before = exports.len();
        exports.retain(|(n, _)| n != name);
        exports.len() != before
    }

    /// The names registered, in order.
    pub fn names(&self) -> Vec<String> {
        self.lock().iter().map(|(n, _)| n.clone()).collect()
    }

    /// Each export's name, queue→worker map and counters now. The registry's lock is held
    /// only to copy the list, not while the counters are read.
    pub fn snapshot(&self) -> Vec<(String, Arc<ExportMetrics>, ExportSnapshot)> {
        let exports: Vec<_> = self.lock().clone();
        exports
            .into_iter()
            .map(|(name, m)| {
                let s = m.snapshot();
                (name, m, s)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::Op;

    #[test]
    fn queues_map_to_workers_round_robin() {
        let m = ExportMetrics::new(5, 2);
        assert_eq!((m.num_queues(), m.num_workers()), (5, 2));
        assert_eq!((0..5).map(|q| m.worker_of(q)).collect::<Vec<_>>(), [0, 1, 0, 1, 0]);
        assert!(m.queue(4).is_some() && m.queue(5).is_none());
        assert!(m.worker(1).is_some() && m.worker(2).is_none());
        // No worker count is not a division by zero.
        assert_eq!(ExportMetrics::new(1, 0).worker_of(0), 0);
        // Latencies are measured only when asked for.
        assert!(!m.timing());
        m.set_timing(true);
        assert!(m.timing());
    }

    #[test]
    fn an_export_total_sums_its_queues() {
        let m = ExportMetrics::new(3, 3);
        for q in 0..3 {
            let c = m.queue(q).unwrap();
            for _ in 0..=q {
                c.started();
                c.finished(Op::Read, None, 4096, Some(10_000));
            }
        }
        m.worker(1).unwrap().slept(7);
        let s = m.snapshot();
        assert_eq!(s.queues.iter().map(|q| q.requests(Op::Read)).collect::<Vec<_>>(), [1, 2, 3]);
        let t = s.total();
        assert_eq!((t.requests(Op::Read), t.bytes(Op::Read), t.latency_count()), (6, 6 * 4096, 6));
        assert_eq!(s.workers[1].sleep_ns, 7);
    }

    #[test]
    fn names_are_checked_and_unique() {
        let r = Registry::new();
        r.register("disk0", Arc::new(ExportMetrics::new(1, 1))).unwrap();
        assert_eq!(
            r.register("disk0", Arc::new(ExportMetrics::new(1, 1))),
            Err(RegistryError::Duplicate("disk0".into()))
        );
        for bad in ["", "a\nb", "a b", "disk \"1\"", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert!(matches!(r.register(bad, Arc::new(ExportMetrics::new(1, 1))), Err(RegistryError::BadName(_))));
        }
        r.register("disk-1@snap", Arc::new(ExportMetrics::new(2, 1))).unwrap();
        assert_eq!(r.names(), ["disk0", "disk-1@snap"]);
        assert!(r.unregister("disk0"));
        assert!(!r.unregister("disk0"));
        let s = r.snapshot();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].0.as_str(), s[0].2.queues.len()), ("disk-1@snap", 2));
    }
}
