//! vhost-user-blk backend: the control plane and the data plane's threads.
//!
//! - [`server`]: the unix socket, one frontend at a time, reconnects.
//! - [`device`]: vhost-user messages (parsed by rust-vmm's `vhost` crate) applied to the
//!   device: features, memory table, rings, config space.
//! - `worker`: the threads that run the virtio-blk pipeline for the rings.

pub mod device;
pub mod server;
mod worker;

pub use device::{DataPlaneOptions, DeviceError, VblkDevice, MAX_MEM_SLOTS, MAX_MEM_TABLE_REGIONS};
pub use server::{
    claim_socket_path, serve_stream, serve_stream_with_timeout, ConnectionEnd, Server, ServerError,
    DEFAULT_MESSAGE_TIMEOUT,
};
