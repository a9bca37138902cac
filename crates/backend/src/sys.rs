//! Thin wrappers around the raw Linux system calls this crate uses.
//!
//! Almost every `unsafe` FFI call of the crate lives here, so the rest of the
//! code can stay in safe Rust. Each wrapper:
//!
//! * takes file descriptors as [`BorrowedFd`] (so they cannot dangle),
//! * retries on `EINTR` where the call is restartable,
//! * returns [`io::Result`] with the errno preserved.
//!
//! The only wrappers that are themselves `unsafe fn` are the vectored
//! read/write calls: the kernel dereferences the raw pointers inside the
//! `iovec`s, and only the caller can vouch for them.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Linux ioctl numbers for block devices (`<linux/fs.h>`). `libc` has
/// `BLKSSZGET` but not the others, so we encode them with the `_IO`/`_IOR`
/// rules. The direction bits differ on a few architectures.
mod blk_ioctl {
    #[cfg(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    ))]
    mod dir {
        pub const NONE: u32 = 1 << 29;
        pub const READ: u32 = 2 << 29;
    }
    #[cfg(not(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    )))]
    mod dir {
        pub const NONE: u32 = 0;
        pub const READ: u32 = 2 << 30;
    }

    const fn ioc(dir: u32, nr: u32, size: u32) -> u32 {
        dir | (size << 16) | (0x12 << 8) | nr
    }

    /// `_IOR(0x12, 114, size_t)`: device size in bytes.
    pub const BLKGETSIZE64: u32 = ioc(dir::READ, 114, std::mem::size_of::<usize>() as u32);
    /// `_IO(0x12, 104)`: logical sector size (an `int`).
    pub const BLKSSZGET: u32 = ioc(dir::NONE, 104, 0);
    /// `_IO(0x12, 119)`: discard a `[start, len]` byte range.
    pub const BLKDISCARD: u32 = ioc(dir::NONE, 119, 0);
    /// `_IO(0x12, 127)`: zero a `[start, len]` byte range.
    pub const BLKZEROOUT: u32 = ioc(dir::NONE, 127, 0);
}
pub(crate) use blk_ioctl::{BLKDISCARD, BLKZEROOUT};

/// Turn a `-1`-on-error return value into an `io::Result`.
fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Call `f` until it does not fail with `EINTR`.
fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn off(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `fdatasync(2)`: flush file data (and the metadata needed to read it).
pub(crate) fn fdatasync(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fdatasync only takes an fd, which `BorrowedFd` keeps open.
    retry(|| cvt(unsafe { libc::fdatasync(fd.as_raw_fd()) }.into())).map(drop)
}

/// `fallocate(2)` with the given `mode` flags.
pub(crate) fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (o, l) = (off(offset)?, off(len)?);
    // SAFETY: fallocate takes only integers and an fd kept open by `fd`.
    retry(|| cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, o, l) }.into())).map(drop)
}

/// `pwrite(2)` from a plain slice; returns bytes written (may be short).
pub(crate) fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
    let o = off(offset)?;
    // SAFETY: `buf` is a valid, initialised slice for its whole length.
    let n = retry(|| cvt(unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), o) } as _))?;
    Ok(n as usize)
}

/// `preadv(2)`: returns bytes read (may be short, 0 at end of file).
///
/// # Safety
/// Every iovec must describe memory valid for writes for its whole length.
pub(crate) unsafe fn preadv(fd: BorrowedFd<'_>, iovs: &[libc::iovec], offset: u64) -> io::Result<usize> {
    let o = off(offset)?;
    let cnt = libc::c_int::try_from(iovs.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the caller guarantees the iovecs point to writable memory.
    let n = retry(|| cvt(unsafe { libc::preadv(fd.as_raw_fd(), iovs.as_ptr(), cnt, o) } as _))?;
    Ok(n as usize)
}

/// `pwritev2(2)` with per-call `flags` (e.g. `RWF_DSYNC`); returns bytes
/// written (may be short).
///
/// # Safety
/// Every iovec must describe memory valid for reads for its whole length.
pub(crate) unsafe fn pwritev2(fd: BorrowedFd<'_>, iovs: &[libc::iovec], offset: u64, flags: i32) -> io::Result<usize> {
    let o = off(offset)?;
    let cnt = libc::c_int::try_from(iovs.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the caller guarantees the iovecs point to readable memory.
    let n = retry(|| cvt(unsafe { libc::pwritev2(fd.as_raw_fd(), iovs.as_ptr(), cnt, o, flags) } as _))?;
    Ok(n as usize)
}

/// Issue a block-device range ioctl (`BLKDISCARD`, `BLKZEROOUT`).
pub(crate) fn blk_range_ioctl(fd: BorrowedFd<'_>, req: u32, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: these ioctls read a `[u64; 2]` from the pointer, which points
    // to a live local array.
    retry(|| cvt(unsafe { libc::ioctl(fd.as_raw_fd(), req as _, range.as_ptr()) }.into())).map(drop)
}

/// Size of a block device in bytes (`BLKGETSIZE64`).
pub(crate) fn blk_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, a live local.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), blk_ioctl::BLKGETSIZE64 as _, &mut size) }.into())?;
    Ok(size)
}

