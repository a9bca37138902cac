//! `vblk top`'s numbers, with no terminal: rates and latency percentiles from the
//! difference of two `export_stats` samples (their format: [`crate::daemon::stats`]), and
//! each export's recent history for its sparkline.

use std::collections::{HashMap, VecDeque};

use serde_json::Value;

use crate::daemon::stats::{buckets, percentile};

/// Samples of history kept per export (the sparklines show what fits).
pub const HISTORY: usize = 300;

/// One queue's (or an export's) activity between two samples, per second.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rates {
    pub read_iops: f64,
    pub write_iops: f64,
    /// Every request: reads, writes, flushes, discards, ...
    pub iops: f64,
    pub read_bps: f64,
    pub write_bps: f64,
    /// Requests that completed with an error status.
    pub errors: f64,
    /// Bucket upper bounds in seconds (infinite: past the last bucket); None without requests.
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    /// Requests in flight at the second sample (a gauge, not a rate).
    pub in_flight: u64,
}

fn count(v: &Value, group: &str, key: &str) -> u64 {
    v[group][key].as_u64().unwrap_or(0)
}

fn sum(v: &Value) -> u64 {
    v.as_object().map(|m| m.values().filter_map(Value::as_u64).sum()).unwrap_or(0)
}

/// Each bucket's requests between two samples (same bounds; a counter that went down
/// counts as zero).
pub fn bucket_delta(prev: &[(Option<f64>, u64)], cur: &[(Option<f64>, u64)]) -> Vec<(Option<f64>, u64)> {
    cur.iter().enumerate().map(|(i, &(bound, n))| (bound, n.saturating_sub(prev.get(i).map_or(0, |p| p.1)))).collect()
}

/// The rates of one queue's JSON (or an export's `total`) from `prev` to `cur`, `dt`
/// seconds later.
pub fn rates(prev: &Value, cur: &Value, dt: f64) -> Rates {
    let per_s = |d: u64| if dt > 0.0 { d as f64 / dt } else { 0.0 };
    let delta = |group: &str, key: &str| count(cur, group, key).saturating_sub(count(prev, group, key));
    let lat = bucket_delta(&buckets(&prev["latency"]), &buckets(&cur["latency"]));
    let lat_pct = |p| percentile(&lat, p).or_else(|| lat.iter().any(|b| b.1 > 0).then_some(f64::INFINITY));
    Rates {
        read_iops: per_s(delta("requests", "read")),
        write_iops: per_s(delta("requests", "write")),
        iops: per_s(sum(&cur["requests"]).saturating_sub(sum(&prev["requests"]))),
        read_bps: per_s(delta("bytes", "read")),
        write_bps: per_s(delta("bytes", "write")),
        errors: per_s(sum(&cur["errors"]).saturating_sub(sum(&prev["errors"]))),
        p50: lat_pct(0.5),
        p99: lat_pct(0.99),
        in_flight: cur["in_flight"].as_u64().unwrap_or(0),
    }
}

/// What is shown of one export.
#[derive(Debug, Clone, Default)]
pub struct ExportView {
    pub name: String,
    pub connected: bool,
    pub num_queues: u64,
    /// False on the export's first sample: no rates yet, only the in-flight gauge.
    pub measured: bool,
    pub total: Rates,
    pub queues: Vec<Rates>,
    /// Total IOPS and bytes per second (read + write) of the last samples, oldest first.
    pub iops_history: VecDeque<u64>,
    pub bps_history: VecDeque<u64>,
}

fn push(h: &mut VecDeque<u64>, v: f64) {
    if h.len() == HISTORY {
        h.pop_front();
    }
    h.push_back(v.round() as u64);
}

/// The exports as of the last sample, sorted by name.
#[derive(Debug, Default)]
pub struct Model {
    pub exports: Vec<ExportView>,
    /// The daemon's uptime at the last sample.
    pub uptime: f64,
    /// Whether the daemon measures latency.
    pub timing: bool,
    prev: HashMap<String, Value>,
    prev_uptime: Option<f64>,
}

