//! Online resize in a running guest: `vblk serve --control` serves a disk to a Linux guest
//! under QEMU (TCG), `vblk ctl resize` changes its size while the guest runs, and the guest
//! (`guest/tests/resize.sh`) sees `/sys/block/vda/size` change without a reboot and reads
//! and writes the new end. QEMU learns of the change from vblk's
//! `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`, reads the config space again and raises the
//! guest's config interrupt.
//!
//! Raw: grow, a shrink refused without `--allow-shrink`, then a shrink. qcow2: grow, the
//! image consistent afterwards (`qemu-img check`). A resize while the guest has no driver
//! (QEMU ignores a notification then): the guest sees it once its device starts again. A
//! resize while the firmware drives the disk: the guest's kernel starts with the new size
//! and write-back.
//! `VBLK_SKIP_GUEST=1` skips them. And `export_resize`'s answers to bad calls (no guest).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

const GUEST_WAIT: Duration = Duration::from_secs(240);

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `vblk serve IMAGE --control CTL --name disk ...`, its vhost-user socket up.
fn serve(dir: &TempDir, image: &Path, extra: &[&str]) -> BackendProcess {
    let sock = socket_path(dir);
    let ctl = dir.join("ctl.sock");
    let mut args = vec!["serve", s(image), "--socket", s(&sock), "--control", s(&ctl), "--name", "disk"];
    args.extend_from_slice(&["--num-queues", "2"]);
    args.extend_from_slice(extra);
    BackendProcess::start_with_args(Backend::Vblk, &args, &sock, &dir.join("serve.log"))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `vblk ctl --control DIR/ctl.sock ARGS`.
fn ctl(dir: &TempDir, args: &[&str]) -> Output {
    let ctl = dir.join("ctl.sock");
    Command::new(env!("CARGO_BIN_EXE_vblk")).args(["ctl", "--control", s(&ctl)]).args(args).output().expect("vblk ctl")
}

fn ctl_ok(dir: &TempDir, backend: &BackendProcess, args: &[&str]) -> String {
    let out = ctl(dir, args);
    assert!(
        out.status.success(),
        "vblk ctl {args:?}: {}\n--- daemon log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        backend.log_text()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Wait for `marker` on the guest's console; on failure, everything needed to see why.
fn expect_serial(guest: &mut RunningGuest, backend: &BackendProcess, marker: &str) {
    assert!(
        guest.wait_for_serial(marker, GUEST_WAIT),
        "no {marker:?} from the guest\n--- serial:\n{}\n--- qemu:\n{}\n--- daemon:\n{}",
        guest.serial(),
        guest.qemu_log(),
        backend.log_text()
    );
}

fn expect_pass(guest: RunningGuest, backend: &BackendProcess) {
    let outcome = guest.wait();
    assert!(outcome.passed, "the guest failed:\n{outcome:#?}\n--- daemon:\n{}", backend.log_text());
}

/// What `resize.sh` writes: `yes vblk-resize-TAG | head -c 1M`.
fn guest_pattern(tag: &str) -> Vec<u8> {
    format!("vblk-resize-{tag}\n").into_bytes().into_iter().cycle().take(MIB as usize).collect()
}

const SECTORS_PER_MIB: u64 = MIB / 512;

#[test]
fn a_running_guest_sees_its_disk_grow_and_shrink_and_uses_the_new_end() {
    if skip_guest("a_running_guest_sees_its_disk_grow_and_shrink") {
        return;
    }
    let _serial = serialize();
    let dir = TempDir::new("resize-raw");
    let image = dir.join("disk.img");
    let backend = serve(&dir, &image, &["--size", "64M"]);
    let args = format!("from={},to={},then={}", 64 * SECTORS_PER_MIB, 128 * SECTORS_PER_MIB, 48 * SECTORS_PER_MIB);
    let mut guest = spawn_guest(&dir, &backend.socket, "resize", &args, 2);
    expect_serial(&mut guest, &backend, "[resize] READY");

    let t = Instant::now();
    assert_eq!(ctl_ok(&dir, &backend, &["resize", "disk", "128M"]), "disk: 128 MiB");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 128 * MIB);
    expect_serial(&mut guest, &backend, "[resize] GROWN");
    eprintln!("the guest saw the new size and used it {:?} after vblk ctl resize", t.elapsed());
    // The guest's write at the new end is in the image (O_DIRECT + fsync in the guest).
    assert!(read_at(&image, 127 * MIB, MIB as usize) == guest_pattern("new"), "the new end is not in the image");

    // Shrinking needs --allow-shrink; refused, nothing changes.
    let out = ctl(&dir, &["resize", "disk", "48M"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--allow-shrink"), "{err}");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 128 * MIB);
    assert_eq!(ctl_ok(&dir, &backend, &["resize", "disk", "48M", "--allow-shrink"]), "disk: 48 MiB");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 48 * MIB);
    expect_pass(guest, &backend);
}

#[test]
fn a_qcow2_disk_grows_under_a_running_guest() {
    if skip_guest("a_qcow2_disk_grows_under_a_running_guest") {
        return;
    }
    let Some(qemu_img) = find_program("qemu-img") else {
        eprintln!("SKIPPED a_qcow2_disk_grows_under_a_running_guest: no qemu-img");
        return;
    };
    let _serial = serialize();
    let dir = TempDir::new("resize-qcow2");
    let image = dir.join("disk.qcow2");
    let mut backend = serve(&dir, &image, &["--format", "qcow2", "--size", "64M"]);
    let args = format!("from={},to={}", 64 * SECTORS_PER_MIB, 1024 * SECTORS_PER_MIB);
    let mut guest = spawn_guest(&dir, &backend.socket, "resize", &args, 2);
    expect_serial(&mut guest, &backend, "[resize] READY");
    assert_eq!(ctl_ok(&dir, &backend, &["resize", "disk", "1G"]), "disk: 1 GiB");
    expect_serial(&mut guest, &backend, "[resize] GROWN");
    let out = ctl(&dir, &["resize", "disk", "512M", "--allow-shrink"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("shrinking a qcow2 image"), "{err}");
    expect_pass(guest, &backend);

    assert_eq!(backend.terminate(Duration::from_secs(30)).map(|s| s.success()), Some(true), "{}", backend.log_text());
    let check = Command::new(&qemu_img).args(["check", "-f", "qcow2"]).arg(&image).output().unwrap();
    assert!(check.status.success(), "qemu-img check: {}", String::from_utf8_lossy(&check.stdout));
    let raw = dir.join("disk.raw");
    let conv =
        Command::new(&qemu_img).args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&image).arg(&raw).output().unwrap();
    assert!(conv.status.success(), "qemu-img convert: {}", String::from_utf8_lossy(&conv.stderr));
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 1024 * MIB, "the image's virtual size");
    assert!(read_at(&raw, 1023 * MIB, MIB as usize) == guest_pattern("new"), "the guest's write at the new end");
}

#[test]
fn a_resize_while_the_guest_has_no_driver_reaches_it_when_the_driver_starts() {
    if skip_guest("a_resize_while_the_guest_has_no_driver") {
        return;
    }
    let _serial = serialize();
    let dir = TempDir::new("resize-unbound");
    let image = dir.join("disk.img");
    let backend = serve(&dir, &image, &["--size", "64M"]);
    // The guest unbinds virtio_blk (QEMU stops its vhost device: a config change now
    // would be ignored, and QEMU keeps the size it read when it created the device), the
    // host resizes, the guest binds the driver again: it probes with QEMU's old size, and
    // vblk's notification at the device's start brings the new one.
    let args = format!("from={},to={},unbound=10", 64 * SECTORS_PER_MIB, 96 * SECTORS_PER_MIB);
    let mut guest = spawn_guest(&dir, &backend.socket, "resize", &args, 2);
    expect_serial(&mut guest, &backend, "[resize] READY");
    assert_eq!(ctl_ok(&dir, &backend, &["resize", "disk", "96M"]), "disk: 96 MiB");
    let serial = guest.serial();
    assert!(!serial.contains("REBINDING"), "the guest did not wait for the resize (host too slow?):\n{serial}");
    expect_pass(guest, &backend);
}

#[test]
fn a_resize_while_the_firmware_drives_the_disk_leaves_the_guest_write_back() {
    if skip_guest("a_resize_while_the_firmware_drives_the_disk") {
        return;
    }
    let _serial = serialize();
    let dir = TempDir::new("resize-firmware");
    let image = dir.join("disk.img");
    let backend = serve(&dir, &image, &["--size", "64M"]);
    // Resized right after QEMU connected: the firmware (SeaBIOS, which negotiates neither
    // FLUSH nor CONFIG_WCE) runs the device, QEMU is told and copies the whole config space,
    // and the guest's kernel probes with that copy: it must see the new size and the cache
    // mode it will get (write-back), not the firmware's.
    let sectors = 96 * SECTORS_PER_MIB;
    let guest = spawn_guest(&dir, &backend.socket, "resize", &format!("from={sectors},to={sectors}"), 2);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctl_ok(&dir, &backend, &["list", "--json"]).contains("\"connected\": true") {
        assert!(Instant::now() < deadline, "QEMU did not connect:\n{}", backend.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ctl_ok(&dir, &backend, &["resize", "disk", "96M"]), "disk: 96 MiB");
    let serial = guest.serial();
    assert!(!serial.contains("vblk-init: /dev/vda"), "the guest's driver had already started:\n{serial}");
    expect_pass(guest, &backend);
}

/// One JSON-RPC call on the daemon's control socket; the whole response.
fn rpc(dir: &TempDir, params: serde_json::Value) -> serde_json::Value {
    let mut c = UnixStream::connect(dir.join("ctl.sock")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let req = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "export_resize", "params": params});
    c.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

#[test]
fn export_resize_answers_bad_calls_with_clear_errors_and_changes_nothing() {
    let dir = TempDir::new("resize-rpc");
    let image = dir.join("disk.img");
    let ro = dir.join("ro.img");
    create_image(&ro, 8 * MIB);
    let backend = serve(&dir, &image, &["--size", "16M"]);
    let ro_sock = dir.join("ro.sock");
    ctl_ok(&dir, &backend, &["add", "ro", s(&ro), "--socket", s(&ro_sock), "--readonly"]);
    let cases: [(serde_json::Value, i64, &str); 10] = [
        (serde_json::json!({"name": "disk"}), -32602, "missing 'size'"),
        (serde_json::json!({"size": 1 << 30}), -32602, "missing 'name'"),
        (serde_json::json!({"name": "disk", "size": "lots"}), -32602, "'size'"),
        (serde_json::json!({"name": "disk", "size": -512}), -32602, "'size' must be a non-negative integer"),
        (serde_json::json!({"name": "disk", "size": 1 << 30, "allow_shrink": "yes"}), -32602, "'allow_shrink'"),
        (serde_json::json!({"name": "disk", "size": 1 << 30, "shrink": true}), -32602, "unknown param 'shrink'"),
        (serde_json::json!({"name": "nope", "size": 1 << 30}), -32001, "no export named 'nope'"),
        (serde_json::json!({"name": "disk", "size": (1 << 30) + 100}), -32602, "multiple of 512"),
        (serde_json::json!({"name": "disk", "size": 0}), -32602, "multiple of 512"),
        (serde_json::json!({"name": "ro", "size": 1 << 30}), -32000, "read-only"),
    ];
    for (params, code, text) in cases {
        let r = rpc(&dir, params.clone());
        let e = &r["error"];
        assert_eq!(e["code"], code, "{params}: {r}");
        assert!(e["message"].as_str().unwrap().contains(text), "{params}: {r}");
    }
    let r = rpc(&dir, serde_json::json!({"name": "disk", "size": 4 * MIB}));
    assert!(r["error"]["message"].as_str().unwrap().contains("allow_shrink"), "{r}");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 16 * MIB, "nothing changed");
    assert_eq!(std::fs::metadata(&ro).unwrap().len(), 8 * MIB);

    let r = rpc(&dir, serde_json::json!({"name": "disk", "size": 32 * MIB}));
    assert_eq!(r["result"], serde_json::json!({"name": "disk", "size": 32 * MIB}), "{r}");
    let r = rpc(&dir, serde_json::json!({"name": "disk", "size": "48M"}));
    assert_eq!(r["result"]["size"], 48 * MIB, "a size with a suffix: {r}");
    let r = rpc(&dir, serde_json::json!({"name": "disk", "size": 4 * MIB, "allow_shrink": true}));
    assert_eq!(r["result"]["size"], 4 * MIB, "{r}");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 4 * MIB);
    let list = ctl_ok(&dir, &backend, &["list", "--json"]);
    assert!(list.contains("\"size\": 4194304") && list.contains("4 MiB"), "export_list shows the new size: {list}");
}
