//! The data plane's clock: nanoseconds since the first call, as a `u64`.
//!
//! A request's start is stored as one `u64` and its latency is one subtraction: the
//! conversion from `Instant` is paid once per clock read, and the pipeline reads the clock
//! once per batch (of pops, of completions), not per request. `Instant` is
//! `CLOCK_MONOTONIC` through the vDSO, about 20 ns.

use std::sync::OnceLock;
use std::time::Instant;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Monotonic nanoseconds since the first call in this process.
#[inline]
pub fn now_ns() -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(Instant::now().saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_moves_forward() {
        let a = now_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = now_ns();
        assert!(b >= a + 2_000_000, "{a} -> {b}");
    }
}
