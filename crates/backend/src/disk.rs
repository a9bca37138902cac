//! [`Disk`]: an opened backend (raw file, block device, or null), shared by
//! all worker threads through `Arc<Disk>`.
//!
//! A `Disk` is immutable after opening except for its size (see
//! [Resizing](#resizing)) and one flag: the *sticky flush failure*. When `fdatasync` fails, Linux may already have dropped the
//! dirty pages and cleared the error, so a *later* `fdatasync` can succeed
//! even though data was lost. To never lie to the guest about durability,
//! once one flush fails every later flush on this disk fails too, whichever
//! engine runs it.
//!
//! ## Flushes: one open file description per engine
//!
//! Linux reports a write-back error once per *open file description* (`errseq`): the
//! first `fdatasync` on a description that sees the error consumes it, and the next one
//! on the same description succeeds. If every worker flushed through the main fd, a
//! FLUSH on one worker could succeed because another worker's `fdatasync` just took the
//! error and had not yet marked the disk (its completion not yet reaped). So each
//! [`Engine`](crate::Engine) flushes through its own description, a [`Flusher`]: every
//! description open when a write-back error happens sees that error. The descriptions
//! are opened ahead of I/O ([`Disk::reserve_flushers`], once per worker thread at
//! startup) and reused by the worker's next engine, so none misses an error that happened
//! before it was opened.
//!
//! ## Resizing
//!
//! [`Disk::resize`] changes the size of a running disk (online resize): a raw file is
//! extended or truncated (`ftruncate`: the new range is a hole), a qcow2 image grows
//! through the format (shrinking it is refused), an RBD image is resized in the cluster
//! (`rbd_resize`), the null backend takes the number. A block device cannot be resized
//! from here: its size is whatever the device says, read again (`BLKGETSIZE64`) and the
//! number asked for ignored ([`Disk::resize_target`] tells a caller in advance). The size
//! is an atomic that every engine reads for its bounds check. Growing is safe under I/O
//! (the size is raised after the space exists); the caller of a shrink must lower its own
//! bound first and wait for the I/O in flight past the new end (the vhost-user device
//! drains its workers), or a write in flight could extend a truncated file again.
//!
//! ## O_DIRECT
//!
//! With `direct` (the vblk default) the main fd is opened with `O_DIRECT`:
//! the guest's pages are DMA'd to the device without going through the host
//! page cache. O_DIRECT imposes alignment rules, which we read from
//! `statx(STATX_DIOALIGN)` (falling back to 512 bytes):
//!
//! * buffer addresses must be aligned to the *memory* alignment,
//! * file offsets and lengths must be aligned to the *offset* alignment.
//!
//! Requests that break the rules are rare; `bounce.rs` routes them either
//! through an aligned bounce buffer or through a second, buffered fd
//! (`buffered`) opened on the same file.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::inject::{FaultSpec, Faults};
use crate::qcow2::service::Service;
use crate::qcow2::{FormatError, Qcow2Image, Qcow2Options};
use crate::rbd::{RbdImage, RbdOptions, RbdSpec};
use crate::sys;
use crate::BackendError;

/// How to open a [`Disk`].
#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// Open with `O_RDONLY`; every write-like op fails with
    /// [`BackendError::ReadOnly`].
    pub readonly: bool,
    /// Bypass the host page cache with `O_DIRECT` (falls back to buffered
    /// I/O, with a warning, where the filesystem does not support it).
    pub direct: bool,
    /// If the path does not exist, create a sparse file of this many bytes
    /// (mode 0600). An existing file is used as it is.
    pub create_size: Option<u64>,
}

impl Default for DiskOptions {
    /// Read-write, `O_DIRECT`, no creation.
    fn default() -> Self {
        DiskOptions { readonly: false, direct: true, create_size: None }
    }
}

