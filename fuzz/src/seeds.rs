//! Hand-made valid inputs: the seed corpus in `fuzz/corpus/<target>/seed-*`.
//!
//! Regenerate with `VBLK_FUZZ_WRITE_SEEDS=1 cargo test --manifest-path fuzz/Cargo.toml
//! --lib write_seed_corpus` (see fuzz/README.md).

use vblk_queue::layout::{DESC_F_NEXT, DESC_F_WRITE};
use vblk_queue::Descriptor;
use vblk_virtio::blk::{features as blkf, req_type, OutHdr};
use vblk_virtio::features as vf;

use crate::chain::{Addr, Capacity, ChainInput, Desc, Hdr, Len, ReqType, Round, Sector, Seg, Table};
use crate::merge::{Length, MergeInput, Offset, Segs, StagedIn};
use crate::vhost::{Body, Code, Config, Fd, Flags, MemTable, MemfdSpec, Msg, Region, Uva, VringAddr, VuInput};

const NEXT: u8 = 1;
const WRITE: u8 = 2;
const INDIRECT: u8 = 4;

fn d(addr: Addr, len: Len, flags: u8, next: u8) -> Desc {
    Desc { addr, len, flags, next, raw_next: None }
}

fn hdr(at: Addr, kind: ReqType, sector: Sector) -> Hdr {
    Hdr { at, kind, ioprio: 0, sector }
}

fn round(heads: &[u8]) -> Round {
    Round { heads: heads.to_vec(), idx_jump: None, reap: true, enable_notification: true }
}

fn base_chain() -> ChainInput {
    ChainInput {
        size_sel: 3, // 8 entries
        features: 0,
        second_region: false,
        readonly: false,
        merge: true,
        capacity: Capacity::Sectors(2048),
        base: 0,
        used_start: 0,
        avail_flags: 0,
        used_event: 0,
        descs: vec![],
        tables: vec![],
        hdrs: vec![],
        segs: vec![],
        raw: vec![],
        rounds: vec![],
    }
}

/// header (readable) → data → status, at descriptors `first..first + 3`.
fn three(first: u8, slot: u8, data: Len, data_write: bool) -> Vec<Desc> {
    vec![
        d(Addr::Buf((slot, 0)), Len::Hdr(()), NEXT, first + 1),
        d(Addr::Buf((slot, 0x100)), data, NEXT | if data_write { WRITE } else { 0 }, first + 2),
        d(Addr::Buf((slot, 0x800)), Len::Status(()), WRITE, 0),
    ]
}

