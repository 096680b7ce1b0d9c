#!/usr/bin/env bash
# Installs what Tartan needs on a fresh machine of this kind. Idempotent: when everything is present it only
# checks and returns (well under a second), so the README commands can call it every time.
set -euo pipefail

APT_PACKAGES=(
  iproute2 iptables nftables ipset conntrack tcpdump iperf3 ethtool socat
  etcd-server etcd-client containernetworking-plugins hyperfine procps util-linux iputils-ping
  protobuf-compiler libprotobuf-dev
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
