//! Reads and writes: both engines, O_DIRECT on and off, bounce buffers, the
//! buffered-fd route, short transfers.

use std::sync::Arc;

use super::*;
use crate::bounce::{self, advance_iovecs, IOV_MAX};
use crate::disk::FdChoice;
use crate::BackendError;

const MIB: u64 = 1 << 20;

/// Every (engine kind, O_DIRECT) combination.
fn matrix() -> Vec<(EngineKind, bool)> {
    kinds().into_iter().flat_map(|k| [(k, true), (k, false)]).collect()
}

#[test]
fn round_trip_all_engines() {
    let dir = TempDir::new();
    for (kind, direct) in matrix() {
        let disk = open_new(&dir, &format!("rt-{kind:?}-{direct}.img"), MIB, direct);
        let mut e = engine(&disk, kind);
        assert_eq!(e.kind_name(), if kind == EngineKind::Uring { "io_uring" } else { "sync" });

        let mut data = TestBuf::pattern(64 * 1024, 0, 7);
        write_ok(&mut e, 4096, &mut data, &[4096, 16384], false);
        let back = read_back(&mut e, 4096, 64 * 1024, 0, &[8192]);
        assert_eq!(back, data.bytes(), "{kind:?} direct={direct}");

        // The untouched, sparse part of the disk reads as zeros.
        let zeros = read_back(&mut e, 512 * 1024, 8192, 0, &[]);
        assert!(zeros.iter().all(|&b| b == 0));

        // A fua write, read back through a fresh engine.
        let mut data2 = TestBuf::pattern(8192, 0, 99);
        write_ok(&mut e, MIB - 8192, &mut data2, &[], true);
        let mut e2 = engine(&disk, kind);
        assert_eq!(read_back(&mut e2, MIB - 8192, 8192, 0, &[]), data2.bytes());
    }
}

#[test]
fn misaligned_iovecs_use_bounce_buffers() {
    let dir = TempDir::new();
    for kind in kinds() {
        let disk = open_new(&dir, &format!("bounce-{kind:?}.img"), MIB, true);
        if !disk.is_direct() {
            eprintln!("NOTE: no O_DIRECT on the temp dir's filesystem; bounce untested");
            return;
        }
        let mut e = engine(&disk, kind);
        // Base misaligned by 8 bytes, odd segment lengths; total 3 * 4096.
        let mut data = TestBuf::pattern(3 * 4096, 8, 3);
        let iovs = data.iovecs(&[1000, 3096, 5000]);
        let op = rw_op(OpKind::Write, 8192, iovs, false);
        assert!(bounce::route(&disk, &op).bounce);
        let c = run(&mut e, op);
        assert_eq!(c.result.expect("write"), 3 * 4096);

        // Misaligned read (copy-out on completion) and an aligned one.
        assert_eq!(read_back(&mut e, 8192, 3 * 4096, 24, &[100, 4000]), data.bytes());
        assert_eq!(read_back(&mut e, 8192, 3 * 4096, 0, &[]), data.bytes());

        // The handed-back iovecs are the ones we passed in, unmodified.
        let mut buf = TestBuf::new(4096, 3);
        let iovs = buf.iovecs(&[1234]);
        let expect: Vec<(usize, usize)> = iovs.iter().map(|v| (v.iov_base as usize, v.iov_len)).collect();
        let c = run(&mut e, rw_op(OpKind::Read, 8192, iovs, false));
        let got: Vec<(usize, usize)> = c.op.iovs.iter().map(|v| (v.iov_base as usize, v.iov_len)).collect();
        assert_eq!(got, expect);
        assert_eq!(buf.bytes(), &data.bytes()[..4096]);
    }
}

