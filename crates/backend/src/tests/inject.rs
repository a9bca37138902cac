//! Fault injection: the spec grammar, and every fault kind through the real engines.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::{BackendError, FaultSpec, FaultSpecError};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn spec(s: &str) -> FaultSpec {
    s.parse().unwrap_or_else(|e| panic!("{s:?} does not parse: {e}"))
}

/// A fresh image with `faults` injected.
fn faulty(dir: &TempDir, name: &str, direct: bool, faults: &str) -> Arc<Disk> {
    let opts = DiskOptions { readonly: false, direct, create_size: Some(4 * MIB) };
    let disk = Disk::open(&dir.path(name), &opts).expect("open").with_faults(spec(faults));
    assert!(disk.describe().contains("faults injected"), "{}", disk.describe());
    Arc::new(disk)
}

fn errno_of(c: &Completion) -> Option<i32> {
    c.result.as_ref().err().and_then(BackendError::raw_os_error)
}

fn read_into(e: &mut Engine, offset: u64, buf: &mut TestBuf, sizes: &[usize]) -> Completion {
    run(e, rw_op(OpKind::Read, offset, buf.iovecs(sizes), false))
}

#[test]
fn fault_specs_parse_and_print_back() {
    for s in [
        "read:eio@offset=0-1M",
        "write:enospc@rate=0.1",
        "flush:eio",
        "write:short",
        "any:delay=5ms",
        "write:eio@after=100",
        "seed=7;read+write:eio@rate=0.01@times=3, discard+write-zeroes:enospc ; any:delay=250us@offset=4K-8K",
        "any:short@offset=1M-2M",
    ] {
        let a = spec(s);
        let printed = a.to_string();
        assert_eq!(spec(&printed), a, "{s:?} printed as {printed:?}");
    }
    assert_eq!(spec("read:eio@offset=0-1M").to_string(), "seed=0;read:eio@offset=0-1048576");
    assert_eq!(spec("seed=3;write+read:delay=2s@times=1").to_string(), "seed=3;read+write:delay=2s@times=1");
    assert_eq!(spec("read+write+flush+discard+write-zeroes:eio").to_string(), "seed=0;any:eio");
    assert_eq!(spec("any:delay=5ms;any:delay=250us").to_string(), "seed=0;any:delay=5ms;any:delay=250us");
    assert!(spec("any:delay=1ms").has_delays() && !spec("any:eio").has_delays());
}

#[test]
fn bad_fault_specs_are_refused_with_clear_errors() {
    use FaultSpecError::*;
    type IsExpected = fn(&FaultSpecError) -> bool;
    let cases: &[(&str, IsExpected, &str)] = &[
        ("", |e| matches!(e, Empty), "empty fault spec"),
        ("seed=1", |e| matches!(e, Empty), "empty"),
        ("read", |e| matches!(e, Syntax(_)), "expected OPS:FAULT"),
        ("read:", |e| matches!(e, Syntax(_)), "expected OPS:FAULT"),
        ("reads:eio", |e| matches!(e, UnknownOp(o) if o == "reads"), "unknown op"),
        ("read+:eio", |e| matches!(e, UnknownOp(_)), "unknown op"),
        ("read:eagain", |e| matches!(e, UnknownFault(f) if f == "eagain"), "expected eio, enospc, short"),
        ("read:eio@where=1", |e| matches!(e, UnknownCondition(_)), "expected offset=START-END"),
        ("read:eio@rate", |e| matches!(e, UnknownCondition(_)), "unknown condition"),
        ("read:eio@offset=1M", |e| matches!(e, BadValue { .. }), "offset wants START-END"),
        ("read:eio@offset=2M-1M", |e| matches!(e, BadValue { .. }), "END must be above START"),
        ("read:eio@offset=x-1M", |e| matches!(e, BadValue { .. }), "bad offset START"),
        ("read:eio@rate=0", |e| matches!(e, BadValue { .. }), "above 0 and at most 1"),
        ("read:eio@rate=1.5", |e| matches!(e, BadValue { .. }), "above 0 and at most 1"),
        ("read:eio@rate=NaN", |e| matches!(e, BadValue { .. }), "above 0 and at most 1"),
        ("read:eio@after=-1", |e| matches!(e, BadValue { .. }), "whole number"),
        ("read:eio@times=0", |e| matches!(e, BadValue { .. }), "at least 1"),
        ("seed=x;read:eio", |e| matches!(e, BadValue { .. }), "whole number"),
        ("any:delay=5", |e| matches!(e, BadValue { .. }), "unit"),
        ("any:delay=fast", |e| matches!(e, BadValue { .. }), "500us, 5ms or 2s"),
        ("flush:short", |e| matches!(e, BadValue { .. }), "reads and writes only"),
        ("read+discard:short", |e| matches!(e, BadValue { .. }), "reads and writes only"),
    ];
    for (s, is, text) in cases {
        let e = s.parse::<FaultSpec>().expect_err(s);
        assert!(is(&e), "{s:?}: wrong error {e:?}");
        assert!(e.to_string().contains(text), "{s:?}: {e} does not say {text:?}");
    }
}

