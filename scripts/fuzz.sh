#!/usr/bin/env bash
# Fuzzes the wire-protocol frame decoder with cargo fuzz (libFuzzer) for a
# while. Not part of CI: run it by hand, e.g. `scripts/fuzz.sh 300`.
# Usage: scripts/fuzz.sh [SECONDS]   (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
# cargo fuzz needs nightly-only flags; the stable toolchain accepts them with
# RUSTC_BOOTSTRAP. No sanitizer keeps it working on stable; the decoder has
# no unsafe code, so bounds checks already catch memory errors as panics.
cd fuzz
RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none frame_decoder -- -max_total_time="$secs"
