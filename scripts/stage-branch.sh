#!/usr/bin/env bash
# Stages a branch's GPU tests and benchmark set beside main's, for one device call that
# tests and compares several builds:
#   scripts/stage-branch.sh BRANCH TAG      ->  .gpu-TAG/ (as scripts/gpu-stage.sh) and
#                                               .gpu-bench-TAG/ (as scripts/bench-stage.sh)
# built in a worktree of BRANCH under /tmp with its own target directory (so main's build
# is not disturbed). On the GPU machine: `bash .gpu-TAG/run.sh` runs its tests, and
# `NSA_COMPARE_MORE=".gpu-bench-TAG" scripts/gpu-compare.sh` times it after main's build.
# Env: NSA_STAGE_BINS="gpu_prefill gpu_decode ..." keeps only those test binaries (the
# device call carries at most 64 MiB). A CARGO_TARGET_DIR shared with the main checkout
# works, but the checkout's next build there must touch its own sources (see below).
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 BRANCH TAG" >&2; exit 2; }
branch="$1" tag="$2"
root="$(cd "$(dirname "$0")/.." && pwd)"
wt="/tmp/nsa-stage-$tag"
git -C "$root" worktree remove --force "$wt" 2>/dev/null || true
git -C "$root" worktree add --detach "$wt" "$branch" >/dev/null
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/nsa-stage-target}"
# cargo records this crate's sources relative to the package root and judges them by
# mtime: a target directory shared with another checkout (or an earlier worktree) can take
# this one's files as up to date and hand back the other's binaries. The worktree's files
# are made newer than anything built before.
find "$wt/src" "$wt/kernels" -type f -exec touch {} +
(cd "$wt" && ./scripts/gpu-stage.sh >/dev/null)
rm -rf "$root/.gpu-$tag" && mv "$wt/.gpu" "$root/.gpu-$tag"
if [ -n "${NSA_STAGE_BINS:-}" ]; then
  for b in "$root/.gpu-$tag"/bin/*; do
    [[ " $NSA_STAGE_BINS " == *" $(basename "$b") "* ]] || rm -f "$b"
  done
fi
(cd "$wt" && ./scripts/bench-stage.sh "$root/.gpu-bench-$tag" >/dev/null)
git -C "$root" worktree remove --force "$wt"
echo "staged $branch ($(cat "$root/.gpu-bench-$tag/commit.txt")): .gpu-$tag ($(du -sh "$root/.gpu-$tag" | cut -f1)), .gpu-bench-$tag"
