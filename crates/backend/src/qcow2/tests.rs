//! qcow2 images made by QEMU's own tools (`qemu-img`, `qemu-io`), read and written through
//! [`Qcow2Image`] and the engine, checked back with `qemu-img check` and `qemu-io`.
//! Skipped (with a message) where qemu-img is not installed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use super::*;
use crate::{Completion, Disk, Engine, EngineKind, IoOp, OpKind};

fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("qemu-img not found: skipping (install qemu-utils)");
    }
    ok
}

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let base = std::env::var_os("CARGO_TARGET_TMPDIR").map_or_else(std::env::temp_dir, PathBuf::from);
        Dir::under(&base, tag)
    }
    fn under(base: &Path, tag: &str) -> Dir {
        let d = base.join(format!("vblk-qcow2-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args))
}

fn qemu_io(image: &Path, fmt: &str, cmd: &str) -> String {
    run(Command::new("qemu-io").args(["-f", fmt, "-c", cmd]).arg(image))
}

fn check_clean(image: &Path) {
    let out = Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(image).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "qemu-img check {}: {text}{}", image.display(), String::from_utf8_lossy(&out.stderr));
}

/// One op through a real engine on `disk`, waited for.
fn io(engine: &mut Engine, kind: OpKind, offset: u64, buf: &mut [u8]) -> Result<u64, crate::BackendError> {
    let iovs = if matches!(kind, OpKind::Read | OpKind::Write) {
        vec![libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }]
    } else {
        Vec::new()
    };
    // The range of a discard / write-zeroes is the buffer's length too (a flush has none).
    let op = IoOp { kind, offset, len: buf.len() as u64, iovs, fua: false, tag: 7 };
    // SAFETY: `buf` outlives the op: we wait for its completion below.
    unsafe { engine.push(op) }.expect("room");
    engine.submit().unwrap();
    let mut done: Vec<Completion> = Vec::new();
    while done.is_empty() {
        engine.wait(&mut done).unwrap();
    }
    assert_eq!(done.len(), 1);
    done.pop().unwrap().result
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn headers_are_checked_before_imago_sees_them() {
    if !have_qemu_img() {
        return;
    }
    let d = Dir::new("hdr");
    let img = d.join("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"]);
    let h = check_header(&img).unwrap();
    assert_eq!((h.version, h.cluster_bits, h.size), (3, 16, 1 << 20));
    let patch = |name: &str, off: usize, bytes: &[u8]| -> PathBuf {
        let p = d.join(name);
        let mut data = std::fs::read(&img).unwrap();
        data[off..off + bytes.len()].copy_from_slice(bytes);
        std::fs::write(&p, data).unwrap();
        p
    };
    let raw = d.join("raw");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    assert!(matches!(check_header(&raw), Err(FormatError::NotQcow2 { .. })));
    assert!(!has_qcow2_magic(&raw).unwrap());
    assert!(has_qcow2_magic(&img).unwrap());
    let short = d.join("short");
    std::fs::write(&short, b"QFI\xfb\0\0\0\x03").unwrap();
    assert!(matches!(check_header(&short), Err(FormatError::Truncated { .. })));
    assert!(matches!(check_header(&patch("v4", 4, &4u32.to_be_bytes())), Err(FormatError::Version { version: 4, .. })));
    assert!(matches!(check_header(&patch("v1", 4, &1u32.to_be_bytes())), Err(FormatError::Version { version: 1, .. })));
    let enc = patch("enc", 32, &1u32.to_be_bytes());
    let e = check_header(&enc).unwrap_err();
    assert!(matches!(e, FormatError::Encrypted { method: 1, .. }), "{e}");
    assert!(e.to_string().contains("encrypted"), "{e}");
    assert!(Qcow2Image::open(&enc, &Qcow2Options::default()).is_err(), "imago alone would take it");
    assert!(matches!(
        check_header(&patch("cb9", 20, &9u32.to_be_bytes())),
        Err(FormatError::ClusterSize { bits: 9, .. })
    ));
    assert!(matches!(
        check_header(&patch("cb22", 20, &22u32.to_be_bytes())),
        Err(FormatError::ClusterSize { bits: 22, .. })
    ));
}

