#!/bin/sh
# ext4 on a disk that starts failing. The host runs vblk serve with
# --inject 'write:eio@after=N': mkfs.ext4 and mount need fewer than N writes, then
# files are written with fsync until the disk fails. The guest must see the error
# (a write or fsync failing with EIO, or EROFS once ext4 gave up) and the kernel's
# I/O error report, keep the data it wrote before, and still read the disk.
# vblk.args: after=N (the N of the host's spec, for the log)
. /common.sh

after=$(arg after)
MAX_FILES=300
# write requests completed by the disk so far (field 5 of the block stat)
writes() { awk '{print $5}' /sys/block/vda/stat; }

step "mkfs.ext4"
mkfs.ext4 -q -F /dev/vda || fail "mkfs.ext4 failed: the disk failed too early (raise after=$after)"

step "mount"
mkdir -p /mnt/t
mount -t ext4 /dev/vda /mnt/t || fail "mount failed: the disk failed too early (raise after=$after)"
echo "[$VBLK_TEST] $(writes) write requests after mkfs + mount; writes fail after $after"

step "write files until the disk fails"
i=0
err=
while [ $i -lt $MAX_FILES ]; do
    if ! dd if=/dev/urandom of=/mnt/t/f$i bs=65536 count=2 conv=fsync 2>/tmp/dd.err; then
        err=$(grep -v records /tmp/dd.err | tail -n 1)
        break
    fi
    [ $i -eq 0 ] && sha256sum /mnt/t/f0 > /tmp/f0.sum
    i=$((i + 1))
done
[ -n "$err" ] || fail "$MAX_FILES files written and synced ($(writes) write requests): the disk never failed"
echo "[$VBLK_TEST] file $i failed after $(writes) write requests: $err"
case $err in
    *"Input/output error"*|*"Read-only file system"*) ;;
    *) fail "file $i failed, but not with an I/O error: $err" ;;
esac
[ $i -gt 0 ] || fail "the very first file failed (raise after=$after for a meaningful test)"

step "the kernel reports the I/O error"
dmesg > /tmp/dmesg
grep -E "I/O error|EXT4-fs|JBD2|journal" /tmp/dmesg | tail -n 8
grep -qE "I/O error.* dev vda|Buffer I/O error on dev(ice)? vda" /tmp/dmesg || fail "no I/O error on vda in dmesg"

step "raw writes fail, with EIO"
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 seek=30000 oflag=direct 2>/tmp/dd.err; then
    fail "a raw write to the failing disk succeeded"
fi
grep -q "Input/output error" /tmp/dd.err || fail "raw write failed without EIO: $(cat /tmp/dd.err)"

step "data written before the failure reads back from the disk"
# f0 is clean in the page cache (synced), so dropping caches sends this read to the disk.
# (A raw O_DIRECT read of the first MiBs would fail in the guest kernel itself: it first
# writes back ext4's dirty metadata buffers there, which fails.)
sync || true
echo 3 > /proc/sys/vm/drop_caches
sha256sum -c /tmp/f0.sum >/dev/null || fail "f0, written and synced before the failure, reads back wrong"

step "umount"
umount /mnt/t || echo "[$VBLK_TEST] umount failed (tolerated on a failed disk)"
echo "[$VBLK_TEST] OK"
