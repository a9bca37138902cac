//! A descriptor chain after validation: the request's buffers as two lists, the
//! device-readable part and the device-writable part (§2.7.4), each an [`Iov`] list that
//! points straight into guest memory.
//!
//! A chain is validated once, when it is popped ([`crate::SplitQueue::pop`]); everything
//! above this layer reads the readable part as a byte stream ([`Reader`]) and writes the
//! writable part as one ([`Writer`]), never looking at descriptors again. The chain keeps
//! the memory table its buffers point into alive until it is completed.
//!
//! `Chain` values are meant to be recycled: [`Chain::reset`] keeps the vectors'
//! capacity, so popping requests does not allocate once the slots are warm.

use std::sync::Arc;

use vblk_virtio::{GuestMemory, Iov, MemoryError};

use crate::ChainError;

/// A validated descriptor chain.
#[derive(Debug, Default)]
pub struct Chain {
    head: u16,
    mem: Option<Arc<GuestMemory>>,
    readable: Vec<Iov>,
    writable: Vec<Iov>,
    readable_len: u64,
    writable_len: u64,
    /// Descriptors behind `readable` / `writable` (a buffer crossing memory regions is
    /// one descriptor but several iovs).
    readable_descs: u16,
    writable_descs: u16,
}

/// The status byte of a refused chain, and how many writable bytes come before it (the
/// used length is 1 only when it is the chain's only writable byte, §2.7.8.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusByte {
    pub iov: Iov,
    pub writable_before: u64,
}

/// Where a refused chain can still be answered, found while its ring visits the chain's
/// data descriptors again (both rings do this): the last byte of the last descriptor
/// (§5.2.6), if that descriptor is device-writable, not empty, and the byte lies in guest
/// memory. `None` from [`found`](Self::found): nowhere to put a status, and the ring must
/// break rather than complete the chain silently (a Linux guest takes a stale status byte
/// for OK).
#[derive(Debug, Default)]
pub(crate) struct StatusSearch {
    /// The last descriptor seen: address, length, device-writable.
    last: Option<(u64, u32, bool)>,
    /// Device-writable bytes seen so far.
    writable: u64,
}

impl StatusSearch {
    pub(crate) fn visit(&mut self, addr: u64, len: u32, writable: bool) {
        if writable {
            self.writable = self.writable.saturating_add(len as u64);
        }
        self.last = Some((addr, len, writable));
    }

    pub(crate) fn found(self, mem: &GuestMemory) -> Option<StatusByte> {
        let (addr, len, _) = self.last.filter(|&(_, len, writable)| writable && len > 0)?;
        let iov = mem.iov(addr.checked_add(len as u64 - 1)?, 1).ok()?;
        Some(StatusByte { iov, writable_before: self.writable - 1 })
    }
}

/// Why a byte-stream access to a chain failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("the chain has only {available} bytes left, {wanted} wanted")]
    Short { available: u64, wanted: u64 },
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("the chain holds no memory table")]
    Detached,
}

impl Chain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Start a new chain with head `head` in memory `mem`, keeping vector capacity.
    pub fn reset(&mut self, head: u16, mem: &Arc<GuestMemory>) {
        self.head = head;
        self.mem = Some(Arc::clone(mem));
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
        self.readable_descs = 0;
        self.writable_descs = 0;
    }

    /// One descriptor's buffer (`addr`, `len`, device-writable or not) into the chain:
    /// one [`Iov`] per memory region it touches. The checks every ring applies to every
    /// data descriptor: not empty, inside guest memory, readable ones before writable ones
    /// (§2.7.4.2, §2.8.4.1).
    pub fn push_buffer(&mut self, mem: &GuestMemory, addr: u64, len: u32, writable: bool) -> Result<(), ChainError> {
        if len == 0 {
            return Err(ChainError::ZeroLength);
        }
        if writable {
            self.count_descriptor(true);
            mem.for_each_iov(addr, len, |iov| self.push_writable(iov))?;
        } else if self.has_writable_after_readable() {
            return Err(ChainError::ReadableAfterWritable);
        } else {
            self.count_descriptor(false);
            mem.for_each_iov(addr, len, |iov| self.push_readable(iov))?;
        }
        Ok(())
    }

    /// Drop the reference to guest memory (after completion).
    pub fn release(&mut self) {
        self.mem = None;
        self.readable.clear();
        self.writable.clear();
    }

    /// One more descriptor behind the iovs (a chain has at most 32768 descriptors: the
    /// largest ring, or indirect table, allowed).
    #[inline]
    pub(crate) fn count_descriptor(&mut self, writable: bool) {
        if writable {
            self.writable_descs += 1;
        } else {
            self.readable_descs += 1;
        }
    }

    pub(crate) fn push_readable(&mut self, iov: Iov) {
        self.readable_len += iov.len() as u64;
        self.readable.push(iov);
    }

    pub(crate) fn push_writable(&mut self, iov: Iov) {
        self.writable_len += iov.len() as u64;
        self.writable.push(iov);
    }

    /// Index of the head descriptor: what goes into the used ring.
    pub fn head(&self) -> u16 {
        self.head
    }

    pub fn memory(&self) -> Option<&Arc<GuestMemory>> {
        self.mem.as_ref()
    }

    pub fn readable(&self) -> &[Iov] {
        &self.readable
    }

    pub fn writable(&self) -> &[Iov] {
        &self.writable
    }

    /// Device-readable descriptors (what `seg_max` limits), not iovs.
    pub fn readable_descs(&self) -> u16 {
        self.readable_descs
    }

    /// Device-writable descriptors.
    pub fn writable_descs(&self) -> u16 {
        self.writable_descs
    }

    pub fn readable_len(&self) -> u64 {
        self.readable_len
    }

    pub fn writable_len(&self) -> u64 {
        self.writable_len
    }

    pub fn has_writable_after_readable(&self) -> bool {
        !self.writable.is_empty()
    }

    /// The device-readable bytes as a stream.
    pub fn reader(&self) -> Reader<'_> {
        Reader(Stream::new(self.mem.as_deref(), &self.readable, self.readable_len))
    }

    /// The device-writable bytes as a stream.
    pub fn writer(&self) -> Writer<'_> {
        Writer(Stream::new(self.mem.as_deref(), &self.writable, self.writable_len))
    }
}

