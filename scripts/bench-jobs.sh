#!/usr/bin/env bash
# Real-job benchmark: builds release, then runs `dmem-bench jobs` (numpy
# GEMM and a k-means under `dmem run` at 100/50/25% of their measured
# footprint, against plain runs interleaved in the same sitting; results are
# compared bit for bit). Needs python3 with numpy (scripts/setup.sh installs
# it); run as root (or with access to /dev/userfaultfd). Extra arguments go
# to dmem-bench, e.g.
#   scripts/bench-jobs.sh --quick            # n=2048 GEMM, 1M-point k-means, one round
#   scripts/bench-jobs.sh --only gemm --gemm-n 8192
# The JSON goes to bench-results/jobs.json unless --json is given.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --workspace

args=("$@")
json_given=0
for a in "${args[@]}"; do
  case "$a" in --json|--json=*) json_given=1 ;; esac
done
if [ "$json_given" -eq 0 ]; then
  mkdir -p bench-results
  args+=(--json bench-results/jobs.json)
fi
exec target/release/dmem-bench jobs "${args[@]}"
