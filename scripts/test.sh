#!/usr/bin/env bash
# Runs every test of the project: the Rust workspace (unit, integration, reference,
# header drift, ffi through dlopen) and the C / C++ examples under sanitizers.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --release
# Model-check the CPU worker runner with loom (its own target dir: a different cfg).
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --test loom_runner
if [ -x scripts/ffi-examples.sh ]; then
  scripts/ffi-examples.sh
fi
