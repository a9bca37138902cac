//! The driver against a vhost-user-blk backend that is not vblk: qemu-storage-daemon
//! (QSD). Real processes, real sockets.
//!
//! QSD is required: without it these tests fail, unless `VBLK_SKIP_QSD=1`.
//! `VBLK_QSD` overrides the binary (default `qemu-storage-daemon` from `PATH`).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vblk_driver::{
    Completion, Device, DeviceInfo, DriverError, IoBuf, Op, Options, QueueHandle, RequestFailure, RingChoice, RingKind,
};
use vblk_virtio::blk::features as blkf;
use vblk_virtio::features as vf;
use vhost::vhost_user::message::VhostUserProtocolFeatures as Pf;

const MIB: u64 = 1 << 20;
const IMAGE_SIZE: u64 = 64 * MIB;

// ---------------------------------------------------------------------------
// harness

fn qsd_binary() -> String {
    std::env::var("VBLK_QSD").unwrap_or_else(|_| "qemu-storage-daemon".into())
}

/// True when QSD tests are explicitly disabled; panics when QSD is missing otherwise.
fn skip_qsd(test: &str) -> bool {
    if std::env::var("VBLK_SKIP_QSD").as_deref() == Ok("1") {
        eprintln!("SKIPPED {test}: VBLK_SKIP_QSD=1");
        return true;
    }
    match Command::new(qsd_binary()).arg("--version").output() {
        Ok(out) if out.status.success() => {
            let v = String::from_utf8_lossy(&out.stdout);
            eprintln!("{}", v.lines().next().unwrap_or(""));
            false
        }
        Ok(out) => panic!("{} --version failed: {:?}", qsd_binary(), out.status),
        Err(e) => {
            panic!("cannot run {} ({e}); install qemu-storage-daemon or set VBLK_SKIP_QSD=1 to skip", qsd_binary())
        }
    }
}

/// A per-test directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("vblk-qsd-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running qemu-storage-daemon; killed when dropped.
struct Qsd {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Qsd {
    /// Start QSD exporting node `disk0` (defined by `blockdevs`) on `dir/qsd.sock`.
    fn start(dir: &Path, blockdevs: &[String], num_queues: u16) -> Qsd {
        let socket = dir.join("qsd.sock");
        let log = dir.join("qsd.log");
        let mut cmd = Command::new(qsd_binary());
        for b in blockdevs {
            cmd.arg("--blockdev").arg(b);
        }
        cmd.arg("--export").arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues={num_queues}",
            socket.display()
        ));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(File::create(&log).unwrap())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", qsd_binary()));
        let mut qsd = Qsd { child: Some(child), socket, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::fs::metadata(&qsd.socket).is_ok_and(|m| m.file_type().is_socket()) {
                break;
            }
            if let Some(st) = qsd.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("qemu-storage-daemon exited early ({st}):\n{}", qsd.log_text());
            }
            assert!(Instant::now() < deadline, "QSD socket never appeared:\n{}", qsd.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
        qsd
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait (SIGKILL after 10 s).
    fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("already stopped");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Blockdevs for a raw image file opened with O_DIRECT and io_uring.
fn file_blockdevs(img: &Path) -> Vec<String> {
    vec![
        format!("driver=file,node-name=file0,filename={},cache.direct=on,aio=io_uring", img.display()),
        "driver=raw,node-name=disk0,file=file0,discard=unmap".into(),
    ]
}

/// xorshift64*: reproducible pseudo-random data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Submit one request and wait for it.
fn one(q: &mut QueueHandle, op: Op, buf: Option<IoBuf>) -> Completion {
    q.submit(op, buf, 7).unwrap();
    q.kick().unwrap();
    let mut out = Vec::new();
    q.wait(&mut out, 1).unwrap();
    assert_eq!(out.len(), 1, "one completion expected");
    let c = out.pop().unwrap();
    assert_eq!(c.user, 7);
    c
}

/// Wait until `n` completions are reaped; all must be OK.
fn reap(q: &mut QueueHandle, n: usize) -> Vec<Completion> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let before = out.len();
        q.wait(&mut out, n - before).unwrap();
        assert!(out.len() > before || q.in_flight() > 0, "nothing in flight but {} missing", n - out.len());
    }
    for c in &out {
        assert_eq!(c.result, Ok(()), "request {} failed on queue {}", c.user, q.index());
    }
    out
}

