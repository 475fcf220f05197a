#!/usr/bin/env bash
# Runs a job that prints `digest=...` once plainly, then N times under
# `dmem run` at a local limit, and reports every run whose digest differs
# (with its stats JSON kept). For hunting rare wrong results, e.g. the one
# in README *Limitations* (GEMM n=4096 at 25% local, ~1 run in 40):
#   scripts/repeat-check.sh 60 134M python3 benches/jobs/gemm.py 4096
# Each run's figures go to bench-results/repeat/RUN.json.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=$1
limit=$2
shift 2
dmem=target/release/dmem
[ -x "$dmem" ] || cargo build --release -p dmem-pager -p dmem-memnode -p dmem-preload
out=bench-results/repeat
mkdir -p "$out"
want=$("$@" | grep -o 'digest=[0-9a-f]*')
echo "plain: $want"
bad=0
for r in $(seq 1 "$runs"); do
  got=$("$dmem" run --quiet --local-limit "$limit" --stats-json "$out/$r.json" -- "$@" |
    grep -o 'digest=[0-9a-f]*' || echo "digest=none")
  if [ "$got" != "$want" ]; then
    bad=$((bad + 1))
    echo "run $r: WRONG ($got); figures in $out/$r.json"
  else
    echo "run $r: ok"
    rm -f "$out/$r.json"
  fi
done
echo "$bad of $runs runs wrong"
[ "$bad" -eq 0 ]
