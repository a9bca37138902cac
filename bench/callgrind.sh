#!/usr/bin/env bash
# Instructions per request of the hot path, counted by callgrind: unlike time, the count
# is the same on a noisy box, so two builds can be compared run against run.
#
#   bench/callgrind.sh                 # every workload: Ir/request + top functions
#   REQS=64000 TOP=25 bench/callgrind.sh read4k/32 write4k-merge/32
#
# It builds crates/blk/benches/hot_path.rs (`cargo bench --no-run`, release + debug info)
# and runs it under `valgrind --tool=callgrind` once per workload, with
# VBLK_CALLGRIND_REQS=$REQS: the binary then skips criterion, warms the rig up (outside the
# count) and runs $REQS requests through `steady_state`, the only function counted
# (`--collect-atstart=no --toggle-collect`). The driver is vblk's DriverQueue; the device
# part alone is the inclusive cost of `device_round` (pop, parse, merge, push to the null
# engine, re-enable kicks, reap, finish, publish).
#
# Columns: total = Ir of `steady_state` / requests (driver + device), device = Ir of
# `device_round` / requests, driver = the difference. Syscalls are not instructions:
# callgrind counts only the user-space side of the engine's eventfd read/write.
#
# Output: a table on stdout, the top $TOP functions by inclusive cost per workload, and the
# raw profiles in $OUT (callgrind_annotate/kcachegrind them), plus $OUT/summary.tsv.
# Cargo's environment passes through, e.g. to count a fat-LTO build in its own target dir:
#   CARGO_TARGET_DIR=/tmp/lto CARGO_PROFILE_BENCH_LTO=fat CARGO_PROFILE_BENCH_CODEGEN_UNITS=1 \
#       OUT=/tmp/lto/callgrind bench/callgrind.sh
# Needs valgrind (3.19 was used) and jq.
set -euo pipefail

cd "$(dirname "$0")/.."
REQS=${REQS:-32000}
TOP=${TOP:-15}
OUT=${OUT:-target/callgrind}

exe=$(cargo bench -p vblk-blk --bench hot_path --no-run --message-format=json 2>/dev/null |
    jq -r 'select(.reason == "compiler-artifact" and .target.name == "hot_path" and .executable != null) | .executable' |
    tail -n 1)
if [[ -z "$exe" || ! -x "$exe" ]]; then
    echo "callgrind.sh: could not build the hot_path bench (run: cargo bench -p vblk-blk --bench hot_path --no-run)" >&2
    exit 1
fi

if [[ $# -gt 0 ]]; then
    workloads=("$@")
else
    mapfile -t workloads < <(VBLK_CALLGRIND_REQS=1 VBLK_CALLGRIND_LIST=1 "$exe")
fi

mkdir -p "$OUT"
summary="$OUT/summary.tsv"
printf 'workload\trequests\tIr_total\tIr_device\tIr_per_req\tdevice_per_req\tdriver_per_req\n' >"$summary"

# Inclusive Ir of the first function whose name matches $2 in profile $1.
inclusive() {
    callgrind_annotate --inclusive=yes --threshold=100 "$1" 2>/dev/null |
        awk -v pat="$2" '!found && $0 ~ pat { gsub(",", "", $1); print $1; found = 1 }'
}

for w in "${workloads[@]}"; do
    file="$OUT/$(echo "$w" | tr '/' '_').out"
    log="$OUT/$(echo "$w" | tr '/' '_').log"
    if ! VBLK_CALLGRIND_REQS=$REQS VBLK_CALLGRIND_WORKLOAD=$w \
        valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*hot_path::steady_state*' \
        --callgrind-out-file="$file" "$exe" >"$log" 2>&1; then
        echo "callgrind.sh: $w failed, see $log" >&2
        exit 1
    fi
    reqs=$(sed -n 's/.*workload=[^ ]* requests=\([0-9]*\).*/\1/p' "$log")
    total=$(sed -n 's/^summary: *\([0-9]*\).*/\1/p; s/^totals: *\([0-9]*\).*/\1/p' "$file" | head -n 1)
    device=$(inclusive "$file" 'hot_path::device_round')
    if [[ -z "$reqs" || -z "$total" || -z "$device" ]]; then
        echo "callgrind.sh: cannot read the counts of $w (see $log, $file)" >&2
        exit 1
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$w" "$reqs" "$total" "$device" \
        "$(awk -v t="$total" -v n="$reqs" 'BEGIN { printf "%.1f", t / n }')" \
        "$(awk -v t="$device" -v n="$reqs" 'BEGIN { printf "%.1f", t / n }')" \
        "$(awk -v t="$total" -v d="$device" -v n="$reqs" 'BEGIN { printf "%.1f", (t - d) / n }')" >>"$summary"
done

echo "Instructions per request (callgrind Ir, $REQS requests per workload after warm-up):"
echo
column -t -s $'\t' "$summary"

for w in "${workloads[@]}"; do
    file="$OUT/$(echo "$w" | tr '/' '_').out"
    echo
    echo "== $w: top $TOP functions by inclusive Ir =="
    total=$(awk -F'\t' -v w="$w" '$1 == w { print $3 }' "$summary")
    reqs=$(awk -F'\t' -v w="$w" '$1 == w { print $2 }' "$summary")
    # Rows are "Ir (pct) file:function [object]". Inlined code is booked under the file it
    # came from, so one function can have several rows: keep its largest. Skip the callers
    # of steady_state (main, lang_start, ...: the whole count).
    callgrind_annotate --inclusive=yes "$file" 2>/dev/null |
        awk '/^-+$/ { dashes++; next } dashes >= 3 && /^ *[0-9]/' |
        awk -v total="$total" -v reqs="$reqs" 'BEGIN { printf "%14s %7s %9s  %s\n", "Ir", "%", "Ir/req", "function" } {
            ir = $1; gsub(",", "", ir)
            fn = $0; sub(/^ *[0-9,]+ +\( *[0-9.]+%\) +/, "", fn); sub(/ \[[^]]*\]$/, "", fn); sub(/^[^:]*:/, "", fn)
            if ((ir + 0 < total + 0 || fn ~ /steady_state/) && !(fn in seen)) {
                seen[fn] = 1
                printf "%14s %6.2f%% %9.1f  %s\n", $1, 100 * ir / total, ir / reqs, fn
            }
        }' |
        awk -v top="$TOP" 'NR <= top + 1'
done
