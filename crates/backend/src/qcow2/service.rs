//! The service threads of a qcow2 image: where imago's blocking calls run, so that a
//! worker never blocks. A worker's [`crate::Engine`] queues ops ([`Qcow2Queue::push`]),
//! hands them over at submit, and reaps their completions after its eventfd fires, as it
//! does for io_uring: the pipeline above cannot tell.
//!
//! A fixed pool ([`SERVICE_THREADS`]) per image shares one job channel; imago's
//! `FormatAccess` is `Send + Sync` and locks its allocator and caches itself, so reads run
//! in parallel and allocations serialise where they must.

use std::os::fd::BorrowedFd;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::Qcow2Image;
use crate::mailbox::Mailbox;
use crate::{BackendError, Completion, IoOp, OpKind};

/// Threads per image.
pub(crate) const SERVICE_THREADS: usize = 2;

/// Where a job's completion goes: the submitting engine's mailbox.
pub(crate) type Reply = Mailbox<Completion>;

struct Job {
    op: IoOp,
    reply: Arc<Reply>,
}

/// The pool of one image. Dropping it lets the threads finish the jobs they have and
/// joins them.
#[derive(Debug)]
pub(crate) struct Service {
    tx: Option<Mutex<Sender<Job>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Service {
    pub(crate) fn start(image: Arc<Qcow2Image>) -> std::io::Result<Service> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..SERVICE_THREADS)
            .map(|i| {
                let (image, rx) = (Arc::clone(&image), Arc::clone(&rx));
                std::thread::Builder::new().name(format!("vblk-qcow2-{i}")).spawn(move || serve(&image, &rx))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Service { tx: Some(Mutex::new(tx)), threads })
    }

    fn send(&self, job: Job) {
        let tx = self.tx.as_ref().expect("service running");
        if let Err(mpsc::SendError(job)) = tx.lock().unwrap_or_else(|p| p.into_inner()).send(job) {
            // Every thread is gone (one panicked): fail the op rather than lose it.
            let result = Err(BackendError::errno("qcow2 service", libc::EIO));
            job.reply.deliver(Completion { op: job.op, result });
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        drop(self.tx.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve(image: &Qcow2Image, rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return, // the service was dropped
        };
        // A malformed image must not take the daemon down: a panic inside the format code
        // fails this op (IOERR for the guest) and the thread goes on.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(image, &job.op))).unwrap_or_else(|_| {
                tracing::error!(
                    op = job.op.kind.name(),
                    offset = job.op.offset,
                    "qcow2 code panicked; failing the request"
                );
                Err(BackendError::errno("qcow2 (internal error)", libc::EIO))
            });
        job.reply.deliver(Completion { op: job.op, result });
    }
}

/// Carry out one op on the image.
fn run(image: &Qcow2Image, op: &IoOp) -> Result<u64, BackendError> {
    let io = |name: &'static str| move |source| BackendError::Io { op: name, source };
    match op.kind {
        OpKind::Read => {
            // SAFETY: `op` came through `Engine::push`, whose caller keeps its iovecs valid
            // until the completion is reaped, which happens after this returns.
            unsafe { image.readv(&op.iovs, op.offset) }.map_err(io("qcow2 read"))?;
            Ok(op.len)
        }
        OpKind::Write => {
            // SAFETY: as for the read.
            unsafe { image.writev(&op.iovs, op.offset) }.map_err(io("qcow2 write"))?;
            if op.fua {
                flush(image)?;
            }
            Ok(op.len)
        }
        OpKind::Flush => flush(image).map(|()| 0),
        OpKind::Discard => {
            image.discard(op.offset, op.len).map_err(io("qcow2 discard"))?;
            if op.fua {
                flush(image)?;
            }
            Ok(0)
        }
        OpKind::WriteZeroes { unmap } => {
            let r =
                if unmap { image.discard_to_zero(op.offset, op.len) } else { image.write_zeroes(op.offset, op.len) };
            r.map_err(io("qcow2 write-zeroes"))?;
            if op.fua {
                flush(image)?;
            }
            Ok(0)
        }
    }
}

/// A flush that, once failed, fails forever (see `disk.rs`, "sticky flush failure").
pub(crate) fn flush(image: &Qcow2Image) -> Result<(), BackendError> {
    if image.flush_failed() {
        return Err(BackendError::FlushFailedEarlier);
    }
    image.flush().map_err(|source| {
        image.mark_flush_failed();
        BackendError::Io { op: "qcow2 flush", source }
    })
}

/// An engine's side of the service: ops pushed since the last submit, and the reply the
/// service threads complete them into.
#[derive(Debug)]
pub(crate) struct Qcow2Queue {
    pending: Vec<IoOp>,
    reply: Arc<Reply>,
}

impl Qcow2Queue {
    /// A queue completing into `out` and signalling `eventfd` (the engine's; duplicated).
    pub(crate) fn new(eventfd: BorrowedFd<'_>) -> std::io::Result<Qcow2Queue> {
        Ok(Qcow2Queue { pending: Vec::new(), reply: Arc::new(Reply::new(eventfd)?) })
    }

    pub(crate) fn push(&mut self, op: IoOp) {
        self.pending.push(op);
    }

    pub(crate) fn unsubmitted(&self) -> usize {
        self.pending.len()
    }

    /// Hand every pending op to the service threads.
    pub(crate) fn submit(&mut self, service: &Service) {
        for op in self.pending.drain(..) {
            service.send(Job { op, reply: Arc::clone(&self.reply) });
        }
    }

    /// Move finished ops to `out`.
    pub(crate) fn reap(&self, out: &mut Vec<Completion>) {
        self.reply.take(out);
    }

    /// Ops handed to the service and not yet completed into the reply.
    pub(crate) fn outstanding(&self) -> usize {
        Arc::strong_count(&self.reply) - 1
    }

    /// The eventfd the service signals (to block on in `Engine::wait`).
    pub(crate) fn eventfd(&self) -> BorrowedFd<'_> {
        self.reply.eventfd()
    }
}

impl Drop for Qcow2Queue {
    /// The service threads may still be reading or writing guest memory for ops this
    /// queue handed over: wait until every job has been delivered (each holds the reply).
    fn drop(&mut self) {
        while self.outstanding() > 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}
