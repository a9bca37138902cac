//! `chain_request`: descriptor chain walking and request parsing over guest memory the
//! fuzzer writes, then the whole per-queue pipeline (`BlkQueue`) against a null disk.
//!
//! Guest memory: region 0 is 64 KiB at gpa 0 (rings, indirect tables, buffers); region 1
//! (optional) is 16 KiB at gpa 0x20000, 4 KiB into its file, leaving a hole between them.
//!
//! ```text
//!   0x0000  descriptor table (up to 256 entries)
//!   0x1000  avail ring
//!   0x1400  used ring
//!   0x2000  8 indirect-table slots of 0x400 bytes (64 entries)
//!   0x4000  12 buffer slots of 0x1000 bytes
//! ```
//!
//! The input is a list of descriptors, indirect tables, request headers, discard segments
//! and raw bytes, with addresses biased into and around that layout, plus rounds of avail
//! ring entries. Two passes run over the same initial memory:
//!
//! 1. `SplitQueue::pop` + `request::parse` directly, checking every validated buffer lies
//!    inside a mapped region, that parsed requests are inside the disk and consistent with
//!    their chain, and the used ring / notification decisions against a model.
//! 2. `BlkQueue::process_available` → null `Engine` → `complete` → `publish`, checking the
//!    queue's counters and that every popped request is completed once I/O has drained.

use std::sync::Arc;

use vblk_backend::{Disk, Engine, EngineKind};
use vblk_blk::config::{MAX_DATA_SEGMENTS, MAX_DISCARD_SECTORS};
use vblk_blk::request::{data_buffers, parse, Parsed, Request, RequestError};
use vblk_blk::{BlkQueue, DeviceParams};
use vblk_queue::layout::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use vblk_queue::{
    need_event, AddrSpace, Chain, Descriptor, Popped, QueueError, RingAddrs, RingFeatures, SplitLayout, SplitQueue,
    MAX_INDIRECT_ENTRIES,
};
use vblk_virtio::blk::{req_type, DiscardSegment, OutHdr, Status, ID_BYTES};
use vblk_virtio::memory::memfd;
use vblk_virtio::{GuestMemory, Iov, RegionSpec};

use crate::{fuzz_enum, fuzz_struct};

