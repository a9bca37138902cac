//! Real-guest tests: boot a Linux guest under QEMU (TCG) with a
//! vhost-user-blk-pci device served by `vblk serve` and run the scripts in
//! `guest/tests/` inside it. The `qsd_*` tests run the same scripts against
//! qemu-storage-daemon as a reference, proving the harness itself is sound.
//!
//! Requires QEMU >= 10, busybox-static, fio, e2fsprogs, util-linux and a
//! Debian kernel (scripts/setup.sh). Set VBLK_SKIP_GUEST=1 to skip.
//! Guest tests are serialised; run with `--nocapture` to see serial logs.
//! `VBLK_GUEST_BACKEND=qsd` runs the vblk tests against qemu-storage-daemon
//! instead (to check the guest scripts / harness independently of vblk).

mod common;

use common::*;

/// Per-job region of the fio test (MiB); 4 jobs.
const FIO_REGION_MIB: u64 = 128;

fn fio_verify(name: &str, backend: Backend, queues: u16) {
    fio_verify_with(name, backend, queues, &[]);
}

fn fio_verify_with(name: &str, backend: Backend, queues: u16, vblk_args: &'static [&'static str]) {
    let cfg = BackendConfig { readonly: false, num_queues: queues, vblk_args };
    let Some(mut fx) = Fixture::new(name, backend, 4 * FIO_REGION_MIB * MIB + 64 * MIB, cfg, |_| {}) else {
        return;
    };
    fx.boot_expect_pass("fio-verify", &format!("queues={queues},jobs=4,size={FIO_REGION_MIB}"), queues);
}

fn ext4(name: &str, backend: Backend, queues: u16) {
    let cfg = BackendConfig { readonly: false, num_queues: queues, vblk_args: &[] };
    let Some(mut fx) = Fixture::new(name, backend, 256 * MIB, cfg, |_| {}) else {
        return;
    };
    fx.boot_expect_pass("ext4", "", queues);
    // The filesystem must also be consistent as seen by the host, i.e. the
    // data really reached the image file.
    fx.backend.stop();
    host_fsck(&fx.image);
}

