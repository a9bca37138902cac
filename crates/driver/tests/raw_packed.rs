//! The raw packed-ring API (`raw::packed`, feature `raw`) and the raw frontend's packed
//! negotiation (`raw::message`) against vblk's device engine in this process:
//! what the hostile suites (`crates/vblk/tests/hostile_packed.rs`) build on.
#![cfg(feature = "raw")]

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vblk_backend::{Disk, DiskOptions, EngineKind};
use vblk_blk::DeviceParams;
use vblk_driver::raw::message::{
    eventfd, mem_table, packed_vring_addr, packed_vring_base, u64_payload, vring_state, FrontendReq as Req, RawFrontend,
};
use vblk_driver::raw::packed::{PackedBase, PackedDescriptor, RawPackedQueue, RingPos};
use vblk_driver::raw::packed::{DESC_F_WRITE, EVENT_FLAG_DESC};
use vblk_driver::raw::ring::{Buffer, UsedElem};
use vblk_driver::{loopback, DriverError, LoopbackConfig, Options, RingChoice, RingKind};
use vblk_queue::layout::packed_is_used;
use vblk_vhost_user::{serve_stream, DataPlaneOptions, VblkDevice};
use vblk_virtio::blk::{req_type, OutHdr};
use vblk_virtio::features as vf;
use vblk_virtio::memory::memfd;
use vblk_virtio::{GuestMemory, RegionSpec};

const T: Duration = Duration::from_secs(10);
const SERIAL: &str = "raw-packed";

fn temp_disk(size: u64) -> (Disk, std::path::PathBuf) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!("vblk-raw-packed-{}-{n}.img", std::process::id()));
    let _ = std::fs::remove_file(&p);
    (Disk::open(&p, &DiskOptions { readonly: false, direct: false, create_size: Some(size) }).unwrap(), p)
}

/// A GET_ID request in id `id`'s slot: header, 20 writable bytes, status.
fn get_id(q: &RawPackedQueue, id: u16) -> [Buffer; 3] {
    let slot = q.slot(id);
    q.write_mem(slot, &OutHdr { req_type: req_type::GET_ID, ioprio: 0, sector: 0 }.to_bytes()).unwrap();
    q.write_mem(slot + 16, &[0xee]).unwrap();
    q.write_mem(slot + 32, &[0u8; 20]).unwrap();
    [
        Buffer { addr: slot, len: 16, write: false },
        Buffer { addr: slot + 32, len: 20, write: true },
        Buffer { addr: slot + 16, len: 1, write: true },
    ]
}

fn read_byte(q: &RawPackedQueue, gpa: u64) -> u8 {
    let mut b = [0u8];
    q.read_mem(gpa, &mut b).unwrap();
    b[0]
}

