//! Flush, discard, write-zeroes, read-only, null, and opening.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use super::*;
use crate::disk::human_size;
use crate::BackendError;

const MIB: u64 = 1 << 20;

fn data_less(kind: OpKind, offset: u64, len: u64, fua: bool) -> IoOp {
    IoOp::without_data(kind, offset, len, fua, offset + 1)
}

/// Fill 64 KiB at 0 with a pattern, apply `op` to 16 KiB..48 KiB, and check
/// the range reads back as zeros while the rest is intact.
fn check_zeroing(e: &mut Engine, op_kind: OpKind, fua: bool) {
    let mut data = TestBuf::pattern(64 * 1024, 0, 42);
    write_ok(e, 0, &mut data, &[], false);
    let c = run(e, data_less(op_kind, 16 * 1024, 32 * 1024, fua));
    assert_eq!(c.result.expect("zeroing op"), 0, "{op_kind:?}");
    let back = read_back(e, 0, 64 * 1024, 0, &[]);
    assert_eq!(&back[..16 * 1024], &data.bytes()[..16 * 1024]);
    assert!(back[16 * 1024..48 * 1024].iter().all(|&b| b == 0), "{op_kind:?} fua={fua}");
    assert_eq!(&back[48 * 1024..], &data.bytes()[48 * 1024..]);
}

const ZEROING: [OpKind; 3] =
    [OpKind::Discard, OpKind::WriteZeroes { unmap: false }, OpKind::WriteZeroes { unmap: true }];

#[test]
fn discard_and_write_zeroes_read_back_zeros() {
    let dir = TempDir::new();
    for kind in kinds() {
        for direct in [true, false] {
            let name = format!("zero-{kind:?}-{direct}.img");
            let disk = open_new(&dir, &name, MIB, direct);
            let mut e = engine(&disk, kind);
            for op in ZEROING {
                for fua in [false, true] {
                    check_zeroing(&mut e, op, fua);
                }
            }
            // KEEP_SIZE: the file did not grow or shrink.
            assert_eq!(std::fs::metadata(dir.path(&name)).expect("stat").len(), MIB);
        }
    }
}

#[test]
fn punch_hole_deallocates() {
    let dir = TempDir::new();
    let disk = open_new(&dir, "punch.img", MIB, false);
    let mut e = engine(&disk, EngineKind::Sync);
    let mut data = TestBuf::pattern(MIB as usize, 0, 1);
    write_ok(&mut e, 0, &mut data, &[], true);
    let blocks = |d: &TempDir| std::fs::metadata(d.path("punch.img")).expect("stat").blocks();
    let before = blocks(&dir);
    let c = run(&mut e, data_less(OpKind::Discard, 0, MIB / 2, false));
    c.result.expect("discard");
    assert!(blocks(&dir) < before, "hole punched");
}

/// tmpfs has no FALLOC_FL_ZERO_RANGE: write-zeroes must fall back to
/// writing zeros.
#[test]
fn write_zeroes_falls_back_when_zero_range_unsupported() {
    let Some(dir) = TempDir::new_shm() else {
        eprintln!("NOTE: no /dev/shm; fallback untested");
        return;
    };
    for kind in kinds() {
        let disk = open_new(&dir, &format!("shm-{kind:?}.img"), MIB, false);
        let mut e = engine(&disk, kind);
        for fua in [false, true] {
            check_zeroing(&mut e, OpKind::WriteZeroes { unmap: false }, fua);
        }
    }
    // The fallback itself, directly, at an odd length.
    let disk = open_new(&dir, "direct-fallback.img", MIB, false);
    let mut e = engine(&disk, EngineKind::Sync);
    let mut data = TestBuf::pattern(200 * 1024, 0, 9);
    write_ok(&mut e, 0, &mut data, &[], false);
    crate::sync::write_zeroes_fallback(&disk, 512, 150 * 1024 + 512).expect("fallback");
    let back = read_back(&mut e, 0, 200 * 1024, 0, &[]);
    assert_eq!(&back[..512], &data.bytes()[..512]);
    assert!(back[512..151 * 1024].iter().all(|&b| b == 0));
    assert_eq!(&back[151 * 1024..], &data.bytes()[151 * 1024..]);
}

#[test]
fn flush_succeeds() {
    let dir = TempDir::new();
    for kind in kinds() {
        let disk = open_new(&dir, &format!("flush-{kind:?}.img"), MIB, true);
        let mut e = engine(&disk, kind);
        let mut data = TestBuf::pattern(4096, 0, 2);
        write_ok(&mut e, 0, &mut data, &[], false);
        let c = run(&mut e, data_less(OpKind::Flush, 0, 0, false));
        assert_eq!(c.result.expect("flush"), 0);
        disk.flush_sync().expect("flush_sync");
        assert!(!disk.flush_failed());
    }
}

