//! vblk's own driver survives the backend's restarts: `vblk verify --reconnect` runs its
//! data-integrity workload (writes, reads, flushes, discards, write-zeroes on two queues,
//! every read checked against a model) against `vblk serve`, which is SIGKILLed at random
//! moments under load and started again on the same socket, over and over. The driver
//! reconnects, hands each new process the inflight area and goes on; the backend resubmits
//! what the killed one had taken. `verify` must finish clean: every request completed
//! exactly once (a head completed twice or never is an error of the driver), every byte
//! as the model says. `VBLK_DRIVER_KILLS=1000` for the long run (default 40).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn kills() -> usize {
    std::env::var("VBLK_DRIVER_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(40)
}

/// A small deterministic generator for the kill times.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn verify_with_reconnect_survives_the_backend_killed_under_load() {
    killed_under_load("packed");
}

/// The same on the split ring (the driver picks the packed ring when vblk offers it).
#[test]
fn verify_with_reconnect_on_the_split_ring_survives_the_backend_killed_under_load() {
    killed_under_load("split");
}

fn killed_under_load(ring: &str) {
    let kills = kills();
    let dir = TempDir::new(&format!("driver-restart-{ring}"));
    let image = dir.join("disk.img");
    create_image(&image, 64 * MIB);
    let socket = socket_path(&dir);
    let cfg = BackendConfig { readonly: false, num_queues: 2, vblk_args: &[] };
    let mut backend = BackendProcess::start(Backend::Vblk, &image, &socket, cfg, &dir.join("serve-0.log"))
        .unwrap_or_else(|e| panic!("starting vblk serve failed: {e}"));
    // Enough operations to outlast every kill; the region is the whole disk.
    let ops = (kills as u64 * 1000).max(40_000).to_string();
    let mut verify = Command::new(env!("CARGO_BIN_EXE_vblk"))
        .args(["verify", "--socket"])
        .arg(&socket)
        .args(["--reconnect", "30", "--queues", "2", "--iodepth", "16", "--seed", "7", "--ops", &ops])
        .args(["--region", "32M", "--timeout", "30", "--ring", ring])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vblk verify");
    // The first kill only once verify has connected (its reconnect covers a lost
    // connection, not a first connect that finds no socket): a loaded machine may take
    // longer than the first kill's delay to start it.
    let connected = Instant::now();
    while !backend.log_text().contains("frontend connected") {
        assert!(connected.elapsed() < Duration::from_secs(30), "vblk verify never connected:\n{}", backend.log_text());
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let t = Instant::now();
    let mut done_early = None;
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(10 + rng.below(60)));
        if let Some(st) = verify.try_wait().expect("try_wait") {
            done_early = Some((k, st));
            break;
        }
        backend.stop();
        let log = dir.join(format!("serve-{}.log", k + 1));
        backend.restart(&image, cfg, &log).unwrap_or_else(|e| panic!("restart {} of vblk serve failed: {e}", k + 1));
    }
    let out = verify.wait_with_output().expect("vblk verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vblk verify failed ({}):\n{stdout}\n{stderr}", out.status);
    if let Some((k, _)) = done_early {
        panic!("verify finished after only {k} of {kills} kills: give it more operations\n{stdout}");
    }
    let resubmitted: usize = (1..=kills)
        .map(|k| std::fs::read_to_string(dir.join(format!("serve-{k}.log"))).unwrap_or_default())
        .filter(|l| l.contains("resubmitting requests"))
        .count();
    eprintln!(
        "{kills} kills of vblk serve under `vblk verify --reconnect --ring {ring}` in {:.1} s; {resubmitted} restarts resubmitted requests\n{stdout}",
        t.elapsed().as_secs_f64()
    );
    assert!(resubmitted > 0, "no kill caught a request in flight: the test proved nothing");
    backend.check_alive().expect("the last vblk serve still runs");
}
