//! `vblk serve --metrics`: a known workload through the driver tools, then the scrape must
//! show exactly that many requests and bytes per operation, errors per status, and one
//! latency sample per request; bad HTTP requests get error statuses and the daemon keeps
//! serving; a taken port is refused at start.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn vblk() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vblk"))
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vblk-metrics-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `vblk serve` with metrics on a free port; killed when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
    metrics: SocketAddr,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start(dir: &Path, extra: &[&str]) -> Daemon {
        let socket = dir.join("vblk.sock");
        let mut child = vblk()
            .args(["serve", "--size", "16M", "--num-queues", "1", "--metrics", "127.0.0.1:0", "--socket"])
            .arg(&socket)
            .args(extra)
            .arg(dir.join("disk.img"))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Read stderr for the metrics address, then keep draining it (the daemon logs).
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("vblk: metrics on http://") {
                    let addr = rest.split('/').next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("vblk serve never printed its metrics address: {:?}", child.wait());
            }
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "socket {} never appeared", socket.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { child, socket, metrics: addr.parse().unwrap() }
    }

    /// Run a driver tool against the daemon.
    fn tool(&self, args: &[&str]) -> Output {
        vblk().args(args).arg("--socket").arg(&self.socket).output().unwrap()
    }

    fn scrape(&self) -> Scrape {
        let (status, body) = http(self.metrics, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
        Scrape::parse(&body)
    }
}

/// Send a raw request; (status line, body).
fn http(addr: SocketAddr, request: &[u8]) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (head.lines().next().unwrap_or("").to_string(), body.to_string())
}

