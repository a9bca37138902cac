#!/usr/bin/env bash
# Idle cost of the backend (performance case 6): a Linux guest attached (QEMU, TCG), no I/O.
# Measures the backend's CPU time between 1 s and 1+WINDOW s after the guest's last I/O.
#
#   bench/idle.sh [--window SECS] [-- extra vblk serve flags, e.g. --poll-us 50]
set -euo pipefail
cd "$(dirname "$0")/.."
WINDOW=5
if [ "${1:-}" = --window ]; then WINDOW=$2; shift 2; fi
[ "${1:-}" = -- ] && shift
TARGET=${CARGO_TARGET_DIR:-target}
VBLK=$TARGET/release/vblk
[ -x "$VBLK" ] || { echo "build first: cargo build --release" >&2; exit 1; }
bash scripts/build-guest.sh "$TARGET/guest" >/dev/null
tmp=$(mktemp -d)
qemu=; vblk=
cleanup() {
    # QEMU first, so it does not complain about a vanished backend.
    [ -n "$qemu" ] && { kill "$qemu" 2>/dev/null; wait "$qemu" 2>/dev/null; }
    [ -n "$vblk" ] && { kill "$vblk" 2>/dev/null; wait "$vblk" 2>/dev/null; }
    rm -rf "$tmp"
}
trap cleanup EXIT

"$VBLK" serve "$tmp/disk.img" --size 64M --socket "$tmp/vblk.sock" --num-queues 2 "$@" 2>"$tmp/vblk.log" &
vblk=$!
for _ in $(seq 100); do [ -S "$tmp/vblk.sock" ] && break; sleep 0.1; done
secs=$((WINDOW + 4))
qemu-system-x86_64 -accel tcg -machine q35 -cpu max -smp 2 -m 512M \
  -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
  -kernel "$TARGET/guest/vmlinuz" -initrd "$TARGET/guest/initramfs.cpio.gz" \
  -append "console=ttyS0 quiet panic=-1 vblk.test=idle vblk.args=secs=$secs" \
  -nodefaults -display none -monitor none -no-reboot -serial "file:$tmp/serial.log" \
  -chardev socket,id=vb0,path="$tmp/vblk.sock" -device vhost-user-blk-pci,chardev=vb0,num-queues=2 &
qemu=$!
for _ in $(seq 600); do grep -q VBLK-IDLE-START "$tmp/serial.log" 2>/dev/null && break; sleep 0.1; done
grep -q VBLK-IDLE-START "$tmp/serial.log" || { echo "guest did not start"; cat "$tmp/serial.log"; exit 1; }
sleep 1
ticks() { awk '{print $14 + $15}' "/proc/$vblk/stat"; }
hz=$(getconf CLK_TCK)
t0=$(ticks); s0=$(date +%s.%N)
sleep "$WINDOW"
t1=$(ticks); s1=$(date +%s.%N)
pct=$(awk -v a="$t0" -v b="$t1" -v hz="$hz" -v s0="$s0" -v s1="$s1" 'BEGIN { printf "%.2f", 100 * (b - a) / hz / (s1 - s0) }')
echo "idle: vblk serve $* used ${pct}% of one CPU over ${WINDOW}s with a guest attached and no I/O (target < 1%)"
