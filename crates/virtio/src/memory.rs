//! Guest memory, as a vhost-user frontend shares it.
//!
//! The frontend (QEMU, libblkio, vblk's own driver) sends `SET_MEM_TABLE` or
//! `ADD_MEM_REG` with one file descriptor per region. Each region is described by
//! a [`RegionSpec`]: where it sits in guest-physical space (`guest_phys_addr`), where
//! it sits in the frontend's own address space (`user_addr`, used for ring addresses
//! in `SET_VRING_ADDR`), and where it starts in the file (`mmap_offset`).
//!
//! vblk maps each region once ([`MappedRegion`]) and builds an immutable
//! [`GuestMemory`] table out of them. A table is never changed in place: adding or
//! removing a region builds a new table, sharing the unchanged mappings by `Arc`.
//! Anything that points into guest memory (a ring, an in-flight request) holds an
//! `Arc<GuestMemory>`, so a mapping is unmapped only when nothing can touch it.
//!
//! The guest is hostile: an address range is accepted only when it lies wholly inside
//! guest memory (one region, or regions adjacent in guest-physical space, one [`Iov`]
//! per region), and every arithmetic step is checked for overflow.
//!
//! This is the only module of the device side that dereferences guest memory.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::dirty_log::DirtyLog;

/// Errors of the guest-memory layer.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemoryError {
    #[error("guest address {addr:#x}+{len:#x} is not inside one memory region")]
    OutOfRange { addr: u64, len: u64 },
    #[error("frontend address {addr:#x}+{len:#x} is not inside one memory region")]
    UserAddrOutOfRange { addr: u64, len: u64 },
    #[error("address {addr:#x} is not aligned to {align}")]
    Misaligned { addr: u64, align: u64 },
    #[error("invalid memory region (gpa {gpa:#x}, size {size:#x}, offset {offset:#x})")]
    InvalidRegion { gpa: u64, size: u64, offset: u64 },
    #[error("memory region at gpa {gpa:#x} overlaps an existing region")]
    Overlap { gpa: u64 },
    #[error("memory region needs {needed:#x} bytes but its file has only {actual:#x}")]
    FileTooSmall { needed: u64, actual: u64 },
    #[error("no memory region matches gpa {gpa:#x} size {size:#x}")]
    NoSuchRegion { gpa: u64, size: u64 },
    #[error("mmap of memory region failed: errno {0}")]
    Mmap(i32),
    #[error("buffer does not belong to this memory table")]
    ForeignBuffer,
}

/// One region as the frontend describes it (`VhostUserMemoryRegion`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    pub guest_phys_addr: u64,
    pub size: u64,
    pub user_addr: u64,
    pub mmap_offset: u64,
}

impl RegionSpec {
    fn validate(&self) -> Result<(), MemoryError> {
        let bad = MemoryError::InvalidRegion { gpa: self.guest_phys_addr, size: self.size, offset: self.mmap_offset };
        if self.size == 0
            || self.guest_phys_addr.checked_add(self.size).is_none()
            || self.user_addr.checked_add(self.size).is_none()
        {
            return Err(bad);
        }
        let total = self.mmap_offset.checked_add(self.size).ok_or(bad.clone())?;
        if usize::try_from(total).is_err() || total > isize::MAX as u64 {
            return Err(bad);
        }
        Ok(())
    }

    fn gpa_end(&self) -> u64 {
        self.guest_phys_addr + self.size
    }

    fn uva_end(&self) -> u64 {
        self.user_addr + self.size
    }
}

/// One region mapped into this process. Unmapped on drop.
#[derive(Debug)]
pub struct MappedRegion {
    spec: RegionSpec,
    /// Start of the mmap (file offset 0).
    base: NonNull<u8>,
    map_len: usize,
    /// `base + mmap_offset`: the byte at `guest_phys_addr`.
    host: *mut u8,
}

