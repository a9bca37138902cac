//! [`OrderedFile`]: imago's file storage with the image's *roots* written last, so that a
//! crash (SIGKILL, power loss) never leaves metadata that references a cluster whose
//! refcount was not written.
//!
//! imago keeps L2 tables and refcount blocks in write-back caches and writes them in a
//! dependency-respecting order at flush (refcount blocks before the L2 tables that use
//! their clusters). But three *root* structures are written through at once: the header,
//! an L1 entry when a new L2 table is hooked up (`ensure_l2`), and a refcount-table entry
//! when a new refcount block is (`get_or_create_refblock`). The refcount of the new
//! table's own cluster is still in the refcount cache at that moment, so a crash leaves
//! `refcount=0 reference=1` (what `qemu-img check` calls corruption), and the next
//! allocation may hand out that cluster a second time.
//!
//! This storage holds writes to the roots (the header cluster, the L1 table and the
//! refcount table, wherever the header currently says they are) in memory, serves reads
//! of them from there, and writes them at [`Storage::flush`]: imago calls it after writing
//! back its caches, and it first syncs what those wrote. On disk, a root therefore only
//! ever points at tables whose refcounts are durable; a crash loses the roots' updates
//! since the last flush, which leaves the clusters allocated since then unreferenced
//! (leaked: `qemu-img check` reports them, harmless). What the guest wrote since its last
//! FLUSH may be lost, as it may on any disk with a write cache; what it flushed never is.
//!
//! Two more things live here because every layer of a chain is an `OrderedFile`:
//! - a second descriptor of the same file ([`OrderedFile::data_fd`]) that a worker's
//!   io_uring reads and writes data clusters through (`fast.rs`);
//! - [`NonBlocking`]: while a worker looks a mapping up, any I/O imago would do (loading an
//!   L2 table that is not cached, writing one back to make room) fails with `WouldBlock`
//!   instead of blocking the worker; the request then goes to the service threads, which
//!   load the table for the next one.

use std::cell::Cell;
use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use imago::file::File as ImagoFile;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::{Storage, StorageCreateOptions, StorageOpenOptions};

/// Where the roots are, from the header (qcow2 spec "Header", big-endian).
#[derive(Debug, Default, Clone)]
struct Roots {
    /// The image's first cluster as imago last wrote it (header, extensions, backing name).
    header: Vec<u8>,
    cluster_size: u64,
    l1: (u64, u64),
    reftable: (u64, u64),
}

impl Roots {
    /// Recompute the ranges from a header image (`header` holds at least 64 bytes).
    fn parse(header: &[u8]) -> Option<Roots> {
        if header.len() < 64 || header[0..4] != super::QCOW2_MAGIC {
            return None;
        }
        let be32 = |o: usize| u32::from_be_bytes(header[o..o + 4].try_into().expect("4 bytes")) as u64;
        let be64 = |o: usize| u64::from_be_bytes(header[o..o + 8].try_into().expect("8 bytes"));
        let cluster_bits = be32(20);
        if !(9..=21).contains(&cluster_bits) {
            return None;
        }
        let cluster_size = 1u64 << cluster_bits;
        let l1 = (be64(40), be32(36).saturating_mul(8));
        let reftable = (be64(48), be32(56).saturating_mul(cluster_size));
        Some(Roots { header: header.to_vec(), cluster_size, l1, reftable })
    }

    fn ranges(&self) -> [(u64, u64); 3] {
        [(0, self.cluster_size), self.l1, self.reftable]
    }

    fn overlaps(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        self.ranges().iter().any(|&(o, l)| l > 0 && offset < o.saturating_add(l) && o < end)
    }
}

fn overlap(a: u64, a_len: usize, b: u64, b_len: usize) -> bool {
    a < b + b_len as u64 && b < a + a_len as u64
}

#[derive(Debug, Default)]
struct Held {
    /// `None` until the image's header has been read (and for a file that is not qcow2:
    /// backing files, external data files; nothing is held there).
    roots: Option<Roots>,
    /// Root writes not yet on disk, in the order imago made them.
    writes: Vec<(u64, Vec<u8>)>,
}

