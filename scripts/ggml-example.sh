#!/usr/bin/env bash
# Builds and runs the ggml host example (examples/ggml): ggml's CPU backend from the
# pinned llama-cpp-python source distribution (downloaded and built once, cached under
# build/ggml), NSA as a ggml custom operation in a two-layer decoder, checked against
# the engine called directly. Needs python3 with pip, cmake and a C compiler (.ci/run
# installs them).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
start=$SECONDS
"$root/examples/ggml/build.sh"
"$root/build/examples/ggml/nsa_ggml"
echo "== ggml example: built and ran in $((SECONDS - start)) s"
