//! Ceph RBD images (`rbd:POOL/IMAGE[@SNAP]`) through librbd (`crates/rbd`, the only
//! place that calls it).
//!
//! One image handle per disk, shared by every worker: a second handle in the same
//! process would be a second RBD client, and the image's exclusive lock would move between
//! the two on every write. I/O is asynchronous only (`rbd_aio_*`); librbd signals finished
//! ops on the image's eventfd and queues them until `rbd_poll_io_events` collects them.
//!
//! With several workers on one image, a worker may collect another's completions: the tag
//! of every op names its engine ([`tag`]), and a completion for another engine goes to
//! that engine's [`Mailbox`], whose eventfd (the engine's own) wakes it. Each engine's
//! completion fd is an epoll set over the image's eventfd and its own, so whichever
//! arrives first wakes it. No thread of vblk's sits between librbd and the worker.
//!
//! Errors from the cluster (an OSD down past `rados_osd_op_timeout`, a deleted image,
//! `EROFS` on a snapshot) complete the op with that errno: IOERR for the guest, one log
//! line per failed op from the pipeline. librbd reconnects by itself when the cluster
//! comes back.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use vblk_rbd::{Cluster, Image, RbdError};

use crate::{sys, BackendError, Completion, IoOp, OpKind};

/// `POOL/IMAGE[@SNAP]`, from `rbd:POOL/IMAGE[@SNAP]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSpec {
    pub pool: String,
    pub image: String,
    pub snap: Option<String>,
}

/// The `rbd:` prefix of an image argument.
pub const RBD_PREFIX: &str = "rbd:";

impl RbdSpec {
    /// Parse `rbd:POOL/IMAGE[@SNAP]`; `None` if `s` does not start with `rbd:`.
    pub fn parse(s: &str) -> Option<Result<RbdSpec, String>> {
        let rest = s.strip_prefix(RBD_PREFIX)?;
        let (name, snap) = match rest.split_once('@') {
            Some((n, s)) => (n, Some(s)),
            None => (rest, None),
        };
        let bad = |why: &str| Some(Err(format!("{s}: {why} (expected rbd:POOL/IMAGE[@SNAP])")));
        let Some((pool, image)) = name.split_once('/') else { return bad("no pool") };
        if pool.is_empty() || image.is_empty() || image.contains('/') {
            return bad("a pool and an image name are needed");
        }
        if snap.is_some_and(|s| s.is_empty()) {
            return bad("an empty snapshot name");
        }
        Some(Ok(RbdSpec { pool: pool.into(), image: image.into(), snap: snap.map(Into::into) }))
    }
}

impl std::fmt::Display for RbdSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rbd:{}/{}", self.pool, self.image)?;
        match &self.snap {
            Some(s) => write!(f, "@{s}"),
            None => Ok(()),
        }
    }
}

/// How to reach the cluster.
#[derive(Debug, Clone)]
pub struct RbdOptions {
    /// `ceph.conf` (librados' default search when `None`).
    pub conf: Option<PathBuf>,
    /// Client name without `client.` (`admin` when `None`).
    pub id: Option<String>,
    pub readonly: bool,
    /// How long an op may wait for the cluster before it fails (`rados_osd_op_timeout`,
    /// and the same for monitors and for connecting).
    pub timeout: Duration,
    /// Take the image's exclusive lock at open and keep it: a second client (another
    /// `vblk serve`, QEMU) cannot write while this one runs, and opening fails if another
    /// client keeps it. Without it librbd's lock moves to whichever client writes (what
    /// QEMU does; needed for live migration, where both hosts open the image).
    pub exclusive: bool,
    /// librbd's write-back cache (`rbd_cache`). Off: every write completes when the
    /// cluster has it, and a cluster outage fails the writes it hits and nothing later.
    /// On: writes complete from the cache, and one that cannot be written back fails the
    /// next flush, and every flush after it (the sticky rule, as for a file's page cache),
    /// until the daemon restarts.
    pub cache: bool,
}

