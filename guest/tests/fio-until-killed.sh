#!/bin/sh
# Writes the smoke pattern '<tag>' at 1 MiB and flushes it (fsync on the disk: a
# VIRTIO_BLK_T_FLUSH the device acknowledges), prints FLUSHED, then runs fio random
# writes (with periodic fsyncs) beyond 8 MiB until the host kills QEMU, printing
# FIO-RUNNING first. Never reports a result of its own when killed as intended.
# vblk.args: tag=<pattern tag>, jobs=2
. /common.sh

tag=$(arg tag)
jobs=$(arg jobs 2)
MiB=1048576

step "write pattern '$tag' and flush"
yes "vblk-smoke-pattern-$tag" | head -c $MiB > /tmp/pat
dd if=/tmp/pat of=/dev/vda bs=$MiB seek=1 oflag=direct conv=notrunc,fsync 2>/dev/null || fail "write failed"
echo "[$VBLK_TEST] FLUSHED"

step "fio until killed"
echo "[$VBLK_TEST] FIO-RUNNING"
fio --name=load --filename=/dev/vda --ioengine=libaio --direct=1 --iodepth=16 --numjobs="$jobs" \
    --rw=randwrite --bssplit=4k/50:64k/50 --offset=8M --size=48M --fsync=64 \
    --time_based --runtime=600 --eta=never --group_reporting || fail "fio failed"
fail "fio ran to the end: the host did not kill the guest"
