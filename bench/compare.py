#!/usr/bin/env python3
"""Compare `vblk serve` with qemu-storage-daemon (and fio), with two vhost-user clients.

Every backend case runs with both clients (--clients): libblkio's virtio-blk-vhost-user driver
(crates/vblk/examples/blkio_bench.rs, a driver vblk did not write; its figures come first) and
`vblk bench` (vblk's own driver). Pairs are interleaved per client: backend, peer, ... with
libblkio, then the same with `vblk bench`, then the next pair. Ratios are taken within one
client. Case 7 compares the two clients themselves (against QSD); case 8 (packed vs split ring)
runs with `vblk bench` only: libblkio's vhost-user driver has no packed ring.

For each workload the backend runs pinned to one CPU (--backend-cpu, default 1) and the client
to the other (--client-cpu, default 0). Runs are interleaved (vblk, peer, vblk, peer, ...) and
every figure is the median over the pairs; the ratio is always median(vblk) / median(peer), every
pair's ratio and the worst pair are shown, a target is met when the median ratio and the worst
pair meet it, and the target says which way it must go (">= 1.5": vblk must be at least 1.5x
the peer; "<= 0.5": vblk must be at most half of the peer).

Before the pairs, each QSD configuration (aio=io_uring/native/threads, cache.direct, iothread
poll-max-ns=32768/0) gets a short probe and the best one is used for the pairs.

Cases 9-12 serve qcow2 images (`vblk serve IMG --format qcow2`; QSD: driver=qcow2 over
driver=file with the same file options as the raw cases): 9 4k random reads and 11 1 MiB
sequential reads on a fully allocated image, 10 4k random writes on a fresh overlay over a raw
base (a new overlay for every run, so each run allocates clusters), 12 vblk on the qcow2 image
against vblk on the raw file holding the same data. The images are on tmpfs (--qcow2-disk ext4:
under --disk-dir instead).

Case 13 (not in the default list: it needs Ceph, `scripts/ceph-micro.sh install`) serves a Ceph
RBD image: `vblk serve rbd:rbd/IMG` against QSD's rbd driver on the same image, 13a 4k random
reads QD32, 13b 4k random writes QD32, 13c 4k random reads QD1. The script starts a one-node
cluster (scripts/ceph-micro.sh: a monitor and a memstore OSD) in its temp directory, makes and
fills the image (--rbd-size, `rbd bench` sequential 4 MiB writes) and stops the cluster at the
end. The backends are pinned as in the other cases, but the cluster's daemons are not: they run
on both CPUs, beside the client and the backend. Backend CPU is the whole backend process
(librbd's threads included); the cluster's CPU (OSD + monitor) is reported per I/O too.

Case 14 (scaling, not in the default list): the null backend with 1, 2 and 4 queues and as many
`vblk serve` worker threads, and 4 queues on `--threads 1`; QSD (one iothread: QEMU 10.0's
vhost-user-blk export takes one) with the same queues; the client runs one thread per queue. With
the backend pinned to --backend-cpu and the client to --client-cpu (one CPU each by default) it
shows what more queues and threads cost, not how throughput scales: see bench/README.md.

Standard library only. See bench/README.md.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Cargo's target directory: $CARGO_TARGET_DIR when set, as cargo itself does.
TARGET = os.path.abspath(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"))
VBLK = os.path.join(TARGET, "release", "vblk")
QSD = shutil.which("qemu-storage-daemon") or "/usr/bin/qemu-storage-daemon"
FIO = shutil.which("fio") or "fio"
QEMU_IMG = shutil.which("qemu-img") or "qemu-img"  # cases 9-12 make their qcow2 images with it
VBLK_RUN = VBLK  # the copy in the temp directory, once main() made it
BLKIO = os.path.join(TARGET, "release", "examples", "blkio_bench")  # libblkio's client
BLKIO_RUN = BLKIO
PERF = shutil.which("perf")
CLK_TCK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30

HIGHER, LOWER = "higher", "lower"

# The clients, in the order their figures are shown: libblkio's first (a driver vblk did not write).
CLIENT_NAMES = {"blkio": "libblkio", "vblk": "vblk bench"}
CLIENT_ORDER = ["blkio", "vblk"]

# What each metric is called in the table, and its unit.
METRICS = {
    "iops": ("IOPS", ""),
    "mib_s": ("MiB/s", ""),
    "p50": ("p50 latency", "µs"),
    "p99": ("p99 latency", "µs"),
    "p99_9": ("p99.9 latency", "µs"),
    "max": ("max latency", "µs"),
    "mean": ("mean latency", "µs"),
    "backend_cpu_us_per_io": ("backend CPU/IO", "µs"),
    "client_cpu_us_per_io": ("client CPU/IO", "µs"),
    "cluster_cpu_us_per_io": ("Ceph OSD+mon CPU/IO", "µs"),
    "syscalls_per_io": ("client syscalls/IO", ""),
}


SAME = object()


class Check:
    """A target on the ratio vblk / peer, or (absolute=True) on vblk's own figure.

    `blkio`: the target with libblkio's client when it differs from `vblk bench`'s (issue 15's
    targets are stated for libblkio's client)."""

    def __init__(self, metric, direction, target, absolute=False, blkio=SAME):
        self.metric, self.direction, self.absolute = metric, direction, absolute
        self.targets = {"vblk": target, "blkio": target if blkio is SAME else blkio}
        self.target = target

    def for_client(self, client):
        """The check as it applies to the runs of one client."""
        c = Check(self.metric, self.direction, self.targets.get(client, self.target), self.absolute)
        return c

    def target_text(self):
        if self.target is None:
            return "(comparison)"
        op = ">= " if self.direction == HIGHER else ("< " if self.absolute else "<= ")
        return ("vblk " if self.absolute else "") + op + f"{self.target:g}"

    def passes(self, ratio):
        if self.target is None:
            return None  # a comparison, not a target
        if self.absolute:
            return ratio >= self.target if self.direction == HIGHER else ratio < self.target
        return ratio >= self.target if self.direction == HIGHER else ratio <= self.target

    def worst(self, ratios):
        """The pair ratio furthest from the target's side: the lowest when higher is better."""
        if not ratios:
            return None
        return min(ratios) if self.direction == HIGHER else max(ratios)


class Workload:
    """One measured configuration: a disk, a client workload, the sides and the checks."""

    def __init__(self, case, wid, title, disk, bench, checks, primary, peer="qsd", info=(), image="raw"):
        self.case, self.id, self.title, self.disk = case, wid, title, disk
        # The image format the backends serve: "raw" (the disk file itself), "qcow2" (a fully
        # allocated qcow2 image made from the disk file, same data) or "overlay" (a fresh,
        # empty qcow2 overlay on the raw disk file for every run: writes allocate clusters),
        # or "rbd" (case 13: an RBD image of the script's own one-node Ceph cluster; disk "rbd").
        self.image = image
        self.bench = bench  # dict: rw, bs, iodepth, poll, batch, queues (1), threads (vblk serve's)
        self.checks = checks
        self.primary = primary  # (metric, direction) used to pick the best QSD config
        # The side the ratio is taken against: "qsd" or "fio" (vblk serve vs a peer backend,
        # with each client of --clients), or "blkio" (`vblk bench` vs libblkio's client, both
        # against QSD: the sides are clients and the backend is QSD for both), or "split"
        # (case 8: `vblk bench --ring packed` vs `--ring split`, both against `vblk serve`), or
        # "raw" (case 12: `vblk serve` on the qcow2 image vs `vblk serve` on the raw file).
        self.peer = peer
        self.info = list(info)  # extra sides measured for information only
        # Environment and extra flags of `vblk serve` (case 13: --rbd-cache when QSD's chosen
        # configuration has librbd's cache on, so that both sides run librbd alike).
        self.vblk_env = {}
        self.vblk_more = []

    @property
    def sides(self):
        return ["vblk", self.peer] + [s for s in self.info if s != self.peer]

    def clients(self, wanted):
        """The clients this workload runs with, given --clients: both in a backend case; None
        (the sides are the clients) in case 7; `vblk bench` alone in case 8 (libblkio's
        vhost-user driver negotiates the split ring only)."""
        if self.clients_compared:
            return [None]
        if self.rings_compared:
            return ["vblk"]
        return list(wanted)

    @property
    def queues(self):
        return self.bench.get("queues", 1)

    @property
    def clients_compared(self):
        return self.peer == "blkio"

    @property
    def rings_compared(self):
        return self.peer == "split"

    @property
    def formats_compared(self):
        return self.peer == "raw"

    def image_of(self, side):
        """The image format a side serves: the raw peer of case 12 serves the raw file."""
        return "raw" if self.formats_compared and side == "raw" else self.image

    def backend_of(self, side):
        if self.rings_compared or self.formats_compared:
            return "vblk"
        return "qsd" if self.clients_compared else side

    def ring_of(self, side):
        """The virtqueue layout `vblk bench` asks for: the packed ring only in case 8's
        "vblk" side; split everywhere else (QEMU's default, and the only ring QSD has), so
        that the cases compare like with like."""
        return "packed" if self.rings_compared and side == "vblk" else "split"

    def probed(self):
        """Peers whose configuration is probed before the pairs."""
        if self.rings_compared or self.formats_compared:
            return []
        return ["qsd"] if self.clients_compared else [s for s in self.sides if s != "vblk"]


def workloads():
    rr4k32 = dict(rw="randread", bs="4k", iodepth=32, poll=False)
    qd1 = dict(rw="randread", bs="4k", iodepth=1)
    # Cases 1-3: `blkio=` is issue 15's target with libblkio's client (the worst pair must meet
    # it too); the first figure is issue 2's, with `vblk bench`.
    return [
        Workload(1, "1", "null, randread 4k QD32, eventfd client", "null", rr4k32,
                 [Check("iops", HIGHER, 1.5, blkio=2.0), Check("backend_cpu_us_per_io", LOWER, 0.5)],
                 ("iops", HIGHER)),
        Workload(2, "2a", "null, randread 4k QD1, eventfd client", "null", dict(qd1, poll=False),
                 [Check("p50", LOWER, 0.6, blkio=0.5)], ("p50", LOWER)),
        Workload(2, "2b", "null, randread 4k QD1, --poll client", "null", dict(qd1, poll=True),
                 [Check("p50", LOWER, 0.6, blkio=0.5)], ("p50", LOWER)),
        Workload(3, "3a", "tmpfs file, randread 4k QD32", "tmpfs", rr4k32,
                 [Check("iops", HIGHER, 1.4, blkio=2.0)], ("iops", HIGHER)),
        Workload(3, "3b", "tmpfs file, randwrite 4k QD32", "tmpfs", dict(rr4k32, rw="randwrite"),
                 [Check("iops", HIGHER, 1.4, blkio=2.0)], ("iops", HIGHER)),
        Workload(4, "4", "ext4 file, seq write 4k QD32 (merging)", "ext4",
                 dict(rr4k32, rw="write"), [Check("mib_s", HIGHER, 1.5)], ("mib_s", HIGHER)),
        Workload(5, "5a", "tmpfs file, seq read 1M QD32 vs host fio", "tmpfs",
                 dict(rw="read", bs="1M", iodepth=32, poll=False), [Check("mib_s", HIGHER, 0.95)],
                 ("mib_s", HIGHER), peer="fio", info=["qsd"]),
        Workload(5, "5b", "tmpfs file, seq write 1M QD32 vs host fio", "tmpfs",
                 dict(rw="write", bs="1M", iodepth=32, poll=False), [Check("mib_s", HIGHER, 0.95)],
                 ("mib_s", HIGHER), peer="fio", info=["qsd"]),
        Workload(7, "7a", "client: vblk bench vs libblkio vs QSD null, randread 4k QD32, eventfd", "null",
                 rr4k32, [Check("client_cpu_us_per_io", LOWER, 0.8)], ("iops", HIGHER), peer="blkio"),
        Workload(7, "7b", "client: as 7a, 8 completions per wait", "null", dict(rr4k32, batch=8),
                 [Check("client_cpu_us_per_io", LOWER, 0.8)], ("iops", HIGHER), peer="blkio"),
        Workload(7, "7c", "client: as 7a, polling the used ring", "null", dict(rr4k32, poll=True),
                 # A polling client spins a whole CPU, so its CPU/IO only mirrors IOPS: the target
                 # here is no system call per I/O.
                 [Check("syscalls_per_io", LOWER, 1, absolute=True)],
                 ("iops", HIGHER), peer="blkio"),
        # Case 8: the packed virtqueue against the split one, same daemon, same client. No
        # target: docs/PERFORMANCE.md explains the difference.
        Workload(8, "8a", "rings: packed vs split, null randread 4k QD32, eventfd", "null", rr4k32,
                 [Check("iops", HIGHER, None), Check("backend_cpu_us_per_io", LOWER, None),
                  Check("client_cpu_us_per_io", LOWER, None)], ("iops", HIGHER), peer="split"),
        Workload(8, "8b", "rings: packed vs split, null randread 4k QD1, eventfd", "null", dict(qd1, poll=False),
                 [Check("p50", LOWER, None), Check("backend_cpu_us_per_io", LOWER, None),
                  Check("client_cpu_us_per_io", LOWER, None)], ("p50", LOWER), peer="split"),
        # Cases 9-12: qcow2 (64 KiB clusters, QEMU's default), on tmpfs like case 3 so the
        # backends' format code, not a device, is what is measured, and the page cache cannot
        # favour one side: on tmpfs buffered and O_DIRECT I/O read the same memory. (vblk's
        # qcow2 storage is buffered as of this writing, while the raw file and QSD's ext4 configs
        # are O_DIRECT: --qcow2-disk ext4, which moves them to --disk-dir, compares the host page
        # cache with the device.) Targets from issue 12: 1.5x QSD's IOPS at 4k, and qcow2 reads
        # of allocated clusters at least 0.95x of vblk's own raw figure.
        Workload(9, "9", "qcow2 allocated, tmpfs, randread 4k QD32", "tmpfs", rr4k32,
                 [Check("iops", HIGHER, 1.5)], ("iops", HIGHER), image="qcow2"),
        Workload(10, "10", "qcow2 fresh overlay on a raw base, tmpfs, randwrite 4k QD32", "tmpfs",
                 dict(rr4k32, rw="randwrite"), [Check("iops", HIGHER, 1.5)], ("iops", HIGHER),
                 image="overlay"),
        # The same size and depth as case 5's sequential cases; no target in the issue.
        Workload(11, "11", "qcow2 allocated, tmpfs, seq read 1M QD32", "tmpfs",
                 dict(rw="read", bs="1M", iodepth=32, poll=False), [Check("mib_s", HIGHER, None)],
                 ("mib_s", HIGHER), image="qcow2"),
        Workload(12, "12", "vblk: qcow2 allocated vs raw, same data, tmpfs, randread 4k QD32", "tmpfs",
                 rr4k32, [Check("iops", HIGHER, 0.95)], ("iops", HIGHER), peer="raw", image="qcow2"),
        # Case 13: Ceph RBD, vblk serve rbd:... vs QSD's rbd driver (librbd both) on one image of
        # a one-node cluster whose OSD and monitor share both CPUs with the client and the
        # backend. Targets from issue 13: 1.3x QSD's IOPS at QD32, 0.7x its backend CPU per I/O.
        Workload(13, "13a", f"rbd, randread 4k QD32 {RBD_NOTE}", "rbd", rr4k32,
                 [Check("iops", HIGHER, 1.3), Check("backend_cpu_us_per_io", LOWER, 0.7),
                  Check("cluster_cpu_us_per_io", LOWER, None)], ("iops", HIGHER), image="rbd"),
        Workload(13, "13b", f"rbd, randwrite 4k QD32 {RBD_NOTE}", "rbd", dict(rr4k32, rw="randwrite"),
                 [Check("iops", HIGHER, 1.3), Check("backend_cpu_us_per_io", LOWER, 0.7),
                  Check("cluster_cpu_us_per_io", LOWER, None)], ("iops", HIGHER), image="rbd"),
        Workload(13, "13c", f"rbd, randread 4k QD1 {RBD_NOTE}", "rbd", dict(qd1, poll=False),
                 [Check("p50", LOWER, None), Check("backend_cpu_us_per_io", LOWER, None)],
                 ("p50", LOWER), image="rbd"),
    ] + [
        # Case 14: scaling. The null backend, N queues with QD32 each (the client: one thread per
        # queue), `vblk serve --num-queues N --threads T` against QSD with the same queues on its
        # one iothread. No targets: with one CPU for the backend and one for the client it shows
        # the cost of more queues and threads (CPU per I/O, IOPS against 14a), not throughput
        # scaling; pass CPU lists (--backend-cpu 1-4 --client-cpu 5-8) on a bigger machine.
        Workload(14, wid, f"scaling: null, randread 4k QD32 per queue, {q} queue{'s' if q > 1 else ''}, "
                 f"vblk --threads {t}", "null", dict(rr4k32, queues=q, threads=t),
                 [Check("iops", HIGHER, None), Check("backend_cpu_us_per_io", LOWER, None),
                  Check("client_cpu_us_per_io", LOWER, None)], ("iops", HIGHER))
        for wid, q, t in (("14a", 1, 1), ("14b", 2, 2), ("14c", 4, 4), ("14d", 4, 1))
    ]


RBD_NOTE = "(one-node Ceph, memstore OSD; the OSD and monitor run unpinned on both CPUs)"
RBD_POOL = "rbd"
CEPH_MICRO = os.path.join(ROOT, "scripts", "ceph-micro.sh")
RBD = shutil.which("rbd") or "rbd"
DEFAULT_CASES = "1,2,3,4,5,6,7,8,9,10,11,12"  # 13 (RBD) needs Ceph: --cases 13


SCALING_NOTE = """\
Scaling (case 14): the backend has --backend-cpu ({backend}) and the client --client-cpu ({client}).
With one CPU each (the default, and all a 2-CPU machine has), 2 and 4 queues cannot run faster
than 1: the worker threads take turns on one CPU, and so do the client's. What it does show: the
cost of more queues and threads on the same CPU (backend and client CPU per I/O against 14a: a
flat line is good, growth is per-queue overhead: context switches between workers, polling of
idle queues, lock or cache-line traffic), 4 queues on one thread (14d) against 4 threads (14c),
and the same for QSD with its one iothread. It cannot show throughput scaling with cores, nor
contention between workers on different CPUs: for that give each side N CPUs
(--backend-cpu 1-4 --client-cpu 5-8) on a machine that has them."""

# Rows for the cases this script does not measure.
NOT_MEASURED = {}

IDLE_TARGET = 1.0  # case 6: % of one CPU


def run_idle(a):
    """Case 6: `bench/idle.sh` (a TCG guest attached, no I/O) --pairs times; the backend's CPU
    share between 1 s and 6 s after the guest's last I/O. An absolute target, no peer."""
    print("\n== case 6: idle backend CPU, a Linux guest attached (TCG), no I/O", flush=True)
    out = {"case": 6, "id": "6", "title": "idle backend CPU, guest attached, no I/O", "runs": []}
    script = os.path.join(ROOT, "bench", "idle.sh")
    for i in range(a.pairs):
        argv = ["bash", script, "--window", "5"]
        if a.vblk_args:
            argv += ["--"] + shlex.split(a.vblk_args)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("idle:")), None)
        if r.returncode != 0 or line is None:
            rec = {"error": (r.stdout + r.stderr).strip()[-400:]}
            print(f"    [{i + 1}/{a.pairs}] ERROR {rec['error']}", flush=True)
        else:
            pct = float(line.split(" used ")[1].split("%")[0])
            rec = {"pct": pct, "line": line}
            print(f"    [{i + 1}/{a.pairs}] {pct:.2f}% of one CPU", flush=True)
        out["runs"].append(rec)
    v = median([r.get("pct") for r in out["runs"]])
    out["checks"] = [{"metric": "idle_pct", "vblk": v, "target": IDLE_TARGET,
                      "pass": None if v is None else v < IDLE_TARGET}]
    return out


