#!/usr/bin/env bash
# Memory-node benchmark: builds release, then runs `dmem-bench memnode`
# (4 KiB read latency and pipelined 64 KiB throughput against bare-TCP
# floors measured in the same run). Extra arguments go to dmem-bench, e.g.
#   scripts/bench-memnode.sh --io both       # threads and io_uring, interleaved
#   scripts/bench-memnode.sh --quick         # a few seconds' smoke run
# The JSON goes to bench-results/memnode.json unless --json is given.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p dmem-memnode -p dmem-bench

args=("$@")
json_given=0
for a in "${args[@]}"; do
  case "$a" in --json|--json=*) json_given=1 ;; esac
done
if [ "$json_given" -eq 0 ]; then
  mkdir -p bench-results
  args+=(--json bench-results/memnode.json)
fi
exec target/release/dmem-bench memnode "${args[@]}"
