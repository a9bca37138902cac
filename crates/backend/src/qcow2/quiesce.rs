//! [`Quiesce`]: freeing clusters safely while workers read and write mapped data.
//!
//! Discarding a qcow2 range frees its clusters, and a freed cluster may be handed out again
//! at once, for other guest data or for metadata. A worker that looked a mapping up before
//! the discard and still has I/O in flight to it would then read or write someone else's
//! cluster. imago's safe `discard_to_zero` prevents this with `&mut self`; vblk shares the
//! image between threads, so it uses the unsafe variant and provides the same exclusion:
//!
//! - every worker engine has a counter of the fast-path requests it has in flight
//!   (its own cache line: nothing shared is written on the hot path) and checks
//!   `draining` after raising it;
//! - the service threads run every op under a shared lock;
//! - a discard takes that lock exclusively (no other service op runs), raises `draining`
//!   (new fast-path requests go to the service, where they wait), and waits until every
//!   worker's counter is zero. Only then are clusters freed.
//!
//! The ordering is the classic flag/counter handshake: both sides store, then load, with
//! `SeqCst`, so either the worker sees `draining` or the discard sees its count.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::Duration;

#[derive(Debug, Default)]
pub(crate) struct Quiesce {
    draining: AtomicBool,
    engines: Mutex<Vec<Weak<AtomicUsize>>>,
    exclusive: RwLock<()>,
}

impl Quiesce {
    /// A counter for a new worker engine.
    pub(crate) fn register(&self) -> Arc<AtomicUsize> {
        let c = Arc::new(AtomicUsize::new(0));
        let mut engines = self.engines.lock().unwrap_or_else(|p| p.into_inner());
        engines.retain(|w| w.strong_count() > 0);
        engines.push(Arc::downgrade(&c));
        c
    }

    /// A worker is about to look a mapping up and use it; `false` (and nothing counted)
    /// while a discard is draining.
    pub(crate) fn enter(&self, counter: &AtomicUsize) -> bool {
        counter.fetch_add(1, Ordering::SeqCst);
        if self.draining.load(Ordering::SeqCst) {
            counter.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// The request counted by `enter` is done with its mapping.
    pub(crate) fn leave(counter: &AtomicUsize) {
        counter.fetch_sub(1, Ordering::SeqCst);
    }

    /// Is a discard draining? For a worker whose count is already raised (it need not be
    /// raised again): its later lookups are ordered after that raise.
    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// For every service op but a discard.
    pub(crate) fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.exclusive.read().unwrap_or_else(|p| p.into_inner())
    }

    /// For a discard: no other service op runs and no worker has mapped I/O in flight
    /// until the guard is dropped.
    pub(crate) fn exclusive(&self) -> Exclusive<'_> {
        let lock = self.exclusive.write().unwrap_or_else(|p| p.into_inner());
        self.draining.store(true, Ordering::SeqCst);
        let engines: Vec<Arc<AtomicUsize>> =
            self.engines.lock().unwrap_or_else(|p| p.into_inner()).iter().filter_map(Weak::upgrade).collect();
        for c in &engines {
            // Workers complete io_uring I/O without the service: this ends.
            while c.load(Ordering::SeqCst) > 0 {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        Exclusive { quiesce: self, _lock: lock }
    }
}

pub(crate) struct Exclusive<'a> {
    quiesce: &'a Quiesce,
    _lock: RwLockWriteGuard<'a, ()>,
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        self.quiesce.draining.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_discard_waits_for_mapped_io_and_turns_new_requests_away() {
        let q = Arc::new(Quiesce::default());
        let c = q.register();
        assert!(q.enter(&c));
        let q2 = Arc::clone(&q);
        let t = std::thread::spawn(move || {
            let _x = q2.exclusive();
            std::time::Instant::now()
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "the discard waits for the request in flight");
        let c2 = q.register();
        assert!(!q.enter(&c2), "a new request goes to the service while draining");
        let left = std::time::Instant::now();
        Quiesce::leave(&c);
        assert!(t.join().unwrap() >= left);
        assert!(q.enter(&c2), "and to the fast path again after the discard");
    }
}
