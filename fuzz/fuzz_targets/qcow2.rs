#![no_main]
//! qcow2 images with hostile metadata. See `vblk_fuzz::qcow2`.
libfuzzer_sys::fuzz_target!(|input: vblk_fuzz::qcow2::Qcow2Input| vblk_fuzz::qcow2::run_input(&input));
