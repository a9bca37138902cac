//! The control plane: vhost-user messages applied to the device's state.
//!
//! The `vhost` crate parses messages, checks their sizes and fds, and calls the
//! [`VhostUserBackendReqHandlerMut`] methods below; this module owns what they mean for
//! vblk. Rules it keeps:
//!
//! - A ring runs in a worker when it has a size, addresses, a kick fd (`SET_VRING_KICK`
//!   starts it, `GET_VRING_BASE` stops it) and is enabled (rings start disabled once
//!   `VHOST_USER_F_PROTOCOL_FEATURES` is negotiated).
//! - A message that changes a ring stops that ring's worker first (draining its I/O) and
//!   restarts it afterwards; one that changes the memory table stops them all. So no
//!   worker ever sees a ring or a memory table change under it, and no mapping is
//!   dropped while I/O into it is in flight.
//! - Every index, size and address is checked; a bad one gets an error reply.
//!
//! ## Online resize and the backend channel
//!
//! [`VblkDevice::resize`] resizes the disk and the capacity the device reports, then tells
//! the frontend with `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the backend channel
//! (protocol feature `BACKEND_REQ`, the socket the frontend hands over with
//! `SET_BACKEND_REQ_FD`). QEMU answers it by reading the config space again (`GET_CONFIG`
//! on the main channel) and, when the capacity changed, raising the guest's config
//! interrupt: the guest's disk changes size without a reboot. Rules:
//!
//! - **Never wait for the frontend while holding the device.** `resize` runs under the
//!   device's mutex, which the socket thread also needs to answer QEMU's `GET_CONFIG`; and
//!   QEMU sends that `GET_CONFIG` from inside its handler of the notification, before it
//!   would send a `REPLY_ACK`. So the notification is sent without `NEED_REPLY` and without
//!   blocking (`MSG_DONTWAIT`): QEMU handles it once `resize` has returned and the lock is
//!   free. A failed send is logged, never an error of the resize.
//! - **Order against I/O**: growing resizes the disk first, then raises the capacity (no
//!   request can reach the new range before it exists); shrinking stops and drains every
//!   worker, lowers the capacity, then shrinks the disk (no write in flight past the new
//!   end can extend a truncated file again), and restarts them.
//! - **Until the frontend has read it, and only to a running device**: QEMU reads the
//!   config space once, when the device is realized, and again only on a notification,
//!   which it ignores while its vhost device is not started (QEMU before 7.2 even crashed
//!   on it: `dev->vdev` is NULL then). So the device remembers the capacity the frontend
//!   last read (`GET_CONFIG`; unknown in a new process) and, while they differ, tells it
//!   whenever it can: at the resize if a ring runs (after `SET_VRING_KICK`, until
//!   `GET_VRING_BASE`), else when the device next starts (its first ring kick after all
//!   were stopped). A resize while the guest had no driver, while QEMU was reconnecting or
//!   this daemon restarting, or one whose notification QEMU saw only after its device
//!   stopped, reaches the guest at the next start; a frontend that already read the size
//!   is not bothered. The frontend must have negotiated `CONFIG` too. Recent QEMU (10)
//!   copies the whole config space on a notification, so every byte of it must be right
//!   for the next driver, whichever driver runs the device now (`DeviceParams::config`'s
//!   `writeback`).
//! - The channel belongs to the connection: dropped at disconnect, kept across
//!   `RESET_OWNER`/`RESET_DEVICE`.
//!
//! The `vhost` crate (0.18) hands the channel over as a `Backend` that can send no
//! `CONFIG_CHANGE_MSG` and keeps its socket private; `server.rs` therefore peeks at a
//! `SET_BACKEND_REQ_FD` before the crate receives it and gives the device a duplicate of
//! the socket ([`VblkDevice::offer_backend_socket`]), which the device uses once the crate
//! has accepted the message (`set_backend_req_fd`).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vblk_backend::{Disk, Engine, EngineKind};
use vblk_blk::{DeviceParams, Throttle};
use vblk_metrics::ExportMetrics;
use vblk_queue::inflight::{split_region_size, InflightSplit};
use vblk_queue::inflight_packed::{packed_region_size, InflightPacked};
use vblk_queue::layout::{MAX_PACKED_SIZE, PACKED_EVENT_LEN};
use vblk_queue::{AddrSpace, PackedQueue, Ring, RingAddrs, RingFeatures, SplitLayout, SplitQueue};
use vblk_virtio::blk::{features as blkf, BlkConfig, SECTOR_SHIFT};
use vblk_virtio::features as vf;
use vblk_virtio::{DirtyLog, GuestArea, GuestMemory, RegionSpec};
use vhost::vhost_user::message::{
    BackendReq, VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Backend, GpuBackend, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;

use crate::worker::{RingSetup, RingStop, Worker, WorkerOptions};

/// Memory slots offered with `CONFIGURE_MEM_SLOTS`.
pub const MAX_MEM_SLOTS: u64 = 32;

/// Regions one `SET_MEM_TABLE` may carry: the vhost-user spec's "Multiple Memory regions
/// description" holds up to `VHOST_MEMORY_BASELINE_NREGIONS` (8) regions; more memory
/// needs `CONFIGURE_MEM_SLOTS` and `ADD_MEM_REG`. (The `vhost` crate accepts up to 32.)
pub const MAX_MEM_TABLE_REGIONS: usize = 8;

/// Errors of the control plane. Each becomes an error reply (or, for messages that
/// expect a value, a disconnect).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("vring index {0} out of range")]
    BadRingIndex(u32),
    #[error("vring size {0} invalid (power of two up to {1})")]
    BadRingSize(u32, u16),
    #[error("vring base {0} out of range")]
    BadRingBase(u32),
    #[error("vring {0}: {1}")]
    Ring(usize, vblk_queue::QueueError),
    #[error("memory table: {0}")]
    Memory(#[from] vblk_virtio::MemoryError),
    #[error("more than {MAX_MEM_SLOTS} memory regions")]
    TooManyRegions,
    #[error("SET_MEM_TABLE with {0} regions (at most {MAX_MEM_TABLE_REGIONS})")]
    TooManyTableRegions(usize),
    #[error("features {0:#x} were not offered")]
    BadFeatures(u64),
    #[error("config access at {offset}+{len} refused")]
    BadConfigAccess { offset: u32, len: usize },
    #[error("polling a vring without a kick fd is not supported")]
    NoKickFd,
    #[error("{0} is not supported")]
    Unsupported(&'static str),
    #[error("backend: {0}")]
    Backend(#[from] vblk_backend::BackendError),
    #[error("starting a worker thread: {0}")]
    Thread(std::io::Error),
    #[error("inflight area: {0}")]
    Inflight(String),
    #[error(
        "{rings} queues of up to {queue_size} entries on one worker thread need an I/O depth of {depth}, \
         more than the {max} one io_uring allows: use more --threads or a smaller --queue-size"
    )]
    DepthTooLarge { rings: usize, queue_size: u16, depth: u64, max: u32 },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("shrinking from {current} to {requested} bytes was not allowed (data past the new end is lost): allow it explicitly")]
    ShrinkRefused { current: u64, requested: u64 },
}

