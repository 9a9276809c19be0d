#!/usr/bin/env bash
# Sets up this machine and runs the demo: redis in a microVM protected by a standby, etcd as the
# coordinator, a client writing to it on one TCP connection; the primary's monitor is killed
# twice and each time a standby takes the VM over and the client carries on. Prints the figures
# at the end (a SET's round trip protected and not, the epoch pause, each failover's detection,
# resume and client gap, writes lost). Runs inside the lab when this host's KVM cannot boot a
# stock Linux guest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
set -a
eval "$(images/prepare)"
set +a
export VMR_DEMO=1 VMR_SCRATCH="$PWD/target/demo" VMR_FAILOVER_KILLS=${VMR_FAILOVER_KILLS:-2}
rm -rf "$VMR_SCRATCH" && mkdir -p "$VMR_SCRATCH"
# One CPU, as the tests: the emulated lab's own faults are several times rarer (docs/lab.md).
exec images/lab --cpus 1 --rwdir "$VMR_SCRATCH" -- bash tests/lab/failover_redis.sh
