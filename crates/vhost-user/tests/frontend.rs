//! The vhost-user server over a real unix socket, driven by rust-vmm's vhost-user
//! frontend (the same protocol code as libblkio's and close to QEMU's): negotiation,
//! memory table, rings, I/O on several queues, bad parameters, reconnects.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vblk_backend::{Disk, EngineKind};
use vblk_blk::DeviceParams;
use vblk_queue::{Buffer, DriverQueue, RingAddrs, RingFeatures};
use vblk_vhost_user::{DataPlaneOptions, DeviceError, Server, VblkDevice};
use vblk_virtio::blk::{features as blkf, req_type, BlkConfig, OutHdr, Status};
use vblk_virtio::features as vf;
use vblk_virtio::memory::memfd;
use vblk_virtio::{GuestMemory, RegionSpec};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandlerMut,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const MEM: u64 = 16 << 20;
const UVA: u64 = 0x7f12_0000_0000;
const QSIZE: u16 = 64;

struct Daemon {
    path: PathBuf,
    device: Arc<Mutex<VblkDevice>>,
    stop: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl Daemon {
    fn start(disk: Disk, num_queues: u16, readonly: bool) -> Daemon {
        Self::start_polling(disk, num_queues, readonly, 0)
    }

    fn start_polling(disk: Disk, num_queues: u16, readonly: bool, poll_us: u32) -> Daemon {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vblk-fe-{}-{n}.sock", std::process::id()));
        let disk = Arc::new(disk);
        let params = Arc::new(DeviceParams::new(disk.size(), readonly, 512, "fe-test", num_queues, 256));
        let dev = VblkDevice::new(
            params,
            disk,
            DataPlaneOptions {
                threads: num_queues as usize,
                engine: EngineKind::Auto,
                poll_us,
                throttle: Default::default(),
            },
        )
        .unwrap();
        let server = Server::bind(&path, 0o600, dev).unwrap();
        let device = Arc::clone(server.device());
        let (rx, stop) = UnixStream::pair().unwrap();
        let thread = std::thread::spawn(move || server.run(rx.as_raw_fd()).unwrap());
        Daemon { path, device, stop, thread: Some(thread) }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        use std::io::Write;
        let _ = self.stop.write_all(b"x");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Queue {
    drv: DriverQueue,
    kick: EventFd,
    call: EventFd,
}

/// A frontend with its own guest memory, like a VMM.
struct Guest {
    fe: Frontend,
    mem: Arc<GuestMemory>,
    _file: File,
    queues: Vec<Queue>,
    inflight: Option<(VhostUserInflight, File)>,
}

fn ring_addrs(q: usize) -> RingAddrs {
    let base = 0x10000 * (q as u64 + 1);
    RingAddrs { desc: base, avail: base + 0x1000, used: base + 0x2000 }
}

/// How a frontend treats inflight tracking.
enum Inflight {
    /// Not negotiated.
    Off,
    /// A new guest: asks the daemon for a fresh area (GET_INFLIGHT_FD), then hands it back.
    New,
    /// The same guest as before: hands the daemon its area (SET_INFLIGHT_FD).
    Use(VhostUserInflight, File),
}

impl Guest {
    fn connect(d: &Daemon, num_queues: usize) -> Guest {
        Self::connect_with(d, num_queues, Inflight::Off)
    }

    fn connect_with(d: &Daemon, num_queues: usize, inflight: Inflight) -> Guest {
        Self::connect_full(d, num_queues, inflight, VhostUserProtocolFeatures::empty())
    }

    /// With `extra` protocol features negotiated too.
    fn connect_full(d: &Daemon, num_queues: usize, inflight: Inflight, extra: VhostUserProtocolFeatures) -> Guest {
        let file = memfd("guest", MEM).unwrap();
        let spec = RegionSpec { guest_phys_addr: 0, size: MEM, user_addr: UVA, mmap_offset: 0 };
        let mem = Arc::new(GuestMemory::from_files(&[(spec, file.try_clone().unwrap())]).unwrap());
        let (fe, area) = negotiate_with(d, num_queues, &file, inflight, extra);
        let mut g = Guest { fe, mem, _file: file, queues: Vec::new(), inflight: area };
        for q in 0..num_queues {
            let a = ring_addrs(q);
            let drv =
                DriverQueue::new(g.mem.clone(), QSIZE as u32, a, RingFeatures { event_idx: true, indirect: true })
                    .unwrap();
            let (kick, call) = start_ring(&mut g.fe, q, 0);
            g.queues.push(Queue { drv, kick, call });
        }
        g
    }

    /// A new connection of this guest (same memory and rings), as QEMU after losing the
    /// backend: its inflight area, and each ring restarted at its used index.
    fn reconnect(&mut self, d: &Daemon) {
        // Hang up first: a daemon serves one frontend at a time.
        let (placeholder, _) = UnixStream::pair().unwrap();
        drop(std::mem::replace(&mut self.fe, Frontend::from_stream(placeholder, 1)));
        let area = self.inflight.take().map(|(m, f)| Inflight::Use(m, f)).unwrap_or(Inflight::Off);
        let (fe, area) = negotiate(d, self.queues.len(), &self._file, area);
        self.fe = fe;
        self.inflight = area;
        for q in 0..self.queues.len() {
            let mut b = [0u8; 2];
            self.mem.read_at(ring_addrs(q).used + 2, &mut b).unwrap();
            let (kick, call) = start_ring(&mut self.fe, q, u16::from_le_bytes(b));
            (self.queues[q].kick, self.queues[q].call) = (kick, call);
        }
    }

    fn writeback(&mut self) -> u8 {
        let (_, bytes) = self.fe.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60]).unwrap();
        BlkConfig::from_bytes(&bytes).writeback
    }

    /// One request on queue `q`: returns the status byte.
    fn request(&mut self, q: usize, t: u32, sector: u64, data: &mut [u8], write: bool) -> u8 {
        let base = 0x100_0000 / 2 + 0x10_0000 * q as u64;
        let (hdr, buf, status) = (base, base + 0x1000, base + 0xf_f000);
        self.mem.write_at(hdr, &OutHdr { req_type: t, ioprio: 0, sector }.to_bytes()).unwrap();
        self.mem.write_at(status, &[0xff]).unwrap();
        let mut bufs = vec![Buffer { addr: hdr, len: 16, write: false }];
        if !data.is_empty() {
            if !write {
                self.mem.write_at(buf, data).unwrap();
            }
            bufs.push(Buffer { addr: buf, len: data.len() as u32, write });
        }
        bufs.push(Buffer { addr: status, len: 1, write: true });
        let queue = &mut self.queues[q];
        queue.drv.add(&bufs).unwrap();
        queue.drv.publish();
        if queue.drv.needs_kick() {
            queue.kick.write(1).unwrap();
        }
        let got = wait_used(queue);
        assert!(got.is_some(), "no completion within the timeout");
        if write {
            self.mem.read_at(buf, data).unwrap();
        }
        let mut s = [0u8];
        self.mem.read_at(status, &mut s).unwrap();
        s[0]
    }
}

/// Connect, negotiate everything (inflight tracking as asked) and share `file` as guest
/// memory. Returns the frontend and the inflight area it holds.
fn negotiate(
    d: &Daemon,
    num_queues: usize,
    file: &File,
    inflight: Inflight,
) -> (Frontend, Option<(VhostUserInflight, File)>) {
    negotiate_with(d, num_queues, file, inflight, VhostUserProtocolFeatures::empty())
}

/// [`negotiate`], with the protocol features `extra` asked for too.
fn negotiate_with(
    d: &Daemon,
    num_queues: usize,
    file: &File,
    inflight: Inflight,
    extra: VhostUserProtocolFeatures,
) -> (Frontend, Option<(VhostUserInflight, File)>) {
    let mut fe = Frontend::connect(&d.path, num_queues as u64).unwrap();
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    assert_ne!(offered & vf::VHOST_USER_PROTOCOL_FEATURES, 0);
    assert_eq!(offered & blkf::SCSI, 0, "never offer SCSI");
    assert_ne!(offered & vf::RING_PACKED, 0, "the packed ring is offered");
    // These guests write split rings (the packed ring's frontends are the driver's tests,
    // the hostile suites and the guest tests).
    fe.set_features(offered & !vf::RING_PACKED).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    let mut want = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    if !matches!(inflight, Inflight::Off) {
        want |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    }
    want |= extra;
    assert!(pf.contains(want), "{pf:?}");
    fe.set_protocol_features(want).unwrap();
    // Ask for an ack on every message, as QEMU does once REPLY_ACK is negotiated.
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert_eq!(fe.get_queue_num().unwrap(), num_queues as u64);
    let area = match inflight {
        Inflight::Off => None,
        Inflight::New => {
            let ask = VhostUserInflight::new(0, 0, num_queues as u16, QSIZE);
            Some(fe.get_inflight_fd(&ask).unwrap())
        }
        Inflight::Use(m, f) => Some((m, f)),
    };
    if let Some((m, f)) = &area {
        fe.set_inflight_fd(m, f.as_raw_fd()).unwrap();
    }
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM,
        userspace_addr: UVA,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    };
    fe.set_mem_table(&[region]).unwrap();
    (fe, area)
}