/// Which of a file-backed disk's two descriptors to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FdChoice {
    /// The main fd (`O_DIRECT` when the disk is direct).
    Main,
    /// The buffered fd: same file, no `O_DIRECT`. Equals the main fd when the
    /// disk is not direct.
    Buffered,
    /// A file of a qcow2 image's chain ([`crate::qcow2::Extent::Data`]), which the disk
    /// keeps open as long as it lives.
    Image(std::os::fd::RawFd),
}

/// What actually stores the data.
#[derive(Debug)]
enum Backing {
    /// Nothing: reads leave buffers untouched, writes vanish.
    Null,
    /// A qcow2 image (and its backing chain), served by its service threads.
    Qcow2 { image: Arc<Qcow2Image>, service: Service },
    /// A Ceph RBD image, one librbd handle shared by the engines.
    Rbd(Arc<RbdImage>),
    /// A raw image file or a block device.
    File {
        /// Main descriptor.
        file: File,
        /// Second, non-`O_DIRECT` descriptor (only when `file` is `O_DIRECT`).
        buffered: Option<File>,
    },
}

/// An opened block backend. See the module docs.
#[derive(Debug)]
pub struct Disk {
    backing: Backing,
    path: Option<PathBuf>,
    /// Size in bytes; changes only through [`Disk::resize`].
    size: AtomicU64,
    /// Serialises resizes.
    resizing: Mutex<()>,
    readonly: bool,
    direct: bool,
    block_device: bool,
    logical_block_size: u32,
    /// O_DIRECT buffer address alignment (1 when not direct).
    dio_mem_align: u32,
    /// O_DIRECT offset/length alignment (1 when not direct).
    dio_offset_align: u32,
    flush_failed: AtomicBool,
    /// The file is in memory (tmpfs, ramfs, hugetlbfs): see [`Disk::is_memory_backed`].
    memory_backed: bool,
    /// Injected faults (testing aid), applied by every engine on this disk.
    faults: Option<Faults>,
    /// Open file descriptions for flushing, not in use by an engine (see the module docs).
    flushers: Mutex<Vec<File>>,
}

/// An engine's own open file description of the disk, for `fdatasync` (see the module
/// docs). Goes back to its disk's pool when dropped.
#[derive(Debug)]
pub struct Flusher {
    file: Option<File>,
    disk: Arc<Disk>,
}

impl Flusher {
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        // `file` is Some until drop.
        self.file.as_ref().map(File::as_fd).unwrap_or_else(|| unreachable!("flusher used after drop"))
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        if let (Some(f), Ok(mut pool)) = (self.file.take(), self.disk.flushers.lock()) {
            pool.push(f);
        }
    }
}

impl Disk {
    /// Open a raw image file or a block device.
    ///
    /// With `opts.create_size`, a missing file is first created sparse. With
    /// `opts.direct`, `O_DIRECT` is tried and silently downgraded (with a
    /// warning) to buffered I/O when the filesystem refuses it.
    pub fn open(path: &Path, opts: &DiskOptions) -> Result<Disk, BackendError> {
        let open_err = |source: io::Error| BackendError::Open { path: path.to_path_buf(), source };
        if let Some(size) = opts.create_size {
            create_sparse(path, size, opts.readonly).map_err(open_err)?;
        }

        let mut direct = opts.direct;
        let mut file = match open_file(path, opts.readonly, direct) {
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(path = %path.display(), "O_DIRECT not supported here, falling back to buffered I/O");
                direct = false;
                open_file(path, opts.readonly, false)
            }
            other => other,
        }
        .map_err(open_err)?;

