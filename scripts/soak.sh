#!/usr/bin/env bash
# Soak run: hours of random workloads under memory-node churn, every byte
# verified, before trusting a deployment.
#
#   scripts/soak.sh [--minutes M] [--nodes N] [--replicas R] [--size SIZE] [--limit SIZE] [--encrypt]
#
# Starts N memory nodes on loopback and a pager with --replicas R, then
# runs dmem-workload scenarios (random, threads, seq, rmw; each verifies
# every byte it reads and exits non-zero on a wrong one) back to back for
# M minutes while a churn loop, every 5-20 s, either stalls a random node
# (SIGSTOP for 1-8 s: a delay, or a rebuild when it lasts past 5 s) or,
# at most N-R times in a run, kills one with -9 (its replicas are rebuilt
# on the others). Any workload failure, or the pager dying, fails the run
# at once and keeps the logs. Run it on the machine you are about to trust
# (default: 60 minutes, 3 nodes, 2 replicas, 256M at 64M local).
# DMEM_BIN=DIR takes the binaries from DIR instead of target/release.
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=60 nodes=3 replicas=2 size=256M limit=64M encrypt=()
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes="$2"; shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --replicas) replicas="$2"; shift 2 ;;
    --size) size="$2"; shift 2 ;;
    --limit) limit="$2"; shift 2 ;;
    --encrypt) encrypt=(--encrypt); shift ;;
    *) echo "soak: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ "$replicas" -gt "$nodes" ]; then
  echo "soak: --replicas $replicas needs at least as many --nodes" >&2; exit 2
fi

bin=${DMEM_BIN:-target/release}
[ -x "$bin/dmem-workload" ] || scripts/setup.sh
work=$(mktemp -d /tmp/dmem-soak.XXXXXX)
declare -a pids=() ports=()
pager_pid=""
cleanup() {
  [ -n "${churn_pid:-}" ] && kill "$churn_pid" 2>/dev/null || true
  for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
  [ -n "$pager_pid" ] && kill "$pager_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

for i in $(seq 0 $((nodes - 1))); do
  port=$((17300 + i + RANDOM % 1000 * 8))
  "$bin/dmem-memnode" --listen "127.0.0.1:$port" --capacity 1G >"$work/memnode$i.log" 2>&1 &
  pids+=($!) ports+=("$port")
done
sleep 0.5
args=()
for p in "${ports[@]}"; do args+=(--memnode "127.0.0.1:$p"); done
sock="$work/pager.sock"
"$bin/dmem-pager" --socket "$sock" "${args[@]}" --replicas "$replicas" "${encrypt[@]}" \
  --local-limit "$limit" --slab 16M >"$work/pager.log" 2>&1 &
pager_pid=$!
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { echo "soak: the pager did not start; see $work/pager.log" >&2; exit 1; }

# Churn: stalls, and at most nodes-replicas kills.
(
  kills=0
  while true; do
    sleep $((5 + RANDOM % 16))
    i=$((RANDOM % nodes))
    p=${pids[$i]}
    kill -0 "$p" 2>/dev/null || continue
    if [ $((RANDOM % 6)) -eq 0 ] && [ "$kills" -lt $((nodes - replicas)) ]; then
      echo "$(date +%T) churn: kill -9 memnode $i"
      kill -9 "$p"; kills=$((kills + 1))
    else
      s=$((1 + RANDOM % 8))
      echo "$(date +%T) churn: stall memnode $i for ${s}s"
      kill -STOP "$p"; sleep "$s"; kill -CONT "$p"
    fi
  done
) >"$work/churn.log" 2>&1 &
churn_pid=$!

end=$(( $(date +%s) + minutes * 60 ))
runs=0
scenarios=(random threads seq rmw)
echo "soak: $nodes nodes, --replicas $replicas ${encrypt[*]}, $size at $limit local, $minutes min; logs in $work"
while [ "$(date +%s)" -lt "$end" ]; do
  sc=${scenarios[$((RANDOM % ${#scenarios[@]}))]}
  seed=$RANDOM
  if ! "$bin/dmem-workload" --socket "$sock" --scenario "$sc" --size "$size" --rounds 2 \
       --seed "$seed" >"$work/last.out" 2>&1; then
    echo "soak: FAILED after $runs runs: $sc seed $seed" >&2
    tail -5 "$work/last.out" >&2
    echo "logs kept in $work" >&2
    trap - EXIT; cleanup; exit 1
  fi
  kill -0 "$pager_pid" 2>/dev/null || { echo "soak: the pager died; see $work/pager.log" >&2; exit 1; }
  runs=$((runs + 1))
done
echo "soak: PASSED: $runs workload runs, every byte verified; churn:"
cat "$work/churn.log"
"$bin/dmem" stats --socket "$sock" --json | python3 -c 'import json,sys; v=json.load(sys.stdin)["pager"]; print("rebuilt pages:", v["rebuilt_pages"], "degraded groups:", v["degraded_groups"])'
rm -rf "$work"
