//! `vblk serve` needs no privileges: run as `nobody` (uid/gid 65534, no supplementary groups,
//! no capabilities) it creates its image and socket, serves I/O and shuts down cleanly.
//! Skipped (with a message) when the test does not run as root or `setpriv` is missing.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::client::Client;
use common::find_program;

const NOBODY: u32 = 65534;

/// A world-accessible scratch directory under /tmp (the repository may sit under a directory
/// `nobody` cannot enter), removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn vblk_serve_runs_as_nobody() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: not root, cannot switch to nobody");
        return;
    }
    let Some(setpriv) = find_program("setpriv") else {
        eprintln!("SKIPPED: setpriv (util-linux) not installed");
        return;
    };
    let dir = Scratch(std::env::temp_dir().join(format!("vblk-unpriv-{}", std::process::id())));
    fs::create_dir_all(&dir.0).unwrap();
    fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o777)).unwrap();
    // A copy of the binary nobody can execute wherever the build tree is.
    let bin = dir.0.join("vblk");
    fs::copy(env!("CARGO_BIN_EXE_vblk"), &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let (image, socket) = (dir.0.join("disk.img"), dir.0.join("vblk.sock"));

    let mut child = Command::new(&setpriv)
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "--inh-caps=-all", "--"])
        .arg(&bin)
        .args(["serve", "--size", "16M", "--socket"])
        .arg(&socket)
        .arg(&image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vblk serve as nobody");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!("vblk serve as nobody exited ({st}): {}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(Instant::now() < deadline, "no socket after 20 s");
        sleep(Duration::from_millis(20));
    }
    // It really runs as nobody, and what it created belongs to nobody.
    let status = fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap().to_string();
    assert!(uid_line.split_whitespace().skip(1).all(|u| u == NOBODY.to_string()), "{uid_line}");
    let cap_eff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    assert!(cap_eff.ends_with("0000000000000000"), "{cap_eff}");
    for p in [&image, &socket] {
        assert_eq!(fs::metadata(p).unwrap().uid(), NOBODY, "{}", p.display());
    }
    assert_eq!(fs::metadata(&socket).unwrap().mode() & 0o777, 0o600);

    {
        let mut c = Client::connect(&socket);
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        c.write(1 << 20, &data).expect("write as nobody");
        assert_eq!(c.read(1 << 20, data.len()).expect("read"), data);
        c.q.submit(vblk_driver::Op::Flush, None, 9).unwrap();
        c.q.kick().unwrap();
        let mut done = Vec::new();
        c.q.wait(&mut done, 1).unwrap();
        assert!(done[0].result.is_ok(), "flush: {:?}", done[0].result);
    }

    // SAFETY: kill with a valid pid of our child and a valid signal.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(!socket.exists(), "socket removed on shutdown");
    let img = fs::read(&image).unwrap();
    assert_eq!(&img[1 << 20..(1 << 20) + 8], &(0..8u32).map(|i| (i * 7 + 3) as u8).collect::<Vec<_>>()[..]);
}