#[test]
fn qemu_io_patterns_read_back_through_a_backing_chain() {
    if !have_qemu_img() {
        return;
    }
    let d = Dir::new("chain");
    let base = d.join("base.raw");
    let mid = d.join("mid.qcow2");
    let top = d.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "4M"]);
    qemu_io(&base, "raw", "write -P 0x11 0 1M");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "base.raw",
        "-F",
        "raw",
        mid.to_str().unwrap(),
    ]);
    qemu_io(&mid, "qcow2", "write -P 0x22 512k 64k");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top.to_str().unwrap()]);
    qemu_io(&top, "qcow2", "write -P 0x33 520k 4k");
    qemu_io(&top, "qcow2", "write -z 2M 64k");
    let base_sum = std::fs::read(&base).unwrap();

    let disk = Arc::new(Disk::open_qcow2(&top, &Qcow2Options::default()).unwrap());
    assert_eq!(disk.size(), 4 << 20);
    let image = disk.qcow2().unwrap().0;
    let layers: Vec<_> =
        image.layers().iter().map(|l| (l.path.file_name().unwrap().to_owned(), l.format.as_str())).collect();
    assert_eq!(layers, [("mid.qcow2".into(), "qcow2"), ("base.raw".into(), "raw")]);
    // 160 clusters of 64 KiB for the top, 128 of 4 KiB for the middle image.
    assert_eq!(image.metadata_cache_max(), 160 * 65536 + 128 * 4096);
    assert!(image.describe().contains("metadata cache at most 11 MiB"), "{}", image.describe());
    let mut e = Engine::new(Arc::clone(&disk), EngineKind::Auto, 8).unwrap();
    assert!(e.kind_name().starts_with("qcow2"), "{}", e.kind_name());
    let mut buf = vec![0u8; 4096];
    let mut read = |e: &mut Engine, off: u64| {
        io(e, OpKind::Read, off, &mut buf).unwrap();
        buf.clone()
    };
    assert_eq!(read(&mut e, 0), vec![0x11; 4096], "from the raw base");
    assert_eq!(read(&mut e, 512 << 10), vec![0x22; 4096], "from the middle qcow2");
    assert_eq!(read(&mut e, 520 << 10), vec![0x33; 4096], "from the top");
    assert_eq!(read(&mut e, 2 << 20), vec![0; 4096], "zero cluster");
    assert_eq!(read(&mut e, 3 << 20), vec![0; 4096], "unallocated everywhere");

    // Writes land in the top image only; QEMU reads them back; the chain stays clean.
    let mut data = pattern(64 << 10, 5);
    io(&mut e, OpKind::Write, 1 << 20, &mut data).unwrap();
    io(&mut e, OpKind::Flush, 0, &mut []).unwrap();
    drop(e);
    drop(disk);
    check_clean(&top);
    check_clean(&mid);
    assert_eq!(std::fs::read(&base).unwrap(), base_sum, "the backing file is never written");
    let out =
        Command::new("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw"]).arg(&top).arg(&base).output().unwrap();
    assert!(!out.status.success(), "the top image differs from its base after our write");
    let out = qemu_io(&top, "qcow2", "read -P 0x33 520k 4k");
    assert!(out.contains("read 4096/4096"), "{out}");
    // QEMU's view of the whole disk: our 64 KiB at 1 MiB, the chain's data around it.
    let out = d.join("out.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", top.to_str().unwrap(), out.to_str().unwrap()]);
    let whole = std::fs::read(&out).unwrap();
    assert!(whole[1 << 20..(1 << 20) + data.len()] == data[..], "QEMU reads back what vblk wrote");
    assert!(whole[..4096] == [0x11; 4096][..] && whole[520 << 10..(520 << 10) + 4096] == [0x33; 4096][..]);
}

/// A qcow2 disk's engine with a fast path named `kind`, or `None` (with a message) where
/// it is not available (io_uring refused, no tmpfs).
fn fast_engine(disk: &Arc<Disk>, depth: u32, kind: &str) -> Option<Engine> {
    let e = Engine::new(Arc::clone(disk), EngineKind::Auto, depth).unwrap();
    if e.kind_name() != kind {
        eprintln!("{} instead of {kind}: skipping the fast-path checks", e.kind_name());
        return None;
    }
    Some(e)
}

#[test]
fn allocated_data_runs_on_the_io_uring_and_the_rest_on_the_service() {
    if have_qemu_img() {
        fast_path_routes(Dir::new("fast"), "qcow2+io_uring");
    }
}

/// The same with the image in memory (tmpfs): the fast path runs with plain syscalls.
#[test]
fn in_memory_the_fast_path_runs_inline() {
    if have_qemu_img() && Path::new("/dev/shm").is_dir() {
        fast_path_routes(Dir::under(Path::new("/dev/shm"), "fast-shm"), "qcow2+sync");
    }
}