impl Default for RbdOptions {
    fn default() -> Self {
        RbdOptions {
            conf: None,
            id: None,
            readonly: false,
            timeout: Duration::from_secs(30),
            exclusive: false,
            cache: false,
        }
    }
}

/// librados settings vblk starts from (`ceph.conf` and `$CEPH_ARGS` can override them):
/// one messenger thread and one librados worker thread instead of 3 and 2. Every op's
/// completion crosses fewer threads (futex wake-ups and context switches were most of the
/// client's CPU): 4k random reads at QD32 on the test cluster went from 28-30k IOPS at
/// 22-23 µs of backend CPU per I/O to 34-37k IOPS at 16-17 µs (docs/PERFORMANCE.md).
const TUNING: [(&str, &str); 2] = [("ms_async_op_threads", "1"), ("librados_thread_count", "1")];

/// An open image, shared by the disk's engines.
#[derive(Debug)]
pub(crate) struct RbdImage {
    image: Image,
    spec: RbdSpec,
    /// The engines' mailboxes, by engine id.
    mailboxes: Mutex<Vec<Weak<Mailbox>>>,
    /// The sticky flush failure of this image (see `disk.rs`).
    flush_failed: AtomicBool,
}

impl RbdImage {
    pub(crate) fn open(spec: &RbdSpec, opts: &RbdOptions) -> Result<(RbdImage, u64), RbdError> {
        let t = opts.timeout.as_secs().max(1).to_string();
        let settings = [
            ("rbd_cache", if opts.cache { "true" } else { "false" }),
            ("rados_osd_op_timeout", t.as_str()),
            ("rados_mon_op_timeout", t.as_str()),
            ("client_mount_timeout", t.as_str()),
            // librbd's own messages would go to stderr as free text; vblk logs errors itself.
            ("log_to_stderr", "false"),
            ("err_to_stderr", "false"),
        ];
        let cluster = Cluster::connect_with_options(opts.conf.as_deref(), opts.id.as_deref(), &TUNING, &settings)?;
        let image = cluster.open_image(&spec.pool, &spec.image, spec.snap.as_deref(), opts.readonly)?;
        if opts.exclusive && !image.is_read_only() {
            image.lock_exclusive()?;
        }
        let size = image.size()?;
        let image = RbdImage {
            image,
            spec: spec.clone(),
            mailboxes: Mutex::new(Vec::new()),
            flush_failed: AtomicBool::new(false),
        };
        Ok((image, size))
    }

    pub(crate) fn spec(&self) -> &RbdSpec {
        &self.spec
    }

    /// Opened read-only or at a snapshot.
    pub(crate) fn readonly(&self) -> bool {
        self.image.is_read_only()
    }

    /// Write librbd's cache back and wait (shutdown). Sticky on failure like every flush.
    pub(crate) fn flush_blocking(&self) -> Result<(), BackendError> {
        if self.flush_failed() {
            return Err(BackendError::FlushFailedEarlier);
        }
        self.image.flush_blocking().map_err(|e| {
            self.mark_flush_failed();
            rbd_error("flush", &e)
        })
    }

    /// Resize the image in the cluster (`rbd_resize`, blocking).
    pub(crate) fn resize(&self, size: u64) -> Result<(), BackendError> {
        self.image.resize(size).map_err(|e| {
            tracing::error!(image = %self.spec, size, error = %e, "resize failed");
            rbd_error("resize", &e)
        })
    }

    pub(crate) fn flush_failed(&self) -> bool {
        self.flush_failed.load(Ordering::Acquire)
    }

    fn mark_flush_failed(&self) {
        if !self.flush_failed.swap(true, Ordering::AcqRel) {
            tracing::error!(image = %self.spec, "flush failed; all further flushes will report failure");
        }
    }

    /// A mailbox for a new engine, and its id.
    fn register(&self, mailbox: &Arc<Mailbox>) -> u32 {
        let mut boxes = self.mailboxes.lock().unwrap_or_else(|p| p.into_inner());
        let id = match boxes.iter().position(|w| w.strong_count() == 0) {
            Some(i) => {
                boxes[i] = Arc::downgrade(mailbox);
                i
            }
            None => {
                boxes.push(Arc::downgrade(mailbox));
                boxes.len() - 1
            }
        };
        id as u32
    }

