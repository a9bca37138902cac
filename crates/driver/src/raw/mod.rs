//! A misbehaving driver, for tests only (feature `raw`).
//!
//! The normal driver ([`crate::QueueHandle`], [`crate::Device`]) only ever writes valid rings
//! and messages. The hostile-guest test suites need the opposite: every byte a guest or a
//! frontend controls, written by hand.
//!
//! - [`ring`]: arbitrary descriptors, avail entries, avail/used indices and request headers
//!   in the shared memory of a connected device, then a kick; reading back the used ring.
//! - [`message`]: arbitrary vhost-user messages on the socket (any request code, any size,
//!   any number of fds), and reading the reply.

pub mod message;
pub mod ring;
