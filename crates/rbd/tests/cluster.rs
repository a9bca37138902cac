//! vblk-rbd against a real Ceph cluster (no mock of librbd).
//!
//! The cluster comes from `VBLK_CEPH_CONF` (a `ceph.conf`; `scripts/test-rbd.sh` starts a
//! one-node cluster with `scripts/ceph-micro.sh` and sets it). Without it these tests fail,
//! unless `VBLK_SKIP_CEPH=1`. Each test makes its own images in pool `rbd` with the `rbd`
//! command and removes them at the end.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use vblk_rbd::{Cluster, Image, RbdError};

const MIB: u64 = 1 << 20;
/// RBD's default object size (order 22).
const OBJECT: u64 = 4 * MIB;
const POOL: &str = "rbd";

/// The cluster's `ceph.conf`, or `None` (with a message) when the test is to be skipped.
fn ceph_conf(test: &str) -> Option<PathBuf> {
    if std::env::var("VBLK_SKIP_CEPH").as_deref() == Ok("1") {
        eprintln!("SKIPPED {test}: VBLK_SKIP_CEPH=1");
        return None;
    }
    match std::env::var_os("VBLK_CEPH_CONF") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => panic!(
            "VBLK_CEPH_CONF is not set: run scripts/test-rbd.sh (starts a one-node Ceph cluster), \
             or set VBLK_SKIP_CEPH=1 to skip the Ceph tests"
        ),
    }
}

/// Runs `rbd -c CONF ARGS...` and panics with its output if it fails.
fn rbd_cli(conf: &PathBuf, args: &[&str]) -> Vec<u8> {
    let out = Command::new("rbd")
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rbd ({e}): install ceph-common (scripts/ceph-micro.sh install)"));
    assert!(out.status.success(), "rbd {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// An image made for one test (`rbd create`), removed on drop (`rbd rm`).
struct TestImage {
    conf: PathBuf,
    name: String,
}

impl TestImage {
    fn create(conf: &PathBuf, test: &str, size: u64) -> TestImage {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("{test}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        rbd_cli(conf, &["create", &format!("{POOL}/{name}"), "--size", &format!("{}M", size / MIB)]);
        TestImage { conf: conf.clone(), name }
    }

    fn spec(&self) -> String {
        format!("{POOL}/{}", self.name)
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        // Snapshots first, or `rbd rm` refuses; failures only leak an image in a scratch cluster.
        for args in [vec!["snap", "purge", "--no-progress"], vec!["rm", "--no-progress"]] {
            let _ = Command::new("rbd").arg("-c").arg(&self.conf).args(&args).arg(self.spec()).output();
        }
    }
}

fn iov(buf: &mut [u8]) -> libc::iovec {
    libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }
}

/// A pattern that differs per byte and per `seed`, so misplaced data shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed).collect()
}

/// Waits until `n` more completions arrived (30 s at most) and returns them sorted by tag.
fn wait_for(image: &Image, n: usize) -> Vec<(u64, i64)> {
    let mut done = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while done.len() < n {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(!left.is_zero(), "only {} of {n} completions in 30 s: {done:?}", done.len());
        image.wait_completions(&mut done, Some(left)).expect("wait_completions");
    }
    assert_eq!(done.len(), n, "more completions than ops submitted: {done:?}");
    done.sort_unstable();
    done
}

/// Reads `len` bytes at `offset` through librbd.
fn read(image: &Image, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xEEu8; len];
    let iovs = [iov(&mut buf)];
    // SAFETY: `buf` is neither touched nor freed until its completion is reaped by `wait_for`.
    unsafe { image.aio_readv(&iovs, offset, 99) }.expect("aio_readv");
    assert_eq!(wait_for(image, 1), vec![(99, len as i64)], "read {len} at {offset}");
    buf
}

