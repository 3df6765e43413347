#!/usr/bin/env bash
# Instructions per call on the whole path, counted rather than timed:
# Warden runs under valgrind's callgrind (which counts every instruction a
# thread executes, whatever else the machine is doing) in front of the same
# static nginx upstream as `load.sh`, wrk sends a fixed-duration load, and
# the per-thread counts are divided by the calls the store recorded. On a
# shared box whose speed drifts by a fifth between runs, this is the figure
# that tells whether a change to the request path made it cheaper.
#
#     benches/instructions.sh              # 8 connections, 20 s
#     DURATION=40 benches/instructions.sh
#     KEEP=1 benches/instructions.sh       # keep the callgrind files (callgrind_annotate)
#     WARDEN_BIN=/path/to/warden benches/instructions.sh   # another build
#
# Counted in user space only (system calls are not instructions here). The
# SHA-256 of the agent key runs in software under valgrind (it hides the
# SHA extensions), a few thousand instructions more than on the real CPU.
# Policies cannot be counted this way: valgrind cannot reserve the wasm
# engine's memory pool.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNECTIONS="${CONNECTIONS:-8}"
DURATION="${DURATION:-20}"
. benches/common.sh
bench_setup nginx wrk valgrind

WORK="$(mktemp -d)"
trap 'stop_nginx "$WORK"; [ -n "${KEEP:-}" ] || rm -rf "$WORK"' EXIT

start_static_upstream "$WORK" 18091

write_warden_config "$WORK/warden.toml" 18092 18093 "$WORK/warden.duckdb" 18091
write_post_lua "$WORK/post.lua"

valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$WORK/callgrind.%p" \
    "$WARDEN" serve --config "$WORK/warden.toml" 2>"$WORK/warden.log" &
VALGRIND=$!
wait_healthy 18093 1200
wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -s "$WORK/post.lua" http://127.0.0.1:18092/v1/chat/completions | grep "requests in"
CALLS="$(WARDEN_TOKEN=$TOKEN "$WARDEN" query "SELECT count(*) FROM calls WHERE outcome = 'ok'" --format csv --admin-url http://127.0.0.1:18093 | tail -1)"
kill -INT "$VALGRIND"
while kill -0 "$VALGRIND" 2>/dev/null; do sleep 0.5; done

# One file per thread; its first lines name the thread's part.
python3 - "$WORK" "$CALLS" <<'PY'
import glob, re, sys
work, calls = sys.argv[1], int(sys.argv[2])
by_role = {}
for path in glob.glob(f"{work}/callgrind.*-*"):
    text = open(path, errors="replace").read()
    total = int(re.search(r"^summary: (\d+)", text, re.M).group(1))
    if "warden::proxy::pipeline" in text:
        role = "proxy workers"
    elif "warden::store::writer::Writer::run" in text:
        role = "store writer"
    else:
        role = "other threads (start, admin, timers)"
    by_role[role] = by_role.get(role, 0) + total
print(f"{calls} calls recorded")
for role in ("proxy workers", "store writer", "other threads (start, admin, timers)"):
    if role in by_role:
        print(f"  {role:40s} {by_role[role] / calls:10,.0f} instructions per call")
PY
