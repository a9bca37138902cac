//! The rig of `hostile_packed.rs`: [`PackedRig`], the packed-ring counterpart of
//! [`crate::hostile::Rig`]. A device with two packed queues (`VIRTIO_F_RING_PACKED` negotiated)
//! taken over by `vblk_driver::raw::packed::RawPackedQueue`, served by the in-process
//! loopback or by a spawned `vblk serve`, over the same image and canaries.
//!
//! Each case does its worst on queue 0 and asserts the exact outcome with
//! [`PackedRig::expect_status`] (status byte, used buffer id and length) or
//! [`PackedRig::expect_broken`] (the err eventfd fires, nothing more is used), then calls
//! [`PackedRig::finish`]: a valid request on the same queue (or, for a broken queue, on
//! queue 1 and on a new connection) still works, the canaries are unchanged, `vblk serve`
//! is alive and idle, and it holds exactly the fds it held for the first connection.
//!
//! Requests that must stay in flight for a while read the [`SLOW`] zone of the disk:
//! with [`PackedSetup::slow_reads`], reads there are delayed by [`SLOW_DELAY`] (`vblk
//! serve --inject`, or the same fault spec on the loopback's disk).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vblk_backend::{Disk, DiskOptions, FaultSpec};
use vblk_driver::raw::packed::{PackedBase, PackedDescriptor, RawPackedQueue, RingPos, EVENT_FLAG_DESC};
use vblk_driver::raw::ring::{Buffer, UsedElem};
use vblk_driver::{loopback, Device, IoBuf, LoopbackConfig, LoopbackServer, Options, RingChoice};
use vblk_virtio::blk::req_type;

use crate::common::{self, fd_count, settle, BackendProcess, TempDir};
use crate::hostile::*;

/// Reads overlapping this zone (1 MiB at 12 MiB, away from the canaries) are delayed when
/// [`PackedSetup::slow_reads`] is on.
pub const SLOW: u64 = 12 << 20;
pub const SLOW_DELAY: Duration = Duration::from_secs(2);
const SLOW_SPEC: &str = "read:delay=2s@offset=12M-13M";
const SLOW_ARGS: &[&str] = &["--inject", SLOW_SPEC];
/// Where `finish` proves that writes still work (outside the canaries).
const SCRATCH: u64 = 1 << 20;

/// How to set a packed rig up.
#[derive(Clone, Copy, Debug)]
pub struct PackedSetup {
    pub readonly: bool,
    pub queue_size: u16,
    /// Negotiate `VIRTIO_RING_F_INDIRECT_DESC` (offered by vblk).
    pub indirect: bool,
    /// Delay reads of the [`SLOW`] zone by [`SLOW_DELAY`].
    pub slow_reads: bool,
}

impl Default for PackedSetup {
    fn default() -> Self {
        PackedSetup { readonly: false, queue_size: QSIZE, indirect: true, slow_reads: false }
    }
}

/// A device with packed rings under attack. See the module docs.
pub struct PackedRig {
    /// Queue 0: the one the cases attack. Queue 1: the bystander.
    pub q: RawPackedQueue,
    pub q1: RawPackedQueue,
    dev: Device,
    loopback: Option<LoopbackServer>,
    serve: Option<BackendProcess>,
    pub target: Target,
    setup: PackedSetup,
    image: PathBuf,
    /// Expected disk contents of the canary regions (and of what valid cases wrote).
    model: Vec<(u64, Vec<u8>)>,
    broken: bool,
    /// `vblk serve`'s open fds with the first connection set up (both err eventfds given).
    fds: Option<usize>,
    dir: TempDir,
}

fn options(setup: PackedSetup) -> Options {
    Options {
        num_queues: 2,
        queue_size: setup.queue_size,
        buffer_memory: 8 << 20,
        timeout: WAIT,
        ring: RingChoice::Packed,
        indirect: setup.indirect,
        ..Options::default()
    }
}

impl PackedRig {
    pub fn new(target: Target) -> PackedRig {
        PackedRig::with(target, PackedSetup::default())
    }

