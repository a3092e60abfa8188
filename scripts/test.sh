#!/usr/bin/env bash
# Runs every test of the project: the Rust workspace (unit, integration, reference,
# header drift, the C ABI through dlopen, the bounded fuzz run, links in the docs), the
# loom model check, the C / C++ examples under sanitizers, an install used as README.md
# says, valgrind over the C ABI's users, the ggml host example, and that the shipped
# library carries no reference code. Installs nothing (README, Prerequisites).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --release
# README's first command, small (the default build: the CPU backend): the demo finds its
# needle (it exits 3 otherwise) and prints both timings.
demo_out="$(cargo run --release -q -- --tokens 8192 --decode 4)"
echo "$demo_out"
grep -q "result: PASS" <<<"$demo_out"
# The CUDA feature's tests: without a GPU they are reported as ignored (the GPU machine
# runs them with --include-ignored, see docs/GPU_TESTS.md); the ones needing no device run.
cargo test --release --features cuda --lib --bin nsa-bench --test gpu_api --test gpu_decode --test gpu_prefill --test gpu_full --test gpu_bench --test gpu_state --test gpu_lifecycle --test gpu_multi
# The kernels compiled with the engine's own options for sm_90a and sm_80, failing on
# register spills, `cuda::precompile` filling a kernel cache, the timeline's stamped build
# compiling, and nsa-bench's L2 flush kernel: NVRTC needs no GPU.
# NSA_NVRTC_DIR (default .nvrtc, which .ci/run fills) is a `pip install --target` of
# nvidia-cuda-nvrtc (and nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm for the SASS check);
# without one these tests are reported ignored.
nvrtc_dir="${NSA_NVRTC_DIR:-.nvrtc}"
if [ -e "$nvrtc_dir/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  nvrtc_lib="$(cd "$nvrtc_dir/nvidia/cu13/lib" && pwd)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  LD_LIBRARY_PATH="$nvrtc_lib" \
    cargo test --release --features cuda --lib -- --include-ignored kernels_compile_without_spills precompile_fills_the_kernel_cache timeline_kernels_compile
  LD_LIBRARY_PATH="$nvrtc_lib" \
    cargo test --release --features cuda --bin nsa-bench -- --include-ignored flush_kernel_compiles_and_keeps_its_loads
  # The sm_90a kernels' SASS (cuobjdump + nvdisasm from the same pip target): no memory
  # descriptor in an odd uniform register, which the GPU faults on.
  bin_dir="$nvrtc_dir/nvidia/cu13/bin"
  if [ -x "$bin_dir/cuobjdump" ] && [ -x "$bin_dir/nvdisasm" ]; then
    NSA_CUDA_BIN_DIR="$(cd "$bin_dir" && pwd)" LD_LIBRARY_PATH="$nvrtc_lib" \
      cargo test --release --features cuda --lib -- --include-ignored kernels_sass_has_no_odd_descriptor_register
  else
    echo "test cuda::compile::tests::kernels_sass_has_no_odd_descriptor_register ... ignored (no cuobjdump / nvdisasm in $bin_dir)"
  fi
else
  echo "test cuda::compile::tests::kernels_compile_without_spills ... ignored (no NVRTC in $nvrtc_dir; set NSA_NVRTC_DIR)"
  echo "test cuda::compile::tests::precompile_fills_the_kernel_cache ... ignored (no NVRTC in $nvrtc_dir; set NSA_NVRTC_DIR)"
  echo "test cuda::timeline::tests::timeline_kernels_compile ... ignored (no NVRTC in $nvrtc_dir; set NSA_NVRTC_DIR)"
  echo "test flush::tests::flush_kernel_compiles_and_keeps_its_loads ... ignored (no NVRTC in $nvrtc_dir; set NSA_NVRTC_DIR)"
  echo "test cuda::compile::tests::kernels_sass_has_no_odd_descriptor_register ... ignored (no NVRTC in $nvrtc_dir; set NSA_NVRTC_DIR)"
fi
# The GPU scripts' ncu report parser (scripts/gpu-profile.sh uses it on the device), the
# L2 partition probe's latency split (scripts/l2_partition_probe.py) and the stream probe's
# piece orders (scripts/stream_probe.py), the persistent probe's items and the chain probe's
# hand-over tickets (scripts/persist_probe.py, scripts/chain_probe.py), the matrix probe's
# stage layout (scripts/mma_probe.py: its copies against its ldmatrix reads).
python3 scripts/ncu_table.py --self-test
python3 scripts/l2_partition_probe.py --self-test
python3 scripts/stream_probe.py --self-test
python3 scripts/persist_probe.py --self-test
python3 scripts/chain_probe.py --self-test
python3 scripts/mma_probe.py --self-test
# Model-check the CPU worker runner with loom (its own target dir: a different cfg),
# under CARGO_TARGET_DIR when set.
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/loom" cargo test --release --test loom_runner
# C and C++ examples under ASan/UBSan, then everything that crosses the C ABI under valgrind.
scripts/ffi-examples.sh
# Install into a temporary prefix and link, load and run as README.md says.
scripts/install-check.sh
scripts/valgrind.sh
# ggml as the host: NSA as a custom op in a ggml graph (ggml built once, cached in build/ggml).
scripts/ggml-example.sh
# The brute-force reference is a test-only feature: a plain release build has none of it.
cargo build --release --lib
lib_a="${CARGO_TARGET_DIR:-target}/release/libnsa.a"
[ -f "$lib_a" ] || { echo "no $lib_a after the release build" >&2; exit 1; }
if nm -C "$lib_a" 2>/dev/null | grep -q 'nsa::reference'; then
  echo "$lib_a carries nsa::reference code without the reference feature" >&2
  exit 1
fi
echo "== the release library carries no reference code"
