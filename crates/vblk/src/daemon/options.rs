//! The options of one export, defined once (clap) and read from three places: the command
//! line of `vblk serve`, a `[[export]]` table of the `--config` file, and the params of the
//! `export_add` call on the control socket. A table or params object is turned back into
//! command-line arguments (`{"num_queues": 2, "readonly": true}` →
//! `--num-queues=2 --readonly`) and parsed by the same clap definition, so the three agree
//! on names, defaults and validation.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Args, CommandFactory, FromArgMatches, Parser, ValueEnum};
use serde_json::{Map, Value};
use vblk_backend::rbd::RbdSpec;
use vblk_backend::FaultSpec;
use vblk_blk::qos::{Limits, DEFAULT_BURST_MS};

use crate::size::parse_size;

/// The image served when `vblk serve` is given none (and no `--config`/`--control`).
pub const DEFAULT_IMAGE: &str = "vblk.img";

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

#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// Image file or block device; created (at --size) if absent: sparse if raw. Or a Ceph
    /// RBD image: rbd:POOL/IMAGE[@SNAP] (a snapshot is served read-only). [default:
    /// vblk.img, unless --config or --control is given]
    pub image: Option<PathBuf>,
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
    /// Adaptive polling: after work, spin on the rings for up to this many µs before
    /// sleeping (0: always sleep on the kick eventfds). The window adapts like QEMU's
    /// iothread polling: it halves (down to 0) when work comes later than this after the
    /// last (a slow frontend soon costs no spinning) and doubles back from 4 µs when work
    /// comes within it. Idle queues cost nothing. [default: 50; 0 for RBD images, whose completions come
    /// from librbd's threads, which a spinning worker would keep off the CPU]
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
    // A testing aid: see INJECT_LONG_HELP.
    #[arg(long, value_name = "SPEC", help = INJECT_HELP, long_help = INJECT_LONG_HELP)]
    pub inject: Option<FaultSpec>,
    /// QoS: limit the export to N requests per second (reads, writes, discards,
    /// write-zeroes; flushes are free). 0: no limit. Token buckets, as QEMU's throttle
    /// groups: a request beyond the limit waits in the ring, and nothing spins meanwhile.
    /// Online: `vblk ctl qos`.
    #[arg(long, value_name = "N", help_heading = "QoS")]
    pub iops_limit: Option<u64>,
    /// QoS: limit the data read and written to BYTES per second, e.g. 100M. 0: no limit.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, help_heading = "QoS")]
    pub bps_limit: Option<u64>,
    /// QoS: how many ms of each limit may pass at once after idling (the burst allowance).
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_BURST_MS, help_heading = "QoS",
          value_parser = clap::value_parser!(u32).range(0..=60_000))]
    pub burst_ms: u32,
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

pub(crate) fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8).ok().filter(|m| *m <= 0o777).ok_or_else(|| format!("invalid mode '{s}'"))
}

impl ExportArgs {
    /// The QoS limits it starts with.
    pub fn limits(&self) -> Limits {
        Limits { iops: self.iops_limit, bps: self.bps_limit, burst_ms: self.burst_ms }
    }

    /// The image (or RBD spec) to serve.
    pub fn image_path(&self) -> &Path {
        self.image.as_deref().unwrap_or(Path::new(DEFAULT_IMAGE))
    }

    /// The export's name: `--name`, or the image file's stem (an RBD image's name).
    pub fn export_name(&self) -> Result<String> {
        let name = match &self.name {
            Some(n) => n.clone(),
            None => match RbdSpec::parse(&self.image_path().to_string_lossy()) {
                Some(Ok(spec)) => match &spec.snap {
                    Some(snap) => format!("{}@{snap}", spec.image),
                    None => spec.image.clone(),
                },
                _ => self.image_path().file_stem().map_or_else(|| "vblk".into(), |s| s.to_string_lossy().into_owned()),
            },
        };
        // A derived name keeps what a name may hold ("my disk.img" is served as "my_disk").
        let name = if self.name.is_some() {
            name
        } else {
            name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-@:+".contains(c) { c } else { '_' }).collect()
        };
        vblk_metrics::export::check_name(&name).context("export name")?;
        Ok(name)
    }

