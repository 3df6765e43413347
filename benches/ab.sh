#!/usr/bin/env bash
# Two Warden builds (or configurations) compared under the same load on a
# box whose speed drifts: A and B both run in front of one static nginx
# upstream and take alternating turns of wrk; each B turn is divided by the
# mean of the A turns before and after it, and the median of those ratios
# is printed. An A/A run (one build as both) gives single pairs within
# about +-8 % and a median of ten within about +-1 %.
#
#     benches/ab.sh OLD_BIN NEW_BIN             # plain Warden, 10 pairs of 4 s turns
#     POLICIES=1 PAIRS=20 benches/ab.sh OLD NEW # with the shipped cost_gate and model_allowlist
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: benches/ab.sh BIN_A BIN_B" >&2; exit 2; }
BIN_A="$1"
BIN_B="$2"
PAIRS="${PAIRS:-10}"
TURN="${TURN:-4}"
. benches/common.sh
bench_setup nginx wrk

WORK="$(mktemp -d)"
trap 'kill $(cat "$WORK"/*.pid 2>/dev/null) 2>/dev/null || true; stop_nginx "$WORK/upstream"; rm -rf "$WORK"' EXIT
start_static_upstream "$WORK/upstream" 18281
write_post_lua "$WORK/post.lua"
for side in a b; do
    port=$([ "$side" = a ] && echo 18282 || echo 18284)
    write_warden_config "$WORK/$side.toml" "$port" $((port + 1)) "$WORK/$side.duckdb" 18281
    [ -z "${POLICIES:-}" ] || append_shipped_policies "$WORK/$side.toml"
done
"$BIN_A" serve --config "$WORK/a.toml" 2>"$WORK/a.log" & echo $! > "$WORK/a.pid"
"$BIN_B" serve --config "$WORK/b.toml" 2>"$WORK/b.log" & echo $! > "$WORK/b.pid"
wait_healthy 18283 600
wait_healthy 18285 600

turn() { # port [seconds] -> req/s
    wrk -t2 -c32 -d"${2:-$TURN}s" -s "$WORK/post.lua" "http://127.0.0.1:$1/v1/chat/completions" | awk '/Requests\/sec/ {print $2}'
}
turn 18282 2 >/dev/null
turn 18284 2 >/dev/null
TURNS=("$(turn 18282)")
for _ in $(seq "$PAIRS"); do
    TURNS+=("$(turn 18284)" "$(turn 18282)")
done
python3 - "${TURNS[@]}" <<'PY'
import statistics, sys
turns = [float(x) for x in sys.argv[1:]]
ratios = [turns[i] / ((turns[i - 1] + turns[i + 1]) / 2) for i in range(1, len(turns) - 1, 2)]
print("A req/s:", " ".join(f"{x:.0f}" for x in turns[0::2]))
print("B / A:  ", " ".join(f"{x:.2f}" for x in ratios))
print(f"median B / A: {statistics.median(ratios):.3f}")
PY
