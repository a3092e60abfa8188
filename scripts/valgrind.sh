#!/usr/bin/env bash
# Runs the C and C++ examples (built without sanitizers) and the ffi-tests binaries under
# valgrind memcheck: any invalid read/write, use of uninitialised memory or definite
# leak fails the run. No suppression: the handles the engine writes into caller memory
# have their padding zeroed, so snapshots of an arena read no uninitialised byte.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
build="$root/build/valgrind"
vg=(valgrind -q --error-exitcode=9 --leak-check=full --show-leak-kinds=definite,indirect --errors-for-leak-kinds=definite,indirect)

cargo build --release --lib
lib="$target/release/libnsa.so"

pkgconfig/install.sh "$build/prefix" "$target/release" >/dev/null
export PKG_CONFIG_PATH="$build/prefix/lib/pkgconfig"

echo "== valgrind: C example and dlopen plugin"
make -s -C examples/c BUILD="$build/c" SANITIZE=0 NSA_CFLAGS="$(pkg-config --cflags nsa)" NSA_LIBS="$(pkg-config --libs nsa)" all
"${vg[@]}" "$build/c/nsa_example" >/dev/null
"${vg[@]}" "$build/c/nsa_plugin" "$build/prefix/lib/libnsa.so.0" >/dev/null

echo "== valgrind: C++ example"
cmake -S examples/cpp -B "$build/cpp" -DCMAKE_PREFIX_PATH="$build/prefix" -DNSA_SANITIZE=OFF -DCMAKE_BUILD_TYPE=Debug >/dev/null
cmake --build "$build/cpp" -- -s
"${vg[@]}" "$build/cpp/nsa_cpp_example" >/dev/null

echo "== valgrind: ffi-tests (api, bad_input, roundtrip, state)"
for t in api bad_input roundtrip state; do
  exe=$(cargo test --release -p nsa-ffi-tests --test "$t" --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$t")
  NSA_LIB="$lib" "${vg[@]}" "$exe" --test-threads=2 -q
done
echo "== valgrind: clean"
