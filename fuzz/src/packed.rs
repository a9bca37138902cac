//! `packed`: the packed ring's pop path against a hostile driver. The fuzzer writes any
//! slots (addresses, lengths, ids, flags with any AVAIL/USED bits), indirect tables and
//! the driver's event suppression structure, in rounds; between rounds the device pops
//! everything it considers available, completes some buffer ids and publishes.
//!
//! Checked: never a panic; every popped chain's buffers lie in guest memory and its id
//! is in range and not already in flight; in-flight ids and slots never exceed the ring;
//! a completion of an id not in flight is refused; once broken, the queue stays broken;
//! and the used descriptors the driver reads back (walking with its own wrap counter)
//! are exactly the completions, in completion order, each skipping the slots its chain
//! took.

use std::sync::Arc;

use vblk_queue::layout::{packed_is_used, PackedDescriptor, RingPos};
use vblk_queue::{AddrSpace, Chain, PackedBase, PackedQueue, Popped, RingAddrs, RingFeatures};
use vblk_virtio::memory::memfd;
use vblk_virtio::{GuestMemory, RegionSpec};

const SIZES: [u16; 6] = [1, 2, 3, 4, 16, 256];
const MEM: u64 = 0x20000;
const RING: u64 = 0x1000;
const DRIVER_EVENT: u64 = 0x100;
const DEVICE_EVENT: u64 = 0x200;
/// Buffers and tables go here (and anywhere else the fuzzer likes).
const DATA: u64 = 0x10000;

#[derive(Debug, arbitrary::Arbitrary)]
pub struct Slot {
    pub slot: u16,
    /// Offset into the data area, or (if `wild`) an address anywhere.
    pub addr: u32,
    pub wild: bool,
    pub len: u32,
    pub id: u16,
    pub flags: u16,
}

#[derive(Debug, arbitrary::Arbitrary)]
pub struct Round {
    pub slots: Vec<Slot>,
    /// Raw bytes into the data area (indirect tables).
    pub data: Vec<(u16, u8)>,
    pub driver_event: Option<(u16, u16)>,
    /// Buffer ids to complete after popping (any value: ids not in flight are refused).
    pub complete: Vec<u16>,
    pub publish: bool,
    pub enable_notification: bool,
}

#[derive(Debug, arbitrary::Arbitrary)]
pub struct PackedInput {
    pub size_sel: u8,
    pub event_idx: bool,
    pub indirect: bool,
    /// A vring base: avail and used positions (indices reduced into the ring).
    pub base: Option<(u16, bool, u16, bool)>,
    pub rounds: Vec<Round>,
}

fn memory() -> Arc<GuestMemory> {
    let spec = RegionSpec { guest_phys_addr: 0, size: MEM, user_addr: 0x7000_0000, mmap_offset: 0 };
    Arc::new(GuestMemory::from_files(&[(spec, memfd("vblk-fuzz-packed", MEM).expect("memfd"))]).expect("map"))
}

fn read_slot(mem: &GuestMemory, i: u16) -> PackedDescriptor {
    let mut b = [0u8; 16];
    mem.read_at(RING + 16 * i as u64, &mut b).expect("slot");
    PackedDescriptor::from_bytes(&b)
}