    /// Hand a completion to the engine it belongs to.
    fn route(&self, id: u32, c: (u64, i64)) {
        let boxes = self.mailboxes.lock().unwrap_or_else(|p| p.into_inner());
        match boxes.get(id as usize).and_then(Weak::upgrade) {
            Some(mb) => mb.deliver(c),
            // An engine waits for its ops before it goes, so this is a bug, not a guest's doing.
            None => tracing::error!(image = %self.spec, tag = c.0, "RBD completion for an engine that is gone"),
        }
    }
}

/// Completions another engine collected for this one: `(tag, result)`.
type Mailbox = crate::mailbox::Mailbox<(u64, i64)>;

/// An op's tag for librbd: the engine's id and the op's slot.
fn tag(id: u32, slot: usize) -> u64 {
    (u64::from(id) << 32) | slot as u64
}

/// What an op in flight waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Its read, write, discard, write-zeroes or flush.
    Io,
    /// The flush that makes a FUA op durable.
    Fua,
}

/// One worker's engine on an RBD disk.
#[derive(Debug)]
pub(crate) struct RbdEngine {
    image: Arc<RbdImage>,
    id: u32,
    mailbox: Arc<Mailbox>,
    slots: Vec<Option<(IoOp, Stage)>>,
    free: Vec<usize>,
    /// epoll over the image's eventfd and the engine's.
    wake: OwnedFd,
    scratch: Vec<(u64, i64)>,
}

impl RbdEngine {
    pub(crate) fn new(image: Arc<RbdImage>, depth: usize, eventfd: BorrowedFd<'_>) -> Result<RbdEngine, BackendError> {
        let io = |op| move |source| BackendError::Io { op, source };
        let mailbox = Arc::new(Mailbox::new(eventfd).map_err(io("dup eventfd"))?);
        let wake = sys::epoll_watching(&[eventfd, image.image.completion_fd()]).map_err(io("epoll"))?;
        let id = image.register(&mailbox);
        Ok(RbdEngine {
            image,
            id,
            mailbox,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            wake,
            scratch: Vec::new(),
        })
    }

