//! qcow2 images with backing chains, through [`imago`] (the format library written by
//! QEMU's block-layer maintainer): the format's metadata (L1/L2 tables, refcounts,
//! allocation, copy-on-write from the backing chain, compressed clusters) is imago's; what
//! vblk adds is the policy around it and the way requests reach it.
//!
//! - **What may be opened** ([`gate`]): the top image is the operator's choice; every file
//!   it names (backing files, an external data file), and every file those name, must lie
//!   in an allowed directory (the top image's own, plus `--backing-allowed`), and a chain
//!   may neither loop nor be deeper than [`MAX_CHAIN_DEPTH`]. A name in guest-writable
//!   data (a backing file probed as qcow2) is therefore never a way out.
//! - **What is refused at open** ([`check_header`]): not qcow2, a version other than 2 or 3,
//!   an encrypted image (imago 0.2 does not check `crypt_method` itself), a cluster size
//!   outside 4 KiB..2 MiB; unknown incompatible features, extended L2 entries and images
//!   marked dirty or corrupt are refused by imago.
//! - **How requests run** ([`fast`], [`service`]): a worker looks each read and write up in
//!   imago's cached mapping tables without doing any I/O ([`Qcow2Image::map`]); data that
//!   is already allocated is read and written on the worker's own io_uring, straight from
//!   and into guest memory, like a raw image; unallocated and zero ranges read as zeros.
//!   Everything else (allocating writes, compressed clusters, a table not in the cache,
//!   flush, discard, write-zeroes, FUA) goes to the image's service threads, which run
//!   imago's blocking API (a small fixed pool, not a thread per request) and complete
//!   through the engine's eventfd, exactly like an io_uring completion.
//!
//! - **Crash safety** ([`ordered`]): the image's roots (header, L1 table, refcount table)
//!   reach the disk only at flush, after the tables they point to.
//!
//! - **Freeing space** ([`quiesce`]): a discard (or a write-zeroes that may unmap) frees the
//!   range's clusters on v3 images, so a guest's `fstrim` gives the space back to the host;
//!   it first waits until no worker has I/O in flight to a mapping it looked up, since a
//!   freed cluster may be reused at once. On v2, which has no zero flag, discard does
//!   nothing (it is a hint) and write-zeroes writes zeros.
//!
//! - **Growing** ([`Qcow2Image::grow`], online resize): imago's `resize_grow`, which may
//!   move the L1 table to a bigger one and free the old one. It runs with the image
//!   quiesced (as a discard does), zeroes the new range where a longer backing file would
//!   show through, and flushes before any other service op runs: the new header and L1
//!   table are on disk before the old L1 cluster can be reused. Shrinking is refused:
//!   imago shrinks only through `&mut` access, which a shared image never has.
//!
//! Flush is imago's metadata write-back and an `fdatasync`.

pub(crate) mod fast;
pub mod gate;
mod ordered;
pub(crate) mod quiesce;
pub(crate) mod service;

use std::fs::File as StdFile;
use std::io::{self, Read, Seek};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use imago::format::PreallocateMode;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::{
    FormatAccess, FormatCreateBuilder, FormatDriverBuilder, Mapping, Storage, StorageCreateOptions, StorageOpenOptions,
};
use ordered::{NonBlocking, OrderedFile};

pub use fast::Routes;
pub use gate::{ChainGate, Layer, MAX_CHAIN_DEPTH};

/// imago's metadata caches, per qcow2 layer (fixed in imago 0.2): L2 tables and refcount
/// blocks, one cluster each. Refcount blocks are only loaded to allocate, in the top layer.
pub const L2_CACHE_TABLES: u64 = 128;
pub const REFBLOCK_CACHE_BLOCKS: u64 = 32;

/// The first four bytes of every qcow2 image.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Smallest and largest cluster sizes served (qcow2 allows 512 B..2 MiB; imago and the
/// tests cover 4 KiB..2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 12;
pub const MAX_CLUSTER_BITS: u32 = 21;

