//! vhost-user-blk backend: the control plane and the data plane's threads.
//!
//! - [`server`]: the unix socket, one frontend at a time, reconnects.
//! - [`device`]: vhost-user messages (parsed by rust-vmm's `vhost` crate) applied to the
//!   device: features, memory table, rings, config space.
//! - `worker`: the threads that run the virtio-blk pipeline for the rings.

pub mod device;
pub mod server;
mod worker;

pub use device::{DataPlaneOptions, DeviceError, VblkDevice, MAX_MEM_SLOTS};
pub use server::{serve_stream, ConnectionEnd, Server, ServerError};
