//! Bounds a hostile driver cannot push vblk past (issue 5, item 5), with
//! `vblk_driver::raw::ring`:
//!
//! - at most queue-size requests are ever in flight on a queue (QEMU CVE-2016-5403 was a
//!   device that popped without bound): exactly `size` may be outstanding, one more is
//!   refused whichever way the driver tries;
//! - a flood of malformed requests costs the daemon no memory: 1,000,000 of them leave
//!   `vblk serve`'s RSS within 10 MiB of its value after warm-up.

mod common;
#[macro_use]
mod hostile;

use std::time::Instant;

use hostile::*;
use vblk_driver::raw::ring::{Buffer, RawQueue, UsedElem};
use vblk_virtio::blk::req_type;

hostile_cases!(in_flight_requests_never_exceed_the_queue_size);

/// Head `h` reads the 4 KiB at `TARGET + 4096 * (h % 8)` into `bufs[h]`.
fn post_reads(q: &RawQueue, heads: std::ops::Range<u16>, bufs: &[vblk_driver::IoBuf]) {
    for h in heads {
        // Each head's descriptors: an indirect table in its slot (one ring descriptor each,
        // so all QSIZE heads fit at once).
        let offset = TARGET + 4096 * (h as u64 % 8);
        let data = writable(&bufs[h as usize]);
        indirect_request(q, h, &[hdr(q, h, req_type::IN, offset / SECTOR), data, status(q, h)]);
    }
}

fn check_read(rig: &Rig, q: &RawQueue, e: UsedElem, bufs: &[vblk_driver::IoBuf]) {
    assert!(e.id < QSIZE as u32 && e.len == 4097, "used entry {e:?}");
    let h = e.id as u16;
    assert_eq!(status_of(q, &[status_buf(q, h)]), OK, "head {h}");
    let want = rig.canary(TARGET + 4096 * (h as u64 % 8), 4096);
    assert!(bufs[h as usize].to_vec().expect("data") == want, "head {h} read the wrong data");
}

fn status_buf(q: &RawQueue, h: u16) -> Buffer {
    Buffer { addr: q.slot(h) + 16, len: 1, write: true }
}

fn in_flight_requests_never_exceed_the_queue_size(t: Target) {
    let mut rig = Rig::new(t);
    let bufs: Vec<_> = (0..QSIZE).map(|_| rig.buf(4096)).collect();

    // Exactly `size` outstanding is allowed: keep the ring full, re-posting each head the
    // moment it comes back, for 2000 requests. Every head is outstanding at most once.
    post_reads(&rig.q, 0..QSIZE, &bufs);
    for h in 0..QSIZE {
        rig.q.add_avail(h);
    }
    rig.q.publish();
    rig.q.kick().expect("kick");
    let mut outstanding = [true; QSIZE as usize];
    let mut done = 0;
    while done < 2000 {
        let used = rig.q.wait_used(1, WAIT).expect("completions");
        for e in used {
            check_read(&rig, &rig.q, e, &bufs);
            let h = e.id as usize;
            assert!(outstanding[h], "head {h} completed twice");
            outstanding[h] = false;
            done += 1;
            status(&rig.q, h as u16);
            bufs[h].write_at(0, &[FILL; 4096]).expect("refill");
            rig.q.add_avail(h as u16);
            outstanding[h] = true;
        }
        rig.q.publish();
        rig.q.kick().expect("kick");
    }
    let rest = rig.q.wait_used(QSIZE as usize, WAIT).expect("the last round");
    for e in rest {
        check_read(&rig, &rig.q, e, &bufs);
    }
    assert!(!rig.q.err_fired(), "a full ring is legal");

    // One more than `size` in one go: refused before anything is popped.
    let used_before = rig.q.used_idx();
    for h in 0..QSIZE {
        status(&rig.q, h);
        rig.q.add_avail(h);
    }
    rig.q.add_avail(0);
    rig.q.publish();
    rig.expect_broken(0);
    assert_eq!(rig.q.used_idx(), used_before);
    let mut rig = rig.reconnect();
    let bufs: Vec<_> = (0..QSIZE).map(|_| rig.buf(4096)).collect();

    // `size` entries naming `size - 1` heads: the repeated head is still in flight (its
    // read cannot complete before the batch is popped), so the device holds `size - 1`
    // requests and refuses the queue rather than take one more.
    post_reads(&rig.q, 0..QSIZE, &bufs);
    for h in 0..QSIZE - 1 {
        rig.q.add_avail(h);
    }
    rig.q.add_avail(3);
    rig.q.publish();
    let done = rig.expect_broken(QSIZE as usize - 1);
    let mut seen: Vec<u32> = done.iter().map(|e| e.id).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..QSIZE as u32 - 1).collect::<Vec<_>>(), "each head completed once");
    for e in done {
        check_read(&rig, &rig.q, e, &bufs);
    }
    rig.finish();
}

