#![no_main]
//! Inflight regions from a hostile frontend. See `vblk_fuzz::inflight`.
libfuzzer_sys::fuzz_target!(|input: vblk_fuzz::inflight::InflightInput| vblk_fuzz::inflight::run(&input));
