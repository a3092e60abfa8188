#!/usr/bin/env bash
# Per-kernel device times of one NSA decode layer at real clocks (Nsight Compute, no
# clock locking, no cache flush), on the GPU machine after scripts/gpu-stage.sh:
#   bash .gpu/profile.sh [BATCHxCONTEXT ...]     (default: 1x65536 16x65536 64x65536)
# Prints a table per case (ncu_table.py) and, with $OUT set, keeps ncu's report there.
# The layer is tests/gpu_bench.rs's (paper preset, 64q/4kv 192/128, bf16); the kernels
# are compiled with -lineinfo, so `ncu --set full --import-source yes` attributes stalls
# to lines of the kernel files (kernels/*.cuh).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# The kernel cache: .gpu-cache when carried over (scripts/kernel-cache-stage.sh), else /tmp.
[ -d "$here/../.gpu-cache" ] && kcache="$(cd "$here/../.gpu-cache" && pwd)" || kcache=/tmp/nsa-kernel-cache
export NSA_CUDA_CACHE_DIR="${NSA_CUDA_CACHE_DIR:-$kcache}"
for case in "${@:-1x65536 16x65536 64x65536}"; do
  for c in $case; do
    log="$(mktemp)"
    NSA_BENCH_ONLY="$c" NSA_BENCH_WHAT=nsa timeout 300 ncu --clock-control none --cache-control none \
      --kernel-name regex:"nsa_(append|compress|cmp|select|sw|combine)" --launch-skip 24 --launch-count 6 \
      --section SpeedOfLight --section InstructionStats --section LaunchStats --section WarpStateStats \
      "$here/bin/gpu_bench" --include-ignored --nocapture > "$log" 2>&1
    echo "== batch x context $c"
    # One row per kernel: time, DRAM, cycles, instructions per warp (scripts/ncu_table.py).
    python3 "$here/ncu_table.py" "$log" || tail -20 "$log"
    [ -n "${OUT:-}" ] && cp "$log" "$OUT/ncu_$c.txt"
    rm -f "$log"
  done
done
