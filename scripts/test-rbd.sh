#!/usr/bin/env bash
# Runs vblk-rbd's tests against a real one-node Ceph cluster: starts it with
# scripts/ceph-micro.sh in a temporary directory, runs `cargo test -p vblk-rbd` with
# VBLK_CEPH_CONF pointing at it, and stops the cluster on exit (also on failure or ^C).
#
#   scripts/test-rbd.sh [cargo test args...]     # e.g. scripts/test-rbd.sh -- --nocapture
#   VBLK_SKIP_SETUP=1 ...    # do not run `scripts/ceph-micro.sh install` (apt)
#   VBLK_KEEP_TMP=1 ...      # keep the cluster's directory (logs) after the run
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${VBLK_SKIP_SETUP:-0}" != 1 ]; then
    bash scripts/ceph-micro.sh install
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/vblk-ceph.XXXXXX")
cleanup() {
    local rc=$?
    bash scripts/ceph-micro.sh stop "$dir" || rc=1
    if [ "${VBLK_KEEP_TMP:-0}" = 1 ] || [ $rc -ne 0 ]; then
        echo "test-rbd: cluster directory kept: $dir"
    else
        rm -rf "$dir"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

conf_line=$(bash scripts/ceph-micro.sh start "$dir")
export VBLK_CEPH_CONF=${conf_line#CEPH_CONF=}
echo "test-rbd: cluster up, VBLK_CEPH_CONF=$VBLK_CEPH_CONF"
cargo test -p vblk-rbd "$@"
