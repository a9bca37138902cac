//! Fuzz targets of vblk, as a library: the `fuzz_targets/*.rs` binaries only decode the
//! input (`arbitrary`, structure-aware) and call [`chain::run`], [`vhost::run`] or
//! [`merge::run`], so the same code also runs under `cargo test` here (seeds, regressions).
//!
//! - [`chain`]: descriptor chain walking + request parsing over fuzzer-written guest
//!   memory, and the whole per-queue pipeline against a null disk.
//! - [`vhost`]: the vhost-user message handler, over a socketpair, with fds attached.
//! - [`merge`]: request merging.
//! - [`inflight`]: inflight regions written by a hostile frontend, attached and recovered.
//! - [`packed`]: the packed ring's pop / used / publish path against a hostile driver.
//! - [`qcow2`]: qcow2 images with hostile metadata, opened and served through an engine.
//! - [`seeds`]: hand-made valid inputs for the seed corpus (`fuzz/corpus/<target>/`).

pub mod encode;

pub mod chain;
pub mod inflight;
pub mod merge;
pub mod packed;
pub mod qcow2;
pub mod seeds;
pub mod vhost;

/// Decode `bytes` the way `libfuzzer-sys` does for a typed `fuzz_target!`.
pub fn decode<T: for<'a> arbitrary::Arbitrary<'a>>(bytes: &[u8]) -> Option<T> {
    T::arbitrary_take_rest(arbitrary::Unstructured::new(bytes)).ok()
}
