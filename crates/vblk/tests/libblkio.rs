//! `vblk serve` against a frontend that is not ours: libblkio's `virtio-blk-vhost-user`
//! driver (the `blkio` crate), which requires `CONFIGURE_MEM_SLOTS`, `REPLY_ACK` and
//! `CONFIG`. Real daemon, real socket.

use std::ffi::CStr;
use std::fs::File;
use std::io::Read;
use std::mem::MaybeUninit;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

// ---------------------------------------------------------------------------
// harness

/// A per-test directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("vblk-libblkio-{}-{tag}", std::process::id()));
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

/// A running `vblk serve`; SIGKILLed if still running when dropped.
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, args: &[&str], socket: &Path) -> Daemon {
        let log = dir.join("vblk.log");
        let child = Command::new(env!("CARGO_BIN_EXE_vblk"))
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(File::create(&log).unwrap())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut d = Daemon { child: Some(child), log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
            if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("vblk serve exited early ({st}):\n{}", d.log_text());
            }
            assert!(Instant::now() < deadline, "socket {} never appeared:\n{}", socket.display(), d.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGTERM, then wait (SIGKILL after 15 s).
    fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("already stopped");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let st = child.wait().unwrap();
                panic!("vblk serve ignored SIGTERM for 15 s (killed: {st}):\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The bytes of a region libblkio allocated (and we mapped), at `off..off + len`.
fn bytes(region: &MemoryRegion, off: usize, len: usize) -> &'static mut [u8] {
    assert!(off + len <= region.len);
    // SAFETY: the region is a live shared mapping of `region.len` bytes that outlives every
    // use here (it is freed when the Blkio and its queues are dropped, at the end of each
    // client), and callers use disjoint ranges, never while the device is writing them.
    unsafe { std::slice::from_raw_parts_mut((region.addr + off) as *mut u8, len) }
}

/// A distinct, position-dependent pattern per `tag`.
fn pattern(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31) ^ tag.wrapping_mul(0x5b) ^ (i >> 9) as u8 ^ 0x11).collect()
}

/// Run the queue until `n` completions arrive; each must succeed. Returns their user_data.
fn complete(q: &mut Blkioq, n: usize) -> Vec<usize> {
    let mut done = Vec::with_capacity(n);
    let mut comps: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
    while done.len() < n {
        let want = n - done.len();
        let mut timeout = Duration::from_secs(10);
        let got = q
            .do_io(&mut comps[..want], want, Some(&mut timeout), None)
            .unwrap_or_else(|e| panic!("do_io: {e} ({:?}) with {want} completions missing", e.errno()));
        for c in &comps[..got] {
            // SAFETY: do_io initialised the first `got` completions.
            let c = unsafe { c.assume_init_ref() };
            let msg = if c.error_msg.is_null() {
                String::new()
            } else {
                // SAFETY: libblkio's error messages are static NUL-terminated strings.
                unsafe { CStr::from_ptr(c.error_msg) }.to_string_lossy().into_owned()
            };
            assert_eq!(c.ret, 0, "request {} failed: {msg}", c.user_data);
            done.push(c.user_data);
        }
    }
    done
}

/// A libblkio client of `socket`, connected (not started).
fn connect(socket: &Path) -> Blkio {
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", socket.to_str().unwrap()).unwrap();
    b.connect().unwrap_or_else(|e| panic!("libblkio connect: {e} ({:?})", e.errno()));
    b
}

/// What a queue's thread wrote (offset, data).
type Log = Vec<(u64, Vec<u8>)>;