fn fast_path_routes(d: Dir, kind: &str) {
    let (base, mid, top) = (d.join("base.raw"), d.join("mid.qcow2"), d.join("top.qcow2"));
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "4M"]);
    qemu_io(&base, "raw", "write -P 0x11 0 1M");
    let mid_args = ["-o", "cluster_size=4k", "-b", "base.raw", "-F", "raw", mid.to_str().unwrap()];
    qemu_img(&[&["create", "-q", "-f", "qcow2"][..], &mid_args[..]].concat());
    qemu_io(&mid, "qcow2", "write -P 0x22 512k 64k");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top.to_str().unwrap()]);
    qemu_io(&top, "qcow2", "write -P 0x33 520k 4k");
    qemu_io(&top, "qcow2", "write -z 2M 64k");
    let expect = |d: &Dir| {
        let out = d.join("expect.raw");
        qemu_img(&["convert", "-f", "qcow2", "-O", "raw", top.to_str().unwrap(), out.to_str().unwrap()]);
        std::fs::read(&out).unwrap()
    };
    let whole = expect(&d);

    let disk = Arc::new(Disk::open_qcow2(&top, &Qcow2Options::default()).unwrap());
    let Some(mut e) = fast_engine(&disk, 8, kind) else { return };
    let routes = |e: &Engine| e.qcow2_routes().unwrap();
    // One read across every kind of piece: the raw base, the middle image's 4 KiB
    // clusters, the top's cluster, a zero cluster, unallocated space. The first time the
    // tables are not cached (service); the second time it is split on the io_uring.
    for pass in 0..2 {
        let mut buf = vec![0xeeu8; 3 << 20];
        io(&mut e, OpKind::Read, 0, &mut buf).unwrap();
        assert!(buf[..] == whole[..3 << 20], "pass {pass}: the chain's data as QEMU reads it");
    }
    assert_eq!(routes(&e), Routes { fast: 1, service: 1 });
    // Overwriting the top's own cluster is a fast write; a write to a cluster the top does
    // not own (copy-on-write from the middle image) or has not allocated goes to the
    // service, and once allocated, its cluster is written in place.
    let mut a = pattern(4096, 1);
    io(&mut e, OpKind::Write, 520 << 10, &mut a).unwrap();
    assert_eq!(routes(&e).fast, 2, "overwrite of an allocated cluster");
    let mut b = pattern(8192, 2);
    io(&mut e, OpKind::Write, 0, &mut b).unwrap();
    assert_eq!(routes(&e).service, 2, "copy-on-write from the backing image");
    let mut c = pattern(4096, 3);
    io(&mut e, OpKind::Write, 3 << 20, &mut c).unwrap();
    assert_eq!(routes(&e).service, 3, "allocating write");
    let mut c2 = pattern(4096, 4);
    io(&mut e, OpKind::Write, 3 << 20, &mut c2).unwrap();
    assert_eq!(routes(&e).fast, 3, "the same cluster, now allocated");
    // A FUA write must also make its cluster's mapping durable: the service's flush.
    let op_fua = |buf: &mut [u8]| IoOp {
        kind: OpKind::Write,
        offset: 3 << 20,
        len: buf.len() as u64,
        iovs: vec![libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }],
        fua: true,
        tag: 9,
    };
    let mut f = pattern(4096, 5);
    // SAFETY: `f` outlives the op: it is waited for below.
    unsafe { e.push(op_fua(&mut f)) }.unwrap();
    e.submit().unwrap();
    let mut done = Vec::new();
    while done.is_empty() {
        e.wait(&mut done).unwrap();
    }
    assert!(done[0].result.is_ok() && done[0].op.tag == 9 && done[0].op.offset == 3 << 20);
    assert_eq!(routes(&e).service, 4, "FUA write");
    // A discard waits for a queue's fast-path request until that request is done with its
    // mapping: reaped (io_uring, which may have finished it long before) or run (inline).
    const BLOCK: usize = 4096;
    let mut a2 = pattern(BLOCK, 1);
    let before = e.qcow2_routes().unwrap().fast;
    let op = IoOp {
        kind: OpKind::Write,
        offset: 520 << 10,
        len: BLOCK as u64,
        iovs: vec![libc::iovec { iov_base: a2.as_mut_ptr().cast(), iov_len: BLOCK }],
        fua: false,
        tag: 1,
    };
    // SAFETY: `a2` outlives the op: it is reaped below.
    unsafe { e.push(op) }.unwrap();
    if kind.ends_with("io_uring") {
        e.submit().unwrap();
    }
    assert_eq!(e.qcow2_routes().unwrap().fast, before + 1, "an overwrite on the fast path");
    let discard = {
        let disk = Arc::clone(&disk);
        std::thread::spawn(move || {
            let mut e = Engine::new(disk, EngineKind::Auto, 1).unwrap();
            io(&mut e, OpKind::Discard, 1 << 20, &mut vec![0u8; 64 << 10]).unwrap();
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!discard.is_finished(), "the discard waits for the unreaped request");
    let mut done = Vec::new();
    while done.is_empty() {
        e.wait(&mut done).unwrap();
    }
    assert!(done[0].result.is_ok());
    discard.join().unwrap();
    io(&mut e, OpKind::Flush, 0, &mut []).unwrap();
    drop(e);
    drop(disk);
    check_clean(&top);
    let after = expect(&d);
    assert!(after[520 << 10..(520 << 10) + 4096] == a2[..]);
    assert!(after[1 << 20..(1 << 20) + (64 << 10)].iter().all(|&x| x == 0), "discarded");
    assert!(after[..8192] == b[..]);
    assert!(after[3 << 20..(3 << 20) + 4096] == f[..]);
    assert!(after[8192..64 << 10] == whole[8192..64 << 10], "the rest of the copied cluster");
}

#[test]
fn queues_writing_and_reading_at_once_keep_every_block() {
    if !have_qemu_img() {
        return;
    }
    // Four engines (queues), each on its own thread with 16 requests in flight, write and
    // read back their own blocks of a fresh overlay in random order: allocating writes
    // (service) and overwrites (io_uring) of the same clusters interleave across queues.
    let d = Dir::new("queues");
    let (base, top) = (d.join("base.raw"), d.join("top.qcow2"));
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "16M"]);
    qemu_io(&base, "raw", "write -P 0x44 0 16M");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top.to_str().unwrap()]);
    let disk = Arc::new(Disk::open_qcow2(&top, &Qcow2Options::default()).unwrap());
    const BLOCK: usize = 4096;
    let blocks = (16 << 20) / BLOCK;
    let threads: Vec<_> = (0..4u64)
        .map(|q| {
            let disk = Arc::clone(&disk);
            std::thread::spawn(move || {
                let mut e = Engine::new(disk, EngineKind::Auto, 16).unwrap();
                // This queue's blocks: every 4th, in a scrambled order, each written twice.
                let mine: Vec<usize> = (0..blocks / 4).map(|i| (i * 7919) % (blocks / 4) * 4 + q as usize).collect();
                let mut bufs: Vec<Vec<u8>> = (0..16).map(|_| vec![0u8; BLOCK]).collect();
                let mut version = vec![0u8; blocks];
                for round in 1..=2u8 {
                    for chunk in mine.chunks(16) {
                        for (i, &b) in chunk.iter().enumerate() {
                            bufs[i] = pattern(BLOCK, (b as u8) ^ round);
                            version[b] = round;
                            let buf = &mut bufs[i];
                            let op = IoOp {
                                kind: OpKind::Write,
                                offset: (b * BLOCK) as u64,
                                len: BLOCK as u64,
                                iovs: vec![libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: BLOCK }],
                                fua: false,
                                tag: b as u64,
                            };
                            // SAFETY: `bufs` outlives the op: the batch is waited for below.
                            unsafe { e.push(op) }.unwrap();
                        }
                        e.submit().unwrap();
                        let mut done = Vec::new();
                        while done.len() < chunk.len() {
                            e.wait(&mut done).unwrap();
                        }
                        assert!(done.iter().all(|c| c.result.is_ok()), "queue {q}");
                    }
                }
                let mut buf = vec![0u8; BLOCK];
                for &b in &mine {
                    io(&mut e, OpKind::Read, (b * BLOCK) as u64, &mut buf).unwrap();
                    assert!(buf == pattern(BLOCK, (b as u8) ^ version[b]), "queue {q} block {b}");
                }
                e.qcow2_routes().unwrap()
            })
        })
        .collect();
    let routes: Vec<Routes> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(routes.iter().any(|r| r.fast > 0), "{routes:?}");
    let mut e = Engine::new(Arc::clone(&disk), EngineKind::Auto, 1).unwrap();
    io(&mut e, OpKind::Flush, 0, &mut []).unwrap();
    drop(e);
    drop(disk);
    check_clean(&top);
}

