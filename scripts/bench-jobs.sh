#!/usr/bin/env bash
# Real-job benchmark: numpy GEMM and a k-means under `dmem run` at 100/50/25%
# of their measured footprint, against plain runs interleaved in the same
# sitting, results compared bit for bit. It is the benchmark suite
# (scripts/bench.sh) restricted to those jobs and to dmem; extra arguments go
# to it, e.g. --quick (GEMM n=1536, 256k-point k-means, one round) or --runs 5.
# Writes bench-results/jobs/{results.json,results.md,slowdown.png}.
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/bench.sh --only gemm,kmeans --contenders local,dmem --fractions 100,50,25 \
  --no-fault-latency --out bench-results/jobs "$@"
