//! The driver-side tools (`vblk info | bench | verify | io`) as a user runs them: against
//! the in-process loopback device and against a `vblk serve` process.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn vblk() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vblk"))
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vblk-tools-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A sparse raw image of `size` bytes.
fn image(dir: &Path, size: u64) -> PathBuf {
    let p = dir.join("disk.img");
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn run(args: &[&str]) -> Output {
    vblk().args(args).output().unwrap()
}

/// Run, expect success, parse stdout as one JSON object.
fn json(args: &[&str]) -> Value {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vblk {args:?} failed: {:?}\n{stderr}", out.status);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one JSON line expected:\n{stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {stdout}"))
}

fn error_lines(out: &Output) -> Vec<String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr.lines().filter(|l| l.starts_with("vblk: error:")).map(str::to_string).collect()
}

fn check_bench(v: &Value, rw: &str, queues: u64, poll: bool) {
    assert_eq!(v["rw"], rw);
    assert_eq!(v["queues"], queues);
    assert_eq!(v["poll"], poll);
    assert_eq!(v["bs"], 4096);
    assert_eq!(v["iodepth"], 32);
    assert!(v["seconds"].as_f64().unwrap() >= 0.9);
    assert!(v["ios"].as_u64().unwrap() > 0);
    assert!(v["iops"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["mib_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["errors"], 0, "{v}");
    let lat = &v["lat_us"];
    let (p50, p99, p999) = (lat["p50"].as_f64().unwrap(), lat["p99"].as_f64().unwrap(), lat["p99_9"].as_f64().unwrap());
    assert!(lat["mean"].as_f64().unwrap() > 0.0 && p50 > 0.0 && p50 <= p99 && p99 <= p999, "{lat}");
    assert!(v["cpu_us_per_io"].as_f64().unwrap() > 0.0);
}

#[test]
fn info_describes_the_loopback_device() {
    let v = json(&["info", "--loopback", "--backend", "null", "--json"]);
    assert_eq!(v["capacity"], 1u64 << 30);
    assert_eq!(v["block_size"], 512);
    assert_eq!(v["serial"], "vblk-loopback");
    assert_eq!(v["readonly"], false);
    assert_eq!(v["write_cache"], "write-back");
    assert!(v["queues"].as_u64().unwrap() >= 1);
    let features: Vec<&str> = v["features"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    for f in ["VERSION_1", "EVENT_IDX", "INDIRECT_DESC", "FLUSH", "DISCARD", "WRITE_ZEROES", "MQ"] {
        assert!(features.contains(&f), "{f} missing from {features:?}");
    }
    assert!(v["limits"]["seg_max"].as_u64().unwrap() > 0);
    assert!(v["limits"]["max_discard_sectors"].as_u64().unwrap() > 0);

    // The human summary names the same things.
    let out = run(&["info", "--loopback", "--disk-size", "64M"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for s in ["capacity:      64 MiB", "VERSION_1", "serial:        vblk-loopback", "write cache:   write-back"] {
        assert!(text.contains(s), "{s:?} missing from:\n{text}");
    }
}

#[test]
fn ring_picks_packed_or_split_and_info_says_which() {
    let v = json(&["info", "--loopback", "--backend", "null", "--json"]);
    assert_eq!(v["ring"], "packed", "auto: vblk offers the packed ring");
    let v = json(&["info", "--loopback", "--backend", "null", "--ring", "split", "--json"]);
    assert_eq!(v["ring"], "split");
    let out = run(&["info", "--loopback", "--backend", "null", "--ring", "packed"]);
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout).unwrap().contains("ring:          packed"));
    // A packed ring of 5 entries; a split one must be a power of two.
    let v = json(&[
        "bench",
        "--loopback",
        "--backend",
        "null",
        "--seconds",
        "1",
        "--ring",
        "packed",
        "--queue-size",
        "5",
        "--iodepth",
        "4",
        "--json",
    ]);
    assert_eq!((v["ring"].as_str(), v["errors"].as_u64()), (Some("packed"), Some(0)), "{v}");
    let out = run(&["info", "--loopback", "--backend", "null", "--ring", "split", "--queue-size", "5"]);
    assert!(!out.status.success());
    assert!(error_lines(&out).iter().any(|l| l.contains("power of two")), "{:?}", error_lines(&out));
    let dir = tempdir("ring");
    let img = image(&dir, 16 << 20);
    for ring in ["split", "packed"] {
        let out =
            run(&["verify", "--loopback", img.to_str().unwrap(), "--ops", "1000", "--queues", "2", "--ring", ring]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && stdout.contains(&format!("2 {ring} queues")), "{stdout}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bench_on_the_null_backend() {
    let v = json(&["bench", "--loopback", "--backend", "null", "--seconds", "1", "--json"]);
    check_bench(&v, "randread", 1, false);
    let v = json(&["bench", "--loopback", "--backend", "null", "--seconds", "1", "--poll", "--queues", "2", "--json"]);
    check_bench(&v, "randread", 2, true);
}

#[test]
fn bench_writes_to_an_image() {
    let dir = tempdir("bench");
    let img = image(&dir, 64 << 20);
    let img = img.to_str().unwrap();
    let v = json(&["bench", "--loopback", img, "--rw", "randwrite", "--seconds", "1", "--json"]);
    check_bench(&v, "randwrite", 1, false);
    let v = json(&["bench", "--loopback", img, "--rw", "write", "--queues", "2", "--seconds", "1", "--json"]);
    check_bench(&v, "write", 2, false);
    let v = json(&["bench", "--loopback", img, "--rw", "randrw", "--seconds", "1", "--json"]);
    check_bench(&v, "randrw", 1, false);
    assert_eq!(v["rwmixread"], 50);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn verify_passes_on_an_image_and_a_temporary_file() {
    let dir = tempdir("verify");
    let img = image(&dir, 32 << 20);
    let out = run(&["verify", "--loopback", img.to_str().unwrap(), "--ops", "2000", "--queues", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("result      OK"), "{stdout}");
    assert!(stdout.contains("--seed "), "the seed is printed: {stdout}");

    let v = json(&["verify", "--loopback", "--ops", "1000", "--region", "8M", "--seed", "7", "--json"]);
    assert_eq!(v["result"], "OK");
    assert_eq!(v["seed"], 7);
    assert_eq!(v["region"], 8 << 20);
    assert_eq!(v["ops"], 1000);
    assert_eq!(v["errors"], 0);
    let c = &v["counts"];
    for k in ["read", "write", "flush", "discard", "write_zeroes"] {
        assert!(c[k].as_u64().unwrap() > 0, "no {k} in {c}");
    }
    assert!(v["readback_checked_bytes"].as_u64().unwrap() > 0);

    // A disk that keeps nothing cannot be verified.
    let out = run(&["verify", "--loopback", "--backend", "null"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(error_lines(&out).len(), 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn verify_detects_data_changed_behind_its_back() {
    let dir = tempdir("corrupt");
    let img = image(&dir, 4 << 20);
    // Another writer scribbles over the image while verify runs on it (buffered I/O on both
    // sides, so every scribble is visible to the next read).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scribbler = {
        let (img, stop) = (img.clone(), std::sync::Arc::clone(&stop));
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
            let junk = [0xa5u8; 4096];
            let mut off = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_at(&junk, off).unwrap();
                off = (off + 4096 * 7) % (4 << 20);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let out =
        run(&["verify", "--loopback", img.to_str().unwrap(), "--no-direct", "--region", "4M", "--ops", "1000000"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    scribbler.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("MISMATCH at offset") && stdout.contains("result      FAIL"), "{stdout}");
    assert!(stdout.contains("found     a5 a5"), "{stdout}");
    let lines = error_lines(&out);
    assert_eq!(lines.len(), 1);
    assert!(lines[0].contains("data mismatch at offset"), "{}", lines[0]);
    let _ = std::fs::remove_dir_all(dir);
}

fn wait_for(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(child.try_wait().unwrap().is_none(), "vblk serve exited early");
        assert!(Instant::now() < deadline, "socket {} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn io_round_trips_through_vblk_serve() {
    let dir = tempdir("io");
    let sock = dir.join("vblk.sock");
    let mut serve = vblk()
        .args(["serve", "--size", "16M", "--num-queues", "1", "--socket"])
        .arg(&sock)
        .arg(dir.join("disk.img"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&sock, &mut serve);
    let s = sock.to_str().unwrap();

    let data: Vec<u8> = (0..12288u32).map(|i| (i * 7 % 253) as u8).collect();
    let input = dir.join("in.bin");
    std::fs::write(&input, &data).unwrap();
    let v = json(&[
        "io",
        "write",
        "--socket",
        s,
        "--offset",
        "1M",
        "--length",
        "12k",
        "--file",
        input.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(
        (v["op"].as_str(), v["offset"].as_u64(), v["length"].as_u64()),
        (Some("write"), Some(1 << 20), Some(12288))
    );
    let output = dir.join("out.bin");
    let out =
        run(&["io", "read", "--socket", s, "--offset", "1M", "--length", "12k", "--file", output.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&output).unwrap(), data);

    // stdin -> disk -> stdout.
    let mut w = vblk()
        .args(["io", "write", "--socket", s, "--offset", "8M", "--length", "1k"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    w.stdin.take().unwrap().write_all(&data[..1024]).unwrap();
    assert!(w.wait_with_output().unwrap().status.success());
    let out = run(&["io", "read", "--socket", s, "--offset", "8M", "--length", "1k"]);
    assert!(out.status.success());
    assert_eq!(out.stdout, &data[..1024]);

    // Short input, past the end, unaligned: one error line each, nothing written.
    let out = vblk()
        .args(["io", "write", "--socket", s, "--length", "4k"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(error_lines(&out).len(), 1);
    for args in [["--offset", "16M", "--length", "512"], ["--offset", "100", "--length", "512"]] {
        let out = run(&[&["io", "read", "--socket", s][..], &args[..]].concat());
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(error_lines(&out).len(), 1, "{args:?}");
    }

    // The daemon serves info and a short verify too.
    let v = json(&["info", "--socket", s, "--json"]);
    assert_eq!(v["capacity"], 16u64 << 20);
    assert_eq!(v["serial"], "vblk");
    let v = json(&["verify", "--socket", s, "--ops", "500", "--region", "4M", "--json"]);
    assert_eq!(v["result"], "OK");

    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(serve.id() as i32, libc::SIGTERM) };
    assert!(serve.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn connection_errors_are_one_line_and_exit_1() {
    let out = run(&["info", "--socket", "/nonexistent"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let lines = error_lines(&out);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("/nonexistent"), "{}", lines[0]);
    assert!(out.stdout.is_empty());

    // A socket nobody answers on: the timeout.
    let dir = tempdir("silent");
    let sock = dir.join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let t = Instant::now();
    let out = run(&["bench", "--socket", sock.to_str().unwrap(), "--timeout", "0.5"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(t.elapsed() < Duration::from_secs(10));
    let lines = error_lines(&out);
    assert_eq!(lines.len(), 1, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(lines[0].contains("did not answer"), "{}", lines[0]);
    drop(listener);

    // Exactly one of --socket / --loopback.
    for args in [&["info"][..], &["info", "--socket", "x", "--loopback"][..]] {
        let out = run(args);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--socket"));
    }
    let _ = std::fs::remove_dir_all(dir);
}