pub fn chain_seeds() -> Vec<(&'static str, ChainInput)> {
    let mut out = Vec::new();

    // A 3-descriptor read of 4 KiB at sector 8.
    let mut c = base_chain();
    c.descs = three(0, 0, Len::Sectors(8), true);
    c.hdrs = vec![hdr(Addr::Buf((0, 0)), ReqType::In(()), Sector::Small(8))];
    c.rounds = vec![round(&[0])];
    out.push(("read", c));

    // Two contiguous writes (merged), a flush and a GET_ID, event idx on, second region.
    let mut c = base_chain();
    c.size_sel = 4; // 16
    c.features = 2;
    c.second_region = true;
    c.descs = [
        three(0, 0, Len::Sectors(1), false),
        three(3, 1, Len::Sectors(1), false),
        vec![
            d(Addr::Buf((2, 0)), Len::Hdr(()), NEXT, 7),
            d(Addr::Buf((2, 0x800)), Len::Status(()), WRITE, 0),
            d(Addr::Region1(0), Len::Hdr(()), NEXT, 9),
            d(Addr::Region1(0x100), Len::Small(20), NEXT | WRITE, 10),
            d(Addr::Region1(0x200), Len::Status(()), WRITE, 0),
        ],
    ]
    .concat();
    c.hdrs = vec![
        hdr(Addr::Buf((0, 0)), ReqType::Out(()), Sector::Small(4)),
        hdr(Addr::Buf((1, 0)), ReqType::Out(()), Sector::Small(5)),
        hdr(Addr::Buf((2, 0)), ReqType::Flush(()), Sector::Small(0)),
        hdr(Addr::Region1(0), ReqType::GetId(()), Sector::Small(0)),
    ];
    c.used_event = 1;
    c.rounds = vec![round(&[0, 3]), round(&[6, 8])];
    out.push(("write-merge-flush-getid", c));

    // An indirect request (header, 2 data buffers, status in a table).
    let mut c = base_chain();
    c.features = 1;
    c.descs = vec![d(Addr::Table(0), Len::Raw(64), INDIRECT, 0)];
    c.tables = vec![Table {
        slot: 0,
        descs: vec![
            d(Addr::Buf((0, 0)), Len::Hdr(()), NEXT, 1),
            d(Addr::Buf((1, 0)), Len::Sectors(2), NEXT | WRITE, 2),
            d(Addr::Buf((2, 0)), Len::Sectors(1), NEXT | WRITE, 3),
            d(Addr::Buf((0, 0x800)), Len::Status(()), WRITE, 0),
        ],
    }];
    c.hdrs = vec![hdr(Addr::Buf((0, 0)), ReqType::In(()), Sector::FromEnd(3))];
    c.rounds = vec![round(&[0])];
    out.push(("indirect-read", c));

    // Discard and write-zeroes (unmap) with one segment each.
    let mut c = base_chain();
    c.descs = [three(0, 0, Len::Hdr(()), false), three(3, 1, Len::Hdr(()), false)].concat();
    c.hdrs = vec![
        hdr(Addr::Buf((0, 0)), ReqType::Discard(()), Sector::Small(0)),
        hdr(Addr::Buf((1, 0)), ReqType::WriteZeroes(()), Sector::Small(0)),
    ];
    c.segs = vec![
        Seg { at: Addr::Buf((0, 0x100)), sector: Sector::Small(16), num_sectors: 8, flags: 0 },
        Seg { at: Addr::Buf((1, 0x100)), sector: Sector::Small(64), num_sectors: 8, flags: 1 },
    ];
    c.rounds = vec![round(&[0, 3])];
    out.push(("discard-write-zeroes", c));

    // Indices across the u16 wrap, event idx, requests left in flight for a round.
    let mut c = base_chain();
    c.features = 3;
    c.base = 65533;
    c.used_start = 65533;
    c.used_event = 65534;
    c.descs = [three(0, 0, Len::Sectors(1), true), three(3, 1, Len::Sectors(1), true)].concat();
    c.hdrs = vec![
        hdr(Addr::Buf((0, 0)), ReqType::In(()), Sector::Small(0)),
        hdr(Addr::Buf((1, 0)), ReqType::In(()), Sector::Small(1)),
    ];
    c.rounds = vec![
        Round { heads: vec![0], idx_jump: None, reap: false, enable_notification: true },
        round(&[3]),
        round(&[0, 3]),
        round(&[0, 3]),
    ];
    out.push(("wrap-event-idx", c));

    // A read-only disk refusing a write, an unsupported type, a bad header length.
    let mut c = base_chain();
    c.readonly = true;
    c.descs = [
        three(0, 0, Len::Sectors(1), false),
        three(3, 1, Len::Sectors(1), true),
        vec![d(Addr::Buf((2, 0)), Len::Small(8), NEXT, 7), d(Addr::Buf((2, 0x800)), Len::Status(()), WRITE, 0)],
    ]
    .concat();
    c.hdrs = vec![
        hdr(Addr::Buf((0, 0)), ReqType::Out(()), Sector::Small(0)),
        hdr(Addr::Buf((1, 0)), ReqType::Raw(req_type::SCSI_CMD), Sector::Small(0)),
    ];
    c.rounds = vec![round(&[0, 3, 6])];
    out.push(("errors", c));
    out
}

