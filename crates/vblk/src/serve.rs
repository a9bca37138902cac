//! `vblk serve`: open (or create) the image, listen on the socket (and, with `--metrics`,
//! on a TCP address for Prometheus), print how to attach QEMU, serve frontends until
//! SIGINT/SIGTERM, then drain, flush and clean up.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use vblk_backend::qcow2::{check_header, has_qcow2_magic, CreateOptions, Qcow2Image, Qcow2Options};
use vblk_backend::rbd::{RbdOptions, RbdSpec};
use vblk_backend::RbdError;
use vblk_backend::{Disk, DiskOptions, EngineKind, FaultSpec};
use vblk_blk::qos::{Limits, Throttle, DEFAULT_BURST_MS};
use vblk_blk::DeviceParams;
use vblk_metrics::{MetricsServer, Registry};
use vblk_vhost_user::{DataPlaneOptions, Server, VblkDevice};

use crate::size::{human, parse_size};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum BackendKind {
    /// A raw image file or a block device.
    File,
    /// No storage: reads and writes complete at once (for benchmarks).
    Null,
}

/// The image format (never probed: a guest that writes a qcow2 header into a raw disk must
/// not make the next start read it as qcow2).
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum FormatArg {
    /// The image is the disk, byte for byte.
    Raw,
    /// qcow2 (v2 or v3), with its backing chain.
    Qcow2,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum EngineArg {
    /// io_uring, or plain syscalls where io_uring is unavailable.
    Auto,
    /// io_uring only.
    IoUring,
    /// Plain blocking syscalls.
    Sync,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Image file or block device; created (at --size) if absent: sparse if raw. Or a Ceph
    /// RBD image: rbd:POOL/IMAGE[@SNAP] (a snapshot is served read-only).
    #[arg(default_value = "vblk.img")]
    pub image: PathBuf,
    /// RBD: the cluster's ceph.conf [default: librados' search: $CEPH_CONF, /etc/ceph/ceph.conf].
    #[arg(long, value_name = "FILE")]
    pub ceph_conf: Option<PathBuf>,
    /// RBD: the client name, without "client." [default: admin].
    #[arg(long, value_name = "NAME")]
    pub ceph_id: Option<String>,
    /// RBD: seconds an I/O (or connecting) may wait for the cluster before it fails with
    /// an I/O error (rados_osd_op_timeout).
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub rbd_timeout: u64,
    /// RBD: take the image's exclusive lock and keep it while serving: another client cannot
    /// write it (and cannot take it), and start-up fails if another client keeps it. Off by
    /// default, as in QEMU: a live migration opens the image on both hosts.
    #[arg(long)]
    pub rbd_exclusive: bool,
    /// RBD: use librbd's write-back cache. Writes then complete from the cache, and a
    /// write-back that fails (the cluster down for longer than --rbd-timeout) fails the
    /// guest's next flush and every flush after it, until the daemon restarts. Off: a write
    /// completes when the cluster has it.
    #[arg(long)]
    pub rbd_cache: bool,
    /// Image format. An image with a qcow2 header is refused as raw: say --format qcow2 (or
    /// raw, for a raw disk whose guest wrote that header) explicitly.
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// qcow2: directories backing files may come from, besides the image's own (repeatable).
    #[arg(long, value_name = "DIR")]
    pub backing_allowed: Vec<PathBuf>,
    /// qcow2: the backing file of a newly created image (its format is read from its header).
    #[arg(long, value_name = "FILE")]
    pub backing: Option<PathBuf>,
    /// qcow2: the cluster size of a newly created image (4K..2M, a power of two).
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    pub cluster_size: u64,
    /// Path of the vhost-user unix socket.
    #[arg(long, default_value = "vblk.sock")]
    pub socket: PathBuf,
    /// Size of a newly created image (or of the null backend), e.g. 1G, 512M.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Export the disk read-only.
    #[arg(long)]
    pub readonly: bool,
    /// Number of virtqueues offered to the guest [default: number of CPUs].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: Option<u16>,
    /// Largest virtqueue size accepted (a power of two).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,
    /// Worker threads; queue i is served by thread i % N [default: one per queue].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// Device serial returned by GET_ID (at most 20 bytes).
    #[arg(long, default_value = "vblk")]
    pub serial: String,
    /// Use the host page cache instead of O_DIRECT.
    #[arg(long)]
    pub no_direct: bool,
    /// Adaptive polling: after work, spin on the rings for this many µs before sleeping
    /// (0: always sleep on the kick eventfds). Idle queues cost nothing: spinning stops
    /// this long after the last request. [default: 50; 0 for RBD images, whose completions
    /// come from librbd's threads, which a spinning worker would keep off the CPU]
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub poll_us: Option<u32>,
    /// Do not merge contiguous requests into one backend I/O.
    #[arg(long)]
    pub no_merge: bool,
    /// Storage backend.
    #[arg(long, value_enum, default_value_t = BackendKind::File)]
    pub backend: BackendKind,
    /// I/O engine.
    #[arg(long, value_enum, default_value_t = EngineArg::Auto)]
    pub engine: EngineArg,
    /// Disconnect a frontend that starts a vhost-user message and does not finish sending
    /// it within this many milliseconds (0: wait forever). Idle frontends are never timed out.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    pub message_timeout_ms: u64,
    /// Permission bits of the socket file (octal).
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// The export's name: the `export` label of its metrics [default: the image file's
    /// stem; an RBD image's name].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Serve Prometheus metrics (text format) at http://ADDR/metrics, e.g. 127.0.0.1:9184
    /// (port 0: any free port; the address is printed). Per queue: requests and bytes by
    /// operation, errors by status, in flight, a latency histogram, merged requests; per
    /// worker: time polling and sleeping.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    // A testing aid: see INJECT_LONG_HELP.
    #[arg(long, value_name = "SPEC", help = INJECT_HELP, long_help = INJECT_LONG_HELP)]
    pub inject: Option<FaultSpec>,
    /// QoS limits (last: their help heading applies to what follows; boxed: keeps the
    /// `Command` enum of main.rs small).
    #[command(flatten)]
    pub qos: Box<QosArgs>,
}

/// The export's QoS limits (token buckets, as QEMU's throttle groups): a request beyond
/// them waits in the ring, and nothing spins meanwhile.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "QoS")]
pub struct QosArgs {
    /// Limit the export to N requests per second (reads, writes, discards, write-zeroes;
    /// flushes are free). 0: no limit.
    #[arg(long, value_name = "N")]
    pub iops_limit: Option<u64>,
    /// Limit the data read and written to BYTES per second, e.g. 100M. 0: no limit.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub bps_limit: Option<u64>,
    /// How many ms of each limit may pass at once after idling (the burst allowance).
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_BURST_MS,
          value_parser = clap::value_parser!(u32).range(0..=60_000))]
    pub burst_ms: u32,
}