/// Logical block (sector) size of a block device (`BLKSSZGET`).
pub(crate) fn blk_logical_block_size(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut lbs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int to the pointer, a live local.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), blk_ioctl::BLKSSZGET as _, &mut lbs) }.into())?;
    u32::try_from(lbs).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// O_DIRECT alignment rules from `statx(STATX_DIOALIGN)` (Linux 6.1+):
/// `Some((memory_alignment, offset_alignment))`. An offset alignment of 0
/// means the file does not support O_DIRECT at all. `None` when the kernel
/// or filesystem does not report it.
pub(crate) fn dio_alignment(fd: BorrowedFd<'_>) -> Option<(u32, u32)> {
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: the path is a valid NUL-terminated (empty) string, used with
    // AT_EMPTY_PATH to mean "the fd itself"; `stx` is a writable statx buffer.
    let ret = unsafe {
        libc::statx(fd.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, stx.as_mut_ptr())
    };
    if ret != 0 {
        return None;
    }
    // SAFETY: statx succeeded, so it filled the struct (and it was zeroed
    // beforehand anyway, and all-zero is a valid `statx`).
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// Whether the file lives in memory (tmpfs, ramfs, hugetlbfs): reads and writes are copies
/// that never wait for a device. `fstatfs` failing counts as "no".
pub(crate) fn memory_backed(fd: BorrowedFd<'_>) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    let mut st = MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `st` is a writable statfs buffer owned by this frame.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstatfs succeeded and filled the (zero-initialised) struct.
    #[allow(clippy::unnecessary_cast)] // `f_type` is i64 on x86-64, other types elsewhere
    let f_type = unsafe { st.assume_init() }.f_type as i64;
    matches!(f_type, TMPFS_MAGIC | RAMFS_MAGIC | HUGETLBFS_MAGIC)
}

/// A non-blocking, close-on-exec eventfd (counter starts at 0).
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes only integer flags.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) }.into())?;
    // SAFETY: eventfd returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// A non-blocking, close-on-exec `CLOCK_MONOTONIC` timerfd, disarmed.
pub(crate) fn timerfd() -> io::Result<OwnedFd> {
    // SAFETY: timerfd_create takes only integer arguments.
    let fd =
        cvt(unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC | libc::TFD_NONBLOCK) }.into())?;
    // SAFETY: timerfd_create returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Arm `fd` to expire once, `after` from now (at least 1 ns: zero would disarm it), or
/// disarm it with `None`.
pub(crate) fn timerfd_set(fd: BorrowedFd<'_>, after: Option<std::time::Duration>) -> io::Result<()> {
    let value = match after {
        None => libc::timespec { tv_sec: 0, tv_nsec: 0 },
        Some(d) => {
            let d = d.max(std::time::Duration::from_nanos(1));
            let tv_sec = libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX);
            libc::timespec { tv_sec, tv_nsec: d.subsec_nanos().into() }
        }
    };
    let spec = libc::itimerspec { it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 }, it_value: value };
    // SAFETY: `spec` is a valid itimerspec; the old value is not requested (null).
    cvt(unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) }.into()).map(drop)
}

/// A close-on-exec epoll instance watching each of `fds` for `EPOLLIN` (level-triggered).
/// It is itself pollable: readable while any of them is.
pub(crate) fn epoll_watching(fds: &[BorrowedFd<'_>]) -> io::Result<OwnedFd> {
    // SAFETY: epoll_create1 takes only integer flags.
    let ep = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }.into())?;
    // SAFETY: epoll_create1 returned a fresh descriptor that nothing else owns.
    let ep = unsafe { OwnedFd::from_raw_fd(ep as libc::c_int) };
    for fd in fds {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: fd.as_raw_fd() as u64 };
        // SAFETY: both fds are open; `ev` is a valid epoll_event the kernel only reads.
        cvt(unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) }.into())?;
    }
    Ok(ep)
}

/// Reset an eventfd's counter (or a timerfd's expiration count) to 0 (no-op if already 0).
pub(crate) fn eventfd_clear(fd: BorrowedFd<'_>) {
    let mut val: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live local u64. Errors (EAGAIN when
    // the counter is already 0) need no handling.
    let _ = unsafe { libc::read(fd.as_raw_fd(), (&mut val as *mut u64).cast(), 8) };
}

/// Block until `fd` is readable or `timeout` has passed; interrupted waits just return.
pub(crate) fn wait_readable_for(fd: BorrowedFd<'_>, timeout: std::time::Duration) {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let _ = unsafe { libc::poll(&mut p, 1, ms) };
}

/// Block until `fd` is readable (an eventfd signalled); interrupted waits just return.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>) {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let _ = unsafe { libc::poll(&mut p, 1, -1) };
}
