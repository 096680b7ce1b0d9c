#!/usr/bin/env bash
# The demo: a lab cluster in network namespaces doing the real job, then torn down. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --bins --locked
exec target/x86_64-unknown-linux-gnu/release/netns-lab demo
