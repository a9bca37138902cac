//! What the device offers (§5.2.3) and what its config space says (§5.2.4).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vblk_virtio::blk::{features as blkf, BlkConfig, ID_BYTES, SECTOR_SHIFT};
use vblk_virtio::features as vf;

/// Largest discard / write-zeroes request, in sectors (2 GiB - 512, like QEMU's limit).
pub const MAX_DISCARD_SECTORS: u32 = 0x3f_ffff;
/// Segments per discard / write-zeroes request. More is refused with UNSUPP.
pub const MAX_DISCARD_SEG: u32 = 1;
/// Largest single data buffer the driver may use (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most data segments per request (`seg_max` never exceeds it): with the header and
/// the status descriptor a chain then fits one 1024-entry indirect table, and the data
/// fits one readv/writev (`IOV_MAX` = 1024).
pub const MAX_DATA_SEGMENTS: u32 = 1022;

/// Everything about the exported disk that request handling needs. Shared by all queues.
#[derive(Debug)]
pub struct DeviceParams {
    /// Capacity in 512-byte sectors: [`DeviceParams::capacity_sectors`]. It changes when
    /// the disk is resized online, so it is an atomic, read once per request.
    capacity_sectors: AtomicU64,
    pub readonly: bool,
    /// Logical block size of the backing store (512 or 4096): the `blk_size` we report.
    pub block_size: u32,
    /// Device ID for GET_ID: at most 20 bytes, zero-padded.
    pub serial: [u8; ID_BYTES],
    pub num_queues: u16,
    /// Largest ring size accepted (`--queue-size`); `seg_max` is derived from it.
    pub queue_size: u16,
    /// Merge contiguous reads/writes of a batch into one backend I/O.
    pub merge: bool,
    /// Write-back cache in effect: writes may complete before they are durable and FLUSH
    /// makes them durable. Off: every write is durable when it completes. It is
    /// `wce && flush`, kept in one flag for the hot path.
    writeback: AtomicBool,
    /// The cache mode the driver chose (the `writeback` config byte it last wrote; write-back
    /// until it writes one). Kept across frontend disconnects: QEMU does not replay
    /// `SET_CONFIG` when it reconnects, so a guest that chose write-through must not find
    /// itself on write-back afterwards (it would send no FLUSH).
    wce: AtomicBool,
    /// The driver negotiated `VIRTIO_BLK_F_FLUSH` (the latest `SET_FEATURES`).
    flush: AtomicBool,
    /// The driver negotiated `VIRTIO_BLK_F_CONFIG_WCE` (the latest `SET_FEATURES`).
    config_wce: AtomicBool,
}

impl DeviceParams {
    pub fn new(
        size_bytes: u64,
        readonly: bool,
        block_size: u32,
        serial: &str,
        num_queues: u16,
        queue_size: u16,
    ) -> Self {
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        DeviceParams {
            capacity_sectors: AtomicU64::new(size_bytes >> SECTOR_SHIFT),
            readonly,
            block_size: block_size.max(512),
            serial: id,
            num_queues,
            queue_size,
            merge: true,
            writeback: AtomicBool::new(true),
            wce: AtomicBool::new(true),
            flush: AtomicBool::new(true),
            config_wce: AtomicBool::new(true),
        }
    }

    /// Capacity in 512-byte sectors, as the config space reports it and every request's
    /// range is checked against.
    #[inline]
    pub fn capacity_sectors(&self) -> u64 {
        // Acquire, paired with `set_capacity_sectors`: a request that sees a grown
        // capacity sees the grown disk too (the backend's own bounds check reads its
        // size after this). On x86-64 and for the hot path this is one plain load.
        self.capacity_sectors.load(Ordering::Acquire)
    }

    /// A new capacity (online resize). Growing: after the disk has grown. Shrinking:
    /// before the disk shrinks, with no request in flight past the new end (the caller
    /// drains the queues), so that every later request past it fails its range check.
    pub fn set_capacity_sectors(&self, sectors: u64) {
        self.capacity_sectors.store(sectors, Ordering::Release);
    }

    /// Virtio feature bits the device offers. Never SCSI, BARRIER or GEOMETRY.
    pub fn offered_features(&self) -> u64 {
        let mut f = vf::VERSION_1
            | vf::RING_INDIRECT_DESC
            | vf::RING_EVENT_IDX
            | vf::RING_PACKED
            | blkf::SIZE_MAX
            | blkf::SEG_MAX
            | blkf::BLK_SIZE
            | blkf::FLUSH
            | blkf::TOPOLOGY
            | blkf::CONFIG_WCE
            | blkf::MQ;
        if self.readonly {
            f |= blkf::RO;
        } else {
            f |= blkf::DISCARD | blkf::WRITE_ZEROES;
        }
        f
    }

