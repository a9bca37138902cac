//! The virtio-blk device engine (virtio 1.2 §5.2).
//!
//! - [`config`]: offered features and the config space.
//! - [`request`]: a validated chain becomes a typed [`request::Request`] (or an error
//!   status), like QEMU's `virtio_blk_handle_request`.
//! - [`merge`]: contiguous reads/writes of a batch become one backend I/O (QEMU's
//!   `MultiReqBuffer`).
//! - [`pipeline`]: one queue's pipeline: pop → parse → merge → backend I/O → finish (status byte,
//!   used ring) → publish. Transport-agnostic: the vhost-user worker threads and the
//!   in-process loopback both drive it.
//! - [`qos`]: per-export IOPS and bandwidth limits, asked before a chain is popped.

pub mod config;
pub mod merge;
pub mod pipeline;
pub mod qos;
pub mod request;

pub use config::DeviceParams;
pub use pipeline::{split_tag, BlkQueue};
pub use qos::{Limits, Throttle};
pub use request::{Parsed, Request, RequestError};
