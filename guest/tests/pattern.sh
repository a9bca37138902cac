#!/bin/sh
# Data the host can check after the guest is gone: write a deterministic pattern into a file on
# the ext4 file system that /dev/vda holds (e.g. the one ext4.sh leaves), with dd, O_DIRECT and
# fsync; umount, e2fsck, drop the caches, remount and compare. The host then reads the image
# itself (e.g. `rbd export`), checks it with `e2fsck -fn` and dumps the file (`debugfs`) to
# compare it with the same pattern. Line i (0-based) of the pattern is 32 bytes,
#   printf 'vblk-pattern %-8.8s %09d\n' TAG i
# so every 32 bytes of the file differ and a block written at the wrong place is caught.
# vblk.args: tag=TAG (letters and digits, at most 8; default "a"), mib=N (file size in MiB,
#            default 8), file=NAME (default "pattern"),
#            run=a+b+...: run /tests/a.sh, /tests/b.sh, ... first, with the same vblk.args
#            (several checks in one boot, e.g. run=discard+fio-verify+ext4)
. /common.sh

tag=$(arg tag a)
mib=$(arg mib 8)
file=$(arg file pattern)
run=$(arg run none)

if [ "$run" != none ]; then
    for t in $(echo "$run" | tr '+' ' '); do
        [ -f "/tests/$t.sh" ] || fail "run=: no test /tests/$t.sh"
        step "$t"
        sh "/tests/$t.sh" || fail "$t: $(cat "$VBLK_REASON_FILE" 2>/dev/null)"
    done
fi

step "generate the pattern (tag $tag, $mib MiB)"
lines=$((mib * 1048576 / 32))
awk -v tag="$tag" -v n=$lines 'BEGIN { for (i = 0; i < n; i++) printf "vblk-pattern %-8.8s %09d\n", tag, i }' \
    > /tmp/pattern
[ "$(wc -c < /tmp/pattern)" -eq $((mib * 1048576)) ] || fail "pattern has $(wc -c < /tmp/pattern) bytes"
sha=$(sha256sum /tmp/pattern | cut -d' ' -f1)
echo "[$VBLK_TEST] pattern sha256 $sha"

step "mount the ext4 file system on /dev/vda"
mkdir -p /mnt/t
mount -t ext4 /dev/vda /mnt/t || fail "mount failed (no ext4 on /dev/vda? run=...+ext4 makes one)"

step "write /$file (O_DIRECT, fsync)"
dd if=/tmp/pattern of="/mnt/t/$file" bs=1048576 oflag=direct conv=fsync 2>/dev/null \
    || fail "writing /$file failed"
umount /mnt/t || fail "umount failed"

step "e2fsck -fn"
e2fsck -fn /dev/vda || fail "e2fsck -fn reported problems (exit $?)"

step "drop caches + remount + compare"
drop_caches
mount -t ext4 -o ro /dev/vda /mnt/t || fail "read-only remount failed"
dd if="/mnt/t/$file" of=/tmp/readback bs=1048576 iflag=direct 2>/dev/null || fail "reading /$file back failed"
umount /mnt/t
cmp /tmp/pattern /tmp/readback || fail "/$file read back differs from the pattern"
echo "[$VBLK_TEST] OK"
