#!/usr/bin/env bash
# Refreshes `.cargo/pgo/warden.profdata`, the profile every build of this
# repository is optimised with (`.cargo/config.toml`): builds Warden with
# instrumentation (in its own target directory), runs real traffic through
# it for a minute, and merges the counts.
#
# The traffic covers what an operator's Warden spends its time on: OpenAI
# and Anthropic calls, whole and streamed, from two agents, with rate
# limits, budgets and the shipped policies on, in front of nginx serving
# the providers' recorded answers. A path no call takes here is compiled
# as cold code, so a new hot path belongs in this list.
#
#     benches/pgo.sh                 # ~45 min cold (DuckDB), then ~2 min
#     SECONDS_PER_PHASE=20 benches/pgo.sh
#
# Needs llvm-profdata that reads rustc's raw profiles (Debian's llvm-19
# does; the script installs it). A stale profile is harmless: functions
# that changed since are compiled without profile data. A new profile
# recompiles every crate once (see .cargo/pgo/rustc).
set -euo pipefail
cd "$(dirname "$0")/.."
PHASE="${SECONDS_PER_PHASE:-8}"
. benches/common.sh
bench_setup nginx wrk
PROFDATA=/usr/lib/llvm-19/bin/llvm-profdata
[ -x "$PROFDATA" ] || apt-get install -y -qq llvm-19 >/dev/null
GEN_TARGET="${PGO_TARGET_DIR:-$HOME/.cache/warden-pgo-gen}"
# A fixed place for the raw counts: the instrumented build's flags, and so
# its artifacts, stay the same from one refresh to the next.
RAW="${PGO_RAW_DIR:-$GEN_TARGET/pgo-raw}"
rm -rf "$RAW"
WORK="$(mktemp -d)"
trap 'kill $(cat "$WORK"/*.pid 2>/dev/null) 2>/dev/null || true; for d in "$WORK"/up-*; do stop_nginx "$d"; done; rm -rf "$WORK"' EXIT

# Instrumented, and without the profile the config's wrapper would add (an
# empty RUSTC_WRAPPER turns it off for this build only).
RUSTC_WRAPPER= RUSTFLAGS="-Cprofile-generate=$RAW" CARGO_TARGET_DIR="$GEN_TARGET" \
    cargo build --release --quiet --bin warden
INSTRUMENTED="$GEN_TARGET/release/warden"

start_static_upstream "$WORK/up-openai" 18181
start_static_upstream "$WORK/up-openai-sse" 18182 tests/fixtures/openai/chat_stream_include_usage.sse text/event-stream
start_static_upstream "$WORK/up-anthropic" 18183 tests/fixtures/anthropic/message.json
start_static_upstream "$WORK/up-anthropic-sse" 18184 tests/fixtures/anthropic/message_stream.sse text/event-stream

write_warden_config "$WORK/warden.toml" 18185 18186 "$WORK/warden.duckdb" 18181
# Its JSON OpenAI upstream routes only gpt-4o-mini: gpt-4o goes to the
# streaming one added below.
sed -i 's/^models = \["gpt-\*"\]$/models = ["gpt-4o-mini"]/' "$WORK/warden.toml"
OTHER_KEY="wk_load_harness_key_second_agent"
cat >> "$WORK/warden.toml" <<TOML

[[agents]]
name = "second"
key_sha256 = "$(printf '%s' "$OTHER_KEY" | sha256sum | cut -d' ' -f1)"
requests_per_minute = 100000000
tokens_per_minute = 100000000000

[[upstreams]]
name = "openai-stream"
kind = "openai"
base_url = "http://127.0.0.1:18182/v1"
models = ["gpt-4o"]

[[upstreams]]
name = "anthropic"
kind = "anthropic"
base_url = "http://127.0.0.1:18183"
models = ["claude-3-7-sonnet-*"]

[[upstreams]]
name = "anthropic-stream"
kind = "anthropic"
base_url = "http://127.0.0.1:18184"
models = ["claude-sonnet-4-*"]
TOML
append_limits_and_budgets "$WORK/warden.toml"
append_shipped_policies "$WORK/warden.toml" '"gpt-4o*", "claude-*"'
# The plain Warden of the load harness, without limits or policies.
write_warden_config "$WORK/plain.toml" 18187 18188 "$WORK/plain.duckdb" 18181

for name in warden plain; do
    "$INSTRUMENTED" serve --config "$WORK/$name.toml" 2>"$WORK/$name.log" &
    echo $! > "$WORK/$name.pid"
done
wait_healthy 18186 600
wait_healthy 18188 600

lua() { # name path body header...
    local file="$WORK/$1.lua" path="$2" body="$3"
    shift 3
    {
        echo 'wrk.method = "POST"'
        echo "wrk.path = \"$path\""
        echo "wrk.body = '$body'"
        echo 'wrk.headers["Content-Type"] = "application/json"'
        for header in "$@"; do echo "$header"; done
    } > "$file"
}
lua openai /v1/chat/completions '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}' \
    "wrk.headers[\"Authorization\"] = \"Bearer $KEY\""
lua openai-stream /v1/chat/completions '{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Say hello"}]}' \
    "wrk.headers[\"Authorization\"] = \"Bearer $OTHER_KEY\""
lua anthropic /v1/messages '{"model":"claude-3-7-sonnet-20250219","max_tokens":64,"messages":[{"role":"user","content":"Say hello"}]}' \
    "wrk.headers[\"x-api-key\"] = \"$KEY\"" 'wrk.headers["anthropic-version"] = "2023-06-01"'
lua anthropic-stream /v1/messages '{"model":"claude-sonnet-4-20250514","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"Say hello"}]}' \
    "wrk.headers[\"x-api-key\"] = \"$OTHER_KEY\"" 'wrk.headers["anthropic-version"] = "2023-06-01"'

phase() { # port script
    wrk -t2 -c32 -d"${PHASE}s" -s "$WORK/$2.lua" "http://127.0.0.1:$1" | awk -v s="$2" '/Requests\/sec/ {print "  " s ": " $2 " req/s"} /Non-2xx/ {print "  " s ": " $0}'
}
echo "training on port 18185 (limits, budgets, policies) and 18187 (plain):"
phase 18187 openai
for script in openai openai-stream anthropic anthropic-stream; do phase 18185 "$script"; done
phase 18187 openai

# A clean stop writes the raw profiles.
for name in warden plain; do kill -TERM "$(cat "$WORK/$name.pid")"; done
for name in warden plain; do
    pid="$(cat "$WORK/$name.pid")"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
done
rm -f "$WORK"/*.pid
mkdir -p .cargo/pgo
# Sparse: functions no call reached keep no counts (they are compiled as
# without a profile, not as cold code), and the file stays ~3 MB.
"$PROFDATA" merge --sparse -o .cargo/pgo/warden.profdata "$RAW"/*.profraw
# Let the wrapper copy it to where rustc reads it (see .cargo/pgo/rustc):
# the next build then recompiles every crate with it.
.cargo/pgo/rustc true --crate-name refresh
ls -l .cargo/pgo/warden.profdata