/// Writes `data` at `offset` through librbd and waits for it.
fn write(image: &Image, offset: u64, data: &[u8]) {
    let mut data = data.to_vec();
    let iovs = [iov(&mut data)];
    // SAFETY: `data` lives until the completion is reaped by `wait_for`.
    unsafe { image.aio_writev(&iovs, offset, 98) }.expect("aio_writev");
    assert_eq!(wait_for(image, 1), vec![(98, 0)], "write {} at {offset}", data.len());
}

fn flush(image: &Image) {
    image.aio_flush(97).expect("aio_flush");
    assert_eq!(wait_for(image, 1), vec![(97, 0)], "flush");
}

/// The image's bytes `offset..offset + len` as `rbd export` (another client) sees them.
fn export_range(conf: &PathBuf, spec: &str, offset: u64, len: usize) -> Vec<u8> {
    let all = rbd_cli(conf, &["export", "--no-progress", spec, "-"]);
    all[offset as usize..offset as usize + len].to_vec()
}

#[test]
fn writev_two_offsets_flush_readv() {
    let Some(conf) = ceph_conf("writev_two_offsets_flush_readv") else { return };
    let img = TestImage::create(&conf, "rw", 64 * MIB);
    let cluster = Cluster::connect(Some(&conf), None).expect("connect");
    let image = cluster.open_image(POOL, &img.name, None, false).expect("open");
    assert_eq!(image.size().unwrap(), 64 * MIB);
    assert!(!image.is_read_only());

    // A: 3 iovecs, crossing the boundary between objects 0 and 1. B: 2 iovecs, far away.
    let (off_a, off_b) = (OBJECT - 8192, 37 * MIB + 512);
    let a = pattern(20 * 1024, 0x11);
    let b = pattern(8192, 0x77);
    let mut a_bufs: Vec<Vec<u8>> = vec![a[..4096].to_vec(), a[4096..12288].to_vec(), a[12288..].to_vec()];
    let mut b_bufs: Vec<Vec<u8>> = vec![b[..512].to_vec(), b[512..].to_vec()];
    let a_iovs: Vec<libc::iovec> = a_bufs.iter_mut().map(|v| iov(v)).collect();
    let b_iovs: Vec<libc::iovec> = b_bufs.iter_mut().map(|v| iov(v)).collect();
    // SAFETY: the buffers live and stay untouched until both completions are reaped below.
    unsafe {
        image.aio_writev(&a_iovs, off_a, 1).expect("writev A");
        image.aio_writev(&b_iovs, off_b, 2).expect("writev B");
    }
    assert_eq!(image.in_flight(), 2);
    assert_eq!(wait_for(&image, 2), vec![(1, 0), (2, 0)]);
    assert_eq!(image.in_flight(), 0);
    flush(&image);

    // Read both back, scattered differently from how they were written.
    let mut r_a = [vec![0u8; 1000], vec![0u8; a.len() - 1000]];
    let mut r_b = vec![0u8; b.len()];
    let r_a_iovs: Vec<libc::iovec> = r_a.iter_mut().map(|v| iov(v)).collect();
    let r_b_iovs = [iov(&mut r_b)];
    // SAFETY: as above, until `wait_for` returns.
    unsafe {
        image.aio_readv(&r_a_iovs, off_a, 3).expect("readv A");
        image.aio_readv(&r_b_iovs, off_b, 4).expect("readv B");
    }
    assert_eq!(wait_for(&image, 2), vec![(3, a.len() as i64), (4, b.len() as i64)]);
    assert_eq!(r_a.concat(), a, "A read back");
    assert_eq!(r_b, b, "B read back");
    // Untouched bytes around them read as zeros.
    assert_eq!(read(&image, off_a - 4096, 4096), vec![0; 4096]);
    assert_eq!(read(&image, off_b + b.len() as u64, 4096), vec![0; 4096]);
    // Another client (the rbd command) sees the flushed data in the cluster.
    assert_eq!(export_range(&conf, &img.spec(), off_a, a.len()), a, "A through rbd export");
    assert_eq!(export_range(&conf, &img.spec(), off_b, b.len()), b, "B through rbd export");
}