/// Set ring `q` up and start it at avail index `base`; returns its kick and call eventfds.
fn start_ring(fe: &mut Frontend, q: usize, base: u16) -> (EventFd, EventFd) {
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(0).unwrap();
    fe.set_vring_num(q, QSIZE).unwrap();
    fe.set_vring_addr(q, &vring_config(ring_addrs(q))).unwrap();
    fe.set_vring_base(q, base).unwrap();
    fe.set_vring_call(q, &call).unwrap();
    fe.set_vring_kick(q, &kick).unwrap();
    fe.set_vring_enable(q, true).unwrap();
    (kick, call)
}

fn vring_config(a: RingAddrs) -> VringConfigData {
    VringConfigData {
        queue_max_size: QSIZE,
        queue_size: QSIZE,
        flags: 0,
        desc_table_addr: UVA + a.desc,
        used_ring_addr: UVA + a.used,
        avail_ring_addr: UVA + a.avail,
        log_addr: None,
    }
}

/// Wait (up to 10 s) for a used entry, sleeping on the call eventfd.
fn wait_used(q: &mut Queue) -> Option<(u16, u32)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(u) = q.drv.pop_used().unwrap() {
            return Some(u);
        }
        if q.drv.enable_interrupts() {
            continue;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut pfd = libc::pollfd { fd: q.call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
        let _ = q.call.read();
    }
}