#[test]
fn misaligned_offsets_use_the_buffered_fd() {
    let dir = TempDir::new();
    for kind in kinds() {
        let path = dir.path(&format!("unaligned-{kind:?}.img"));
        let opts = DiskOptions { readonly: false, direct: true, create_size: Some(MIB) };
        let mut disk = Disk::open(&path, &opts).expect("open");
        if !disk.is_direct() {
            return;
        }
        // Pretend the filesystem needs 4 KiB-aligned offsets.
        disk.set_dio_align_for_test(512, 4096);
        let disk = Arc::new(disk);
        let mut e = engine(&disk, kind);

        let mut data = TestBuf::pattern(4096 + 512, 0, 11);
        let op = rw_op(OpKind::Write, 512, data.iovecs(&[]), true);
        assert_eq!(bounce::route(&disk, &op).fd, FdChoice::Buffered);
        assert_eq!(run(&mut e, op).result.expect("write"), 4608);

        // Read back both unaligned (buffered fd) and aligned (O_DIRECT fd,
        // which must see the buffered write).
        assert_eq!(read_back(&mut e, 512, 4608, 0, &[]), data.bytes());
        let whole = read_back(&mut e, 0, 8192, 0, &[]);
        assert_eq!(&whole[512..512 + 4608], data.bytes());
        assert!(whole[..512].iter().all(|&b| b == 0));
    }
}

#[test]
fn more_than_iov_max_iovecs() {
    let dir = TempDir::new();
    for (kind, direct) in matrix() {
        let disk = open_new(&dir, &format!("many-{kind:?}-{direct}.img"), MIB, direct);
        let mut e = engine(&disk, kind);
        let n = IOV_MAX + 100;
        let mut data = TestBuf::pattern(n * 512, 0, 5);
        let sizes = vec![512; n];
        let op = rw_op(OpKind::Write, 0, data.iovecs(&sizes), false);
        assert_eq!(op.iovs.len(), n);
        assert!(bounce::route(&disk, &op).bounce);
        assert_eq!(run(&mut e, op).result.expect("write"), (n * 512) as u64);
        assert_eq!(read_back(&mut e, 0, n * 512, 0, &sizes), data.bytes());
    }
}

#[test]
fn many_ops_in_flight() {
    let dir = TempDir::new();
    for (kind, direct) in matrix() {
        let disk = open_new(&dir, &format!("batch-{kind:?}-{direct}.img"), MIB, direct);
        let mut e = Engine::new(disk.clone(), kind, 8).expect("engine");
        let mut bufs: Vec<TestBuf> = (0..8).map(|i| TestBuf::pattern(4096, 0, i as u8)).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            let op = rw_op(OpKind::Write, i as u64 * 4096, b.iovecs(&[]), false);
            // SAFETY: `bufs` outlives the loop that waits for all completions.
            unsafe { e.push(op) }.expect("room");
        }
        // The ninth op does not fit and is handed back.
        let extra = IoOp::without_data(OpKind::Flush, 0, 0, false, 9);
        // SAFETY: no data buffers.
        let back = unsafe { e.push(extra) }.expect_err("full");
        assert_eq!(back.tag, 9);
        assert_eq!(e.in_flight(), 8);
        e.submit().expect("submit");

        // io_uring: the kernel makes the completion fd readable. Sync: the
        // completions are ready when submit returns, and nothing is signalled.
        let mut pfd = libc::pollfd { fd: e.completion_fd(), events: libc::POLLIN, revents: 0 };
        if e.kind_name() == "io_uring" {
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, 5000) };
            assert_eq!(r, 1, "completion fd readable");
        } else {
            let mut now = Vec::new();
            e.reap(&mut now);
            assert_eq!(now.len(), 8, "sync completions are ready after submit");
            // SAFETY: one valid pollfd.
            assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0, "and not signalled");
            for c in now {
                assert!(matches!(c.result, Ok(4096)));
            }
        }

        let mut out = Vec::new();
        while e.in_flight() > 0 {
            e.wait(&mut out).expect("wait");
        }
        if e.kind_name() == "io_uring" {
            assert_eq!(out.len(), 8);
        }
        assert!(out.iter().all(|c| matches!(c.result, Ok(4096))));
        // A completion posted between `reap` clearing the fd and reading the CQ leaves the fd
        // readable with nothing behind it (a spurious wakeup, by design); one more reap with
        // nothing in flight clears it and finds nothing.
        let n = out.len();
        e.reap(&mut out);
        assert_eq!(out.len(), n, "nothing left to reap");
        pfd.revents = 0;
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0);
        for (i, b) in bufs.iter().enumerate() {
            assert_eq!(read_back(&mut e, i as u64 * 4096, 4096, 0, &[]), b.bytes());
        }
    }
}