    /// Parse the options of a config table or of `export_add`'s params (see the module doc).
    pub fn from_object(obj: &Map<String, Value>) -> Result<ExportArgs> {
        let args = object_to_args(obj)?;
        let matches = ExportCli::command()
            .try_get_matches_from(std::iter::once("export".to_string()).chain(args))
            .map_err(|e| anyhow::anyhow!("{}", clap_message(&e)))?;
        let parsed = ExportArgs::from_arg_matches(&matches).map_err(|e| anyhow::anyhow!("{}", clap_message(&e)))?;
        if parsed.image.is_none() {
            bail!("an export needs an image");
        }
        if !obj.contains_key("socket") {
            bail!("an export needs a socket");
        }
        Ok(parsed)
    }
}

/// `ExportArgs` on its own, for parsing tables and params.
#[derive(Parser, Debug)]
#[command(name = "export", no_binary_name = false, disable_help_flag = true)]
struct ExportCli {
    #[command(flatten)]
    args: ExportArgs,
}

/// clap's error without its usage block and "For more information" tail: one line.
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("invalid options");
    first.trim_start_matches("error: ").to_string()
}

/// The options given on a command line (only those: defaults stay out) as an object with
/// the field names as keys: what `vblk ctl add` sends as `export_add`'s params.
pub fn matches_to_object(matches: &ArgMatches) -> Map<String, Value> {
    let cmd = ExportCli::command();
    let mut obj = Map::new();
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if matches.value_source(id) != Some(ValueSource::CommandLine) {
            continue;
        }
        let value = match arg.get_action() {
            ArgAction::SetTrue => Value::Bool(true),
            ArgAction::Append => Value::Array(
                matches
                    .get_raw(id)
                    .into_iter()
                    .flatten()
                    .map(|v| Value::String(v.to_string_lossy().into_owned()))
                    .collect(),
            ),
            _ => match matches.get_raw(id).and_then(|mut v| v.next()) {
                Some(v) => Value::String(v.to_string_lossy().into_owned()),
                None => continue,
            },
        };
        obj.insert(id.to_string(), value);
    }
    obj
}

/// Options that name files.
const PATH_OPTIONS: [&str; 5] = ["image", "socket", "backing", "ceph_conf", "backing_allowed"];

/// Make the paths in `obj` absolute against `base` (the caller's working directory, the
/// config file's directory), or, without a base, refuse relative ones: a daemon's working
/// directory is not its caller's.
pub fn resolve_paths(obj: &mut Map<String, Value>, base: Option<&Path>) -> Result<()> {
    for (key, value) in obj.iter_mut() {
        if !PATH_OPTIONS.contains(&key.replace('-', "_").as_str()) {
            continue;
        }
        let values: Vec<&mut Value> = match value {
            Value::Array(items) => items.iter_mut().collect(),
            v => vec![v],
        };
        for v in values {
            let Some(p) = v.as_str() else { continue };
            if p.starts_with("rbd:") || Path::new(p).is_absolute() {
                continue;
            }
            match base {
                Some(b) => *v = Value::String(b.join(p).to_string_lossy().into_owned()),
                None => bail!("'{key}' must be an absolute path (got '{p}')"),
            }
        }
    }
    Ok(())
}

