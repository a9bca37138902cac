//! The device engine end to end, in process: a driver-side ring (what the guest's
//! virtio_blk would write) → `BlkQueue` → a real backend (a file through io_uring or
//! plain syscalls, or null) → used ring → the driver reaps status bytes. Every test runs on
//! the split ring and on the packed ring.

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::Arc;

use vblk_backend::{Disk, DiskOptions, Engine, EngineKind, INLINE_BATCH};
use vblk_blk::{BlkQueue, DeviceParams, Limits, Throttle};
use vblk_metrics::{now_ns, ErrorStatus, Op};
use vblk_queue::{
    AddrSpace, Buffer, DriverRing, PackedDescriptor, PackedQueue, Ring, RingAddrs, RingFeatures, RingKind, SplitQueue,
};
use vblk_virtio::blk::{req_type, DiscardSegment, OutHdr, Status};
use vblk_virtio::memory::memfd;
use vblk_virtio::{GuestMemory, RegionSpec};

const MEM: u64 = 8 << 20;
const QSIZE: u32 = 64;
const DISK: u64 = 4 << 20;
/// Guest-physical layout of the test memory.
const RINGS: u64 = 0x1000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x70_0000;

struct Rig {
    mem: Arc<GuestMemory>,
    drv: DriverRing,
    dev: BlkQueue,
    io: Engine,
    _file: Option<TempFile>,
}

thread_local! {
    /// The ring the rigs of this test thread use (see [`on_both_rings`]).
    static RING: Cell<RingKind> = const { Cell::new(RingKind::Split) };
}

/// Run a test body on the split ring, then on the packed ring: the pipeline above the
/// ring must not care which one it holds.
fn on_both_rings(body: impl Fn()) {
    for ring in [RingKind::Split, RingKind::Packed] {
        RING.with(|r| r.set(ring));
        eprintln!("-- {ring:?} ring");
        body();
    }
}

struct TempFile(PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp_path(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("vblk-pipeline-{}-{tag}-{n}.img", std::process::id()))
}

fn rig_with(disk: Disk, file: Option<TempFile>, readonly: bool, engine: EngineKind) -> Rig {
    rig_full(disk, file, readonly, engine, true)
}

fn rig_full(disk: Disk, file: Option<TempFile>, readonly: bool, engine: EngineKind, merge: bool) -> Rig {
    rig_in(guest_memory(&[MEM]), disk, file, readonly, engine, merge)
}

/// Guest memory of regions of these sizes, each its own memfd, adjacent in guest-physical
/// space (as boot RAM and hot-plugged DIMMs are) and far apart in the frontend's.
fn guest_memory(sizes: &[u64]) -> Arc<GuestMemory> {
    let mut gpa = 0;
    let regions: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let user_addr = 0x7000_0000_0000 + ((i as u64) << 36);
            let spec = RegionSpec { guest_phys_addr: gpa, size, user_addr, mmap_offset: 0 };
            gpa += size;
            (spec, memfd("guest", size).unwrap())
        })
        .collect();
    Arc::new(GuestMemory::from_files(&regions).unwrap())
}

fn rig_in(
    mem: Arc<GuestMemory>,
    disk: Disk,
    file: Option<TempFile>,
    readonly: bool,
    engine: EngineKind,
    merge: bool,
) -> Rig {
    let ring = RING.with(Cell::get);
    // For a packed ring: the descriptor ring, the driver's and the device's event structures.
    let addrs = RingAddrs { desc: RINGS, avail: RINGS + 16 * QSIZE as u64, used: RINGS + 0x2000 };
    let feats = RingFeatures { event_idx: true, indirect: true };
    let drv = DriverRing::new(ring, mem.clone(), QSIZE, addrs, feats).unwrap();
    let q: Ring = match ring {
        RingKind::Split => SplitQueue::new(mem.clone(), QSIZE, addrs, AddrSpace::GuestPhysical, feats).unwrap().into(),
        RingKind::Packed => {
            PackedQueue::new(mem.clone(), QSIZE, addrs, AddrSpace::GuestPhysical, feats).unwrap().into()
        }
    };
    let disk = Arc::new(disk);
    let mut params = DeviceParams::new(disk.size(), readonly, 512, "vblk-test-serial", 1, QSIZE as u16);
    params.merge = merge;
    let params = Arc::new(params);
    let io = Engine::new(disk, engine, QSIZE).unwrap();
    Rig { mem, drv, dev: BlkQueue::new(q, params, 0), io, _file: file }
}