#[test]
fn discard_then_reads_zeros() {
    let Some(conf) = ceph_conf("discard_then_reads_zeros") else { return };
    let img = TestImage::create(&conf, "discard", 32 * MIB);
    let cluster = Cluster::connect(Some(&conf), None).expect("connect");
    let image = cluster.open_image(POOL, &img.name, None, false).expect("open");

    // Objects 1 and 2 full of data; discard all of object 1 and an aligned 128 KiB inside
    // object 2 (librbd skips discards smaller than rbd_discard_granularity_bytes, 64 KiB).
    let data = pattern(2 * OBJECT as usize, 0x5a);
    write(&image, OBJECT, &data);
    flush(&image);
    image.aio_discard(OBJECT, OBJECT, 10).expect("discard object 1");
    image.aio_discard(2 * OBJECT + MIB, 128 * 1024, 11).expect("discard inside object 2");
    assert_eq!(wait_for(&image, 2), vec![(10, 0), (11, 0)]);

    assert_eq!(read(&image, OBJECT, OBJECT as usize), vec![0; OBJECT as usize], "object 1 after discard");
    let obj2 = read(&image, 2 * OBJECT, OBJECT as usize);
    let hole = MIB as usize..MIB as usize + 128 * 1024;
    assert_eq!(&obj2[hole.clone()], &vec![0u8; hole.len()][..], "discarded range in object 2");
    assert_eq!(&obj2[..hole.start], &data[OBJECT as usize..OBJECT as usize + hole.start], "before the hole");
    assert_eq!(&obj2[hole.end..], &data[OBJECT as usize + hole.end..], "after the hole");
}

#[test]
fn write_zeroes_zeroes_exactly_the_range() {
    let Some(conf) = ceph_conf("write_zeroes_zeroes_exactly_the_range") else { return };
    let img = TestImage::create(&conf, "zeroes", 16 * MIB);
    let cluster = Cluster::connect(Some(&conf), None).expect("connect");
    let image = cluster.open_image(POOL, &img.name, None, false).expect("open");

    // Sector-aligned but not 4 KiB- or object-aligned, crossing objects 0 and 1.
    let base = OBJECT - MIB;
    let data = pattern(2 * MIB as usize, 0xc3);
    write(&image, base, &data);
    let (z_off, z_len) = (base + 512 * 3, MIB + 4096 * 5 + 512);
    image.aio_write_zeroes(z_off, z_len, 20).expect("write_zeroes");
    assert_eq!(wait_for(&image, 1), vec![(20, 0)]);
    flush(&image);

    let mut want = data.clone();
    let z = (z_off - base) as usize..(z_off - base + z_len) as usize;
    want[z].fill(0);
    assert_eq!(read(&image, base, data.len()), want, "through librbd");
    assert_eq!(export_range(&conf, &img.spec(), base, data.len()), want, "through rbd export");
}

#[test]
fn snapshot_and_read_only_opens_refuse_writes() {
    let Some(conf) = ceph_conf("snapshot_and_read_only_opens_refuse_writes") else { return };
    let img = TestImage::create(&conf, "snap", 8 * MIB);
    let cluster = Cluster::connect(Some(&conf), None).expect("connect");
    let old = pattern(64 * 1024, 0x01);
    let new = pattern(64 * 1024, 0x02);
    {
        let image = cluster.open_image(POOL, &img.name, None, false).expect("open");
        write(&image, 0, &old);
        flush(&image);
    }
    rbd_cli(&conf, &["snap", "create", &format!("{}@s1", img.spec())]);
    {
        let image = cluster.open_image(POOL, &img.name, None, false).expect("open head");
        write(&image, 0, &new);
        flush(&image);
    }

    // At the snapshot, even when not asked for read-only: the old data, and writes fail.
    for readonly in [false, true] {
        let snap = cluster.open_image(POOL, &img.name, Some("s1"), readonly).expect("open @s1");
        assert!(snap.is_read_only());
        assert_eq!(snap.spec(), format!("{}@s1", img.spec()));
        assert_eq!(read(&snap, 0, old.len()), old, "snapshot data (readonly={readonly})");
        expect_erofs(&snap, "snapshot");
    }
    // The head opened read-only: the new data, writes fail.
    let ro = cluster.open_image(POOL, &img.name, None, true).expect("open read-only");
    assert!(ro.is_read_only());
    assert_eq!(read(&ro, 0, new.len()), new);
    expect_erofs(&ro, "read-only head");
    drop(ro);
    // Nothing was written through the refusals.
    assert_eq!(export_range(&conf, &img.spec(), 0, new.len()), new);
    assert_eq!(export_range(&conf, &format!("{}@s1", img.spec()), 0, old.len()), old);
}