fn temp_disk(size: u64) -> (Disk, PathBuf) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("vblk-fe-{}-{n}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let opts = vblk_backend::DiskOptions { readonly: false, direct: true, create_size: Some(size) };
    (Disk::open(&path, &opts).unwrap(), path)
}

const OK: u8 = Status::Ok as u8;

#[test]
fn io_on_two_queues_over_a_real_socket() {
    io_on_two_queues(0);
}

#[test]
fn io_on_two_queues_with_adaptive_polling() {
    io_on_two_queues(200);
}

fn io_on_two_queues(poll_us: u32) {
    let (disk, path) = temp_disk(8 << 20);
    let d = Daemon::start_polling(disk, 2, false, poll_us);
    let mut g = Guest::connect(&d, 2);
    let (cfg, bytes) = g.fe.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60]).unwrap();
    assert_eq!({ cfg.size }, 60);
    let c = BlkConfig::from_bytes(&bytes);
    assert_eq!((c.capacity, c.num_queues, c.blk_size, c.writeback), (16384, 2, 512, 1));
    assert_eq!(c.max_discard_seg, 1);

    let mut data: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(g.request(0, req_type::OUT, 64, &mut data, false), OK);
    let mut back = vec![0u8; data.len()];
    assert_eq!(g.request(1, req_type::IN, 64, &mut back, true), OK);
    assert_eq!(back, data, "written on queue 0, read on queue 1");
    assert_eq!(g.request(1, req_type::FLUSH, 0, &mut [], false), OK);
    let mut id = [0u8; 20];
    assert_eq!(g.request(0, req_type::GET_ID, 0, &mut id, true), OK);
    assert_eq!(&id[..7], b"fe-test");
    // Many requests: ring wrap-around and event-idx suppression in both directions.
    for i in 0..300u64 {
        let mut b = vec![i as u8; 4096];
        assert_eq!(g.request((i % 2) as usize, req_type::OUT, i * 8, &mut b, false), OK);
    }
    for i in (0..300u64).step_by(37) {
        let mut b = vec![0u8; 4096];
        assert_eq!(g.request(0, req_type::IN, i * 8, &mut b, true), OK);
        assert_eq!(b, vec![i as u8; 4096]);
    }
    // The ring position is reported when the ring stops.
    assert_eq!(g.fe.get_vring_base(0).unwrap(), 2 + 150 + 9);
    drop(g);
    drop(d);
    let _ = std::fs::remove_file(path);
}

