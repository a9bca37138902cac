#!/usr/bin/env bash
# Runs vblk's cargo-fuzz targets (fuzz/): first replays every saved regression input
# (fuzz/regressions/<target>/*), then fuzzes each target for SECONDS starting from its
# seed corpus (fuzz/corpus/<target>/). Fails if any target crashes, hangs or leaks.
#
#   scripts/fuzz.sh                   # every target, 60 s each
#   scripts/fuzz.sh 600 vhost_user    # one target, 10 minutes
#   FUZZ_GROW_CORPUS=1 scripts/fuzz.sh 300 merge   # let the run add inputs to fuzz/corpus/
#
# Stable toolchain: cargo-fuzz needs nightly -Z flags, so RUSTC_BOOTSTRAP=1 is set here.
# Crash inputs land in fuzz/artifacts/<target>/; minimise one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz tmin <target> <file>
# and keep it in fuzz/regressions/<target>/ once the bug is understood.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET=${1:-60}
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(chain_request vhost_user merge inflight packed qcow2)
fi
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

echo "== build (${TARGETS[*]})"
for t in "${TARGETS[@]}"; do
    cargo fuzz build "$t"
done
bin=fuzz/target/x86_64-unknown-linux-gnu/release

status=0
for t in "${TARGETS[@]}"; do
    for input in fuzz/regressions/"$t"/*; do
        [ -f "$input" ] || continue
        echo "== $t: replaying $input"
        if ! "$bin/$t" -rss_limit_mb=2048 -timeout=30 "$input" >"$input.log~" 2>&1; then
            grep -m1 -A2 panicked "$input.log~" || tail -n 5 "$input.log~"
            echo "!! $t: saved regression input $input fails"
            status=1
        fi
        rm -f "$input.log~"
    done
done

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${TARGETS[@]}"; do
    mkdir -p "fuzz/artifacts/$t"
    if [ "${FUZZ_GROW_CORPUS:-0}" = 1 ]; then
        corpus="fuzz/corpus/$t"
    else
        # A scratch copy: runs do not grow the committed corpus.
        corpus="$scratch/$t"
        mkdir -p "$corpus"
        cp fuzz/corpus/"$t"/* "$corpus"/
    fi
    echo "== $t: fuzzing for ${SECONDS_PER_TARGET}s"
    if ! cargo fuzz run "$t" "$corpus" -- -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -timeout=30 \
        -print_final_stats=1; then
        echo "!! $t: crash (input saved in fuzz/artifacts/$t/)"
        status=1
    fi
done
exit $status
