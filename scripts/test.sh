#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds once (release, with
# the RDMA transport compiled in), checks formatting and lints (with and
# without RDMA), then runs every test in parallel with nextest.
# Benchmarks are not part of it (see scripts/bench-*.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

# The RDMA code is built, linted and tested in every run so it never rots.
# Without an RDMA device (as on the project's VMs) every pager falls back to
# TCP, which the end-to-end suite then exercises, and the RDMA conformance
# runs print SKIPPED with the reason.
RDMA=(--features dmem-pager/rdma,dmem-memnode/rdma)

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo clippy --release --workspace --all-targets "${RDMA[@]}" -- -D warnings

echo "== build (RDMA transport compiled in)"
cargo build --release --workspace --all-targets "${RDMA[@]}"

echo "== tests"
# Unit tests and the end-to-end suite (real daemons on real sockets). Tests
# that need what this machine lacks print a SKIPPED line with the reason.
# Output of passing tests is shown only where .config/nextest.toml asks for
# it (tests that can skip), so a SKIPPED line is always visible.
cargo nextest run --release --workspace "${RDMA[@]}" --no-fail-fast --failure-output final "$@"

echo "== end-to-end suite again against the memory node's io_uring data path"
DMEM_TESTS_MEMNODE_ARGS="--io uring" \
  cargo nextest run --release -p dmem-tests "${RDMA[@]}" --no-fail-fast --failure-output final "$@"