pub const MEM0: u64 = 0x1_0000;
pub const R1_GPA: u64 = 0x2_0000;
pub const R1_SIZE: u64 = 0x4000;
pub const R1_FILE_OFFSET: u64 = 0x1000;
/// A third region right after the second in guest-physical space, from another file: a
/// buffer may cross from one into the other (two iovs for one descriptor).
pub const R2_GPA: u64 = R1_GPA + R1_SIZE;
pub const R2_SIZE: u64 = 0x2000;
pub const DESC: u64 = 0x0000;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x1400;
pub const TABLES: u64 = 0x2000;
pub const TABLE_SLOT: u64 = 0x400;
pub const TABLE_SLOTS: u64 = 8;
pub const BUFS: u64 = 0x4000;
pub const BUF_SLOT: u64 = 0x1000;
pub const BUF_SLOTS: u64 = 12;
pub const SIZES: [u16; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

fuzz_enum! {
    /// A guest-physical address, mostly somewhere useful.
    pub enum Addr {
        /// Buffer slot, offset (may run past the slot).
        Buf((u8, u16)),
        /// Start of an indirect-table slot.
        Table(u8),
        /// Inside the second region (refused if there is none).
        Region1(u16),
        /// `x` bytes before the end of region 0 (buffers that straddle its end).
        EndOf0(u16),
        /// Inside the rings themselves.
        Ring(u16),
        Raw(u64),
    }
}

impl Addr {
    pub fn gpa(&self) -> u64 {
        match *self {
            Addr::Buf((slot, off)) => BUFS + (slot as u64 % BUF_SLOTS) * BUF_SLOT + (off as u64 % (2 * BUF_SLOT)),
            Addr::Table(k) => TABLES + (k as u64 % TABLE_SLOTS) * TABLE_SLOT,
            Addr::Region1(off) => R1_GPA + off as u64 % (R1_SIZE + R2_SIZE + 0x100),
            Addr::EndOf0(back) => MEM0 - (back as u64 % 0x1000),
            Addr::Ring(off) => off as u64 % TABLES,
            Addr::Raw(a) => a,
        }
    }
}

fuzz_enum! {
    pub enum Len {
        /// 16: a request header.
        Hdr(()),
        /// 1: a status byte.
        Status(()),
        /// `n % 17` sectors.
        Sectors(u8),
        Small(u8),
        Raw(u32),
    }
}

impl Len {
    pub fn bytes(&self) -> u32 {
        match *self {
            Len::Hdr(()) => 16,
            Len::Status(()) => 1,
            Len::Sectors(n) => (n as u32 % 17) * 512,
            Len::Small(n) => n as u32,
            Len::Raw(n) => n,
        }
    }
}

fuzz_struct! {
    pub struct Desc {
        pub addr: Addr,
        pub len: Len,
        /// Bit 0 NEXT, bit 1 WRITE, bit 2 INDIRECT; bit 7 also sets an undefined flag bit.
        pub flags: u8,
        pub next: u8,
        /// Overrides `next` (out-of-range links for big rings).
        pub raw_next: Option<u16>,
    }
}

impl Desc {
    pub fn descriptor(&self) -> Descriptor {
        let mut flags = 0;
        if self.flags & 1 != 0 {
            flags |= DESC_F_NEXT;
        }
        if self.flags & 2 != 0 {
            flags |= DESC_F_WRITE;
        }
        if self.flags & 4 != 0 {
            flags |= DESC_F_INDIRECT;
        }
        if self.flags & 0x80 != 0 {
            flags |= 0x8000;
        }
        Descriptor {
            addr: self.addr.gpa(),
            len: self.len.bytes(),
            flags,
            next: self.raw_next.unwrap_or(self.next as u16),
        }
    }
}

fuzz_struct! {
    /// An indirect table written at a table slot.
    pub struct Table {
        pub slot: u8,
        pub descs: Vec<Desc>,
    }
}

fuzz_enum! {
    pub enum ReqType {
        In(()),
        Out(()),
        Flush(()),
        GetId(()),
        Discard(()),
        WriteZeroes(()),
        Raw(u32),
    }
}

impl ReqType {
    pub fn value(&self) -> u32 {
        match *self {
            ReqType::In(()) => req_type::IN,
            ReqType::Out(()) => req_type::OUT,
            ReqType::Flush(()) => req_type::FLUSH,
            ReqType::GetId(()) => req_type::GET_ID,
            ReqType::Discard(()) => req_type::DISCARD,
            ReqType::WriteZeroes(()) => req_type::WRITE_ZEROES,
            ReqType::Raw(t) => t,
        }
    }
}

fuzz_enum! {
    /// A sector number relative to the disk.
    pub enum Sector {
        Small(u16),
        /// `x` sectors before the end of the disk (wrapping below 0).
        FromEnd(u16),
        Raw(u64),
    }
}

impl Sector {
    pub fn value(&self, capacity_sectors: u64) -> u64 {
        match *self {
            Sector::Small(s) => s as u64,
            Sector::FromEnd(x) => capacity_sectors.wrapping_sub(x as u64),
            Sector::Raw(s) => s,
        }
    }
}

fuzz_struct! {
    /// A `virtio_blk_outhdr` written at `at`.
    pub struct Hdr {
        pub at: Addr,
        pub kind: ReqType,
        pub ioprio: u32,
        pub sector: Sector,
    }
}

fuzz_struct! {
    /// A discard / write-zeroes segment written at `at`.
    pub struct Seg {
        pub at: Addr,
        pub sector: Sector,
        pub num_sectors: u32,
        pub flags: u32,
    }
}

fuzz_enum! {
    pub enum Capacity {
        Sectors(u16),
        Bytes(u64),
    }
}

impl Capacity {
    pub fn bytes(&self) -> u64 {
        match *self {
            Capacity::Sectors(s) => (s as u64) << 9,
            // Real disks are at most i64::MAX bytes (file sizes are off_t).
            Capacity::Bytes(b) => b & (i64::MAX as u64),
        }
    }
}

fuzz_struct! {
    /// Entries the driver adds to the avail ring, then one device pass.
    pub struct Round {
        /// `h % size` if `h < 0xf8`, else `size + (h - 0xf8)` (out of range).
        pub heads: Vec<u8>,
        /// Publish `avail.idx = first + jump` instead of one past the last entry.
        pub idx_jump: Option<u16>,
        /// Reap completions and complete requests after the pass.
        pub reap: bool,
        pub enable_notification: bool,
    }
}

fuzz_struct! {
    pub struct ChainInput {
        pub size_sel: u8,
        /// Bit 0 INDIRECT_DESC, bit 1 EVENT_IDX.
        pub features: u8,
        pub second_region: bool,
        pub readonly: bool,
        pub merge: bool,
        pub capacity: Capacity,
        /// Where the avail ring starts (`SET_VRING_BASE`).
        pub base: u16,
        /// `used.idx` when the queue is set up.
        pub used_start: u16,
        pub avail_flags: u16,
        pub used_event: u16,
        pub descs: Vec<Desc>,
        pub tables: Vec<Table>,
        pub hdrs: Vec<Hdr>,
        pub segs: Vec<Seg>,
        pub raw: Vec<(Addr, Vec<u8>)>,
        pub rounds: Vec<Round>,
    }
}

/// Host address ranges of the mapped regions.
struct HostRanges(Vec<(usize, usize)>);

impl HostRanges {
    fn of(mem: &GuestMemory) -> Self {
        let specs: Vec<RegionSpec> = mem.regions().copied().collect();
        HostRanges(
            specs
                .iter()
                .map(|s| {
                    let iov = mem.iov(s.guest_phys_addr, s.size as u32).expect("a whole region is a valid buffer");
                    (iov.addr(), iov.addr() + iov.len() as usize)
                })
                .collect(),
        )
    }

    fn check(&self, iov: &Iov, what: &str) {
        let (a, e) = (iov.addr(), iov.addr() + iov.len() as usize);
        assert!(
            self.0.iter().any(|&(s, end)| a >= s && e <= end),
            "{what} {a:#x}+{} is outside guest memory",
            iov.len()
        );
    }
}

pub struct Setup {
    pub size: u16,
    pub features: RingFeatures,
    pub capacity: u64,
}

impl ChainInput {
    pub fn setup(&self) -> Setup {
        Setup {
            size: SIZES[self.size_sel as usize % SIZES.len()],
            features: RingFeatures { indirect: self.features & 1 != 0, event_idx: self.features & 2 != 0 },
            capacity: self.capacity.bytes(),
        }
    }

    pub fn addrs() -> RingAddrs {
        RingAddrs { desc: DESC, avail: AVAIL, used: USED }
    }

    /// Guest memory with everything but the avail entries written.
    pub fn memory(&self, s: &Setup) -> Arc<GuestMemory> {
        let mut files = vec![(
            RegionSpec { guest_phys_addr: 0, size: MEM0, user_addr: 0x7f00_0000_0000, mmap_offset: 0 },
            memfd("vblk-fuzz-chain", MEM0).expect("memfd"),
        )];
        if self.second_region {
            files.push((
                RegionSpec {
                    guest_phys_addr: R1_GPA,
                    size: R1_SIZE,
                    user_addr: 0x7f00_1000_0000,
                    mmap_offset: R1_FILE_OFFSET,
                },
                memfd("vblk-fuzz-chain1", R1_FILE_OFFSET + R1_SIZE).expect("memfd"),
            ));
            files.push((
                RegionSpec { guest_phys_addr: R2_GPA, size: R2_SIZE, user_addr: 0x7f00_2000_0000, mmap_offset: 0 },
                memfd("vblk-fuzz-chain2", R2_SIZE).expect("memfd"),
            ));
        }
        let mem = Arc::new(GuestMemory::from_files(&files).expect("map fuzz memory"));
        let layout = SplitLayout { size: s.size };
        let cap_sectors = s.capacity >> 9;
        // Raw bytes first, then the structured parts on top of them.
        for (at, bytes) in &self.raw {
            let _ = mem.write_at(at.gpa(), bytes);
        }
        for t in &self.tables {
            let base = TABLES + (t.slot as u64 % TABLE_SLOTS) * TABLE_SLOT;
            for (i, d) in t.descs.iter().take((TABLE_SLOT / 16) as usize).enumerate() {
                let _ = mem.write_at(base + 16 * i as u64, &d.descriptor().to_bytes());
            }
        }
        for h in &self.hdrs {
            let hdr = OutHdr { req_type: h.kind.value(), ioprio: h.ioprio, sector: h.sector.value(cap_sectors) };
            let _ = mem.write_at(h.at.gpa(), &hdr.to_bytes());
        }
        for sg in &self.segs {
            let seg =
                DiscardSegment { sector: sg.sector.value(cap_sectors), num_sectors: sg.num_sectors, flags: sg.flags };
            let _ = mem.write_at(sg.at.gpa(), &seg.to_bytes());
        }
        for (i, d) in self.descs.iter().take(s.size as usize).enumerate() {
            mem.write_at(DESC + layout.desc(i as u16) as u64, &d.descriptor().to_bytes()).unwrap();
        }
        mem.write_at(AVAIL, &self.avail_flags.to_le_bytes()).unwrap();
        mem.write_at(AVAIL + 2, &self.base.to_le_bytes()).unwrap();
        mem.write_at(AVAIL + layout.used_event() as u64, &self.used_event.to_le_bytes()).unwrap();
        mem.write_at(USED + 2, &self.used_start.to_le_bytes()).unwrap();
        mem
    }
}

/// The driver side of the avail ring: what the rounds write.
struct AvailWriter {
    layout: SplitLayout,
    idx: u16,
}

impl AvailWriter {
    /// Write the round's entries and its avail idx.
    fn round(&mut self, mem: &GuestMemory, r: &Round) {
        let size = self.layout.size;
        let first = self.idx;
        for &h in r.heads.iter().take(2 * size as usize + 2) {
            let head = if h < 0xf8 { h as u16 % size } else { size + (h - 0xf8) as u16 };
            let off = AVAIL + self.layout.avail_entry(self.idx) as u64;
            mem.write_at(off, &head.to_le_bytes()).unwrap();
            self.idx = self.idx.wrapping_add(1);
        }
        if let Some(j) = r.idx_jump {
            self.idx = first.wrapping_add(j);
        }
        mem.write_at(AVAIL + 2, &self.idx.to_le_bytes()).unwrap();
    }
}

fn read_u16(mem: &GuestMemory, gpa: u64) -> u16 {
    let mut b = [0u8; 2];
    mem.read_at(gpa, &mut b).unwrap();
    u16::from_le_bytes(b)
}

fn read_u32(mem: &GuestMemory, gpa: u64) -> u32 {
    let mut b = [0u8; 4];
    mem.read_at(gpa, &mut b).unwrap();
    u32::from_le_bytes(b)
}

pub fn run(input: &ChainInput) {
    let s = input.setup();
    pass_queue(input, &s);
    pass_pipeline(input, &s);
}

/// Pass 1: pop and parse directly.
fn pass_queue(input: &ChainInput, s: &Setup) {
    let mem = input.memory(s);
    let ranges = HostRanges::of(&mem);
    let layout = SplitLayout { size: s.size };
    let mut q =
        SplitQueue::new(Arc::clone(&mem), s.size as u32, ChainInput::addrs(), AddrSpace::GuestPhysical, s.features)
            .expect("the rings are inside memory");
    q.set_next_avail(input.base);
    let params = DeviceParams::new(s.capacity, input.readonly, 512, "fuzz", 1, s.size);
    let mut avail = AvailWriter { layout, idx: input.base };
    let mut chain = Chain::new();
    // Heads popped and not completed, in pop order.
    let mut outstanding: Vec<u16> = Vec::new();
    let mut signalled: Option<u16> = None;
    let mut used = input.used_start;
    for r in &input.rounds {
        avail.round(&mem, r);
        loop {
            let before = q.next_avail();
            match q.pop(&mut chain) {
                Ok(Popped::Empty) => {
                    assert_eq!(q.next_avail(), before);
                    break;
                }
                Ok(Popped::Chain) => {
                    assert!(chain.head() < s.size);
                    check_chain(&chain, &params, &ranges, s);
                    outstanding.push(chain.head());
                    chain.release();
                }
                Ok(Popped::Refused { head, status, .. }) => {
                    assert!(head < s.size);
                    if let Some(st) = status {
                        assert_eq!(st.iov.len(), 1);
                        ranges.check(&st.iov, "status byte of a refused chain");
                    }
                    outstanding.push(head);
                }
                Err(e) => {
                    assert_eq!(q.broken(), Some(&e));
                    assert!(q.pop(&mut chain).is_err(), "a broken queue stays broken");
                    break;
                }
            }
            assert_eq!(q.next_avail(), before.wrapping_add(1));
            let mut sorted = outstanding.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), outstanding.len(), "a head was handed out twice while in flight");
        }
        assert!(q.num_in_flight() <= s.size);
        assert_eq!(q.num_in_flight() as usize, outstanding.len());
        if r.reap {
            let old = q.next_used();
            assert_eq!(old, used);
            for (i, &h) in outstanding.iter().enumerate() {
                assert!(q.add_used(h, i as u32));
                assert!(!q.add_used(h, 0), "completing twice is refused");
            }
            assert!(!q.add_used(s.size, 0), "out-of-range heads are refused");
            let n = outstanding.len() as u16;
            let event = read_u16(&mem, AVAIL + layout.used_event() as u64);
            let flags = read_u16(&mem, AVAIL);
            let notify = q.publish_used();
            used = used.wrapping_add(n);
            assert_eq!(q.next_used(), used);
            assert_eq!(read_u16(&mem, USED + 2), used, "published used idx");
            for (i, &h) in outstanding.iter().enumerate() {
                let off = USED + layout.used_entry(old.wrapping_add(i as u16)) as u64;
                assert_eq!((read_u32(&mem, off), read_u32(&mem, off + 4)), (h as u32, i as u32), "used element {i}");
            }
            let want = if n == 0 {
                false
            } else if s.features.event_idx {
                match signalled.replace(used) {
                    None => true,
                    Some(prev) => need_event(event, used, prev),
                }
            } else {
                flags & 1 == 0
            };
            assert_eq!(notify, want, "notification decision (event {event}, old {signalled:?}, new {used})");
            outstanding.clear();
            assert_eq!(q.num_in_flight(), 0);
        }
        if r.enable_notification && q.broken().is_none() {
            let more = q.enable_notification().expect("not broken");
            if s.features.event_idx {
                assert_eq!(read_u16(&mem, USED + layout.avail_event() as u64), q.next_avail());
            }
            let idx = read_u16(&mem, AVAIL + 2);
            assert_eq!(more, idx != q.next_avail());
        }
    }
}

