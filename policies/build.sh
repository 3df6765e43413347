#!/usr/bin/env bash
# Rebuilds the shipped policies and plugins from their C sources with
# Debian's clang and lld:
#
#     policies/build.sh                     # writes policies/*.wasm and plugins/*.wasm
#     policies/build.sh OUT_DIR             # writes them under OUT_DIR instead (CI compares)
#     policies/build.sh OUT_DIR FILE.c...   # builds other modules the same way, as OUT_DIR/FILE.wasm
set -euo pipefail
OUT="$(realpath -m "${1:-$(dirname "$0")/..}")"
shift $(( $# > 0 ? 1 : 0 ))
EXTRA=()
for src in "$@"; do EXTRA+=("$(realpath "$src")"); done
cd "$(dirname "$0")/.."
CLANG="${CLANG:-clang}"
FLAGS=(--target=wasm32 -O2 -nostdlib -msimd128 -mbulk-memory -mmutable-globals -Wall -Werror
       -Wl,--no-entry -Wl,--strip-all -Wl,--stack-first -Wl,-z,stack-size=1024
       -Wl,--export=__stack_pointer -Wl,--export=__heap_base -Wl,--export=wd_heap_next)
build() { # source output
    mkdir -p "$(dirname "$2")"
    "$CLANG" "${FLAGS[@]}" -o "$2" "$1"
    echo "built $2"
}
if [ "${#EXTRA[@]}" -gt 0 ]; then
    for src in "${EXTRA[@]}"; do build "$src" "$OUT/$(basename "${src%.c}").wasm"; done
else
    for src in policies/*.c plugins/*.c; do build "$src" "$OUT/${src%.c}.wasm"; done
fi
