//! [`Ring`]: the device side of a virtqueue, split (§2.7) or packed (§2.8), whichever the
//! driver negotiated (`VIRTIO_F_RING_PACKED`). The request pipeline holds one and never
//! asks which: both pop validated [`Chain`]s named by a `u16` (the split ring's head
//! index, the packed ring's buffer id, both below the queue size), take completions by
//! that name and publish them in batches.

use std::sync::Arc;

use vblk_virtio::{GuestArea, GuestMemory};

use crate::{Chain, PackedBase, PackedQueue, Popped, QueueError, SplitQueue};

/// A split or a packed virtqueue (device side).
pub enum Ring {
    Split(SplitQueue),
    Packed(PackedQueue),
}

/// Forward a call to whichever ring this is.
macro_rules! each {
    ($self:expr, $q:ident => $e:expr) => {
        match $self {
            Ring::Split($q) => $e,
            Ring::Packed($q) => $e,
        }
    };
}

impl From<SplitQueue> for Ring {
    fn from(q: SplitQueue) -> Self {
        Ring::Split(q)
    }
}

impl From<PackedQueue> for Ring {
    fn from(q: PackedQueue) -> Self {
        Ring::Packed(q)
    }
}

impl Ring {
    pub fn as_split(&self) -> Option<&SplitQueue> {
        match self {
            Ring::Split(q) => Some(q),
            Ring::Packed(_) => None,
        }
    }

    pub fn as_packed(&self) -> Option<&PackedQueue> {
        match self {
            Ring::Packed(q) => Some(q),
            Ring::Split(_) => None,
        }
    }

    pub fn size(&self) -> u16 {
        each!(self, q => q.size())
    }

    pub fn is_packed(&self) -> bool {
        matches!(self, Ring::Packed(_))
    }

    pub fn num_in_flight(&self) -> u16 {
        each!(self, q => q.num_in_flight())
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        each!(self, q => q.memory())
    }

    pub fn broken(&self) -> Option<&QueueError> {
        each!(self, q => q.broken())
    }

    pub fn break_ring(&mut self, e: QueueError) -> QueueError {
        each!(self, q => q.break_ring(e))
    }

    #[inline]
    pub fn pop(&mut self, chain: &mut Chain) -> Result<Popped, QueueError> {
        each!(self, q => q.pop(chain))
    }

    /// Pop, but only what the split ring's last `avail.idx` read showed
    /// ([`SplitQueue::pop_seen`]); the packed ring has no index to snapshot and pops as
    /// [`pop`](Self::pop) does.
    #[inline]
    pub fn pop_seen(&mut self, chain: &mut Chain) -> Result<Popped, QueueError> {
        match self {
            Ring::Split(q) => q.pop_seen(chain),
            Ring::Packed(q) => q.pop(chain),
        }
    }

    #[inline]
    pub fn add_used(&mut self, head: u16, len: u32) -> bool {
        each!(self, q => q.add_used(head, len))
    }

    #[inline]
    pub fn publish_used(&mut self) -> bool {
        each!(self, q => q.publish_used())
    }

    pub fn has_available(&mut self) -> Result<bool, QueueError> {
        each!(self, q => q.has_available())
    }

    pub fn enable_notification(&mut self) -> Result<bool, QueueError> {
        each!(self, q => q.enable_notification())
    }

    pub fn disable_notification(&mut self) {
        each!(self, q => q.disable_notification())
    }

    /// The vring base `GET_VRING_BASE` reports: the split ring's next avail index, or the
    /// packed ring's two positions ([`PackedBase::encode`]).
    pub fn vring_base(&self) -> u32 {
        match self {
            Ring::Split(q) => q.next_avail() as u32,
            Ring::Packed(q) => q.base().encode(),
        }
    }

    /// Start at the vring base `SET_VRING_BASE` gave. A packed base naming a slot outside
    /// the ring is refused.
    pub fn set_vring_base(&mut self, base: u32) -> Result<(), QueueError> {
        match self {
            Ring::Split(q) => q.set_next_avail(base as u16),
            Ring::Packed(q) => {
                let b = PackedBase::decode(base, q.size()).ok_or(QueueError::BadPackedBase(base))?;
                q.set_base(b);
            }
        }
        Ok(())
    }

    /// Track requests in the frontend's inflight region (see [`crate::inflight`]);
    /// returns how many will be resubmitted.
    pub fn attach_inflight(&mut self, area: GuestArea, recover: bool) -> Result<usize, QueueError> {
        match self {
            Ring::Split(q) => q.attach_inflight(area, recover),
            Ring::Packed(q) => q.attach_inflight(area, recover),
        }
    }
}