pub fn merge_seeds() -> Vec<(&'static str, MergeInput)> {
    let st = |write, offset, len, segs| StagedIn { write, offset, len, segs };
    vec![
        (
            "contiguous",
            MergeInput {
                merge: true,
                drain_every: 0,
                staged: vec![
                    st(true, Offset::Sector(16), Length::Sectors(8), Segs::Small(1)),
                    st(true, Offset::Sector(0), Length::Sectors(8), Segs::Small(1)),
                    st(true, Offset::Sector(8), Length::Sectors(8), Segs::Small(2)),
                    st(false, Offset::Sector(8), Length::Sectors(8), Segs::Small(1)),
                    st(false, Offset::After(3), Length::Sectors(8), Segs::Small(1)),
                    st(true, Offset::Sector(100), Length::Sectors(1), Segs::Small(1)),
                ],
            },
        ),
        (
            "limits",
            MergeInput {
                merge: true,
                drain_every: 3,
                staged: vec![
                    st(false, Offset::Sector(0), Length::NearLimit(1), Segs::NearLimit(1)),
                    st(false, Offset::After(0), Length::NearLimit(1), Segs::NearLimit(1)),
                    st(false, Offset::After(1), Length::Sectors(1), Segs::Small(1)),
                    st(true, Offset::Sector(0), Length::Sectors(1), Segs::NearLimit(0)),
                    st(true, Offset::After(3), Length::Sectors(1), Segs::Small(1)),
                ],
            },
        ),
        (
            "no-merge",
            MergeInput {
                merge: false,
                drain_every: 0,
                staged: vec![
                    st(true, Offset::Sector(8), Length::Sectors(8), Segs::Small(1)),
                    st(true, Offset::Before(0), Length::Sectors(8), Segs::Small(1)),
                ],
            },
        ),
    ]
}

// --- vhost-user -------------------------------------------------------------------

pub mod code {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const RESET_DEVICE: u32 = 34;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
}

/// Protocol features vblk offers plus REPLY_ACK: MQ, REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS.
const PROTOCOL: u64 = (1 << 0) | (1 << 3) | (1 << 9) | (1 << 15);

fn msg(c: u32, body: Body) -> Msg {
    Msg { code: Code::Known((c - 1) as u8), flags: Flags::V1(()), body, size: None, fds: vec![] }
}

fn ack(c: u32, body: Body) -> Msg {
    Msg { flags: Flags::NeedReply(()), ..msg(c, body) }
}

fn with_fd(mut m: Msg, fd: Fd) -> Msg {
    m.fds = vec![fd];
    m
}

fn features(readonly: bool, protocol: bool) -> u64 {
    let f = vf::VERSION_1
        | vf::RING_INDIRECT_DESC
        | vf::RING_EVENT_IDX
        | blkf::FLUSH
        | blkf::BLK_SIZE
        | blkf::SEG_MAX
        | blkf::CONFIG_WCE
        | blkf::MQ
        | if readonly { blkf::RO } else { blkf::DISCARD | blkf::WRITE_ZEROES };
    f | if protocol { vf::VHOST_USER_PROTOCOL_FEATURES } else { 0 }
}

/// A 64 KiB memfd holding a ring of 8 at offset 0 (avail 0x1000, used 0x1400) with one
/// read request (head 0) made available.
fn ring_memfd() -> Fd {
    let desc = |addr, len, flags, next| Descriptor { addr, len, flags, next }.to_bytes().to_vec();
    let table = [
        desc(0x4000, 16, DESC_F_NEXT, 1),
        desc(0x5000, 4096, DESC_F_NEXT | DESC_F_WRITE, 2),
        desc(0x6000, 1, DESC_F_WRITE, 0),
    ]
    .concat();
    let hdr = OutHdr { req_type: req_type::IN, ioprio: 0, sector: 8 }.to_bytes().to_vec();
    // avail: flags 0, idx 1, ring[0] = 0.
    let avail = vec![0, 0, 1, 0, 0, 0];
    Fd::Memfd(MemfdSpec { size: 1, writes: vec![(0, table), (0x1000, avail), (0x4000, hdr)] })
}

/// Region slot 0: gpa 0, uva UVA_BASE, 64 KiB.
fn region0() -> Region {
    Region { slot: 0, pages: 16, offset_pages: 0, uva_slot: None, raw: None }
}

