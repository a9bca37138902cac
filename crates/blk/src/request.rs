//! From a validated chain to a typed virtio-blk request (§5.2.6) — QEMU's
//! `virtio_blk_handle_request` switch, with every field the guest wrote checked.
//!
//! Layout rules (VERSION_1, any layout): the readable bytes start with the 16-byte
//! `virtio_blk_outhdr` (possibly split over descriptors), followed by write data or
//! discard segments; the writable bytes are read data (or the device ID) followed by the
//! one status byte, which is the *last* writable byte.

use vblk_queue::Chain;
use vblk_virtio::blk::{req_type, DiscardSegment, OutHdr, Status, ID_BYTES, SECTOR_SHIFT, SECTOR_SIZE};
use vblk_virtio::Iov;

use crate::config::{DeviceParams, MAX_DATA_SEGMENTS, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG};

/// A request that passed every check: what the backend must do. Offsets and lengths are
/// in bytes and lie inside the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset` into the writable data buffers.
    Read {
        offset: u64,
        len: u64,
    },
    /// Write the readable data buffers (`len` bytes) at `offset`.
    Write {
        offset: u64,
        len: u64,
    },
    Flush,
    /// Write the device ID (at most 20 bytes, never past the buffer).
    GetId {
        len: u32,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
}

/// Why a request failed, and the status it gets.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("no writable status byte")]
    NoStatus,
    #[error("request header shorter than 16 bytes ({0})")]
    ShortHeader(u64),
    #[error("unsupported request type {0:#x}")]
    Unsupported(u32),
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("sector {sector} + {len} bytes is outside the disk")]
    OutOfRange { sector: u64, len: u64 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("{0} data segments, at most {MAX_DATA_SEGMENTS} supported")]
    TooManySegments(usize),
    #[error("discard/write-zeroes segment list of {0} bytes (must be 16 * n, n >= 1)")]
    BadSegmentList(u64),
    #[error("{0} discard/write-zeroes segments, at most {MAX_DISCARD_SEG} supported")]
    TooManyDiscardSegments(u64),
    #[error("discard/write-zeroes flags {0:#x} not supported")]
    BadSegmentFlags(u32),
    #[error("{0} sectors is over the discard/write-zeroes limit")]
    DiscardTooLarge(u32),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("backend: {0}")]
    Backend(String),
    /// The backend moved fewer bytes than asked: the rest of a read's buffers holds stale
    /// memory, and a write is incomplete.
    #[error("backend transferred {done} of {len} bytes")]
    ShortTransfer { done: u64, len: u64 },
    #[error("backend queue full")]
    BackendFull,
}