/// An object of options as command-line arguments: keys are the option names with `_` or
/// `-` (`num_queues`, `num-queues`), `image` is the positional argument; `true` is a flag,
/// `false` and `null` leave the option out, an array repeats it.
fn object_to_args(obj: &Map<String, Value>) -> Result<Vec<String>> {
    let cmd = ExportCli::command();
    let mut args = Vec::new();
    let mut image = None;
    for (key, value) in obj {
        let id = key.replace('-', "_");
        if id == "image" {
            match value {
                Value::String(s) => image = Some(s.clone()),
                _ => bail!("option 'image' must be a string"),
            }
            continue;
        }
        let Some(arg) = cmd.get_arguments().find(|a| a.get_id().as_str() == id && a.get_long().is_some()) else {
            bail!("unknown option '{key}'");
        };
        let long = arg.get_long().unwrap_or_default();
        let flag = matches!(arg.get_action(), ArgAction::SetTrue);
        let mut push = |v: &Value| -> Result<()> {
            match (v, flag) {
                (Value::Bool(true), true) => args.push(format!("--{long}")),
                (Value::Bool(false) | Value::Null, _) => {}
                (Value::Bool(true), false) => bail!("option '{key}' takes a value, not true"),
                (_, true) => bail!("option '{key}' is a flag: true or false"),
                (Value::String(s), false) => args.push(format!("--{long}={s}")),
                (Value::Number(n), false) => args.push(format!("--{long}={n}")),
                (Value::Array(_) | Value::Object(_), false) => bail!("option '{key}' takes one value"),
            }
            Ok(())
        };
        match value {
            Value::Array(items) if matches!(arg.get_action(), ArgAction::Append) => {
                for v in items {
                    push(v)?;
                }
            }
            v => push(v)?,
        }
    }
    if let Some(image) = image {
        args.push("--".into());
        args.push(image);
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn an_object_parses_like_the_command_line() {
        let a = ExportArgs::from_object(&obj(json!({
            "image": "/tmp/a.img", "name": "a", "socket": "/tmp/a.sock", "num_queues": 2,
            "readonly": true, "no-merge": false, "backing_allowed": ["/x", "/y"], "size": "1G",
        })))
        .unwrap();
        assert_eq!(a.image.as_deref(), Some(Path::new("/tmp/a.img")));
        assert_eq!(a.num_queues, Some(2));
        assert!(a.readonly && !a.no_merge);
        assert_eq!(a.backing_allowed.len(), 2);
        assert_eq!(a.size, Some(1 << 30));
        assert_eq!(a.queue_size, 256, "defaults come from the clap definition");
    }

    #[test]
    fn bad_objects_get_one_clear_line() {
        let err = |v: Value| format!("{:#}", ExportArgs::from_object(&obj(v)).unwrap_err());
        assert_eq!(err(json!({"image": "a", "bogus": 1})), "unknown option 'bogus'");
        assert_eq!(err(json!({"image": "a"})), "an export needs a socket");
        assert_eq!(err(json!({"socket": "s"})), "an export needs an image");
        assert_eq!(
            err(json!({"image": "a", "socket": "s", "readonly": "yes"})),
            "option 'readonly' is a flag: true or false"
        );
        let e = err(json!({"image": "a", "socket": "s", "queue_size": 3}));
        assert!(e.contains("power of two") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn a_derived_name_is_made_valid_a_given_one_is_checked() {
        let a = |v: Value| ExportArgs::from_object(&obj(v)).unwrap().export_name();
        assert_eq!(a(json!({"image": "/x/my disk (1).img", "socket": "/s"})).unwrap(), "my_disk__1_");
        assert_eq!(a(json!({"image": "rbd:pool/vm1@snap", "socket": "/s"})).unwrap(), "vm1@snap");
        assert!(a(json!({"image": "/x/a.img", "socket": "/s", "name": "my disk"})).is_err());
    }

    #[test]
    fn command_line_options_round_trip() {
        let m = ExportCli::command()
            .try_get_matches_from(["export", "--socket", "/s", "--readonly", "--backing-allowed", "/d", "-", "img"])
            .map(|_| ())
            .err();
        assert!(m.is_some(), "a stray '-' is refused");
        let m = ExportCli::command()
            .try_get_matches_from(["export", "--socket", "/s", "--readonly", "--backing-allowed", "/d", "img"])
            .unwrap();
        let o = matches_to_object(&m);
        assert_eq!(
            Value::Object(o.clone()),
            json!({"socket": "/s", "readonly": true, "backing_allowed": ["/d"], "image": "img"})
        );
        let a = ExportArgs::from_object(&o).unwrap();
        assert!(a.readonly);
        assert_eq!(a.socket, PathBuf::from("/s"));
    }
}