#[test]
fn bad_ring_parameters_are_refused_and_the_connection_survives() {
    let d = Daemon::start(Disk::null(1 << 20), 1, false);
    let mut g = Guest::connect(&d, 1);
    assert!(g.fe.set_vring_num(0, 0).is_err());
    assert!(g.fe.set_vring_num(0, 3).is_err());
    assert!(g.fe.set_vring_num(0, 512).is_err(), "above --queue-size");
    let outside = RingAddrs { desc: MEM - 0x100, avail: 0x1000, used: 0x2000 };
    assert!(g.fe.set_vring_addr(0, &vring_config(outside)).is_err(), "ring outside memory");
    assert!(g.fe.set_config(BlkConfig::WRITEBACK_OFFSET as u32 + 1, VhostUserConfigFlags::WRITABLE, &[0]).is_err());
    let (_, bytes) = g.fe.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60]).unwrap();
    assert_eq!(BlkConfig::from_bytes(&bytes).writeback, 1);
    g.fe.set_config(BlkConfig::WRITEBACK_OFFSET as u32, VhostUserConfigFlags::WRITABLE, &[0]).unwrap();
    let (_, bytes) = g.fe.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60]).unwrap();
    assert_eq!(BlkConfig::from_bytes(&bytes).writeback, 0, "write-through after the driver cleared WCE");
    // The queue set up before still works.
    let mut b = vec![0u8; 512];
    assert_eq!(g.request(0, req_type::IN, 0, &mut b, true), OK);
    assert!(g.fe.get_features().is_ok());
}

/// QEMU does not replay SET_CONFIG after a reconnect: a guest that chose write-through must
/// still be on write-through (it sends no FLUSH) when its frontend comes back.
#[test]
fn the_write_cache_mode_survives_a_reconnect() {
    let d = Daemon::start(Disk::null(1 << 20), 1, false);
    let mut g = Guest::connect(&d, 1);
    assert_eq!(g.writeback(), 1, "write-back by default");
    g.fe.set_config(BlkConfig::WRITEBACK_OFFSET as u32, VhostUserConfigFlags::WRITABLE, &[0]).unwrap();
    drop(g);
    let mut g = Guest::connect(&d, 1);
    assert_eq!(g.writeback(), 0, "the guest's write-through choice survives the reconnect");
    g.fe.set_config(BlkConfig::WRITEBACK_OFFSET as u32, VhostUserConfigFlags::WRITABLE, &[1]).unwrap();
    drop(g);
    let mut g = Guest::connect(&d, 1);
    assert_eq!(g.writeback(), 1);
}

