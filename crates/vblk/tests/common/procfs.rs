//! Resources of a process as /proc shows them, for leak checks: open fds, memfd
//! mappings, resident memory.

use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::read_lossy;

/// Open file descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
}

/// Mappings of memfds (a frontend's shared guest memory) in process `pid`.
pub fn memfd_mappings(pid: u32) -> usize {
    read_lossy(Path::new(&format!("/proc/{pid}/maps"))).lines().filter(|l| l.contains("/memfd:")).count()
}

/// Resident set size of process `pid`, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = read_lossy(Path::new(&format!("/proc/{pid}/status")));
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap_or_else(|| panic!("no VmRSS for {pid}"));
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS value")
}

/// Polls `f` until it returns `want` or `timeout` passes; returns its last value.
pub fn settle<T: PartialEq + Copy>(want: T, timeout: Duration, mut f: impl FnMut() -> T) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let v = f();
        if v == want || Instant::now() > deadline {
            return v;
        }
        sleep(Duration::from_millis(10));
    }
}
