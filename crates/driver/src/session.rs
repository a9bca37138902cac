//! Surviving the backend's restart, as QEMU does with `reconnect-ms`: the driver keeps its
//! memory, rings and in-flight requests, connects again, hands the new backend process the
//! inflight area the old one filled (`SET_INFLIGHT_FD`), the same memory and rings, each
//! ring restarted at its used index (QEMU's rewind), and the backend resubmits what the old
//! process had taken but not completed. Requests complete exactly once: nothing the guest
//! side sees changes but a pause.
//!
//! A [`Session`] is shared by the [`crate::Device`] and its queue handles: the first handle
//! that finds the socket hung up reconnects for all of them ([`Session::recover`]).
//!
//! A split ring's used index is in memory (`used->idx`). A packed ring's is not: the device
//! writes used descriptors in ring order (virtio 1.2 §2.8.7), so its used position is the
//! driver's plus the slots of every used descriptor not reaped yet, which the queue's
//! [`PackedRingWatch`] walks from another thread. The ring restarts with both its avail
//! and used positions there (QEMU's `virtio_queue_packed_restore_last_avail_idx`), sent
//! as QEMU encodes a packed vring base ([`RingBase::Packed`]).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vblk_queue::{PackedBase, PackedRingWatch, RingKind};
use vblk_virtio::features as vf;
use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::{SharedMemory, USER_ADDR_BASE};
use crate::DriverError;

pub(crate) fn vu(what: &'static str) -> impl Fn(vhost::Error) -> DriverError {
    move |e| DriverError::Protocol(what, e.to_string())
}

/// Share the driver's memory with the backend (one region).
pub(crate) fn share_memory(
    fe: &mut Frontend,
    shared: &SharedMemory,
    protocol: VhostUserProtocolFeatures,
) -> Result<(), DriverError> {
    let spec = shared.spec();
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: spec.guest_phys_addr,
        memory_size: spec.size,
        userspace_addr: spec.user_addr,
        mmap_offset: spec.mmap_offset,
        mmap_handle: shared.file.as_raw_fd(),
    };
    if protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
        fe.add_mem_region(&region).map(drop).map_err(vu("ADD_MEM_REG"))
    } else {
        fe.set_mem_table(&[region]).map(drop).map_err(vu("SET_MEM_TABLE"))
    }
}

/// Where a ring starts (`SET_VRING_BASE`) or stopped (`GET_VRING_BASE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RingBase {
    /// A split ring's next avail index.
    Split(u16),
    /// A packed ring's avail and used positions, on the wire as QEMU 10 sends them
    /// (`virtio_queue_packed_get_last_avail_idx`): the avail index in bits 0-14 and its wrap
    /// counter in bit 15, the used index and wrap counter likewise in bits 16-31.
    Packed(PackedBase),
}

impl RingBase {
    pub(crate) fn encode(self) -> u32 {
        match self {
            RingBase::Split(idx) => idx as u32,
            RingBase::Packed(b) => b.encode(),
        }
    }

    /// `None`: a split base above 16 bits, or a packed position outside a ring of `size`.
    pub(crate) fn decode(kind: RingKind, v: u32, size: u16) -> Option<RingBase> {
        match kind {
            RingKind::Split => u16::try_from(v).ok().map(RingBase::Split),
            RingKind::Packed => PackedBase::decode(v, size).map(RingBase::Packed),
        }
    }
}

/// `SET_VRING_BASE` with all 32 bits of `num`. The `vhost` crate's frontend takes a u16,
/// which cannot carry a packed ring's used position, so this writes the message on the
/// connection's socket itself — header `{ u32 request; u32 flags; u32 size }` (flags:
/// version 1, NEED_REPLY when REPLY_ACK was negotiated), body `struct vhost_vring_state
/// { u32 index; u32 num }` — and reads the ack like the frontend would. Called with the
/// connection held, between two of the frontend's own exchanges.
fn set_vring_base_u32(socket: &OwnedFd, reply_ack: bool, q: u16, num: u32) -> Result<(), DriverError> {
    const VERSION: u32 = 0x1;
    const REPLY: u32 = 0x4;
    const NEED_REPLY: u32 = 0x8;
    let fail = |why: String| DriverError::Protocol("SET_VRING_BASE", why);
    let request = u32::from(FrontendReq::SET_VRING_BASE);
    let mut msg = [0u8; 20];
    msg[0..4].copy_from_slice(&request.to_le_bytes());
    msg[4..8].copy_from_slice(&(VERSION | if reply_ack { NEED_REPLY } else { 0 }).to_le_bytes());
    msg[8..12].copy_from_slice(&8u32.to_le_bytes());
    msg[12..16].copy_from_slice(&(q as u32).to_le_bytes());
    msg[16..20].copy_from_slice(&num.to_le_bytes());
    let mut stream = UnixStream::from(socket.try_clone().map_err(DriverError::Socket)?);
    stream.write_all(&msg).map_err(|e| fail(e.to_string()))?;
    if !reply_ack {
        return Ok(());
    }
    let mut reply = [0u8; 20];
    stream.read_exact(&mut reply).map_err(|e| fail(e.to_string()))?;
    let word = |i: usize| u32::from_le_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
    let mut value = [0u8; 8];
    value.copy_from_slice(&reply[12..20]);
    if word(0) != request || word(4) & REPLY == 0 || word(8) != 8 {
        return Err(fail(format!("bad reply header {:#x} {:#x} {}", word(0), word(4), word(8))));
    }
    match u64::from_le_bytes(value) {
        0 => Ok(()),
        v => Err(fail(format!("the backend answered {v}"))),
    }
}