impl From<DeviceError> for vhost::vhost_user::Error {
    fn from(e: DeviceError) -> Self {
        tracing::warn!(error = %e, "vhost-user request refused");
        vhost::vhost_user::Error::ReqHandlerError(std::io::Error::other(e.to_string()))
    }
}

type VuResult<T> = vhost::vhost_user::Result<T>;

/// How the daemon runs the data plane.
#[derive(Clone, Debug)]
pub struct DataPlaneOptions {
    /// Worker threads; ring `i` is served by thread `i % threads`.
    pub threads: usize,
    pub engine: EngineKind,
    /// Adaptive polling budget in µs after the last work (0: always sleep on eventfds).
    pub poll_us: u32,
    /// The export's QoS limits, shared by all its workers (`Arc::default()`: none). Keep a
    /// clone to change them while the export runs ([`Throttle::set_limits`]).
    pub throttle: Arc<Throttle>,
}

/// The inflight area of this connection (`GET_INFLIGHT_FD` / `SET_INFLIGHT_FD`): one
/// [`vblk_queue::inflight`] region per queue, then vblk's own state block (the guest's
/// write-cache choice), so that both survive this process. QEMU keeps the fd and hands it
/// to the next backend process; it does not read the contents.
struct InflightArea {
    mem: Arc<GuestMemory>,
    num_queues: u16,
    queue_size: u16,
    /// Regions in the packed layout (`VIRTIO_F_RING_PACKED` was negotiated when the area
    /// was handed over; QEMU sets the features first).
    packed: bool,
}

/// vblk's state block after the queue regions: magic, then the guest's cache mode.
const STATE_MAGIC: u32 = u32::from_le_bytes(*b"VBLK");
const STATE_LEN: u64 = 64;
/// Largest inflight area accepted from a frontend.
const MAX_INFLIGHT_AREA: u64 = 64 << 20;

impl InflightArea {
    fn region_len(queue_size: u16, packed: bool) -> u64 {
        if packed {
            packed_region_size(queue_size)
        } else {
            split_region_size(queue_size)
        }
    }

    fn regions_len(num_queues: u16, queue_size: u16, packed: bool) -> u64 {
        num_queues as u64 * Self::region_len(queue_size, packed)
    }

    /// Check the frontend's description and map `file`.
    fn map(msg: &VhostUserInflight, file: &File, max_queues: usize, packed: bool) -> Result<InflightArea, DeviceError> {
        let (nq, qs) = (msg.num_queues, msg.queue_size);
        let size_ok = if packed { (1..=MAX_PACKED_SIZE).contains(&qs) } else { SplitLayout::new(qs as u32).is_some() };
        if nq == 0 || nq as usize > max_queues || !size_ok {
            return Err(DeviceError::Inflight(format!("{nq} queues of {qs} entries")));
        }
        let needed = Self::regions_len(nq, qs, packed);
        if msg.mmap_size < needed || msg.mmap_size > MAX_INFLIGHT_AREA {
            return Err(DeviceError::Inflight(format!("{} bytes for {nq} queues of {qs}", msg.mmap_size)));
        }
        let spec = RegionSpec { guest_phys_addr: 0, size: msg.mmap_size, user_addr: 0, mmap_offset: msg.mmap_offset };
        let file = file.try_clone().map_err(|e| DeviceError::Inflight(e.to_string()))?;
        let mem = GuestMemory::from_files(&[(spec, file)])?;
        Ok(InflightArea { mem: Arc::new(mem), num_queues: nq, queue_size: qs, packed })
    }