fn host_fsck(image: &std::path::Path) {
    let e2fsck = ["/usr/sbin/e2fsck", "/sbin/e2fsck"].into_iter().find(|p| std::path::Path::new(p).exists());
    let Some(e2fsck) = e2fsck else {
        eprintln!("host e2fsck not found, skipping the host-side fsck");
        return;
    };
    let out = std::process::Command::new(e2fsck).arg("-fn").arg(image).output().expect("run e2fsck");
    assert!(
        out.status.success(),
        "host e2fsck -fn on the image failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn discard(name: &str, backend: Backend) {
    let cfg = BackendConfig { readonly: false, num_queues: 2, vblk_args: &[] };
    let Some(mut fx) = Fixture::new(name, backend, 64 * MIB, cfg, |_| {}) else {
        return;
    };
    fx.boot_expect_pass("discard", "", 2);
}

fn readonly(name: &str, backend: Backend) {
    let cfg = BackendConfig { readonly: true, num_queues: 2, vblk_args: &[] };
    let data = pattern(0x5eed, MIB as usize);
    let sha = sha256_hex(&data[..512]);
    let Some(mut fx) = Fixture::new(name, backend, 64 * MIB, cfg, |img| write_at(img, 0, &data)) else {
        return;
    };
    fx.boot_expect_pass("readonly", &format!("sha={sha}"), 2);
    assert!(read_at(&fx.image, 0, MIB as usize) == data, "the read-only image was modified");
}

fn second_guest(name: &str, backend: Backend) {
    let cfg = BackendConfig { readonly: false, num_queues: 2, vblk_args: &[] };
    let Some(mut fx) = Fixture::new(name, backend, 64 * MIB, cfg, |_| {}) else {
        return;
    };
    fx.boot_expect_pass("smoke", "tag=first", 2);
    fx.backend.check_alive().expect("backend must survive the first guest powering off");
    assert!(read_at(&fx.image, MIB, MIB as usize) == smoke_pattern("first"), "first guest's data not in the image");
    // Same daemon, new QEMU: must connect, see the first guest's data and write.
    fx.boot_expect_pass("smoke", "prev=first,tag=second", 2);
    fx.backend.check_alive().expect("backend must survive the second guest powering off");
    assert!(read_at(&fx.image, MIB, MIB as usize) == smoke_pattern("second"), "second guest's data not in the image");
}

// --- vblk (the backend under test) ---------------------------------------------

/// The backend for the non-`qsd_` tests: vblk unless VBLK_GUEST_BACKEND=qsd.
fn under_test() -> Backend {
    match std::env::var("VBLK_GUEST_BACKEND").as_deref() {
        Ok("qsd") => Backend::Qsd,
        Ok("vblk") | Ok("") | Err(_) => Backend::Vblk,
        Ok(other) => panic!("VBLK_GUEST_BACKEND must be vblk or qsd, not {other:?}"),
    }
}

#[test]
fn fio_verify_2_queues() {
    fio_verify("fio_verify_2_queues", under_test(), 2);
}

#[test]
fn fio_verify_4_queues() {
    fio_verify("fio_verify_4_queues", under_test(), 4);
}

/// The same data-integrity check with adaptive polling off (workers always sleep on the
/// kick eventfds) and request merging off; the defaults are polling (50 µs) and merging.
#[test]
fn fio_verify_2_queues_sleeping_without_merging() {
    fio_verify_with("fio_verify_2_queues_sleeping_without_merging", under_test(), 2, &["--poll-us", "0", "--no-merge"]);
}

#[test]
fn fio_verify_2_queues_sleeping_and_merging() {
    fio_verify_with("fio_verify_2_queues_sleeping_and_merging", under_test(), 2, &["--poll-us", "0"]);
}

#[test]
fn ext4_2_queues() {
    ext4("ext4_2_queues", under_test(), 2);
}

#[test]
fn discard_and_write_zeroes() {
    discard("discard_and_write_zeroes", under_test());
}

#[test]
fn readonly_export() {
    readonly("readonly_export", under_test());
}

#[test]
fn second_guest_after_first_powers_off() {
    second_guest("second_guest_after_first_powers_off", under_test());
}

/// `vblk serve --inject`: the disk fails every write after the first `N` (enough for
/// mkfs.ext4 and mount); the guest writes files until it sees EIO, and must survive it.
const FAILING_DISK_SPEC: &str = "write:eio@after=200";

/// ext4 on a disk that starts returning EIO: the guest reports the errors, the data synced
/// before them stays readable, and after the guest powers off the daemon still serves a new
/// frontend (and still fails its writes).
#[test]
fn ext4_on_failing_disk() {
    let name = "ext4_on_failing_disk";
    let cfg = BackendConfig { readonly: false, num_queues: 2, vblk_args: &["--inject", FAILING_DISK_SPEC] };
    // Fault injection is vblk's: this test never runs against qemu-storage-daemon.
    let Some(mut fx) = Fixture::new(name, Backend::Vblk, 128 * MIB, cfg, |_| {}) else {
        return;
    };
    let after = FAILING_DISK_SPEC.rsplit('=').next().unwrap_or_default();
    fx.boot_expect_pass("ext4-eio", &format!("after={after}"), 2);
    fx.backend.check_alive().expect("vblk serve must survive a guest on a failing disk");
    assert!(fx.backend.log_text().contains("FAULT INJECTION ON"), "no startup warning:\n{}", fx.backend.log_text());
    let mut c = client::Client::connect(&fx.backend.socket);
    let sb = c.read(1024, 1024).expect("the daemon still serves reads");
    assert_eq!(&sb[56..58], &[0x53, 0xef], "the ext4 superblock written before the failure is intact");
    assert_eq!(c.write(64 * MIB, &[0u8; 4096]), Err(vblk_driver::RequestFailure::IoErr), "writes still fail");
}

// --- qemu-storage-daemon reference (validates the harness and guest scripts) ---

#[test]
fn qsd_fio_verify_2_queues() {
    fio_verify("qsd_fio_verify_2_queues", Backend::Qsd, 2);
}

#[test]
fn qsd_ext4() {
    ext4("qsd_ext4", Backend::Qsd, 2);
}

/// The packed virtqueue (`packed=on`): the guest checks it negotiated it, then discard,
/// fio verify and ext4 in one boot.
fn packed(name: &str, backend: Backend, queues: u16, ring: &str) {
    let cfg = BackendConfig { readonly: false, num_queues: queues, vblk_args: &[] };
    let Some(mut fx) = Fixture::new(name, backend, 4 * 64 * MIB + 64 * MIB, cfg, |_| {}) else {
        return;
    };
    fx.boot_expect_pass_with("packed", &format!("queues={queues},jobs=4,size=64,ring={ring}"), queues, &packed_ring());
    fx.backend.stop();
    host_fsck(&fx.image);
}

#[test]
fn packed_ring_1_queue() {
    packed("packed_ring_1_queue", under_test(), 1, "packed");
}

#[test]
fn packed_ring_4_queues() {
    packed("packed_ring_4_queues", under_test(), 4, "packed");
}

/// qemu-storage-daemon has no packed ring: QEMU's `packed=on` falls back to the split
/// ring, and the same checks pass (the harness's reference for the packed tests).
#[test]
fn qsd_packed_on_falls_back_to_split() {
    packed("qsd_packed_on_falls_back_to_split", Backend::Qsd, 2, "split");
}

/// A qcow2 overlay on a raw base (`--format qcow2`): the guest runs discard, fio verify and
/// ext4 in one boot; afterwards `qemu-img check` is clean and the base is unchanged.
#[test]
fn qcow2_overlay_discard_fio_ext4() {
    let cfg = BackendConfig { readonly: false, num_queues: 2, vblk_args: &["--format", "qcow2"] };
    let size = 4 * 64 * MIB + 64 * MIB;
    let prepare = |image: &std::path::Path| {
        let base = image.with_file_name("base.raw");
        std::fs::rename(image, &base).unwrap();
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw"])
            .arg(image)
            .status()
            .expect("qemu-img");
        assert!(st.success());
    };
    let Some(mut fx) = Fixture::new("qcow2_overlay", Backend::Vblk, size, cfg, prepare) else {
        return;
    };
    let base = fx.image.with_file_name("base.raw");
    let sum = |p: &std::path::Path| {
        std::fs::read(p).map(|d| d.iter().fold(0u64, |h, &b| h.wrapping_mul(31).wrapping_add(b as u64)))
    };
    let before = sum(&base).unwrap();
    fx.boot_expect_pass_with("packed", "queues=2,jobs=4,size=64,ring=split", 2, &[]);
    fx.backend.stop();
    let out = std::process::Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&fx.image).output().unwrap();
    assert!(out.status.success(), "qemu-img check: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(sum(&base).unwrap(), before, "the backing file is never written");
}
