//! The rare paths of read/write: O_DIRECT alignment and short transfers.
//!
//! On the normal path the kernel reads or writes the guest's buffers in
//! place. That is impossible when a request breaks O_DIRECT's alignment rules
//! (see `disk.rs`), or has more iovecs than one syscall accepts
//! (`IOV_MAX` = 1024). [`route`] decides, per request, how to proceed:
//!
//! | problem                                     | what we do                                   |
//! |---------------------------------------------|----------------------------------------------|
//! | none                                        | guest iovecs, main fd                        |
//! | offset/len not aligned (O_DIRECT)           | guest iovecs, *buffered* fd (no rules there) |
//! | buffer address/length not aligned (O_DIRECT)| [`BounceBuf`], main fd                       |
//! | more than `IOV_MAX` iovecs                  | [`BounceBuf`] (one iovec), chosen fd         |
//!
//! A bounce buffer is an aligned heap allocation: for writes we copy the
//! guest data in before submitting; for reads we copy it out into the guest
//! iovecs on completion. The in-flight slot owns the buffer until then.
//!
//! [`advance_iovecs`] supports continuing a short read/write with the rest.

use std::alloc::{self, Layout};
use std::ptr::{self, NonNull};

use crate::disk::{Disk, FdChoice};
use crate::{BackendError, IoOp};

/// Most iovecs one `preadv`/`pwritev`/`IORING_OP_READV` accepts.
pub(crate) const IOV_MAX: usize = 1024;

/// Minimum alignment of bounce buffers (a page: good for every device).
const BOUNCE_ALIGN: usize = 4096;

/// How to execute one read/write (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route {
    /// Which descriptor to use.
    pub fd: FdChoice,
    /// Whether to go through a [`BounceBuf`].
    pub bounce: bool,
}

/// Decide how to execute a read/write `op` on `disk`.
pub(crate) fn route(disk: &Disk, op: &IoOp) -> Route {
    let too_many = op.iovs.len() > IOV_MAX;
    if !disk.is_direct() {
        return Route { fd: FdChoice::Main, bounce: too_many };
    }
    let off_align = u64::from(disk.dio_offset_align());
    if !op.offset.is_multiple_of(off_align) || !op.len.is_multiple_of(off_align) {
        return Route { fd: FdChoice::Buffered, bounce: too_many };
    }
    let mem_align = disk.dio_mem_align() as usize;
    let misaligned = op
        .iovs
        .iter()
        .any(|v| !(v.iov_base as usize).is_multiple_of(mem_align) || !(v.iov_len as u64).is_multiple_of(off_align));
    Route { fd: FdChoice::Main, bounce: too_many || misaligned }
}

/// An owned, zero-initialised, aligned heap buffer used in place of the
/// guest's buffers for one request.
#[derive(Debug)]
pub(crate) struct BounceBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: `BounceBuf` exclusively owns its allocation (like a `Box<[u8]>`),
// so moving it to another thread is fine.
unsafe impl Send for BounceBuf {}

impl BounceBuf {
    /// Allocate `len` (> 0) bytes aligned to at least `align` and a page.
    /// Allocation failure is an error (`ENOMEM`), not an abort: `len` comes
    /// from the guest.
    pub(crate) fn new(len: u64, align: u32) -> Result<BounceBuf, BackendError> {
        let enomem = || BackendError::errno("bounce buffer allocation", libc::ENOMEM);
        let size = usize::try_from(len).ok().filter(|&s| s > 0).ok_or_else(enomem)?;
        let align = (align as usize).max(BOUNCE_ALIGN).next_power_of_two();
        let layout = Layout::from_size_align(size, align).map_err(|_| enomem())?;
        // SAFETY: `layout` has a non-zero size (checked above).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(enomem)?;
        Ok(BounceBuf { ptr, layout })
    }

    /// The whole buffer as one iovec.
    pub(crate) fn iovec(&self) -> libc::iovec {
        libc::iovec { iov_base: self.ptr.as_ptr().cast(), iov_len: self.layout.size() }
    }