    fn state_at(&self) -> u64 {
        Self::regions_len(self.num_queues, self.queue_size, self.packed)
    }

    /// Whether a previous backend (or this one) already used the area: the same guest.
    fn used(&self) -> bool {
        let in_use = |a: &GuestArea| if self.packed { InflightPacked::in_use(a) } else { InflightSplit::in_use(a) };
        (0..self.num_queues as usize).any(|q| matches!(self.region(q), Ok(Some(a)) if in_use(&a)))
    }

    /// The guest's write-cache choice recorded in the state block, if there is one.
    fn saved_wce(&self) -> Option<bool> {
        let mut b = [0u8; 5];
        self.mem.read_at(self.state_at(), &mut b).ok()?;
        (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == STATE_MAGIC).then_some(b[4] != 0)
    }

    fn save_wce(&self, on: bool) {
        let mut b = [0u8; 5];
        b[..4].copy_from_slice(&STATE_MAGIC.to_le_bytes());
        b[4] = on as u8;
        // Absent when the frontend's area has no room for the state block: nothing saved.
        let _ = self.mem.write_at(self.state_at(), &b);
    }

    fn region(&self, ring: usize) -> Result<Option<GuestArea>, DeviceError> {
        if ring >= self.num_queues as usize {
            return Ok(None);
        }
        let len = Self::region_len(self.queue_size, self.packed);
        Ok(Some(self.mem.area_at_gpa(ring as u64 * len, len, 8)?))
    }
}

#[derive(Default)]
struct VringConfig {
    size: Option<u16>,
    addrs: Option<RingAddrs>,
    /// The vring base: a split ring's next avail index, or a packed ring's two positions
    /// (`vblk_queue::PackedBase`).
    base: u32,
    kick: Option<Arc<File>>,
    call: Option<Arc<File>>,
    err: Option<Arc<File>>,
    enabled: bool,
    started: bool,
    broken: bool,
    /// The inflight region of this ring was recovered in this connection (done once, at
    /// its first start after `SET_INFLIGHT_FD`).
    recovered: bool,
}

/// The vhost-user-blk device: everything one frontend connection set up.
pub struct VblkDevice {
    params: Arc<DeviceParams>,
    disk: Arc<Disk>,
    opts: DataPlaneOptions,
    acked_features: u64,
    acked_protocol: u64,
    mem: Arc<GuestMemory>,
    vrings: Vec<VringConfig>,
    workers: Vec<Option<Worker>>,
    inflight: Option<InflightArea>,
    /// The migration's dirty-page log (`SET_LOG_BASE`); in force while `VHOST_F_LOG_ALL`
    /// is negotiated.
    log: Option<Arc<DirtyLog>>,
    /// A request whose reply the vhost crate does not send on error failed: the
    /// connection must be dropped, as the frontend would wait for an answer forever.
    fatal: bool,
    /// The counters of every queue and worker, for the device's whole life.
    metrics: Arc<ExportMetrics>,
    /// The backend channel of this connection (`SET_BACKEND_REQ_FD`), if any.
    backend_channel: Option<BackendChannel>,
    /// A duplicate of the socket in the `SET_BACKEND_REQ_FD` being received, from
    /// `server.rs` (see the module docs); taken by `set_backend_req_fd`.
    offered_socket: Option<OwnedFd>,
    /// The capacity (sectors) the frontend last read (`GET_CONFIG`), kept across
    /// reconnects (QEMU keeps its copy); `None` until one is read in this process.
    told_capacity: Option<u64>,
}

/// The backend channel: the `vhost` crate's `Backend` (kept for the connection's life)
/// and vblk's own duplicate of its socket, which sends `CONFIG_CHANGE_MSG`.
struct BackendChannel {
    _backend: Backend,
    socket: Option<UnixStream>,
}