/// The samples of one scrape: `name{labels}` → value.
struct Scrape(HashMap<String, f64>);

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {l:?}"));
                (series.to_string(), value.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")))
            })
            .collect();
        Scrape(samples)
    }

    fn get(&self, series: &str) -> f64 {
        *self.0.get(series).unwrap_or_else(|| panic!("no sample {series}"))
    }

    fn op(&self, metric: &str, op: &str) -> u64 {
        self.get(&format!(r#"{metric}{{export="metrics-test",queue="0",op="{op}"}}"#)) as u64
    }

    fn queue(&self, metric: &str) -> f64 {
        self.get(&format!(r#"{metric}{{export="metrics-test",queue="0"}}"#))
    }
}

fn ok(out: &Output) {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn counters_match_the_io_exactly() {
    let dir = tempdir("exact");
    // Reads in 8M..9M fail (IOERR), to count an error.
    let d = Daemon::start(&dir, &["--name", "metrics-test", "--inject", "read:eio@offset=8M-9M"]);
    let before = d.scrape();
    assert_eq!(before.op("vblk_requests_total", "read"), 0);

    let input = dir.join("in.bin");
    std::fs::write(&input, (0..3 * MIB).map(|i| (i % 251) as u8).collect::<Vec<u8>>()).unwrap();
    // Every tool connects with one GET_ID; `io` moves 1 MiB per request, and a write ends
    // with a flush (the device has a write cache).
    ok(&d.tool(&["io", "write", "--length", "3M", "--file", input.to_str().unwrap()]));
    ok(&d.tool(&["io", "read", "--length", "2M", "--file", dir.join("out.bin").to_str().unwrap()]));
    let failed = d.tool(&["io", "read", "--offset", "8M", "--length", "4k", "--file", "/dev/null"]);
    assert_eq!(failed.status.code(), Some(1), "the injected EIO fails the read");

    let s = d.scrape();
    let want = [("read", 3, 2 * MIB), ("write", 3, 3 * MIB), ("flush", 1, 0), ("get-id", 3, 60)];
    for (op, requests, bytes) in want {
        assert_eq!(s.op("vblk_requests_total", op), requests, "{op} requests");
        assert_eq!(s.op("vblk_bytes_total", op), bytes, "{op} bytes");
    }
    for op in ["discard", "write-zeroes", "other"] {
        assert_eq!((s.op("vblk_requests_total", op), s.op("vblk_bytes_total", op)), (0, 0), "{op}");
    }
    let errors = |status: &str| {
        s.get(&format!(r#"vblk_request_errors_total{{export="metrics-test",queue="0",status="{status}"}}"#))
    };
    assert_eq!((errors("ioerr"), errors("unsupp")), (1.0, 0.0));
    let count = s.queue("vblk_request_latency_seconds_count");
    assert_eq!(count, 10.0, "histogram count == requests");
    assert_eq!(s.get(r#"vblk_request_latency_seconds_bucket{export="metrics-test",queue="0",le="+Inf"}"#), count);
    // Cumulative buckets, never decreasing; 1 MiB through O_DIRECT takes more than 1 µs.
    let buckets: Vec<f64> =
        s.0.iter()
            .filter(|(k, _)| k.starts_with("vblk_request_latency_seconds_bucket{export=\"metrics-test\""))
            .map(|(_, &v)| v)
            .collect();
    assert_eq!(buckets.len(), 25);
    assert!(s.get(r#"vblk_request_latency_seconds_bucket{export="metrics-test",queue="0",le="1e-06"}"#) < count);
    assert!(s.queue("vblk_request_latency_seconds_sum") > 0.0);
    assert_eq!(s.queue("vblk_requests_in_flight"), 0.0);
    assert_eq!(s.queue("vblk_merged_requests_total"), 0.0, "one request at a time: nothing to merge");
    assert_eq!(s.queue("vblk_refused_chains_total"), 0.0);
    assert_eq!(s.queue("vblk_throttled_seconds_total"), 0.0);
    // One request at a time: a batch, a publish and (the driver asks for them) a notification
    // per request at most, and at least one of each.
    for name in ["vblk_queue_batches_total", "vblk_used_publishes_total", "vblk_notifications_total"] {
        let v = s.queue(name);
        assert!((1.0..=10.0).contains(&v), "{name} = {v}");
    }
    assert_eq!(s.get(r#"vblk_queue_info{export="metrics-test",queue="0",worker="0"}"#), 1.0);
    let slept = s.get(r#"vblk_worker_sleep_seconds_total{export="metrics-test",worker="0"}"#);
    let polled = s.get(r#"vblk_worker_poll_seconds_total{export="metrics-test",worker="0"}"#);
    assert!(slept > 0.0 && polled > 0.0, "sleep {slept} s, poll {polled} s");

    // Scraping does not count as I/O.
    assert_eq!(d.scrape().op("vblk_requests_total", "read"), 3);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_http_requests_get_error_statuses_and_the_daemon_keeps_serving() {
    let dir = tempdir("http");
    let d = Daemon::start(&dir, &["--name", "metrics-test"]);
    let a = d.metrics;
    assert_eq!(http(a, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").0, "HTTP/1.1 405 Method Not Allowed");
    assert_eq!(http(a, b"GET /other HTTP/1.1\r\n\r\n").0, "HTTP/1.1 404 Not Found");
    assert_eq!(http(a, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n").0, "HTTP/1.1 400 Bad Request");
    let mut huge = b"GET /metrics HTTP/1.1\r\nCookie: ".to_vec();
    huge.resize(64 << 10, b'x');
    // The responder stops reading at its limit and answers: the write may fail halfway.
    if let Ok(mut s) = TcpStream::connect(a) {
        let _ = s.write_all(&huge);
    }
    // A client that connects and says nothing does not block the next one for long.
    let silent = TcpStream::connect(a).unwrap();
    let t0 = Instant::now();
    let s = d.scrape();
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    drop(silent);
    assert_eq!(s.op("vblk_requests_total", "read"), 0);
    // The disk is served as before.
    ok(&d.tool(&["io", "read", "--length", "4k", "--file", "/dev/null"]));
    assert_eq!(d.scrape().op("vblk_requests_total", "read"), 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_metrics_port_in_use_is_refused_at_start() {
    let dir = tempdir("port");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let sock = dir.join("vblk.sock");
    let out = vblk()
        .args(["serve", "--size", "1M", "--metrics", &addr, "--socket"])
        .arg(&sock)
        .arg(dir.join("disk.img"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("vblk: error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains(&format!("cannot listen on {addr}")), "{stderr}");
    assert!(!sock.exists() && !dir.join("disk.img").exists(), "nothing created");
    // A bad --name is refused too.
    let out = vblk().args(["serve", "--backend", "null", "--name", "a\tb", "--socket"]).arg(&sock).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("export name"), "{out:?}");
    let _ = std::fs::remove_dir_all(dir);
}
