//! `vblk top` in a real terminal (a detached tmux session): against a `vblk serve --control`
//! with two exports, one under `vblk bench`, the screen shows both exports and a non-zero
//! IOPS figure for the busy one; `q` ends it with exit code 0 and the session closes.
//! Skipped (with a message) when tmux is not installed (scripts/setup.sh installs it).

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_vblk");

/// Kills and reaps the child on drop.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A tmux server of the test's own (`-L`, no config file); killed on drop.
struct Tmux(String);

impl Tmux {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-f", "/dev/null", "-L", &self.0])
            .args(args)
            .env("TERM", "xterm-256color")
            .stdin(Stdio::null())
            .output()
            .expect("run tmux")
    }

    fn pane(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A rate as `vblk top` prints it (950, 12.3k, 1.25M), or None for "-".
fn rate(s: &str) -> Option<f64> {
    let (num, scale) = match s.as_bytes().last()? {
        b'k' => (&s[..s.len() - 1], 1e3),
        b'M' => (&s[..s.len() - 1], 1e6),
        _ => (s, 1.0),
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

/// The busy export's row shows a frontend and read IOPS above zero; the idle one is listed.
fn shows_both(pane: &str) -> bool {
    let row = |name: &str| pane.lines().find(|l| l.split_whitespace().next() == Some(name)).map(str::to_owned);
    let busy_iops = row("busy").and_then(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"attached")).then(|| f.get(2).and_then(|s| rate(s))).flatten()
    });
    row("idle").is_some() && busy_iops.is_some_and(|v| v > 0.0)
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

#[test]
fn top_shows_both_exports_and_quits_on_q() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!(
            "SKIPPED top_shows_both_exports_and_quits_on_q: tmux is not installed (scripts/setup.sh installs it)"
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("vblk-top-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let control = dir.join("control.sock");
    let sock = |n: &str| dir.join(format!("{n}.sock"));
    let mut config = String::new();
    for name in ["busy", "idle"] {
        // No spinning on the rings: the test shares the CPUs with the others.
        config += &format!(
            "[[export]]\nname = \"{name}\"\nimage = \"{}\"\nsocket = \"{}\"\nsize = \"64M\"\npoll_us = 0\n",
            dir.join(format!("{name}.img")).display(),
            sock(name).display()
        );
    }
    std::fs::write(dir.join("vblk.toml"), config).unwrap();
    let log = std::fs::File::create(dir.join("serve.log")).unwrap();
    let _serve = Kill(
        Command::new(EXE)
            .arg("serve")
            .arg("--config")
            .arg(dir.join("vblk.toml"))
            .arg("--control")
            .arg(&control)
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_for("the daemon's sockets", Duration::from_secs(10), || {
        control.exists() && sock("busy").exists() && sock("idle").exists()
    });
    let _bench = Kill(
        Command::new(EXE)
            .args(["bench", "--seconds", "30", "--iodepth", "4", "--socket"])
            .arg(sock("busy"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let tmux = Tmux(format!("vblk-top-test-{}", std::process::id()));
    let rc = dir.join("rc");
    let shell = format!(
        "{} top --control {} --interval-ms 250; echo $? > {}",
        quote(Path::new(EXE)),
        quote(&control),
        quote(&rc)
    );
    let started = tmux.run(&["new-session", "-d", "-s", "top", "-x", "160", "-y", "40", &shell]);
    assert!(started.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&started.stderr));

    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        let pane = tmux.pane();
        if shows_both(&pane) {
            break;
        }
        assert!(Instant::now() < deadline, "vblk top never showed both exports with busy's IOPS; the screen:\n{pane}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let sent = tmux.run(&["send-keys", "-t", "top", "q"]);
    assert!(sent.status.success(), "tmux send-keys: {}", String::from_utf8_lossy(&sent.stderr));
    wait_for("vblk top to exit on q", Duration::from_secs(5), || {
        std::fs::read_to_string(&rc).is_ok_and(|s| s.ends_with('\n'))
    });
    assert_eq!(std::fs::read_to_string(&rc).unwrap().trim(), "0", "vblk top's exit code");
    wait_for("the tmux session to end", Duration::from_secs(5), || {
        !tmux.run(&["has-session", "-t", "top"]).status.success()
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rates_parse_as_printed() {
    assert_eq!(rate("950"), Some(950.0));
    assert_eq!(rate("12.5k"), Some(12_500.0));
    assert_eq!(rate("1.25M"), Some(1_250_000.0));
    assert_eq!(rate("-"), None);
}
