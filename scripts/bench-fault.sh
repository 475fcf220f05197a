#!/usr/bin/env bash
# Fault-latency benchmark: builds release, then runs `dmem-bench
# fault-latency` (random 4 KiB page faults served from the cache tier and
# from a loopback memory node, and a sequential scan at 25% local, against a
# bare userfaultfd round trip and a bare TCP ping-pong measured in the same
# run). It starts its own dmem-memnode and dmem-pager(s); run it as root (or
# with access to /dev/userfaultfd). Extra arguments go to dmem-bench, e.g.
#   scripts/bench-fault.sh --quick                 # a smoke run of ~15 s
#   scripts/bench-fault.sh --blocks 4K,16K,64K     # block-size sweep
#   scripts/bench-fault.sh --pin-cpu 0             # everything on one CPU: steadier
# The JSON goes to bench-results/fault-latency.json unless --json is given;
# where an RDMA device exists, a second run over RDMA goes next to it
# (fault-latency-rdma.json) and the remote figures are compared.
set -euo pipefail
cd "$(dirname "$0")/.."

RDMA=(--features dmem-pager/rdma,dmem-memnode/rdma)
cargo build --release -p dmem-memnode -p dmem-pager -p dmem-bench "${RDMA[@]}"

args=("$@")
json=""
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --json) json="${args[$((i + 1))]:-}" ;;
    --json=*) json="${args[$i]#--json=}" ;;
  esac
done
if [ -z "$json" ]; then
  mkdir -p bench-results
  json=bench-results/fault-latency.json
  args+=(--json "$json")
fi
target/release/dmem-bench fault-latency "${args[@]}"

# The RDMA column: the same run over RDMA where this host has a device.
status=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["rdma_status"])' "$json")
if [ "$status" = "available" ]; then
  rjson="${json%.json}-rdma.json"
  target/release/dmem-bench fault-latency "$@" --transport rdma --json "$rjson"
  python3 - "$json" "$rjson" <<'PY'
import json, sys
t, r = (json.load(open(p)) for p in sys.argv[1:3])
print("\nremote faults, TCP vs RDMA (p50 / p99 us):")
for k in ("remote_p50_us", "remote_p99_us", "seq_scan_gbps"):
    print(f"  {k:16} tcp {t[k]:8.1f}   rdma {r[k]:8.1f}   rdma/tcp {r[k] / t[k]:.2f}")
PY
else
  echo "RDMA column: skipped ($status)"
fi