impl QosArgs {
    pub fn limits(&self) -> Limits {
        Limits { iops: self.iops_limit, bps: self.bps_limit, burst_ms: self.burst_ms }
    }
}

const INJECT_HELP: &str = "Testing aid: make chosen I/O fail, short or late, e.g. 'read:eio@offset=0-1M;flush:eio'";
const INJECT_LONG_HELP: &str = "\
TESTING AID, never for data you care about: make the backend fail, shorten or delay chosen
I/O, to see what a guest does with a failing disk. SPEC is a list of rules separated by ';'
or ',', each OPS:FAULT[@COND]... (or seed=N, the seed of rate=, default 0; or
submit:eagain[@times=N]: the next N io_uring submissions fail with EAGAIN):
  OPS    read, write, flush, discard, write-zeroes or any, joined with '+'
  FAULT  eio | enospc | short (half the data moves, reported short) | delay=DUR (250us, 5ms, 2s)
  COND   offset=START-END (bytes, K/M/G) | rate=P | after=N (matching ops pass first) | times=N
Examples: 'read:eio@offset=0-1M', 'write:enospc@rate=0.1', 'write:eio@after=100',
'any:delay=5ms', 'flush:eio' (every later flush fails too, as after a real fdatasync error).";

pub(crate) fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u32 = s.parse().map_err(|_| format!("invalid queue size '{s}'"))?;
    if !(2..=32768).contains(&n) || !n.is_power_of_two() {
        return Err(format!("queue size {n} must be a power of two between 2 and 32768"));
    }
    Ok(n as u16)
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8).ok().filter(|m| *m <= 0o777).ok_or_else(|| format!("invalid mode '{s}'"))
}

const DEFAULT_SIZE: u64 = 1 << 30;

fn open_disk(args: &ServeArgs) -> Result<Disk> {
    let disk = open_backend(args)?;
    Ok(match &args.inject {
        Some(spec) => {
            tracing::warn!(%spec, "FAULT INJECTION ON (--inject, a testing aid): I/O will fail on purpose");
            disk.with_faults(spec.clone())
        }
        None => disk,
    })
}

