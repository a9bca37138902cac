#!/bin/sh
# fio jobs for bench/guest.py (the backend's CPU and system calls per guest I/O). For each job:
# print "VBLK-FIO-START <rw>", wait `settle` s (the host snapshots the backend's CPU time and
# attaches perf meanwhile), run fio on /dev/vda, print
# "VBLK-FIO-END <rw> ios=N reads=R writes=W fio_iops=I runtime_ms=T engine=E" (ios: requests the
# disk completed over the job, from /sys/block/vda/stat; fio_iops: fio's own figure), wait
# `settle` s again (the host reads its counters before the next job starts).
# vblk.args: jobs=randread:randwrite (colon-separated fio rw modes), bs=4k, iodepth=32,
#            secs=10, settle=2, numjobs=1, engine=io_uring (falls back to libaio)
. /common.sh

jobs=$(arg jobs randread)
bs=$(arg bs 4k)
iodepth=$(arg iodepth 32)
secs=$(arg secs 10)
settle=$(arg settle 2)
numjobs=$(arg numjobs 1)
engine=$(arg engine io_uring)

step "probe fio engine $engine"
if ! fio --name=probe --filename=/dev/vda --ioengine="$engine" --direct=1 --rw=read \
        --bs=4k --size=64k --output=/tmp/probe.out >/dev/null 2>&1; then
    echo "[$VBLK_TEST] ioengine $engine unusable, falling back to libaio:"; cat /tmp/probe.out || true
    engine=libaio
fi
echo "[$VBLK_TEST] $(nproc) cpus, $(ls /sys/block/vda/mq | wc -l) hw queues, engine=$engine bs=$bs iodepth=$iodepth numjobs=$numjobs secs=$secs"

# completed reads and writes of /dev/vda
disk_ios() {
    awk '{ print $1, $5 }' /sys/block/vda/stat
}

for rw in $(echo "$jobs" | tr ':' ' '); do
    case $rw in
        read|write|randread|randwrite|rw|randrw) ;;
        *) fail "bad fio rw mode '$rw'" ;;
    esac
    step "fio $rw"
    set -- $(disk_ios); r0=$1; w0=$2
    echo "VBLK-FIO-START $rw"
    sleep "$settle"
    fio --name="$rw" --filename=/dev/vda --ioengine="$engine" --direct=1 --rw="$rw" --bs="$bs" \
        --iodepth="$iodepth" --numjobs="$numjobs" --group_reporting --time_based --runtime="$secs" \
        --norandommap --randrepeat=0 --minimal > /tmp/fio.out 2>/tmp/fio.err \
        || { cat /tmp/fio.err; fail "fio $rw failed"; }
    set -- $(disk_ios); r1=$1; w1=$2
    # terse v3: field 8 read IOPS, 9 read runtime (ms), 49 write IOPS, 50 write runtime
    line=$(grep ';' /tmp/fio.out | tail -n 1)
    riops=$(echo "$line" | cut -d';' -f8); rms=$(echo "$line" | cut -d';' -f9)
    wiops=$(echo "$line" | cut -d';' -f49); wms=$(echo "$line" | cut -d';' -f50)
    iops=$((riops + wiops)); ms=$rms; [ "$wms" -gt "$ms" ] && ms=$wms
    echo "VBLK-FIO-END $rw ios=$((r1 - r0 + w1 - w0)) reads=$((r1 - r0)) writes=$((w1 - w0)) fio_iops=$iops runtime_ms=$ms engine=$engine"
    sleep "$settle"
done
echo "[$VBLK_TEST] OK"
