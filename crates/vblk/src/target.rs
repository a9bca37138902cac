//! The device the driver-side tools talk to: a backend on a vhost-user socket
//! (`--socket S`), or vblk's own device engine in this process (`--loopback [IMAGE]`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args, ValueEnum};
use vblk_backend::{Disk, DiskOptions, EngineKind};
use vblk_driver::{Device, DeviceInfo, DriverError, LoopbackConfig, LoopbackServer, Options, QueueHandle, RingChoice};

use crate::daemon::options::{BackendKind, EngineArg};
use crate::size::{human, parse_size};

/// Where the device is. Exactly one of `--socket` / `--loopback`.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Device")]
#[command(group(ArgGroup::new("target").required(true).multiple(false).args(["socket", "loopback"])))]
pub struct TargetArgs {
    /// vhost-user socket of a running backend (vblk serve, qemu-storage-daemon, SPDK, ...).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Run vblk's device engine in this process on IMAGE (a raw file, created sparse at
    /// --disk-size if absent). Without IMAGE: the null backend, except for `verify`, which
    /// uses a temporary image file (removed at exit).
    #[arg(long, value_name = "IMAGE", num_args = 0..=1)]
    pub loopback: Option<Option<PathBuf>>,
    /// Loopback storage: `null` (no data kept) or `file` (IMAGE, or a temporary file).
    #[arg(long, value_enum, requires = "loopback")]
    pub backend: Option<BackendKind>,
    /// Loopback: size of the null backend or of a newly created image [default: 1G; verify: the region].
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "loopback")]
    pub disk_size: Option<u64>,
    /// Loopback: use the host page cache instead of O_DIRECT.
    #[arg(long, requires = "loopback")]
    pub no_direct: bool,
    /// Loopback: I/O engine of the in-process device.
    #[arg(long, value_enum, default_value_t = EngineArg::Auto, requires = "loopback")]
    pub engine: EngineArg,
    /// Virtqueue size, 1..=32768: a power of two for a split ring [default: 128, or the next
    /// power of two >= the I/O depth].
    #[arg(long, value_parser = parse_ring_size)]
    pub queue_size: Option<u16>,
    /// Virtqueue layout: `packed` (virtio 1.1, an error if the backend does not offer
    /// VIRTIO_F_RING_PACKED), `split`, or `auto`: packed when offered.
    #[arg(long, value_enum, default_value_t = RingArg::Auto)]
    pub ring: RingArg,
    /// Seconds to wait for the backend (connection and each completion).
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = parse_secs)]
    pub timeout: f64,
    /// Survive the backend's restart (--socket): when it goes away, keep connecting again
    /// for up to SECS, hand the new process the inflight area and go on (requests the old
    /// one had taken are resubmitted).
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "30", value_parser = parse_secs, requires = "socket")]
    pub reconnect: Option<f64>,
}

/// `--ring`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RingArg {
    Split,
    Packed,
    Auto,
}

impl From<RingArg> for RingChoice {
    fn from(r: RingArg) -> RingChoice {
        match r {
            RingArg::Split => RingChoice::Split,
            RingArg::Packed => RingChoice::Packed,
            RingArg::Auto => RingChoice::Auto,
        }
    }
}

/// A driver-side queue size: any size of a packed ring (virtio 1.2 §2.8); the driver
/// refuses one that is not a power of two if the ring turns out split.
fn parse_ring_size(s: &str) -> Result<u16, String> {
    let n: u32 = s.parse().map_err(|_| format!("invalid queue size '{s}'"))?;
    if !(1..=32768).contains(&n) {
        return Err(format!("queue size {n} must be between 1 and 32768 (a power of two for a split ring)"));
    }
    Ok(n as u16)
}

pub fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(v),
        _ => Err(format!("invalid number of seconds '{s}'")),
    }
}

/// What a command needs from the connection.
pub struct Want {
    pub num_queues: u16,
    /// Requests each queue keeps in flight (sizes the ring).
    pub iodepth: u32,
    /// Bytes of I/O buffers.
    pub buffer_memory: u64,
    /// Loopback without IMAGE: a temporary file of this size instead of the null backend.
    pub temp_image: Option<u64>,
    /// The command keeps no meaning on a disk that stores nothing.
    pub needs_storage: bool,
}

/// A connected device, plus the in-process server and temporary image of a loopback.
pub struct Target {
    device: Option<Device>,
    server: Option<LoopbackServer>,
    temp: Option<PathBuf>,
    /// `socket PATH` or `loopback DISK`.
    pub label: String,
    pub loopback: bool,
    info: DeviceInfo,
    timeout: Duration,
}

const DEFAULT_DISK_SIZE: u64 = 1 << 30;

