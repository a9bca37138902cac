//! The shared harness of vblk's integration tests: temp dirs, images and data patterns,
//! child processes that die with the test (here); a backend on a socket, `vblk serve` or
//! qemu-storage-daemon ([`backend`]); the real-guest tests' Linux guest under QEMU (TCG),
//! which prints a single `VBLK-RESULT PASS|FAIL <test> [reason]` line on its serial console
//! ([`guest`]); a one-queue driver client ([`client`]); `/proc` inspection ([`procfs`]).
//!
//! Environment:
//! * `VBLK_SKIP_GUEST=1`     skip every guest test (prints a message).
//! * `VBLK_QEMU`, `VBLK_QSD` override `qemu-system-x86_64` / `qemu-storage-daemon`.
//! * `VBLK_GUEST_TIMEOUT`    seconds per guest boot (default 300).
//! * `VBLK_KEEP_TMP=1`       keep the per-test temp dirs (image, logs).
//! * `VBLK_QSD_AIO`          QSD file aio mode (default io_uring, falls back to native).
#![allow(dead_code)]

pub mod backend;
pub mod client;
pub mod guest;
pub mod qmp;

#[allow(unused_imports)] // not every test binary uses both
pub use backend::*;
#[allow(unused_imports)]
pub use guest::*;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod procfs;
#[allow(unused_imports)] // not every test binary inspects /proc
pub use procfs::*;

pub const MIB: u64 = 1024 * 1024;
/// Guest RAM (also the size of the shared memfd backend).
const GUEST_MEM_MIB: u64 = 512;

// ---------------------------------------------------------------------------
// paths, skipping, serialisation

pub fn repo_root() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    p.canonicalize().unwrap_or(p)
}

/// The cargo target directory (parent of `CARGO_TARGET_TMPDIR`).
pub fn target_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().map(Path::to_path_buf).unwrap_or_else(|| repo_root().join("target"))
}

/// True (and prints why) when guest tests are disabled with `VBLK_SKIP_GUEST=1`.
pub fn skip_guest(test: &str) -> bool {
    if std::env::var("VBLK_SKIP_GUEST").as_deref() == Ok("1") {
        eprintln!("SKIPPED guest test {test}: VBLK_SKIP_GUEST=1");
        return true;
    }
    false
}

/// Guest tests are CPU heavy (TCG): run them one at a time.
pub fn serialize() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var).ok().filter(|s| !s.is_empty()).unwrap_or_else(|| default.to_string())
}

pub fn guest_timeout() -> Duration {
    let secs = std::env::var("VBLK_GUEST_TIMEOUT").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    Duration::from_secs(secs)
}

// ---------------------------------------------------------------------------
// temp dirs

pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vblk-guest");
        fs::create_dir_all(&base).expect("create temp base dir");
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path =
            base.join(format!("{prefix}-{}-{}-{nanos:x}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var("VBLK_KEEP_TMP").as_deref() == Ok("1") {
            eprintln!("keeping {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A unix socket path short enough for sun_path (108 bytes): inside `dir` if
/// possible, otherwise under the system temp dir.
pub fn socket_path(dir: &TempDir) -> PathBuf {
    let p = dir.join("vhost.sock");
    if p.as_os_str().len() < 100 {
        return p;
    }
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!("vblk-{}-{}.sock", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
}

// ---------------------------------------------------------------------------
// images

/// Creates a sparse image of `size` bytes.
pub fn create_image(path: &Path, size: u64) {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).expect("set image size");
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// What guest/tests/smoke.sh (and fio-until-killed.sh) write at 1 MiB:
/// `yes vblk-smoke-pattern-TAG | head -c 1M`.
pub fn smoke_pattern(tag: &str) -> Vec<u8> {
    let line = format!("vblk-smoke-pattern-{tag}\n");
    line.as_bytes().iter().copied().cycle().take(MIB as usize).collect()
}

pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(path).expect("open image for writing");
    f.write_all_at(data, offset).expect("write image");
    f.sync_all().expect("fsync image");
}

pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).expect("open image");
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).expect("read image");
    buf
}

