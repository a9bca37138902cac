//! libblkio's virtio-blk-vhost-user driver as a benchmark client: the peer of `vblk bench`
//! (`bench/compare.py` runs every backend case with both clients, and compares the two clients
//! against the same backend in case 7). Same workloads, same report, a driver vblk did not write.
//!
//! ```sh
//! cargo run --release -p vblk --example blkio_bench -- SOCKET [SECONDS] [IODEPTH] [MIN] [--poll]
//!     [--rw randread|randwrite|read|write] [--bs 4k] [--queues N]
//! ```
//! - IODEPTH: requests in flight per queue (default 32).
//! - MIN: completions to wait for per `do_io` (like `vblk bench --batch-complete`), default 1.
//! - `--poll`: poll queues (libblkio spins in `do_io`) instead of sleeping on the call eventfd.
//! - `--rw` (default randread), `--bs` (default 4k; k/M suffixes), `--queues` (default 1, one
//!   thread per queue; sequential workloads give each queue its own region of the disk, as
//!   `vblk bench` does).
//!
//! Prints one JSON object with `vblk bench --json`'s fields: `iops`, `mib_s`, `ios`, `errors`,
//! `lat_us` (`mean`, `p50`, `p99`, `p99_9`, `max`: per request, from queueing it to `do_io`
//! returning its completion), `cpu_us_per_io` (user + system CPU of the whole process,
//! `getrusage(RUSAGE_SELF)`, over the run, per I/O), and the workload (`rw`, `bs`, `iodepth`,
//! `queues`, `poll`, `min`, `seconds`).

use std::mem::MaybeUninit;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use hdrhistogram::Histogram;

type Error = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "usage: blkio_bench SOCKET [SECONDS] [IODEPTH] [MIN] [--poll] \
                     [--rw randread|randwrite|read|write] [--bs SIZE] [--queues N]";

fn cpu_seconds() -> f64 {
    let mut ru = MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    // SAFETY: initialised by getrusage (or still zeroed).
    let ru = unsafe { ru.assume_init() };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn parse_size(s: &str) -> Result<usize, Error> {
    let s = s.trim().to_ascii_lowercase();
    let s = s.strip_suffix('b').unwrap_or(&s);
    let s = s.strip_suffix('i').unwrap_or(s);
    let (num, mult) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    Ok(num.parse::<usize>().map_err(|e| format!("size {s:?}: {e}"))? * mult)
}

#[derive(Clone, Copy, PartialEq)]
enum Rw {
    Randread,
    Randwrite,
    Read,
    Write,
}

impl Rw {
    fn parse(s: &str) -> Result<Rw, Error> {
        Ok(match s {
            "randread" => Rw::Randread,
            "randwrite" => Rw::Randwrite,
            "read" => Rw::Read,
            "write" => Rw::Write,
            _ => return Err(format!("--rw {s}: randread, randwrite, read or write").into()),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Read => "read",
            Rw::Write => "write",
        }
    }

    fn random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite)
    }

    fn reads(self) -> bool {
        matches!(self, Rw::Randread | Rw::Read)
    }
}

struct Opts {
    socket: String,
    seconds: f64,
    depth: usize,
    min: usize,
    poll: bool,
    rw: Rw,
    bs: usize,
    queues: usize,
}

