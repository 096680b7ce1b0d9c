#!/usr/bin/env bash
# The demo: a lab cluster in network namespaces doing the real job, then torn down. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bins --locked
target/x86_64-unknown-linux-gnu/release/netns-lab demo
# NetworkPolicy: the conformance topology (namespaces x, y, z; pods a, b, c on two nodes, with tartan-proxy --mode
# ebpf: policy at each pod's veth), its reachability matrix open, then with x closed except TCP 80 into x/a from
# namespace y.
exec target/x86_64-unknown-linux-gnu/release/netns-lab reachability -f netns-lab/examples/netpol-xyz.yaml
