#!/usr/bin/env bash
# Runs the staged GPU tests (see scripts/gpu-stage.sh) on the GPU machine:
#   1. every test binary in .gpu/bin (the `nsa` lib binary only for its cuda:: tests);
#   2. compute-sanitizer memcheck and racecheck on gpu_decode, gpu_prefill and gpu_full with
#      NSA_GPU_TEST_SMALL=1 (reduced sizes), and initcheck on one small test of each.
# Prints a short table last; full logs go to $OUT/logs.tgz and $OUT/summary.txt.
# Env: NSA_GPU_PHASES="tests paths window memcheck initcheck racecheck synccheck" (default:
# all but window and synccheck; `paths` runs the non-finite tests under each prefill
# form's knob, below; `window` forces pf_cmp's moving window short, NSA_GPU_SC_WIN
# blocks, default 17, in its forms of NSA_GPU_WS_WARPS consumer warps if set, and runs
# racecheck on the tests NSA_GPU_WINDOW_RACE names), NSA_GPU_FILTER (a test name filter for phase 1), NSA_GPU_SAN_FILTER (filter for
# the sanitizer phases), NSA_GPU_SAN_BINS (which test binaries the sanitizers run),
# NSA_GPU_RACE_SKIP (tests racecheck skips; default the 128k decode test and the 61k
# moving-window prefill test, see below).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-$here/out}"
LOGS="$(mktemp -d)"
mkdir -p "$OUT"
phases="${NSA_GPU_PHASES:-tests paths memcheck initcheck racecheck}"
summary="$OUT/summary.txt"
: > "$summary"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
  command -v nvcc >/dev/null && nvcc --version | tail -1 | sed 's/^/nvcc: /'
} | tee -a "$summary"
# The kernel cache: .gpu-cache when carried over (scripts/kernel-cache-stage.sh), else /tmp.
[ -d "$here/../.gpu-cache" ] && kcache="$(cd "$here/../.gpu-cache" && pwd)" || kcache=/tmp/nsa-kernel-cache
export NSA_CUDA_CACHE_DIR="${NSA_CUDA_CACHE_DIR:-$kcache}"
table=()
run() { # name logfile cmd...
  local name="$1" log="$2"; shift 2
  local t0=$(date +%s.%N)
  "$@" > "$log" 2>&1
  local rc=$?
  local dt=$(python3 -c "print(f'{$(date +%s.%N)-$t0:.1f}')")
  local pass=$(grep -oE 'test result: .* ([0-9]+) passed' "$log" | grep -oE '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
  local fail=$(grep -oE '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
  table+=("$(printf '%-44s rc=%-3s pass=%-3s fail=%-3s %6ss' "$name" "$rc" "$pass" "$fail" "$dt")")
  echo "== $name rc=$rc ($dt s)" | tee -a "$summary"
  grep -oE '(RESULT|BENCH|SKIP:) .*|^test .* FAILED|^---- .*|^thread .* panicked.*|^========= (ERROR|Error|Warning|RACECHECK SUMMARY|ERROR SUMMARY|Invalid|Race|Uninitialized|    (at|Write|Read) ).*' "$log" | head -60 | tee -a "$summary"
  grep -E 'panicked at|assertion' -A3 "$log" | head -30 >> "$summary"
  (cd "$LOGS" && tar czf "$OUT/logs.tgz" .)
}
if [[ " $phases " == *" tests "* ]]; then
  for b in "$here"/bin/*; do
    n=$(basename "$b")
    if [[ "$n" == nsa ]]; then
      # The three NVRTC compile tests need no GPU and run in CI (scripts/test.sh); here the
      # first two took ~190 s of device time (both architectures compiled twice, 2026-12-01)
      # and the timeline's stamped build ~245 s (2026-12-04).
      run "$n (cuda:: unit tests)" "$LOGS/$n.log" "$b" cuda:: --skip cuda::compile::tests::kernels_compile_without_spills \
        --skip cuda::compile::tests::precompile_fills_the_kernel_cache --skip cuda::timeline::tests::timeline_kernels_compile \
        --include-ignored --test-threads=1 --nocapture
    else
      run "$n" "$LOGS/$n.log" "$b" ${NSA_GPU_FILTER:-} --include-ignored --test-threads=1 --nocapture
    fi
  done
fi
# Phase `paths`: the non-finite tests of gpu_lifecycle (tensor-core prefill and decode) with
# each prefill form a knob picks instead of the default (src/cuda/prefill.rs `plan`): a NaN
# or infinite value must reach the outputs the reference says in every one of them
# (kernels/prefill_nonfinite.cuh guards each kernel that shares a K/V tile among rows).
if [[ " $phases " == *" paths "* && -x "$here/bin/gpu_lifecycle" ]]; then
  for k in NSA_CUDA_PF_MMA=1 NSA_CUDA_PF_SEL=0 NSA_CUDA_PF_NO_WS=1 NSA_CUDA_PF_CMP_WINDOW=0 NSA_CUDA_PF_SEL_SHARE=0 NSA_CUDA_PF_WS_WIN=1 NSA_CUDA_PF_SW_MMA=1 NSA_CUDA_PF_SEL_WG=0; do
    run "gpu_lifecycle non_finite ($k)" "$LOGS/paths_$k.log" env "$k" "$here/bin/gpu_lifecycle" non_finite --include-ignored --test-threads=1
  done
fi
# Phase `window`: gpu_prefill with pf_cmp's moving window of block scores forced on and
# short (src/cuda/prefill.rs `plan`; 17 blocks, the shortest a paper-preset tile allows),
# so the paper-preset prefills past ~1,100 tokens move it; then the two paper-preset chunk
# tests (full size: the small ones are too short to move it) under racecheck, which the
# 61k-token case that takes the window by default is too slow for.
if [[ " $phases " == *" window "* && -x "$here/bin/gpu_prefill" ]]; then
  win=(env NSA_CUDA_PF_WS_WIN=1 NSA_CUDA_PF_SC_WIN="${NSA_GPU_SC_WIN:-17}" ${NSA_GPU_WS_WARPS:+NSA_CUDA_PF_WS_WARPS=$NSA_GPU_WS_WARPS})
  wn="window ${NSA_GPU_SC_WIN:-17}${NSA_GPU_WS_WARPS:+, $NSA_GPU_WS_WARPS warps}"
  run "gpu_prefill ($wn)" "$LOGS/window${NSA_GPU_WS_WARPS:-}.log" "${win[@]}" "$here/bin/gpu_prefill" \
    --skip moving_window --include-ignored --test-threads=1 --nocapture
  run "racecheck gpu_prefill ($wn, chunks)" "$LOGS/racecheck_window${NSA_GPU_WS_WARPS:-}.log" timeout "${NSA_GPU_SAN_TIMEOUT:-400}" "${win[@]}" \
    compute-sanitizer --tool racecheck --error-exitcode 99 "$here/bin/gpu_prefill" "${NSA_GPU_WINDOW_RACE:-prefill_chunks_with_decodes_paper}" \
    --include-ignored --test-threads=1 --nocapture
fi
for tool in memcheck initcheck racecheck synccheck; do
  [[ " $phases " == *" $tool "* ]] || continue
  for n in ${NSA_GPU_SAN_BINS:-gpu_decode gpu_prefill gpu_full}; do
    [[ -x "$here/bin/$n" ]] || continue
    filter="${NSA_GPU_SAN_FILTER:-}"
    # initcheck tracks every byte and is slow: one small test per binary by default, and
    # the harness skips downloading the pools (their unused pages are never written).
    skip=0
    if [[ $tool == initcheck ]]; then
      skip=1
      case $n in
        gpu_decode) filter="${NSA_GPU_INIT_FILTER_DECODE:-decode_paper_g16}" ;;
        gpu_prefill) filter="${NSA_GPU_INIT_FILTER_PREFILL:-prefill_chunks_with_decodes_paper}" ;;
        *) filter="${NSA_GPU_INIT_FILTER_FULL:-full_attention_paper_g16}" ;;
      esac
    fi
    extra=()
    [[ $tool == memcheck ]] && extra=(--leak-check no)
    # Racecheck's host memory grows with the launches of a run: the 128k test's 8k-token
    # prefill (128 waves) drove it past 128 GB (OOM-killed, 2026-11-25); it runs under the
    # other tools, and racecheck covers the same kernels in the other tests. The 61k-token
    # moving-window prefill (one size only: smaller ones do not take that form) ran past
    # 150 s and 230 s under racecheck (2026-11-30); it runs under memcheck and synccheck.
    # The names are skipped in every binary (a name a binary lacks skips nothing).
    skip_args=()
    if [[ $tool == racecheck ]]; then
      for t in ${NSA_GPU_RACE_SKIP-decode_long_context_128k_paper_bf16 prefill_one_long_step_moving_window_paper_g4_bf16}; do
        skip_args+=(--skip "$t")
      done
    fi
    run "$tool $n (small) $filter" "$LOGS/${tool}_$n.log" timeout "${NSA_GPU_SAN_TIMEOUT:-400}" env NSA_GPU_TEST_SMALL=1 NSA_GPU_SKIP_POOL_DOWNLOAD=$skip \
      compute-sanitizer --tool "$tool" "${extra[@]}" --error-exitcode 99 "$here/bin/$n" $filter "${skip_args[@]}" --include-ignored --test-threads=1 --nocapture
  done
done
{
  echo
  echo "---------------- summary"
  printf '%s\n' "${table[@]}"
} | tee -a "$summary"
