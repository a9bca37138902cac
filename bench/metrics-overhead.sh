#!/usr/bin/env bash
# The cost of vblk's metrics on the hot path, end to end: 4k random reads at QD32 against
# `vblk serve --backend null --num-queues 1` (pinned to CPU 1) from `vblk bench` (CPU 0), for
#   base: a vblk built from the commit before the metrics (no counting at all),
#   new:  this tree's vblk without --metrics (the counters are always on),
#   and, with SCRAPED=1, scraped: this tree's vblk with --metrics, scraped once a second,
# in PAIRS interleaved pairs of SECONDS-long runs (a fresh daemon per run; the order
# alternates: base-new, new-base, ...) for every polling mode in MODES. The client is
# always NEW's `vblk bench`, so only the daemon differs.
#
#   git archive PARENT | tar -x -C /tmp/vblk-base
#   (cd /tmp/vblk-base && CARGO_TARGET_DIR=/tmp/vblk-base/target cargo build --release -p vblk --bin vblk)
#   cargo build --release -p vblk --bin vblk
#   bench/metrics-overhead.sh /tmp/vblk-base/target/release/vblk target/release/vblk 10 5
#
# Prints every run (mode, pair, side, IOPS, CPUs other processes used during it, the 1-min
# load average before it) and then, per mode: the median IOPS of each side, the ratio of
# the medians (new/base: "IOPS with and without, same run"), the median and range of the
# per-pair ratios, and each side's sorted IOPS (to see whether both are bimodal); all
# pairs, then (if some were noisy) the quiet pairs alone. On this 2-CPU machine the client
# and the daemon take both CPUs, so anything else running shows; with the default polling
# the same binary moves between throughput levels run to run (docs/PERFORMANCE.md): take
# 10 pairs or more, and compare medians, not one pair.
#
# Environment:
#   MODES        polling modes to measure, any of `default` (vblk's default adaptive
#                polling) and `poll0` (`--poll-us 0`); default "default poll0"
#   SERVE_FLAGS  more `vblk serve` flags for every run
#   SCRAPED=1    one more side per pair: NEW with --metrics, scraped once a second
#   EXTRA=VBLK   one more side per pair: another daemon (a control build, a candidate fix)
#   QUIET_WAIT   seconds to wait, before each pair, for other processes to use < 0.1 CPU
#                (default 120; then it measures anyway and says so)
#   NOISY        a pair is measured again (up to 3 times) when other processes used more
#                than this many CPUs during one of its runs (default 0.15); the last attempt
#                is kept either way, marked `noisy`
#   OUT          keep the runs (one line per run) in this file
set -euo pipefail

