//! The driver against vblk's device engine in the same process (loopback).

use std::time::{Duration, Instant};

use vblk_backend::{Disk, DiskOptions};
use vblk_driver::{loopback, Completion, DriverError, LoopbackConfig, Op, Options, RequestFailure};

fn temp_disk(size: u64) -> (Disk, std::path::PathBuf) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!("vblk-drv-{}-{n}.img", std::process::id()));
    let _ = std::fs::remove_file(&p);
    (Disk::open(&p, &DiskOptions { readonly: false, direct: true, create_size: Some(size) }).unwrap(), p)
}

fn one(q: &mut vblk_driver::QueueHandle, op: Op, buf: Option<vblk_driver::IoBuf>) -> Completion {
    q.submit(op, buf, 42).unwrap();
    q.kick().unwrap();
    let mut out = Vec::new();
    q.wait(&mut out, 1).unwrap();
    assert_eq!(out.len(), 1);
    let c = out.pop().unwrap();
    assert_eq!(c.user, 42);
    c
}

#[test]
fn every_operation_round_trips_through_the_device_engine() {
    let (disk, path) = temp_disk(16 << 20);
    let cfg = LoopbackConfig { num_queues: 2, threads: 2, ..Default::default() };
    let (mut dev, _server) = loopback(disk, &cfg, &Options { num_queues: 2, ..Default::default() }).unwrap();
    let info = dev.info().clone();
    assert_eq!(info.capacity, Some(16 << 20));
    assert_eq!((info.num_queues, info.max_queues), (2, 2));
    assert_eq!(info.serial.as_deref(), Some("vblk-loopback"));
    assert!(info.writeback && !info.readonly);
    assert_eq!(info.max_discard_seg, 1);
    let mut qs = dev.take_queues();
    let buf = qs[0].alloc(8192).unwrap();
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    buf.write_at(0, &data).unwrap();
    assert!(one(&mut qs[0], Op::Write { offset: 4096 }, Some(buf)).result.is_ok());
    let c = one(&mut qs[1], Op::Read { offset: 4096 }, Some(dev.alloc(8192).unwrap()));
    assert!(c.result.is_ok());
    assert_eq!(c.buf.unwrap().to_vec().unwrap(), data);
    assert!(one(&mut qs[0], Op::Flush, None).result.is_ok());
    assert!(one(&mut qs[0], Op::WriteZeroes { offset: 4096, len: 4096, unmap: false }, None).result.is_ok());
    assert!(one(&mut qs[0], Op::Discard { offset: 8192, len: 4096 }, None).result.is_ok());
    let c = one(&mut qs[1], Op::Read { offset: 4096 }, Some(dev.alloc(4096).unwrap()));
    assert_eq!(c.buf.unwrap().to_vec().unwrap(), vec![0u8; 4096]);
    // Errors come back as statuses.
    let c = one(&mut qs[0], Op::Read { offset: 16 << 20 }, Some(dev.alloc(512).unwrap()));
    assert_eq!(c.result, Err(RequestFailure::IoErr));
    let c = one(&mut qs[0], Op::WriteZeroes { offset: 0, len: 512, unmap: true }, None);
    assert!(c.result.is_ok());
    drop(qs);
    drop(dev);
    let _ = std::fs::remove_file(path);
}

#[test]
fn queues_run_from_their_own_threads_in_poll_and_eventfd_mode() {
    let (mut dev, _server) = loopback(
        Disk::null(1 << 30),
        &LoopbackConfig { num_queues: 2, threads: 2, ..Default::default() },
        &Options { num_queues: 2, queue_size: 64, ..Default::default() },
    )
    .unwrap();
    let handles: Vec<_> = dev
        .take_queues()
        .into_iter()
        .map(|mut q| {
            std::thread::spawn(move || {
                q.set_poll_mode(q.index() == 1);
                let mut out = Vec::new();
                let mut done = 0;
                for i in 0..16 {
                    q.submit(Op::Read { offset: i * 4096 }, Some(q.alloc(4096).unwrap()), i).unwrap();
                }
                q.kick().unwrap();
                while done < 2000 {
                    out.clear();
                    q.wait(&mut out, 1).unwrap();
                    for c in out.drain(..) {
                        assert!(c.result.is_ok());
                        done += 1;
                        q.submit(Op::Read { offset: 0 }, c.buf, c.user).unwrap();
                    }
                    q.kick().unwrap();
                }
                done
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap() >= 2000);
    }
}

#[test]
fn a_dead_or_silent_backend_is_an_error_not_a_hang() {
    // Silent: the peer never answers.
    let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let t = Instant::now();
    let r =
        vblk_driver::Device::from_stream(ours, &Options { timeout: Duration::from_millis(300), ..Default::default() });
    assert!(r.is_err());
    assert!(t.elapsed() < Duration::from_secs(5));

    // Dead: the server goes away with a request in flight... or before it completes.
    let (mut dev, server) = loopback(Disk::null(1 << 20), &LoopbackConfig::default(), &Options::default()).unwrap();
    let mut q = dev.take_queues().remove(0);
    drop(server);
    drop(dev);
    q.set_timeout(Duration::from_secs(2));
    q.submit(Op::Flush, None, 1).unwrap();
    q.kick().unwrap();
    let mut out = Vec::new();
    let r = q.wait(&mut out, 1);
    assert!(
        matches!(r, Err(DriverError::BackendGone) | Err(DriverError::Timeout(_))),
        "got {r:?} with {} completions",
        out.len()
    );
}
