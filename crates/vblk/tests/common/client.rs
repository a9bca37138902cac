//! A one-queue `vblk_driver` client for tests that talk to a backend process directly:
//! one request at a time (or a batch), each answer checked by the caller.

use std::path::Path;

use vblk_driver::{Completion, Device, IoBuf, Op, Options, QueueHandle, RequestFailure};

/// The byte a read buffer holds before the device fills it.
pub const UNREAD: u8 = 0xee;

pub struct Client {
    pub q: QueueHandle,
    _dev: Device,
}

impl Client {
    /// Connects (panicking with the reason if the backend refuses) with one queue.
    pub fn connect(socket: &Path) -> Client {
        let mut dev = Device::connect(socket, &Options::default())
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", socket.display()));
        let q = dev.take_queues().remove(0);
        Client { q, _dev: dev }
    }

    /// A buffer holding `data`.
    pub fn buf(&self, data: &[u8]) -> IoBuf {
        let b = self.q.alloc(data.len() as u32).expect("alloc");
        b.write_at(0, data).expect("fill buffer");
        b
    }

    /// Submits without kicking.
    pub fn submit(&mut self, op: Op, buf: Option<IoBuf>, user: u64) {
        self.q.submit(op, buf, user).expect("submit");
    }

    /// Kicks and waits for at least one completion.
    pub fn wait_some(&mut self) -> Vec<Completion> {
        self.q.kick().expect("kick");
        let mut out = Vec::new();
        self.q.wait(&mut out, 1).expect("no answer from the backend");
        out
    }

    /// One request, waited for.
    pub fn one(&mut self, op: Op, buf: Option<IoBuf>) -> Completion {
        self.submit(op, buf, 0);
        let mut c = self.wait_some();
        assert_eq!(c.len(), 1);
        c.remove(0)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), RequestFailure> {
        let b = self.buf(data);
        self.one(Op::Write { offset }, Some(b)).result
    }

    /// Reads `len` bytes into a buffer first filled with [`UNREAD`].
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, RequestFailure> {
        let b = self.buf(&vec![UNREAD; len]);
        let c = self.one(Op::Read { offset }, Some(b));
        c.result.map(|()| c.buf.expect("read buffer handed back").to_vec().expect("read buffer"))
    }

    pub fn flush(&mut self) -> Result<(), RequestFailure> {
        self.one(Op::Flush, None).result
    }
}
