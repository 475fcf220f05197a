#!/bin/sh
# timed.sh CMD ARGS...: runs CMD (its stdout to /dev/null) and prints the
# seconds it took and a digest of its output, in the suite's format.
out=$(mktemp)
t0=$(date +%s.%N)
"$@" > "$out" || { rm -f "$out"; exit 1; }
t1=$(date +%s.%N)
echo "seconds=$(awk "BEGIN { print $t1 - $t0 }")"
echo "digest=$(sha256sum < "$out" | cut -d' ' -f1)"
rm -f "$out"
