//! The driver's "guest memory": one memfd shared with the backend, holding every ring,
//! every request's header and status byte, and a pool of I/O buffers (zero copy: the
//! backend reads and writes the buffers in place).
//!
//! ```text
//! per queue q:  [ desc table | avail ring | used ring | slot 0 | slot 1 | ... ]   (page aligned)
//!   packed:     [ descriptor ring | driver event | device event | slot 0 | ... ]
//!               (16 * size, 16-aligned; 4 bytes; 4 bytes: virtio 1.2 §2.8.10)
//!               slot h (128 B, for the request whose head descriptor, or packed buffer
//!               id, is h):
//!                 0..16 outhdr   16 status   32..48 discard segment   64..112 indirect table
//! data pool:    4 KiB-aligned extents handed out as IoBuf
//! ```

use std::fs::File;
use std::sync::{Arc, Mutex};

use vblk_queue::layout::{DESC_SIZE, PACKED_EVENT_LEN};
use vblk_queue::{RingAddrs, RingKind, SplitLayout};
use vblk_virtio::memory::memfd;
use vblk_virtio::{GuestMemory, RegionSpec};

use crate::DriverError;

/// Bytes of per-request control data (header, status, segment, indirect table).
pub const SLOT_SIZE: u64 = 128;
pub const SLOT_HDR: u64 = 0;
pub const SLOT_STATUS: u64 = 16;
pub const SLOT_SEGMENT: u64 = 32;
pub const SLOT_TABLE: u64 = 64;
const PAGE: u64 = 4096;
/// The frontend-virtual address the backend is told region 0 starts at.
pub const USER_ADDR_BASE: u64 = 0x7f00_0000_0000;

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Where everything lives in the shared memory.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub queue_size: u16,
    pub num_queues: u16,
    pub ring: RingKind,
    per_queue: u64,
    slots_off: u64,
    pub data_off: u64,
    pub total: u64,
}

impl Layout {
    pub fn new(num_queues: u16, queue_size: u16, data_size: u64, ring: RingKind) -> Self {
        let rings = Self::ring_offsets(ring, queue_size);
        let slots_off = align_up(rings.used + Self::used_len(ring, queue_size), 64);
        let per_queue = align_up(slots_off + SLOT_SIZE * queue_size as u64, PAGE);
        let data_off = align_up(per_queue * num_queues as u64, PAGE);
        Layout {
            queue_size,
            num_queues,
            ring,
            per_queue,
            slots_off,
            data_off,
            total: data_off + align_up(data_size.max(PAGE), PAGE),
        }
    }

    /// The ring's parts from the start of a queue's area. Packed: `avail` is the driver
    /// event area, `used` the device event area (what `SET_VRING_ADDR` carries there).
    fn ring_offsets(ring: RingKind, size: u16) -> RingAddrs {
        match ring {
            RingKind::Split => {
                let l = SplitLayout { size };
                RingAddrs { desc: 0, avail: l.desc_table_len(), used: align_up(l.desc_table_len() + l.avail_len(), 4) }
            }
            RingKind::Packed => {
                let ring_len = DESC_SIZE as u64 * size as u64;
                RingAddrs { desc: 0, avail: ring_len, used: ring_len + PACKED_EVENT_LEN }
            }
        }
    }

    fn used_len(ring: RingKind, size: u16) -> u64 {
        match ring {
            RingKind::Split => SplitLayout { size }.used_len(),
            RingKind::Packed => PACKED_EVENT_LEN,
        }
    }

    pub fn rings(&self, q: u16) -> RingAddrs {
        let base = self.per_queue * q as u64;
        let r = Self::ring_offsets(self.ring, self.queue_size);
        RingAddrs { desc: base + r.desc, avail: base + r.avail, used: base + r.used }
    }

    /// Guest-physical address of `head`'s slot in queue `q`.
    pub fn slot(&self, q: u16, head: u16) -> u64 {
        self.per_queue * q as u64 + self.slots_off + SLOT_SIZE * head as u64
    }
}

/// The shared memory and its buffer pool.
pub struct SharedMemory {
    pub(crate) mem: Arc<GuestMemory>,
    pub(crate) file: File,
    pub(crate) layout: Layout,
    pool: Mutex<Vec<(u64, u64)>>,
}

impl SharedMemory {
    pub fn new(layout: Layout) -> Result<Arc<Self>, DriverError> {
        let file = memfd("vblk-driver", layout.total).map_err(DriverError::Memfd)?;
        let spec = RegionSpec { guest_phys_addr: 0, size: layout.total, user_addr: USER_ADDR_BASE, mmap_offset: 0 };
        let mem = GuestMemory::from_files(&[(spec, file.try_clone().map_err(DriverError::Memfd)?)])?;
        let pool = vec![(layout.data_off, layout.total - layout.data_off)];
        Ok(Arc::new(SharedMemory { mem: Arc::new(mem), file, layout, pool: Mutex::new(pool) }))
    }

    pub fn spec(&self) -> RegionSpec {
        RegionSpec { guest_phys_addr: 0, size: self.layout.total, user_addr: USER_ADDR_BASE, mmap_offset: 0 }
    }

