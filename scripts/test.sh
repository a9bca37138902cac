#!/usr/bin/env bash
# Runs every test of vblk: installs what the tests need (QEMU 10, a Debian kernel,
# busybox, fio, Ceph, ...), builds the test guest, checks formatting and clippy, then runs
# the unit, integration and real-guest tests.
#
#   scripts/test.sh            # everything
#   VBLK_SKIP_SETUP=1 ...      # do not touch apt (everything already installed)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${VBLK_SKIP_SETUP:-0}" != 1 ]; then
    echo "== setup (apt packages)"
    bash scripts/setup.sh
fi

echo "== build the test guest (kernel + initramfs)"
bash scripts/build-guest.sh

echo "== rustfmt"
cargo fmt --all -- --check

echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== a one-node Ceph cluster for the RBD tests (scripts/ceph-micro.sh)"
ceph_dir=$(mktemp -d "${TMPDIR:-/tmp}/vblk-ceph.XXXXXX")
stop_ceph() { bash scripts/ceph-micro.sh stop "$ceph_dir" >/dev/null 2>&1 || true; rm -rf "$ceph_dir"; }
trap stop_ceph EXIT
conf_line=$(bash scripts/ceph-micro.sh start "$ceph_dir")
export VBLK_CEPH_CONF=${conf_line#CEPH_CONF=}

echo "== tests"
# Guest tests share the CPUs under TCG, so they serialize themselves; the rest run in parallel.
cargo test --workspace --locked 2>&1 | tee target/test.log
echo "== fuzz (60 s per target, regression inputs first)"
bash scripts/fuzz.sh 60 2>&1 | tee target/fuzz.log | grep -E '^(==|!!)|Done [0-9]+ runs|ERROR|panicked'
echo "== all tests passed"
