//! `vblk serve` as a user meets it: defaults, errors, signals.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn vblk() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vblk"))
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vblk-cli-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn wait_for(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(child.try_wait().unwrap().is_none(), "vblk serve exited early");
        assert!(Instant::now() < deadline, "socket {} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(child: Child, sig: i32) -> Output {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, sig) };
    child.wait_with_output().unwrap()
}

fn error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("vblk: error:")).collect();
    assert_eq!(lines.len(), 1, "one clear error line expected, got:\n{stderr}");
    lines[0].to_string()
}

#[test]
fn serve_creates_the_default_image_and_shuts_down_cleanly_on_signals() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let dir = tempdir(&format!("default-{sig}"));
        let mut child = vblk()
            .args(["serve", "--num-queues", "2", "--size", "64M"])
            .current_dir(&dir)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let sock = dir.join("vblk.sock");
        wait_for(&sock, &mut child);
        let img = std::fs::metadata(dir.join("vblk.img")).unwrap();
        assert_eq!(img.len(), 64 << 20);
        use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
        let s = std::fs::metadata(&sock).unwrap();
        assert!(s.file_type().is_socket());
        assert_eq!(s.permissions().mode() & 0o777, 0o600);
        assert!(img.blocks() * 512 < img.len(), "created sparse");
        let out = stop(child, sig);
        assert!(out.status.success(), "exit status {:?}", out.status);
        assert!(!sock.exists(), "socket removed on exit");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("-device vhost-user-blk-pci,chardev=vblk0,num-queues=2"), "{stderr}");
        assert!(stderr.contains("memory-backend-memfd"), "{stderr}");
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn errors_are_one_line_and_a_nonzero_exit() {
    let dir = tempdir("errors");
    // A read-only export of a missing image.
    let out = vblk().args(["serve", "missing.img", "--readonly"]).current_dir(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(error_line(&out).contains("missing.img"));
    // A bad size.
    let out = vblk().args(["serve", "new.img", "--size", "12Q"]).current_dir(&dir).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown size unit"));
    let out = vblk().args(["serve", "new.img", "--size", "1000"]).current_dir(&dir).output().unwrap();
    assert!(error_line(&out).contains("multiple of 512"));
    // More ring entries on one worker than an io_uring can have in flight: refused at
    // start, not with dead rings once a guest sets them up.
    let out = vblk()
        .args(["serve", "--backend", "null", "--num-queues", "2", "--threads", "1", "--queue-size", "32768"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(error_line(&out).contains("--threads"), "{}", error_line(&out));
    // A directory that does not exist.
    let out = vblk().args(["serve", "no/such/dir/x.img"]).current_dir(&dir).output().unwrap();
    assert!(error_line(&out).contains("x.img"));
    // A socket in use by a running daemon.
    let mut first =
        vblk().args(["serve", "a.img", "--socket", "s.sock", "--size", "1M"]).current_dir(&dir).spawn().unwrap();
    wait_for(&dir.join("s.sock"), &mut first);
    let out = vblk().args(["serve", "b.img", "--socket", "s.sock", "--size", "1M"]).current_dir(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(error_line(&out).contains("in use"));
    assert!(stop(first, libc::SIGTERM).status.success());
    // A stale socket file (nobody listening) is replaced.
    std::os::unix::net::UnixListener::bind(dir.join("stale.sock")).map(drop).unwrap();
    let mut again = vblk().args(["serve", "a.img", "--socket", "stale.sock"]).current_dir(&dir).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(again.try_wait().unwrap().is_none(), "a stale socket must not stop the daemon");
    assert!(stop(again, libc::SIGTERM).status.success());
    let _ = std::fs::remove_dir_all(dir);
}