    /// Allocate a 4 KiB-aligned buffer of `len` bytes from the pool.
    pub fn alloc(self: &Arc<Self>, len: u32) -> Result<IoBuf, DriverError> {
        if len == 0 {
            return Err(DriverError::BufferSize(0));
        }
        let want = align_up(len as u64, PAGE);
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let i = pool.iter().position(|&(_, l)| l >= want).ok_or(DriverError::OutOfBufferMemory(len))?;
        let (off, l) = pool[i];
        if l == want {
            pool.remove(i);
        } else {
            pool[i] = (off + want, l - want);
        }
        Ok(IoBuf { shared: Arc::clone(self), gpa: off, len, cap: want })
    }

    fn free(&self, gpa: u64, cap: u64) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let i = pool.partition_point(|&(o, _)| o < gpa);
        pool.insert(i, (gpa, cap));
        // Merge with the next, then the previous extent.
        if i + 1 < pool.len() && pool[i].0 + pool[i].1 == pool[i + 1].0 {
            pool[i].1 += pool[i + 1].1;
            pool.remove(i + 1);
        }
        if i > 0 && pool[i - 1].0 + pool[i - 1].1 == pool[i].0 {
            pool[i - 1].1 += pool[i].1;
            pool.remove(i);
        }
    }

    pub(crate) fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), DriverError> {
        Ok(self.mem.read_at(gpa, out)?)
    }

    pub(crate) fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DriverError> {
        Ok(self.mem.write_at(gpa, data)?)
    }
}

/// An I/O buffer in memory the backend can see. Given to a request and handed back
/// with its completion; returned to the pool when dropped.
pub struct IoBuf {
    shared: Arc<SharedMemory>,
    gpa: u64,
    len: u32,
    cap: u64,
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf {{ gpa: {:#x}, len: {} }}", self.gpa, self.len)
    }
}

impl IoBuf {
    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Guest-physical address of the first byte (what goes into a descriptor).
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Use only the first `len` bytes (at most the allocated capacity).
    pub fn set_len(&mut self, len: u32) -> Result<(), DriverError> {
        if len == 0 || len as u64 > self.cap {
            return Err(DriverError::BufferSize(len));
        }
        self.len = len;
        Ok(())
    }

    /// Copy `data` into the buffer at `offset`.
    pub fn write_at(&self, offset: u32, data: &[u8]) -> Result<(), DriverError> {
        if offset as u64 + data.len() as u64 > self.len as u64 {
            return Err(DriverError::BufferSize(offset + data.len() as u32));
        }
        self.shared.write(self.gpa + offset as u64, data)
    }

    /// Copy bytes out of the buffer at `offset`.
    pub fn read_at(&self, offset: u32, out: &mut [u8]) -> Result<(), DriverError> {
        if offset as u64 + out.len() as u64 > self.len as u64 {
            return Err(DriverError::BufferSize(offset + out.len() as u32));
        }
        self.shared.read(self.gpa + offset as u64, out)
    }

    /// The whole buffer as a new Vec.
    pub fn to_vec(&self) -> Result<Vec<u8>, DriverError> {
        let mut v = vec![0u8; self.len as usize];
        self.read_at(0, &mut v)?;
        Ok(v)
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        self.shared.free(self.gpa, self.cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_reused_and_merged() {
        let layout = Layout::new(1, 8, 64 << 10, RingKind::Split);
        let m = SharedMemory::new(layout).unwrap();
        let a = m.alloc(100).unwrap();
        let b = m.alloc(8192).unwrap();
        assert_eq!(a.gpa() % 4096, 0);
        assert_eq!(b.gpa(), a.gpa() + 4096);
        assert!(m.alloc(64 << 10).is_err(), "pool exhausted");
        a.write_at(0, b"hello").unwrap();
        assert!(a.write_at(98, b"xyz").is_err(), "past the end");
        let mut out = [0u8; 5];
        a.read_at(0, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        drop(a);
        drop(b);
        assert!(m.alloc(64 << 10).is_ok(), "extents merged back");
    }

    #[test]
    fn queue_areas_do_not_overlap() {
        for (kind, size) in [(RingKind::Split, 256), (RingKind::Packed, 256), (RingKind::Packed, 3)] {
            let l = Layout::new(4, size, 1 << 20, kind);
            for q in 0..4 {
                let r = l.rings(q);
                assert!(r.desc < r.avail && r.avail < r.used && r.used < l.slot(q, 0));
                assert!(l.slot(q, size - 1) + SLOT_SIZE <= if q < 3 { l.rings(q + 1).desc } else { l.data_off });
            }
        }
    }

    #[test]
    fn a_packed_ring_is_a_descriptor_ring_and_two_event_areas() {
        let l = Layout::new(2, 3, 1 << 20, RingKind::Packed);
        let r = l.rings(1);
        assert_eq!(r.desc % 4096, 0);
        assert_eq!((r.avail - r.desc, r.used - r.desc), (48, 52));
        assert!(l.slot(1, 0) >= r.used + 4);
    }
}