        let meta = file.metadata().map_err(open_err)?;
        let block_device = meta.file_type().is_block_device();
        let (size, mut lbs) = if block_device {
            let fd = file.as_fd();
            let size = sys::blk_size(fd).map_err(open_err)?;
            (size, sys::blk_logical_block_size(fd).map_err(open_err)?)
        } else if meta.file_type().is_file() {
            (meta.len(), 512)
        } else {
            return Err(open_err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file or block device")));
        };
        lbs = lbs.max(512);

        let (mut mem_align, mut off_align) = (1, 1);
        if direct {
            match sys::dio_alignment(file.as_fd()) {
                Some((_, 0)) if !block_device => {
                    // The filesystem says "no O_DIRECT for this file", even
                    // though open() accepted the flag: I/O would fail.
                    tracing::warn!(path = %path.display(), "filesystem reports no O_DIRECT support, falling back to buffered I/O");
                    direct = false;
                    file = open_file(path, opts.readonly, false).map_err(open_err)?;
                }
                Some((mem, off)) => {
                    (mem_align, off_align) = (mem.max(1), off.max(lbs));
                }
                None => (mem_align, off_align) = (512, lbs),
            }
        }
        if !direct {
            (mem_align, off_align) = (1, 1);
        } else if !block_device {
            // Files: report a block size the guest can use without bouncing.
            lbs = lbs.max(off_align);
        }

        let buffered = if direct {
            let b = open_file(path, opts.readonly, false).map_err(open_err)?;
            let bm = b.metadata().map_err(open_err)?;
            if (bm.dev(), bm.ino(), bm.rdev()) != (meta.dev(), meta.ino(), meta.rdev()) {
                return Err(open_err(io::Error::other("file was replaced while opening it")));
            }
            Some(b)
        } else {
            None
        };

        let memory_backed = !block_device && sys::memory_backed(file.as_fd());
        Ok(Disk {
            backing: Backing::File { file, buffered },
            path: Some(path.to_path_buf()),
            size: AtomicU64::new(size),
            resizing: Mutex::new(()),
            readonly: opts.readonly,
            direct,
            block_device,
            logical_block_size: lbs,
            dio_mem_align: mem_align,
            dio_offset_align: off_align,
            flush_failed: AtomicBool::new(false),
            memory_backed,
            faults: None,
            flushers: Mutex::new(Vec::new()),
        })
    }

    /// A null backend of `size` bytes: reads and writes complete at once
    /// with their full length and touch no data; flush always succeeds.
    /// Open a qcow2 image and its backing chain (see [`crate::qcow2`]).
    pub fn open_qcow2(path: &Path, opts: &Qcow2Options) -> Result<Disk, FormatError> {
        let image = Arc::new(Qcow2Image::open(path, opts)?);
        let service =
            Service::start(Arc::clone(&image)).map_err(|source| FormatError::Io { path: path.to_owned(), source })?;
        Ok(Disk {
            path: Some(path.to_owned()),
            size: AtomicU64::new(image.size()),
            readonly: opts.readonly,
            backing: Backing::Qcow2 { image, service },
            ..Disk::null(0)
        })
    }

    /// Open a Ceph RBD image (see [`crate::rbd`]). Connecting waits for the cluster for at
    /// most `opts.timeout`.
    pub fn open_rbd(spec: &RbdSpec, opts: &RbdOptions) -> Result<Disk, crate::RbdError> {
        let (image, size) = RbdImage::open(spec, opts)?;
        Ok(Disk {
            size: AtomicU64::new(size),
            readonly: image.readonly(),
            backing: Backing::Rbd(Arc::new(image)),
            ..Disk::null(0)
        })
    }

    /// Is this a Ceph RBD image?
    pub fn is_rbd(&self) -> bool {
        self.rbd().is_some()
    }

    /// The RBD image, if this disk is one.
    pub(crate) fn rbd(&self) -> Option<&Arc<RbdImage>> {
        match &self.backing {
            Backing::Rbd(image) => Some(image),
            _ => None,
        }
    }

    /// The qcow2 image and its service, if this disk is one.
    pub(crate) fn qcow2(&self) -> Option<(&Arc<Qcow2Image>, &Service)> {
        match &self.backing {
            Backing::Qcow2 { image, service } => Some((image, service)),
            _ => None,
        }
    }

