#!/usr/bin/env python3
"""The backend's cost per I/O of a Linux guest: `vblk serve` against qemu-storage-daemon (QSD).

Boots the test guest (scripts/build-guest.sh: a Debian kernel and an initramfs with fio) under
QEMU with TCG, once per backend, on the same image, and runs the same fio jobs in it
(guest/tests/fio-bench.sh; by default 4k randread and randwrite at QD32, 10 s each, the guest's
virtio_blk driver with blk-mq, io_uring). TCG makes the guest the bottleneck, so its IOPS are
shown for information only; the figures are what the backend spends per request the guest's
disk completed:

- backend CPU per I/O: utime + stime of the backend process (all threads, /proc/PID/stat)
  between the guest's "VBLK-FIO-START" and "VBLK-FIO-END" markers on the serial console,
  divided by the requests /dev/vda completed in between (/sys/block/vda/stat in the guest);
- system calls per I/O: `perf stat -e raw_syscalls:sys_enter -p PID` attached to the backend
  over the same window (all its threads present at the start: QSD's aio=threads workers started
  later would be missed, so the configurations here use io_uring); none without perf;
- for information: the guest's IOPS (fio's), QEMU's CPU per I/O (the guest, TCG).

Pairs are interleaved (vblk, QSD config 1, QSD config 2, ..., then the next pair); each run is a
fresh backend and a fresh guest. The figure is the median over the pairs; the ratio is
vblk / QSD, against the QSD configuration with the lowest median backend CPU per I/O for that
job, and every pair's ratio and the worst pair are shown too. The backend is pinned to
--backend-cpu (1), QEMU to --guest-cpu (0), as bench/compare.py pins backend and client.

Standard library only; shares bench/compare.py's helpers. See bench/README.md.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C  # noqa: E402  (bench/compare.py: processes, CPU accounting, noise, formats)

QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
GIB = 1 << 30

# QSD configurations (labels of compare.qsd_configs): io_uring, iothread polling on (QEMU's
# default poll-max-ns) and off. aio=native is close; aio=threads adds threads perf would miss.
DEFAULT_QSD = ["direct,io_uring,poll-max-ns=32768", "direct,io_uring,poll-max-ns=0"]
DEFAULT_QSD_NULL = ["null-co,poll-max-ns=32768", "null-co,poll-max-ns=0"]

# Issue 15's target: guest fio 4k randread QD32, backend CPU per I/O <= 0.5x QSD's.
TARGETS = {("randread", "backend_cpu_us_per_io"): 0.5}

METRICS = {
    "backend_cpu_us_per_io": ("backend CPU/IO (µs)", C.LOWER),
    "syscalls_per_io": ("backend syscalls/IO", C.LOWER),
    "guest_iops": ("guest IOPS (TCG: info)", C.HIGHER),
    "qemu_cpu_us_per_io": ("QEMU CPU/IO (µs, info)", C.LOWER),
}


def perf_start(pid, path):
    """`perf stat` counting the system calls of every thread of `pid`; waits until it has
    opened its counters (its perf_event fds), at most 2 s."""
    p = subprocess.Popen([C.PERF, "stat", "-x,", "-e", "raw_syscalls:sys_enter", "-p", str(pid), "-o", path],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and p.poll() is None:
        try:
            if any("perf_event" in os.readlink(f"/proc/{p.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{p.pid}/fd")):
                return p, True
        except OSError:
            pass
        time.sleep(0.01)
    return p, False


def perf_stop(p, path):
    """Stop `perf stat` (SIGINT: it prints its counts) and return (syscalls, perf's CPU µs)."""
    try:
        cpu = C.proc_cpu_us(p.pid)
    except OSError:
        cpu = 0.0
    p.send_signal(signal.SIGINT)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    return C.perf_syscalls(path), cpu


class Run:
    """One boot: a fresh backend, a guest running fio-bench.sh, per-job measurements."""

    def __init__(self, env, side, cfg):
        self.env, self.side, self.cfg = env, side, cfg

    def backend_argv(self, sock):
        a = self.env.args
        if self.side == "vblk":
            argv = ["taskset", "-c", a.backend_cpu, C.VBLK_RUN, "serve"]
            if a.disk == "null":
                argv += [os.path.join(self.env.tmp, "null.img"), "--backend", "null", "--size", str(a.size)]
            else:
                argv += [self.env.image]
            return argv + ["--socket", sock, "--num-queues", str(a.queues)] + shlex.split(a.vblk_args)
        _, opts, poll = self.cfg
        argv = ["taskset", "-c", a.backend_cpu, C.QSD, "--object", f"iothread,id=io0,poll-max-ns={poll}"]
        if a.disk == "null":
            argv += ["--blockdev", f"driver=null-co,node-name=disk0,size={a.size},read-zeroes=off"]
        else:
            argv += ["--blockdev", f"driver=file,node-name=file0,filename={self.env.image},{opts}",
                     "--blockdev", "driver=raw,node-name=disk0,file=file0"]
        return argv + ["--export", "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                       f"addr.path={sock},writable=on,num-queues={a.queues},iothread=io0"]

    def qemu_argv(self, sock, serial):
        a, g = self.env.args, self.env.guest
        gargs = (f"jobs={':'.join(a.jobs)},bs={a.bs},iodepth={a.iodepth},secs={a.seconds:g},"
                 f"settle={a.settle:g},numjobs={a.numjobs}")
        mem = f"{a.guest_mem}M"
        return ["taskset", "-c", a.guest_cpu, QEMU, "-accel", "tcg", "-machine", "q35", "-cpu", "max",
                "-smp", str(a.smp), "-m", mem,
                "-object", f"memory-backend-memfd,id=mem,size={mem},share=on", "-numa", "node,memdev=mem",
                "-kernel", g["kernel"], "-initrd", g["initrd"],
                "-append", f"console=ttyS0 quiet panic=-1 vblk.test=fio-bench vblk.args={gargs}",
                "-nodefaults", "-display", "none", "-monitor", "none", "-no-reboot",
                "-serial", f"file:{serial}",
                "-chardev", f"socket,id=vb0,path={sock}",
                "-device", f"vhost-user-blk-pci,chardev=vb0,num-queues={a.queues}"]

    def go(self):
        a, env = self.env.args, self.env
        env.counter += 1
        base = os.path.join(env.tmp, f"r{env.counter}")
        sock, blog, serial, qlog = base + ".sock", base + ".backend.log", base + ".serial", base + ".qemu.log"
        rec = {"side": self.side, "config": self.cfg[0] if self.cfg else "vblk serve " + a.vblk_args,
               "jobs": {}}
        backend = qemu = None
        try:
            bargv = self.backend_argv(sock)
            rec["backend_cmd"] = bargv
            backend = C.PROCS.start(bargv, blog)
            C.wait_socket(sock, backend, blog)
            qargv = self.qemu_argv(sock, serial)
            rec["qemu_cmd"] = qargv
            qemu = C.PROCS.start(qargv, qlog)
            self.follow(rec, backend, qemu, serial)
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            if isinstance(e, KeyboardInterrupt):
                raise
            rec["error"] = str(e)
        finally:
            if qemu is not None:
                # The guest powers off after its result line; QEMU first, so that it does not
                # complain about a vanished backend.
                try:
                    qemu.wait(5)
                except subprocess.TimeoutExpired:
                    pass
                C.PROCS.stop(qemu)
            if backend is not None:
                rec["backend_exit"] = C.PROCS.stop(backend)
            if "error" in rec:
                rec["serial_tail"] = C.tail(serial, 1500)
                rec["qemu_log"] = C.tail(qlog, 600)
                rec["backend_log"] = C.tail(blog, 600)
            for p in (sock, blog, serial, qlog, base + ".perf"):
                try:
                    os.unlink(p)
                except OSError:
                    pass
        return rec

    def follow(self, rec, backend, qemu, serial):
        """Read the serial console as it grows; measure between each job's markers."""
        a = self.env.args
        deadline = time.monotonic() + a.boot_timeout + len(a.jobs) * (a.seconds + 2 * a.settle + 60)
        pos, buf, cur = 0, "", None
        ours = (backend.pid, qemu.pid)
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError("the guest did not finish in time")
            try:
                with open(serial, "rb") as f:
                    f.seek(pos)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            pos += len(data)
            buf += data.decode(errors="replace")
            lines = buf.split("\n")
            buf = lines.pop()
            for line in lines:
                line = line.strip()
                m = re.search(r"VBLK-FIO-START (\S+)", line)
                if m:
                    cur = {"rw": m.group(1), "t0": time.monotonic(), "sys0": C.sys_cpu_us(),
                           "cpu0": C.proc_cpu_us(backend.pid), "qemu0": C.proc_cpu_us(qemu.pid),
                           "procs0": C.proc_table()}
                    if C.PERF and not a.no_perf:
                        cur["perf"], attached = perf_start(backend.pid, rec_perf_path(serial))
                        cur["perf_attached"] = attached
                    continue
                m = re.search(r"VBLK-FIO-END (\S+) (.*)", line)
                if m and cur is not None:
                    t1, cpu1, q1 = time.monotonic(), C.proc_cpu_us(backend.pid), C.proc_cpu_us(qemu.pid)
                    sys1, procs1 = C.sys_cpu_us(), C.proc_table()
                    kv = dict(x.split("=", 1) for x in m.group(2).split() if "=" in x)
                    syscalls, perf_cpu = (None, 0.0)
                    if "perf" in cur:
                        syscalls, perf_cpu = perf_stop(cur["perf"], rec_perf_path(serial))
                        if not cur["perf_attached"]:
                            syscalls = None  # it may have missed the start
                    ios = int(kv.get("ios", 0))
                    wall = t1 - cur["t0"]
                    busy = (cpu1 - cur["cpu0"]) + (q1 - cur["qemu0"]) + perf_cpu
                    perf_pid = (cur["perf"].pid,) if "perf" in cur else ()
                    rec["jobs"][m.group(1)] = {
                        "guest": kv, "wall_s": wall, "backend_cpu_us": cpu1 - cur["cpu0"],
                        "qemu_cpu_us": q1 - cur["qemu0"], "syscalls": syscalls,
                        "noise": C.noise(cur["sys0"], sys1, wall, busy, cur["procs0"], procs1, ours + perf_pid),
                        "metrics": {
                            "backend_cpu_us_per_io": (cpu1 - cur["cpu0"]) / ios if ios else None,
                            "syscalls_per_io": syscalls / ios if syscalls is not None and ios else None,
                            "guest_iops": float(kv.get("fio_iops", 0)) or None,
                            "qemu_cpu_us_per_io": (q1 - cur["qemu0"]) / ios if ios else None,
                        },
                    }
                    cur = None
                    continue
                if "VBLK-RESULT" in line:
                    if "VBLK-RESULT PASS" not in line:
                        raise RuntimeError(line[line.index("VBLK-RESULT"):])
                    missing = [j for j in a.jobs if j not in rec["jobs"]]
                    if missing:
                        raise RuntimeError(f"no measurement of {', '.join(missing)}")
                    return
            if qemu.poll() is not None:
                raise RuntimeError(f"QEMU exited with {qemu.returncode} before the guest's result")
            time.sleep(0.02)


def rec_perf_path(serial):
    return serial[: -len(".serial")] + ".perf"


class Env:
    def __init__(self, args, tmp, guest):
        self.args, self.tmp, self.guest = args, tmp, guest
        self.counter = 0
        self.image = None

    def make_image(self):
        a = self.args
        if a.disk == "null":
            return
        d = a.tmpfs_dir if a.disk == "tmpfs" else a.disk_dir
        os.makedirs(d, exist_ok=True)
        fd, self.image = tempfile.mkstemp(prefix="vblk-guest-bench-", suffix=".img", dir=d)
        print(f"preparing {self.image} ({a.size >> 20} MiB, {C.fstype(d)}, written, not sparse) ...", flush=True)
        chunk = b"\x5a" * (1 << 20)
        try:
            written = 0
            while written < a.size:
                written += os.write(fd, chunk[: min(len(chunk), a.size - written)])
            os.fsync(fd)
        finally:
            os.close(fd)

    def cleanup(self):
        if self.image:
            try:
                os.unlink(self.image)
            except OSError:
                pass


def build_guest(outdir):
    r = subprocess.run(["bash", os.path.join(C.ROOT, "scripts", "build-guest.sh"), outdir],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        sys.exit(f"scripts/build-guest.sh failed: {r.stderr.strip()[-800:]}")
    lines = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
    kernel = next((ln for ln in lines if ln.endswith("vmlinuz")), None)
    initrd = next((ln for ln in lines if ln.endswith("initramfs.cpio.gz")), None)
    if not kernel or not initrd:
        sys.exit(f"scripts/build-guest.sh printed no kernel/initramfs paths: {r.stdout}")
    return {"kernel": kernel, "initrd": initrd}


def summarize(a, runs, sides):
    """Medians per job, side and metric; ratios vblk / best QSD config per job."""
    out = []
    for job in a.jobs:
        def vals(side, metric, pair=None):
            return [r["jobs"][job]["metrics"][metric] for r in runs
                    if r["side"] == side and job in r.get("jobs", {}) and (pair is None or r["pair"] == pair)]
        med = {s: {m: C.median(vals(s, m)) for m in METRICS} for s in sides}
        qsds = [s for s in sides if s != "vblk" and med[s]["backend_cpu_us_per_io"] is not None]
        peer = min(qsds, key=lambda s: med[s]["backend_cpu_us_per_io"]) if qsds else None
        checks = []
        for metric, (name, direction) in METRICS.items():
            v = med["vblk"][metric]
            p = med[peer][metric] if peer else None
            ratio = v / p if v is not None and p else None
            prs = []
            for i in range(a.pairs):
                vv, pp = vals("vblk", metric, i), vals(peer, metric, i) if peer else []
                if vv and pp and vv[0] is not None and pp[0]:
                    prs.append(vv[0] / pp[0])
            worst = (min(prs) if direction == C.HIGHER else max(prs)) if prs else None
            target = TARGETS.get((job, metric))
            ok = None
            if target is not None and ratio is not None:
                ok = ratio <= target and (worst is None or worst <= target)
            checks.append({"metric": metric, "vblk": v, "peer": p, "peer_side": peer, "ratio": ratio,
                           "pair_ratios": prs, "worst": worst, "target": target, "pass": ok,
                           "median_pass": None if target is None or ratio is None else ratio <= target})
        others = C.median([r["jobs"][job]["noise"]["others_cpus"] for r in runs if job in r.get("jobs", {})])
        out.append({"job": job, "medians": med, "peer": peer, "checks": checks, "others_cpus": others})
    return out


def report(a, summary):
    head = ["job", "metric", "vblk", "QSD", "ratio vblk/QSD", "pair ratios", "worst pair", "target", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for s in summary:
        title = f"guest fio {s['job']} {a.bs} QD{a.iodepth}"
        for c in s["checks"]:
            name, direction = METRICS[c["metric"]]
            arrow = " ↑" if direction == C.HIGHER else " ↓"
            fmt = (lambda v: C.fmt("iops", v)) if c["metric"] == "guest_iops" else (lambda v: C.fmt("x", v))
            if c["target"] is None:
                res, target = "-", "(comparison)"
            else:
                target = f"<= {c['target']:g}"
                res = {True: "pass", False: "short", None: "n/a"}[c["pass"]]
                if c["pass"] is False and c["median_pass"]:
                    res = "short: worst pair"
            if (s["others_cpus"] or 0) > a.noise_limit:
                res += f" (noisy: others used {s['others_cpus']:.1f} CPU)"
            lines.append("| " + " | ".join([
                title, name + arrow, fmt(c["vblk"]), f"{fmt(c['peer'])} ({c['peer_side'] or '-'})",
                "-" if c["ratio"] is None else f"{c['ratio']:.2f}",
                " ".join(f"{r:.2f}" for r in c["pair_ratios"]) or "-",
                "-" if c["worst"] is None else f"{c['worst']:.2f}", target, res]) + " |")
    return "\n".join(lines)


def detail(a, summary, sides):
    head = ["job", "side", "backend CPU µs/IO", "syscalls/IO", "guest IOPS", "QEMU CPU µs/IO"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for s in summary:
        for side in sides:
            m = s["medians"][side]
            lines.append("| " + " | ".join([
                s["job"], side, C.fmt("x", m["backend_cpu_us_per_io"]), C.fmt("x", m["syscalls_per_io"]),
                C.fmt("iops", m["guest_iops"]), C.fmt("x", m["qemu_cpu_us_per_io"])]) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3, help="interleaved vblk/QSD rounds (default 3)")
    ap.add_argument("--seconds", type=float, default=10, help="seconds per fio job (default 10)")
    ap.add_argument("--jobs", default="randread,randwrite", help="fio rw modes (default randread,randwrite)")
    ap.add_argument("--bs", default="4k", help="fio block size (default 4k)")
    ap.add_argument("--iodepth", type=int, default=32, help="fio iodepth (default 32)")
    ap.add_argument("--numjobs", type=int, default=1, help="fio jobs (default 1)")
    ap.add_argument("--queues", type=int, default=1, help="virtqueues (default 1)")
    ap.add_argument("--smp", type=int, default=1, help="guest vCPUs (default 1: QEMU has one host CPU)")
    ap.add_argument("--guest-mem", type=int, default=512, help="guest memory, MiB (default 512)")
    ap.add_argument("--settle", type=float, default=2,
                    help="seconds the guest waits around each job for the host's snapshots (default 2)")
    ap.add_argument("--disk", choices=("tmpfs", "ext4", "null"), default="tmpfs",
                    help="the image both backends serve: a file on --tmpfs-dir (default), on --disk-dir, "
                         "or the null backend (vblk --backend null, QSD null-co)")
    ap.add_argument("--size", type=C.parse_size, default=GIB, help="image size (default 1G)")
    ap.add_argument("--tmpfs-dir", default="/dev/shm")
    ap.add_argument("--disk-dir", default=C.TARGET)
    ap.add_argument("--qsd-config", action="append", default=None, metavar="LABEL",
                    help="a QSD configuration (repeatable; labels as bench/compare.py prints them, e.g. "
                         f"'{DEFAULT_QSD[0]}'); default: {' and '.join(DEFAULT_QSD)}; the ratio is "
                         "taken against the one with the lowest median backend CPU per I/O")
    ap.add_argument("--vblk-args", default="", help="extra `vblk serve` flags, e.g. '--poll-us 0'")
    ap.add_argument("--backend-cpu", default="1", help="CPU list of the backend (default 1)")
    ap.add_argument("--guest-cpu", default="0", help="CPU list of QEMU (default 0)")
    ap.add_argument("--guest-dir", default=os.path.join(C.TARGET, "guest"),
                    help="where scripts/build-guest.sh puts the kernel and initramfs (default $CARGO_TARGET_DIR or target/, guest/)")
    ap.add_argument("--boot-timeout", type=float, default=300, help="seconds for a boot (default 300)")
    ap.add_argument("--no-perf", action="store_true", help="do not count system calls")
    ap.add_argument("--noise-limit", type=float, default=0.15)
    ap.add_argument("--retries", type=int, default=2, help="disturbed pairs measured again (default 2)")
    ap.add_argument("--quiet-wait", type=float, default=120)
    ap.add_argument("--out", default=os.path.join(C.TARGET, "guest-bench-results.json"))
    a = ap.parse_args()
    a.jobs = [j.strip() for j in a.jobs.split(",") if j.strip()]
    a.size = a.size // (1 << 20) << 20

    for tool in ("taskset", C.QSD, QEMU):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found")
    if not os.access(C.VBLK, os.X_OK):
        sys.exit(f"{C.VBLK} not found: cargo build --release -p vblk --bin vblk")
    if not C.PERF and not a.no_perf:
        print("warning: perf not found: no system call counts (apt install linux-perf)", file=sys.stderr)
    known = {c[0]: c for c in C.qsd_configs(a.disk)}
    labels = a.qsd_config or (DEFAULT_QSD_NULL if a.disk == "null" else DEFAULT_QSD)
    bad = [lab for lab in labels if lab not in known]
    if bad:
        sys.exit(f"unknown QSD configuration(s) {bad} for --disk {a.disk}: one of {', '.join(known)}")
    cfgs = [known[lab] for lab in labels]

    guest = build_guest(a.guest_dir)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_term)
    tmp = tempfile.mkdtemp(prefix="vblk-guest-bench-")
    C.VBLK_RUN = os.path.join(tmp, "vblk")
    shutil.copy2(C.VBLK, C.VBLK_RUN)
    env = Env(a, tmp, guest)
    meta = C.machine()
    meta.update(argv=sys.argv, pairs=a.pairs, seconds=a.seconds, jobs=a.jobs, bs=a.bs, iodepth=a.iodepth,
                queues=a.queues, smp=a.smp, disk=a.disk, qsd_configs=[c[0] for c in cfgs],
                vblk_args=a.vblk_args, backend_cpu=a.backend_cpu, guest_cpu=a.guest_cpu, guest=guest,
                syscalls="perf stat -e raw_syscalls:sys_enter -p BACKEND" if C.PERF and not a.no_perf else None)
    sides = ["vblk"] + [f"qsd {c[0]}" for c in cfgs]
    print(f"guest fio: vblk serve vs QSD ({', '.join(c[0] for c in cfgs)}), {a.pairs} pairs, jobs "
          f"{', '.join(a.jobs)} {a.bs} QD{a.iodepth} x {a.seconds:g} s, QEMU TCG on CPU {a.guest_cpu}, "
          f"backend on CPU {a.backend_cpu}, disk {a.disk}", flush=True)
    runs, discarded, t0, interrupted = [], [], time.monotonic(), False
    try:
        env.make_image()
        retries, i = a.retries, 0
        while i < a.pairs:
            C.wait_quiet(a)
            pair = []
            for side, cfg in [("vblk", None)] + [(f"qsd {c[0]}", c) for c in cfgs]:
                rec = Run(env, side, cfg).go()
                rec["pair"] = i
                pair.append(rec)
                if "error" in rec:
                    print(f"    [{i + 1}/{a.pairs}] {side:40} ERROR {rec['error'][:300]}"
                          f"\n        serial: {rec.get('serial_tail', '')[-300:]}", flush=True)
                    continue
                for job, j in rec["jobs"].items():
                    m = j["metrics"]
                    sc = "-" if m["syscalls_per_io"] is None else f"{m['syscalls_per_io']:.2f}"
                    print(f"    [{i + 1}/{a.pairs}] {side:40} {job:9} ios {j['guest'].get('ios')} "
                          f"guest {C.fmt('iops', m['guest_iops'])} IOPS  backend "
                          f"{C.fmt('x', m['backend_cpu_us_per_io'])} µs/IO  {sc} syscalls/IO  "
                          f"QEMU {C.fmt('x', m['qemu_cpu_us_per_io'])} µs/IO" + C.noise_text(j), flush=True)
            noisy = any(j["noise"]["others_cpus"] > a.noise_limit for r in pair for j in r.get("jobs", {}).values())
            if noisy and retries > 0:
                retries -= 1
                print(f"    pair {i + 1} disturbed by other processes (> {a.noise_limit} CPU): discarded, "
                      f"measuring it again ({retries} retries left)", flush=True)
                discarded += pair
                continue
            runs += pair
            i += 1
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: reporting what was measured", file=sys.stderr)
    finally:
        C.PROCS.stop_all()
        env.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    meta["duration_s"] = round(time.monotonic() - t0, 1)
    meta["interrupted"] = interrupted
    summary = summarize(a, [r for r in runs if "error" not in r], sides)
    table, details = report(a, summary), detail(a, summary, sides)
    print(f"\n{meta['date']}, {a.pairs} pairs, medians; ratio = vblk / QSD (the QSD configuration with "
          f"the lowest median backend CPU/IO for that job); ↓ lower is better; system calls counted with "
          f"`perf stat -e raw_syscalls:sys_enter -p` on the backend\n")
    print(table)
    print("\nMedians per side:\n")
    print(details)
    print(f"\n{meta['duration_s']:.0f} s in all")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "table": table, "details": details, "summary": summary, "runs": runs,
                   "discarded": discarded}, f, indent=1, default=str)
    print(f"raw figures: {a.out}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
