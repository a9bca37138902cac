//! A hostile guest driver against vblk's packed virtqueue (virtio 1.2 §2.8): buffer ids,
//! slot flags, chains, indirect tables, event suppression structures and vring bases
//! written slot by slot with `vblk_driver::raw::packed`, each case run against the
//! in-process loopback and against a spawned `vblk serve` (`loopback::<case>`,
//! `serve::<case>`): the packed counterpart of `hostile_ring.rs` and
//! `hostile_ring_bounds.rs`.
//!
//! Outcomes:
//! - a broken *ring* stops that queue and signals its vring err eventfd: a buffer id out
//!   of range or still in flight (§2.8.6), a chain with no end inside the ring, a chain
//!   continuing into a slot not made available with it (§2.8.21.1), the driver lapping the
//!   device (more slots available than the ring holds), a vring base outside the ring;
//! - a chain whose buffers are bad (outside memory, zero length, readable after writable,
//!   also inside an indirect table) gets IOERR at its status byte, the last byte of its
//!   last descriptor when that one is device-writable; a chain whose *structure* is bad (an
//!   indirect table of bad length, nested, outside memory, too long, not negotiated, not
//!   alone in its chain) or that has no writable last byte breaks the queue: never a
//!   silent completion;
//! - request-level checks are the split ring's (`hostile_ring.rs`): IOERR, UNSUPP.
//!
//! For `vblk serve` each break is also found in its log with its reason. After every case
//! [`PackedRig::finish`] checks that valid requests still work, the canaries are intact, and
//! `vblk serve` is alive, idle and holds the fds it held for the first connection.

mod common;
#[macro_use]
mod hostile;
#[path = "hostile/packed.rs"]
mod packed_rig;

use std::time::{Duration, Instant};

use common::fd_count;
use hostile::{assert_untouched, eventually, hdr, readable, rss_bytes, status, status_of, writable, Target};
use hostile::{DISK, IOERR, OK, QSIZE, SECTOR, TARGET, UNSUPP, UNTOUCHED, WAIT};
use packed_rig::*;
use vblk_driver::raw::packed::{PackedBase, PackedDescriptor, RawPackedQueue, RingPos};
use vblk_driver::raw::packed::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, PACKED_DESC_F_AVAIL, PACKED_DESC_F_USED};
use vblk_driver::raw::packed::{EVENT_FLAG_DESC, EVENT_FLAG_DISABLE, EVENT_FLAG_ENABLE};
use vblk_driver::raw::ring::{Buffer, UsedElem};
use vblk_driver::{DriverError, IoBuf};
use vblk_virtio::blk::req_type;

hostile_cases!(
    ids_out_of_range_break_the_queue,
    only_the_last_slot_of_a_chain_names_its_buffer,
    an_id_reused_while_in_flight_breaks_the_queue,
    a_chain_longer_than_the_ring_breaks_the_queue,
    a_chain_into_a_slot_not_made_available_breaks_the_queue,
    the_driver_lapping_the_device_breaks_the_queue,
    flipped_wrap_bits_are_answered_exactly_or_break_the_queue,
    a_vring_base_outside_the_ring_is_refused,
    hostile_event_suppression_loses_no_completion,
    nested_indirect_tables_break_the_queue,
    indirect_tables_of_bad_length_break_the_queue,
    indirect_tables_of_more_than_1024_entries_break_the_queue,
    indirect_tables_outside_memory_break_the_queue,
    an_indirect_slot_with_other_slots_in_its_chain_breaks_the_queue,
    indirect_without_the_feature_breaks_the_queue,
    bad_buffers_inside_an_indirect_table_are_ioerr,
    buffers_outside_memory_or_straddling_its_end_are_ioerr,
    zero_length_and_readable_after_writable_buffers_are_ioerr,
    reads_and_writes_past_the_end_are_ioerr,
    unknown_scsi_and_barrier_types_are_unsupp,
    a_header_shorter_than_16_bytes_is_ioerr,
    a_request_without_a_status_breaks_the_queue,
    a_readonly_status_byte_breaks_the_queue,
    a_zero_length_status_breaks_the_queue,
);

/// `[header(t, sector), data, status]` in id 0's slot.
fn request(rig: &PackedRig, t: u32, sector: u64, data: Buffer) -> [Buffer; 3] {
    [hdr(&rig.q, 0, t, sector), data, status(&rig.q, 0)]
}

/// A valid indirect table `[header IN at TARGET, data, status]` in id 0's slot (nothing
/// made available). Returns its address.
fn valid_table(rig: &PackedRig, data: &IoBuf) -> u64 {
    let bufs = [hdr(&rig.q, 0, req_type::IN, TARGET / SECTOR), writable(data), status(&rig.q, 0)];
    let addr = table_addr(&rig.q, 0);
    rig.q.write_table(addr, &RawPackedQueue::table_of(&bufs)).expect("table");
    addr
}

/// The status byte of id `id`'s slot.
fn status_byte(q: &RawPackedQueue, id: u16) -> u8 {
    status_of(q, &[Buffer { addr: q.slot(id) + 16, len: 1, write: true }])
}

/// A FLUSH whose 16-byte header is split over 15 readable slots, then its status: a
/// well-formed chain of exactly 16 slots, in id `id`'s slot.
fn flush_of_16_slots(q: &RawPackedQueue, id: u16) -> Vec<Buffer> {
    let h = hdr(q, id, req_type::FLUSH, 0);
    let mut bufs: Vec<Buffer> = (0..14).map(|k| Buffer { addr: h.addr + k, len: 1, write: false }).collect();
    bufs.push(Buffer { addr: h.addr + 14, len: 2, write: false });
    bufs.push(status(q, id));
    bufs
}

// ---------------------------------------------------------------------------
// the ring

