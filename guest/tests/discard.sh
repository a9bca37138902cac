#!/bin/sh
# discard + write-zeroes: write a pattern, blkdiscard a range, blkdiscard -z
# the range, check the range reads as zeros and the rest is unchanged.
. /common.sh

MiB=1048576
X=$((3 * MiB + 4096 * 3))   # start of the range (4k-aligned, not MiB-aligned)
Y=$((5 * MiB + 4096 * 5))   # length of the range
TOTAL=$((12 * MiB))         # pattern area [0, TOTAL)

step "queue limits"
dmax=$(cat /sys/block/vda/queue/discard_max_bytes)
dgran=$(cat /sys/block/vda/queue/discard_granularity)
wzmax=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)
echo "[$VBLK_TEST] discard_max_bytes=$dmax discard_granularity=$dgran write_zeroes_max_bytes=$wzmax"
[ "$dmax" -gt 0 ] || fail "device does not support discard (discard_max_bytes=0)"
[ "$wzmax" -gt 0 ] || fail "device does not support write zeroes (write_zeroes_max_bytes=0)"
disk=$($BLOCKDEV --getsize64 /dev/vda)
[ "$disk" -ge $((TOTAL + 2 * MiB)) ] || fail "disk too small ($disk bytes)"

step "write pattern"
dd if=/dev/urandom of=/tmp/pat bs=$MiB count=$((TOTAL / MiB)) 2>/dev/null
dd if=/tmp/pat of=/dev/vda bs=$MiB oflag=direct conv=fsync 2>/dev/null || fail "writing the pattern failed"
dd if=/dev/vda of=/tmp/rb bs=$MiB count=$((TOTAL / MiB)) iflag=direct 2>/dev/null
cmp /tmp/pat /tmp/rb || fail "pattern read back differs before discard"
rm -f /tmp/rb
# a pattern at the very end of the disk as well
tail_off=$((disk - MiB))
dd if=/dev/urandom of=/tmp/tailpat bs=$MiB count=1 2>/dev/null
dd if=/tmp/tailpat of=/dev/vda bs=$MiB seek=$((tail_off / MiB)) oflag=direct conv=fsync 2>/dev/null

step "blkdiscard -o $X -l $Y"
$BLKDISCARD -v -o $X -l $Y /dev/vda || fail "blkdiscard (discard) failed"

step "blkdiscard -z -o $X -l $Y"
$BLKDISCARD -v -z -o $X -l $Y /dev/vda || fail "blkdiscard -z (write zeroes) failed"

step "blkdiscard -z of the last 512 KiB"
$BLKDISCARD -z -o $((disk - 512 * 1024)) -l $((512 * 1024)) /dev/vda || fail "blkdiscard -z at the end of the disk failed"

step "read back"
drop_caches
dd if=/dev/vda of=/tmp/rb bs=$MiB count=$((TOTAL / MiB)) iflag=direct 2>/dev/null
dd if=/tmp/rb bs=4096 skip=$((X / 4096)) count=$((Y / 4096)) 2>/dev/null | cmp -n $Y - /dev/zero \
    || fail "range [$X, +$Y) is not all zeros after write-zeroes"
cmp -n $X /tmp/pat /tmp/rb || fail "data before the range changed"
rest=$((TOTAL - X - Y))
cmp -n $rest /tmp/pat /tmp/rb $((X + Y)) $((X + Y)) || fail "data after the range changed"
dd if=/dev/vda of=/tmp/tailrb bs=$MiB skip=$((tail_off / MiB)) count=1 iflag=direct 2>/dev/null
cmp -n $((512 * 1024)) /tmp/tailpat /tmp/tailrb || fail "data before the zeroed tail changed"
cmp -n $((512 * 1024)) /dev/zero /tmp/tailrb 0 $((512 * 1024)) || fail "last 512 KiB not zero"

step "discard the whole disk"
$BLKDISCARD /dev/vda || fail "whole-disk blkdiscard failed"
echo "[$VBLK_TEST] OK"
