#!/usr/bin/env bash
# Installs the built library with its header, pkg-config file and CMake package:
#
#   PREFIX/lib/libnsa.so, PREFIX/lib/libnsa.a
#   PREFIX/include/nsa.h
#   PREFIX/lib/pkgconfig/nsa.pc               -> pkg-config --cflags --libs nsa
#   PREFIX/lib/cmake/nsa/nsa-config.cmake     -> find_package(nsa CONFIG), target nsa::nsa
#
# Usage: pkgconfig/install.sh PREFIX [LIBDIR]   (LIBDIR defaults to target/release;
# run `cargo build --release` first). The version comes from include/nsa.h.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
prefix="${1:?usage: $0 PREFIX [LIBDIR]}"
libdir="${2:-${CARGO_TARGET_DIR:-$root/target}/release}"
mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"

macro() { sed -n "s/^#define NSA_VERSION_$1 \([0-9]*\)$/\1/p" "$root/include/nsa.h"; }
major="$(macro MAJOR)" minor="$(macro MINOR)" patch="$(macro PATCH)"
[[ -n "$major" && -n "$minor" && -n "$patch" ]] || { echo "no version macros in include/nsa.h" >&2; exit 1; }
version="$major.$minor.$patch"

[[ -f "$libdir/libnsa.so" ]] || { echo "$libdir/libnsa.so not found: run cargo build --release" >&2; exit 1; }
install -d "$prefix/lib/pkgconfig" "$prefix/lib/cmake/nsa" "$prefix/include"
install -m 755 "$libdir/libnsa.so" "$prefix/lib/"
[[ -f "$libdir/libnsa.a" ]] && install -m 644 "$libdir/libnsa.a" "$prefix/lib/"
install -m 644 "$root/include/nsa.h" "$prefix/include/"

subst() {
  sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" -e "s|@MAJOR@|$major|g" -e "s|@MINOR@|$minor|g" \
    "$root/pkgconfig/$1" >"$2"
}
subst nsa.pc.in "$prefix/lib/pkgconfig/nsa.pc"
subst nsa-config.cmake.in "$prefix/lib/cmake/nsa/nsa-config.cmake"
subst nsa-config-version.cmake.in "$prefix/lib/cmake/nsa/nsa-config-version.cmake"
echo "installed nsa $version into $prefix"