fn ids_out_of_range_break_the_queue(t: Target) {
    let mut rig = PackedRig::new(t);
    for id in [QSIZE, QSIZE + 1, 0x8000, u16::MAX] {
        let b = rig.buf(4096);
        let r = request(&rig, req_type::IN, TARGET / SECTOR, writable(&b));
        rig.q.add_chain(&r, id).expect("chain");
        rig.expect_broken(0);
        rig.expect_log(&format!("buffer id {id} out of range (queue size {QSIZE})"));
        assert_eq!(status_of(&rig.q, &r), UNTOUCHED, "id {id}");
        assert_untouched(&b, "read with a buffer id out of range");
        rig = rig.recover();
    }
    rig.finish();
}

/// The device reads the buffer id from a chain's last slot (§2.8.6): ids in the other
/// slots, in range or not, do not count.
fn only_the_last_slot_of_a_chain_names_its_buffer(t: Target) {
    let mut rig = PackedRig::new(t);
    let b = rig.buf(4096);
    let r = request(&rig, req_type::IN, TARGET / SECTOR, writable(&b));
    let mut d = rig.q.chain_descs(&r, 3);
    d[0].id = u16::MAX;
    d[1].id = QSIZE;
    rig.q.make_available(&d).expect("chain");
    assert_eq!(submit(&mut rig.q), UsedElem { id: 3, len: 4097 });
    assert_eq!(status_of(&rig.q, &r), OK);
    assert_eq!(b.to_vec().expect("data"), rig.canary(TARGET, 4096));
    // In-range ids before a last slot out of range: the chain is id 16's, out of range.
    let b = rig.buf(4096);
    let r = request(&rig, req_type::IN, TARGET / SECTOR, writable(&b));
    let mut d = rig.q.chain_descs(&r, QSIZE);
    d[0].id = 0;
    d[1].id = 1;
    rig.expect_descs_break(&d);
    rig.expect_log(&format!("buffer id {QSIZE} out of range"));
    assert_eq!(status_of(&rig.q, &r), UNTOUCHED);
    assert_untouched(&b, "read with its last id out of range");
    rig.finish();
}

/// Two chains with buffer id 0, shown to the device at once: the first is a read, in
/// flight until the batch is popped, so the second names an id in flight. The device
/// cannot complete an id twice (the driver could not tell the completions apart): the
/// queue breaks; the first read completes.
fn an_id_reused_while_in_flight_breaks_the_queue(t: Target) {
    let mut rig = PackedRig::new(t);
    let (ba, bb) = (rig.buf(4096), rig.buf(4096));
    let a = [hdr(&rig.q, 0, req_type::IN, TARGET / SECTOR), writable(&ba), status(&rig.q, 0)];
    let b = [hdr(&rig.q, 1, req_type::IN, (TARGET + 4096) / SECTOR), writable(&bb), status(&rig.q, 1)];
    let da = rig.q.chain_descs(&a, 0);
    let sa = rig.q.stage(&da).expect("stage a");
    let db = rig.q.chain_descs(&b, 0);
    let sb = rig.q.stage(&db).expect("stage b");
    rig.q.expose(sb);
    rig.q.expose(sa);
    let done = rig.expect_broken(1);
    assert_eq!(done, vec![UsedElem { id: 0, len: 4097 }]);
    rig.expect_log("buffer id 0 made available again while still in flight");
    assert_eq!(status_of(&rig.q, &a), OK, "the first chain completes");
    assert_eq!(ba.to_vec().expect("data"), rig.canary(TARGET, 4096));
    assert_eq!(status_of(&rig.q, &b), UNTOUCHED);
    assert_untouched(&bb, "the second chain with id 0");
    rig.finish();
}

fn a_chain_longer_than_the_ring_breaks_the_queue(t: Target) {
    let mut rig = PackedRig::new(t);
    // Every slot of the ring, each available for its lap, each with NEXT.
    let h = hdr(&rig.q, 0, req_type::IN, TARGET / SECTOR);
    let s = status(&rig.q, 0);
    let bufs: Vec<Buffer> = (0..QSIZE).map(|_| h).collect();
    let mut d = rig.q.chain_descs(&bufs, 0);
    if let Some(last) = d.last_mut() {
        last.flags |= DESC_F_NEXT;
    }
    rig.expect_descs_break(&d);
    rig.expect_log(&format!("packed chain has no end within the ring of {QSIZE} slots"));
    assert_eq!(status_of(&rig.q, &[s]), UNTOUCHED);
    // A chain of exactly the ring's size is well-formed.
    let mut rig = rig.recover();
    let bufs = flush_of_16_slots(&rig.q, 0);
    assert_eq!(bufs.len(), QSIZE as usize);
    rig.expect_status(&bufs, OK);
    rig.finish();
}

