//! Metrics of the data plane: counted where the work happens, read when scraped.
//!
//! - [`clock`]: the pipeline's timestamps (`u64` nanoseconds).
//! - [`counters`]: what the hot path touches. Each queue has a [`QueueMetrics`] and each
//!   worker thread a [`WorkerMetrics`], on cache lines of their own, written by the one
//!   thread that serves that queue (or is that worker) with plain loads and stores of
//!   relaxed atomics: no lock, no `lock`-prefixed instruction, no allocation, no line that
//!   two threads write.
//! - [`export`]: one disk's counters ([`ExportMetrics`]: its queues and workers) and the
//!   [`Registry`] of the exports a daemon serves, read and summed on scrape.
//! - [`prometheus`]: the registry in Prometheus text format (through `prometheus-client`'s
//!   encoder); metric names are listed there.
//! - [`http`]: a small HTTP/1.1 responder for `GET /metrics` on its own thread.

pub mod clock;
pub mod counters;
pub mod export;
pub mod http;
pub mod prometheus;

pub use clock::now_ns;
pub use counters::{ErrorStatus, Op, QueueMetrics, QueueSnapshot, WorkerMetrics, WorkerSnapshot, LATENCY_BUCKETS};
pub use export::{ExportMetrics, ExportSnapshot, Registry, RegistryError};
pub use http::{HttpError, MetricsServer};
