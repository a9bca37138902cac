//! The rig of the hostile-driver suites (`hostile_ring.rs`, `hostile_ring_bounds.rs`): a
//! device with two queues taken over by `vblk_driver::raw::ring::RawQueue`, served either
//! by the in-process loopback or by a spawned `vblk serve`, over an image holding canary
//! data that no case may change. (`packed.rs` here is the same rig for packed rings,
//! used by `hostile_packed.rs`.)
//!
//! Each case builds a [`Rig`], does its worst on queue 0, asserts the exact outcome with
//! [`Rig::expect_status`] (a status byte and the used length of what was written) or
//! [`Rig::expect_broken`] (a chain with nowhere to put a status, or a bad ring, stops the
//! queue: a request never ends silently), then calls [`Rig::finish`]: a valid request on
//! the same queue (or, for a broken queue, on queue 1 and on a new connection) still works,
//! the canaries are unchanged, and `vblk serve` is alive and idle (no spinning on a broken
//! ring). A case that breaks the queue more than once calls [`Rig::recover`] in between.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vblk_backend::{Disk, DiskOptions};
use vblk_driver::raw::ring::{Buffer, Descriptor, RawQueue, UsedElem, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use vblk_driver::raw::RawMemory;
use vblk_driver::{loopback, Device, DeviceInfo, IoBuf, LoopbackConfig, LoopbackServer, Options, RingChoice};
use vblk_virtio::blk::{req_type, OutHdr, Status};

use crate::common::{self, Backend, BackendConfig, BackendProcess, TempDir};

/// Ring size of the rigs (small, so that "longer than the queue" is cheap).
pub const QSIZE: u16 = 16;
pub const DISK: u64 = 16 << 20;
/// The byte offset the cases aim at, with canaries around it.
pub const TARGET: u64 = 8 << 20;
pub const SECTOR: u64 = 512;
/// Canary regions: around the target, and the last 64 KiB of the disk.
pub const CANARIES: [(u64, u64); 2] = [(TARGET - (64 << 10), 128 << 10), (DISK - (64 << 10), 64 << 10)];
/// Where `finish` proves that writes still work (outside the canaries).
const SCRATCH: u64 = 1 << 20;
/// The value a status byte holds until the device writes it.
pub const UNTOUCHED: u8 = 0xee;
/// What data buffers hold before a case: a device that writes them is caught.
pub const FILL: u8 = 0x5a;
pub const WAIT: Duration = Duration::from_secs(10);

pub const IOERR: u8 = Status::IoErr as u8;
pub const UNSUPP: u8 = Status::Unsupp as u8;
pub const OK: u8 = Status::Ok as u8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// vblk's device engine in this process (`vblk_driver::loopback`), one worker thread
    /// for both queues, adaptive polling on (`poll_us` 50).
    Loopback,
    /// A `vblk serve` process over its socket, one worker thread per queue, sleeping on
    /// eventfds (default options).
    Serve,
}

/// How to set a rig up.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    pub readonly: bool,
    pub queue_size: u16,
    pub vblk_args: &'static [&'static str],
}

impl Default for Setup {
    fn default() -> Self {
        Setup { readonly: false, queue_size: QSIZE, vblk_args: &[] }
    }
}

/// A device under attack. See the module docs.
pub struct Rig {
    /// Queue 0: the one the cases attack. Queue 1: the bystander.
    pub q: RawQueue,
    pub q1: RawQueue,
    dev: Device,
    loopback: Option<LoopbackServer>,
    serve: Option<BackendProcess>,
    pub target: Target,
    setup: Setup,
    image: PathBuf,
    /// Expected disk contents of the canary regions (and of what valid cases wrote).
    model: Vec<(u64, Vec<u8>)>,
    broken: bool,
    dir: TempDir,
}

/// `RawQueue` writes split rings only.
fn options(queue_size: u16) -> Options {
    Options {
        num_queues: 2,
        queue_size,
        buffer_memory: 8 << 20,
        timeout: WAIT,
        ring: RingChoice::Split,
        ..Options::default()
    }
}