/// A chain's later slots must be available with the lap of each (§2.8.1, §2.8.21.1); the
/// device checks every slot, not only the head.
fn a_chain_into_a_slot_not_made_available_breaks_the_queue(t: Target) {
    let mut rig = PackedRig::new(t);
    // Well-formed chains across the end of the ring, in both laps: the flags flip half-way.
    for wrap in [true, false] {
        rig.restart_at(RingPos { idx: QSIZE - 1, wrap });
        let b = rig.buf(4096);
        let r = request(&rig, req_type::IN, TARGET / SECTOR, writable(&b));
        rig.expect_status(&r, OK);
        assert_eq!(rig.q.avail_pos(), RingPos { idx: 2, wrap: !wrap });
        assert_eq!(b.to_vec().expect("data"), rig.canary(TARGET, 4096));
    }
    // (which slot of [header, data, status] is spoiled, how, whether the chain crosses the end)
    let cases: [(usize, &str, bool); 6] = [
        (2, "the other lap's flags", false),
        (2, "used flags", false),
        (2, "neither AVAIL nor USED", false),
        (1, "the other lap's flags", false),
        (1, "not flipped at the end of the ring", true),
        (2, "not flipped at the end of the ring", true),
    ];
    for (k, how, across) in cases {
        if across {
            rig.restart_at(RingPos { idx: QSIZE - 1, wrap: true });
        }
        let b = rig.buf(4096);
        let r = request(&rig, req_type::IN, TARGET / SECTOR, writable(&b));
        let mut d = rig.q.chain_descs(&r, 0);
        let lap = rig.q.avail_pos().advance(k as u16, QSIZE).wrap;
        let keep = d[k].flags & !(PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED);
        d[k].flags = keep
            | match how {
                "the other lap's flags" => RawPackedQueue::avail_flags(!lap),
                "used flags" => RawPackedQueue::used_flags(lap),
                "neither AVAIL nor USED" => 0,
                _ => RawPackedQueue::avail_flags(true),
            };
        if across {
            // Every slot after the end keeps the first lap's flags.
            for later in d.iter_mut().skip(k) {
                later.flags =
                    (later.flags & !(PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED)) | RawPackedQueue::avail_flags(true);
            }
        }
        let slot = rig.q.avail_pos().advance(k as u16, QSIZE).idx;
        rig.expect_descs_break(&d);
        rig.expect_log(&format!("packed chain continues into slot {slot}"));
        assert_eq!(status_of(&rig.q, &r), UNTOUCHED, "slot {k}: {how}");
        assert_untouched(&b, how);
        rig = rig.recover();
    }
    rig.finish();
}

/// More slots made available than the ring holds: every slot taken by a read still in
/// flight (the slow zone), then one more slot in the next lap, over the first read's slot.
/// Then the same with one read in flight and a chain of the whole ring after it.
fn the_driver_lapping_the_device_breaks_the_queue(t: Target) {
    let mut rig = PackedRig::with(t, PackedSetup { slow_reads: true, ..PackedSetup::default() });
    let bufs: Vec<IoBuf> = (0..QSIZE).map(|_| rig.buf(4096)).collect();
    let start = rig.q.avail_pos();
    let mut staged = Vec::new();
    for id in 0..QSIZE {
        let offset = SLOW + 4096 * id as u64;
        let table = [hdr(&rig.q, id, req_type::IN, offset / SECTOR), writable(&bufs[id as usize]), status(&rig.q, id)];
        let addr = table_addr(&rig.q, id);
        rig.q.write_table(addr, &RawPackedQueue::table_of(&table)).expect("table");
        let flags = RawPackedQueue::avail_flags(rig.q.avail_pos().wrap) | DESC_F_INDIRECT;
        staged.push(rig.q.stage(&[PackedDescriptor { addr, len: 48, id, flags }]).expect("stage"));
    }
    for s in staged.into_iter().rev() {
        rig.q.expose(s);
    }
    let kicked = Instant::now();
    rig.q.kick().expect("kick");
    let lapped = rig.q.avail_pos();
    assert_eq!(lapped, RingPos { idx: start.idx, wrap: !start.wrap });
    rig.wait_device_at(lapped);
    // Slot `start` again, in the next lap: a one-byte writable buffer of its own.
    let extra = Buffer { addr: rig.q.slot(0) + 32, len: 1, write: true };
    rig.q.write_mem(extra.addr, &[UNTOUCHED]).expect("extra");
    rig.q.add_chain(&[extra], 0).expect("lap");
    let done = rig.expect_broken(QSIZE as usize);
    let waited = kicked.elapsed();
    rig.expect_log(&format!("driver made 1 more slots available with {QSIZE} in flight, more than the ring's {QSIZE}"));
    let mut ids: Vec<u32> = done.iter().map(|e| e.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..QSIZE as u32).collect::<Vec<_>>(), "each read completed once");
    assert!(done.iter().all(|e| e.len == 4097), "{done:?}");
    assert!(waited >= SLOW_DELAY, "the reads were not slow ({waited:?}): were they in flight?");
    for id in 0..QSIZE {
        assert_eq!(status_byte(&rig.q, id), OK, "read {id}");
        assert_eq!(bufs[id as usize].to_vec().expect("data"), vec![0u8; 4096], "read {id}");
    }
    assert_eq!(status_of(&rig.q, &[extra]), UNTOUCHED, "the lapping chain was answered");

    // One slow read in flight, then a chain of all 16 slots ending over its slot.
    let mut rig = rig.recover();
    let b = rig.buf(4096);
    let p = rig.q.avail_pos();
    let read = [hdr(&rig.q, 0, req_type::IN, SLOW / SECTOR), writable(&b), status(&rig.q, 0)];
    indirect_request(&mut rig.q, 0, &read);
    rig.q.kick().expect("kick");
    rig.wait_device_at(p.advance(1, QSIZE));
    let flush = flush_of_16_slots(&rig.q, 1);
    rig.q.add_chain(&flush, 1).expect("chain");
    let done = rig.expect_broken(1);
    rig.expect_log(&format!("driver made {QSIZE} more slots available with 1 in flight"));
    assert_eq!(done, vec![UsedElem { id: 0, len: 4097 }]);
    assert_eq!(status_byte(&rig.q, 0), OK);
    assert_eq!(status_byte(&rig.q, 1), UNTOUCHED, "the lapping chain was answered");
    rig.finish();
}

/// The device's view of a ring written by [`flipped_wrap_bits_are_answered_exactly_or_break_the_queue`]:
/// `PackedQueue::pop` and the pipeline for slots of one-byte buffers, each answered at
/// once (no header: IOERR at the last byte when it is writable), so nothing is in flight
/// between pops and the used position equals the avail position.
struct Model {
    size: u16,
    ring: Vec<PackedDescriptor>,
    avail: RingPos,
    used: RingPos,
}

/// One answer the model expects: the used descriptor at `pos`.
struct Answer {
    pos: RingPos,
    id: u16,
    len: u32,
}

