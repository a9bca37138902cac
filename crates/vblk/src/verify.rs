//! `vblk verify`: a data-integrity workload checked against an in-memory model of the
//! region. Writes carry content derived from (seed, op id, block), so the model only
//! remembers which op last wrote each block; discarded blocks become "unknown" (not
//! checked until rewritten), write-zeroes make them zero. Requests never overlap while
//! in flight. A final read-back checks the whole region.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde::Serialize;
use vblk_driver::{Completion, IoBuf, Op, QueueHandle};
use vblk_virtio::blk::features as blkf;

use crate::rng::{time_seed, Rng};
use crate::size::{human, parse_size};
use crate::target::{check_depth, Target, TargetArgs, Want};

mod model;
use model::{block_data, Counts, Kind, Mismatch, Planned, State, UNKNOWN};

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Operations to run (before the final read-back).
    #[arg(long, default_value_t = 10000)]
    pub ops: u64,
    /// Virtqueues, one thread each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub iodepth: u32,
    /// Seed of the workload and of the data [default: from the clock; printed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Bytes from offset 0 to test (capped at the capacity). Their content is destroyed.
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    pub region: u64,
    /// Largest request.
    #[arg(long, value_parser = parse_size, default_value = "128k")]
    pub max_io: u64,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: TargetArgs,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn submit(q: &mut QueueHandle, p: &Planned, bs: u64, seed: u64) -> Result<()> {
    let (offset, len) = (p.block * bs, p.nblocks * bs);
    let (op, buf) = match p.kind {
        Kind::Read => (Op::Read { offset }, Some(q.alloc(len as u32)?)),
        Kind::Write => {
            let mut data = vec![0u8; len as usize];
            for (i, c) in data.chunks_mut(bs as usize).enumerate() {
                block_data(seed, p.id, p.block + i as u64, c);
            }
            let b = q.alloc(len as u32)?;
            b.write_at(0, &data)?;
            (Op::Write { offset }, Some(b))
        }
        Kind::Flush => (Op::Flush, None),
        Kind::Discard => (Op::Discard { offset, len }, None),
        Kind::WriteZeroes { unmap } => (Op::WriteZeroes { offset, len, unmap }, None),
    };
    q.submit(op, buf, p.id)?;
    Ok(())
}

fn worker(mut q: QueueHandle, shared: &Shared, iodepth: usize) -> Result<QueueHandle> {
    let (bs, seed) = {
        let st = shared.lock();
        (st.bs, st.seed)
    };
    let mut mine: HashMap<u64, Planned> = HashMap::new();
    let mut pending: Option<Planned> = None;
    let mut out: Vec<Completion> = Vec::new();
    loop {
        let mut batch = Vec::new();
        {
            let mut st = shared.lock();
            if st.stop {
                pending = None;
            }
            while q.in_flight() + batch.len() < iodepth {
                let Some(p) = pending.take().or_else(|| st.plan()) else { break };
                if st.overlaps(&p) {
                    pending = Some(p);
                    break;
                }
                if p.kind != Kind::Flush {
                    st.in_flight.push((p.block, p.nblocks));
                }
                batch.push(p);
            }
        }
        for p in &batch {
            submit(&mut q, p, bs, seed)?;
            mine.insert(p.id, *p);
        }
        if !batch.is_empty() {
            q.kick()?;
        }
        if q.in_flight() == 0 {
            if pending.is_none() {
                return Ok(q);
            }
            // Blocked by another queue's request: wait for it to complete.
            let st = shared.lock();
            let _ = shared.changed.wait_timeout(st, Duration::from_millis(5));
            continue;
        }
        out.clear();
        if let Err(e) = q.wait(&mut out, 1) {
            shared.lock().stop = true;
            shared.changed.notify_all();
            return Err(e.into());
        }
        let mut done = Vec::with_capacity(out.len());
        for c in out.drain(..) {
            let p = mine.remove(&c.user).ok_or_else(|| anyhow!("completion for an unknown request {}", c.user))?;
            let data = match (&c.buf, p.kind, c.result) {
                (Some(b), Kind::Read, Ok(())) => Some(b.to_vec()?),
                _ => None,
            };
            done.push((p, c.result.map_err(|e| e.to_string()), data));
        }
        let mut st = shared.lock();
        for (p, r, data) in done {
            st.complete(p, r, data.as_deref());
        }
        drop(st);
        shared.changed.notify_all();
    }
}

