//! The registry in Prometheus text format (version 0.0.4), encoded by `prometheus-client`.
//!
//! The counters are not `prometheus-client` metrics (those take a lock or a `lock`-prefixed
//! add per update): a [`Collector`] reads every export's counters once per scrape and hands
//! the values to the crate's encoder, which writes names, labels, escaping and the
//! histogram's cumulative buckets.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `vblk_requests_total` | counter: requests finished (status written) | `export`, `queue`, `op` |
//! | `vblk_bytes_total` | counter: bytes of successful requests (data read or written, range discarded or zeroed, ID bytes) | `export`, `queue`, `op` |
//! | `vblk_request_errors_total` | counter: requests finished with an error status | `export`, `queue`, `status` (`ioerr`, `unsupp`) |
//! | `vblk_requests_in_flight` | gauge: requests started and not finished | `export`, `queue` |
//! | `vblk_request_latency_seconds` | histogram: from pop to status written | `export`, `queue` |
//! | `vblk_merged_requests_total` | counter: requests that rode in another's backend I/O | `export`, `queue` |
//! | `vblk_refused_chains_total` | counter: chains refused before becoming requests | `export`, `queue` |
//! | `vblk_throttled_seconds_total` | counter: time the queue was held back by its export's QoS limit (requests left waiting in its ring) | `export`, `queue` |
//! | `vblk_queue_batches_total` | counter: passes over the avail ring that popped at least one chain (requests per batch = requests / batches) | `export`, `queue` |
//! | `vblk_used_publishes_total` | counter: used-ring index stores (completions made visible to the driver) | `export`, `queue` |
//! | `vblk_notifications_total` | counter: notifications sent to the driver (call eventfd writes) | `export`, `queue` |
//! | `vblk_worker_poll_seconds_total` | counter: time busy-polling (adaptive polling, work included) | `export`, `worker` |
//! | `vblk_worker_sleep_seconds_total` | counter: time asleep in `poll(2)` | `export`, `worker` |
//! | `vblk_queue_info` | gauge, always 1: which worker serves a queue | `export`, `queue`, `worker` |
//!
//! `op` is one of `read`, `write`, `flush`, `discard`, `write-zeroes`, `get-id`, `other`.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeCounterValue, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::counters::{latency_bound_seconds, ErrorStatus, Op, QueueSnapshot, LATENCY_BUCKETS};
use crate::export::{ExportMetrics, ExportSnapshot, Registry};

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Every registered export's counters, in Prometheus text format.
pub fn encode(registry: &Arc<Registry>) -> Result<String, fmt::Error> {
    let mut r = prometheus_client::registry::Registry::default();
    r.register_collector(Box::new(Exposition(Arc::clone(registry))));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &r)?;
    Ok(out)
}

#[derive(Debug)]
struct Exposition(Arc<Registry>);

type Labels = Vec<(&'static str, String)>;

/// One counter family: its descriptor, then a sample per label set.
fn counter<V: EncodeCounterValue>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        m.encode_family(&labels)?.encode_counter::<NoLabelSet, V, f64>(&v, None)?;
    }
    Ok(())
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// An export's queues with their label sets.
struct Queues<'a> {
    name: &'a str,
    snapshot: &'a ExportSnapshot,
}

impl<'a> Queues<'a> {
    fn each(&self) -> impl Iterator<Item = (Labels, &'a QueueSnapshot)> + 'a {
        let name = self.name;
        self.snapshot
            .queues
            .iter()
            .enumerate()
            .map(move |(q, s)| (vec![("export", name.to_string()), ("queue", q.to_string())], s))
    }

    fn by_op(&self, f: fn(&QueueSnapshot, Op) -> u64) -> impl Iterator<Item = (Labels, u64)> + 'a {
        self.each().flat_map(move |(labels, s)| {
            Op::ALL.into_iter().map(move |op| {
                let mut l = labels.clone();
                l.push(("op", op.label().to_string()));
                (l, f(s, op))
            })
        })
    }
}