fn is_avail(flags: u16, wrap: bool) -> bool {
    (flags & PACKED_DESC_F_AVAIL != 0) == wrap && (flags & PACKED_DESC_F_USED != 0) != wrap
}

impl Model {
    fn of(q: &RawPackedQueue) -> Model {
        let ring = (0..q.size()).map(|i| q.read_slot(i).expect("slot")).collect();
        assert_eq!(q.avail_pos(), q.used_pos(), "nothing in flight");
        Model { size: q.size(), ring, avail: q.avail_pos(), used: q.used_pos() }
    }

    /// Pop everything available. Returns the answers and, if the ring broke, the reason
    /// the device logs.
    fn run(&mut self) -> (Vec<Answer>, Option<String>) {
        let mut answers = Vec::new();
        loop {
            assert_eq!(self.avail, self.used);
            let head = self.avail;
            if !is_avail(self.ring[head.idx as usize].flags, head.wrap) {
                return (answers, None);
            }
            let (mut pos, mut slots, mut writable) = (head, 0u16, 0u32);
            let last = loop {
                let d = self.ring[pos.idx as usize];
                if slots > 0 && !is_avail(d.flags, pos.wrap) {
                    return (answers, Some(format!("packed chain continues into slot {}", pos.idx)));
                }
                slots += 1;
                writable += u32::from(d.flags & DESC_F_WRITE != 0);
                pos = pos.advance(1, self.size);
                if d.flags & DESC_F_NEXT == 0 {
                    break d;
                }
                if slots >= self.size {
                    return (answers, Some("packed chain has no end".into()));
                }
            };
            if last.id >= self.size {
                return (answers, Some(format!("buffer id {} out of range", last.id)));
            }
            if last.flags & DESC_F_WRITE == 0 {
                return (answers, Some("has no status byte".into()));
            }
            // IOERR; the used length counts the status byte only when no writable byte
            // before it was left unwritten.
            let len = u32::from(writable == 1);
            let u = self.used.idx as usize;
            let flags = RawPackedQueue::used_flags(self.used.wrap);
            self.ring[u] = PackedDescriptor { addr: self.ring[u].addr, len, id: last.id, flags };
            answers.push(Answer { pos: self.used, id: last.id, len });
            self.used = self.used.advance(slots, self.size);
            self.avail = pos;
        }
    }
}

/// xorshift64: the storm is the same on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u32) -> u16 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as u16
    }
}

/// A driver writing random slots: AVAIL/USED bits right for the slot's lap or random,
/// NEXT now and then, WRITE nearly always, ids nearly always in range, one-byte buffers at
/// the status bytes of the ids' slots, for many rounds. The device is deterministic on
/// such a ring (it only ever looks at the slot at its avail position, which each round
/// writes last), so [`Model`] says exactly what it must do: every answer (used id, length,
/// slot, IOERR in exactly the status bytes it names, nothing else written: the whole ring
/// is compared after every round), or the break (err eventfd, its reason in the log). On a
/// break the driver connects again. `vblk serve` stays alive, its RSS flat, its fds the
/// first connection's.
fn flipped_wrap_bits_are_answered_exactly_or_break_the_queue(t: Target) {
    const ROUNDS: usize = 5000;
    let mut rig = PackedRig::new(t);
    let seed = 0x9e37_79b9_7f4a_7c15 ^ t as u64;
    let mut rng = Rng(seed);
    let rss_before = rig.serve_pid().map(rss_bytes);
    let reset_statuses = |q: &RawPackedQueue| {
        for id in 0..q.size() {
            q.write_mem(q.slot(id) + 16, &[UNTOUCHED]).expect("status");
        }
    };
    reset_statuses(&rig.q);
    let mut m = Model::of(&rig.q);
    let (mut answered, mut breaks, mut reasons) = (0usize, 0usize, std::collections::BTreeMap::new());
    let started = Instant::now();
    for round in 0..ROUNDS {
        let size = m.size;
        let mut writes = Vec::new();
        for _ in 0..1 + rng.below(4) {
            let slot = if rng.below(4) < 3 { (m.avail.idx + rng.below(4)) % size } else { rng.below(size as u32) };
            let lap = if slot >= m.avail.idx { m.avail.wrap } else { !m.avail.wrap };
            let bits = match rng.below(4) {
                0 | 1 => RawPackedQueue::avail_flags(lap),
                _ => [0, PACKED_DESC_F_AVAIL, PACKED_DESC_F_USED, PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED]
                    [rng.below(4) as usize],
            };
            let next = if rng.below(8) == 0 { DESC_F_NEXT } else { 0 };
            let write = if rng.below(32) == 0 { 0 } else { DESC_F_WRITE };
            let id = if rng.below(64) == 0 { size + rng.below(3) } else { rng.below(size as u32) };
            let d = PackedDescriptor { addr: rig.q.slot(id) + 16, len: 1, id, flags: bits | next | write };
            writes.push((slot, d));
        }
        // The slot at the device's avail position last, and only its final value: until
        // then the device sees nothing of the round.
        let head = writes.iter().rev().find(|(s, _)| *s == m.avail.idx).copied();
        for (s, d) in writes.iter().filter(|(s, _)| *s != m.avail.idx).chain(head.iter()) {
            rig.q.write_slot(*s, *d).expect("slot");
            m.ring[*s as usize] = *d;
        }
        rig.q.kick().expect("kick");
        let (answers, broke) = m.run();
        for a in &answers {
            wait_used_at(&rig.q, a.pos, UsedElem { id: a.id as u32, len: a.len });
        }
        if let Some(why) = &broke {
            assert!(
                rig.q.wait_err(WAIT).expect("wait err"),
                "round {round}: the ring broke ({why}) without the err eventfd"
            );
            std::thread::sleep(Duration::from_millis(5));
        } else {
            assert!(!rig.q.err_fired(), "round {round}: the err eventfd fired, the model expected no break");
        }
        // Exactly the model's ring, and IOERR in exactly the status bytes answered.
        for i in 0..size {
            let got = rig.q.read_slot(i).expect("slot");
            assert_eq!(got, m.ring[i as usize], "round {round}: slot {i} ({} answers, break {broke:?})", answers.len());
        }
        for id in 0..size {
            let want = if answers.iter().any(|a| a.id == id) { IOERR } else { UNTOUCHED };
            assert_eq!(status_byte(&rig.q, id), want, "round {round}: status byte of id {id}");
        }
        reset_statuses(&rig.q);
        answered += answers.len();
        if let Some(why) = broke {
            breaks += 1;
            *reasons.entry(why.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).or_insert(0) += 1;
            rig.expect_log(&why);
            rig.assert_alive();
            rig.set_broken();
            rig = rig.reconnect();
            reset_statuses(&rig.q);
            m = Model::of(&rig.q);
        }
    }
    eprintln!(
        "{ROUNDS} rounds in {:.1} s: {answered} answers, {breaks} breaks {reasons:?}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        answered >= ROUNDS / 4 && breaks >= 5,
        "the storm exercised too little: {answered} answers, {breaks} breaks"
    );
    if let Some(n) = rig.log_count("virtqueue broken") {
        assert_eq!(n, breaks, "vblk serve logged {n} broken queues, the model expected {breaks}");
    }
    if let (Some(pid), Some(before)) = (rig.serve_pid(), rss_before) {
        let after = rss_bytes(pid);
        assert!(after.abs_diff(before) <= 10 << 20, "vblk serve RSS moved from {before} to {after} bytes");
    }
    // Leave a clean ring (zero: never available) for `finish`.
    for i in 0..m.size {
        rig.q.write_slot(i, PackedDescriptor::default()).expect("slot");
    }
    rig.q.set_avail_pos(m.avail);
    rig.q.set_used_pos(m.used);
    rig.q.forget_in_flight();
    rig.finish();
}

