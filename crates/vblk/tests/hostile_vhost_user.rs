//! A hostile vhost-user frontend against a real `vblk serve` process: raw messages with bad
//! ring parameters, bad memory tables, stray fds, lying sizes, unknown codes and stalls
//! (`vblk_driver::raw::message`), and abrupt disconnects of a normal frontend.
//!
//! Every case asserts the outcome the daemon must produce — an error reply (`REPLY_ACK`
//! status 1) on a connection that keeps working, or a disconnect — then that the daemon
//! released everything the case gave it (its open fd count is back to the baseline measured
//! before any frontend connected, and no frontend memory is mapped any more), and that it
//! serves the next frontend: a normal `vblk_driver::Device` writes and reads back a block.
//!
//! Where the outcome comes from: the `vhost` crate (0.18) drops the connection for a
//! malformed message (bad header, size field or flags, unknown or undispatched request
//! code, fds on a message that takes none, wrong fd count, misaligned ring addresses) —
//! after an error reply for SET_MEM_TABLE; vblk's device answers a well-formed message with
//! bad values (ring size, ring index, addresses, regions) with an error reply, except
//! GET_VRING_BASE whose reply must carry a value: that connection is dropped.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{fd_count, memfd_mappings, pattern, rss_kib, settle, Backend, BackendConfig, BackendProcess, TempDir};
use vblk_driver::raw::message::{
    eventfd, mem_table, single_region, u64_payload, vring_addr, vring_state, FrontendReq as Req, Header, RawFrontend,
};
use vblk_driver::{Device, Op, Options};
use vblk_virtio::memory::memfd;
use vblk_virtio::RegionSpec;

/// Reply timeout for well-formed requests.
const T: Duration = Duration::from_secs(10);
/// The daemon's `--message-timeout-ms`.
const MESSAGE_TIMEOUT: Duration = Duration::from_millis(1000);
/// The daemon's `--queue-size`.
const QUEUE_SIZE: u32 = 256;
/// Frontend address of the test memory (any value works).
const UVA: u64 = 0x7f00_0000_0000;
const MIB: u64 = 1 << 20;
/// Protocol features the raw frontend asks for (besides REPLY_ACK): MQ, CONFIG,
/// CONFIGURE_MEM_SLOTS.
const PROTOCOL: u64 = (1 << 0) | (1 << 9) | (1 << 15);

/// A `vblk serve` process on a 64 MiB image, with its fd count before any frontend.
struct Daemon {
    backend: BackendProcess,
    baseline: usize,
    _dir: TempDir,
}

impl Daemon {
    fn start(tag: &str) -> Daemon {
        Self::start_with(tag, 64 * MIB)
    }

    fn start_with(tag: &str, size: u64) -> Daemon {
        let dir = TempDir::new(tag);
        let image = dir.join("disk.img");
        common::create_image(&image, size);
        let args = &["--message-timeout-ms", "1000", "--queue-size", "256"];
        let cfg = BackendConfig { readonly: false, num_queues: 2, vblk_args: args };
        let socket = dir.join("s.sock");
        let backend = BackendProcess::start(Backend::Vblk, &image, &socket, cfg, &dir.join("vblk.log")).unwrap();
        // Let it finish starting (signal pipes are set up after the socket appears).
        std::thread::sleep(Duration::from_millis(300));
        let baseline = fd_count(backend.pid());
        Daemon { backend, baseline, _dir: dir }
    }

    fn pid(&self) -> u32 {
        self.backend.pid()
    }

    fn socket(&self) -> PathBuf {
        self.backend.socket.clone()
    }

    /// A raw frontend after the usual feature negotiation (REPLY_ACK on).
    fn frontend(&self) -> RawFrontend {
        let fe = RawFrontend::connect(&self.socket()).unwrap();
        fe.negotiate(PROTOCOL, T).expect("negotiation");
        fe
    }

    /// The daemon is alive, has closed every fd and unmapped every region it was given.
    fn assert_released(&mut self, when: &str) {
        let pid = self.pid();
        let fds = settle(self.baseline, Duration::from_secs(10), || fd_count(pid));
        let maps = settle(0, Duration::from_secs(10), || memfd_mappings(pid));
        if let Err(e) = self.backend.check_alive() {
            panic!("{when}: {e}");
        }
        assert_eq!(fds, self.baseline, "{when}: open fds of vblk serve: {:?}", fd_list(pid));
        assert_eq!(maps, 0, "{when}: frontend memory still mapped");
    }

