#!/bin/sh
# Read-only export: ro flag set, reads work and match the host's checksum,
# every write attempt fails.
# vblk.args: sha=<sha256 of the first 512-byte sector, computed on the host>
# The host additionally checks that the image is unchanged afterwards.
. /common.sh

want=$(arg sha)

step "ro flag"
ro=$(cat /sys/block/vda/ro)
[ "$ro" = 1 ] || fail "/sys/block/vda/ro is $ro, expected 1"
$BLOCKDEV --getro /dev/vda

step "read"
dd if=/dev/vda of=/dev/null bs=1M count=8 iflag=direct 2>/dev/null || fail "reading the device failed"
got=$(sector0_sha /dev/vda)
echo "[$VBLK_TEST] sector 0 sha256 $got (expected $want)"
[ "$got" = "$want" ] || fail "sector 0 checksum $got != expected $want"

try_write() {
    # $1 = label; returns 0 if the write SUCCEEDED (bad)
    if dd if=/dev/urandom of=/dev/vda bs=4096 count=1 seek=1 oflag=direct conv=notrunc,fsync 2>/tmp/werr; then
        echo "[$VBLK_TEST] $1: write unexpectedly succeeded"
        return 0
    fi
    echo "[$VBLK_TEST] $1: write refused as expected: $(cat /tmp/werr)"
    return 1
}

step "direct write"
if try_write "plain"; then fail "write to the read-only device succeeded"; fi

step "blockdev --setrw + write"
$BLOCKDEV --setrw /dev/vda 2>&1 || echo "[$VBLK_TEST] blockdev --setrw failed (ok)"
echo "[$VBLK_TEST] after --setrw: ro=$(cat /sys/block/vda/ro) getro=$($BLOCKDEV --getro /dev/vda)"
if try_write "after --setrw"; then fail "write succeeded after blockdev --setrw"; fi

# The guest kernel refuses writes to a read-only disk itself (EPERM above),
# so the device never sees them. A dm-linear mapping on top of /dev/vda is
# writable and its bios reach virtio-blk (the kernel only warns "Trying to
# write to read-only block-device"): now the *device* must fail the write.
if command -v dmsetup >/dev/null 2>&1 && [ -e /dev/mapper/control ]; then
    step "write through dm-linear: must fail at the device"
    sectors=$(cat /sys/block/vda/size)
    dmsetup create --noudevsync --noudevrules vblkrw --table "0 $sectors linear /dev/vda 0" \
        || fail "dmsetup create failed"
    dmsetup mknodes vblkrw >/dev/null 2>&1 || true
    dm=/dev/mapper/vblkrw
    [ -b $dm ] || dm=/dev/$(ls /sys/block/vda/holders | head -n1)
    echo "[$VBLK_TEST] dm device $dm ro=$($BLOCKDEV --getro $dm)"
    if dd if=/dev/urandom of=$dm bs=4096 count=1 seek=1 oflag=direct conv=notrunc 2>/tmp/werr; then
        dmesg | tail -n 5
        fail "write through dm-linear to the read-only device succeeded (device accepted a write)"
    fi
    echo "[$VBLK_TEST] dm-linear write failed as expected: $(cat /tmp/werr | head -n1)"
    grep -qi 'input/output error' /tmp/werr || fail "dm-linear write failed, but not with EIO: $(cat /tmp/werr | head -n1)"
    if $BLKDISCARD -o 0 -l 65536 $dm 2>/tmp/werr; then fail "discard through dm-linear to the read-only device succeeded"; fi
    echo "[$VBLK_TEST] dm-linear discard failed as expected: $(head -n1 /tmp/werr)"
    if $BLKDISCARD -z -o 0 -l 65536 $dm 2>/tmp/werr; then fail "write-zeroes through dm-linear to the read-only device succeeded"; fi
    echo "[$VBLK_TEST] dm-linear write-zeroes failed as expected: $(head -n1 /tmp/werr)"
    dmesg | grep -i -E 'vda|read-only' | tail -n 6 || true
    dmsetup remove --noudevsync vblkrw || true
else
    echo "[$VBLK_TEST] dmsetup not in the guest: device-level write rejection not tested"
fi

step "discard"
if $BLKDISCARD -o 0 -l 65536 /dev/vda 2>/tmp/werr; then fail "discard on the read-only device succeeded"; fi
echo "[$VBLK_TEST] discard refused as expected: $(cat /tmp/werr)"

step "checksum unchanged"
drop_caches
got=$(sector0_sha /dev/vda)
[ "$got" = "$want" ] || fail "sector 0 changed: $got"
dd if=/dev/vda bs=4096 skip=1 count=1 iflag=direct 2>/dev/null | sha256sum
echo "[$VBLK_TEST] OK"