// SAFETY: the mapping is plain shared memory; access to its bytes goes through the raw
// copies below, which are valid from any thread. The struct owns the mapping.
unsafe impl Send for MappedRegion {}
// SAFETY: as above; no interior state besides the mapping itself.
unsafe impl Sync for MappedRegion {}

impl MappedRegion {
    /// Map `spec` from `file`. The file must be at least `mmap_offset + size` long when it
    /// is a regular file (memfd, hugetlbfs, tmpfs), or touching the tail would SIGBUS.
    pub fn map(spec: RegionSpec, file: &File) -> Result<Self, MemoryError> {
        spec.validate()?;
        let needed = spec.mmap_offset + spec.size;
        if let Ok(meta) = file.metadata() {
            if meta.file_type().is_file() && meta.len() < needed {
                return Err(MemoryError::FileTooSmall { needed, actual: meta.len() });
            }
        }
        let map_len = needed as usize;
        // SAFETY: a fresh shared mapping at an address of the kernel's choosing; it
        // aliases nothing in this process. The result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemoryError::Mmap(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)));
        }
        let base = NonNull::new(p as *mut u8).ok_or(MemoryError::Mmap(0))?;
        // SAFETY: mmap_offset < map_len, so the result stays inside the mapping.
        let host = unsafe { base.as_ptr().add(spec.mmap_offset as usize) };
        Ok(MappedRegion { spec, base, map_len, host })
    }

    pub fn spec(&self) -> &RegionSpec {
        &self.spec
    }

    /// The byte at `guest_phys_addr` in this process.
    pub(crate) fn host(&self) -> *mut u8 {
        self.host
    }

    #[inline]
    fn host_contains(&self, ptr: *const u8, len: usize) -> bool {
        let start = self.host as usize;
        let p = ptr as usize;
        p >= start && len <= self.spec.size as usize && p - start <= self.spec.size as usize - len
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        // SAFETY: base/map_len are exactly what mmap returned; every user of the
        // mapping holds an Arc to the table that owns this region, so none is left.
        unsafe {
            libc::munmap(self.base.as_ptr() as *mut libc::c_void, self.map_len);
        }
    }
}

/// A guest buffer that passed validation: it lies wholly inside one mapped region.
///
/// An `Iov` does not keep the memory mapped by itself; whoever holds it also holds the
/// `Arc<GuestMemory>` it came from. Its bytes are read and written only through
/// [`GuestMemory::read_iov`] / [`GuestMemory::write_iov`] (which check the `Iov`
/// belongs to that table) or handed to the kernel as an `iovec`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Iov {
    ptr: *mut u8,
    len: u32,
}

// SAFETY: an Iov is an address and a length; it is dereferenced only under the rules above.
unsafe impl Send for Iov {}

impl Iov {
    #[inline]
    pub fn len(&self) -> u32 {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer as a `struct iovec` for readv/writev/io_uring.
    #[inline]
    pub fn as_iovec(&self) -> libc::iovec {
        libc::iovec { iov_base: self.ptr as *mut libc::c_void, iov_len: self.len as usize }
    }

    /// Host address of the first byte (for alignment decisions).
    #[inline]
    pub fn addr(&self) -> usize {
        self.ptr as usize
    }

    /// Split into `[0, at)` and `[at, len)`. `at` is clamped to `len`.
    #[inline]
    pub fn split_at(&self, at: u32) -> (Iov, Iov) {
        let at = at.min(self.len);
        (
            Iov { ptr: self.ptr, len: at },
            // at <= len, so the pointer stays inside (or one past) the buffer.
            Iov { ptr: self.ptr.wrapping_add(at as usize), len: self.len - at },
        )
    }
}

/// The memory table: every region the frontend shared, ordered by guest address.
#[derive(Debug, Default)]
pub struct GuestMemory {
    regions: Vec<Arc<MappedRegion>>,
    /// The dirty-page log while a migration runs ([`crate::dirty_log`]).
    log: Option<Arc<DirtyLog>>,
}

impl GuestMemory {
    /// A table with no regions: every translation fails.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Build a table from `SET_MEM_TABLE`'s regions and fds.
    pub fn from_files(regions: &[(RegionSpec, File)]) -> Result<Self, MemoryError> {
        let mut mem = GuestMemory::empty();
        for (spec, file) in regions {
            mem = mem.with_region(Arc::new(MappedRegion::map(*spec, file)?))?;
        }
        Ok(mem)
    }

