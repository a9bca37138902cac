#!/usr/bin/env bash
# The cost of vblk's metrics on the hot path: 4k random reads at QD32 against
# `vblk serve --backend null` (one queue, pinned to CPU 1) from `vblk bench` (CPU 0), for
#   base:    a vblk built from the commit before the metrics (no counting at all),
#   counted: this tree's vblk without --metrics (the counters are always on),
#   scraped: this tree's vblk with --metrics, scraped once a second during the run,
# interleaved (base, counted, scraped, base, ...), PAIRS rounds of SECONDS each; prints
# every run (side, IOPS, CPUs used by other processes during it) and the medians. The
# client is always this tree's `vblk bench`.
#
#   git archive PARENT | tar -x -C /tmp/vblk-base
#   (cd /tmp/vblk-base && CARGO_TARGET_DIR=/tmp/vblk-base/target cargo build --release -p vblk --bin vblk)
#   cargo build --release -p vblk --bin vblk
#   bench/metrics-overhead.sh /tmp/vblk-base/target/release/vblk target/release/vblk 5 5
#
# SERVE_FLAGS adds `vblk serve` flags to every side, e.g. SERVE_FLAGS='--poll-us 0'.
set -euo pipefail

BASE=${1:?usage: $0 BASE_VBLK NEW_VBLK [PAIRS] [SECONDS]}
NEW=${2:?usage: $0 BASE_VBLK NEW_VBLK [PAIRS] [SECONDS]}
PAIRS=${3:-5}
SECONDS_PER_RUN=${4:-5}
TMP=$(mktemp -d /tmp/vblk-metrics-bench.XXXXXX)
SERVE_PID=
cleanup() {
    if [ -n "$SERVE_PID" ]; then kill "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

# run SIDE BINARY [serve flags...]: one serve + one bench; prints "SIDE IOPS".
run() {
    local side=$1 bin=$2
    shift 2
    local sock=$TMP/$side.sock
    rm -f "$sock" "$TMP/serve.err"
    # shellcheck disable=SC2086 # SERVE_FLAGS is a list of flags
    taskset -c 1 "$bin" serve "$TMP/null.img" --backend null --size 1G --num-queues 1 --socket "$sock" \
        ${SERVE_FLAGS:-} "$@" 2>"$TMP/serve.err" &
    SERVE_PID=$!
    for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.02; done
    local scraper=
    if [ "$side" = scraped ]; then
        local addr
        addr=$(grep -o 'metrics on http://[^ ]*' "$TMP/serve.err" | sed 's/metrics on //')
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
    python3 - "$TMP/bench.json" "$side" "$busy0" "$busy1" "$serve0" "$serve1" "$t0" "$t1" "$(getconf CLK_TCK)" <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
side = sys.argv[2]
busy0, busy1, serve0, serve1 = map(int, sys.argv[3:7])
t0, t1, hz = float(sys.argv[7]), float(sys.argv[8]), int(sys.argv[9])
client = b["cpu_us_per_io"] * b["ios"] / 1e6
other = ((busy1 - busy0) - (serve1 - serve0)) / hz - client
print(f"{side} {round(b['iops'])} {max(other, 0) / (t1 - t0):.2f}")
PY
}

# Busy jiffies of the whole machine (all CPUs), and of one process.
busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
proc_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# Wait (up to 10 min) until other processes use less than 0.1 CPU over 2 s.
wait_quiet() {
    for _ in $(seq 300); do
        local b0 b1
        b0=$(busy); sleep 2; b1=$(busy)
        [ $(( (b1 - b0) * 10 )) -lt $(( 2 * $(getconf CLK_TCK) )) ] && return 0
    done
    echo "machine still busy; measuring anyway" >&2
}

# A round is measured again (up to 4 times) when another process used more than 0.15 CPU
# during one of its runs; the last attempt is kept either way (marked noisy).
for i in $(seq "$PAIRS"); do
    for attempt in 1 2 3 4 5; do
        wait_quiet
        round=$( run base "$BASE"; run counted "$NEW"; run scraped "$NEW" --metrics 127.0.0.1:0 )
        if ! awk '$3 > 0.15 {bad = 1} END {exit bad}' <<<"$round"; then
            [ "$attempt" -lt 5 ] && { echo "round $i: noisy, again" >&2; continue; }
            round=$(sed 's/$/ noisy/' <<<"$round")
        fi
        break
    done
    echo "$round"
done | tee "$TMP/runs.txt"

python3 - "$TMP/runs.txt" <<'EOF'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    side, iops, other = line.split()[:3]
    runs.setdefault(side, []).append(int(iops))
base = statistics.median(runs["base"])
for side in ("base", "counted", "scraped"):
    m = statistics.median(runs[side])
    print(f"{side:8} median {m / 1e3:8.1f}k IOPS  ratio to base {m / base:.3f}  "
          f"range {min(runs[side]) / 1e3:.1f}k-{max(runs[side]) / 1e3:.1f}k")
EOF