def qsd_configs(disk):
    """QSD configurations to probe for a disk kind: (label, blockdev args, iothread poll-max-ns)."""
    polls = [32768, 0]
    if disk == "rbd":
        # No aio= for rbd (librbd's own threads do the I/O). cache.direct picks librbd's cache:
        # QEMU sets rbd_cache=true unless the node has cache.direct=on (BDRV_O_NOCACHE), and
        # cache.direct is off by default, so QSD's default is rbd_cache=true (librbd's own
        # default); `vblk serve` runs with rbd_cache=false unless --rbd-cache.
        files = [("rbd_cache=true (default)", "cache.direct=off"),
                 ("rbd_cache=false (cache.direct=on)", "cache.direct=on")]
    elif disk == "null":
        files = [("null-co", None)]
    elif disk == "tmpfs":
        # tmpfs accepts O_DIRECT since Linux 6.6 (it is buffered underneath); older kernels
        # refuse it, and the cache.direct=on configs then fail to start and are skipped.
        files = [("direct,io_uring", "cache.direct=on,aio=io_uring"),
                 ("direct,native", "cache.direct=on,aio=native"),
                 ("buffered,io_uring", "cache.direct=off,aio=io_uring"),
                 ("buffered,threads", "cache.direct=off,aio=threads")]
    else:
        files = [("direct,io_uring", "cache.direct=on,aio=io_uring"),
                 ("direct,native", "cache.direct=on,aio=native"),
                 ("direct,threads", "cache.direct=on,aio=threads")]
    return [(f"{name},poll-max-ns={p}", opts, p) for name, opts in files for p in polls]