/// A completion published while the ring had no call fd reaches the driver as soon as it
/// sets one: the daemon signals a new call fd once.
#[test]
fn a_new_call_fd_is_signalled_once() {
    let d = Daemon::start(Disk::null(1 << 20), 1, false);
    let mut g = Guest::connect(&d, 1);
    let mut b = vec![0u8; 512];
    assert_eq!(g.request(0, req_type::IN, 0, &mut b, true), OK);
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    g.fe.set_vring_call(0, &call).unwrap();
    let mut pfd = libc::pollfd { fd: call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(n, 1, "the new call fd was never signalled");
    assert_eq!(call.read().unwrap(), 1);
}

#[test]
fn the_next_frontend_is_served_after_a_disconnect() {
    let (disk, path) = temp_disk(4 << 20);
    let d = Daemon::start(disk, 1, false);
    for round in 0..3u8 {
        let mut g = Guest::connect(&d, 1);
        if round > 0 {
            let mut b = vec![0u8; 4096];
            assert_eq!(g.request(0, req_type::IN, 8, &mut b, true), OK);
            assert_eq!(b, vec![round - 1; 4096], "data from the previous frontend");
        }
        let mut b = vec![round; 4096];
        assert_eq!(g.request(0, req_type::OUT, 8, &mut b, false), OK);
        // Dropped without GET_VRING_BASE: the daemon must clean up on its own.
    }
    drop(d);
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_read_only_export_refuses_writes() {
    let (disk, path) = temp_disk(1 << 20);
    drop(disk);
    let ro = Disk::open(&path, &vblk_backend::DiskOptions { readonly: true, direct: true, create_size: None }).unwrap();
    let d = Daemon::start(ro, 1, true);
    let mut g = Guest::connect(&d, 1);
    let mut b = vec![1u8; 512];
    assert_eq!(g.request(0, req_type::OUT, 0, &mut b, false), Status::IoErr as u8);
    assert_eq!(g.request(0, req_type::IN, 0, &mut b, true), OK);
    assert_eq!(b, vec![0u8; 512]);
    drop(g);
    drop(d);
    let _ = std::fs::remove_file(path);
}

/// With inflight tracking a frontend tells a new guest (GET_INFLIGHT_FD) from the same guest
/// coming back (SET_INFLIGHT_FD of its area): the same guest keeps its write-cache choice,
/// even across a restart of the daemon (the choice is saved in the area); a new guest
/// starts from the default.
#[test]
fn the_write_cache_choice_follows_the_guest_through_its_inflight_area() {
    let d = Daemon::start(Disk::null(1 << 20), 1, false);
    let mut g = Guest::connect_with(&d, 1, Inflight::New);
    assert_eq!(g.writeback(), 1, "write-back by default");
    g.fe.set_config(BlkConfig::WRITEBACK_OFFSET as u32, VhostUserConfigFlags::WRITABLE, &[0]).unwrap();
    let mut b = vec![0u8; 512];
    assert_eq!(g.request(0, req_type::IN, 0, &mut b, true), OK);
    g.reconnect(&d);
    assert_eq!(g.writeback(), 0, "the same guest, the same daemon");
    // A new daemon process knows nothing but what the guest's area holds.
    let d2 = Daemon::start(Disk::null(1 << 20), 1, false);
    g.reconnect(&d2);
    drop(d);
    assert_eq!(g.writeback(), 0, "the same guest, a new daemon");
    assert_eq!(g.request(0, req_type::IN, 0, &mut b, true), OK);
    drop(g);
    let mut other = Guest::connect_with(&d2, 1, Inflight::New);
    assert_eq!(other.writeback(), 1, "a new guest starts from write-back");
}

/// A request the previous backend popped and never completed is flagged in the guest's
/// inflight area; the next connection resubmits it before anything else, and the avail
/// ring goes on after the entry it came from (QEMU rewinds the vring base to the used index).
#[test]
fn a_request_left_in_flight_is_resubmitted_on_reconnect() {
    let (disk, path) = temp_disk(4 << 20);
    let d = Daemon::start(disk, 1, false);
    let mut g = Guest::connect_with(&d, 1, Inflight::New);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(g.request(0, req_type::OUT, 8, &mut data.clone(), false), OK);

    // A read made available but never kicked (the daemon does not see it), flagged in flight
    // as the previous backend would have after popping it.
    let (hdr, buf, status) = (0x90_0000u64, 0x91_0000u64, 0x92_0000u64);
    g.mem.write_at(hdr, &OutHdr { req_type: req_type::IN, ioprio: 0, sector: 8 }.to_bytes()).unwrap();
    g.mem.write_at(status, &[0xff]).unwrap();
    let bufs = [
        Buffer { addr: hdr, len: 16, write: false },
        Buffer { addr: buf, len: 4096, write: true },
        Buffer { addr: status, len: 1, write: true },
    ];
    let head = g.queues[0].drv.add(&bufs).unwrap();
    g.queues[0].drv.publish();
    {
        let (m, f) = g.inflight.as_ref().expect("inflight area");
        let spec = RegionSpec { guest_phys_addr: 0, size: m.mmap_size, user_addr: 0, mmap_offset: m.mmap_offset };
        let area = GuestMemory::from_files(&[(spec, f.try_clone().unwrap())]).unwrap();
        let desc = 16 + 16 * head as u64;
        area.write_at(desc + 8, &1000u64.to_le_bytes()).unwrap();
        area.write_at(desc, &[1]).unwrap();
    }

    g.reconnect(&d);
    let got = wait_used(&mut g.queues[0]).expect("the flagged request was never resubmitted");
    assert_eq!(got, (head, 4097));
    let mut s = [0u8];
    g.mem.read_at(status, &mut s).unwrap();
    assert_eq!(s[0], OK);
    let mut back = vec![0u8; 4096];
    g.mem.read_at(buf, &mut back).unwrap();
    assert_eq!(back, data);
    // The ring goes on after that entry (popping it again would complete the head twice).
    let mut b = vec![0u8; 4096];
    assert_eq!(g.request(0, req_type::IN, 8, &mut b, true), OK);
    assert_eq!(b, data);
    drop(g);
    drop(d);
    let _ = std::fs::remove_file(path);
}

/// An inflight area the frontend describes wrongly (too small, too many queues, a queue size
/// that is not a power of two, larger than its file) is refused with an error reply; the
/// connection goes on and a correct area is accepted.
#[test]
fn bad_inflight_areas_are_refused() {
    let d = Daemon::start(Disk::null(1 << 20), 1, false);
    let mut g = Guest::connect_with(&d, 1, Inflight::New);
    let (m, f) = g.inflight.take().expect("area");
    for bad in [
        VhostUserInflight::new(16, 0, 1, QSIZE),
        VhostUserInflight::new(m.mmap_size, 0, 2, QSIZE),
        VhostUserInflight::new(m.mmap_size, 0, 1, 48),
        VhostUserInflight::new(m.mmap_size * 4, 0, 1, QSIZE),
        VhostUserInflight::new(m.mmap_size, m.mmap_size, 1, QSIZE),
    ] {
        assert!(
            g.fe.set_inflight_fd(&bad, f.as_raw_fd()).is_err(),
            "accepted {:?}",
            (bad.mmap_size, bad.mmap_offset, bad.num_queues, bad.queue_size)
        );
    }
    g.fe.set_inflight_fd(&m, f.as_raw_fd()).unwrap();
    let mut b = vec![0u8; 512];
    assert_eq!(g.request(0, req_type::IN, 0, &mut b, true), OK);
}

/// The frontend's side of the backend channel, as QEMU's vhost-user-blk handles it: on a
/// config change, read the config space again on the main channel (`GET_CONFIG`, with an
/// ack asked for on every message) from inside the handler, and report the capacity.
struct ConfigWatcher {
    fe: Frontend,
    seen: mpsc::Sender<u64>,
}

impl VhostUserFrontendReqHandlerMut for ConfigWatcher {
    fn handle_config_change(&mut self) -> HandlerResult<u64> {
        let (_, bytes) =
            self.fe.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60]).map_err(std::io::Error::other)?;
        let _ = self.seen.send(BlkConfig::from_bytes(&bytes).capacity);
        Ok(0)
    }
}