thread_local! {
    /// Set while this thread must not do storage I/O (see [`NonBlocking`]).
    static NO_BLOCKING_IO: Cell<bool> = const { Cell::new(false) };
}

/// While a `NonBlocking` lives, every storage call that would read or write the file on
/// this thread fails with [`io::ErrorKind::WouldBlock`]. imago propagates such an error
/// without caching anything (a table whose load failed is not inserted; an entry whose
/// write-back failed stays cached and dirty), so the attempt leaves no trace.
pub(crate) struct NonBlocking(());

impl NonBlocking {
    pub(crate) fn enter() -> NonBlocking {
        NO_BLOCKING_IO.set(true);
        NonBlocking(())
    }
}

impl Drop for NonBlocking {
    fn drop(&mut self) {
        NO_BLOCKING_IO.set(false);
    }
}

fn would_block() -> io::Result<()> {
    if NO_BLOCKING_IO.get() {
        return Err(io::Error::new(io::ErrorKind::WouldBlock, "qcow2 metadata I/O on a worker thread"));
    }
    Ok(())
}

/// See the module docs.
pub struct OrderedFile {
    inner: ImagoFile,
    /// The same file, for data I/O on a worker's io_uring (a `dup`: same open file
    /// description, so the same page cache and the same write-back errors at `fdatasync`).
    data: fs::File,
    held: Mutex<Held>,
}

impl fmt::Debug for OrderedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrderedFile").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl fmt::Display for OrderedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

impl OrderedFile {
    fn wrap(inner: ImagoFile, data: fs::File) -> io::Result<OrderedFile> {
        let f = OrderedFile { inner, data, held: Mutex::new(Held::default()) };
        if f.inner.size()? >= 64 {
            let mut head = vec![0u8; 4096.min(f.inner.size()? as usize)];
            let mut v = IoVectorMut::with_capacity(1);
            v.push(&mut head[..]);
            // SAFETY: `head` is a live buffer owned by this frame for the whole call.
            unsafe { f.inner.pure_readv(v, 0) }?;
            if let Some(mut roots) = Roots::parse(&head) {
                // Keep the whole first cluster, as header writes may cover any of it.
                let cs = roots.cluster_size.min(f.inner.size()?) as usize;
                let mut first = vec![0u8; cs];
                let mut v = IoVectorMut::with_capacity(1);
                v.push(&mut first[..]);
                // SAFETY: as above.
                unsafe { f.inner.pure_readv(v, 0) }?;
                roots.header = first;
                f.lock().roots = Some(roots);
            }
        }
        Ok(f)
    }