impl Rig {
    pub fn new(target: Target) -> Rig {
        Rig::with(target, Setup::default())
    }

    pub fn with(target: Target, setup: Setup) -> Rig {
        let Stage { dir, image, model, serve } = Stage::new(target, setup.readonly, setup.vblk_args);
        let (dev, loopback) = connect(target, setup, &image, serve.as_ref());
        let (dev, q, q1) = take_raw(dev);
        Rig { q, q1, dev, loopback, serve, target, setup, image, model, broken: false, dir }
    }

    pub fn serial(&self) -> Vec<u8> {
        let s = self.dev.info().serial.clone().unwrap_or_default().into_bytes();
        let mut id = [0u8; 20];
        id[..s.len().min(20)].copy_from_slice(&s[..s.len().min(20)]);
        id.to_vec()
    }

    pub fn info(&self) -> &DeviceInfo {
        self.dev.info()
    }

    /// What the disk holds at `offset` (inside a canary region).
    pub fn canary(&self, offset: u64, len: usize) -> Vec<u8> {
        let (off, data) = self
            .model
            .iter()
            .find(|(o, d)| *o <= offset && offset + len as u64 <= o + d.len() as u64)
            .expect("inside a canary region");
        data[(offset - off) as usize..][..len].to_vec()
    }

    /// A buffer of `len` bytes filled with [`FILL`].
    pub fn buf(&self, len: u32) -> IoBuf {
        let b = self.q.alloc(len).expect("alloc");
        b.write_at(0, &vec![FILL; len as usize]).expect("fill");
        b
    }

    /// Record that a valid case wrote `data` at `offset`.
    pub fn expect_written(&mut self, offset: u64, data: &[u8]) {
        self.model.push((offset, data.to_vec()));
    }

    /// Run `bufs` as one chain at head 0 of queue 0 and assert the device answered it with
    /// status `want` and the right head, with the used length of what it wrote (§2.7.8.2):
    /// every writable byte for OK, only the status byte when that is the chain's sole
    /// writable byte for an error, else nothing.
    pub fn expect_status(&mut self, bufs: &[Buffer], want: u8) {
        let writable: u32 = bufs.iter().filter(|b| b.write).map(|b| b.len).sum();
        let len = match want {
            OK => writable,
            _ if writable == 1 => 1,
            _ => 0,
        };
        self.expect_answer(bufs, want, len);
    }

    /// Like [`expect_status`](Self::expect_status) with an explicit used length.
    pub fn expect_answer(&mut self, bufs: &[Buffer], want: u8, len: u32) {
        let used = run(&mut self.q, 0, bufs);
        assert_eq!(used, UsedElem { id: 0, len }, "used entry");
        let got = status_of(&self.q, bufs);
        assert_eq!(got, want, "status byte: want {want}, got {got}");
        assert!(!self.q.err_fired(), "a refused request must not break the queue");
    }

    /// Run `bufs` as one chain at head 0 and assert it broke the queue: it has nowhere to
    /// put a status, and completing it would read as success to a driver.
    pub fn expect_chain_breaks(&mut self, bufs: &[Buffer]) {
        self.q.write_chain(0, bufs).expect("write chain");
        self.expect_head_breaks();
    }

    /// Make head 0 (its descriptors written by the caller) available and assert it broke
    /// the queue.
    pub fn expect_head_breaks(&mut self) {
        self.q.add_avail(0);
        self.q.publish();
        self.expect_broken(0);
    }