/// Set ring `q` up at `base` and start it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_ring(
    fe: &mut Frontend,
    socket: &OwnedFd,
    protocol: VhostUserProtocolFeatures,
    shared: &SharedMemory,
    q: u16,
    queue_size: u16,
    base: RingBase,
    (kick, call): (&EventFd, &EventFd),
    enable: bool,
) -> Result<(), DriverError> {
    let a = shared.layout.rings(q);
    let qi = q as usize;
    fe.set_vring_num(qi, queue_size).map_err(vu("SET_VRING_NUM"))?;
    let cfg = VringConfigData {
        queue_max_size: queue_size,
        queue_size,
        flags: 0,
        desc_table_addr: USER_ADDR_BASE + a.desc,
        used_ring_addr: USER_ADDR_BASE + a.used,
        avail_ring_addr: USER_ADDR_BASE + a.avail,
        log_addr: None,
    };
    fe.set_vring_addr(qi, &cfg).map_err(vu("SET_VRING_ADDR"))?;
    match base {
        RingBase::Split(idx) => fe.set_vring_base(qi, idx).map_err(vu("SET_VRING_BASE"))?,
        RingBase::Packed(_) => {
            set_vring_base_u32(socket, protocol.contains(VhostUserProtocolFeatures::REPLY_ACK), q, base.encode())?
        }
    }
    fe.set_vring_call(qi, call).map_err(vu("SET_VRING_CALL"))?;
    fe.set_vring_kick(qi, kick).map_err(vu("SET_VRING_KICK"))?;
    if enable {
        fe.set_vring_enable(qi, true).map_err(vu("SET_VRING_ENABLE"))?;
    }
    Ok(())
}

/// The live connection.
pub(crate) struct Conn {
    pub frontend: Frontend,
    pub socket: Arc<OwnedFd>,
}

/// Everything needed to connect again: what was negotiated and set up.
pub(crate) struct Plan {
    pub path: PathBuf,
    /// How long to keep trying to connect after the backend hung up.
    pub patience: Duration,
    pub timeout: Duration,
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
    pub inflight: Option<(VhostUserInflight, File)>,
    pub shared: Arc<SharedMemory>,
    pub queue_size: u16,
    pub rings: Vec<PlannedRing>,
}

/// What a reconnect needs of one ring.
pub(crate) struct PlannedRing {
    /// The kick and call eventfds (duplicates of the queue handle's).
    pub kick: EventFd,
    pub call: EventFd,
    /// A packed ring's view of where the device got to (`None`: a split ring).
    pub watch: Option<PackedRingWatch>,
}

/// The connection to the backend, shared by a device and its queue handles.
pub(crate) struct Session {
    conn: Mutex<Conn>,
    /// Set when the driver may reconnect (`Options::reconnect`, a backend path).
    plan: Option<Plan>,
}

