#!/usr/bin/env bash
# Compiles the CUDA kernels for the GPU machine here (NVRTC needs no GPU) into the
# git-ignored .gpu-cache/, the on-disk kernel cache the GPU scripts use when it is carried
# over (gpu-run.sh, gpu-profile.sh, gpu-compare.sh and bench-stage.sh's run.sh set
# NSA_CUDA_CACHE_DIR to it): a fresh GPU machine then skips the minute of compiling at its
# first backend. The cache file is named by a hash of the kernel sources, the options and
# the NVRTC version, so it is used only where NVRTC's version matches this one's; elsewhere
# the engine compiles as before (and writes the result there).
#   scripts/kernel-cache-stage.sh [ARCH,...]      (default sm_90a, the H100 / H200)
# Env: NSA_NVRTC_DIR, a `pip install --target` of nvidia-cuda-nvrtc (default .nvrtc, which
# .ci/run fills); CARGO_TARGET_DIR as cargo.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
nvrtc_dir="${NSA_NVRTC_DIR:-.nvrtc}"
lib="$nvrtc_dir/nvidia/cu13/lib"
[ -e "$lib/libnvrtc.so.13" ] || { echo "no NVRTC in $nvrtc_dir (set NSA_NVRTC_DIR)" >&2; exit 1; }
cargo build --release --features cuda --bin nsa-bench >/dev/null
LD_LIBRARY_PATH="$(cd "$lib" && pwd)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  "${CARGO_TARGET_DIR:-$root/target}/release/nsa-bench" --precompile "$root/.gpu-cache" --arch "${1:-sm_90a}"
du -sh .gpu-cache
