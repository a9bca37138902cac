//! Device-side ring tests against a driver-side ring written by hand into test memory.

use super::*;
use crate::layout::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use vblk_virtio::memory::memfd;
use vblk_virtio::RegionSpec;

const MEM_SIZE: u64 = 1 << 20;
const DATA: u64 = 0x80000;

/// A driver-side view of a ring in a 1 MiB memfd at guest address 0.
struct TestRing {
    mem: Arc<GuestMemory>,
    layout: SplitLayout,
    addrs: RingAddrs,
    avail_idx: u16,
}

impl TestRing {
    fn new(size: u16) -> Self {
        let spec = RegionSpec { guest_phys_addr: 0, size: MEM_SIZE, user_addr: 0x7f00_0000_0000, mmap_offset: 0 };
        let mem = Arc::new(GuestMemory::from_files(&[(spec, memfd("ring", MEM_SIZE).unwrap())]).unwrap());
        let layout = SplitLayout::new(size as u32).unwrap();
        let desc = 0x1000;
        let avail = desc + layout.desc_table_len();
        let used = (avail + layout.avail_len() + 3) & !3;
        TestRing { mem, layout, addrs: RingAddrs { desc, avail, used }, avail_idx: 0 }
    }

    fn queue(&self, features: RingFeatures) -> SplitQueue {
        SplitQueue::new(self.mem.clone(), self.layout.size as u32, self.addrs, AddrSpace::GuestPhysical, features)
            .unwrap()
    }

    fn set_desc(&self, i: u16, d: Descriptor) {
        self.mem.write_at(self.addrs.desc + self.layout.desc(i) as u64, &d.to_bytes()).unwrap();
    }

    fn write_u16(&self, gpa: u64, v: u16) {
        self.mem.write_at(gpa, &v.to_le_bytes()).unwrap();
    }