# ---------------------------------------------------------------------------------------------
# processes


class Procs:
    """Every backend we started, killed on exit whatever happens."""

    def __init__(self):
        self.live = []

    def start(self, argv, log_path, env=None):
        log = open(log_path, "wb")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             env=dict(os.environ, **env) if env else None)
        log.close()
        self.live.append(p)
        return p

    def stop(self, p, timeout=10):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.live:
            self.live.remove(p)
        return p.returncode

    def stop_all(self):
        for p in list(self.live):
            try:
                self.stop(p, timeout=3)
            except Exception:  # noqa: BLE001 - best effort at exit
                p.kill()


PROCS = Procs()


def proc_cpu_us(pid):
    """utime + stime of the whole process (all threads, including exited ones), in µs."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) * 1e6 / CLK_TCK


def sys_cpu_us():
    """(busy, steal) µs of all CPUs from /proc/stat: to see how much else ran during a run."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    busy = v[0] + v[1] + v[2] + v[5] + v[6]
    return busy * 1e6 / CLK_TCK, v[7] * 1e6 / CLK_TCK


def proc_table():
    """{pid: (comm, utime + stime ticks)} of every process: to name who else was busy."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                data = f.read()
        except OSError:
            continue
        comm = data[data.index("(") + 1:data.rindex(")")]
        fields = data.rsplit(")", 1)[1].split()
        out[int(pid)] = (comm, int(fields[11]) + int(fields[12]))
    return out


def noise(before, after, wall, ours_us, procs0=None, procs1=None, ours=()):
    """CPU share (in CPUs) used by other processes and stolen by the hypervisor during a run,
    and the busiest other processes still alive at the end."""
    busy, steal = after[0] - before[0], after[1] - before[1]
    n = {"others_cpus": max(0.0, (busy - ours_us) / 1e6 / wall), "steal_cpus": steal / 1e6 / wall}
    if procs0 is not None and procs1 is not None:
        top = []
        for pid, (comm, t1) in procs1.items():
            if pid in ours or pid == os.getpid():
                continue
            t0 = procs0.get(pid, (comm, 0))[1]
            share = (t1 - t0) / CLK_TCK / wall
            if share >= 0.02:
                top.append((round(share, 2), f"{comm}[{pid}]"))
        n["top_others"] = [f"{name} {share:.2f}" for share, name in sorted(top, reverse=True)[:5]]
    return n


def wait_socket(path, proc, log_path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"backend exited with {proc.returncode}: {tail(log_path)}")
        # Only check the socket file exists; do not connect (that would be a frontend
        # session of its own).
        if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
            return
        time.sleep(0.02)
    raise RuntimeError(f"backend did not create {path} within {timeout} s: {tail(log_path)}")


def tail(path, n=600):
    try:
        with open(path, "rb") as f:
            data = f.read()
        return data[-n:].decode(errors="replace").strip().replace("\n", " | ")
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# sides


class Env:
    def __init__(self, args, tmp):
        self.args, self.tmp = args, tmp
        self.files = {}  # disk kind -> path
        self.qcow2 = {}  # disk kind -> path of the allocated qcow2 copy of files[disk]
        self.scratch = []  # overlays made for the current run, removed after it
        self.counter = 0
        self.ceph_dir = None  # case 13: the one-node cluster's directory, once started
        self.ceph_conf = None
        self.ceph_pids = []  # its ceph-mon and ceph-osd
        self.rbd_name = None  # the image both sides serve

    def rbd_image(self):
        """`pool/image` of case 13's RBD image, in a one-node cluster started on first use
        (scripts/ceph-micro.sh in the temp directory; `cleanup` stops it) and filled once with
        sequential 4 MiB writes so that reads hit objects that exist."""
        if self.rbd_name:
            return f"{RBD_POOL}/{self.rbd_name}"
        self.ceph_dir = os.path.join(self.tmp, "ceph")
        size = self.args.rbd_size
        # memstore keeps the objects in RAM: room for the image and some slack.
        envv = dict(os.environ, CEPH_MEM_BYTES=str(size + GIB))
        print(f"starting a one-node Ceph cluster in {self.ceph_dir} (scripts/ceph-micro.sh) ...", flush=True)
        r = subprocess.run(["bash", CEPH_MICRO, "start", self.ceph_dir], capture_output=True, text=True,
                           timeout=180, env=envv)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("CEPH_CONF=")), None)
        if r.returncode != 0 or line is None:
            raise RuntimeError(f"ceph-micro.sh start failed ({r.returncode}): {(r.stdout + r.stderr).strip()[-600:]}")
        self.ceph_conf = line.split("=", 1)[1]
        if "," in self.ceph_conf:
            raise RuntimeError(f"{self.ceph_conf}: QSD options cannot hold a ','")
        for name in ("mon.pid", "osd.pid"):
            with open(os.path.join(self.ceph_dir, name)) as f:
                self.ceph_pids.append(int(f.read().strip()))
        name = f"vblk-bench-{os.getpid()}"
        rbd(self, ["create", f"{RBD_POOL}/{name}", "--size", f"{size >> 20}M"])
        self.rbd_name = name
        t0 = time.monotonic()
        rbd(self, ["bench", "--io-type", "write", "--io-size", "4M", "--io-threads", "4", "--io-total",
                   str(size), "--io-pattern", "seq", f"{RBD_POOL}/{name}"])
        print(f"    {RBD_POOL}/{name}: {size >> 20} MiB, written in {time.monotonic() - t0:.1f} s "
              f"({sh('ceph-osd --version')})", flush=True)
        return f"{RBD_POOL}/{name}"

    def cluster_cpu_us(self):
        """CPU time of the cluster's daemons (all their threads), µs; None without a cluster."""
        if not self.ceph_pids:
            return None
        try:
            return sum(proc_cpu_us(p) for p in self.ceph_pids)
        except OSError:
            return None

    def sock(self):
        self.counter += 1
        return os.path.join(self.tmp, f"s{self.counter}.sock")

    def disk_file(self, disk):
        if disk in self.files:
            return self.files[disk]
        d = self.args.tmpfs_dir if disk == "tmpfs" else self.args.disk_dir
        os.makedirs(d, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="vblk-bench-", suffix=".img", dir=d)
        self.files[disk] = path
        size = self.args.file_size
        print(f"preparing {path} ({size >> 20} MiB, {fstype(d)}, written, not sparse) ...", flush=True)
        chunk = b"\x5a" * (1 << 20)
        try:
            written = 0
            while written < size:
                written += os.write(fd, chunk[: min(len(chunk), size - written)])
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def image(self, wl, side):
        """(path, format) of the image a side serves: the raw disk file, its allocated qcow2
        copy, or a fresh overlay on it (made now; `drop_scratch` removes it after the run)."""
        kind = wl.image_of(side)
        if kind == "raw":
            return self.disk_file(wl.disk), "raw"
        if kind == "qcow2":
            return self.qcow2_file(wl.disk), "qcow2"
        assert kind == "overlay", kind
        base = self.disk_file(wl.disk)
        # Next to the base: vblk opens backing files from the image's own directory without
        # --backing-allowed.
        self.counter += 1
        path = os.path.join(os.path.dirname(base), f"vblk-bench-{os.getpid()}-overlay{self.counter}.qcow2")
        self.scratch.append(path)
        qemu_img(["create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", path])
        return path, "qcow2"

    def qcow2_file(self, disk):
        """A qcow2 copy (64 KiB clusters, every cluster allocated) of the raw disk file, made
        once: `qemu-img convert -S 0` writes every cluster, zeros included, so reads never fall
        through to unallocated or zero clusters."""
        if disk in self.qcow2:
            return self.qcow2[disk]
        raw = self.disk_file(disk)
        path = raw[:-len(".img")] + ".qcow2"
        self.qcow2[disk] = path
        print(f"preparing {path} (qcow2 copy of {os.path.basename(raw)}, every cluster allocated) ...", flush=True)
        qemu_img(["convert", "-q", "-f", "raw", "-O", "qcow2", "-S", "0", raw, path])
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # no writeback of it during the runs (ext4)
        finally:
            os.close(fd)
        js = json.loads(qemu_img(["map", "--output=json", "-f", "qcow2", path]))
        holes = [e for e in js if not e.get("data") or e.get("zero")]
        if holes:
            raise RuntimeError(f"{path} is not fully allocated: {holes[:3]}")
        return path

    def drop_scratch(self):
        for path in self.scratch:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.scratch = []

    def cleanup(self):
        self.drop_scratch()
        if self.ceph_dir:
            # By the pids in the directory (OSD first); also after a half-done start.
            subprocess.run(["bash", CEPH_MICRO, "stop", self.ceph_dir], capture_output=True, timeout=120)
            self.ceph_dir, self.ceph_pids = None, []
        for path in list(self.files.values()) + list(self.qcow2.values()):
            try:
                os.unlink(path)
            except OSError:
                pass


