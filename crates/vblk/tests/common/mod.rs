//! Real-guest integration test harness.
//!
//! Builds a tiny Linux guest (`scripts/build-guest.sh`), starts a
//! vhost-user-blk backend (our `vblk serve` or, as a reference,
//! `qemu-storage-daemon`) on a unix socket, boots QEMU (TCG) against it and
//! parses the single `VBLK-RESULT PASS|FAIL <test> [reason]` line that the
//! guest's `/init` prints on the serial console.
//!
//! Environment:
//! * `VBLK_SKIP_GUEST=1`     skip every guest test (prints a message).
//! * `VBLK_QEMU`, `VBLK_QSD` override `qemu-system-x86_64` / `qemu-storage-daemon`.
//! * `VBLK_GUEST_TIMEOUT`    seconds per guest boot (default 300).
//! * `VBLK_KEEP_TMP=1`       keep the per-test temp dirs (image, logs).
//! * `VBLK_QSD_AIO`          QSD file aio mode (default io_uring, falls back to native).
#![allow(dead_code)]

pub mod client;

use std::fmt;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
// guest image

#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Builds (once per test process; the script itself caches across runs) the
/// guest kernel + initramfs.
pub fn guest_image() -> &'static GuestImage {
    static IMAGE: OnceLock<Result<GuestImage, String>> = OnceLock::new();
    match IMAGE.get_or_init(build_guest) {
        Ok(g) => g,
        Err(e) => panic!("building the test guest failed:\n{e}"),
    }
}

fn build_guest() -> Result<GuestImage, String> {
    let script = repo_root().join("scripts/build-guest.sh");
    let out = target_dir().join("guest");
    let t = Instant::now();
    let res = Command::new("bash")
        .arg(&script)
        .arg(&out)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&res.stdout);
    let stderr = String::from_utf8_lossy(&res.stderr);
    if !res.status.success() {
        return Err(format!("{} {} failed ({}):\n{stdout}{stderr}", script.display(), out.display(), res.status));
    }
    eprintln!("{}", stderr.trim_end());
    let lines: Vec<&str> = stdout.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let find = |suffix: &str| {
        lines
            .iter()
            .find(|l| l.ends_with(suffix))
            .map(PathBuf::from)
            .ok_or_else(|| format!("build-guest.sh did not print a *{suffix} path:\n{stdout}{stderr}"))
    };
    let g = GuestImage { kernel: find("vmlinuz")?, initrd: find("initramfs.cpio.gz")? };
    eprintln!("guest image ready in {:.1}s: {} {}", t.elapsed().as_secs_f64(), g.kernel.display(), g.initrd.display());
    Ok(g)
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

// ---------------------------------------------------------------------------
// backends

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `vblk serve IMAGE --socket PATH [--readonly] [--num-queues N]`
    Vblk,
    /// `qemu-storage-daemon` vhost-user-blk export (reference implementation).
    Qsd,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Vblk => "vblk",
            Backend::Qsd => "qemu-storage-daemon",
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub struct BackendConfig {
    pub readonly: bool,
    pub num_queues: u16,
    /// Extra `vblk serve` flags (ignored for qemu-storage-daemon), e.g. `--poll-us 50`.
    pub vblk_args: &'static [&'static str],
}

pub struct BackendProcess {
    proc: ProcGuard,
    pub kind: Backend,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub command: String,
}

fn backend_program(kind: Backend) -> Result<PathBuf, String> {
    match kind {
        Backend::Vblk => {
            let p = PathBuf::from(env!("CARGO_BIN_EXE_vblk"));
            find_program(&p.to_string_lossy()).ok_or_else(|| format!("vblk binary {} not found", p.display()))
        }
        Backend::Qsd => {
            let name = env_or("VBLK_QSD", "qemu-storage-daemon");
            find_program(&name).ok_or_else(|| {
                format!("{name} not found (install QEMU with scripts/setup.sh, or set VBLK_SKIP_GUEST=1 to skip guest tests)")
            })
        }
    }
}

