//! An export's counters as JSON (`export_stats`): per queue and in total, cumulative since
//! the export started. A client gets rates and percentiles from the difference of two
//! calls (`vblk top` does, every second).
//!
//! ```text
//! {"name": "vm1", "size": 1073741824, "connected": true,
//!  "total": QUEUE, "queues": [QUEUE...], "workers": [{"worker": 0, "poll_seconds": 1.5, "sleep_seconds": 8.2}]}
//! QUEUE = {"requests": {"read": 10, "write": 3, ...}, "bytes": {"read": 40960, ...},
//!          "errors": {"ioerr": 0, "unsupp": 0}, "in_flight": 0, "merged": 1, "refused": 0,
//!          "throttled_seconds": 0.0, "batches": 9, "publishes": 9, "notifications": 8,
//!          "latency": {"count": 13, "sum_seconds": 0.0002, "buckets": [[0.000001, 2], ..., [null, 0]]}}
//! ```
//! Latency buckets are not cumulative: `[upper bound in seconds (null: +Inf), requests]`.

use serde_json::{json, Map, Value};
use vblk_metrics::counters::latency_bound_seconds;
use vblk_metrics::{ErrorStatus, Op, QueueSnapshot, LATENCY_BUCKETS};

use super::export::Export;

pub fn export_json(e: &Export) -> Value {
    let snap = e.metrics().snapshot();
    let mut info = e.info();
    let obj = info.as_object_mut().expect("info is an object");
    obj.remove("options");
    obj.insert("total".into(), queue_json(&snap.total()));
    obj.insert("queues".into(), snap.queues.iter().map(queue_json).collect());
    obj.insert(
        "workers".into(),
        snap.workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                json!({"worker": i, "poll_seconds": w.poll_ns as f64 / 1e9, "sleep_seconds": w.sleep_ns as f64 / 1e9})
            })
            .collect(),
    );
    info
}

fn queue_json(q: &QueueSnapshot) -> Value {
    let by_op = |f: &dyn Fn(Op) -> u64| {
        Value::Object(Op::ALL.iter().map(|&op| (op.label().into(), f(op).into())).collect::<Map<_, _>>())
    };
    let buckets: Vec<Value> = (0..=LATENCY_BUCKETS)
        .map(|i| {
            let bound = if i < LATENCY_BUCKETS { json!(latency_bound_seconds(i)) } else { Value::Null };
            json!([bound, q.latency[i]])
        })
        .collect();
    json!({
        "requests": by_op(&|op| q.requests(op)),
        "bytes": by_op(&|op| q.bytes(op)),
        "errors": ErrorStatus::ALL.iter().map(|&s| (s.label().to_string(), Value::from(q.errors(s)))).collect::<Map<_, _>>(),
        "in_flight": q.in_flight(),
        "merged": q.merged,
        "refused": q.refused,
        "batches": q.batches,
        "publishes": q.publishes,
        "notifications": q.notifications,
        "throttled_seconds": q.throttled_ns as f64 / 1e9,
        "latency": {"count": q.latency_count(), "sum_seconds": q.latency_sum_ns as f64 / 1e9, "buckets": buckets},
    })
}

/// The latency below which a fraction `p` (0..=1) of the requests in `buckets` (pairs of
/// upper bound in seconds, None for +Inf, and count; not cumulative) finished: the upper
/// bound of the bucket holding that request. None without requests, or in the +Inf bucket.
pub fn percentile(buckets: &[(Option<f64>, u64)], p: f64) -> Option<f64> {
    let total: u64 = buckets.iter().map(|b| b.1).sum();
    if total == 0 {
        return None;
    }
    let rank = ((p * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for &(bound, n) in buckets {
        seen += n;
        if seen >= rank {
            return bound;
        }
    }
    None
}

/// The `latency.buckets` of a queue's JSON as pairs.
pub fn buckets(latency: &Value) -> Vec<(Option<f64>, u64)> {
    latency["buckets"]
        .as_array()
        .map(|a| a.iter().map(|b| (b[0].as_f64(), b[1].as_u64().unwrap_or(0))).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_bucket_bounds() {
        let b = [(Some(1e-6), 50), (Some(2e-6), 40), (Some(4e-6), 9), (None, 1)];
        assert_eq!(percentile(&b, 0.5), Some(1e-6));
        assert_eq!(percentile(&b, 0.9), Some(2e-6));
        assert_eq!(percentile(&b, 0.99), Some(4e-6));
        assert_eq!(percentile(&b, 1.0), None);
        assert_eq!(percentile(&[(Some(1e-6), 0)], 0.5), None);
    }
}
