//! [`DriverRing`]: the driver side of a virtqueue, split ([`DriverQueue`], §2.7) or packed
//! ([`PackedDriverQueue`], §2.8), whichever was negotiated (`VIRTIO_F_RING_PACKED`). Both
//! name a request by a `u16` below the queue size (the split ring's head descriptor, the
//! packed ring's buffer id), so a caller keeps its per-request state the same way.

use std::sync::Arc;

use vblk_virtio::GuestMemory;

use crate::driver::{Buffer, DriverError, DriverQueue};
use crate::driver_packed::PackedDriverQueue;
use crate::split::{RingAddrs, RingFeatures};

/// Which virtqueue layout a ring uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RingKind {
    #[default]
    Split,
    Packed,
}

impl RingKind {
    pub fn name(self) -> &'static str {
        match self {
            RingKind::Split => "split",
            RingKind::Packed => "packed",
        }
    }
}

impl std::fmt::Display for RingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A split or a packed virtqueue (driver side).
pub enum DriverRing {
    Split(DriverQueue),
    Packed(PackedDriverQueue),
}

/// Forward a call to whichever ring this is.
macro_rules! each {
    ($self:expr, $q:ident => $e:expr) => {
        match $self {
            DriverRing::Split($q) => $e,
            DriverRing::Packed($q) => $e,
        }
    };
}

impl DriverRing {
    /// Lay out a fresh ring of `kind` at `addrs` (for a packed ring: `desc` = descriptor
    /// ring, `avail` = driver event area, `used` = device event area).
    pub fn new(
        kind: RingKind,
        mem: Arc<GuestMemory>,
        size: u32,
        addrs: RingAddrs,
        features: RingFeatures,
    ) -> Result<Self, DriverError> {
        Ok(match kind {
            RingKind::Split => DriverRing::Split(DriverQueue::new(mem, size, addrs, features)?),
            RingKind::Packed => DriverRing::Packed(PackedDriverQueue::new(mem, size, addrs, features)?),
        })
    }

    pub fn kind(&self) -> RingKind {
        match self {
            DriverRing::Split(_) => RingKind::Split,
            DriverRing::Packed(_) => RingKind::Packed,
        }
    }

    pub fn as_packed(&self) -> Option<&PackedDriverQueue> {
        match self {
            DriverRing::Packed(q) => Some(q),
            DriverRing::Split(_) => None,
        }
    }

    pub fn size(&self) -> u16 {
        each!(self, q => q.size())
    }

    /// Free descriptors (split) or ring slots (packed).
    pub fn num_free(&self) -> u16 {
        each!(self, q => q.num_free())
    }

    /// The name (head or buffer id) the next `add` / `add_indirect` will return.
    pub fn next_free(&self) -> u16 {
        each!(self, q => q.next_free())
    }

    pub fn in_flight(&self) -> u16 {
        each!(self, q => q.in_flight())
    }

    #[inline]
    pub fn add(&mut self, bufs: &[Buffer]) -> Result<u16, DriverError> {
        each!(self, q => q.add(bufs))
    }

    #[inline]
    pub fn add_indirect(&mut self, bufs: &[Buffer], table: u64) -> Result<u16, DriverError> {
        each!(self, q => q.add_indirect(bufs, table))
    }

    #[inline]
    pub fn publish(&mut self) {
        each!(self, q => q.publish())
    }

    #[inline]
    pub fn needs_kick(&mut self) -> bool {
        each!(self, q => q.needs_kick())
    }

    #[inline]
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>, DriverError> {
        each!(self, q => q.pop_used())
    }

    pub fn enable_interrupts(&mut self) -> bool {
        each!(self, q => q.enable_interrupts())
    }

    pub fn enable_interrupts_after(&mut self, n: u16) -> bool {
        each!(self, q => q.enable_interrupts_after(n))
    }

    pub fn disable_interrupts(&mut self) {
        each!(self, q => q.disable_interrupts())
    }
}

impl From<DriverQueue> for DriverRing {
    fn from(q: DriverQueue) -> Self {
        DriverRing::Split(q)
    }
}

impl From<PackedDriverQueue> for DriverRing {
    fn from(q: PackedDriverQueue) -> Self {
        DriverRing::Packed(q)
    }
}
