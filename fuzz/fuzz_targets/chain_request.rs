#![no_main]
//! Chain walking + request parsing over random guest memory, then the whole queue
//! pipeline against a null disk. See `vblk_fuzz::chain`.
libfuzzer_sys::fuzz_target!(|input: vblk_fuzz::chain::ChainInput| vblk_fuzz::chain::run(&input));
