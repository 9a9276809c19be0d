#!/usr/bin/env bash
# Sets up this machine (Debian packages, the lab driver, the guest images) and runs every test:
# unit tests, the tiny-guest tests on this host's /dev/kvm, and the end-to-end tests with real
# Linux guests inside the lab (or directly on a host with VT-x/AMD-V).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

images/setup-host
images/build >/dev/null
echo "[test] building vmr (release) for the end-to-end tests" >&2
cargo build --release --locked -p vmm --bin vmr
export VMR_BIN="$PWD/target/release/vmr"
cargo test --workspace --locked "$@"
