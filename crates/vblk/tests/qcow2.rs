//! `vblk serve --format qcow2` end to end, checked against QEMU's own qcow2 code: images made
//! by `qemu-img`, data written through vblk read back by qemu-storage-daemon (and the other
//! way round), `qemu-img check` after every run, the backing file never written, SIGKILL in
//! the middle of allocating writes, and the command line's refusals.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("qemu-img not found: skipping (install qemu-utils, scripts/setup.sh)");
    }
    ok
}

fn sh(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn qemu_img(args: &[&str]) {
    sh(Command::new("qemu-img").args(args));
}

fn vblk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vblk")).args(args).output().expect("run vblk")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img check`: no corruption. Leaked clusters (exit 3) are acceptable after a crash
/// when `leaks_ok`.
fn check(image: &Path, leaks_ok: bool) -> String {
    let out = Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(image).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    match out.status.code() {
        Some(0) => {}
        Some(3) if leaks_ok => {}
        c => panic!("qemu-img check {} exited {c:?}:\n{text}", image.display()),
    }
    assert!(!text.contains("ERROR"), "{text}");
    text
}

fn sha(path: &Path) -> String {
    String::from_utf8_lossy(&sh(Command::new("sha256sum").arg(path)).stdout).split(' ').next().unwrap().to_string()
}

const QCOW2: BackendConfig = BackendConfig { readonly: false, num_queues: 2, vblk_args: &["--format", "qcow2"] };

fn io(sock: &Path, op: &str, offset: &str, length: &str, file: &Path) {
    let out = vblk(&["io", op, "--socket", s(sock), "--offset", offset, "--length", length, "--file", s(file)]);
    assert!(out.status.success(), "vblk io {op}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_qcow2_header_is_never_served_as_raw_without_saying_so() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("qcow2-cli");
    let img = dir.join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    let out = vblk(&["serve", s(&img), "--socket", s(&dir.join("a.sock"))]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--format qcow2") && err.lines().count() == 1, "{err}");
    // An encrypted image is refused at startup, with the reason.
    let enc = dir.join("enc.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,data=x",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0",
        s(&enc),
        "1M",
    ]);
    let out = vblk(&["serve", s(&enc), "--format", "qcow2", "--socket", s(&dir.join("b.sock"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("encrypted"), "{}", String::from_utf8_lossy(&out.stderr));
    // A backing file outside the allowed directories: refused, and the message says how.
    let other = TempDir::new("qcow2-cli-other");
    let base = other.join("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "1M"]);
    let ovl = dir.join("ovl.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", s(&base), "-F", "raw", s(&ovl)]);
    let out = vblk(&["serve", s(&ovl), "--format", "qcow2", "--socket", s(&dir.join("c.sock"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--backing-allowed"));
}

/// Data written through vblk is what QEMU's qcow2 code reads, and the other way round, on
/// an overlay of a qcow2 base over a raw base (64 KiB and 4 KiB clusters).
#[test]
fn vblk_and_qemu_storage_daemon_read_each_others_writes() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("qcow2-xcheck");
    let raw = dir.join("base.raw");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "32M"]);
    sh(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x61 0 8M"]).arg(&raw));
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.raw", "-F", "raw", s(&mid)]);
    sh(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x62 4M 1M"]).arg(&mid));
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", s(&top)]);
    let (raw_sum, mid_sum) = (sha(&raw), sha(&mid));

    let a: Vec<u8> = (0..(3 << 20) as u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let b: Vec<u8> = (0..(1 << 20) as u32).map(|i| (i.wrapping_mul(40503) >> 7) as u8).collect();
    let (fa, fb) = (dir.join("a.bin"), dir.join("b.bin"));
    std::fs::write(&fa, &a).unwrap();
    std::fs::write(&fb, &b).unwrap();
    let sock = socket_path(&dir);

    // vblk writes 3 MiB across the base's data, the middle layer's and unallocated space.
    let mut v = BackendProcess::start(Backend::Vblk, &top, &sock, QCOW2, &dir.join("vblk.log")).unwrap();
    io(&sock, "write", "3M", "3M", &fa);
    v.stop();
    check(&top, false);
    // QSD reads it back, and writes its own data elsewhere.
    let mut q = BackendProcess::start(Backend::QsdQcow2, &top, &sock, QCOW2, &dir.join("qsd.log")).unwrap();
    let got = dir.join("got.bin");
    io(&sock, "read", "3M", "3M", &got);
    assert!(std::fs::read(&got).unwrap() == a, "QEMU reads what vblk wrote");
    io(&sock, "write", "20M", "1M", &fb);
    q.stop();
    check(&top, false);
    // vblk reads QSD's write, the unchanged layers below, and zeros past the base's data.
    let mut v = BackendProcess::start(Backend::Vblk, &top, &sock, QCOW2, &dir.join("vblk2.log")).unwrap();
    io(&sock, "read", "20M", "1M", &got);
    assert!(std::fs::read(&got).unwrap() == b, "vblk reads what QEMU wrote");
    io(&sock, "read", "0", "1M", &got);
    assert!(std::fs::read(&got).unwrap() == vec![0x61; 1 << 20], "the raw base below");
    io(&sock, "read", "6M", "1M", &got);
    assert!(std::fs::read(&got).unwrap() == vec![0x61; 1 << 20]);
    io(&sock, "read", "10M", "1M", &got);
    assert!(std::fs::read(&got).unwrap() == vec![0; 1 << 20], "nothing anywhere");
    // And a full verify run (writes, reads, flushes, discards, write-zeroes on 2 queues).
    let out = vblk(&["verify", "--socket", s(&sock), "--queues", "2", "--ops", "5000", "--region", "8M"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    v.stop();
    check(&top, false);
    assert_eq!((sha(&raw), sha(&mid)), (raw_sum, mid_sum), "backing files are never written");
}

/// SIGKILL while the guest allocates: the image is never corrupt (leaks are allowed and
/// reported), and what was flushed before the kill reads back.
#[test]
fn sigkill_during_allocating_writes_leaves_a_consistent_image() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("qcow2-crash");
    let img = dir.join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", s(&img), "64M"]);
    let sock = socket_path(&dir);
    let pattern: Vec<u8> = (0..(1 << 20) as u32).map(|i| (i * 13 % 251) as u8).collect();
    let fp = dir.join("p.bin");
    std::fs::write(&fp, &pattern).unwrap();
    let iterations = std::env::var("VBLK_QCOW2_CRASHES").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let mut leaks = 0;
    for k in 0..iterations {
        let mut v = BackendProcess::start(Backend::Vblk, &img, &sock, QCOW2, &dir.join(format!("v{k}.log"))).unwrap();
        // Flushed data first (vblk io flushes after writing), a megabyte per run in the
        // upper half (and round again after 32 runs).
        let off = format!("{}M", 32 + k % 32);
        io(&sock, "write", &off, "1M", &fp);
        // Then random allocating writes, killed in the middle.
        let mut bench = Command::new(env!("CARGO_BIN_EXE_vblk"))
            .args(["bench", "--socket", s(&sock), "--rw", "randwrite", "--bs", "4k", "--iodepth", "32"])
            // The first 32 MiB only: the flushed megabytes above must stay as written.
            .args(["--seconds", "5", "--queues", "2", "--size", "32M"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300 + 150 * k as u64));
        v.stop(); // SIGKILL
        let _ = bench.kill();
        let _ = bench.wait();
        let text = check(&img, true);
        if text.contains("leaked") {
            leaks += 1;
        }
        // Every flushed megabyte reads back after the crash, through QEMU and through vblk.
        let mut v = BackendProcess::start(Backend::Vblk, &img, &sock, QCOW2, &dir.join(format!("r{k}.log"))).unwrap();
        for j in 0..=k.min(31) {
            let got = dir.join("got.bin");
            io(&sock, "read", &format!("{}M", 32 + j), "1M", &got);
            assert!(std::fs::read(&got).unwrap() == pattern, "flushed data at {}M lost after kill {k}", 32 + j);
        }
        v.stop();
        check(&img, true);
    }
    eprintln!(
        "{iterations} SIGKILLs during allocating writes: image consistent each time, {leaks} with leaked clusters"
    );
}

#[test]
fn a_new_overlay_takes_its_backing_files_size() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("qcow2-create");
    let base = dir.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "48M"]);
    let ovl = dir.join("ovl.qcow2");
    let sock = socket_path(&dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_vblk"))
        .args(["serve", s(&ovl), "--format", "qcow2", "--backing", s(&base), "--socket", s(&sock)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sock.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = vblk(&["info", "--socket", s(&sock), "--json"]);
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["capacity"], 48u64 << 20);
    let info = String::from_utf8_lossy(&sh(Command::new("qemu-img").args(["info", s(&ovl)])).stdout).into_owned();
    assert!(info.contains("backing file: ") && info.contains("base.qcow2"), "{info}");
    check(&ovl, false);
}