    /// After a case: everything released, and the next frontend is served.
    fn assert_recovered(&mut self, case: &str) {
        self.assert_released(case);
        let opts = Options { num_queues: 2, queue_size: 64, buffer_memory: MIB, ..Options::default() };
        let mut dev = Device::connect(&self.socket(), &opts).unwrap_or_else(|e| panic!("{case}: next frontend: {e}"));
        write_read(&mut dev, MIB, 7);
        dev.shutdown(T).unwrap();
        self.assert_released(&format!("{case}, then a normal frontend"));
    }

    /// Connect, negotiate, run `f`, and expect the daemon to drop the connection.
    fn expect_disconnect(&mut self, what: &str, f: impl FnOnce(&RawFrontend)) {
        let fe = self.frontend();
        f(&fe);
        assert!(fe.wait_closed(T).unwrap(), "{what}: the daemon kept the connection");
        drop(fe);
        self.assert_released(what);
    }
}

/// What the open fds of `pid` are, counted by kind (`socket:[…]`, `anon_inode:[eventfd]`, paths).
fn fd_list(pid: u32) -> std::collections::BTreeMap<String, usize> {
    let mut kinds = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let target = std::fs::read_link(e.path()).unwrap_or_default().to_string_lossy().into_owned();
        let kind = match target.split_once(":[") {
            Some((k, rest)) if rest.bytes().all(|b| b.is_ascii_digit() || b == b']') => format!("{k}:[…]"),
            _ => target,
        };
        *kinds.entry(kind).or_insert(0) += 1;
    }
    kinds
}

/// Write a 4 KiB pattern at `offset` on queue 0, read it back, compare.
fn write_read(dev: &mut Device, offset: u64, seed: u64) {
    let mut q = dev.take_queues().remove(0);
    let data = pattern(seed, 4096);
    let (w, r) = (q.alloc(4096).unwrap(), q.alloc(4096).unwrap());
    w.write_at(0, &data).unwrap();
    let mut done = Vec::new();
    for (op, buf) in [(Op::Write { offset }, w), (Op::Read { offset }, r)] {
        done.clear();
        q.submit(op, Some(buf), 0).unwrap();
        q.kick().unwrap();
        q.wait(&mut done, 1).unwrap();
        assert!(done[0].result.is_ok(), "{op:?}: {:?}", done[0].result);
    }
    assert!(done[0].buf.as_ref().unwrap().to_vec().unwrap() == data, "read back differs");
}

