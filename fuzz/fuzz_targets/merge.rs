#![no_main]
//! Request merging (`MergeBuffer::drain_runs`). See `vblk_fuzz::merge`.
libfuzzer_sys::fuzz_target!(|input: vblk_fuzz::merge::MergeInput| vblk_fuzz::merge::run(&input));
