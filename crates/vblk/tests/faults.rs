//! Faults from below: `vblk serve --inject SPEC` (and a really full filesystem) against the
//! driver library. Whatever the disk does, the request that hit the fault gets IOERR, its
//! neighbours are served, the daemon survives and serves the next frontend.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::client::{Client, UNREAD};
use common::*;
use vblk_driver::{Op, RequestFailure};

const KIB: u64 = 1024;
const IOERR: Result<(), RequestFailure> = Err(RequestFailure::IoErr);

/// A `vblk serve` on a fresh sparse image in its own temp dir.
struct Daemon {
    // Field order = drop order: the daemon goes before its directory.
    backend: BackendProcess,
    _dir: TempDir,
}

impl Daemon {
    /// Serves a `size`-byte image (written by `prepare` first) with `args`.
    fn start(name: &str, size: u64, args: &'static [&'static str], prepare: impl FnOnce(&Path)) -> Daemon {
        let dir = TempDir::new(name);
        let image = dir.join("disk.img");
        create_image(&image, size);
        prepare(&image);
        Daemon::on(dir, image, args)
    }

    fn on(dir: TempDir, image: PathBuf, args: &'static [&'static str]) -> Daemon {
        let cfg = BackendConfig { readonly: false, num_queues: 1, vblk_args: args };
        let backend = BackendProcess::start(Backend::Vblk, &image, &socket_path(&dir), cfg, &dir.join("vblk.log"))
            .unwrap_or_else(|e| panic!("starting vblk serve failed: {e}"));
        Daemon { backend, _dir: dir }
    }

    fn connect(&self) -> Client {
        Client::connect(&self.backend.socket)
    }

    /// The daemon is still running, and a new frontend (the previous one gone) is served
    /// at an offset no test injects faults at.
    fn still_serves(&mut self) {
        self.backend.check_alive().expect("vblk serve died");
        let mut c = self.connect();
        c.read(15 << 20, 4096).expect("a new connection can read");
    }
}

/// Both engines, for the tests whose fault path differs between them.
const ENGINES: [&str; 2] = ["sync", "io-uring"];

#[test]
fn read_eio_at_an_offset_fails_that_request_only() {
    for (engine, args) in ENGINES.iter().zip([
        &["--engine", "sync", "--inject", "read:eio@offset=1M-1028K"][..],
        &["--engine", "io-uring", "--inject", "read:eio@offset=1M-1028K"][..],
    ]) {
        let mut d = Daemon::start("read-eio", 16 << 20, args, |_| {});
        let mut c = d.connect();
        let data = pattern(1, 12 * KIB as usize);
        c.write(1020 * KIB, &data).expect("writes are not faulted");
        assert_eq!(c.read(1020 * KIB, 4096).as_deref(), Ok(&data[..4096]), "{engine}: left neighbour");
        assert_eq!(c.read(1024 * KIB, 4096), Err(RequestFailure::IoErr), "{engine}: the faulty range");
        assert_eq!(c.read(1028 * KIB, 4096).as_deref(), Ok(&data[8192..]), "{engine}: right neighbour");
        assert_eq!(c.read(1020 * KIB, 8192), Err(RequestFailure::IoErr), "{engine}: overlapping the range");
        drop(c);
        d.still_serves();
        assert_eq!(d.connect().read(1024 * KIB, 512), Err(RequestFailure::IoErr), "{engine}: still faulty");
    }
}

/// Which of 64 sequential 4 KiB writes fail under `write:eio@rate=0.25`; every write that
/// succeeded reads back, every one that failed left the disk untouched.
fn rate_run() -> Vec<bool> {
    let mut d = Daemon::start("write-rate", 16 << 20, &["--inject", "seed=5;write:eio@rate=0.25"], |_| {});
    let mut c = d.connect();
    let failed: Vec<bool> = (0..64u64).map(|i| c.write(i * 8 * KIB, &pattern(i, 4096)).is_err()).collect();
    for (i, &f) in failed.iter().enumerate() {
        let back = c.read(i as u64 * 8 * KIB, 4096).expect("reads are not faulted");
        let expect = if f { vec![0; 4096] } else { pattern(i as u64, 4096) };
        assert!(back == expect, "write {i} (failed: {f}) read back wrong");
    }
    drop(c);
    d.still_serves();
    failed
}

