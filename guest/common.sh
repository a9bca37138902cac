# Helpers sourced by /tests/*.sh (installed as /common.sh in the guest).
set -e

# step "description": announce the current step; the init reports it if the
# script dies from set -e without calling fail.
step() {
    echo "[$VBLK_TEST] $*"
    echo "$*" > "${VBLK_STEP_FILE:-/tmp/vblk-step}"
}

# fail "reason": print and record the reason, exit non-zero.
fail() {
    echo "[$VBLK_TEST] FAIL: $*" >&2
    echo "$*" > "${VBLK_REASON_FILE:-/tmp/vblk-fail-reason}"
    exit 1
}

# arg NAME [DEFAULT]: value of NAME from vblk.args (fails when missing and
# no default given).
arg() {
    eval "v=\${VBLK_ARG_$1-}"
    if [ -z "$v" ]; then
        [ $# -ge 2 ] || fail "missing vblk.args parameter '$1'"
        v=$2
    fi
    echo "$v"
}

drop_caches() {
    sync
    echo 3 > /proc/sys/vm/drop_caches
}

# first512sha DEV: sha256 of the first sector, read with O_DIRECT
sector0_sha() {
    dd if="$1" bs=512 count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1
}

# queue_irqs: "<queue> <interrupt count>" per virtio-blk request queue, from
# /proc/interrupts (one MSI-X vector per virtqueue: "virtioN-req.Q").
queue_irqs() {
    awk '/virtio[0-9]+-req\.[0-9]+/ {
            n = 0; for (i = 2; i <= NF; i++) { if ($i ~ /^[0-9]+$/) n += $i; else break }
            q = $NF; sub(/.*-req\./, "", q); print q, n }' /proc/interrupts | sort -n
}

# util-linux tools by absolute path: busybox sh runs its own applets of the
# same name (blkdiscard, blockdev) in preference to $PATH.
BLKDISCARD=/usr/sbin/blkdiscard
BLOCKDEV=/usr/sbin/blockdev
