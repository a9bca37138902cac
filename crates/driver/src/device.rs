//! Connecting to a vhost-user-blk backend: what QEMU's `vhost-user-blk` does before the
//! guest's driver runs — negotiate features and protocol features, share memory, set up
//! the rings — then one queue handle per virtqueue.
//!
//! The rings are split (virtio 1.2 §2.7) or packed (§2.8, `VIRTIO_F_RING_PACKED`), as
//! [`Options::ring`] asks and the backend offers. For a packed ring, `SET_VRING_ADDR`
//! carries the descriptor ring, the driver event area (in the avail field) and the device
//! event area (in the used field), as QEMU sends them, and `SET_VRING_BASE` both positions
//! (see `session.rs`).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vblk_queue::{DriverRing, PackedBase, RingFeatures, RingKind, MAX_QUEUE_SIZE};
use vblk_virtio::blk::{features as blkf, BlkConfig};
use vblk_virtio::features as vf;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::{Layout, SharedMemory};
use crate::queue::{Op, QueueHandle};
use crate::session::{share_memory, start_ring, vu, Conn, Plan, PlannedRing, RingBase, Session};
use crate::DriverError;

/// Features the driver can use (and acks when offered).
const DRIVER_FEATURES: u64 = vf::VERSION_1
    | vf::RING_EVENT_IDX
    | vf::RING_INDIRECT_DESC
    | vf::RING_PACKED
    | vf::VHOST_USER_PROTOCOL_FEATURES
    | blkf::SIZE_MAX
    | blkf::SEG_MAX
    | blkf::BLK_SIZE
    | blkf::RO
    | blkf::FLUSH
    | blkf::TOPOLOGY
    | blkf::CONFIG_WCE
    | blkf::MQ
    | blkf::DISCARD
    | blkf::WRITE_ZEROES;

/// Which virtqueue layout to ask for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RingChoice {
    /// The split ring (§2.7), whatever the backend offers.
    Split,
    /// The packed ring (§2.8): connecting fails if the backend does not offer
    /// `VIRTIO_F_RING_PACKED`.
    Packed,
    /// Packed when the backend offers it, else split.
    #[default]
    Auto,
}

/// How to connect.
#[derive(Clone, Debug)]
pub struct Options {
    /// Queues to set up (at most what the backend offers) [default: 1].
    pub num_queues: u16,
    /// Ring size: a power of two for a split ring, anything in `1..=32768` for a packed one.
    pub queue_size: u16,
    /// Bytes of shared memory for I/O buffers.
    pub buffer_memory: u64,
    /// Use indirect descriptors when the backend offers them.
    pub indirect: bool,
    /// Use EVENT_IDX when the backend offers it.
    pub event_idx: bool,
    /// How long to wait for the backend (messages and completions).
    pub timeout: Duration,
    /// Survive the backend's restart ([`Device::connect`] only): when its socket hangs up,
    /// keep trying to connect again for this long, hand the new process the inflight area
    /// (negotiated when offered) and go on; `None`: a hang-up is an error.
    pub reconnect: Option<Duration>,
    /// Split or packed rings [default: packed if offered].
    pub ring: RingChoice,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            num_queues: 1,
            queue_size: 128,
            buffer_memory: 64 << 20,
            indirect: true,
            event_idx: true,
            timeout: Duration::from_secs(10),
            reconnect: None,
            ring: RingChoice::Auto,
        }
    }
}

/// What the backend told us about the disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Capacity in bytes, if the backend offers `VHOST_USER_PROTOCOL_F_CONFIG`.
    pub capacity: Option<u64>,
    pub block_size: u32,
    /// Queues the backend offers / that were set up.
    pub max_queues: u16,
    pub num_queues: u16,
    pub queue_size: u16,
    /// The virtqueue layout negotiated.
    pub ring: RingKind,
    /// Virtio features offered and negotiated.
    pub offered_features: u64,
    pub features: u64,
    /// Protocol features negotiated.
    pub protocol_features: u64,
    pub seg_max: u32,
    pub size_max: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: bool,
    pub readonly: bool,
    pub writeback: bool,
    pub serial: Option<String>,
    pub config: Option<BlkConfig>,
}