#[test]
fn write_eio_by_rate_fails_some_writes_deterministically() {
    let first = rate_run();
    let n = first.iter().filter(|&&f| f).count();
    assert!((4..=32).contains(&n), "{n} of 64 writes failed at rate 0.25");
    assert_eq!(rate_run(), first, "the same seed fails the same writes");
}

#[test]
fn after_a_failed_flush_every_flush_fails() {
    let mut d = Daemon::start("flush-eio", 16 << 20, &["--inject", "flush:eio@times=1"], |_| {});
    let mut c = d.connect();
    let data = pattern(2, 4096);
    c.write(0, &data).expect("write");
    assert_eq!(c.flush(), IOERR, "the injected failure");
    for _ in 0..3 {
        assert_eq!(c.flush(), IOERR, "the rule fired once; the disk remembers");
    }
    c.write(4096, &data).expect("writes go on");
    assert_eq!(c.read(4096, 4096).as_deref(), Ok(&data[..]));
    drop(c);
    d.still_serves();
    assert_eq!(d.connect().flush(), IOERR, "a new frontend is not told its data is durable either");
    // Nor is the operator: the final flush at shutdown fails, and says so.
    let st = d.backend.terminate(Duration::from_secs(10)).expect("vblk serve exits on SIGTERM");
    assert_eq!(st.code(), Some(1), "{}", d.backend.log_text());
    assert!(d.backend.log_text().contains("final flush failed"), "{}", d.backend.log_text());
}

#[test]
fn short_transfers_are_io_errors() {
    let data = pattern(3, 64 * KIB as usize);
    for (engine, args) in ENGINES.iter().zip([
        &["--engine", "sync", "--inject", "read:short@offset=0-64K;write:short@offset=1M-2M"][..],
        &["--engine", "io-uring", "--inject", "read:short@offset=0-64K;write:short@offset=1M-2M"][..],
    ]) {
        let mut d = Daemon::start("short", 16 << 20, args, |img| write_at(img, 0, &data));
        let mut c = d.connect();
        // Half of this read's buffer is never filled: it must not come back as data.
        assert_eq!(c.read(0, 8192), Err(RequestFailure::IoErr), "{engine}: short read");
        assert_eq!(c.read(64 * KIB, 8192).as_deref(), Ok(&[0u8; 8192][..]), "{engine}: not faulted");
        // A short write is an error too, although half of it reached the disk.
        assert_eq!(c.write(1 << 20, &data[..8192]), IOERR, "{engine}: short write");
        let back = c.read(1 << 20, 8192).expect("read back");
        assert!(back[..4096] == data[..4096] && back[4096..].iter().all(|&b| b == 0), "{engine}: half written");
        drop(c);
        d.still_serves();
    }
}

#[test]
fn delayed_requests_complete_later_with_the_right_data() {
    const DELAY: Duration = Duration::from_millis(300);
    for (engine, args) in ENGINES.iter().zip([
        &["--engine", "sync", "--inject", "any:delay=300ms@offset=2M-3M"][..],
        &["--engine", "io-uring", "--inject", "any:delay=300ms@offset=2M-3M"][..],
    ]) {
        let mut d = Daemon::start("delay", 16 << 20, args, |_| {});
        let mut c = d.connect();
        let data = pattern(4, 4096);
        let t = Instant::now();
        c.write(2 << 20, &data).expect("delayed write");
        assert!(t.elapsed() >= DELAY, "{engine}: the write took {:?}", t.elapsed());
        // A delayed read and a prompt one in one batch: the prompt one is not held up.
        let t = Instant::now();
        let (slow, fast) = (c.buf(&[UNREAD; 4096]), c.buf(&[UNREAD; 4096]));
        c.submit(Op::Read { offset: 2 << 20 }, Some(slow), 1);
        c.submit(Op::Read { offset: 0 }, Some(fast), 2);
        let mut done = c.wait_some();
        assert_eq!((done[0].user, done.len()), (2, 1), "{engine}: the prompt read first, alone");
        assert!(t.elapsed() < DELAY, "{engine}: the prompt read took {:?}", t.elapsed());
        done.extend(c.wait_some());
        assert!(t.elapsed() >= DELAY, "{engine}: the delayed read took {:?}", t.elapsed());
        let slow = done.pop().expect("delayed read");
        assert_eq!((slow.user, slow.result), (1, Ok(())));
        assert!(slow.buf.expect("buffer").to_vec().expect("read") == data, "{engine}: delayed read data");
        drop(c);
        d.still_serves();
    }
}

