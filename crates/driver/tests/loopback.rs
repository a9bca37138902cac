//! The driver against vblk's device engine in the same process (loopback).

use std::sync::Arc;
use std::time::{Duration, Instant};

use vblk_backend::{Disk, DiskOptions};
use vblk_blk::{Limits, Throttle};
use vblk_driver::{
    loopback, Completion, DriverError, LoopbackConfig, Op, Options, QueueHandle, RequestFailure, RingChoice, RingKind,
};

fn temp_disk(size: u64) -> (Disk, std::path::PathBuf) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!("vblk-drv-{}-{n}.img", std::process::id()));
    let _ = std::fs::remove_file(&p);
    (Disk::open(&p, &DiskOptions { readonly: false, direct: true, create_size: Some(size) }).unwrap(), p)
}

fn one(q: &mut QueueHandle, op: Op, buf: Option<vblk_driver::IoBuf>) -> Completion {
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
    every_operation_round_trips(RingChoice::Split);
    every_operation_round_trips(RingChoice::Packed);
}

fn every_operation_round_trips(ring: RingChoice) {
    let (disk, path) = temp_disk(16 << 20);
    let cfg = LoopbackConfig { num_queues: 2, threads: 2, ..Default::default() };
    let (mut dev, _server) = loopback(disk, &cfg, &Options { num_queues: 2, ring, ..Default::default() }).unwrap();
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
    queues_run_from_their_own_threads(RingChoice::Split);
    queues_run_from_their_own_threads(RingChoice::Packed);
}