    /// Kick queue 0 and assert it broke: the err eventfd fires and no further entry is
    /// published (beyond `completed` requests popped before the break).
    pub fn expect_broken(&mut self, completed: usize) -> Vec<UsedElem> {
        self.q.kick().expect("kick");
        assert!(self.q.wait_err(WAIT).expect("wait err"), "the vring err eventfd was not signalled");
        let done = if completed > 0 { self.q.wait_used(completed, WAIT).expect("completions") } else { Vec::new() };
        // The driver keeps kicking the dead queue: the device must neither answer nor spin.
        for _ in 0..3 {
            self.q.kick().expect("kick");
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(self.q.pending_used(), 0, "a broken queue published more entries");
        self.broken = true;
        done
    }

    /// After a break: the broken queue stays stopped while the other queue keeps working
    /// and the disk is intact; then a new connection, with working queues.
    pub fn recover(mut self) -> Rig {
        assert!(self.broken, "recover() after expect_broken()");
        self.assert_alive_and_idle();
        let used = self.q.used_idx();
        check_canaries(&mut self.q1, &self.model);
        assert_eq!(self.q.used_idx(), used);
        self.reconnect()
    }

    /// The common ending of every case. See the module docs.
    pub fn finish(mut self) {
        if self.broken {
            self = self.recover();
        } else {
            self.assert_alive_and_idle();
        }
        let q = &mut self.q;
        if !self.setup.readonly {
            let data = common::pattern(99, 8192);
            let b = q.alloc(8192).expect("alloc");
            b.write_at(0, &data).expect("write");
            assert_eq!(io(q, req_type::OUT, SCRATCH, &b), OK, "a valid write after the case");
            self.model.push((SCRATCH, data));
        }
        check_canaries(q, &self.model);
        check_canaries(&mut self.q1, &self.model);
        self.assert_alive_and_idle();
    }

    /// Drop this connection and connect again to the same image: `vblk serve` accepts the
    /// next frontend; the loopback is a new in-process device on the same image.
    pub fn reconnect(self) -> Rig {
        let Rig { q, q1, dev, loopback, serve, target, setup, image, model, dir, .. } = self;
        drop((q, q1, dev, loopback));
        let (dev, loopback) = connect(target, setup, &image, serve.as_ref());
        let (dev, q, q1) = take_raw(dev);
        Rig { q, q1, dev, loopback, serve, target, setup, image, model, broken: false, dir }
    }

    /// `vblk serve` still runs and uses (almost) no CPU over half a second: a broken or
    /// abused ring must not make a worker spin. (The loopback device shares this process.)
    pub fn assert_alive_and_idle(&mut self) {
        if let Some(serve) = self.serve.as_mut() {
            assert_alive_and_idle(serve);
        }
    }

    pub fn serve_pid(&self) -> Option<u32> {
        self.serve.as_ref().map(BackendProcess::pid)
    }
}

/// What outlives a rig's connections: the image with its canaries (and the expected
/// contents of the canary regions), and the `vblk serve` process for [`Target::Serve`].
pub struct Stage {
    pub dir: TempDir,
    pub image: PathBuf,
    pub model: Vec<(u64, Vec<u8>)>,
    pub serve: Option<BackendProcess>,
}

impl Stage {
    pub fn new(target: Target, readonly: bool, vblk_args: &'static [&'static str]) -> Stage {
        let dir = TempDir::new("hostile");
        let image = dir.join("disk.img");
        common::create_image(&image, DISK);
        // The canaries go straight into the image, before any device opens it (a read-only
        // export could not write them).
        let model: Vec<(u64, Vec<u8>)> = CANARIES
            .iter()
            .enumerate()
            .map(|(i, &(off, len))| (off, common::pattern(i as u64 + 1, len as usize)))
            .collect();
        for (off, data) in &model {
            common::write_at(&image, *off, data);
        }
        let serve = (target == Target::Serve).then(|| {
            let cfg = BackendConfig { readonly, num_queues: 2, vblk_args };
            BackendProcess::start(Backend::Vblk, &image, &dir.join("vblk.sock"), cfg, &dir.join("serve.log"))
                .unwrap_or_else(|e| panic!("{e}"))
        });
        Stage { dir, image, model, serve }
    }
}

/// `vblk serve` still runs and uses (almost) no CPU over half a second: a broken or abused
/// ring must not make a worker spin.
pub fn assert_alive_and_idle(serve: &mut BackendProcess) {
    serve.check_alive().unwrap_or_else(|e| panic!("{e}"));
    let pid = serve.pid();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(500));
    let used = cpu_ticks(pid) - before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    assert!(used * 10 <= hz, "vblk serve used {used} ticks (of {hz}/s) in 0.5 s while idle: spinning?");
    serve.check_alive().unwrap_or_else(|e| panic!("{e}"));
}