fn ring_setup(index: u8, fd_ring: bool) -> Vec<Msg> {
    let off = index as u32 * 0x2000;
    let mut v = vec![
        ack(code::SET_VRING_NUM, Body::VringState((index, 8))),
        ack(
            code::SET_VRING_ADDR,
            Body::VringAddr(VringAddr {
                index,
                flags: 0,
                desc: Uva::Slot((0, off)),
                used: Uva::Slot((0, off + 0x1400)),
                avail: Uva::Slot((0, off + 0x1000)),
                log: 0,
            }),
        ),
        ack(code::SET_VRING_BASE, Body::VringState((index, 0))),
        with_fd(ack(code::SET_VRING_CALL, Body::VringFd((index, false))), Fd::EventFd(())),
        with_fd(ack(code::SET_VRING_ERR, Body::VringFd((index, false))), Fd::EventFd(())),
    ];
    if fd_ring {
        v.push(with_fd(ack(code::SET_VRING_KICK, Body::VringFd((index, false))), Fd::EventFd(())));
    }
    v
}

fn negotiate(protocol: bool) -> Vec<Msg> {
    let mut v = vec![msg(code::SET_OWNER, Body::Empty(())), msg(code::GET_FEATURES, Body::Empty(()))];
    if protocol {
        v.push(msg(code::GET_PROTOCOL_FEATURES, Body::Empty(())));
        v.push(msg(code::SET_PROTOCOL_FEATURES, Body::U64(PROTOCOL)));
    }
    v.push(ack(code::SET_FEATURES, Body::U64(features(false, protocol))));
    if protocol {
        v.push(msg(code::GET_QUEUE_NUM, Body::Empty(())));
        v.push(msg(code::GET_CONFIG, Body::Config(Config { offset: 0, size: 96, flags: 0, payload: vec![0; 96] })));
        v.push(msg(code::GET_MAX_MEM_SLOTS, Body::Empty(())));
    }
    v
}

