//! Online resize of raw files and the null backend (`Disk::resize`); qcow2 in
//! `qcow2/tests.rs`, RBD in the cluster tests, block devices below (loop device, ignored).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::BackendError;

const MIB: u64 = 1 << 20;

fn op_at(e: &mut Engine, kind: OpKind, offset: u64, len: usize) -> Result<u64, BackendError> {
    let mut buf = TestBuf::pattern(len, 0, 3);
    run(e, rw_op(kind, offset, buf.iovecs(&[]), false)).result
}

#[test]
fn a_raw_file_grows_sparse_and_takes_writes_at_its_new_end() {
    let dir = TempDir::new();
    for kind in kinds() {
        for direct in [true, false] {
            let name = format!("grow-{kind:?}-{direct}.img");
            let disk = open_new(&dir, &name, MIB, direct);
            let mut e = engine(&disk, kind);
            let mut data = TestBuf::pattern(64 * 1024, 0, 21);
            write_ok(&mut e, 0, &mut data, &[], false);
            let past = op_at(&mut e, OpKind::Write, 2 * MIB, 4096);
            assert!(matches!(past, Err(BackendError::OutOfRange { .. })), "{past:?}");
            let blocks = std::fs::metadata(dir.path(&name)).unwrap().blocks();

            assert_eq!(disk.resize(3 * MIB).expect("grow"), 3 * MIB);
            assert_eq!(disk.size(), 3 * MIB);
            let meta = std::fs::metadata(dir.path(&name)).unwrap();
            assert_eq!(meta.len(), 3 * MIB);
            assert_eq!(meta.blocks(), blocks, "the new range is a hole");
            assert!(disk.describe().contains("3 MiB"), "{}", disk.describe());

            // The engine made before the resize sees the new size.
            let mut end = TestBuf::pattern(4096, 0, 77);
            write_ok(&mut e, 3 * MIB - 4096, &mut end, &[], false);
            assert_eq!(read_back(&mut e, 3 * MIB - 4096, 4096, 0, &[]), end.bytes());
            assert!(read_back(&mut e, MIB, 64 * 1024, 0, &[]).iter().all(|&b| b == 0));
            assert_eq!(read_back(&mut e, 0, 64 * 1024, 0, &[]), data.bytes(), "old data kept");
            let past = op_at(&mut e, OpKind::Read, 3 * MIB, 512);
            assert!(matches!(past, Err(BackendError::OutOfRange { .. })), "{past:?}");
        }
    }
}

#[test]
fn a_raw_file_shrinks_and_io_past_its_new_end_is_refused() {
    let dir = TempDir::new();
    for kind in kinds() {
        let name = format!("shrink-{kind:?}.img");
        let disk = open_new(&dir, &name, 4 * MIB, true);
        let mut e = engine(&disk, kind);
        let mut head = TestBuf::pattern(8192, 0, 5);
        write_ok(&mut e, MIB, &mut head, &[], false);
        let mut tail = TestBuf::pattern(8192, 0, 6);
        write_ok(&mut e, 3 * MIB, &mut tail, &[], false);

        assert_eq!(disk.resize(2 * MIB).expect("shrink"), 2 * MIB);
        assert_eq!(std::fs::metadata(dir.path(&name)).unwrap().len(), 2 * MIB);
        for k in [OpKind::Read, OpKind::Write] {
            let r = op_at(&mut e, k, 3 * MIB, 4096);
            assert!(matches!(r, Err(BackendError::OutOfRange { size, .. }) if size == 2 * MIB), "{k:?}: {r:?}");
        }
        let r = op_at(&mut e, OpKind::Write, 2 * MIB - 4096, 8192);
        assert!(matches!(r, Err(BackendError::OutOfRange { .. })), "straddling the new end: {r:?}");
        assert_eq!(read_back(&mut e, MIB, 8192, 0, &[]), head.bytes());

        // What was cut off is gone: growing again gives zeros there.
        disk.resize(4 * MIB).expect("grow again");
        assert!(read_back(&mut e, 3 * MIB, 8192, 0, &[]).iter().all(|&b| b == 0));
    }
}

