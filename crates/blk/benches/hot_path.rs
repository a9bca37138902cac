//! Microbenchmarks of the per-request hot path: pop + parse + merge + push to the backend,
//! reap, finish (status byte, used ring) and publish, on the null disk.
//!
//! The rig is the one of `tests/pipeline.rs`: guest memory is a memfd, a driver fills the
//! ring the way the guest's `virtio_blk` would, the device side is a `SplitQueue` in a
//! `BlkQueue`, and the backend is an `Engine` on `Disk::null`, which completes every op at
//! once (so what is measured is vblk's own code plus the engine's eventfd syscalls).
//!
//! One iteration is one *batch*: the driver makes `batch` requests available and publishes
//! them, the device runs one "kick" (`device_round`, what the vhost-user worker does when it
//! wakes up: `process_available` + `enable_notification`, `Engine::reap` + `complete`, and
//! `publish`), and the driver takes the used entries back. Throughput is reported in
//! requests (`Throughput::Elements(batch)`): the time per request is 1 / throughput.
//!
//! Two drivers:
//! - `device/…`: a minimal driver whose descriptors (and indirect tables) are written once;
//!   per batch it only stores the heads in the avail ring, publishes the index and reads the
//!   used ring back: a few stores and loads, so the figure is (almost) the device side alone.
//! - `roundtrip/…`: vblk's `DriverQueue` (`add`/`add_indirect`, `publish`, `needs_kick`,
//!   `pop_used`): the figure includes the driver side, as in `vblk bench` over the loopback.
//!
//! Workloads (4 KiB each, header + data + status, batch 1 and 32):
//! - `read4k`: reads 8 KiB apart (never merged), three direct descriptors;
//! - `randread4k`: the same reads in a scrambled offset order (what a random-read workload
//!   hands the merge step: it has to sort them);
//! - `read4k-indirect`: the same chains through one indirect descriptor each;
//! - `write4k-merge` / `write4k-nomerge`: writes at contiguous offsets with `params.merge`
//!   on (a batch of 32 becomes one backend op) or off (32 ops).
//!
//! ```sh
//! cargo bench -p vblk-blk --bench hot_path -- --quick         # all of them, quickly
//! cargo bench -p vblk-blk --bench hot_path -- 'device/read4k/'  # a filter
//! ```
//!
//! `VBLK_BENCH_RING=packed` runs the `roundtrip` rig on the packed ring (`PackedQueue` and
//! `PackedDriverQueue`; the `device/…` rig writes split descriptors and is skipped).
//!
//! `VBLK_BENCH_NO_TIMING=1` turns the latency histogram's clock reads off (the counters
//! stay on), as in a daemon without `--metrics`.
//!
//! `VBLK_BENCH_DIRTY_LOG=1` attaches a dirty-page log to the device's memory table (a live
//! migration in progress).
//!
//! Instruction counts: with `VBLK_CALLGRIND_REQS=N` in the environment the binary skips
//! criterion and runs N requests of each workload once through the `roundtrip` rig (only
//! `VBLK_CALLGRIND_WORKLOAD=<name>` if set; `VBLK_CALLGRIND_LIST=1` prints the names), the
//! steady-state loop being `steady_state` and the device part `device_round`, for
//! `valgrind --tool=callgrind --toggle-collect=...` (see `bench/callgrind.sh`).

use std::hint::black_box;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use vblk_backend::{Completion, Disk, Engine, EngineKind};
use vblk_blk::{BlkQueue, DeviceParams};
use vblk_queue::layout::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE};
use vblk_queue::{
    AddrSpace, Buffer, Descriptor, DriverRing, PackedQueue, Ring, RingAddrs, RingFeatures, RingKind, SplitLayout,
    SplitQueue,
};
use vblk_virtio::blk::{req_type, OutHdr, Status};
use vblk_virtio::memory::memfd;
use vblk_virtio::{GuestArea, GuestMemory, RegionSpec};