    pub fn with(target: Target, setup: PackedSetup) -> PackedRig {
        let args: &'static [&'static str] = if setup.slow_reads { SLOW_ARGS } else { &[] };
        let Stage { dir, image, model, serve } = Stage::new(target, setup.readonly, args);
        let (dev, loopback) = connect(target, setup, &image, serve.as_ref());
        let (dev, q, q1) = take_raw(dev);
        let fds = serve.as_ref().map(|s| fd_count(s.pid()));
        PackedRig { q, q1, dev, loopback, serve, target, setup, image, model, broken: false, fds, dir }
    }

    pub fn serial(&self) -> Vec<u8> {
        let s = self.dev.info().serial.clone().unwrap_or_default().into_bytes();
        let mut id = [0u8; 20];
        id[..s.len().min(20)].copy_from_slice(&s[..s.len().min(20)]);
        id.to_vec()
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

    /// Run `bufs` as one chain with buffer id 0 on queue 0 and assert the device answered
    /// it with status `want`, buffer id 0 and the used length of what it wrote: every
    /// writable byte for OK, only the status byte when that is the chain's sole writable
    /// byte for an error, else nothing (§2.8.7 / §2.7.8.2).
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
        let used = run(&mut self.q, bufs, 0);
        assert_eq!(used, UsedElem { id: 0, len }, "used descriptor");
        let got = status_of(&self.q, bufs);
        assert_eq!(got, want, "status byte: want {want}, got {got}");
        assert!(!self.q.err_fired(), "a refused request must not break the queue");
    }

    /// Make `bufs` available as one chain with buffer id 0 and assert it broke the queue.
    pub fn expect_chain_breaks(&mut self, bufs: &[Buffer]) {
        self.q.add_chain(bufs, 0).expect("add chain");
        self.expect_broken(0);
    }

    /// Make `descs` available as they are (head flags last) and assert they broke the queue.
    pub fn expect_descs_break(&mut self, descs: &[PackedDescriptor]) {
        self.q.make_available(descs).expect("make available");
        self.expect_broken(0);
    }

    /// Kick queue 0 and assert it broke: the err eventfd fires and no further used
    /// descriptor is written (beyond `completed` requests popped before the break).
    pub fn expect_broken(&mut self, completed: usize) -> Vec<UsedElem> {
        self.q.kick().expect("kick");
        assert!(self.q.wait_err(WAIT).expect("wait err"), "the vring err eventfd was not signalled");
        let done = if completed > 0 { self.q.wait_used(completed, WAIT).expect("completions") } else { Vec::new() };
        // The driver keeps kicking the dead queue: the device must neither answer nor spin.
        for _ in 0..3 {
            self.q.kick().expect("kick");
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !self.q.used_ready(),
            "a broken queue wrote another used descriptor: {:?}",
            self.q.used_at(self.q.used_pos())
        );
        self.broken = true;
        done
    }

    /// `vblk serve`'s log mentions `what` (the reason a queue broke); the loopback logs
    /// nowhere a test can read.
    pub fn expect_log(&self, what: &str) {
        if let Some(serve) = &self.serve {
            let ok = eventually(Duration::from_secs(5), || serve.log_text().contains(what));
            assert!(ok, "vblk serve did not log {what:?}:\n{}", serve.log_text());
        }
    }

    /// How many times `vblk serve` logged `what` (0 for the loopback).
    pub fn log_count(&self, what: &str) -> Option<usize> {
        self.serve.as_ref().map(|s| s.log_text().matches(what).count())
    }

    /// Mark queue 0 broken by a means [`expect_broken`](Self::expect_broken) does not
    /// cover (an error reply), so that [`finish`](Self::finish) reconnects.
    pub fn set_broken(&mut self) {
        self.broken = true;
    }

    /// After a break: the broken queue stays stopped while the other queue keeps working
    /// and the disk is intact; then a new connection, with working queues.
    pub fn recover(mut self) -> PackedRig {
        assert!(self.broken, "recover() after expect_broken()");
        self.assert_alive_and_idle();
        check_canaries(&mut self.q1, &self.model);
        assert!(!self.q.used_ready(), "the broken queue wrote a used descriptor");
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
        if let (Some(serve), Some(want)) = (&self.serve, self.fds) {
            let pid = serve.pid();
            let got = settle(want, Duration::from_secs(5), || fd_count(pid));
            assert_eq!(got, want, "vblk serve holds {got} fds, {want} with the first connection");
        }
    }

    /// Drop this connection and connect again to the same image: `vblk serve` accepts the
    /// next frontend; the loopback is a new in-process device on the same image.
    pub fn reconnect(self) -> PackedRig {
        let PackedRig { q, q1, dev, loopback, serve, target, setup, image, model, fds, dir, .. } = self;
        drop((q, q1, dev, loopback));
        let (dev, loopback) = connect(target, setup, &image, serve.as_ref());
        let (dev, q, q1) = take_raw(dev);
        PackedRig { q, q1, dev, loopback, serve, target, setup, image, model, broken: false, fds, dir }
    }

    /// `vblk serve` still runs and uses (almost) no CPU over half a second.
    pub fn assert_alive_and_idle(&mut self) {
        if let Some(serve) = self.serve.as_mut() {
            assert_alive_and_idle(serve);
        }
    }

    /// `vblk serve` is still running (no idleness check: cheap).
    pub fn assert_alive(&mut self) {
        if let Some(serve) = self.serve.as_mut() {
            serve.check_alive().unwrap_or_else(|e| panic!("{e}"));
        }
    }

    pub fn serve_pid(&self) -> Option<u32> {
        self.serve.as_ref().map(BackendProcess::pid)
    }

    /// Wait until the device has taken every chain before `pos` and asked to be kicked
    /// for the next (EVENT_IDX: its event structure holds DESC at `pos`).
    pub fn wait_device_at(&self, pos: RingPos) {
        let want = (pos.encode(), EVENT_FLAG_DESC);
        let ok = eventually(WAIT, || self.q.device_event() == want);
        assert!(ok, "the device did not reach {pos:?}: its event structure holds {:?}", self.q.device_event());
    }

    /// Restart queue 0 with both positions at `pos` (SET_VRING_BASE, packed encoding).
    pub fn restart_at(&mut self, pos: RingPos) {
        self.q.restart_at(PackedBase { avail: pos, used: pos }).expect("SET_VRING_BASE");
    }
}