/// Queue `k`'s work on the first client: six writes of distinct patterns at distinct
/// offsets, all in flight at once, a flush, read-backs, and a vectored write + read.
fn queue_work(q: &mut Blkioq, k: usize, region: MemoryRegion) -> Log {
    let base = k * 2 * MIB as usize; // this queue's 2 MiB of the region
    let mut log = Log::new();
    let mut buf_off = base;
    for j in 0..6usize {
        let len = 64 * 1024 * (1 + j % 3);
        let offset = ((k * 6 + j) as u64) * MIB + j as u64 * 4096 + 512 * k as u64;
        let data = pattern((k * 16 + j) as u8, len);
        bytes(&region, buf_off, len).copy_from_slice(&data);
        q.write(offset, (region.addr + buf_off) as *const u8, len, j, ReqFlags::empty());
        log.push((offset, data));
        buf_off += len;
    }
    assert_eq!(complete(q, 6).len(), 6);
    q.flush(100, ReqFlags::empty());
    assert_eq!(complete(q, 1), vec![100]);

    // Read back into the second MiB, all in flight.
    let mut read_at = Vec::new();
    let mut buf_off = base + MIB as usize;
    for (j, (offset, data)) in log.iter().enumerate() {
        bytes(&region, buf_off, data.len()).fill(0xee);
        q.read(*offset, (region.addr + buf_off) as *mut u8, data.len(), j, ReqFlags::empty());
        read_at.push(buf_off);
        buf_off += data.len();
    }
    for j in complete(q, log.len()) {
        let (offset, data) = &log[j];
        assert!(bytes(&region, read_at[j], data.len()) == &data[..], "queue {k}: read-back mismatch at {offset:#x}");
    }

    // 100 reads in flight, more than the ring holds (libblkio uses no indirect descriptors,
    // so 3 per request: it backlogs the rest); 20 rounds wrap the ring several times.
    let mut rng = k as u64 * 7919 + 1;
    for round in 0..20 {
        let mut want = Vec::new();
        for i in 0..100usize {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let (offset, data) = &log[(rng >> 33) as usize % log.len()];
            let sub = ((rng >> 20) as usize % (data.len() / 512 - 8)) * 512;
            let at = base + MIB as usize + i * 4096;
            q.read(offset + sub as u64, (region.addr + at) as *mut u8, 4096, i, ReqFlags::empty());
            want.push((at, &data[sub..sub + 4096]));
        }
        for i in complete(q, 100) {
            assert!(bytes(&region, want[i].0, 4096) == want[i].1, "queue {k}: round {round} read {i} differs");
        }
    }

    // A FUA write gathered from three buffers, read back scattered into two.
    let offset = (12 + k as u64) * MIB;
    let data = pattern(0x80 + k as u8, 3 * 8192);
    let (a, b, c) = (base, base + 64 * 1024, base + 256 * 1024);
    bytes(&region, a, 4096).copy_from_slice(&data[..4096]);
    bytes(&region, b, 12288).copy_from_slice(&data[4096..16384]);
    bytes(&region, c, 8192).copy_from_slice(&data[16384..]);
    let iov = [
        libc::iovec { iov_base: (region.addr + a) as *mut _, iov_len: 4096 },
        libc::iovec { iov_base: (region.addr + b) as *mut _, iov_len: 12288 },
        libc::iovec { iov_base: (region.addr + c) as *mut _, iov_len: 8192 },
    ];
    q.writev(offset, iov.as_ptr(), 3, 200, ReqFlags::FUA);
    assert_eq!(complete(q, 1), vec![200]);
    let (d, e) = (base + MIB as usize, base + MIB as usize + 512 * 1024);
    bytes(&region, d, 10240).fill(0);
    bytes(&region, e, 14336).fill(0);
    let iov = [
        libc::iovec { iov_base: (region.addr + d) as *mut _, iov_len: 10240 },
        libc::iovec { iov_base: (region.addr + e) as *mut _, iov_len: 14336 },
    ];
    q.readv(offset, iov.as_ptr(), 2, 201, ReqFlags::empty());
    assert_eq!(complete(q, 1), vec![201]);
    assert!(bytes(&region, d, 10240) == &data[..10240], "queue {k}: readv, first part");
    assert!(bytes(&region, e, 14336) == &data[10240..], "queue {k}: readv, second part");
    log.push((offset, data));
    log
}

// ---------------------------------------------------------------------------