fn file_rig(readonly: bool, engine: EngineKind) -> Rig {
    let path = temp_path("disk");
    let opts = DiskOptions { readonly: false, direct: true, create_size: Some(DISK) };
    let disk = Disk::open(&path, &opts).unwrap();
    if readonly {
        drop(disk);
        let opts = DiskOptions { readonly: true, direct: true, create_size: None };
        return rig_with(Disk::open(&path, &opts).unwrap(), Some(TempFile(path)), true, engine);
    }
    rig_with(disk, Some(TempFile(path)), false, engine)
}

impl Rig {
    fn header(&self, slot: u64, t: u32, sector: u64) -> Buffer {
        let h = OutHdr { req_type: t, ioprio: 0, sector };
        self.mem.write_at(HDR + slot * 16, &h.to_bytes()).unwrap();
        Buffer { addr: HDR + slot * 16, len: 16, write: false }
    }

    fn status(&self, slot: u64) -> Buffer {
        self.mem.write_at(STATUS + slot, &[0xee]).unwrap();
        Buffer { addr: STATUS + slot, len: 1, write: true }
    }

    fn status_byte(&self, slot: u64) -> u8 {
        let mut b = [0u8];
        self.mem.read_at(STATUS + slot, &mut b).unwrap();
        b[0]
    }

    /// Submit one request and run the device until it completes: (used len, status byte).
    fn run(&mut self, bufs: &[Buffer], slot: u64) -> (u32, u8) {
        let head = self.drv.add(bufs).unwrap();
        self.drv.publish();
        self.dev.process_available(&mut self.io).unwrap();
        self.complete_all();
        let (h, len) = self.drv.pop_used().unwrap().expect("request completed");
        assert_eq!(h, head);
        (len, self.status_byte(slot))
    }

    /// Run the pipeline until a pass takes nothing (each pass takes at most the engine's
    /// batch limit); how many requests it took in all.
    fn process_until_empty(&mut self) -> usize {
        let mut total = 0;
        loop {
            match self.dev.process_available(&mut self.io).unwrap() {
                0 => return total,
                n => total += n,
            }
        }
    }

    /// Wait for every backend I/O in flight, complete its requests and publish them.
    fn complete_all(&mut self) {
        let mut done = Vec::new();
        while self.io.in_flight() > 0 {
            self.io.wait(&mut done).unwrap();
            done.drain(..).for_each(|c| self.dev.complete(c));
        }
        self.dev.publish();
    }

