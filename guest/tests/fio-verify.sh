#!/bin/sh
# fio random writes with crc32c verification from several jobs, each on its
# own region of /dev/vda and pinned to its own CPU, then a verify-only pass
# after dropping the caches. Checks the number of hardware queues and that
# every queue completed requests (per-virtqueue MSI-X interrupt counts).
# vblk.args: queues=N (required), jobs=4, size=<per-job region, MiB>=128,
#            iodepth=16, engine=io_uring|libaio (default io_uring; falls back
#            to libaio if io_uring does not work)
. /common.sh

queues=$(arg queues)
jobs=$(arg jobs 4)
size=$(arg size 128)
iodepth=$(arg iodepth 16)
engine=$(arg engine io_uring)
ncpu=$(nproc)

step "check hardware queue count"
nq=$(ls /sys/block/vda/mq | wc -l)
echo "[$VBLK_TEST] /sys/block/vda/mq: $(ls /sys/block/vda/mq | sort -n | tr '\n' ' ')($nq queues, expected $queues, $ncpu cpus)"
for q in $(ls /sys/block/vda/mq | sort -n); do
    echo "[$VBLK_TEST]   hw queue $q <- cpus $(cat /sys/block/vda/mq/$q/cpu_list)"
done
[ "$nq" -eq "$queues" ] || fail "guest sees $nq hardware queues, expected $queues"
disk=$($BLOCKDEV --getsize64 /dev/vda)
[ "$disk" -ge $((jobs * size * 1048576)) ] || fail "disk ($disk bytes) smaller than $jobs x ${size}MiB"

step "probe fio engine $engine"
if ! fio --name=probe --filename=/dev/vda --ioengine="$engine" --direct=1 --rw=read \
        --bs=4k --size=64k --output=/tmp/probe.out >/dev/null 2>&1; then
    echo "[$VBLK_TEST] ioengine $engine unusable, falling back to libaio:"; cat /tmp/probe.out || true
    engine=libaio
fi
echo "[$VBLK_TEST] ioengine=$engine jobs=$jobs region=${size}MiB/job iodepth=$iodepth"

# One job section per region; job i is pinned to cpu i % ncpu so that all
# hardware queues get traffic.
{
    echo "[global]"
    echo "filename=/dev/vda"
    echo "ioengine=$engine"
    echo "direct=1"
    echo "iodepth=$iodepth"
    echo "rw=randwrite"
    echo "bssplit=4k/40:8k/15:16k/15:32k/15:64k/15"
    echo "size=${size}M"
    echo "verify=crc32c"
    echo "verify_fatal=1"
    echo "verify_dump=1"
    echo "randrepeat=1"
    echo "thread"
    echo "group_reporting"
    i=0
    while [ $i -lt "$jobs" ]; do
        echo "[region$i]"
        echo "offset=$((i * size))M"
        echo "cpus_allowed=$((i % ncpu))"
        i=$((i + 1))
    done
} > /tmp/verify.fio
cat /tmp/verify.fio

irq_before=$(queue_irqs)
step "fio write+verify pass"
fio --eta=never --do_verify=1 /tmp/verify.fio || fail "fio write+verify pass failed"

step "drop caches"
drop_caches

step "fio verify-only pass"
fio --eta=never --verify_only /tmp/verify.fio || fail "fio verify-only pass failed"

step "hardware queue usage"
irq_after=$(queue_irqs)
echo "[$VBLK_TEST] completion interrupts per virtqueue during fio:"
used=0
for q in $(ls /sys/block/vda/mq | sort -n); do
    b=$(echo "$irq_before" | awk -v q=$q '$1 == q {print $2}')
    a=$(echo "$irq_after" | awk -v q=$q '$1 == q {print $2}')
    if [ -z "$a" ]; then
        echo "[$VBLK_TEST]   queue $q: no per-queue interrupt line in /proc/interrupts"
        continue
    fi
    d=$((a - ${b:-0}))
    echo "[$VBLK_TEST]   queue $q: $d"
    [ "$d" -gt 0 ] && used=$((used + 1))
done
if [ -n "$irq_after" ] && [ "$ncpu" -ge "$queues" ] && [ "$jobs" -ge "$queues" ]; then
    [ "$used" -eq "$queues" ] || fail "only $used of $queues hardware queues completed requests"
fi
echo "[$VBLK_TEST] OK"
