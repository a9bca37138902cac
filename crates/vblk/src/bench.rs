//! `vblk bench`: a small fio. One thread per virtqueue, each keeping `--iodepth` requests
//! in flight; per-request latency in an HDR histogram; CPU time of the whole process.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;
use vblk_driver::{IoBuf, Op, QueueHandle};

use crate::rng::{time_seed, Rng};
use crate::size::{human, parse_size};
use crate::target::{check_depth, parse_secs, Target, TargetArgs, Want};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential reads (each queue in its own region).
    Read,
    /// Sequential writes (each queue in its own region).
    Write,
    /// Random reads and writes (--rwmixread percent reads).
    Randrw,
}

impl Rw {
    fn name(self) -> &'static str {
        match self {
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randrw => "randrw",
        }
    }

    fn random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite | Rw::Randrw)
    }

    /// Percent of reads.
    fn read_percent(self, mix: u8) -> u64 {
        match self {
            Rw::Randread | Rw::Read => 100,
            Rw::Randwrite | Rw::Write => 0,
            Rw::Randrw => mix as u64,
        }
    }
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Workload.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    pub rw: Rw,
    /// Bytes per request (a multiple of the block size), e.g. 4k, 128k, 1M.
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    pub bs: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=32768))]
    pub iodepth: u32,
    /// Virtqueues, one thread each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,
    /// How long to run.
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = parse_secs)]
    pub seconds: f64,
    /// Reap completions by spinning on the used ring instead of sleeping on the eventfd.
    #[arg(long)]
    pub poll: bool,
    /// Reap at least this many completions per wait (fio's `iodepth_batch_complete_min`):
    /// the device is asked, through EVENT_IDX `used_event`, to interrupt once per batch.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=32768))]
    pub batch_complete: u32,
    /// randrw: percent of reads.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmixread: u8,
    /// Bytes of the disk to use, from offset 0 [default: the whole capacity].
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: TargetArgs,
}

/// What one thread does.
struct Job {
    random: bool,
    /// Percent of reads.
    read_pct: u64,
    bs: u64,
    iodepth: u32,
    /// Bytes `[start, start + len)` this thread's offsets fall in.
    start: u64,
    len: u64,
    seed: u64,
    poll: bool,
    batch_complete: u32,
    seconds: f64,
    done: Arc<AtomicU64>,
}

struct Outcome {
    /// When the last request completed.
    finished: Instant,
    hist: Histogram<u64>,
    ios: u64,
    errors: u64,
    first_error: Option<String>,
}

fn new_histogram() -> Result<Histogram<u64>> {
    // Nanoseconds, 1 ns .. 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).map_err(|e| anyhow!("histogram: {e}"))
}

/// Buffers for every request, filled with random bytes (what writes write).
fn buffers(q: &QueueHandle, job: &Job, rng: &mut Rng) -> Result<Vec<Option<IoBuf>>> {
    let mut pattern = vec![0u8; job.bs as usize];
    for chunk in pattern.chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    let mut bufs = Vec::with_capacity(job.iodepth as usize);
    for _ in 0..job.iodepth {
        let b = q.alloc(job.bs as u32)?;
        b.write_at(0, &pattern)?;
        bufs.push(Some(b));
    }
    Ok(bufs)
}