impl DeviceInfo {
    pub fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }
}

/// A connected virtio-blk device.
pub struct Device {
    session: Arc<Session>,
    shared: Arc<SharedMemory>,
    info: DeviceInfo,
    queues: Vec<QueueHandle>,
}

impl Device {
    /// Connect to the backend listening on `path`.
    pub fn connect(path: &Path, opts: &Options) -> Result<Device, DriverError> {
        let stream = UnixStream::connect(path).map_err(|e| DriverError::Connect(path.to_owned(), e))?;
        Self::setup(stream, opts, Some(path))
    }

    /// Set up the device over an already connected socket (no reconnecting: there is no
    /// path to connect to again).
    pub fn from_stream(stream: UnixStream, opts: &Options) -> Result<Device, DriverError> {
        Self::setup(stream, opts, None)
    }

    fn setup(stream: UnixStream, opts: &Options, path: Option<&Path>) -> Result<Device, DriverError> {
        let reconnect = path.zip(opts.reconnect);
        if opts.queue_size == 0 || opts.queue_size > MAX_QUEUE_SIZE || opts.num_queues == 0 {
            return Err(DriverError::BadOptions("queue size must be in 1..=32768 and num_queues >= 1"));
        }
        let socket = Arc::new(stream.as_fd().try_clone_to_owned().map_err(DriverError::Socket)?);
        // A backend that stops answering must not hang us: past the timeout the watchdog
        // shuts the socket down and the pending message fails.
        let watchdog = Watchdog::arm(&socket, opts.timeout);
        let mut fe = Frontend::from_stream(stream, u16::MAX as u64);

        fe.set_owner().map_err(vu("SET_OWNER"))?;
        let offered = fe.get_features().map_err(vu("GET_FEATURES"))?;
        if offered & vf::VERSION_1 == 0 {
            return Err(DriverError::Unsupported("VIRTIO_F_VERSION_1"));
        }
        let mut want = offered & DRIVER_FEATURES;
        if !opts.indirect {
            want &= !vf::RING_INDIRECT_DESC;
        }
        if !opts.event_idx {
            want &= !vf::RING_EVENT_IDX;
        }
        match opts.ring {
            RingChoice::Split => want &= !vf::RING_PACKED,
            RingChoice::Packed if want & vf::RING_PACKED == 0 => return Err(DriverError::PackedNotOffered),
            RingChoice::Packed | RingChoice::Auto => {}
        }
        let kind = if want & vf::RING_PACKED != 0 { RingKind::Packed } else { RingKind::Split };
        if kind == RingKind::Split && !opts.queue_size.is_power_of_two() {
            return Err(DriverError::BadOptions("a split ring's size must be a power of two"));
        }
        if want & vf::RING_INDIRECT_DESC == 0 && opts.queue_size < 3 {
            return Err(DriverError::BadOptions(
                "a queue of fewer than 3 entries needs indirect descriptors (a request takes up to 3)",
            ));
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        if want & vf::VHOST_USER_PROTOCOL_FEATURES != 0 {
            let pf = fe.get_protocol_features().map_err(vu("GET_PROTOCOL_FEATURES"))?;
            let mut usable = VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
            if reconnect.is_some() {
                usable |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
            }
            protocol = pf & usable;
            fe.set_protocol_features(protocol).map_err(vu("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let max_queues = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            fe.get_queue_num().map_err(vu("GET_QUEUE_NUM"))?.min(u16::MAX as u64) as u16
        } else {
            1
        };
        if max_queues == 0 {
            return Err(DriverError::Unsupported("a device with zero queues"));
        }
        let num_queues = opts.num_queues.min(max_queues);
        let config = if protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let len = 60u32;
            let (_, bytes) = fe
                .get_config(0, len, VhostUserConfigFlags::WRITABLE, &vec![0u8; len as usize])
                .map_err(vu("GET_CONFIG"))?;
            Some(BlkConfig::from_bytes(&bytes))
        } else {
            None
        };
        fe.set_features(want).map_err(vu("SET_FEATURES"))?;
        // A frontend that may reconnect keeps an inflight area the backend fills, and
        // hands it to the backend's next process.
        let inflight = if protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            let ask = VhostUserInflight::new(0, 0, num_queues, opts.queue_size);
            let (area, file) = fe.get_inflight_fd(&ask).map_err(vu("GET_INFLIGHT_FD"))?;
            fe.set_inflight_fd(&area, file.as_raw_fd()).map_err(vu("SET_INFLIGHT_FD"))?;
            Some((area, file))
        } else {
            None
        };

        let layout = Layout::new(num_queues, opts.queue_size, opts.buffer_memory, kind);
        let shared = SharedMemory::new(layout)?;
        share_memory(&mut fe, &shared, protocol)?;

        let ring_features =
            RingFeatures { event_idx: want & vf::RING_EVENT_IDX != 0, indirect: want & vf::RING_INDIRECT_DESC != 0 };
        let enable = want & vf::VHOST_USER_PROTOCOL_FEATURES != 0;
        let mut rings = Vec::new();
        let mut setups = Vec::with_capacity(num_queues as usize);
        // A fresh ring: split at avail index 0, packed with both positions at slot 0, wrap
        // counter 1.
        let base = match kind {
            RingKind::Split => RingBase::Split(0),
            RingKind::Packed => RingBase::Packed(PackedBase::START),
        };
        for q in 0..num_queues {
            let ring =
                DriverRing::new(kind, Arc::clone(&shared.mem), opts.queue_size as u32, layout.rings(q), ring_features)?;
            let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(DriverError::Eventfd)?;
            let call = EventFd::new(libc::EFD_NONBLOCK).map_err(DriverError::Eventfd)?;
            start_ring(&mut fe, &socket, protocol, &shared, q, opts.queue_size, base, (&kick, &call), enable)?;
            if reconnect.is_some() {
                let dup = |e: &EventFd| e.try_clone().map_err(DriverError::Eventfd);
                let watch = ring.as_packed().map(|p| p.watch());
                rings.push(PlannedRing { kick: dup(&kick)?, call: dup(&call)?, watch });
            }
            setups.push((ring, kick, call));
        }
        let plan = reconnect.map(|(path, patience)| Plan {
            path: path.to_path_buf(),
            patience,
            timeout: opts.timeout,
            features: want,
            protocol,
            inflight,
            shared: Arc::clone(&shared),
            queue_size: opts.queue_size,
            rings,
        });
        let session = Arc::new(Session::new(Conn { frontend: fe, socket: Arc::clone(&socket) }, plan));
        let queues = setups
            .into_iter()
            .enumerate()
            .map(|(q, (ring, kick, call))| {
                QueueHandle::new(
                    q as u16,
                    Arc::clone(&shared),
                    ring,
                    kick,
                    call,
                    Arc::clone(&session),
                    ring_features.indirect,
                    opts.timeout,
                )
            })
            .collect();

        let c = config.unwrap_or_default();
        let mut info = DeviceInfo {
            capacity: config.map(|c| c.capacity * 512),
            block_size: if want & blkf::BLK_SIZE != 0 && c.blk_size >= 512 { c.blk_size } else { 512 },
            max_queues,
            num_queues,
            queue_size: opts.queue_size,
            ring: kind,
            offered_features: offered,
            features: want,
            protocol_features: protocol.bits(),
            seg_max: if want & blkf::SEG_MAX != 0 { c.seg_max } else { 0 },
            size_max: if want & blkf::SIZE_MAX != 0 { c.size_max } else { 0 },
            max_discard_sectors: if want & blkf::DISCARD != 0 { c.max_discard_sectors } else { 0 },
            max_discard_seg: if want & blkf::DISCARD != 0 { c.max_discard_seg } else { 0 },
            max_write_zeroes_sectors: if want & blkf::WRITE_ZEROES != 0 { c.max_write_zeroes_sectors } else { 0 },
            max_write_zeroes_seg: if want & blkf::WRITE_ZEROES != 0 { c.max_write_zeroes_seg } else { 0 },
            write_zeroes_may_unmap: want & blkf::WRITE_ZEROES != 0 && c.write_zeroes_may_unmap != 0,
            readonly: want & blkf::RO != 0,
            writeback: if want & blkf::CONFIG_WCE != 0 { c.writeback != 0 } else { want & blkf::FLUSH != 0 },
            serial: None,
            config,
        };
        let mut dev = Device { session, shared, info: info.clone(), queues };
        info.serial = dev.read_serial()?;
        dev.info = info;
        if watchdog.fired() {
            return Err(DriverError::Timeout(opts.timeout));
        }
        Ok(dev)
    }

    /// GET_ID on queue 0 (None if the backend refuses it).
    fn read_serial(&mut self) -> Result<Option<String>, DriverError> {
        let q = &mut self.queues[0];
        let buf = q.alloc(20)?;
        buf.write_at(0, &[0u8; 20])?;
        q.submit(Op::GetId, Some(buf), 0)?;
        q.kick()?;
        let mut out = Vec::new();
        q.wait(&mut out, 1)?;
        let c = out.pop().ok_or(DriverError::Timeout(Duration::ZERO))?;
        match (c.result, c.buf) {
            (Ok(()), Some(b)) => {
                let v = b.to_vec()?;
                let end = v.iter().position(|&x| x == 0).unwrap_or(v.len());
                Ok(Some(String::from_utf8_lossy(&v[..end]).into_owned()))
            }
            _ => Ok(None),
        }
    }

    /// Use the vhost-user connection, for the raw API (e.g. `SET_VRING_ERR`).
    #[cfg(feature = "raw")]
    pub(crate) fn with_frontend<T>(&self, f: impl FnOnce(&mut Frontend) -> T) -> T {
        f(&mut self.session.conn().frontend)
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The virtqueue layout negotiated: packed with `VIRTIO_F_RING_PACKED`, else split.
    pub fn ring_kind(&self) -> RingKind {
        self.info.ring
    }

    /// Allocate an I/O buffer in shared memory.
    pub fn alloc(&self, len: u32) -> Result<crate::IoBuf, DriverError> {
        self.shared.alloc(len)
    }

    /// Take the queue handles (one per thread). Called once; later calls get none.
    pub fn take_queues(&mut self) -> Vec<QueueHandle> {
        std::mem::take(&mut self.queues)
    }

    /// Stop the rings cleanly (GET_VRING_BASE each) before disconnecting.
    pub fn shutdown(self, timeout: Duration) -> Result<(), DriverError> {
        let conn = self.session.conn();
        let _watchdog = Watchdog::arm(&conn.socket, timeout);
        for q in 0..self.info.num_queues as usize {
            let base = conn.frontend.get_vring_base(q).map_err(vu("GET_VRING_BASE"))?;
            match RingBase::decode(self.info.ring, base, self.info.queue_size) {
                Some(b) => tracing::debug!(queue = q, base = ?b, "ring stopped"),
                None => tracing::warn!(queue = q, base, "GET_VRING_BASE: a position outside the ring"),
            }
        }
        Ok(())
    }
}

/// Shuts a socket down if it is not disarmed (dropped) in time, so a blocking vhost-user
/// exchange with a silent backend fails instead of hanging.
pub(crate) struct Watchdog {
    cancel: Option<std::sync::mpsc::Sender<()>>,
    fired: Arc<std::sync::atomic::AtomicBool>,
}

impl Watchdog {
    pub(crate) fn arm(socket: &Arc<OwnedFd>, timeout: Duration) -> Watchdog {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sock, f) = (Arc::clone(socket), Arc::clone(&fired));
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                f.store(true, std::sync::atomic::Ordering::SeqCst);
                // SAFETY: shutdown(2) on a descriptor we own; it only ends the connection.
                unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
            }
        });
        Watchdog { cancel: Some(tx), fired }
    }

    pub(crate) fn fired(&self) -> bool {
        self.fired.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.cancel.take();
    }
}