/// Hand the daemon a backend channel and serve it on a thread (QEMU's main loop); the
/// capacities read after each config change come out of the receiver.
fn backend_channel(g: &mut Guest) -> mpsc::Receiver<u64> {
    let (tx, rx) = mpsc::channel();
    let watcher = Arc::new(Mutex::new(ConfigWatcher { fe: g.fe.clone(), seen: tx }));
    let mut handler = FrontendReqHandler::new(watcher).unwrap();
    // Ack what asks for one, as QEMU does.
    handler.set_reply_ack_flag(true);
    g.fe.set_backend_request_fd(&handler.get_tx_raw_fd()).unwrap();
    std::thread::spawn(move || while handler.handle_request().is_ok() {});
    rx
}

/// Hang up a guest whose backend channel is served: the channel's thread holds a clone of
/// its frontend, so dropping the guest alone would not close the connection.
fn hang_up(g: Guest) {
    // SAFETY: shutdown(2) on the frontend's open socket.
    unsafe { libc::shutdown(g.fe.as_raw_fd(), libc::SHUT_RDWR) };
    drop(g);
}

fn capacity(g: &mut Guest) -> u64 {
    let (_, bytes) = g.fe.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60]).unwrap();
    BlkConfig::from_bytes(&bytes).capacity
}