    /// A new table with `region` added. Regions may not overlap in guest-physical or in
    /// frontend-virtual space.
    pub fn with_region(&self, region: Arc<MappedRegion>) -> Result<Self, MemoryError> {
        let s = *region.spec();
        for r in &self.regions {
            let o = r.spec();
            let gpa_overlap = s.guest_phys_addr < o.gpa_end() && o.guest_phys_addr < s.gpa_end();
            let uva_overlap = s.user_addr < o.uva_end() && o.user_addr < s.uva_end();
            if gpa_overlap || uva_overlap {
                return Err(MemoryError::Overlap { gpa: s.guest_phys_addr });
            }
        }
        let mut regions = self.regions.clone();
        regions.push(region);
        regions.sort_by_key(|r| r.spec.guest_phys_addr);
        Ok(GuestMemory { regions, log: self.log.clone() })
    }

    /// A new table without the region `spec` names (`REM_MEM_REG`: matched by guest
    /// address, size and frontend address).
    pub fn without_region(&self, spec: &RegionSpec) -> Result<Self, MemoryError> {
        let pos = self
            .regions
            .iter()
            .position(|r| {
                r.spec.guest_phys_addr == spec.guest_phys_addr
                    && r.spec.size == spec.size
                    && r.spec.user_addr == spec.user_addr
            })
            .ok_or(MemoryError::NoSuchRegion { gpa: spec.guest_phys_addr, size: spec.size })?;
        let mut regions = self.regions.clone();
        regions.remove(pos);
        Ok(GuestMemory { regions, log: self.log.clone() })
    }

    /// The same table, logging every write into `log` (or no longer logging).
    pub fn with_log(&self, log: Option<Arc<DirtyLog>>) -> GuestMemory {
        GuestMemory { regions: self.regions.clone(), log }
    }

    pub fn log(&self) -> Option<&Arc<DirtyLog>> {
        self.log.as_ref()
    }

    /// Mark the pages of host bytes `[ptr, ptr + len)` of this table dirty (no-op without
    /// a log).
    #[inline]
    fn log_host(&self, ptr: *const u8, len: usize) {
        if let Some(log) = &self.log {
            self.log_host_slow(log, ptr, len);
        }
    }

    #[cold]
    #[inline(never)]
    fn log_host_slow(&self, log: &DirtyLog, ptr: *const u8, len: usize) {
        if let Some(r) = self.regions.iter().find(|r| r.host_contains(ptr, len)) {
            log.mark(r.spec.guest_phys_addr + (ptr as usize - r.host as usize) as u64, len as u64);
        }
    }

    /// Mark buffers the kernel wrote (an io_uring read's iovecs) dirty. No-op without a log.
    #[inline]
    pub fn log_iovecs(&self, iovs: &[libc::iovec]) {
        if self.log.is_some() {
            for v in iovs {
                self.log_host(v.iov_base as *const u8, v.iov_len);
            }
        }
    }

    pub fn num_regions(&self) -> usize {
        self.regions.len()
    }

    pub fn regions(&self) -> impl Iterator<Item = &RegionSpec> {
        self.regions.iter().map(|r| r.spec())
    }

    /// Host address of `[gpa, gpa+len)` if it lies inside one region.
    #[inline]
    fn translate_gpa(&self, gpa: u64, len: u64) -> Result<*mut u8, MemoryError> {
        let err = MemoryError::OutOfRange { addr: gpa, len };
        let end = gpa.checked_add(len).ok_or(err.clone())?;
        for r in &self.regions {
            let s = &r.spec;
            if gpa >= s.guest_phys_addr && end <= s.gpa_end() {
                // The offset is < size <= map_len, so it fits the mapping.
                return Ok(r.host.wrapping_add((gpa - s.guest_phys_addr) as usize));
            }
        }
        Err(err)
    }