/// Position inside an `Iov` list.
#[derive(Clone, Copy, Debug, Default)]
struct Cursor {
    index: usize,
    offset: u32,
}

impl Cursor {
    /// Walk `n` bytes of `iovs`, calling `f(iov, offset, len, done)` for each piece.
    fn walk(
        &mut self,
        iovs: &[Iov],
        mut n: u64,
        mut f: impl FnMut(Iov, u32, usize, usize) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        let mut done = 0usize;
        while n > 0 {
            let Some(iov) = iovs.get(self.index) else { break };
            let left = iov.len() - self.offset;
            let take = (left as u64).min(n) as u32;
            f(*iov, self.offset, take as usize, done)?;
            done += take as usize;
            n -= take as u64;
            self.offset += take;
            if self.offset == iov.len() {
                self.index += 1;
                self.offset = 0;
            }
        }
        Ok(())
    }

    /// The rest of `iovs` from here, as sub-buffers, limited to `limit` bytes.
    fn rest(&self, iovs: &[Iov], mut limit: u64, out: &mut Vec<Iov>) {
        for (i, iov) in iovs.iter().enumerate().skip(self.index) {
            if limit == 0 {
                break;
            }
            let start = if i == self.index { self.offset } else { 0 };
            let (_, tail) = iov.split_at(start);
            let (piece, _) = tail.split_at(limit.min(tail.len() as u64) as u32);
            if !piece.is_empty() {
                limit -= piece.len() as u64;
                out.push(piece);
            }
        }
    }
}

/// A position in a list of buffers, with the bytes left after it.
struct Stream<'a> {
    mem: Option<&'a GuestMemory>,
    iovs: &'a [Iov],
    pos: Cursor,
    remaining: u64,
}

impl<'a> Stream<'a> {
    fn new(mem: Option<&'a GuestMemory>, iovs: &'a [Iov], remaining: u64) -> Self {
        Stream { mem, iovs, pos: Cursor::default(), remaining }
    }

    fn check(&self, n: u64) -> Result<(), StreamError> {
        if n > self.remaining {
            return Err(StreamError::Short { available: self.remaining, wanted: n });
        }
        Ok(())
    }

    /// Move `n` bytes ahead without touching them.
    fn skip(&mut self, n: u64) -> Result<(), StreamError> {
        self.check(n)?;
        self.pos.walk(self.iovs, n, |_, _, _, _| Ok(()))?;
        self.remaining -= n;
        Ok(())
    }

    /// Move `n` bytes ahead, calling `f(memory, iov, offset, len, done)` for each piece.
    fn copy(
        &mut self,
        n: u64,
        mut f: impl FnMut(&GuestMemory, Iov, u32, usize, usize) -> Result<(), StreamError>,
    ) -> Result<(), StreamError> {
        self.check(n)?;
        let mem = self.mem.ok_or(StreamError::Detached)?;
        self.pos.walk(self.iovs, n, |iov, off, len, done| f(mem, iov, off, len, done))?;
        self.remaining -= n;
        Ok(())
    }
}

/// Reads the device-readable part of a chain as a byte stream.
pub struct Reader<'a>(Stream<'a>);

impl Reader<'_> {
    pub fn remaining(&self) -> u64 {
        self.0.remaining
    }

    /// Fill `buf` from the stream, across descriptor boundaries.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), StreamError> {
        self.0.copy(buf.len() as u64, |mem, iov, off, len, done| {
            mem.read_iov(iov, off, &mut buf[done..done + len]).map_err(StreamError::from)
        })
    }

    /// Skip `n` bytes without copying them.
    pub fn skip(&mut self, n: u64) -> Result<(), StreamError> {
        self.0.skip(n)
    }

    /// The unread bytes as buffers (for handing to the backend), without consuming them.
    pub fn rest(&self, out: &mut Vec<Iov>) {
        self.0.pos.rest(self.0.iovs, self.0.remaining, out);
    }
}

/// Writes the device-writable part of a chain as a byte stream.
pub struct Writer<'a>(Stream<'a>);

impl Writer<'_> {
    pub fn remaining(&self) -> u64 {
        self.0.remaining
    }

    /// Write all of `buf` to the stream.
    pub fn write_all(&mut self, buf: &[u8]) -> Result<(), StreamError> {
        self.0.copy(buf.len() as u64, |mem, iov, off, len, done| {
            mem.write_iov(iov, off, &buf[done..done + len]).map_err(StreamError::from)
        })
    }

    /// Up to `limit` unwritten bytes as buffers (for the backend to fill), not consumed.
    pub fn rest(&self, limit: u64, out: &mut Vec<Iov>) {
        self.0.pos.rest(self.0.iovs, limit.min(self.0.remaining), out);
    }

    /// Skip `n` bytes (they were filled by the backend).
    pub fn skip(&mut self, n: u64) -> Result<(), StreamError> {
        self.0.skip(n)
    }
}