/// Read the whole region back (after a flush) and check it.
fn read_back(q: &mut QueueHandle, st: &mut State, chunk_blocks: u64) -> Result<u64> {
    let total = st.model.len() as u64;
    let mut checked = 0;
    let mut block = 0;
    let mut out = Vec::new();
    if st.flush {
        q.submit(Op::Flush, None, 0)?;
        q.kick()?;
        q.wait(&mut out, 1)?;
        let r = out.pop().map_or(Err("no completion".into()), |c| c.result.map_err(|e| e.to_string()));
        st.complete(Planned { id: st.planned, kind: Kind::Flush, block: 0, nblocks: 0 }, r, None);
    }
    let mut buf: Option<IoBuf> = None;
    while block < total && st.mismatch.is_none() {
        let n = chunk_blocks.min(total - block);
        let len = (n * st.bs) as u32;
        let mut b = match buf.take() {
            Some(b) => b,
            None => q.alloc(len)?,
        };
        b.set_len(len)?;
        q.submit(Op::Read { offset: block * st.bs }, Some(b), 0)?;
        q.kick()?;
        out.clear();
        q.wait(&mut out, 1)?;
        let c = out.pop().ok_or_else(|| anyhow!("the read-back request did not complete"))?;
        if let Err(e) = c.result {
            bail!("read-back at offset {} failed: {e}", block * st.bs);
        }
        let b = c.buf.ok_or_else(|| anyhow!("the driver lost the read-back buffer"))?;
        let data = b.to_vec()?;
        if let Some(m) = st.check(block, &data, "the final read-back") {
            st.mismatch = Some(m);
        }
        checked += st.model[block as usize..(block + n) as usize].iter().filter(|&&s| s != UNKNOWN).count() as u64;
        buf = Some(b);
        block += n;
    }
    Ok(checked * st.bs)
}

#[derive(Serialize)]
struct Report {
    target: String,
    result: &'static str,
    seed: u64,
    region: u64,
    block_size: u64,
    queues: u16,
    /// `split` or `packed`.
    ring: &'static str,
    iodepth: u32,
    ops: u64,
    counts: Counts,
    bytes: Counts,
    /// Bytes of the final read-back the model could check (None: skipped after a mismatch).
    readback_checked_bytes: Option<u64>,
    skipped: Vec<&'static str>,
    errors: u64,
    first_error: Option<String>,
    mismatch: Option<Mismatch>,
    seconds: f64,
}

