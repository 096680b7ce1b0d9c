#!/usr/bin/env bash
# The test command: installs what is missing, builds the binaries the tests run, runs every test.
# Needs root (the tests build network namespaces); touches nothing outside the namespaces it creates.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
# The default members: everything but the eBPF crate, which tartan-proxy's build script builds for bpfel.
cargo build --release --bins --locked
# End-to-end tests find the tartan binary next to their own (target/x86_64-unknown-linux-gnu/release).
cargo test --release --locked
