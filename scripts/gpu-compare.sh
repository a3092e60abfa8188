#!/usr/bin/env bash
# Before/after benchmark in one GPU call: the same nsa-bench points with a baseline build
# and this build (and this build with the prefill kernels off, which isolates the rest of
# a change), then PyTorch SDPA through scripts/torch_compare.py for the cuDNN ratios.
#
# Here:   scripts/bench-stage.sh                      (this build into .gpu-bench/)
#         and a baseline nsa-bench + libnsa.so in .gpu-base/ (any older build, staged by hand)
# There:  bash scripts/gpu-compare.sh                 (carry .gpu-bench and .gpu-base)
# Env:    NSA_COMPARE_ARGS overrides the nsa-bench points (for prefill-only comparisons of
#         builds, e.g. "--contexts none --prefill 16384,65536 --no-prefill-full" takes about
#         half the device time of the default); NSA_TORCH_ARGS the torch points;
#         NSA_COMPARE_NO_PREFILL_RUN=1 skips the run with the prefill kernels off;
#         NSA_COMPARE_NO_TORCH=1 skips torch_compare.py;
#         NSA_COMPARE_MORE=".gpu-bench-x .gpu-bench-y" adds candidate builds (staged with
#         `scripts/bench-stage.sh .gpu-bench-x`, e.g. from a branch's worktree), each run
#         with the same points after this build;
#         NSA_COMPARE_KNOBS="name:VAR=1[,VAR2=x] ..." adds runs of this build with knobs set
#         (e.g. "pfswmma:NSA_CUDA_PF_SW_MMA=1"), each named by its prefix.
# The JSON records go to $OUT (or .gpu-bench/compare), the text logs into one logs.tgz
# there (the device tool returns at most 8 files); the tables print last.
set -uo pipefail
cd "$(dirname "$0")/.."
o="${OUT:-.gpu-bench/compare}"
mkdir -p "$o"
# The kernel cache: .gpu-cache when carried over (scripts/kernel-cache-stage.sh), else /tmp.
[ -d .gpu-cache ] && kcache="$PWD/.gpu-cache" || kcache=/tmp/nsa-kernel-cache
export NSA_CUDA_CACHE_DIR="${NSA_CUDA_CACHE_DIR:-$kcache}" PYTHONUNBUFFERED=1
args=(${NSA_COMPARE_ARGS:---contexts 65536,131072 --batches 1,16 --reps 15 --prefill 8192,16384,32768,65536})
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$o/gpu.txt"
echo "built from: $(cat .gpu-bench/commit.txt 2>/dev/null || echo unknown) (baseline: $(cat .gpu-base/commit.txt 2>/dev/null || echo unknown))" | tee -a "$o/gpu.txt"
run() { # name dir env...
  local name="$1" dir="$2"; shift 2
  echo "== $name"
  env "$@" "$dir/nsa-bench" --gpu "${args[@]}" --json "$o/$name.json" 2>"$o/$name.err" | tee "$o/$name.md"
  tail -n 3 "$o/$name.err"
}
# An untimed warm-up process first: the first nsa-bench process of a device call has run
# up to 6% slow at some points (docs/DECODE_NOTES.md, thirty-fourth session), which would
# favour every build timed after the base.
echo "== warm-up (untimed)"
.gpu-bench/nsa-bench --gpu --contexts 65536 --batches 1,16 --reps 5 --prefill none >/dev/null 2>&1
[ -x .gpu-base/nsa-bench ] && run base .gpu-base
run new .gpu-bench
# Candidate builds by name: .gpu-bench-x runs as "x".
names=(base new new-no-prefill-kernels)
for d in ${NSA_COMPARE_MORE:-}; do
  n="$(basename "$d")" && n="${n#.gpu-bench-}" && names+=("$n")
  [ -x "$d/nsa-bench" ] && run "$n" "$d"
done
for k in ${NSA_COMPARE_KNOBS:-}; do
  n="${k%%:*}" && names+=("$n")
  IFS=, read -r -a kv <<< "${k#*:}"
  run "$n" .gpu-bench "${kv[@]}"
done
[ "${NSA_COMPARE_NO_PREFILL_RUN:-0}" = 1 ] || run new-no-prefill-kernels .gpu-bench NSA_CUDA_NO_PREFILL=1
if [ "${NSA_COMPARE_NO_TORCH:-0}" != 1 ]; then
  python3 .gpu-bench/torch_compare.py --lib .gpu-bench/libnsa.so ${NSA_TORCH_ARGS:---contexts 65536 --batches 1,16 --prefill 8192,65536} \
    --json "$o/torch.json" 2>"$o/torch.err" | tee "$o/torch.md"
  tail -n 3 "$o/torch.err"
fi
for n in "${names[@]}"; do
  [ -f "$o/$n.md" ] && { echo "== $n"; grep -E '^\|' "$o/$n.md"; }
done
[ -f "$o/torch.md" ] && { echo "== torch"; grep -E '^\|' "$o/torch.md"; }
# Text logs in one archive beside the JSON records.
(cd "$o" && tar czf logs.tgz --remove-files gpu.txt ./*.md ./*.err 2>/dev/null)