fn open_backend(args: &ServeArgs) -> Result<Disk> {
    if args.backend == BackendKind::Null {
        return Ok(Disk::null(args.size.unwrap_or(DEFAULT_SIZE)));
    }
    if let Some(spec) = RbdSpec::parse(&args.image.to_string_lossy()) {
        return open_rbd(args, spec.map_err(anyhow::Error::msg)?);
    }
    if args.ceph_conf.is_some() || args.ceph_id.is_some() {
        bail!("--ceph-conf and --ceph-id apply to RBD images (rbd:POOL/IMAGE)");
    }
    let exists = args.image.exists();
    if args.format == Some(FormatArg::Qcow2) {
        return open_qcow2(args, exists);
    }
    if args.backing.is_some() {
        bail!("--backing applies to qcow2 images: add --format qcow2");
    }
    if exists && args.format.is_none() && has_qcow2_magic(&args.image).unwrap_or(false) {
        bail!(
            "{} has a qcow2 header: serve it with --format qcow2, or with --format raw if it is a raw disk \
             (vblk never guesses: a guest can write any header into a raw disk)",
            args.image.display()
        );
    }
    if !exists && args.readonly {
        bail!("image {} does not exist (a read-only export cannot create it)", args.image.display());
    }
    if let Some(size) = args.size {
        if size == 0 || size % 512 != 0 {
            bail!("--size must be a non-zero multiple of 512 bytes (got {size})");
        }
    }
    if exists && args.size.is_some() {
        tracing::warn!("{} exists; --size only applies to new images", args.image.display());
    }
    let opts = DiskOptions {
        readonly: args.readonly,
        direct: !args.no_direct,
        create_size: if exists { None } else { Some(args.size.unwrap_or(DEFAULT_SIZE)) },
    };
    let disk = Disk::open(&args.image, &opts).with_context(|| format!("cannot open image {}", args.image.display()))?;
    if disk.size() < 512 {
        bail!("image {} is smaller than one sector", args.image.display());
    }
    if !exists {
        eprintln!("vblk: created {} ({}, sparse)", args.image.display(), human(disk.size()));
    }
    Ok(disk)
}

fn open_qcow2(args: &ServeArgs, exists: bool) -> Result<Disk> {
    let path = &args.image;
    if !exists {
        if args.readonly {
            bail!("image {} does not exist (a read-only export cannot create it)", path.display());
        }
        // Without --size, an overlay is as large as its backing file (as with qemu-img).
        let size = match (args.size, &args.backing) {
            (Some(size), _) => size,
            (None, Some(b)) if has_qcow2_magic(b).unwrap_or(false) => check_header(b)?.size,
            (None, Some(b)) => std::fs::metadata(b).with_context(|| format!("backing file {}", b.display()))?.len(),
            (None, None) => DEFAULT_SIZE,
        };
        if size == 0 || !size.is_multiple_of(512) {
            bail!("--size must be a non-zero multiple of 512 bytes (got {size})");
        }
        let cs = args.cluster_size;
        if !cs.is_power_of_two() || !(4096..=2 << 20).contains(&cs) {
            bail!("--cluster-size must be a power of two from 4K to 2M (got {cs})");
        }
        let create = CreateOptions { size, backing: args.backing.clone(), cluster_size: cs as u32 };
        Qcow2Image::create(path, &create)?;
        eprintln!(
            "vblk: created {} (qcow2, {}{})",
            path.display(),
            human(size),
            match &args.backing {
                Some(b) => format!(", backing file {}", b.display()),
                None => String::new(),
            }
        );
    } else if args.backing.is_some() {
        bail!("{} exists: --backing only applies to a new image", path.display());
    }
    let opts = Qcow2Options { readonly: args.readonly, backing_allowed: args.backing_allowed.clone() };
    Ok(Disk::open_qcow2(path, &opts)?)
}

fn open_rbd(args: &ServeArgs, spec: RbdSpec) -> Result<Disk> {
    if args.format == Some(FormatArg::Qcow2) || args.backing.is_some() {
        bail!("{spec}: an RBD image is served as it is (no --format qcow2, no --backing)");
    }
    if args.size.is_some() {
        bail!(
            "{spec}: --size does not create RBD images; create it with `rbd create {}/{} --size SIZE`",
            spec.pool,
            spec.image
        );
    }
    let opts = RbdOptions {
        conf: args.ceph_conf.clone(),
        id: args.ceph_id.clone(),
        readonly: args.readonly,
        timeout: std::time::Duration::from_secs(args.rbd_timeout),
        exclusive: args.rbd_exclusive,
        cache: args.rbd_cache,
    };
    match Disk::open_rbd(&spec, &opts) {
        Ok(disk) => Ok(disk),
        Err(e @ RbdError::Ceph { call: "rbd_lock_acquire", .. }) => Err(anyhow::Error::new(e).context(format!(
            "cannot take the exclusive lock of {spec}: another client (a vblk serve, QEMU) keeps it; stop that one, \
             or serve without --rbd-exclusive"
        ))),
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot open {spec}"))),
    }
}