fn print_info(info: &DeviceInfo) {
    let names: [(u64, &str); 14] = [
        (vf::VERSION_1, "VERSION_1"),
        (vf::RING_EVENT_IDX, "RING_EVENT_IDX"),
        (vf::RING_INDIRECT_DESC, "RING_INDIRECT_DESC"),
        (vf::VHOST_USER_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
        (blkf::SIZE_MAX, "SIZE_MAX"),
        (blkf::SEG_MAX, "SEG_MAX"),
        (blkf::BLK_SIZE, "BLK_SIZE"),
        (blkf::RO, "RO"),
        (blkf::FLUSH, "FLUSH"),
        (blkf::TOPOLOGY, "TOPOLOGY"),
        (blkf::CONFIG_WCE, "CONFIG_WCE"),
        (blkf::MQ, "MQ"),
        (blkf::DISCARD, "DISCARD"),
        (blkf::WRITE_ZEROES, "WRITE_ZEROES"),
    ];
    let feats: Vec<&str> = names.iter().filter(|(b, _)| info.has(*b)).map(|(_, n)| *n).collect();
    let pf = Pf::from_bits_truncate(info.protocol_features);
    eprintln!("QSD device info: {info:#?}");
    eprintln!("negotiated virtio features: {}", feats.join(" "));
    eprintln!("negotiated protocol features: {pf:?}");
    eprintln!(
        "memory table sent with {}",
        if pf.contains(Pf::CONFIGURE_MEM_SLOTS) { "ADD_MEM_REG" } else { "SET_MEM_TABLE" }
    );
}

fn opts() -> Options {
    Options {
        num_queues: 2,
        queue_size: 128,
        buffer_memory: 32 * MIB,
        timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------
// a vhost-user proxy that hides CONFIGURE_MEM_SLOTS

/// vhost-user header: request, flags, payload size (all u32 little-endian).
const VU_HDR: usize = 12;
const VU_GET_PROTOCOL_FEATURES: u32 = 15;
const MAX_FDS: usize = 16;

/// Read exactly `buf.len()` bytes, collecting any fds passed along. `Ok(false)` on EOF
/// before the first byte.
fn recv_with_fds(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let mut iov = libc::iovec { iov_base: buf[filled..].as_mut_ptr().cast(), iov_len: buf.len() - filled };
        let mut cmsg = [0u64; 64];
        // SAFETY: a zeroed msghdr is valid; every pointer refers to live buffers above.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
            let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n > 0 {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                        let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                        let data = libc::CMSG_DATA(c).cast::<i32>();
                        for k in 0..bytes / 4 {
                            fds.push(OwnedFd::from_raw_fd(data.add(k).read_unaligned()));
                        }
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
            n
        };
        match n {
            0 if filled == 0 => return Ok(false),
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => filled += n as usize,
        }
    }
    Ok(true)
}

/// Send `data` with `fds` attached to its first byte.
fn send_with_fds(sock: &UnixStream, data: &[u8], fds: &[OwnedFd]) -> std::io::Result<()> {
    assert!(fds.len() <= MAX_FDS);
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmsg = [0u64; 64];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() };
    // SAFETY: as in recv_with_fds; the control buffer has room for MAX_FDS descriptors.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !raw.is_empty() {
            let len = libc::CMSG_SPACE((raw.len() * 4) as u32) as usize;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = len as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((raw.len() * 4) as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c).cast::<i32>(), raw.len());
        }
        libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    (&*sock).write_all(&data[n as usize..])
}