/// Every write-like op on `image` fails with EROFS, at submission or (librbd's way) in
/// its completion.
fn expect_erofs(image: &Image, what: &str) {
    let mut buf = vec![0xffu8; 4096];
    let iovs = [iov(&mut buf)];
    let mut submitted = Vec::new();
    // SAFETY: `buf` lives until the completions are reaped below.
    let results = [
        (30, unsafe { image.aio_writev(&iovs, 0, 30) }),
        (31, image.aio_discard(0, OBJECT, 31)),
        (32, image.aio_write_zeroes(0, 4096, 32)),
    ];
    for (tag, r) in results {
        match r {
            Ok(()) => submitted.push(tag),
            Err(e) => assert_eq!(e.errno(), Some(libc::EROFS), "{what}: tag {tag} refused with {e}"),
        }
    }
    for (tag, result) in wait_for(image, submitted.len()) {
        assert_eq!(result, -(libc::EROFS as i64), "{what}: tag {tag} completed with {result}");
    }
}

#[test]
fn missing_image_and_pool_are_enoent() {
    let Some(conf) = ceph_conf("missing_image_and_pool_are_enoent") else { return };
    let cluster = Cluster::connect(Some(&conf), None).expect("connect");

    let err = cluster.open_image(POOL, "no-such-image", None, false).unwrap_err();
    assert_eq!(err.errno(), Some(libc::ENOENT), "{err}");
    assert!(matches!(err, RbdError::Ceph { call: "rbd_open", .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("rbd/no-such-image") && msg.contains("No such file or directory"), "{msg}");

    let err = cluster.open_image("no-such-pool", "x", None, true).unwrap_err();
    assert_eq!(err.errno(), Some(libc::ENOENT), "{err}");
    assert!(matches!(err, RbdError::Ceph { call: "rados_ioctx_create", .. }), "{err:?}");

    let err = cluster.open_image(POOL, "nul\0byte", None, false).unwrap_err();
    assert!(matches!(err, RbdError::InvalidArgument { .. }), "{err:?}");

    let err = Cluster::connect(Some(std::path::Path::new("/nonexistent/ceph.conf")), None).unwrap_err();
    assert!(matches!(err, RbdError::Ceph { call: "rados_conf_read_file", .. }), "{err:?}");
}

#[test]
fn completion_fd_signals_and_resets() {
    let Some(conf) = ceph_conf("completion_fd_signals_and_resets") else { return };
    let img = TestImage::create(&conf, "eventfd", 8 * MIB);
    let cluster = Cluster::connect(Some(&conf), None).expect("connect");
    let image = cluster.open_image(POOL, &img.name, None, false).expect("open");
    let poll_fd = |timeout_ms: i32| {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd { fd: image.completion_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut pfd, 1, timeout_ms) }
    };
    let mut done = Vec::new();
    assert_eq!(poll_fd(0), 0, "readable before any I/O");
    assert_eq!(image.poll_completions(&mut done).unwrap(), 0);

    for round in 0..3u64 {
        image.aio_write_zeroes(round * MIB, 4096, 40 + round).expect("write_zeroes");
        image.aio_flush(50 + round).expect("flush");
        // The eventfd alone says when to collect; both ops arrive, perhaps in two wake-ups.
        while done.len() < 2 {
            assert_eq!(poll_fd(10_000), 1, "round {round}: no wake-up in 10 s");
            image.poll_completions(&mut done).unwrap();
        }
        done.sort_unstable();
        assert_eq!(done, vec![(40 + round, 0), (50 + round, 0)]);
        done.clear();
        assert_eq!(image.in_flight(), 0);
        // librbd queues a completion before it signals the eventfd, so a wake-up can arrive
        // after its op was collected: such a late wake-up yields nothing.
        poll_fd(100);
        assert_eq!(image.poll_completions(&mut done).unwrap(), 0, "round {round}: completion out of nowhere");
    }
}

#[test]
fn drop_waits_for_io_in_flight() {
    let Some(conf) = ceph_conf("drop_waits_for_io_in_flight") else { return };
    let img = TestImage::create(&conf, "drop", 16 * MIB);
    let cluster = Cluster::connect(Some(&conf), None).expect("connect");
    let mut bufs: Vec<Vec<u8>> = (0..32).map(|i| pattern(64 * 1024, i as u8)).collect();
    let image = cluster.open_image(POOL, &img.name, None, false).expect("open");
    for (i, buf) in bufs.iter_mut().enumerate() {
        let iovs = [iov(buf)];
        // SAFETY: `bufs` outlives `image`, whose drop below waits for every write.
        unsafe { image.aio_writev(&iovs, i as u64 * 128 * 1024, i as u64) }.expect("writev");
    }
    image.aio_flush(1000).expect("flush");
    drop(image); // waits for the 33 ops, releases their completions, closes
    drop(cluster); // the image held the connection; this shuts it down

    let cluster = Cluster::connect(Some(&conf), Some("admin")).expect("reconnect");
    let image = cluster.open_image(POOL, &img.name, None, true).expect("reopen");
    for (i, buf) in bufs.iter().enumerate() {
        assert_eq!(&read(&image, i as u64 * 128 * 1024, buf.len()), buf, "write {i}");
    }
}

#[test]
fn resize_grows_and_shrinks_the_image() {
    let Some(conf) = ceph_conf("resize_grows_and_shrinks_the_image") else { return };
    let img = TestImage::create(&conf, "resize", 8 * MIB);
    let cluster = Cluster::connect(Some(&conf), None).expect("connect");
    let image = cluster.open_image(POOL, &img.name, None, false).expect("open");
    let head = pattern(64 * 1024, 0x21);
    write(&image, 0, &head);

    image.resize(16 * MIB).expect("grow");
    assert_eq!(image.size().unwrap(), 16 * MIB);
    let tail = pattern(64 * 1024, 0x22);
    write(&image, 16 * MIB - tail.len() as u64, &tail);
    flush(&image);
    assert_eq!(read(&image, 12 * MIB, 4096), vec![0; 4096], "the new range reads as zeros");
    // Another client sees the new size and the data at the new end.
    assert_eq!(rbd_cli(&conf, &["export", "--no-progress", &img.spec(), "-"]).len() as u64, 16 * MIB);
    assert_eq!(export_range(&conf, &img.spec(), 16 * MIB - tail.len() as u64, tail.len()), tail);

    image.resize(4 * MIB).expect("shrink");
    assert_eq!(image.size().unwrap(), 4 * MIB);
    assert_eq!(read(&image, 0, head.len()), head, "data below the new end kept");
    image.resize(16 * MIB).expect("grow again");
    assert_eq!(read(&image, 16 * MIB - tail.len() as u64, tail.len()), vec![0; tail.len()], "cut off for good");

    let ro = cluster.open_image(POOL, &img.name, None, true).expect("open read-only");
    let err = ro.resize(32 * MIB).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EROFS), "{err}");
    assert!(matches!(err, RbdError::Ceph { call: "rbd_resize", .. }), "{err:?}");
}