    pub fn null(size: u64) -> Disk {
        Disk {
            backing: Backing::Null,
            path: None,
            size: AtomicU64::new(size),
            resizing: Mutex::new(()),
            readonly: false,
            direct: false,
            block_device: false,
            logical_block_size: 512,
            dio_mem_align: 1,
            dio_offset_align: 1,
            flush_failed: AtomicBool::new(false),
            memory_backed: false,
            faults: None,
            flushers: Mutex::new(Vec::new()),
        }
    }

    /// Inject the faults of `spec` into every op on this disk, whichever engine runs it
    /// (see `inject.rs`). A testing aid: `vblk serve --inject`.
    pub fn with_faults(mut self, spec: FaultSpec) -> Disk {
        self.faults = Some(Faults::new(spec));
        self
    }

    /// The injected faults in force, if any.
    pub fn faults(&self) -> Option<&Faults> {
        self.faults.as_ref()
    }

    /// Wrap an arbitrary already-open file (tests use a pipe to get a real
    /// failing `fdatasync`).
    #[cfg(test)]
    pub(crate) fn from_file_for_test(file: File, size: u64) -> Disk {
        Disk { backing: Backing::File { file, buffered: None }, path: None, ..Disk::null(size) }
    }

    /// Pretend the filesystem demands these O_DIRECT alignments (tests use
    /// it to exercise the buffered-fd and bounce routes deterministically).
    #[cfg(test)]
    pub(crate) fn set_dio_align_for_test(&mut self, mem: u32, off: u32) {
        (self.dio_mem_align, self.dio_offset_align) = (mem, off);
    }

    /// Size in bytes (read on every op's bounds check: it changes with [`Disk::resize`]).
    pub fn size(&self) -> u64 {
        // Acquire: whoever sees a new size also sees the space behind it (the resize
        // stores it after growing the file or image). A plain load on x86-64.
        self.size.load(Ordering::Acquire)
    }

    /// The size a [`Disk::resize`] to `requested` bytes would give the disk, checked: a
    /// read-only disk cannot be resized, and a size must be a non-zero multiple of 512 and
    /// of the logical block size. For a block device it is the device's size now
    /// (`BLKGETSIZE64`), whatever was asked: a block device is resized by whoever owns it
    /// (`lvextend`, `losetup -c`), and vblk only takes the new size.
    pub fn resize_target(&self, requested: u64) -> Result<u64, BackendError> {
        if self.readonly {
            return Err(BackendError::ReadOnly);
        }
        if let (Backing::File { file, .. }, true) = (&self.backing, self.block_device) {
            return sys::blk_size(file.as_fd()).map_err(|source| BackendError::Io { op: "BLKGETSIZE64", source });
        }
        let align = self.logical_block_size.max(512);
        if requested == 0 || !requested.is_multiple_of(align as u64) {
            return Err(BackendError::BadSize { size: requested, align });
        }
        Ok(requested)
    }

    /// Change the disk's size to `new_size` bytes and return the size it has now (see
    /// [Resizing](#resizing)): raw file `ftruncate` (sparse), qcow2 grow (a shrink is
    /// [`BackendError::Unsupported`]), RBD `rbd_resize`, null: the number. A block device
    /// ignores `new_size` and takes the device's size ([`Disk::resize_target`]). Checks as
    /// [`Disk::resize_target`]. Not atomic with I/O: the caller orders it (module docs).
    pub fn resize(&self, new_size: u64) -> Result<u64, BackendError> {
        let _one_at_a_time = self.resizing.lock().unwrap_or_else(|p| p.into_inner());
        let new_size = self.resize_target(new_size)?;
        let old = self.size();
        match &self.backing {
            Backing::Null => {}
            Backing::File { .. } if self.block_device => {}
            Backing::File { file, .. } => {
                file.set_len(new_size).map_err(|source| BackendError::Io { op: "resize (ftruncate)", source })?
            }
            Backing::Qcow2 { image, .. } => {
                if new_size < old {
                    return Err(BackendError::Unsupported(
                        "shrinking a qcow2 image (imago shrinks only with exclusive access to the image)",
                    ));
                }
                image.grow(new_size)?;
            }
            Backing::Rbd(image) => image.resize(new_size)?,
        }
        self.size.store(new_size, Ordering::Release);
        if new_size != old {
            tracing::info!(disk = %self.describe(), old, new = new_size, "disk resized");
        }
        Ok(new_size)
    }