fn allocated_clusters(image: &Path) -> u64 {
    let out = run(Command::new("qemu-img").args(["check", "--output=json", "-f", "qcow2"]).arg(image));
    // The key is left out when no cluster is allocated.
    let key = "\"allocated-clusters\":";
    let Some(at) = out.find(key) else { return 0 };
    out[at + key.len()..].trim_start().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

#[test]
fn discard_frees_clusters_even_while_other_queues_write() {
    if !have_qemu_img() {
        return;
    }
    let d = Dir::new("discard");
    let img = d.join("d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "32M"]);
    let disk = Arc::new(Disk::open_qcow2(&img, &Qcow2Options::default()).unwrap());
    let mut e = Engine::new(Arc::clone(&disk), EngineKind::Auto, 4).unwrap();
    let mut data = pattern(16 << 20, 9);
    io(&mut e, OpKind::Write, 0, &mut data).unwrap();
    io(&mut e, OpKind::Flush, 0, &mut []).unwrap();
    let full = allocated_clusters(&img);
    assert!(full >= 256, "16 MiB of 64 KiB clusters: {full}");
    io(&mut e, OpKind::Discard, 0, &mut vec![0u8; 16 << 20]).unwrap();
    io(&mut e, OpKind::Flush, 0, &mut []).unwrap();
    let after = allocated_clusters(&img);
    assert!(after + 256 <= full, "discard freed the clusters: {full} -> {after}");
    let mut buf = vec![0xffu8; 1 << 20];
    io(&mut e, OpKind::Read, 4 << 20, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "discarded data reads as zeros");
    const BLOCK: usize = 4096;

    // Three queues write (allocating, then overwriting on the io_uring) while a fourth
    // discards the second half again and again: freed clusters are reused at once, so a
    // write still in flight to a cluster a discard freed would land in someone else's.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let discarder = {
        let (disk, stop) = (Arc::clone(&disk), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut e = Engine::new(disk, EngineKind::Auto, 1).unwrap();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let off = (16 << 20) + (n * 7 % 64) * (128 << 10);
                io(&mut e, OpKind::Discard, off, &mut vec![0u8; 256 << 10]).unwrap();
                n += 1;
            }
            n
        })
    };
    let writers: Vec<_> = (0..3u64)
        .map(|q| {
            let disk = Arc::clone(&disk);
            std::thread::spawn(move || {
                let mut e = Engine::new(disk, EngineKind::Auto, 1).unwrap();
                for round in 1..=3u8 {
                    // Each queue's blocks, in both halves.
                    for i in (q as usize..(32 << 20) / BLOCK).step_by(3 * 5) {
                        let mut buf = pattern(BLOCK, i as u8 ^ round);
                        io(&mut e, OpKind::Write, (i * BLOCK) as u64, &mut buf).unwrap();
                    }
                }
                e.qcow2_routes().unwrap()
            })
        })
        .collect();
    let routes: Vec<Routes> = writers.into_iter().map(|t| t.join().unwrap()).collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let discards = discarder.join().unwrap();
    assert!(discards > 0 && routes.iter().all(|r| r.fast > 0), "{discards} discards, {routes:?}");
    io(&mut e, OpKind::Flush, 0, &mut []).unwrap();
    // The first half was never discarded: the last round is there. In the second half a
    // block holds a round's data or zeros, nothing else.
    let mut buf = vec![0u8; BLOCK];
    for q in 0..3usize {
        for i in (q..(32 << 20) / BLOCK).step_by(15) {
            io(&mut e, OpKind::Read, (i * BLOCK) as u64, &mut buf).unwrap();
            let ok = if i * BLOCK < 16 << 20 {
                buf == pattern(BLOCK, i as u8 ^ 3)
            } else {
                buf.iter().all(|&b| b == 0) || (1..=3u8).any(|r| buf == pattern(BLOCK, i as u8 ^ r))
            };
            assert!(ok, "block {i}");
        }
    }
    drop(e);
    drop(disk);
    check_clean(&img);
}