/// `fdatasync` on a pipe fails with EINVAL: a real failing flush.
#[test]
fn flush_failure_is_sticky() {
    for kind in kinds() {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe() returns.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 returned fresh descriptors that we now own.
        let (r, w) = unsafe {
            use std::os::fd::FromRawFd;
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        };
        drop(r);
        let disk = Arc::new(Disk::from_file_for_test(w, MIB));
        let mut e1 = engine(&disk, kind);
        let mut e2 = engine(&disk, EngineKind::Sync);

        let err = run(&mut e1, data_less(OpKind::Flush, 0, 0, false)).result.expect_err("flush on a pipe fails");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{kind:?}: {err}");
        assert!(disk.flush_failed());
        for e in [&mut e1, &mut e2] {
            let c = run(e, data_less(OpKind::Flush, 0, 0, false));
            assert!(matches!(c.result, Err(BackendError::FlushFailedEarlier)));
        }
        assert!(matches!(disk.flush_sync(), Err(BackendError::FlushFailedEarlier)));
    }
}

#[test]
fn sticky_flag_blocks_flush_on_real_file() {
    let dir = TempDir::new();
    let disk = open_new(&dir, "sticky.img", MIB, false);
    disk.mark_flush_failed();
    for kind in kinds() {
        let mut e = engine(&disk, kind);
        let c = run(&mut e, data_less(OpKind::Flush, 0, 0, false));
        assert!(matches!(c.result, Err(BackendError::FlushFailedEarlier)));
    }
    assert!(matches!(disk.flush_sync(), Err(BackendError::FlushFailedEarlier)));
}

#[test]
fn read_only_disk_rejects_writes() {
    let dir = TempDir::new();
    let path = dir.path("ro.img");
    drop(open_new(&dir, "ro.img", MIB, false));
    let opts = DiskOptions { readonly: true, direct: true, create_size: None };
    let disk = Arc::new(Disk::open(&path, &opts).expect("open ro"));
    assert!(disk.readonly());
    assert!(disk.describe().ends_with(", read-only)"));
    for kind in kinds() {
        let mut e = engine(&disk, kind);
        let mut data = TestBuf::pattern(4096, 0, 1);
        for fua in [false, true] {
            let c = run(&mut e, rw_op(OpKind::Write, 0, data.iovecs(&[]), fua));
            assert!(matches!(c.result, Err(BackendError::ReadOnly)));
            for op in ZEROING {
                let c = run(&mut e, data_less(op, 0, 4096, fua));
                assert!(matches!(c.result, Err(BackendError::ReadOnly)), "{op:?}");
            }
        }
        assert!(read_back(&mut e, 0, 4096, 0, &[]).iter().all(|&b| b == 0));
        run(&mut e, data_less(OpKind::Flush, 0, 0, false)).result.expect("flush");
    }
    // The fd really is O_RDONLY: writing through the sync path fails with EBADF.
    let fd = disk.fd(crate::disk::FdChoice::Main).expect("fd");
    let err = crate::sys::pwrite(fd, &[0u8; 512], 0).expect_err("O_RDONLY");
    assert_eq!(err.raw_os_error(), Some(libc::EBADF));
}

#[test]
fn null_disk_completes_everything() {
    let disk = Arc::new(Disk::null(4 * MIB));
    assert!(disk.is_null());
    assert_eq!(disk.describe(), "null (null, 4 MiB)");
    for kind in [EngineKind::Auto, EngineKind::Uring, EngineKind::Sync] {
        let mut e = engine(&disk, kind);
        assert_eq!(e.kind_name(), "null");
        let mut buf = TestBuf::new(8192, 0);
        buf.bytes_mut().fill(0xaa);
        let c = run(&mut e, rw_op(OpKind::Read, 0, buf.iovecs(&[100]), false));
        assert_eq!(c.result.expect("read"), 8192);
        assert!(buf.bytes().iter().all(|&b| b == 0xaa), "data untouched");
        let c = run(&mut e, rw_op(OpKind::Write, 4096, buf.iovecs(&[]), true));
        assert_eq!(c.result.expect("write"), 8192);
        for op in ZEROING.into_iter().chain([OpKind::Flush]) {
            run(&mut e, data_less(op, 0, 4096, false)).result.expect("data-less op");
        }
        let c = run(&mut e, rw_op(OpKind::Read, 4 * MIB, buf.iovecs(&[]), false));
        assert!(matches!(c.result, Err(BackendError::OutOfRange { .. })));
        disk.flush_sync().expect("flush_sync");
    }
}