impl Session {
    pub(crate) fn new(conn: Conn, plan: Option<Plan>) -> Session {
        Session { conn: Mutex::new(conn), plan }
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `SET_VRING_BASE` for ring `q` with any 32-bit value, on the live connection (the
    /// raw API: a packed ring restarted anywhere, or a base no ring has).
    #[cfg(feature = "raw")]
    pub(crate) fn set_vring_base_raw(&self, q: u16, num: u32, reply_ack: bool) -> Result<(), DriverError> {
        let conn = self.conn();
        set_vring_base_u32(&conn.socket, reply_ack, q, num)
    }

    pub(crate) fn can_reconnect(&self) -> bool {
        self.plan.is_some()
    }

    /// The backend behind `dead` hung up: connect again (once, whichever queue notices
    /// first) and return the live socket. Fails after the plan's patience.
    pub(crate) fn recover(&self, dead: &Arc<OwnedFd>) -> Result<Arc<OwnedFd>, DriverError> {
        let plan = self.plan.as_ref().ok_or(DriverError::BackendGone)?;
        let mut conn = self.conn();
        if !Arc::ptr_eq(&conn.socket, dead) {
            return Ok(Arc::clone(&conn.socket)); // another queue already reconnected
        }
        let deadline = Instant::now() + plan.patience;
        let mut last = DriverError::BackendGone;
        while Instant::now() < deadline {
            match UnixStream::connect(&plan.path) {
                Ok(stream) => match Self::setup(plan, stream) {
                    Ok(c) => {
                        tracing::info!(path = %plan.path.display(), "reconnected to the backend");
                        *conn = c;
                        return Ok(Arc::clone(&conn.socket));
                    }
                    Err(e) => last = e,
                },
                Err(e) => last = DriverError::Connect(plan.path.clone(), e),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(last)
    }

    /// Set up a new connection as the first one was, with the inflight area and each ring
    /// at its used index.
    fn setup(plan: &Plan, stream: UnixStream) -> Result<Conn, DriverError> {
        let socket = Arc::new(stream.as_fd().try_clone_to_owned().map_err(DriverError::Socket)?);
        let watchdog = crate::device::Watchdog::arm(&socket, plan.timeout);
        let mut fe = Frontend::from_stream(stream, u16::MAX as u64);
        fe.set_owner().map_err(vu("SET_OWNER"))?;
        let offered = fe.get_features().map_err(vu("GET_FEATURES"))?;
        if offered & plan.features != plan.features {
            return Err(DriverError::Unsupported("the features of the first connection"));
        }
        if plan.features & vf::VHOST_USER_PROTOCOL_FEATURES != 0 {
            let pf = fe.get_protocol_features().map_err(vu("GET_PROTOCOL_FEATURES"))?;
            if !pf.contains(plan.protocol) {
                return Err(DriverError::Unsupported("the protocol features of the first connection"));
            }
            fe.set_protocol_features(plan.protocol).map_err(vu("SET_PROTOCOL_FEATURES"))?;
            if plan.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        fe.set_features(plan.features).map_err(vu("SET_FEATURES"))?;
        if let Some((area, file)) = &plan.inflight {
            fe.set_inflight_fd(area, file.as_raw_fd()).map_err(vu("SET_INFLIGHT_FD"))?;
        }
        share_memory(&mut fe, &plan.shared, plan.protocol)?;
        let enable = plan.features & vf::VHOST_USER_PROTOCOL_FEATURES != 0;
        for (q, ring) in plan.rings.iter().enumerate() {
            // QEMU's rewind: the backend resumes at the used index (plus what the inflight
            // area says was taken).
            let base = match &ring.watch {
                None => {
                    let mut idx = [0u8; 2];
                    plan.shared.mem.read_at(plan.shared.layout.rings(q as u16).used + 2, &mut idx)?;
                    RingBase::Split(u16::from_le_bytes(idx))
                }
                Some(watch) => {
                    let at = watch.device_used()?;
                    RingBase::Packed(PackedBase { avail: at, used: at })
                }
            };
            tracing::debug!(queue = q, ?base, "restarting the ring");
            let rings = (&ring.kick, &ring.call);
            start_ring(&mut fe, &socket, plan.protocol, &plan.shared, q as u16, plan.queue_size, base, rings, enable)?;
            // Whatever was kicked before stays available: wake the new backend up.
            let _ = ring.kick.write(1);
        }
        if watchdog.fired() {
            return Err(DriverError::Timeout(plan.timeout));
        }
        Ok(Conn { frontend: fe, socket })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vblk_queue::RingPos;

    #[test]
    fn vring_bases_are_encoded_as_qemu_does() {
        // A fresh packed ring: both positions at slot 0 with wrap counter 1.
        assert_eq!(RingBase::Packed(PackedBase::START).encode(), 0x8000_8000);
        let b = PackedBase { avail: RingPos { idx: 5, wrap: false }, used: RingPos { idx: 2, wrap: true } };
        assert_eq!(RingBase::Packed(b).encode(), 0x8002_0005);
        assert_eq!(RingBase::decode(RingKind::Packed, 0x8002_0005, 6), Some(RingBase::Packed(b)));
        assert_eq!(RingBase::decode(RingKind::Packed, 0x8002_0006, 6), None, "avail index outside the ring");
        assert_eq!(RingBase::decode(RingKind::Packed, 0x0006_0000, 6), None, "used index outside the ring");
        assert_eq!(RingBase::Split(65535).encode(), 65535);
        assert_eq!(RingBase::decode(RingKind::Split, 7, 8), Some(RingBase::Split(7)));
        assert_eq!(RingBase::decode(RingKind::Split, 0x1_0000, 8), None);
    }
}
