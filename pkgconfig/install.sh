#!/usr/bin/env bash
# Installs the built library with its header, pkg-config file and CMake package:
#
#   PREFIX/lib/libnsa.so.MAJOR.MINOR.PATCH    the library (SONAME libnsa.so.MAJOR)
#   PREFIX/lib/libnsa.so.MAJOR -> libnsa.so.MAJOR.MINOR.PATCH   what programs load
#   PREFIX/lib/libnsa.so -> libnsa.so.MAJOR   what the linker finds for -lnsa
#   PREFIX/lib/libnsa.a
#   PREFIX/include/nsa.h
#   PREFIX/lib/pkgconfig/nsa.pc               pkg-config --cflags --libs nsa
#   PREFIX/lib/cmake/nsa/nsa-config.cmake     find_package(nsa CONFIG): nsa::nsa, nsa::headers
#
# Programs linked through nsa.pc or nsa::nsa get an rpath to PREFIX/lib, so they run
# without LD_LIBRARY_PATH; move the prefix and they need it (or relink).
#
# Usage: pkgconfig/install.sh PREFIX [BUILDDIR]   (BUILDDIR defaults to target/release
# under CARGO_TARGET_DIR or target/; run `cargo build --release` first). The version
# comes from include/nsa.h.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
prefix="${1:?usage: $0 PREFIX [BUILDDIR]}"
builddir="${2:-${CARGO_TARGET_DIR:-$root/target}/release}"
mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"

macro() { sed -n "s/^#define NSA_VERSION_$1 \([0-9]*\)$/\1/p" "$root/include/nsa.h"; }
major="$(macro MAJOR)" minor="$(macro MINOR)" patch="$(macro PATCH)"
[[ -n "$major" && -n "$minor" && -n "$patch" ]] || { echo "no version macros in include/nsa.h" >&2; exit 1; }
version="$major.$minor.$patch"

[[ -f "$builddir/libnsa.so" ]] || { echo "$builddir/libnsa.so not found: run cargo build --release" >&2; exit 1; }
lib="$prefix/lib"
install -d "$lib/pkgconfig" "$lib/cmake/nsa" "$prefix/include"
install -m 755 "$builddir/libnsa.so" "$lib/libnsa.so.$version"
ln -sfn "libnsa.so.$version" "$lib/libnsa.so.$major"
ln -sfn "libnsa.so.$major" "$lib/libnsa.so"
if [[ -f "$builddir/libnsa.a" ]]; then install -m 644 "$builddir/libnsa.a" "$lib/"; fi
install -m 644 "$root/include/nsa.h" "$prefix/include/"

subst() {
  sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" -e "s|@MAJOR@|$major|g" -e "s|@MINOR@|$minor|g" \
    "$root/pkgconfig/$1" >"$2"
}
subst nsa.pc.in "$lib/pkgconfig/nsa.pc"
subst nsa-config.cmake.in "$lib/cmake/nsa/nsa-config.cmake"
subst nsa-config-version.cmake.in "$lib/cmake/nsa/nsa-config-version.cmake"
echo "installed nsa $version into $prefix"
