#!/bin/sh
# Online resize, driven from the host (`vblk ctl resize` while this runs): the disk's size
# changes under the running guest without a reboot, and the guest uses the new space.
# vblk.args: from=<sectors at boot>, to=<sectors after the host grows it>,
#            [then=<sectors after the host shrinks it again>], [timeout=<s per change, 120>],
#            [unbound=<s>: unbind the disk's driver (the device stops) and bind it again
#             after that many seconds, in which the host grows it]
#            from=to: the host resized the disk before this kernel's driver started
# Console markers for the host: "[resize] READY" (waiting for the grow; with unbound=, the
# driver is unbound then), "[resize] REBINDING" (unbound=: the pause is over), "[resize]
# GROWN" (the new end was written; waiting for the shrink, with then=).
. /common.sh

from=$(arg from)
unbound=$(arg unbound none)
to=$(arg to)
then=$(arg then none)
timeout=$(arg timeout 120)
MiB=1048576

size() { cat /sys/block/vda/size 2>/dev/null; }

# wait_size N: until /sys/block/vda/size is N (the config interrupt reached the driver).
wait_size() {
    i=0
    while [ "$(size)" != "$1" ]; do
        i=$((i + 1))
        [ $i -le $((timeout * 10)) ] || fail "the disk still has $(size) sectors after ${timeout}s (expected $1)"
        sleep 0.1
    done
    echo "[$VBLK_TEST] /dev/vda: $(size) sectors ($($BLOCKDEV --getsize64 /dev/vda) bytes)"
    dmesg | grep -i 'capacity change' | tail -n 1
    write_back
}

# The cache mode is still write-back (the device's default): QEMU copies the whole config
# space on a config change, and a wrong writeback byte there would make the guest stop
# sending FLUSH to a write-back device.
write_back() {
    mode=$(cat /sys/block/vda/queue/write_cache)
    [ "$mode" = "write back" ] || fail "the disk's cache mode is '$mode', not write back"
}

pattern() { yes "vblk-resize-$1" | head -c $MiB; }

step "the disk has $from sectors at boot"
[ "$(size)" = "$from" ] || fail "the disk has $(size) sectors at boot, not $from"
write_back
# The last MiB before the old end, to find it again after the resize.
pattern old > /tmp/old
dd if=/tmp/old of=/dev/vda bs=$MiB seek=$((from * 512 / MiB - 1)) oflag=direct conv=notrunc,fsync 2>/dev/null \
    || fail "writing the last MiB before the resize failed"

if [ "$unbound" != none ]; then
    # Without a driver the device is stopped (QEMU stops its vhost device), and QEMU
    # ignores a config change then: it must learn of the resize when the device starts.
    dev=$(basename "$(readlink -f /sys/block/vda/device)")
    step "unbind $dev from virtio_blk for ${unbound}s"
    echo "$dev" > /sys/bus/virtio/drivers/virtio_blk/unbind || fail "cannot unbind $dev"
    [ ! -e /sys/block/vda ] || fail "/dev/vda is still there after unbinding"
    echo "[$VBLK_TEST] READY"
    sleep "$unbound"
    echo "[$VBLK_TEST] REBINDING"
    echo "$dev" > /sys/bus/virtio/drivers/virtio_blk/bind || fail "cannot bind $dev again"
else
    echo "[$VBLK_TEST] READY"
fi
step "wait for the disk to grow to $to sectors"
wait_size "$to"

step "write the last MiB of the grown disk"
pattern new > /tmp/new
last=$((to * 512 / MiB - 1))
dd if=/tmp/new of=/dev/vda bs=$MiB seek=$last oflag=direct conv=notrunc,fsync 2>/dev/null \
    || fail "writing at the new end failed"
if [ "$from" != "$to" ]; then
    step "write a MiB across the old end"
    pattern across > /tmp/across
    dd if=/tmp/across of=/dev/vda bs=4096 seek=$(((from * 512 - MiB / 2) / 4096)) oflag=direct conv=notrunc,fsync \
        2>/dev/null || fail "writing across the old end failed"
fi

step "read back"
drop_caches
dd if=/dev/vda of=/tmp/rb bs=$MiB skip=$last count=1 iflag=direct 2>/dev/null || fail "reading the new end failed"
cmp /tmp/new /tmp/rb || fail "the new end reads back wrong"
if [ "$from" != "$to" ]; then
    dd if=/dev/vda of=/tmp/rb bs=4096 skip=$(((from * 512 - MiB / 2) / 4096)) count=256 iflag=direct 2>/dev/null \
        || fail "reading across the old end failed"
    cmp /tmp/across /tmp/rb || fail "the MiB across the old end reads back wrong"
    dd if=/dev/vda of=/tmp/rb bs=$MiB skip=$((from * 512 / MiB - 1)) count=1 iflag=direct 2>/dev/null
    head -c $((MiB / 2)) /tmp/old > /tmp/old-half
    head -c $((MiB / 2)) /tmp/rb | cmp /tmp/old-half - || fail "the data before the old end changed"
fi
echo "[$VBLK_TEST] GROWN"

if [ "$then" != none ]; then
    step "wait for the disk to shrink to $then sectors"
    wait_size "$then"
    step "past the new end is refused, before it works"
    if dd if=/dev/vda of=/tmp/rb bs=4096 skip=$((then * 512 / 4096)) count=1 iflag=direct 2>/dev/null \
        && [ -s /tmp/rb ]; then
        fail "a read past the shrunk end returned data"
    fi
    dd if=/tmp/new of=/dev/vda bs=$MiB seek=$((then * 512 / MiB - 1)) oflag=direct conv=notrunc,fsync 2>/dev/null \
        || fail "writing the last MiB of the shrunk disk failed"
    drop_caches
    dd if=/dev/vda of=/tmp/rb bs=$MiB skip=$((then * 512 / MiB - 1)) count=1 iflag=direct 2>/dev/null
    cmp /tmp/new /tmp/rb || fail "the last MiB of the shrunk disk reads back wrong"
fi
echo "[$VBLK_TEST] OK"