/// Malformed requests, 256 per kick, each head one indirect descriptor written once:
/// heads `3k` carry an unknown type (UNSUPP), `3k + 1` a read at sector 2^64 - 1 (IOERR),
/// `3k + 2` a data buffer outside guest memory (the chain is refused and answered IOERR,
/// used length 0: nothing written before the status).
struct Flood {
    size: u16,
}

impl Flood {
    fn prepare(q: &RawQueue) -> Flood {
        let size = q.size();
        for h in 0..size {
            let (t, sector) = if h % 3 == 0 { (0x7777, 0) } else { (req_type::IN, u64::MAX) };
            let st = status(q, h);
            if h % 3 == 2 {
                let outside = Buffer { addr: q.memory_size(), len: 512, write: true };
                indirect_request(q, h, &[hdr(q, h, req_type::IN, 0), outside, st]);
            } else {
                indirect_request(q, h, &[hdr(q, h, t, sector), st]);
            }
        }
        Flood { size }
    }

    /// Submit `batches` rounds of `size` requests and check every answer.
    fn run(&self, q: &mut RawQueue, batches: usize) {
        for _ in 0..batches {
            for h in 0..self.size {
                q.write_mem(q.slot(h) + 16, &[UNTOUCHED]).expect("status");
                q.add_avail(h);
            }
            q.publish();
            q.kick().expect("kick");
            let used = q.wait_used(self.size as usize, WAIT).expect("the flood stalled");
            for e in used {
                let h = e.id as u16;
                let (len, want) = [(1, UNSUPP), (1, IOERR), (0, IOERR)][h as usize % 3];
                assert_eq!(e.len, len, "{e:?}");
                assert_eq!(status_of(q, &[status_buf(q, h)]), want, "head {h}");
            }
        }
    }
}

#[test]
fn a_million_malformed_requests_leave_the_daemon_rss_flat() {
    const TOTAL: usize = 1_000_000;
    let setup = Setup { queue_size: 256, ..Setup::default() };
    let mut rig = Rig::with(Target::Serve, setup);
    let pid = rig.serve_pid().expect("vblk serve");
    let flood = Flood::prepare(&rig.q);
    let batches = TOTAL.div_ceil(flood.size as usize);
    flood.run(&mut rig.q, 40);
    let warm = rss_bytes(pid);
    let start = Instant::now();
    flood.run(&mut rig.q, batches);
    let elapsed = start.elapsed();
    let after = rss_bytes(pid);
    eprintln!(
        "{} malformed requests in {:.1} s ({:.0}/s); vblk serve RSS {} KiB after warm-up, {} KiB after",
        batches * flood.size as usize,
        elapsed.as_secs_f64(),
        (batches * flood.size as usize) as f64 / elapsed.as_secs_f64(),
        warm >> 10,
        after >> 10
    );
    assert!(after.abs_diff(warm) <= 10 << 20, "RSS moved from {warm} to {after} bytes");
    assert!(!rig.q.err_fired());
    rig.finish();
}