/// Everything a validated chain and its parsed request promise.
fn check_chain(chain: &Chain, params: &DeviceParams, ranges: &HostRanges, s: &Setup) {
    let limit = (s.size as usize).max(MAX_INDIRECT_ENTRIES as usize);
    assert!(chain.readable_descs() as usize + chain.writable_descs() as usize <= limit, "chain longer than allowed");
    assert!(chain.readable().len() >= chain.readable_descs() as usize);
    assert!(chain.writable().len() >= chain.writable_descs() as usize);
    for iov in chain.readable().iter().chain(chain.writable()) {
        assert!(!iov.is_empty(), "zero-length buffer accepted");
        ranges.check(iov, "buffer");
    }
    let rl: u64 = chain.readable().iter().map(|i| i.len() as u64).sum();
    let wl: u64 = chain.writable().iter().map(|i| i.len() as u64).sum();
    assert_eq!((rl, wl), (chain.readable_len(), chain.writable_len()));
    // The readable stream reads back whole, in pieces.
    let mut r = chain.reader();
    let mut buf = [0u8; 700];
    while r.remaining() > 0 {
        let n = r.remaining().min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..n]).expect("readable bytes are readable");
    }
    assert!(r.read_exact(&mut [0u8]).is_err());

    let cap = s.capacity >> 9 << 9;
    match parse(chain, params) {
        Parsed::Unanswerable(e) => match e {
            RequestError::NoStatus => assert!(chain.writable().is_empty()),
            other => panic!("unexpected unanswerable error {other:?}"),
        },
        Parsed::Answerable { status, data_in_len, request } => {
            assert_eq!(status.len(), 1);
            ranges.check(&status, "status byte");
            assert_eq!(data_in_len, chain.writable_len() - 1);
            let Ok(req) = request else {
                let e = request.unwrap_err();
                assert!(matches!(e.status(), Status::IoErr | Status::Unsupp));
                if let RequestError::ShortHeader(n) = e {
                    assert_eq!(n, chain.readable_len());
                    assert!(n < OutHdr::SIZE as u64);
                }
                return;
            };
            assert!(chain.readable_len() >= OutHdr::SIZE as u64);
            let in_disk = |offset: u64, len: u64| {
                assert_eq!(offset % 512, 0);
                assert_eq!(len % 512, 0);
                assert!(offset.checked_add(len).is_some_and(|e| e <= cap), "{offset}+{len} outside disk {cap}");
            };
            match req {
                Request::Read { offset, len } => {
                    assert_eq!(len, data_in_len);
                    in_disk(offset, len);
                    assert!(chain.writable_descs() as u32 <= MAX_DATA_SEGMENTS + 1);
                }
                Request::Write { offset, len } => {
                    assert!(!params.readonly);
                    assert_eq!(len, chain.readable_len() - OutHdr::SIZE as u64);
                    in_disk(offset, len);
                    assert!(chain.readable_descs() as u32 <= MAX_DATA_SEGMENTS + 1);
                }
                Request::Flush => {}
                Request::GetId { len } => assert!(len as usize <= ID_BYTES && len as u64 <= data_in_len),
                Request::Discard { offset, len } | Request::WriteZeroes { offset, len, .. } => {
                    assert!(!params.readonly);
                    in_disk(offset, len);
                    assert!(len <= (MAX_DISCARD_SECTORS as u64) << 9);
                }
            }
            let mut bufs = Vec::new();
            data_buffers(chain, &req, &mut bufs);
            let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
            match req {
                Request::Read { len, .. } | Request::Write { len, .. } => assert_eq!(total, len, "data buffers"),
                _ => assert_eq!(total, 0),
            }
            for b in &bufs {
                ranges.check(b, "data buffer");
                assert!(!b.is_empty());
            }
        }
    }
}

