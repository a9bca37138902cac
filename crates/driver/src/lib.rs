//! A userspace virtio-blk driver for any vhost-user-blk backend (vblk, qemu-storage-daemon,
//! SPDK, ...): the guest side of the seeds, without a guest.
//!
//! - [`Device::connect`] negotiates features and protocol features, shares a memfd with the
//!   backend and sets up the virtqueues ([`device`]): packed rings when the backend offers
//!   them, else split ([`Options::ring`], [`Device::ring_kind`]).
//! - Each [`QueueHandle`] is one virtqueue for one thread: [`QueueHandle::submit`] turns an
//!   [`Op`] into `virtio_blk_outhdr` + data + status descriptors, [`QueueHandle::kick`]
//!   publishes them, [`QueueHandle::wait`] / [`QueueHandle::poll`] reap completions ([`queue`]).
//! - I/O buffers ([`IoBuf`]) live in the shared memory: the backend reads and writes them in
//!   place ([`memory`]).
//! - [`loopback::loopback`] runs vblk's own device engine in this process over a socketpair.
//!
//! ```no_run
//! use vblk_driver::{Device, Op, Options};
//!
//! let mut dev = Device::connect("vblk.sock".as_ref(), &Options::default())?;
//! println!("{} bytes, serial {:?}", dev.info().capacity.unwrap_or(0), dev.info().serial);
//! let mut q = dev.take_queues().remove(0);
//! let buf = q.alloc(4096)?;
//! buf.write_at(0, b"hello")?;
//! q.submit(Op::Write { offset: 0 }, Some(buf), 1)?;
//! q.kick()?;
//! let mut done = Vec::new();
//! q.wait(&mut done, 1)?;
//! assert!(done[0].result.is_ok());
//! # Ok::<(), vblk_driver::DriverError>(())
//! ```

pub mod device;
pub mod loopback;
pub mod memory;
pub mod queue;
#[cfg(feature = "raw")]
pub mod raw;
mod session;

use std::path::PathBuf;
use std::time::Duration;

pub use device::{Device, DeviceInfo, Options, RingChoice};
pub use loopback::{loopback, LoopbackConfig, LoopbackServer};
pub use memory::IoBuf;
pub use queue::{Completion, Op, QueueHandle, RequestFailure};
pub use vblk_queue::RingKind;

/// Errors of the driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cannot connect to {0}: {1}")]
    Connect(PathBuf, std::io::Error),
    #[error("socket: {0}")]
    Socket(std::io::Error),
    #[error("vhost-user {0} failed: {1}")]
    Protocol(&'static str, String),
    #[error("the backend does not support {0}")]
    Unsupported(&'static str),
    #[error("the backend does not offer the packed virtqueue (VIRTIO_F_RING_PACKED)")]
    PackedNotOffered,
    #[error("invalid options: {0}")]
    BadOptions(&'static str),
    #[error("shared memory: {0}")]
    Memfd(std::io::Error),
    #[error("guest memory: {0}")]
    Memory(#[from] vblk_virtio::MemoryError),
    #[error("eventfd: {0}")]
    Eventfd(std::io::Error),
    #[error("virtqueue: {0}")]
    Device(#[from] vblk_queue::DriverError),
    #[error("virtqueue setup: {0}")]
    Queue(#[from] vblk_queue::QueueError),
    #[error("the queue is full")]
    QueueFull,
    #[error("no room for a {0}-byte buffer in shared memory")]
    OutOfBufferMemory(u32),
    #[error("bad buffer length {0}")]
    BufferSize(u32),
    #[error("this operation needs a data buffer (or must not have one)")]
    BufferMismatch,
    #[error("{0} bytes is too large for one request")]
    TooLarge(u64),
    #[error("the backend did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the backend closed the connection")]
    BackendGone,
    #[error("in-process device: {0}")]
    Loopback(String),
}