#[test]
fn an_external_data_file_is_read_and_written() {
    if !have_qemu_img() {
        return;
    }
    let d = Dir::new("datafile");
    let (top, data) = (d.join("top.qcow2"), d.join("data.raw"));
    // A relative name, resolved against the image's directory (created there by qemu-img).
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "data_file=data.raw,data_file_raw=on", "top.qcow2", "4M"])
        .current_dir(&d.0));
    // QEMU resolves a relative data file name against its working directory (vblk: the
    // image's directory): run it from there.
    let qemu_io_here =
        |cmd: &str| run(Command::new("qemu-io").args(["-f", "qcow2", "-c", cmd, "top.qcow2"]).current_dir(&d.0));
    qemu_io_here("write -P 0x66 64k 128k");
    let disk = Arc::new(Disk::open_qcow2(&top, &Qcow2Options::default()).unwrap());
    let mut e = Engine::new(Arc::clone(&disk), EngineKind::Auto, 4).unwrap();
    let mut buf = vec![0u8; 256 << 10];
    io(&mut e, OpKind::Read, 0, &mut buf).unwrap();
    assert!(buf[..64 << 10].iter().all(|&b| b == 0) && buf[64 << 10..192 << 10].iter().all(|&b| b == 0x66));
    // A write lands in the data file, at the same offset (data_file_raw).
    let mut w = pattern(64 << 10, 3);
    io(&mut e, OpKind::Write, 1 << 20, &mut w).unwrap();
    io(&mut e, OpKind::Flush, 0, &mut []).unwrap();
    drop(e);
    drop(disk);
    run(Command::new("qemu-img").args(["check", "-q", "-f", "qcow2", "top.qcow2"]).current_dir(&d.0));
    let raw = std::fs::read(&data).unwrap();
    assert!(raw[1 << 20..(1 << 20) + w.len()] == w[..], "the data file holds the write");
    let out = qemu_io_here("read -P 0x66 64k 128k");
    assert!(out.contains("read 131072/131072"), "{out}");
}

