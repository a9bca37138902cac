//! The dirty-page log of a live migration (vhost-user `SET_LOG_BASE`, `VHOST_F_LOG_ALL`):
//! a bitmap shared with the frontend, one bit per 4 KiB page of guest-physical memory. While
//! the guest is being migrated, every page the device writes (read data, status bytes, the
//! used ring) must have its bit set, or the destination would run on a stale copy.
//!
//! A [`crate::GuestMemory`] carries the log when logging is on, and every write through it
//! ([`GuestMemory::write_iov`](crate::GuestMemory::write_iov), [`crate::GuestArea`] stores)
//! marks its pages, so no caller can forget; what the kernel writes into guest buffers
//! (io_uring reads) is marked by the request pipeline through
//! [`GuestMemory::log_iovecs`](crate::GuestMemory::log_iovecs). Without a log, each write
//! path costs one predictable branch.

use std::fs::File;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::memory::{MappedRegion, RegionSpec};
use crate::MemoryError;

/// Bytes of guest memory per log bit (`VHOST_LOG_PAGE`).
pub const LOG_PAGE: u64 = 4096;

/// Largest log accepted: enough for 32 TiB of guest memory.
pub const MAX_LOG_BYTES: u64 = 1 << 30;

/// A mapped dirty-page bitmap.
#[derive(Debug)]
pub struct DirtyLog {
    map: MappedRegion,
    /// Writes marked so far (diagnostics: proves logging happened).
    marked: AtomicU64,
}

impl DirtyLog {
    /// Map `size` bytes of `file` at `offset` (the frontend's `VhostUserLog`).
    pub fn map(file: &File, size: u64, offset: u64) -> Result<DirtyLog, MemoryError> {
        if size == 0 || size > MAX_LOG_BYTES {
            return Err(MemoryError::InvalidRegion { gpa: 0, size, offset });
        }
        let spec = RegionSpec { guest_phys_addr: 0, size, user_addr: 0, mmap_offset: offset };
        Ok(DirtyLog { map: MappedRegion::map(spec, file)?, marked: AtomicU64::new(0) })
    }

    /// Bytes of bitmap.
    pub fn len(&self) -> u64 {
        self.map.spec().size
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many writes were marked.
    pub fn marked(&self) -> u64 {
        self.marked.load(Ordering::Relaxed)
    }

    /// Set the bits of every page of `[gpa, gpa + len)`. Pages beyond the bitmap (memory the
    /// frontend does not migrate) are skipped.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.marked.fetch_add(1, Ordering::Relaxed);
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last {
            let byte = page / 8;
            if byte >= self.len() {
                return;
            }
            let bit = 1u8 << (page % 8);
            // SAFETY: `byte` < the mapping's size (checked above), the mapping lives as long
            // as `self`, and the frontend reads and clears the bitmap concurrently, so every
            // access is atomic (an `AtomicU8` has the alignment of a `u8`).
            let cell = unsafe { AtomicU8::from_ptr(self.map.host().add(byte as usize)) };
            if cell.load(Ordering::Relaxed) & bit == 0 {
                cell.fetch_or(bit, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::memfd;

    #[test]
    fn marking_sets_one_bit_per_touched_page() {
        let f = memfd("log", 8).unwrap();
        let log = DirtyLog::map(&f, 8, 0).unwrap();
        log.mark(0x1fff, 2); // pages 1 and 2
        log.mark(0x5000, 1); // page 5
        log.mark(63 * 4096, 1); // page 63: the last bit
        log.mark(64 * 4096, 1 << 20); // beyond the bitmap: ignored
        log.mark(0, 0); // nothing
        let mut b = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 0).unwrap();
        assert_eq!(b, [0b0010_0110, 0, 0, 0, 0, 0, 0, 0x80]);
        assert!(DirtyLog::map(&f, 0, 0).is_err());
    }
}
