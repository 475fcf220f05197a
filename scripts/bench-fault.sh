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
# The JSON goes to bench-results/fault-latency.json unless --json is given.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p dmem-memnode -p dmem-pager -p dmem-bench

args=("$@")
json_given=0
for a in "${args[@]}"; do
  case "$a" in --json|--json=*) json_given=1 ;; esac
done
if [ "$json_given" -eq 0 ]; then
  mkdir -p bench-results
  args+=(--json bench-results/fault-latency.json)
fi
exec target/release/dmem-bench fault-latency "${args[@]}"
