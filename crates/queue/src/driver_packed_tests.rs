//! Tests of the packed ring's driver side against a device emulated by hand: [`Dev`]
//! reads available chains and writes used descriptors straight into the ring memory,
//! following §2.8 literally (and nothing else of this crate but the layout helpers).

use std::sync::Arc;

use vblk_virtio::memory::memfd;
use vblk_virtio::{GuestMemory, RegionSpec};

use super::*;
use crate::layout::{packed_is_avail, packed_used_flags, PACKED_DESC_F_AVAIL, PACKED_DESC_F_USED};

const MEM: u64 = 2 << 20;
const ADDRS: RingAddrs = RingAddrs { desc: 1 << 20, avail: 0x1000, used: 0x1004 };
const TABLE: u64 = 0x2000;

fn memory() -> Arc<GuestMemory> {
    let spec = RegionSpec { guest_phys_addr: 0, size: MEM, user_addr: 0x7000_0000, mmap_offset: 0 };
    Arc::new(GuestMemory::from_files(&[(spec, memfd("drv-packed", MEM).unwrap())]).unwrap())
}

fn queue(size: u16, features: RingFeatures) -> (Arc<GuestMemory>, PackedDriverQueue, Dev) {
    let mem = memory();
    let q = PackedDriverQueue::new(Arc::clone(&mem), size as u32, ADDRS, features).unwrap();
    let dev = Dev { mem: Arc::clone(&mem), size, avail: RingPos::START, used: RingPos::START };
    (mem, q, dev)
}

fn buf(addr: u64, len: u32, write: bool) -> Buffer {
    Buffer { addr, len, write }
}

/// A request of `n` buffers whose addresses say which request and buffer they are.
fn request(tag: u64, n: usize) -> Vec<Buffer> {
    (0..n).map(|i| buf(tag << 8 | i as u64, 512 * (i as u32 + 1), i + 1 == n)).collect()
}

/// The device, by hand.
struct Dev {
    mem: Arc<GuestMemory>,
    size: u16,
    avail: RingPos,
    used: RingPos,
}

/// A chain the emulated device took: its id, the slots it occupied and its descriptors.
#[derive(Debug)]
struct Taken {
    id: u16,
    slots: u16,
    descs: Vec<PackedDescriptor>,
}

impl Dev {
    fn slot(&self, idx: u16) -> PackedDescriptor {
        let mut b = [0u8; DESC_SIZE];
        self.mem.read_at(ADDRS.desc + idx as u64 * DESC_SIZE as u64, &mut b).unwrap();
        PackedDescriptor::from_bytes(&b)
    }

    /// The next available chain, if any (the id from its last descriptor, §2.8.6).
    fn take(&mut self) -> Option<Taken> {
        let head = self.slot(self.avail.idx);
        if !packed_is_avail(head.flags, self.avail.wrap) {
            return None;
        }
        let mut descs = Vec::new();
        loop {
            let d = self.slot(self.avail.idx);
            assert!(packed_is_avail(d.flags, self.avail.wrap), "slot {} of a chain not available", self.avail.idx);
            descs.push(d);
            self.avail = self.avail.advance(1, self.size);
            if !d.has_next() {
                break;
            }
        }
        let id = descs.last().unwrap().id;
        Some(Taken { id, slots: descs.len() as u16, descs })
    }

    /// Write a used descriptor for a chain of `slots` slots (§2.8.7): id and len, then
    /// the flags.
    fn complete(&mut self, id: u16, len: u32, slots: u16) {
        let at = ADDRS.desc + self.used.idx as u64 * DESC_SIZE as u64;
        self.mem.write_at(at + PackedDescriptor::ID as u64, &id.to_le_bytes()).unwrap();
        self.mem.write_at(at + PackedDescriptor::LEN as u64, &len.to_le_bytes()).unwrap();
        self.mem
            .write_at(at + PackedDescriptor::FLAGS as u64, &packed_used_flags(self.used.wrap).to_le_bytes())
            .unwrap();
        self.used = self.used.advance(slots, self.size);
    }