fn backend_command(
    kind: Backend,
    image: &Path,
    socket: &Path,
    cfg: BackendConfig,
    aio: &str,
) -> Result<Command, String> {
    let prog = backend_program(kind)?;
    let mut c = guarded_command(&prog);
    match kind {
        Backend::Vblk => {
            c.arg("serve").arg(image).arg("--socket").arg(socket);
            if cfg.readonly {
                c.arg("--readonly");
            }
            c.arg("--num-queues").arg(cfg.num_queues.to_string());
            c.args(cfg.vblk_args);
        }
        Backend::Qsd => {
            for p in [image, socket] {
                assert!(!p.to_string_lossy().contains(','), "QSD paths must not contain ',': {}", p.display());
            }
            let ro = if cfg.readonly { "on" } else { "off" };
            c.arg("--blockdev").arg(format!(
                "driver=file,node-name=file0,filename={},cache.direct=on,aio={aio},discard=unmap,read-only={ro}",
                image.display()
            ));
            c.arg("--blockdev").arg(format!("driver=raw,node-name=disk0,file=file0,discard=unmap,read-only={ro}"));
            c.arg("--export").arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable={},num-queues={}",
                socket.display(),
                if cfg.readonly { "off" } else { "on" },
                cfg.num_queues
            ));
        }
    }
    Ok(c)
}

/// The command line, without the setpriv wrapper.
fn describe(c: &Command) -> String {
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

impl BackendProcess {
    /// Starts the backend and waits (up to 20 s) for its socket to appear.
    pub fn start(kind: Backend, image: &Path, socket: &Path, cfg: BackendConfig, log: &Path) -> Result<Self, String> {
        let aio = env_or("VBLK_QSD_AIO", "io_uring");
        match Self::start_once(kind, image, socket, cfg, log, &aio) {
            Err(e) if kind == Backend::Qsd && aio == "io_uring" && read_lossy(log).contains("io_uring") => {
                eprintln!("qemu-storage-daemon cannot use aio=io_uring here, retrying with aio=native:\n{e}");
                Self::start_once(kind, image, socket, cfg, log, "native")
            }
            r => r,
        }
    }

    fn start_once(
        kind: Backend,
        image: &Path,
        socket: &Path,
        cfg: BackendConfig,
        log: &Path,
        aio: &str,
    ) -> Result<Self, String> {
        let _ = fs::remove_file(socket);
        let mut cmd = backend_command(kind, image, socket, cfg, aio)?;
        let command = describe(&cmd);
        let logf = File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(logf.try_clone().unwrap()).stderr(logf);
        let child = cmd.spawn().map_err(|e| format!("cannot start {kind}: {command}: {e}"))?;
        let mut bp = BackendProcess {
            proc: ProcGuard { child: Some(child), what: format!("{kind}") },
            kind,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
            command,
        };
        eprintln!("started {kind} (pid {}): {}", bp.proc.pid(), bp.command);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if fs::metadata(socket).map(|m| m.file_type().is_socket()).unwrap_or(false) {
                return Ok(bp);
            }
            if let Some(st) = bp.proc.try_wait() {
                return Err(format!(
                    "{kind} exited ({st}) before creating {}\n$ {}\n{}",
                    socket.display(),
                    bp.command,
                    bp.log_text()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{kind} did not create {} within 20s\n$ {}\n{}",
                    socket.display(),
                    bp.command,
                    bp.log_text()
                ));
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Process id of the backend (0 once it was stopped).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Err if the backend process has exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.proc.try_wait() {
            None if self.proc.child.is_some() => Ok(()),
            st => Err(format!("{} is no longer running ({st:?})\n{}", self.kind, self.log_text())),
        }
    }

    pub fn log_text(&self) -> String {
        read_lossy(&self.log)
    }

    /// Kills the backend (SIGKILL) and reaps it.
    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// Asks the backend to stop (SIGTERM) and waits up to `timeout` for it to exit;
    /// `None` if it did not (it is then killed).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.proc.child.as_mut()?;
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.proc.try_wait() {
                self.proc.child = None;
                return Some(st);
            }
            sleep(Duration::from_millis(20));
        }
        self.proc.kill();
        None
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        self.proc.kill();
        let _ = fs::remove_file(&self.socket);
    }
}

// ---------------------------------------------------------------------------
// QEMU

#[derive(Debug)]
pub struct GuestOutcome {
    pub test: String,
    /// The `VBLK-RESULT ...` line, if any.
    pub result: Option<String>,
    pub passed: bool,
    pub serial: String,
    pub qemu_stderr: String,
    pub exit: Option<ExitStatus>,
    pub timed_out: bool,
    pub elapsed: Duration,
}

