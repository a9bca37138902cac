//! The whole data path in one process: vblk's device engine and this driver, talking
//! vhost-user over a socketpair. No VM and no daemon: for trying vblk out and for tests.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vblk_backend::{Disk, EngineKind};
use vblk_blk::{DeviceParams, Throttle};
use vblk_vhost_user::{serve_stream, DataPlaneOptions, VblkDevice};

use crate::{Device, DriverError, Options};

/// The device side of a loopback: stops (draining its I/O) when dropped.
pub struct LoopbackServer {
    stop: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        let _ = self.stop.write_all(b"x");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the in-process device exports.
#[derive(Clone, Debug)]
pub struct LoopbackConfig {
    pub readonly: bool,
    pub serial: String,
    pub num_queues: u16,
    pub max_queue_size: u16,
    pub threads: usize,
    pub engine: EngineKind,
    /// Adaptive polling budget of the device's workers, in µs.
    pub poll_us: u32,
    /// The export's QoS limits (none by default); keep a clone to change them online.
    pub throttle: Arc<Throttle>,
}

impl Default for LoopbackConfig {
    fn default() -> Self {
        LoopbackConfig {
            readonly: false,
            serial: "vblk-loopback".into(),
            num_queues: 1,
            max_queue_size: 1024,
            threads: 1,
            engine: EngineKind::Auto,
            poll_us: 0,
            throttle: Arc::default(),
        }
    }
}

/// Serve `disk` in this process and connect a driver to it.
pub fn loopback(disk: Disk, cfg: &LoopbackConfig, opts: &Options) -> Result<(Device, LoopbackServer), DriverError> {
    let disk = Arc::new(disk);
    let params = Arc::new(DeviceParams::new(
        disk.size(),
        cfg.readonly || disk.readonly(),
        disk.logical_block_size(),
        &cfg.serial,
        cfg.num_queues,
        cfg.max_queue_size,
    ));
    let dev = VblkDevice::new(
        params,
        disk,
        DataPlaneOptions {
            threads: cfg.threads,
            engine: cfg.engine,
            poll_us: cfg.poll_us,
            throttle: Arc::clone(&cfg.throttle),
        },
    )
    .map_err(|e| DriverError::Loopback(e.to_string()))?;
    let dev = Arc::new(Mutex::new(dev));
    let (ours, theirs) = UnixStream::pair().map_err(DriverError::Socket)?;
    let (stop_rx, stop) = UnixStream::pair().map_err(DriverError::Socket)?;
    let thread = std::thread::Builder::new()
        .name("vblk-loopback".into())
        .spawn(move || {
            serve_stream(&dev, theirs, stop_rx.as_raw_fd());
        })
        .map_err(DriverError::Socket)?;
    let server = LoopbackServer { stop, thread: Some(thread) };
    let device = Device::from_stream(ours, opts)?;
    Ok((device, server))
}