    /// The descriptor data clusters are read and written through (valid while `self` is).
    pub(crate) fn data_fd(&self) -> RawFd {
        self.data.as_raw_fd()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write the held root updates, after making what was written before them durable.
    fn write_roots(&self) -> io::Result<()> {
        let writes = std::mem::take(&mut self.lock().writes);
        if writes.is_empty() {
            return Ok(());
        }
        self.inner.sync()?;
        for (i, (offset, data)) in writes.iter().enumerate() {
            let mut v = IoVector::with_capacity(1);
            v.push(&data[..]);
            // SAFETY: `data` lives in `writes` for the whole call.
            if let Err(e) = unsafe { self.inner.pure_writev(v, *offset) } {
                // Keep what was not written, to try again at the next flush.
                let mut held = self.lock();
                let rest: Vec<_> = writes[i..].to_vec();
                held.writes.splice(0..0, rest);
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Storage for OrderedFile {
    fn open(opts: StorageOpenOptions) -> io::Result<Self> {
        let path = opts
            .get_filename()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a storage object without a file name"))?;
        if opts.get_direct() {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "O_DIRECT qcow2 storage"));
        }
        let file = fs::OpenOptions::new().read(true).write(opts.get_writable()).open(path)?;
        let data = file.try_clone()?;
        OrderedFile::wrap(ImagoFile::from_open_file(file, opts)?, data)
    }

    fn create_open(opts: StorageCreateOptions) -> io::Result<Self> {
        let path = opts.get_filename().map(Path::to_owned);
        let inner = ImagoFile::create_open(opts)?;
        let path = path.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
        let data = fs::OpenOptions::new().read(true).write(true).open(path)?;
        OrderedFile::wrap(inner, data)
    }

    fn mem_align(&self) -> usize {
        self.inner.mem_align()
    }

    fn req_align(&self) -> usize {
        self.inner.req_align()
    }

    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> io::Result<PathBuf> {
        self.inner.resolve_relative_path(relative)
    }

    fn get_filename(&self) -> Option<PathBuf> {
        self.inner.get_filename()
    }

    unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        would_block()?;
        // The buffers, to lay held root writes over what the file has.
        // SAFETY: the iovecs describe `bufv`'s buffers, alive for this call.
        let iovs: Vec<libc::iovec> = unsafe { bufv.as_iovec() }.to_vec();
        // SAFETY: forwarded caller contract.
        unsafe { self.inner.pure_readv(bufv, offset) }?;
        let held = self.lock();
        for (w_off, data) in &held.writes {
            let mut pos = offset;
            for iov in &iovs {
                let (b_start, b_end) = (pos, pos + iov.iov_len as u64);
                let (w_start, w_end) = (*w_off, *w_off + data.len() as u64);
                let (s, e) = (b_start.max(w_start), b_end.min(w_end));
                if s < e {
                    let src = &data[(s - w_start) as usize..(e - w_start) as usize];
                    // SAFETY: [s, e) lies inside this iovec's buffer, which the caller
                    // keeps valid for writes for the duration of this call.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src.as_ptr(),
                            (iov.iov_base as *mut u8).add((s - b_start) as usize),
                            src.len(),
                        )
                    };
                }
                pos = b_end;
            }
        }
        Ok(())
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        would_block()?;
        {
            let mut held = self.lock();
            if let Some(roots) = &held.roots {
                if roots.overlaps(offset, bufv.len()) {
                    let mut data = Vec::with_capacity(bufv.len() as usize);
                    for b in bufv.into_inner() {
                        data.extend_from_slice(&b);
                    }
                    // A header update may move the L1 table or the refcount table: follow it.
                    if offset < roots.cluster_size {
                        let mut header = roots.header.clone();
                        let end = (offset as usize + data.len()).min(header.len());
                        if (offset as usize) < end {
                            header[offset as usize..end].copy_from_slice(&data[..end - offset as usize]);
                        }
                        if let Some(r) = Roots::parse(&header) {
                            held.roots = Some(Roots { header, ..r });
                        }
                    }
                    // The same entry written again replaces the held copy (imago writes an
                    // entry with the same alignment each time), so what is held stays within
                    // the roots' size however long the guest goes without a flush.
                    let same = held.writes.iter().rposition(|(o, d)| *o == offset && d.len() == data.len());
                    match same {
                        Some(i)
                            if held.writes[i + 1..].iter().all(|(o, d)| !overlap(*o, d.len(), offset, data.len())) =>
                        {
                            held.writes[i].1 = data;
                        }
                        _ => held.writes.push((offset, data)),
                    }
                    return Ok(());
                }
            }
        }
        // SAFETY: forwarded caller contract.
        unsafe { self.inner.pure_writev(bufv, offset) }
    }

    fn flush(&self) -> io::Result<()> {
        would_block()?;
        // imago has written back its caches: now the roots may point at them.
        self.write_roots()?;
        self.inner.flush()
    }

    fn sync(&self) -> io::Result<()> {
        would_block()?;
        self.write_roots()?;
        self.inner.sync()
    }

    unsafe fn invalidate_cache(&self) -> io::Result<()> {
        // SAFETY: forwarded caller contract.
        unsafe { self.inner.invalidate_cache() }
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        self.inner.get_storage_helper()
    }
}
