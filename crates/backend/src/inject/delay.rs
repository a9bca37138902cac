//! Injected delays: ops an [`crate::Engine`] holds back until a deadline.
//!
//! Nothing sleeps and no thread is started. Held ops wait in a list; a timerfd is armed
//! for the earliest deadline, and the engine's completion fd becomes an epoll instance
//! watching both the completion eventfd and the timerfd, so a worker sleeping in `poll`
//! on it wakes up when the first deadline passes. The engine then releases every op whose
//! deadline has passed (in `reap`/`poll_completions`) and re-arms the timer.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use super::Outcome;
use crate::{sys, BackendError, IoOp};

/// One held op.
#[derive(Debug)]
struct Held {
    deadline: Instant,
    op: IoOp,
    outcome: Outcome,
}

/// The held ops of one engine, and the timer that wakes it for them.
#[derive(Debug)]
pub(crate) struct DelayQueue {
    held: Vec<Held>,
    timer: OwnedFd,
    /// Readable while the completion eventfd or the timer is: the engine's completion fd.
    epoll: OwnedFd,
    /// The deadline the timer is armed for.
    armed: Option<Instant>,
}

impl DelayQueue {
    /// A queue whose [`DelayQueue::poll_fd`] also reports `completion_eventfd`.
    pub(crate) fn new(completion_eventfd: BorrowedFd<'_>) -> Result<DelayQueue, BackendError> {
        let io = |op| move |source| BackendError::Io { op, source };
        let timer = sys::timerfd().map_err(io("timerfd_create"))?;
        let epoll = sys::epoll_watching(&[completion_eventfd, timer.as_fd()]).map_err(io("epoll"))?;
        Ok(DelayQueue { held: Vec::new(), timer, epoll, armed: None })
    }

    /// The fd to poll instead of the completion eventfd.
    pub(crate) fn poll_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }

    /// Hold `op` until `deadline`, then apply `outcome` to it.
    pub(crate) fn hold(&mut self, op: IoOp, deadline: Instant, outcome: Outcome) {
        self.held.push(Held { deadline, op, outcome });
        if self.armed.is_none_or(|t| deadline < t) {
            self.arm(Some(deadline));
        }
    }

    /// The earliest deadline of a held op.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.held.iter().map(|h| h.deadline).min()
    }

    /// Move every op whose deadline has passed to `out`, oldest push first.
    pub(crate) fn take_due(&mut self, now: Instant, out: &mut Vec<(IoOp, Outcome)>) {
        if self.next_deadline().is_none_or(|t| t > now) {
            return;
        }
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].deadline <= now {
                let h = self.held.remove(i);
                out.push((h.op, h.outcome));
            } else {
                i += 1;
            }
        }
    }

    /// Consume a timer expiry, and re-arm the timer for the earliest held op (or disarm it).
    pub(crate) fn rearm(&mut self) {
        sys::eventfd_clear(self.timer.as_fd());
        let next = self.next_deadline();
        if next.is_some() || self.armed.is_some() {
            self.arm(next);
        }
    }

    fn arm(&mut self, deadline: Option<Instant>) {
        let after = deadline.map(|t| t.saturating_duration_since(Instant::now()));
        match sys::timerfd_set(self.timer.as_fd(), after) {
            Ok(()) => self.armed = deadline,
            Err(e) => {
                // Not fatal: the ops are released at the next reap, and `Engine::wait`
                // sleeps until their deadline.
                tracing::warn!(error = %e, "cannot arm the fault-injection delay timer");
                self.armed = None;
            }
        }
    }
}