    fn set_device_event(&self, off_wrap: u16, flags: u16) {
        self.mem.write_at(ADDRS.used, &off_wrap.to_le_bytes()).unwrap();
        self.mem.write_at(ADDRS.used + 2, &flags.to_le_bytes()).unwrap();
    }

    /// The driver event suppression structure: `(off_wrap, flags)`.
    fn driver_event(&self) -> (u16, u16) {
        let mut b = [0u8; 4];
        self.mem.read_at(ADDRS.avail, &mut b).unwrap();
        (u16::from_le_bytes([b[0], b[1]]), u16::from_le_bytes([b[2], b[3]]))
    }
}

#[test]
fn add_fills_consecutive_slots_with_the_id_on_each_and_the_lap_flags() {
    let (_mem, mut q, dev) = queue(8, RingFeatures::default());
    let id = q.add(&[buf(0x1_0000, 16, false), buf(0x2_0000, 4096, true), buf(0x3_0000, 1, true)]).unwrap();
    assert_eq!(id, 0);
    let a = PACKED_DESC_F_AVAIL;
    let want = [
        PackedDescriptor { addr: 0x1_0000, len: 16, id, flags: a | DESC_F_NEXT },
        PackedDescriptor { addr: 0x2_0000, len: 4096, id, flags: a | DESC_F_NEXT | DESC_F_WRITE },
        PackedDescriptor { addr: 0x3_0000, len: 1, id, flags: a | DESC_F_WRITE },
    ];
    for (i, w) in want.iter().enumerate() {
        assert_eq!(dev.slot(i as u16), *w, "slot {i}");
    }
    assert_eq!(dev.slot(3), PackedDescriptor::default(), "nothing past the chain");
    assert_eq!((q.num_free(), q.in_flight(), q.next_free()), (5, 1, 1));
    assert_eq!(q.avail_pos(), RingPos { idx: 3, wrap: true });
}

#[test]
fn the_second_lap_flips_the_flags_and_a_chain_may_cross_the_end() {
    let (_mem, mut q, mut dev) = queue(5, RingFeatures::default());
    let a = q.add(&request(1, 3)).unwrap();
    let t = dev.take().unwrap();
    assert_eq!((t.id, t.slots), (a, 3));
    dev.complete(a, 7, 3);
    assert_eq!(q.pop_used().unwrap(), Some((a, 7)));
    // Slots 3, 4 in lap 1, slot 0 in lap 2: AVAIL = wrap, USED = !wrap for each.
    let b = q.add(&request(2, 3)).unwrap();
    assert_eq!(dev.slot(3).flags, PACKED_DESC_F_AVAIL | DESC_F_NEXT);
    assert_eq!(dev.slot(4).flags, PACKED_DESC_F_AVAIL | DESC_F_NEXT);
    assert_eq!(dev.slot(0).flags, PACKED_DESC_F_USED | DESC_F_WRITE);
    assert!([3, 4, 0].iter().all(|&s| dev.slot(s).id == b));
    assert_eq!(q.avail_pos(), RingPos { idx: 1, wrap: false });
    let t = dev.take().unwrap();
    assert_eq!((t.id, t.slots), (b, 3));
    assert_eq!(t.descs.iter().map(|d| d.addr).collect::<Vec<_>>(), [0x200, 0x201, 0x202]);
    dev.complete(b, 0, 3);
    assert_eq!(q.pop_used().unwrap(), Some((b, 0)));
    assert_eq!(q.used_pos(), RingPos { idx: 1, wrap: false });
    assert_eq!(q.num_free(), 5);
}

#[test]
fn a_full_ring_wraps_after_size_slots() {
    let (_mem, mut q, mut dev) = queue(4, RingFeatures::default());
    for lap in 0..4u64 {
        let ids: Vec<u16> = (0..4).map(|i| q.add(&request(lap * 4 + i, 1)).unwrap()).collect();
        assert_eq!(q.num_free(), 0);
        assert!(matches!(q.add(&request(99, 1)), Err(DriverError::Full { free: 0, needed: 1 })));
        let wrap = lap % 2 == 0;
        assert_eq!(q.avail_pos(), RingPos { idx: 0, wrap: !wrap }, "lap {lap}");
        for s in 0..4 {
            assert_eq!(dev.slot(s).flags, packed_avail_flags(wrap) | DESC_F_WRITE);
        }
        while let Some(t) = dev.take() {
            dev.complete(t.id, 0, t.slots);
        }
        for id in ids {
            assert_eq!(q.pop_used().unwrap(), Some((id, 0)));
        }
        assert_eq!(q.pop_used().unwrap(), None);
    }
}

