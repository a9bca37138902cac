//! `vhost_user`: a `VblkDevice` (null disk, 2 queues, 1 or 2 worker threads, optionally
//! polling) served by `serve_stream` on one end of a socketpair; the fuzzer plays the
//! frontend with a sequence of messages (code, flags, structured or raw payload, up to 3 attached memfds
//! or eventfds whose memory the fuzzer may fill with rings and requests).
//!
//! Replies are drained by a reader thread, so a message whose reply never comes costs
//! nothing; after the last message the frontend shuts its end down and the daemon thread
//! must end (10 s, else abort: a hang) with `ConnectionEnd::Disconnected`, having released
//! every thread, fd and guest-memory mapping the session created. Optionally a second
//! frontend then connects to the same device and must be served normally.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex, Once};
use std::time::{Duration, Instant};

use vblk_backend::{Disk, EngineKind};
use vblk_blk::DeviceParams;
use vblk_vhost_user::{serve_stream, ConnectionEnd, DataPlaneOptions, VblkDevice};
use vblk_virtio::features as vf;
use vblk_virtio::memory::memfd;

use crate::{fuzz_enum, fuzz_struct};

/// Frontend-virtual base of region slot 0; slot `k` is `k` MiB above it.
pub const UVA_BASE: u64 = 0x7f00_0000_0000;
pub const SLOT: u64 = 1 << 20;
pub const MEMFD_SIZES: [u64; 3] = [0x1000, 0x1_0000, 0x10_0000];
pub const QUEUE_SIZES: [u16; 4] = [8, 64, 256, 1024];
pub const MAX_MSGS: usize = 64;
pub const MAX_FDS: usize = 3;
const MEMFD_NAME: &str = "vblk-fuzz-vu";

pub const HDR_FLAG_VERSION: u32 = 0x1;
pub const HDR_FLAG_REPLY: u32 = 0x4;
pub const HDR_FLAG_NEED_REPLY: u32 = 0x8;

fuzz_enum! {
    pub enum Code {
        /// `1 + x % 44`: every defined request.
        Known(u8),
        Raw(u32),
    }
}

impl Code {
    pub fn value(&self) -> u32 {
        match *self {
            Code::Known(x) => 1 + x as u32 % 44,
            Code::Raw(x) => x,
        }
    }
}

fuzz_enum! {
    pub enum Flags {
        V1(()),
        NeedReply(()),
        Raw(u32),
    }
}

impl Flags {
    pub fn value(&self) -> u32 {
        match *self {
            Flags::V1(()) => HDR_FLAG_VERSION,
            Flags::NeedReply(()) => HDR_FLAG_VERSION | HDR_FLAG_NEED_REPLY,
            Flags::Raw(x) => x,
        }
    }
}

fuzz_enum! {
    /// A frontend-virtual address.
    pub enum Uva {
        /// Region slot (`% 8`) + offset.
        Slot((u8, u32)),
        Raw(u64),
    }
}

impl Uva {
    pub fn value(&self) -> u64 {
        match *self {
            Uva::Slot((s, off)) => UVA_BASE + (s as u64 % 8) * SLOT + off as u64 % (2 * SLOT),
            Uva::Raw(x) => x,
        }
    }
}

fuzz_struct! {
    pub struct RawRegion {
        pub gpa: u64,
        pub size: u64,
        pub uva: u64,
        pub offset: u64,
    }
}

fuzz_struct! {
    /// A memory region: gpa `slot` MiB, uva `UVA_BASE + uva_slot` MiB, `pages` 4 KiB
    /// pages, `offset_pages` into its file; or raw values.
    pub struct Region {
        pub slot: u8,
        pub pages: u16,
        pub offset_pages: u8,
        pub uva_slot: Option<u8>,
        pub raw: Option<RawRegion>,
    }
}