    /// Host address of the frontend-virtual range `[uva, uva+len)`.
    fn translate_uva(&self, uva: u64, len: u64) -> Result<(*mut u8, u64), MemoryError> {
        let err = MemoryError::UserAddrOutOfRange { addr: uva, len };
        let end = uva.checked_add(len).ok_or(err.clone())?;
        for r in &self.regions {
            let s = &r.spec;
            if uva >= s.user_addr && end <= s.uva_end() {
                let off = uva - s.user_addr;
                return Ok((r.host.wrapping_add(off as usize), s.guest_phys_addr + off));
            }
        }
        Err(err)
    }

    /// Validate a guest buffer that must lie inside one region. Zero-length buffers are
    /// valid here; the queue layer decides whether it accepts them.
    #[inline]
    pub fn iov(&self, gpa: u64, len: u32) -> Result<Iov, MemoryError> {
        let ptr = self.translate_gpa(gpa, len as u64)?;
        Ok(Iov { ptr, len })
    }

    /// Validate a guest buffer (a descriptor's `addr`/`len`) and hand it to `f` as one
    /// [`Iov`] per region it touches. A buffer may cross from one region into the next
    /// when the two are adjacent in guest-physical space (hot-plugged DIMMs arrive as
    /// separate regions, and a guest merges physically contiguous pages into one
    /// descriptor), as QEMU's `virtqueue_map_desc` allows; any gap fails the whole buffer.
    /// Pieces already handed to `f` before a gap is found are to be discarded by the caller.
    #[inline]
    pub fn for_each_iov(&self, gpa: u64, len: u32, mut f: impl FnMut(Iov)) -> Result<(), MemoryError> {
        let end = gpa.checked_add(len as u64).ok_or(MemoryError::OutOfRange { addr: gpa, len: len as u64 })?;
        for (i, r) in self.regions.iter().enumerate() {
            let s = &r.spec;
            if gpa >= s.guest_phys_addr && gpa < s.gpa_end() {
                if end <= s.gpa_end() {
                    // The common case: one region. The offset is < size <= map_len.
                    f(Iov { ptr: r.host.wrapping_add((gpa - s.guest_phys_addr) as usize), len });
                    return Ok(());
                }
                return self.for_each_iov_across(i, gpa, len, f);
            }
        }
        Err(MemoryError::OutOfRange { addr: gpa, len: len as u64 })
    }

    /// [`for_each_iov`](Self::for_each_iov) for a buffer starting in region `i` and
    /// running past its end.
    #[cold]
    #[inline(never)]
    fn for_each_iov_across(&self, mut i: usize, gpa: u64, len: u32, mut f: impl FnMut(Iov)) -> Result<(), MemoryError> {
        let (mut addr, mut left) = (gpa, len as u64);
        loop {
            let r = &self.regions[i];
            let take = left.min(r.spec.gpa_end() - addr);
            // `addr` lies in this region, so the offset is < size <= map_len.
            let ptr = r.host.wrapping_add((addr - r.spec.guest_phys_addr) as usize);
            f(Iov { ptr, len: take as u32 });
            left -= take;
            if left == 0 {
                return Ok(());
            }
            addr += take;
            // The table is sorted by guest address: the next region must start right here.
            i += 1;
            match self.regions.get(i) {
                Some(next) if next.spec.guest_phys_addr == addr => {}
                _ => return Err(MemoryError::OutOfRange { addr: gpa, len: len as u64 }),
            }
        }
    }

    /// Guest-physical address of a frontend-virtual address (ring addresses).
    pub fn uva_to_gpa(&self, uva: u64, len: u64) -> Result<u64, MemoryError> {
        self.translate_uva(uva, len).map(|(_, gpa)| gpa)
    }

    #[inline]
    fn owns(&self, iov: &Iov) -> bool {
        self.regions.iter().any(|r| r.host_contains(iov.ptr, iov.len as usize))
    }