def rbd(env, args):
    r = subprocess.run([RBD, "-c", env.ceph_conf] + args, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"rbd {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()[-400:]}")
    return r.stdout


def qemu_img(args):
    r = subprocess.run([QEMU_IMG] + args, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"qemu-img {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()[-400:]}")
    return r.stdout


def fstype(path):
    best, kind = "", "?"
    path = os.path.realpath(path)
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1].replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
    return kind


def vblk_argv(env, wl, sock, side="vblk"):
    a = env.args
    argv = ["taskset", "-c", str(a.backend_cpu), VBLK_RUN, "serve"]
    if wl.disk == "null":
        argv += [os.path.join(env.tmp, "null.img"), "--backend", "null", "--size", "1G"]
    elif wl.image == "raw":
        argv += [env.disk_file(wl.disk)]
    elif wl.image == "rbd":
        argv += [f"rbd:{env.rbd_image()}", "--ceph-conf", env.ceph_conf]
    else:
        # qcow2 cases: the format always explicit (also for case 12's raw side).
        path, fmt_ = env.image(wl, side)
        argv += [path, "--format", fmt_]
    argv += ["--socket", sock, "--num-queues", str(wl.queues)]
    if wl.bench.get("threads"):
        argv += ["--threads", str(wl.bench["threads"])]
    return argv + wl.vblk_more + vblk_flags(a, wl)


def vblk_flags(a, wl):
    """The extra `vblk serve` flags of a workload (--vblk-args, --vblk-extra)."""
    flags = shlex.split(a.vblk_args)
    for spec in a.vblk_extra:
        key, _, extra = spec.partition(":")
        if key in (str(wl.case), wl.id):
            flags += shlex.split(extra)
    return flags


def qsd_argv(env, wl, sock, cfg):
    _, opts, poll = cfg
    argv = ["taskset", "-c", str(env.args.backend_cpu), QSD,
            "--object", f"iothread,id=io0,poll-max-ns={poll}"]
    if wl.disk == "null":
        argv += ["--blockdev", f"driver=null-co,node-name=disk0,size={GIB},read-zeroes=off"]
    elif wl.image == "raw":
        path = env.disk_file(wl.disk)
        argv += ["--blockdev", f"driver=file,node-name=file0,filename={path},{opts}",
                 "--blockdev", "driver=raw,node-name=disk0,file=file0"]
    elif wl.image == "rbd":
        pool, image = env.rbd_image().split("/")
        argv += ["--blockdev", f"driver=rbd,node-name=disk0,pool={pool},image={image},conf={env.ceph_conf},{opts}"]
    else:
        # qcow2 over file, the file node with the same options as in the raw cases. An
        # overlay's backing file is given as a node of its own with those options too (left to
        # QEMU, the backing file would be opened with aio=threads whatever the probe chose).
        path, _ = env.image(wl, "qsd")
        backing = ""
        if wl.image == "overlay":
            base = env.disk_file(wl.disk)
            argv += ["--blockdev", f"driver=file,node-name=basefile0,filename={base},{opts},read-only=on",
                     "--blockdev", "driver=raw,node-name=base0,file=basefile0,read-only=on"]
            backing = ",backing=base0"
        argv += ["--blockdev", f"driver=file,node-name=file0,filename={path},{opts}",
                 "--blockdev", f"driver=qcow2,node-name=disk0,file=file0{backing}"]
    argv += ["--export", "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
             f"addr.path={sock},writable=on,num-queues={wl.queues},iothread=io0"]
    return argv


def bench_argv(env, wl, sock, seconds, client="vblk", side="vblk"):
    b = wl.bench
    argv = ["taskset", "-c", str(env.args.client_cpu)]
    if wl.clients_compared and PERF:
        # Count the client's system calls (all threads) with perf: no slowdown, unlike strace.
        argv += [PERF, "stat", "-x,", "-e", "raw_syscalls:sys_enter", "-o", sock + ".perf", "--"]
    if client == "blkio":
        # examples/blkio_bench.rs: SOCKET SECONDS IODEPTH MIN [--poll] [--rw RW] [--bs BS] [--queues N];
        # the split ring always (libblkio's vhost-user driver has no packed ring).
        assert wl.ring_of(side) == "split"
        argv += [BLKIO_RUN, sock, str(seconds), str(b["iodepth"]), str(b.get("batch", 1)),
                 "--rw", b["rw"], "--bs", b["bs"], "--queues", str(wl.queues)]
    else:
        argv += [VBLK_RUN, "bench", "--socket", sock, "--ring", wl.ring_of(side), "--rw", b["rw"], "--bs", b["bs"],
                 "--iodepth", str(b["iodepth"]), "--queues", str(wl.queues), "--seconds", str(seconds), "--json"]
        if b.get("batch", 1) > 1:
            argv += ["--batch-complete", str(b["batch"])]
    if b.get("poll"):
        argv.append("--poll")
    return argv