const MEM: u64 = 8 << 20;
/// Room for 32 three-descriptor chains.
const QSIZE: u32 = 128;
const DISK: u64 = 1 << 30;
const MAX_BATCH: u16 = 32;
const BLOCK: u32 = 4096;
/// Guest-physical layout of the rig's memory.
const RINGS: u64 = 0x1000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const TABLES: u64 = 0x50_0000;
const STATUS: u64 = 0x70_0000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    RandRead,
    ReadIndirect,
    Write,
}

#[derive(Clone, Copy, Debug)]
struct Workload {
    kind: Kind,
    merge: bool,
    batch: u16,
}

impl Workload {
    fn all() -> Vec<Workload> {
        let mut v = Vec::new();
        for (kind, merge) in [
            (Kind::Read, true),
            (Kind::RandRead, true),
            (Kind::ReadIndirect, true),
            (Kind::Write, true),
            (Kind::Write, false),
        ] {
            for batch in [1, MAX_BATCH] {
                v.push(Workload { kind, merge, batch });
            }
        }
        v
    }

    fn kind_name(&self) -> &'static str {
        match (self.kind, self.merge) {
            (Kind::Read, _) => "read4k",
            (Kind::RandRead, _) => "randread4k",
            (Kind::ReadIndirect, _) => "read4k-indirect",
            (Kind::Write, true) => "write4k-merge",
            (Kind::Write, false) => "write4k-nomerge",
        }
    }

    /// `read4k/32`, as in the criterion ids.
    fn name(&self) -> String {
        format!("{}/{}", self.kind_name(), self.batch)
    }

    fn write(&self) -> bool {
        self.kind == Kind::Write
    }

    /// Used length the device reports: the writable bytes (data + status for reads).
    fn used_len(&self) -> u32 {
        if self.write() {
            1
        } else {
            BLOCK + 1
        }
    }

    /// The buffers of request `i` (its header, data page and status byte).
    fn buffers(&self, i: u16) -> [Buffer; 3] {
        let i = i as u64;
        [
            Buffer { addr: HDR + i * 16, len: OutHdr::SIZE as u32, write: false },
            Buffer { addr: DATA + i * BLOCK as u64, len: BLOCK, write: !self.write() },
            Buffer { addr: STATUS + i, len: 1, write: true },
        ]
    }
}

/// Which ring the `roundtrip` rig uses (`VBLK_BENCH_RING=packed`; default split).
fn ring_kind() -> RingKind {
    match std::env::var("VBLK_BENCH_RING").as_deref() {
        Ok("packed") => RingKind::Packed,
        _ => RingKind::Split,
    }
}

/// The split ring's three parts; for a packed ring the same addresses are the descriptor
/// ring, the driver's event structure and the device's (all suitably aligned).
fn addrs() -> RingAddrs {
    RingAddrs { desc: RINGS, avail: RINGS + 16 * QSIZE as u64, used: RINGS + 0x2000 }
}

/// The device side: what one vhost-user worker owns for one queue.
struct Device {
    dev: BlkQueue,
    io: Engine,
    done: Vec<Completion>,
}

/// One wakeup of the worker for this queue (`WorkerLoop::service`, `reap`, `publish_all`):
/// batch by batch (the null engine takes at most `INLINE_BATCH` requests a batch), pop,
/// parse, merge and push, reap the completions, finish them and publish the used ring;
/// once the ring is empty, re-enable kicks. Returns the requests popped.
#[inline(never)]
fn device_round(d: &mut Device) -> usize {
    let mut total = 0;
    loop {
        let n = d.dev.process_available(&mut d.io).expect("ring broken");
        total += n;
        let more = n >= d.io.batch_limit() || d.dev.enable_notification().expect("ring broken");
        d.io.reap(&mut d.done);
        // One clock read per batch of completions, as the worker's `dispatch` does.
        let now = if d.dev.timing() { vblk_metrics::now_ns() } else { 0 };
        for c in d.done.drain(..) {
            d.dev.complete_at(c, now);
        }
        black_box(d.dev.publish());
        if !more {
            return total;
        }
    }
}

/// The driver half of the rig.
trait Driver {
    /// Make the batch's requests available and publish them.
    fn submit(&mut self);
    /// Take back the used entries; returns how many, appending `(head, len)` to `out` if given.
    fn reap(&mut self, out: Option<&mut Vec<(u32, u32)>>) -> usize;
}