/// Pass 2: the whole pipeline against a null disk.
fn pass_pipeline(input: &ChainInput, s: &Setup) {
    let mem = input.memory(s);
    let layout = SplitLayout { size: s.size };
    let mut q =
        SplitQueue::new(Arc::clone(&mem), s.size as u32, ChainInput::addrs(), AddrSpace::GuestPhysical, s.features)
            .expect("the rings are inside memory");
    q.set_next_avail(input.base);
    let disk = Arc::new(Disk::null(s.capacity));
    let mut params = DeviceParams::new(s.capacity, input.readonly, 512, "fuzz-serial", 1, s.size);
    params.merge = input.merge;
    let mut io = Engine::new(disk, EngineKind::Auto, s.size as u32).expect("null engine");
    let mut dev = BlkQueue::new(q, Arc::new(params), 0);
    let mut avail = AvailWriter { layout, idx: input.base };
    let mut done = Vec::new();
    let check_counts = |dev: &BlkQueue| {
        let q = dev.queue().as_split().expect("a split ring");
        assert!(q.num_in_flight() <= s.size);
        let popped = q.next_avail().wrapping_sub(input.base);
        let used = q.next_used().wrapping_sub(input.used_start);
        assert_eq!(popped.wrapping_sub(used), q.num_in_flight(), "popped - used != in flight");
    };
    for r in &input.rounds {
        avail.round(&mem, r);
        let res = dev.process_available(&mut io);
        if let Err(e) = &res {
            assert_eq!(dev.queue().broken(), Some(e));
        }
        check_counts(&dev);
        if r.reap {
            io.reap(&mut done);
            for c in done.drain(..) {
                dev.complete(c);
            }
            check_counts(&dev);
        }
        let _ = dev.publish();
        if r.enable_notification && dev.queue().broken().is_none() {
            let _ = dev.enable_notification();
        }
    }
    // Drain: the null disk completes everything it was given.
    io.reap(&mut done);
    for c in done.drain(..) {
        dev.complete(c);
    }
    let _ = dev.publish();
    check_counts(&dev);
    assert_eq!(io.in_flight(), 0);
    // Every chain ends with a status or the queue broken: the one chain that broke it for
    // having no status byte is the only one allowed to stay unanswered.
    let unanswerable = matches!(dev.queue().broken(), Some(QueueError::NoStatus { .. })) as u16;
    assert_eq!(
        dev.in_flight(),
        unanswerable,
        "requests popped but never completed after all I/O drained (queue broken: {:?})",
        dev.queue().broken()
    );
}