impl BackendChannel {
    /// Send `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (no payload, no `NEED_REPLY`), without
    /// blocking: see the module docs for why nothing may wait here.
    fn send_config_change(&self) -> std::io::Result<()> {
        let Some(socket) = &self.socket else {
            return Err(std::io::Error::other("the channel's socket was not captured"));
        };
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&u32::from(BackendReq::CONFIG_CHANGE_MSG).to_le_bytes());
        // Flags: protocol version 1; size: 0.
        msg[4..8].copy_from_slice(&1u32.to_le_bytes());
        // SAFETY: `msg` is a live buffer of the length given; the socket is open.
        let n = unsafe {
            libc::send(socket.as_raw_fd(), msg.as_ptr().cast(), msg.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        match n {
            12 => Ok(()),
            n if n < 0 => Err(std::io::Error::last_os_error()),
            n => Err(std::io::Error::other(format!("sent {n} of 12 bytes"))),
        }
    }
}

impl VblkDevice {
    /// A device for `params` over `disk`. Refused when a worker could be handed more ring
    /// entries than one engine can have I/O in flight ([`vblk_backend::MAX_DEPTH`]): every
    /// popped request must find room in its worker's engine, or it would fail.
    pub fn new(params: Arc<DeviceParams>, disk: Arc<Disk>, opts: DataPlaneOptions) -> Result<Self, DeviceError> {
        let n = params.num_queues as usize;
        let threads = opts.threads.clamp(1, n.max(1));
        let rings = n.div_ceil(threads);
        let depth = rings as u64 * params.queue_size as u64;
        if depth > vblk_backend::MAX_DEPTH as u64 {
            let max = vblk_backend::MAX_DEPTH;
            return Err(DeviceError::DepthTooLarge { rings, queue_size: params.queue_size, depth, max });
        }
        // One flush description per worker, open before any guest I/O (see vblk-backend's
        // `disk.rs`: a write-back error must reach every worker's next FLUSH).
        disk.reserve_flushers(threads)?;
        Ok(VblkDevice {
            params,
            disk,
            opts: DataPlaneOptions { threads, ..opts },
            acked_features: 0,
            acked_protocol: 0,
            mem: Arc::new(GuestMemory::empty()),
            vrings: (0..n).map(|_| VringConfig::default()).collect(),
            workers: (0..threads).map(|_| None).collect(),
            inflight: None,
            log: None,
            fatal: false,
            metrics: Arc::new(ExportMetrics::new(n, threads)),
            backend_channel: None,
            offered_socket: None,
            told_capacity: None,
        })
    }

    /// The exported disk.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// Resize the exported disk online to `new_size` bytes and tell the frontend (see the
    /// module docs, "Online resize"); returns the size the disk has now. For a block
    /// device `new_size` is ignored: the device's own size is taken (read again).
    ///
    /// Refused: a read-only export ([`DeviceError::ReadOnly`]); a size that is not a
    /// non-zero multiple of the block size, or a shrink the backend cannot do
    /// ([`DeviceError::Backend`]); a smaller size unless `allow_shrink`
    /// ([`DeviceError::ShrinkRefused`]: the guest's data past the new end would be lost).
    /// The same size is not an error (nothing changes, nobody is told).
    ///
    /// The caller holds the device (its mutex): this never waits for the frontend.
    pub fn resize(&mut self, new_size: u64, allow_shrink: bool) -> Result<u64, DeviceError> {
        if self.params.readonly || self.disk.readonly() {
            return Err(DeviceError::ReadOnly);
        }
        let current = self.disk.size();
        let target = self.disk.resize_target(new_size)?;
        let old_capacity = self.params.capacity_sectors();
        let size = if target < current {
            if !allow_shrink {
                return Err(DeviceError::ShrinkRefused { current, requested: target });
            }
            // Lower the bound with no request in flight, then shrink the disk.
            self.with_all_stopped(|d| {
                d.params.set_capacity_sectors(target >> SECTOR_SHIFT);
                d.disk.resize(target).map_err(|e| {
                    d.params.set_capacity_sectors(d.disk.size() >> SECTOR_SHIFT);
                    DeviceError::Backend(e)
                })
            })?
        } else {
            let size = self.disk.resize(target)?;
            self.params.set_capacity_sectors(size >> SECTOR_SHIFT);
            size
        };
        if self.params.capacity_sectors() != old_capacity {
            if self.notify_config_change() {
                tracing::info!(size, "the frontend was told of the new size");
            } else {
                tracing::info!(size, "the frontend is told of the new size when its device next starts");
            }
        }
        Ok(size)
    }

    /// Is the device running: a ring started (kicked, not stopped)?
    fn running(&self) -> bool {
        self.vrings.iter().any(|v| v.started)
    }

    /// Tell the frontend the config space changed (see the module docs), if it holds
    /// another capacity and can be told now: a backend channel, `CONFIG` negotiated, the
    /// device running. Never waits. True if the message went out.
    fn notify_config_change(&mut self) -> bool {
        let Some(channel) = &self.backend_channel else { return false };
        let stale = self.told_capacity != Some(self.params.capacity_sectors());
        if !stale || self.acked_protocol & VhostUserProtocolFeatures::CONFIG.bits() == 0 || !self.running() {
            return false;
        }
        match channel.send_config_change() {
            Ok(()) => {
                tracing::debug!("config change sent to the frontend");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot send a config change to the frontend: it is told at the next start of its device");
                false
            }
        }
    }

    /// `server.rs`: a duplicate of the socket carried by the `SET_BACKEND_REQ_FD` message
    /// about to be handled (`None` after it), for `set_backend_req_fd` to take.
    pub(crate) fn offer_backend_socket(&mut self, socket: Option<OwnedFd>) {
        self.offered_socket = socket;
    }

    /// The counters of this device's queues and workers (register them to expose them).
    pub fn metrics(&self) -> &Arc<ExportMetrics> {
        &self.metrics
    }

