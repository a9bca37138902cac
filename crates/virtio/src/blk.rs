//! virtio-blk on the wire (virtio 1.2 §5.2).
//!
//! Everything here is plain data with explicit little-endian encoding: no `#[repr(C)]`
//! casts of guest bytes, so a hostile guest cannot produce an invalid value of any type.

use virtio_bindings::virtio_blk as vb;

/// Size of a sector: the unit of `virtio_blk_outhdr::sector` and of all limits.
pub const SECTOR_SIZE: u64 = 512;
/// `log2(SECTOR_SIZE)`.
pub const SECTOR_SHIFT: u32 = 9;
/// Length of the device ID returned by `VIRTIO_BLK_T_GET_ID` (§5.2.6).
pub const ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;

/// Request types (`virtio_blk_outhdr::type`, §5.2.6).
pub mod req_type {
    use super::vb;
    pub const IN: u32 = vb::VIRTIO_BLK_T_IN;
    pub const OUT: u32 = vb::VIRTIO_BLK_T_OUT;
    pub const SCSI_CMD: u32 = vb::VIRTIO_BLK_T_SCSI_CMD;
    pub const FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
    pub const GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
    pub const DISCARD: u32 = vb::VIRTIO_BLK_T_DISCARD;
    pub const WRITE_ZEROES: u32 = vb::VIRTIO_BLK_T_WRITE_ZEROES;
    /// Legacy barrier flag, or'ed into the type (§5.2.6.3). Never accepted.
    pub const BARRIER: u32 = vb::VIRTIO_BLK_T_BARRIER;
}

/// The status byte the device writes as the last byte of every request (§5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = vb::VIRTIO_BLK_S_OK as u8,
    IoErr = vb::VIRTIO_BLK_S_IOERR as u8,
    Unsupp = vb::VIRTIO_BLK_S_UNSUPP as u8,
}

/// `struct virtio_blk_outhdr`: the 16-byte header at the start of the readable part of
/// every request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutHdr {
    pub req_type: u32,
    pub ioprio: u32,
    pub sector: u64,
}

impl OutHdr {
    pub const SIZE: usize = 16;

    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        OutHdr {
            req_type: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            ioprio: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            sector: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        }
    }

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.req_type.to_le_bytes());
        b[4..8].copy_from_slice(&self.ioprio.to_le_bytes());
        b[8..16].copy_from_slice(&self.sector.to_le_bytes());
        b
    }
}

/// `struct virtio_blk_discard_write_zeroes`: one segment of a DISCARD or WRITE_ZEROES
/// request (§5.2.6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiscardSegment {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

impl DiscardSegment {
    pub const SIZE: usize = 16;
    /// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`: the device may deallocate the range.
    pub const FLAG_UNMAP: u32 = vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        DiscardSegment {
            sector: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            num_sectors: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// virtio-blk feature bits (§5.2.3), as masks.
pub mod features {
    use super::vb;
    pub const SIZE_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SIZE_MAX;
    pub const SEG_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SEG_MAX;
    pub const RO: u64 = 1 << vb::VIRTIO_BLK_F_RO;
    pub const BLK_SIZE: u64 = 1 << vb::VIRTIO_BLK_F_BLK_SIZE;
    pub const SCSI: u64 = 1 << vb::VIRTIO_BLK_F_SCSI;
    pub const FLUSH: u64 = 1 << vb::VIRTIO_BLK_F_FLUSH;
    pub const TOPOLOGY: u64 = 1 << vb::VIRTIO_BLK_F_TOPOLOGY;
    pub const CONFIG_WCE: u64 = 1 << vb::VIRTIO_BLK_F_CONFIG_WCE;
    pub const MQ: u64 = 1 << vb::VIRTIO_BLK_F_MQ;
    pub const DISCARD: u64 = 1 << vb::VIRTIO_BLK_F_DISCARD;
    pub const WRITE_ZEROES: u64 = 1 << vb::VIRTIO_BLK_F_WRITE_ZEROES;
}

/// `struct virtio_blk_config` (§5.2.4), the fields vblk fills in. Encoded by
/// [`BlkConfig::to_bytes`] into the exact little-endian layout the driver reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    /// Write-back cache enabled (1) or write-through (0); writable by the driver when
    /// `VIRTIO_BLK_F_CONFIG_WCE` is negotiated.
    pub writeback: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    /// Size of the config space as Linux 6.x and QEMU 10 know it (up to and including the
    /// zoned characteristics, which vblk leaves zero).
    pub const SIZE: usize = 96;
    /// Offset of the `writeback` byte: the only field a driver may write.
    pub const WRITEBACK_OFFSET: usize = 32;

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // 16..20: geometry, left zero (VIRTIO_BLK_F_GEOMETRY is not offered).
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        b[25] = self.alignment_offset;
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes());
        b[32] = self.writeback;
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap;
        b
    }

    /// Decode a config space (as a driver does); bytes past `b.len()` read as zero.
    pub fn from_bytes(b: &[u8]) -> Self {
        let mut full = [0u8; Self::SIZE];
        let n = b.len().min(Self::SIZE);
        full[..n].copy_from_slice(&b[..n]);
        let u16_at = |o: usize| u16::from_le_bytes([full[o], full[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([full[o], full[o + 1], full[o + 2], full[o + 3]]);
        let mut cap = [0u8; 8];
        cap.copy_from_slice(&full[0..8]);
        BlkConfig {
            capacity: u64::from_le_bytes(cap),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            blk_size: u32_at(20),
            physical_block_exp: full[24],
            alignment_offset: full[25],
            min_io_size: u16_at(26),
            opt_io_size: u32_at(28),
            writeback: full[32],
            num_queues: u16_at(34),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: full[56],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outhdr_roundtrip_is_little_endian() {
        let h = OutHdr { req_type: req_type::OUT, ioprio: 7, sector: 0x0102_0304_0506_0708 };
        let b = h.to_bytes();
        assert_eq!(b[0], 1);
        assert_eq!(b[8], 0x08);
        assert_eq!(OutHdr::from_bytes(&b), h);
    }

    #[test]
    fn config_layout_matches_the_spec_offsets() {
        let c = BlkConfig {
            capacity: 2048,
            seg_max: 126,
            blk_size: 4096,
            writeback: 1,
            num_queues: 4,
            max_discard_seg: 1,
            write_zeroes_may_unmap: 1,
            ..Default::default()
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..8], &2048u64.to_le_bytes());
        assert_eq!(&b[12..16], &126u32.to_le_bytes());
        assert_eq!(&b[20..24], &4096u32.to_le_bytes());
        assert_eq!(b[BlkConfig::WRITEBACK_OFFSET], 1);
        assert_eq!(&b[34..36], &4u16.to_le_bytes());
        assert_eq!(&b[40..44], &1u32.to_le_bytes());
        assert_eq!(b[56], 1);
        assert_eq!(BlkConfig::from_bytes(&b), c);
    }

    #[test]
    fn segment_roundtrip() {
        let s = DiscardSegment { sector: 9, num_sectors: 8, flags: DiscardSegment::FLAG_UNMAP };
        assert_eq!(DiscardSegment::from_bytes(&s.to_bytes()), s);
    }
}
