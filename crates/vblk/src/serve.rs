//! `vblk serve`: the daemon. It serves one disk given on the command line, the exports of
//! a `--config` file, or both, and with `--control` takes more (and lets them go) while it
//! runs ([`crate::daemon`]). Prometheus metrics with `--metrics`. SIGINT/SIGTERM drain
//! every export, flush it and clean up.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{Map, Value};
use vblk_metrics::{MetricsServer, Registry};

use crate::daemon::config::Config;
use crate::daemon::control::ControlServer;
use crate::daemon::options::{BackendKind, ExportArgs};
use crate::daemon::Daemon;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The one disk to serve (more come from --config and the control socket).
    #[command(flatten)]
    pub export: ExportArgs,
    /// Serve the exports listed in this TOML file (and its `control`/`metrics` settings):
    /// see README, "Many disks in one daemon".
    #[arg(long, value_name = "FILE", help_heading = "Daemon")]
    pub config: Option<PathBuf>,
    /// Listen for management calls (JSON-RPC 2.0, one per line; `vblk ctl`, `vblk top`)
    /// on this unix socket (mode 0600).
    #[arg(long, value_name = "PATH", help_heading = "Daemon")]
    pub control: Option<PathBuf>,
    /// Serve Prometheus metrics (text format) at http://ADDR/metrics, e.g. 127.0.0.1:9184
    /// (port 0: any free port; the address is printed). Per export and queue: requests and
    /// bytes by operation, errors by status, in flight, a latency histogram, merged
    /// requests, throttled time; per worker: time polling and sleeping.
    #[arg(long, value_name = "ADDR", help_heading = "Daemon")]
    pub metrics: Option<String>,
}

/// The QEMU arguments that attach a disk served on `socket`.
fn qemu_command(socket: &Path, num_queues: u16) -> String {
    format!(
        "qemu-system-x86_64 -machine q35,accel=kvm:tcg -m 2G \\\n  \
         -object memory-backend-memfd,id=mem,size=2G,share=on -numa node,memdev=mem \\\n  \
         -chardev socket,id=vblk0,path={},reconnect-ms=1000 \\\n  \
         -device vhost-user-blk-pci,chardev=vblk0,num-queues={num_queues} \\\n  \
         ...your kernel/disk options",
        socket.display()
    )
}

/// systemd's readiness protocol (sd_notify(3)): one datagram to `$NOTIFY_SOCKET` (a path,
/// or `@name` in the abstract namespace), when the unit is `Type=notify`. Best effort.
fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sent = UnixDatagram::unbound().and_then(|sock| match path.as_bytes().strip_prefix(b"@") {
        Some(name) => sock.send_to_addr(state.as_bytes(), &SocketAddr::from_abstract_name(name)?),
        None => sock.send_to(state.as_bytes(), &path),
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, socket = ?path, "cannot notify systemd");
    }
}

pub fn run(args: ServeArgs) -> Result<()> {
    let config = args.config.as_deref().map(Config::load).transpose()?.unwrap_or_default();
    let control = args.control.clone().or(config.control.clone());
    let metrics_addr = args.metrics.clone().or(config.metrics.clone());
    // The disk on the command line: given, or the default image when nothing else is.
    let cli_export = args.export.image.is_some()
        || args.export.backend == BackendKind::Null
        || (args.config.is_none() && control.is_none());

    // Signals first: a SIGTERM while exports are opening still stops cleanly.
    let (mut shutdown_rx, shutdown_tx) = UnixStream::pair().context("socketpair")?;
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::low_level::pipe::register(sig, shutdown_tx.try_clone()?).context("installing signal handler")?;
    }
    // The metrics port and the control socket before any export: when one is taken,
    // nothing else was created.
    let registry = Arc::new(Registry::new());
    let metrics = metrics_addr.as_deref().map(|addr| MetricsServer::start(addr, Arc::clone(&registry))).transpose()?;
    // Latencies are measured when someone can read them.
    let daemon = Arc::new(Daemon::new(registry, metrics.is_some() || control.is_some()));
    let control_server = control.as_deref().map(|p| ControlServer::start(p, Arc::clone(&daemon))).transpose()?;

    let mut to_start: Vec<(ExportArgs, Map<String, Value>)> = config.exports;
    if cli_export {
        to_start.push((args.export.clone(), Map::new()));
    }
    for (export_args, options) in &to_start {
        if let Err(e) = daemon.add(export_args, options.clone()) {
            // Stop what started, then report what did not.
            daemon.remove_all();
            match &args.config {
                Some(c) if !options.is_empty() => {
                    let name = export_args.export_name().unwrap_or_default();
                    bail!("config {}: export '{name}': {}", c.display(), e.message)
                }
                _ => bail!("{}", e.message),
            }
        }
    }
    if let Some(m) = &metrics {
        eprintln!("vblk: metrics on http://{}/metrics", m.local_addr());
    }
    if let Some(c) = &control {
        eprintln!("vblk: control socket {} (vblk ctl --control {} list)", c.display(), c.display());
    }
    if let [only] = daemon.exports().as_slice() {
        eprintln!("vblk: attach it with:\n{}", qemu_command(only.socket(), only.num_queues()));
    }

    notify_systemd("READY=1");
    // Serve until a signal arrives (the exports' threads and the control socket run meanwhile).
    let mut byte = [0u8; 1];
    while let Err(e) = shutdown_rx.read_exact(&mut byte) {
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).context("waiting for a signal");
        }
    }
    tracing::info!("shutting down: draining and flushing every export");
    notify_systemd("STOPPING=1");
    drop(control_server);
    let failed = daemon.remove_all();
    drop(metrics);
    for (name, e) in &failed {
        eprintln!("vblk: export {name}: {}", e.message);
    }
    if !failed.is_empty() {
        bail!("{} export(s) did not stop cleanly", failed.len());
    }
    eprintln!("vblk: stopped");
    Ok(())
}