/// vblk's own driver side: descriptors written for every request, free list, etc.
struct QueueDriver {
    q: DriverRing,
    w: Workload,
    bufs: Vec<[Buffer; 3]>,
}

impl Driver for QueueDriver {
    fn submit(&mut self) {
        for (i, b) in self.bufs.iter().enumerate() {
            if self.w.kind == Kind::ReadIndirect {
                self.q.add_indirect(b, TABLES + i as u64 * 64).unwrap();
            } else {
                self.q.add(b).unwrap();
            }
        }
        self.q.publish();
        black_box(self.q.needs_kick());
    }

    fn reap(&mut self, mut out: Option<&mut Vec<(u32, u32)>>) -> usize {
        let mut n = 0;
        while let Some((head, len)) = self.q.pop_used().unwrap() {
            if let Some(o) = out.as_deref_mut() {
                o.push((head as u32, len));
            }
            n += 1;
        }
        n
    }
}

/// Descriptors and indirect tables written once; per batch only the avail ring moves.
struct RawDriver {
    layout: SplitLayout,
    avail: GuestArea,
    used: GuestArea,
    heads: Vec<u16>,
    avail_idx: u16,
    last_used: u16,
}

impl RawDriver {
    fn new(mem: &Arc<GuestMemory>, w: Workload) -> Self {
        let layout = SplitLayout::new(QSIZE).unwrap();
        let a = addrs();
        let desc = mem.area_at_gpa(a.desc, layout.desc_table_len(), 16).unwrap();
        let avail = mem.area_at_gpa(a.avail, layout.avail_len(), 2).unwrap();
        let used = mem.area_at_gpa(a.used, layout.used_len(), 4).unwrap();
        let chain = |bufs: &[Buffer; 3]| {
            bufs.map(|b| Descriptor {
                addr: b.addr,
                len: b.len,
                flags: if b.write { DESC_F_WRITE } else { 0 },
                next: 0,
            })
        };
        let mut heads = Vec::new();
        for i in 0..w.batch {
            let mut d = chain(&w.buffers(i));
            if w.kind == Kind::ReadIndirect {
                // Head i points at a 3-entry table.
                let table = TABLES + i as u64 * 64;
                for (k, e) in d.iter_mut().enumerate().take(2) {
                    e.flags |= DESC_F_NEXT;
                    e.next = k as u16 + 1;
                }
                let bytes: Vec<u8> = d.iter().flat_map(|e| e.to_bytes()).collect();
                mem.write_at(table, &bytes).unwrap();
                let len = (3 * DESC_SIZE) as u32;
                let head = Descriptor { addr: table, len, flags: DESC_F_INDIRECT, next: 0 };
                desc.write(layout.desc(i), &head.to_bytes());
                heads.push(i);
            } else {
                // Head 3i → 3i+1 → 3i+2.
                let first = 3 * i;
                for (k, e) in d.iter_mut().enumerate() {
                    if k < 2 {
                        e.flags |= DESC_F_NEXT;
                        e.next = first + k as u16 + 1;
                    }
                    desc.write(layout.desc(first + k as u16), &e.to_bytes());
                }
                heads.push(first);
            }
        }
        RawDriver { layout, avail, used, heads, avail_idx: 0, last_used: 0 }
    }
}