impl Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let exports = self.0.snapshot();
        let queues: Vec<Queues<'_>> = exports.iter().map(|(n, _, s)| Queues { name: n, snapshot: s }).collect();
        let per_queue = |f: fn(&QueueSnapshot) -> u64| {
            queues.iter().flat_map(move |e| e.each().map(move |(l, s)| (l, f(s)))).collect::<Vec<_>>()
        };

        counter(
            &mut enc,
            "vblk_requests",
            "Requests finished (status written), by operation.",
            queues.iter().flat_map(|e| e.by_op(QueueSnapshot::requests)).collect::<Vec<_>>(),
        )?;
        counter(
            &mut enc,
            "vblk_bytes",
            "Bytes of requests that succeeded: data read or written, range discarded or zeroed, device ID bytes.",
            queues.iter().flat_map(|e| e.by_op(QueueSnapshot::bytes)).collect::<Vec<_>>(),
        )?;
        counter(
            &mut enc,
            "vblk_request_errors",
            "Requests finished with an error status (ioerr: VIRTIO_BLK_S_IOERR, unsupp: VIRTIO_BLK_S_UNSUPP).",
            queues
                .iter()
                .flat_map(|e| e.each())
                .flat_map(|(labels, s)| {
                    ErrorStatus::ALL.into_iter().map(move |st| {
                        let mut l = labels.clone();
                        l.push(("status", st.label().to_string()));
                        (l, s.errors(st))
                    })
                })
                .collect::<Vec<_>>(),
        )?;
        {
            let mut m = enc.encode_descriptor(
                "vblk_requests_in_flight",
                "Requests started and not finished yet.",
                None,
                MetricType::Gauge,
            )?;
            for (labels, v) in per_queue(QueueSnapshot::in_flight) {
                m.encode_family(&labels)?.encode_gauge(&v)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "vblk_request_latency_seconds",
                "Request latency, from the pop of its descriptor chain to its status written.",
                None,
                MetricType::Histogram,
            )?;
            for e in &queues {
                for (labels, s) in e.each() {
                    let buckets: Vec<(f64, u64)> = (0..=LATENCY_BUCKETS)
                        .map(|i| {
                            let bound = if i < LATENCY_BUCKETS { latency_bound_seconds(i) } else { f64::INFINITY };
                            (bound, s.latency[i])
                        })
                        .collect();
                    m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                        secs(s.latency_sum_ns),
                        s.latency_count(),
                        &buckets,
                        None,
                    )?;
                }
            }
        }
        counter(
            &mut enc,
            "vblk_merged_requests",
            "Requests merged into another request's backend I/O.",
            per_queue(|s| s.merged),
        )?;
        counter(
            &mut enc,
            "vblk_refused_chains",
            "Descriptor chains refused before they became requests (answered IOERR, or the queue stopped).",
            per_queue(|s| s.refused),
        )?;
        counter(
            &mut enc,
            "vblk_throttled_seconds",
            "Time the queue was held back by its export's QoS limit (requests left waiting in its ring).",
            per_queue(|s| s.throttled_ns).into_iter().map(|(l, v)| (l, secs(v))),
        )?;
        counter(
            &mut enc,
            "vblk_queue_batches",
            "Passes over the avail ring that popped at least one descriptor chain.",
            per_queue(|s| s.batches),
        )?;
        counter(
            &mut enc,
            "vblk_used_publishes",
            "Used-ring index stores: completions made visible to the driver.",
            per_queue(|s| s.publishes),
        )?;
        counter(
            &mut enc,
            "vblk_notifications",
            "Notifications sent to the driver (call eventfd writes).",
            per_queue(|s| s.notifications),
        )?;
        let workers = |f: fn(&crate::WorkerSnapshot) -> u64| {
            exports
                .iter()
                .flat_map(move |(name, _, s)| {
                    s.workers
                        .iter()
                        .enumerate()
                        .map(move |(t, w)| (vec![("export", name.clone()), ("worker", t.to_string())], secs(f(w))))
                })
                .collect::<Vec<_>>()
        };
        counter(
            &mut enc,
            "vblk_worker_poll_seconds",
            "Time a worker thread spent busy-polling its rings (adaptive polling, work included).",
            workers(|w| w.poll_ns),
        )?;
        counter(
            &mut enc,
            "vblk_worker_sleep_seconds",
            "Time a worker thread slept in poll(2), waiting for a kick or a completion.",
            workers(|w| w.sleep_ns),
        )?;
        {
            let mut m =
                enc.encode_descriptor("vblk_queue", "The worker thread that serves a queue.", None, MetricType::Info)?;
            for (name, metrics, _) in &exports {
                for q in 0..metrics.num_queues() {
                    m.encode_info(&queue_info(name, metrics, q))?;
                }
            }
        }
        Ok(())
    }
}

