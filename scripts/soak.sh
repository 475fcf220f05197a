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
# (SIGSTOP for 1-8 s: a delay, or a rebuild when it lasts past 5 s) or
# kills one with -9 and restarts it, empty, on its address 2-10 s later
# (the pager rebuilds its replicas on the others and takes it back). With
# R >= 2 a node is killed only while every node is up and no replica group
# is degraded, so at most one replica of any page is ever lost at once;
# with R = 1 nothing is killed (a kill would lose pages by design). Any
# workload failure, or the pager dying, fails the run at once and keeps
# the logs. Run it on the machine you are about to trust (default: 60
# minutes, 3 nodes, 2 replicas, 256M at 64M local).
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
declare -a ports=()
pager_pid=""
# Node i's pid lives in $work/node$i.pid: the churn loop restarts nodes.
node_pid() { cat "$work/node$1.pid" 2>/dev/null || true; }
start_node() {
  "$bin/dmem-memnode" --listen "127.0.0.1:${ports[$1]}" --capacity 1G >>"$work/memnode$1.log" 2>&1 &
  echo $! >"$work/node$1.pid"
  disown $! # its kill -9 is the point, not news
}
cleanup() {
  [ -n "${churn_pid:-}" ] && kill "$churn_pid" 2>/dev/null || true
  for i in $(seq 0 $((nodes - 1))); do
    p=$(node_pid "$i")
    [ -n "$p" ] && { kill -CONT "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; }
  done
  [ -n "$pager_pid" ] && kill "$pager_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# Distinct ports (the pager refuses a node listed twice).
base=$((17300 + RANDOM % 1000 * 8))
for i in $(seq 0 $((nodes - 1))); do
  ports+=($((base + i)))
  start_node "$i"
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

# Whether every node is up and no group is degraded (safe to kill one).
whole() {
  "$bin/dmem" stats --socket "$sock" --json 2>/dev/null | python3 -c '
import json, sys
v = json.load(sys.stdin)
ok = v["pager"]["degraded_groups"] == 0 and all(n["state"] == "up" for n in v["memnodes"])
sys.exit(0 if ok else 1)'
}

# Churn: stalls, and kills followed by restarts.
(
  while true; do
    sleep $((5 + RANDOM % 16))
    i=$((RANDOM % nodes))
    p=$(node_pid "$i")
    kill -0 "$p" 2>/dev/null || continue
    if [ "$replicas" -ge 2 ] && [ $((RANDOM % 4)) -eq 0 ] && whole; then
      d=$((2 + RANDOM % 9))
      echo "$(date +%T) churn: kill -9 memnode $i, restart in ${d}s"
      kill -9 "$p"; wait "$p" 2>/dev/null || true
      sleep "$d"
      start_node "$i"
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
kill "$churn_pid" 2>/dev/null || true
echo "soak: PASSED: $runs workload runs, every byte verified;" \
  "$(grep -c 'kill -9' "$work/churn.log" || true) kills with restarts," \
  "$(grep -c 'stall' "$work/churn.log" || true) stalls"
"$bin/dmem" stats --socket "$sock" --json | python3 -c '
import json, sys
v = json.load(sys.stdin)
print("rebuilt pages:", v["pager"]["rebuilt_pages"], "degraded groups:", v["pager"]["degraded_groups"],
      "nodes:", " ".join(n["state"] for n in v["memnodes"]))'
# Stop the daemons while their pid files still exist, then tidy up.
trap - EXIT
cleanup
rm -rf "$work"
