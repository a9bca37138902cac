//! One daemon, many disks: `vblk serve --control` takes exports at run time (`vblk ctl
//! add`), serves a real guest on one and vblk's driver on another, drops one while its
//! frontend is attached without disturbing the other, and answers every bad call with a
//! clear JSON-RPC error. `--config` starts a daemon with its exports.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn vblk() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vblk"))
}

/// `vblk serve --control` (and more args), its log in `dir`; SIGTERM'd when dropped.
struct Daemon {
    child: Child,
    control: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(dir: &TempDir, args: &[&str]) -> Daemon {
        Self::start_with_env(dir, args, &[])
    }

    fn start_with_env(dir: &TempDir, args: &[&str], env: &[(&str, &Path)]) -> Daemon {
        let control = dir.join("ctl.sock");
        let log = dir.join("serve.log");
        let child = vblk()
            .arg("serve")
            .arg("--control")
            .arg(&control)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start vblk serve");
        let d = Daemon { child, control, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&d.control).is_err() {
            assert!(Instant::now() < deadline, "no control socket after 20 s:\n{}", d.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `vblk ctl --control C ARGS`.
    fn ctl(&self, args: &[&str]) -> Output {
        vblk().arg("ctl").arg("--control").arg(&self.control).args(args).output().expect("vblk ctl")
    }

    fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "vblk ctl {args:?} failed: {}\n--- daemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The error line of a `vblk ctl` that must fail.
    fn ctl_err(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "vblk ctl {args:?} should fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(err.lines().count(), 1, "one line expected: {err}");
        err
    }

    /// A raw JSON-RPC exchange on the control socket.
    fn rpc_line(&self, line: &str) -> Value {
        let mut s = UnixStream::connect(&self.control).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("bad response {answer:?}: {e}"))
    }

    fn call(&self, method: &str, params: Value) -> Value {
        self.rpc_line(&json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).to_string())
    }

    fn list(&self) -> Vec<Value> {
        self.call("export_list", json!({}))["result"].as_array().cloned().expect("export_list result")
    }

    fn stop(mut self) -> String {
        // SAFETY-free: a plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "vblk serve exited with {st}:\n{}", self.log_text());
                break;
            }
            assert!(Instant::now() < deadline, "vblk serve did not stop on SIGTERM:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        self.log_text()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connected(d: &Daemon, name: &str) -> bool {
    d.list().iter().any(|e| e["name"] == name && e["connected"] == true)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn exports_added_at_run_time_serve_a_guest_and_the_driver_and_one_leaves_while_attached() {
    if skip_guest("exports_added_at_run_time") {
        return;
    }
    let _serial = serialize();
    let dir = TempDir::new("control-guest");
    let d = Daemon::start(&dir, &[]);
    assert!(d.list().is_empty(), "a daemon with --control and no image starts with no exports");
    let (gsock, dsock) = (dir.join("g.sock"), dir.join("d.sock"));
    let (gimg, dimg) = (dir.join("g.img"), dir.join("d.img"));
    d.ctl_ok(&["add", "guest", s(&gimg), "--socket", s(&gsock), "--size", "256M", "--num-queues", "2"]);
    d.ctl_ok(&["add", "drv", s(&dimg), "--socket", s(&dsock), "--size", "64M", "--num-queues", "1"]);
    let names: Vec<_> = d.list().iter().map(|e| e["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["drv", "guest"]);

    // The guest runs fio with verification on its export...
    let guest = spawn_guest(&dir, &gsock, "fio-verify", "queues=2,jobs=2,size=32", 2);
    // ...while vblk's driver runs on the other, and that export is removed under it.
    let verify = vblk()
        .args(["verify", "--socket", s(&dsock), "--ops", "100000000", "--iodepth", "8"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("vblk verify to attach", Duration::from_secs(20), || connected(&d, "drv"));
    wait_until("the guest to attach", Duration::from_secs(60), || connected(&d, "guest"));
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    assert_eq!(d.ctl_ok(&["remove", "drv"]).trim(), "removed drv");
    let removal = t.elapsed();
    let out = verify.wait_with_output().unwrap();
    assert!(!out.status.success(), "vblk verify cannot finish 10^8 ops: the removal must have cut it off");
    assert!(!dsock.exists(), "the removed export's socket file is gone");
    assert_eq!(d.list().len(), 1);
    eprintln!(
        "removed 'drv' with its frontend attached in {removal:?}; vblk verify said: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );

    let outcome = guest.wait();
    assert!(outcome.passed, "the guest on the other export must pass:\n{outcome:?}\n--- daemon:\n{}", d.log_text());
    let stats = d.call("export_stats", json!({"name": "guest"}))["result"].clone();
    let total = &stats["exports"][0]["total"];
    assert!(
        total["requests"]["write"].as_u64().unwrap() > 0 && total["requests"]["read"].as_u64().unwrap() > 0,
        "{total}"
    );
    d.ctl_ok(&["remove", "guest"]);
    let log = d.stop();
    assert!(log.contains("export 'drv' removed") && log.contains("export 'guest' removed"), "{log}");
}

#[test]
fn bad_calls_get_clear_errors_and_change_nothing() {
    let dir = TempDir::new("control-errors");
    let d = Daemon::start(&dir, &[]);
    let mode = std::fs::metadata(&d.control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is for its owner only");
    let a = dir.join("a.sock");
    d.ctl_ok(&["add", "a", s(&dir.join("a.img")), "--socket", s(&a), "--size", "16M"]);

    // Duplicate name, socket in use (refused before the image is created), bad size.
    assert!(d
        .ctl_err(&["add", "a", s(&dir.join("b.img")), "--socket", s(&dir.join("b.sock"))])
        .contains("an export named 'a' exists"));
    let e = d.ctl_err(&["add", "b", s(&dir.join("b.img")), "--socket", s(&a)]);
    assert!(e.contains("is in use"), "{e}");
    assert!(!dir.join("b.img").exists(), "nothing is created for a refused export");
    let r = d.call(
        "export_add",
        json!({"name": "b", "image": s(&dir.join("b.img")), "socket": s(&dir.join("b.sock")), "size": "12Q"}),
    );
    assert_eq!(r["error"]["code"], -32602, "{r}");
    let r = d.call(
        "export_add",
        json!({"name": "b", "image": s(&dir.join("b.img")), "socket": s(&dir.join("b.sock")), "size": 1000}),
    );
    assert!(r["error"]["message"].as_str().unwrap().contains("multiple of 512"), "{r}");
    let r = d.call("export_add", json!({"name": "b", "image": "b.img", "socket": "/tmp/b.sock"}));
    assert_eq!(r["error"]["message"], "'image' must be an absolute path (got 'b.img')", "{r}");
    let r = d.call("export_add", json!({"name": "b", "image": "/x", "socket": "/y", "num_queue": 2}));
    assert_eq!(r["error"]["message"], "unknown option 'num_queue'");
    let r = d.call("export_add", json!({"name": "bad name!", "image": "/x", "socket": "/y"}));
    assert_eq!(r["error"]["code"], -32602, "{r}");

    // Unknown exports.
    assert!(d.ctl_err(&["remove", "nope"]).contains("no export named 'nope'"));
    assert!(d.ctl_err(&["stats", "nope"]).contains("no export named 'nope'"));
    assert_eq!(d.call("export_remove", json!({"name": "nope"}))["error"]["code"], -32001);

    // Protocol errors.
    assert_eq!(d.rpc_line("{not json")["error"]["code"], -32700);
    assert_eq!(d.call("export_frobnicate", json!({}))["error"]["code"], -32601);
    assert_eq!(d.call("export_remove", json!({}))["error"]["message"], "missing 'name'");
    assert_eq!(d.call("export_list", json!({"x": 1}))["error"]["message"], "unknown param 'x'");
    assert_eq!(d.rpc_line(r#"{"jsonrpc":"1.0","id":1,"method":"export_list"}"#)["error"]["code"], -32600);

    // None of that disturbed the export.
    let list = d.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["size"], 16 << 20);
    let out = vblk().args(["verify", "--socket", s(&a), "--ops", "2000"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A second daemon on the same control socket is refused, with one clear line.
    let out = vblk().args(["serve", "--control", s(&d.control)]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("control socket") && err.contains("in use"), "{err}");
    // No daemon at all: ctl says where it looked.
    let out = vblk().args(["ctl", "--control", s(&dir.join("none.sock")), "list"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `vblk serve --control"), "{out:?}");
    d.stop();
}

#[test]
fn a_config_file_starts_its_exports_and_a_bad_one_is_refused_with_its_place() {
    let dir = TempDir::new("control-config");
    let config = dir.join("vblk.toml");
    std::fs::write(
        &config,
        format!(
            "metrics = \"127.0.0.1:0\"\n[[export]]\nname = \"one\"\nimage = \"{}\"\nsocket = \"{}\"\nsize = \"8M\"\nnum_queues = 1\n\n\
             [[export]]\nimage = \"{}\"\nsocket = \"{}\"\nbackend = \"null\"\nreadonly = true\n",
            s(&dir.join("one.img")),
            s(&dir.join("one.sock")),
            s(&dir.join("two.img")),
            s(&dir.join("two.sock")),
        ),
    )
    .unwrap();
    // As systemd runs it (Type=notify): READY=1 once the exports listen.
    let notify = std::os::unix::net::UnixDatagram::bind(dir.join("notify.sock")).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let d = Daemon::start_with_env(&dir, &["--config", s(&config)], &[("NOTIFY_SOCKET", &dir.join("notify.sock"))]);
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).expect("READY=1 from vblk serve");
    assert_eq!(&buf[..n], b"READY=1");
    let list = d.list();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!((list[0]["name"].as_str(), list[0]["size"].as_u64()), (Some("one"), Some(8 << 20)));
    assert_eq!((list[1]["name"].as_str(), list[1]["readonly"].as_bool()), (Some("two"), Some(true)));
    for sock in ["one.sock", "two.sock"] {
        let out = vblk().args(["info", "--socket", s(&dir.join(sock))]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // One metrics endpoint for the daemon, each export labelled; a removed export leaves it.
    let log = d.log_text();
    let addr = log
        .lines()
        .find_map(|l| l.strip_prefix("vblk: metrics on http://")?.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address in:\n{log}"))
        .to_string();
    let scrape = || {
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut body = String::new();
        std::io::Read::read_to_string(&mut c, &mut body).unwrap();
        body
    };
    let m = scrape();
    assert!(m.contains(r#"vblk_requests_total{export="one",queue="0",op="get-id"} 1"#), "{m}");
    assert!(m.contains(r#"export="two""#), "{m}");
    d.ctl_ok(&["remove", "one"]);
    let m = scrape();
    assert!(!m.contains(r#"export="one""#) && m.contains(r#"export="two""#), "{m}");
    d.stop();
    let n = notify.recv(&mut buf).expect("STOPPING=1 from vblk serve");
    assert_eq!(&buf[..n], b"STOPPING=1");

    std::fs::write(&config, "[[export]]\nname = \"x\"\nimage = \"/nonexistent/dir/x.img\"\nsocket = \"/tmp/x.sock\"\nsize = \"1M\"\nbogus = 1\n").unwrap();
    let out = vblk().args(["serve", "--config", s(&config)]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(err.trim(), format!("vblk: error: config {}: export 'x': unknown option 'bogus'", s(&config)));
}

#[test]
fn a_missing_image_is_one_line_that_says_it_once() {
    let out = vblk().args(["serve", "/nonexistent-dir/x.img", "--socket", "/tmp/vblk-never.sock"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(err.trim(), "vblk: error: cannot open /nonexistent-dir/x.img: No such file or directory (os error 2)");
}