fn connect(
    target: Target,
    setup: Setup,
    image: &std::path::Path,
    serve: Option<&BackendProcess>,
) -> (Device, Option<LoopbackServer>) {
    let opts = options(setup.queue_size);
    match target {
        Target::Serve => {
            let socket = &serve.expect("serve process").socket;
            (Device::connect(socket, &opts).expect("connect to vblk serve"), None)
        }
        Target::Loopback => {
            let dopts = DiskOptions { readonly: setup.readonly, direct: true, create_size: None };
            let disk = Disk::open(image, &dopts).expect("open image");
            // Adaptive polling on: the loopback covers the worker's polling path, `vblk
            // serve` (default options) the sleeping one.
            let cfg =
                LoopbackConfig { readonly: setup.readonly, num_queues: 2, poll_us: 50, ..LoopbackConfig::default() };
            let (dev, server) = loopback(disk, &cfg, &opts).expect("loopback");
            (dev, Some(server))
        }
    }
}

fn take_raw(mut dev: Device) -> (Device, RawQueue, RawQueue) {
    let mut handles = dev.take_queues();
    assert_eq!(handles.len(), 2, "two queues");
    let h1 = handles.pop().expect("queue 1");
    let h0 = handles.pop().expect("queue 0");
    let q = RawQueue::new(&dev, h0).expect("raw queue 0");
    let q1 = RawQueue::new(&dev, h1).expect("raw queue 1");
    (dev, q, q1)
}

/// utime + stime of a process, in clock ticks (`/proc/<pid>/stat` fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/pid/stat");
    let fields: Vec<&str> = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("").split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// Resident set size of a process in bytes (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/pid/status");
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).expect("VmRSS value") * 1024
}

// ---------------------------------------------------------------------------
// building requests by hand

/// Write an `outhdr` into head (packed: buffer id) `head`'s slot of `q`; its buffer (16
/// device-readable bytes).
pub fn hdr(q: &impl RawMemory, head: u16, t: u32, sector: u64) -> Buffer {
    let addr = q.slot(head);
    q.write_mem(addr, &OutHdr { req_type: t, ioprio: 0, sector }.to_bytes()).expect("header");
    Buffer { addr, len: 16, write: false }
}

/// A one-byte status buffer in head `head`'s slot, preset to [`UNTOUCHED`].
pub fn status(q: &impl RawMemory, head: u16) -> Buffer {
    let addr = q.slot(head) + 16;
    q.write_mem(addr, &[UNTOUCHED]).expect("status");
    Buffer { addr, len: 1, write: true }
}

pub fn readable(b: &IoBuf) -> Buffer {
    Buffer { addr: b.gpa(), len: b.len(), write: false }
}

pub fn writable(b: &IoBuf) -> Buffer {
    Buffer { addr: b.gpa(), len: b.len(), write: true }
}

/// `bufs` as the entries of an indirect table, linked `0 → 1 → ...` (§2.7.5.3).
pub fn table_of(bufs: &[Buffer]) -> Vec<Descriptor> {
    let n = bufs.len();
    let flags =
        |k: usize, b: &Buffer| (if b.write { DESC_F_WRITE } else { 0 }) | if k + 1 < n { DESC_F_NEXT } else { 0 };
    let next = |k: usize| if k + 1 < n { k as u16 + 1 } else { 0 };
    bufs.iter()
        .enumerate()
        .map(|(k, b)| Descriptor { addr: b.addr, len: b.len, flags: flags(k, b), next: next(k) })
        .collect()
}

/// Write an indirect table at `addr`.
pub fn write_table(q: &RawQueue, addr: u64, descs: &[Descriptor]) {
    let bytes: Vec<u8> = descs.iter().flat_map(|d| d.to_bytes()).collect();
    q.write_mem(addr, &bytes).expect("indirect table");
}

/// Where head `head` keeps its indirect table (up to 4 entries) in its slot.
pub fn table_addr(q: &RawQueue, head: u16) -> u64 {
    q.slot(head) + 64
}