pub fn vhost_seeds() -> Vec<(&'static str, VuInput)> {
    let mut out = Vec::new();

    // QEMU-like: negotiate with protocol features, memory table, ring 0 up and running a
    // read request, enable, then stop it with GET_VRING_BASE.
    let mut msgs = negotiate(true);
    msgs.push(with_fd(
        ack(code::SET_MEM_TABLE, Body::MemTable(MemTable { count: None, padding: 0, regions: vec![region0()] })),
        ring_memfd(),
    ));
    msgs.extend(ring_setup(0, true));
    msgs.push(ack(code::SET_VRING_ENABLE, Body::VringState((0, 1))));
    msgs.push(msg(code::GET_VRING_BASE, Body::VringState((0, 0))));
    out.push(("qemu-like", VuInput { queue_size: 2, readonly: false, reconnect: true, msgs, options: 0 }));

    // Without protocol features: rings are enabled at once; both queues on two polling
    // worker threads, then a reset.
    let mut msgs = negotiate(false);
    msgs.push(with_fd(
        msg(code::SET_MEM_TABLE, Body::MemTable(MemTable { count: None, padding: 0, regions: vec![region0()] })),
        ring_memfd(),
    ));
    msgs.extend(ring_setup(0, true).into_iter().map(|m| Msg { flags: Flags::V1(()), ..m }));
    msgs.extend(ring_setup(1, true).into_iter().map(|m| Msg { flags: Flags::V1(()), ..m }));
    msgs.push(msg(code::RESET_OWNER, Body::Empty(())));
    out.push(("legacy-two-rings", VuInput { queue_size: 1, readonly: false, reconnect: false, msgs, options: 3 }));

    // Memory slots: ADD_MEM_REG twice, rings in the first, REM_MEM_REG under a running ring.
    let mut msgs = negotiate(true);
    msgs.push(with_fd(ack(code::ADD_MEM_REG, Body::SingleRegion(region0())), ring_memfd()));
    msgs.push(with_fd(
        ack(
            code::ADD_MEM_REG,
            Body::SingleRegion(Region { slot: 2, pages: 16, offset_pages: 0, uva_slot: None, raw: None }),
        ),
        Fd::Memfd(MemfdSpec { size: 1, writes: vec![] }),
    ));
    msgs.extend(ring_setup(0, true));
    msgs.push(ack(code::SET_VRING_ENABLE, Body::VringState((0, 1))));
    msgs.push(ack(code::REM_MEM_REG, Body::SingleRegion(region0())));
    msgs.push(msg(code::GET_VRING_BASE, Body::VringState((0, 0))));
    out.push(("mem-slots", VuInput { queue_size: 2, readonly: false, reconnect: true, msgs, options: 0 }));

    // Bad parameters, each with REPLY_ACK: ring size 3, addresses outside memory, config
    // past the end, write-cache toggle, ring index 2, then RESET_DEVICE.
    let mut msgs = negotiate(true);
    msgs.push(with_fd(
        ack(code::SET_MEM_TABLE, Body::MemTable(MemTable { count: None, padding: 0, regions: vec![region0()] })),
        Fd::Memfd(MemfdSpec { size: 1, writes: vec![] }),
    ));
    msgs.push(ack(code::SET_VRING_NUM, Body::VringState((0, 3))));
    msgs.push(ack(code::SET_VRING_NUM, Body::VringState((2, 8))));
    msgs.push(ack(code::SET_VRING_NUM, Body::VringState((1, 8))));
    msgs.push(ack(
        code::SET_VRING_ADDR,
        Body::VringAddr(VringAddr {
            index: 1,
            flags: 0,
            desc: Uva::Slot((3, 0)),
            used: Uva::Slot((3, 0x1400)),
            avail: Uva::Slot((3, 0x1000)),
            log: 0,
        }),
    ));
    msgs.push(msg(code::GET_CONFIG, Body::Config(Config { offset: 90, size: 16, flags: 0, payload: vec![0; 16] })));
    msgs.push(ack(code::SET_CONFIG, Body::Config(Config { offset: 32, size: 1, flags: 0, payload: vec![0] })));
    msgs.push(ack(code::SET_VRING_BASE, Body::VringState((0, 70000))));
    msgs.push(msg(code::RESET_DEVICE, Body::Empty(())));
    out.push(("bad-params", VuInput { queue_size: 3, readonly: true, reconnect: true, msgs, options: 0 }));
    out
}

/// Minimal inputs for the bugs the targets found: `fuzz/regressions/<target>/<name>`.
/// Each must pass its target once the bug is fixed.
pub fn chain_regressions() -> Vec<(&'static str, ChainInput)> {
    // A valid read (staged for merging), then a head out of range in the same batch: the
    // queue breaks and `process_available` returns before submitting the staged read, so
    // it is never completed (and `BlkQueue::drop` leaks the memory table).
    let mut c = base_chain();
    c.descs = three(0, 0, Len::Sectors(8), true);
    c.hdrs = vec![hdr(Addr::Buf((0, 0)), ReqType::In(()), Sector::Small(8))];
    c.rounds = vec![round(&[0, 0xf8])];
    vec![("staged-read-stranded-by-broken-ring", c)]
}

