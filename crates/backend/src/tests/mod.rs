//! Tests against real files in a temporary directory.
//!
//! `mod.rs` holds the helpers; `io.rs` covers reads and writes (engines,
//! O_DIRECT, bounce buffers, short transfers); `ops.rs` covers flush,
//! discard, write-zeroes, read-only, null, and opening; `inject.rs` covers
//! fault injection.

mod inject;
mod io;
mod ops;
mod resize;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::{Completion, Disk, DiskOptions, Engine, EngineKind, IoOp, OpKind};

/// A unique directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        TempDir::new_in(&std::env::temp_dir(), N.fetch_add(1, Ordering::Relaxed))
    }

    fn new_in(base: &Path, n: usize) -> TempDir {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let dir = base.join(format!("vblk-backend-test-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// A temp dir on tmpfs (`/dev/shm`), if there is one.
    pub(crate) fn new_shm() -> Option<TempDir> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let shm = Path::new("/dev/shm");
        shm.is_dir().then(|| TempDir::new_in(shm, N.fetch_add(1, Ordering::Relaxed)))
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test data buffer whose start is page aligned plus `misalign` bytes.
pub(crate) struct TestBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl TestBuf {
    pub(crate) fn new(len: usize, misalign: usize) -> TestBuf {
        let storage = vec![0u8; len + 8192 + misalign];
        let addr = storage.as_ptr() as usize;
        let start = (4096 - addr % 4096) % 4096 + misalign;
        TestBuf { storage, start, len }
    }

    /// A buffer filled with a recognisable pattern derived from `seed`.
    pub(crate) fn pattern(len: usize, misalign: usize, seed: u8) -> TestBuf {
        let mut b = TestBuf::new(len, misalign);
        for (i, x) in b.bytes_mut().iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(31).wrapping_add(seed) | 1;
        }
        b
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }

    /// Split the buffer into iovecs of the given sizes (the rest, if any,
    /// becomes a final iovec).
    pub(crate) fn iovecs(&mut self, sizes: &[usize]) -> Vec<libc::iovec> {
        let base = self.bytes_mut().as_mut_ptr();
        let mut pos = 0;
        let mut v = Vec::new();
        for &s in sizes.iter().chain(std::iter::once(&usize::MAX)) {
            let n = s.min(self.len - pos);
            if n == 0 {
                break;
            }
            v.push(libc::iovec { iov_base: base.wrapping_add(pos).cast(), iov_len: n });
            pos += n;
        }
        v
    }
}

/// An op with data buffers.
pub(crate) fn rw_op(kind: OpKind, offset: u64, iovs: Vec<libc::iovec>, fua: bool) -> IoOp {
    let len = iovs.iter().map(|v| v.iov_len as u64).sum();
    IoOp { kind, offset, len, iovs, fua, tag: offset ^ 0x5a5a }
}

/// Push, submit and wait for one op.
pub(crate) fn run(engine: &mut Engine, op: IoOp) -> Completion {
    let tag = op.tag;
    // SAFETY: the tests keep every buffer alive until this function returns,
    // and it returns only after the op's completion was handed back.
    unsafe { engine.push(op) }.expect("engine full");
    engine.submit().expect("submit");
    let mut out = Vec::new();
    while out.is_empty() {
        engine.wait(&mut out).expect("wait");
    }
    assert_eq!(out.len(), 1, "exactly one completion expected");
    let c = out.pop().expect("completion");
    assert_eq!(c.op.tag, tag, "tag handed back untouched");
    assert_eq!(engine.in_flight(), 0);
    c
}

/// Write `data` at `offset`, expecting success.
pub(crate) fn write_ok(engine: &mut Engine, offset: u64, data: &mut TestBuf, sizes: &[usize], fua: bool) {
    let len = data.len as u64;
    let c = run(engine, rw_op(OpKind::Write, offset, data.iovecs(sizes), fua));
    assert_eq!(c.result.expect("write"), len);
}

/// Read `len` bytes at `offset` into a fresh (possibly misaligned) buffer.
pub(crate) fn read_back(engine: &mut Engine, offset: u64, len: usize, misalign: usize, sizes: &[usize]) -> Vec<u8> {
    let mut buf = TestBuf::new(len, misalign);
    let c = run(engine, rw_op(OpKind::Read, offset, buf.iovecs(sizes), false));
    assert_eq!(c.result.expect("read"), len as u64);
    buf.bytes().to_vec()
}

/// The engine kinds to test: sync always, io_uring when the kernel allows
/// (set `VBLK_REQUIRE_URING=1` to make its absence a failure).
pub(crate) fn kinds() -> Vec<EngineKind> {
    let efd = crate::sys::eventfd().expect("eventfd");
    match crate::uring::UringEngine::new(4, efd.as_fd(), None) {
        Ok(_) => vec![EngineKind::Sync, EngineKind::Uring],
        Err(e) => {
            assert!(std::env::var_os("VBLK_REQUIRE_URING").is_none(), "io_uring required but unavailable: {e}");
            eprintln!("NOTE: io_uring unavailable ({e}); testing the sync engine only");
            vec![EngineKind::Sync]
        }
    }
}

/// Create a sparse image of `size` bytes and open it.
pub(crate) fn open_new(dir: &TempDir, name: &str, size: u64, direct: bool) -> Arc<Disk> {
    let opts = DiskOptions { readonly: false, direct, create_size: Some(size) };
    Arc::new(Disk::open(&dir.path(name), &opts).expect("open disk"))
}

/// Run `f` with a loop device (`losetup`) over a new sparse image of `size` bytes in `dir`:
/// `f(device path, image path)`. The device is detached afterwards, also when `f` panics.
/// Needs root and loop devices (the tests that use it are `#[ignore]`).
pub(crate) fn with_loop_device(dir: &TempDir, size: u64, f: impl FnOnce(&str, &Path)) {
    use std::process::Command;
    let img = dir.path("loop.img");
    drop(open_new(dir, "loop.img", size, false));
    let out = Command::new("losetup").args(["-f", "--show"]).arg(&img).output().expect("losetup");
    assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&dev, &img)));
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

pub(crate) fn engine(disk: &Arc<Disk>, kind: EngineKind) -> Engine {
    Engine::new(disk.clone(), kind, 16).expect("engine")
}

#[test]
fn thread_safety_of_public_types() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<Engine>();
    send::<IoOp>();
    send::<Completion>();
    send_sync::<Disk>();
    send_sync::<crate::BackendError>();
}