#[test]
fn injected_errors_fail_only_the_matching_ops() {
    let dir = TempDir::new();
    for kind in kinds() {
        let disk =
            faulty(&dir, &format!("eio-{kind:?}.img"), true, "read:eio@offset=64K-68K;write:enospc@offset=128K-132K");
        let mut e = engine(&disk, kind);
        let mut data = TestBuf::pattern(12 * 1024, 0, 9);
        write_ok(&mut e, 60 * KIB, &mut data, &[], false);
        // The faulty range fails, its neighbours and anything overlapping it do not/do.
        let mut buf = TestBuf::new(4096, 0);
        let c = read_into(&mut e, 64 * KIB, &mut buf, &[]);
        assert_eq!(errno_of(&c), Some(libc::EIO), "{kind:?}: {:?}", c.result);
        assert!(c.result.as_ref().err().is_some_and(|e| e.to_string().contains("injected")));
        assert_eq!(read_back(&mut e, 60 * KIB, 4096, 0, &[]), &data.bytes()[..4096]);
        assert_eq!(read_back(&mut e, 68 * KIB, 4096, 0, &[]), &data.bytes()[8192..]);
        let mut wide = TestBuf::new(8192, 0);
        assert_eq!(errno_of(&read_into(&mut e, 60 * KIB, &mut wide, &[])), Some(libc::EIO));
        // ENOSPC on writes into the second range; nothing reaches the disk.
        let mut w = TestBuf::pattern(4096, 0, 1);
        let c = run(&mut e, rw_op(OpKind::Write, 128 * KIB, w.iovecs(&[]), false));
        assert_eq!(errno_of(&c), Some(libc::ENOSPC));
        assert!(read_back(&mut e, 128 * KIB, 4096, 0, &[]).iter().all(|&b| b == 0));
        // Other kinds are not affected by these rules.
        let c = run(&mut e, IoOp::without_data(OpKind::Discard, 64 * KIB, 4096, false, 1));
        assert_eq!(c.result.expect("discard"), 0);
        run(&mut e, IoOp::without_data(OpKind::Flush, 0, 0, false, 2)).result.expect("flush");
        assert_eq!(disk.faults().map(|f| f.injected()), Some(3));
    }
}

/// The `rate=` decisions of `spec` for 200 sequential writes on a fresh disk.
fn rate_pattern(dir: &TempDir, name: &str, kind: EngineKind, faults: &str) -> Vec<bool> {
    let disk = faulty(dir, name, false, faults);
    let mut e = engine(&disk, kind);
    let mut buf = TestBuf::pattern(512, 0, 3);
    (0..200u64)
        .map(|i| {
            let c = run(&mut e, rw_op(OpKind::Write, i * 512, buf.iovecs(&[]), false));
            match c.result {
                Ok(_) => false,
                Err(err) => {
                    assert_eq!(err.raw_os_error(), Some(libc::EIO));
                    true
                }
            }
        })
        .collect()
}

