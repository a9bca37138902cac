//! A runnable tour of the driver API, with no VM and no daemon: vblk's device engine runs in
//! this process on a null disk (or on IMAGE) and the driver talks to it over a socketpair.
//!
//! ```sh
//! cargo run -p vblk-driver --example loopback            # null disk
//! cargo run -p vblk-driver --example loopback -- my.img  # a raw image (created, 64 MiB)
//! ```
//! Against a running backend, use `Device::connect(path, &opts)` instead of `loopback`.

use vblk_backend::{Disk, DiskOptions};
use vblk_driver::{loopback, Completion, LoopbackConfig, Op, Options};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let disk = match std::env::args().nth(1) {
        Some(path) => Disk::open(path.as_ref(), &DiskOptions { create_size: Some(64 << 20), ..Default::default() })?,
        None => Disk::null(64 << 20),
    };
    let (mut dev, _server) = loopback(disk, &LoopbackConfig::default(), &Options::default())?;
    let info = dev.info().clone();
    println!("capacity {} bytes, {} queue(s), serial {:?}", info.capacity.unwrap_or(0), info.num_queues, info.serial);

    // One queue handle per thread; here one thread.
    let mut q = dev.take_queues().remove(0);
    let buf = q.alloc(4096)?;
    buf.write_at(0, b"hello from vblk's userspace driver")?;
    q.submit(Op::Write { offset: 0 }, Some(buf), 1)?;
    q.submit(Op::Flush, None, 2)?;
    q.kick()?;

    let mut done: Vec<Completion> = Vec::new();
    while done.len() < 2 {
        q.wait(&mut done, 1)?;
    }
    for c in &done {
        println!("request {} -> {:?}", c.user, c.result);
    }

    // Reuse the write's buffer for the read; clear it first (the null disk leaves read
    // buffers untouched, so it reads back empty; an image reads back the text).
    let buf = done.into_iter().find_map(|c| c.buf).ok_or("write buffer not returned")?;
    buf.write_at(0, &[0u8; 4096])?;
    q.submit(Op::Read { offset: 0 }, Some(buf), 3)?;
    q.kick()?;
    let mut done = Vec::new();
    q.wait(&mut done, 1)?;
    let data = done[0].buf.as_ref().ok_or("no buffer")?.to_vec()?;
    let text = String::from_utf8_lossy(&data[..34]);
    println!("read back: {:?}", text.trim_end_matches('\0'));
    Ok(())
}