/// `SET_VRING_BASE` naming a slot outside the ring (either position): error reply, the
/// ring does not start, its err eventfd fires, the other queue goes on.
fn a_vring_base_outside_the_ring_is_refused(t: Target) {
    let mut rig = PackedRig::new(t);
    let bad = [
        PackedBase { avail: RingPos { idx: QSIZE, wrap: true }, used: RingPos { idx: 0, wrap: true } },
        PackedBase { avail: RingPos { idx: 0, wrap: true }, used: RingPos { idx: 0x7fff, wrap: false } },
    ];
    for base in bad {
        let e = rig.q.set_vring_base(base.encode()).expect_err("a base outside the ring was accepted");
        assert!(matches!(e, DriverError::Protocol("SET_VRING_BASE", _)), "{e}");
        assert!(rig.q.wait_err(WAIT).expect("wait err"), "the err eventfd was not signalled");
        rig.expect_log(&format!("packed vring base {:#x} names a slot outside the ring", base.encode()));
        rig.set_broken();
        rig = rig.recover();
    }
    rig.finish();
}

/// Any driver event suppression structure (§2.8.10), and garbage in the device's own:
/// every request is still answered; DISABLE means no interrupt, ENABLE (and values the
/// spec does not define) an interrupt; the device rewrites its structure (DESC at its
/// avail position, with EVENT_IDX) when it waits for kicks again.
fn hostile_event_suppression_loses_no_completion(t: Target) {
    let mut rig = PackedRig::new(t);
    let serial = rig.serial();
    let cases: [(u16, u16, Option<bool>); 6] = [
        (0, EVENT_FLAG_DISABLE, Some(false)),
        (0, EVENT_FLAG_ENABLE, Some(true)),
        (0, 3, Some(true)),
        (0xabcd, 0xffff, Some(true)),
        (0xffff, EVENT_FLAG_DESC, None),
        (QSIZE, EVENT_FLAG_DESC, None),
    ];
    for (off_wrap, flags, interrupt) in cases {
        rig.q.set_driver_event(off_wrap, flags);
        rig.q.write_device_event(0xffff, 0xffff);
        while rig.q.wait_call(Duration::ZERO).expect("drain call") {}
        let b = rig.buf(20);
        let r = [hdr(&rig.q, 0, req_type::GET_ID, 0), writable(&b), status(&rig.q, 0)];
        rig.q.add_chain(&r, 0).expect("chain");
        rig.q.kick().expect("kick");
        // The ring, not the call eventfd, says when it is done.
        assert!(eventually(WAIT, || rig.q.used_ready()), "no answer with driver event {off_wrap:#x}/{flags:#x}");
        assert_eq!(rig.q.pop_used().expect("used"), Some(UsedElem { id: 0, len: 21 }));
        assert_eq!(status_of(&rig.q, &r), OK);
        assert_eq!(b.to_vec().expect("id"), serial);
        match interrupt {
            Some(true) => assert!(rig.q.wait_call(WAIT).expect("call"), "no interrupt with flags {flags:#x}"),
            Some(false) => {
                assert!(!rig.q.wait_call(Duration::from_millis(100)).expect("call"), "an interrupt with DISABLE")
            }
            None => {}
        }
        rig.wait_device_at(rig.q.avail_pos());
    }
    rig.q.set_driver_event(0, EVENT_FLAG_ENABLE);
    rig.finish();
}

// ---------------------------------------------------------------------------
// chains and indirect tables