/// The export's name: `--name`, or the image file's stem (an RBD image's name).
fn export_name(args: &ServeArgs) -> Result<String> {
    let name = match &args.name {
        Some(n) => n.clone(),
        None => match RbdSpec::parse(&args.image.to_string_lossy()) {
            Some(Ok(spec)) => match &spec.snap {
                Some(snap) => format!("{}@{snap}", spec.image),
                None => spec.image.clone(),
            },
            _ => args.image.file_stem().map_or_else(|| "vblk".into(), |s| s.to_string_lossy().into_owned()),
        },
    };
    vblk_metrics::export::check_name(&name).context("--name")?;
    Ok(name)
}

/// The QEMU arguments that attach this daemon's disk.
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

pub fn run(args: ServeArgs) -> Result<()> {
    let num_queues =
        args.num_queues.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(64) as u16));
    let threads = args.threads.unwrap_or(num_queues) as usize;
    let name = export_name(&args)?;
    // The metrics port first: when it is taken, nothing else was created. The export is
    // registered once its device exists (a scrape before that lists none).
    let registry = Arc::new(Registry::new());
    let metrics = args.metrics.as_deref().map(|addr| MetricsServer::start(addr, Arc::clone(&registry))).transpose()?;
    let disk = Arc::new(open_disk(&args)?);
    // A snapshot is read-only whatever --readonly says: the guest is told so.
    let readonly = args.readonly || disk.readonly();
    let mut params =
        DeviceParams::new(disk.size(), readonly, disk.logical_block_size(), &args.serial, num_queues, args.queue_size);
    params.merge = !args.no_merge;
    let params = Arc::new(params);
    let engine = match args.engine {
        EngineArg::Auto => EngineKind::Auto,
        EngineArg::IoUring => EngineKind::Uring,
        EngineArg::Sync => EngineKind::Sync,
    };
    // Fail early if the chosen engine cannot run here.
    vblk_backend::Engine::new(Arc::clone(&disk), engine, 1).context("cannot start the I/O engine")?;
    let throttle = Arc::new(Throttle::new(args.qos.limits()));
    let device = VblkDevice::new(
        Arc::clone(&params),
        Arc::clone(&disk),
        DataPlaneOptions {
            threads,
            engine,
            poll_us: args.poll_us.unwrap_or(if disk.is_rbd() { 0 } else { 50 }),
            throttle: Arc::clone(&throttle),
        },
    )?;
    if metrics.is_some() {
        // The latency histogram is measured only when someone can read it.
        device.metrics().set_timing(true);
    }
    registry.register(&name, Arc::clone(device.metrics()))?;
    let mut server = Server::bind(&args.socket, args.socket_mode, device)?;
    server
        .set_message_timeout(Some(std::time::Duration::from_millis(args.message_timeout_ms)).filter(|t| !t.is_zero()));
    let socket = std::fs::canonicalize(&args.socket).unwrap_or_else(|_| args.socket.clone());

    let (shutdown_rx, shutdown_tx) = UnixStream::pair().context("socketpair")?;
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::low_level::pipe::register(sig, shutdown_tx.try_clone()?).context("installing signal handler")?;
    }

    eprintln!(
        "vblk: serving {} on {} ({} queue{}, {} thread{}{})",
        disk.describe(),
        socket.display(),
        num_queues,
        if num_queues == 1 { "" } else { "s" },
        threads.min(num_queues as usize),
        if threads.min(num_queues as usize) == 1 { "" } else { "s" },
        if readonly { ", read-only" } else { "" },
    );
    if throttle.is_limited() {
        eprintln!("vblk: QoS limits: {}", throttle.limits());
    }
    if let Some(m) = &metrics {
        eprintln!("vblk: metrics on http://{}/metrics (export {name:?})", m.local_addr());
    }
    eprintln!("vblk: attach it with:\n{}", qemu_command(&socket, num_queues));

    server.run(shutdown_rx.as_raw_fd())?;
    tracing::info!("shutting down: flushing the disk");
    if !readonly {
        disk.flush_sync().context("final flush failed")?;
    }
    drop(server);
    drop(metrics);
    eprintln!("vblk: stopped");
    Ok(())
}