#[test]
fn rate_faults_are_deterministic_per_seed() {
    let dir = TempDir::new();
    let kinds = kinds();
    let first = rate_pattern(&dir, "rate-a.img", kinds[0], "seed=42;write:eio@rate=0.3");
    let failed = first.iter().filter(|&&f| f).count();
    assert!((30..=90).contains(&failed), "{failed} of 200 failed at rate 0.3");
    for (i, &kind) in kinds.iter().enumerate() {
        let again = rate_pattern(&dir, &format!("rate-b{i}.img"), kind, "seed=42;write:eio@rate=0.3");
        assert_eq!(again, first, "same seed, same faults ({kind:?})");
    }
    let other = rate_pattern(&dir, "rate-c.img", kinds[0], "seed=43;write:eio@rate=0.3");
    assert_ne!(other, first, "another seed, other faults");
    let all = rate_pattern(&dir, "rate-d.img", kinds[0], "write:eio@rate=1");
    assert!(all.iter().all(|&f| f));
}

#[test]
fn after_and_times_count_matching_ops_only() {
    let dir = TempDir::new();
    for kind in kinds() {
        let disk = faulty(&dir, &format!("after-{kind:?}.img"), false, "write:eio@after=3@times=2");
        let mut e = engine(&disk, kind);
        let mut buf = TestBuf::pattern(4096, 0, 5);
        let mut outcomes = Vec::new();
        for i in 0..8u64 {
            // Reads in between are not counted by a write rule.
            read_back(&mut e, 0, 4096, 0, &[]);
            let c = run(&mut e, rw_op(OpKind::Write, i * 4096, buf.iovecs(&[]), false));
            outcomes.push(errno_of(&c));
        }
        let eio = Some(libc::EIO);
        assert_eq!(outcomes, [None, None, None, eio, eio, None, None, None], "{kind:?}");
    }
}

#[test]
fn an_injected_flush_failure_is_sticky() {
    let dir = TempDir::new();
    for kind in kinds() {
        let disk = faulty(&dir, &format!("flush-{kind:?}.img"), true, "flush:eio@times=1");
        let mut e = engine(&disk, kind);
        let mut other = engine(&disk, EngineKind::Sync);
        let mut data = TestBuf::pattern(4096, 0, 2);
        write_ok(&mut e, 0, &mut data, &[], false);
        let c = run(&mut e, IoOp::without_data(OpKind::Flush, 0, 0, false, 1));
        assert_eq!(errno_of(&c), Some(libc::EIO), "{kind:?}");
        assert!(disk.flush_failed());
        // The rule fired once; the disk remembers: no flush succeeds again, on any engine.
        for eng in [&mut e, &mut other] {
            for _ in 0..3 {
                let c = run(eng, IoOp::without_data(OpKind::Flush, 0, 0, false, 2));
                assert!(matches!(c.result, Err(BackendError::FlushFailedEarlier)), "{:?}", c.result);
            }
        }
        assert!(matches!(disk.flush_sync(), Err(BackendError::FlushFailedEarlier)));
        // Reads and writes go on.
        write_ok(&mut e, 4096, &mut data, &[], false);
        assert_eq!(read_back(&mut e, 4096, 4096, 0, &[]), data.bytes());
    }
}

#[test]
fn short_transfers_move_half_and_report_it() {
    let dir = TempDir::new();
    for kind in kinds() {
        for direct in [true, false] {
            let name = format!("short-{kind:?}-{direct}.img");
            let disk = faulty(&dir, &name, direct, "read:short@offset=0-1M;write:short@offset=1M-2M");
            let mut e = engine(&disk, kind);
            let mut data = TestBuf::pattern(8192, 0, 7);
            write_ok(&mut e, 0, &mut data, &[], false);
            // A short read: 4 KiB of data, the rest of the buffer as it was.
            let mut buf = TestBuf::new(8192, 0);
            buf.bytes_mut().fill(0xee);
            let c = read_into(&mut e, 0, &mut buf, &[1000, 3000, 100]);
            assert_eq!(c.result.expect("short read reports its length"), 4096, "{kind:?} direct={direct}");
            assert_eq!(&buf.bytes()[..4096], &data.bytes()[..4096]);
            assert!(buf.bytes()[4096..].iter().all(|&b| b == 0xee), "{kind:?} direct={direct}");
            // A short write: only the first half reached the disk.
            let c = run(&mut e, rw_op(OpKind::Write, MIB, data.iovecs(&[5000]), false));
            assert_eq!(c.result.expect("short write reports its length"), 4096);
            let back = read_back(&mut e, MIB, 8192, 0, &[]);
            assert_eq!(&back[..4096], &data.bytes()[..4096]);
            assert!(back[4096..].iter().all(|&b| b == 0));
            // 512 bytes cannot be halved into whole sectors: nothing moves.
            let mut one = TestBuf::pattern(512, 0, 1);
            assert_eq!(run(&mut e, rw_op(OpKind::Write, MIB + 8192, one.iovecs(&[]), false)).result.expect("w"), 0);
        }
    }
}

