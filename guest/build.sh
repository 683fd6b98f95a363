#!/usr/bin/env bash
# Build the memcheck guest: Debian kernel image + initramfs (busybox + memcheck).
#   guest/build.sh [OUTDIR]        (default: target/guest at the repo root)
# Idempotent: only redoes what is missing or older than its inputs.
#   GUEST_KERNEL_PKG=linux-image-X-amd64   pin the kernel package (default:
#                                          what linux-image-amd64 depends on)
#   GUEST_REFETCH_KERNEL=1                 fetch the kernel again
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
OUT=${1:-$ROOT/target/guest}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

log() { printf 'guest/build.sh: %s\n' "$*" >&2; }
trap 'log "FAILED at line $LINENO: $BASH_COMMAND"' ERR

# --- host tools -------------------------------------------------------------
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
missing=()
for p in busybox-static cpio gzip xz-utils gcc libc6-dev; do
    installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${missing[@]}" >&2 ||
        { apt-get update >&2 && apt-get install -y --no-install-recommends "${missing[@]}" >&2; }
fi
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || { log "no $BUSYBOX after installing busybox-static"; exit 1; }

# --- kernel -------------------------------------------------------------------
# apt-get download the real image package (no install), keep only boot/.
if [ ! -s "$OUT/vmlinuz" ] || [ ! -s "$OUT/kernel.txt" ] || [ "${GUEST_REFETCH_KERNEL:-0}" = 1 ]; then
    pkg=${GUEST_KERNEL_PKG:-}
    if [ -z "$pkg" ]; then
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
              awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
    fi
    [ -n "$pkg" ] || { log "cannot resolve the package behind linux-image-amd64 (apt-get update?)"; exit 1; }
    dl="$OUT/kernel-dl"
    rm -rf "$dl"
    mkdir -p "$dl"
    log "downloading $pkg"
    (cd "$dl" && apt-get download "$pkg" >&2 2>/dev/null) ||
        { apt-get update >&2 && (cd "$dl" && apt-get download "$pkg" >&2); }
    deb=$(ls "$dl"/"${pkg}"_*.deb)
    ver=$(dpkg-deb -f "$deb" Version)
    # Same as `dpkg-deb -x`, restricted to ./boot (skips ~400 MB of modules).
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dl" ./boot
    cp "$dl"/boot/vmlinuz-* "$OUT/vmlinuz.tmp" && mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
    cp "$dl"/boot/config-* "$OUT/kernel.config"
    printf '%s %s %s\n' "$pkg" "$ver" "$(basename "$dl"/boot/vmlinuz-*)" > "$OUT/kernel.txt"
    rm -rf "$dl"
    # Everything the guest needs must be built in: we ship no modules.
    for opt in SERIAL_8250 SERIAL_8250_CONSOLE BLK_DEV_INITRD RD_GZIP DEVTMPFS PROC_FS SYSFS BINFMT_SCRIPT BINFMT_ELF; do
        grep -q "^CONFIG_${opt}=y" "$OUT/kernel.config" || log "WARNING: CONFIG_$opt is not built in"
    done
fi

# Uncompressed ELF vmlinux for PVH boot (qemu -kernel vmlinux): skips the
# bzImage firmware path and the XZ decompressor, ~3 s faster under TCG.
if [ ! -s "$OUT/vmlinux" ] || [ "$OUT/vmlinuz" -nt "$OUT/vmlinux" ]; then
    grep -q '^CONFIG_PVH=y' "$OUT/kernel.config" || log "WARNING: CONFIG_PVH is off: vmlinux will not boot, use vmlinuz"
    grep -q '^CONFIG_KERNEL_XZ=y' "$OUT/kernel.config" || { log "kernel is not XZ-compressed; cannot extract vmlinux"; exit 1; }
    off=$(LC_ALL=C grep -aboP '\xfd7zXZ\x00' "$OUT/vmlinuz" | head -n1 | cut -d: -f1)
    [ -n "$off" ] || { log "no XZ stream in $OUT/vmlinuz"; exit 1; }
    # (process substitution: tail's SIGPIPE when xz stops must not trip pipefail)
    xz -dc --single-stream < <(tail -c +$((off + 1)) "$OUT/vmlinuz") > "$OUT/vmlinux.tmp"
    [ "$(head -c 4 "$OUT/vmlinux.tmp" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] ||
        { log "extracted vmlinux is not an ELF file"; exit 1; }
    mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
fi

# --- memcheck -----------------------------------------------------------------
if [ ! -x "$OUT/memcheck" ] || [ "$HERE/memcheck.c" -nt "$OUT/memcheck" ]; then
    log "compiling memcheck"
    gcc -O2 -static -Wall -Wextra -o "$OUT/memcheck.tmp" "$HERE/memcheck.c"
    mv "$OUT/memcheck.tmp" "$OUT/memcheck"
fi

# --- initramfs ----------------------------------------------------------------
cpio_gz="$OUT/initramfs.cpio.gz"
stale=0
[ -s "$cpio_gz" ] || stale=1
for f in "$OUT/memcheck" "$HERE/init" "$HERE/build.sh" "$BUSYBOX"; do
    [ "$f" -nt "$cpio_gz" ] && stale=1
done
if [ "$stale" = 1 ]; then
    log "building initramfs"
    stage="$OUT/initramfs-root"
    rm -rf "$stage"
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp}
    cp "$BUSYBOX" "$stage/bin/busybox"
    # One symlink per applet, at the path busybox itself lists (bin/sh, ...).
    "$BUSYBOX" --list-full | while read -r applet; do
        [ -e "$stage/$applet" ] || ln -s /bin/busybox "$stage/$applet"
    done
    install -m 0755 "$HERE/init" "$stage/init"
    install -m 0755 "$OUT/memcheck" "$stage/bin/memcheck"
    # The kernel opens /dev/console for init before /init runs.
    if [ "$(id -u)" = 0 ]; then
        mknod -m 600 "$stage/dev/console" c 5 1
        mknod -m 666 "$stage/dev/null" c 1 3
    fi
    find "$stage" -exec touch -h -d @0 {} +   # reproducible archive
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
        cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9n > "$cpio_gz.tmp"
    mv "$cpio_gz.tmp" "$cpio_gz"
fi

echo "kernel:    $OUT/vmlinuz ($(cat "$OUT/kernel.txt"))"
echo "vmlinux:   $OUT/vmlinux (same kernel, uncompressed, for PVH boot)"
echo "initramfs: $cpio_gz"
echo "memcheck:  $OUT/memcheck"
