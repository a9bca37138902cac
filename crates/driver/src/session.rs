//! Surviving the backend's restart, as QEMU does with `reconnect-ms`: the driver keeps its
//! memory, rings and in-flight requests, connects again, hands the new backend process the
//! inflight area the old one filled (`SET_INFLIGHT_FD`), the same memory and rings, each
//! ring restarted at its used index (QEMU's rewind), and the backend resubmits what the old
//! process had taken but not completed. Requests complete exactly once: nothing the guest
//! side sees changes but a pause.
//!
//! A [`Session`] is shared by the [`crate::Device`] and its queue handles: the first handle
//! that finds the socket hung up reconnects for all of them ([`Session::recover`]).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vblk_virtio::features as vf;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures};
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

/// Set ring `q` up at avail index `base` and start it.
pub(crate) fn start_ring(
    fe: &mut Frontend,
    shared: &SharedMemory,
    q: u16,
    queue_size: u16,
    base: u16,
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
    fe.set_vring_base(qi, base).map_err(vu("SET_VRING_BASE"))?;
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
    /// Each ring's kick and call eventfds (duplicates of the queue handles').
    pub rings: Vec<(EventFd, EventFd)>,
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
        for (q, (kick, call)) in plan.rings.iter().enumerate() {
            // QEMU's rewind: the backend resumes at the used index (plus what the inflight
            // area says was taken).
            let mut idx = [0u8; 2];
            plan.shared.mem.read_at(plan.shared.layout.rings(q as u16).used + 2, &mut idx)?;
            let base = u16::from_le_bytes(idx);
            start_ring(&mut fe, &plan.shared, q as u16, plan.queue_size, base, (kick, call), enable)?;
            // Whatever was kicked before stays available: wake the new backend up.
            let _ = kick.write(1);
        }
        if watchdog.fired() {
            return Err(DriverError::Timeout(plan.timeout));
        }
        Ok(Conn { frontend: fe, socket })
    }
}
