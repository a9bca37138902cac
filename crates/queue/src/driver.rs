//! The split virtqueue, driver side (virtio 1.2 §2.7.13): what the guest's `virtio_ring.c`
//! does for `virtio_blk` — put a request's buffers in descriptors, publish the head in
//! the available ring, kick only when the device asked for it, and reap the used ring.
//!
//! Used by vblk's userspace driver and by the device side's tests. The device is not
//! trusted either: a used entry naming a head that is not in flight is an error.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use vblk_virtio::{GuestArea, GuestMemory};

use crate::layout::{Descriptor, SplitLayout, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use crate::layout::{AVAIL_ALIGN, AVAIL_F_NO_INTERRUPT, DESC_ALIGN, USED_ALIGN, USED_F_NO_NOTIFY};
use crate::split::{RingAddrs, RingFeatures};
use crate::{need_event, QueueError};

/// One buffer of a request, in guest-physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (read data, status byte).
    pub write: bool,
}

/// Errors of the driver side.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DriverError {
    #[error("not enough free descriptors ({free} free, {needed} needed)")]
    Full { free: u16, needed: u16 },
    #[error("a request needs at least one buffer")]
    Empty,
    #[error("the device returned head {0}, which is not in flight")]
    BogusUsed(u32),
    #[error("the device moved the used index by {0}, more than the queue size")]
    UsedIdxJump(u16),
    #[error("packed queue size {0} is not in 1..=32768")]
    InvalidPackedSize(u32),
    #[error("the device's used descriptors cover more than the ring's {0} slots")]
    UsedOverrun(u16),
    #[error("the ring kept changing while its used position was read")]
    RingBusy,
    #[error("ring setup: {0}")]
    Queue(#[from] QueueError),
    #[error("indirect table: {0}")]
    Memory(#[from] vblk_virtio::MemoryError),
}

/// Driver side of a split virtqueue whose rings live in `mem` (guest-physical addresses).
pub struct DriverQueue {
    layout: SplitLayout,
    features: RingFeatures,
    mem: Arc<GuestMemory>,
    desc: GuestArea,
    avail: GuestArea,
    used: GuestArea,
    /// Free descriptors, linked through `free_next`.
    free_head: u16,
    num_free: u16,
    free_next: Vec<u16>,
    /// Descriptors used by each in-flight head (0 = not in flight).
    chain_len: Vec<u16>,
    /// The next descriptor of each in-flight chain, as *we* linked it (Linux's
    /// `desc_extra`): the descriptor table is shared memory the device can write, so its
    /// `next` fields are never read back.
    chain_next: Vec<u16>,
    /// Next avail index to write; `published` is what the device can see.
    avail_idx: u16,
    published: u16,
    /// `avail.idx` at the last kick decision.
    kicked: u16,
    last_used: u16,
    /// Reused buffer for building indirect tables (no allocation per request).
    table_scratch: Vec<u8>,
}

impl DriverQueue {
    /// Lay out a fresh ring of `size` entries at `addrs` (zeroing it).
    pub fn new(
        mem: Arc<GuestMemory>,
        size: u32,
        addrs: RingAddrs,
        features: RingFeatures,
    ) -> Result<Self, DriverError> {
        let layout = SplitLayout::new(size).ok_or(QueueError::InvalidSize(size))?;
        let desc = mem.area_at_gpa(addrs.desc, layout.desc_table_len(), DESC_ALIGN).map_err(QueueError::from)?;
        let avail = mem.area_at_gpa(addrs.avail, layout.avail_len(), AVAIL_ALIGN).map_err(QueueError::from)?;
        let used = mem.area_at_gpa(addrs.used, layout.used_len(), USED_ALIGN).map_err(QueueError::from)?;
        for area in [&desc, &avail, &used] {
            area.write(0, &vec![0u8; area.len()]);
        }
        let n = layout.size;
        Ok(DriverQueue {
            layout,
            features,
            mem,
            desc,
            avail,
            used,
            free_head: 0,
            num_free: n,
            free_next: (1..=n).collect(),
            chain_len: vec![0; n as usize],
            chain_next: vec![0; n as usize],
            avail_idx: 0,
            published: 0,
            kicked: 0,
            last_used: 0,
            table_scratch: Vec::new(),
        })
    }

    pub fn size(&self) -> u16 {
        self.layout.size
    }

    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// The descriptor the next [`add`](Self::add) or [`add_indirect`](Self::add_indirect)
    /// will use as its head (meaningful while `num_free() > 0`).
    pub fn next_free(&self) -> u16 {
        self.free_head
    }

    pub fn in_flight(&self) -> u16 {
        self.chain_len.iter().filter(|&&n| n != 0).count() as u16
    }

    fn alloc(&mut self) -> u16 {
        let d = self.free_head;
        self.free_head = self.free_next[d as usize];
        self.num_free -= 1;
        d
    }

    fn write_desc(&self, i: u16, d: Descriptor) {
        self.desc.write(self.layout.desc(i), &d.to_bytes());
    }

    /// Put a request's buffers in a descriptor chain and queue its head in the avail
    /// ring (not yet visible: see [`publish`](Self::publish)). Returns the head.
    pub fn add(&mut self, bufs: &[Buffer]) -> Result<u16, DriverError> {
        if bufs.is_empty() {
            return Err(DriverError::Empty);
        }
        let needed = bufs.len() as u16;
        if bufs.len() > self.num_free as usize {
            return Err(DriverError::Full { free: self.num_free, needed });
        }
        let head = self.free_head;
        let mut prev: Option<(u16, Descriptor)> = None;
        for b in bufs {
            let i = self.alloc();
            if let Some((pi, mut pd)) = prev.take() {
                pd.flags |= DESC_F_NEXT;
                pd.next = i;
                self.chain_next[pi as usize] = i;
                self.write_desc(pi, pd);
            }
            prev = Some((
                i,
                Descriptor { addr: b.addr, len: b.len, flags: if b.write { DESC_F_WRITE } else { 0 }, next: 0 },
            ));
        }
        if let Some((pi, pd)) = prev {
            self.write_desc(pi, pd);
        }
        self.chain_len[head as usize] = needed;
        self.push_avail(head);
        Ok(head)
    }

    /// Put a request's buffers in an indirect table at `table` (guest-physical, room for
    /// `16 * bufs.len()` bytes) and queue one descriptor pointing at it.
    pub fn add_indirect(&mut self, bufs: &[Buffer], table: u64) -> Result<u16, DriverError> {
        if bufs.is_empty() {
            return Err(DriverError::Empty);
        }
        if self.num_free == 0 {
            return Err(DriverError::Full { free: 0, needed: 1 });
        }
        let mut bytes = std::mem::take(&mut self.table_scratch);
        bytes.clear();
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags = (if b.write { DESC_F_WRITE } else { 0 }) | (if last { 0 } else { DESC_F_NEXT });
            let d = Descriptor { addr: b.addr, len: b.len, flags, next: if last { 0 } else { i as u16 + 1 } };
            bytes.extend_from_slice(&d.to_bytes());
        }
        let written = self.mem.write_at(table, &bytes);
        let len = bytes.len() as u32;
        self.table_scratch = bytes;
        written?;
        let head = self.alloc();
        self.write_desc(head, Descriptor { addr: table, len, flags: DESC_F_INDIRECT, next: 0 });
        self.chain_len[head as usize] = 1;
        self.push_avail(head);
        Ok(head)
    }

    fn push_avail(&mut self, head: u16) {
        self.avail.store_u16(self.layout.avail_entry(self.avail_idx), head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Make queued heads visible to the device.
    pub fn publish(&mut self) {
        if self.published == self.avail_idx {
            return;
        }
        // Descriptors and ring entries before the index (§2.7.13.3.1).
        fence(Ordering::Release);
        self.avail.store_u16(SplitLayout::IDX, self.avail_idx);
        self.published = self.avail_idx;
    }

    /// Does the device want a kick for what was published since the last call?
    /// (§2.7.13.4: EVENT_IDX `avail_event`, or `VRING_USED_F_NO_NOTIFY`.)
    pub fn needs_kick(&mut self) -> bool {
        fence(Ordering::SeqCst);
        let old = self.kicked;
        let new = self.published;
        self.kicked = new;
        if old == new {
            return false;
        }
        if self.features.event_idx {
            need_event(self.used.load_u16(self.layout.avail_event()), new, old)
        } else {
            self.used.load_u16(SplitLayout::FLAGS) & USED_F_NO_NOTIFY == 0
        }
    }

    /// Take one completed request: `(head, bytes written by the device)`.
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>, DriverError> {
        let used_idx = self.used.load_u16(SplitLayout::IDX);
        if used_idx == self.last_used {
            return Ok(None);
        }
        let pending = used_idx.wrapping_sub(self.last_used);
        if pending > self.layout.size {
            return Err(DriverError::UsedIdxJump(pending));
        }
        // Entries after the index (pairs with the device's release).
        fence(Ordering::Acquire);
        let off = self.layout.used_entry(self.last_used);
        let id = self.used.load_u32(off);
        let len = self.used.load_u32(off + 4);
        let head = u16::try_from(id).ok().filter(|&h| h < self.layout.size).ok_or(DriverError::BogusUsed(id))?;
        let n = self.chain_len[head as usize];
        if n == 0 {
            return Err(DriverError::BogusUsed(id));
        }
        self.last_used = self.last_used.wrapping_add(1);
        self.free_chain(head, n);
        Ok(Some((head, len)))
    }

    /// Return a chain's descriptors to the free list, following our own record of it
    /// (never the descriptor table, which the device may have rewritten).
    fn free_chain(&mut self, head: u16, n: u16) {
        self.chain_len[head as usize] = 0;
        let mut i = head;
        for _ in 0..n {
            let next = self.chain_next[i as usize];
            self.free_next[i as usize] = self.free_head;
            self.free_head = i;
            self.num_free += 1;
            i = next;
        }
    }

    /// Ask the device for an interrupt once anything more is used (EVENT_IDX
    /// `used_event`) or at all (flags). Returns `true` if something is already there.
    pub fn enable_interrupts(&mut self) -> bool {
        self.enable_interrupts_after(1)
    }

    /// Ask for an interrupt only once `n` (≥ 1) more entries are used: with EVENT_IDX,
    /// `used_event` = last seen + n − 1, so the device stays silent for the first n − 1
    /// completions (what Linux's `virtqueue_enable_cb_delayed` does; §2.7.10). Without
    /// EVENT_IDX the device interrupts on every completion. Returns `true` if `n` entries
    /// are already there (do not sleep).
    pub fn enable_interrupts_after(&mut self, n: u16) -> bool {
        let n = n.clamp(1, self.layout.size);
        if self.features.event_idx {
            self.avail.store_u16(self.layout.used_event(), self.last_used.wrapping_add(n - 1));
        } else {
            self.avail.store_u16(SplitLayout::FLAGS, 0);
        }
        fence(Ordering::SeqCst);
        self.used.load_u16(SplitLayout::IDX).wrapping_sub(self.last_used) >= n
    }

    /// Tell the device we poll the used ring and need no interrupts.
    pub fn disable_interrupts(&mut self) {
        if !self.features.event_idx {
            self.avail.store_u16(SplitLayout::FLAGS, AVAIL_F_NO_INTERRUPT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::DESC_SIZE;
    use vblk_virtio::memory::memfd;
    use vblk_virtio::RegionSpec;

    const SIZE: u16 = 8;

    fn ring() -> (Arc<GuestMemory>, RingAddrs, DriverQueue) {
        let spec = RegionSpec { guest_phys_addr: 0, size: 1 << 20, user_addr: 0x7000_0000, mmap_offset: 0 };
        let mem = Arc::new(GuestMemory::from_files(&[(spec, memfd("drv", 1 << 20).unwrap())]).unwrap());
        let addrs = RingAddrs { desc: 0x1000, avail: 0x2000, used: 0x3000 };
        let q = DriverQueue::new(Arc::clone(&mem), SIZE as u32, addrs, RingFeatures::default()).unwrap();
        (mem, addrs, q)
    }

    fn desc_at(mem: &GuestMemory, addrs: RingAddrs, i: u16) -> Descriptor {
        let mut b = [0u8; DESC_SIZE];
        mem.read_at(addrs.desc + i as u64 * DESC_SIZE as u64, &mut b).unwrap();
        Descriptor::from_bytes(&b)
    }

    /// The descriptors of the chain at `head`, following the table as we wrote it.
    fn chain(mem: &GuestMemory, addrs: RingAddrs, head: u16) -> Vec<u16> {
        let mut v = vec![head];
        let mut d = desc_at(mem, addrs, head);
        while d.has_next() {
            v.push(d.next);
            d = desc_at(mem, addrs, d.next);
        }
        v
    }

    /// A hostile device rewrites the `next` fields of a chain before returning it: the
    /// driver's free list must not take descriptors of another chain still in flight.
    #[test]
    fn a_device_rewriting_next_links_cannot_corrupt_the_free_list() {
        let (mem, addrs, mut q) = ring();
        let bufs = [Buffer { addr: 0x10000, len: 16, write: false }; 3];
        let a = q.add(&bufs).unwrap();
        let b = q.add(&bufs).unwrap();
        q.publish();
        let a_descs = chain(&mem, addrs, a);
        let b_descs = chain(&mem, addrs, b);
        // The device points every descriptor of chain `a` at chain `b`'s head...
        for &i in &a_descs {
            let mut d = desc_at(&mem, addrs, i);
            d.next = b;
            mem.write_at(addrs.desc + i as u64 * DESC_SIZE as u64, &d.to_bytes()).unwrap();
        }
        // ... and completes `a`.
        mem.write_at(addrs.used + 4, &(a as u32).to_le_bytes()).unwrap();
        mem.write_at(addrs.used + 8, &0u32.to_le_bytes()).unwrap();
        mem.write_at(addrs.used + 2, &1u16.to_le_bytes()).unwrap();
        assert_eq!(q.pop_used().unwrap(), Some((a, 0)));
        assert_eq!(q.num_free(), SIZE - 3);
        // Everything free now goes into one chain: none of `b`'s descriptors among them.
        let c = q.add(&vec![Buffer { addr: 0x10000, len: 16, write: false }; (SIZE - 3) as usize]).unwrap();
        let c_descs = chain(&mem, addrs, c);
        assert_eq!(c_descs.len(), (SIZE - 3) as usize);
        for i in &c_descs {
            assert!(!b_descs.contains(i), "descriptor {i} handed out while chain {b:?} still holds it");
        }
        let mut all: Vec<u16> = c_descs.iter().chain(&b_descs).copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), SIZE as usize, "every descriptor in exactly one chain");
    }
}
