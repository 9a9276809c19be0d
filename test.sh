#!/usr/bin/env bash
# Sets up this machine (Debian packages, the lab driver, the guest images) and runs every test:
# unit tests, the tiny-guest tests on this host's /dev/kvm, and the end-to-end tests with real
# Linux guests inside the lab (or directly on a host with VT-x/AMD-V). Ends with a table of the
# lab runs (scenario, attempts, outcomes, durations); the exit status is the tests'. The
# replicator's decoders are fuzzed for VMR_FUZZ_SECS (default 20) seconds each.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
set -a
eval "$(images/prepare)"
VMR_LAB_RUN_ID=${VMR_LAB_RUN_ID:-test-$(date -u +%Y%m%dT%H%M%SZ)}
set +a
status=0
cargo test --workspace --locked "$@" || status=$?
# The replication wire's and the standby's decoders, fuzzed for a bounded time (a crash fails).
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    replicator/fuzz/run "${VMR_FUZZ_SECS:-20}" || status=1
else
    echo "fuzz: skipped (no nightly toolchain on this machine)"
fi
cargo run -q --locked -p vmr-tests --bin lab-summary -- "target/lab-results/$VMR_LAB_RUN_ID.jsonl" || true
exit "$status"