#[test]
fn a_raw_packed_queue_drives_chains_across_laps_and_restarts_anywhere() {
    // A ring of 5 slots (not a power of two): chains of 1, 2 and 3 slots cross its end.
    let (disk, path) = temp_disk(1 << 20);
    let cfg = LoopbackConfig { num_queues: 1, serial: SERIAL.into(), ..Default::default() };
    let opts =
        Options { queue_size: 5, buffer_memory: 1 << 20, ring: RingChoice::Packed, timeout: T, ..Default::default() };
    let (mut dev, _server) = loopback(disk, &cfg, &opts).unwrap();
    assert_eq!(dev.ring_kind(), RingKind::Packed);
    let handle = dev.take_queues().remove(0);
    let mut q = RawPackedQueue::new(&dev, handle).unwrap();
    assert_eq!(q.size(), 5);
    assert!(q.features().event_idx && q.features().indirect);
    // The device's GET_ID at connect took slot 0 (one indirect slot).
    assert_eq!((q.avail_pos(), q.used_pos()), (RingPos { idx: 1, wrap: true }, RingPos { idx: 1, wrap: true }));
    let run = |q: &mut RawPackedQueue, bufs: &[Buffer], id: u16| {
        q.add_chain(bufs, id).unwrap();
        q.kick().unwrap();
        q.wait_used(1, T).unwrap()[0]
    };
    let mut pos = q.avail_pos();
    for n in 0..20u16 {
        let bufs = get_id(&q, n % 5);
        let chain: Vec<Buffer> = match n % 3 {
            // The status byte alone (no header: IOERR), the status after the header, the
            // whole request.
            0 => vec![bufs[2]],
            1 => vec![bufs[0], bufs[2]],
            _ => bufs.to_vec(),
        };
        let slots = chain.len() as u16;
        // The slots' flags: AVAIL/USED of each one's lap, NEXT on all but the last.
        let d = q.chain_descs(&chain, n % 5);
        let mut p = pos;
        for (k, desc) in d.iter().enumerate() {
            assert_eq!(desc.flags & 0x8080, RawPackedQueue::avail_flags(p.wrap), "chain {n} slot {k}");
            p = p.advance(1, 5);
        }
        let used = run(&mut q, &chain, n % 5);
        let (len, status) = match n % 3 {
            0 => (1, 1),
            1 => (1, 0),
            _ => (21, 0),
        };
        assert_eq!(used, UsedElem { id: (n % 5) as u32, len }, "chain {n}");
        assert_eq!(read_byte(&q, bufs[2].addr), status, "chain {n}");
        // The used descriptor sits in the chain's first slot, marked for its lap.
        let slot = q.read_slot(pos.idx).unwrap();
        assert!(packed_is_used(slot.flags, pos.wrap), "chain {n}: {slot:?}");
        pos = pos.advance(slots, 5);
        assert_eq!((q.avail_pos(), q.used_pos()), (pos, pos));
        // Waiting for kicks again, the device asks for one at its avail position (EVENT_IDX).
        let deadline = Instant::now() + T;
        while q.device_event() != (pos.encode(), EVENT_FLAG_DESC) {
            assert!(Instant::now() < deadline, "device event {:?}, want DESC at {pos:?}", q.device_event());
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // 39 slots from slot 1: eight times past the end of the ring.
    assert_eq!(pos, RingPos { idx: 0, wrap: true });
    assert_eq!(q.in_flight(), 0);

    // Restart just before the end of the ring in the lap with wrap counter 0.
    let base = PackedBase { avail: RingPos { idx: 4, wrap: false }, used: RingPos { idx: 4, wrap: false } };
    q.restart_at(base).unwrap();
    let bufs = get_id(&q, 2);
    assert_eq!(run(&mut q, &bufs, 2), UsedElem { id: 2, len: 21 });
    assert_eq!(q.avail_pos(), RingPos { idx: 2, wrap: true });
    let mut id = [0u8; 20];
    q.read_mem(bufs[1].addr, &mut id).unwrap();
    assert_eq!(&id[..SERIAL.len()], SERIAL.as_bytes());

    // A used descriptor naming an id the queue never made available is reported.
    let at = q.used_pos();
    q.write_slot(at.idx, PackedDescriptor { addr: 0, len: 0, id: 4, flags: RawPackedQueue::used_flags(at.wrap) })
        .unwrap();
    assert!(matches!(q.pop_used(), Err(DriverError::Device(vblk_queue::DriverError::BogusUsed(4)))));
    q.write_slot(at.idx, PackedDescriptor::default()).unwrap();

    // A base outside the ring: error reply, the ring does not start, its err eventfd fires.
    let bad = PackedBase { avail: RingPos { idx: 5, wrap: true }, used: RingPos { idx: 0, wrap: true } };
    assert!(matches!(q.set_vring_base(bad.encode()), Err(DriverError::Protocol("SET_VRING_BASE", _))));
    assert!(q.wait_err(T).unwrap(), "err eventfd");
    drop((q, dev));
    let _ = std::fs::remove_file(path);
}

/// One 1 MiB region at guest address 0 for a frontend built from raw messages.
const MIB: u64 = 1 << 20;
const UVA: u64 = 0x7f00_0000_0000;
const RING: u64 = 0x1000;
const DRIVER_EVENT: u64 = 0x2000;
const DEVICE_EVENT: u64 = 0x2004;
const REQ: u64 = 0x3000;

fn ack(fe: &RawFrontend, code: Req, payload: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) -> Option<u64> {
    fe.call(code, payload, fds, T).unwrap().ack()
}

#[test]
fn a_raw_frontend_negotiates_and_sets_up_a_packed_ring() {
    let (disk, path) = temp_disk(1 << 20);
    let disk = Arc::new(disk);
    let params = Arc::new(DeviceParams::new(disk.size(), false, 512, SERIAL, 1, 256));
    let opts = DataPlaneOptions { threads: 1, engine: EngineKind::Auto, poll_us: 0, throttle: Arc::default() };
    let device = Arc::new(Mutex::new(VblkDevice::new(params, disk, opts).unwrap()));
    let (ours, theirs) = UnixStream::pair().unwrap();
    let (stop_rx, stop) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        serve_stream(&device, theirs, stop_rx.as_raw_fd());
    });
    let fe = RawFrontend::from_stream(ours);
    let acked = fe.negotiate_ring(0, RingKind::Packed, T).unwrap();
    assert!(acked & vf::RING_PACKED != 0 && acked & vf::RING_EVENT_IDX != 0, "{acked:#x}");

    let file = memfd("raw-packed", MIB).unwrap();
    let spec = RegionSpec { guest_phys_addr: 0, size: MIB, user_addr: UVA, mmap_offset: 0 };
    let mem = GuestMemory::from_files(&[(spec, file.try_clone().unwrap())]).unwrap();
    assert_eq!(ack(&fe, Req::SET_MEM_TABLE, &mem_table(1, &[spec]), &[file.as_fd()]), Some(0));
    // Any size up to the limit for a packed ring, not only powers of two.
    let size = 3u16;
    assert_eq!(ack(&fe, Req::SET_VRING_NUM, &vring_state(0, size as u32), &[]), Some(0));
    let addr = packed_vring_addr(0, UVA + RING, UVA + DRIVER_EVENT, UVA + DEVICE_EVENT);
    assert_eq!(ack(&fe, Req::SET_VRING_ADDR, &addr, &[]), Some(0));
    // Start in the second lap at slot 2: the request's three slots cross the end.
    let start = RingPos { idx: 2, wrap: false };
    let base = PackedBase { avail: start, used: start };
    assert_eq!(ack(&fe, Req::SET_VRING_BASE, &packed_vring_base(0, base), &[]), Some(0));
    let (kick, call): (OwnedFd, OwnedFd) = (eventfd().unwrap(), eventfd().unwrap());
    assert_eq!(ack(&fe, Req::SET_VRING_CALL, &u64_payload(0), &[call.as_fd()]), Some(0));
    assert_eq!(ack(&fe, Req::SET_VRING_KICK, &u64_payload(0), &[kick.as_fd()]), Some(0));
    assert_eq!(ack(&fe, Req::SET_VRING_ENABLE, &vring_state(0, 1), &[]), Some(0));

    // GET_ID by hand: header, 20 bytes, status, in slots 2 (lap 0), 0 and 1 (lap 1).
    mem.write_at(REQ, &OutHdr { req_type: req_type::GET_ID, ioprio: 0, sector: 0 }.to_bytes()).unwrap();
    mem.write_at(REQ + 16, &[0xee]).unwrap();
    let bufs = [(REQ, 16, 0), (REQ + 32, 20, DESC_F_WRITE), (REQ + 16, 1, DESC_F_WRITE)];
    let mut pos = start;
    let mut head_flags = 0;
    for (k, &(a, len, w)) in bufs.iter().enumerate() {
        let next = if k + 1 < bufs.len() { 1 } else { 0 };
        let flags = RawPackedQueue::avail_flags(pos.wrap) | w | next;
        // The head slot stays unavailable (used flags of the other lap) until the rest is written.
        let hidden = RawPackedQueue::used_flags(!start.wrap);
        let d = PackedDescriptor { addr: a, len, id: 1, flags: if k == 0 { hidden } else { flags } };
        mem.write_at(RING + 16 * pos.idx as u64, &d.to_bytes()).unwrap();
        if k == 0 {
            head_flags = flags;
        }
        pos = pos.advance(1, size);
    }
    mem.write_at(RING + 16 * start.idx as u64 + 14, &head_flags.to_le_bytes()).unwrap();
    let one = 1u64.to_le_bytes();
    assert_eq!(nix_write(&kick, &one), 8);
    let deadline = Instant::now() + T;
    let used = loop {
        let mut b = [0u8; 16];
        mem.read_at(RING + 16 * start.idx as u64, &mut b).unwrap();
        let d = PackedDescriptor::from_bytes(&b);
        if packed_is_used(d.flags, start.wrap) {
            break d;
        }
        assert!(Instant::now() < deadline, "no used descriptor: {d:?}");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!((used.id, used.len), (1, 21));
    let mut id = [0u8; 21];
    mem.read_at(REQ + 16, &mut id[..1]).unwrap();
    mem.read_at(REQ + 32, &mut id[1..]).unwrap();
    assert_eq!(id[0], 0, "status OK");
    assert_eq!(&id[1..1 + SERIAL.len()], SERIAL.as_bytes());
    // GET_VRING_BASE: both positions past the request, in the packed encoding.
    let reply = fe.call(Req::GET_VRING_BASE, &vring_state(0, 0), &[], T).unwrap();
    let payload = match reply {
        vblk_driver::raw::message::Outcome::Reply(r) => r.payload,
        o => panic!("GET_VRING_BASE: {o:?}"),
    };
    let num = u32::from_le_bytes(payload[4..8].try_into().unwrap());
    assert_eq!(PackedBase::decode(num, size), Some(PackedBase { avail: pos, used: pos }), "{num:#x}");
    drop(fe);
    let _ = std::io::Write::write_all(&mut &stop, b"x");
    server.join().unwrap();
    let _ = std::fs::remove_file(path);
}

fn nix_write(fd: &OwnedFd, b: &[u8]) -> isize {
    // SAFETY: writing a valid buffer to an open eventfd.
    unsafe { libc::write(fd.as_raw_fd(), b.as_ptr().cast(), b.len()) }
}