    /// Copy `buf.len()` bytes out of `iov` starting at `offset`.
    #[inline]
    pub fn read_iov(&self, iov: Iov, offset: u32, buf: &mut [u8]) -> Result<(), MemoryError> {
        let (_, tail) = iov.split_at(offset);
        if buf.len() > tail.len as usize || !self.owns(&iov) {
            return Err(MemoryError::ForeignBuffer);
        }
        // SAFETY: `iov` lies inside a region of this table (checked by `owns`), the table
        // is alive for the duration of `&self`, and `tail` is a sub-range of `iov` at
        // least `buf.len()` long. Guest memory may change concurrently; we copy raw bytes
        // and never form a reference into it.
        unsafe { std::ptr::copy_nonoverlapping(tail.ptr, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copy `buf` into `iov` starting at `offset`.
    #[inline]
    pub fn write_iov(&self, iov: Iov, offset: u32, buf: &[u8]) -> Result<(), MemoryError> {
        let (_, tail) = iov.split_at(offset);
        if buf.len() > tail.len as usize || !self.owns(&iov) {
            return Err(MemoryError::ForeignBuffer);
        }
        // SAFETY: as in `read_iov`; the mapping is writable (PROT_WRITE).
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), tail.ptr, buf.len()) };
        self.log_host(tail.ptr, buf.len());
        Ok(())
    }

    /// Copy guest bytes at `gpa` into `buf` (indirect descriptor tables, tests), across
    /// adjacent regions like [`for_each_iov`](Self::for_each_iov).
    pub fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let len = Self::buf_len(gpa, buf.len())?;
        if let Ok(iov) = self.iov(gpa, len) {
            return self.read_iov(iov, 0, buf);
        }
        let (mut done, mut copied) = (0usize, Ok(()));
        self.for_each_iov(gpa, len, |iov| {
            let l = iov.len as usize;
            if copied.is_ok() {
                copied = self.read_iov(iov, 0, &mut buf[done..done + l]);
            }
            done += l;
        })?;
        copied
    }

    /// Copy `buf` into guest memory at `gpa`, across adjacent regions. Nothing is written
    /// unless the whole range is valid.
    pub fn write_at(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError> {
        let len = Self::buf_len(gpa, buf.len())?;
        if let Ok(iov) = self.iov(gpa, len) {
            return self.write_iov(iov, 0, buf);
        }
        self.for_each_iov(gpa, len, |_| {})?;
        let (mut done, mut copied) = (0usize, Ok(()));
        self.for_each_iov(gpa, len, |iov| {
            let l = iov.len as usize;
            if copied.is_ok() {
                copied = self.write_iov(iov, 0, &buf[done..done + l]);
            }
            done += l;
        })?;
        copied
    }

    fn buf_len(gpa: u64, len: usize) -> Result<u32, MemoryError> {
        u32::try_from(len).map_err(|_| MemoryError::OutOfRange { addr: gpa, len: len as u64 })
    }

    /// A ring area at a guest-physical address: validated once, then accessed by offset.
    pub fn area_at_gpa(self: &Arc<Self>, gpa: u64, len: u64, align: u64) -> Result<GuestArea, MemoryError> {
        if align > 1 && !gpa.is_multiple_of(align) {
            return Err(MemoryError::Misaligned { addr: gpa, align });
        }
        let ptr = self.translate_gpa(gpa, len)?;
        Ok(GuestArea { _mem: Arc::clone(self), log: self.log.clone(), ptr, len: len as usize, gpa })
    }

    /// A ring area at a frontend-virtual address (`SET_VRING_ADDR` gives those).
    pub fn area_at_uva(self: &Arc<Self>, uva: u64, len: u64, align: u64) -> Result<GuestArea, MemoryError> {
        if align > 1 && !uva.is_multiple_of(align) {
            return Err(MemoryError::Misaligned { addr: uva, align });
        }
        let (ptr, gpa) = self.translate_uva(uva, len)?;
        Ok(GuestArea { _mem: Arc::clone(self), log: self.log.clone(), ptr, len: len as usize, gpa })
    }
}

/// A validated, aligned area of guest memory holding one part of a virtqueue (descriptor
/// table, available ring, used ring). It keeps its memory table alive.
///
/// Offsets passed to the accessors are computed by the queue from indices it has already
/// reduced modulo the queue size; an offset outside the area is a vblk bug and panics.
#[derive(Debug)]
pub struct GuestArea {
    _mem: Arc<GuestMemory>,
    /// The table's dirty log, if it has one: every store marks its page.
    log: Option<Arc<DirtyLog>>,
    ptr: *mut u8,
    len: usize,
    gpa: u64,
}

// SAFETY: the area owns an Arc to its mapping; all accesses are volatile/atomic-sized
// raw accesses that are valid from any thread.
unsafe impl Send for GuestArea {}

impl GuestArea {
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Guest-physical address of the first byte.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    #[inline]
    fn at(&self, offset: usize, size: usize) -> *mut u8 {
        assert!(offset.checked_add(size).is_some_and(|e| e <= self.len), "ring offset out of area");
        self.ptr.wrapping_add(offset)
    }

