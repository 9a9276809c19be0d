#!/usr/bin/env bash
# The loss of a whole primary host: two labs (two emulated hosts), joined by one wire
# (images/lab --lan), and the primary's whole lab killed. Run on the build host, not in a lab:
#
#   bash tests/lab/host_lost.sh          # VMR_BIN: the vmr to run (default target/release/vmr)
#
# Lab B (host_lost_standby.sh): etcd, a standby, the client. Lab A (host_lost_primary.sh):
# redis protected by B's standby. Once the client writes, B asks for A's loss: this driver
# kills A's emulator (SIGKILL: the host gone, no reset, no goodbye). B checks the standby took
# the VM and its address over, the client's connection carried on and every acknowledged SET
# is in the VM; its exit status is this script's. Everything is left in the scratch directory
# printed first.
set -euo pipefail
cd "$(dirname "$0")/../.."
scratch=$PWD/target/lab-scratch/host_lost-$$-$(date +%s)
mkdir -p "$scratch/a" "$scratch/b"
echo "scratch: $scratch"
while IFS='=' read -r k v; do
    [[ $k =~ ^VMR_[A-Z_]+$ ]] && export "$k=$v"
done < <(images/build)
export VMR_BIN=${VMR_BIN:-$PWD/target/release/vmr}
[ -x "$VMR_BIN" ] || { echo "no vmr binary at $VMR_BIN (cargo build --release)" >&2; exit 2; }
export VMR_SHARED=$scratch VMR_LAB_VERBOSE=${VMR_LAB_VERBOSE:-1}
# The primary's host stays quiet while it runs: its watchdog only ends a lab stuck for good.
port=$((20000 + RANDOM % 20000))

VMR_SCRATCH=$scratch/b VMR_WATCHDOG_SECS=${VMR_WATCHDOG_SECS:-60} \
    images/lab --cpus 1 --lan "$port:$((port + 1))" --rwdir "$scratch" --timeout 1500 \
    -- bash tests/lab/host_lost_standby.sh >"$scratch/b.out" 2>&1 &
b=$!
VMR_SCRATCH=$scratch/a VMR_WATCHDOG_SECS=1500 \
    images/lab --cpus 1 --lan "$((port + 1)):$port" --rwdir "$scratch" --timeout 1500 \
    -- bash tests/lab/host_lost_primary.sh >"$scratch/a.out" 2>&1 &
a=$!

# A's emulator: the QEMU process bound to A's end of the wire.
emulator_a() { pgrep -f "qemu-system.*localaddr=127.0.0.1:$((port + 1))" || true; }
killed=
while kill -0 "$b" 2>/dev/null; do
    if [ -z "$killed" ] && [ -e "$scratch/kill-primary" ]; then
        pid=$(emulator_a)
        [ -n "$pid" ] || { echo "FAIL: the primary's lab is not running" >&2; break; }
        kill -KILL $pid
        killed=$EPOCHREALTIME
        echo "$killed" >"$scratch/primary-killed"
        echo "[$(date +%T.%3N)] the primary's whole lab killed (pid $pid)"
    fi
    sleep 0.05
done
set +e
wait "$b"
rc=$?
kill "$a" 2>/dev/null
wait "$a" 2>/dev/null
set -e
cat "$scratch/b.out" | grep -v '^\[lab\]' | tail -n 40
[ -n "$killed" ] || { echo "FAIL: the primary's lab was never killed" >&2; [ "$rc" -ne 0 ] || rc=1; }
exit "$rc"