fn nested_indirect_tables_break_the_queue(t: Target) {
    let mut rig = PackedRig::new(t);
    let b = rig.buf(4096);
    let inner = valid_table(&rig, &b);
    let outer = table_addr(&rig.q, 1);
    let nested = PackedDescriptor { addr: inner, len: 48, id: 0, flags: DESC_F_INDIRECT };
    rig.q.write_table(outer, &[nested]).expect("outer table");
    rig.q.add_indirect(outer, 16, 0).expect("indirect");
    rig.expect_broken(0);
    rig.expect_log("indirect descriptor inside an indirect table");
    assert_untouched(&b, "read through a nested table");
    assert_eq!(status_byte(&rig.q, 0), UNTOUCHED);
    // Nested between a header and a status entry: still no status to trust.
    let mut rig = rig.recover();
    let b = rig.buf(4096);
    let nested = PackedDescriptor { addr: valid_table(&rig, &b), ..nested };
    let outer = table_addr(&rig.q, 1);
    let entries = RawPackedQueue::table_of(&[hdr(&rig.q, 1, req_type::IN, TARGET / SECTOR), status(&rig.q, 1)]);
    rig.q.write_table(outer, &[entries[0], nested, entries[1]]).expect("outer table");
    rig.q.add_indirect(outer, 48, 0).expect("indirect");
    rig.expect_broken(0);
    assert_eq!(status_byte(&rig.q, 1), UNTOUCHED);
    assert_untouched(&b, "read through a nested table");
    // The inner table alone is a valid request (refused for nesting only).
    let mut rig = rig.recover();
    let b = rig.buf(4096);
    let inner = valid_table(&rig, &b);
    rig.q.add_indirect(inner, 48, 0).expect("indirect");
    assert_eq!(submit(&mut rig.q), UsedElem { id: 0, len: 4097 });
    assert_eq!(status_byte(&rig.q, 0), OK);
    assert_eq!(b.to_vec().expect("data"), rig.canary(TARGET, 4096));
    rig.finish();
}

fn indirect_tables_of_bad_length_break_the_queue(t: Target) {
    let mut rig = PackedRig::new(t);
    for len in [0, 1, 15, 17, 40, 47] {
        let b = rig.buf(4096);
        let addr = valid_table(&rig, &b);
        rig.q.add_indirect(addr, len, 0).expect("indirect");
        rig.expect_broken(0);
        rig.expect_log(&format!("indirect table length {len} is not a non-zero multiple of 16"));
        assert_untouched(&b, "read through a refused indirect table");
        assert_eq!(status_byte(&rig.q, 0), UNTOUCHED);
        rig = rig.recover();
    }
    rig.finish();
}

/// A well-formed FLUSH table of `n` entries: header, `n - 2` readable bytes, status.
fn flush_table(rig: &PackedRig, n: u32) -> IoBuf {
    let h = hdr(&rig.q, 0, req_type::FLUSH, 0);
    let s = status(&rig.q, 0);
    let mut entries = vec![h];
    entries.extend((0..n - 2).map(|_| Buffer { addr: h.addr, len: 1, write: false }));
    entries.push(s);
    let tbl = rig.q.alloc(n * 16).expect("alloc table");
    rig.q.write_table(tbl.gpa(), &RawPackedQueue::table_of(&entries)).expect("table");
    tbl
}

/// At most max(queue size, 1024) entries in a table (as the split ring, and QEMU).
fn indirect_tables_of_more_than_1024_entries_break_the_queue(t: Target) {
    let mut rig = PackedRig::new(t);
    let tbl = flush_table(&rig, 1024);
    rig.q.add_indirect(tbl.gpa(), 1024 * 16, 0).expect("indirect");
    assert_eq!(submit(&mut rig.q), UsedElem { id: 0, len: 1 });
    assert_eq!(status_byte(&rig.q, 0), OK, "a table of 1024 entries is fine");
    for n in [1025, 65535] {
        let tbl = flush_table(&rig, n);
        rig.q.add_indirect(tbl.gpa(), n * 16, 0).expect("indirect");
        rig.expect_broken(0);
        rig.expect_log("descriptor chain longer than 1024 entries");
        assert_eq!(status_byte(&rig.q, 0), UNTOUCHED, "{n} entries");
        rig = rig.recover();
    }
    rig.finish();
}

fn indirect_tables_outside_memory_break_the_queue(t: Target) {
    let mut rig = PackedRig::new(t);
    let end = rig.q.memory_size();
    for addr in [end, end + 4096, end - 16, u64::MAX - 15, u64::MAX - 47] {
        rig.q.add_indirect(addr, 48, 0).expect("indirect");
        rig.expect_broken(0);
        rig.expect_log("chain at head 0 has no status byte");
        rig = rig.recover();
    }
    rig.finish();
}

/// An indirect slot must be alone in its chain (§2.8.7): with NEXT and a status slot after
/// it, or after a header slot, the chain's structure is refused and the queue breaks,
/// even though its last slot is writable (as the split ring treats its indirect rules;
/// the writable byte after the table is not trusted as a status).
fn an_indirect_slot_with_other_slots_in_its_chain_breaks_the_queue(t: Target) {
    let mut rig = PackedRig::new(t);
    let b = rig.buf(4096);
    let table = valid_table(&rig, &b);
    let tail = status(&rig.q, 1);
    let mut d = rig.q.chain_descs(&[Buffer { addr: table, len: 48, write: false }, tail], 0);
    d[0].flags |= DESC_F_INDIRECT;
    rig.expect_descs_break(&d);
    rig.expect_log("indirect descriptor with the NEXT flag");
    assert_untouched(&b, "read through an indirect slot with NEXT");
    assert_eq!((status_byte(&rig.q, 0), status_byte(&rig.q, 1)), (UNTOUCHED, UNTOUCHED));
    for with_status in [false, true] {
        rig = rig.recover();
        let b = rig.buf(4096);
        let table = valid_table(&rig, &b);
        let mut bufs =
            vec![hdr(&rig.q, 1, req_type::IN, TARGET / SECTOR), Buffer { addr: table, len: 48, write: false }];
        let tail = status(&rig.q, 1);
        if with_status {
            bufs.push(tail);
        }
        let mut d = rig.q.chain_descs(&bufs, 0);
        d[1].flags |= DESC_F_INDIRECT;
        rig.expect_descs_break(&d);
        rig.expect_log("indirect descriptor not at the head of the chain");
        assert_untouched(&b, "read through an indirect slot after a header");
        assert_eq!((status_byte(&rig.q, 0), status_byte(&rig.q, 1)), (UNTOUCHED, UNTOUCHED));
    }
    rig.finish();
}