fn parse_args() -> Result<Opts, Error> {
    let mut args = std::env::args().skip(1);
    let (mut pos, mut poll, mut rw, mut bs, mut queues) = (Vec::new(), false, Rw::Randread, 4096, 1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value; {USAGE}"));
        match a.as_str() {
            "--poll" => poll = true,
            "--rw" => rw = Rw::parse(&value()?)?,
            "--bs" => bs = parse_size(&value()?)?,
            "--queues" => queues = value()?.parse()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ if a.starts_with("--") => return Err(format!("unknown option {a}; {USAGE}").into()),
            _ => pos.push(a),
        }
    }
    let socket = pos.first().cloned().ok_or(USAGE)?;
    let seconds: f64 = pos.get(1).map_or(Ok(5.0), |s| s.parse())?;
    let depth: usize = pos.get(2).map_or(Ok(32), |s| s.parse())?;
    let min: usize = pos.get(3).map_or(Ok(1), |s| s.parse())?;
    if pos.len() > 4 {
        return Err(USAGE.into());
    }
    if depth == 0 || queues == 0 || bs == 0 || !bs.is_multiple_of(512) {
        return Err(format!("IODEPTH and --queues must be > 0, --bs a multiple of 512; {USAGE}").into());
    }
    Ok(Opts { socket, seconds, depth, min, poll, rw, bs, queues })
}

/// What one queue's thread does: `depth` requests in flight on `[start, start + len)`.
struct Job {
    rw: Rw,
    bs: usize,
    depth: usize,
    min: usize,
    start: u64,
    len: u64,
    /// This queue's buffers: `depth` of `bs` bytes each, in the mapped memory region.
    buf_addr: usize,
    seed: u64,
    seconds: f64,
}

struct Outcome {
    hist: Histogram<u64>,
    ios: u64,
    errors: u64,
    finished: Instant,
}

fn new_histogram() -> Result<Histogram<u64>, Error> {
    // Nanoseconds, 1 ns .. 100 s, 3 significant digits (as `vblk bench`).
    Ok(Histogram::new_with_bounds(1, 100_000_000_000, 3)?)
}

fn worker(mut q: Blkioq, job: Job, go: Arc<Barrier>) -> Result<Outcome, Error> {
    let hist = new_histogram();
    go.wait();
    let mut hist = hist?;
    let blocks = (job.len / job.bs as u64).max(1);
    let mut rng = job.seed | 1;
    let mut seq = 0u64;
    let mut next_offset = || {
        let block = if job.rw.random() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        } else {
            let b = seq;
            seq = (seq + 1) % blocks;
            b
        };
        job.start + block * job.bs as u64
    };
    let submit = |q: &mut Blkioq, offset: u64, slot: usize| {
        let buf = job.buf_addr + slot * job.bs;
        if job.rw.reads() {
            q.read(offset, buf as *mut u8, job.bs, slot, ReqFlags::empty());
        } else {
            q.write(offset, buf as *const u8, job.bs, slot, ReqFlags::empty());
        }
    };
    let now = Instant::now();
    let mut started = vec![now; job.depth];
    for slot in 0..job.depth {
        submit(&mut q, next_offset(), slot);
    }
    let mut in_flight = job.depth;
    let mut comps: Vec<MaybeUninit<Completion>> = (0..job.depth).map(|_| MaybeUninit::uninit()).collect();
    let (mut ios, mut errors) = (0u64, 0u64);
    let deadline = now + Duration::from_secs_f64(job.seconds);
    let mut stopping = false;
    while in_flight > 0 {
        let mut timeout = Duration::from_secs(10);
        let min = if stopping { 1 } else { job.min.min(in_flight) };
        let n = q.do_io(&mut comps, min, Some(&mut timeout), None)?;
        if n == 0 && min > 0 {
            return Err(format!("no completion within 10 s ({in_flight} requests in flight)").into());
        }
        let now = Instant::now();
        stopping |= now >= deadline;
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            let lat = now.saturating_duration_since(started[slot]);
            hist.saturating_record(lat.as_nanos().clamp(1, u64::MAX as u128) as u64);
            ios += 1;
            errors += (c.ret != 0) as u64;
            if stopping {
                in_flight -= 1;
            } else {
                started[slot] = now;
                submit(&mut q, next_offset(), slot);
            }
        }
    }
    Ok(Outcome { hist, ios, errors, finished: Instant::now() })
}