impl Model {
    /// Take a new `export_stats` result: exports that appeared are added (rates from the
    /// next sample on), those gone are dropped.
    pub fn update(&mut self, stats: &Value) {
        let uptime = stats["uptime_seconds"].as_f64().unwrap_or(0.0);
        let dt = match self.prev_uptime {
            Some(p) if uptime > p => Some(uptime - p),
            Some(_) => {
                // The uptime went back: another daemon on the same socket.
                self.reset();
                None
            }
            None => None,
        };
        let mut old: HashMap<String, ExportView> = self.exports.drain(..).map(|e| (e.name.clone(), e)).collect();
        let mut prev = std::mem::take(&mut self.prev);
        for e in stats["exports"].as_array().into_iter().flatten() {
            let Some(name) = e["name"].as_str() else { continue };
            let mut view = old.remove(name).unwrap_or_else(|| ExportView { name: name.into(), ..Default::default() });
            view.connected = e["connected"].as_bool() == Some(true);
            view.num_queues = e["num_queues"].as_u64().unwrap_or(0);
            let queues = e["queues"].as_array().map(Vec::as_slice).unwrap_or_default();
            // Fewer requests than before: the export was removed and added again in between.
            let last = prev.remove(name).filter(|p| sum(&e["total"]["requests"]) >= sum(&p["total"]["requests"]));
            match (last, dt) {
                (Some(p), Some(dt)) => {
                    view.measured = true;
                    view.total = rates(&p["total"], &e["total"], dt);
                    view.queues = queues.iter().enumerate().map(|(i, q)| rates(&p["queues"][i], q, dt)).collect();
                    push(&mut view.iops_history, view.total.iops);
                    push(&mut view.bps_history, view.total.read_bps + view.total.write_bps);
                }
                _ => {
                    let idle =
                        |q: &Value| Rates { in_flight: q["in_flight"].as_u64().unwrap_or(0), ..Default::default() };
                    view.measured = false;
                    view.total = idle(&e["total"]);
                    view.queues = queues.iter().map(idle).collect();
                }
            }
            self.prev.insert(name.to_string(), e.clone());
            self.exports.push(view);
        }
        self.exports.sort_by(|a, b| a.name.cmp(&b.name));
        self.uptime = uptime;
        self.timing = stats["timing"].as_bool() == Some(true);
        self.prev_uptime = Some(uptime);
    }

    /// Forget everything (the daemon went away; the next one starts afresh).
    pub fn reset(&mut self) {
        *self = Model::default();
    }
}

/// A request or byte rate in a few characters: 950, 12.3k, 1.25M.
pub fn fmt_rate(v: f64) -> String {
    match v {
        v if v < 999.5 => format!("{v:.0}"),
        v if v < 99_950.0 => format!("{:.1}k", v / 1e3),
        v if v < 999_500.0 => format!("{:.0}k", v / 1e3),
        v => format!("{:.2}M", v / 1e6),
    }
}

/// Bytes per second as MB/s (10^6).
pub fn fmt_mbps(bps: f64) -> String {
    let mb = bps / 1e6;
    if mb < 99.95 {
        format!("{mb:.1}")
    } else {
        format!("{mb:.0}")
    }
}

/// A latency bucket's bound: 16µs, 2.0ms, 262ms, 1.05s, >8s.
pub fn fmt_latency(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.is_infinite() => ">8s".into(),
        Some(s) if s < 1e-3 => format!("{:.0}µs", s * 1e6),
        Some(s) if s < 0.1 => format!("{:.1}ms", s * 1e3),
        Some(s) if s < 1.0 => format!("{:.0}ms", s * 1e3),
        Some(s) => format!("{s:.2}s"),
    }
}