/// Forward vhost-user messages from `from` to `to` until either side closes; `edit` may
/// rewrite a message (header + payload) on the way.
fn pump(from: UnixStream, to: UnixStream, edit: fn(&mut [u8])) {
    let mut fds = Vec::new();
    loop {
        let mut msg = vec![0u8; VU_HDR];
        fds.clear();
        match recv_with_fds(&from, &mut msg, &mut fds) {
            Ok(true) => {}
            _ => break,
        }
        let size = u32::from_le_bytes(msg[8..12].try_into().unwrap()) as usize;
        msg.resize(VU_HDR + size, 0);
        if size > 0 && !matches!(recv_with_fds(&from, &mut msg[VU_HDR..], &mut fds), Ok(true)) {
            break;
        }
        edit(&mut msg);
        if send_with_fds(&to, &msg, &fds).is_err() {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// Connect to `backend` through a proxy that removes `CONFIGURE_MEM_SLOTS` from the
/// backend's protocol features, so the driver has to use `SET_MEM_TABLE`.
fn connect_without_mem_slots(backend: &Path) -> (UnixStream, [std::thread::JoinHandle<()>; 2]) {
    let be = UnixStream::connect(backend).unwrap();
    let (ours, fe) = UnixStream::pair().unwrap();
    let (fe2, be2) = (fe.try_clone().unwrap(), be.try_clone().unwrap());
    let to_backend = std::thread::spawn(move || pump(fe, be, |_| {}));
    let to_frontend = std::thread::spawn(move || {
        pump(be2, fe2, |m| {
            let req = u32::from_le_bytes(m[0..4].try_into().unwrap());
            if req == VU_GET_PROTOCOL_FEATURES && m.len() == VU_HDR + 8 {
                let pf = u64::from_le_bytes(m[VU_HDR..].try_into().unwrap()) & !Pf::CONFIGURE_MEM_SLOTS.bits();
                m[VU_HDR..].copy_from_slice(&pf.to_le_bytes());
            }
        })
    });
    (ours, [to_backend, to_frontend])
}

// ---------------------------------------------------------------------------
// a raw image file

/// What one queue's thread wrote: (offset, bytes) in the order it wrote them.
type Log = Vec<(u64, Vec<u8>)>;

/// Run on queue `q`, writing only inside `[base, base + span)`: batches of random writes
/// (distinct 128 KiB slots per batch, so in-flight writes never overlap), read back, flush,
/// then discard + rewrite and write-zeroes. Returns what ended up on the disk.
fn exercise_queue(mut q: QueueHandle, info: DeviceInfo, base: u64, span: u64, seed: u64) -> Log {
    const SLOT: u64 = 128 << 10;
    let mut rng = Rng(seed);
    let mut log: Log = Vec::new();
    let slots = span / SLOT;
    for batch in 0..8u64 {
        // Up to 16 writes in flight, in distinct slots.
        let mut chosen: Vec<u64> = Vec::new();
        while chosen.len() < 16 {
            let s = rng.below(slots);
            if !chosen.contains(&s) {
                chosen.push(s);
            }
        }
        let mut batch_writes = Vec::new();
        for (i, s) in chosen.iter().enumerate() {
            // 512-byte granularity (QSD may read-modify-write around O_DIRECT's 4 KiB).
            let len = 512 * (1 + rng.below(SLOT / 512 / 2));
            let off = base + s * SLOT + 512 * rng.below((SLOT - len) / 512 + 1);
            let mut data = vec![0u8; len as usize];
            rng.fill(&mut data);
            let buf = q.alloc(len as u32).unwrap();
            buf.write_at(0, &data).unwrap();
            q.submit(Op::Write { offset: off }, Some(buf), batch * 100 + i as u64).unwrap();
            batch_writes.push((off, data));
        }
        q.kick().unwrap();
        reap(&mut q, batch_writes.len());
        // Read everything back, all in flight at once.
        for (i, (off, data)) in batch_writes.iter().enumerate() {
            q.submit(Op::Read { offset: *off }, Some(q.alloc(data.len() as u32).unwrap()), i as u64).unwrap();
        }
        q.kick().unwrap();
        for c in reap(&mut q, batch_writes.len()) {
            let (off, data) = &batch_writes[c.user as usize];
            let got = c.buf.unwrap().to_vec().unwrap();
            assert!(got == *data, "queue {}: read-back mismatch at {off:#x}+{:#x}", q.index(), data.len());
        }
        log.extend(batch_writes);
        if info.has(blkf::FLUSH) {
            assert_eq!(one(&mut q, Op::Flush, None).result, Ok(()));
        }
    }

    let zeroes_at = base + span / 2;
    if info.has(blkf::DISCARD) {
        // Discarded data is undefined: rewrite it afterwards.
        let off = base + 5 * SLOT;
        assert_eq!(one(&mut q, Op::Discard { offset: off, len: SLOT }, None).result, Ok(()), "discard");
        let mut data = vec![0u8; SLOT as usize];
        rng.fill(&mut data);
        let buf = q.alloc(SLOT as u32).unwrap();
        buf.write_at(0, &data).unwrap();
        assert_eq!(one(&mut q, Op::Write { offset: off }, Some(buf)).result, Ok(()));
        let rb = q.alloc(SLOT as u32).unwrap();
        let c = one(&mut q, Op::Read { offset: off }, Some(rb));
        assert!(c.buf.unwrap().to_vec().unwrap() == data, "rewrite after discard");
        log.push((off, data));
    }
    if info.has(blkf::WRITE_ZEROES) {
        // First make sure the range is not zero already, then zero it (with and without unmap).
        for (i, unmap) in [false, true].into_iter().enumerate() {
            let off = zeroes_at + i as u64 * 2 * SLOT;
            let len = 2 * SLOT;
            let buf = q.alloc(len as u32).unwrap();
            buf.write_at(0, &vec![0xa5; len as usize]).unwrap();
            assert_eq!(one(&mut q, Op::Write { offset: off }, Some(buf)).result, Ok(()));
            let c = one(&mut q, Op::WriteZeroes { offset: off, len, unmap }, None);
            assert_eq!(c.result, Ok(()), "write-zeroes (unmap {unmap})");
            let rb = q.alloc(len as u32).unwrap();
            rb.write_at(0, &vec![0xff; len as usize]).unwrap();
            let c = one(&mut q, Op::Read { offset: off }, Some(rb));
            let got = c.buf.unwrap().to_vec().unwrap();
            assert!(
                got.iter().all(|&b| b == 0),
                "queue {}: zeroes expected after write-zeroes (unmap {unmap})",
                q.index()
            );
            log.push((off, vec![0u8; len as usize]));
        }
    }
    if info.has(blkf::FLUSH) {
        assert_eq!(one(&mut q, Op::Flush, None).result, Ok(()));
    }
    log
}

#[test]
fn driver_reads_writes_and_flushes_a_qsd_file_export_on_two_queues() {
    if skip_qsd("driver_reads_writes_and_flushes_a_qsd_file_export_on_two_queues") {
        return;
    }
    let t0 = Instant::now();
    let dir = TempDir::new("file");
    let img = dir.0.join("disk.img");
    File::create(&img).unwrap().set_len(IMAGE_SIZE).unwrap();
    let mut qsd = Qsd::start(&dir.0, &file_blockdevs(&img), 2);

    let mut dev = Device::connect(&qsd.socket, &opts()).unwrap_or_else(|e| panic!("connect: {e}\n{}", qsd.log_text()));
    let info = dev.info().clone();
    print_info(&info);
    assert_eq!(info.capacity, Some(IMAGE_SIZE));
    assert_eq!((info.num_queues, info.max_queues), (2, 2));
    for (bit, name) in [
        (vf::VERSION_1, "VERSION_1"),
        (vf::VHOST_USER_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
        (blkf::FLUSH, "FLUSH"),
        (blkf::MQ, "MQ"),
        (blkf::BLK_SIZE, "BLK_SIZE"),
        (blkf::DISCARD, "DISCARD"),
        (blkf::WRITE_ZEROES, "WRITE_ZEROES"),
    ] {
        assert!(info.has(bit), "{name} not negotiated with QSD");
    }
    assert!(!info.readonly && !info.has(blkf::RO));
    assert_eq!(info.block_size, 512);
    let pf = Pf::from_bits_truncate(info.protocol_features);
    assert!(pf.contains(Pf::MQ | Pf::CONFIG), "protocol features {pf:?}");
    assert!(info.serial.is_some(), "QSD answers GET_ID");

    // Errors come back as statuses, not as hangs.
    let mut qs = dev.take_queues();
    assert_eq!(qs.len(), 2);
    let past_end = qs[0].alloc(512).unwrap();
    let c = one(&mut qs[0], Op::Read { offset: IMAGE_SIZE }, Some(past_end));
    assert_eq!(c.result, Err(RequestFailure::IoErr), "read past the end");

    // Both queues from their own threads, each in its own half of the disk.
    let half = IMAGE_SIZE / 2;
    let handles: Vec<_> = qs
        .into_iter()
        .enumerate()
        .map(|(i, q)| {
            let info = info.clone();
            std::thread::spawn(move || exercise_queue(q, info, i as u64 * half, half, 0x9e37_79b9_7f4a_7c15 + i as u64))
        })
        .collect();
    let logs: Vec<Log> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    dev.shutdown(Duration::from_secs(5)).unwrap();
    let mut expect = vec![0u8; IMAGE_SIZE as usize];
    let mut writes = 0;
    for log in &logs {
        for (off, data) in log {
            expect[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            writes += 1;
        }
    }
    eprintln!("phase 1 (ADD_MEM_REG, 2 threads): {writes} writes, took {:?}", t0.elapsed());

    // A second frontend, made to use SET_MEM_TABLE: QSD serves it, and it sees all the data.
    let t1 = Instant::now();
    let (stream, proxy) = connect_without_mem_slots(&qsd.socket);
    let mut dev = Device::from_stream(stream, &opts()).unwrap_or_else(|e| panic!("reconnect: {e}\n{}", qsd.log_text()));
    let pf = Pf::from_bits_truncate(dev.info().protocol_features);
    assert!(!pf.contains(Pf::CONFIGURE_MEM_SLOTS) && pf.contains(Pf::MQ | Pf::CONFIG), "{pf:?}");
    assert_eq!(dev.info().capacity, Some(IMAGE_SIZE));
    assert_eq!(dev.info().num_queues, 2);
    let mut qs = dev.take_queues();
    const CHUNK: u64 = MIB;
    for (qi, q) in qs.iter_mut().enumerate() {
        // Each queue reads the whole image back (16 x 1 MiB in flight) and writes a pattern.
        let mut off = 0;
        while off < IMAGE_SIZE {
            let n = 16.min((IMAGE_SIZE - off) / CHUNK);
            for i in 0..n {
                let buf = q.alloc(CHUNK as u32).unwrap();
                q.submit(Op::Read { offset: off + i * CHUNK }, Some(buf), off + i * CHUNK).unwrap();
            }
            q.kick().unwrap();
            for c in reap(q, n as usize) {
                let at = c.user as usize;
                let got = c.buf.unwrap().to_vec().unwrap();
                assert!(got[..] == expect[at..at + CHUNK as usize], "queue {qi}: data at {at:#x} differs on reconnect");
            }
            off += n * CHUNK;
        }
        let at = 3 * MIB + 512 * (1 + qi as u64);
        let data: Vec<u8> = (0..24576u32).map(|i| (i as u8) ^ (0x5a + qi as u8)).collect();
        let buf = q.alloc(data.len() as u32).unwrap();
        buf.write_at(0, &data).unwrap();
        assert_eq!(one(q, Op::Write { offset: at }, Some(buf)).result, Ok(()));
        assert_eq!(one(q, Op::Flush, None).result, Ok(()));
        expect[at as usize..at as usize + data.len()].copy_from_slice(&data);
        writes += 1;
    }
    drop(qs);
    dev.shutdown(Duration::from_secs(5)).unwrap();
    for t in proxy {
        t.join().unwrap();
    }
    eprintln!("phase 2 (SET_MEM_TABLE via proxy): read back 2 x 64 MiB, took {:?}", t1.elapsed());

    let t2 = Instant::now();
    let st = qsd.stop();
    assert!(st.success(), "QSD exit status {st}:\n{}", qsd.log_text());
    eprintln!("QSD stopped in {:?}", t2.elapsed());

    // The image on the host holds exactly what was written.
    let mut got = Vec::with_capacity(IMAGE_SIZE as usize);
    File::open(&img).unwrap().read_to_end(&mut got).unwrap();
    assert_eq!(got.len() as u64, IMAGE_SIZE);
    if got != expect {
        let i = (0..got.len()).find(|&i| got[i] != expect[i]).unwrap();
        panic!("image differs from what was written, first at byte {i:#x}");
    }
    eprintln!("{writes} writes verified in the image; took {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------
// a null-co export

fn burst(q: &mut QueueHandle, n: u64, depth: u64, seed: u64) {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    for i in 0..depth {
        let op = if i & 1 == 0 { Op::Read { offset: i * 4096 } } else { Op::Write { offset: i * 4096 } };
        q.submit(op, Some(q.alloc(4096).unwrap()), i).unwrap();
    }
    q.kick().unwrap();
    let mut done = 0;
    let mut submitted = depth;
    while done < n {
        out.clear();
        q.wait(&mut out, 1).unwrap();
        for c in out.drain(..) {
            assert_eq!(c.result, Ok(()), "queue {} request {}", q.index(), c.user);
            done += 1;
            if submitted < n {
                let off = 4096 * rng.below((1 << 30) / 4096);
                let op = if rng.below(2) == 0 { Op::Read { offset: off } } else { Op::Write { offset: off } };
                q.submit(op, c.buf, submitted).unwrap();
                submitted += 1;
            }
        }
        q.kick().unwrap();
    }
    assert_eq!(q.in_flight(), 0);
}

#[test]
fn driver_bursts_against_a_qsd_null_export_in_eventfd_and_poll_mode() {
    if skip_qsd("driver_bursts_against_a_qsd_null_export_in_eventfd_and_poll_mode") {
        return;
    }
    let dir = TempDir::new("null");
    // `size` takes plain bytes. read-zeroes is not needed to start the export, but
    // without it reads leave the buffer untouched; with it they return zeroes.
    let mut qsd = Qsd::start(&dir.0, &["driver=null-co,node-name=disk0,size=1073741824,read-zeroes=on".into()], 2);
    let mut dev = Device::connect(&qsd.socket, &Options { queue_size: 64, ..opts() })
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", qsd.log_text()));
    let info = dev.info().clone();
    print_info(&info);
    assert_eq!(info.capacity, Some(1 << 30));
    assert_eq!(info.num_queues, 2);

    let mut qs = dev.take_queues();
    let buf = qs[1].alloc(8192).unwrap();
    buf.write_at(0, &[0xaa; 8192]).unwrap();
    let c = one(&mut qs[1], Op::Read { offset: 1 << 20 }, Some(buf));
    assert_eq!(c.result, Ok(()));
    assert!(c.buf.unwrap().to_vec().unwrap().iter().all(|&b| b == 0), "read-zeroes=on reads zeroes");

    const N: u64 = 3000;
    let handles: Vec<_> = qs
        .into_iter()
        .map(|mut q| {
            std::thread::spawn(move || {
                let mut times = Vec::new();
                for poll in [false, true, false] {
                    q.set_poll_mode(poll);
                    let t = Instant::now();
                    let seed = 1 + q.index() as u64;
                    burst(&mut q, N, 16, seed);
                    times.push((poll, t.elapsed()));
                }
                (q.index(), times)
            })
        })
        .collect();
    for h in handles {
        let (i, times) = h.join().unwrap();
        for (poll, t) in times {
            eprintln!("queue {i}: {N} requests in {} mode took {t:?}", if poll { "poll" } else { "eventfd" });
        }
    }
    dev.shutdown(Duration::from_secs(5)).unwrap();
    let st = qsd.stop();
    assert!(st.success(), "QSD exit status {st}:\n{}", qsd.log_text());
}

/// QSD offers no packed ring (QEMU's vhost-user-blk server is split only): asking for one
/// is a clear error before anything is set up, and `RingChoice::Auto` falls back to split.
#[test]
fn qsd_has_no_packed_ring_auto_falls_back_to_split() {
    if skip_qsd("qsd_has_no_packed_ring_auto_falls_back_to_split") {
        return;
    }
    let dir = TempDir::new("ring");
    let qsd = Qsd::start(&dir.0, &["driver=null-co,node-name=disk0,size=1048576,read-zeroes=on".into()], 1);
    let packed = Options { ring: RingChoice::Packed, ..opts() };
    match Device::connect(&qsd.socket, &packed) {
        Err(e @ DriverError::PackedNotOffered) => eprintln!("RingChoice::Packed: {e}"),
        Err(e) => panic!("expected PackedNotOffered, got {e}"),
        Ok(dev) => panic!("QSD negotiated a packed ring: {:#x}", dev.info().features),
    }
    let mut dev = Device::connect(&qsd.socket, &Options { ring: RingChoice::Auto, ..opts() })
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", qsd.log_text()));
    assert_eq!(dev.ring_kind(), RingKind::Split);
    assert_eq!(dev.info().offered_features & vf::RING_PACKED, 0);
    let mut q = dev.take_queues().remove(0);
    assert_eq!(q.ring_kind(), RingKind::Split);
    let buf = q.alloc(4096).unwrap();
    assert_eq!(one(&mut q, Op::Read { offset: 4096 }, Some(buf)).result, Ok(()));
    drop(q);
    dev.shutdown(Duration::from_secs(5)).unwrap();
}