#[test]
fn the_head_slot_flags_are_the_last_thing_the_device_can_see() {
    // A device polling the ring on another thread must never see a head available before
    // the rest of its chain (or the head's own address and id).
    const N: u64 = 20_000;
    let (mem, mut q, _) = queue(7, RingFeatures::default());
    let device = std::thread::spawn(move || {
        let mut dev = Dev { mem, size: 7, avail: RingPos::START, used: RingPos::START };
        let mut seen = 0u64;
        while seen < N {
            let Some(t) = dev.take() else {
                std::hint::spin_loop();
                continue;
            };
            // Request k has (k % 3) + 1 buffers, tagged k.
            let k = t.descs[0].addr >> 8;
            assert_eq!(k, seen, "chains in order");
            assert_eq!(t.descs.len() as u64, k % 3 + 1, "request {k}: {:?}", t.descs);
            for (i, d) in t.descs.iter().enumerate() {
                assert_eq!((d.addr, d.id), (k << 8 | i as u64, t.id), "request {k} slot {i}");
            }
            dev.complete(t.id, k as u32, t.slots);
            seen += 1;
        }
    });
    let (mut sent, mut done) = (0u64, 0u64);
    while done < N {
        while sent < N && q.num_free() as u64 > sent % 3 {
            q.add(&request(sent, (sent % 3 + 1) as usize)).unwrap();
            sent += 1;
        }
        while let Some((_, len)) = q.pop_used().unwrap() {
            assert_eq!(len as u64, done);
            done += 1;
        }
    }
    device.join().unwrap();
    assert_eq!((q.in_flight(), q.num_free()), (0, 7));
}

#[test]
fn used_descriptors_come_back_out_of_order_and_move_by_their_buffers_slots() {
    let (_mem, mut q, mut dev) = queue(8, RingFeatures::default());
    let a = q.add(&request(1, 2)).unwrap();
    let b = q.add(&request(2, 1)).unwrap();
    let c = q.add(&request(3, 3)).unwrap();
    assert_eq!((a, b, c), (0, 1, 2));
    assert_eq!(q.num_free(), 2);
    let taken: Vec<Taken> = std::iter::from_fn(|| dev.take()).collect();
    assert_eq!(taken.iter().map(|t| (t.id, t.slots)).collect::<Vec<_>>(), [(a, 2), (b, 1), (c, 3)]);
    // B first: one used slot at 0, then A at 1 (two slots), then C at 3.
    dev.complete(b, 11, 1);
    assert_eq!(q.pop_used().unwrap(), Some((b, 11)));
    assert_eq!(q.pop_used().unwrap(), None, "A's slot 1 is still as the driver wrote it");
    assert_eq!((q.num_free(), q.in_flight(), q.next_free()), (3, 2, b));
    dev.complete(a, 22, 2);
    dev.complete(c, 33, 3);
    assert_eq!(q.pop_used().unwrap(), Some((a, 22)));
    assert_eq!(q.pop_used().unwrap(), Some((c, 33)));
    assert_eq!(q.used_pos(), RingPos { idx: 6, wrap: true });
    assert_eq!((q.num_free(), q.in_flight()), (8, 0));
    // Freed ids are reused, last freed first.
    assert_eq!(q.add(&request(4, 1)).unwrap(), c);
}