    /// Take every used entry the device published; how many there were.
    fn pop_all_used(&mut self) -> u64 {
        let mut count = 0;
        while self.drv.pop_used().unwrap().is_some() {
            count += 1;
        }
        count
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> u8 {
        self.mem.write_at(DATA, data).unwrap();
        let bufs = [
            self.header(0, req_type::OUT, sector),
            Buffer { addr: DATA, len: data.len() as u32, write: false },
            self.status(0),
        ];
        self.run(&bufs, 0).1
    }

    fn read(&mut self, sector: u64, len: u32) -> (u8, Vec<u8>) {
        self.mem.write_at(DATA, &vec![0x5a; len as usize]).unwrap();
        let bufs = [self.header(0, req_type::IN, sector), Buffer { addr: DATA, len, write: true }, self.status(0)];
        let (used, st) = self.run(&bufs, 0);
        assert_eq!(used, if st == OK { len + 1 } else { 0 }, "used length: data + status, or nothing");
        let mut out = vec![0u8; len as usize];
        self.mem.read_at(DATA, &mut out).unwrap();
        (st, out)
    }

    fn discard_like(&mut self, t: u32, segs: &[DiscardSegment]) -> u8 {
        let bytes: Vec<u8> = segs.iter().flat_map(|s| s.to_bytes()).collect();
        self.mem.write_at(DATA + 0x10_0000, &bytes).unwrap();
        let bufs = [
            self.header(0, t, 0),
            Buffer { addr: DATA + 0x10_0000, len: bytes.len() as u32, write: false },
            self.status(0),
        ];
        self.run(&bufs, 0).1
    }
}

const OK: u8 = Status::Ok as u8;
const IOERR: u8 = Status::IoErr as u8;
const UNSUPP: u8 = Status::Unsupp as u8;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn writes_read_back_through_both_engines() {
    on_both_rings(|| {
        for engine in [EngineKind::Uring, EngineKind::Sync] {
            let mut r = file_rig(false, engine);
            let data = pattern(64 * 1024, 7);
            assert_eq!(r.write(8, &data), OK);
            let (st, back) = r.read(8, data.len() as u32);
            assert_eq!(st, OK);
            assert_eq!(back, data, "{engine:?}");
            // Flush succeeds.
            let bufs = [r.header(0, req_type::FLUSH, 0), r.status(0)];
            assert_eq!(r.run(&bufs, 0).1, OK);
        }
    });
}

#[test]
fn a_request_split_over_many_descriptors_and_an_indirect_table_works() {
    on_both_rings(|| {
        let mut r = file_rig(false, EngineKind::Uring);
        let data = pattern(8 * 512, 3);
        r.mem.write_at(DATA, &data).unwrap();
        // Header in two pieces, data in 8 segments, via an indirect table.
        let h = OutHdr { req_type: req_type::OUT, ioprio: 0, sector: 100 }.to_bytes();
        r.mem.write_at(HDR, &h[..5]).unwrap();
        r.mem.write_at(HDR + 0x100, &h[5..]).unwrap();
        let mut bufs =
            vec![Buffer { addr: HDR, len: 5, write: false }, Buffer { addr: HDR + 0x100, len: 11, write: false }];
        bufs.extend((0..8).map(|i| Buffer { addr: DATA + i * 512, len: 512, write: false }));
        bufs.push(r.status(0));
        let head = r.drv.add_indirect(&bufs, 0x50_0000).unwrap();
        r.drv.publish();
        r.dev.process_available(&mut r.io).unwrap();
        r.complete_all();
        assert_eq!(r.drv.pop_used().unwrap().unwrap().0, head);
        assert_eq!(r.status_byte(0), OK);
        assert_eq!(r.read(100, data.len() as u32).1, data);
    });
}

#[test]
fn bad_ranges_lengths_and_types_get_the_right_status() {
    on_both_rings(|| {
        let mut r = file_rig(false, EngineKind::Uring);
        let sectors = DISK / 512;
        assert_eq!(r.write(sectors - 1, &[1u8; 1024]), IOERR, "crosses the end");
        assert_eq!(r.write(sectors, &[1u8; 512]), IOERR, "starts at the end");
        assert_eq!(r.write(u64::MAX / 256, &[1u8; 512]), IOERR, "sector * 512 overflows");
        assert_eq!(r.write(u64::MAX, &[1u8; 512]), IOERR);
        assert_eq!(r.write(0, &[1u8; 100]), IOERR, "not a multiple of 512");
        assert_eq!(r.read(sectors - 1, 1024).0, IOERR);
        for t in [req_type::SCSI_CMD, 3, 0xff, req_type::OUT | req_type::BARRIER, req_type::BARRIER] {
            let bufs = [r.header(0, t, 0), r.status(0)];
            assert_eq!(r.run(&bufs, 0).1, UNSUPP, "type {t:#x}");
        }
        // The disk is untouched by all of that.
        assert_eq!(r.read(sectors - 2, 1024).1, vec![0u8; 1024]);
    });
}

#[test]
fn get_id_never_writes_past_the_buffer() {
    on_both_rings(|| {
        let mut r = file_rig(false, EngineKind::Sync);
        r.mem.write_at(DATA, &[0xaa; 32]).unwrap();
        let bufs = [r.header(0, req_type::GET_ID, 0), Buffer { addr: DATA, len: 4, write: true }, r.status(0)];
        assert_eq!(r.run(&bufs, 0), (5, OK));
        let mut b = [0u8; 8];
        r.mem.read_at(DATA, &mut b).unwrap();
        assert_eq!(&b, b"vblk\xaa\xaa\xaa\xaa");
        let bufs = [r.header(0, req_type::GET_ID, 0), Buffer { addr: DATA, len: 32, write: true }, r.status(0)];
        assert_eq!(r.run(&bufs, 0).1, OK);
        let mut b = [0u8; 21];
        r.mem.read_at(DATA, &mut b).unwrap();
        assert_eq!(&b[..20], b"vblk-test-serial\0\0\0\0");
        assert_eq!(b[20], 0xaa, "at most 20 bytes");
    });
}

#[test]
fn discard_and_write_zeroes_zero_the_range_and_check_segments() {
    on_both_rings(|| {
        let mut r = file_rig(false, EngineKind::Uring);
        let seg = |sector, num_sectors, flags| DiscardSegment { sector, num_sectors, flags };
        for (t, flags) in [(req_type::DISCARD, 0), (req_type::WRITE_ZEROES, 0), (req_type::WRITE_ZEROES, 1)] {
            assert_eq!(r.write(16, &pattern(8192, 9)), OK);
            assert_eq!(r.discard_like(t, &[seg(16, 8, flags)]), OK);
            let (st, back) = r.read(16, 8192);
            assert_eq!(st, OK);
            assert_eq!(&back[..4096], &[0u8; 4096][..], "type {t} flags {flags}");
            assert_eq!(&back[4096..], &pattern(8192, 9)[4096..], "outside the range");
        }
        assert_eq!(r.discard_like(req_type::DISCARD, &[seg(0, 8, 0), seg(8, 8, 0)]), UNSUPP, "two segments");
        assert_eq!(
            r.discard_like(req_type::DISCARD, &[seg(0, 8, DiscardSegment::FLAG_UNMAP)]),
            UNSUPP,
            "UNMAP on discard"
        );
        assert_eq!(r.discard_like(req_type::WRITE_ZEROES, &[seg(0, 8, 2)]), UNSUPP, "unknown flag");
        assert_eq!(r.discard_like(req_type::DISCARD, &[seg(0, u32::MAX, 0)]), IOERR, "over the limit");
        assert_eq!(r.discard_like(req_type::WRITE_ZEROES, &[seg(DISK / 512 - 4, 8, 0)]), IOERR, "outside the disk");
        // A segment list that is not a multiple of 16 bytes.
        r.mem.write_at(DATA, &[0u8; 20]).unwrap();
        let bufs = [r.header(0, req_type::DISCARD, 0), Buffer { addr: DATA, len: 20, write: false }, r.status(0)];
        assert_eq!(r.run(&bufs, 0).1, IOERR);
    });
}

#[test]
fn read_only_exports_refuse_every_write() {
    on_both_rings(|| {
        let mut r = file_rig(true, EngineKind::Uring);
        assert_eq!(r.write(0, &[1u8; 512]), IOERR);
        let seg = DiscardSegment { sector: 0, num_sectors: 8, flags: 0 };
        assert_eq!(r.discard_like(req_type::DISCARD, &[seg]), IOERR);
        assert_eq!(r.discard_like(req_type::WRITE_ZEROES, &[seg]), IOERR);
        assert_eq!(r.read(0, 512), (OK, vec![0u8; 512]));
    });
}

/// A chain with a status byte is answered whatever else is wrong with it (a guest reads a
/// stale status byte as success): IOERR, used length 1 when the status is all it can write.
#[test]
fn a_missing_header_or_a_refused_chain_gets_ioerr() {
    on_both_rings(|| {
        let mut r = file_rig(false, EngineKind::Uring);
        // A header shorter than 16 bytes.
        let bufs = [Buffer { addr: HDR, len: 8, write: false }, r.status(1)];
        assert_eq!(r.run(&bufs, 1), (1, IOERR));
        // Only a status byte: no header.
        let bufs = [r.status(2)];
        assert_eq!(r.run(&bufs, 2), (1, IOERR));
        // A data buffer outside guest memory: the chain is refused, its status still written.
        let bufs = [r.header(3, req_type::IN, 0), Buffer { addr: MEM - 512, len: 1024, write: true }, r.status(3)];
        assert_eq!(r.run(&bufs, 3), (0, IOERR));
        let bufs = [r.header(4, req_type::OUT, 0), Buffer { addr: MEM, len: 512, write: false }, r.status(4)];
        assert_eq!(r.run(&bufs, 4), (1, IOERR));
        // The queue still works, and none of that reached the disk.
        assert_eq!(r.read(0, 512).1, vec![0u8; 512]);
        assert_eq!(r.write(0, &[3u8; 512]), OK);
        assert_eq!(r.read(0, 512).1, vec![3u8; 512]);
    });
}

/// A chain with nowhere to put a status cannot be completed without lying: the queue breaks.
#[test]
fn a_chain_without_a_status_byte_breaks_the_queue() {
    on_both_rings(|| {
        for case in 0..3 {
            let mut r = file_rig(false, EngineKind::Uring);
            let bufs = match case {
                // No writable buffer at all.
                0 => vec![r.header(0, req_type::OUT, 0), Buffer { addr: DATA, len: 512, write: false }],
                // The last descriptor is device-readable.
                1 => {
                    vec![r.header(0, req_type::IN, 0), Buffer { addr: DATA, len: 512, write: true }, r.header(1, 0, 0)]
                }
                // The last descriptor (the status) lies outside guest memory.
                _ => vec![r.header(0, req_type::IN, 0), Buffer { addr: MEM, len: 1, write: true }],
            };
            r.drv.add(&bufs).unwrap();
            r.drv.publish();
            let e = r.dev.process_available(&mut r.io).unwrap_err();
            assert!(matches!(e, vblk_queue::QueueError::NoStatus { head: 0, .. }), "case {case}: {e}");
            assert_eq!(r.dev.queue().broken(), Some(&e));
            r.dev.publish();
            assert_eq!(r.drv.pop_used().unwrap(), None, "case {case}: nothing completed silently");
        }
    });
}

/// §2.7.8.2: the used length is what the device wrote from the start of the writable part.
#[test]
fn the_used_length_counts_only_bytes_written() {
    on_both_rings(|| {
        let mut r = file_rig(false, EngineKind::Uring);
        let sectors = DISK / 512;
        let read = |r: &mut Rig, sector: u64, len: u32| {
            let bufs = [r.header(0, req_type::IN, sector), Buffer { addr: DATA, len, write: true }, r.status(0)];
            r.run(&bufs, 0)
        };
        assert_eq!(read(&mut r, 0, 4096), (4097, OK), "data + status");
        assert_eq!(read(&mut r, sectors - 1, 1024), (0, IOERR), "a failed read wrote no data");
        let bufs = [r.header(0, req_type::FLUSH, 0), r.status(0)];
        assert_eq!(r.run(&bufs, 0), (1, OK));
        assert_eq!(r.write(0, &[1u8; 512]), OK);
        for (room, want) in [(4, 5), (20, 21), (32, 20)] {
            let bufs = [r.header(0, req_type::GET_ID, 0), Buffer { addr: DATA, len: room, write: true }, r.status(0)];
            assert_eq!(r.run(&bufs, 0), (want, OK), "GET_ID into {room} bytes");
        }
        // A short read filled only the first half of its buffer.
        let path = temp_path("short");
        let opts = DiskOptions { readonly: false, direct: true, create_size: Some(DISK) };
        let disk = Disk::open(&path, &opts).unwrap().with_faults("read:short".parse().unwrap());
        let mut r = rig_with(disk, Some(TempFile(path)), false, EngineKind::Uring);
        assert_eq!(read(&mut r, 0, 4096), (2048, IOERR));
    });
}

/// Hot-plugged memory arrives as a region adjacent to the others; Linux merges physically
/// contiguous pages into one descriptor, so a buffer may cross the boundary.
#[test]
fn buffers_crossing_adjacent_memory_regions_are_served() {
    on_both_rings(|| {
        let half = MEM / 2;
        for engine in [EngineKind::Uring, EngineKind::Sync] {
            let path = temp_path("regions");
            let opts = DiskOptions { readonly: false, direct: true, create_size: Some(DISK) };
            let disk = Disk::open(&path, &opts).unwrap();
            let mut r = rig_in(guest_memory(&[half, half]), disk, Some(TempFile(path)), false, engine, true);
            let data = pattern(8192, 5);
            let at = half - 4096 - 512;
            r.mem.write_at(at, &data).unwrap();
            let bufs = [r.header(0, req_type::OUT, 8), Buffer { addr: at, len: 8192, write: false }, r.status(0)];
            assert_eq!(r.run(&bufs, 0), (1, OK));
            r.mem.write_at(at, &[0u8; 8192]).unwrap();
            let bufs = [r.header(0, req_type::IN, 8), Buffer { addr: at, len: 8192, write: true }, r.status(0)];
            assert_eq!(r.run(&bufs, 0), (8193, OK));
            let mut back = vec![0u8; 8192];
            r.mem.read_at(at, &mut back).unwrap();
            assert_eq!(back, data, "{engine:?}");
        }
    });
}

#[test]
fn many_requests_in_flight_complete_out_of_order_safely() {
    on_both_rings(|| {
        for merge in [true, false] {
            let path = temp_path("merge");
            let opts = DiskOptions { readonly: false, direct: true, create_size: Some(DISK) };
            let disk = Disk::open(&path, &opts).unwrap();
            let mut r = rig_full(disk, Some(TempFile(path)), false, EngineKind::Uring, merge);
            many_requests(&mut r);
            // 20 contiguous writes (and a gap-free run) merge into one backend I/O.
            assert_eq!(r.dev.metrics().snapshot().merged, if merge { 19 } else { 0 });
        }
    });
}

fn many_requests(r: &mut Rig) {
    let n = 20u64;
    for i in 0..n {
        r.mem.write_at(DATA + i * 4096, &pattern(4096, i as u8)).unwrap();
        let bufs =
            [r.header(i, req_type::OUT, i * 8), Buffer { addr: DATA + i * 4096, len: 4096, write: false }, r.status(i)];
        r.drv.add(&bufs).unwrap();
    }
    r.drv.publish();
    assert!(r.drv.needs_kick());
    assert_eq!(r.process_until_empty() as u64, n);
    assert_eq!(r.dev.in_flight() as u64, n);
    let before = r.dev.metrics().snapshot();
    assert_eq!(before.in_flight(), n, "the metrics see the same requests in flight");
    r.complete_all();
    assert_eq!(r.pop_all_used(), n);
    for i in 0..n {
        assert_eq!(r.status_byte(i), OK);
        assert_eq!(r.read(i * 8, 4096).1, pattern(4096, i as u8));
    }
}

#[test]
fn the_null_backend_completes_everything() {
    on_both_rings(|| {
        let mut r = rig_with(Disk::null(DISK), None, false, EngineKind::Auto);
        assert_eq!(r.write(0, &[1u8; 4096]), OK);
        assert_eq!(r.read(0, 4096).0, OK);
    });
}

/// Found by the chain_request fuzzer: a valid read followed, in the same batch, by a head
/// out of range. The ring breaks, but the read popped before it must still be submitted and
/// completed (it used to stay staged forever, its memory never released).
#[test]
fn requests_popped_before_a_ring_breaks_still_complete() {
    on_both_rings(|| {
        let mut r = file_rig(false, EngineKind::Uring);
        let bufs = [r.header(0, req_type::IN, 0), Buffer { addr: DATA, len: 4096, write: true }, r.status(0)];
        let head = r.drv.add(&bufs).unwrap();
        r.drv.publish();
        // The driver then publishes a head that does not exist: avail ring entry 1 (idx 2),
        // or, packed, the slot after the chain with a buffer id out of range.
        if RING.with(Cell::get) == RingKind::Split {
            let avail = RINGS + 16 * QSIZE as u64;
            r.mem.write_at(avail + 4 + 2, &(QSIZE as u16 + 5).to_le_bytes()).unwrap();
            r.mem.write_at(avail + 2, &2u16.to_le_bytes()).unwrap();
        } else {
            let d = PackedDescriptor {
                addr: STATUS,
                len: 1,
                id: QSIZE as u16 + 5,
                flags: vblk_queue::layout::DESC_F_WRITE | vblk_queue::layout::packed_avail_flags(true),
            };
            r.mem.write_at(RINGS + 16 * bufs.len() as u64, &d.to_bytes()).unwrap();
        }
        assert!(r.dev.process_available(&mut r.io).is_err(), "the ring is broken");
        r.complete_all();
        assert_eq!(r.dev.in_flight(), 0, "nothing stranded");
        assert_eq!(r.drv.pop_used().unwrap().map(|(h, _)| h), Some(head));
        assert_eq!(r.status_byte(0), OK);
    });
}

/// The queue's metrics count every request once, when it finishes, by its header's
/// operation (even when it fails its checks), with the bytes of the successful ones and
/// one latency sample each; refused chains are counted apart.
#[test]
fn metrics_count_each_request_once_by_operation_status_and_bytes() {
    on_both_rings(|| {
        let mut r = file_rig(false, EngineKind::Uring);
        let seg = |sector, num_sectors, flags| DiscardSegment { sector, num_sectors, flags };
        assert_eq!(r.write(8, &pattern(8192, 1)), OK);
        assert_eq!(r.read(8, 4096).0, OK);
        assert_eq!(r.read(DISK / 512 - 1, 1024).0, IOERR, "a read past the end");
        let bufs = [r.header(0, req_type::FLUSH, 0), r.status(0)];
        assert_eq!(r.run(&bufs, 0).1, OK);
        let bufs = [r.header(0, req_type::GET_ID, 0), Buffer { addr: DATA, len: 32, write: true }, r.status(0)];
        assert_eq!(r.run(&bufs, 0).1, OK);
        assert_eq!(r.discard_like(req_type::DISCARD, &[seg(16, 8, 0)]), OK);
        assert_eq!(r.discard_like(req_type::DISCARD, &[seg(0, 8, DiscardSegment::FLAG_UNMAP)]), UNSUPP);
        assert_eq!(r.discard_like(req_type::WRITE_ZEROES, &[seg(16, 16, 1)]), OK);
        let bufs = [r.header(0, 0xff, 0), r.status(0)];
        assert_eq!(r.run(&bufs, 0).1, UNSUPP);
        // A header too short to have a type; a chain refused by the ring.
        let bufs = [Buffer { addr: HDR, len: 8, write: false }, r.status(1)];
        assert_eq!(r.run(&bufs, 1), (1, IOERR));
        let bufs = [r.header(3, req_type::IN, 0), Buffer { addr: MEM - 512, len: 1024, write: true }, r.status(3)];
        assert_eq!(r.run(&bufs, 3), (0, IOERR));

        let s = r.dev.metrics().snapshot();
        let by_op = |f: fn(&vblk_metrics::QueueSnapshot, Op) -> u64| Op::ALL.map(|op| (op.label(), f(&s, op)));
        assert_eq!(
            by_op(vblk_metrics::QueueSnapshot::requests),
            [("read", 2), ("write", 1), ("flush", 1), ("discard", 2), ("write-zeroes", 1), ("get-id", 1), ("other", 2)]
        );
        assert_eq!(
            by_op(vblk_metrics::QueueSnapshot::bytes),
            [
                ("read", 4096),
                ("write", 8192),
                ("flush", 0),
                ("discard", 4096),
                ("write-zeroes", 8192),
                ("get-id", 20),
                ("other", 0)
            ]
        );
        assert_eq!((s.errors(ErrorStatus::IoErr), s.errors(ErrorStatus::Unsupp)), (2, 2));
        assert_eq!((s.requests_total(), s.started, s.in_flight()), (10, 10, 0));
        assert_eq!(s.latency_count(), s.requests_total(), "one latency sample per request");
        assert_eq!((s.refused, s.merged, s.throttled_ns), (1, 0, 0));
    });
}

/// QoS: with a limit, the queue pops only what its throttle admits and leaves the rest in
/// the ring, saying until when; contiguous writes admitted together still merge into one
/// backend I/O; asking early changes nothing; lifting the limit lets the rest through at
/// once, and the time the ring was held back is counted (queue metrics and throttle).
#[test]
fn a_throttled_queue_pops_only_what_is_admitted_and_still_merges() {
    on_both_rings(|| {
        let mut r = rig_with(Disk::null(DISK), None, false, EngineKind::Auto);
        // 40 KiB/s with a 1 s burst: 4 KiB writes cost 100 ms each; admitted while the
        // debt is at most 1 s: eleven (debt 0, 0.1 s, ..., 1 s), then a wait of 0.1 s.
        let t = Arc::new(Throttle::new(Limits { iops: None, bps: Some(40960), burst_ms: 1000 }));
        r.dev.set_throttle(Arc::clone(&t));
        let n = 20u64;
        for i in 0..n {
            let bufs = [
                r.header(i, req_type::OUT, i * 8),
                Buffer { addr: DATA + i * 4096, len: 4096, write: false },
                r.status(i),
            ];
            r.drv.add(&bufs).unwrap();
        }
        r.drv.publish();
        // The null engine takes at most INLINE_BATCH requests a batch: merges happen within
        // a batch, so `k` requests in batches merge into ceil(k / INLINE_BATCH) I/Os.
        let batches = |k: usize| k.div_ceil(INLINE_BATCH);
        let before = now_ns();
        assert_eq!(r.process_until_empty(), 11);
        let until = r.dev.throttled_until().expect("the rest is held back");
        assert!(until >= before + 100_000_000 && until <= now_ns() + 102_000_000, "{until} vs {before}");
        assert_eq!(
            r.dev.metrics().snapshot().merged,
            (11 - batches(11)) as u64,
            "the eleven admitted writes merge within their batches"
        );
        assert_eq!(r.dev.process_available(&mut r.io).unwrap(), 0, "asked again early: still held");
        r.complete_all();
        assert_eq!(r.pop_all_used(), 11);

        t.set_limits(Limits::UNLIMITED);
        assert_eq!(r.process_until_empty(), 9);
        assert_eq!(r.dev.throttled_until(), None);
        r.complete_all();
        assert_eq!(11 + r.pop_all_used(), n, "the nine held back complete too");
        (0..n).for_each(|i| assert_eq!(r.status_byte(i), OK));
        let s = r.dev.metrics().snapshot();
        assert_eq!(s.merged, (20 - batches(11) - batches(9)) as u64);
        assert!(s.throttled_ns > 0);
        assert_eq!(s.throttled_ns, t.throttled_ns());
    });
}