impl Driver for RawDriver {
    fn submit(&mut self) {
        for &h in &self.heads {
            self.avail.store_u16(self.layout.avail_entry(self.avail_idx), h);
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        fence(Ordering::Release);
        self.avail.store_u16(SplitLayout::IDX, self.avail_idx);
    }

    fn reap(&mut self, mut out: Option<&mut Vec<(u32, u32)>>) -> usize {
        let idx = self.used.load_u16(SplitLayout::IDX);
        fence(Ordering::Acquire);
        let n = idx.wrapping_sub(self.last_used);
        for k in 0..n {
            let off = self.layout.used_entry(self.last_used.wrapping_add(k));
            let (head, len) = (self.used.load_u32(off), self.used.load_u32(off + 4));
            if let Some(o) = out.as_deref_mut() {
                o.push((head, len));
            }
        }
        self.last_used = idx;
        n as usize
    }
}

struct Rig<D> {
    mem: Arc<GuestMemory>,
    w: Workload,
    drv: D,
    dev: Device,
}

/// Guest memory with the batch's headers written, and the device side on a null disk.
fn device(w: Workload, kind: RingKind) -> (Arc<GuestMemory>, Device) {
    let spec = RegionSpec { guest_phys_addr: 0, size: MEM, user_addr: 0x7000_0000_0000, mmap_offset: 0 };
    let mem = Arc::new(GuestMemory::from_files(&[(spec, memfd("guest", MEM).unwrap())]).unwrap());
    for i in 0..w.batch as u64 {
        // Reads 8 KiB apart (never contiguous), in a scrambled order for randread (13 is
        // coprime with the batch sizes); writes back to back.
        let sector = match w.kind {
            Kind::Write => i * 8,
            Kind::RandRead => (i * 13 + 5) % w.batch as u64 * 16,
            Kind::Read | Kind::ReadIndirect => i * 16,
        };
        let t = if w.write() { req_type::OUT } else { req_type::IN };
        let h = OutHdr { req_type: t, ioprio: 0, sector };
        mem.write_at(HDR + i * 16, &h.to_bytes()).unwrap();
    }
    let feats = RingFeatures { event_idx: true, indirect: true };
    // VBLK_BENCH_DIRTY_LOG=1: the device logs every write into guest memory, as during a
    // live migration (the cost of logging, against the same binary without it).
    let dev_mem = match std::env::var_os("VBLK_BENCH_DIRTY_LOG") {
        Some(_) => {
            let bytes = MEM / vblk_virtio::dirty_log::LOG_PAGE / 8;
            let log = vblk_virtio::DirtyLog::map(&memfd("log", bytes).unwrap(), bytes, 0).unwrap();
            Arc::new(mem.with_log(Some(Arc::new(log))))
        }
        None => mem.clone(),
    };
    let q: Ring = match kind {
        RingKind::Split => SplitQueue::new(dev_mem, QSIZE, addrs(), AddrSpace::GuestPhysical, feats).unwrap().into(),
        RingKind::Packed => PackedQueue::new(dev_mem, QSIZE, addrs(), AddrSpace::GuestPhysical, feats).unwrap().into(),
    };
    let disk = Arc::new(Disk::null(DISK));
    let mut params = DeviceParams::new(disk.size(), false, 512, "vblk-bench", 1, QSIZE as u16);
    params.merge = w.merge;
    let io = Engine::new(disk, EngineKind::Auto, QSIZE).unwrap();
    let mut dev = BlkQueue::new(q, Arc::new(params), 0);
    // VBLK_BENCH_NO_TIMING=1: count without measuring latencies (no clock reads), as a
    // daemon without --metrics does.
    dev.set_timing(std::env::var_os("VBLK_BENCH_NO_TIMING").is_none());
    (mem, Device { dev, io, done: Vec::with_capacity(QSIZE as usize) })
}

fn queue_rig(w: Workload) -> Rig<QueueDriver> {
    let kind = ring_kind();
    let (mem, dev) = device(w, kind);
    let feats = RingFeatures { event_idx: true, indirect: true };
    let q = DriverRing::new(kind, mem.clone(), QSIZE, addrs(), feats).unwrap();
    let bufs = (0..w.batch).map(|i| w.buffers(i)).collect();
    Rig { mem, w, drv: QueueDriver { q, w, bufs }, dev }
}

fn raw_rig(w: Workload) -> Rig<RawDriver> {
    let (mem, dev) = device(w, RingKind::Split);
    // The raw driver relies on the ring being zeroed, which a fresh memfd is.
    let drv = RawDriver::new(&mem, w);
    Rig { mem, w, drv, dev }
}

impl<D: Driver> Rig<D> {
    /// One batch, checked: every request comes back once, with its used length and an OK
    /// status byte, and merging happened as configured. Also warms the rig up (vectors
    /// reach their steady capacity), so the measured rounds do not allocate for that.
    fn checked_round(&mut self) {
        for i in 0..self.w.batch as u64 {
            self.mem.write_at(STATUS + i, &[0xee]).unwrap();
        }
        let before = self.dev.dev.metrics().snapshot();
        self.drv.submit();
        assert_eq!(device_round(&mut self.dev), self.w.batch as usize);
        let mut used = Vec::new();
        assert_eq!(self.drv.reap(Some(&mut used)), self.w.batch as usize);
        for &(_, len) in &used {
            assert_eq!(len, self.w.used_len(), "{}", self.w.name());
        }
        for i in 0..self.w.batch as u64 {
            let mut b = [0u8];
            self.mem.read_at(STATUS + i, &mut b).unwrap();
            assert_eq!(b[0], Status::Ok as u8, "{} request {i}", self.w.name());
        }
        let after = self.dev.dev.metrics().snapshot();
        let merged = if self.w.write() && self.w.merge { self.w.batch as u64 - 1 } else { 0 };
        assert_eq!(after.merged - before.merged, merged, "{}", self.w.name());
        assert_eq!(after.errors, [0; 2]);
        assert_eq!(self.dev.io.in_flight(), 0);
    }