#[test]
fn backing_files_outside_the_allowed_directories_loops_and_deep_chains_are_refused() {
    if !have_qemu_img() {
        return;
    }
    let d = Dir::new("gate");
    std::fs::create_dir_all(d.join("elsewhere")).unwrap();
    std::fs::create_dir_all(d.join("vm/sub")).unwrap();
    let outside = d.join("elsewhere/base.raw");
    qemu_img(&["create", "-q", "-f", "raw", outside.to_str().unwrap(), "1M"]);
    // A backing file in a subdirectory of the image's directory is fine.
    let inner = d.join("vm/sub/base.raw");
    qemu_img(&["create", "-q", "-f", "raw", inner.to_str().unwrap(), "1M"]);
    let ok = d.join("vm/ok.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "sub/base.raw", "-F", "raw", ok.to_str().unwrap()]);
    Qcow2Image::open(&ok, &Qcow2Options::default()).unwrap();
    let img = d.join("vm/img.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", outside.to_str().unwrap(), "-F", "raw", img.to_str().unwrap()]);
    // Not in the image's directory: refused, then allowed explicitly.
    let e = Qcow2Image::open(&img, &Qcow2Options::default()).unwrap_err();
    assert!(matches!(e, FormatError::NotAllowed { .. }), "{e}");
    assert!(e.to_string().contains("--backing-allowed"), "{e}");
    let opts = Qcow2Options { backing_allowed: vec![d.join("elsewhere")], ..Default::default() };
    Qcow2Image::open(&img, &opts).unwrap();

    // A backing file name pointing at /etc/shadow (or any file outside): refused.
    let evil = d.join("evil.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw", "-u", evil.to_str().unwrap(), "1M"]);
    let e = Qcow2Image::open(&evil, &Qcow2Options::default()).unwrap_err();
    assert!(matches!(e, FormatError::NotAllowed { .. } | FormatError::Io { .. }), "{e}");
    // A relative escape too.
    let esc = d.join("vm/esc.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../elsewhere/base.raw",
        "-F",
        "raw",
        "-u",
        esc.to_str().unwrap(),
        "1M",
    ]);
    let e = Qcow2Image::open(&esc, &Qcow2Options::default()).unwrap_err();
    assert!(matches!(e, FormatError::NotAllowed { .. }), "{e}");

    // a -> b -> a: a loop, not a stack overflow.
    let a = d.join("a.qcow2");
    let b = d.join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", a.to_str().unwrap(), "1M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b.to_str().unwrap()]);
    qemu_img(&["rebase", "-q", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a.to_str().unwrap()]);
    let e = Qcow2Image::open(&a, &Qcow2Options::default()).unwrap_err();
    assert!(matches!(e, FormatError::Loop { .. }), "{e}");
    // A self-loop.
    let s = d.join("self.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "self.qcow2", "-F", "qcow2", "-u", s.to_str().unwrap(), "1M"]);
    assert!(matches!(Qcow2Image::open(&s, &Qcow2Options::default()).unwrap_err(), FormatError::Loop { .. }));

    // A chain deeper than the limit.
    let mut prev = "c0.qcow2".to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", d.join(&prev).to_str().unwrap(), "1M"]);
    for i in 1..=MAX_CHAIN_DEPTH {
        let name = format!("c{i}.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &prev,
            "-F",
            "qcow2",
            "-u",
            d.join(&name).to_str().unwrap(),
            "1M",
        ]);
        prev = name;
    }
    let e = Qcow2Image::open(&d.join(&prev), &Qcow2Options::default()).unwrap_err();
    assert!(matches!(e, FormatError::TooDeep { .. }), "{e}");
    Qcow2Image::open(&d.join(&format!("c{}.qcow2", MAX_CHAIN_DEPTH - 1)), &Qcow2Options::default()).unwrap();
}