    /// Apply the features the driver accepted: without FLUSH there is no way to make a
    /// cached write durable, so the cache must be write-through (§5.2.5.1).
    pub fn ack_features(&self, acked: u64) {
        self.flush.store(acked & blkf::FLUSH != 0, Ordering::Release);
        self.config_wce.store(acked & blkf::CONFIG_WCE != 0, Ordering::Release);
        self.update_writeback();
    }

    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Acquire)
    }

    /// The driver wrote the `writeback` config byte (needs `VIRTIO_BLK_F_CONFIG_WCE`).
    /// Write-back takes effect only while FLUSH is negotiated.
    pub fn set_writeback(&self, on: bool) {
        self.wce.store(on, Ordering::Release);
        self.update_writeback();
    }

    /// The cache mode the driver chose (whether or not FLUSH makes it effective).
    pub fn wce(&self) -> bool {
        self.wce.load(Ordering::Acquire)
    }

    fn update_writeback(&self) {
        let on = self.wce.load(Ordering::Acquire) && self.flush.load(Ordering::Acquire);
        self.writeback.store(on, Ordering::Release);
    }

    /// The `writeback` config byte: the cache mode a driver gets, `wce`, except that a driver
    /// that negotiated `CONFIG_WCE` without `FLUSH` reads 0 (§5.2.5.2: it is write-through).
    ///
    /// Not [`DeviceParams::writeback`], which is also off while the driver in charge did not
    /// negotiate `FLUSH` at all: QEMU caches the config space (at realize, and again, whole,
    /// on every `CONFIG_CHANGE_MSG` in recent QEMU: 10 does) and a guest's kernel probes with that
    /// copy. Taken while the firmware's driver (SeaBIOS: no FLUSH, no CONFIG_WCE) runs the
    /// device, a 0 would make Linux run the disk write-through and send no FLUSH while the
    /// device, once Linux negotiated FLUSH, is write-back: writes never made durable.
    fn config_writeback(&self) -> bool {
        if self.config_wce.load(Ordering::Acquire) && !self.flush.load(Ordering::Acquire) {
            false
        } else {
            self.wce()
        }
    }

    /// Data segments per request the driver may use (`seg_max`): the chain also needs a
    /// header and a status descriptor and may not be longer than the queue.
    pub fn seg_max(&self) -> u32 {
        (self.queue_size as u32).saturating_sub(2).clamp(1, MAX_DATA_SEGMENTS)
    }

    pub fn config(&self) -> BlkConfig {
        let lbs_sectors = self.block_size >> SECTOR_SHIFT;
        BlkConfig {
            capacity: self.capacity_sectors(),
            size_max: SIZE_MAX,
            seg_max: self.seg_max(),
            blk_size: self.block_size,
            // Report 4 KiB physical blocks so guests align file systems to pages.
            physical_block_exp: (4096u32 / self.block_size).max(1).trailing_zeros() as u8,
            alignment_offset: 0,
            min_io_size: 1,
            opt_io_size: 0,
            writeback: self.config_writeback() as u8,
            num_queues: self.num_queues,
            max_discard_sectors: if self.readonly { 0 } else { MAX_DISCARD_SECTORS },
            max_discard_seg: if self.readonly { 0 } else { MAX_DISCARD_SEG },
            discard_sector_alignment: lbs_sectors,
            max_write_zeroes_sectors: if self.readonly { 0 } else { MAX_DISCARD_SECTORS },
            max_write_zeroes_seg: if self.readonly { 0 } else { MAX_DISCARD_SEG },
            write_zeroes_may_unmap: (!self.readonly) as u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_devices_offer_ro_and_no_discard() {
        let p = DeviceParams::new(1 << 30, true, 512, "x", 2, 256);
        let f = p.offered_features();
        assert_ne!(f & blkf::RO, 0);
        assert_eq!(f & (blkf::DISCARD | blkf::WRITE_ZEROES | blkf::SCSI), 0);
        assert_eq!(p.config().max_discard_seg, 0);
    }

    #[test]
    fn config_space_reflects_the_disk() {
        let p = DeviceParams::new(1 << 30, false, 512, "serial-number-longer-than-twenty", 4, 256);
        let c = p.config();
        assert_eq!(c.capacity, 2 * 1024 * 1024);
        assert_eq!(c.seg_max, 254);
        assert_eq!(c.num_queues, 4);
        assert_eq!(c.physical_block_exp, 3);
        assert_eq!(c.writeback, 1);
        assert_eq!(&p.serial, b"serial-number-longer");
        let f = p.offered_features();
        assert_eq!(f & blkf::SCSI, 0);
        assert_ne!(f & (blkf::DISCARD | blkf::WRITE_ZEROES | blkf::CONFIG_WCE | blkf::MQ), 0);
    }

    #[test]
    fn a_new_capacity_shows_in_the_config_space() {
        let p = DeviceParams::new(1 << 20, false, 512, "", 1, 128);
        assert_eq!((p.capacity_sectors(), p.config().capacity), (2048, 2048));
        p.set_capacity_sectors(4096);
        assert_eq!((p.capacity_sectors(), p.config().capacity), (4096, 4096));
    }

    #[test]
    fn without_flush_the_cache_is_write_through() {
        let p = DeviceParams::new(1 << 20, false, 512, "", 1, 128);
        assert!(p.writeback());
        p.ack_features(p.offered_features() & !blkf::FLUSH);
        assert!(!p.writeback());
        assert_eq!(p.config().writeback, 0, "CONFIG_WCE without FLUSH reads write-through");
        // A driver that negotiated neither (firmware) does not read the byte; whoever caches
        // the config space for the next driver must find the mode that driver gets.
        p.ack_features(p.offered_features() & !(blkf::FLUSH | blkf::CONFIG_WCE));
        assert!(!p.writeback());
        assert_eq!(p.config().writeback, 1, "not the firmware's write-through");
        // A later driver that negotiates FLUSH gets the cache mode back (nobody chose
        // write-through), and one that chose write-through keeps it.
        p.ack_features(p.offered_features());
        assert!(p.writeback());
        p.set_writeback(false);
        p.ack_features(p.offered_features());
        assert!(!p.writeback());
        p.set_writeback(true);
        p.ack_features(p.offered_features() & !blkf::FLUSH);
        assert!(!p.writeback(), "write-back needs FLUSH");
    }
}