fn indirect_without_the_feature_breaks_the_queue(t: Target) {
    let mut rig = PackedRig::with(t, PackedSetup { indirect: false, ..PackedSetup::default() });
    assert!(!rig.q.features().indirect, "INDIRECT_DESC negotiated");
    let b = rig.buf(4096);
    let table = valid_table(&rig, &b);
    rig.q.add_indirect(table, 48, 0).expect("indirect");
    rig.expect_broken(0);
    rig.expect_log("VIRTIO_RING_F_INDIRECT_DESC not negotiated");
    assert_untouched(&b, "read through a table the driver did not negotiate");
    assert_eq!(status_byte(&rig.q, 0), UNTOUCHED);
    rig.finish();
}

/// Bad buffers inside a sound table are refused like bad buffers in the ring: IOERR at
/// the table's last byte when it is writable and in memory, else the queue breaks.
fn bad_buffers_inside_an_indirect_table_are_ioerr(t: Target) {
    let mut rig = PackedRig::new(t);
    let end = rig.q.memory_size();
    let b = rig.buf(512);
    let in_ = |rig: &PackedRig| hdr(&rig.q, 0, req_type::IN, TARGET / SECTOR);
    let out = |rig: &PackedRig| hdr(&rig.q, 0, req_type::OUT, TARGET / SECTOR);
    let cases: Vec<(Vec<Buffer>, u32)> = vec![
        (vec![in_(&rig), Buffer { addr: end, len: 512, write: true }, status(&rig.q, 0)], 0),
        (vec![in_(&rig), Buffer { addr: end - 256, len: 512, write: true }, status(&rig.q, 0)], 0),
        (vec![out(&rig), Buffer { addr: u64::MAX - 255, len: 512, write: false }, status(&rig.q, 0)], 1),
        (vec![in_(&rig), Buffer { addr: b.gpa(), len: 0, write: true }, status(&rig.q, 0)], 1),
        (vec![in_(&rig), writable(&b), readable(&b), status(&rig.q, 0)], 0),
    ];
    for (bufs, len) in cases {
        status(&rig.q, 0);
        indirect_request(&mut rig.q, 0, &bufs);
        assert_eq!(submit(&mut rig.q), UsedElem { id: 0, len }, "{bufs:?}");
        assert_eq!(status_byte(&rig.q, 0), IOERR, "{bufs:?}");
        assert!(!rig.q.err_fired());
    }
    assert_untouched(&b, "refused tables");
    // The table's status entry outside memory: nowhere to answer.
    let bufs = [in_(&rig), writable(&b), Buffer { addr: end - 1 + 4096, len: 1, write: true }];
    indirect_request(&mut rig.q, 0, &bufs);
    rig.expect_broken(0);
    rig.expect_log("chain at head 0 has no status byte");
    rig.finish();
}

