#!/usr/bin/env bash
# Sets up this machine (Debian packages, the lab driver, the guest images) and runs every test:
# unit tests, the tiny-guest tests on this host's /dev/kvm, and the end-to-end tests with real
# Linux guests inside the lab (or directly on a host with VT-x/AMD-V).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
set -a
eval "$(images/prepare)"
set +a
cargo test --workspace --locked "$@"
