//! A misbehaving driver, for tests only (feature `raw`).
//!
//! The normal driver ([`crate::QueueHandle`], [`crate::Device`]) only ever writes valid rings
//! and messages. The hostile-guest test suites need the opposite: every byte a guest or a
//! frontend controls, written by hand.
//!
//! - [`ring`]: arbitrary descriptors, avail entries, avail/used indices and request headers
//!   in the shared memory of a connected device, then a kick; reading back the used ring.
//! - [`packed`]: the same for a packed ring: arbitrary slots (AVAIL/USED bits included),
//!   chains, event suppression structures and vring bases; reading back used descriptors.
//! - [`message`]: arbitrary vhost-user messages on the socket (any request code, any size,
//!   any number of fds), and reading the reply.

pub mod message;
pub mod packed;
pub mod ring;

use crate::{DriverError, IoBuf};

/// The guest memory of a raw queue, split or packed: what request builders need.
pub trait RawMemory {
    /// The 128-byte scratch area of head (split) or buffer id (packed) `id`.
    fn slot(&self, id: u16) -> u64;
    /// Write `data` at guest address `gpa` (inside guest memory).
    fn write_mem(&self, gpa: u64, data: &[u8]) -> Result<(), DriverError>;
    /// Read guest memory at `gpa`.
    fn read_mem(&self, gpa: u64, out: &mut [u8]) -> Result<(), DriverError>;
    /// A buffer in guest memory (4 KiB aligned), freed when dropped.
    fn alloc(&self, len: u32) -> Result<IoBuf, DriverError>;
    /// The first guest address outside guest memory.
    fn memory_size(&self) -> u64;
}
