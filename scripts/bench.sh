#!/usr/bin/env bash
# The benchmark suite: dmem against all-local and against Linux swap (zram,
# swapfile) under the same memory limit, at 100/75/50/25% local, for a
# sequential scan, random 4 KiB read/write, numpy GEMM, a k-means and GNU
# sort; plus the fault-latency microbenchmark. Writes
# bench-results/suite/{results.json,results.md,slowdown.png,fault-latency-cdf.png}.
#   scripts/bench.sh --quick     # small sizes, one round: under 10 minutes here
#   scripts/bench.sh             # full sizes (2 GiB heaps, GEMM 4096/8192), 3 rounds
# Needs root: it sets up (and always removes) zram, a swapfile, a cgroup-v1
# memory group and a network namespace with a veth pair. Machine swap must be
# off when it starts.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh >/dev/null
for t in zramctl mkswap swapon fallocate ip cc; do
  command -v "$t" >/dev/null || { echo "bench: $t is missing" >&2; exit 1; }
done
if ! python3 -c 'import matplotlib' 2>/dev/null; then
  echo "bench: installing matplotlib"
  python3 -m pip install --quiet matplotlib || python3 -m pip install --quiet --break-system-packages matplotlib
fi
exec python3 benches/suite/bench.py "$@"
