//! The storage daemon restarts under a running VM: `vblk serve` is killed (SIGKILL: a
//! crash) or stopped (SIGTERM: an upgrade) three times (`VBLK_RESTARTS=N`: N) while the guest runs fio with crc32c
//! verification, and started again with the same arguments on the same socket. QEMU
//! reconnects (`reconnect-ms`) and hands the new process the inflight area; the requests the
//! old process had popped are resubmitted. fio's write+verify and verify-only passes must
//! both finish clean: no I/O error, nothing lost, nothing corrupted.
//!
//! Prints the guest-visible stall of each restart: from the kill to the new process having
//! the guest's memory mapped again (QEMU reconnected and set the rings up). The `packed_ring_*`
//! tests do the same with the packed virtqueue.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Restarts per test; `VBLK_RESTARTS=10` for the stall medians quoted in the README.
fn restarts() -> usize {
    std::env::var("VBLK_RESTARTS").ok().and_then(|v| v.parse().ok()).unwrap_or(3)
}
/// QEMU's reconnect interval.
const RECONNECT_MS: u32 = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Kill,
    Term,
}

fn restart_during_fio(name: &str, queues: u16, how: Stop, packed: bool) {
    // Every write held 2 ms in the daemon: each kill then finds requests popped and not
    // completed (without it, a TCG guest is so much slower than the daemon that a kill may
    // find none in flight, and the test would prove nothing).
    let cfg = BackendConfig { readonly: false, num_queues: queues, vblk_args: &["--inject", "write:delay=2ms"] };
    let restarts = restarts();
    // Two regions long enough for every restart under TCG (about a second each).
    let region_mib = 256 * restarts.div_ceil(3) as u64;
    let Some(mut fx) = Fixture::new(name, Backend::Vblk, 2 * region_mib * MIB + 128 * MIB, cfg, |_| {}) else {
        return;
    };
    let socket = fx.backend.socket.clone();
    let args = format!("queues={queues},jobs=2,size={region_mib}");
    let extra = if packed { packed_ring() } else { Vec::new() };
    let mut guest = spawn_guest_with(&fx.dir, &socket, "fio-verify", &args, queues, Some(RECONNECT_MS), &extra);
    assert!(
        guest.wait_for_serial("fio write+verify pass", guest_timeout()),
        "[{name}] the guest never started fio:\n{}",
        guest.serial()
    );
    let mut stalls = Vec::new();
    for k in 0..restarts {
        std::thread::sleep(Duration::from_millis(1000));
        assert!(
            !guest.serial().contains("drop caches"),
            "[{name}] fio finished its write pass before restart {k}: make the regions larger\n{}",
            guest.serial()
        );
        let old = fx.backend.pid();
        let t = Instant::now();
        match how {
            Stop::Kill => fx.backend.stop(),
            Stop::Term => {
                let st = fx.backend.terminate(Duration::from_secs(20));
                assert!(st.is_some_and(|s| s.success()), "[{name}] vblk serve did not exit cleanly on SIGTERM: {st:?}");
            }
        }
        let log = fx.dir.join(format!("backend-{}.log", k + 1));
        fx.backend
            .restart(&fx.image, cfg, &log)
            .unwrap_or_else(|e| panic!("[{name}] restarting vblk serve failed: {e}"));
        let pid = fx.backend.pid();
        let attached = settle(true, Duration::from_secs(30), || memfd_mappings(pid) > 0);
        let stall = t.elapsed();
        assert!(
            attached,
            "[{name}] QEMU never reconnected to the restarted daemon (pid {pid})\n----- qemu -----\n{}\n----- backend -----\n{}\n----- serial -----\n{}",
            guest.qemu_log(),
            fx.backend.log_text(),
            guest.serial()
        );
        eprintln!("[{name}] restart {}: pid {old} -> {pid}, guest memory mapped again after {stall:?}", k + 1);
        stalls.push(stall);
    }
    let out = guest.wait();
    let log = fx.backend.log_text();
    if !out.passed {
        panic!(
            "[{name}] guest result {:?} after {restarts} restarts\n----- serial -----\n{}\n----- qemu -----\n{}\n----- last backend -----\n{log}",
            out.result, out.serial, out.qemu_stderr
        );
    }
    fx.backend.check_alive().expect("the restarted vblk serve must still run");
    // What the guest saw: fio's completion latencies (the max is the longest stall).
    for l in out.serial.lines().filter(|l| l.contains("clat (") || l.contains(" lat (")) {
        eprintln!("[{name}] guest fio: {}", l.trim());
    }
    // What the new processes found in flight: a crash leaves popped requests to resubmit
    // (fio keeps 16 in flight per job); a SIGTERM drains them first.
    let resubmitted: usize = (1..=restarts)
        .map(|k| {
            std::fs::read_to_string(fx.dir.join(format!("backend-{k}.log")))
                .unwrap_or_default()
                .contains("resubmitting requests")
        })
        .filter(|&found| found)
        .count();
    eprintln!("[{name}] restarts that found requests in flight: {resubmitted} of {restarts}");
    match how {
        Stop::Kill => assert!(resubmitted > 0, "[{name}] no restart found anything in flight: the test proved nothing"),
        Stop::Term => assert_eq!(resubmitted, 0, "[{name}] SIGTERM must drain what was popped"),
    }
    stalls.sort();
    eprintln!(
        "[{name}] {restarts} restarts ({how:?}, {queues} queue(s)): stall median {:?}, max {:?}; guest PASS",
        stalls[stalls.len() / 2],
        stalls[stalls.len() - 1]
    );
}

#[test]
fn vblk_serve_killed_during_fio_1_queue() {
    restart_during_fio("restart_kill_1q", 1, Stop::Kill, false);
}

#[test]
fn vblk_serve_killed_during_fio_4_queues() {
    restart_during_fio("restart_kill_4q", 4, Stop::Kill, false);
}

#[test]
fn vblk_serve_upgraded_during_fio_4_queues() {
    restart_during_fio("restart_term_4q", 4, Stop::Term, false);
}

#[test]
fn vblk_serve_upgraded_during_fio_1_queue() {
    restart_during_fio("restart_term_1q", 1, Stop::Term, false);
}

// The same with the packed ring (`packed=on`): its inflight regions keep copies of the
// popped descriptors, which used descriptors overwrite in the ring.

#[test]
fn packed_ring_vblk_serve_killed_during_fio_1_queue() {
    restart_during_fio("restart_packed_kill_1q", 1, Stop::Kill, true);
}

#[test]
fn packed_ring_vblk_serve_killed_during_fio_4_queues() {
    restart_during_fio("restart_packed_kill_4q", 4, Stop::Kill, true);
}

#[test]
fn packed_ring_vblk_serve_upgraded_during_fio_4_queues() {
    restart_during_fio("restart_packed_term_4q", 4, Stop::Term, true);
}
