#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds once (release),
# checks formatting and lints, then runs every test in parallel with nextest.
# Benchmarks are not part of it (see scripts/bench-*.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings

echo "== tests"
# Unit tests and the end-to-end suite (real daemons on real sockets). Tests
# that need what this machine lacks print a SKIPPED line with the reason.
cargo nextest run --release --workspace --no-fail-fast --success-output never --failure-output final "$@"