fn worker(mut q: QueueHandle, job: Job, go: Arc<Barrier>) -> Result<Outcome> {
    let mut rng = Rng::new(job.seed);
    q.set_poll_mode(job.poll);
    let setup = buffers(&q, &job, &mut rng).and_then(|b| Ok((b, new_histogram()?)));
    // Everyone meets at the barrier, even a thread whose setup failed.
    go.wait();
    let (mut bufs, mut hist) = setup?;
    let blocks = job.len / job.bs;
    let mut seq = 0u64;
    let mut next_op = |rng: &mut Rng| {
        let offset = if job.random {
            job.start + rng.below(blocks) * job.bs
        } else {
            let o = job.start + seq * job.bs;
            seq = (seq + 1) % blocks;
            o
        };
        let read = match job.read_pct {
            100 => true,
            0 => false,
            p => rng.percent(p),
        };
        if read {
            Op::Read { offset }
        } else {
            Op::Write { offset }
        }
    };
    let mut started = vec![Instant::now(); job.iodepth as usize];
    let (mut ios, mut errors, mut first_error) = (0u64, 0u64, None);
    let mut out = Vec::with_capacity(job.iodepth as usize);
    let deadline = Instant::now() + Duration::from_secs_f64(job.seconds);
    let now = Instant::now();
    for (i, b) in bufs.iter_mut().enumerate() {
        started[i] = now;
        q.submit(next_op(&mut rng), b.take(), i as u64)?;
    }
    q.kick()?;
    let mut stopping = false;
    while q.in_flight() > 0 {
        out.clear();
        let min = if stopping { 1 } else { job.batch_complete.min(job.iodepth) as usize };
        q.wait(&mut out, min)?;
        let now = Instant::now();
        stopping |= now >= deadline;
        let n = out.len() as u64;
        for c in out.drain(..) {
            let slot = c.user as usize;
            let lat = now.saturating_duration_since(started[slot]);
            hist.saturating_record(lat.as_nanos().clamp(1, u64::MAX as u128) as u64);
            ios += 1;
            if let Err(e) = c.result {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
            if !stopping {
                let buf = c.buf.ok_or_else(|| anyhow!("the driver lost an I/O buffer"))?;
                started[slot] = now;
                q.submit(next_op(&mut rng), Some(buf), c.user)?;
            }
        }
        job.done.fetch_add(n, Ordering::Relaxed);
        if !stopping {
            q.kick()?;
        }
    }
    Ok(Outcome { finished: Instant::now(), hist, ios, errors, first_error })
}

#[derive(Serialize)]
struct Latency {
    mean: f64,
    p50: f64,
    p99: f64,
    p99_9: f64,
    max: f64,
}

#[derive(Serialize)]
struct Report {
    target: String,
    rw: Rw,
    #[serde(skip_serializing_if = "Option::is_none")]
    rwmixread: Option<u8>,
    bs: u64,
    iodepth: u32,
    queues: u16,
    /// `split` or `packed`.
    ring: &'static str,
    size: u64,
    seconds: f64,
    poll: bool,
    batch_complete: u32,
    ios: u64,
    iops: f64,
    mib_s: f64,
    lat_us: Latency,
    cpu_us_per_io: f64,
    errors: u64,
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn progress(seconds: f64, done: &AtomicU64, bs: u64, finished: impl Fn() -> bool) {
    let bar = indicatif::ProgressBar::new((seconds * 10.0).ceil() as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:30} {msg}") {
        bar.set_style(style);
    }
    let start = Instant::now();
    let (mut last_t, mut last_n) = (start, 0u64);
    while !finished() {
        std::thread::sleep(Duration::from_millis(20));
        if last_t.elapsed() < Duration::from_millis(250) {
            continue;
        }
        let (now, n) = (Instant::now(), done.load(Ordering::Relaxed));
        let dt = now.duration_since(last_t).as_secs_f64().max(1e-9);
        let iops = (n - last_n) as f64 / dt;
        let el = now.duration_since(start).as_secs_f64();
        bar.set_position((el * 10.0) as u64);
        bar.set_message(format!(
            "{el:5.1}/{seconds}s {iops:>10.0} IOPS {:>9.1} MiB/s",
            iops * bs as f64 / (1 << 20) as f64
        ));
        (last_t, last_n) = (now, n);
    }
    bar.finish_and_clear();
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.bs == 0 || !args.bs.is_multiple_of(512) || args.bs > 64 << 20 {
        bail!("--bs must be a multiple of 512 bytes, at most 64M (got {})", args.bs);
    }
    let per_buf = args.bs.div_ceil(4096) * 4096;
    let want = Want {
        num_queues: args.queues,
        iodepth: args.iodepth,
        buffer_memory: args.queues as u64 * args.iodepth as u64 * per_buf + (1 << 20),
        temp_image: None,
        needs_storage: false,
    };
    let mut target = Target::open(&args.target, &want)?;
    let info = target.info().clone();
    let size = match args.size {
        Some(s) => {
            if let Some(c) = info.capacity.filter(|&c| s > c) {
                bail!("--size {s} is larger than the disk ({c} bytes)");
            }
            s
        }
        None => target.capacity("--size")?,
    };
    if !args.bs.is_multiple_of(info.block_size as u64) {
        bail!("--bs {} is not a multiple of the block size {}", args.bs, info.block_size);
    }
    if info.size_max != 0 && args.bs > info.size_max as u64 {
        bail!("--bs {} is larger than the device's size_max {}", args.bs, info.size_max);
    }
    if info.readonly && args.rw.read_percent(args.rwmixread) < 100 {
        bail!("the device is read-only: use --rw read or randread");
    }
    let queues = target.take_queues();
    let nq = queues.len() as u16;
    if nq < args.queues && !args.json {
        eprintln!("vblk: the backend offers only {nq} queue(s); using {nq}");
    }
    for q in &queues {
        check_depth(q, args.iodepth)?;
    }
    let per_thread = (size / nq as u64) / args.bs * args.bs;
    if per_thread == 0 || size < args.bs {
        bail!("--size {size} leaves less than one block of {} bytes per queue", args.bs);
    }
    let seed = time_seed();
    let done = Arc::new(AtomicU64::new(0));
    let go = Arc::new(Barrier::new(nq as usize + 1));
    let mut handles = Vec::new();
    for (i, q) in queues.into_iter().enumerate() {
        let (start, len) =
            if args.rw.random() { (0, size / args.bs * args.bs) } else { (i as u64 * per_thread, per_thread) };
        let job = Job {
            random: args.rw.random(),
            read_pct: args.rw.read_percent(args.rwmixread),
            bs: args.bs,
            iodepth: args.iodepth,
            start,
            len,
            seed: seed.wrapping_add(i as u64 * 0x1000_0000_0001),
            poll: args.poll,
            batch_complete: args.batch_complete,
            seconds: args.seconds,
            done: Arc::clone(&done),
        };
        let go = Arc::clone(&go);
        let h = std::thread::Builder::new()
            .name(format!("bench-q{i}"))
            .spawn(move || worker(q, job, go))
            .context("cannot start a thread")?;
        handles.push(h);
    }
    go.wait();
    let (t0, cpu0) = (Instant::now(), cpu_time());
    if std::io::stderr().is_terminal() {
        progress(args.seconds, &done, args.bs, || handles.iter().all(|h| h.is_finished()));
    }
    let mut hist = new_histogram()?;
    let (mut ios, mut errors, mut first_error, mut failure) = (0, 0, None, None);
    let mut end = t0;
    for h in handles {
        match h.join() {
            Ok(Ok(o)) => {
                end = end.max(o.finished);
                hist.add(&o.hist).map_err(|e| anyhow!("histogram: {e:?}"))?;
                ios += o.ios;
                errors += o.errors;
                first_error = first_error.or(o.first_error);
            }
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(_) => failure = failure.or(Some(anyhow!("a benchmark thread panicked"))),
        }
    }
    let cpu = cpu_time().saturating_sub(cpu0);
    let elapsed = end.duration_since(t0).as_secs_f64().max(1e-9);
    if let Some(e) = failure {
        return Err(e);
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    let r = Report {
        target: target.label.clone(),
        rw: args.rw,
        rwmixread: (args.rw == Rw::Randrw).then_some(args.rwmixread),
        bs: args.bs,
        iodepth: args.iodepth,
        queues: nq,
        ring: info.ring.name(),
        size,
        seconds: elapsed,
        poll: args.poll,
        batch_complete: args.batch_complete,
        ios,
        iops: ios as f64 / elapsed,
        mib_s: (ios * args.bs) as f64 / elapsed / (1 << 20) as f64,
        lat_us: Latency {
            mean: hist.mean() / 1000.0,
            p50: us(hist.value_at_quantile(0.5)),
            p99: us(hist.value_at_quantile(0.99)),
            p99_9: us(hist.value_at_quantile(0.999)),
            max: us(hist.max()),
        },
        cpu_us_per_io: if ios == 0 { 0.0 } else { cpu.as_secs_f64() * 1e6 / ios as f64 },
        errors,
    };
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print_human(&r, target.loopback, first_error.as_deref());
    }
    target.close();
    Ok(())
}

fn print_human(r: &Report, loopback: bool, first_error: Option<&str>) {
    let mix = r.rwmixread.map_or(String::new(), |m| format!(" ({m}% reads)"));
    println!(
        "{}{mix}, bs {}, iodepth {}, {} {} queue{}, {:.1} s, {} ({})",
        r.rw.name(),
        human(r.bs),
        r.iodepth,
        r.queues,
        r.ring,
        if r.queues == 1 { "" } else { "s" },
        r.seconds,
        if r.poll { "polling" } else { "interrupts" },
        r.target
    );
    println!("  IOPS        {:.0}", r.iops);
    println!("  bandwidth   {:.1} MiB/s", r.mib_s);
    let l = &r.lat_us;
    println!(
        "  latency     mean {:.1} us, p50 {:.1}, p99 {:.1}, p99.9 {:.1}, max {:.1}",
        l.mean, l.p50, l.p99, l.p99_9, l.max
    );
    println!(
        "  CPU         {:.2} us per I/O (user+sys of this process{})",
        r.cpu_us_per_io,
        if loopback { ", including the in-process device" } else { "" }
    );
    match first_error {
        Some(e) => println!("  errors      {} of {} I/Os (first: {e})", r.errors, r.ios),
        None => println!("  errors      0 of {} I/Os", r.ios),
    }
}