pub fn run(input: &PackedInput) {
    let size = SIZES[input.size_sel as usize % SIZES.len()];
    let mem = memory();
    let features = RingFeatures { event_idx: input.event_idx, indirect: input.indirect };
    let addrs = RingAddrs { desc: RING, avail: DRIVER_EVENT, used: DEVICE_EVENT };
    let mut q = PackedQueue::new(Arc::clone(&mem), size as u32, addrs, AddrSpace::GuestPhysical, features)
        .expect("a valid ring");
    if let Some((a, aw, u, uw)) = input.base {
        let base = PackedBase { avail: RingPos { idx: a % size, wrap: aw }, used: RingPos { idx: u % size, wrap: uw } };
        q.set_base(base);
    }
    // The driver's model: where it reads used descriptors, and what each id took.
    let mut driver_used = q.base().used;
    let mut slots_of = vec![0u16; size as usize];
    // Completed, not yet published: (id, slots its chain took). The id is free again for
    // the device as soon as it is completed.
    let mut expected: Vec<(u16, u16)> = Vec::new();
    let mut chain = Chain::new();
    let mut broken = false;
    // The fuzzer wrote slots while completions were unpublished: a driver scribbling on
    // slots it does not own may overwrite them, so they are not checked.
    let mut scribbled = false;
    for r in &input.rounds {
        scribbled |= !expected.is_empty() && !r.slots.is_empty();
        for s in &r.slots {
            let addr = if s.wild { s.addr as u64 * 4099 } else { DATA + (s.addr as u64 % (MEM - DATA)) };
            let d = PackedDescriptor { addr, len: s.len, id: s.id, flags: s.flags };
            mem.write_at(RING + 16 * (s.slot % size) as u64, &d.to_bytes()).expect("slot");
        }
        for &(off, b) in &r.data {
            mem.write_at(DATA + off as u64 % (MEM - DATA), &[b]).expect("data");
        }
        if let Some((off_wrap, flags)) = r.driver_event {
            mem.write_at(DRIVER_EVENT, &off_wrap.to_le_bytes()).expect("event");
            mem.write_at(DRIVER_EVENT + 2, &flags.to_le_bytes()).expect("event");
        }
        // Pop everything available.
        loop {
            let before = q.base().avail;
            match q.pop(&mut chain) {
                Ok(Popped::Empty) => break,
                Ok(Popped::Chain) | Ok(Popped::Refused { .. }) => {
                    assert!(!broken, "popped from a broken queue");
                    let id = chain.head();
                    let taken = q.base().avail.distance_from(before, size);
                    assert!(taken >= 1 && taken <= size as u32, "chain took {taken} slots");
                    assert!(id < size);
                    assert_eq!(slots_of[id as usize], 0, "id {id} popped twice");
                    slots_of[id as usize] = taken as u16;
                    for iov in chain.readable().iter().chain(chain.writable()) {
                        assert!(iov.len() > 0);
                        let a = iov.addr();
                        let base = mem.iov(0, 1).expect("region").addr();
                        assert!(a >= base && a + iov.len() as usize <= base + MEM as usize, "iov outside memory");
                    }
                    chain.release();
                }
                Err(_) => {
                    broken = true;
                    assert!(q.pop(&mut chain).is_err(), "a broken queue must stay broken");
                    break;
                }
            }
            assert!(q.num_in_flight() <= size);
            // Popped and not completed (a completed chain's slots hold its used
            // descriptor, which a hostile driver may already overwrite).
            let in_flight: u32 = slots_of.iter().map(|&s| s as u32).sum();
            assert!(in_flight <= size as u32, "{in_flight} slots in flight");
        }
        for &c in &r.complete {
            let in_flight = (c as usize) < slots_of.len() && slots_of[c as usize] != 0;
            assert_eq!(q.add_used(c, 7), in_flight, "completion of id {c}");
            if in_flight {
                expected.push((c, std::mem::take(&mut slots_of[c as usize])));
            }
        }
        if r.publish {
            q.publish_used();
            // The driver reads back exactly the completions, in order.
            for (id, slots) in expected.drain(..) {
                if !scribbled {
                    let d = read_slot(&mem, driver_used.idx);
                    assert!(packed_is_used(d.flags, driver_used.wrap), "used descriptor for {id} not visible");
                    assert_eq!((d.id, d.len), (id, 7));
                }
                driver_used = driver_used.advance(slots, size);
            }
            scribbled = false;
            assert_eq!(driver_used, q.base().used);
        }
        if r.enable_notification {
            let _ = q.enable_notification();
        }
    }
}