    fn warm_up(&mut self) {
        for _ in 0..4 {
            self.checked_round();
        }
        // Around the avail/used rings at least once.
        for _ in 0..QSIZE {
            self.round();
        }
        self.checked_round();
    }

    /// One batch, unchecked but for the count.
    #[inline(always)]
    fn round(&mut self) {
        self.drv.submit();
        let n = device_round(&mut self.dev);
        let back = self.drv.reap(None);
        debug_assert_eq!(n, back);
        black_box(back);
    }
}

/// The loop callgrind counts (`--toggle-collect=*steady_state*`): `rounds` batches.
#[inline(never)]
fn steady_state<D: Driver>(rig: &mut Rig<D>, rounds: u64) {
    for _ in 0..rounds {
        rig.round();
    }
}

fn bench_workloads(c: &mut Criterion) {
    let rigs: &[(&str, bool)] = if ring_kind() == RingKind::Packed {
        &[("roundtrip", true)]
    } else {
        &[("device", false), ("roundtrip", true)]
    };
    for &(driver, make) in rigs {
        let mut group = c.benchmark_group(driver);
        for w in Workload::all() {
            group.throughput(Throughput::Elements(w.batch as u64));
            let id = BenchmarkId::new(w.kind_name(), w.batch);
            if make {
                let mut rig = queue_rig(w);
                rig.warm_up();
                group.bench_function(id, |b| b.iter(|| rig.round()));
                rig.checked_round();
            } else {
                let mut rig = raw_rig(w);
                rig.warm_up();
                group.bench_function(id, |b| b.iter(|| rig.round()));
                rig.checked_round();
            }
        }
        group.finish();
    }
}

/// `VBLK_CALLGRIND_REQS=N`: N requests of each selected workload, no criterion.
fn callgrind_mode(reqs: &str) {
    let reqs: u64 = reqs.parse().expect("VBLK_CALLGRIND_REQS must be a number of requests");
    let only = std::env::var("VBLK_CALLGRIND_WORKLOAD").ok();
    let list = std::env::var_os("VBLK_CALLGRIND_LIST").is_some();
    let mut ran = 0;
    for w in Workload::all() {
        if list {
            println!("{}", w.name());
            continue;
        }
        if only.as_deref().is_some_and(|o| o != w.name()) {
            continue;
        }
        let rounds = reqs.div_ceil(w.batch as u64);
        let mut rig = queue_rig(w);
        rig.warm_up();
        steady_state(&mut rig, rounds);
        rig.checked_round();
        println!("workload={} requests={} rounds={}", w.name(), rounds * w.batch as u64, rounds);
        ran += 1;
    }
    assert!(list || ran > 0, "no workload named {only:?}; VBLK_CALLGRIND_LIST=1 lists them");
}

fn main() {
    if let Ok(reqs) = std::env::var("VBLK_CALLGRIND_REQS") {
        callgrind_mode(&reqs);
        return;
    }
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench_workloads(&mut c);
    c.final_summary();
}