    pub fn params(&self) -> &Arc<DeviceParams> {
        &self.params
    }

    /// The export's QoS limits (the one its workers ask): [`Throttle::set_limits`] applies
    /// at once, also to running workers.
    pub fn throttle(&self) -> &Arc<Throttle> {
        &self.opts.throttle
    }

    /// Did a request that needed a reply fail? (Clears the flag.)
    pub fn take_fatal(&mut self) -> bool {
        std::mem::take(&mut self.fatal)
    }

    /// The frontend went away: drain and stop every worker, drop all fds and mappings
    /// (the backend channel too), and be ready for the next frontend.
    pub fn disconnect(&mut self) {
        self.backend_channel = None;
        self.offered_socket = None;
        self.reset();
    }

    /// Everything [`VblkDevice::disconnect`] does but dropping the backend channel, which
    /// the frontend set up once per connection (`RESET_OWNER`, `RESET_DEVICE`).
    fn reset(&mut self) {
        for t in 0..self.workers.len() {
            self.stop_worker(t);
        }
        let n = self.vrings.len();
        self.vrings = (0..n).map(|_| VringConfig::default()).collect();
        self.mem = Arc::new(GuestMemory::empty());
        self.inflight = None;
        if let Some(log) = self.log.take() {
            tracing::info!(marked = log.marked(), "dirty log released");
        }
        self.acked_features = 0;
        self.acked_protocol = 0;
        self.fatal = false;
        // The write-cache mode the driver chose stays: QEMU does not replay SET_CONFIG
        // when it reconnects. A frontend with inflight tracking tells a new guest
        // (GET_INFLIGHT_FD: back to the default) from the same one (SET_INFLIGHT_FD of a
        // used area: its choice, saved there, survives even this process); without it
        // vblk keeps the last choice (the safe side for write-through). A new guest reads
        // the mode from the config space at probe and acts on it.
    }

    fn protocol_features_negotiated(&self) -> bool {
        self.acked_features & vf::VHOST_USER_PROTOCOL_FEATURES != 0
    }

    fn ring_features(&self) -> RingFeatures {
        RingFeatures {
            event_idx: self.acked_features & vf::RING_EVENT_IDX != 0,
            indirect: self.acked_features & vf::RING_INDIRECT_DESC != 0,
        }
    }

    fn ring_index(&self, index: u32) -> Result<usize, DeviceError> {
        let i = index as usize;
        if i < self.vrings.len() {
            Ok(i)
        } else {
            Err(DeviceError::BadRingIndex(index))
        }
    }

    fn worker_of(&self, ring: usize) -> usize {
        ring % self.workers.len()
    }

    /// Stop worker `t` (draining its I/O) and record where its rings stopped.
    fn stop_worker(&mut self, t: usize) {
        if let Some(w) = self.workers[t].take() {
            for RingStop { index, base, broken } in w.stop() {
                let v = &mut self.vrings[index];
                v.base = base;
                v.broken |= broken;
            }
        }
    }

    fn ready(&self, v: &VringConfig) -> bool {
        v.started && v.enabled && !v.broken && v.size.is_some() && v.addrs.is_some() && v.kick.is_some()
    }

    /// Ring `i`'s queue, with its inflight region attached (and recovered at the first
    /// start of this connection).
    fn build_queue(&mut self, i: usize) -> Result<Ring, DeviceError> {
        let mut q = self.new_queue(i)?;
        if self.inflight.as_ref().is_some_and(|a| a.packed != q.is_packed()) {
            return Err(DeviceError::Inflight("the inflight area was set up for the other ring layout".into()));
        }
        if let Some(area) = self.inflight.as_ref().map(|a| a.region(i)).transpose()?.flatten() {
            let recover = !self.vrings[i].recovered;
            let n = q.attach_inflight(area, recover).map_err(|e| DeviceError::Ring(i, e))?;
            self.vrings[i].recovered = true;
            if n > 0 {
                tracing::info!(ring = i, requests = n, "resubmitting requests the previous backend left in flight");
            }
        }
        Ok(q)
    }

    /// Ring `i` as negotiated: split, or packed with `VIRTIO_F_RING_PACKED`.
    fn new_queue(&self, i: usize) -> Result<Ring, DeviceError> {
        let v = &self.vrings[i];
        let (Some(size), Some(addrs)) = (v.size, v.addrs) else {
            return Err(DeviceError::Unsupported("a ring without size or addresses"));
        };
        let (mem, space, features) = (Arc::clone(&self.mem), AddrSpace::FrontendVirtual, self.ring_features());
        let mut q: Ring = if self.packed() {
            PackedQueue::new(mem, size as u32, addrs, space, features).map(Ring::from)
        } else {
            SplitQueue::new(mem, size as u32, addrs, space, features).map(Ring::from)
        }
        .map_err(|e| DeviceError::Ring(i, e))?;
        q.set_vring_base(v.base).map_err(|e| DeviceError::Ring(i, e))?;
        Ok(q)
    }

    /// Did the driver accept the packed ring layout?
    fn packed(&self) -> bool {
        self.acked_features & vf::RING_PACKED != 0
    }