def perf_syscalls(path):
    """The syscall count `perf stat -x,` wrote, or None."""
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(",")
                if len(parts) > 2 and "raw_syscalls:sys_enter" in parts[2] and parts[0].isdigit():
                    return int(parts[0])
    except OSError:
        pass
    return None


def run_client(argv, timeout):
    """Run a client to the end; also snapshot the process table just before it exits."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except BaseException:
        p.kill()
        p.wait()
        raise
    procs1 = proc_table()
    return subprocess.CompletedProcess(argv, p.returncode, out, err), p.pid, procs1


def run_backend_side(env, side, wl, seconds, qsd_cfg=None, client="vblk"):
    """Start a backend, run a client (`vblk bench`, or libblkio's: `client`; in case 7 the side
    says which) against it, stop the backend. Returns the run record."""
    sock = env.sock()
    log = sock + ".log"
    penv = None
    if wl.backend_of(side) == "vblk":
        argv = vblk_argv(env, wl, sock, side)
        penv = wl.vblk_env
    else:
        argv = qsd_argv(env, wl, sock, qsd_cfg)
    if wl.clients_compared:
        client = "blkio" if side == "blkio" else "vblk"
    # "driver": which client ran ("blkio" or "vblk"); "client" will hold its JSON report.
    rec = {"side": side, "driver": client, "config": qsd_cfg[0] if qsd_cfg else " ".join(argv[4:]),
           "backend_cmd": argv, "backend_env": penv or {}}
    proc = PROCS.start(argv, log, penv)
    try:
        wait_socket(sock, proc, log)
        client_argv = bench_argv(env, wl, sock, seconds, client, side)
        rec["client_cmd"] = client_argv
        procs0 = proc_table()
        # proc_cpu_us counts the whole process: every thread of the backend (librbd's too).
        sys0, cpu0, t0 = sys_cpu_us(), proc_cpu_us(proc.pid), time.monotonic()
        ceph0 = env.cluster_cpu_us() if wl.disk == "rbd" else None
        r, cpid, procs1 = run_client(client_argv, seconds + 60)
        wall = time.monotonic() - t0
        cpu1, sys1 = proc_cpu_us(proc.pid), sys_cpu_us()
        ceph1 = env.cluster_cpu_us() if ceph0 is not None else None
        ceph_us = ceph1 - ceph0 if ceph0 is not None and ceph1 is not None else None
        name = CLIENT_NAMES[client]
        if r.returncode != 0:
            raise RuntimeError(f"{name} exited with {r.returncode}: {r.stderr.strip()[-500:]}"
                               f" (backend log: {tail(log)})")
        lines = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("{")]
        if not lines:
            raise RuntimeError(f"{name} printed no JSON: {r.stdout[-300:]} {r.stderr[-300:]}")
        js = json.loads(lines[-1])
        rec["client"] = js
        rec["backend_cpu_us"] = cpu1 - cpu0
        rec["client_wall_s"] = wall
        ios = js.get("ios") or 0
        # The cluster's daemons work for this run: theirs, not other processes' CPU.
        rec["cluster_cpu_us"] = ceph_us
        rec["noise"] = noise(sys0, sys1, wall, cpu1 - cpu0 + js["cpu_us_per_io"] * ios + (ceph_us or 0),
                             procs0, procs1, (proc.pid, cpid, *env.ceph_pids))
        lat = js.get("lat_us", {})
        syscalls = perf_syscalls(sock + ".perf")
        rec["metrics"] = {
            "iops": js["iops"],
            "mib_s": js.get("mib_s", js["iops"] * 4096 / (1 << 20)),
            "p50": lat.get("p50"),
            "p99": lat.get("p99"),
            "p99_9": lat.get("p99_9"),
            "max": lat.get("max"),
            "mean": lat.get("mean"),
            "client_cpu_us_per_io": js["cpu_us_per_io"],
            "backend_cpu_us_per_io": (cpu1 - cpu0) / ios if ios else None,
            "cluster_cpu_us_per_io": ceph_us / ios if ceph_us is not None and ios else None,
            "syscalls_per_io": syscalls / ios if syscalls is not None and ios else None,
            "errors": js["errors"],
        }
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        if isinstance(e, KeyboardInterrupt):
            raise
        rec["error"] = str(e)
    finally:
        rc = PROCS.stop(proc)
        rec["backend_exit"] = rc
        env.drop_scratch()  # this run's overlay (case 10): the next run starts from an empty one
        for p in (sock, log, sock + ".perf"):
            if p == log and "error" in rec:
                rec["backend_log"] = tail(log, 2000)
            try:
                os.unlink(p)
            except OSError:
                pass
    return rec


# fio configurations probed for case 5: buffered, and O_DIRECT (which tmpfs accepts since
# Linux 6.6, and which vblk uses there too).
FIO_CONFIGS = [("io_uring,direct=0", ["--ioengine=io_uring", "--direct=0"]),
               ("io_uring,direct=1", ["--ioengine=io_uring", "--direct=1"])]


def run_fio(env, wl, seconds, cfg):
    b = wl.bench
    path = env.disk_file(wl.disk)
    argv = ["taskset", "-c", str(env.args.client_cpu), FIO, "--name=vblk-bench", f"--filename={path}",
            *cfg[1], f"--bs={b['bs']}", f"--iodepth={b['iodepth']}",
            f"--rw={b['rw']}", "--time_based", f"--runtime={seconds}", "--output-format=json"]
    rec = {"side": "fio", "config": cfg[0], "client_cmd": argv}
    try:
        procs0 = proc_table()
        sys0, t0, c0 = sys_cpu_us(), time.monotonic(), os.times()
        r, cpid, procs1 = run_client(argv, seconds + 60)
        wall, sys1, c1 = time.monotonic() - t0, sys_cpu_us(), os.times()
        fio_us = ((c1.children_user + c1.children_system) - (c0.children_user + c0.children_system)) * 1e6
        rec["noise"] = noise(sys0, sys1, wall, fio_us, procs0, procs1, (cpid,))
        if r.returncode != 0:
            raise RuntimeError(f"fio exited with {r.returncode}: {r.stderr.strip()[-500:]}")
        js = json.loads(r.stdout[r.stdout.index("{"):])
        job = js["jobs"][0]
        d = job["read"] if b["rw"] in ("read", "randread") else job["write"]
        ios = d["total_ios"]
        runtime_s = job["job_runtime"] / 1000.0
        pct = d["clat_ns"].get("percentile", {})
        rec["client"] = {k: job[k] for k in ("usr_cpu", "sys_cpu", "job_runtime", "error")}
        rec["client"].update({k: d[k] for k in ("io_bytes", "bw_bytes", "iops", "total_ios")})
        rec["metrics"] = {
            "iops": d["iops"],
            "mib_s": d["bw_bytes"] / (1 << 20),
            "p50": pct.get("50.000000", 0) / 1000.0,
            "p99": pct.get("99.000000", 0) / 1000.0,
            "p99_9": pct.get("99.900000", 0) / 1000.0,
            "max": d["clat_ns"].get("max", 0) / 1000.0,
            "mean": d["lat_ns"]["mean"] / 1000.0,
            "client_cpu_us_per_io": (job["usr_cpu"] + job["sys_cpu"]) / 100 * runtime_s * 1e6 / ios
            if ios else None,
            "backend_cpu_us_per_io": None,
            "cluster_cpu_us_per_io": None,
            "syscalls_per_io": None,
            "errors": job["error"],
        }
    except Exception as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        rec["error"] = str(e)
    return rec


# ---------------------------------------------------------------------------------------------
# measuring


def better(a, b, direction):
    return a > b if direction == HIGHER else a < b


def probe(env, wl, side, client="vblk"):
    """Short run of each configuration of a peer (QSD or fio) with one client; returns
    (records, best config)."""
    metric, direction = wl.primary
    results, best = [], None
    configs = qsd_configs(wl.disk) if side == "qsd" else FIO_CONFIGS
    for cfg in configs:
        if side == "qsd":
            rec = run_backend_side(env, "qsd", wl, env.args.probe_seconds, cfg, client)
        else:
            rec = run_fio(env, wl, env.args.probe_seconds, cfg)
        results.append(rec)
        label = f"{side.upper() if side == 'qsd' else side} {cfg[0]}"
        if "error" in rec:
            print(f"    probe {label:38} failed: {rec['error'][:160]}", flush=True)
            continue
        v = rec["metrics"][metric]
        print(f"    probe {label:38} {fmt(metric, v):>10} {METRICS[metric][0]}", flush=True)
        if best is None or better(v, best[1], direction):
            best = (cfg, v)
    return results, (best[0] if best else None)


def noise_text(rec):
    n = rec.get("noise")
    if not n or (n["others_cpus"] < 0.1 and n["steal_cpus"] < 0.05):
        return ""
    top = ", ".join(n.get("top_others", [])[:3])
    return f"  [noisy: others {n['others_cpus']:.2f} CPU, steal {n['steal_cpus']:.2f} CPU{': ' + top if top else ''}]"


def wait_quiet(a):
    """Wait (at most --quiet-wait s) until other processes use less than --noise-limit CPU."""
    deadline = time.monotonic() + a.quiet_wait
    said = False
    while True:
        b0, t0 = sys_cpu_us(), time.monotonic()
        time.sleep(1.0)
        used = (sys_cpu_us()[0] - b0[0]) / 1e6 / (time.monotonic() - t0)
        if used <= a.noise_limit or time.monotonic() >= deadline:
            if said:
                print(f"    ... {'quiet' if used <= a.noise_limit else 'still busy, going on'} "
                      f"({used:.2f} CPU)", flush=True)
            return
        if not said:
            print(f"    waiting for the machine to calm down ({used:.2f} CPU busy) ...", flush=True)
            said = True


def median(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(metric, v):
    if v is None:
        return "-"
    if metric == "iops":
        return f"{v / 1e6:.3f}M" if v >= 1e6 else f"{v / 1e3:.1f}k"
    if metric == "mib_s":
        return f"{v:.0f}"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def client_label(ck):
    return CLIENT_NAMES.get(ck, "-")


def runs_of(runs, ck, side):
    """The runs of one side with one client ("-": case 7, where the sides are the clients). fio
    (case 5) is a client of its own: its runs count for every client."""
    if side == "fio" or ck == "-":
        return [r for r in runs if r["side"] == side]
    return [r for r in runs if r["side"] == side and r.get("driver") == ck]


def pair_ratio(c, runs, ck, pair, peer):
    """vblk / peer of one pair with one client (vblk's own figure for an absolute check)."""
    def value(side):
        rs = [r for r in runs_of(runs, ck, side) if r["pair"] == pair and "error" not in r]
        return rs[0]["metrics"][c.metric] if rs else None
    v = value("vblk")
    if c.absolute:
        return v
    p = value(peer)
    return v / p if v is not None and p else None


def run_line(i, a, ck, side, rec):
    if side == "fio":
        label = ""
    elif ck == "-":  # case 7: the side is the client
        label = client_label("blkio" if side == "blkio" else "vblk")
    else:
        label = client_label(ck)
    tag = f"    [{i + 1}/{a.pairs}] {label:10} {side:5}"
    if "error" in rec:
        return f"{tag} ERROR {rec['error'][:300]}"
    m = rec["metrics"]
    return (f"{tag} {fmt('iops', m['iops']):>8} IOPS "
            f"{fmt('mib_s', m['mib_s']):>6} MiB/s  p50 {fmt('p50', m['p50']):>6} µs "
            f"p99 {fmt('p99', m['p99']):>6} µs  client {fmt('x', m['client_cpu_us_per_io'])} "
            f"backend {fmt('x', m['backend_cpu_us_per_io'])} µs/IO"
            + (f" (Ceph {fmt('x', m['cluster_cpu_us_per_io'])})"
               if m.get("cluster_cpu_us_per_io") is not None else "")
            + (f"  {m['syscalls_per_io']:.3f} syscalls/IO" if m.get("syscalls_per_io") is not None else "")
            + (f"  ERRORS {m['errors']}" if m["errors"] else "")
            + noise_text(rec))


def run_workload(env, wl):
    a = env.args
    clients = wl.clients(a.clients)
    cks = [c or "-" for c in clients]
    print(f"\n== case {wl.id}: {wl.title}"
          + (f"; clients: {', '.join(client_label(c) for c in cks)}" if cks != ["-"] else ""), flush=True)
    out = {"case": wl.case, "id": wl.id, "title": wl.title, "disk": wl.disk, "bench": wl.bench,
           "sides": wl.sides, "peer": wl.peer, "clients": cks, "vblk_flags": vblk_flags(a, wl), "runs": [],
           "probe": [], "images": {s: wl.image_of(s) for s in wl.sides}}
    chosen = {}
    for side in wl.probed():
        wait_quiet(a)
        # One probe, with the first client (libblkio's by default); its choice serves both.
        recs, cfg = probe(env, wl, side, clients[0] or "vblk")
        out["probe"] += recs
        chosen[side] = cfg
        out[f"{side}_config"] = cfg[0] if cfg else None
        print(f"    {side} config for the pairs: {cfg[0] if cfg else 'NONE (every config failed)'}",
              flush=True)
        if wl.image == "rbd" and side == "qsd" and cfg and "cache.direct=off" in cfg[1]:
            # QSD runs librbd with its cache on: vblk too, or the comparison would be of
            # librbd's cache settings rather than of the backends.
            wl.vblk_more = ["--rbd-cache"]
            print("    vblk serve with --rbd-cache, as QSD's config", flush=True)
    out["vblk_env"] = wl.vblk_env
    out["vblk_more"] = wl.vblk_more
    out["discarded"] = []
    retries, i = a.retries, 0
    while i < a.pairs:
        wait_quiet(a)
        pair = []
        # Per client, the sides in turn (vblk, peer, info sides); fio (case 5, a client itself)
        # once per pair, after them.
        order = [(c, s) for c in clients for s in wl.sides if s != "fio"]
        if "fio" in wl.sides:
            order.append((None, "fio"))
        for client, side in order:
            if side != "vblk" and chosen.get(wl.backend_of(side), 0) is None:
                continue
            if side == "fio":
                rec = run_fio(env, wl, a.seconds, chosen["fio"])
            else:
                rec = run_backend_side(env, side, wl, a.seconds, chosen.get(wl.backend_of(side)), client or "vblk")
            rec["pair"] = i
            pair.append(rec)
            print(run_line(i, a, client or "-", side, rec), flush=True)
        noisy = any(r.get("noise", {}).get("others_cpus", 0) > a.noise_limit for r in pair)
        if noisy and retries > 0:
            retries -= 1
            print(f"    pair {i + 1} disturbed by other processes (> {a.noise_limit} CPU): "
                  f"discarded, measuring it again ({retries} retries left)", flush=True)
            out["discarded"] += pair
            continue
        # This pair's ratios, per client.
        texts = []
        for ck in cks:
            rs = []
            for c in wl.checks:
                r = pair_ratio(c, pair, ck, i, wl.peer)
                rs.append(f"{METRICS[c.metric][0]} {'-' if r is None else f'{r:.2f}'}")
            texts.append(f"{client_label(ck) + ': ' if ck != '-' else ''}{', '.join(rs)}")
        print(f"    [{i + 1}/{a.pairs}] pair ratios{' (vblk)' if any(c.absolute for c in wl.checks) else ''}: "
              + "; ".join(texts), flush=True)
        out["runs"] += pair
        i += 1
    # medians per client, side and metric
    med = {}
    for ck in cks:
        med[ck] = {}
        for side in wl.sides:
            runs = [r for r in runs_of(out["runs"], ck, side) if "error" not in r]
            m = {k: median([r["metrics"].get(k) for r in runs]) for k in METRICS}
            m["runs_ok"] = len(runs)
            m["runs_failed"] = sum(1 for r in runs_of(out["runs"], ck, side) if "error" in r)
            m["discarded"] = len(runs_of(out["discarded"], ck, side))
            m["io_errors"] = sum(r["metrics"]["errors"] or 0 for r in runs)
            m["others_cpus"] = median([r.get("noise", {}).get("others_cpus") for r in runs])
            m["steal_cpus"] = median([r.get("noise", {}).get("steal_cpus") for r in runs])
            med[ck][side] = m
    out["medians"] = med
    checks = []
    for ck in cks:
        for c0 in wl.checks:
            c = c0.for_client(ck)
            v, p = med[ck]["vblk"][c.metric], med[ck][wl.peer][c.metric]
            if c.absolute:
                ratio = v  # the check is on vblk's own figure
            else:
                ratio = v / p if v is not None and p else None
            # Every pair's ratio: the spread, and the worst pair (which must meet the target too).
            pair_ratios = [r for r in (pair_ratio(c, out["runs"], ck, j, wl.peer) for j in range(a.pairs))
                           if r is not None]
            worst = c.worst(pair_ratios)
            info = {s: med[ck][s][c.metric] for s in wl.info}
            med_pass = None if ratio is None else c.passes(ratio)
            worst_pass = None if worst is None else c.passes(worst)
            checks.append({"client": ck, "metric": c.metric, "direction": c.direction, "target": c.target,
                           "target_text": c.target_text(), "absolute": c.absolute, "vblk": v, "peer": p,
                           "peer_side": wl.peer, "info": info, "ratio": ratio, "pair_ratios": pair_ratios,
                           "worst": worst, "median_pass": med_pass, "worst_pass": worst_pass,
                           "pass": None if med_pass is None else (med_pass and worst_pass is not False)})
    out["checks"] = checks
    return out


# ---------------------------------------------------------------------------------------------
# report


def result_text(c):
    """pass / short for the median ratio, and the worst pair, which must meet the target too."""
    if c["pass"] is None:
        return "n/a" if c["target"] is not None else "-"
    if c["pass"]:
        return "pass"
    if c.get("median_pass") and c.get("worst_pass") is False:
        return "short: worst pair"
    return "short"


def table(results, cases):
    rows = []
    head = ["case", "workload", "client", "metric", "vblk", "peer", "ratio vblk/peer", "pair ratios",
            "worst pair", "target", "result"]
    done = set()
    for wr in results:
        done.add(wr["case"])
        if wr["case"] == 6:
            c = wr["checks"][0]
            pcts = [r["pct"] for r in wr["runs"] if "pct" in r]
            res = {True: "pass", False: "short", None: "n/a"}[c["pass"]]
            v = "-" if c["vblk"] is None else f"{c['vblk']:.2f}"
            rows.append([wr["id"], wr["title"], "Linux guest", "backend CPU (% of one CPU) ↓", v, "- (absolute)",
                         f"{v} (vblk)", " ".join(f"{p:.2f}" for p in pcts) or "-",
                         f"{max(pcts):.2f}" if pcts else "-", f"vblk < {IDLE_TARGET:g}", res])
            continue
        # libblkio's rows first, then vblk bench's; per client the checks in their order.
        order = {ck: n for n, ck in enumerate(CLIENT_ORDER)}
        checks = sorted(wr["checks"], key=lambda c: order.get(c.get("client"), -1))
        for c in checks:
            name, unit = METRICS[c["metric"]]
            metric = name + (f" ({unit})" if unit else "") + (" ↑" if c["direction"] == HIGHER else " ↓")
            peer = {"qsd": "QSD", "blkio": "libblkio", "split": "split ring",
                    "raw": "vblk raw"}.get(c["peer_side"], c["peer_side"])
            peer_txt = f"{fmt(c['metric'], c['peer'])} ({peer})"
            for s, v in c["info"].items():
                peer_txt += f"; {s.upper()} {fmt(c['metric'], v)}"
            pr = c["pair_ratios"]
            ratio = "-" if c["ratio"] is None else f"{c['ratio']:.2f}" + (" (vblk)" if c.get("absolute") else "")
            worst = "-" if c.get("worst") is None else f"{c['worst']:.2f}"
            res = result_text(c)
            ck = c.get("client", "-")
            meds = wr["medians"].get(ck, {})
            errs = sum(meds[s]["io_errors"] + meds[s]["runs_failed"] for s in wr["sides"] if s in meds)
            if errs:
                res += f" (!{errs} errors/failed runs)"
            busy = max((meds[s]["others_cpus"] or 0) for s in wr["sides"] if s in meds)
            if busy > 0.15:
                res += f" (noisy: others used {busy:.1f} CPU)"
            client = client_label(ck) if ck != "-" else "vblk bench vs libblkio"
            rows.append([wr["id"], wr["title"], client, metric, fmt(c["metric"], c["vblk"]), peer_txt, ratio,
                         " ".join(f"{r:.2f}" for r in pr) or "-", worst, c["target_text"], res])
    for case, (cid, title, text) in NOT_MEASURED.items():
        if case in cases:
            rows.append([cid, title, "-", "-", "-", "-", "-", "-", "-", "-", text])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def detail_table(results):
    head = ["case", "client", "side", "config", "IOPS", "MiB/s", "mean µs", "p50 µs", "p99 µs", "p99.9 µs",
            "max µs", "client CPU µs/IO", "backend CPU µs/IO", "others/steal CPUs", "runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    order = {ck: n for n, ck in enumerate(CLIENT_ORDER)}
    for wr in results:
        for ck in sorted(wr.get("clients", []), key=lambda c: order.get(c, -1)):
            for side in wr.get("sides", []):
                if side == "fio" and ck != wr["clients"][0]:
                    continue  # fio is its own client: one row
                m = wr["medians"][ck][side]
                if wr.get("peer") == "blkio":
                    cfg = f"QSD {wr.get('qsd_config') or '-'}"
                elif wr.get("peer") == "split":
                    cfg = f"vblk serve, {'packed' if side == 'vblk' else 'split'} ring"
                elif side in ("vblk", "raw"):
                    cfg = " ".join([f"{k}={v}" for k, v in wr.get("vblk_env", {}).items()] + wr.get("vblk_more", [])
                                   + wr["vblk_flags"]) or "default"
                else:
                    cfg = wr.get(f"{side}_config") or "-"
                image = wr.get("images", {}).get(side, "raw")
                if image != "raw" or wr.get("peer") == "raw":
                    cfg = f"{'vblk serve ' if side == 'raw' else ''}{image}: {cfg}"
                if ck == "-":
                    client = "libblkio" if side == "blkio" else "vblk bench"
                else:
                    client = "fio" if side == "fio" else client_label(ck)
                runs = f"{m['runs_ok']}" + (f" (+{m['runs_failed']} failed)" if m["runs_failed"] else "")
                runs += f" ({m['discarded']} disturbed, redone)" if m["discarded"] else ""
                lines.append("| " + " | ".join([
                    wr["id"], client, side, cfg, fmt("iops", m["iops"]), fmt("mib_s", m["mib_s"]),
                    fmt("mean", m["mean"]), fmt("p50", m["p50"]), fmt("p99", m["p99"]), fmt("p99", m["p99_9"]),
                    fmt("max", m["max"]), fmt("x", m["client_cpu_us_per_io"]), fmt("x", m["backend_cpu_us_per_io"]),
                    f"{m['others_cpus'] or 0:.2f}/{m['steal_cpus'] or 0:.2f}", runs]) + " |")
    return "\n".join(lines)


def scaling_table(results):
    """Case 14 against its 1-queue row (14a), per client and backend: what more queues and
    threads cost on the same CPUs."""
    rows = {wr["id"]: wr for wr in results if wr["case"] == 14}
    base = rows.get("14a")
    if not base:
        return ""
    head = ["case", "client", "backend", "queues", "vblk threads", "IOPS", "x 14a", "backend CPU µs/IO", "x 14a",
            "client CPU µs/IO", "x 14a"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    order = {ck: n for n, ck in enumerate(CLIENT_ORDER)}
    for ck in sorted(base["clients"], key=lambda c: order.get(c, -1)):
        for side in ("vblk", "qsd"):
            b = base["medians"][ck][side]
            for wid in sorted(rows):
                m = rows[wid]["medians"].get(ck, {}).get(side)
                if not m:
                    continue

                def rel(k):
                    return f"{m[k] / b[k]:.2f}" if m[k] is not None and b[k] else "-"
                bench = rows[wid]["bench"]
                lines.append("| " + " | ".join([
                    wid, client_label(ck), "vblk serve" if side == "vblk" else "QSD (1 iothread)",
                    str(bench.get("queues", 1)), str(bench.get("threads", "-")) if side == "vblk" else "-",
                    fmt("iops", m["iops"]), rel("iops"), fmt("x", m["backend_cpu_us_per_io"]),
                    rel("backend_cpu_us_per_io"), fmt("x", m["client_cpu_us_per_io"]),
                    rel("client_cpu_us_per_io")]) + " |")
    return "\n".join(lines)


def sh(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, shell=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def machine():
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        "lscpu": sh("lscpu | head -n 15"),
        "memory": sh("free -m | sed -n 2p"),
        "loadavg_start": sh("cat /proc/loadavg"),
        "qsd": sh(f"{QSD} --version | head -n 1"),
        "fio": sh(f"{FIO} --version"),
        "vblk_binary_mtime": datetime.datetime.fromtimestamp(os.stat(VBLK).st_mtime).isoformat(timespec="seconds"),
        "vblk_commit": sh(f"cd {shlex.quote(ROOT)} && GIT_OPTIONAL_LOCKS=0 git rev-parse --short HEAD"),
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------


def parse_size(s):
    s = s.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "KMG" else s) * mult)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES,
                    help=f"comma-separated case numbers (default: {DEFAULT_CASES}; 9-12 are the qcow2 cases; "
                         "13, Ceph RBD, only when asked for: it needs Ceph installed; 14, scaling, only when "
                         "asked for)")
    ap.add_argument("--clients", default="vblk,blkio",
                    help="clients of the backend cases, comma-separated: blkio (libblkio's driver, "
                         "examples/blkio_bench) and/or vblk (vblk bench); default both, libblkio's figures "
                         "shown first. Case 7 always runs both; case 8 vblk bench only")
    ap.add_argument("--pairs", type=int, help="interleaved vblk/peer pairs per workload (default 5)")
    ap.add_argument("--seconds", type=float, help="seconds per run (default 5)")
    ap.add_argument("--probe-seconds", type=float, default=None,
                    help="seconds per QSD probe run (default: min(2, --seconds))")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 pairs of 2 s, 1 s probes "
                    "(explicit --pairs/--seconds/--probe-seconds still win)")
    ap.add_argument("--out", default=os.path.join(TARGET, "bench-results.json"),
                    help="JSON file with every run's figures (default $CARGO_TARGET_DIR or target/, bench-results.json)")
    ap.add_argument("--client-cpu", default="0",
                    help="CPU (a taskset -c list) of the client: vblk bench, libblkio's, fio (default 0)")
    ap.add_argument("--backend-cpu", default="1", help="CPU (a taskset -c list) of the backend (default 1)")
    ap.add_argument("--tmpfs-dir", default="/dev/shm", help="tmpfs directory for cases 3 and 5")
    ap.add_argument("--disk-dir", default=TARGET,
                    help="directory on a real file system (ext4) for case 4 (default $CARGO_TARGET_DIR or target/)")
    ap.add_argument("--file-size", type=parse_size, default=GIB, help="size of the image files (default 1G)")
    ap.add_argument("--qcow2-disk", choices=("tmpfs", "ext4"), default="tmpfs",
                    help="where the qcow2 cases (9-12) keep their images: tmpfs (--tmpfs-dir, default) "
                         "or a real file system (--disk-dir)")
    ap.add_argument("--rbd-size", type=parse_size, default=GIB, help="size of case 13's RBD image (default 1G)")
    ap.add_argument("--noise-limit", type=float, default=0.15,
                    help="CPUs other processes may use during a run before it counts as disturbed")
    ap.add_argument("--retries", type=int, default=4,
                    help="disturbed pairs measured again, per workload (default 4; 0: keep everything)")
    ap.add_argument("--quiet-wait", type=float, default=120,
                    help="seconds to wait before each pair for the machine to be quiet (default 120)")
    ap.add_argument("--vblk-args", default="", help="extra `vblk serve` flags for every case, e.g. '--poll-us 50'")
    ap.add_argument("--vblk-extra", action="append", default=[], metavar="CASE:FLAGS",
                    help="extra `vblk serve` flags for one case or workload, e.g. '2:--poll-us 50' "
                         "or '4:--no-merge' (repeatable)")
    a = ap.parse_args()
    if a.quick:
        a.pairs, a.seconds = a.pairs or 2, a.seconds or 2
        a.probe_seconds = a.probe_seconds or 1
    a.pairs, a.seconds = a.pairs or 5, a.seconds or 5
    if a.probe_seconds is None:
        a.probe_seconds = min(2.0, a.seconds)
    cases = {int(c) for c in a.cases.split(",") if c.strip()}
    wanted = {c.strip() for c in a.clients.split(",") if c.strip()}
    if not wanted or wanted - set(CLIENT_NAMES):
        sys.exit(f"--clients {a.clients}: a list of {', '.join(CLIENT_ORDER)}")
    a.clients = [c for c in CLIENT_ORDER if c in wanted]  # libblkio's first
    needs_blkio = 7 in cases or "blkio" in a.clients

    if not os.access(VBLK, os.X_OK):
        sys.exit(f"{VBLK} not found: run `cargo build --release -p vblk --bin vblk --example blkio_bench` "
                 f"in {ROOT} first (CARGO_TARGET_DIR is honoured)")
    if needs_blkio and not os.access(BLKIO, os.X_OK):
        sys.exit(f"{BLKIO} not found: run `cargo build --release -p vblk --example blkio_bench` first "
                 "(or --clients vblk)")
    if 7 in cases and not PERF:
        print("warning: perf not found: case 7 will not count system calls (apt install linux-perf)",
              file=sys.stderr)
    for tool in ("taskset", QSD, FIO):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (QSD comes with qemu-system / qemu-utils, fio with fio)")
    if os.cpu_count() < 2 or a.client_cpu == a.backend_cpu:
        print("warning: the client and the backend share a CPU", file=sys.stderr)
    selected = [w for w in workloads() if w.case in cases]
    for w in selected:
        if w.image in ("qcow2", "overlay") and a.qcow2_disk != w.disk:
            w.title = w.title.replace(w.disk, a.qcow2_disk)
            w.disk = a.qcow2_disk
    if any(w.image in ("qcow2", "overlay") for w in selected) and not shutil.which(QEMU_IMG):
        sys.exit("qemu-img not found: the qcow2 cases (9-12) make their images with it (qemu-utils)")
    if any(w.image == "rbd" for w in selected):
        for tool in ("ceph-mon", "ceph-osd", "monmaptool", RBD):
            if not shutil.which(tool):
                sys.exit(f"{tool} not found: case 13 needs Ceph (bash scripts/ceph-micro.sh install)")
    if any(w.disk == "tmpfs" for w in selected) and fstype(a.tmpfs_dir) != "tmpfs":
        sys.exit(f"{a.tmpfs_dir} is not a tmpfs ({fstype(a.tmpfs_dir)}): pass --tmpfs-dir")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    # Also SIGINT: a shell starting us in the background would leave it ignored.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_term)
    tmp = tempfile.mkdtemp(prefix="vblk-bench-")
    # Run a private copy: a `cargo build` during the run must not swap the binary under us.
    global VBLK_RUN
    VBLK_RUN = os.path.join(tmp, "vblk")
    shutil.copy2(VBLK, VBLK_RUN)
    global BLKIO_RUN
    if needs_blkio:
        BLKIO_RUN = os.path.join(tmp, "blkio_bench")
        shutil.copy2(BLKIO, BLKIO_RUN)
    env = Env(a, tmp)
    meta = machine()
    meta.update(pairs=a.pairs, seconds=a.seconds, probe_seconds=a.probe_seconds,
                noise_limit=a.noise_limit, retries=a.retries, quiet_wait=a.quiet_wait,
                client_cpu=a.client_cpu, backend_cpu=a.backend_cpu, cases=sorted(cases),
                vblk_args=a.vblk_args, vblk_extra=a.vblk_extra, qcow2_disk=a.qcow2_disk, argv=sys.argv,
                clients=a.clients)
    load = float(meta["loadavg_start"].split()[0] or 0)
    if load > 0.5:
        print(f"warning: load average {load} before the start: other work will add noise", file=sys.stderr)
    print(f"vblk vs qemu-storage-daemon: {a.pairs} pairs x {a.seconds} s, clients "
          f"{', '.join(CLIENT_NAMES[c] for c in a.clients)} on CPU {a.client_cpu}, "
          f"backend on CPU {a.backend_cpu}; {meta['qsd']}; {meta['kernel']}", flush=True)
    results, t0, interrupted, failed = [], time.monotonic(), False, None
    try:
        if any(w.image == "rbd" for w in selected):
            env.rbd_image()  # the cluster and the image before the first probe
        for wl in selected:
            results.append(run_workload(env, wl))
        if 6 in cases:
            wait_quiet(a)
            results.append(run_idle(a))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: reporting what was measured", file=sys.stderr)
    except RuntimeError as e:  # e.g. the Ceph cluster of case 13 did not start
        failed = str(e)
        print(f"\nerror: {failed}: reporting what was measured", file=sys.stderr)
    finally:
        PROCS.stop_all()
        env.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    meta["duration_s"] = round(time.monotonic() - t0, 1)
    meta["loadavg_end"] = sh("cat /proc/loadavg")
    meta["interrupted"] = interrupted
    meta["error"] = failed
    results.sort(key=lambda w: (w["case"], w["id"]))
    summary = table(results, cases)
    details = detail_table(results)
    print(f"\n{meta['date']}, {a.pairs} pairs x {a.seconds:g} s, medians; ratio = vblk / peer within one client; "
          f"↑ higher is better, ↓ lower is better; a target is met when the median ratio and the worst "
          f"pair meet it\n")
    print(summary)
    print("\nMedians per side:\n")
    print(details)
    scaling = scaling_table(results)
    if scaling:
        print("\nScaling (case 14), medians against 14a (1 queue):\n")
        print(scaling)
    if 14 in cases:
        meta["scaling_note"] = SCALING_NOTE.format(backend=a.backend_cpu, client=a.client_cpu)
        print("\n" + meta["scaling_note"])
    print(f"\n{meta['duration_s']:.0f} s in all")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "table": summary, "details": details, "scaling": scaling, "workloads": results},
                  f, indent=1)
    print(f"raw figures: {a.out}")
    return 130 if interrupted else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
