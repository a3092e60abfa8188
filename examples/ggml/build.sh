#!/usr/bin/env bash
# Builds the ggml host example: fetches ggml's source (the llama-cpp-python source
# distribution on PyPI carries llama.cpp under vendor/; pinned by version and sha256),
# builds ggml's CPU backend, then this example against it and the engine.
#
# Everything downloaded or built goes under NSA_GGML_DIR (default build/ggml, git-ignored)
# and is reused by later runs: the archive, ggml's build and its install prefix.
# Needs: python3 with pip (the download), cmake, a C compiler, cargo.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=${NSA_GGML_DIR:-$root/build/ggml}
version=0.3.36
sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
sdist=$work/llama_cpp_python-$version.tar.gz
src=$work/ggml-$version
prefix=$work/prefix-$version
jobs=$(nproc 2>/dev/null || echo 2)
mkdir -p "$work"

if [ ! -f "$sdist" ]; then
  echo "ggml: downloading llama-cpp-python $version (source distribution, ~77 MB)"
  python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
fi
echo "$sha256  $sdist" | sha256sum -c --quiet - || {
  echo "ggml: $sdist does not have the pinned sha256 $sha256; delete it to download again" >&2
  exit 1
}

if [ ! -f "$prefix/.built" ]; then
  rm -rf "$src" "$work/cmake-$version"
  mkdir -p "$src"
  # Only ggml (the CPU backend needs nothing else of llama.cpp).
  tar -xzf "$sdist" -C "$src" --strip-components=4 "llama_cpp_python-$version/vendor/llama.cpp/ggml"
  cp "$root/examples/ggml/ggml.pc.in" "$src/ggml.pc.in"
  cmake -S "$src" -B "$work/cmake-$version" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$prefix" -DCMAKE_INSTALL_LIBDIR=lib -DCMAKE_INSTALL_INCLUDEDIR=include \
    -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=ON \
    -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=ON >"$work/cmake-$version.log"
  cmake --build "$work/cmake-$version" -j"$jobs" >>"$work/cmake-$version.log"
  cmake --install "$work/cmake-$version" >>"$work/cmake-$version.log"
  touch "$prefix/.built"
fi

# The engine: the static library (no run-time search path needed for it), under
# CARGO_TARGET_DIR when set, as the other scripts.
(cd "$root" && cargo build --release --lib --quiet)
target="${CARGO_TARGET_DIR:-$root/target}"
out=$root/build/examples/ggml
mkdir -p "$out"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
${CC:-cc} -std=c11 -O2 -g -Wall -Wextra -Werror -o "$out/nsa_ggml" "$root/examples/ggml/nsa_ggml.c" \
  -I"$root/include" $(pkg-config --cflags ggml) \
  "$target/release/libnsa.a" $(pkg-config --libs ggml) -lpthread -ldl -lm
echo "ggml example: built $out/nsa_ggml (ggml $(pkg-config --modversion ggml) from llama-cpp-python $version)"