    /// Start worker `t` for its ready rings (if any).
    fn start_worker(&mut self, t: usize) -> Result<(), DeviceError> {
        debug_assert!(self.workers[t].is_none());
        let mut rings = Vec::new();
        let mut depth = 0u32;
        let mut first_err = None;
        for i in (t..self.vrings.len()).step_by(self.workers.len()) {
            if !self.ready(&self.vrings[i]) {
                continue;
            }
            let queue = match self.build_queue(i) {
                Ok(q) => q,
                Err(e) => {
                    // This ring cannot run (e.g. its addresses left the memory table); the
                    // worker's other rings still do.
                    tracing::error!(ring = i, error = %e, "cannot start vring");
                    let v = &mut self.vrings[i];
                    v.broken = true;
                    if let Some(err) = &v.err {
                        crate::worker::signal(err);
                    }
                    first_err.get_or_insert(e);
                    continue;
                }
            };
            depth += queue.size() as u32;
            let v = &self.vrings[i];
            let kick = v.kick.clone().ok_or(DeviceError::NoKickFd)?;
            // Every ring index is below the queue count the metrics were made with.
            let metrics = self.metrics.queue(i).cloned().unwrap_or_default();
            rings.push(RingSetup { index: i, queue, kick, call: v.call.clone(), err: v.err.clone(), metrics });
        }
        if rings.is_empty() {
            return first_err.map_or(Ok(()), Err);
        }
        let engine = Engine::new(Arc::clone(&self.disk), self.opts.engine, depth)?;
        tracing::debug!(worker = t, rings = ?rings.iter().map(|r| r.index).collect::<Vec<_>>(), "starting worker");
        let budget = std::time::Duration::from_micros(self.opts.poll_us as u64);
        let wm = self.metrics.worker(t).cloned().unwrap_or_default();
        let timing = self.metrics.timing();
        let opts = WorkerOptions { poll_budget: budget, timing, throttle: Arc::clone(&self.opts.throttle) };
        let w = Worker::spawn(t, rings, engine, Arc::clone(&self.params), wm, opts).map_err(DeviceError::Thread)?;
        self.workers[t] = Some(w);
        first_err.map_or(Ok(()), Err)
    }

    /// Apply `f` to ring `i` with its worker stopped, then restart the worker.
    fn with_ring<T>(
        &mut self,
        index: u32,
        f: impl FnOnce(&mut Self, usize) -> Result<T, DeviceError>,
    ) -> Result<T, DeviceError> {
        let i = self.ring_index(index)?;
        let t = self.worker_of(i);
        self.stop_worker(t);
        let r = f(self, i);
        let s = self.start_worker(t);
        let r = r?;
        s?;
        Ok(r)
    }

    /// Apply `f` with every worker stopped (memory table, features), then restart them.
    fn with_all_stopped<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, DeviceError>) -> Result<T, DeviceError> {
        for t in 0..self.workers.len() {
            self.stop_worker(t);
        }
        let r = f(self);
        let mut first_err = None;
        for t in 0..self.workers.len() {
            if let Err(e) = self.start_worker(t) {
                tracing::error!(worker = t, error = %e, "cannot restart worker");
                first_err.get_or_insert(e);
            }
        }
        let r = r?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(r),
        }
    }

    /// Ring addresses must lie in the current memory table (checked again at start).
    /// For a packed ring, `avail` is the driver's event suppression structure and `used`
    /// the device's (QEMU sends the driver and device areas there).
    fn check_addrs(&self, size: u16, a: &RingAddrs) -> Result<(), DeviceError> {
        if self.packed() {
            self.mem.uva_to_gpa(a.desc, 16 * size as u64)?;
            self.mem.uva_to_gpa(a.avail, PACKED_EVENT_LEN)?;
            self.mem.uva_to_gpa(a.used, PACKED_EVENT_LEN)?;
            return Ok(());
        }
        let l = SplitLayout { size };
        self.mem.uva_to_gpa(a.desc, l.desc_table_len())?;
        self.mem.uva_to_gpa(a.avail, l.avail_len())?;
        self.mem.uva_to_gpa(a.used, l.used_len())?;
        Ok(())
    }

    fn set_memory(&mut self, mem: GuestMemory) -> Result<(), DeviceError> {
        if mem.num_regions() as u64 > MAX_MEM_SLOTS {
            return Err(DeviceError::TooManyRegions);
        }
        self.with_all_stopped(|d| {
            d.mem = Arc::new(mem.with_log(d.active_log()));
            Ok(())
        })
    }

    /// The dirty log every write must go to: set, and logging negotiated (a migration).
    fn active_log(&self) -> Option<Arc<DirtyLog>> {
        self.log.clone().filter(|_| self.acked_features & vf::VHOST_F_LOG_ALL != 0)
    }

    /// Rebuild the memory table with the log now in force (workers stopped by the caller).
    fn apply_log(&mut self) {
        let want = self.active_log();
        if want.as_ref().map(Arc::as_ptr) != self.mem.log().map(Arc::as_ptr) {
            tracing::info!(logging = want.is_some(), "dirty-page logging for live migration");
            self.mem = Arc::new(self.mem.with_log(want));
        }
    }

    fn fail<T>(&mut self, e: DeviceError) -> VuResult<T> {
        self.fatal = true;
        Err(e.into())
    }
}

