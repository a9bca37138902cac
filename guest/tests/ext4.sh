#!/bin/sh
# mkfs.ext4 on /dev/vda, write files, checksum, umount, fsck, remount, verify.
. /common.sh

step "mkfs.ext4"
mkfs.ext4 -q -F /dev/vda || fail "mkfs.ext4 failed"

step "mount"
mkdir -p /mnt/t
mount -t ext4 /dev/vda /mnt/t || fail "mount failed"

step "write files"
i=0
for sz in 0 1 511 4096 4097 65536 100000 1048576 3145728 4194303; do
    head -c $sz /dev/urandom > /mnt/t/f$i || fail "writing f$i ($sz bytes) failed"
    i=$((i + 1))
done
for d in 0 1 2 3; do
    for e in 0 1 2 3 4; do
        mkdir -p /mnt/t/tree/d$d/e$e
        for f in 0 1 2; do
            dd if=/dev/urandom of=/mnt/t/tree/d$d/e$e/file$f bs=$((1000 + d * 777 + e * 31 + f)) count=1 2>/dev/null
        done
    done
done
ln -s ../f3 /mnt/t/tree/link
# a larger file written in several appends
for n in 1 2 3 4; do head -c 524288 /dev/urandom >> /mnt/t/appended; done

step "checksum"
(cd /mnt/t && find . -type f | sort | xargs sha256sum) > /tmp/sums
echo "[$VBLK_TEST] $(wc -l < /tmp/sums) files, $(du -sk /mnt/t | cut -f1) KiB"
sync

step "umount"
umount /mnt/t || fail "umount failed"

step "e2fsck -fn"
e2fsck -fn /dev/vda || fail "e2fsck -fn reported problems (exit $?)"

step "drop caches + remount"
drop_caches
mount -t ext4 /dev/vda /mnt/t || fail "second mount failed"

step "verify checksums"
(cd /mnt/t && sha256sum -c /tmp/sums > /tmp/check.out 2>&1) || {
    grep -v ': OK$' /tmp/check.out || true
    fail "checksums differ after remount"
}
[ "$(readlink /mnt/t/tree/link)" = ../f3 ] || fail "symlink lost"
umount /mnt/t
echo "[$VBLK_TEST] OK"