#[test]
fn a_used_descriptor_with_an_id_not_in_flight_is_an_error() {
    let (mem, mut q, mut dev) = queue(4, RingFeatures::default());
    let a = q.add(&request(1, 1)).unwrap();
    // An id never handed out, then one out of range.
    dev.complete(3, 0, 1);
    assert_eq!(q.pop_used(), Err(DriverError::BogusUsed(3)));
    dev.used = RingPos::START;
    dev.complete(700, 0, 1);
    assert_eq!(q.pop_used(), Err(DriverError::BogusUsed(700)));
    // Used flags of the wrong lap are not used.
    mem.write_at(ADDRS.desc + PackedDescriptor::FLAGS as u64, &0u16.to_le_bytes()).unwrap();
    assert_eq!(q.pop_used(), Ok(None));
    dev.used = RingPos::START;
    dev.complete(a, 0, 1);
    assert_eq!(q.pop_used(), Ok(Some((a, 0))));
    // Returning it twice.
    dev.complete(a, 0, 1);
    assert_eq!(q.pop_used(), Err(DriverError::BogusUsed(a as u32)));
}

#[test]
fn indirect_tables_are_consecutive_descriptors_behind_one_slot() {
    let (mem, mut q, mut dev) = queue(4, RingFeatures { indirect: true, event_idx: false });
    let bufs = request(5, 3);
    let id = q.add_indirect(&bufs, TABLE).unwrap();
    assert_eq!(q.num_free(), 3);
    let t = dev.take().unwrap();
    assert_eq!(t.slots, 1);
    assert_eq!(t.descs[0], PackedDescriptor { addr: TABLE, len: 48, id, flags: PACKED_DESC_F_AVAIL | DESC_F_INDIRECT });
    for (i, b) in bufs.iter().enumerate() {
        let mut raw = [0u8; DESC_SIZE];
        mem.read_at(TABLE + 16 * i as u64, &mut raw).unwrap();
        let d = PackedDescriptor::from_bytes(&raw);
        let flags = if b.write { DESC_F_WRITE } else { 0 };
        assert_eq!(d, PackedDescriptor { addr: b.addr, len: b.len, id: 0, flags }, "entry {i}");
    }
    dev.complete(id, 1, 1);
    assert_eq!(q.pop_used().unwrap(), Some((id, 1)));
    assert_eq!(q.add_indirect(&[], TABLE), Err(DriverError::Empty));
    assert_eq!(q.add(&[]), Err(DriverError::Empty));
    assert!(matches!(q.add_indirect(&bufs, MEM - 16), Err(DriverError::Memory(_))), "table outside memory");
    assert_eq!(q.num_free(), 4, "a failed add takes nothing");
}

#[test]
fn kicks_follow_the_device_event_suppression_structure() {
    let (_mem, mut q, dev) = queue(4, RingFeatures { event_idx: true, indirect: false });
    assert!(!q.needs_kick(), "nothing added");
    q.add(&request(1, 1)).unwrap();
    assert!(q.needs_kick(), "ENABLE (zeroed area)");
    assert!(!q.needs_kick(), "nothing new");
    dev.set_device_event(0, EVENT_FLAG_DISABLE);
    q.add(&request(2, 1)).unwrap();
    assert!(!q.needs_kick(), "DISABLE");
    // DESC: kick once the slot at 3 (lap 1) is made available.
    dev.set_device_event(0x8000 | 3, EVENT_FLAG_DESC);
    q.add(&request(3, 1)).unwrap(); // slot 2
    assert!(!q.needs_kick());
    q.add(&request(4, 1)).unwrap(); // slot 3
    assert!(q.needs_kick());
    // Lap 0 has the wrap bit clear: ask for slot 1 of lap 0.
    let mut dev = dev;
    let drain = |q: &mut PackedDriverQueue, dev: &mut Dev| {
        while let Some(t) = dev.take() {
            dev.complete(t.id, 0, t.slots);
        }
        while q.pop_used().unwrap().is_some() {}
    };
    drain(&mut q, &mut dev);
    dev.set_device_event(1, EVENT_FLAG_DESC);
    q.add(&request(5, 1)).unwrap(); // slot 0 of lap 0
    assert!(!q.needs_kick(), "slot 1 not yet reached");
    q.add(&request(6, 2)).unwrap(); // slots 1, 2
    assert!(q.needs_kick());
    // Across the end of the ring: ask for slot 0 of lap 1; a chain over slots 3 and 0
    // crosses it.
    drain(&mut q, &mut dev);
    dev.set_device_event(0x8000, EVENT_FLAG_DESC);
    q.add(&request(7, 2)).unwrap();
    assert_eq!(q.avail_pos(), RingPos { idx: 1, wrap: true });
    assert!(q.needs_kick());
    // DESC without EVENT_IDX negotiated: kick rather than stall.
    let (_m, mut q, dev) = queue(4, RingFeatures::default());
    dev.set_device_event(0x8000 | 3, EVENT_FLAG_DESC);
    q.add(&request(1, 1)).unwrap();
    assert!(q.needs_kick());
}

