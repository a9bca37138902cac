//! Wire types and guest memory: the bottom layer of vblk.
//!
//! - [`blk`]: virtio-blk on the wire: request header (`virtio_blk_outhdr`), request types,
//!   status codes, discard/write-zeroes segments, the config space and feature bits
//!   (virtio 1.2 §5.2).
//! - [`memory`]: guest memory as the vhost-user frontend shares it (memfd regions mmap'd
//!   into this process), translation of guest-physical and frontend-virtual addresses,
//!   and the few raw accesses the layers above need. All `unsafe` of the device side's
//!   memory access lives in that module.

pub mod blk;
pub mod dirty_log;
pub mod memory;

pub use dirty_log::DirtyLog;
pub use memory::{GuestArea, GuestMemory, Iov, MemoryError, RegionSpec};

/// Feature bits common to all virtio devices (virtio 1.2 §6).
pub mod features {
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

    /// `VIRTIO_F_VERSION_1`: little-endian, any descriptor layout.
    pub const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
    /// `VIRTIO_RING_F_INDIRECT_DESC` (§2.7.5.3).
    pub const RING_INDIRECT_DESC: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;
    /// `VIRTIO_RING_F_EVENT_IDX` (§2.7.7, §2.7.10).
    pub const RING_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
    /// `VIRTIO_F_RING_PACKED` (§2.8): the packed virtqueue layout.
    pub const RING_PACKED: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_RING_PACKED;
    /// `VHOST_USER_F_PROTOCOL_FEATURES` (vhost-user: bit 30 of the virtio feature word).
    pub const VHOST_USER_PROTOCOL_FEATURES: u64 = 1 << 30;
    /// `VHOST_F_LOG_ALL`: the frontend may ask the backend to log every write into guest
    /// memory (live migration).
    pub const VHOST_F_LOG_ALL: u64 = 1 << 26;
}