/// The daemon's uptime: 42s, 5m07s, 3h02m, 2d04h.
pub fn fmt_uptime(s: f64) -> String {
    let s = s as u64;
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// The last `width` values as a line of block characters scaled to their maximum, the
/// newest on the right (blank for zero and before the history starts).
pub fn spark(history: &VecDeque<u64>, width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let shown: Vec<u64> = history.iter().skip(history.len().saturating_sub(width)).copied().collect();
    let max = shown.iter().copied().max().unwrap_or(0);
    let mut s = " ".repeat(width - shown.len());
    for v in shown {
        s.push(if v == 0 { ' ' } else { BARS[((v as u128 * 8).div_ceil(max as u128) as usize - 1).min(7)] });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn queue(reads: u64, writes: u64, bytes: u64, lat: [u64; 3], in_flight: u64) -> Value {
        json!({
            "requests": {"read": reads, "write": writes, "flush": 1},
            "bytes": {"read": bytes, "write": bytes},
            "errors": {"ioerr": 0, "unsupp": 0},
            "in_flight": in_flight,
            "latency": {"buckets": [[1e-6, lat[0]], [2e-6, lat[1]], [null, lat[2]]]},
        })
    }

    fn stats(uptime: f64, exports: &[(&str, Value)]) -> Value {
        let exports: Vec<Value> = exports
            .iter()
            .map(|(n, q)| json!({"name": n, "connected": true, "num_queues": 1, "total": q, "queues": [q]}))
            .collect();
        json!({"uptime_seconds": uptime, "timing": true, "exports": exports})
    }

    #[test]
    fn rates_are_deltas_per_second() {
        let a = queue(100, 50, 4096, [10, 0, 0], 3);
        let b = queue(300, 60, 4096 + 8192, [10, 95, 5], 7);
        let r = rates(&a, &b, 2.0);
        assert_eq!(r.read_iops, 100.0);
        assert_eq!(r.write_iops, 5.0);
        assert_eq!(r.iops, 105.0);
        assert_eq!(r.read_bps, 4096.0);
        assert_eq!(r.write_bps, 4096.0);
        assert_eq!(r.errors, 0.0);
        assert_eq!(r.in_flight, 7);
        // The 10 fast requests were before the first sample: only the deltas count.
        assert_eq!(r.p50, Some(2e-6));
        assert_eq!(r.p99, Some(f64::INFINITY));
        let idle = rates(&b, &b, 1.0);
        assert_eq!((idle.iops, idle.p50, idle.p99), (0.0, None, None));
    }

    #[test]
    fn bucket_deltas_never_go_negative() {
        let d = bucket_delta(&[(Some(1.0), 5), (None, 2)], &[(Some(1.0), 7), (None, 1)]);
        assert_eq!(d, vec![(Some(1.0), 2), (None, 0)]);
        assert_eq!(bucket_delta(&[], &[(None, 3)]), vec![(None, 3)]);
    }

    #[test]
    fn exports_come_and_go_and_keep_history() {
        let mut m = Model::default();
        m.update(&stats(1.0, &[("b", queue(0, 0, 0, [0; 3], 0)), ("a", queue(5, 0, 0, [0; 3], 1))]));
        assert_eq!(m.exports.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(m.exports.iter().all(|e| !e.measured && e.iops_history.is_empty()));
        assert_eq!(m.exports[0].total.in_flight, 1);

        m.update(&stats(2.0, &[("a", queue(1005, 0, 0, [0; 3], 0)), ("c", queue(9, 0, 0, [0; 3], 0))]));
        let names: Vec<_> = m.exports.iter().map(|e| (e.name.as_str(), e.measured)).collect();
        assert_eq!(names, [("a", true), ("c", false)]);
        assert_eq!(m.exports[0].total.read_iops, 1000.0);
        assert_eq!(m.exports[0].queues[0].read_iops, 1000.0);
        assert_eq!(m.exports[0].iops_history, [1000]);

        // "a" removed and added again between samples: its counters restarted.
        m.update(&stats(3.0, &[("a", queue(2, 0, 0, [0; 3], 0))]));
        assert!(!m.exports[0].measured);
        assert_eq!(m.exports[0].iops_history, [1000]);

        // A new daemon (uptime went back): everything starts again.
        m.update(&stats(0.5, &[("a", queue(2, 0, 0, [0; 3], 0))]));
        assert!(m.exports[0].iops_history.is_empty());
        assert!(!m.exports[0].measured);
    }

    #[test]
    fn history_is_bounded() {
        let mut m = Model::default();
        for i in 0..(HISTORY + 10) {
            m.update(&stats(i as f64, &[("a", queue(i as u64 * 10, 0, 0, [0; 3], 0))]));
        }
        assert_eq!(m.exports[0].iops_history.len(), HISTORY);
        assert!(m.exports[0].iops_history.iter().all(|&v| v == 10));
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_rate(0.0), "0");
        assert_eq!(fmt_rate(950.2), "950");
        assert_eq!(fmt_rate(12_345.0), "12.3k");
        assert_eq!(fmt_rate(123_456.0), "123k");
        assert_eq!(fmt_rate(1_250_000.0), "1.25M");
        assert_eq!(fmt_mbps(1_500_000.0), "1.5");
        assert_eq!(fmt_mbps(1_234_000_000.0), "1234");
        assert_eq!(fmt_latency(None), "-");
        assert_eq!(fmt_latency(Some(16e-6)), "16µs");
        assert_eq!(fmt_latency(Some(2.048e-3)), "2.0ms");
        assert_eq!(fmt_latency(Some(0.262144)), "262ms");
        assert_eq!(fmt_latency(Some(f64::INFINITY)), ">8s");
        assert_eq!(fmt_uptime(42.9), "42s");
        assert_eq!(fmt_uptime(307.0), "5m07s");
        assert_eq!(fmt_uptime(3.0 * 3600.0 + 120.0), "3h02m");
    }

    #[test]
    fn sparks_scale_to_the_maximum() {
        let h: VecDeque<u64> = [0, 1, 4, 8].into_iter().collect();
        assert_eq!(spark(&h, 6), "   ▁▄█");
        assert_eq!(spark(&h, 2), "▄█");
        assert_eq!(spark(&VecDeque::new(), 3), "   ");
    }
}