#[test]
fn sizes_are_checked_and_read_only_disks_refuse() {
    let dir = TempDir::new();
    let disk = open_new(&dir, "check.img", MIB, false);
    for bad in [0, 1000, MIB + 1, MIB + 4095 - 512] {
        let r = disk.resize(bad);
        assert!(matches!(r, Err(BackendError::BadSize { size, align: 512 }) if size == bad), "{bad}: {r:?}");
        assert!(matches!(disk.resize_target(bad), Err(BackendError::BadSize { .. })));
    }
    assert_eq!(disk.size(), MIB, "a refused resize changes nothing");
    assert_eq!(disk.resize(MIB).unwrap(), MIB, "the same size is no error");
    assert_eq!(disk.resize_target(8 * MIB).unwrap(), 8 * MIB);
    assert_eq!(disk.size(), MIB, "resize_target only checks");
    let e = BackendError::BadSize { size: 1000, align: 512 }.to_string();
    assert!(e.contains("1000") && e.contains("multiple of 512"), "{e}");

    let opts = DiskOptions { readonly: true, direct: false, create_size: None };
    let ro = Disk::open(&dir.path("check.img"), &opts).expect("open read-only");
    assert!(matches!(ro.resize(2 * MIB), Err(BackendError::ReadOnly)));
    assert!(matches!(ro.resize_target(2 * MIB), Err(BackendError::ReadOnly)));
    assert_eq!(std::fs::metadata(dir.path("check.img")).unwrap().len(), MIB);
}

#[test]
fn the_null_backend_takes_the_new_size() {
    let disk = Arc::new(Disk::null(MIB));
    let mut e = Engine::new(Arc::clone(&disk), EngineKind::Auto, 4).unwrap();
    assert!(matches!(op_at(&mut e, OpKind::Write, 4 * MIB, 4096), Err(BackendError::OutOfRange { .. })));
    assert_eq!(disk.resize(8 * MIB).unwrap(), 8 * MIB);
    assert_eq!(disk.size(), 8 * MIB);
    assert_eq!(op_at(&mut e, OpKind::Write, 8 * MIB - 4096, 4096).unwrap(), 4096);
    assert_eq!(disk.resize(2 * MIB).unwrap(), 2 * MIB);
    assert!(matches!(op_at(&mut e, OpKind::Read, 4 * MIB, 4096), Err(BackendError::OutOfRange { .. })));
}

#[test]
fn resizes_from_several_threads_leave_one_consistent_size() {
    let dir = TempDir::new();
    let disk = open_new(&dir, "race.img", MIB, false);
    let threads: Vec<_> = (1..=8u64)
        .map(|i| {
            let d = Arc::clone(&disk);
            std::thread::spawn(move || d.resize(i * MIB).unwrap())
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(std::fs::metadata(dir.path("race.img")).unwrap().len(), disk.size(), "file and disk agree");
}

/// A block device is resized by its owner; `resize` takes the device's new size and
/// ignores the number. Needs root and loop devices: `cargo test -p vblk-backend -- --ignored`.
#[test]
#[ignore]
fn a_block_device_takes_the_size_of_the_device() {
    use std::process::Command;
    let dir = TempDir::new();
    with_loop_device(&dir, 8 * MIB, |dev, img| {
        let disk = Arc::new(Disk::open(Path::new(dev), &DiskOptions::default()).expect("open dev"));
        assert_eq!(disk.size(), 8 * MIB);
        assert_eq!(disk.resize(8 * MIB).unwrap(), 8 * MIB, "unchanged device");
        std::fs::OpenOptions::new().write(true).open(img).unwrap().set_len(12 * MIB).unwrap();
        assert_eq!(disk.size(), 8 * MIB, "not yet re-read");
        let st = Command::new("losetup").args(["-c", dev]).status().expect("losetup -c");
        assert!(st.success());
        assert_eq!(disk.resize_target(4 * MIB).unwrap(), 12 * MIB, "the number is ignored");
        assert_eq!(disk.resize(4 * MIB).unwrap(), 12 * MIB);
        assert_eq!(disk.size(), 12 * MIB);
        let mut e = engine(&disk, EngineKind::Sync);
        let mut end = TestBuf::pattern(4096, 0, 9);
        write_ok(&mut e, 12 * MIB - 4096, &mut end, &[], false);
        assert_eq!(read_back(&mut e, 12 * MIB - 4096, 4096, 0, &[]), end.bytes());
    });
}