/// A tmpfs mounted for one test, unmounted (lazily, so a stray open file cannot keep it)
/// when dropped, even on panic.
struct Mount(PathBuf);

impl Mount {
    /// `None` (with the reason) when mounting is not permitted here.
    fn tmpfs(at: &Path, size: &str) -> Result<Mount, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "vblk-test-tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Mount(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg("-l").arg(&self.0).status().is_ok_and(|s| s.success());
        if !ok {
            eprintln!("warning: could not unmount {}", self.0.display());
        }
    }
}

#[test]
fn enospc_on_a_full_filesystem_is_ioerr_until_space_is_freed() {
    const CHUNK: u64 = 64 * KIB;
    // Drop order (reverse): the daemon, the mount, the directory holding the mount point.
    let base = TempDir::new("enospc");
    let mount = match Mount::tmpfs(&base.join("fs"), "2M") {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIPPED enospc_on_a_full_filesystem_is_ioerr_until_space_is_freed: cannot mount a tmpfs: {e}");
            return;
        }
    };
    // 1 MiB of the 2 MiB is taken by a filler file; the 16 MiB sparse image gets the rest.
    let filler = mount.0.join("filler");
    std::fs::write(&filler, vec![1u8; 1 << 20]).expect("filler");
    let image = mount.0.join("disk.img");
    create_image(&image, 16 << 20);
    let mut d = Daemon::on(TempDir::new("enospc-daemon"), image, &[]);
    let mut c = d.connect();

    let mut full_at = None;
    for i in 0..(16 << 20) / CHUNK {
        match c.write(i * CHUNK, &pattern(i, CHUNK as usize)) {
            Ok(()) => {}
            Err(e) => {
                assert_eq!(e, RequestFailure::IoErr, "a full filesystem is an I/O error");
                full_at = Some(i);
                break;
            }
        }
    }
    let full_at = full_at.expect("writing 16 MiB onto a 2 MiB filesystem never failed");
    assert!(full_at * CHUNK <= 1 << 20, "failed only after {} KiB", full_at * CHUNK / KIB);
    for _ in 0..3 {
        assert_eq!(c.write(full_at * CHUNK, &pattern(full_at, CHUNK as usize)), IOERR, "still full");
    }
    for i in 0..full_at {
        assert!(c.read(i * CHUNK, CHUNK as usize).expect("read") == pattern(i, CHUNK as usize), "chunk {i} lost");
    }

    std::fs::remove_file(&filler).expect("remove filler");
    for i in full_at..full_at + 4 {
        c.write(i * CHUNK, &pattern(i, CHUNK as usize)).expect("writes work again once space is freed");
        assert!(c.read(i * CHUNK, CHUNK as usize).expect("read") == pattern(i, CHUNK as usize));
    }
    c.flush().expect("flush");
    drop(c);
    d.still_serves();
    drop(d);
    drop(mount);
}

/// io_uring may refuse a submission for now (EAGAIN, EBUSY, ENOMEM) or take fewer SQEs
/// than queued; the ops left queued must be submitted again without waiting for another
/// request to arrive (none will: the guest waits for these). Both worker paths: sleeping
/// on eventfds and adaptive polling.
#[test]
fn a_refused_io_uring_submission_is_retried() {
    for poll in ["0", "50"] {
        let args: &'static [&'static str] = match poll {
            "0" => &["--engine", "io-uring", "--poll-us", "0", "--inject", "submit:eagain@times=5"],
            _ => &["--engine", "io-uring", "--poll-us", "50", "--inject", "submit:eagain@times=5"],
        };
        let mut d = Daemon::start("submit-eagain", 16 << 20, args, |_| {});
        let mut c = d.connect();
        let data = pattern(4, 8192);
        let t = Instant::now();
        c.write(64 * KIB, &data).expect("write");
        assert_eq!(c.read(64 * KIB, 8192).as_deref(), Ok(&data[..]), "--poll-us {poll}");
        c.flush().expect("flush");
        assert!(t.elapsed() < Duration::from_secs(5), "--poll-us {poll}: took {:?}", t.elapsed());
        assert!(d.backend.log_text().contains("I/O submission failed; retrying"), "the fault was injected");
        drop(c);
        d.still_serves();
    }
}

