#!/usr/bin/env bash
# Installs what Tartan needs on a fresh machine of this kind. Idempotent: when everything is present it only
# checks and returns (well under a second), so the README commands can call it every time.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  iproute2 iptables nftables ipset conntrack tcpdump iperf3 ethtool socat
  etcd-server etcd-client containernetworking-plugins hyperfine procps util-linux iputils-ping
  protobuf-compiler libprotobuf-dev
  bpftool llvm-22-dev libpolly-22-dev zlib1g-dev libzstd-dev
  podman containerd runc file python3-venv
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # etcd-server's package starts a system etcd on 127.0.0.1:2379 through its init script. Tests and the lab run
  # their own etcd inside namespaces, so keep the package from starting one in the root namespace.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; this machine kind ships rustup's stable toolchain" >&2
  exit 1
fi

# The eBPF programs: the nightly toolchain's core sources (they are built with -Z build-std=core for bpfel) and
# bpf-linker at the version aya 0.14 works with, built against Debian's LLVM 22 (LLVM_PREFIX keeps its build script
# off the default LLVM 14). No new toolchain is downloaded: nightly is already installed on this machine kind.
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  echo "setup: adding rust-src to the nightly toolchain" >&2
  rustup component add rust-src --toolchain nightly
fi
BPF_LINKER_VERSION=0.13.0
if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  echo "setup: building bpf-linker $BPF_LINKER_VERSION against LLVM 22 (about 2 minutes)" >&2
  LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 LLVM_PREFIX=/usr/lib/llvm-22 \
    cargo install --locked bpf-linker --version "$BPF_LINKER_VERSION" --no-default-features --features llvm-22
fi

# Manifests are rendered with kubectl's kustomize (Debian's kubernetes-client where no kubectl is installed) and
# validated against Kubernetes' OpenAPI schemas by kubernetes-validate (PyPI), in a venv of the project's own.
if ! command -v kubectl >/dev/null 2>&1; then
  echo "setup: installing kubernetes-client (kubectl)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
fi
KV_VERSION=1.37.0
if ! target/venv/bin/kubernetes-validate --version 2>/dev/null | grep -q "$KV_VERSION"; then
  echo "setup: kubernetes-validate $KV_VERSION in target/venv" >&2
  python3 -m venv target/venv
  target/venv/bin/pip install -q "kubernetes-validate==$KV_VERSION"
fi