/// `VblkDevice::resize` on a thread, given 10 s: a resize that waited for the frontend
/// while holding the device would deadlock with the frontend's GET_CONFIG. A deadlock ends
/// the whole test process (the daemon could not be stopped: its thread waits for the lock).
fn resize(d: &Daemon, size: u64, allow_shrink: bool) -> Result<u64, DeviceError> {
    let device = Arc::clone(&d.device);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(device.lock().unwrap().resize(size, allow_shrink)));
    rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| {
        eprintln!("FAILED: resize to {size} did not return within 10 s (deadlocked with the frontend?)");
        std::process::exit(101)
    })
}

fn next_capacity(rx: &mpsc::Receiver<u64>) -> u64 {
    rx.recv_timeout(Duration::from_secs(10)).expect("no config change reached the frontend within 10 s")
}

const IOERR: u8 = Status::IoErr as u8;
const MIB: u64 = 1 << 20;

#[test]
fn a_resize_reaches_the_frontend_and_moves_the_end_of_the_disk() {
    let (disk, path) = temp_disk(8 * MIB);
    let d = Daemon::start(disk, 1, false);
    let mut g = Guest::connect_full(&d, 1, Inflight::Off, VhostUserProtocolFeatures::BACKEND_REQ);
    let changes = backend_channel(&mut g);
    // A channel set up while the device runs, by a frontend that never read the size, is
    // told at once, as at a start.
    assert_eq!(next_capacity(&changes), 8 * MIB / 512);
    let end = |size: u64| size / 512 - 8;
    assert_eq!(g.request(0, req_type::OUT, end(16 * MIB), &mut [1u8; 4096], false), IOERR, "past the end");

    // Grow: the frontend is told, reads the new capacity, and the new end takes writes.
    assert_eq!(resize(&d, 16 * MIB, false).unwrap(), 16 * MIB);
    assert_eq!(next_capacity(&changes), 16 * MIB / 512);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 16 * MIB);
    let mut data = [0x6bu8; 4096];
    assert_eq!(g.request(0, req_type::OUT, end(16 * MIB), &mut data, false), OK, "a write at the new end");
    let mut back = [0u8; 4096];
    assert_eq!(g.request(0, req_type::IN, end(16 * MIB), &mut back, true), OK);
    assert_eq!(back, data);

    // The same size: nothing to tell.
    assert_eq!(resize(&d, 16 * MIB, false).unwrap(), 16 * MIB);
    // Shrinking needs the caller's explicit consent.
    let e = resize(&d, 4 * MIB, false).unwrap_err();
    assert!(
        matches!(e, DeviceError::ShrinkRefused { current, requested } if current == 16 * MIB && requested == 4 * MIB),
        "{e}"
    );
    assert_eq!(capacity(&mut g), 16 * MIB / 512, "a refused shrink changes nothing");
    let e = resize(&d, 5000, true).unwrap_err();
    assert!(matches!(e, DeviceError::Backend(vblk_backend::BackendError::BadSize { .. })), "{e}");

    // Shrink: past the new end is IOERR, before it still works.
    assert_eq!(resize(&d, 4 * MIB, true).unwrap(), 4 * MIB);
    assert_eq!(next_capacity(&changes), 4 * MIB / 512, "only changes are told: the same size sent nothing");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 * MIB);
    assert_eq!(g.request(0, req_type::IN, end(16 * MIB), &mut back, true), IOERR);
    assert_eq!(g.request(0, req_type::OUT, 4 * MIB / 512, &mut [2u8; 512], false), IOERR);
    assert_eq!(g.request(0, req_type::OUT, end(4 * MIB), &mut data, false), OK);
    assert!(changes.try_recv().is_err(), "one notification per change");
    drop(g);
    drop(d);
    let _ = std::fs::remove_file(path);
}

