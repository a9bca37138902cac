//! The virtqueue core of vblk.
//!
//! - [`layout`]: the split ring's byte layout, shared by the device and the driver side.
//! - [`split`]: the device side of a split ring: pop + validate chains, used ring,
//!   notification suppression.
//! - [`packed`]: the device side of a packed ring, the same for virtio 1.1's one-ring layout.
//! - [`ring`]: [`Ring`], either of the two, which is what the request pipeline holds.
//! - [`chain`]: a validated chain and byte-stream access to its buffers.
//! - [`driver`]: the driver side of a split ring (vblk's userspace driver, tests).
//! - [`driver_packed`]: the driver side of a packed ring; [`driver_ring`]: [`DriverRing`],
//!   either of the two, which is what vblk's driver holds.
//! - [`inflight`]: inflight I/O tracking in a region shared with the frontend, so that a
//!   restarted backend finishes what its predecessor popped; [`inflight_packed`]: the same
//!   for a packed ring.
//!
//! Spec references are to Virtual I/O Device (VIRTIO) Version 1.2.

pub mod chain;
pub mod driver;
pub mod driver_packed;
pub mod driver_ring;
pub mod inflight;
pub mod inflight_packed;
pub mod layout;
pub mod packed;
pub mod ring;
pub mod split;

pub use chain::{Chain, Reader, StatusByte, StreamError, Writer};
pub use driver::{Buffer, DriverError, DriverQueue};
pub use driver_packed::{PackedDriverQueue, PackedRingWatch};
pub use driver_ring::{DriverRing, RingKind};
pub use layout::{need_event, Descriptor, PackedDescriptor, RingPos, SplitLayout, MAX_QUEUE_SIZE};
pub use packed::{PackedBase, PackedQueue};
pub use ring::Ring;
pub use split::{AddrSpace, Popped, RingAddrs, RingFeatures, SplitQueue, MAX_INDIRECT_ENTRIES};

use vblk_virtio::MemoryError;

/// The ring itself is unusable: the queue stops until it is set up again.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    #[error("queue size {0} is not a power of two in 1..=32768")]
    InvalidSize(u32),
    #[error("ring address: {0}")]
    RingMemory(#[from] MemoryError),
    #[error("avail index jumped from {last} to {now}, more than the queue size {size}")]
    AvailIdxJump { last: u16, now: u16, size: u16 },
    #[error("avail ring names head {head}, queue size is {size}")]
    HeadOutOfRange { head: u16, size: u16 },
    #[error("head {head} made available again while still in flight")]
    HeadInFlight { head: u16 },
    /// A chain with nowhere to write a status: completing it would look like success to
    /// a driver that reads the stale byte, so the queue stops instead.
    #[error("chain at head {head} has no status byte ({reason})")]
    NoStatus { head: u16, reason: String },
    #[error("packed queue size {0} is not in 1..=32768")]
    InvalidPackedSize(u32),
    #[error("packed vring base {0:#x} names a slot outside the ring")]
    BadPackedBase(u32),
    #[error("buffer id {id} out of range (queue size {size})")]
    IdOutOfRange { id: u16, size: u16 },
    #[error("buffer id {id} made available again while still in flight")]
    IdInFlight { id: u16 },
    #[error("packed chain continues into slot {slot}, which the driver did not make available")]
    PackedChainNotAvailable { slot: u16 },
    #[error("packed chain has no end within the ring of {size} slots")]
    PackedChainTooLong { size: u16 },
    #[error("driver made {slots} more slots available with {in_flight} in flight, more than the ring's {size}")]
    PackedOverrun { in_flight: u32, slots: u32, size: u16 },
    #[error("inflight region: {0}")]
    Inflight(#[from] inflight::InflightError),
}

/// One descriptor chain is invalid: that request is answered IOERR where its status byte
/// can be located (the queue goes on), or the queue breaks ([`QueueError::NoStatus`]).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor next index {next} out of range ({limit} entries)")]
    NextOutOfRange { next: u16, limit: u32 },
    #[error("descriptor chain longer than {limit} entries (or a loop)")]
    TooLong { limit: u32 },
    #[error("zero-length descriptor")]
    ZeroLength,
    #[error("buffer: {0}")]
    Memory(#[from] MemoryError),
    #[error("indirect descriptor but VIRTIO_RING_F_INDIRECT_DESC not negotiated")]
    IndirectNotNegotiated,
    #[error("indirect descriptor with the NEXT flag")]
    IndirectWithNext,
    #[error("indirect descriptor not at the head of the chain")]
    IndirectNotFirst,
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("indirect table length {0} is not a non-zero multiple of 16")]
    IndirectBadLength(u32),
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
}
