//! Faults from above with a real guest: QEMU killed (SIGKILL) while the guest runs fio
//! against `vblk serve`. The daemon must survive, release everything the dead frontend gave
//! it (fds back to the baseline, its guest memory unmapped), keep what the guest had flushed
//! before the kill, and serve the next guest.
//!
//! Uses the real-guest harness of `tests/common` (QEMU TCG, `VBLK_SKIP_GUEST=1` skips) and
//! `guest/tests/fio-until-killed.sh`.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn qemu_killed_during_fio_leaves_vblk_serving() {
    let name = "qemu_killed_during_fio";
    let cfg = BackendConfig { readonly: false, num_queues: 2, vblk_args: &[] };
    let Some(mut fx) = Fixture::new(name, Backend::Vblk, 64 * MIB, cfg, |_| {}) else {
        return;
    };
    std::thread::sleep(Duration::from_millis(300));
    let pid = fx.backend.pid();
    let baseline = fd_count(pid);

    // The guest writes and flushes a pattern, then runs fio until it is killed.
    let mut guest = spawn_guest(&fx.dir, &fx.backend.socket, "fio-until-killed", "tag=before-kill", 2);
    let running = guest.wait_for_serial("FIO-RUNNING", guest_timeout());
    assert!(running, "the guest never started fio:\n{}", guest.serial());
    assert!(guest.serial().contains("FLUSHED"), "the pattern was not flushed:\n{}", guest.serial());
    std::thread::sleep(Duration::from_secs(3));
    assert!(memfd_mappings(pid) > 0, "vblk serve does not map the guest's memory");
    let qemu = guest.pid();
    let killed = Instant::now();
    guest.kill();
    eprintln!("[{name}] QEMU (pid {qemu}) killed during fio");

    // The daemon drains the dead guest's I/O and lets go of everything.
    let fds = settle(baseline, Duration::from_secs(30), || fd_count(pid));
    let maps = settle(0, Duration::from_secs(30), || memfd_mappings(pid));
    eprintln!("[{name}] released in {:?}", killed.elapsed());
    fx.backend.check_alive().expect("vblk serve must survive QEMU being killed");
    assert_eq!(fds, baseline, "fds of vblk serve after the kill");
    assert_eq!(maps, 0, "the killed guest's memory is still mapped");
    // What the guest flushed before the kill is in the image.
    assert!(read_at(&fx.image, MIB, MIB as usize) == smoke_pattern("before-kill"), "flushed data lost");

    // The next guest is served, sees the flushed data through the device, and writes.
    fx.boot_expect_pass("smoke", "prev=before-kill,tag=after-kill", 2);
    fx.backend.check_alive().expect("vblk serve must survive the second guest");
    assert!(read_at(&fx.image, MIB, MIB as usize) == smoke_pattern("after-kill"), "second guest's data lost");
    assert_eq!(settle(baseline, Duration::from_secs(30), || fd_count(pid)), baseline, "fds after the second guest");
}
