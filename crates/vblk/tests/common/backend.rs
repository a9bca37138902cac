//! Starting a vhost-user-blk backend for a test: `vblk serve` or qemu-storage-daemon.

use super::*;
use std::fmt;
use std::fs::{self, File};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `vblk serve IMAGE --socket PATH [--readonly] [--num-queues N]`
    Vblk,
    /// `qemu-storage-daemon` vhost-user-blk export (reference implementation).
    Qsd,
    /// The same, the image read as qcow2 (QEMU's own qcow2 code, to cross-check vblk's).
    QsdQcow2,
}

impl Backend {
    pub fn is_qsd(self) -> bool {
        matches!(self, Backend::Qsd | Backend::QsdQcow2)
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Vblk => "vblk",
            Backend::Qsd => "qemu-storage-daemon",
            Backend::QsdQcow2 => "qemu-storage-daemon (qcow2)",
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
        Backend::Qsd | Backend::QsdQcow2 => {
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
        Backend::Qsd | Backend::QsdQcow2 => {
            for p in [image, socket] {
                assert!(!p.to_string_lossy().contains(','), "QSD paths must not contain ',': {}", p.display());
            }
            let ro = if cfg.readonly { "on" } else { "off" };
            c.arg("--blockdev").arg(format!(
                "driver=file,node-name=file0,filename={},cache.direct=on,aio={aio},discard=unmap,read-only={ro}",
                image.display()
            ));
            let format = if kind == Backend::QsdQcow2 { "qcow2" } else { "raw" };
            c.arg("--blockdev").arg(format!("driver={format},node-name=disk0,file=file0,discard=unmap,read-only={ro}"));
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

impl BackendProcess {
    /// Starts the backend and waits (up to 20 s) for its socket to appear.
    pub fn start(kind: Backend, image: &Path, socket: &Path, cfg: BackendConfig, log: &Path) -> Result<Self, String> {
        let aio = env_or("VBLK_QSD_AIO", "io_uring");
        match Self::start_once(kind, image, socket, cfg, log, &aio) {
            Err(e) if kind.is_qsd() && aio == "io_uring" && read_lossy(log).contains("io_uring") => {
                eprintln!("qemu-storage-daemon cannot use aio=io_uring here, retrying with aio=native:\n{e}");
                Self::start_once(kind, image, socket, cfg, log, "native")
            }
            r => r,
        }
    }

    /// Starts `kind`'s program (`vblk`, or qemu-storage-daemon) with `args`, a command line
    /// the test builds itself (e.g. `vblk serve rbd:POOL/IMAGE`, or QSD with an rbd
    /// blockdev), and waits (up to 20 s) for `socket` to appear. [`restart`](Self::restart)
    /// does not apply to such a backend.
    pub fn start_with_args<S: AsRef<std::ffi::OsStr>>(
        kind: Backend,
        args: &[S],
        socket: &Path,
        log: &Path,
    ) -> Result<Self, String> {
        let mut cmd = guarded_command(&backend_program(kind)?);
        cmd.args(args);
        Self::spawn(kind, cmd, socket, log)
    }

    fn start_once(
        kind: Backend,
        image: &Path,
        socket: &Path,
        cfg: BackendConfig,
        log: &Path,
        aio: &str,
    ) -> Result<Self, String> {
        let cmd = backend_command(kind, image, socket, cfg, aio)?;
        Self::spawn(kind, cmd, socket, log)
    }

    fn spawn(kind: Backend, mut cmd: Command, socket: &Path, log: &Path) -> Result<Self, String> {
        let _ = fs::remove_file(socket);
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

    /// Starts the same kind of backend again on the same socket (after [`stop`](Self::stop)
    /// or [`terminate`](Self::terminate)), logging to `log`.
    pub fn restart(&mut self, image: &Path, cfg: BackendConfig, log: &Path) -> Result<(), String> {
        let new = Self::start(self.kind, image, &self.socket, cfg, log)?;
        let mut old = std::mem::replace(self, new);
        old.proc.kill();
        // The socket is the new process's now: the old one's drop must not remove it.
        old.socket = PathBuf::new();
        Ok(())
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
        if !self.socket.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.socket);
        }
    }
}