BASE=${1:?usage: $0 BASE_VBLK NEW_VBLK [PAIRS] [SECONDS]}
NEW=${2:?usage: $0 BASE_VBLK NEW_VBLK [PAIRS] [SECONDS]}
PAIRS=${3:-10}
SECONDS_PER_RUN=${4:-5}
MODES=${MODES:-default poll0}
QUIET_WAIT=${QUIET_WAIT:-120}
NOISY=${NOISY:-0.15}
TMP=$(mktemp -d /tmp/vblk-metrics-bench.XXXXXX)
SERVE_PID=
cleanup() {
    if [ -n "$SERVE_PID" ]; then kill "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

# Busy jiffies of the whole machine (all CPUs), and of one process.
busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
proc_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
load1() { cut -d' ' -f1 /proc/loadavg; }

# Wait (up to QUIET_WAIT s) until other processes use less than 0.1 CPU over 2 s.
wait_quiet() {
    local deadline=$((SECONDS + QUIET_WAIT))
    while [ "$SECONDS" -lt "$deadline" ]; do
        local b0 b1
        b0=$(busy); sleep 2; b1=$(busy)
        [ $(( (b1 - b0) * 10 )) -lt $(( 2 * $(getconf CLK_TCK) )) ] && return 0
    done
    echo "machine still busy (load $(load1)); measuring anyway" >&2
}

# run MODE PAIR SIDE: one serve + one bench; prints "MODE PAIR SIDE IOPS OTHER_CPUS LOAD1".
run() {
    local mode=$1 pair=$2 side=$3 bin=$NEW
    local -a flags=()
    [ "$side" = base ] && bin=$BASE
    [ "$side" = extra ] && bin=$EXTRA
    [ "$mode" = poll0 ] && flags+=(--poll-us 0)
    [ "$side" = scraped ] && flags+=(--metrics 127.0.0.1:0)
    local sock=$TMP/$side.sock
    rm -f "$sock" "$TMP/serve.err"
    local load
    load=$(load1)
    # shellcheck disable=SC2086 # SERVE_FLAGS is a list of flags
    taskset -c 1 "$bin" serve "$TMP/null.img" --backend null --size 1G --num-queues 1 --socket "$sock" \
        ${SERVE_FLAGS:-} "${flags[@]}" 2>"$TMP/serve.err" &
    SERVE_PID=$!
    for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.02; done
    local scraper=
    if [ "$side" = scraped ]; then
        local addr=
        for _ in $(seq 100); do
            addr=$(grep -o 'metrics on http://[^ ]*' "$TMP/serve.err" | sed 's/metrics on //' || true)
            [ -n "$addr" ] && break
            sleep 0.02
        done
        (while true; do curl -s -o /dev/null "$addr"; sleep 1; done) &
        scraper=$!
    fi
    local busy0 serve0 t0
    busy0=$(busy); serve0=$(proc_ticks "$SERVE_PID"); t0=$(date +%s.%N)
    taskset -c 0 "$NEW" bench --socket "$sock" --rw randread --bs 4k --iodepth 32 --queues 1 \
        --seconds "$SECONDS_PER_RUN" --json >"$TMP/bench.json"
    local busy1 serve1 t1
    busy1=$(busy); serve1=$(proc_ticks "$SERVE_PID"); t1=$(date +%s.%N)
    if [ -n "$scraper" ]; then kill "$scraper"; wait "$scraper" 2>/dev/null || true; fi
    kill "$SERVE_PID"
    wait "$SERVE_PID" || true
    SERVE_PID=
    # IOPS, and the CPUs other processes used meanwhile: machine busy time minus the
    # daemon's and the client's (the client's from its JSON: CPU per I/O x I/Os).
    python3 - "$TMP/bench.json" "$mode $pair $side" "$busy0" "$busy1" "$serve0" "$serve1" "$t0" "$t1" \
        "$(getconf CLK_TCK)" "$load" <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
busy0, busy1, serve0, serve1 = map(int, sys.argv[3:7])
t0, t1, hz = float(sys.argv[7]), float(sys.argv[8]), int(sys.argv[9])
client = b["cpu_us_per_io"] * b["ios"] / 1e6
other = ((busy1 - busy0) - (serve1 - serve0)) / hz - client
print(f"{sys.argv[2]} {round(b['iops'])} {max(other, 0) / (t1 - t0):.2f} {sys.argv[10]}")
PY
}

sides=(base new)
[ -n "${EXTRA:-}" ] && sides+=(extra)
[ "${SCRAPED:-0}" = 1 ] && sides+=(scraped)
echo "# mode pair side IOPS other-CPUs load1"
for i in $(seq "$PAIRS"); do
    # Alternate the order: even pairs run the sides backwards.
    order=("${sides[@]}")
    if [ $((i % 2)) -eq 0 ]; then
        order=()
        for ((k = ${#sides[@]} - 1; k >= 0; k--)); do order+=("${sides[k]}"); done
    fi
    for mode in $MODES; do
        for attempt in 1 2 3; do
            wait_quiet
            round=$(for s in "${order[@]}"; do run "$mode" "$i" "$s"; done)
            if awk -v max="$NOISY" '$5 > max {bad = 1} END {exit !bad}' <<<"$round"; then
                if [ "$attempt" -lt 3 ]; then echo "pair $i ($mode): noisy, again" >&2; continue; fi
                round=$(sed 's/$/ noisy/' <<<"$round")
            fi
            break
        done
        echo "$round"
    done
done | tee "$TMP/runs.txt"
if [ -n "${OUT:-}" ]; then cp "$TMP/runs.txt" "$OUT"; fi

python3 - "$TMP/runs.txt" <<'PY'
import statistics, sys
# mode -> side -> pair -> IOPS, and the pairs with a noisy run
runs, noisy = {}, set()
for line in open(sys.argv[1]):
    if line.startswith("#"):
        continue
    f = line.split()
    mode, pair, side, iops = f[:4]
    runs.setdefault(mode, {}).setdefault(side, {})[pair] = int(iops)
    if "noisy" in f:
        noisy.add((mode, pair))
k = lambda v: f"{v / 1e3:.0f}k"
for mode, sides in runs.items():
    flag = "--poll-us 0" if mode == "poll0" else "default adaptive polling"
    pairs = list(sides["base"])
    clean = [p for p in pairs if (mode, p) not in noisy]
    for label, sel in (("all", pairs), ("quiet", clean)):
        if label == "quiet" and (len(clean) == len(pairs) or not clean):
            continue
        base = [sides["base"][p] for p in sel]
        mb = statistics.median(base)
        print(f"\n{mode} ({flag}), {label} pairs: {len(sel)}")
        for side, r in sides.items():
            v = [r[p] for p in sel if p in r]
            m = statistics.median(v)
            line = f"  {side:8} median {k(m):>6} IOPS  range {k(min(v))}-{k(max(v))}"
            if side != "base":
                ratios = sorted(r[p] / sides["base"][p] for p in sel if p in r)
                line += (f"  ratio of medians {m / mb:.3f}, per pair median {statistics.median(ratios):.3f}"
                         f" ({ratios[0]:.2f}-{ratios[-1]:.2f})")
            print(line)
            print(f"           sorted: {' '.join(k(x) for x in sorted(v))}")
PY