#[test]
fn interrupt_suppression_encodings() {
    let (_mem, mut q, mut dev) = queue(4, RingFeatures { event_idx: true, indirect: false });
    assert_eq!(dev.driver_event(), (0, EVENT_FLAG_ENABLE));
    assert!(!q.enable_interrupts());
    assert_eq!(dev.driver_event(), (0x8000, EVENT_FLAG_DESC), "slot 0, lap 1");
    assert!(!q.enable_interrupts_after(3));
    assert_eq!(dev.driver_event(), (0x8002, EVENT_FLAG_DESC));
    q.disable_interrupts();
    assert_eq!(dev.driver_event().1, EVENT_FLAG_DISABLE);
    // Used position at 3 (lap 1): 2 ahead is slot 0 of lap 0.
    for i in 0..3 {
        let id = q.add(&request(i, 1)).unwrap();
        dev.take().unwrap();
        dev.complete(id, 0, 1);
        q.pop_used().unwrap().unwrap();
    }
    assert!(!q.enable_interrupts_after(2));
    assert_eq!(dev.driver_event(), (0, EVENT_FLAG_DESC));
    // n is clamped to the ring: at most `size - 1` slots ahead.
    assert!(!q.enable_interrupts_after(100));
    assert_eq!(dev.driver_event(), (2, EVENT_FLAG_DESC));
    // Ready: true once n buffers are used (a two-slot chain counts once).
    let a = q.add(&request(10, 2)).unwrap();
    let b = q.add(&request(11, 1)).unwrap();
    dev.take().unwrap();
    dev.take().unwrap();
    dev.complete(a, 0, 2);
    assert!(q.enable_interrupts_after(1));
    assert!(!q.enable_interrupts_after(2));
    dev.complete(b, 0, 1);
    assert!(q.enable_interrupts_after(2));

    let (_mem, mut q, _dev) = queue(4, RingFeatures::default());
    let dev = Dev { mem: _mem, size: 4, avail: RingPos::START, used: RingPos::START };
    q.disable_interrupts();
    assert_eq!(dev.driver_event(), (0, EVENT_FLAG_DISABLE));
    assert!(!q.enable_interrupts_after(3));
    assert_eq!(dev.driver_event(), (0, EVENT_FLAG_ENABLE), "no EVENT_IDX: ENABLE, no offset");
}

#[test]
fn packed_sizes_need_not_be_powers_of_two() {
    for bad in [0, 32769, 65536] {
        assert!(matches!(
            PackedDriverQueue::new(memory(), bad, ADDRS, RingFeatures::default()),
            Err(DriverError::InvalidPackedSize(b)) if b == bad
        ));
    }
    for size in [1u16, 2, 3, 5, 100, 32768] {
        let (_mem, q, _dev) = queue(size, RingFeatures::default());
        assert_eq!((q.size(), q.num_free(), q.next_free()), (size, size, 0));
    }
}

