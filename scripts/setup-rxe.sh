#!/usr/bin/env bash
# Creates a soft-RoCE device (rdma_rxe) on a network interface, so that the
# RDMA transport and its conformance suite run for real on a host without
# RDMA hardware. Needs root and a kernel built with CONFIG_RDMA_RXE.
#
#   scripts/setup-rxe.sh [IFACE]      # default: the interface of the default route
#
# Then:
#   cargo build --release --workspace --features dmem-pager/rdma,dmem-memnode/rdma
#   cargo nextest run --release -p dmem-tests \
#       --features dmem-pager/rdma,dmem-memnode/rdma -E 'binary(transport)'
# Remove the device with: rdma link delete rxe_IFACE
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

iface="${1:-$(ip -o route get 1.1.1.1 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "dev") print $(i + 1)}')}"
if [ -z "$iface" ]; then
  echo "setup-rxe: no interface given and no default route to pick one from" >&2
  exit 1
fi

pkgs=(rdma-core ibverbs-utils iproute2)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! $SUDO modprobe rdma_rxe 2>/dev/null; then
  echo "setup-rxe: this kernel ($(uname -r)) has no rdma_rxe module (CONFIG_RDMA_RXE unset):" >&2
  echo "  RDMA cannot be emulated here; the RDMA tests will keep printing SKIPPED." >&2
  exit 1
fi

name="rxe_${iface}"
if rdma link show 2>/dev/null | grep -q "^link ${name}/"; then
  echo "setup-rxe: ${name} exists already"
else
  $SUDO rdma link add "$name" type rxe netdev "$iface"
  echo "setup-rxe: created ${name} on ${iface}"
fi
ibv_devices
echo "setup-rxe: GIDs of ${name} (pass the RoCE v2 entry's index as --gid-index):"
ibv_devinfo -v -d "$name" 2>/dev/null | grep -E "GID\[" || true