    /// The fd to sleep on: readable when a completion may be waiting.
    pub(crate) fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// Ops handed to librbd and not yet completed.
    pub(crate) fn busy(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Hand `op` to librbd; ops it refuses at once complete into `ready`.
    ///
    /// # Safety
    /// As for [`crate::Engine::push`].
    pub(crate) unsafe fn push(&mut self, op: IoOp, ready: &mut Vec<Completion>) -> Result<(), IoOp> {
        let Some(idx) = self.free.pop() else { return Err(op) };
        // SAFETY: forwarded caller contract: the op (and its buffers) stays in the slot
        // until its completion is handed back.
        match unsafe { self.submit(&op, Stage::Io, idx) } {
            Ok(()) => self.slots[idx] = Some((op, Stage::Io)),
            Err(e) => {
                self.free.push(idx);
                ready.push(Completion { result: Err(e), op });
            }
        }
        Ok(())
    }

    /// # Safety
    /// The buffers of `op` stay valid until its completion is collected.
    unsafe fn submit(&self, op: &IoOp, stage: Stage, idx: usize) -> Result<(), BackendError> {
        let (img, t) = (&self.image.image, tag(self.id, idx));
        let r = match (stage, op.kind) {
            (Stage::Fua, _) | (_, OpKind::Flush) => img.aio_flush(t),
            // SAFETY: the caller's contract.
            (_, OpKind::Read) => unsafe { img.aio_readv(&op.iovs, op.offset, t) },
            // SAFETY: the caller's contract.
            (_, OpKind::Write) => unsafe { img.aio_writev(&op.iovs, op.offset, t) },
            (_, OpKind::Discard) => img.aio_discard(op.offset, op.len, t),
            (_, OpKind::WriteZeroes { .. }) => img.aio_write_zeroes(op.offset, op.len, t),
        };
        r.map_err(|e| rbd_error(op.kind.name(), &e))
    }

    /// Move finished ops to `out`. `reset`: clear the image's eventfd first (before
    /// sleeping on it again); without, no system call is made (busy polling).
    pub(crate) fn reap(&mut self, out: &mut Vec<Completion>, reset: bool) {
        let mut got = std::mem::take(&mut self.scratch);
        self.mailbox.take(&mut got);
        if self.busy() > 0 {
            if reset {
                if let Err(e) = self.image.image.reset_completion_fd() {
                    tracing::error!(image = %self.image.spec, error = %e, "RBD eventfd");
                }
            }
            if let Err(e) = self.image.image.collect(&mut got) {
                tracing::error!(image = %self.image.spec, error = %e, "collecting RBD completions");
            }
        }
        for (t, res) in got.drain(..) {
            let (id, idx) = ((t >> 32) as u32, (t & 0xffff_ffff) as usize);
            if id != self.id {
                self.image.route(id, (t, res));
                continue;
            }
            self.complete(idx, res, out);
        }
        self.scratch = got;
    }

    fn complete(&mut self, idx: usize, res: i64, out: &mut Vec<Completion>) {
        let Some((op, stage)) = self.slots.get_mut(idx).and_then(Option::take) else {
            tracing::error!(image = %self.image.spec, slot = idx, "RBD completion for no op");
            return;
        };
        let errno = |res: i64| i32::try_from(-res).unwrap_or(libc::EIO);
        let result = match (stage, op.kind) {
            (_, _) if res < 0 && (stage == Stage::Fua || op.kind == OpKind::Flush) => {
                self.image.mark_flush_failed();
                Err(BackendError::errno("flush", errno(res)))
            }
            (_, kind) if res < 0 => Err(BackendError::errno(kind.name(), errno(res))),
            // librbd reads short only past the end of an image that shrank underneath.
            (Stage::Io, OpKind::Read) if res as u64 != op.len => Err(BackendError::errno("read", libc::EIO)),
            (Stage::Io, kind) if op.fua && kind.is_write_like() => {
                // SAFETY: the op's buffers are not used by a flush.
                match unsafe { self.submit(&op, Stage::Fua, idx) } {
                    Ok(()) => {
                        self.slots[idx] = Some((op, Stage::Fua));
                        return;
                    }
                    Err(e) => Err(e),
                }
            }
            (_, OpKind::Read | OpKind::Write) => Ok(op.len),
            _ => Ok(0),
        };
        self.free.push(idx);
        out.push(Completion { op, result });
    }
}

impl Drop for RbdEngine {
    /// librbd may still read or write guest memory for this engine's ops: wait for every
    /// one of them (bounded by the cluster timeout), routing others' completions on.
    fn drop(&mut self) {
        let mut out = Vec::new();
        while self.busy() > 0 {
            self.reap(&mut out, true);
            out.clear();
            if self.busy() > 0 {
                sys::wait_readable_for(self.wake.as_fd(), Duration::from_millis(100));
            }
        }
    }
}

fn rbd_error(op: &'static str, e: &RbdError) -> BackendError {
    BackendError::errno(op, e.errno().unwrap_or(libc::EIO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        let s = RbdSpec::parse("rbd:rbd/vm1@snap").unwrap().unwrap();
        assert_eq!(s, RbdSpec { pool: "rbd".into(), image: "vm1".into(), snap: Some("snap".into()) });
        assert_eq!(s.to_string(), "rbd:rbd/vm1@snap");
        assert_eq!(RbdSpec::parse("rbd:p/i").unwrap().unwrap().snap, None);
        assert!(RbdSpec::parse("disk.img").is_none(), "a file is not an RBD spec");
        for bad in ["rbd:", "rbd:pool", "rbd:/img", "rbd:pool/", "rbd:p/i/j", "rbd:p/i@"] {
            assert!(RbdSpec::parse(bad).unwrap().is_err(), "{bad}");
        }
    }

    #[test]
    fn tags_name_the_engine_and_the_slot() {
        let t = tag(7, 1234);
        assert_eq!(((t >> 32) as u32, (t & 0xffff_ffff) as usize), (7, 1234));
    }
}
