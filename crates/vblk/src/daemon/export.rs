//! One export: a disk served on its own vhost-user socket by its own thread and workers.
//!
//! [`Export::start`] opens the disk, binds the socket and starts the thread that accepts
//! frontends one after another (QEMU reconnects to the same socket). [`Export::stop`]
//! ends that thread: a frontend still attached is drained (every request in flight
//! completes and is published) and disconnected, the disk is flushed and the socket file
//! removed. Exports share nothing but the process: adding or removing one never touches
//! another's socket, rings or workers.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Map, Value};
use vblk_backend::{Disk, EngineKind};
use vblk_blk::qos::Throttle;
use vblk_blk::DeviceParams;
use vblk_metrics::ExportMetrics;
use vblk_vhost_user::{claim_socket_path, DataPlaneOptions, DeviceError, Server, VblkDevice};

use super::open::open_disk;
use super::options::{EngineArg, ExportArgs};

/// A running export.
pub struct Export {
    name: String,
    /// The options it was started with, as given (what `export_list` shows).
    options: Map<String, Value>,
    describe: String,
    socket: PathBuf,
    readonly: bool,
    num_queues: u16,
    threads: usize,
    disk: Arc<Disk>,
    device: Arc<Mutex<VblkDevice>>,
    metrics: Arc<ExportMetrics>,
    connected: Arc<AtomicBool>,
    throttle: Arc<Throttle>,
    /// Written once to stop the serving thread.
    stop: UnixStream,
    thread: Mutex<Option<JoinHandle<Result<()>>>>,
}

impl Export {
    /// Open the disk and serve it on its socket. `timing`: measure request latencies (for
    /// the metrics histogram and `vblk top`).
    pub fn start(name: String, args: &ExportArgs, options: Map<String, Value>, timing: bool) -> Result<Export> {
        let num_queues = args
            .num_queues
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(64) as u16));
        let threads = (args.threads.unwrap_or(num_queues) as usize).min(num_queues as usize);
        // A socket in use is refused before the disk is opened (or created).
        claim_socket_path(&args.socket)?;
        let disk = Arc::new(open_disk(args)?);
        // A snapshot is read-only whatever --readonly says: the guest is told so.
        let readonly = args.readonly || disk.readonly();
        let mut params = DeviceParams::new(
            disk.size(),
            readonly,
            disk.logical_block_size(),
            &args.serial,
            num_queues,
            args.queue_size,
        );
        params.merge = !args.no_merge;
        let engine = match args.engine {
            EngineArg::Auto => EngineKind::Auto,
            EngineArg::IoUring => EngineKind::Uring,
            EngineArg::Sync => EngineKind::Sync,
        };
        // Fail early if the chosen engine cannot run here.
        vblk_backend::Engine::new(Arc::clone(&disk), engine, 1).context("cannot start the I/O engine")?;
        let poll_us = args.poll_us.unwrap_or(if disk.is_rbd() { 0 } else { 50 });
        let throttle = Arc::new(Throttle::new(args.limits()));
        let data_plane = DataPlaneOptions { threads, engine, poll_us, throttle: Arc::clone(&throttle) };
        let device = VblkDevice::new(Arc::new(params), Arc::clone(&disk), data_plane)?;
        let metrics = Arc::clone(device.metrics());
        metrics.set_timing(timing);
        let mut server = Server::bind(&args.socket, args.socket_mode, device)?;
        server.set_message_timeout(Some(Duration::from_millis(args.message_timeout_ms)).filter(|t| !t.is_zero()));
        let device = Arc::clone(server.device());
        let connected = server.connected();
        let socket = std::fs::canonicalize(&args.socket).unwrap_or_else(|_| args.socket.clone());
        let (stop_rx, stop) = UnixStream::pair().context("socketpair")?;
        let flush_disk = Arc::clone(&disk);
        let thread = std::thread::Builder::new()
            .name(format!("vblk-export-{}", name.chars().take(8).collect::<String>()))
            .spawn(move || -> Result<()> {
                let served = server.run(stop_rx.as_raw_fd());
                // The frontend (if any) is gone and the workers drained: make it durable.
                let flushed = if readonly { Ok(()) } else { flush_disk.flush_sync().context("final flush failed") };
                drop(server);
                served?;
                flushed
            })
            .context("cannot start the export's thread")?;
        Ok(Export {
            name,
            options,
            describe: disk.describe(),
            socket,
            readonly,
            num_queues,
            threads,
            disk,
            device,
            metrics,
            connected,
            throttle,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Its QoS limits (changed online with `set_limits`).
    pub fn throttle(&self) -> &Arc<Throttle> {
        &self.throttle
    }

    pub fn metrics(&self) -> &Arc<ExportMetrics> {
        &self.metrics
    }

    /// The control plane's device (for resize and the like). Held only briefly: the
    /// export's thread takes it for every vhost-user message.
    pub fn device(&self) -> MutexGuard<'_, VblkDevice> {
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resize the disk while it is served and tell the frontend (`VblkDevice::resize`);
    /// the size it has now. Holds the device for the resize (the frontend's messages wait).
    pub fn resize(&self, size: u64, allow_shrink: bool) -> Result<u64, DeviceError> {
        self.device().resize(size, allow_shrink)
    }

    /// What `export_list` says about it.
    pub fn info(&self) -> Value {
        serde_json::json!({
            "name": self.name,
            // Described now: the size in it changes with a resize.
            "image": self.disk.describe(),
            "socket": self.socket,
            "size": self.disk.size(),
            "readonly": self.readonly,
            "num_queues": self.num_queues,
            "threads": self.threads,
            "connected": self.connected.load(Ordering::Relaxed),
            "qos": qos_json(&self.throttle.limits()),
            "options": self.options,
        })
    }

    /// Stop serving: drain and disconnect the frontend, flush, remove the socket. Waits
    /// for all of it; a second call does nothing.
    pub fn stop(&self) -> Result<()> {
        let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Ok(());
        };
        (&self.stop).write_all(b"s").context("cannot signal the export's thread")?;
        match thread.join() {
            Ok(r) => r,
            Err(_) => anyhow::bail!("the export's thread panicked"),
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!(export = %self.name, error = %format!("{e:#}"), "stopping the export failed");
        }
    }
}

/// Limits as `export_list` and `export_set_qos` show them (0: no limit).
pub fn qos_json(l: &vblk_blk::qos::Limits) -> Value {
    serde_json::json!({"iops": l.iops.unwrap_or(0), "bps": l.bps.unwrap_or(0), "burst_ms": l.burst_ms})
}