#[test]
fn short_read_then_eof_is_eio() {
    let dir = TempDir::new();
    for kind in kinds() {
        let path = dir.path(&format!("short-{kind:?}.img"));
        let opts = DiskOptions { readonly: false, direct: false, create_size: Some(8192) };
        let disk = Arc::new(Disk::open(&path, &opts).expect("open"));
        let mut e = engine(&disk, kind);
        let mut data = TestBuf::pattern(8192, 0, 1);
        write_ok(&mut e, 0, &mut data, &[], false);
        // Shrink the file behind the disk's back: a read of the full size is
        // short (4096 bytes), the continuation reads 0 bytes -> EIO.
        std::fs::OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(4096)).expect("truncate");
        let mut buf = TestBuf::new(8192, 0);
        let c = run(&mut e, rw_op(OpKind::Read, 0, buf.iovecs(&[1000]), false));
        let err = c.result.expect_err("short read must fail");
        assert!(matches!(err, BackendError::Io { .. }));
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        // The part that was read did land in the buffer.
        assert_eq!(&buf.bytes()[..4096], &data.bytes()[..4096]);
    }
}

#[test]
fn advance_iovecs_drops_consumed_bytes() {
    let mut b = TestBuf::new(100, 0);
    let base = b.bytes_mut().as_mut_ptr() as usize;
    let mut v = b.iovecs(&[10, 20, 30]);
    let view = |v: &Vec<libc::iovec>| -> Vec<(usize, usize)> {
        v.iter().map(|i| (i.iov_base as usize - base, i.iov_len)).collect()
    };
    advance_iovecs(&mut v, 5);
    assert_eq!(view(&v), [(5, 5), (10, 20), (30, 30), (60, 40)]);
    advance_iovecs(&mut v, 5);
    assert_eq!(view(&v), [(10, 20), (30, 30), (60, 40)]);
    advance_iovecs(&mut v, 45);
    assert_eq!(view(&v), [(55, 5), (60, 40)]);
    advance_iovecs(&mut v, 45);
    assert!(v.is_empty());
}

#[test]
fn invalid_ops_complete_with_errors() {
    let dir = TempDir::new();
    for kind in kinds() {
        let disk = open_new(&dir, &format!("inval-{kind:?}.img"), 64 * 1024, false);
        let mut e = engine(&disk, kind);
        let mut buf = TestBuf::new(4096, 0);
        let c = run(&mut e, rw_op(OpKind::Read, 64 * 1024 - 512, buf.iovecs(&[]), false));
        assert!(matches!(c.result, Err(BackendError::OutOfRange { .. })));
        let mut op = rw_op(OpKind::Write, 0, buf.iovecs(&[]), false);
        op.len = 512;
        assert!(matches!(run(&mut e, op).result, Err(BackendError::InvalidRequest(_))));
        let op = IoOp::without_data(OpKind::Discard, u64::MAX - 511, 4096, false, 1);
        assert!(matches!(run(&mut e, op).result, Err(BackendError::OutOfRange { .. })));
        assert_eq!(run(&mut e, rw_op(OpKind::Read, 0, Vec::new(), false)).result.expect("empty"), 0);
    }
}

#[test]
fn direct_einval_retries_through_the_buffered_fd() {
    let dir = TempDir::new();
    for kind in kinds() {
        let path = dir.path(&format!("einval-{kind:?}.img"));
        let opts = DiskOptions { readonly: false, direct: true, create_size: Some(MIB) };
        let mut disk = Disk::open(&path, &opts).expect("open");
        if !disk.is_direct() {
            return;
        }
        // Claim there are no alignment rules: misaligned buffers then go to
        // the O_DIRECT fd unbounced, the kernel says EINVAL, and the engine
        // must retry through the buffered fd.
        disk.set_dio_align_for_test(1, 1);
        let disk = Arc::new(disk);
        let mut e = engine(&disk, kind);
        let mut data = TestBuf::pattern(4096 + 100, 3, 77);
        let op = rw_op(OpKind::Write, 1024, data.iovecs(&[777]), true);
        assert_eq!(bounce::route(&disk, &op), bounce::Route { fd: FdChoice::Main, bounce: false });
        assert_eq!(run(&mut e, op).result.expect("write"), 4196);
        assert_eq!(read_back(&mut e, 1024, 4196, 5, &[33]), data.bytes());
    }
}