    /// Start fetching the cache line at `offset` (a hint: no effect on what is read, never
    /// faults; out of bounds: nothing).
    #[inline(always)]
    pub fn prefetch(&self, offset: usize) {
        if offset < self.len {
            prefetch(self.ptr.wrapping_add(offset));
        }
    }

    /// Volatile load of a little-endian u16 (ring indices and entries, naturally aligned).
    #[inline]
    pub fn load_u16(&self, offset: usize) -> u16 {
        let p = self.at(offset, 2) as *const u16;
        // SAFETY: in bounds (checked by `at`), 2-aligned (area alignment plus even offset
        // by construction of the ring layout), and the mapping is alive (`_mem`).
        u16::from_le(unsafe { p.read_volatile() })
    }

    #[inline]
    pub fn store_u16(&self, offset: usize, v: u16) {
        let p = self.at(offset, 2) as *mut u16;
        // SAFETY: as in `load_u16`; the mapping is writable.
        unsafe { p.write_volatile(v.to_le()) }
        self.logged(offset, 2);
    }

    /// Mark `[offset, offset + len)` dirty when logging.
    #[inline(always)]
    fn logged(&self, offset: usize, len: usize) {
        if let Some(log) = &self.log {
            log.mark(self.gpa + offset as u64, len as u64);
        }
    }

    #[inline]
    pub fn load_u32(&self, offset: usize) -> u32 {
        let p = self.at(offset, 4) as *const u32;
        // SAFETY: as in `load_u16`, with 4-byte alignment.
        u32::from_le(unsafe { p.read_volatile() })
    }

    #[inline]
    pub fn store_u32(&self, offset: usize, v: u32) {
        let p = self.at(offset, 4) as *mut u32;
        // SAFETY: as in `load_u32`; the mapping is writable.
        unsafe { p.write_volatile(v.to_le()) }
        self.logged(offset, 4);
    }

    /// Copy bytes out (descriptors: 16 bytes at a 16-aligned offset).
    #[inline]
    pub fn read(&self, offset: usize, buf: &mut [u8]) {
        let p = self.at(offset, buf.len());
        // SAFETY: in bounds, mapping alive; raw byte copy, no reference into guest memory.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) }
    }