/// Make descriptor `head` a well-formed indirect request of `bufs` (at most 4), its
/// table in the head's slot. Returns the table's address.
pub fn indirect_request(q: &RawQueue, head: u16, bufs: &[Buffer]) -> u64 {
    let addr = table_addr(q, head);
    write_table(q, addr, &table_of(bufs));
    q.write_desc(head, Descriptor { addr, len: 16 * bufs.len() as u32, flags: DESC_F_INDIRECT, next: 0 })
        .expect("indirect descriptor");
    addr
}

/// The last byte of the last buffer (where a status goes).
pub fn status_of(q: &impl RawMemory, bufs: &[Buffer]) -> u8 {
    let last = bufs.last().expect("buffers");
    let mut s = [0u8];
    q.read_mem(last.addr + last.len as u64 - 1, &mut s).expect("read status");
    s[0]
}

/// Make head `head` available, kick, and wait for exactly one used entry.
pub fn submit(q: &mut RawQueue, head: u16) -> UsedElem {
    q.add_avail(head);
    q.publish();
    q.kick().expect("kick");
    let used = q.wait_used(1, WAIT).expect("the device never answered");
    used[0]
}

/// Write `bufs` as a chain at `head` and [`submit`] it.
pub fn run(q: &mut RawQueue, head: u16, bufs: &[Buffer]) -> UsedElem {
    q.write_chain(head, bufs).expect("write chain");
    submit(q, head)
}

/// A well-formed read or write of `b` at `offset` on head 0; returns the status byte.
pub fn io(q: &mut RawQueue, t: u32, offset: u64, b: &IoBuf) -> u8 {
    let data = if t == req_type::IN { writable(b) } else { readable(b) };
    let bufs = [hdr(q, 0, t, offset / SECTOR), data, status(q, 0)];
    let used = run(q, 0, &bufs);
    let writable_len = if t == req_type::IN { b.len() + 1 } else { 1 };
    assert_eq!(used, UsedElem { id: 0, len: writable_len }, "valid request");
    status_of(q, &bufs)
}

/// Read `len` bytes at `offset` through `q`.
pub fn read(q: &mut RawQueue, offset: u64, len: u32) -> Vec<u8> {
    let b = q.alloc(len).expect("alloc");
    assert_eq!(io(q, req_type::IN, offset, &b), OK, "valid read at {offset}");
    b.to_vec().expect("read buffer")
}

/// Read back every region of `model` (later entries win) and compare.
pub fn check_canaries(q: &mut RawQueue, model: &[(u64, Vec<u8>)]) {
    for (i, (off, data)) in model.iter().enumerate() {
        let mut want = data.clone();
        for (o2, d2) in &model[i + 1..] {
            // A later write over part of this region.
            for (k, byte) in want.iter_mut().enumerate() {
                let a = off + k as u64;
                if a >= *o2 && a < o2 + d2.len() as u64 {
                    *byte = d2[(a - o2) as usize];
                }
            }
        }
        let got = read(q, *off, data.len() as u32);
        if let Some(k) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!("disk changed at offset {}: want {:#04x}, found {:#04x}", off + k as u64, want[k], got[k]);
        }
    }
}

/// Assert `b` still holds [`FILL`] everywhere: the device wrote nothing into it.
pub fn assert_untouched(b: &IoBuf, what: &str) {
    let v = b.to_vec().expect("read buffer");
    if let Some(k) = v.iter().position(|&x| x != FILL) {
        panic!("{what}: byte {k} of the buffer was written ({:#04x})", v[k]);
    }
}

/// Wait until `f` holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    f()
}

/// One `#[test]` per case per target: `loopback::<case>` and `serve::<case>`.
macro_rules! hostile_cases {
    ($($case:ident),* $(,)?) => {
        mod loopback {
            $( #[test] fn $case() { super::$case(crate::hostile::Target::Loopback) } )*
        }
        mod serve {
            $( #[test] fn $case() { super::$case(crate::hostile::Target::Serve) } )*
        }
    };
}