/// sha256 (hex) of `data`, via the host's `sha256sum`.
pub fn sha256_hex(data: &[u8]) -> String {
    let mut child =
        Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("run sha256sum");
    child.stdin.take().unwrap().write_all(data).expect("feed sha256sum");
    let out = child.wait_with_output().expect("sha256sum");
    assert!(out.status.success(), "sha256sum failed");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().expect("sha256sum output").to_string()
}

// ---------------------------------------------------------------------------
// child processes

/// Resolves `prog` (a path, or a name looked up in $PATH).
pub fn find_program(prog: &str) -> Option<PathBuf> {
    let is_exe = |p: &Path| fs::metadata(p).map(|m| m.is_file()).unwrap_or(false);
    if prog.contains('/') {
        return is_exe(Path::new(prog)).then(|| PathBuf::from(prog));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(prog)).find(|p| is_exe(p))
}

/// A Command for `program` that dies with the spawning (test) thread even if
/// the test process is killed: wrapped in `setpriv --pdeathsig SIGKILL`
/// (util-linux) when available. Drop guards handle the normal cases.
fn guarded_command(program: &Path) -> Command {
    static SETPRIV: OnceLock<Option<PathBuf>> = OnceLock::new();
    let setpriv = SETPRIV.get_or_init(|| {
        let p = find_program("setpriv")?;
        // --pdeathsig needs util-linux >= 2.33
        let ok = Command::new(&p)
            .args(["--pdeathsig", "SIGKILL", "--", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(p)
    });
    match setpriv {
        Some(sp) => {
            let mut c = Command::new(sp);
            c.args(["--pdeathsig", "SIGKILL", "--"]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Kills (SIGKILL) and reaps the child on drop.
struct ProcGuard {
    child: Option<Child>,
    what: String,
}

impl ProcGuard {
    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    fn kill(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        if let Ok(Some(st)) = c.try_wait() {
            return Some(st);
        }
        let _ = c.kill();
        c.wait().ok()
    }
}

impl Drop for ProcGuard {
    fn drop(&mut self) {
        if let Some(st) = self.kill() {
            if std::env::var("VBLK_GUEST_DEBUG").is_ok() {
                eprintln!("{} exited: {st}", self.what);
            }
        }
    }
}

fn read_lossy(path: &Path) -> String {
    let mut v = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut v);
    }
    String::from_utf8_lossy(&v).into_owned()
}

/// The command line, without the setpriv wrapper.
pub(crate) fn describe(c: &Command) -> String {
    let mut args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    let mut s = c.get_program().to_string_lossy().into_owned();
    if s.ends_with("setpriv") && args.len() > 3 && args[2] == "--" {
        s = args[3].clone();
        args.drain(..4);
    }
    for a in &args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// The Ceph test cluster's ceph.conf (`VBLK_CEPH_CONF`; scripts/test.sh starts the cluster);
/// `None` (after saying so) under `VBLK_SKIP_CEPH=1`. Unset: the test fails, saying how to
/// start one.
pub fn ceph_conf(test: &str) -> Option<PathBuf> {
    if std::env::var("VBLK_SKIP_CEPH").as_deref() == Ok("1") {
        eprintln!("SKIPPED {test}: VBLK_SKIP_CEPH=1");
        return None;
    }
    let conf = std::env::var_os("VBLK_CEPH_CONF").filter(|c| !c.is_empty()).map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "{test}: VBLK_CEPH_CONF is not set. The RBD tests need a Ceph cluster: \
             `scripts/ceph-micro.sh start DIR` and VBLK_CEPH_CONF=DIR/ceph.conf \
             (scripts/test.sh does both), or VBLK_SKIP_CEPH=1 to skip them"
        )
    });
    assert!(conf.is_file(), "VBLK_CEPH_CONF={}: no such file (is the cluster running?)", conf.display());
    Some(conf)
}
