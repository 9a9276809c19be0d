#!/usr/bin/env bash
# Build the vmr guest kernel (bzImage + vmlinux) into OUTDIR.
# Called by images/build (which holds the cache lock and computes the cache key);
# usage: images/kernel/build.sh OUTDIR
# The extracted source and the object tree stay in $VMR_CACHE/kernel/ so that a
# rebuild after a fragment change is incremental.
set -euo pipefail

die() { printf 'images/kernel/build.sh: error: %s\n' "$*" >&2; exit 1; }
log() { printf '[kernel] %s\n' "$*" >&2; }

[[ $# -eq 1 ]] || die "usage: $0 OUTDIR"
out=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment=$here/microvm.config
cache=${VMR_CACHE:-$HOME/.cache/vmr}
tarball=/usr/src/linux-source-6.1.tar.xz
[[ -f $tarball ]] || die "$tarball missing (apt-get install linux-source-6.1, or run images/setup-host)"
ver=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null) || die "linux-source-6.1 is not installed"

src=$cache/kernel/src-$ver
obj=$cache/kernel/obj-$ver
mkdir -p "$cache/kernel"

# Drop trees of other linux-source versions (about 1.3 GiB each).
for d in "$cache"/kernel/src-* "$cache"/kernel/obj-*; do
    [[ -e $d ]] || continue
    case $d in "$src"|"$obj") ;; *) log "removing stale $d"; rm -rf "$d" ;; esac
done

if [[ ! -f $src/.vmr-extracted ]]; then
    log "extracting $tarball ($ver) to $src"
    rm -rf "$src" "$src.tmp"
    mkdir -p "$src.tmp"
    tar -xJf "$tarball" -C "$src.tmp" --strip-components=1
    touch "$src.tmp/.vmr-extracted"
    mv "$src.tmp" "$src"
fi

# Reproducible build metadata.
export KBUILD_BUILD_TIMESTAMP='Thu Jan  1 00:00:00 UTC 1970'
export KBUILD_BUILD_USER=vmr KBUILD_BUILD_HOST=vmr KBUILD_BUILD_VERSION=1
export LC_ALL=C
mk=(make -s -C "$src" O="$obj" ARCH=x86_64)

log "configuring: tinyconfig + images/kernel/microvm.config (log: $obj/config.log)"
mkdir -p "$obj"
{
    "${mk[@]}" tinyconfig &&
    (cd "$obj" && "$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$fragment") &&
    "${mk[@]}" olddefconfig
} >"$obj/config.log" 2>&1 || { tail -n 20 "$obj/config.log" >&2; die "kernel configuration failed (log: $obj/config.log)"; }

# Every option of the fragment must have survived (else a dependency is missing).
bad=0
while IFS= read -r line; do
    case $line in
        CONFIG_*=*) want=$line ;;
        '# CONFIG_'*' is not set') want=$line ;;
        *) continue ;;
    esac
    if [[ $want == CONFIG_* ]]; then
        grep -qxF -- "$want" "$obj/.config" || { log "option not applied: $want (got: $(grep -E "^(# )?${want%%=*}[= ]" "$obj/.config" || echo unset))"; bad=1; }
    else
        sym=${want#\# }; sym=${sym%% *}
        if grep -q "^$sym=" "$obj/.config"; then log "option not applied: $want"; bad=1; fi
    fi
done <"$fragment"
[[ $bad -eq 0 ]] || die "kernel config fragment did not apply cleanly (see above)"

log "building bzImage with $(nproc) jobs (nice 19); log: $obj/build.log"
start=$SECONDS
n=0 last=$SECONDS
set +e
nice -n 19 make -C "$src" O="$obj" ARCH=x86_64 -j"$(nproc)" bzImage >"$obj/build.log" 2>&1 &
pid=$!
# Progress: a line every 10 s with the number of build steps so far.
while kill -0 "$pid" 2>/dev/null; do
    sleep 2
    if (( SECONDS - last >= 10 )); then
        n=$(grep -c '^  [A-Z]' "$obj/build.log" || true)
        log "$((SECONDS - start)) s, $n build steps, last: $(tail -n1 "$obj/build.log" | cut -c1-80)"
        last=$SECONDS
    fi
done
wait "$pid"; rc=$?
set -e
if [[ $rc -ne 0 ]]; then
    tail -n 30 "$obj/build.log" >&2
    die "kernel build failed (exit $rc); full log: $obj/build.log"
fi
log "built in $((SECONDS - start)) s"

mkdir -p "$out"
cp "$obj/arch/x86/boot/bzImage" "$out/bzImage"
cp "$obj/vmlinux" "$out/vmlinux"
cp "$obj/.config" "$out/config"
