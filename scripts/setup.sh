#!/usr/bin/env bash
# Installs everything a fresh Debian machine needs for dmem, then builds release.
# Idempotent: safe to run again. Run as root (or with sudo available).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

apt_pkgs=(build-essential pkg-config libclang-dev clang libibverbs-dev librdmacm-dev
          iproute2 procps python3 python3-pip sqlite3 coreutils)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# numpy for the Python workloads (tests and benchmarks of later capabilities).
if ! python3 -c 'import numpy' 2>/dev/null; then
  echo "setup: installing numpy"
  python3 -m pip install --quiet numpy || python3 -m pip install --quiet --break-system-packages numpy
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo is missing; install a Rust toolchain (rustup) first" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# With the RDMA transport compiled in (the libraries are installed above):
# without a device it falls back to TCP by itself, and the test run reuses
# this build.
echo "setup: building release"
cargo build --release --workspace --all-targets --features dmem-pager/rdma,dmem-memnode/rdma
