#!/bin/sh
# The packed virtqueue from the guest's side, in one boot: check that virtio_blk really
# negotiated VIRTIO_F_RING_PACKED (bit 34 of the device's feature string), then run
# discard + write-zeroes, fio verify (on every hardware queue) and ext4 + e2fsck.
# vblk.args: queues=N (required), ring=packed|split (which ring must be in use,
#            default packed), size=<fio region per job, MiB>
. /common.sh

want=$(arg ring packed)
step "negotiated ring"
dev=$(readlink -f /sys/block/vda/device)
features=$(cat "$dev/features")
echo "[$VBLK_TEST] $dev features: $features"
bit=$(echo "$features" | cut -c35)
case "$want:$bit" in
    packed:1 | split:0) echo "[$VBLK_TEST] ring in use: $want" ;;
    *) fail "expected the $want ring, feature bit 34 is '$bit'" ;;
esac

step "discard + write zeroes"
sh /tests/discard.sh || fail "discard: $(cat "$VBLK_REASON_FILE" 2>/dev/null)"
step "fio verify"
sh /tests/fio-verify.sh || fail "fio verify: $(cat "$VBLK_REASON_FILE" 2>/dev/null)"
step "ext4"
sh /tests/ext4.sh || fail "ext4: $(cat "$VBLK_REASON_FILE" 2>/dev/null)"
echo "[$VBLK_TEST] OK"