fn buffers_outside_memory_or_straddling_its_end_are_ioerr(t: Target) {
    let mut rig = PackedRig::new(t);
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

fn zero_length_and_readable_after_writable_buffers_are_ioerr(t: Target) {
    let mut rig = PackedRig::new(t);
    let b = rig.buf(4096);
    let zero_w = Buffer { addr: b.gpa(), len: 0, write: true };
    let zero_r = Buffer { addr: b.gpa(), len: 0, write: false };
    rig.expect_status(&[hdr(&rig.q, 0, req_type::IN, TARGET / SECTOR), zero_w, status(&rig.q, 0)], IOERR);
    rig.expect_status(&[hdr(&rig.q, 0, req_type::OUT, TARGET / SECTOR), zero_r, status(&rig.q, 0)], IOERR);
    let half = |write| Buffer { addr: b.gpa(), len: 2048, write };
    let r = [hdr(&rig.q, 0, req_type::IN, TARGET / SECTOR), half(true), half(false), status(&rig.q, 0)];
    rig.expect_status(&r, IOERR);
    assert_untouched(&b, "refused chains");
    rig.finish();
}

// ---------------------------------------------------------------------------
// requests (the split ring's checks, on a packed ring)

fn reads_and_writes_past_the_end_are_ioerr(t: Target) {
    let mut rig = PackedRig::new(t);
    let b = rig.buf(512);
    for sector in [DISK / SECTOR, DISK / SECTOR + 1, u32::MAX as u64, u64::MAX / SECTOR + 1, u64::MAX] {
        let r = request(&rig, req_type::IN, sector, writable(&b));
        rig.expect_status(&r, IOERR);
        let w = request(&rig, req_type::OUT, sector, readable(&b));
        rig.expect_status(&w, IOERR);
    }
    // Crossing the end: no partial read of the last sector.
    let b2 = rig.buf(1024);
    let r = request(&rig, req_type::IN, DISK / SECTOR - 1, writable(&b2));
    rig.expect_status(&r, IOERR);
    assert_untouched(&b, "read past the end");
    assert_untouched(&b2, "read across the end");
    rig.finish();
}

fn unknown_scsi_and_barrier_types_are_unsupp(t: Target) {
    let mut rig = PackedRig::new(t);
    let b = rig.buf(512);
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

fn a_header_shorter_than_16_bytes_is_ioerr(t: Target) {
    let mut rig = PackedRig::new(t);
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
    // No readable byte at all: the status byte alone.
    rig.expect_status(&[status(&rig.q, 0)], IOERR);
    rig.finish();
}

fn a_request_without_a_status_breaks_the_queue(t: Target) {
    let mut rig = PackedRig::new(t);
    let b = rig.q.alloc(4096).expect("alloc");
    b.write_at(0, &common::pattern(6, 4096)).expect("data");
    // A write with only readable buffers must not be performed (`recover` reads TARGET).
    rig.expect_chain_breaks(&[hdr(&rig.q, 0, req_type::OUT, TARGET / SECTOR), readable(&b)]);
    rig.expect_log("chain at head 0 has no status byte");
    let mut rig = rig.recover();
    rig.expect_chain_breaks(&[hdr(&rig.q, 0, req_type::FLUSH, 0)]);
    rig.finish();
}

fn a_readonly_status_byte_breaks_the_queue(t: Target) {
    let mut rig = PackedRig::new(t);
    let b = rig.q.alloc(4096).expect("alloc");
    b.write_at(0, &common::pattern(8, 4096)).expect("data");
    let mut s = status(&rig.q, 0);
    s.write = false;
    rig.expect_chain_breaks(&[hdr(&rig.q, 0, req_type::OUT, TARGET / SECTOR), readable(&b), s]);
    assert_eq!(status_of(&rig.q, &[s]), UNTOUCHED, "a device-readable status byte was written");
    // A chain refused for a bad buffer whose last byte is device-readable: no IOERR there.
    let mut rig = rig.recover();
    let mut s = status(&rig.q, 0);
    s.write = false;
    let outside = Buffer { addr: rig.q.memory_size(), len: 512, write: true };
    rig.expect_chain_breaks(&[hdr(&rig.q, 0, req_type::IN, TARGET / SECTOR), outside, s]);
    rig.expect_log("chain at head 0 has no status byte");
    assert_eq!(status_of(&rig.q, &[s]), UNTOUCHED, "a device-readable status byte was written");
    rig.finish();
}

fn a_zero_length_status_breaks_the_queue(t: Target) {
    let mut rig = PackedRig::new(t);
    let b = rig.buf(4096);
    let mut s = status(&rig.q, 0);
    s.len = 0;
    rig.expect_chain_breaks(&[hdr(&rig.q, 0, req_type::IN, TARGET / SECTOR), writable(&b), s]);
    assert_untouched(&b, "read with a zero-length status");
    assert_eq!(status_of(&rig.q, &[Buffer { len: 1, ..s }]), UNTOUCHED);
    rig.finish();
}

// ---------------------------------------------------------------------------
// bounds

/// Malformed requests, a ring's worth per kick, each id one indirect slot whose table is
/// written once: ids `3k` carry an unknown type (UNSUPP), `3k + 1` a read at sector
/// 2^64 - 1 (IOERR), `3k + 2` a data buffer outside guest memory (the chain is refused and
/// answered IOERR, used length 0).
struct Flood {
    size: u16,
    tables: Vec<(u64, u32)>,
}

impl Flood {
    fn prepare(q: &RawPackedQueue) -> Flood {
        let size = q.size();
        let tables = (0..size)
            .map(|id| {
                let (t, sector) = if id % 3 == 0 { (0x7777, 0) } else { (req_type::IN, u64::MAX) };
                let st = status(q, id);
                let bufs = if id % 3 == 2 {
                    let outside = Buffer { addr: q.memory_size(), len: 512, write: true };
                    vec![hdr(q, id, req_type::IN, 0), outside, st]
                } else {
                    vec![hdr(q, id, t, sector), st]
                };
                let addr = table_addr(q, id);
                q.write_table(addr, &RawPackedQueue::table_of(&bufs)).expect("table");
                (addr, 16 * bufs.len() as u32)
            })
            .collect();
        Flood { size, tables }
    }

    /// Submit `batches` rounds of `size` requests and check every answer.
    fn run(&self, q: &mut RawPackedQueue, batches: usize) {
        for _ in 0..batches {
            for (id, &(addr, len)) in self.tables.iter().enumerate() {
                q.write_mem(q.slot(id as u16) + 16, &[UNTOUCHED]).expect("status");
                q.add_indirect(addr, len, id as u16).expect("indirect");
            }
            q.kick().expect("kick");
            let used = q.wait_used(self.size as usize, WAIT).expect("the flood stalled");
            for e in used {
                let id = e.id as u16;
                let (len, want) = [(1, UNSUPP), (1, IOERR), (0, IOERR)][id as usize % 3];
                assert_eq!(e.len, len, "{e:?}");
                assert_eq!(status_byte(q, id), want, "id {id}");
            }
        }
    }
}

#[test]
fn a_hundred_thousand_malformed_requests_leave_the_daemon_rss_and_fds_flat() {
    const TOTAL: usize = 100_000;
    let setup = PackedSetup { queue_size: 256, ..PackedSetup::default() };
    let mut rig = PackedRig::with(Target::Serve, setup);
    let pid = rig.serve_pid().expect("vblk serve");
    let flood = Flood::prepare(&rig.q);
    let batches = TOTAL.div_ceil(flood.size as usize);
    flood.run(&mut rig.q, 40);
    let (warm, fds) = (rss_bytes(pid), fd_count(pid));
    let start = Instant::now();
    flood.run(&mut rig.q, batches);
    let elapsed = start.elapsed();
    let after = rss_bytes(pid);
    eprintln!(
        "{} malformed requests in {:.1} s ({:.0}/s); vblk serve RSS {} KiB after warm-up, {} KiB after",
        batches * flood.size as usize,
        elapsed.as_secs_f64(),
        (batches * flood.size as usize) as f64 / elapsed.as_secs_f64(),
        warm >> 10,
        after >> 10
    );
    assert!(after.abs_diff(warm) <= 10 << 20, "RSS moved from {warm} to {after} bytes");
    assert_eq!(fd_count(pid), fds, "vblk serve's open fds changed during the flood");
    assert!(!rig.q.err_fired());
    rig.finish();
}
