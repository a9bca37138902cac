#![no_main]
//! The vhost-user message handler over a socketpair. See `vblk_fuzz::vhost`.
libfuzzer_sys::fuzz_target!(
    init: vblk_fuzz::vhost::ignore_sigpipe(),
    |input: vblk_fuzz::vhost::VuInput| vblk_fuzz::vhost::run(&input)
);