/// Run `total` requests through a ring of `size` slots: requests of 1..=max_bufs buffers
/// (or indirect), as many in flight as fit, completed by the device in a shuffled order.
/// Returns how many laps the avail position made.
fn run(size: u16, total: u64, max_bufs: usize, indirect: bool) -> u64 {
    let (_mem, mut q, mut dev) = queue(size, RingFeatures { indirect, event_idx: true });
    let mut expect: Vec<Option<u64>> = vec![None; size as usize];
    let (mut sent, mut done, mut laps) = (0u64, 0u64, 0u64);
    let mut taken: Vec<Taken> = Vec::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    while done < total {
        loop {
            let n = (sent % max_bufs as u64) as usize + 1;
            let need = if indirect { 1 } else { n };
            if sent == total || (q.num_free() as usize) < need {
                break;
            }
            let before = q.avail_pos().wrap;
            // Each id has its own table (the device reads it after the add).
            let table = TABLE + q.next_free() as u64 * 16 * max_bufs as u64;
            let id =
                if indirect { q.add_indirect(&request(sent, n), table) } else { q.add(&request(sent, n)) }.unwrap();
            assert!(expect[id as usize].replace(sent).is_none(), "id {id} handed out twice");
            laps += (q.avail_pos().wrap != before) as u64;
            sent += 1;
        }
        taken.extend(std::iter::from_fn(|| dev.take()));
        // The device completes a random part of what it holds, in a random order.
        let mut k = 0;
        while k < taken.len() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if !rng.is_multiple_of(3) {
                let t = taken.swap_remove(k);
                let mut first = t.descs[0];
                if first.is_indirect() {
                    let mut b = [0u8; DESC_SIZE];
                    dev.mem.read_at(first.addr, &mut b).unwrap();
                    first = PackedDescriptor::from_bytes(&b);
                }
                let tag = first.addr >> 8;
                dev.complete(t.id, tag as u32, t.slots);
            } else {
                k += 1;
            }
        }
        while let Some((id, len)) = q.pop_used().unwrap() {
            let tag = expect[id as usize].take().expect("reaped an id not in flight");
            assert_eq!(len as u64, tag & 0xffff_ffff, "id {id} came back with another request's length");
            done += 1;
        }
        assert_eq!(q.in_flight() as usize, expect.iter().flatten().count());
    }
    assert_eq!((q.in_flight(), q.num_free()), (0, size));
    laps
}

#[test]
fn tiny_rings_run_long() {
    assert!(run(1, 1000, 1, false) >= 999);
    assert!(run(2, 5000, 2, false) > 1000);
    assert!(run(3, 70_000, 3, false) > 30_000);
    assert!(run(3, 10_000, 4, true) > 3000);
}

#[test]
fn a_long_run_past_65536_requests_and_many_laps() {
    // 16-bit request counters and ring positions wrap many times over.
    assert!(run(5, 200_000, 3, false) > 10_000);
    assert!(run(256, 150_000, 4, false) > 500);
    assert!(run(255, 100_000, 2, true) > 300);
}

#[test]
fn the_largest_ring() {
    assert!(run(32768, 100_000, 3, false) >= 6);
}

#[test]
fn the_watch_finds_the_device_used_position_past_what_was_reaped() {
    let (_mem, mut q, mut dev) = queue(6, RingFeatures::default());
    let watch = q.watch();
    assert_eq!(watch.device_used().unwrap(), RingPos::START);
    let a = q.add(&request(1, 2)).unwrap();
    let b = q.add(&request(2, 3)).unwrap();
    let c = q.add(&request(3, 1)).unwrap();
    while dev.take().is_some() {}
    dev.complete(b, 0, 3);
    dev.complete(a, 0, 2);
    // Nothing reaped: the device is 5 slots ahead of the driver.
    assert_eq!(watch.device_used().unwrap(), RingPos { idx: 5, wrap: true });
    assert_eq!(q.pop_used().unwrap(), Some((b, 0)));
    assert_eq!(watch.device_used().unwrap(), RingPos { idx: 5, wrap: true });
    dev.complete(c, 0, 1);
    assert_eq!(watch.device_used().unwrap(), RingPos { idx: 0, wrap: false });
    while q.pop_used().unwrap().is_some() {}
    assert_eq!(watch.device_used().unwrap(), q.used_pos());
    // A device naming an id not in flight.
    dev.complete(4, 0, 1);
    assert_eq!(watch.device_used(), Err(DriverError::BogusUsed(4)));
}