impl RequestError {
    /// The status byte for this error (§5.2.6.1): UNSUPP for what the device does not
    /// implement, IOERR for everything else.
    pub fn status(&self) -> Status {
        match self {
            RequestError::Unsupported(_)
            | RequestError::TooManyDiscardSegments(_)
            | RequestError::BadSegmentFlags(_) => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

/// The outcome of parsing one chain.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// There is nowhere to write a status (no writable byte): the chain cannot be
    /// answered, and the queue must stop rather than return it silently.
    Unanswerable(RequestError),
    /// The request has a status byte; `request` is what to do, or why not.
    Answerable {
        /// The status byte (last writable byte).
        status: Iov,
        /// Writable bytes before the status byte (read data / device ID room).
        data_in_len: u64,
        request: Result<Request, RequestError>,
    },
}

/// The status byte of a chain: the last byte of its last writable buffer.
pub fn status_byte(chain: &Chain) -> Option<Iov> {
    let last = chain.writable().last()?;
    Some(last.split_at(last.len() - 1).1)
}

/// The request type in the chain's header, if it has a whole one (for the metrics of a
/// request that failed its checks: not on the path of valid requests).
pub fn header_type(chain: &Chain) -> Option<u32> {
    let mut hdr = [0u8; OutHdr::SIZE];
    chain.reader().read_exact(&mut hdr).ok()?;
    Some(OutHdr::from_bytes(&hdr).req_type)
}

/// Parse `chain` into a request.
pub fn parse(chain: &Chain, params: &DeviceParams) -> Parsed {
    let Some(status) = status_byte(chain) else {
        return Parsed::Unanswerable(RequestError::NoStatus);
    };
    let data_in_len = chain.writable_len() - 1;
    let mut reader = chain.reader();
    let mut hdr = [0u8; OutHdr::SIZE];
    let request = match reader.read_exact(&mut hdr) {
        Ok(()) => check(&OutHdr::from_bytes(&hdr), &mut reader, data_in_len, chain, params),
        Err(_) => Err(RequestError::ShortHeader(chain.readable_len())),
    };
    Parsed::Answerable { status, data_in_len, request }
}

fn check(
    hdr: &OutHdr,
    reader: &mut vblk_queue::Reader<'_>,
    data_in_len: u64,
    chain: &Chain,
    params: &DeviceParams,
) -> Result<Request, RequestError> {
    match hdr.req_type {
        req_type::IN => {
            let offset = sector_range(hdr.sector, data_in_len, params)?;
            segments(chain.writable_descs())?;
            Ok(Request::Read { offset, len: data_in_len })
        }
        req_type::OUT => {
            writable(params)?;
            let len = reader.remaining();
            let offset = sector_range(hdr.sector, len, params)?;
            segments(chain.readable_descs())?;
            Ok(Request::Write { offset, len })
        }
        req_type::FLUSH => Ok(Request::Flush),
        req_type::GET_ID => Ok(Request::GetId { len: data_in_len.min(ID_BYTES as u64) as u32 }),
        t @ (req_type::DISCARD | req_type::WRITE_ZEROES) => {
            writable(params)?;
            let n = reader.remaining();
            if n == 0 || !n.is_multiple_of(DiscardSegment::SIZE as u64) {
                return Err(RequestError::BadSegmentList(n));
            }
            let count = n / DiscardSegment::SIZE as u64;
            if count > MAX_DISCARD_SEG as u64 {
                return Err(RequestError::TooManyDiscardSegments(count));
            }
            let mut b = [0u8; DiscardSegment::SIZE];
            reader.read_exact(&mut b).map_err(|e| RequestError::Memory(e.to_string()))?;
            let seg = DiscardSegment::from_bytes(&b);
            let allowed = if t == req_type::DISCARD { 0 } else { DiscardSegment::FLAG_UNMAP };
            if seg.flags & !allowed != 0 {
                return Err(RequestError::BadSegmentFlags(seg.flags));
            }
            if seg.num_sectors > MAX_DISCARD_SECTORS {
                return Err(RequestError::DiscardTooLarge(seg.num_sectors));
            }
            let len = (seg.num_sectors as u64) << SECTOR_SHIFT;
            let offset = sector_range(seg.sector, len, params)?;
            Ok(if t == req_type::DISCARD {
                Request::Discard { offset, len }
            } else {
                Request::WriteZeroes { offset, len, unmap: seg.flags & DiscardSegment::FLAG_UNMAP != 0 }
            })
        }
        // SCSI passthrough, the legacy barrier flag, zoned and secure-erase commands and
        // anything unknown.
        other => Err(RequestError::Unsupported(other)),
    }
}

fn writable(params: &DeviceParams) -> Result<(), RequestError> {
    if params.readonly {
        Err(RequestError::ReadOnly)
    } else {
        Ok(())
    }
}

/// At most `MAX_DATA_SEGMENTS` data descriptors plus the header or status one.
fn segments(descs: u16) -> Result<(), RequestError> {
    if descs as u32 > MAX_DATA_SEGMENTS + 1 {
        Err(RequestError::TooManySegments(descs as usize))
    } else {
        Ok(())
    }
}

/// Byte offset of `[sector, sector + len)` if `len` is whole sectors and the range lies
/// inside the disk; overflow-safe.
fn sector_range(sector: u64, len: u64, params: &DeviceParams) -> Result<u64, RequestError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::Unaligned(len));
    }
    let offset = sector.checked_mul(SECTOR_SIZE);
    match offset.and_then(|o| o.checked_add(len)) {
        Some(end) if end <= params.capacity_sectors() << SECTOR_SHIFT => Ok(sector * SECTOR_SIZE),
        _ => Err(RequestError::OutOfRange { sector, len }),
    }
}

/// The data buffers of a read or write request, appended to `out`.
pub fn data_buffers(chain: &Chain, request: &Request, out: &mut Vec<Iov>) {
    match *request {
        Request::Read { len, .. } => chain.writer().rest(len, out),
        Request::Write { .. } => {
            let mut r = chain.reader();
            // The header was read successfully by `parse`, so this cannot fail.
            if r.skip(OutHdr::SIZE as u64).is_ok() {
                r.rest(out);
            }
        }
        _ => {}
    }
}