impl Target {
    pub fn open(args: &TargetArgs, want: &Want) -> Result<Target> {
        let timeout = Duration::from_secs_f64(args.timeout);
        let queue_size = args.queue_size.unwrap_or_else(|| want.iodepth.next_power_of_two().clamp(128, 32768) as u16);
        let opts = Options {
            num_queues: want.num_queues.max(1),
            queue_size,
            buffer_memory: want.buffer_memory.max(4 << 20),
            timeout,
            reconnect: args.reconnect.map(Duration::from_secs_f64),
            ring: args.ring.into(),
            ..Options::default()
        };
        let mut target = Target {
            device: None,
            server: None,
            temp: None,
            label: String::new(),
            loopback: false,
            info: DeviceInfo::default(),
            timeout,
        };
        match (&args.socket, &args.loopback) {
            (Some(path), None) => {
                target.label = format!("socket {}", path.display());
                let start = Instant::now();
                let dev = Device::connect(path, &opts).map_err(|e| connect_error(e, start, timeout, queue_size))?;
                target.device = Some(dev);
            }
            (None, Some(image)) => {
                target.loopback = true;
                let disk = target.loopback_disk(args, image.as_ref(), want)?;
                target.label = format!("loopback {}", disk.describe());
                let cfg = LoopbackConfig {
                    num_queues: opts.num_queues,
                    threads: opts.num_queues as usize,
                    engine: match args.engine {
                        EngineArg::Auto => EngineKind::Auto,
                        EngineArg::IoUring => EngineKind::Uring,
                        EngineArg::Sync => EngineKind::Sync,
                    },
                    max_queue_size: queue_size.max(1024),
                    ..LoopbackConfig::default()
                };
                let start = Instant::now();
                let (dev, server) = vblk_driver::loopback(disk, &cfg, &opts)
                    .map_err(|e| connect_error(e, start, timeout, queue_size))?;
                target.device = Some(dev);
                target.server = Some(server);
            }
            _ => bail!("exactly one of --socket and --loopback is required"),
        }
        if let Some(d) = &target.device {
            target.info = d.info().clone();
        }
        Ok(target)
    }

    fn loopback_disk(&mut self, args: &TargetArgs, image: Option<&PathBuf>, want: &Want) -> Result<Disk> {
        let backend = args.backend.unwrap_or(match (image, want.temp_image) {
            (None, None) => BackendKind::Null,
            _ => BackendKind::File,
        });
        if backend == BackendKind::Null {
            if let Some(img) = image {
                bail!("--backend null takes no image (got {})", img.display());
            }
            if want.needs_storage {
                bail!("the null backend keeps no data: give --loopback an image (or no image for a temporary one)");
            }
            let size = args.disk_size.unwrap_or(DEFAULT_DISK_SIZE);
            if size < 512 || !size.is_multiple_of(512) {
                bail!("--disk-size must be a non-zero multiple of 512 bytes (got {size})");
            }
            return Ok(Disk::null(size));
        }
        let (path, temp) = match image {
            Some(p) => (p.clone(), false),
            None => {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir().join(format!("vblk-{}-{n}.img", std::process::id()));
                let _ = std::fs::remove_file(&p);
                (p, true)
            }
        };
        let exists = path.exists();
        let size = args.disk_size.or(want.temp_image).unwrap_or(DEFAULT_DISK_SIZE);
        if !exists && (size < 512 || !size.is_multiple_of(512)) {
            bail!("--disk-size must be a non-zero multiple of 512 bytes (got {size})");
        }
        let opts = DiskOptions { readonly: false, direct: !args.no_direct, create_size: (!exists).then_some(size) };
        if temp {
            self.temp = Some(path.clone());
        }
        let disk = Disk::open(&path, &opts).with_context(|| format!("cannot open image {}", path.display()))?;
        if disk.size() < 512 {
            bail!("image {} is smaller than one sector", path.display());
        }
        if !exists && !temp {
            eprintln!("vblk: created {} ({}, sparse)", path.display(), human(disk.size()));
        }
        Ok(disk)
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn take_queues(&mut self) -> Vec<QueueHandle> {
        self.device.as_mut().map(|d| d.take_queues()).unwrap_or_default()
    }

    /// The capacity the backend reported, or an error naming the option that replaces it.
    pub fn capacity(&self, option: &str) -> Result<u64> {
        match self.info().capacity {
            Some(c) => Ok(c),
            None => bail!("the backend does not report its capacity (no VHOST_USER_PROTOCOL_F_CONFIG); pass {option}"),
        }
    }

    /// Stop the rings cleanly, then the in-process server; remove a temporary image.
    pub fn close(mut self) {
        if let Some(dev) = self.device.take() {
            if let Err(e) = dev.shutdown(self.timeout) {
                tracing::warn!(error = %e, "stopping the rings failed");
            }
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.device.take();
        self.server.take();
        if let Some(p) = self.temp.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn connect_error(e: DriverError, start: Instant, timeout: Duration, queue_size: u16) -> anyhow::Error {
    match e {
        DriverError::Protocol("SET_VRING_NUM", _) => {
            anyhow::anyhow!(
                "the backend refused queue size {queue_size} (try a smaller --queue-size or --iodepth): {e}"
            )
        }
        DriverError::PackedNotOffered => anyhow::anyhow!("{e} (try --ring auto or --ring split)"),
        DriverError::Protocol(..) if start.elapsed() >= timeout => {
            anyhow::anyhow!("the backend did not answer within {timeout:?} ({e})")
        }
        e => anyhow::Error::new(e),
    }
}

/// The per-queue requests the connection can actually keep in flight.
pub fn check_depth(q: &QueueHandle, iodepth: u32) -> Result<()> {
    if (q.room() as u64) < iodepth as u64 {
        bail!("--iodepth {iodepth} does not fit in the virtqueue (room for {}); raise --queue-size", q.room());
    }
    Ok(())
}