fn result_line(serial: &str) -> Option<String> {
    serial.lines().find_map(|l| l.find("VBLK-RESULT ").map(|i| l[i..].trim_end().to_string()))
}

/// Boots the guest against the vhost-user socket and runs `/tests/<test>.sh`.
pub fn run_guest(dir: &TempDir, socket: &Path, test: &str, args: &str, num_queues: u16) -> GuestOutcome {
    spawn_guest(dir, socket, test, args, num_queues).wait()
}

/// A booting or running guest (QEMU), killed on drop.
pub struct RunningGuest {
    qemu: ProcGuard,
    test: String,
    serial_path: PathBuf,
    stderr_path: PathBuf,
    start: Instant,
}

/// Starts QEMU booting the guest that runs `/tests/<test>.sh`; does not wait.
pub fn spawn_guest(dir: &TempDir, socket: &Path, test: &str, args: &str, num_queues: u16) -> RunningGuest {
    let g = guest_image();
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let serial_path = dir.join(format!("serial-{test}-{n}.log"));
    let stderr_path = dir.join(format!("qemu-{test}-{n}.log"));
    assert!(!args.contains(' '), "vblk.args must not contain spaces: {args:?}");
    assert!(!socket.to_string_lossy().contains(','), "socket path must not contain ','");
    let smp = num_queues.max(2);
    let mut append = format!("console=ttyS0 quiet panic=-1 vblk.test={test}");
    if !args.is_empty() {
        append.push_str(&format!(" vblk.args={args}"));
    }
    let qemu_name = env_or("VBLK_QEMU", "qemu-system-x86_64");
    let qemu_bin = find_program(&qemu_name).unwrap_or_else(|| {
        panic!("{qemu_name} not found: install QEMU >= 10 with scripts/setup.sh, or set VBLK_SKIP_GUEST=1 to skip guest tests")
    });
    let mut cmd = guarded_command(&qemu_bin);
    cmd.args(["-accel", "tcg", "-machine", "q35", "-cpu", "max"])
        .args(["-smp", &smp.to_string(), "-m", &format!("{GUEST_MEM_MIB}M")])
        .args(["-object", &format!("memory-backend-memfd,id=mem,size={GUEST_MEM_MIB}M,share=on")])
        .args(["-numa", "node,memdev=mem"])
        .arg("-kernel")
        .arg(&g.kernel)
        .arg("-initrd")
        .arg(&g.initrd)
        .args(["-append", &append])
        .args(["-nodefaults", "-display", "none", "-monitor", "none", "-no-reboot"])
        .args(["-serial", &format!("file:{}", serial_path.display())])
        .args(["-chardev", &format!("socket,id=vb0,path={}", socket.display())])
        .args(["-device", &format!("vhost-user-blk-pci,chardev=vb0,num-queues={num_queues}")]);
    let command = describe(&cmd);
    let errf = File::create(&stderr_path).expect("create qemu log");
    cmd.stdin(Stdio::null()).stdout(errf.try_clone().unwrap()).stderr(errf);
    let start = Instant::now();
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start QEMU: {command}: {e}"));
    let qemu = ProcGuard { child: Some(child), what: "qemu".into() };
    eprintln!("[{test}] booting guest (qemu pid {}): {command}", qemu.pid());
    RunningGuest { qemu, test: test.to_string(), serial_path, stderr_path, start }
}

impl RunningGuest {
    pub fn pid(&self) -> u32 {
        self.qemu.pid()
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        read_lossy(&self.serial_path)
    }

    /// Waits (up to `timeout`) until the serial console contains `marker`; false if QEMU
    /// exited or time ran out first.
    pub fn wait_for_serial(&mut self, marker: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && self.qemu.try_wait().is_none() {
            if self.serial().contains(marker) {
                return true;
            }
            sleep(Duration::from_millis(100));
        }
        self.serial().contains(marker)
    }

