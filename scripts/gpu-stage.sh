#!/usr/bin/env bash
# Builds the GPU test binaries (release, --features cuda) and stages them, stripped of
# debug info, with the runner (scripts/gpu-run.sh) in the git-ignored folder .gpu/.
# Then, on the GPU machine, from the repository root:   bash .gpu/run.sh
# (logs and a summary go to $OUT, or .gpu/out when OUT is unset).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu
mkdir -p .gpu/bin
# The lib's unit-test binary carries the cuda:: unit tests (kernels compile with NVRTC);
# if it does not build (someone's edit in progress), the gpu_* binaries are still staged.
{ cargo test --release --features cuda --no-run --message-format=json --lib --test 'gpu_*' 2>/dev/null || true; } \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
  objcopy --strip-debug "$exe" ".gpu/bin/$name"
  echo "staged .gpu/bin/$name ($(du -h ".gpu/bin/$name" | cut -f1))"
done
ls .gpu/bin/gpu_* >/dev/null 2>&1 || { echo "no gpu_* test binary was built" >&2; exit 1; }
cp scripts/gpu-run.sh .gpu/run.sh
cp scripts/gpu-profile.sh .gpu/profile.sh
cp scripts/ncu_table.py .gpu/ncu_table.py
chmod +x .gpu/run.sh .gpu/bin/*
du -sh .gpu
