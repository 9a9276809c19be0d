#!/usr/bin/env bash
# Build the vmr guest initramfs images (uncompressed newc cpio) into OUTDIR:
#   initramfs.cpio (+ .gz)  busybox, /init, vmr-dirty, vmr-detach-tty, redis-server, redis-cli
#   initramfs-min.cpio      busybox, /init, vmr-dirty and vmr-detach-tty only
# Called by images/build (which holds the cache lock and computes the cache key).
# usage: images/initramfs/build.sh OUTDIR
#        images/initramfs/build.sh --list-inputs   # host files copied in (for the cache key)
set -euo pipefail

die() { printf 'images/initramfs/build.sh: error: %s\n' "$*" >&2; exit 1; }
log() { printf '[initramfs] %s\n' "$*" >&2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export LC_ALL=C

busybox=/bin/busybox
bins=(/usr/bin/redis-server /usr/bin/redis-cli)

# Host files to copy: busybox, the redis binaries, their shared libraries and the loader.
list_inputs() {
    local f
    [[ -x $busybox ]] || die "$busybox missing (apt-get install busybox-static, or run images/setup-host)"
    if ldd "$busybox" >/dev/null 2>&1; then die "$busybox is not statically linked (install busybox-static)"; fi
    echo "$busybox"
    for f in "${bins[@]}"; do
        [[ -x $f ]] || die "$f missing (apt-get install redis-server redis-tools, or run images/setup-host)"
        echo "$f"
    done
    # ldd lines: "libx.so => /lib/.../libx.so (0x..)" and "/lib64/ld-linux-x86-64.so.2 (0x..)"
    ldd "${bins[@]}" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && $2 ~ /^\(0x/ { print $1 }' | sort -u
}

if [[ ${1:-} == --list-inputs ]]; then
    list_inputs
    exit 0
fi
[[ $# -eq 1 ]] || die "usage: $0 OUTDIR | --list-inputs"
out=$1
mapfile -t inputs < <(list_inputs)

stage=$(mktemp -d "${TMPDIR:-/tmp}/vmr-initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$out"

# The benchmarks' guest workload (heartbeat and memory dirtier), static so it runs in both images.
gcc -static -O2 -Wall -o "$stage/vmr-dirty" "$here/vmr-dirty.c" || die "cannot compile vmr-dirty.c"
# Ends the command's session without a hangup of the console (see /init).
gcc -static -O2 -Wall -o "$stage/vmr-detach-tty" "$here/vmr-detach-tty.c" ||
    die "cannot compile vmr-detach-tty.c"

# Base tree: busybox with its applets, /init, vmr-dirty, vmr-detach-tty, /etc, /dev/console.
make_base() { # dir
    local root=$1 applet
    mkdir -p "$root"
    cd "$root"
    mkdir -p bin sbin usr/bin usr/sbin dev proc sys tmp run root etc mnt
    chmod 1777 tmp
    cp "$busybox" bin/busybox
    "$busybox" --list-full | while IFS= read -r applet; do
        [[ $applet == bin/busybox ]] && continue
        mkdir -p "$(dirname "$applet")"
        ln -sf /bin/busybox "$applet"
    done
    install -m 0755 "$here/init" init
    install -m 0755 "$stage/vmr-dirty" bin/vmr-dirty
    install -m 0755 "$stage/vmr-detach-tty" bin/vmr-detach-tty
    printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'redis:x:100:100:redis:/var/lib/redis:/bin/false' \
        'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >etc/passwd
    printf '%s\n' 'root:x:0:' 'redis:x:100:' 'nogroup:x:65534:' >etc/group
    printf '%s\n' '127.0.0.1 localhost' >etc/hosts
    echo vmr >etc/hostname
    # The kernel opens /dev/console for init's stdin/stdout/stderr before /init runs, so
    # the node must be in the archive (devtmpfs is only mounted by /init).
    mknod -m 600 dev/console c 5 1 || die "mknod dev/console failed (run as root)"
    mknod -m 666 dev/null c 1 3
}

# Reproducible archive: sorted names, owner root, fixed mtimes.
pack() { # dir output.cpio
    (cd "$1" && find . -exec touch -h -d @0 {} + &&
        find . -mindepth 1 | sort | cpio -o -H newc -R 0:0 --reproducible --quiet) >"$2"
}

# Minimal image: busybox and /init only (fastest to load; no redis).
make_base "$stage/min"
pack "$stage/min" "$out/initramfs-min.cpio"

# Full image: + redis-server, redis-cli, their shared libraries and the loader, at the
# same paths as on the host (symlinks resolved, so /lib64/ld-linux-x86-64.so.2 is a file).
make_base "$stage/full"
mkdir -p var/lib/redis
for f in "${inputs[@]}"; do
    [[ $f == "$busybox" ]] && continue
    mkdir -p ".$(dirname "$f")"
    cp -L "$f" ".$f"
done
pack "$stage/full" "$out/initramfs.cpio"
gzip -9 -n -c "$out/initramfs.cpio" >"$out/initramfs.cpio.gz"
kib() { echo "$(( ($(stat -c %s "$1") + 1023) / 1024 )) KiB"; }
log "initramfs.cpio $(kib "$out/initramfs.cpio"), .gz $(kib "$out/initramfs.cpio.gz"), initramfs-min.cpio $(kib "$out/initramfs-min.cpio")"