    /// SIGKILL QEMU (no shutdown of the device, no goodbye on the vhost-user socket) and
    /// reap it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        self.qemu.kill()
    }

    /// Waits for the guest to print its result and power off (or for the timeout).
    pub fn wait(self) -> GuestOutcome {
        let RunningGuest { mut qemu, test, serial_path, stderr_path, start } = self;
        let test = test.as_str();
        let timeout = guest_timeout();
        let mut timed_out = false;
        let mut result_seen: Option<Instant> = None;
        let exit = loop {
            if let Some(st) = qemu.try_wait() {
                break Some(st);
            }
            if result_seen.is_none() && result_line(&read_lossy(&serial_path)).is_some() {
                result_seen = Some(Instant::now());
            }
            // The guest powers off right after printing the result; don't wait
            // forever if that does not work.
            let stuck_after_result = result_seen.is_some_and(|t| t.elapsed() > Duration::from_secs(30));
            if start.elapsed() > timeout || stuck_after_result {
                timed_out = !stuck_after_result;
                break qemu.kill();
            }
            sleep(Duration::from_millis(100));
        };
        qemu.kill();
        let elapsed = start.elapsed();
        let serial = read_lossy(&serial_path);
        let result = result_line(&serial);
        let passed = result.as_deref() == Some(&format!("VBLK-RESULT PASS {test}"));
        GuestOutcome {
            test: test.to_string(),
            result,
            passed,
            serial,
            qemu_stderr: read_lossy(&stderr_path),
            exit,
            timed_out,
            elapsed,
        }
    }
}

// ---------------------------------------------------------------------------
// fixture: temp dir + image + backend, serialised

pub struct Fixture {
    // Field order = drop order: backend first, then the temp dir, then the lock.
    pub backend: BackendProcess,
    pub image: PathBuf,
    pub dir: TempDir,
    pub name: String,
    pub boots: Vec<(String, Duration)>,
    _lock: MutexGuard<'static, ()>,
}

impl Fixture {
    /// Returns None when guest tests are skipped. `prepare` may fill the
    /// image before the backend opens it.
    pub fn new(
        name: &str,
        kind: Backend,
        image_size: u64,
        cfg: BackendConfig,
        prepare: impl FnOnce(&Path),
    ) -> Option<Fixture> {
        if skip_guest(name) {
            return None;
        }
        let lock = serialize();
        guest_image();
        let dir = TempDir::new(name);
        let image = dir.join("disk.img");
        create_image(&image, image_size);
        prepare(&image);
        let socket = socket_path(&dir);
        let backend = BackendProcess::start(kind, &image, &socket, cfg, &dir.join("backend.log"))
            .unwrap_or_else(|e| panic!("[{name}] starting the {kind} backend failed: {e}"));
        Some(Fixture { backend, image, dir, name: name.to_string(), boots: Vec::new(), _lock: lock })
    }

    /// Boots a guest running `/tests/<test>.sh`, panics (printing the serial
    /// log, QEMU's stderr and the backend log) unless it reports PASS.
    pub fn boot_expect_pass(&mut self, test: &str, args: &str, num_queues: u16) -> GuestOutcome {
        let out = run_guest(&self.dir, &self.backend.socket, test, args, num_queues);
        self.boots.push((test.to_string(), out.elapsed));
        let alive = self.backend.check_alive();
        let summary = format!(
            "[{}] guest test {test} on {} ({num_queues} queues): {} in {:.1}s",
            self.name,
            self.backend.kind,
            out.result.as_deref().unwrap_or(if out.timed_out {
                "TIMEOUT (no VBLK-RESULT)"
            } else {
                "no VBLK-RESULT line"
            }),
            out.elapsed.as_secs_f64()
        );
        eprintln!("{summary}");
        if out.passed && alive.is_ok() {
            println!("----- serial log ({test}) -----\n{}", out.serial);
            return out;
        }
        eprintln!("----- serial log ({test}) -----\n{}", out.serial);
        eprintln!("----- qemu stderr/stdout (exit {:?}) -----\n{}", out.exit, out.qemu_stderr);
        eprintln!("----- backend log: $ {} -----\n{}", self.backend.command, self.backend.log_text());
        if let Err(e) = alive {
            eprintln!("backend died: {e}");
        }
        panic!("{summary}{}", if out.passed { " but the backend died" } else { "" });
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let total: Duration = self.boots.iter().map(|b| b.1).sum();
        eprintln!("[{}] total guest time {:.1}s", self.name, total.as_secs_f64());
    }
}