/// Send a request (NEED_REPLY) and return its REPLY_ACK status.
fn ack(fe: &RawFrontend, code: Req, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Option<u64> {
    fe.call(code, payload, fds, T).unwrap().ack()
}

fn send(fe: &RawFrontend, code: Req, payload: &[u8], fds: &[BorrowedFd<'_>]) {
    fe.send(Header::request(code, payload.len()), payload, fds).unwrap();
}

fn spec(gpa: u64, size: u64, uva: u64, off: u64) -> RegionSpec {
    RegionSpec { guest_phys_addr: gpa, size, user_addr: uva, mmap_offset: off }
}

/// One 1 MiB region at guest address 0, frontend address [`UVA`].
fn add_memory(fe: &RawFrontend) -> File {
    let mem = memfd("hostile", MIB).unwrap();
    assert_eq!(ack(fe, Req::ADD_MEM_REG, &single_region(&spec(0, MIB, UVA, 0)), &[mem.as_fd()]), Some(0));
    mem
}

/// Ring `i` of a 256-entry queue inside the memory of [`add_memory`].
fn good_addrs(i: u32) -> Vec<u8> {
    let base = UVA + u64::from(i) * 0x10000;
    vring_addr(i, base, base + 0x2000, base + 0x1000)
}

fn signalled(efd: OwnedFd) -> bool {
    let mut f = File::from(efd);
    let mut b = [0u8; 8];
    f.read_exact(&mut b).is_ok() && u64::from_le_bytes(b) > 0
}

#[test]
fn bad_ring_sizes_get_an_error_reply() {
    let mut d = Daemon::start("ring-size");
    let fe = d.frontend();
    for num in [0, 3, 6, 255, QUEUE_SIZE + 1, 2 * QUEUE_SIZE, 32768, 65536, u32::MAX] {
        assert_eq!(ack(&fe, Req::SET_VRING_NUM, &vring_state(0, num), &[]), Some(1), "VRING_NUM {num}");
    }
    assert_eq!(ack(&fe, Req::SET_VRING_NUM, &vring_state(0, QUEUE_SIZE), &[]), Some(0));
    drop(fe);
    d.assert_recovered("bad ring sizes");
}

#[test]
fn ring_addresses_outside_memory_get_an_error_reply() {
    let mut d = Daemon::start("ring-addr");
    let fe = d.frontend();
    // Checked when the address arrives after the size...
    let err = eventfd().unwrap();
    assert_eq!(ack(&fe, Req::SET_VRING_ADDR, &good_addrs(0), &[]), Some(0), "no memory yet: checked at start");
    let _mem = add_memory(&fe);
    assert_eq!(ack(&fe, Req::SET_VRING_NUM, &vring_state(0, QUEUE_SIZE), &[]), Some(0));
    let end = UVA + MIB;
    for (what, desc, used, avail) in [
        ("desc past the end", end, UVA + 0x2000, UVA + 0x1000),
        ("desc straddling the end", end - 0x800, UVA + 0x2000, UVA + 0x1000),
        ("used past the end", UVA, end + 0x1000, UVA + 0x1000),
        ("avail below the memory", UVA, UVA + 0x2000, UVA - 0x1000),
        ("everything wild", u64::MAX - 0xfff, 0x1000, 0),
    ] {
        assert_eq!(ack(&fe, Req::SET_VRING_ADDR, &vring_addr(0, desc, used, avail), &[]), Some(1), "{what}");
    }
    assert_eq!(ack(&fe, Req::SET_VRING_ADDR, &good_addrs(0), &[]), Some(0));
    // ...and when the ring starts, for an address set before the size: the KICK that
    // would start it fails and the err eventfd is signalled.
    assert_eq!(ack(&fe, Req::SET_VRING_ERR, &u64_payload(1), &[err.as_fd()]), Some(0));
    assert_eq!(ack(&fe, Req::SET_VRING_ADDR, &vring_addr(1, end, end + 0x2000, end + 0x1000), &[]), Some(0));
    assert_eq!(ack(&fe, Req::SET_VRING_NUM, &vring_state(1, QUEUE_SIZE), &[]), Some(0));
    assert_eq!(ack(&fe, Req::SET_VRING_ENABLE, &vring_state(1, 1), &[]), Some(0));
    let kick = eventfd().unwrap();
    assert_eq!(ack(&fe, Req::SET_VRING_KICK, &u64_payload(1), &[kick.as_fd()]), Some(1), "KICK of a bad ring");
    assert!(signalled(err), "the err eventfd of the refused ring was not signalled");
    // A running ring whose memory is removed cannot restart: error reply, no crash.
    let (kick0, err0) = (eventfd().unwrap(), eventfd().unwrap());
    assert_eq!(ack(&fe, Req::SET_VRING_ERR, &u64_payload(0), &[err0.as_fd()]), Some(0));
    assert_eq!(ack(&fe, Req::SET_VRING_KICK, &u64_payload(0), &[kick0.as_fd()]), Some(0));
    assert_eq!(ack(&fe, Req::SET_VRING_ENABLE, &vring_state(0, 1), &[]), Some(0));
    assert_eq!(ack(&fe, Req::REM_MEM_REG, &single_region(&spec(0, MIB, UVA, 0)), &[]), Some(1));
    assert!(signalled(err0), "the err eventfd of the ring that lost its memory was not signalled");
    drop(fe);
    d.assert_recovered("ring addresses outside memory");
}

#[test]
fn misaligned_ring_addresses_end_the_connection() {
    let mut d = Daemon::start("ring-align");
    for (what, desc, used, avail) in [
        ("desc", UVA + 8, UVA + 0x2000, UVA + 0x1000),
        ("used", UVA, UVA + 0x2002, UVA + 0x1000),
        ("avail", UVA, UVA + 0x2000, UVA + 0x1001),
    ] {
        d.expect_disconnect(what, |fe| send(fe, Req::SET_VRING_ADDR, &vring_addr(0, desc, used, avail), &[]));
    }
    d.assert_recovered("misaligned ring addresses");
}

#[test]
fn ring_indices_out_of_range_are_refused_on_every_vring_message() {
    let mut d = Daemon::start("ring-index");
    let fe = d.frontend();
    let _mem = add_memory(&fe);
    for index in [2u32, 3, 255, 256, 0x1_0000, u32::MAX] {
        for (code, payload) in [
            (Req::SET_VRING_NUM, vring_state(index, QUEUE_SIZE)),
            (Req::SET_VRING_ADDR, vring_addr(index, UVA, UVA + 0x2000, UVA + 0x1000)),
            (Req::SET_VRING_BASE, vring_state(index, 0)),
            (Req::SET_VRING_ENABLE, vring_state(index, 1)),
        ] {
            assert_eq!(ack(&fe, code, &payload, &[]), Some(1), "{code:?} on ring {index}");
        }
    }
    // The fd messages carry the index in bits 0-7 (bit 8: no fd).
    for index in [2u64, 3, 0x7f, 0xff, 0xdead_0002] {
        for code in [Req::SET_VRING_KICK, Req::SET_VRING_CALL, Req::SET_VRING_ERR] {
            let fd = eventfd().unwrap();
            assert_eq!(ack(&fe, code, &u64_payload(index), &[fd.as_fd()]), Some(1), "{code:?} on ring {index:#x}");
            assert_eq!(ack(&fe, code, &u64_payload(index | 0x100), &[]), Some(1), "{code:?} on ring {index:#x}, no fd");
        }
    }
    assert_eq!(ack(&fe, Req::SET_VRING_NUM, &vring_state(1, QUEUE_SIZE), &[]), Some(0), "ring 1 is valid");
    drop(fe);
    d.assert_released("ring indices");
    // GET_VRING_BASE must answer with a value: a bad index ends the connection.
    for index in [2u32, u32::MAX] {
        d.expect_disconnect("GET_VRING_BASE", |fe| send(fe, Req::GET_VRING_BASE, &vring_state(index, 0), &[]));
    }
    d.assert_recovered("ring indices out of range");
}

#[test]
fn overflowing_or_unmappable_memory_regions_are_refused() {
    let mut d = Daemon::start("mem-overflow");
    let fe = d.frontend();
    let mem = memfd("hostile", MIB).unwrap();
    let efd = eventfd().unwrap();
    let top = u64::MAX - 0xfff;
    for (what, r, fd) in [
        ("gpa + size wraps", spec(top, 0x2000, UVA, 0), mem.as_fd()),
        ("uva + size wraps", spec(0, 0x2000, top, 0), mem.as_fd()),
        ("mmap_offset + size wraps", spec(0, 0x2000, UVA, top), mem.as_fd()),
        ("mmap_offset beyond the fd", spec(0, 0x1000, UVA, 2 * MIB), mem.as_fd()),
        ("size beyond the fd", spec(0, 2 * MIB, UVA, 0), mem.as_fd()),
        ("offset + size beyond the fd", spec(0, MIB, UVA, 0x1000), mem.as_fd()),
        ("zero size", spec(0, 0, UVA, 0), mem.as_fd()),
        ("an eventfd as memory", spec(0, 0x1000, UVA, 0), efd.as_fd()),
    ] {
        assert_eq!(ack(&fe, Req::ADD_MEM_REG, &single_region(&r), &[fd]), Some(1), "ADD_MEM_REG: {what}");
        assert_eq!(memfd_mappings(d.pid()), 0, "{what}: a refused region stayed mapped");
    }
    let t = |r: RegionSpec| mem_table(1, &[r]);
    assert_eq!(ack(&fe, Req::SET_MEM_TABLE, &t(spec(0, MIB, UVA, 0x1000)), &[mem.as_fd()]), Some(1));
    assert_eq!(ack(&fe, Req::SET_MEM_TABLE, &t(spec(0, MIB, UVA, 0)), &[mem.as_fd()]), Some(0), "still served");
    drop(fe);
    d.assert_released("overflowing ADD_MEM_REG");
    // The vhost crate checks SET_MEM_TABLE regions for wrapping itself: error reply, then
    // it drops the connection.
    for (what, r) in [("gpa wraps", spec(top, 0x2000, UVA, 0)), ("uva wraps", spec(0, 0x2000, top, 0))] {
        d.expect_disconnect(what, |fe| {
            assert_eq!(fe.call(Req::SET_MEM_TABLE, &t(r), &[mem.as_fd()], T).unwrap().ack(), Some(1), "{what}");
        });
    }
    d.assert_recovered("overflowing memory regions");
}

#[test]
fn overlapping_memory_regions_are_refused() {
    let mut d = Daemon::start("mem-overlap");
    let fe = d.frontend();
    let (a, b) = (memfd("hostile-a", MIB).unwrap(), memfd("hostile-b", MIB).unwrap());
    let fds = [a.as_fd(), b.as_fd()];
    let r1 = spec(0, MIB, UVA, 0);
    for (what, r2) in [
        ("same gpa range", spec(0, MIB, UVA + MIB, 0)),
        ("gpa overlap", spec(MIB / 2, MIB, UVA + MIB, 0)),
        ("uva overlap", spec(MIB, MIB, UVA + MIB / 2, 0)),
        ("identical", r1),
    ] {
        assert_eq!(ack(&fe, Req::SET_MEM_TABLE, &mem_table(2, &[r1, r2]), &fds), Some(1), "SET_MEM_TABLE: {what}");
        assert_eq!(ack(&fe, Req::ADD_MEM_REG, &single_region(&r1), &[a.as_fd()]), Some(0));
        assert_eq!(ack(&fe, Req::ADD_MEM_REG, &single_region(&r2), &[b.as_fd()]), Some(1), "ADD_MEM_REG: {what}");
        assert_eq!(memfd_mappings(d.pid()), 1, "{what}: only the first region may stay mapped");
        assert_eq!(ack(&fe, Req::REM_MEM_REG, &single_region(&r1), &[]), Some(0));
    }
    let apart = spec(MIB, MIB, UVA + MIB, 0);
    assert_eq!(ack(&fe, Req::SET_MEM_TABLE, &mem_table(2, &[r1, apart]), &fds), Some(0), "disjoint regions");
    assert_eq!(memfd_mappings(d.pid()), 2);
    drop(fe);
    d.assert_recovered("overlapping memory regions");
}

#[test]
fn more_regions_than_slots_are_refused() {
    let mut d = Daemon::start("mem-slots");
    let fe = d.frontend();
    let slots = fe.call(Req::GET_MAX_MEM_SLOTS, &[], &[], T).unwrap().ack().expect("GET_MAX_MEM_SLOTS");
    assert_eq!(slots, 32);
    let page = 0x1000;
    let mem = memfd("hostile", (slots + 1) * page).unwrap();
    let nth = |i: u64| spec(i * page, page, UVA + i * page, i * page);
    for i in 0..slots {
        assert_eq!(ack(&fe, Req::ADD_MEM_REG, &single_region(&nth(i)), &[mem.as_fd()]), Some(0), "region {i}");
    }
    assert_eq!(ack(&fe, Req::ADD_MEM_REG, &single_region(&nth(slots)), &[mem.as_fd()]), Some(1), "one too many");
    assert_eq!(memfd_mappings(d.pid()), slots as usize);
    // SET_MEM_TABLE carries at most 8 regions (vhost-user spec).
    let fds: Vec<_> = (0..9).map(|_| mem.as_fd()).collect();
    let table: Vec<_> = (0..9).map(nth).collect();
    assert_eq!(ack(&fe, Req::SET_MEM_TABLE, &mem_table(9, &table), &fds), Some(1), "9 regions");
    assert_eq!(ack(&fe, Req::SET_MEM_TABLE, &mem_table(8, &table[..8]), &fds[..8]), Some(0), "8 regions");
    assert_eq!(memfd_mappings(d.pid()), 8);
    drop(fe);
    d.assert_released("too many regions");
    // 33 regions with 33 fds: more fds than the vhost crate receives with one message.
    let fds: Vec<_> = (0..33).map(|_| mem.as_fd()).collect();
    let table: Vec<_> = (0..33).map(nth).collect();
    d.expect_disconnect("33 regions", |fe| send(fe, Req::SET_MEM_TABLE, &mem_table(33, &table), &fds));
    d.assert_recovered("more regions than slots");
}

#[test]
fn stray_fds_are_refused_and_closed() {
    let mut d = Daemon::start("stray-fds");
    let efds: Vec<OwnedFd> = (0..253).map(|_| eventfd().unwrap()).collect();
    let fds: Vec<BorrowedFd<'_>> = efds.iter().map(|f| f.as_fd()).collect();
    let mem = memfd("hostile", MIB).unwrap();
    let r = single_region(&spec(0, MIB, UVA, 0));
    // Messages that take no fd (DPDK CVE-2022-0669: fds on such messages leaked).
    for (code, payload) in [
        (Req::GET_FEATURES, vec![]),
        (Req::SET_FEATURES, u64_payload(1 << 32)),
        (Req::SET_VRING_NUM, vring_state(0, 128)),
        (Req::GET_VRING_BASE, vring_state(0, 0)),
        (Req::GET_QUEUE_NUM, vec![]),
    ] {
        for n in [1, 3] {
            d.expect_disconnect(&format!("{code:?} with {n} fds"), |fe| send(fe, code, &payload, &fds[..n]));
        }
    }
    // Messages that take one fd, with two; and "no fd" (bit 8) with one.
    for code in [Req::SET_VRING_KICK, Req::SET_VRING_CALL, Req::SET_VRING_ERR] {
        d.expect_disconnect(&format!("{code:?} with 2 fds"), |fe| send(fe, code, &u64_payload(0), &fds[..2]));
        d.expect_disconnect(&format!("{code:?}, no-fd flag, 1 fd"), |fe| {
            send(fe, code, &u64_payload(0x100), &fds[..1])
        });
    }
    d.expect_disconnect("ADD_MEM_REG with 2 fds", |fe| send(fe, Req::ADD_MEM_REG, &r, &[mem.as_fd(), fds[0]]));
    d.expect_disconnect("SET_MEM_TABLE, 1 region, 2 fds", |fe| {
        let o = fe.call(Req::SET_MEM_TABLE, &mem_table(1, &[spec(0, MIB, UVA, 0)]), &[mem.as_fd(), fds[0]], T);
        assert_eq!(o.unwrap().ack(), Some(1));
    });
    // More fds than the vhost crate receives (32), up to the kernel's limit (253).
    for n in [33, 253] {
        d.expect_disconnect(&format!("{n} fds"), |fe| send(fe, Req::GET_FEATURES, &[], &fds[..n]));
    }
    // Accepted and closed: "no fd" with two fds (ignored), REM_MEM_REG with one (the spec
    // allows one for old frontends; the back-end must close it).
    let fe = d.frontend();
    let open = fd_count(d.pid());
    assert_eq!(ack(&fe, Req::SET_VRING_CALL, &u64_payload(0x100), &fds[..2]), Some(0));
    assert_eq!(ack(&fe, Req::ADD_MEM_REG, &r, &[mem.as_fd()]), Some(0));
    assert_eq!(ack(&fe, Req::REM_MEM_REG, &r, &fds[..1]), Some(0));
    // (The vhost crate drops a message's fds after sending its reply: let it finish.)
    let pid = d.pid();
    assert_eq!(settle(open, Duration::from_secs(5), || fd_count(pid)), open, "fds kept from ignored attachments");
    drop(fe);
    d.assert_recovered("stray fds");
}

#[test]
fn lying_headers_end_the_connection() {
    let mut d = Daemon::start("lying-headers");
    let state = vring_state(0, 128);
    let hdr = |size: u32| Header { size, ..Header::request(Req::SET_VRING_NUM, 0) };
    let cases: [(&str, Header, &[u8]); 9] = [
        ("size larger than the payload", hdr(16), &state),
        ("size smaller than the payload", hdr(4), &state),
        ("size 0, payload follows", hdr(0), &state),
        ("size above 4 KiB", hdr(0x1001), &state),
        ("size u32::MAX", hdr(u32::MAX), &state),
        ("payload on GET_FEATURES", Header::request(Req::GET_FEATURES, 8), &state),
        ("REPLY flag on a request", Header { flags: 0x1 | Header::REPLY, ..hdr(8) }, &state),
        ("version 2", Header { flags: 0x2, ..hdr(8) }, &state),
        ("reserved flag bits", Header { flags: 0x1 | 0x100, ..hdr(8) }, &state),
    ];
    for (what, h, payload) in cases {
        d.expect_disconnect(what, |fe| fe.send(h, payload, &[]).unwrap());
    }
    // num_regions that does not match the payload: error reply, then disconnect.
    let mem = memfd("hostile", MIB).unwrap();
    d.expect_disconnect("num_regions lies", |fe| {
        let o = fe.call(Req::SET_MEM_TABLE, &mem_table(2, &[spec(0, MIB, UVA, 0)]), &[mem.as_fd()], T);
        assert_eq!(o.unwrap().ack(), Some(1));
    });
    d.assert_recovered("lying headers");
}

#[test]
fn unknown_and_unhandled_request_codes_end_the_connection() {
    let mut d = Daemon::start("codes");
    // Outside the enum, and codes the vhost crate knows but does not dispatch or whose
    // protocol feature was not negotiated: SET_LOG_BASE, SET_LOG_FD, SEND_RARP,
    // NET_SET_MTU, SET_BACKEND_REQ_FD, IOTLB_MSG, SET_VRING_ENDIAN, crypto sessions,
    // POSTCOPY_*, GET/SET_INFLIGHT_FD, GPU_SET_SOCKET (no fd), RESET_DEVICE, VRING_KICK,
    // SET/GET_STATUS, GET_SHARED_OBJECT, SET_DEVICE_STATE_FD (no fd), GET_SHMEM_CONFIG.
    let codes = [0, 45, 46, 1000, 0x8000_0000, u32::MAX, 6, 7, 19, 20, 21, 22, 23, 26, 27, 28, 29, 30, 31, 32, 33, 34]
        .into_iter()
        .chain([35, 39, 40, 41, 42, 44]);
    for code in codes {
        let h = Header { request: code, flags: Header::VERSION | Header::NEED_REPLY, size: 8 };
        d.expect_disconnect(&format!("request {code}"), |fe| fe.send(h, &u64_payload(0), &[]).unwrap());
    }
    d.assert_recovered("unknown request codes");
}

/// Send `bytes` (a message cut short), then expect the disconnect one message timeout later.
fn expect_stall_timeout(d: &mut Daemon, what: &str, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    d.expect_disconnect(what, |fe| {
        let t = Instant::now();
        fe.send_bytes(bytes, fds).unwrap();
        assert!(fe.wait_closed(MESSAGE_TIMEOUT * 5).unwrap(), "{what}: not disconnected");
        let waited = t.elapsed();
        eprintln!("{what}: disconnected after {waited:?}");
        assert!(waited >= MESSAGE_TIMEOUT * 9 / 10 && waited < MESSAGE_TIMEOUT * 4, "{what}: after {waited:?}");
    });
}

#[test]
fn a_frontend_that_stops_mid_message_is_timed_out() {
    let mut d = Daemon::start("stall");
    let header = Header::request(Req::SET_VRING_NUM, 8).to_bytes();
    expect_stall_timeout(&mut d, "header, no body", &header, &[]);
    expect_stall_timeout(&mut d, "half a header", &header[..6], &[]);
    let efds: Vec<OwnedFd> = (0..40).map(|_| eventfd().unwrap()).collect();
    let fds: Vec<_> = efds.iter().map(|f| f.as_fd()).collect();
    let get = Header::request(Req::GET_FEATURES, 0).to_bytes();
    expect_stall_timeout(&mut d, "a header with 40 fds", &get, &fds);
    // A stalled frontend holds the daemon (one frontend at a time) only until the timeout:
    // a normal frontend waiting behind it is served.
    let fe = d.frontend();
    fe.send_bytes(&header, &[]).unwrap();
    let t = Instant::now();
    let opts = Options { queue_size: 64, buffer_memory: MIB, ..Options::default() };
    let mut dev = Device::connect(&d.socket(), &opts).expect("the frontend behind the stalled one");
    eprintln!("the next frontend was served after {:?}", t.elapsed());
    assert!(fe.wait_closed(Duration::ZERO).unwrap(), "the stalled frontend is still connected");
    write_read(&mut dev, 0, 3);
    drop(dev);
    drop(fe);
    d.assert_recovered("stalled frontends");
}

#[test]
fn an_idle_frontend_is_not_timed_out() {
    let mut d = Daemon::start("idle");
    let fe = d.frontend();
    std::thread::sleep(MESSAGE_TIMEOUT * 3);
    assert_eq!(ack(&fe, Req::SET_VRING_NUM, &vring_state(0, QUEUE_SIZE), &[]), Some(0), "idle frontend dropped");
    drop(fe);
    d.assert_recovered("idle frontend");
}

/// How a frontend leaves in [`a_thousand_connect_disconnect_cycles_leak_nothing`].
#[derive(Clone, Copy, Debug)]
enum Leave {
    /// GET_VRING_BASE on every ring, then close.
    Clean,
    /// Close with a write in flight.
    Drop,
    /// shutdown(2) the socket under the driver, then close.
    Kill,
}

#[test]
fn a_thousand_connect_disconnect_cycles_leak_nothing() {
    let mut d = Daemon::start("cycles");
    let opts = Options { num_queues: 2, queue_size: 32, buffer_memory: MIB, ..Options::default() };
    let data = pattern(11, 4096);
    let t = Instant::now();
    let mut rss_warm = 0;
    for i in 0..1000u64 {
        if i == 100 {
            rss_warm = rss_kib(d.pid());
        }
        let stream = UnixStream::connect(d.socket()).unwrap();
        let mine = stream.try_clone().unwrap();
        let mut dev = Device::from_stream(stream, &opts).unwrap_or_else(|e| panic!("cycle {i}: {e}"));
        let mut q = dev.take_queues().remove((i % 2) as usize);
        let buf = q.alloc(4096).unwrap();
        buf.write_at(0, &data).unwrap();
        q.submit(Op::Write { offset: (i % 64) * 4096 }, Some(buf), i).unwrap();
        q.kick().unwrap();
        match [Leave::Clean, Leave::Drop, Leave::Kill][(i % 3) as usize] {
            Leave::Clean => {
                let mut done = Vec::new();
                q.wait(&mut done, 1).unwrap();
                assert!(done[0].result.is_ok());
                drop(q);
                dev.shutdown(T).unwrap();
            }
            Leave::Drop => drop((q, dev)),
            Leave::Kill => {
                mine.shutdown(std::net::Shutdown::Both).unwrap();
                drop((q, dev));
            }
        }
        drop(mine);
    }
    let elapsed = t.elapsed();
    d.assert_released("1000 cycles");
    let rss_end = rss_kib(d.pid());
    eprintln!("1000 cycles in {elapsed:?}; vblk serve RSS {rss_warm} KiB after 100, {rss_end} KiB after 1000");
    assert!(rss_end <= rss_warm + 4096, "RSS grew from {rss_warm} KiB to {rss_end} KiB");
    d.assert_recovered("1000 cycles");
}

#[test]
fn a_frontend_leaving_mid_io_is_drained_and_released() {
    let mut d = Daemon::start_with("mid-io", 512 * MIB);
    for round in 0..3 {
        let opts = Options { num_queues: 2, queue_size: 128, buffer_memory: 260 * MIB, ..Options::default() };
        let mut dev = Device::connect(&d.socket(), &opts).unwrap();
        let mut submitted = 0;
        for (qi, mut q) in dev.take_queues().into_iter().enumerate() {
            while let Ok(buf) = q.alloc(MIB as u32) {
                let offset = (qi as u64 * 128 + submitted % 128) * MIB;
                if q.submit(Op::Write { offset }, Some(buf), submitted).is_err() {
                    break;
                }
                submitted += 1;
            }
            q.kick().unwrap();
        }
        // Gone, with up to 256 MiB of writes in flight.
        let t = Instant::now();
        drop(dev);
        eprintln!("round {round}: left with {submitted} x 1 MiB writes submitted");
        assert!(submitted >= 64, "only {submitted} writes submitted");
        d.assert_released(&format!("mid-I/O disconnect {round}"));
        eprintln!("round {round}: released in {:?}", t.elapsed());
    }
    d.assert_recovered("mid-I/O disconnects");
}
