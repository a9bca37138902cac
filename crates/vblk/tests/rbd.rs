//! `vblk serve rbd:POOL/IMAGE[@SNAP]` against a real one-node Ceph cluster
//! (scripts/ceph-micro.sh): the driver's verify on two queues; data written through vblk is
//! what `rbd export` reads (and an image made by `rbd import` reads back through vblk); a
//! snapshot is served read-only with its own data; qemu-storage-daemon's rbd driver reads
//! vblk's writes and the other way round; an OSD stopped during I/O: requests end within a
//! bound set by `--rbd-timeout`, the daemon keeps running, and I/O works again once the OSD
//! is back; the command line's refusals.
//!
//! The cluster comes from `VBLK_CEPH_CONF` (scripts/test.sh starts one and exports it); when
//! it is unset every test fails, unless `VBLK_SKIP_CEPH=1` (then they say so and pass). Each
//! test works on images of its own (`rbd/vblk-TEST-PID-...`, removed at the end). The OSD test
//! stops an OSD, so it starts a cluster of its own rather than break the others' I/O.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::client::Client;
use common::*;
use vblk_driver::RequestFailure;

/// A name no other test (or test run) uses.
fn unique(what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("vblk-{what}-{}-{}-{nanos:x}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Runs `cmd` to the end; killed (and the test failed) past `limit`: nothing here may hang.
fn run(cmd: &mut Command, limit: Duration) -> Output {
    let mut c = Command::new("timeout");
    c.args(["-k", "5", &limit.as_secs().to_string()]).arg(cmd.get_program()).args(cmd.get_args());
    let out = c.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    // timeout(1): 124 when it stopped the command (SIGTERM), 137 when it had to kill it.
    assert!(!matches!(out.status.code(), Some(124 | 137)), "{cmd:?} did not finish within {limit:?}: {}", text(&out));
    out
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn vblk(args: &[&str]) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_vblk")).args(args), Duration::from_secs(120))
}

fn rbd(conf: &Path, args: &[&str]) -> Output {
    let out = run(Command::new("rbd").arg("-c").arg(conf).arg("--no-progress").args(args), Duration::from_secs(60));
    assert!(out.status.success(), "rbd {args:?}: {}", text(&out));
    out
}

/// An image in pool `rbd` of the cluster at `conf`, removed (best effort) on drop.
struct Image {
    conf: PathBuf,
    name: String,
}

impl Image {
    /// `rbd create rbd/NAME --size 64M`.
    fn create(conf: &Path, test: &str) -> Image {
        let img = Image { conf: conf.to_path_buf(), name: unique(test) };
        rbd(conf, &["create", &img.path(), "--size", "64M"]);
        img
    }

    /// `rbd import FILE rbd/NAME`: the image is the file, byte for byte.
    fn import(conf: &Path, test: &str, file: &Path) -> Image {
        let img = Image { conf: conf.to_path_buf(), name: unique(test) };
        rbd(conf, &["import", s(file), &img.path()]);
        img
    }

    /// `rbd/NAME`.
    fn path(&self) -> String {
        format!("rbd/{}", self.name)
    }

    /// `rbd:rbd/NAME`, what `vblk serve` takes.
    fn spec(&self) -> String {
        format!("rbd:{}", self.path())
    }

    /// The whole image (or snapshot `@snap`) as `rbd export` reads it.
    fn export(&self, snap: &str, dir: &TempDir) -> Vec<u8> {
        let file = dir.join(unique("export"));
        rbd(&self.conf, &["export", &format!("{}{snap}", self.path()), s(&file)]);
        let data = std::fs::read(&file).unwrap();
        let _ = std::fs::remove_file(&file);
        data
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        for args in [["snap", "purge"], ["rm", "--no-progress"]] {
            let _ = Command::new("timeout")
                .args(["10", "rbd", "-c", s(&self.conf)])
                .args(args)
                .arg(self.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `vblk serve SPEC --ceph-conf CONF --socket DIR/... EXTRA...`, its socket up.
fn serve(conf: &Path, spec: &str, dir: &TempDir, log: &str, extra: &[&str]) -> BackendProcess {
    let sock = socket_path(dir);
    let mut args = vec!["serve", spec, "--ceph-conf", s(conf), "--socket", s(&sock)];
    args.extend_from_slice(extra);
    BackendProcess::start_with_args(Backend::Vblk, &args, &sock, &dir.join(log)).unwrap_or_else(|e| panic!("{e}"))
}

/// qemu-storage-daemon exporting the image through QEMU's rbd driver.
fn qsd(conf: &Path, img: &Image, dir: &TempDir) -> BackendProcess {
    let sock = socket_path(dir);
    assert!(!s(conf).contains(',') && !s(&sock).contains(','), "QSD options cannot hold ','");
    let blockdev = format!("driver=rbd,node-name=rbd0,pool=rbd,image={},conf={}", img.name, s(conf));
    let export = format!("type=vhost-user-blk,id=e0,node-name=rbd0,addr.type=unix,addr.path={},writable=on", s(&sock));
    let args = ["--blockdev", &blockdev, "--export", &export];
    BackendProcess::start_with_args(Backend::Qsd, &args, &sock, &dir.join("qsd.log")).unwrap_or_else(|e| panic!("{e}"))
}

/// SIGTERM: the daemon flushes, closes the image (releasing its lock) and exits 0.
fn stop(mut b: BackendProcess) {
    let st = b.terminate(Duration::from_secs(60));
    assert!(st.is_some_and(|st| st.success()), "{} did not stop cleanly ({st:?}):\n{}", b.kind, b.log_text());
}

/// `vblk io write` of `data` at `offset` (it flushes afterwards).
fn io_write(b: &BackendProcess, offset: u64, data: &[u8], dir: &TempDir) -> Output {
    let file = dir.join(unique("w"));
    std::fs::write(&file, data).unwrap();
    let (off, len) = (offset.to_string(), data.len().to_string());
    vblk(&["io", "write", "--socket", s(&b.socket), "--offset", &off, "--length", &len, "--file", s(&file)])
}

fn write_ok(b: &BackendProcess, offset: u64, data: &[u8], dir: &TempDir) {
    let out = io_write(b, offset, data, dir);
    assert!(out.status.success(), "vblk io write through {}: {}\n{}", b.kind, text(&out), b.log_text());
}

/// `vblk io read` of `len` bytes at `offset`.
fn read(b: &BackendProcess, offset: u64, len: usize, dir: &TempDir) -> Vec<u8> {
    let file = dir.join(unique("r"));
    let (off, len) = (offset.to_string(), len.to_string());
    let out = vblk(&["io", "read", "--socket", s(&b.socket), "--offset", &off, "--length", &len, "--file", s(&file)]);
    assert!(out.status.success(), "vblk io read through {}: {}\n{}", b.kind, text(&out), b.log_text());
    std::fs::read(&file).unwrap()
}

/// `got == want`, or a failure naming the first differing byte (not megabytes of both).
fn same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: differs at byte {at} (lengths {} and {}, sha256 {} and {})",
            got.len(),
            want.len(),
            sha256_hex(got),
            sha256_hex(want)
        );
    }
}

#[test]
fn verify_passes_on_two_queues() {
    let Some(conf) = ceph_conf("verify_passes_on_two_queues") else { return };
    let img = Image::create(&conf, "verify");
    let dir = TempDir::new("rbd-verify");
    let v = serve(&conf, &img.spec(), &dir, "vblk.log", &["--num-queues", "2"]);
    let args = ["verify", "--socket", s(&v.socket), "--queues", "2", "--iodepth", "32", "--ops", "6000", "--json"];
    let out = vblk(&args);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    eprintln!("verify on {}: {r}", img.spec());
    assert!(out.status.success() && r["result"] == "OK" && r["errors"] == 0, "{}\n{}", text(&out), v.log_text());
    assert!(r["readback_checked_bytes"].as_u64() > Some(0), "verify read nothing back: {r}");
    stop(v);
}

/// The bytes vblk wrote are where `rbd export` finds them (across an object boundary, the
/// rest still zeros), and an image made by `rbd import` reads back through vblk.
#[test]
fn data_written_through_vblk_is_what_rbd_export_reads() {
    let Some(conf) = ceph_conf("data_written_through_vblk_is_what_rbd_export_reads") else { return };
    let img = Image::create(&conf, "export");
    let dir = TempDir::new("rbd-export");
    // 3 MiB from 3 MiB + 512: across the first 4 MiB object's end, not block aligned.
    let (off, data) = (3 * MIB + 512, pattern(13, 3 * MIB as usize));
    let v = serve(&conf, &img.spec(), &dir, "vblk.log", &[]);
    write_ok(&v, off, &data, &dir);
    same(&read(&v, off, data.len(), &dir), &data, "vblk reads back what it wrote");
    stop(v);
    let exported = img.export("", &dir);
    assert_eq!(exported.len() as u64, 64 * MIB);
    let end = off as usize + data.len();
    same(&exported[off as usize..end], &data, "rbd export of the written region");
    assert!(
        exported[..off as usize].iter().chain(&exported[end..]).all(|&b| b == 0),
        "rbd export: bytes outside the write"
    );
    eprintln!("rbd export matches: {} bytes at {off}, sha256 {}", data.len(), sha256_hex(&data));

    let file = dir.join("import.bin");
    let imported = pattern(14, 8 * MIB as usize);
    std::fs::write(&file, &imported).unwrap();
    let img2 = Image::import(&conf, "import", &file);
    let v = serve(&conf, &img2.spec(), &dir, "vblk2.log", &[]);
    same(&read(&v, 0, imported.len(), &dir), &imported, "vblk reads an image made by rbd import");
    stop(v);
}

/// `rbd:POOL/IMAGE@SNAP`: the snapshot's data, later writes to the image not seen, read-only
/// for the driver (RO feature) and for the backend (a write sent anyway fails).
/// `Disk::resize` on an RBD image (online resize): the cluster's image grows and shrinks,
/// an engine opened before sees the new size, a snapshot refuses.
#[test]
fn an_rbd_disk_resizes_online() {
    use vblk_backend::rbd::{RbdOptions, RbdSpec};
    use vblk_backend::{BackendError, Disk, Engine, EngineKind, IoOp, OpKind};
    let Some(conf) = ceph_conf("an_rbd_disk_resizes_online") else { return };
    let img = Image::create(&conf, "resize");
    let spec = RbdSpec::parse(&img.spec()).unwrap().unwrap();
    let opts = RbdOptions { conf: Some(conf.clone()), ..RbdOptions::default() };
    let disk = std::sync::Arc::new(Disk::open_rbd(&spec, &opts).expect("open"));
    let mut engine = Engine::new(disk.clone(), EngineKind::Auto, 4).unwrap();
    let mut io = |kind: OpKind, offset: u64, buf: &mut [u8]| {
        let iovs = vec![libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
        let op = IoOp { kind, offset, len: buf.len() as u64, iovs, fua: false, tag: 1 };
        // SAFETY: `buf` outlives the op: its completion is waited for below.
        unsafe { engine.push(op) }.expect("room");
        engine.submit().unwrap();
        let mut done = Vec::new();
        while done.is_empty() {
            engine.wait(&mut done).unwrap();
        }
        done.pop().unwrap().result
    };
    const MIB: u64 = 1 << 20;
    let r = io(OpKind::Write, 64 * MIB, &mut [7u8; 4096]);
    assert!(matches!(r, Err(BackendError::OutOfRange { .. })), "{r:?}");

    assert_eq!(disk.resize(96 * MIB).unwrap(), 96 * MIB);
    assert_eq!(disk.size(), 96 * MIB);
    let mut tail = [0x3cu8; 4096];
    io(OpKind::Write, 96 * MIB - 4096, &mut tail).expect("a write at the new end");
    io(OpKind::Flush, 0, &mut []).unwrap();
    let exported = img.export("", &TempDir::new("rbd-resize"));
    assert_eq!(exported.len() as u64, 96 * MIB, "rbd export sees the new size");
    assert_eq!(&exported[exported.len() - 4096..], &tail[..]);

    assert_eq!(disk.resize(32 * MIB).unwrap(), 32 * MIB);
    let r = io(OpKind::Read, 40 * MIB, &mut [0u8; 4096]);
    assert!(matches!(r, Err(BackendError::OutOfRange { .. })), "{r:?}");
    assert!(matches!(disk.resize(1000), Err(BackendError::BadSize { .. })));
    drop(engine);
    drop(disk);

    rbd(&conf, &["snap", "create", &format!("{}@s", img.path())]);
    let snap = RbdSpec::parse(&format!("{}@s", img.spec())).unwrap().unwrap();
    let ro = Disk::open_rbd(&snap, &opts).expect("open the snapshot");
    assert!(matches!(ro.resize(64 * MIB), Err(BackendError::ReadOnly)));
}

#[test]
fn a_snapshot_is_served_read_only_with_its_own_data() {
    let Some(conf) = ceph_conf("a_snapshot_is_served_read_only_with_its_own_data") else { return };
    let img = Image::create(&conf, "snap");
    let dir = TempDir::new("rbd-snap");
    let (a, b) = (pattern(21, MIB as usize), pattern(22, MIB as usize));
    let v = serve(&conf, &img.spec(), &dir, "a.log", &[]);
    write_ok(&v, MIB, &a, &dir);
    stop(v);
    rbd(&conf, &["snap", "create", &format!("{}@s1", img.path())]);
    let v = serve(&conf, &img.spec(), &dir, "b.log", &[]);
    write_ok(&v, MIB, &b, &dir);
    stop(v);

    let v = serve(&conf, &format!("{}@s1", img.spec()), &dir, "snap.log", &[]);
    let out = vblk(&["info", "--socket", s(&v.socket), "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(info["readonly"], true, "vblk info on a snapshot: {info}");
    same(&read(&v, MIB, a.len(), &dir), &a, "the snapshot holds pattern A");
    let out = io_write(&v, MIB, &b, &dir);
    assert_eq!(out.status.code(), Some(1), "vblk io write to a snapshot: {}", text(&out));
    assert!(text(&out).contains("read-only"), "{}", text(&out));
    // A driver that ignores the RO feature: the backend fails the write itself.
    let mut c = Client::connect(&v.socket);
    assert_eq!(c.write(MIB, &b[..4096]), Err(RequestFailure::IoErr), "a write to a snapshot");
    drop(c);
    same(&read(&v, MIB, a.len(), &dir), &a, "the snapshot after the refused writes");
    stop(v);
    same(&img.export("@s1", &dir)[MIB as usize..2 * MIB as usize], &a, "rbd export of the snapshot");
    same(&img.export("", &dir)[MIB as usize..2 * MIB as usize], &b, "rbd export of the image");
}

/// QEMU's rbd driver (qemu-storage-daemon) reads what vblk wrote, and vblk what QEMU wrote.
#[test]
fn vblk_and_qemu_storage_daemon_read_each_others_writes() {
    let Some(conf) = ceph_conf("vblk_and_qemu_storage_daemon_read_each_others_writes") else { return };
    let img = Image::create(&conf, "xcheck");
    let dir = TempDir::new("rbd-xcheck");
    let (a, b) = (pattern(31, 2 * MIB as usize), pattern(32, MIB as usize + 4096));
    let (off_a, off_b) = (3 * MIB, 9 * MIB - 4096);
    let v = serve(&conf, &img.spec(), &dir, "vblk.log", &[]);
    write_ok(&v, off_a, &a, &dir);
    stop(v);
    let q = qsd(&conf, &img, &dir);
    same(&read(&q, off_a, a.len(), &dir), &a, "qemu-storage-daemon reads vblk's write");
    write_ok(&q, off_b, &b, &dir);
    stop(q);
    let v = serve(&conf, &img.spec(), &dir, "vblk2.log", &[]);
    same(&read(&v, off_b, b.len(), &dir), &b, "vblk reads qemu-storage-daemon's write");
    same(&read(&v, off_a, a.len(), &dir), &a, "vblk's own write, still there");
    stop(v);
}

/// A cluster of the test's own (scripts/ceph-micro.sh), stopped on drop whatever happened.
struct OwnCluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl OwnCluster {
    fn start() -> OwnCluster {
        // Short: the daemons' admin sockets live in DIR/run (108-byte socket paths).
        let dir = std::env::temp_dir().join(unique("ceph"));
        let c = OwnCluster { conf: dir.join("ceph.conf"), dir };
        c.script("start");
        c
    }

    /// `scripts/ceph-micro.sh CMD DIR`, which must succeed; how long it took.
    fn script(&self, cmd: &str) -> Duration {
        let t = Instant::now();
        let mut c = Command::new("bash");
        c.arg(repo_root().join("scripts/ceph-micro.sh")).args([cmd, s(&self.dir)]).env_remove("CEPH_MON_PORT");
        let out = run(&mut c, Duration::from_secs(120));
        assert!(out.status.success(), "ceph-micro.sh {cmd} {}: {}", self.dir.display(), text(&out));
        t.elapsed()
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let script = repo_root().join("scripts/ceph-micro.sh");
        let _ = Command::new("bash").arg(script).arg("stop").arg(&self.dir).stdout(Stdio::null()).status();
        if std::env::var("VBLK_KEEP_TMP").as_deref() != Ok("1") {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The OSD stops under random writes: requests end (IOERR, or done) within a bound set by
/// `--rbd-timeout`, `vblk serve` keeps running, and once the OSD is back (and the first
/// flush has reported what was lost, if anything) new I/O works without restarting it.
///
/// Measured: librbd's cache takes writes at once while the OSD is down until it holds
/// `rbd_cache_max_dirty` (24 MiB), then writes wait and fail after the timeout. librbd's I/O
/// scheduler holds a write behind the write in flight to the same object, so under load a
/// request may wait for another's timeout before its own: up to twice `--rbd-timeout`.
#[test]
fn an_osd_outage_fails_requests_within_the_timeout_and_io_resumes() {
    const TIMEOUT: u64 = 5;
    if ceph_conf("an_osd_outage_fails_requests_within_the_timeout_and_io_resumes").is_none() {
        return;
    }
    let cluster = OwnCluster::start();
    let img = Image::create(&cluster.conf, "osd");
    let dir = TempDir::new("rbd-osd");
    let timeout = TIMEOUT.to_string();
    let mut v = serve(&cluster.conf, &img.spec(), &dir, "vblk.log", &["--num-queues", "2", "--rbd-timeout", &timeout]);
    write_ok(&v, 0, &pattern(41, 65536), &dir);

    // 2 s of writes, the OSD stopped, down for longer than the timeout, started again. (One
    // frontend at a time: the bench is the only client until it ends.)
    let secs = (2 + 2 + 2 * TIMEOUT).to_string();
    let bench = Command::new(env!("CARGO_BIN_EXE_vblk"))
        .args(["bench", "--socket", s(&v.socket), "--rw", "randwrite", "--iodepth", "8", "--queues", "2"])
        .args(["--seconds", &secs, "--timeout", "60", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    sleep(Duration::from_secs(2));
    let down = Instant::now();
    let stop_took = cluster.script("stop-osd");
    sleep(Duration::from_secs(TIMEOUT + 2));
    v.check_alive().unwrap_or_else(|e| panic!("{e}"));
    let start_took = cluster.script("start-osd");
    let outage = down.elapsed();
    let bench = bench.wait_with_output().unwrap();
    let b: serde_json::Value =
        serde_json::from_slice(&bench.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&bench)));
    v.check_alive().unwrap_or_else(|e| panic!("{e}"));

    let longest = Duration::from_secs_f64(b["lat_us"]["max"].as_f64().unwrap_or(0.0) / 1e6);
    eprintln!(
        "OSD down {:.1} s (stop-osd {:.1} s, start-osd {:.1} s), --rbd-timeout {TIMEOUT}: bench {} I/Os, {} failed, \
         longest request (the stall) {:.2} s",
        outage.as_secs_f64(),
        stop_took.as_secs_f64(),
        start_took.as_secs_f64(),
        b["ios"],
        b["errors"],
        longest.as_secs_f64(),
    );
    let bound = Duration::from_secs(2 * TIMEOUT + 3);
    assert!(longest <= bound, "a request took {longest:?} (--rbd-timeout {TIMEOUT}, bound {bound:?}): {b}");

    // New I/O through the same daemon: written, flushed, read back, at the first attempt
    // (librbd's cache is off by default: the outage failed the requests it hit, nothing
    // is left to fail a later flush).
    let data = pattern(43, MIB as usize);
    let t = Instant::now();
    let w = io_write(&v, 40 * MIB, &data, &dir);
    assert!(
        w.status.success(),
        "the first write + flush after the OSD came back failed: {}\n{}",
        text(&w),
        v.log_text()
    );
    eprintln!("after the outage: 1 MiB written and flushed in {:.3} s", t.elapsed().as_secs_f64());
    if b["errors"].as_u64() > Some(0) {
        // Failed requests are in the daemon's log (rate-limited), not only in the guest's.
        assert!(v.log_text().contains("I/O failed"), "no log line for the failed requests:\n{}", v.log_text());
    }
    let noticed = b["errors"].as_u64() > Some(0) || longest > Duration::from_secs(1);
    assert!(noticed, "the OSD was down for {outage:?} and no request failed or waited: {b}");
    same(&read(&v, 40 * MIB, data.len(), &dir), &data, "a write after the OSD came back");
    v.check_alive().unwrap_or_else(|e| panic!("{e}"));
    stop(v);
}

/// Refused at start, with the reason, exit code 1, and without waiting for anything.
#[test]
fn the_command_line_refuses_what_it_cannot_serve() {
    let Some(conf) = ceph_conf("the_command_line_refuses_what_it_cannot_serve") else { return };
    let img = Image::create(&conf, "cli");
    let dir = TempDir::new("rbd-cli");
    let sock = dir.join("s.sock");
    // A monitor address nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead = dir.join("dead-mon.conf");
    std::fs::write(&dead, format!("[global]\nmon host = 127.0.0.1:{port}\nauth client required = none\n")).unwrap();
    let spec = img.spec();
    let cases: [(&str, Vec<&str>, &[&str]); 6] = [
        ("no pool", vec!["rbd:nopool", "--ceph-conf", s(&conf)], &["rbd:nopool", "POOL/IMAGE"]),
        ("bad snapshot", vec!["rbd:rbd/x@", "--ceph-conf", s(&conf)], &["snapshot"]),
        ("missing image", vec!["rbd:rbd/missing-image", "--ceph-conf", s(&conf)], &["missing-image", "No such file"]),
        ("--size", vec![&spec, "--ceph-conf", s(&conf), "--size", "1G"], &["rbd create"]),
        ("no conf", vec![&spec, "--ceph-conf", "/nonexistent"], &["/nonexistent"]),
        ("dead monitor", vec![&spec, "--ceph-conf", s(&dead), "--rbd-timeout", "2"], &["timed out"]),
    ];
    for (what, args, want) in cases {
        let t = Instant::now();
        let mut all = vec!["serve"];
        all.extend(&args);
        all.extend(["--socket", s(&sock)]);
        let out = vblk(&all);
        let (took, err) = (t.elapsed(), String::from_utf8_lossy(&out.stderr).into_owned());
        eprintln!("{what}: exit {:?} in {:.2} s: {}", out.status.code(), took.as_secs_f64(), err.trim());
        assert_eq!(out.status.code(), Some(1), "{what}: vblk serve {args:?}: {}", text(&out));
        assert!(want.iter().all(|w| err.contains(w)) && err.trim().lines().count() == 1, "{what}: {err}");
        assert!(took < Duration::from_secs(10), "{what}: took {took:?}");
        assert!(!sock.exists(), "{what}: a socket was created");
    }
}