impl Region {
    /// `(gpa, size, uva, mmap_offset)`.
    pub fn values(&self) -> (u64, u64, u64, u64) {
        if let Some(r) = &self.raw {
            return (r.gpa, r.size, r.uva, r.offset);
        }
        let slot = self.slot as u64 % 8;
        let uva_slot = self.uva_slot.map_or(slot, |s| s as u64 % 8);
        (slot * SLOT, self.pages as u64 * 0x1000, UVA_BASE + uva_slot * SLOT, self.offset_pages as u64 * 0x1000)
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        let (gpa, size, uva, off) = self.values();
        for v in [gpa, size, uva, off] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

fuzz_struct! {
    pub struct VringAddr {
        pub index: u8,
        pub flags: u32,
        pub desc: Uva,
        pub used: Uva,
        pub avail: Uva,
        pub log: u64,
    }
}

fuzz_struct! {
    pub struct MemTable {
        /// Overrides the region count.
        pub count: Option<u32>,
        pub padding: u32,
        pub regions: Vec<Region>,
    }
}

fuzz_struct! {
    pub struct Config {
        pub offset: u32,
        pub size: u32,
        pub flags: u32,
        pub payload: Vec<u8>,
    }
}

fuzz_enum! {
    pub enum Body {
        Empty(()),
        U64(u64),
        /// `(index, num)`.
        VringState((u8, u32)),
        VringAddr(VringAddr),
        MemTable(MemTable),
        /// `ADD_MEM_REG` / `REM_MEM_REG`.
        SingleRegion(Region),
        Config(Config),
        /// `SET_VRING_KICK/CALL/ERR`: index, "no fd" flag (0x100).
        VringFd((u8, bool)),
        Raw(Vec<u8>),
    }
}

/// Vring indices: mostly 0..=2 (2 is one past the last queue), sometimes large.
pub fn ring_index(x: u8) -> u32 {
    if x < 0xf0 {
        x as u32 % 3
    } else {
        x as u32
    }
}

impl Body {
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Body::Empty(()) => {}
            Body::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Body::VringState((i, n)) => {
                out.extend_from_slice(&ring_index(*i).to_le_bytes());
                out.extend_from_slice(&n.to_le_bytes());
            }
            Body::VringAddr(a) => {
                out.extend_from_slice(&ring_index(a.index).to_le_bytes());
                out.extend_from_slice(&a.flags.to_le_bytes());
                for v in [a.desc.value(), a.used.value(), a.avail.value(), a.log] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Body::MemTable(t) => {
                let regions = &t.regions[..t.regions.len().min(40)];
                let n = t.count.unwrap_or(regions.len() as u32);
                out.extend_from_slice(&n.to_le_bytes());
                out.extend_from_slice(&t.padding.to_le_bytes());
                for r in regions {
                    r.encode_into(&mut out);
                }
            }
            Body::SingleRegion(r) => {
                out.extend_from_slice(&0u64.to_le_bytes());
                r.encode_into(&mut out);
            }
            Body::Config(c) => {
                out.extend_from_slice(&c.offset.to_le_bytes());
                out.extend_from_slice(&c.size.to_le_bytes());
                out.extend_from_slice(&c.flags.to_le_bytes());
                out.extend_from_slice(&c.payload[..c.payload.len().min(0x1000)]);
            }
            Body::VringFd((i, nofd)) => {
                let v = ring_index(*i) as u64 | if *nofd { 0x100 } else { 0 };
                out.extend_from_slice(&v.to_le_bytes());
            }
            Body::Raw(b) => out.extend_from_slice(&b[..b.len().min(0x1100)]),
        }
        out
    }
}

fuzz_struct! {
    /// A memfd of `MEMFD_SIZES[size % 3]` bytes with `(offset, bytes)` written into it.
    pub struct MemfdSpec {
        pub size: u8,
        pub writes: Vec<(u32, Vec<u8>)>,
    }
}

fuzz_enum! {
    pub enum Fd {
        Memfd(MemfdSpec),
        EventFd(()),
    }
}

fuzz_struct! {
    pub struct Msg {
        pub code: Code,
        pub flags: Flags,
        pub body: Body,
        /// Overrides the header's size field.
        pub size: Option<u32>,
        pub fds: Vec<Fd>,
    }
}

fuzz_struct! {
    pub struct VuInput {
        pub queue_size: u8,
        pub readonly: bool,
        /// Connect a second frontend afterwards and check it is served.
        pub reconnect: bool,
        pub msgs: Vec<Msg>,
        /// Bit 0: adaptive polling (`poll_us` 20); bit 1: two worker threads. Last, so
        /// older inputs decode with it zero.
        pub options: u8,
    }
}

impl Fd {
    fn open(&self) -> OwnedFd {
        match self {
            Fd::Memfd(m) => {
                let size = MEMFD_SIZES[m.size as usize % MEMFD_SIZES.len()];
                let f = memfd(MEMFD_NAME, size).expect("memfd");
                for (off, bytes) in &m.writes {
                    let off = *off as u64 % size;
                    let n = bytes.len().min((size - off) as usize);
                    let _ = std::os::unix::fs::FileExt::write_all_at(&f, &bytes[..n], off);
                }
                f.into()
            }
            Fd::EventFd(()) => {
                // SAFETY: plain syscall; the result is checked.
                let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
                assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
                // SAFETY: a fresh descriptor nobody else owns.
                unsafe { OwnedFd::from_raw_fd(fd) }
            }
        }
    }
}

impl Msg {
    /// Header + body as sent.
    pub fn wire(&self) -> Vec<u8> {
        let body = self.body.bytes();
        let mut out = Vec::with_capacity(12 + body.len());
        out.extend_from_slice(&self.code.value().to_le_bytes());
        out.extend_from_slice(&self.flags.value().to_le_bytes());
        out.extend_from_slice(&self.size.unwrap_or(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }
}

/// `sendmsg` with `fds` as SCM_RIGHTS on the first byte; never raises SIGPIPE.
fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut sent = 0;
    while sent < data.len() {
        let mut iov = libc::iovec { iov_base: data[sent..].as_ptr() as *mut libc::c_void, iov_len: data.len() - sent };
        // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        let mut cbuf = [0u64; 8];
        if sent == 0 && !fds.is_empty() {
            let payload = std::mem::size_of_val(fds) as u32;
            // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
            let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
            assert!(space <= std::mem::size_of_val(&cbuf));
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points at `space` writable, aligned bytes, enough for one
            // cmsghdr with `fds.len()` descriptors.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(payload) as _;
                std::ptr::copy_nonoverlapping(fds.as_ptr() as *const u8, libc::CMSG_DATA(c), payload as usize);
            }
        }
        // SAFETY: `msg` is fully initialised and its buffers are alive.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
    }
    Ok(())
}

/// Open descriptors of the kinds a session creates (sockets, eventfds, io_urings,
/// memfds); not counting regular files keeps the check exact under a test harness.
fn count_fds() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return 0 };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| {
            let t = t.to_string_lossy();
            t.starts_with("socket:") || t.starts_with("anon_inode:") || t.starts_with("/memfd:")
        })
        .count()
}

