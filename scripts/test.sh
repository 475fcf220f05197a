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
# Output of passing tests is shown only where .config/nextest.toml asks for
# it (tests that can skip), so a SKIPPED line is always visible.
cargo nextest run --release --workspace --no-fail-fast --failure-output final "$@"

echo "== end-to-end suite again against the memory node's io_uring data path"
DMEM_TESTS_MEMNODE_ARGS="--io uring" \
  cargo nextest run --release -p dmem-tests --no-fail-fast --failure-output final "$@"
