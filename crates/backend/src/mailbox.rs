//! [`Mailbox`]: completions handed to a worker's engine from another thread (a qcow2
//! service thread; another worker that collected them from librbd), with the engine's
//! eventfd signalled so a sleeping worker wakes. A polling worker checks a counter and
//! takes the lock only when there is something to take.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

#[derive(Debug)]
pub(crate) struct Mailbox<T> {
    items: Mutex<Vec<T>>,
    /// How many `items` holds.
    count: AtomicUsize,
    /// The engine's eventfd (a duplicate).
    eventfd: OwnedFd,
}

impl<T> Mailbox<T> {
    pub(crate) fn new(eventfd: BorrowedFd<'_>) -> io::Result<Mailbox<T>> {
        Ok(Mailbox {
            items: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            eventfd: eventfd.try_clone_to_owned()?,
        })
    }

    /// Add `item` and wake the engine.
    pub(crate) fn deliver(&self, item: T) {
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        items.push(item);
        self.count.store(items.len(), Ordering::Release);
        drop(items);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to an eventfd this struct owns.
        let _ = unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Move everything delivered to `out` (no lock when there is nothing).
    pub(crate) fn take(&self, out: &mut Vec<T>) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        out.append(&mut items);
        self.count.store(0, Ordering::Release);
    }

    pub(crate) fn eventfd(&self) -> BorrowedFd<'_> {
        self.eventfd.as_fd()
    }
}
