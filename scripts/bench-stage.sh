#!/usr/bin/env bash
# Builds the CUDA benchmark set into the git-ignored .gpu-bench/ for the GPU machine:
# nsa-bench and nsa-demo (--features cuda), libnsa.so (with CUDA, for the ctypes script),
# scripts/torch_compare.py, and run.sh, which runs them all and prints the tables last.
# On the GPU machine, from the repository root with .gpu-bench/ carried over:
#   bash .gpu-bench/run.sh        (logs and JSON under $OUT, or .gpu-bench/out)
# An argument names another folder (relative to this checkout's root, or absolute): a
# branch's build staged from its worktree beside main's for scripts/gpu-compare.sh, e.g.
#   git worktree add /tmp/wt exp/x && /tmp/wt/scripts/bench-stage.sh "$PWD/.gpu-bench-x"
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
cargo build --release --features cuda --lib --bin nsa-bench --bin nsa-demo
case "${1:-.gpu-bench}" in /*) out="${1}" ;; *) out="$root/${1:-.gpu-bench}" ;; esac
rm -rf "$out" && mkdir -p "$out"
cp "$target/release/nsa-bench" "$target/release/nsa-demo" "$target/release/libnsa.so" scripts/torch_compare.py "$out/"
strip --strip-debug "$out/nsa-bench" "$out/nsa-demo" "$out/libnsa.so"
# What the binaries were built from (the GPU machine's copy of the tree may lack git).
git describe --always --dirty --abbrev=12 > "$out/commit.txt" 2>/dev/null || echo unknown > "$out/commit.txt"
cat >"$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the CUDA benchmark set; NSA_BENCH_ARGS / NSA_TORCH_ARGS override the sizes (decode
# points, then prefill points: T tokens of one fresh sequence in one step). The defaults
# are meant to stay under 6 minutes on an H100.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
o="${OUT:-$here/out}"; mkdir -p "$o"
# The kernel cache: .gpu-cache beside this folder when carried over
# (scripts/kernel-cache-stage.sh), else /tmp.
[ -d "$here/../.gpu-cache" ] && kcache="$(cd "$here/../.gpu-cache" && pwd)" || kcache=/tmp/nsa-kernel-cache
export NSA_CUDA_CACHE_DIR="${NSA_CUDA_CACHE_DIR:-$kcache}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$o/gpu.txt"
"$here/nsa-demo" --backend cuda 2>&1 | tee "$o/demo.txt"
"$here/nsa-bench" --gpu ${NSA_BENCH_ARGS:---contexts 8192,16384,32768,65536,131072 --batches 1,16,64 --reps 15 --prefill 8192,16384,32768,65536} --json "$o/bench.json" 2>"$o/bench.err" | tee "$o/bench.md"
python3 "$here/torch_compare.py" --lib "$here/libnsa.so" ${NSA_TORCH_ARGS:---contexts 8192,65536 --batches 1,16 --prefill 8192,16384,32768,65536} --json "$o/torch.json" 2>"$o/torch.err" | tee "$o/torch.md"
echo "== demo"; tail -4 "$o/demo.txt"; echo "== nsa-bench"; cat "$o/bench.md"; echo "== torch"; cat "$o/torch.md"; tail -n 3 "$o/bench.err" "$o/torch.err"
RUN
chmod +x "$out/run.sh"
du -sh "$out"