    /// Whether the disk was opened read-only.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Whether the main fd uses `O_DIRECT` (false after a fallback).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The block size to advertise to the guest: the device's logical block
    /// size for block devices; 512 for files (or the O_DIRECT offset
    /// alignment when larger).
    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    /// Whether the backend is a block device (discard/write-zeroes then use
    /// `BLKDISCARD`/`BLKZEROOUT`).
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Whether the image lives in memory (tmpfs, ramfs, hugetlbfs). io_uring cannot do
    /// non-blocking I/O on such files (no `FMODE_NOWAIT`) and hands every op to a kernel
    /// worker thread; doing the copy in the calling thread is cheaper (see
    /// [`EngineKind::Auto`](crate::EngineKind::Auto)).
    pub fn is_memory_backed(&self) -> bool {
        self.memory_backed
    }

    /// Whether this is the null backend.
    pub fn is_null(&self) -> bool {
        matches!(self.backing, Backing::Null)
    }

    /// The path the disk was opened from (`None` for null).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Whether a flush has failed on this disk (see the module docs); once
    /// true, it stays true.
    pub fn flush_failed(&self) -> bool {
        self.flush_failed.load(Ordering::Acquire)
            || self.qcow2().is_some_and(|(i, _)| i.flush_failed())
            || self.rbd().is_some_and(|i| i.flush_failed())
    }

    /// Record a failed flush: every later flush on this disk fails.
    pub(crate) fn mark_flush_failed(&self) {
        if !self.flush_failed.swap(true, Ordering::AcqRel) {
            tracing::error!(disk = %self.describe(), "flush failed; all further flushes will report failure");
        }
    }

    /// `fdatasync` now (used at shutdown). Honours and updates the sticky
    /// flush-failure flag. A no-op for the null backend.
    pub fn flush_sync(&self) -> Result<(), BackendError> {
        if let Some((image, _)) = self.qcow2() {
            return crate::qcow2::service::flush(image);
        }
        if let Some(image) = self.rbd() {
            return image.flush_blocking();
        }
        let Ok(fd) = self.fd(FdChoice::Main) else {
            return Ok(());
        };
        crate::sync::flush(self, fd).map(drop)
    }

    /// One human-readable line, e.g. `vblk.img (raw file, 1 GiB, O_DIRECT)`.
    pub fn describe(&self) -> String {
        let faults = if self.faults.is_some() { ", faults injected" } else { "" };
        if let Some((image, _)) = self.qcow2() {
            return format!("{}{faults}", image.describe());
        }
        if let Some(image) = self.rbd() {
            let ro = if self.readonly { ", read-only" } else { "" };
            return format!("{} (Ceph RBD, {}{ro}{faults})", image.spec(), human_size(self.size()));
        }
        let mut s = match &self.path {
            Some(p) => p.display().to_string(),
            None => "null".to_string(),
        };
        let kind = if self.is_null() {
            "null"
        } else if self.block_device {
            "block device"
        } else {
            "raw file"
        };
        let _ = write!(s, " ({kind}, {}", human_size(self.size()));
        if !self.is_null() {
            if self.logical_block_size != 512 {
                let _ = write!(s, ", {}-byte blocks", self.logical_block_size);
            }
            s.push_str(if self.direct { ", O_DIRECT" } else { ", buffered" });
            if self.memory_backed {
                s.push_str(", in memory");
            }
        }
        if self.readonly {
            s.push_str(", read-only");
        }
        if self.faults.is_some() {
            s.push_str(", faults injected");
        }
        s.push(')');
        s
    }