fn main() -> Result<(), Error> {
    let o = parse_args()?;
    let mut b = Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", &o.socket)?;
    b.connect()?;
    let nq = o.queues as i32;
    b.set_i32("num-queues", if o.poll { 0 } else { nq })?;
    b.set_i32("num-poll-queues", if o.poll { nq } else { 0 })?;
    if o.depth > 256 {
        // libblkio's default queue size is 256.
        b.set_i32("queue-size", o.depth.next_power_of_two() as i32)?;
    }
    let started = b.start()?;
    let queues = if o.poll { started.poll_queues } else { started.queues };
    if queues.len() != o.queues {
        return Err(format!("asked for {} queues, got {}", o.queues, queues.len()).into());
    }
    let capacity = b.get_u64("capacity")?;
    let bs = o.bs as u64;
    let per_queue = capacity / o.queues as u64 / bs * bs;
    if per_queue == 0 {
        return Err(format!("the disk ({capacity} bytes) is smaller than one block per queue").into());
    }
    let region = b.alloc_mem_region(o.bs * o.depth * o.queues)?;
    b.map_mem_region(&region)?;
    if !o.rw.reads() {
        // What writes write: a non-zero pattern.
        // SAFETY: the region is ours, mapped, `region.len` bytes long, and no request is queued yet.
        unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0x5a, region.len) };
    }

    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        ^ 0x9e37_79b9_7f4a_7c15;
    let go = Arc::new(Barrier::new(o.queues + 1));
    let mut handles = Vec::new();
    for (i, q) in queues.into_iter().enumerate() {
        let (start, len) = if o.rw.random() { (0, capacity / bs * bs) } else { (i as u64 * per_queue, per_queue) };
        let job = Job {
            rw: o.rw,
            bs: o.bs,
            depth: o.depth,
            min: o.min.max(1),
            start,
            len,
            buf_addr: region.addr + i * o.bs * o.depth,
            seed: seed.wrapping_add(i as u64 * 0x1000_0000_0001),
            seconds: o.seconds,
        };
        let go = Arc::clone(&go);
        handles.push(std::thread::Builder::new().name(format!("blkio-q{i}")).spawn(move || worker(q, job, go))?);
    }
    go.wait();
    let (t0, cpu0) = (Instant::now(), cpu_seconds());
    let mut hist = new_histogram()?;
    let (mut ios, mut errors, mut end, mut failure) = (0u64, 0u64, t0, None);
    for h in handles {
        match h.join() {
            Ok(Ok(r)) => {
                hist.add(&r.hist).map_err(|e| format!("histogram: {e:?}"))?;
                ios += r.ios;
                errors += r.errors;
                end = end.max(r.finished);
            }
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(_) => failure = failure.or(Some("a benchmark thread panicked".into())),
        }
    }
    let cpu = cpu_seconds() - cpu0;
    if let Some(e) = failure {
        return Err(e);
    }
    let elapsed = end.duration_since(t0).as_secs_f64().max(1e-9);
    let us = |ns: u64| ns as f64 / 1000.0;
    let report = serde_json::json!({
        "client": "libblkio",
        "rw": o.rw.name(),
        "bs": o.bs,
        "iodepth": o.depth,
        "queues": o.queues,
        "seconds": elapsed,
        "poll": o.poll,
        "min": o.min,
        "ios": ios,
        "iops": ios as f64 / elapsed,
        "mib_s": (ios * bs) as f64 / elapsed / (1 << 20) as f64,
        "lat_us": {
            "mean": hist.mean() / 1000.0,
            "p50": us(hist.value_at_quantile(0.5)),
            "p99": us(hist.value_at_quantile(0.99)),
            "p99_9": us(hist.value_at_quantile(0.999)),
            "max": us(hist.max()),
        },
        "cpu_us_per_io": if ios == 0 { 0.0 } else { cpu * 1e6 / ios as f64 },
        "errors": errors,
    });
    println!("{report}");
    Ok(())
}