fn queues_run_from_their_own_threads(ring: RingChoice) {
    let (mut dev, _server) = loopback(
        Disk::null(1 << 30),
        &LoopbackConfig { num_queues: 2, threads: 2, ..Default::default() },
        &Options { num_queues: 2, queue_size: 64, ring, ..Default::default() },
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

// ---------------------------------------------------------------------------
// packed rings (virtio 1.2 §2.8)

/// xorshift64*: reproducible data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The pattern of the `n`-th write of `len` bytes at `offset` (differs per write).
fn pattern(offset: u64, n: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng(offset ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    (0..len).map(|_| rng.next() as u8).collect()
}

/// Keep `q` full: `total` writes of 4-16 KiB patterns into the blocks of `[base, base +
/// blocks * 16K)` (a block is never written twice while in flight), each block read back
/// and checked after its write completed, then a flush, a discard, write-zeroes and a
/// read of the zeroes. The ring wraps many times over; completions come in any order.
fn exercise(q: &mut QueueHandle, base: u64, blocks: u64, total: u64) {
    const BLOCK: u64 = 16 << 10;
    // Requests in flight: user = (kind << 32) | block (kind 0 write, 1 read).
    let mut busy = vec![false; blocks as usize];
    let mut written: Vec<Option<u64>> = vec![None; blocks as usize];
    let mut round = vec![0u64; blocks as usize];
    let (mut sent, mut next_block, mut checked) = (0u64, 0u64, 0u64);
    let mut to_read: Vec<u64> = Vec::new();
    let mut out = Vec::new();
    while checked < total {
        // Reads of finished writes first, then new writes.
        while q.room() > 0 {
            if let Some(b) = to_read.pop() {
                let len = written[b as usize].unwrap();
                q.submit(Op::Read { offset: base + b * BLOCK }, Some(q.alloc(len as u32).unwrap()), 1 << 32 | b)
                    .unwrap();
                continue;
            }
            if sent == total || busy[next_block as usize] {
                break;
            }
            let b = next_block;
            next_block = (next_block + 1) % blocks;
            let len = 4096 * (1 + (sent % 4));
            round[b as usize] += 1;
            let buf = q.alloc(len as u32).unwrap();
            buf.write_at(0, &pattern(base + b * BLOCK, round[b as usize], len as usize)).unwrap();
            q.submit(Op::Write { offset: base + b * BLOCK }, Some(buf), b).unwrap();
            busy[b as usize] = true;
            written[b as usize] = Some(len);
            sent += 1;
        }
        q.kick().unwrap();
        out.clear();
        q.wait(&mut out, 1).unwrap();
        for c in out.drain(..) {
            assert_eq!(c.result, Ok(()), "queue {} request {:#x}", q.index(), c.user);
            let b = c.user & 0xffff_ffff;
            if c.user >> 32 == 0 {
                to_read.push(b);
            } else {
                let len = written[b as usize].unwrap() as usize;
                let want = pattern(base + b * BLOCK, round[b as usize], len);
                assert!(c.buf.unwrap().to_vec().unwrap() == want, "queue {}: block {b} read back wrong", q.index());
                busy[b as usize] = false;
                checked += 1;
            }
        }
    }
    assert_eq!(q.in_flight(), 0);
    assert!(one(q, Op::Flush, None).result.is_ok());
    assert!(one(q, Op::Discard { offset: base, len: BLOCK }, None).result.is_ok());
    assert!(one(q, Op::WriteZeroes { offset: base + BLOCK, len: BLOCK, unmap: false }, None).result.is_ok());
    let c = one(q, Op::Read { offset: base + BLOCK }, Some(q.alloc(BLOCK as u32).unwrap()));
    assert_eq!(c.buf.unwrap().to_vec().unwrap(), vec![0u8; BLOCK as usize], "queue {}", q.index());
}

#[test]
fn auto_picks_the_packed_ring_of_vblk_and_split_can_be_forced() {
    for (choice, kind) in [
        (RingChoice::Auto, RingKind::Packed),
        (RingChoice::Packed, RingKind::Packed),
        (RingChoice::Split, RingKind::Split),
    ] {
        let (mut dev, _server) =
            loopback(Disk::null(1 << 20), &LoopbackConfig::default(), &Options { ring: choice, ..Default::default() })
                .unwrap();
        assert_eq!((dev.ring_kind(), dev.info().ring), (kind, kind), "{choice:?}");
        assert_eq!(dev.info().has(vblk_virtio::features::RING_PACKED), kind == RingKind::Packed);
        let mut q = dev.take_queues().remove(0);
        assert_eq!(q.ring_kind(), kind);
        assert!(one(&mut q, Op::Flush, None).result.is_ok());
    }
}

/// One packed-ring loopback: `queues` queues of `size`, each on its own thread, running
/// [`exercise`]; the blocks of different queues do not overlap.
fn packed_loopback(queues: u16, size: u16, indirect: bool, event_idx: bool, total: u64) {
    let (disk, path) = temp_disk(32 << 20);
    let cfg = LoopbackConfig { num_queues: queues, threads: 2, ..Default::default() };
    let opts = Options {
        num_queues: queues,
        queue_size: size,
        indirect,
        event_idx,
        ring: RingChoice::Packed,
        buffer_memory: 8 << 20,
        ..Default::default()
    };
    let what = format!("{queues} queue(s) of {size}, indirect {indirect}, event_idx {event_idx}");
    let (mut dev, _server) = loopback(disk, &cfg, &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(dev.ring_kind(), RingKind::Packed);
    assert_eq!(dev.info().has(vblk_virtio::features::RING_INDIRECT_DESC), indirect, "{what}");
    assert_eq!(dev.info().has(vblk_virtio::features::RING_EVENT_IDX), event_idx, "{what}");
    let threads: Vec<_> = dev
        .take_queues()
        .into_iter()
        .map(|mut q| {
            std::thread::spawn(move || {
                let base = q.index() as u64 * (4 << 20);
                exercise(&mut q, base, 64, total);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap_or_else(|_| panic!("{what}: a queue failed"));
    }
    drop(dev);
    let _ = std::fs::remove_file(path);
}

#[test]
fn packed_rings_read_write_and_verify_on_one_and_four_queues() {
    for queues in [1, 4] {
        for indirect in [true, false] {
            for event_idx in [true, false] {
                for size in [3, 256] {
                    packed_loopback(queues, size, indirect, event_idx, 300);
                }
            }
        }
    }
}

#[test]
fn packed_rings_of_one_and_two_entries_need_indirect_descriptors() {
    for queues in [1, 4] {
        for event_idx in [true, false] {
            for size in [1, 2] {
                packed_loopback(queues, size, true, event_idx, 200);
            }
        }
    }
    // Without indirect descriptors a request of 3 buffers cannot fit.
    for size in [1, 2] {
        let opts = Options { queue_size: size, indirect: false, ring: RingChoice::Packed, ..Default::default() };
        let r = loopback(Disk::null(1 << 20), &LoopbackConfig::default(), &opts);
        assert!(matches!(r, Err(DriverError::BadOptions(_))), "size {size}: {:?}", r.err());
    }
    // A split ring must still be a power of two.
    let opts = Options { queue_size: 3, ring: RingChoice::Split, ..Default::default() };
    let r = loopback(Disk::null(1 << 20), &LoopbackConfig::default(), &opts);
    assert!(matches!(r, Err(DriverError::BadOptions(_))), "{:?}", r.err());
}

#[test]
fn a_packed_ring_runs_past_65536_requests_in_poll_and_eventfd_mode() {
    // 16-bit counters and the wrap counters turn over many times.
    let (mut dev, _server) = loopback(
        Disk::null(1 << 30),
        &LoopbackConfig { num_queues: 2, threads: 2, ..Default::default() },
        &Options { num_queues: 2, queue_size: 7, ring: RingChoice::Packed, ..Default::default() },
    )
    .unwrap();
    let handles: Vec<_> = dev
        .take_queues()
        .into_iter()
        .map(|mut q| {
            std::thread::spawn(move || {
                q.set_poll_mode(q.index() == 1);
                let mut out = Vec::new();
                let mut done = 0u64;
                let mut sent = 0u64;
                while q.room() > 0 {
                    q.submit(Op::Read { offset: sent * 4096 }, Some(q.alloc(4096).unwrap()), sent).unwrap();
                    sent += 1;
                }
                q.kick().unwrap();
                while done < 70_000 {
                    out.clear();
                    q.wait(&mut out, 1).unwrap();
                    for c in out.drain(..) {
                        assert!(c.result.is_ok());
                        done += 1;
                        q.submit(Op::Read { offset: (sent % 1000) * 4096 }, c.buf, sent).unwrap();
                        sent += 1;
                    }
                    q.kick().unwrap();
                }
                let mut out = Vec::new();
                while q.in_flight() > 0 {
                    q.wait(&mut out, q.in_flight()).unwrap();
                }
                done
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap() >= 70_000);
    }
}

/// QoS, online: with 1 IOPS and no burst, requests complete one per second; a request the
/// throttle holds back completes as soon as another thread lifts the limit, not when its
/// time would have come: the worker sleeping on the limit is woken. (Adaptive polling on.)
#[test]
fn lifting_a_limit_wakes_a_worker_waiting_on_it() {
    let throttle = Arc::new(Throttle::new(Limits { iops: Some(1), bps: None, burst_ms: 0 }));
    let cfg = LoopbackConfig { poll_us: 50, throttle: Arc::clone(&throttle), ..Default::default() };
    let (mut dev, _server) = loopback(Disk::null(1 << 20), &cfg, &Options::default()).unwrap();
    let mut q = dev.take_queues().remove(0);
    let t0 = Instant::now();
    for i in 0..3 {
        q.submit(Op::Read { offset: i * 4096 }, Some(q.alloc(4096).unwrap()), i).unwrap();
    }
    q.kick().unwrap();
    let mut done = Vec::new();
    let mut wait_for = |n: usize, done: &mut Vec<Completion>| {
        let mut out = Vec::new();
        while done.len() < n {
            q.wait(&mut out, 1).unwrap();
            done.append(&mut out);
        }
    };
    wait_for(1, &mut done);
    assert!(t0.elapsed() < Duration::from_millis(500), "the first goes at once: {:?}", t0.elapsed());
    wait_for(2, &mut done);
    let second = t0.elapsed();
    assert!(second >= Duration::from_millis(950), "the second waits a second: {second:?}");
    // The third is due a second after the second; lift the limit now.
    let t1 = Instant::now();
    throttle.set_limits(Limits::UNLIMITED);
    wait_for(3, &mut done);
    let lifted = t1.elapsed();
    eprintln!("second after {second:?}; third {lifted:?} after the limit was lifted");
    assert!(lifted < Duration::from_millis(400), "the held request waited {lifted:?} after the limit was lifted");
    assert!(done.iter().all(|c| c.result.is_ok()));
    assert!(throttle.throttled_ns() >= 900_000_000, "held back {} ns", throttle.throttled_ns());
}