#[test]
fn delays_hold_ops_until_their_deadline_without_blocking_others() {
    const DELAY: Duration = Duration::from_millis(150);
    let dir = TempDir::new();
    for kind in kinds() {
        let disk = faulty(&dir, &format!("delay-{kind:?}.img"), true, "any:delay=150ms@offset=0-4K");
        let mut e = engine(&disk, kind);
        let mut data = TestBuf::pattern(4096, 0, 4);
        let t = Instant::now();
        write_ok(&mut e, 0, &mut data, &[], false);
        assert!(t.elapsed() >= DELAY, "{kind:?}: the delayed write completed after {:?}", t.elapsed());

        // A delayed read and an undelayed one: the second completes first, at once. Reap
        // the way a worker does: without a syscall after submitting, then each time the
        // completion fd (what it sleeps on) is readable; it must wake up for the held read.
        let (mut slow, mut fast) = (TestBuf::new(4096, 0), TestBuf::new(4096, 0));
        let t = Instant::now();
        // SAFETY: both buffers outlive the loop below, which reaps both completions.
        unsafe {
            e.push(rw_op(OpKind::Read, 0, slow.iovecs(&[]), false)).expect("room");
            e.push(rw_op(OpKind::Read, 8192, fast.iovecs(&[]), false)).expect("room");
        }
        e.submit().expect("submit");
        let mut done = Vec::new();
        let mut seen = Vec::new();
        e.poll_completions(&mut done);
        seen.extend(done.iter().map(|c| (c.op.offset, t.elapsed())));
        let mut pfd = libc::pollfd { fd: e.completion_fd(), events: libc::POLLIN, revents: 0 };
        while done.len() < 2 {
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, 5000) };
            assert_eq!(r, 1, "{kind:?}: completion fd never became readable");
            let before = done.len();
            e.reap(&mut done);
            seen.extend(done[before..].iter().map(|c| (c.op.offset, t.elapsed())));
        }
        assert_eq!(seen.len(), 2, "{kind:?}");
        assert!(seen[0].0 == 8192 && seen[0].1 < DELAY, "{kind:?}: undelayed read first, at once: {seen:?}");
        assert!(seen[1].0 == 0 && seen[1].1 >= DELAY, "{kind:?}: the delayed read after its delay: {seen:?}");
        assert_eq!(done[1].result.as_ref().ok(), Some(&4096));
        assert_eq!(slow.bytes(), data.bytes());
        assert_eq!(e.in_flight(), 0);
        // With nothing held, the timer is quiet again.
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0, "{kind:?}");
    }
}

#[test]
fn a_delay_and_an_error_combine() {
    let disk = Arc::new(Disk::null(MIB).with_faults(spec("write:delay=50ms;write:eio;read:enospc@times=1")));
    for kind in [EngineKind::Sync, EngineKind::Uring] {
        let mut e = engine(&disk, kind);
        let mut buf = TestBuf::new(4096, 0);
        let t = Instant::now();
        let c = run(&mut e, rw_op(OpKind::Write, 0, buf.iovecs(&[]), false));
        assert_eq!(errno_of(&c), Some(libc::EIO));
        assert!(t.elapsed() >= Duration::from_millis(50));
    }
    let mut e = engine(&disk, EngineKind::Sync);
    let mut buf = TestBuf::new(4096, 0);
    assert_eq!(errno_of(&read_into(&mut e, 0, &mut buf, &[])), Some(libc::ENOSPC));
    assert!(read_into(&mut e, 0, &mut buf, &[]).result.is_ok(), "times=1");
}