pub fn run(args: VerifyArgs) -> Result<()> {
    let seed = args.seed.unwrap_or_else(time_seed);
    let max_io = args.max_io.max(512).next_multiple_of(512);
    let want = Want {
        num_queues: args.queues,
        iodepth: args.iodepth,
        buffer_memory: args.queues as u64 * args.iodepth as u64 * max_io.next_multiple_of(4096) + (2 << 20),
        temp_image: Some(args.region.max(1 << 20).next_multiple_of(512)),
        needs_storage: true,
    };
    let mut target = Target::open(&args.target, &want)?;
    let info = target.info().clone();
    if info.readonly {
        bail!("the device is read-only; verify needs to write");
    }
    let bs = info.block_size as u64;
    let capacity = target.capacity("--region (smaller than the disk)")?;
    let region = args.region.min(capacity) / bs * bs;
    if region == 0 {
        bail!("the region is smaller than one block");
    }
    let mut rw_max = max_io.max(bs) / bs;
    if info.size_max != 0 {
        rw_max = rw_max.min((info.size_max as u64 / bs).max(1));
    }
    let limit = |negotiated: bool, sectors: u32| match (negotiated, sectors) {
        (false, _) => 0,
        (true, 0) => rw_max,
        (true, s) => (s as u64 * 512 / bs).clamp(1, rw_max),
    };
    let discard = limit(info.has(blkf::DISCARD) && info.max_discard_seg > 0, info.max_discard_sectors);
    let wz = limit(info.has(blkf::WRITE_ZEROES) && info.max_write_zeroes_seg > 0, info.max_write_zeroes_sectors);
    let mut skipped = Vec::new();
    for (cond, name) in [(info.has(blkf::FLUSH), "flush"), (discard > 0, "discard"), (wz > 0, "write_zeroes")] {
        if !cond {
            skipped.push(name);
        }
    }
    let queues = target.take_queues();
    for q in &queues {
        check_depth(q, args.iodepth)?;
    }
    let nq = queues.len() as u16;
    if !args.json {
        println!(
            "verify: seed {seed} (reproduce with --seed {seed}), region {}, {} ops, {nq} {} queue{} x iodepth {}, block {bs} ({})",
            human(region),
            args.ops,
            info.ring,
            if nq == 1 { "" } else { "s" },
            args.iodepth,
            target.label
        );
        for s in &skipped {
            println!("  {s}: not negotiated, skipped");
        }
    }
    let shared = Shared {
        state: Mutex::new(State {
            bs,
            seed,
            model: vec![UNKNOWN; (region / bs) as usize],
            in_flight: Vec::new(),
            rng: Rng::new(seed),
            planned: 0,
            total: args.ops,
            max_blocks: [rw_max, discard, wz],
            flush: info.has(blkf::FLUSH),
            may_unmap: info.write_zeroes_may_unmap,
            counts: Counts::default(),
            bytes: Counts::default(),
            errors: 0,
            first_error: None,
            mismatch: None,
            stop: false,
        }),
        changed: Condvar::new(),
    };
    let start = Instant::now();
    let results: Vec<Result<QueueHandle>> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .into_iter()
            .map(|q| {
                let sh = &shared;
                s.spawn(move || worker(q, sh, args.iodepth as usize))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("a verify thread panicked")))).collect()
    });
    let mut queues = Vec::new();
    for r in results {
        queues.push(r?);
    }
    let mut st = shared.state.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut checked = None;
    if st.mismatch.is_none() {
        let q = queues.first_mut().ok_or_else(|| anyhow!("the device has no queue"))?;
        let chunk = if info.size_max != 0 { (1u64 << 20).min(info.size_max as u64) } else { 1 << 20 };
        checked = Some(read_back(q, &mut st, (chunk / bs).max(1)).context("final read-back")?);
    }
    let ok = st.mismatch.is_none() && st.errors == 0;
    let r = Report {
        target: target.label.clone(),
        result: if ok { "OK" } else { "FAIL" },
        seed,
        region,
        block_size: bs,
        queues: nq,
        ring: info.ring.name(),
        iodepth: args.iodepth,
        ops: st.planned,
        counts: st.counts,
        bytes: st.bytes,
        readback_checked_bytes: checked,
        skipped,
        errors: st.errors,
        first_error: st.first_error.clone(),
        mismatch: st.mismatch.clone(),
        seconds: start.elapsed().as_secs_f64(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print_human(&r);
    }
    drop(queues);
    target.close();
    match (&r.mismatch, r.errors) {
        (Some(m), _) => bail!("data mismatch at offset {} (seed {seed})", m.offset),
        (None, 0) => Ok(()),
        (None, n) => bail!("{n} request(s) failed (seed {seed})"),
    }
}

fn print_human(r: &Report) {
    let (c, b) = (&r.counts, &r.bytes);
    println!(
        "  ops         write {} ({}), read {} ({}), flush {}, discard {} ({}), write-zeroes {} ({})",
        c.write,
        human(b.write),
        c.read,
        human(b.read),
        c.flush,
        c.discard,
        human(b.discard),
        c.write_zeroes,
        human(b.write_zeroes)
    );
    match r.readback_checked_bytes {
        Some(b) => {
            println!("  read-back   {} checked of {} (the rest never written, or discarded)", human(b), human(r.region))
        }
        None => println!("  read-back   skipped"),
    }
    match &r.first_error {
        Some(e) => println!("  errors      {} (first: {e})", r.errors),
        None => println!("  errors      0"),
    }
    if let Some(m) = &r.mismatch {
        println!("  MISMATCH at offset {} ({:#x}), seen by {}; block {}", m.offset, m.offset, m.during, m.model);
        println!("    expected  {}", m.expected);
        println!("    found     {}", m.found);
    }
    println!("  result      {} ({:.1} s)", r.result, r.seconds);
}
