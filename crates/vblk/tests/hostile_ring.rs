//! A hostile guest driver against vblk's data path (issue 5, item 1): malformed requests,
//! headers, status bytes, descriptor chains and rings, written byte by byte with
//! `vblk_driver::raw::ring`, each case run against the in-process loopback and against
//! a spawned `vblk serve` (`loopback::<case>`, `serve::<case>`).
//!
//! Outcomes follow virtio 1.2:
//! - a request with a status byte gets one (§5.2.6): IOERR for bad ranges, lengths and
//!   writes to a read-only disk, UNSUPP for types and discard/write-zeroes options the
//!   device does not offer (§5.2.6.2); the used length is every writable byte (as QEMU);
//! - a chain with nowhere to put a status (header short of 16 bytes, no writable byte)
//!   or that breaks the descriptor rules of §2.7.5 (loops, bad `next`, bad indirect tables
//!   §2.7.5.3, buffers outside memory, zero-length buffers) is returned with used length 0
//!   and nothing written; the queue goes on;
//! - a broken *ring* (§2.7.6: a head ≥ queue size, the avail index running more than the
//!   queue size ahead, a head made available again while in flight) stops that queue and
//!   signals its vring err eventfd (the vhost-user stand-in for DEVICE_NEEDS_RESET, §2.1.2);
//!   the other queue, and the next connection, keep working.
//!
//! After every case [`hostile::Rig::finish`] checks that valid requests still work and
//! that the canaries around the target sectors are unchanged, and that `vblk serve` is
//! alive and not spinning.

mod common;
#[macro_use]
mod hostile;