fn connect(
    target: Target,
    setup: PackedSetup,
    image: &std::path::Path,
    serve: Option<&BackendProcess>,
) -> (Device, Option<LoopbackServer>) {
    let opts = options(setup);
    let dev = match target {
        Target::Serve => {
            let socket = &serve.expect("serve process").socket;
            (Device::connect(socket, &opts).expect("connect to vblk serve"), None)
        }
        Target::Loopback => {
            let dopts = DiskOptions { readonly: setup.readonly, direct: true, create_size: None };
            let mut disk = Disk::open(image, &dopts).expect("open image");
            if setup.slow_reads {
                disk = disk.with_faults(SLOW_SPEC.parse::<FaultSpec>().expect("fault spec"));
            }
            let cfg =
                LoopbackConfig { readonly: setup.readonly, num_queues: 2, poll_us: 50, ..LoopbackConfig::default() };
            let (dev, server) = loopback(disk, &cfg, &opts).expect("loopback");
            (dev, Some(server))
        }
    };
    assert_eq!(dev.0.ring_kind(), vblk_driver::RingKind::Packed, "packed rings negotiated");
    dev
}

fn take_raw(mut dev: Device) -> (Device, RawPackedQueue, RawPackedQueue) {
    let mut handles = dev.take_queues();
    assert_eq!(handles.len(), 2, "two queues");
    let h1 = handles.pop().expect("queue 1");
    let h0 = handles.pop().expect("queue 0");
    let q = RawPackedQueue::new(&dev, h0).expect("raw packed queue 0");
    let q1 = RawPackedQueue::new(&dev, h1).expect("raw packed queue 1");
    (dev, q, q1)
}

// ---------------------------------------------------------------------------
// requests by hand (headers and status bytes: `crate::hostile::{hdr, status}`)

/// Where buffer id `id` keeps its indirect table (up to 4 entries) in its slot.
pub fn table_addr(q: &RawPackedQueue, id: u16) -> u64 {
    q.slot(id) + 64
}

/// Make `bufs` (at most 4) available as an indirect table in id `id`'s slot, one ring slot
/// pointing at it. Returns the table's address.
pub fn indirect_request(q: &mut RawPackedQueue, id: u16, bufs: &[Buffer]) -> u64 {
    let addr = table_addr(q, id);
    q.write_table(addr, &RawPackedQueue::table_of(bufs)).expect("indirect table");
    q.add_indirect(addr, 16 * bufs.len() as u32, id).expect("indirect slot");
    addr
}

/// Kick and wait for exactly one used descriptor.
pub fn submit(q: &mut RawPackedQueue) -> UsedElem {
    q.kick().expect("kick");
    let used = q.wait_used(1, WAIT).expect("the device never answered");
    used[0]
}

/// Make `bufs` available as one chain with buffer id `id` and [`submit`] it.
pub fn run(q: &mut RawPackedQueue, bufs: &[Buffer], id: u16) -> UsedElem {
    q.add_chain(bufs, id).expect("add chain");
    submit(q)
}

/// A well-formed read or write of `b` at `offset` with buffer id 0; returns the status byte.
pub fn io(q: &mut RawPackedQueue, t: u32, offset: u64, b: &IoBuf) -> u8 {
    let data = if t == req_type::IN { writable(b) } else { readable(b) };
    let bufs = [hdr(q, 0, t, offset / SECTOR), data, status(q, 0)];
    let used = run(q, &bufs, 0);
    let writable_len = if t == req_type::IN { b.len() + 1 } else { 1 };
    assert_eq!(used, UsedElem { id: 0, len: writable_len }, "valid request");
    status_of(q, &bufs)
}

/// Read `len` bytes at `offset` through `q`.
pub fn read(q: &mut RawPackedQueue, offset: u64, len: u32) -> Vec<u8> {
    let b = q.alloc(len).expect("alloc");
    assert_eq!(io(q, req_type::IN, offset, &b), OK, "valid read at {offset}");
    b.to_vec().expect("read buffer")
}

/// Read back every region of `model` (later entries win) and compare.
pub fn check_canaries(q: &mut RawPackedQueue, model: &[(u64, Vec<u8>)]) {
    for (i, (off, data)) in model.iter().enumerate() {
        let mut want = data.clone();
        for (o2, d2) in &model[i + 1..] {
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

/// Wait until the used descriptor at `pos` is `want` (the slot may hold something else, even
/// used-looking flags the test wrote itself, until the device writes it).
pub fn wait_used_at(q: &RawPackedQueue, pos: RingPos, want: UsedElem) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = q.used_at(pos);
        if got == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "no used descriptor {want:?} at {pos:?}: the slot holds {got:?}");
        q.wait_call(Duration::from_millis(5)).expect("wait call");
    }
}
