#!/usr/bin/env bash
# Installs what the tests need: QEMU 10 (bookworm-backports) with its rbd block driver, a
# Debian kernel, busybox-static, fio, e2fsprogs, util-linux, tmux, and Ceph for the RBD tests
# (scripts/ceph-micro.sh install: ceph-mon, ceph-osd, ceph-common, librbd-dev, libclang for
# bindgen). Idempotent; safe to re-run.
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

need=()
command -v qemu-system-x86_64 >/dev/null && qemu-system-x86_64 --version | grep -q 'version 1[0-9]' || need+=(qemu)
command -v qemu-storage-daemon >/dev/null || need+=(qemu)
[ -e /bin/busybox ] || need+=(busybox-static)
command -v fio >/dev/null || need+=(fio)
ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(kernel)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v blkdiscard >/dev/null || need+=(util-linux)
command -v cpio >/dev/null || need+=(cpio)
command -v dmsetup >/dev/null || need+=(dmsetup)
command -v tmux >/dev/null || need+=(tmux)
command -v setpriv >/dev/null || need+=(util-linux)
compgen -G '/usr/lib/*/qemu/block-rbd.so' >/dev/null || need+=(qemu-block-extra)
command -v ceph-osd >/dev/null && command -v rbd >/dev/null && [ -e /usr/include/rbd/librbd.h ] \
    && compgen -G '/usr/lib/llvm-*/lib/libclang.so' >/dev/null || need+=(ceph)

if [ ${#need[@]} -eq 0 ]; then
    echo "setup: everything already installed"
    exit 0
fi

# bookworm-backports carries QEMU 10; plain bookworm has 7.2.
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$(grep -rhs '^URIs:.*debian$' /etc/apt/sources.list.d/ | head -n1 | awk '{print $2}')
    [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$mirror" \
        | $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports \
    qemu-system-x86 qemu-system-common qemu-utils qemu-block-extra >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends \
    linux-image-amd64 busybox-static fio e2fsprogs util-linux cpio kmod dmsetup tmux >/dev/null
bash "$(dirname "$0")/ceph-micro.sh" install
qemu-system-x86_64 --version | head -n1
