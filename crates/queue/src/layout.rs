//! Split virtqueue layout (virtio 1.2 §2.7), shared by the device side ([`crate::split`])
//! and the driver side.
//!
//! ```text
//! descriptor table  16 * size bytes, 16-aligned   { le64 addr; le32 len; le16 flags; le16 next }
//! available ring    6 + 2 * size,    2-aligned    { le16 flags; le16 idx; le16 ring[size]; le16 used_event }
//! used ring         6 + 8 * size,    4-aligned    { le16 flags; le16 idx; {le32 id; le32 len} ring[size]; le16 avail_event }
//! ```

use virtio_bindings::virtio_ring as vr;

/// Largest queue size a split ring may have (§2.7: "Queue Size ... maximum 32768").
pub const MAX_QUEUE_SIZE: u16 = 32768;

pub const DESC_F_NEXT: u16 = vr::VRING_DESC_F_NEXT as u16;
pub const DESC_F_WRITE: u16 = vr::VRING_DESC_F_WRITE as u16;
pub const DESC_F_INDIRECT: u16 = vr::VRING_DESC_F_INDIRECT as u16;
/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver asks not to be interrupted (no EVENT_IDX).
pub const AVAIL_F_NO_INTERRUPT: u16 = vr::VRING_AVAIL_F_NO_INTERRUPT as u16;
/// `VRING_USED_F_NO_NOTIFY`: the device asks not to be kicked (no EVENT_IDX).
pub const USED_F_NO_NOTIFY: u16 = vr::VRING_USED_F_NO_NOTIFY as u16;

pub const DESC_SIZE: usize = 16;
pub const DESC_ALIGN: u64 = vr::VRING_DESC_ALIGN_SIZE as u64;
pub const AVAIL_ALIGN: u64 = vr::VRING_AVAIL_ALIGN_SIZE as u64;
pub const USED_ALIGN: u64 = vr::VRING_USED_ALIGN_SIZE as u64;

/// `struct virtq_desc`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Descriptor {
    pub fn from_bytes(b: &[u8; DESC_SIZE]) -> Self {
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&b[0..8]);
        Descriptor {
            addr: u64::from_le_bytes(addr),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        }
    }

    pub fn to_bytes(&self) -> [u8; DESC_SIZE] {
        let mut b = [0u8; DESC_SIZE];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    pub fn has_next(&self) -> bool {
        self.flags & DESC_F_NEXT != 0
    }

    pub fn is_write_only(&self) -> bool {
        self.flags & DESC_F_WRITE != 0
    }

    pub fn is_indirect(&self) -> bool {
        self.flags & DESC_F_INDIRECT != 0
    }
}

/// Byte sizes and field offsets of one split ring of `size` entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitLayout {
    pub size: u16,
}

impl SplitLayout {
    /// `size` must be a power of two in `1..=32768` (§2.7).
    pub fn new(size: u32) -> Option<Self> {
        if size == 0 || size > MAX_QUEUE_SIZE as u32 || !size.is_power_of_two() {
            return None;
        }
        Some(SplitLayout { size: size as u16 })
    }

    pub fn desc_table_len(&self) -> u64 {
        DESC_SIZE as u64 * self.size as u64
    }
    pub fn avail_len(&self) -> u64 {
        6 + 2 * self.size as u64
    }
    pub fn used_len(&self) -> u64 {
        6 + 8 * self.size as u64
    }

    pub const FLAGS: usize = 0;
    pub const IDX: usize = 2;

    /// Offset of `avail.ring[i % size]`.
    pub fn avail_entry(&self, i: u16) -> usize {
        4 + 2 * (i % self.size) as usize
    }
    /// Offset of `avail.used_event`.
    pub fn used_event(&self) -> usize {
        4 + 2 * self.size as usize
    }
    /// Offset of `used.ring[i % size]`.
    pub fn used_entry(&self, i: u16) -> usize {
        4 + 8 * (i % self.size) as usize
    }
    /// Offset of `used.avail_event`.
    pub fn avail_event(&self) -> usize {
        4 + 8 * self.size as usize
    }
    /// Offset of descriptor `i` (`i < size`).
    pub fn desc(&self, i: u16) -> usize {
        DESC_SIZE * (i % self.size) as usize
    }
}

/// `vring_need_event` (§2.7.10): should the side that moved its index from `old` to `new`
/// notify the other, which asked to be notified once the index passes `event`?
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_must_be_powers_of_two_up_to_32768() {
        for bad in [0, 3, 100, 65536, 32769] {
            assert!(SplitLayout::new(bad).is_none(), "{bad}");
        }
        for good in [1, 2, 256, 32768] {
            assert!(SplitLayout::new(good).is_some(), "{good}");
        }
    }

    #[test]
    fn offsets_follow_the_spec() {
        let l = SplitLayout::new(256).unwrap();
        assert_eq!(l.desc_table_len(), 4096);
        assert_eq!(l.avail_len(), 518);
        assert_eq!(l.used_len(), 2054);
        assert_eq!(l.avail_entry(257), 6);
        assert_eq!(l.used_event(), 516);
        assert_eq!(l.used_entry(1), 12);
        assert_eq!(l.avail_event(), 2052);
    }

    #[test]
    fn need_event_matches_the_spec_formula_across_wraparound() {
        // The other side asked for an event at 5: moving 4 -> 6 crosses it, 6 -> 8 does not.
        assert!(need_event(5, 6, 4));
        assert!(!need_event(5, 8, 6));
        // Wraparound: event at 65535, move 65534 -> 1 crosses it.
        assert!(need_event(65535, 1, 65534));
        assert!(!need_event(3, 1, 65534));
        // No movement never notifies.
        assert!(!need_event(7, 7, 7));
    }

    #[test]
    fn descriptor_roundtrip() {
        let d = Descriptor { addr: 0x1122_3344_5566_7788, len: 512, flags: DESC_F_NEXT | DESC_F_WRITE, next: 3 };
        assert_eq!(Descriptor::from_bytes(&d.to_bytes()), d);
    }
}
