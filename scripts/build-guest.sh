#!/usr/bin/env bash
# Builds the minimal test guest used by the real-guest integration tests:
#   OUTDIR/vmlinuz            Debian kernel (copied from /boot)
#   OUTDIR/initramfs.cpio.gz  busybox + virtio/ext4 modules + fio, e2fsprogs,
#                             util-linux tools (with their shared libraries)
#                             + guest/init, guest/common.sh, guest/tests/*.sh
# Usage: scripts/build-guest.sh [OUTDIR]     (default: target/guest)
# Env:   KVER=<version> selects the kernel (default: newest /boot/vmlinuz-*
#        that has a /lib/modules tree); FORCE=1 rebuilds unconditionally.
# Idempotent: nothing is rebuilt when the outputs are newer than every input.
set -euo pipefail

export PATH="$PATH:/usr/sbin:/sbin"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTDIR=${1:-"$ROOT/target/guest"}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)

die() { echo "build-guest: $*" >&2; exit 1; }

# --- kernel -----------------------------------------------------------------
if [ -z "${KVER:-}" ]; then
    for k in $(ls /boot/vmlinuz-* 2>/dev/null | sort -V -r); do
        v=${k#/boot/vmlinuz-}
        if [ -d "/lib/modules/$v" ]; then KVER=$v; break; fi
    done
fi
[ -n "${KVER:-}" ] || die "no /boot/vmlinuz-* with matching /lib/modules (run scripts/setup.sh)"
VMLINUZ=/boot/vmlinuz-$KVER
MODDIR=/lib/modules/$KVER
[ -r "$VMLINUZ" ] || die "$VMLINUZ not readable"
[ -d "$MODDIR" ] || die "$MODDIR missing"

MODULES=(virtio_pci virtio_blk ext4 crc32c_generic)
BINS=(fio mkfs.ext4 e2fsck blkdiscard blockdev)
# optional: used by readonly.sh to push writes past the guest kernel's
# read-only check (dm-linear on top of the read-only disk)
OPT_MODULES=(dm_mod)
OPT_BINS=(dmsetup)
for b in "${OPT_BINS[@]}"; do
    if command -v "$b" >/dev/null; then BINS+=("$b")
    else echo "build-guest: note: $b not installed, leaving it out" >&2; fi
done
for m in "${OPT_MODULES[@]}"; do
    modprobe -S "$KVER" --show-depends "$m" >/dev/null 2>&1 && MODULES+=("$m")
done
BUSYBOX=$(command -v busybox || true)
[ -n "$BUSYBOX" ] || BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "busybox not found (apt-get install busybox-static)"

bin_paths=()
for b in "${BINS[@]}"; do
    p=$(command -v "$b" || true)
    [ -n "$p" ] || die "$b not found (run scripts/setup.sh)"
    bin_paths+=("$(readlink -f "$p")")
done

# --- cache check ----------------------------------------------------------------
INITRD=$OUTDIR/initramfs.cpio.gz
KOUT=$OUTDIR/vmlinuz
STAMP=$OUTDIR/.kver
inputs=("${BASH_SOURCE[0]}" "$ROOT/guest/init" "$ROOT/guest/common.sh" "$ROOT/guest/tests" "$ROOT"/guest/tests/*.sh
        "$VMLINUZ" "$MODDIR/modules.dep" "$BUSYBOX" "${bin_paths[@]}")
uptodate=1
if [ "${FORCE:-0}" = 1 ] || [ ! -f "$INITRD" ] || [ ! -f "$KOUT" ] \
    || [ "$(cat "$STAMP" 2>/dev/null)" != "$KVER" ]; then
    uptodate=0
else
    for f in "${inputs[@]}"; do
        if [ "$f" -nt "$INITRD" ] || [ "$f" -nt "$KOUT" ]; then uptodate=0; break; fi
    done
fi
if [ $uptodate = 1 ]; then
    echo "build-guest: up to date ($KVER)" >&2
    echo "$KOUT"
    echo "$INITRD"
    exit 0
fi

# --- staging tree -------------------------------------------------------------
STAGE=$(mktemp -d "$OUTDIR/.stage.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
R=$STAGE/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,usr/lib,lib/modules,lib64,etc,proc,sys,dev,tmp,mnt,run,root,tests,var}

# busybox + applet symlinks (all in /bin; real tools live in /usr/sbin and win via PATH)
cp "$BUSYBOX" "$R/bin/busybox"
for a in $("$BUSYBOX" --list); do
    [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"
done

# copy a file to the same absolute path inside the tree (following symlinks,
# but also recreating the symlink name)
copy_abs() {
    local src=$1 real
    real=$(readlink -f "$src")
    if [ ! -e "$R$real" ]; then
        mkdir -p "$R$(dirname "$real")"
        cp "$real" "$R$real"
    fi
    if [ "$src" != "$real" ] && [ ! -e "$R$src" ]; then
        mkdir -p "$R$(dirname "$src")"
        ln -s "$real" "$R$src"
    fi
}

# ELF binaries + shared libraries (ldd resolves the whole closure); busybox
# is normally static (busybox-static) and then has none.
declare -A seen=()
copy_libs() {
    local lib
    while read -r lib; do
        [ -n "$lib" ] || continue
        [ -n "${seen[$lib]:-}" ] && continue
        seen[$lib]=1
        copy_abs "$lib"
    done < <(ldd "$1" 2>/dev/null | awk '/=> \//{print $3} /^\t\/[^ ]*ld-linux/{print $1}')
}
copy_libs "$BUSYBOX"
for i in "${!BINS[@]}"; do
    b=${BINS[$i]} p=${bin_paths[$i]}
    case $b in fio) dst=/usr/bin/$b ;; *) dst=/usr/sbin/$b ;; esac
    cp "$p" "$R$dst"
    copy_libs "$p"
done
# the loader must be reachable under the path baked into the binaries
[ -e "$R/lib64/ld-linux-x86-64.so.2" ] || copy_abs /lib64/ld-linux-x86-64.so.2
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$R/etc/"
ln -s /proc/self/mounts "$R/etc/mtab"
echo 'root:x:0:0:root:/root:/bin/sh' > "$R/etc/passwd"
echo 'root:x:0:' > "$R/etc/group"

# kernel modules, in load order (deps first), decompressed for busybox insmod
: > "$R/etc/modules.order"
for m in "${MODULES[@]}"; do
    deps=$(modprobe -S "$KVER" --show-depends "$m") || die "modprobe --show-depends $m failed"
    while read -r kw path _; do
        [ "$kw" = insmod ] || continue
        name=$(basename "$path")
        case $name in
            *.ko.xz)  out=${name%.xz};  xz -dc "$path" > "$R/lib/modules/$out" ;;
            *.ko.zst) out=${name%.zst}; zstd -qdc "$path" > "$R/lib/modules/$out" ;;
            *.ko.gz)  out=${name%.gz};  gzip -dc "$path" > "$R/lib/modules/$out" ;;
            *.ko)     out=$name;        cp "$path" "$R/lib/modules/$out" ;;
            *) continue ;;
        esac
        grep -qx "$out" "$R/etc/modules.order" || echo "$out" >> "$R/etc/modules.order"
    done <<< "$deps"
done
grep -q '^virtio_blk.ko$' "$R/etc/modules.order" || die "virtio_blk module not found"

# init + tests
install -m 0755 "$ROOT/guest/init" "$R/init"
install -m 0644 "$ROOT/guest/common.sh" "$R/common.sh"
for t in "$ROOT"/guest/tests/*.sh; do install -m 0755 "$t" "$R/tests/"; done

# --- pack ---------------------------------------------------------------------
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) \
    | gzip -1 > "$STAGE/initramfs.cpio.gz"
cp "$VMLINUZ" "$STAGE/vmlinuz"
mv -f "$STAGE/vmlinuz" "$KOUT"
mv -f "$STAGE/initramfs.cpio.gz" "$INITRD"
echo "$KVER" > "$STAMP"
echo "build-guest: built guest for $KVER ($(du -h "$INITRD" | cut -f1) initramfs)" >&2
echo "$KOUT"
echo "$INITRD"