#[test]
fn the_frontend_is_told_while_its_device_runs_and_at_every_start() {
    let (disk, path) = temp_disk(8 * MIB);
    let d = Daemon::start(disk, 1, false);
    // No frontend at all.
    assert_eq!(resize(&d, 12 * MIB, false).unwrap(), 12 * MIB);
    // A frontend without the channel reads the new size.
    let mut g = Guest::connect(&d, 1);
    assert_eq!(capacity(&mut g), 12 * MIB / 512);
    drop(g);
    // It reconnects (as QEMU: keeping the config space it read): nothing to tell.
    let mut g = Guest::connect_full(&d, 1, Inflight::Off, VhostUserProtocolFeatures::BACKEND_REQ);
    let changes = backend_channel(&mut g);
    assert!(changes.recv_timeout(Duration::from_millis(300)).is_err(), "it read this size");
    // Resized while it is away: told when it is back and its device runs.
    hang_up(g);
    assert_eq!(resize(&d, 13 * MIB, false).unwrap(), 13 * MIB);
    let mut g = Guest::connect_full(&d, 1, Inflight::Off, VhostUserProtocolFeatures::BACKEND_REQ);
    let changes = backend_channel(&mut g);
    assert_eq!(next_capacity(&changes), 13 * MIB / 512);
    assert_eq!(resize(&d, 14 * MIB, false).unwrap(), 14 * MIB);
    assert_eq!(next_capacity(&changes), 14 * MIB / 512);
    assert!(changes.recv_timeout(Duration::from_millis(200)).is_err(), "one message per change");

    // The device stopped (QEMU ignores a notification then): not told now, but when it
    // starts again.
    let base = g.fe.get_vring_base(0).unwrap();
    assert_eq!(resize(&d, 15 * MIB, false).unwrap(), 15 * MIB);
    assert!(changes.recv_timeout(Duration::from_millis(300)).is_err(), "nothing while stopped");
    let (kick, call) = start_ring(&mut g.fe, 0, base as u16);
    (g.queues[0].kick, g.queues[0].call) = (kick, call);
    assert_eq!(next_capacity(&changes), 15 * MIB / 512);
    assert_eq!(g.request(0, req_type::OUT, 15 * MIB / 512 - 8, &mut [4u8; 4096], false), OK);
    drop(g);
    drop(d);
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_bad_backend_channel_is_refused_and_a_good_one_still_works() {
    let (disk, path) = temp_disk(8 * MIB);
    let d = Daemon::start(disk, 1, false);
    let mut g = Guest::connect_full(&d, 1, Inflight::Off, VhostUserProtocolFeatures::BACKEND_REQ);
    // Not a socket: the vhost crate refuses it (error reply, then it drops the
    // connection); the device keeps nothing of it.
    let not_a_socket = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    assert!(g.fe.set_backend_request_fd(&not_a_socket).is_err());
    drop(g);
    assert_eq!(resize(&d, 10 * MIB, false).unwrap(), 10 * MIB);
    assert!(not_a_socket.read().is_err(), "nothing was written to the refused fd");
    let mut g = Guest::connect_full(&d, 1, Inflight::Off, VhostUserProtocolFeatures::BACKEND_REQ);
    let changes = backend_channel(&mut g);
    assert_eq!(next_capacity(&changes), 10 * MIB / 512);
    assert_eq!(g.request(0, req_type::OUT, 10 * MIB / 512 - 8, &mut [3u8; 4096], false), OK);
    drop(g);
    drop(d);
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_read_only_export_refuses_to_resize() {
    let (disk, path) = temp_disk(8 * MIB);
    let d = Daemon::start(disk, 1, true);
    assert!(matches!(resize(&d, 16 * MIB, false), Err(DeviceError::ReadOnly)));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 * MIB);
    drop(d);
    let _ = std::fs::remove_file(path);
}