use hostile::*;
use vblk_driver::raw::ring::{Buffer, Descriptor, UsedElem, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use vblk_driver::IoBuf;
use vblk_virtio::blk::{req_type, DiscardSegment};

hostile_cases!(
    reads_and_writes_past_the_end_are_ioerr,
    sector_overflow_is_ioerr,
    lengths_not_a_multiple_of_512_are_ioerr,
    unknown_scsi_and_barrier_types_are_unsupp,
    writes_discards_and_write_zeroes_on_a_readonly_export_are_ioerr,
    discard_and_write_zeroes_with_two_segments_are_unsupp,
    unknown_segment_flags_are_unsupp,
    unmap_on_discard_is_unsupp,
    num_sectors_above_the_limit_is_ioerr,
    a_header_shorter_than_16_bytes_is_ioerr,
    a_header_split_over_descriptors_is_valid,
    a_request_without_a_status_breaks_the_queue,
    a_readonly_status_byte_breaks_the_queue,
    a_zero_length_status_breaks_the_queue,
    a_descriptor_pointing_at_itself_breaks_the_queue,
    a_two_descriptor_cycle_breaks_the_queue,
    next_beyond_the_queue_size_breaks_the_queue,
    a_chain_longer_than_the_queue_breaks_the_queue,
    nested_indirect_tables_break_the_queue,
    indirect_tables_of_bad_length_break_the_queue,
    an_indirect_table_of_65535_entries_breaks_the_queue,
    indirect_tables_outside_memory_break_the_queue,
    buffers_outside_memory_or_straddling_its_end_are_ioerr,
    a_head_beyond_the_queue_size_breaks_the_queue,
    an_avail_index_jump_breaks_the_queue,
    the_same_head_twice_while_pending_breaks_the_queue,
    get_id_writes_only_into_the_buffer_it_was_given,
    short_or_failed_reads_never_expose_other_data,
);

/// `[header(t, sector), data, status]` at head 0, data writable for IN-like types.
fn request(rig: &Rig, t: u32, sector: u64, data: Buffer) -> [Buffer; 3] {
    [hdr(&rig.q, 0, t, sector), data, status(&rig.q, 0)]
}

fn segment_request(rig: &Rig, t: u32, segs: &[DiscardSegment]) -> Vec<Buffer> {
    let addr = rig.q.slot(0) + 32;
    let bytes: Vec<u8> = segs.iter().flat_map(|s| s.to_bytes()).collect();
    rig.q.write_mem(addr, &bytes).expect("segments");
    vec![hdr(&rig.q, 0, t, 0), Buffer { addr, len: bytes.len() as u32, write: false }, status(&rig.q, 0)]
}

fn seg(offset: u64, sectors: u32, flags: u32) -> DiscardSegment {
    DiscardSegment { sector: offset / SECTOR, num_sectors: sectors, flags }
}

/// A valid indirect table `[header IN at TARGET, data, status]` for head 0, in its slot
/// (descriptor 0 not touched). Returns its address.
fn valid_table(rig: &Rig, data: &IoBuf) -> u64 {
    let bufs = [hdr(&rig.q, 0, req_type::IN, TARGET / SECTOR), writable(data), status(&rig.q, 0)];
    let addr = table_addr(&rig.q, 0);
    write_table(&rig.q, addr, &table_of(&bufs));
    addr
}

fn reads_and_writes_past_the_end_are_ioerr(t: Target) {
    let mut rig = Rig::new(t);
    let b = rig.buf(512);
    for sector in [DISK / SECTOR, DISK / SECTOR + 1, u32::MAX as u64] {
        let r = request(&rig, req_type::IN, sector, writable(&b));
        rig.expect_status(&r, IOERR);
        let w = request(&rig, req_type::OUT, sector, readable(&b));
        rig.expect_status(&w, IOERR);
    }
    assert_untouched(&b, "read past the end");
    rig.finish();
}

fn sector_overflow_is_ioerr(t: Target) {
    let mut rig = Rig::new(t);
    let b = rig.buf(512);
    // sector * 512 overflows u64; sector * 512 + len overflows u64; the largest sector.
    for sector in [u64::MAX / SECTOR + 1, u64::MAX / SECTOR, u64::MAX] {
        let r = request(&rig, req_type::IN, sector, writable(&b));
        rig.expect_status(&r, IOERR);
        let w = request(&rig, req_type::OUT, sector, readable(&b));
        rig.expect_status(&w, IOERR);
    }
    for t2 in [req_type::DISCARD, req_type::WRITE_ZEROES] {
        let r = segment_request(&rig, t2, &[DiscardSegment { sector: u64::MAX / SECTOR, num_sectors: 8, flags: 0 }]);
        rig.expect_status(&r, IOERR);
    }
    assert_untouched(&b, "read at an overflowing sector");
    rig.finish();
}

fn lengths_not_a_multiple_of_512_are_ioerr(t: Target) {
    let mut rig = Rig::new(t);
    for len in [1, 100, 511, 513, 4095] {
        let b = rig.buf(len);
        let r = request(&rig, req_type::IN, TARGET / SECTOR, writable(&b));
        rig.expect_status(&r, IOERR);
        assert_untouched(&b, "unaligned read");
        let w = request(&rig, req_type::OUT, TARGET / SECTOR, readable(&b));
        rig.expect_status(&w, IOERR);
    }
    rig.finish();
}

fn unknown_scsi_and_barrier_types_are_unsupp(t: Target) {
    let mut rig = Rig::new(t);
    let b = rig.buf(512);
    // SCSI_CMD, legacy FLUSH_OUT, GET_LIFETIME, SECURE_ERASE and the zoned commands (not
    // offered), the legacy barrier flag on IN and OUT, and junk.
    let types = [
        req_type::SCSI_CMD,
        5,
        10,
        14,
        15,
        16,
        18,
        req_type::IN | req_type::BARRIER,
        req_type::OUT | req_type::BARRIER,
        req_type::BARRIER,
        0x1234_5678,
        u32::MAX,
    ];
    for ty in types {
        let r = request(&rig, ty, TARGET / SECTOR, writable(&b));
        rig.expect_status(&r, UNSUPP);
        let w = request(&rig, ty, TARGET / SECTOR, readable(&b));
        rig.expect_status(&w, UNSUPP);
    }
    assert_untouched(&b, "unsupported request");
    rig.finish();
}

fn writes_discards_and_write_zeroes_on_a_readonly_export_are_ioerr(t: Target) {
    let mut rig = Rig::with(t, Setup { readonly: true, ..Setup::default() });
    let b = rig.q.alloc(4096).expect("alloc");
    b.write_at(0, &common::pattern(7, 4096)).expect("data");
    let w = request(&rig, req_type::OUT, TARGET / SECTOR, readable(&b));
    rig.expect_status(&w, IOERR);
    for (ty, flags) in [(req_type::DISCARD, 0), (req_type::WRITE_ZEROES, 0), (req_type::WRITE_ZEROES, 1)] {
        let r = segment_request(&rig, ty, &[seg(TARGET, 8, flags)]);
        rig.expect_status(&r, IOERR);
    }
    // Reads and flushes still work.
    let f = [hdr(&rig.q, 0, req_type::FLUSH, 0), status(&rig.q, 0)];
    rig.expect_status(&f, OK);
    rig.finish();
}

fn discard_and_write_zeroes_with_two_segments_are_unsupp(t: Target) {
    let mut rig = Rig::new(t);
    for ty in [req_type::DISCARD, req_type::WRITE_ZEROES] {
        let r = segment_request(&rig, ty, &[seg(TARGET, 8, 0), seg(TARGET + 8192, 8, 0)]);
        rig.expect_status(&r, UNSUPP);
    }
    rig.finish();
}

fn unknown_segment_flags_are_unsupp(t: Target) {
    let mut rig = Rig::new(t);
    for ty in [req_type::DISCARD, req_type::WRITE_ZEROES] {
        for flags in [2, 0x8000_0000, u32::MAX] {
            let r = segment_request(&rig, ty, &[seg(TARGET, 8, flags)]);
            rig.expect_status(&r, UNSUPP);
        }
    }
    rig.finish();
}

fn unmap_on_discard_is_unsupp(t: Target) {
    let mut rig = Rig::new(t);
    let r = segment_request(&rig, req_type::DISCARD, &[seg(TARGET, 8, DiscardSegment::FLAG_UNMAP)]);
    rig.expect_status(&r, UNSUPP);
    rig.finish();
}

fn num_sectors_above_the_limit_is_ioerr(t: Target) {
    let mut rig = Rig::new(t);
    let info = rig.info();
    for (ty, max) in
        [(req_type::DISCARD, info.max_discard_sectors), (req_type::WRITE_ZEROES, info.max_write_zeroes_sectors)]
    {
        assert!(max > 0 && max < u32::MAX, "the device advertises a limit");
        for n in [max + 1, u32::MAX] {
            let r = segment_request(&rig, ty, &[seg(TARGET, n, 0)]);
            rig.expect_status(&r, IOERR);
        }
    }
    rig.finish();
}

fn a_header_shorter_than_16_bytes_is_ioerr(t: Target) {
    let mut rig = Rig::new(t);
    // The header is the first 16 readable bytes, across descriptors: only a readable part
    // shorter than 16 bytes in all leaves no header to act on. The status byte is there.
    for short in [1, 8, 15] {
        let mut h = hdr(&rig.q, 0, req_type::FLUSH, 0);
        h.len = short;
        rig.expect_status(&[h, status(&rig.q, 0)], IOERR);
        let b = rig.buf(4096);
        let mut h = hdr(&rig.q, 0, req_type::IN, TARGET / SECTOR);
        h.len = short;
        rig.expect_status(&[h, writable(&b), status(&rig.q, 0)], IOERR);
        assert_untouched(&b, "read with a short header");
    }
    rig.finish();
}

fn a_header_split_over_descriptors_is_valid(t: Target) {
    let mut rig = Rig::new(t);
    let data = common::pattern(11, 4096);
    let b = rig.q.alloc(4096).expect("alloc");
    b.write_at(0, &data).expect("data");
    for (k, cut) in [1u32, 8, 15].into_iter().enumerate() {
        let offset = TARGET + k as u64 * 4096;
        let h = hdr(&rig.q, 0, req_type::OUT, offset / SECTOR);
        // The second part lives elsewhere: a real split, not adjacent buffers.
        let mut tail = [0u8; 16];
        rig.q.read_mem(h.addr, &mut tail).expect("header");
        rig.q.write_mem(h.addr + 48, &tail[cut as usize..]).expect("tail");
        let first = Buffer { addr: h.addr, len: cut, write: false };
        let second = Buffer { addr: h.addr + 48, len: 16 - cut, write: false };
        rig.expect_status(&[first, second, readable(&b), status(&rig.q, 0)], OK);
        rig.expect_written(offset, &data);
        // And a read with a split header returns it.
        let h = hdr(&rig.q, 0, req_type::IN, offset / SECTOR);
        rig.q.read_mem(h.addr, &mut tail).expect("header");
        rig.q.write_mem(h.addr + 48, &tail[cut as usize..]).expect("tail");
        let r = rig.buf(4096);
        let first = Buffer { addr: h.addr, len: cut, write: false };
        let second = Buffer { addr: h.addr + 48, len: 16 - cut, write: false };
        rig.expect_status(&[first, second, writable(&r), status(&rig.q, 0)], OK);
        assert_eq!(r.to_vec().expect("read"), data);
    }
    rig.finish();
}

fn a_request_without_a_status_breaks_the_queue(t: Target) {
    let mut rig = Rig::new(t);
    let b = rig.q.alloc(4096).expect("alloc");
    b.write_at(0, &common::pattern(6, 4096)).expect("data");
    // A write with only readable buffers: it must not be performed (nothing to report it;
    // `recover` checks the disk at TARGET is unchanged).
    rig.expect_chain_breaks(&[hdr(&rig.q, 0, req_type::OUT, TARGET / SECTOR), readable(&b)]);
    let mut rig = rig.recover();
    rig.expect_chain_breaks(&[hdr(&rig.q, 0, req_type::FLUSH, 0)]);
    rig.finish();
}

fn a_readonly_status_byte_breaks_the_queue(t: Target) {
    let mut rig = Rig::new(t);
    let b = rig.q.alloc(4096).expect("alloc");
    b.write_at(0, &common::pattern(8, 4096)).expect("data");
    let mut s = status(&rig.q, 0);
    s.write = false;
    rig.expect_chain_breaks(&[hdr(&rig.q, 0, req_type::OUT, TARGET / SECTOR), readable(&b), s]);
    assert_eq!(status_of(&rig.q, &[s]), UNTOUCHED, "a device-readable status byte was written");
    rig.finish();
}

fn a_zero_length_status_breaks_the_queue(t: Target) {
    let mut rig = Rig::new(t);
    let b = rig.buf(4096);
    let mut s = status(&rig.q, 0);
    s.len = 0;
    rig.expect_chain_breaks(&[hdr(&rig.q, 0, req_type::IN, TARGET / SECTOR), writable(&b), s]);
    assert_untouched(&b, "read with a zero-length status");
    assert_eq!(status_of(&rig.q, &[Buffer { len: 1, ..s }]), UNTOUCHED);
    rig.finish();
}

/// Descriptor `i` holding a request header, with `next`.
fn looping(rig: &Rig, i: u16, next: u16) {
    let h = hdr(&rig.q, 0, req_type::IN, TARGET / SECTOR);
    rig.q.write_desc(i, Descriptor { addr: h.addr, len: h.len, flags: DESC_F_NEXT, next }).expect("desc");
}

fn a_descriptor_pointing_at_itself_breaks_the_queue(t: Target) {
    let mut rig = Rig::new(t);
    looping(&rig, 0, 0);
    rig.expect_head_breaks();
    rig.finish();
}

fn a_two_descriptor_cycle_breaks_the_queue(t: Target) {
    let mut rig = Rig::new(t);
    looping(&rig, 0, 1);
    looping(&rig, 1, 0);
    rig.expect_head_breaks();
    rig.finish();
}

fn next_beyond_the_queue_size_breaks_the_queue(t: Target) {
    let mut rig = Rig::new(t);
    for next in [QSIZE, QSIZE + 1, u16::MAX] {
        looping(&rig, 0, next);
        rig.expect_head_breaks();
        rig = rig.recover();
    }
    rig.finish();
}

fn a_chain_longer_than_the_queue_breaks_the_queue(t: Target) {
    let mut rig = Rig::new(t);
    // Every descriptor of the table, then back to the first: QSIZE + 1 and on.
    for i in 0..QSIZE {
        looping(&rig, i, (i + 1) % QSIZE);
    }
    rig.expect_head_breaks();
    rig.finish();
}

fn indirect(rig: &Rig, addr: u64, len: u32) {
    rig.q.write_desc(0, Descriptor { addr, len, flags: DESC_F_INDIRECT, next: 0 }).expect("desc");
}

fn nested_indirect_tables_break_the_queue(t: Target) {
    let mut rig = Rig::new(t);
    let b = rig.buf(4096);
    let inner = valid_table(&rig, &b);
    let outer = rig.q.slot(1);
    write_table(&rig.q, outer, &[Descriptor { addr: inner, len: 48, flags: DESC_F_INDIRECT, next: 0 }]);
    indirect(&rig, outer, 16);
    rig.expect_head_breaks();
    // The inner table alone is a valid request (the case is refused for nesting only).
    let mut rig = rig.recover();
    let b = rig.buf(4096);
    let inner = valid_table(&rig, &b);
    indirect(&rig, inner, 48);
    let used = submit(&mut rig.q, 0);
    assert_eq!(used, UsedElem { id: 0, len: 4097 });
    let mut s = [0u8];
    rig.q.read_mem(rig.q.slot(0) + 16, &mut s).expect("status");
    assert_eq!(s[0], OK);
    assert_eq!(b.to_vec().expect("data"), rig.canary(TARGET, 4096));
    rig.finish();
}

fn indirect_tables_of_bad_length_break_the_queue(t: Target) {
    let mut rig = Rig::new(t);
    let b = rig.buf(4096);
    for len in [0, 1, 15, 17, 47, 40] {
        let addr = valid_table(&rig, &b);
        indirect(&rig, addr, len);
        rig.expect_head_breaks();
        assert_untouched(&b, "read through a refused indirect table");
        rig = rig.recover();
    }
    rig.finish();
}

fn an_indirect_table_of_65535_entries_breaks_the_queue(t: Target) {
    let mut rig = Rig::new(t);
    // A well-formed FLUSH of 65535 entries (header, 65533 readable bytes, status): only
    // its length is wrong (at most max(queue size, 1024) entries).
    let n = 65535u32;
    let tbl = rig.q.alloc(n * 16).expect("alloc table");
    let h = hdr(&rig.q, 0, req_type::FLUSH, 0);
    let s = status(&rig.q, 0);
    let mut bytes = Vec::with_capacity(n as usize * 16);
    for i in 0..n {
        let (addr, len, flags) = match i {
            0 => (h.addr, 16, DESC_F_NEXT),
            i if i == n - 1 => (s.addr, 1, DESC_F_WRITE),
            _ => (h.addr, 1, DESC_F_NEXT),
        };
        let next = if i == n - 1 { 0 } else { (i + 1) as u16 };
        bytes.extend_from_slice(&Descriptor { addr, len, flags, next }.to_bytes());
    }
    tbl.write_at(0, &bytes).expect("table");
    indirect(&rig, tbl.gpa(), n * 16);
    rig.expect_head_breaks();
    assert_eq!(status_of(&rig.q, &[s]), UNTOUCHED);
    rig.finish();
}

fn indirect_tables_outside_memory_break_the_queue(t: Target) {
    let mut rig = Rig::new(t);
    let end = rig.q.memory_size();
    for addr in [end, end + 4096, end - 16, u64::MAX - 15, u64::MAX - 47] {
        indirect(&rig, addr, 48);
        rig.expect_head_breaks();
        rig = rig.recover();
    }
    rig.finish();
}

fn buffers_outside_memory_or_straddling_its_end_are_ioerr(t: Target) {
    let mut rig = Rig::new(t);
    let end = rig.q.memory_size();
    for (addr, len) in [(end, 512), (end + (1 << 30), 512), (end - 256, 512), (end - 1, 2), (u64::MAX - 255, 512)] {
        // The chain is refused, but its status byte is in memory: IOERR there.
        let outside = Buffer { addr, len, write: true };
        rig.expect_status(&[hdr(&rig.q, 0, req_type::IN, TARGET / SECTOR), outside, status(&rig.q, 0)], IOERR);
        let outside = Buffer { addr, len, write: false };
        rig.expect_status(&[hdr(&rig.q, 0, req_type::OUT, TARGET / SECTOR), outside, status(&rig.q, 0)], IOERR);
    }
    rig.finish();
}

fn a_head_beyond_the_queue_size_breaks_the_queue(t: Target) {
    let mut rig = Rig::new(t);
    let b = rig.buf(512);
    let r = request(&rig, req_type::IN, TARGET / SECTOR, writable(&b));
    rig.q.write_chain(0, &r).expect("chain");
    rig.q.add_avail(QSIZE);
    rig.q.publish();
    rig.expect_broken(0);
    assert_untouched(&b, "broken queue");
    rig.finish();
}

fn an_avail_index_jump_breaks_the_queue(t: Target) {
    let mut rig = Rig::new(t);
    // GET_ID completes while it is popped, so head 0 could legally come again and again:
    // only the index check stops `size + 1` entries made available at once.
    let b = rig.buf(20);
    let r = request(&rig, req_type::GET_ID, 0, writable(&b));
    rig.q.write_chain(0, &r).expect("chain");
    for k in 0..QSIZE {
        rig.q.set_avail_entry(k, 0);
    }
    let idx = rig.q.avail_idx().wrapping_add(QSIZE + 1);
    rig.q.set_avail_idx(idx);
    rig.expect_broken(0);
    assert_untouched(&b, "broken queue");
    rig.finish();
}

/// The device cannot complete a head twice (the driver could not tell the completions
/// apart) and must not hold more requests than the ring has heads: it breaks the queue,
/// like QEMU's `virtqueue_pop` ("Virtqueue size exceeded") — refusing the chain would need
/// a second used entry for a head still in flight. Requests popped before complete.
fn the_same_head_twice_while_pending_breaks_the_queue(t: Target) {
    let mut rig = Rig::new(t);
    let b = rig.buf(4096);
    let r = request(&rig, req_type::IN, TARGET / SECTOR, writable(&b));
    rig.q.write_chain(0, &r).expect("chain");
    rig.q.add_avail(0);
    rig.q.add_avail(0);
    rig.q.publish();
    let done = rig.expect_broken(1);
    assert_eq!(done, vec![UsedElem { id: 0, len: 4097 }]);
    assert_eq!(status_of(&rig.q, &r), OK, "the first copy completes");
    assert_eq!(b.to_vec().expect("data"), rig.canary(TARGET, 4096));
    rig.finish();
}

fn get_id_writes_only_into_the_buffer_it_was_given(t: Target) {
    let mut rig = Rig::new(t);
    let serial = rig.serial();
    let b = rig.buf(64);
    for len in [1u32, 4, 19, 20, 21, 64] {
        b.write_at(0, &[FILL; 64]).expect("fill");
        let d = Buffer { addr: b.gpa(), len, write: true };
        let r = [hdr(&rig.q, 0, req_type::GET_ID, 0), d, status(&rig.q, 0)];
        // Used length: the ID bytes written, and the status only when nothing is unwritten
        // before it (§2.7.8.2).
        rig.expect_answer(&r, OK, if len <= 20 { len + 1 } else { 20 });
        let v = b.to_vec().expect("id");
        let n = (len as usize).min(20);
        assert_eq!(&v[..n], &serial[..n], "GET_ID into {len} bytes");
        assert!(v[n..].iter().all(|&x| x == FILL), "GET_ID into {len} bytes wrote past {n}: {v:?}");
    }
    rig.finish();
}

fn short_or_failed_reads_never_expose_other_data(t: Target) {
    let mut rig = Rig::new(t);
    // Crossing the end of the disk: no partial read of the last sector.
    let b = rig.buf(1024);
    let r = request(&rig, req_type::IN, DISK / SECTOR - 1, writable(&b));
    rig.expect_status(&r, IOERR);
    assert_untouched(&b, "read across the end of the disk");
    // Not a whole sector: nothing read.
    let b = rig.buf(513);
    let r = request(&rig, req_type::IN, TARGET / SECTOR, writable(&b));
    rig.expect_status(&r, IOERR);
    assert_untouched(&b, "read of 513 bytes");
    // Half the buffer outside memory: the chain is refused before any I/O.
    let b = rig.buf(4096);
    let outside = Buffer { addr: rig.q.memory_size(), len: 4096, write: true };
    let r = [hdr(&rig.q, 0, req_type::IN, TARGET / SECTOR), writable(&b), outside, status(&rig.q, 0)];
    rig.expect_status(&r, IOERR);
    assert_untouched(&b, "read with half its buffer outside memory");
    rig.finish();
}
