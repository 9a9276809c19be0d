#!/usr/bin/env bash
# Sets up this machine and runs the demo: a microVM running redis, reached from the host with
# redis-cli and redis-benchmark over a TAP, results printed, then a clean shutdown. Runs inside
# the lab when this host's KVM cannot boot a stock Linux guest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
set -a
eval "$(images/prepare)"
set +a
export VMR_DEMO=1 VMR_SCRATCH="$PWD/target/demo"
rm -rf "$VMR_SCRATCH" && mkdir -p "$VMR_SCRATCH"
exec images/lab --rwdir "$VMR_SCRATCH" -- bash tests/lab/redis.sh
