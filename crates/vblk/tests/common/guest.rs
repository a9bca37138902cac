//! The test guest: building its kernel + initramfs, booting QEMU (TCG) against a backend,
//! reading its verdict from the serial console; the `Fixture` that ties them together.

use super::*;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{MutexGuard, OnceLock};
use std::thread::sleep;
use std::time::{Duration, Instant};

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

/// QEMU arguments that make the guest's virtio-blk device offer the packed virtqueue
/// (`packed=on`; QEMU's default is the split ring).
pub fn packed_ring() -> Vec<String> {
    vec!["-global".into(), "vhost-user-blk-pci.packed=on".into()]
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
    spawn_guest_with(dir, socket, test, args, num_queues, None, &[])
}

/// Like [`spawn_guest`], with QEMU reconnecting to the backend's socket every
/// `reconnect_ms` after losing it (`-chardev socket,...,reconnect-ms=N`), as a platform
/// runs a VM whose storage daemon may restart, and `extra` QEMU arguments (a QMP socket,
/// `-incoming` for a migration's destination).
pub fn spawn_guest_with(
    dir: &TempDir,
    socket: &Path,
    test: &str,
    args: &str,
    num_queues: u16,
    reconnect_ms: Option<u32>,
    extra: &[String],
) -> RunningGuest {
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
        .args(["-chardev", &{
            let mut c = format!("socket,id=vb0,path={}", socket.display());
            if let Some(ms) = reconnect_ms {
                c.push_str(&format!(",reconnect-ms={ms}"));
            }
            c
        }])
        .args(["-device", &format!("vhost-user-blk-pci,chardev=vb0,num-queues={num_queues}")])
        .args(extra);
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

    /// QEMU's stdout and stderr so far.
    pub fn qemu_log(&self) -> String {
        read_lossy(&self.stderr_path)
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

    /// Like [`new`](Self::new) for an image that is not a file of the fixture's: `image` goes
    /// to the backend as it is (e.g. `rbd:POOL/IMAGE`, with `--ceph-conf` in `cfg.vblk_args`);
    /// nothing is created. `fx.image` is then that string, not a path to read.
    pub fn with_image(name: &str, kind: Backend, image: &str, cfg: BackendConfig) -> Option<Fixture> {
        if skip_guest(name) {
            return None;
        }
        let lock = serialize();
        guest_image();
        let dir = TempDir::new(name);
        let image = PathBuf::from(image);
        let socket = socket_path(&dir);
        let backend = BackendProcess::start(kind, &image, &socket, cfg, &dir.join("backend.log"))
            .unwrap_or_else(|e| panic!("[{name}] starting the {kind} backend failed: {e}"));
        Some(Fixture { backend, image, dir, name: name.to_string(), boots: Vec::new(), _lock: lock })
    }

    /// Boots a guest running `/tests/<test>.sh`, panics (printing the serial
    /// log, QEMU's stderr and the backend log) unless it reports PASS.
    pub fn boot_expect_pass(&mut self, test: &str, args: &str, num_queues: u16) -> GuestOutcome {
        self.boot_expect_pass_with(test, args, num_queues, &[])
    }

    /// [`boot_expect_pass`](Self::boot_expect_pass) with `extra` QEMU arguments.
    pub fn boot_expect_pass_with(&mut self, test: &str, args: &str, num_queues: u16, extra: &[String]) -> GuestOutcome {
        let out = spawn_guest_with(&self.dir, &self.backend.socket, test, args, num_queues, None, extra).wait();
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
