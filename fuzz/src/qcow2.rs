//! `qcow2`: qcow2 images with hostile metadata. A small valid image (4 KiB clusters, data in
//! a few clusters) is made once; each input patches any of its bytes (header, L1, L2,
//! refcount table and blocks, data), may truncate it, then opens it the way `vblk serve
//! --format qcow2` does and runs reads, writes, write-zeroes, discards and flushes through a
//! real engine.
//!
//! Checked: never a crash, a hang or a memory error (libFuzzer, ASan); an image is refused
//! with an error or served, every op completes with a result; a file outside the image's
//! directory is never opened (the gate; backing names are fuzzed too).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use vblk_backend::qcow2::{CreateOptions, Qcow2Image, Qcow2Options};
use vblk_backend::{Completion, Disk, Engine, EngineKind, IoOp, OpKind};

const SIZE: u64 = 1 << 20;

#[derive(Debug, arbitrary::Arbitrary)]
pub enum Op {
    Read { sector: u16, sectors: u8 },
    Write { sector: u16, sectors: u8, byte: u8 },
    Zeroes { sector: u16, sectors: u8 },
    Discard { sector: u16, sectors: u8 },
    Flush,
}

#[derive(Debug, arbitrary::Arbitrary)]
pub struct Qcow2Input {
    /// (offset into the image, byte): any byte of the image.
    pub patches: Vec<(u16, u8)>,
    /// Keep only this many bytes.
    pub truncate: Option<u16>,
    pub readonly: bool,
    pub ops: Vec<Op>,
}

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("vblk-fuzz-qcow2-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    })
}

/// The valid image every input starts from.
fn template() -> &'static [u8] {
    static IMG: OnceLock<Vec<u8>> = OnceLock::new();
    IMG.get_or_init(|| {
        let path = dir().join("template.qcow2");
        let _ = std::fs::remove_file(&path);
        Qcow2Image::create(&path, &CreateOptions { size: SIZE, backing: None, cluster_size: 4096 }).expect("create");
        {
            let disk = Arc::new(Disk::open_qcow2(&path, &Qcow2Options::default()).expect("open template"));
            let mut e = Engine::new(Arc::clone(&disk), EngineKind::Auto, 4).expect("engine");
            for (i, off) in [0u64, 8192, 300 << 10, 900 << 10].into_iter().enumerate() {
                let mut buf = vec![i as u8 + 1; 8192];
                run(&mut e, OpKind::Write, off, &mut buf);
            }
            run(&mut e, OpKind::Flush, 0, &mut []);
        }
        std::fs::read(&path).expect("read template")
    })
}

fn run(e: &mut Engine, kind: OpKind, offset: u64, buf: &mut [u8]) -> bool {
    let iovs = if matches!(kind, OpKind::Read | OpKind::Write) {
        vec![libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }]
    } else {
        Vec::new()
    };
    let op = IoOp { kind, offset, len: buf.len() as u64, iovs, fua: false, tag: 1 };
    // SAFETY: `buf` outlives the op: its completion is waited for below.
    if unsafe { e.push(op) }.is_err() {
        return false;
    }
    let _ = e.submit();
    let mut done: Vec<Completion> = Vec::new();
    while done.is_empty() {
        e.wait(&mut done).expect("wait");
    }
    done[0].result.is_ok()
}

/// imago panics on some malformed metadata (e.g. a short feature-name table entry).
/// `vblk serve` contains those panics (`catch_unwind`: an open error, or IOERR for the
/// request), so here they are what the product does, not a finding; a panic anywhere else
/// still aborts, as libFuzzer's own hook would.
fn contain_imago_panics() {
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        std::panic::set_hook(Box::new(|info| {
            if info.location().is_some_and(|l| l.file().contains("/imago-")) {
                return;
            }
            eprintln!("{info}");
            std::process::abort();
        }));
    });
}

pub fn run_input(input: &Qcow2Input) {
    contain_imago_panics();
    let mut img = template().to_vec();
    for &(off, b) in &input.patches {
        let i = off as usize % img.len();
        img[i] = b;
    }
    if let Some(t) = input.truncate {
        img.truncate(t as usize);
    }
    let path = dir().join("case.qcow2");
    std::fs::write(&path, &img).expect("write case");
    let opts = Qcow2Options { readonly: input.readonly, backing_allowed: Vec::new() };
    let Ok(disk) = Disk::open_qcow2(&path, &opts) else { return };
    let disk = Arc::new(disk);
    let Ok(mut e) = Engine::new(Arc::clone(&disk), EngineKind::Auto, 4) else { return };
    let size = disk.size();
    for op in input.ops.iter().take(16) {
        let range = |sector: u16, sectors: u8| {
            let off = (sector as u64 * 512) % size.max(512);
            let len = ((sectors as u64 % 64) + 1) * 512;
            (off, len.min(size.saturating_sub(off)).max(0))
        };
        match *op {
            Op::Read { sector, sectors } => {
                let (off, len) = range(sector, sectors);
                let mut b = vec![0u8; len as usize];
                run(&mut e, OpKind::Read, off, &mut b);
            }
            Op::Write { sector, sectors, byte } => {
                let (off, len) = range(sector, sectors);
                let mut b = vec![byte; len as usize];
                run(&mut e, OpKind::Write, off, &mut b);
            }
            Op::Zeroes { sector, sectors } => {
                let (off, len) = range(sector, sectors);
                run(&mut e, OpKind::WriteZeroes { unmap: false }, off, &mut vec![0u8; len as usize]);
            }
            Op::Discard { sector, sectors } => {
                let (off, len) = range(sector, sectors);
                run(&mut e, OpKind::Discard, off, &mut vec![0u8; len as usize]);
            }
            Op::Flush => {
                run(&mut e, OpKind::Flush, 0, &mut []);
            }
        }
    }
}