    /// One of the file descriptors; `EBADF` for the null backend.
    pub(crate) fn fd(&self, which: FdChoice) -> Result<BorrowedFd<'_>, BackendError> {
        match (&self.backing, which) {
            (Backing::Null | Backing::Qcow2 { .. } | Backing::Rbd(_), _) | (_, FdChoice::Image(_)) => {
                Err(BackendError::errno("fd", libc::EBADF))
            }
            (Backing::File { file, .. }, FdChoice::Main) => Ok(file.as_fd()),
            (Backing::File { file, buffered }, FdChoice::Buffered) => Ok(buffered.as_ref().unwrap_or(file).as_fd()),
        }
    }

    /// Open `n` flush descriptions ahead of I/O (one per worker thread), so that every
    /// engine's flushes see every write-back error (module docs). A no-op on the null
    /// backend and for descriptions already open.
    pub fn reserve_flushers(&self, n: usize) -> Result<(), BackendError> {
        let mut pool = self.flushers.lock().map_err(|_| BackendError::InvalidRequest("flusher pool poisoned"))?;
        while pool.len() < n {
            match self.open_flusher()? {
                Some(f) => pool.push(f),
                None => break,
            }
        }
        Ok(())
    }

    /// An open file description for an engine's flushes: a reserved one, or (with a debug
    /// note) a new one. `None` on the null backend.
    pub(crate) fn flusher(self: &Arc<Self>) -> Result<Option<Flusher>, BackendError> {
        let reserved = self.flushers.lock().ok().and_then(|mut p| p.pop());
        let file = match reserved {
            Some(f) => f,
            None => match self.open_flusher()? {
                Some(f) => {
                    tracing::debug!(disk = %self.describe(), "flush description opened on demand");
                    f
                }
                None => return Ok(None),
            },
        };
        Ok(Some(Flusher { file: Some(file), disk: Arc::clone(self) }))
    }

    /// A new open file description of the same file (through `/proc/self/fd`, so a
    /// renamed or replaced path does not matter).
    fn open_flusher(&self) -> Result<Option<File>, BackendError> {
        let Backing::File { file, .. } = &self.backing else { return Ok(None) };
        use std::os::fd::AsRawFd;
        let link = format!("/proc/self/fd/{}", file.as_raw_fd());
        let f = OpenOptions::new()
            .read(true)
            .write(!self.readonly)
            .custom_flags(libc::O_CLOEXEC)
            .open(&link)
            .map_err(|source| BackendError::Io { op: "open a flush descriptor", source })?;
        Ok(Some(f))
    }

    /// O_DIRECT buffer address alignment (1 when not direct).
    pub(crate) fn dio_mem_align(&self) -> u32 {
        self.dio_mem_align
    }

    /// O_DIRECT offset and length alignment (1 when not direct).
    pub(crate) fn dio_offset_align(&self) -> u32 {
        self.dio_offset_align
    }
}

/// Open `path` for disk I/O.
fn open_file(path: &Path, readonly: bool, direct: bool) -> io::Result<File> {
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    OpenOptions::new().read(true).write(!readonly).custom_flags(flags).open(path)
}

/// Create a sparse file of `size` bytes unless `path` already exists.
fn create_sparse(path: &Path, size: u64, readonly: bool) -> io::Result<()> {
    if readonly {
        // Nothing to create: an absent file will fail to open below.
        return Ok(());
    }
    match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(f) => {
            if let Err(e) = f.set_len(size) {
                drop(f);
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
            tracing::info!(path = %path.display(), size, "created sparse disk image");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// `1073741824` → `"1 GiB"`, `1610612736` → `"1.5 GiB"`.
pub(crate) fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    let scale = 1u64 << (10 * unit);
    if bytes.is_multiple_of(scale) {
        format!("{} {}", bytes / scale, UNITS[unit])
    } else {
        format!("{:.1} {}", bytes as f64 / scale as f64, UNITS[unit])
    }
}
