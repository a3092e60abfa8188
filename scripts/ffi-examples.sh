#!/usr/bin/env bash
# Builds the release library, installs it into a staging prefix (build/ffi-prefix) with
# its pkg-config and CMake package files, then builds and runs, with
# -fsanitize=address,undefined:
#   - the C example (examples/c, Makefile), found through pkg-config;
#   - the C plugin example, which dlopens the library and uses only nsa_get_api;
#   - the C++ example (examples/cpp, CMake), found through find_package(nsa).
# Also compiles include/nsa.h as strict C99 and C++17, included twice.
# Exits non-zero on any failure. Needs cc, c++, make, cmake and pkg-config (README,
# "Prerequisites"); installs nothing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
build="$root/build"
prefix="$build/ffi-prefix"

echo "== cargo build --release (libnsa.so, libnsa.a)"
cargo build --release --lib
pkgconfig/install.sh "$prefix"

echo "== nsa.h as C99 and C++17, included twice"
printf '#include "nsa.h"\n#include "nsa.h"\nint main(void) { return nsa_abi_version() == NSA_ABI_VERSION ? 0 : 1; }\n' >"$build/nsa_h_twice.c"
cc -std=c99 -Wall -Wextra -Werror -pedantic -I"$prefix/include" -fsyntax-only "$build/nsa_h_twice.c"
c++ -std=c++17 -Wall -Wextra -Werror -pedantic -I"$prefix/include" -fsyntax-only -x c++ "$build/nsa_h_twice.c"

# Leak checking covers the worker threads (joined by nsa_cpu_backend_destroy).
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"

echo "== C example (pkg-config: $(pkg-config --modversion nsa))"
make -s -C examples/c BUILD="$build/examples/c" SANITIZE=1 \
  NSA_CFLAGS="$(pkg-config --cflags nsa)" \
  NSA_LIBS="$(pkg-config --libs nsa)" \
  PLUGIN_LIB="$prefix/lib/libnsa.so.0" run

echo "== C++ example (CMake package)"
command -v cmake >/dev/null || { echo "cmake is missing (README, Prerequisites)" >&2; exit 1; }
cmake -S examples/cpp -B "$build/examples/cpp" -DCMAKE_PREFIX_PATH="$prefix" -DNSA_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
cmake --build "$build/examples/cpp" -- -s
"$build/examples/cpp/nsa_cpp_example"
echo "== ffi examples: all passed"
