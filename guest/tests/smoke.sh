#!/bin/sh
# Read the first MiB; write a pattern at offset 1 MiB and read it back.
# vblk.args: tag=<pattern tag> (default "a"),
#            prev=<tag> (optional: first check that the region holds the
#                        pattern written by an earlier guest with that tag)
. /common.sh

tag=$(arg tag a)
prev=$(arg prev none)
MiB=1048576

pattern() { yes "vblk-smoke-pattern-$1" | head -c $MiB; }

step "read first MiB"
dd if=/dev/vda of=/dev/null bs=$MiB count=1 iflag=direct 2>/dev/null || fail "reading the first MiB failed"

if [ "$prev" != none ]; then
    step "check pattern '$prev' from the previous guest"
    pattern "$prev" > /tmp/prev
    dd if=/dev/vda of=/tmp/rb bs=$MiB skip=1 count=1 iflag=direct 2>/dev/null
    cmp /tmp/prev /tmp/rb || fail "data written by the previous guest (tag $prev) is not there"
fi

step "write pattern '$tag'"
pattern "$tag" > /tmp/pat
dd if=/tmp/pat of=/dev/vda bs=$MiB seek=1 oflag=direct conv=notrunc,fsync 2>/dev/null || fail "write failed"

step "read back"
drop_caches
dd if=/dev/vda of=/tmp/rb bs=$MiB skip=1 count=1 iflag=direct 2>/dev/null || fail "read back failed"
cmp /tmp/pat /tmp/rb || fail "pattern read back differs"
echo "[$VBLK_TEST] OK"