fn spec(r: &VhostUserMemoryRegion) -> RegionSpec {
    RegionSpec {
        guest_phys_addr: r.guest_phys_addr,
        size: r.memory_size,
        user_addr: r.user_addr,
        mmap_offset: r.mmap_offset,
    }
}

impl VhostUserBackendReqHandlerMut for VblkDevice {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.reset();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.params.offered_features() | vf::VHOST_USER_PROTOCOL_FEATURES | vf::VHOST_F_LOG_ALL)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let offered = self.params.offered_features() | vf::VHOST_USER_PROTOCOL_FEATURES | vf::VHOST_F_LOG_ALL;
        if features & !offered != 0 {
            return Err(DeviceError::BadFeatures(features & !offered).into());
        }
        self.with_all_stopped(|d| {
            d.acked_features = features;
            d.params.ack_features(features);
            if !d.protocol_features_negotiated() {
                // Without protocol features rings are enabled from the start.
                for v in &mut d.vrings {
                    v.enabled = true;
                }
            }
            d.apply_log();
            Ok(())
        })?;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if ctx.len() > MAX_MEM_TABLE_REGIONS {
            return Err(DeviceError::TooManyTableRegions(ctx.len()).into());
        }
        let regions: Vec<(RegionSpec, File)> = ctx.iter().map(spec).zip(files).collect();
        let mem = GuestMemory::from_files(&regions).map_err(DeviceError::from)?;
        self.set_memory(mem)?;
        Ok(None)
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if self.mem.num_regions() as u64 >= MAX_MEM_SLOTS {
            return Err(DeviceError::TooManyRegions.into());
        }
        let mapped = vblk_virtio::memory::MappedRegion::map(spec(region), &fd).map_err(DeviceError::from)?;
        let mem = self.mem.with_region(Arc::new(mapped)).map_err(DeviceError::from)?;
        self.set_memory(mem)?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let mem = self.mem.without_region(&spec(region)).map_err(DeviceError::from)?;
        self.set_memory(mem)?;
        Ok(())
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = self.params.queue_size;
        self.with_ring(index, |d, i| {
            // A packed ring may have any size up to 32768 (§2.8), a split ring a power of
            // two (§2.7); both at most what the device offers.
            let size = if d.packed() {
                Some(num).filter(|&n| n >= 1 && n <= MAX_PACKED_SIZE as u32).map(|n| n as u16)
            } else {
                SplitLayout::new(num).map(|l| l.size)
            };
            let size = size.filter(|&s| s <= max).ok_or(DeviceError::BadRingSize(num, max))?;
            d.vrings[i].size = Some(size);
            Ok(())
        })?;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        self.with_ring(index, |d, i| {
            let addrs = RingAddrs { desc: descriptor, avail: available, used };
            if let Some(size) = d.vrings[i].size {
                d.check_addrs(size, &addrs)?;
            }
            d.vrings[i].addrs = Some(addrs);
            Ok(())
        })?;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.with_ring(index, |d, i| {
            // A split base is an avail index; a packed one two positions, checked against
            // the ring size when the ring starts.
            if !d.packed() && base > u16::MAX as u32 {
                return Err(DeviceError::BadRingBase(base));
            }
            d.vrings[i].base = base;
            Ok(())
        })?;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let r = self.with_ring(index, |d, i| {
            let v = &mut d.vrings[i];
            v.started = false;
            v.broken = false;
            v.kick = None;
            Ok(VhostUserVringState::new(index, v.base))
        });
        match r {
            Ok(s) => Ok(s),
            Err(e) => self.fail(e),
        }
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let fd = fd.ok_or(DeviceError::NoKickFd)?;
        set_nonblocking(&fd);
        let was_running = self.running();
        self.with_ring(index as u32, |d, i| {
            let v = &mut d.vrings[i];
            v.kick = Some(Arc::new(fd));
            v.started = true;
            v.broken = false;
            Ok(())
        })?;
        if !was_running {
            // The device starts: a frontend with an old size is told now (module docs).
            self.notify_config_change();
        }
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.with_ring(index as u32, |d, i| {
            let call = fd.map(Arc::new);
            // Completions published while no call fd was set (or before a reconnect)
            // signalled nobody: signal the new fd once so the driver looks at the used
            // ring (libvhost-user does the same, "in case of I/O hang after reconnecting").
            // A spurious interrupt costs the driver one look at an unchanged ring.
            if let Some(c) = &call {
                crate::worker::signal(c);
            }
            d.vrings[i].call = call;
            Ok(())
        })?;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.with_ring(index as u32, |d, i| {
            d.vrings[i].err = fd.map(Arc::new);
            Ok(())
        })?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        // REPLY_ACK is added by the vhost crate. STATUS is not offered: vhost 0.18's
        // message loop does not dispatch SET_STATUS/GET_STATUS. BACKEND_REQ: the channel
        // that tells the frontend of a resize (module docs).
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD)
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.with_ring(index, |d, i| {
            d.vrings[i].enabled = enable;
            Ok(())
        })?;
        Ok(())
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        let config = self.params.config();
        let bytes = config.to_bytes();
        let start = offset as usize;
        match start.checked_add(size as usize).filter(|&end| end <= BlkConfig::SIZE) {
            Some(end) => {
                if start == 0 && end >= 8 {
                    // The frontend has the capacity now (module docs, "Online resize").
                    self.told_capacity = Some(config.capacity);
                }
                Ok(bytes[start..end].to_vec())
            }
            // The vhost crate answers an error here with an empty config reply.
            None => Err(DeviceError::BadConfigAccess { offset, len: size as usize }.into()),
        }
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        // Only the write-cache byte is writable, and only with CONFIG_WCE (§5.2.5.1).
        if offset as usize != BlkConfig::WRITEBACK_OFFSET
            || buf.len() != 1
            || self.acked_features & blkf::CONFIG_WCE == 0
        {
            return Err(DeviceError::BadConfigAccess { offset, len: buf.len() }.into());
        }
        let on = buf[0] != 0;
        tracing::info!(writeback = on, "driver set the write cache mode");
        self.params.set_writeback(on);
        if let Some(a) = &self.inflight {
            a.save_wce(on);
        }
        Ok(())
    }

    /// The backend channel (the crate checked it is a unix stream socket). Kept until the
    /// frontend disconnects. Set up while the device runs (not QEMU's order), a frontend
    /// with an old size is told at once, as at a start.
    fn set_backend_req_fd(&mut self, backend: Backend) {
        let socket = self.offered_socket.take().map(UnixStream::from);
        if socket.is_none() {
            tracing::warn!("backend channel set, but its socket was not captured: resizes will not be notified");
        }
        tracing::debug!("backend channel set");
        self.backend_channel = Some(BackendChannel { _backend: backend, socket });
        self.notify_config_change();
    }

    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> VuResult<()> {
        Err(DeviceError::Unsupported("GPU_SET_SOCKET").into())
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        // Answered with an empty reply by the vhost crate.
        Err(DeviceError::Unsupported("GET_SHARED_OBJECT").into())
    }

    /// A new guest (the frontend has no area yet): a fresh, zeroed, sealed area, and the
    /// default write-cache mode.
    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        let (nq, qs) = (msg.num_queues, msg.queue_size);
        let size = InflightArea::regions_len(nq, qs, self.packed()) + STATE_LEN;
        let want = VhostUserInflight::new(size, 0, nq, qs);
        let made = vblk_virtio::memory::sealed_memfd("vblk-inflight", size)
            .map_err(|e| DeviceError::Inflight(e.to_string()))
            .and_then(|file| InflightArea::map(&want, &file, self.vrings.len(), self.packed()).map(|a| (a, file)));
        let (area, file) = match made {
            Ok(m) => m,
            Err(e) => return self.fail(e),
        };
        self.params.set_writeback(true);
        area.save_wce(true);
        tracing::info!(queues = nq, queue_size = qs, bytes = size, "new inflight area (a new guest)");
        Ok((want, file))
    }

    /// The frontend's area (ours from GET_INFLIGHT_FD, or a previous process's): attached
    /// to every ring at its next start; a used one is recovered then.
    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> VuResult<()> {
        let area = InflightArea::map(msg, &file, self.vrings.len(), self.packed())?;
        if area.used() {
            if let Some(wce) = area.saved_wce() {
                self.params.set_writeback(wce);
            }
            tracing::info!(writeback = self.params.wce(), "inflight area in use: the same guest reconnected");
        }
        self.with_all_stopped(|d| {
            d.inflight = Some(area);
            for v in &mut d.vrings {
                v.recovered = false;
            }
            Ok(())
        })?;
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        // Answered with an error code by the vhost crate.
        Err(DeviceError::Unsupported("SET_DEVICE_STATE_FD").into())
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(DeviceError::Unsupported("CHECK_DEVICE_STATE").into())
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        self.fail(DeviceError::Unsupported("GET_SHMEM_CONFIG"))
    }

    /// The migration's dirty-page bitmap. Every write into guest memory marks it while
    /// `VHOST_F_LOG_ALL` is negotiated; `GET_VRING_BASE` drains before the last round.
    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        let mapped = match DirtyLog::map(&file, log.mmap_size, log.mmap_offset) {
            Ok(m) => Arc::new(m),
            Err(e) => return self.fail(e.into()),
        };
        tracing::info!(bytes = log.mmap_size, "dirty log set");
        let r = self.with_all_stopped(|d| {
            d.log = Some(mapped);
            d.apply_log();
            Ok(())
        });
        match r {
            Ok(()) => Ok(()),
            Err(e) => self.fail(e),
        }
    }
}

fn set_nonblocking(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor we own; failures only leave it blocking, and the
    // worker reads a kick only after poll reported it readable.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
}

impl Drop for VblkDevice {
    fn drop(&mut self) {
        self.disconnect();
    }
}
