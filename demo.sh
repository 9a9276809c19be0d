#!/usr/bin/env bash
# Sets up this machine and runs the demo: a microVM running redis, reached from the host with
# redis-cli and redis-benchmark over a TAP, results printed, then a clean shutdown. Runs inside
# the lab when this host's KVM cannot boot a stock Linux guest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

images/setup-host
images/build >/dev/null
echo "[demo] building vmr (release)" >&2
cargo build --release --locked -p vmm --bin vmr
set -a
# shellcheck disable=SC1091
source "${VMR_CACHE:-$HOME/.cache/vmr}/images.env"
set +a
export VMR_BIN="$PWD/target/release/vmr" VMR_DEMO=1
export VMR_SCRATCH="$PWD/target/demo"
rm -rf "$VMR_SCRATCH" && mkdir -p "$VMR_SCRATCH"
exec images/lab --rwdir "$VMR_SCRATCH" -- bash tests/lab/redis.sh
