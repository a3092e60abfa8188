#!/usr/bin/env bash
# Per-kernel device times of one NSA decode layer at real clocks (Nsight Compute, no
# clock locking, no cache flush), on the GPU machine after scripts/gpu-stage.sh:
#   bash .gpu/profile.sh [BATCHxCONTEXT ...]     (default: 1x65536 16x65536 64x65536)
# The layer is tests/gpu_bench.rs's (paper preset, 64q/4kv 192/128, bf16); the kernels
# are compiled with -lineinfo, so `ncu --set full --import-source yes` attributes stalls
# to lines of the kernel files (kernels/*.cuh).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export NSA_CUDA_CACHE_DIR="${NSA_CUDA_CACHE_DIR:-/tmp/nsa-kernel-cache}"
for case in "${@:-1x65536 16x65536 64x65536}"; do
  for c in $case; do
    log="$(mktemp)"
    NSA_BENCH_ONLY="$c" NSA_BENCH_WHAT=nsa timeout 300 ncu --clock-control none --cache-control none \
      --kernel-name regex:"nsa_(append|compress|cmp|select|sw|combine)" --launch-skip 24 --launch-count 6 \
      --section SpeedOfLight "$here/bin/gpu_bench" --include-ignored --nocapture > "$log" 2>&1
    echo "== batch x context $c: kernel, grid, DRAM % of peak, duration us"
    grep -E "^  nsa_|Duration|DRAM Throughput" "$log" | paste - - - |
      sed -E 's/^ *(nsa_[a-z0-9_]+) \(([0-9]+), ([0-9]+), ([0-9]+)\).*DRAM Throughput *% *([0-9.]+).*Duration *us *([0-9.]+).*/\1 \2x\3x\4 \5 \6/'
    rm -f "$log"
  done
done