    fn read_u16(&self, gpa: u64) -> u16 {
        let mut b = [0u8; 2];
        self.mem.read_at(gpa, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    fn read_u32(&self, gpa: u64) -> u32 {
        let mut b = [0u8; 4];
        self.mem.read_at(gpa, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn push_avail(&mut self, head: u16) {
        self.write_u16(self.addrs.avail + self.layout.avail_entry(self.avail_idx) as u64, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write_u16(self.addrs.avail + 2, self.avail_idx);
    }

    fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.write_u16(self.addrs.avail + 2, idx);
    }

    fn used_idx(&self) -> u16 {
        self.read_u16(self.addrs.used + 2)
    }

    fn used_elem(&self, i: u16) -> (u32, u32) {
        let off = self.addrs.used + self.layout.used_entry(i) as u64;
        (self.read_u32(off), self.read_u32(off + 4))
    }

    /// A three-descriptor request at `head`: 16 readable, `data` bytes (writable or not), 1 writable.
    fn request(&self, head: u16, data: u32, data_writable: bool) {
        let f = if data_writable { DESC_F_WRITE } else { 0 };
        self.set_desc(head, Descriptor { addr: DATA, len: 16, flags: DESC_F_NEXT, next: head + 1 });
        self.set_desc(head + 1, Descriptor { addr: DATA + 0x1000, len: data, flags: DESC_F_NEXT | f, next: head + 2 });
        self.set_desc(head + 2, Descriptor { addr: DATA + 0x3000, len: 1, flags: DESC_F_WRITE, next: 0 });
    }
}

fn refused(q: &mut SplitQueue) -> ChainError {
    let mut c = Chain::new();
    match q.pop(&mut c).unwrap() {
        Popped::Refused { error, .. } => error,
        other => panic!("expected a refused chain, got {other:?}"),
    }
}

#[test]
fn a_chain_is_split_into_readable_and_writable_buffers() {
    let mut r = TestRing::new(8);
    r.request(0, 4096, true);
    r.mem.write_at(DATA, b"0123456789abcdef").unwrap();
    r.push_avail(0);
    let mut q = r.queue(RingFeatures::default());
    let mut c = Chain::new();
    assert_eq!(q.pop(&mut c).unwrap(), Popped::Chain);
    assert_eq!(c.head(), 0);
    assert_eq!((c.readable_len(), c.writable_len()), (16, 4097));
    let mut hdr = [0u8; 16];
    c.reader().read_exact(&mut hdr).unwrap();
    assert_eq!(&hdr, b"0123456789abcdef");
    let mut w = c.writer();
    w.skip(4096).unwrap();
    w.write_all(&[7]).unwrap();
    assert!(w.write_all(&[7]).is_err(), "no room past the status byte");
    assert_eq!(q.pop(&mut c).unwrap(), Popped::Empty);
    assert_eq!(q.num_in_flight(), 1);

    assert!(q.add_used(0, 4097));
    assert!(!q.add_used(0, 1), "completing twice is refused");
    assert!(q.publish_used(), "no suppression: notify");
    assert_eq!(r.used_idx(), 1);
    assert_eq!(r.used_elem(0), (0, 4097));
    let mut s = [0u8];
    r.mem.read_at(DATA + 0x3000, &mut s).unwrap();
    assert_eq!(s[0], 7);
}

#[test]
fn a_header_split_over_descriptors_reads_as_one_stream() {
    let mut r = TestRing::new(8);
    r.set_desc(0, Descriptor { addr: DATA, len: 5, flags: DESC_F_NEXT, next: 1 });
    r.set_desc(1, Descriptor { addr: DATA + 0x100, len: 11, flags: DESC_F_NEXT, next: 2 });
    r.set_desc(2, Descriptor { addr: DATA + 0x200, len: 1, flags: DESC_F_WRITE, next: 0 });
    r.mem.write_at(DATA, b"01234").unwrap();
    r.mem.write_at(DATA + 0x100, b"56789abcdef").unwrap();
    r.push_avail(0);
    let mut q = r.queue(RingFeatures::default());
    let mut c = Chain::new();
    assert_eq!(q.pop(&mut c).unwrap(), Popped::Chain);
    let mut hdr = [0u8; 16];
    let mut rd = c.reader();
    rd.read_exact(&mut hdr).unwrap();
    assert_eq!(&hdr, b"0123456789abcdef");
    assert_eq!(rd.remaining(), 0);
}

#[test]
fn indirect_tables_are_walked_when_negotiated() {
    let mut r = TestRing::new(8);
    let table = DATA + 0x8000;
    let descs = [
        Descriptor { addr: DATA, len: 16, flags: DESC_F_NEXT, next: 1 },
        Descriptor { addr: DATA + 0x1000, len: 512, flags: DESC_F_NEXT, next: 2 },
        Descriptor { addr: DATA + 0x3000, len: 1, flags: DESC_F_WRITE, next: 0 },
    ];
    for (i, d) in descs.iter().enumerate() {
        r.mem.write_at(table + 16 * i as u64, &d.to_bytes()).unwrap();
    }
    r.set_desc(3, Descriptor { addr: table, len: 48, flags: DESC_F_INDIRECT, next: 0 });
    r.push_avail(3);
    r.push_avail(3);
    let mut q = r.queue(RingFeatures { indirect: true, event_idx: false });
    let mut c = Chain::new();
    assert_eq!(q.pop(&mut c).unwrap(), Popped::Chain);
    assert_eq!((c.head(), c.readable_len(), c.writable_len()), (3, 528, 1));
    // The same head again while in flight breaks the queue.
    assert_eq!(q.pop(&mut c).unwrap_err(), QueueError::HeadInFlight { head: 3 });

    let mut r2 = TestRing::new(8);
    r2.set_desc(3, Descriptor { addr: table, len: 48, flags: DESC_F_INDIRECT, next: 0 });
    r2.push_avail(3);
    let mut q2 = r2.queue(RingFeatures::default());
    assert_eq!(refused(&mut q2), ChainError::IndirectNotNegotiated);
}

#[test]
fn bad_indirect_tables_are_refused() {
    let feats = RingFeatures { indirect: true, event_idx: false };
    let table = DATA + 0x8000;
    let cases: Vec<(Descriptor, ChainError)> = vec![
        (Descriptor { addr: table, len: 0, flags: DESC_F_INDIRECT, next: 0 }, ChainError::IndirectBadLength(0)),
        (Descriptor { addr: table, len: 24, flags: DESC_F_INDIRECT, next: 0 }, ChainError::IndirectBadLength(24)),
        (
            Descriptor { addr: table, len: 65535 * 16, flags: DESC_F_INDIRECT, next: 0 },
            ChainError::TooLong { limit: MAX_INDIRECT_ENTRIES },
        ),
        (
            Descriptor { addr: MEM_SIZE - 16, len: 32, flags: DESC_F_INDIRECT, next: 0 },
            ChainError::Memory(MemoryError::OutOfRange { addr: MEM_SIZE - 16, len: 32 }),
        ),
        (
            Descriptor { addr: table, len: 16, flags: DESC_F_INDIRECT | DESC_F_NEXT, next: 1 },
            ChainError::IndirectWithNext,
        ),
    ];
    for (d, want) in cases {
        let mut r = TestRing::new(8);
        r.set_desc(0, d);
        r.push_avail(0);
        assert_eq!(refused(&mut r.queue(feats)), want, "{d:?}");
    }
    // Nested table, and a loop inside a table.
    let mut r = TestRing::new(8);
    r.mem.write_at(table, &Descriptor { addr: table, len: 16, flags: DESC_F_INDIRECT, next: 0 }.to_bytes()).unwrap();
    r.set_desc(0, Descriptor { addr: table, len: 16, flags: DESC_F_INDIRECT, next: 0 });
    r.push_avail(0);
    assert_eq!(refused(&mut r.queue(feats)), ChainError::NestedIndirect);
    let mut r = TestRing::new(8);
    r.mem.write_at(table, &Descriptor { addr: DATA, len: 16, flags: DESC_F_NEXT, next: 1 }.to_bytes()).unwrap();
    r.mem.write_at(table + 16, &Descriptor { addr: DATA, len: 16, flags: DESC_F_NEXT, next: 0 }.to_bytes()).unwrap();
    r.set_desc(0, Descriptor { addr: table, len: 32, flags: DESC_F_INDIRECT, next: 0 });
    r.push_avail(0);
    assert_eq!(refused(&mut r.queue(feats)), ChainError::TooLong { limit: 2 });
}

#[test]
fn loops_bad_links_and_bad_buffers_refuse_the_chain_only() {
    let d = |addr, len, flags, next| Descriptor { addr, len, flags, next };
    let cases: Vec<(Vec<Descriptor>, ChainError)> = vec![
        (vec![d(DATA, 16, DESC_F_NEXT, 0)], ChainError::TooLong { limit: 8 }),
        (vec![d(DATA, 16, DESC_F_NEXT, 1), d(DATA, 16, DESC_F_NEXT, 0)], ChainError::TooLong { limit: 8 }),
        (vec![d(DATA, 16, DESC_F_NEXT, 8)], ChainError::NextOutOfRange { next: 8, limit: 8 }),
        (vec![d(DATA, 0, 0, 0)], ChainError::ZeroLength),
        (vec![d(MEM_SIZE, 16, 0, 0)], ChainError::Memory(MemoryError::OutOfRange { addr: MEM_SIZE, len: 16 })),
        (vec![d(MEM_SIZE - 8, 16, 0, 0)], ChainError::Memory(MemoryError::OutOfRange { addr: MEM_SIZE - 8, len: 16 })),
        (vec![d(u64::MAX - 4, 16, 0, 0)], ChainError::Memory(MemoryError::OutOfRange { addr: u64::MAX - 4, len: 16 })),
        (vec![d(DATA, 1, DESC_F_WRITE | DESC_F_NEXT, 1), d(DATA, 16, 0, 0)], ChainError::ReadableAfterWritable),
        (vec![d(DATA, 16, DESC_F_NEXT, 1), d(DATA, 16, DESC_F_INDIRECT, 0)], ChainError::IndirectNotFirst),
    ];
    for (descs, want) in cases {
        let mut r = TestRing::new(8);
        for (i, x) in descs.iter().enumerate() {
            r.set_desc(i as u16, *x);
        }
        r.push_avail(0);
        r.request(4, 512, false);
        r.push_avail(4);
        let mut q = r.queue(RingFeatures { indirect: true, event_idx: false });
        assert_eq!(refused(&mut q), want, "{descs:?}");
        // The refused head is completed with length 0 and the next request still works.
        assert!(q.add_used(0, 0));
        let mut c = Chain::new();
        assert_eq!(q.pop(&mut c).unwrap(), Popped::Chain);
        assert_eq!(c.head(), 4);
    }
}

#[test]
fn a_broken_ring_stops_the_queue() {
    let mut r = TestRing::new(8);
    r.push_avail(8);
    let mut q = r.queue(RingFeatures::default());
    let mut c = Chain::new();
    assert_eq!(q.pop(&mut c).unwrap_err(), QueueError::HeadOutOfRange { head: 8, size: 8 });
    assert!(q.pop(&mut c).is_err(), "stays broken");

    let mut r = TestRing::new(8);
    r.set_avail_idx(9);
    let mut q = r.queue(RingFeatures::default());
    assert_eq!(q.pop(&mut c).unwrap_err(), QueueError::AvailIdxJump { last: 0, now: 9, size: 8 });

    // Exactly `size` outstanding entries is fine, across the u16 wrap.
    let mut r = TestRing::new(8);
    r.set_avail_idx(65533);
    let mut q = r.queue(RingFeatures::default());
    q.set_next_avail(65533);
    for h in 0..8u16 {
        r.set_desc(h, Descriptor { addr: DATA, len: 16, flags: 0, next: 0 });
        r.push_avail(h);
    }
    for _ in 0..8 {
        assert_eq!(q.pop(&mut c).unwrap(), Popped::Chain);
    }
    assert_eq!(q.num_in_flight(), 8);
    assert_eq!(q.pop(&mut c).unwrap(), Popped::Empty);
}

#[test]
fn event_idx_suppresses_notifications_both_ways() {
    let mut r = TestRing::new(8);
    let feats = RingFeatures { indirect: false, event_idx: true };
    for h in [0u16, 3] {
        r.request(h, 512, true);
    }
    let mut q = r.queue(feats);
    let used_event = r.addrs.avail + r.layout.used_event() as u64;
    let avail_event = r.addrs.used + r.layout.avail_event() as u64;

    // Device side: enabling notification publishes avail_event = next avail.
    assert!(!q.enable_notification().unwrap());
    assert_eq!(r.read_u16(avail_event), 0);
    r.push_avail(0);
    r.push_avail(3);
    assert!(q.enable_notification().unwrap(), "work raced with enabling");
    let mut c = Chain::new();
    assert_eq!(q.pop(&mut c).unwrap(), Popped::Chain);
    assert_eq!(q.pop(&mut c).unwrap(), Popped::Chain);
    assert!(!q.enable_notification().unwrap());
    assert_eq!(r.read_u16(avail_event), 2);

    // Driver side: used_event = 1 means "interrupt me when used idx passes 1".
    r.write_u16(used_event, 1);
    q.add_used(0, 1);
    assert!(q.publish_used(), "first publication always notifies");
    q.add_used(3, 1);
    assert!(q.publish_used(), "used idx 1 -> 2 crosses used_event 1");
    r.request(0, 512, true);
    r.push_avail(0);
    assert_eq!(q.pop(&mut c).unwrap(), Popped::Chain);
    q.add_used(0, 1);
    assert!(!q.publish_used(), "2 -> 3 does not cross used_event 1");
    assert!(!q.publish_used(), "nothing new");
}

#[test]
fn no_interrupt_flag_suppresses_without_event_idx() {
    let mut r = TestRing::new(8);
    r.request(0, 512, true);
    r.push_avail(0);
    r.write_u16(r.addrs.avail, AVAIL_F_NO_INTERRUPT);
    let mut q = r.queue(RingFeatures::default());
    let mut c = Chain::new();
    q.pop(&mut c).unwrap();
    q.add_used(0, 1);
    assert!(!q.publish_used());
    assert_eq!(r.used_idx(), 1, "published even when not notifying");
}

#[test]
fn ring_addresses_are_checked() {
    let r = TestRing::new(8);
    let bad = RingAddrs { desc: MEM_SIZE - 64, ..r.addrs };
    assert!(SplitQueue::new(r.mem.clone(), 8, bad, AddrSpace::GuestPhysical, RingFeatures::default()).is_err());
    let misaligned = RingAddrs { used: r.addrs.used + 2, ..r.addrs };
    assert!(SplitQueue::new(r.mem.clone(), 8, misaligned, AddrSpace::GuestPhysical, RingFeatures::default()).is_err());
    for size in [0, 3, 65536] {
        assert!(matches!(
            SplitQueue::new(r.mem.clone(), size, r.addrs, AddrSpace::GuestPhysical, RingFeatures::default()),
            Err(QueueError::InvalidSize(_))
        ));
    }
}

#[test]
fn pop_seen_stops_at_the_last_avail_idx_read() {
    let mut r = TestRing::new(8);
    r.request(0, 512, true);
    r.request(3, 512, true);
    r.push_avail(0);
    let mut q = r.queue(RingFeatures::default());
    let mut c = Chain::new();
    assert_eq!(q.pop_seen(&mut c).unwrap(), Popped::Empty, "nothing seen yet");
    assert_eq!(q.pop(&mut c).unwrap(), Popped::Chain, "pop reads avail.idx");
    assert_eq!(c.head(), 0);
    r.push_avail(3);
    assert_eq!(q.pop_seen(&mut c).unwrap(), Popped::Empty, "made available after the read");
    assert_eq!(q.pop(&mut c).unwrap(), Popped::Chain);
    assert_eq!(c.head(), 3);
    assert_eq!(q.num_in_flight(), 2);
}
