//! A real guest on a Ceph RBD image: `vblk serve rbd:rbd/IMAGE --ceph-conf CONF` on an image
//! of a real cluster (no mock of librbd), a Linux guest (TCG) running discard + write-zeroes,
//! fio verify on both queues, ext4 + e2fsck and a file of a known pattern in one boot; then,
//! vblk killed, the image as the cluster holds it (`rbd export`) is checked on the host:
//! `e2fsck -fn`, and the pattern file's bytes (`debugfs dump`) equal the pattern.
//!
//! The cluster comes from `VBLK_CEPH_CONF` (a `ceph.conf`: `scripts/ceph-micro.sh start DIR`
//! prints it; `scripts/test.sh` starts one). Without it the test fails, unless
//! `VBLK_SKIP_CEPH=1`; `VBLK_SKIP_GUEST=1` skips it like every guest test.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const POOL: &str = "rbd";
/// fio verify: 4 jobs, each on its own region of this many MiB.
const FIO_JOBS: u64 = 4;
const FIO_REGION_MIB: u64 = 64;
/// The fio regions and 64 MiB more (discard.sh's pattern area and the disk's tail).
const IMAGE_MIB: u64 = FIO_JOBS * FIO_REGION_MIB + 64;
/// guest/tests/pattern.sh's file: tag (at most 8 characters), size, name.
const PATTERN_TAG: &str = "rbd1";
const PATTERN_MIB: usize = 8;
const PATTERN_FILE: &str = "pattern";