#[test]
fn created_images_pass_qemu_img_check_and_read_what_was_written() {
    if !have_qemu_img() {
        return;
    }
    let d = Dir::new("create");
    for cluster in [4096u32, 65536, 2 << 20] {
        let img = d.join(&format!("n{cluster}.qcow2"));
        Qcow2Image::create(&img, &CreateOptions { size: 8 << 20, backing: None, cluster_size: cluster }).unwrap();
        check_clean(&img);
        let disk = Arc::new(Disk::open_qcow2(&img, &Qcow2Options::default()).unwrap());
        let mut e = Engine::new(Arc::clone(&disk), EngineKind::Auto, 4).unwrap();
        let mut w = pattern(12288, cluster as u8);
        io(&mut e, OpKind::Write, 8192, &mut w).unwrap();
        io(&mut e, OpKind::WriteZeroes { unmap: false }, 1 << 20, &mut vec![0u8; 65536]).unwrap();
        io(&mut e, OpKind::Discard, 4 << 20, &mut vec![0u8; 65536]).unwrap();
        io(&mut e, OpKind::Flush, 0, &mut []).unwrap();
        let mut r = vec![0u8; 12288];
        io(&mut e, OpKind::Read, 8192, &mut r).unwrap();
        assert_eq!(r, w);
        // Out of range and read-only rules are the engine's, as for raw disks.
        assert!(io(&mut e, OpKind::Read, 8 << 20, &mut vec![0u8; 512]).is_err());
        drop(e);
        drop(disk);
        check_clean(&img);
        let out = qemu_io(&img, "qcow2", "read -v 8192 16");
        assert!(out.contains(&format!("{:02x}", w[0])), "{out}");
    }
    // An existing file is never overwritten by create.
    let img = d.join("n4096.qcow2");
    assert!(Qcow2Image::create(&img, &CreateOptions { size: 1 << 20, backing: None, cluster_size: 65536 }).is_err());
    // A v2 image: read/write; discard is a no-op.
    let v2 = d.join("v2.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2.to_str().unwrap(), "2M"]);
    let disk = Arc::new(Disk::open_qcow2(&v2, &Qcow2Options::default()).unwrap());
    let mut e = Engine::new(Arc::clone(&disk), EngineKind::Auto, 4).unwrap();
    let mut w = pattern(4096, 9);
    io(&mut e, OpKind::Write, 0, &mut w).unwrap();
    io(&mut e, OpKind::Discard, 1 << 20, &mut vec![0u8; 4096]).unwrap();
    io(&mut e, OpKind::Flush, 0, &mut []).unwrap();
    drop(e);
    drop(disk);
    check_clean(&v2);
}

#[test]
fn compressed_clusters_are_readable() {
    if !have_qemu_img() {
        return;
    }
    let d = Dir::new("zlib");
    let raw = d.join("src.raw");
    qemu_img(&["create", "-q", "-f", "raw", raw.to_str().unwrap(), "1M"]);
    qemu_io(&raw, "raw", "write -P 0x5a 0 192k");
    qemu_io(&raw, "raw", "write -P 0xa5 300k 7k");
    let img = d.join("c.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zlib",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let disk = Arc::new(Disk::open_qcow2(&img, &Qcow2Options { readonly: true, ..Default::default() }).unwrap());
    let mut e = Engine::new(Arc::clone(&disk), EngineKind::Auto, 4).unwrap();
    let want = std::fs::read(&raw).unwrap();
    let mut got = vec![0u8; 1 << 20];
    io(&mut e, OpKind::Read, 0, &mut got).unwrap();
    assert!(got == want, "compressed image reads back as its source");
    // Read-only: writes refused.
    assert!(matches!(io(&mut e, OpKind::Write, 0, &mut vec![0u8; 512]), Err(crate::BackendError::ReadOnly)));
}

/// Hostile images (metadata pointing past the end, at the header, sizes out of range,
/// truncation): every open is a clean error or a usable image, every op a clean result,
/// never a panic, and the header survives writes through an L1 entry that points at it.
#[test]
fn malformed_images_are_errors_never_crashes() {
    if !have_qemu_img() {
        return;
    }
    let d = Dir::new("bad");
    let good = d.join("good.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", good.to_str().unwrap(), "4M"]);
    qemu_io(&good, "qcow2", "write -P 0x44 0 256k");
    let bytes = std::fs::read(&good).unwrap();
    let be64 = |o: usize| u64::from_be_bytes(bytes[o..o + 8].try_into().unwrap());
    let (l1, reftable) = (be64(40) as usize, be64(48) as usize);
    let l2 = (be64(l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let past_end = (bytes.len() as u64 + (1 << 30)) | (1 << 63);
    // (name, byte patches, truncate to)
    type Case = (&'static str, Vec<(usize, Vec<u8>)>, Option<usize>);
    let cases: Vec<Case> = vec![
        ("size-huge", vec![(24, u64::MAX.to_be_bytes().to_vec())], None),
        ("l1-size-huge", vec![(36, u32::MAX.to_be_bytes().to_vec())], None),
        ("l1-offset-unaligned", vec![(40, 12345u64.to_be_bytes().to_vec())], None),
        ("l1-past-end", vec![(l1, past_end.to_be_bytes().to_vec())], None),
        ("l1-at-header", vec![(l1, (1u64 << 63).to_be_bytes().to_vec())], None),
        ("l2-past-end", vec![(l2, past_end.to_be_bytes().to_vec())], None),
        ("l2-at-header", vec![(l2, (1u64 << 63).to_be_bytes().to_vec())], None),
        ("reftable-past-end", vec![(reftable, (bytes.len() as u64 + (1 << 30)).to_be_bytes().to_vec())], None),
        ("reftable-offset-huge", vec![(48, 0xffff_ffff_ffff_0000u64.to_be_bytes().to_vec())], None),
        (
            "backing-name-past-end",
            vec![(8, 1_000_000u64.to_be_bytes().to_vec()), (16, 100u32.to_be_bytes().to_vec())],
            None,
        ),
        ("truncated-to-header", vec![], Some(512)),
        ("truncated-before-l2", vec![], Some(l2)),
    ];
    for (name, patches, truncate) in cases {
        let p = d.join(&format!("{name}.qcow2"));
        let mut b = bytes.clone();
        for (off, data) in &patches {
            b[*off..*off + data.len()].copy_from_slice(data);
        }
        if let Some(t) = truncate {
            b.truncate(t);
        }
        std::fs::write(&p, &b).unwrap();
        let disk = match Disk::open_qcow2(&p, &Qcow2Options::default()) {
            Ok(d) => Arc::new(d),
            Err(e) => {
                eprintln!("{name}: refused at open: {e}");
                continue;
            }
        };
        let mut e = Engine::new(Arc::clone(&disk), EngineKind::Auto, 4).unwrap();
        let mut buf = vec![0u8; 65536];
        let r = io(&mut e, OpKind::Read, 0, &mut buf);
        let w = io(&mut e, OpKind::Write, 0, &mut vec![0x77u8; 65536]);
        let f = io(&mut e, OpKind::Flush, 0, &mut []);
        eprintln!("{name}: opened; read {:?}, write {:?}, flush {:?}", r.map(|_| ()), w.map(|_| ()), f.map(|_| ()));
        drop(e);
        drop(disk);
        let after = std::fs::read(&p).unwrap();
        assert_eq!(&after[..4], &QCOW2_MAGIC, "{name}: the header was overwritten");
        assert!(
            after[..72] == b[..72] || name.starts_with("size") || patches.iter().any(|(o, _)| *o < 72),
            "{name}: header fields changed"
        );
    }
}

fn virtual_size(image: &Path) -> u64 {
    let out = qemu_img(&["info", "--output=json", "-f", "qcow2", "-U", image.to_str().unwrap()]);
    let key = "\"virtual-size\":";
    // The last one is the image's own (its protocol child's, the file length, comes first).
    let at = out.rfind(key).unwrap_or_else(|| panic!("no virtual size in {out}"));
    out[at + key.len()..].trim_start().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

/// What a crash would leave of an image that is still open: its file as it is now.
fn crash_copy(image: &Path, name: &str) -> PathBuf {
    let copy = image.with_file_name(name);
    std::fs::copy(image, &copy).unwrap();
    copy
}

#[test]
fn a_qcow2_image_grows_online_durably_and_refuses_to_shrink() {
    if !have_qemu_img() {
        return;
    }
    let d = Dir::new("grow");
    let img = d.join("g.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"]);
    let disk = Arc::new(Disk::open_qcow2(&img, &Qcow2Options::default()).unwrap());
    let mut e = Engine::new(Arc::clone(&disk), EngineKind::Auto, 4).unwrap();
    let mut head = pattern(64 << 10, 1);
    io(&mut e, OpKind::Write, 0, &mut head).unwrap();
    let r = io(&mut e, OpKind::Write, 2 << 20, &mut pattern(4096, 2));
    assert!(matches!(r, Err(crate::BackendError::OutOfRange { .. })), "{r:?}");

    // 3 GiB: the L1 table (one entry covers 512 MiB) moves to a bigger cluster and the old
    // one is freed.
    let new = 3u64 << 30;
    assert_eq!(disk.resize(new).unwrap(), new);
    assert_eq!((disk.size(), disk.qcow2().unwrap().0.size()), (new, new));
    assert!(disk.describe().contains(&new.to_string()), "{}", disk.describe());
    // On disk already (the resize flushed): a crash now keeps the new size, consistently.
    let crashed = crash_copy(&img, "crash1.qcow2");
    check_clean(&crashed);
    assert_eq!(virtual_size(&crashed), new);

    // The new end takes allocating writes (which may reuse the old L1 cluster: the new
    // header must be on disk first), and the data before the resize is intact.
    let mut tail = vec![0x5au8; 64 << 10];
    io(&mut e, OpKind::Write, new - (64 << 10), &mut tail).unwrap();
    let mut mid = pattern(256 << 10, 3);
    io(&mut e, OpKind::Write, 1 << 30, &mut mid).unwrap();
    let mut back = vec![0u8; 64 << 10];
    io(&mut e, OpKind::Read, new - (64 << 10), &mut back).unwrap();
    assert_eq!(back, tail);
    io(&mut e, OpKind::Read, 0, &mut back).unwrap();
    assert_eq!(back, head);
    let mut zeros = vec![0xffu8; 64 << 10];
    io(&mut e, OpKind::Read, 2 << 20, &mut zeros).unwrap();
    assert!(zeros.iter().all(|&b| b == 0), "the new range reads as zeros");
    io(&mut e, OpKind::Flush, 0, &mut []).unwrap();
    check_clean(&crash_copy(&img, "crash2.qcow2"));

    // Shrinking: refused, nothing changed.
    let r = disk.resize(1 << 20);
    assert!(matches!(r, Err(crate::BackendError::Unsupported(_))), "{r:?}");
    assert!(r.unwrap_err().to_string().contains("shrinking a qcow2 image"));
    assert_eq!(disk.size(), new);
    let r = disk.resize(new + 1000);
    assert!(matches!(r, Err(crate::BackendError::BadSize { .. })), "{r:?}");

    drop(e);
    drop(disk);
    check_clean(&img);
    assert_eq!(virtual_size(&img), new);
    qemu_io(&img, "qcow2", &format!("read -P 0x5a {} 64k", new - (64 << 10)));
    qemu_io(&img, "qcow2", "read -P 0 2M 1M");
    let ro = Disk::open_qcow2(&img, &Qcow2Options { readonly: true, ..Qcow2Options::default() }).unwrap();
    assert!(matches!(ro.resize(new * 2), Err(crate::BackendError::ReadOnly)));
}

#[test]
fn growing_an_overlay_does_not_show_its_longer_backing_file() {
    if !have_qemu_img() {
        return;
    }
    let d = Dir::new("grow-backing");
    let base = d.join("base.raw");
    let top = d.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "4M"]);
    qemu_io(&base, "raw", "write -P 0x11 0 4M");
    // The overlay is shorter than its backing file (as after `qemu-img resize --shrink`).
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top.to_str().unwrap(), "2M"]);
    let disk = Arc::new(Disk::open_qcow2(&top, &Qcow2Options::default()).unwrap());
    let mut e = Engine::new(Arc::clone(&disk), EngineKind::Auto, 4).unwrap();
    disk.resize(6 << 20).unwrap();
    let mut buf = vec![0xffu8; 4 << 20];
    io(&mut e, OpKind::Read, 2 << 20, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "2M..6M reads as zeros, not the backing file's 0x11");
    let mut first = vec![0u8; 2 << 20];
    io(&mut e, OpKind::Read, 0, &mut first).unwrap();
    assert!(first.iter().all(|&b| b == 0x11), "below the old end the backing file still shows");
    drop(e);
    drop(disk);
    check_clean(&top);
    qemu_io(&top, "qcow2", "read -P 0 2M 4M");
    qemu_io(&top, "qcow2", "read -P 0x11 0 2M");
}
