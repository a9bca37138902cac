#!/bin/sh
# Idle guest for the performance benchmark's idle case: touch the disk once, print a
# marker, then do no I/O for vblk.args secs=N seconds (default 10).
. /common.sh

secs=$(arg secs 10)
step "one read"
dd if=/dev/vda of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null || fail "read failed"
echo "VBLK-IDLE-START"
sleep "$secs"
echo "VBLK-IDLE-END"