/// Runs `PROG -c CONF ARGS...`; its stdout, or Err with its output.
fn ceph_cmd(prog: &str, conf: &Path, args: &[&str]) -> Result<Vec<u8>, String> {
    let out = Command::new(prog)
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {prog} ({e}): install ceph-common (scripts/ceph-micro.sh install)"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "{prog} {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// An image made for this test (`rbd create`), removed on drop: the cluster keeps its data in
/// RAM. A killed client's watch on the image would block `rbd rm` for 30 s
/// (osd_client_watch_timeout), so the watchers are blocklisted first, as an operator would.
struct TestImage {
    conf: PathBuf,
    name: String,
}

impl TestImage {
    fn create(conf: &Path, test: &str, mib: u64) -> TestImage {
        let name = format!("{test}-{}", std::process::id());
        ceph_cmd("rbd", conf, &["create", &format!("{POOL}/{name}"), "--size", &format!("{mib}M")])
            .unwrap_or_else(|e| panic!("{e}"));
        TestImage { conf: conf.to_path_buf(), name }
    }

    fn spec(&self) -> String {
        format!("{POOL}/{}", self.name)
    }

    /// The addresses of the clients watching the image (`rbd status`).
    fn watchers(&self) -> Vec<String> {
        let Ok(out) = ceph_cmd("rbd", &self.conf, &["status", &self.spec(), "--format", "json"]) else {
            return Vec::new();
        };
        // {"watchers":[{"address":"127.0.0.1:0/3405869361","client":4151,"cookie":...}]}
        let text = String::from_utf8_lossy(&out);
        text.split("\"address\":\"").skip(1).filter_map(|s| s.split('"').next()).map(str::to_string).collect()
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        for addr in self.watchers() {
            if let Err(e) = ceph_cmd("ceph", &self.conf, &["osd", "blocklist", "add", &addr]) {
                eprintln!("blocklisting the dead watcher {addr}: {e}");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match ceph_cmd("rbd", &self.conf, &["rm", "--no-progress", &self.spec()]) {
                Ok(_) => return,
                Err(e) if Instant::now() > deadline => {
                    eprintln!("removing test image {}: {e}", self.spec());
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }
}

/// What guest/tests/pattern.sh writes: line `i` is `printf 'vblk-pattern %-8.8s %09d\n' TAG i`.
fn pattern_bytes(tag: &str, mib: usize) -> Vec<u8> {
    let lines = mib * MIB as usize / 32;
    let mut v = Vec::with_capacity(mib * MIB as usize);
    for i in 0..lines {
        v.extend_from_slice(format!("vblk-pattern {tag:<8.8} {i:09}\n").as_bytes());
    }
    v
}

fn host_tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} not found on the host: install e2fsprogs"))
}

/// `vblk serve rbd:...` with 2 queues: the guest runs discard + write-zeroes, fio verify (4 jobs
/// over both hardware queues), ext4 + e2fsck, and writes an 8 MiB pattern file with O_DIRECT +
/// fsync on that ext4. vblk is then killed (SIGKILL: no flush at exit, so what the guest
/// flushed must already be in the cluster), and the image exported from the cluster must hold a
/// clean file system whose pattern file has exactly the guest's bytes.
#[test]
fn rbd_discard_fio_ext4_pattern() {
    let name = "rbd_guest";
    if skip_guest(name) {
        return;
    }
    let Some(conf) = ceph_conf(name) else {
        return;
    };
    let t0 = Instant::now();
    let image = TestImage::create(&conf, name, IMAGE_MIB);
    let args: Vec<&'static str> = vec!["--ceph-conf", Box::leak(conf.to_string_lossy().into_owned().into_boxed_str())];
    let cfg = BackendConfig { readonly: false, num_queues: 2, vblk_args: Box::leak(args.into_boxed_slice()) };
    let Some(mut fx) = Fixture::with_image(name, Backend::Vblk, &format!("rbd:{}", image.spec()), cfg) else {
        return;
    };
    let guest_args = format!(
        "run=discard+fio-verify+ext4,queues=2,jobs={FIO_JOBS},size={FIO_REGION_MIB},\
         tag={PATTERN_TAG},mib={PATTERN_MIB},file={PATTERN_FILE}"
    );
    let out = fx.boot_expect_pass("pattern", &guest_args, 2);
    let want = pattern_bytes(PATTERN_TAG, PATTERN_MIB);
    let sha = sha256_hex(&want);
    assert!(
        out.serial.contains(&format!("pattern sha256 {sha}")),
        "the guest's pattern is not the host's (sha256 {sha}): see its serial log above"
    );
    fx.backend.check_alive().expect("vblk serve must survive the guest powering off");
    fx.backend.stop();

    let export = fx.dir.join("export.img");
    let t = Instant::now();
    ceph_cmd("rbd", &conf, &["export", "--no-progress", &image.spec(), &export.to_string_lossy()])
        .unwrap_or_else(|e| panic!("{e}"));
    let size = std::fs::metadata(&export).expect("exported image").len();
    assert_eq!(size, IMAGE_MIB * MIB, "rbd export wrote {size} bytes");
    eprintln!("[{name}] rbd export: {} MiB in {:.1}s", size / MIB, t.elapsed().as_secs_f64());

    let out = Command::new(host_tool("e2fsck")).arg("-fn").arg(&export).output().expect("run e2fsck");
    assert!(
        out.status.success(),
        "host e2fsck -fn on the exported image failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // debugfs exits 0 even when its command fails: the dumped file is what counts.
    let dumped = fx.dir.join("pattern.out");
    let out = Command::new(host_tool("debugfs"))
        .arg("-R")
        .arg(format!("dump /{PATTERN_FILE} {}", dumped.display()))
        .arg(&export)
        .output()
        .expect("run debugfs");
    let got = std::fs::read(&dumped).unwrap_or_else(|e| {
        panic!("debugfs did not dump /{PATTERN_FILE} ({e}):\n{}", String::from_utf8_lossy(&out.stderr))
    });
    if got != want {
        let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        panic!(
            "/{PATTERN_FILE} in the exported image differs from the guest's pattern: {} bytes (want {}), \
             first difference at byte {at}: {:?}",
            got.len(),
            want.len(),
            String::from_utf8_lossy(&got[at.min(got.len())..(at + 32).min(got.len())])
        );
    }
    eprintln!(
        "[{name}] exported image: e2fsck clean, /{PATTERN_FILE} = the pattern (sha256 {sha}); {:.1}s in all",
        t0.elapsed().as_secs_f64()
    );
}
