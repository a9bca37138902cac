//! A minimal libblkio random-read client, the peer of `vblk bench` for the client-cost
//! comparison (performance case 7): same workload, same backend, different driver.
//!
//! ```sh
//! cargo run --release -p vblk --example blkio_bench -- SOCKET [SECONDS] [IODEPTH] [MIN] [--poll]
//! ```
//! MIN: completions to wait for per `do_io` (like `vblk bench --batch-complete`), default 1.
//! Prints one JSON object: `{"iops": .., "cpu_us_per_io": .., "ios": .., "errors": ..}`.

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};

const BS: usize = 4096;

fn cpu_seconds() -> f64 {
    let mut ru = MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    // SAFETY: initialised by getrusage (or still zeroed).
    let ru = unsafe { ru.assume_init() };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let poll = args.iter().any(|a| a == "--poll");
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let socket = pos.first().ok_or("usage: blkio_bench SOCKET [SECONDS] [IODEPTH] [MIN] [--poll]")?;
    let seconds: f64 = pos.get(1).map_or(Ok(5.0), |s| s.parse())?;
    let depth: usize = pos.get(2).map_or(Ok(32), |s| s.parse())?;
    let min: usize = pos.get(3).map_or(Ok(1), |s| s.parse())?;

    let mut b = Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", socket)?;
    b.connect()?;
    b.set_i32("num-queues", if poll { 0 } else { 1 })?;
    b.set_i32("num-poll-queues", if poll { 1 } else { 0 })?;
    let started = b.start()?;
    let mut q = if poll { started.poll_queues } else { started.queues }.into_iter().next().ok_or("no queue")?;
    let capacity = b.get_u64("capacity")?;
    let blocks = (capacity / BS as u64).max(1);
    let region = b.alloc_mem_region(BS * depth)?;
    b.map_mem_region(&region)?;

    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next_offset = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % blocks) * BS as u64
    };
    for i in 0..depth {
        q.read(next_offset(), (region.addr + i * BS) as *mut u8, BS, i, ReqFlags::empty());
    }
    let mut comps: Vec<MaybeUninit<Completion>> = (0..depth).map(|_| MaybeUninit::uninit()).collect();
    let (mut ios, mut errors) = (0u64, 0u64);
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        let mut timeout = Duration::from_secs(10);
        let n = q.do_io(&mut comps, min.min(depth), Some(&mut timeout), None)?;
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_ref() };
            ios += 1;
            errors += (c.ret != 0) as u64;
            let slot = c.user_data;
            q.read(next_offset(), (region.addr + slot * BS) as *mut u8, BS, slot, ReqFlags::empty());
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    println!(
        "{{\"iops\": {:.1}, \"cpu_us_per_io\": {:.3}, \"ios\": {ios}, \"errors\": {errors}, \"poll\": {poll}, \"min\": {min}}}",
        ios as f64 / elapsed,
        cpu * 1e6 / ios.max(1) as f64
    );
    Ok(())
}