/// Threads the daemon names `vblk-worker-N`.
fn count_workers() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return 0 };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("vblk-worker"))
        .count()
}

fn count_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.lines().filter(|l| l.contains(MEMFD_NAME)).count())
        .unwrap_or(0)
}

/// Wait until `f()` returns `want` (a joined thread leaves /proc/self/task a little later).
fn settle(what: &str, want: usize, f: impl Fn() -> usize) {
    let start = Instant::now();
    loop {
        let now = f();
        if now == want {
            return;
        }
        if start.elapsed() > Duration::from_secs(2) {
            panic!("{what}: {now} after the session, {want} before: leaked");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Check the reply stream is a sequence of whole reply messages to codes we sent.
fn check_replies(bytes: &[u8], sent_codes: &[u32]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        assert!(rest.len() >= 12, "truncated reply header ({} bytes)", rest.len());
        let word = |i: usize| u32::from_le_bytes(rest[i..i + 4].try_into().unwrap());
        let (code, flags, size) = (word(0), word(4), word(8) as usize);
        assert_eq!(flags & 0x3, HDR_FLAG_VERSION, "reply version");
        assert_ne!(flags & HDR_FLAG_REPLY, 0, "reply flag");
        assert!(sent_codes.contains(&code), "reply to code {code}, which was never sent");
        assert!(size <= 0x1000, "reply of {size} bytes");
        assert!(rest.len() >= 12 + size, "truncated reply body");
        rest = &rest[12 + size..];
    }
}

pub fn ignore_sigpipe() {
    static ONCE: Once = Once::new();
    // A Rust `main` ignores SIGPIPE; libFuzzer's does not, and the daemon relies on it
    // (a reply to a frontend that already hung up must be an EPIPE error, not a kill).
    ONCE.call_once(|| {
        // SAFETY: setting a signal disposition to SIG_IGN.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
}

pub fn device(input: &VuInput) -> Arc<Mutex<VblkDevice>> {
    let disk = Arc::new(Disk::null(1 << 20));
    let qsize = QUEUE_SIZES[input.queue_size as usize % QUEUE_SIZES.len()];
    let params = Arc::new(DeviceParams::new(disk.size(), input.readonly, 512, "fuzz", 2, qsize));
    let opts = DataPlaneOptions {
        threads: if input.options & 2 != 0 { 2 } else { 1 },
        engine: EngineKind::Auto,
        poll_us: if input.options & 1 != 0 { 20 } else { 0 },
        throttle: Arc::default(),
    };
    Arc::new(Mutex::new(VblkDevice::new(params, disk, opts).expect("a valid configuration")))
}

/// Serve one connection in a thread; returns the frontend end and the daemon's result.
fn serve(
    device: &Arc<Mutex<VblkDevice>>,
    shutdown: RawFd,
) -> (UnixStream, mpsc::Receiver<ConnectionEnd>, std::thread::JoinHandle<()>) {
    let (front, back) = UnixStream::pair().expect("socketpair");
    let (tx, rx) = mpsc::channel();
    let dev = Arc::clone(device);
    let t = std::thread::spawn(move || {
        let end = serve_stream(&dev, back, shutdown);
        let _ = tx.send(end);
    });
    (front, rx, t)
}

fn reader(front: &UnixStream) -> std::thread::JoinHandle<Vec<u8>> {
    let mut r = front.try_clone().expect("dup");
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        all
    })
}

fn wait_end(rx: &mpsc::Receiver<ConnectionEnd>, t: std::thread::JoinHandle<()>, what: &str) -> ConnectionEnd {
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(end) => {
            t.join().expect("daemon thread");
            end
        }
        Err(_) => {
            eprintln!("vhost_user: the daemon did not end within 10 s after {what}: hang");
            std::process::abort();
        }
    }
}

pub fn run(input: &VuInput) {
    run_keeping(input, false);
}

/// [`run`], returning the memfds it sent (duplicates) when `keep` is set (tests look at
/// what the daemon wrote into guest memory).
pub fn run_keeping(input: &VuInput, keep: bool) -> Vec<std::fs::File> {
    ignore_sigpipe();
    let device = device(input);
    // Never signalled: the session must end because the frontend hung up.
    let (stop_rx, _stop_tx) = UnixStream::pair().expect("socketpair");
    let fds0 = count_fds();
    let workers0 = count_workers();
    let maps0 = count_mappings();

    let (front, rx, t) = serve(&device, stop_rx.as_raw_fd());
    let replies = reader(&front);
    let mut codes = Vec::new();
    let mut kept = Vec::new();
    for m in input.msgs.iter().take(MAX_MSGS) {
        let fds: Vec<OwnedFd> = m.fds.iter().take(MAX_FDS).map(Fd::open).collect();
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        if keep {
            for (f, spec) in fds.iter().zip(&m.fds) {
                if let Fd::Memfd(_) = spec {
                    kept.push(std::fs::File::from(f.try_clone().expect("dup")));
                }
            }
        }
        codes.push(m.code.value());
        if send_with_fds(front.as_raw_fd(), &m.wire(), &raw).is_err() {
            break; // The daemon hung up on us.
        }
    }
    let _ = front.shutdown(std::net::Shutdown::Write);
    let end = wait_end(&rx, t, "the frontend hung up");
    assert_eq!(end, ConnectionEnd::Disconnected);
    let replies = replies.join().expect("reader thread");
    drop(front);
    check_replies(&replies, &codes);

    // Everything the session set up is released by the disconnect (the device is still
    // alive, so its Drop cannot hide a leak).
    assert_eq!(count_fds(), fds0 + kept.len(), "file descriptors leaked by the session");
    assert_eq!(count_mappings(), maps0, "guest memory mappings leaked by the session");
    settle("worker threads", workers0, count_workers);
    assert!(!device.lock().unwrap().take_fatal(), "disconnect clears the fatal flag");

    if input.reconnect {
        reconnect_check(&device, stop_rx.as_raw_fd(), input.readonly);
    }
    kept
}

/// A fresh frontend on the same device gets a normal GET_FEATURES answer.
fn reconnect_check(device: &Arc<Mutex<VblkDevice>>, shutdown: RawFd, readonly: bool) {
    let (mut front, rx, t) = serve(device, shutdown);
    let get_features = Msg { code: Code::Raw(1), flags: Flags::V1(()), body: Body::Empty(()), size: None, fds: vec![] };
    send_with_fds(front.as_raw_fd(), &get_features.wire(), &[]).expect("send GET_FEATURES");
    let mut reply = [0u8; 20];
    front.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    front.read_exact(&mut reply).expect("GET_FEATURES reply after a reconnect");
    let features = u64::from_le_bytes(reply[12..20].try_into().unwrap());
    let want =
        device.lock().unwrap().params().offered_features() | vf::VHOST_USER_PROTOCOL_FEATURES | vf::VHOST_F_LOG_ALL;
    assert_eq!(features, want);
    assert_eq!(reply[..12], [1, 0, 0, 0, 5, 0, 0, 0, 8, 0, 0, 0]);
    let _ = readonly;
    drop(front);
    assert_eq!(wait_end(&rx, t, "the second frontend hung up"), ConnectionEnd::Disconnected);
}
