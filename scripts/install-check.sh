#!/usr/bin/env bash
# Installs the library into a fresh temporary prefix and uses it exactly as README.md
# says: runs README's "Install and link" command block (marked <!-- install-check -->)
# with /opt/nsa replaced by that prefix, with no LD_LIBRARY_PATH. Then checks what the
# block relies on: the SONAME and links, and a CMake project using nsa::nsa (linked) and
# nsa::headers (dlopen) that runs as built. Needs cc, cmake, pkg-config, readelf.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
prefix="$tmp/nsa"
unset LD_LIBRARY_PATH

echo "== README's install-and-link block, into $prefix"
block="$(awk '/<!-- install-check -->/{f=1; next} f && /^```sh/{next} f && /^```/{exit} f' README.md)"
[[ -n "$block" ]] || { echo "README.md has no <!-- install-check --> block" >&2; exit 1; }
# Run from a copy of the examples so the block's relative paths resolve and the build
# leaves nothing in the tree.
mkdir -p "$tmp/work" && cp -r examples include pkgconfig "$tmp/work/"
(cd "$tmp/work" && CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}" bash -euxo pipefail -c \
  "cargo() { (cd '$root' && command cargo \"\$@\"); }; ${block//\/opt\/nsa/$prefix}")

echo "== SONAME and links"
lib="$prefix/lib"
soname="$(readelf -d "$lib/libnsa.so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')"
[[ "$soname" == libnsa.so.0 ]] || { echo "SONAME is '$soname', want libnsa.so.0" >&2; exit 1; }
[[ "$(readlink "$lib/libnsa.so")" == libnsa.so.0 ]] || { echo "libnsa.so does not link to libnsa.so.0" >&2; exit 1; }
[[ "$(readlink "$lib/libnsa.so.0")" == libnsa.so.0.* && -f "$lib/$(readlink "$lib/libnsa.so.0")" ]] \
  || { echo "libnsa.so.0 does not link to the versioned file" >&2; exit 1; }
needed="$(readelf -d "$tmp/work/app" | sed -n 's/.*(NEEDED).*\[\(libnsa[^]]*\)\]/\1/p')"
[[ "$needed" == libnsa.so.0 ]] || { echo "the linked program needs '$needed', want libnsa.so.0" >&2; exit 1; }

echo "== the header's dlopen snippet, as written"
{
  printf '#define _POSIX_C_SOURCE 200112L\n#include <dlfcn.h>\n#include <stdio.h>\n#include "nsa.h"\nint main(void) {\n'
  awk '/^ \* ```c$/{f=1; next} f && /^ \* ```$/{exit} f {sub(/^ \* ?/, ""); print}' "$prefix/include/nsa.h"
  printf '    return api != NULL && api->abi_version == NSA_ABI_VERSION ? 0 : 1;\n}\n'
} >"$tmp/snippet.c"
grep -q nsa_get_api "$tmp/snippet.c" || { echo "no dlopen snippet found in nsa.h" >&2; exit 1; }
cc -std=c99 -Wall -Werror -I"$prefix/include" "$tmp/snippet.c" -o "$tmp/snippet" -Wl,-rpath,"$lib" -ldl
"$tmp/snippet"

echo "== CMake: nsa::nsa and nsa::headers"
mkdir -p "$tmp/cmake"
cat >"$tmp/cmake/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.16)
project(nsa_install_check LANGUAGES C)
find_package(nsa 0.2 CONFIG REQUIRED)
add_executable(linked "$root/examples/c/nsa_example.c")
target_link_libraries(linked PRIVATE nsa::nsa m)
add_executable(plugin "$root/examples/c/plugin.c")
target_link_libraries(plugin PRIVATE nsa::headers)
add_executable(plugin_by_name "$root/examples/c/plugin.c")
target_link_libraries(plugin_by_name PRIVATE nsa::headers)
target_compile_options(plugin_by_name PRIVATE -UNSA_LIBRARY_PATH)
CMAKE
cmake -S "$tmp/cmake" -B "$tmp/cmake/build" -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$tmp/cmake/build" -- -s
"$tmp/cmake/build/linked" >/dev/null
# nsa::headers: NSA_LIBRARY_PATH (the full path), and the rpath for dlopen by name.
"$tmp/cmake/build/plugin" >"$tmp/plugin.out"
grep -q "loaded $lib/libnsa.so.0:" "$tmp/plugin.out" || { cat "$tmp/plugin.out"; echo "nsa::headers: not loaded by NSA_LIBRARY_PATH" >&2; exit 1; }
"$tmp/cmake/build/plugin_by_name" >"$tmp/plugin.out"
grep -q "loaded libnsa.so.0:" "$tmp/plugin.out" || { cat "$tmp/plugin.out"; echo "nsa::headers: dlopen(\"libnsa.so.0\") failed" >&2; exit 1; }
echo "== install check: passed"