fn queue_info(name: &str, m: &ExportMetrics, q: usize) -> impl EncodeLabelSet {
    vec![("export", name.to_string()), ("queue", q.to_string()), ("worker", m.worker_of(q).to_string())]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> f64 {
        let line = text
            .lines()
            .find(|l| l.rsplit_once(' ').is_some_and(|(s, _)| s == series))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"));
        line.rsplit_once(' ').unwrap().1.parse().unwrap()
    }

    #[test]
    fn exports_queues_and_workers_in_text_format() {
        let reg = Arc::new(Registry::new());
        let a = Arc::new(ExportMetrics::new(2, 1));
        reg.register("a", Arc::clone(&a)).unwrap();
        let q1 = a.queue(1).unwrap();
        for _ in 0..3 {
            q1.started();
        }
        q1.finished(Op::Read, None, 4096, Some(1_500)); // bucket le=2e-06
        q1.finished(Op::Write, Some(ErrorStatus::IoErr), 512, Some(3_000_000)); // le=0.004096
        q1.merged(2);
        q1.batch();
        q1.published();
        q1.published();
        q1.notified();
        a.worker(0).unwrap().slept(1_500_000_000);
        let b = Arc::new(ExportMetrics::new(1, 1));
        reg.register("b@snap-1", b).unwrap();

        let text = encode(&reg).unwrap();
        let s = |series: &str| sample(&text, series);
        assert_eq!(s(r#"vblk_requests_total{export="a",queue="1",op="read"}"#), 1.0);
        assert_eq!(s(r#"vblk_requests_total{export="a",queue="1",op="write"}"#), 1.0);
        assert_eq!(s(r#"vblk_requests_total{export="a",queue="0",op="write-zeroes"}"#), 0.0);
        assert_eq!(s(r#"vblk_bytes_total{export="a",queue="1",op="read"}"#), 4096.0);
        assert_eq!(s(r#"vblk_bytes_total{export="a",queue="1",op="write"}"#), 0.0);
        assert_eq!(s(r#"vblk_request_errors_total{export="a",queue="1",status="ioerr"}"#), 1.0);
        assert_eq!(s(r#"vblk_request_errors_total{export="a",queue="1",status="unsupp"}"#), 0.0);
        assert_eq!(s(r#"vblk_requests_in_flight{export="a",queue="1"}"#), 1.0);
        assert_eq!(s(r#"vblk_request_latency_seconds_bucket{export="a",queue="1",le="1e-06"}"#), 0.0);
        assert_eq!(s(r#"vblk_request_latency_seconds_bucket{export="a",queue="1",le="2e-06"}"#), 1.0);
        assert_eq!(s(r#"vblk_request_latency_seconds_bucket{export="a",queue="1",le="0.002048"}"#), 1.0);
        assert_eq!(s(r#"vblk_request_latency_seconds_bucket{export="a",queue="1",le="0.004096"}"#), 2.0);
        assert_eq!(s(r#"vblk_request_latency_seconds_bucket{export="a",queue="1",le="+Inf"}"#), 2.0);
        assert_eq!(s(r#"vblk_request_latency_seconds_count{export="a",queue="1"}"#), 2.0);
        assert!((s(r#"vblk_request_latency_seconds_sum{export="a",queue="1"}"#) - 0.0030015).abs() < 1e-12);
        assert_eq!(s(r#"vblk_merged_requests_total{export="a",queue="1"}"#), 2.0);
        assert_eq!(s(r#"vblk_queue_batches_total{export="a",queue="1"}"#), 1.0);
        assert_eq!(s(r#"vblk_used_publishes_total{export="a",queue="1"}"#), 2.0);
        assert_eq!(s(r#"vblk_notifications_total{export="a",queue="1"}"#), 1.0);
        assert_eq!(s(r#"vblk_notifications_total{export="a",queue="0"}"#), 0.0);
        assert_eq!(s(r#"vblk_throttled_seconds_total{export="a",queue="0"}"#), 0.0);
        assert_eq!(s(r#"vblk_worker_sleep_seconds_total{export="a",worker="0"}"#), 1.5);
        assert_eq!(s(r#"vblk_worker_poll_seconds_total{export="a",worker="0"}"#), 0.0);
        assert_eq!(s(r#"vblk_queue_info{export="a",queue="1",worker="0"}"#), 1.0);
        // Label values are escaped; every export gets its series.
        assert_eq!(s(r#"vblk_requests_total{export="b@snap-1",queue="0",op="flush"}"#), 0.0);
        assert!(text.contains("# TYPE vblk_request_latency_seconds histogram\n"), "{text}");
        assert!(text.contains("# TYPE vblk_requests_total counter\n"), "{text}");
        assert!(text.contains("# TYPE vblk_requests_in_flight gauge\n"), "{text}");
        // Each family is described once, whatever the number of exports.
        assert_eq!(text.matches("# HELP vblk_requests_total ").count(), 1);
    }

    #[test]
    fn an_empty_registry_encodes() {
        let text = encode(&Arc::new(Registry::new())).unwrap();
        assert!(text.contains("# TYPE vblk_requests_total counter"));
        assert!(!text.lines().any(|l| l.starts_with("vblk_")), "{text}");
    }
}