pub fn vhost_regressions() -> Vec<(&'static str, VuInput)> {
    // The same through the daemon: the worker pops the read, then head 99 breaks the ring;
    // GET_VRING_BASE stops the worker, whose BlkQueue still holds the staged read, so its
    // Drop leaks the guest memory mapping for good.
    let (_, mut input) = vhost_seeds().into_iter().find(|(n, _)| *n == "qemu-like").unwrap();
    for m in &mut input.msgs {
        for fd in &mut m.fds {
            if let Fd::Memfd(spec) = fd {
                if !spec.writes.is_empty() {
                    // avail: idx 2, ring = [0, 99].
                    spec.writes[1] = (0x1000, vec![0, 0, 2, 0, 0, 0, 99, 0]);
                }
            }
        }
    }
    input.reconnect = false;
    vec![("staged-read-stranded-mapping-leak", input)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::Encode;

    /// The vhost target counts the process's threads, fds and mappings: one test at a time.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn roundtrip<T>(name: &str, x: &T)
    where
        T: Encode + PartialEq + std::fmt::Debug + for<'a> arbitrary::Arbitrary<'a>,
    {
        let bytes = x.to_bytes();
        let back: T = crate::decode(&bytes).unwrap_or_else(|| panic!("{name}: does not decode"));
        assert_eq!(&back, x, "{name}: decode(encode(x)) != x");
    }

    #[test]
    fn seeds_roundtrip() {
        for (n, s) in chain_seeds() {
            roundtrip(n, &s);
        }
        for (n, s) in merge_seeds() {
            roundtrip(n, &s);
        }
        for (n, s) in vhost_seeds() {
            roundtrip(n, &s);
        }
        for (n, s) in chain_regressions() {
            roundtrip(n, &s);
        }
        for (n, s) in vhost_regressions() {
            roundtrip(n, &s);
        }
    }

    /// Every file in `fuzz/regressions/<target>/` passes its target (fails until the bug
    /// it records is fixed).
    #[test]
    fn regressions_pass_their_targets() {
        let _g = serial();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
        let files = |t: &str| -> Vec<(String, Vec<u8>)> {
            let Ok(dir) = std::fs::read_dir(root.join(t)) else { return vec![] };
            let mut v: Vec<_> =
                dir.map(|e| e.unwrap().path()).map(|p| (p.display().to_string(), std::fs::read(&p).unwrap())).collect();
            v.sort();
            v
        };
        for (name, bytes) in files("chain_request") {
            eprintln!("replaying {name}");
            crate::chain::run(&crate::decode(&bytes).expect("decodes"));
        }
        for (name, bytes) in files("vhost_user") {
            eprintln!("replaying {name}");
            crate::vhost::run(&crate::decode(&bytes).expect("decodes"));
        }
        for (name, bytes) in files("merge") {
            eprintln!("replaying {name}");
            crate::merge::run(&crate::decode(&bytes).expect("decodes"));
        }
    }

    #[test]
    fn seeds_pass_their_targets() {
        let _g = serial();
        for (_, s) in chain_seeds() {
            crate::chain::run(&s);
        }
        for (_, s) in merge_seeds() {
            crate::merge::run(&s);
        }
        for (_, s) in vhost_seeds() {
            crate::vhost::run(&s);
        }
    }

    /// The QEMU-like seed really gets its read request through a worker: status OK.
    #[test]
    fn qemu_like_seed_completes_its_request() {
        let _g = serial();
        use std::os::unix::fs::FileExt;
        let (_, s) = vhost_seeds().into_iter().find(|(n, _)| *n == "qemu-like").unwrap();
        let mems = crate::vhost::run_keeping(&s, true);
        let mut st = [0xffu8];
        mems[0].read_exact_at(&mut st, 0x6000).unwrap();
        assert_eq!(st[0], 0, "status byte");
        let mut used = [0u8; 4];
        mems[0].read_exact_at(&mut used, 0x1400).unwrap();
        assert_eq!(u16::from_le_bytes([used[2], used[3]]), 1, "used idx");
    }

    /// Rewrite `fuzz/corpus/<target>/seed-*` (only with VBLK_FUZZ_WRITE_SEEDS=1).
    #[test]
    fn write_seed_corpus() {
        if std::env::var_os("VBLK_FUZZ_WRITE_SEEDS").is_none() {
            return;
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        let write = |target: &str, name: &str, bytes: Vec<u8>| {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        };
        for (n, s) in chain_seeds() {
            write("chain_request", n, s.to_bytes());
        }
        for (n, s) in merge_seeds() {
            write("merge", n, s.to_bytes());
        }
        for (n, s) in vhost_seeds() {
            write("vhost_user", n, s.to_bytes());
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
        let write = |target: &str, name: &str, bytes: Vec<u8>| {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), bytes).unwrap();
        };
        for (n, s) in chain_regressions() {
            write("chain_request", n, s.to_bytes());
        }
        for (n, s) in vhost_regressions() {
            write("vhost_user", n, s.to_bytes());
        }
    }
}