#[test]
fn libblkio_reads_and_writes_through_vblk_serve_and_reconnects() {
    let t0 = Instant::now();
    let dir = TempDir::new("rw");
    let img = dir.0.join("disk.img");
    let sock = dir.0.join("vblk.sock");
    let mut daemon = Daemon::start(
        &dir.0,
        &["serve", img.to_str().unwrap(), "--socket", sock.to_str().unwrap(), "--num-queues", "2", "--size", "64M"],
        &sock,
    );
    let mut expect = vec![0u8; SIZE as usize];

    // --- first client: two queues, one thread each
    {
        let mut b = connect(&sock);
        assert_eq!(b.get_u64("capacity").unwrap(), SIZE, "capacity through libblkio's property API");
        assert_eq!(b.get_i32("max-queues").unwrap(), 2);
        for p in ["max-transfer", "max-segments", "max-segment-len", "request-alignment", "optimal-io-size"] {
            eprintln!("{p} = {}", b.get_i32(p).unwrap());
        }
        for p in ["max-discard-len", "max-write-zeroes-len", "max-mem-regions", "mem-region-alignment"] {
            eprintln!("{p} = {}", b.get_u64(p).unwrap());
        }
        eprintln!("flush-needed = {}", b.get_bool("flush-needed").unwrap());
        assert!(b.get_u64("max-write-zeroes-len").unwrap() > 0, "WRITE_ZEROES negotiated");
        assert!(b.get_u64("max-discard-len").unwrap() > 0, "DISCARD negotiated");
        b.set_i32("num-queues", 2).unwrap();
        let mut queues = b.start().unwrap_or_else(|e| panic!("libblkio start: {e}")).queues;
        assert_eq!(queues.len(), 2);
        let align = b.get_u64("mem-region-alignment").unwrap() as usize;
        let len = (5 * MIB as usize).div_ceil(align) * align;
        let region = b.alloc_mem_region(len).unwrap();
        b.map_mem_region(&region).unwrap_or_else(|e| panic!("map_mem_region (ADD_MEM_REG): {e}"));

        let handles: Vec<_> = queues
            .drain(..)
            .enumerate()
            .map(|(k, mut q)| {
                std::thread::spawn(move || {
                    let log = queue_work(&mut q, k, region);
                    (q, log)
                })
            })
            .collect();
        let mut qs = Vec::new();
        for h in handles {
            let (q, log) = h.join().unwrap();
            for (off, data) in log {
                expect[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
            qs.push(q);
        }

        // Write-zeroes on queue 0 over data queue 1 wrote (with and without unmap), then read back.
        let scratch = 4 * MIB as usize;
        let q = &mut qs[0];
        let z1 = (6 * MIB + 4096 + 512 + 8192, 16384u64); // inside queue 1's first write
        let z2 = (7 * MIB + 2 * 4096 + 512, 4096u64); // inside queue 1's second write
        q.write_zeroes(z1.0, z1.1, 1, ReqFlags::empty());
        q.write_zeroes(z2.0, z2.1, 2, ReqFlags::NO_UNMAP);
        complete(q, 2);
        for (off, len) in [z1, z2] {
            expect[off as usize..(off + len) as usize].fill(0);
            let (roff, rlen) = (off - 4096, len + 8192);
            bytes(&region, scratch, rlen as usize).fill(0xcc);
            q.read(roff, (region.addr + scratch) as *mut u8, rlen as usize, 3, ReqFlags::empty());
            complete(q, 1);
            assert!(
                bytes(&region, scratch, rlen as usize) == &expect[roff as usize..(roff + rlen) as usize],
                "zeroes at {off:#x}+{len:#x}, data around them"
            );
        }
        // Discard of a range nobody wrote: the data there is undefined afterwards anyway.
        qs[1].discard(40 * MIB, MIB, 4, ReqFlags::empty());
        complete(&mut qs[1], 1);
        qs[1].flush(5, ReqFlags::empty());
        complete(&mut qs[1], 1);

        // Leave with I/O in flight: the daemon drains it and serves the next frontend.
        for (k, q) in qs.iter_mut().enumerate() {
            for i in 0..32 {
                let at = k * 2 * MIB as usize + i * 64 * 1024;
                q.read(i as u64 * MIB, (region.addr + at) as *mut u8, 64 * 1024, i, ReqFlags::empty());
            }
            let mut none: [MaybeUninit<Completion>; 0] = [];
            q.do_io(&mut none, 0, None, None).unwrap(); // kicks the device, waits for nothing
        }
        drop(qs);
        drop(b);
    }
    eprintln!("first client done after {:?}", t0.elapsed());
    assert!(daemon.alive(), "vblk serve died with the first client:\n{}", daemon.log_text());

    // --- second client: the daemon serves the next frontend; one interrupt + one poll queue
    {
        let mut b = connect(&sock);
        assert_eq!(b.get_u64("capacity").unwrap(), SIZE);
        b.set_i32("num-queues", 1).unwrap();
        b.set_i32("num-poll-queues", 1).unwrap();
        let out = b.start().unwrap_or_else(|e| panic!("second client start: {e}"));
        let (mut q, mut pq) = (out.queues.into_iter().next().unwrap(), out.poll_queues.into_iter().next().unwrap());
        let region = b.alloc_mem_region(2 * MIB as usize).unwrap();
        b.map_mem_region(&region).unwrap();
        // Read the first 16 MiB (everything written except the discarded MiB) in 1 MiB
        // requests, alternating the queues.
        for i in 0..16u64 {
            let buf = bytes(&region, 0, MIB as usize);
            buf.fill(0xdd);
            let queue = if i & 1 == 0 { &mut q } else { &mut pq };
            queue.read(i * MIB, region.addr as *mut u8, MIB as usize, i as usize, ReqFlags::empty());
            complete(queue, 1);
            let at = (i * MIB) as usize;
            assert!(buf == &expect[at..at + MIB as usize], "second client: MiB {i} differs");
        }
        // Swap the buffer memory (REM_MEM_REG + ADD_MEM_REG while the rings run), then a
        // write on the poll queue, read back on the other.
        b.unmap_mem_region(&region);
        b.free_mem_region(&region);
        let region = b.alloc_mem_region(MIB as usize).unwrap();
        b.map_mem_region(&region).unwrap_or_else(|e| panic!("map_mem_region after unmap: {e}"));
        let data = pattern(0xf0, 128 * 1024);
        let off = 20 * MIB + 512;
        let half = MIB as usize / 2;
        bytes(&region, half, data.len()).copy_from_slice(&data);
        pq.write(off, (region.addr + half) as *const u8, data.len(), 1, ReqFlags::empty());
        complete(&mut pq, 1);
        pq.flush(2, ReqFlags::empty());
        complete(&mut pq, 1);
        bytes(&region, 0, data.len()).fill(0);
        q.read(off, region.addr as *mut u8, data.len(), 3, ReqFlags::empty());
        complete(&mut q, 1);
        assert!(bytes(&region, 0, data.len()) == &data[..], "poll-queue write read back");
        expect[off as usize..off as usize + data.len()].copy_from_slice(&data);
        b.unmap_mem_region(&region);
        drop((q, pq));
        drop(b);
    }
    eprintln!("second client done after {:?}", t0.elapsed());

    let st = daemon.stop();
    let log = daemon.log_text();
    assert!(st.success(), "vblk serve exit status {st}:\n{log}");
    assert!(!sock.exists(), "socket removed on exit");
    assert!(!log.contains("WARN") && !log.contains("ERROR"), "vblk refused or failed something:\n{log}");
    assert_eq!(log.matches("frontend connected").count(), 2, "{log}");

    // The image on the host (outside the discarded MiB) holds what was written.
    let mut got = Vec::new();
    File::open(&img).unwrap().read_to_end(&mut got).unwrap();
    assert_eq!(got.len() as u64, SIZE);
    let discarded = (40 * MIB) as usize..(41 * MIB) as usize;
    got[discarded.clone()].fill(0);
    if got != expect {
        let i = (0..got.len()).find(|&i| got[i] != expect[i]).unwrap();
        panic!("image differs from what was written, first at byte {i:#x}");
    }
    eprintln!("vblk log:\n{log}");
    eprintln!("took {:?}", t0.elapsed());
}