#[test]
fn create_size_makes_a_sparse_file() {
    let dir = TempDir::new();
    let path = dir.path("new.img");
    let opts = DiskOptions { readonly: false, direct: true, create_size: Some(10 * MIB) };
    let disk = Disk::open(&path, &opts).expect("create");
    assert_eq!(disk.size(), 10 * MIB);
    assert_eq!(disk.path(), Some(path.as_path()));
    assert!(!disk.is_block_device());
    assert!(disk.logical_block_size() >= 512);
    let meta = std::fs::metadata(&path).expect("stat");
    assert_eq!(meta.len(), 10 * MIB);
    assert_eq!(meta.blocks(), 0, "sparse");
    assert!(disk.describe().contains("(raw file, 10 MiB"), "{}", disk.describe());
    drop(disk);

    // An existing file is used as it is.
    let opts = DiskOptions { create_size: Some(MIB), ..opts };
    assert_eq!(Disk::open(&path, &opts).expect("reopen").size(), 10 * MIB);
}

#[test]
fn open_errors() {
    let dir = TempDir::new();
    let missing = dir.path("missing.img");
    let err = Disk::open(&missing, &DiskOptions::default()).expect_err("missing");
    assert!(matches!(&err, BackendError::Open { path, .. } if path == &missing));
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    // Read-only never creates.
    let opts = DiskOptions { readonly: true, direct: false, create_size: Some(MIB) };
    assert!(Disk::open(&missing, &opts).is_err());
    assert!(!missing.exists());
    // A directory is neither a file nor a block device.
    let err = Disk::open(&dir.path(""), &DiskOptions { direct: false, ..DiskOptions::default() });
    assert!(matches!(err, Err(BackendError::Open { .. })));
    // Depth 0 is refused.
    assert!(Engine::new(Arc::new(Disk::null(512)), EngineKind::Sync, 0).is_err());
}

#[test]
fn tmpfs_direct_open_works_either_way() {
    let Some(dir) = TempDir::new_shm() else { return };
    let disk = open_new(&dir, "d.img", MIB, true);
    // Whatever the kernel decided, I/O must work.
    let mut e = engine(&disk, EngineKind::Auto);
    let mut data = TestBuf::pattern(4096, 0, 4);
    write_ok(&mut e, 0, &mut data, &[], false);
    assert_eq!(read_back(&mut e, 0, 4096, 0, &[]), data.bytes());
}

#[test]
fn human_sizes() {
    assert_eq!(human_size(0), "0 bytes");
    assert_eq!(human_size(512), "512 bytes");
    assert_eq!(human_size(1 << 30), "1 GiB");
    assert_eq!(human_size(3 << 29), "1.5 GiB");
    assert_eq!(human_size(1536), "1.5 KiB");
}

/// Needs root and loop devices: `cargo test -p vblk-backend -- --ignored`.
#[test]
#[ignore]
fn loop_block_device() {
    let dir = TempDir::new();
    with_loop_device(&dir, 8 * MIB, |dev, _| {
        let disk = Arc::new(Disk::open(Path::new(dev), &DiskOptions::default()).expect("open dev"));
        assert!(disk.is_block_device());
        assert_eq!(disk.size(), 8 * MIB);
        assert_eq!(disk.logical_block_size(), 512);
        eprintln!("{}", disk.describe());
        for kind in kinds() {
            let mut e = engine(&disk, kind);
            let mut data = TestBuf::pattern(64 * 1024, 0, 8);
            write_ok(&mut e, 0, &mut data, &[], false);
            assert_eq!(read_back(&mut e, 0, 64 * 1024, 8, &[700]), data.bytes());
            for op in [OpKind::WriteZeroes { unmap: false }, OpKind::WriteZeroes { unmap: true }] {
                check_zeroing(&mut e, op, true);
            }
            run(&mut e, data_less(OpKind::Discard, 0, 4096, false)).result.expect("discard");
            run(&mut e, data_less(OpKind::Flush, 0, 0, false)).result.expect("flush");
        }
    });
}

#[test]
fn auto_uses_the_synchronous_engine_for_images_in_memory() {
    let Some(shm) = TempDir::new_shm() else {
        eprintln!("SKIPPED: no tmpfs at /dev/shm");
        return;
    };
    let opts = DiskOptions { readonly: false, direct: true, create_size: Some(MIB) };
    let in_memory = Arc::new(Disk::open(&shm.path("m.img"), &opts).expect("open on tmpfs"));
    assert!(in_memory.is_memory_backed());
    assert!(in_memory.describe().contains(", in memory"), "{}", in_memory.describe());
    assert_eq!(Engine::new(in_memory.clone(), EngineKind::Auto, 8).unwrap().kind_name(), "sync");
    assert_eq!(Engine::new(in_memory, EngineKind::Uring, 8).unwrap().kind_name(), "io_uring", "explicit choice wins");

    let dir = TempDir::new();
    let on_disk = Arc::new(Disk::open(&dir.path("d.img"), &opts).expect("open"));
    if !on_disk.is_memory_backed() {
        assert_eq!(Engine::new(on_disk, EngineKind::Auto, 8).unwrap().kind_name(), "io_uring");
    }
}