    /// Copy the data described by `iovs` into the buffer (for writes), up to
    /// the buffer's size.
    ///
    /// # Safety
    /// Every iovec must be valid for reads of its whole length.
    pub(crate) unsafe fn gather_from(&mut self, iovs: &[libc::iovec]) {
        let mut pos = 0;
        for v in iovs {
            let n = v.iov_len.min(self.layout.size() - pos);
            if n == 0 {
                continue;
            }
            // SAFETY: the source is valid for `n <= iov_len` bytes (caller's
            // contract); the destination range `pos..pos + n` lies inside our
            // allocation; a private heap allocation cannot overlap the source.
            unsafe { ptr::copy_nonoverlapping(v.iov_base as *const u8, self.ptr.as_ptr().add(pos), n) };
            pos += n;
        }
    }

    /// Copy the first `len` bytes of the buffer out into `iovs` (for reads).
    ///
    /// # Safety
    /// Every iovec must be valid for writes of its whole length.
    pub(crate) unsafe fn scatter_to(&self, iovs: &[libc::iovec], len: u64) {
        let mut left = usize::try_from(len).unwrap_or(usize::MAX).min(self.layout.size());
        let mut pos = 0;
        for v in iovs {
            let n = v.iov_len.min(left);
            if n == 0 {
                continue;
            }
            // SAFETY: the destination is valid for `n <= iov_len` bytes
            // (caller's contract); the source range `pos..pos + n` lies inside
            // our allocation (`pos + left <= size`); they cannot overlap.
            unsafe { ptr::copy_nonoverlapping(self.ptr.as_ptr().add(pos), v.iov_base as *mut u8, n) };
            pos += n;
            left -= n;
        }
    }
}

impl Drop for BounceBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed` with this very layout
        // and is freed exactly once, here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// Drop the first `n` bytes from an iovec list, in place and without
/// allocating: fully consumed iovecs are removed, a partially consumed one is
/// shortened from the front. Used to continue a short read/write.
pub(crate) fn advance_iovecs(iovs: &mut Vec<libc::iovec>, mut n: usize) {
    let consumed = iovs
        .iter()
        .take_while(|v| {
            if n >= v.iov_len {
                n -= v.iov_len;
                true
            } else {
                false
            }
        })
        .count();
    iovs.drain(..consumed);
    if n > 0 {
        if let Some(first) = iovs.first_mut() {
            first.iov_base = first.iov_base.cast::<u8>().wrapping_add(n).cast();
            first.iov_len -= n;
        }
    }
}

/// Keep only the first `n` bytes of an iovec list, in place: later iovecs are removed, the
/// one holding byte `n - 1` is shortened. Used for injected short transfers.
pub(crate) fn truncate_iovecs(iovs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut keep = 0;
    for v in iovs.iter_mut() {
        if n == 0 {
            break;
        }
        v.iov_len = v.iov_len.min(n);
        n -= v.iov_len;
        keep += 1;
    }
    iovs.truncate(keep);
}

/// Call `f` with (pointer, length) of each part of bytes `start..start + len` of the buffers
/// `iovs` describe, in order (fewer bytes if `iovs` is shorter). Nothing is dereferenced.
pub(crate) fn for_each_part(iovs: &[libc::iovec], mut start: usize, mut len: usize, mut f: impl FnMut(*mut u8, usize)) {
    for v in iovs {
        if len == 0 {
            break;
        }
        if start >= v.iov_len {
            start -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - start).min(len);
        f(v.iov_base.cast::<u8>().wrapping_add(start), n);
        (start, len) = (0, len - n);
    }
}

/// Append to `out` the iovecs covering bytes `start..start + len` of `iovs` (pointers
/// only; nothing is read). Fewer bytes if `iovs` is shorter.
pub(crate) fn slice_iovecs(iovs: &[libc::iovec], start: usize, len: usize, out: &mut Vec<libc::iovec>) {
    for_each_part(iovs, start, len, |p, n| out.push(libc::iovec { iov_base: p.cast(), iov_len: n }));
}