/// Why a qcow2 image cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{}: not a qcow2 image (no QFI\\xfb magic)", path.display())]
    NotQcow2 { path: PathBuf },
    #[error("{}: qcow2 version {version} is not supported (2 and 3 are)", path.display())]
    Version { path: PathBuf, version: u32 },
    #[error("{}: encrypted qcow2 images are not supported (crypt_method {method})", path.display())]
    Encrypted { path: PathBuf, method: u32 },
    #[error("{}: cluster size 2^{bits} is outside 4 KiB..2 MiB", path.display())]
    ClusterSize { path: PathBuf, bits: u32 },
    #[error("{}: the header is truncated", path.display())]
    Truncated { path: PathBuf },
    #[error("{} is outside the directories backing files may come from ({allowed}); allow it with --backing-allowed DIR", path.display())]
    NotAllowed { path: PathBuf, allowed: String },
    #[error("the backing chain loops back to {}", path.display())]
    Loop { path: PathBuf },
    #[error("the backing chain is deeper than {max} images")]
    TooDeep { max: usize },
    #[error("{}: the {what} ({len} bytes at {offset}) does not fit in the file ({file_len} bytes): truncated or corrupt", path.display())]
    Table { path: PathBuf, what: &'static str, offset: u64, len: u64, file_len: u64 },
    #[error("{}: malformed qcow2 metadata", path.display())]
    Malformed { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What [`check_header`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderInfo {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
}

/// Is the file at `path` a qcow2 image? (Its first four bytes; a shorter file is not.)
pub fn has_qcow2_magic(path: &Path) -> io::Result<bool> {
    let mut b = [0u8; 4];
    let mut f = StdFile::open(path)?;
    match f.read_exact(&mut b) {
        Ok(()) => Ok(b == QCOW2_MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Read and check the fields of the qcow2 header vblk decides on before imago opens the
/// image (big-endian, qcow2 spec "Header"): magic, version, cluster bits, crypt method.
pub fn check_header(path: &Path) -> Result<HeaderInfo, FormatError> {
    let io_err = |source| FormatError::Io { path: path.to_owned(), source };
    let mut f = StdFile::open(path).map_err(io_err)?;
    let mut h = [0u8; 72];
    f.read_exact(&mut h).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FormatError::Truncated { path: path.to_owned() },
        _ => io_err(e),
    })?;
    let be32 = |o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    if h[0..4] != QCOW2_MAGIC {
        return Err(FormatError::NotQcow2 { path: path.to_owned() });
    }
    let version = be32(4);
    if !(2..=3).contains(&version) {
        return Err(FormatError::Version { path: path.to_owned(), version });
    }
    let cluster_bits = be32(20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(FormatError::ClusterSize { path: path.to_owned(), bits: cluster_bits });
    }
    let method = be32(32);
    if method != 0 {
        return Err(FormatError::Encrypted { path: path.to_owned(), method });
    }
    let size = u64::from_be_bytes(h[24..32].try_into().expect("8 bytes"));
    // The tables the header points at must lie in the file (a truncated image would make
    // imago read zeros for them and, on the first allocation, recurse without end).
    let be64 = |o: usize| u64::from_be_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    let file_len = f.metadata().map_err(io_err)?.len();
    let l1 = (be64(40), be32(36) as u64 * 8);
    let reftable = (be64(48), be32(56) as u64 * (1u64 << cluster_bits));
    for (what, (offset, len)) in [("L1 table", l1), ("refcount table", reftable)] {
        if offset.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(FormatError::Table { path: path.to_owned(), what, offset, len, file_len });
        }
    }
    // The refcount table must exist and refcount at least the header's cluster, and every
    // refcount block it names must lie in the file: with an empty or dangling table imago
    // allocates refcount blocks recursively without end at the first write.
    let mut table = vec![0u8; reftable.1 as usize];
    f.seek(std::io::SeekFrom::Start(reftable.0)).map_err(io_err)?;
    f.read_exact(&mut table).map_err(io_err)?;
    let entries: Vec<u64> = table.chunks_exact(8).map(|e| u64::from_be_bytes(e.try_into().expect("8 bytes"))).collect();
    let cluster_mask = (1u64 << cluster_bits) - 1;
    let bad = entries.first().is_none_or(|&e| e == 0)
        || entries.iter().any(|&e| {
            e != 0 && (e & cluster_mask != 0 || e.checked_add(1 << cluster_bits).is_none_or(|end| end > file_len))
        });
    if bad {
        return Err(FormatError::Table {
            path: path.to_owned(),
            what: "refcount table (empty, or naming a refcount block outside the file)",
            offset: reftable.0,
            len: reftable.1,
            file_len,
        });
    }
    Ok(HeaderInfo { version, cluster_bits, size })
}

/// What a guest range maps to, as far as a worker can tell without I/O ([`Qcow2Image::map`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Extent {
    /// Allocated data at `offset` in the file behind `fd` (a layer of the chain); a write
    /// may go there only if `writable` (the top image's own cluster, not shared).
    Data { fd: RawFd, offset: u64, writable: bool },
    /// Reads as zeros: unallocated in the whole chain, a zero cluster, or past the end of
    /// a shorter backing file.
    Zero,
    /// Needs the format code: a compressed cluster, or a table that is not cached.
    Slow,
}

/// How to open a qcow2 image.
#[derive(Debug, Clone, Default)]
pub struct Qcow2Options {
    pub readonly: bool,
    /// Directories, besides the image's own, that backing files may come from.
    pub backing_allowed: Vec<PathBuf>,
}

/// How to create one.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// A backing file (its format is read from its header: qcow2 or raw).
    pub backing: Option<PathBuf>,
    pub cluster_size: u32,
}

/// An opened qcow2 image and its backing chain. Shared by the service threads (imago's
/// `FormatAccess` is `Send + Sync`; its allocation and caches lock internally).
#[derive(Debug)]
pub struct Qcow2Image {
    access: FormatAccess<OrderedFile>,
    path: PathBuf,
    header: HeaderInfo,
    readonly: bool,
    /// The sticky flush failure of this image (see `disk.rs`).
    flush_failed: AtomicBool,
    /// Exclusion between freeing clusters and I/O to mapped clusters.
    pub(crate) quiesce: quiesce::Quiesce,
    /// The backing layers, top down.
    layers: Vec<Layer>,
    memory_backed: bool,
    /// The most memory imago's metadata caches of the whole chain can hold.
    cache_max: u64,
}

impl Qcow2Image {
    /// Open `path` (and its backing chain, through a [`ChainGate`]). A malformed image is an
    /// error, never a crash (a panic inside the format code becomes [`FormatError::Malformed`]).
    pub fn open(path: &Path, opts: &Qcow2Options) -> Result<Qcow2Image, FormatError> {
        std::panic::catch_unwind(|| Self::open_checked(path, opts))
            .unwrap_or_else(|_| Err(FormatError::Malformed { path: path.to_owned() }))
    }

    fn open_checked(path: &Path, opts: &Qcow2Options) -> Result<Qcow2Image, FormatError> {
        let header = check_header(path)?;
        let io_err = |source| FormatError::Io { path: path.to_owned(), source };
        let top = OrderedFile::open(StorageOpenOptions::new().filename(path).write(!opts.readonly)).map_err(io_err)?;
        let gate = ChainGate::new(path, &opts.backing_allowed).map_err(io_err)?;
        let qcow2 = Qcow2::<OrderedFile>::builder(top).write(!opts.readonly).open(gate.clone()).map_err(|source| {
            // A refusal of the gate travels through imago as an io error: give it its type.
            match gate.refusal() {
                Some(r) => r.into_error(),
                None => FormatError::Io { path: path.to_owned(), source },
            }
        })?;
        let access = FormatAccess::new(qcow2);
        let layers = gate.opened();
        let mut cache_max = (L2_CACHE_TABLES + REFBLOCK_CACHE_BLOCKS) << header.cluster_bits;
        for layer in layers.iter().filter(|l| l.format == "qcow2") {
            cache_max += L2_CACHE_TABLES << check_header(&layer.path)?.cluster_bits;
        }
        let memory_backed =
            StdFile::open(path).map(|f| crate::sys::memory_backed(std::os::fd::AsFd::as_fd(&f))).unwrap_or(false);
        Ok(Qcow2Image {
            layers,
            cache_max,
            memory_backed,
            header: HeaderInfo { size: access.size(), ..header },
            access,
            path: path.to_owned(),
            readonly: opts.readonly,
            flush_failed: AtomicBool::new(false),
            quiesce: quiesce::Quiesce::default(),
        })
    }

    /// Create a new image at `path` (which must not exist).
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<(), FormatError> {
        let io_err = |source| FormatError::Io { path: path.to_owned(), source };
        let file =
            OrderedFile::create_open(StorageCreateOptions::new().filename(path).overwrite(false)).map_err(io_err)?;
        let mut b = Qcow2::<OrderedFile>::create_builder(file).size(opts.size).cluster_size(opts.cluster_size as usize);
        if let Some(backing) = &opts.backing {
            let format = match has_qcow2_magic(backing) {
                Ok(true) => "qcow2",
                Ok(false) => "raw",
                Err(source) => return Err(FormatError::Io { path: backing.clone(), source }),
            };
            b = b.backing(backing.to_string_lossy().into_owned(), format.to_owned());
        }
        b.create().map_err(io_err)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Does the image live in memory (tmpfs)? Decided by the top image's file.
    pub(crate) fn memory_backed(&self) -> bool {
        self.memory_backed
    }

    /// Virtual size in bytes (imago's: it changes with [`Qcow2Image::grow`]).
    pub fn size(&self) -> u64 {
        self.access.size()
    }

    /// Grow the virtual size to `new_size` bytes (see the module docs, "Growing").
    pub(crate) fn grow(&self, new_size: u64) -> Result<(), crate::BackendError> {
        if self.readonly {
            return Err(crate::BackendError::ReadOnly);
        }
        let io = |op| move |source| crate::BackendError::Io { op, source };
        let old = self.size();
        if new_size <= old {
            return Ok(());
        }
        // The direct backing layer's size: what would show through the new range.
        let backing_len = match self.layers.first() {
            None => 0,
            Some(l) if l.format == "qcow2" => check_header(&l.path).map(|h| h.size).unwrap_or(u64::MAX),
            Some(l) => std::fs::metadata(&l.path).map(|m| m.len()).unwrap_or(u64::MAX),
        };
        // Exclusive: the L1 table may move, and its old cluster is freed at once.
        let _exclusive = self.quiesce.exclusive();
        self.access.resize_grow(new_size, PreallocateMode::None).map_err(io("qcow2 resize"))?;
        // Unallocated clusters read from the backing file: the range past the old end
        // must read as zeros, not as whatever a longer backing file holds there (QEMU
        // zeroes it the same way).
        let shown = backing_len.min(new_size);
        if shown > old {
            self.access.write_zeroes(old, shown - old).map_err(io("qcow2 resize (zeroing the new range)"))?;
        }
        // Durable before anyone uses it, and the roots (header, the new L1 table) written
        // before the old L1 cluster can be handed out again (`ordered.rs`): no other
        // service op runs until this returns.
        let flushed = self.access.flush().and_then(|()| self.access.sync());
        flushed.map_err(|source| {
            self.mark_flush_failed();
            crate::BackendError::Io { op: "qcow2 resize (flush)", source }
        })
    }

    pub fn version(&self) -> u32 {
        self.header.version
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.header.cluster_bits
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn flush_failed(&self) -> bool {
        self.flush_failed.load(Ordering::Acquire)
    }

    pub(crate) fn mark_flush_failed(&self) {
        self.flush_failed.store(true, Ordering::Release);
    }

    /// What the `len` bytes at guest `offset` map to, and for how many bytes the answer
    /// holds (at least 1 unless `Slow`). Never does I/O: a lookup that would have to read
    /// (or write back) a table answers `Slow`. A worker may still wait briefly on imago's
    /// cache lock while a service thread loads a table.
    pub(crate) fn map(&self, offset: u64, len: u64) -> (Extent, u64) {
        let _no_io = NonBlocking::enter();
        match self.access.get_mapping(offset, len) {
            Ok((Mapping::Raw { storage, offset, writable, .. }, n)) if n > 0 => {
                (Extent::Data { fd: storage.data_fd(), offset, writable }, n.min(len))
            }
            Ok((Mapping::Zero { .. }, n)) if n > 0 => (Extent::Zero, n.min(len)),
            // The top image ends here (the virtual size was checked before): zeros.
            Ok((Mapping::Eof { .. }, _)) => (Extent::Zero, len),
            _ => (Extent::Slow, 0),
        }
    }

    /// Read into `iovs` at `offset` (blocking; service threads only).
    ///
    /// # Safety
    /// Every iovec must be valid for writes of its length until this returns (the
    /// contract of [`crate::Engine::push`]).
    pub(crate) unsafe fn readv(&self, iovs: &[libc::iovec], offset: u64) -> io::Result<()> {
        let mut v = IoVectorMut::with_capacity(iovs.len());
        for iov in iovs {
            // SAFETY: the caller's contract; the slice lives only for this call.
            v.push(unsafe { std::slice::from_raw_parts_mut(iov.iov_base as *mut u8, iov.iov_len) });
        }
        let _shared = self.quiesce.shared();
        self.access.readv(v, offset)
    }

    /// Write `iovs` at `offset` (blocking; service threads only).
    ///
    /// # Safety
    /// Every iovec must be valid for reads of its length until this returns.
    pub(crate) unsafe fn writev(&self, iovs: &[libc::iovec], offset: u64) -> io::Result<()> {
        let mut v = IoVector::with_capacity(iovs.len());
        for iov in iovs {
            // SAFETY: the caller's contract; the slice lives only for this call.
            v.push(unsafe { std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len) });
        }
        let _shared = self.quiesce.shared();
        self.access.writev(v, offset)
    }

    /// Make the range read as zeros (v3: zero clusters, allocation kept; v2: zeros
    /// written). Service threads only.
    pub(crate) fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let _shared = self.quiesce.shared();
        self.access.write_zeroes(offset, len)
    }

    /// Make the range read as zeros and free its clusters (v3; see the module docs).
    /// Service threads only.
    pub(crate) fn discard_to_zero(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.header.version < 3 {
            return self.write_zeroes(offset, len);
        }
        let _exclusive = self.quiesce.exclusive();
        // SAFETY: imago's contract: no data mapping of this image may be in use
        // concurrently. `Quiesce::exclusive` waited until no worker has I/O in flight to a
        // mapping (new ones go to the service) and holds the lock every other service op
        // takes, so nothing else uses a mapping until it is dropped.
        unsafe { self.access.discard_to_zero_unsafe(offset, len) }
    }

    /// Discard: free the clusters on v3 (they read as zeros afterwards); nothing on v2
    /// (discard is a hint: the guest may read old data or zeros).
    pub(crate) fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.header.version >= 3 {
            self.discard_to_zero(offset, len)
        } else {
            Ok(())
        }
    }

    /// Write back imago's metadata caches and `fdatasync` the image.
    pub(crate) fn flush(&self) -> io::Result<()> {
        let _shared = self.quiesce.shared();
        self.access.flush()?;
        self.access.sync()
    }

    /// The backing layers, top down (the top image itself not included).
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The most memory the chain's metadata caches can take (see [`L2_CACHE_TABLES`]).
    pub fn metadata_cache_max(&self) -> u64 {
        self.cache_max
    }

    /// A description for the startup log.
    pub fn describe(&self) -> String {
        let backing: String =
            self.layers.iter().map(|l| format!(", backed by {} ({})", l.path.display(), l.format)).collect();
        format!(
            "qcow2 v{} {}, {} bytes, {} KiB clusters{}{backing}, metadata cache at most {} MiB",
            self.header.version,
            self.path.display(),
            self.size(),
            self.cluster_size() >> 10,
            if self.readonly { ", read-only" } else { "" },
            self.cache_max.div_ceil(1 << 20),
        )
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        // imago's sync build flushes on drop too; say so if that fails.
        if !self.readonly {
            if let Err(e) = self.access.flush() {
                tracing::error!(image = %self.path.display(), error = %e, "writing back qcow2 metadata failed");
            }
        }
    }
}

#[cfg(test)]
mod tests;
