//! `vblk info | verify | bench` against two backends started by the test: vblk serve and
//! QEMU's qemu-storage-daemon (a file node and a null-co node). QSD is required unless
//! `VBLK_SKIP_QSD=1`.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(tag: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("vblk-interop-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

/// A backend process, SIGTERMed (and checked to exit cleanly) when dropped.
struct Backend {
    child: Child,
    socket: PathBuf,
    name: &'static str,
}

impl Backend {
    fn start(name: &'static str, mut cmd: Command, socket: PathBuf) -> Backend {
        let mut child =
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| {
                panic!("cannot start {name} ({e}); install qemu-storage-daemon or set VBLK_SKIP_QSD=1")
            });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::metadata(&socket).is_ok_and(|m| m.file_type().is_socket()) {
            assert!(child.try_wait().unwrap().is_none(), "{name} exited early");
            assert!(Instant::now() < deadline, "{name}: socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        Backend { child, socket, name }
    }

    fn vblk(dir: &Path, image: &str, extra: &[&str]) -> Backend {
        let socket = dir.join("vblk.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vblk"));
        cmd.args(["serve", image, "--size", "256M", "--num-queues", "2"]).args(extra);
        cmd.arg("--socket").arg(&socket).current_dir(dir);
        Backend::start("vblk serve", cmd, socket)
    }

    fn qsd(dir: &Path, blockdevs: &[String]) -> Backend {
        let socket = dir.join("qsd.sock");
        let mut cmd = Command::new(std::env::var("VBLK_QSD").unwrap_or_else(|_| "qemu-storage-daemon".into()));
        for b in blockdevs {
            cmd.arg("--blockdev").arg(b);
        }
        cmd.arg("--export").arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues=2",
            socket.display()
        ));
        Backend::start("qemu-storage-daemon", cmd, socket)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        if !std::thread::panicking() {
            assert!(status.success(), "{} exited with {status}", self.name);
        }
    }
}

fn skip() -> bool {
    let s = std::env::var("VBLK_SKIP_QSD").as_deref() == Ok("1");
    if s {
        eprintln!("skipped: VBLK_SKIP_QSD=1");
    }
    s
}

fn vblk_cli(socket: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_vblk")).args(args).arg("--socket").arg(socket).output().unwrap();
    eprintln!("$ vblk {} --socket {}\n{}", args.join(" "), socket.display(), String::from_utf8_lossy(&out.stderr));
    out
}

fn json(socket: &Path, args: &[&str]) -> Value {
    let out = vblk_cli(socket, args);
    assert!(out.status.success(), "vblk {args:?} failed");
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// info, verify with 2 queues (if the backend keeps data), a short bench.
fn exercise(b: &Backend, capacity: u64, keeps_data: bool) {
    let info = json(&b.socket, &["info", "--json"]);
    eprintln!("{}: {info}", b.name);
    assert_eq!(info["capacity"].as_u64(), Some(capacity), "{info}");
    assert_eq!(info["queues"].as_u64(), Some(2), "{info}");
    if keeps_data {
        let out = vblk_cli(&b.socket, &["verify", "--queues", "2", "--ops", "3000", "--region", "32M", "--seed", "7"]);
        assert!(out.status.success(), "verify against {} failed", b.name);
    }
    for extra in [&[][..], &["--poll"][..]] {
        let mut args = vec!["bench", "--json", "--seconds", "2", "--queues", "2", "--rw", "randrw"];
        args.extend_from_slice(extra);
        let v = json(&b.socket, &args);
        eprintln!("{} bench {extra:?}: {} IOPS, p50 {} us", b.name, v["iops"], v["lat_us"]["p50"]);
        assert!(v["iops"].as_f64().unwrap_or(0.0) > 0.0, "{v}");
        assert_eq!(v["errors"].as_u64(), Some(0), "{v}");
    }
}

#[test]
fn the_tools_work_against_vblk_serve() {
    let d = dir("vblk");
    // Defaults (merging on, adaptive polling on), then the opposite of both.
    for extra in [&[][..], &["--poll-us", "0", "--no-merge"][..]] {
        let b = Backend::vblk(&d.0, "disk.img", extra);
        exercise(&b, 256 << 20, true);
    }
}

#[test]
fn the_tools_work_against_qemu_storage_daemon_file_and_null() {
    if skip() {
        return;
    }
    let d = dir("qsd");
    let img = d.0.join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(256 << 20).unwrap();
    let file = Backend::qsd(
        &d.0,
        &[
            format!("driver=file,node-name=file0,filename={},cache.direct=on,aio=io_uring", img.display()),
            "driver=raw,node-name=disk0,file=file0".into(),
        ],
    );
    exercise(&file, 256 << 20, true);
    drop(file);
    let null = Backend::qsd(&d.0, &["driver=null-co,node-name=disk0,size=1073741824".into()]);
    exercise(&null, 1 << 30, false);
}
