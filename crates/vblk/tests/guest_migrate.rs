//! Live migration of a VM whose disk is served by vblk: two QEMUs (TCG) on this machine,
//! the source attached to one `vblk serve`, the destination to a second `vblk serve` of the
//! same image (shared storage). While the guest runs fio with crc32c verification, the
//! source migrates it over a unix socket (QMP `migrate`). vblk offers `VHOST_F_LOG_ALL` and
//! `LOG_SHMFD`, so QEMU allows the migration, and logs every page it writes into guest
//! memory (read data, status bytes, used ring) while RAM is copied; `GET_VRING_BASE` drains
//! before the last round. The guest must finish fio clean on the destination.

mod common;

use std::time::{Duration, Instant};

use common::qmp::Qmp;
use common::*;
use serde_json::json;

fn migrate_during_fio(name: &str, queues: u16, packed: bool) {
    let cfg = BackendConfig { readonly: false, num_queues: queues, vblk_args: &[] };
    let Some(mut fx) = Fixture::new(name, Backend::Vblk, 640 * MIB, cfg, |_| {}) else {
        return;
    };
    let dest_socket = fx.dir.join("dest.sock");
    let mut dest_backend = BackendProcess::start(Backend::Vblk, &fx.image, &dest_socket, cfg, &fx.dir.join("dest.log"))
        .unwrap_or_else(|e| panic!("[{name}] starting the destination's vblk serve failed: {e}"));
    let (src_qmp, dst_qmp, stream) = (fx.dir.join("src.qmp"), fx.dir.join("dst.qmp"), fx.dir.join("migrate.sock"));
    let qmp_arg = |p: &std::path::Path| {
        let mut a = vec!["-qmp".to_string(), format!("unix:{},server=on,wait=off", p.display())];
        if packed {
            a.extend(packed_ring());
        }
        a
    };
    let args = format!("queues={queues},jobs=2,size=256");

    let mut source =
        spawn_guest_with(&fx.dir, &fx.backend.socket, "fio-verify", &args, queues, None, &qmp_arg(&src_qmp));
    assert!(
        source.wait_for_serial("fio write+verify pass", guest_timeout()),
        "[{name}] the guest never started fio:\n{}",
        source.serial()
    );
    std::thread::sleep(Duration::from_secs(1));
    let mut dest_args = qmp_arg(&dst_qmp);
    dest_args.extend(["-incoming".to_string(), format!("unix:{}", stream.display())]);
    let dest = spawn_guest_with(&fx.dir, &dest_socket, "fio-verify", &args, queues, None, &dest_args);

    let mut src = Qmp::connect(&src_qmp, Duration::from_secs(30)).unwrap_or_else(|e| panic!("[{name}] {e}"));
    let mut dst = Qmp::connect(&dst_qmp, Duration::from_secs(30)).unwrap_or_else(|e| panic!("[{name}] {e}"));
    let t = Instant::now();
    src.execute("migrate", json!({ "uri": format!("unix:{}", stream.display()) }))
        .unwrap_or_else(|e| panic!("[{name}] migrate refused: {e}\n{}", source.qemu_log()));
    let status = loop {
        let info = src.execute("query-migrate", json!({})).unwrap_or_else(|e| panic!("[{name}] {e}"));
        let status = info.get("status").and_then(|s| s.as_str()).unwrap_or("").to_string();
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") || t.elapsed() > Duration::from_secs(300) {
            eprintln!("[{name}] migration {status} after {:?}: {info}", t.elapsed());
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        status,
        "completed",
        "[{name}] migration did not complete\n----- source qemu -----\n{}\n----- source vblk -----\n{}",
        source.qemu_log(),
        fx.backend.log_text()
    );
    assert!(
        !source.serial().contains("VBLK-RESULT"),
        "[{name}] fio finished on the source before the migration did: make the regions larger"
    );
    let running = dst.execute("query-status", json!({})).unwrap_or_else(|e| panic!("[{name}] {e}"));
    eprintln!("[{name}] destination: {running}");
    source.kill();

    let out = dest.wait();
    let log = dest_backend.log_text();
    if !out.passed {
        panic!(
            "[{name}] guest result on the destination: {:?}\n----- destination serial -----\n{}\n----- destination qemu -----\n{}\n----- destination vblk -----\n{log}\n----- source vblk -----\n{}",
            out.result,
            out.serial,
            out.qemu_stderr,
            fx.backend.log_text()
        );
    }
    // The source marked the pages it wrote while RAM was being copied (the bits themselves
    // are checked by vblk-virtio's unit tests).
    let src_log = fx.backend.log_text();
    let marked = settle(true, Duration::from_secs(10), || {
        fx.backend.log_text().lines().any(|l| l.contains("dirty log released") && !l.contains("marked=0"))
    });
    assert!(marked, "[{name}] the source never marked a dirty page:\n{src_log}");
    dest_backend.check_alive().expect("the destination's vblk serve must still run");
    fx.backend.check_alive().expect("the source's vblk serve must survive the migration");
    eprintln!("[{name}] fio passed on the destination after a live migration");
}

#[test]
fn live_migration_during_fio_2_queues() {
    migrate_during_fio("migrate_2q", 2, false);
}

/// The packed ring migrates too: the source's `GET_VRING_BASE` (both positions with their
/// wrap counters) is what QEMU sends the destination's daemon in `SET_VRING_BASE`, with
/// requests in flight and positions far from the start.
#[test]
fn live_migration_during_fio_2_queues_packed_ring() {
    migrate_during_fio("migrate_packed_2q", 2, true);
}
