//! Virtqueue layouts, shared by the device side ([`crate::split`], [`crate::packed`]) and
//! the driver side: the split ring (virtio 1.2 §2.7) and the packed ring (§2.8).
//!
//! ```text
//! descriptor table  16 * size bytes, 16-aligned   { le64 addr; le32 len; le16 flags; le16 next }
//! available ring    6 + 2 * size,    2-aligned    { le16 flags; le16 idx; le16 ring[size]; le16 used_event }
//! used ring         6 + 8 * size,    4-aligned    { le16 flags; le16 idx; {le32 id; le32 len} ring[size]; le16 avail_event }
//! ```
//!
//! A packed ring is one descriptor ring both sides write, plus two event suppression
//! structures:
//!
//! ```text
//! descriptor ring   16 * size bytes, 16-aligned  { le64 addr; le32 len; le16 id; le16 flags }
//! driver event      4 bytes, 4-aligned           { le16 off_wrap; le16 flags }  (driver writes)
//! device event      4 bytes, 4-aligned           { le16 off_wrap; le16 flags }  (device writes)
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
        let (addr, len, flags, next) = decode_desc(b);
        Descriptor { addr, len, flags, next }
    }

    pub fn to_bytes(&self) -> [u8; DESC_SIZE] {
        encode_desc(self.addr, self.len, self.flags, self.next)
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

/// Both rings' descriptors are `{ le64 addr; le32 len; le16; le16 }`: the split ring's last
/// two fields are flags and next, the packed ring's id and flags.
#[inline(always)]
fn decode_desc(b: &[u8; DESC_SIZE]) -> (u64, u32, u16, u16) {
    let mut addr = [0u8; 8];
    addr.copy_from_slice(&b[0..8]);
    (
        u64::from_le_bytes(addr),
        u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        u16::from_le_bytes([b[12], b[13]]),
        u16::from_le_bytes([b[14], b[15]]),
    )
}

#[inline(always)]
fn encode_desc(addr: u64, len: u32, a: u16, b: u16) -> [u8; DESC_SIZE] {
    let mut out = [0u8; DESC_SIZE];
    out[0..8].copy_from_slice(&addr.to_le_bytes());
    out[8..12].copy_from_slice(&len.to_le_bytes());
    out[12..14].copy_from_slice(&a.to_le_bytes());
    out[14..16].copy_from_slice(&b.to_le_bytes());
    out
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

/// `VRING_PACKED_DESC_F_AVAIL` (§2.8.1): with `USED`, says who owns a packed ring slot.
pub const PACKED_DESC_F_AVAIL: u16 = 1 << vr::VRING_PACKED_DESC_F_AVAIL;
/// `VRING_PACKED_DESC_F_USED` (§2.8.1).
pub const PACKED_DESC_F_USED: u16 = 1 << vr::VRING_PACKED_DESC_F_USED;
/// Event suppression flags (§2.8.10): notify always, never, or at one descriptor
/// (`DESC`, only with `VIRTIO_F_RING_EVENT_IDX`).
pub const EVENT_FLAG_ENABLE: u16 = vr::VRING_PACKED_EVENT_FLAG_ENABLE as u16;
pub const EVENT_FLAG_DISABLE: u16 = vr::VRING_PACKED_EVENT_FLAG_DISABLE as u16;
pub const EVENT_FLAG_DESC: u16 = vr::VRING_PACKED_EVENT_FLAG_DESC as u16;
/// Largest packed ring (§2.8: any size up to 2^15, not only powers of two).
pub const MAX_PACKED_SIZE: u16 = 32768;
/// Alignment of the packed descriptor ring and of the event suppression structures.
pub const PACKED_DESC_ALIGN: u64 = 16;
pub const PACKED_EVENT_ALIGN: u64 = 4;
/// Bytes of one event suppression structure `{ le16 off_wrap; le16 flags }`.
pub const PACKED_EVENT_LEN: u64 = 4;
/// Offsets inside an event suppression structure.
pub const EVENT_OFF_WRAP: usize = 0;
pub const EVENT_FLAGS: usize = 2;

/// `struct pvirtq_desc` (§2.8.13): one slot of a packed ring, or an entry of a packed
/// indirect table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackedDescriptor {
    pub addr: u64,
    pub len: u32,
    /// The buffer id: which request a used descriptor returns.
    pub id: u16,
    pub flags: u16,
}

impl PackedDescriptor {
    /// Offset of `flags` in a slot: the field whose store makes a slot available or used.
    pub const FLAGS: usize = 14;
    /// Offset of `id`.
    pub const ID: usize = 12;
    /// Offset of `len`.
    pub const LEN: usize = 8;

    pub fn from_bytes(b: &[u8; DESC_SIZE]) -> Self {
        let (addr, len, id, flags) = decode_desc(b);
        PackedDescriptor { addr, len, id, flags }
    }

    pub fn to_bytes(&self) -> [u8; DESC_SIZE] {
        encode_desc(self.addr, self.len, self.id, self.flags)
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

    /// The view of this slot as a split [`Descriptor`] (no link: packed chains are
    /// consecutive slots), for code shared by both rings.
    pub fn as_split(&self) -> Descriptor {
        Descriptor { addr: self.addr, len: self.len, flags: self.flags & (DESC_F_WRITE | DESC_F_INDIRECT), next: 0 }
    }
}

/// The flags of a slot written with wrap counter `wrap`: a driver makes a slot available
/// with `AVAIL = wrap, USED = !wrap`; a device marks it used with `AVAIL = USED = wrap`
/// (§2.8.1).
pub fn packed_avail_flags(wrap: bool) -> u16 {
    if wrap {
        PACKED_DESC_F_AVAIL
    } else {
        PACKED_DESC_F_USED
    }
}

/// See [`packed_avail_flags`].
pub fn packed_used_flags(wrap: bool) -> u16 {
    if wrap {
        PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED
    } else {
        0
    }
}

/// Is a slot with `flags` available to a device whose avail wrap counter is `wrap`?
pub fn packed_is_avail(flags: u16, wrap: bool) -> bool {
    let avail = flags & PACKED_DESC_F_AVAIL != 0;
    let used = flags & PACKED_DESC_F_USED != 0;
    avail == wrap && used != wrap
}

/// Is a slot with `flags` used, for a driver whose used wrap counter is `wrap`?
pub fn packed_is_used(flags: u16, wrap: bool) -> bool {
    let avail = flags & PACKED_DESC_F_AVAIL != 0;
    let used = flags & PACKED_DESC_F_USED != 0;
    avail == used && used == wrap
}

/// A position in a packed ring: a slot index and the wrap counter that goes with it
/// (§2.8.1). Both sides start at slot 0 with wrap counter 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RingPos {
    pub idx: u16,
    pub wrap: bool,
}

impl RingPos {
    pub const START: RingPos = RingPos { idx: 0, wrap: true };

    /// `n` slots further in a ring of `size` (`n <= size`): the wrap counter flips each
    /// time the index passes the end.
    #[inline]
    pub fn advance(self, n: u16, size: u16) -> RingPos {
        debug_assert!(n <= size && self.idx < size);
        let next = self.idx as u32 + n as u32;
        if next >= size as u32 {
            RingPos { idx: (next - size as u32) as u16, wrap: !self.wrap }
        } else {
            RingPos { idx: next as u16, wrap: self.wrap }
        }
    }

    /// The next slot (`advance(1, size)`, the common step of a pop).
    #[inline(always)]
    pub fn next(self, size: u16) -> RingPos {
        let idx = self.idx + 1;
        if idx >= size {
            RingPos { idx: 0, wrap: !self.wrap }
        } else {
            RingPos { idx, wrap: self.wrap }
        }
    }

    /// Slots from `earlier` to `self` (0..2*size), assuming `earlier` is at most one lap
    /// behind.
    pub fn distance_from(self, earlier: RingPos, size: u16) -> u32 {
        let (a, b) = (earlier.idx as u32, self.idx as u32);
        if self.wrap == earlier.wrap {
            if b >= a {
                b - a
            } else {
                b + 2 * size as u32 - a
            }
        } else {
            b + size as u32 - a
        }
    }

    /// The vhost-user / event-suppression encoding: index in bits 0-14, wrap in bit 15.
    pub fn encode(self) -> u16 {
        self.idx | (self.wrap as u16) << 15
    }

    /// Decode [`encode`](Self::encode)'s format; `None` if the index is not in the ring.
    pub fn decode(v: u16, size: u16) -> Option<RingPos> {
        let idx = v & 0x7fff;
        (idx < size).then_some(RingPos { idx, wrap: v & 0x8000 != 0 })
    }
}

/// Packed-ring `vring_need_event` (§2.8.10, Linux's `virtqueue_kick_prepare_packed`):
/// the side that moved its position to `new` by `moved` slots since it last notified,
/// should it notify a peer that asked for an event at `off_wrap`?
pub fn packed_need_event(off_wrap: u16, new: RingPos, moved: u32, size: u16) -> bool {
    if moved == 0 {
        return false;
    }
    if moved >= size as u32 {
        return true;
    }
    let mut event = off_wrap & 0x7fff;
    if (off_wrap & 0x8000 != 0) != new.wrap {
        event = event.wrapping_sub(size);
    }
    need_event(event, new.idx, new.idx.wrapping_sub(moved as u16))
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