/// A block device whose write-back really fails: a loop device over a sparse file on a
/// small, full tmpfs. Buffered writes land in the page cache and succeed; `fdatasync` then
/// reports EIO, once per open file description (Linux's errseq).
struct FailingLoop {
    dev: PathBuf,
    _mount: Mount,
}

impl FailingLoop {
    fn new(base: &TempDir) -> Result<FailingLoop, String> {
        let mount = Mount::tmpfs(&base.join("fs"), "2M")?;
        let backing = mount.0.join("backing.img");
        create_image(&backing, 16 << 20);
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&backing)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(FailingLoop { dev, _mount: mount })
    }
}

impl Drop for FailingLoop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Two workers flush one disk with a write-back error pending. The first `fdatasync`
/// consumes the error on its open file description; the second must still fail, even
/// though the first worker has not reaped its failed flush yet (with one shared description
/// it succeeded: a FLUSH acknowledged data the disk had lost).
#[test]
fn a_write_back_error_fails_the_next_flush_of_every_worker() {
    use std::os::fd::AsRawFd;
    use vblk_backend::{Completion, Disk, DiskOptions, Engine, EngineKind, IoOp, OpKind};

    let base = TempDir::new("wb-error");
    let lo = match FailingLoop::new(&base) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("SKIPPED a_write_back_error_fails_the_next_flush_of_every_worker: no loop device on tmpfs: {e}");
            return;
        }
    };
    let opts = DiskOptions { readonly: false, direct: false, create_size: None };
    let disk = std::sync::Arc::new(Disk::open(&lo.dev, &opts).expect("open the loop device"));
    // As `vblk serve` does: one flush description per worker thread, before any I/O.
    disk.reserve_flushers(2).expect("flush descriptions");
    let mut a = Engine::new(disk.clone(), EngineKind::Uring, 8).expect("engine a");
    let mut b = Engine::new(disk.clone(), EngineKind::Uring, 8).expect("engine b");
    let wait_one = |e: &mut Engine| -> Completion {
        let mut out = Vec::new();
        while out.is_empty() {
            e.wait(&mut out).expect("wait");
        }
        out.pop().unwrap()
    };

    // 6 MiB of buffered writes through worker a: into the page cache, all successful.
    let data = vec![0x5au8; 1 << 20];
    for i in 0..6u64 {
        let iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
        let op = IoOp { kind: OpKind::Write, offset: i << 20, len: 1 << 20, iovs: vec![iov], fua: false, tag: i };
        // SAFETY: `data` outlives the op: we wait for its completion right here.
        unsafe { a.push(op) }.expect("room");
        a.submit().expect("submit");
        assert_eq!(wait_one(&mut a).result.expect("buffered write"), 1 << 20);
    }

    // Worker a flushes: the kernel reports the write-back error to its description...
    // SAFETY: a flush carries no buffers.
    unsafe { a.push(IoOp::without_data(OpKind::Flush, 0, 0, false, 100)) }.expect("room");
    a.submit().expect("submit");
    let mut pfd = libc::pollfd { fd: a.completion_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 20_000) }, 1, "worker a's flush never completed");
    // ... and before worker a reaps that, worker b flushes.
    // SAFETY: as above.
    unsafe { b.push(IoOp::without_data(OpKind::Flush, 0, 0, false, 200)) }.expect("room");
    b.submit().expect("submit");
    let rb = wait_one(&mut b).result;
    let ra = wait_one(&mut a).result;
    assert!(ra.is_err(), "worker a's flush must fail: {ra:?}");
    assert!(rb.is_err(), "worker b's flush succeeded although the data it vouches for was lost");
    // And every flush after that fails, on any worker.
    // SAFETY: as above.
    unsafe { b.push(IoOp::without_data(OpKind::Flush, 0, 0, false, 201)) }.expect("room");
    b.submit().expect("submit");
    assert!(wait_one(&mut b).result.is_err());
    drop((a, b, disk));
}
