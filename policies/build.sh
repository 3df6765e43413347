#!/usr/bin/env bash
# Rebuilds the shipped policies and plugins from their C sources with
# Debian's clang and lld:
#
#     policies/build.sh            # writes policies/*.wasm and plugins/*.wasm
#     policies/build.sh OUT_DIR    # writes them under OUT_DIR instead (CI compares)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-.}"
CLANG="${CLANG:-clang}"
FLAGS=(--target=wasm32 -O2 -nostdlib -mbulk-memory -mmutable-globals -Wall -Werror
       -Wl,--no-entry -Wl,--strip-all -Wl,-z,stack-size=8192
       -Wl,--export=__stack_pointer -Wl,--export=__heap_base -Wl,--export=wd_heap_next)
for src in policies/*.c plugins/*.c; do
    out="$OUT/${src%.c}.wasm"
    mkdir -p "$(dirname "$out")"
    "$CLANG" "${FLAGS[@]}" -o "$out" "$src"
    echo "built $out"
done
