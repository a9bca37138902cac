#![no_main]
//! The packed ring against a hostile driver. See `vblk_fuzz::packed`.
libfuzzer_sys::fuzz_target!(|input: vblk_fuzz::packed::PackedInput| vblk_fuzz::packed::run(&input));
