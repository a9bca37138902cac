//! `vblk io read|write`: one dd-like transfer between a file (or stdin/stdout) and the
//! device, split into requests the device accepts.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use vblk_driver::{Op, QueueHandle};

use crate::size::parse_size;
use crate::target::{Target, TargetArgs, Want};

#[derive(Subcommand, Debug)]
pub enum IoCommand {
    /// Read --length bytes at --offset into --file (or stdout).
    Read(IoArgs),
    /// Write --length bytes from --file (or stdin) at --offset; the input must hold them all.
    /// Flushes afterwards when the device has a write cache.
    Write(IoArgs),
}

#[derive(Args, Debug)]
pub struct IoArgs {
    /// Byte offset on the disk (a multiple of 512), e.g. 1M.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    pub offset: u64,
    /// Bytes to transfer (a multiple of 512), e.g. 4k.
    #[arg(long, value_parser = parse_size)]
    pub length: u64,
    /// File to write (read) or read (write) the data to (from) [default: stdout / stdin].
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Print one JSON object instead of a summary line (to stderr when the data goes to stdout).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: TargetArgs,
}

/// Largest transfer `vblk io` handles (it holds the data in memory).
const MAX_LENGTH: u64 = 1 << 30;
/// Bytes per request, unless the device's size_max is smaller.
const CHUNK: u64 = 1 << 20;

#[derive(Serialize)]
struct Report {
    op: &'static str,
    offset: u64,
    length: u64,
    requests: u64,
    flushed: bool,
    seconds: f64,
}

fn one(q: &mut QueueHandle, op: Op, buf: Option<vblk_driver::IoBuf>) -> Result<Option<vblk_driver::IoBuf>> {
    q.submit(op, buf, 0)?;
    q.kick()?;
    let mut out = Vec::with_capacity(1);
    q.wait(&mut out, 1)?;
    let c = out.pop().ok_or_else(|| anyhow!("the request did not complete"))?;
    c.result.map_err(|e| anyhow!("{e}"))?;
    Ok(c.buf)
}

pub fn run(cmd: IoCommand) -> Result<()> {
    let (write, args) = match cmd {
        IoCommand::Read(a) => (false, a),
        IoCommand::Write(a) => (true, a),
    };
    if args.length == 0 || args.length % 512 != 0 || args.offset % 512 != 0 {
        bail!("--offset and --length must be multiples of 512 bytes (and --length non-zero)");
    }
    if args.length > MAX_LENGTH {
        bail!("--length is limited to 1G per command (use `vblk bench` for bulk I/O)");
    }
    // The input first: a short input must not leave a partial write behind.
    let data = if write { Some(read_input(&args)?) } else { None };

    let want = Want { num_queues: 1, iodepth: 1, buffer_memory: 2 * CHUNK, temp_image: None, needs_storage: false };
    let mut target = Target::open(&args.target, &want)?;
    let info = target.info().clone();
    let bs = info.block_size as u64;
    if args.offset % bs != 0 || args.length % bs != 0 {
        bail!("--offset and --length must be multiples of the block size {bs}");
    }
    if let Some(cap) = info.capacity {
        if args.offset.checked_add(args.length).is_none_or(|end| end > cap) {
            bail!("{} bytes at offset {} go past the end of the disk ({cap} bytes)", args.length, args.offset);
        }
    }
    if write && info.readonly {
        bail!("the device is read-only");
    }
    let mut chunk = CHUNK;
    if info.size_max != 0 {
        chunk = chunk.min(info.size_max as u64 / bs * bs).max(bs);
    }
    let mut q = target.take_queues().pop().ok_or_else(|| anyhow!("the device has no queue"))?;

    let start = Instant::now();
    let mut output: Option<Box<dyn Write>> = if write {
        None
    } else {
        Some(match &args.file {
            Some(p) => Box::new(std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?),
            None => Box::new(std::io::stdout().lock()),
        })
    };
    let mut done = 0u64;
    let mut requests = 0u64;
    while done < args.length {
        let n = chunk.min(args.length - done);
        let offset = args.offset + done;
        let buf = q.alloc(n as u32)?;
        if let Some(d) = &data {
            buf.write_at(0, &d[done as usize..(done + n) as usize])?;
            one(&mut q, Op::Write { offset }, Some(buf)).with_context(|| format!("write at offset {offset} failed"))?;
        } else {
            let b = one(&mut q, Op::Read { offset }, Some(buf))
                .with_context(|| format!("read at offset {offset} failed"))?;
            let b = b.ok_or_else(|| anyhow!("the driver lost the read buffer"))?;
            if let Some(out) = output.as_mut() {
                out.write_all(&b.to_vec()?).context("cannot write the output")?;
            }
        }
        done += n;
        requests += 1;
    }
    let mut flushed = false;
    if write && info.has(vblk_virtio::blk::features::FLUSH) {
        one(&mut q, Op::Flush, None).context("flush failed")?;
        flushed = true;
    }
    if let Some(mut out) = output.take() {
        out.flush().context("cannot write the output")?;
    }
    let r = Report {
        op: if write { "write" } else { "read" },
        offset: args.offset,
        length: args.length,
        requests,
        flushed,
        seconds: start.elapsed().as_secs_f64(),
    };
    let data_on_stdout = !write && args.file.is_none();
    if args.json {
        let j = serde_json::to_string(&r)?;
        if data_on_stdout {
            eprintln!("{j}");
        } else {
            println!("{j}");
        }
    } else {
        eprintln!(
            "vblk: {} {} bytes at offset {} ({} request{}{}) in {:.1} ms",
            if write { "wrote" } else { "read" },
            r.length,
            r.offset,
            requests,
            if requests == 1 { "" } else { "s" },
            if flushed { ", flushed" } else { "" },
            r.seconds * 1e3
        );
    }
    drop(q);
    target.close();
    Ok(())
}

fn read_input(args: &IoArgs) -> Result<Vec<u8>> {
    let mut input: Box<dyn Read> = match &args.file {
        Some(p) => Box::new(std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?),
        None => Box::new(std::io::stdin().lock()),
    };
    let mut data = Vec::with_capacity(args.length as usize);
    input.by_ref().take(args.length).read_to_end(&mut data).context("cannot read the input")?;
    if (data.len() as u64) < args.length {
        bail!("the input holds only {} bytes; --length {} needs all of them", data.len(), args.length);
    }
    Ok(data)
}
