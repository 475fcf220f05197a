#!/usr/bin/env bash
# One command from a fresh machine: installs everything, builds, then runs the
# main job: a numpy job whose arrays are 4x the local memory it may keep,
# under `dmem run` (which starts a pager and a loopback memory node), and
# checks its results against a plain run bit for bit. Then it shows a memory
# node with token authentication, `dmem ping` and the node's metrics.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

bin=target/release
work=$(mktemp -d)
node_pid=""
trap 'kill "$node_pid" 2>/dev/null || true; rm -rf "$work"' EXIT

echo "== main job: numpy with 128 MiB of arrays, 32 MiB local (dmem run --local-limit 32M)"
"$bin/dmem" run --local-limit 32M --stats-json "$work/stats.json" -- \
    python3 scripts/numpy_job.py 2048 | tee "$work/dmem.out"
echo "== the same job without dmem"
python3 scripts/numpy_job.py 2048 > "$work/plain.out"
if cmp -s "$work/dmem.out" "$work/plain.out"; then
  echo "results identical to the plain run"
else
  echo "demo: results differ from the plain run" >&2; diff "$work/dmem.out" "$work/plain.out" >&2; exit 1
fi

# A token file makes the demo exercise authentication as a real deployment would.
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/token"
chmod 600 "$work/token"

metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin/dmem-memnode" --listen 127.0.0.1:0 --capacity 1G --token-file "$work/token" \
    --metrics "127.0.0.1:$metrics_port" > "$work/node.out" 2> "$work/node.log" &
node_pid=$!
for _ in $(seq 100); do
  grep -q "listening on" "$work/node.out" 2>/dev/null && break
  sleep 0.05
done
addr=$(sed -n 's/^dmem-memnode listening on //p' "$work/node.out")
[ -n "$addr" ] || { echo "demo: the memory node did not start:"; cat "$work/node.log"; exit 1; }
echo "== memory node listening on $addr (1 GiB capacity, token auth)"

echo "== dmem ping --memnode $addr"
"$bin/dmem" ping --memnode "$addr" --token-file "$work/token" --pages 256 --rounds 2000

echo "== a wrong token is refused"
echo "not-the-right-token-at-all" > "$work/bad"
if "$bin/dmem" ping --memnode "$addr" --token-file "$work/bad"; then
  echo "demo: a wrong token was accepted" >&2; exit 1
fi

echo "== metrics (http://127.0.0.1:$metrics_port/metrics)"
METRICS_PORT=$metrics_port python3 - <<'PY'
import os, urllib.request
url = "http://127.0.0.1:%s/metrics" % os.environ["METRICS_PORT"]
text = urllib.request.urlopen(url, timeout=5).read().decode()
for line in text.splitlines():
    if line.startswith("dmem_memnode_") and not line.endswith(" 0"):
        print("  " + line)
PY
echo "== demo finished"