    /// Copy bytes in.
    #[inline]
    pub fn write(&self, offset: usize, buf: &[u8]) {
        let p = self.at(offset, buf.len());
        // SAFETY: in bounds, mapping alive and writable.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), p, buf.len()) }
        self.logged(offset, buf.len());
    }
}

/// Anonymous shared memory to stand in for a frontend's memfd (tests, the in-process
/// driver): a memfd of `size` bytes.
pub fn memfd(name: &str, size: u64) -> std::io::Result<File> {
    memfd_create(name, size, false)
}

/// A memfd of `size` zero bytes whose size can never change (sealed against growing,
/// shrinking and further seals): safe to map for whoever receives it, as the inflight area
/// the backend hands to the frontend.
pub fn sealed_memfd(name: &str, size: u64) -> std::io::Result<File> {
    memfd_create(name, size, true)
}

fn memfd_create(name: &str, size: u64, seal: bool) -> std::io::Result<File> {
    use std::os::fd::FromRawFd;
    let cname = std::ffi::CString::new(name).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let flags = libc::MFD_CLOEXEC | if seal { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: memfd_create takes a valid C string and flags; the fd is checked below.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, owned descriptor.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    if seal {
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own; the result is checked.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(file)
}

/// Start fetching the cache line of `p` into this CPU's caches (a hint: it never faults,
/// whatever `p` is).
#[inline(always)]
pub fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it does not dereference `p` architecturally and never
    // faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(specs: &[RegionSpec]) -> GuestMemory {
        let files: Vec<(RegionSpec, File)> =
            specs.iter().map(|s| (*s, memfd("t", s.mmap_offset + s.size).unwrap())).collect();
        GuestMemory::from_files(&files).unwrap()
    }

    const R0: RegionSpec = RegionSpec { guest_phys_addr: 0, size: 0x10000, user_addr: 0x7000_0000, mmap_offset: 0 };
    const R1: RegionSpec =
        RegionSpec { guest_phys_addr: 0x100000, size: 0x10000, user_addr: 0x8000_0000, mmap_offset: 0x1000 };

    #[test]
    fn a_range_must_lie_inside_one_region() {
        let m = table(&[R0, R1]);
        assert!(m.iov(0, 0x10000).is_ok());
        assert!(m.iov(0xffff, 2).is_err(), "straddles the end of R0");
        assert!(m.iov(0x10000, 1).is_err(), "hole between regions");
        assert!(m.iov(0x100000 + 0xfff0, 0x10).is_ok());
        assert!(m.iov(u64::MAX, 2).is_err(), "overflow");
        assert!(m.uva_to_gpa(0x8000_0010, 4).unwrap() == 0x100010);
        assert!(m.uva_to_gpa(0x7000_fffe, 4).is_err());
    }

    #[test]
    fn bytes_written_by_gpa_read_back_through_uva_translation() {
        let m = Arc::new(table(&[R0, R1]));
        m.write_at(0x100020, &[1, 2, 3, 4]).unwrap();
        let area = m.area_at_uva(0x8000_0020, 4, 4).unwrap();
        assert_eq!(area.load_u32(0), u32::from_le_bytes([1, 2, 3, 4]));
        area.store_u16(2, 0xbeef);
        let mut b = [0u8; 4];
        m.read_at(0x100020, &mut b).unwrap();
        assert_eq!(b, [1, 2, 0xef, 0xbe]);
        assert!(m.area_at_uva(0x8000_0021, 4, 4).is_err(), "misaligned ring address");
    }

    #[test]
    fn overlapping_or_invalid_regions_are_refused() {
        let m = table(&[R0]);
        let f = memfd("t", 0x20000).unwrap();
        let overlap = RegionSpec { guest_phys_addr: 0x8000, ..R1 };
        let r = Arc::new(MappedRegion::map(overlap, &f).unwrap());
        assert_eq!(m.with_region(r).unwrap_err(), MemoryError::Overlap { gpa: 0x8000 });
        let huge = RegionSpec { size: u64::MAX, ..R1 };
        assert!(MappedRegion::map(huge, &f).is_err());
        let zero = RegionSpec { size: 0, ..R1 };
        assert!(MappedRegion::map(zero, &f).is_err());
        let too_big = RegionSpec { size: 0x40000, ..R1 };
        assert!(matches!(MappedRegion::map(too_big, &f), Err(MemoryError::FileTooSmall { .. })));
    }

    #[test]
    fn a_buffer_may_cross_into_an_adjacent_region_but_not_a_gap() {
        // R0 and R2 are adjacent in guest-physical space but separate mappings (separate
        // files, unrelated frontend addresses): a hot-plugged DIMM next to boot RAM.
        const R2: RegionSpec =
            RegionSpec { guest_phys_addr: 0x10000, size: 0x10000, user_addr: 0x9000_0000, mmap_offset: 0 };
        let m = table(&[R0, R2, R1]);
        m.write_at(0xfff0, &[7u8; 32]).unwrap();
        let mut pieces = Vec::new();
        m.for_each_iov(0xfff8, 16, |iov| pieces.push(iov)).unwrap();
        assert_eq!(pieces.iter().map(|i| i.len()).collect::<Vec<_>>(), [8, 8], "one iov per region");
        let mut b = [0u8; 32];
        m.read_at(0xfff0, &mut b).unwrap();
        assert_eq!(b, [7u8; 32]);
        // The same bytes through each region's own translation.
        let mut tail = [0u8; 16];
        m.read_at(0x10000, &mut tail).unwrap();
        assert_eq!(tail, [7u8; 16]);
        // A whole region and then some: R0 + R2 are one 128 KiB run; R2 -> R1 has a gap.
        assert!(m.for_each_iov(0, 0x20000, |_| {}).is_ok());
        assert!(m.for_each_iov(0x1fff0, 0x20, |_| {}).is_err(), "gap after R2");
        assert!(m.write_at(0x1fff0, &[1u8; 32]).is_err());
        let mut b = [0u8; 16];
        m.read_at(0x1fff0, &mut b).unwrap();
        assert_eq!(b, [0u8; 16], "a refused write changes nothing");
        assert!(m.iov(0xfff8, 16).is_err(), "iov() still wants one region");
    }

    #[test]
    fn every_write_through_a_logging_table_marks_its_pages() {
        let m = table(&[R0, R1]);
        let f = memfd("log", 64).unwrap();
        let log = Arc::new(crate::DirtyLog::map(&f, 64, 0).unwrap());
        let bits = || {
            let mut b = [0u8; 64];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 0).unwrap();
            b
        };
        // Without a log nothing is marked.
        m.write_at(0x3000, &[1]).unwrap();
        assert_eq!(bits(), [0u8; 64]);
        let m = Arc::new(m.with_log(Some(log)));
        m.write_at(0x3000, &[1]).unwrap(); // page 3
        let area = m.area_at_uva(0x8000_0000 + 0x2000, 8, 4).unwrap(); // gpa 0x102000: page 258
        area.store_u32(4, 7);
        let iov = m.iov(0x5ffe, 4).unwrap(); // pages 5 and 6, written by "the kernel"
        m.log_iovecs(&[iov.as_iovec()]);
        let b = bits();
        assert_eq!(b[0], 0b0110_1000);
        assert_eq!(b[258 / 8], 1 << (258 % 8));
        assert_eq!(b.iter().map(|x| x.count_ones()).sum::<u32>(), 4);
        // Tables derived from a logging one keep logging; with_log(None) stops.
        let m2 = m.without_region(&R1).unwrap();
        assert!(m2.log().is_some());
        assert!(m2.with_log(None).log().is_none());
    }

    #[test]
    fn removing_a_region_keeps_the_others() {
        let m = table(&[R0, R1]);
        let m2 = m.without_region(&R0).unwrap();
        assert_eq!(m2.num_regions(), 1);
        assert!(m2.iov(0, 1).is_err());
        assert!(m2.iov(0x100000, 1).is_ok());
        assert!(m2.without_region(&R0).is_err());
    }

    #[test]
    fn iov_accessors_refuse_foreign_buffers() {
        let a = table(&[R0]);
        let b = table(&[R0]);
        let iov = a.iov(0x10, 8).unwrap();
        let mut buf = [0u8; 8];
        assert!(a.read_iov(iov, 0, &mut buf).is_ok());
        assert_eq!(b.read_iov(iov, 0, &mut buf), Err(MemoryError::ForeignBuffer));
        assert!(a.read_iov(iov, 4, &mut buf).is_err(), "past the end of the iov");
    }
}
