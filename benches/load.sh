#!/usr/bin/env bash
# The whole-path load harness: in one run on this box, the same wrk load
# against (1) a static nginx upstream that returns a real chat completion,
# (2) nginx proxy_pass in front of it (a second nginx), (3) Warden in front of it (metering
# and recording on), (4) Warden with rate limits and budgets, (5) Warden
# with the cost_gate and model_allowlist policies, (6) Warden with every
# call bound to a workflow run's step (x-warden-run / x-warden-step: the
# step's spend is kept and its budget checked per call). Prints req/s, p50
# and p99 for each, the ratios to nginx proxy_pass, whether every Warden
# call reached the store, and Warden's peak RSS.
#
# nginx proxy_pass and the four Wardens (all started up front, each on its
# own ports and store) take turns ROUNDS times: this box's speed drifts by
# a fifth between runs a minute apart, so a target measured once, minutes
# away from nginx, was as much a measure of the drift as of the target.
# Figures are the medians of the rounds, and each round's ratios to that
# round's nginx are printed too.
#
#     benches/load.sh                # 32 connections, 15 s per target, 3 rounds
#     CONNECTIONS=64 DURATION=30 ROUNDS=5 benches/load.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CONNECTIONS="${CONNECTIONS:-32}"
DURATION="${DURATION:-15}"
THREADS="${THREADS:-2}"
ROUNDS="${ROUNDS:-3}"
. benches/common.sh
bench_setup nginx wrk

WORK="$(mktemp -d)"
trap 'kill $(cat "$WORK"/*.pid 2>/dev/null) 2>/dev/null || true; stop_nginx "$WORK"; stop_nginx "$WORK/upstream"; rm -rf "$WORK"' EXIT

# The upstream and nginx proxy_pass are two nginx instances, as Warden and
# its upstream are two processes: one nginx worker serving both would answer
# its own upstream requests in the same event loop, without the two wake-ups
# per call that any proxy in front of a separate upstream pays.
start_static_upstream "$WORK/upstream" 18081
cat > "$WORK/nginx.conf" <<NGINX
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    upstream static_upstream { server 127.0.0.1:18081; keepalive 128; }
    server {
        listen 127.0.0.1:18082;
        location / {
            proxy_pass http://static_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
NGINX
"$NGINX" -p "$WORK" -c "$WORK/nginx.conf"

write_warden_config "$WORK/warden.toml" 18083 18084 "$WORK/warden.duckdb" 18081
# The same Warden with limits: an agent and a global rate limit, an agent
# and a global budget, all far above what the run spends.
sed -e 's/18083/18085/; s/18084/18086/; s#warden.duckdb#warden-limits.duckdb#' "$WORK/warden.toml" \
    | sed '/^key_sha256/a requests_per_minute = 100000000\ntokens_per_minute = 100000000000' > "$WORK/warden-limits.toml"
cat >> "$WORK/warden-limits.toml" <<TOML

[limits]
requests_per_minute = 100000000

[[budgets]]
scope = "agent:load"
limit_usd = "1000000"
period = "day"

[[budgets]]
scope = "global"
limit_usd = "1000000"
period = "month"
TOML
# The same Warden with the shipped cost_gate and model_allowlist policies,
# both allowing every call of the run (each call still runs both modules).
sed -e 's/18083/18087/; s/18084/18088/; s#warden.duckdb#warden-policies.duckdb#' "$WORK/warden.toml" > "$WORK/warden-policies.toml"
cat >> "$WORK/warden-policies.toml" <<TOML

[[policies]]
name = "model_allowlist"
module = "$PWD/policies/model_allowlist.wasm"
config = { agent = ["gpt-4o*"] }

[[policies]]
name = "cost_gate"
module = "$PWD/policies/cost_gate.wasm"
config = { max_call_usd = 1.0, hard_max_usd = 10.0 }
TOML
# The same Warden serving a one-step workflow whose step stays running
# (complete_on = "explicit"), so that every call of the run is bound to it.
sed -e 's/18083/18089/; s/18084/18090/; s#warden.duckdb#warden-runs.duckdb#' "$WORK/warden.toml" > "$WORK/warden-runs.toml"
mkdir -p "$WORK/flows"
printf '[workflows]\ndir = "%s/flows"\n' "$WORK" >> "$WORK/warden-runs.toml"
cat > "$WORK/flows/load.toml" <<FLOW
name = "load"
[[steps]]
id = "work"
agent = "load"
complete_on = "explicit"
budget_usd = "1000000"
FLOW
start_warden() { # name admin_port
    "$WARDEN" serve --config "$WORK/$1.toml" 2>"$WORK/$1.log" &
    echo $! > "$WORK/$1.pid"
}
start_warden warden 18084
start_warden warden-limits 18086
start_warden warden-policies 18088
start_warden warden-runs 18090
for admin in 18084 18086 18088 18090; do wait_healthy "$admin"; done
WARDEN_PID="$(cat "$WORK/warden.pid")"

write_post_lua "$WORK/post.lua"

run() { # name url [lua]
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "${3:-$WORK/post.lua}" "$2" > "$WORK/$1.out"
    local rps p50 p99 total
    rps="$(awk '/Requests\/sec/ {print $2}' "$WORK/$1.out")"
    p50="$(awk '$1 == "50%" {print $2}' "$WORK/$1.out")"
    p99="$(awk '$1 == "99%" {print $2}' "$WORK/$1.out")"
    total="$(awk '/requests in/ {print $1}' "$WORK/$1.out")"
    printf '%-22s %12s %10s %10s %10s\n' "$1" "$rps" "$p50" "$p99" "$total"
    # wrk gives up on a request after 2 s and reconnects: say so, since
    # Warden records each such call as cancelled by its agent.
    grep -E "Socket errors|Non-2xx" "$WORK/$1.out" | sed "s/^/    $1: /" || true
    echo "$rps $p50 $p99 $total" > "$WORK/$1.res"
    settle
}
# Waits until no Warden uses the CPU: a store writer still committing and
# checkpointing the last target's calls (seconds of work after 15 s at
# full load) would otherwise slow down the next target's turn.
settle() {
    local before after
    for _ in $(seq 60); do
        before="$(cpu_ticks)"; sleep 0.5; after="$(cpu_ticks)"
        [ $((after - before)) -le 2 ] && return
    done
}
cpu_ticks() { # the Wardens' user + system clock ticks so far
    cat "$WORK"/warden*.pid | while read -r pid; do awk '{print $14 + $15}' "/proc/$pid/stat"; done | awk '{s += $1} END {print s}'
}
to_ms() { case "$1" in *us) echo "${1%us} / 1000" | bc -l;; *ms) echo "${1%ms}";; *s) echo "${1%s} * 1000" | bc -l;; esac; }

# Each round binds its calls to a new run of a one-step workflow whose step
# stays running: wrk stops with calls in flight, and an agent hanging up
# mid-call fails the step it serves, so a run serves one round only.
run_lua() { # round -> a post.lua bound to a new run's step
    local run
    run="$(WARDEN_TOKEN=$TOKEN "$WARDEN" runs start load --admin-url http://127.0.0.1:18090 | tail -1)"
    echo "$run" > "$WORK/run.$1"
    sed -e '$a wrk.headers["x-warden-run"] = "'"$run"'"' -e '$a wrk.headers["x-warden-step"] = "work"' "$WORK/post.lua" > "$WORK/post-run.$1.lua"
}

# Warm up connections and code paths (the run-bound Warden unbound, see above).
for port in 18083 18085 18087 18089 18082; do
    wrk -t1 -c8 -d2s -s "$WORK/post.lua" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
done
BEFORE="$(WARDEN_TOKEN=$TOKEN "$WARDEN" query "SELECT count(*) FROM calls" --format csv --admin-url http://127.0.0.1:18084 | tail -1)"

echo "wrk: $THREADS threads, $CONNECTIONS connections, ${DURATION}s per target, POST /v1/chat/completions"
printf '%-22s %12s %10s %10s %10s\n' target "req/s" p50 p99 requests
run nginx_static http://127.0.0.1:18081/v1/chat/completions
SENT=0
TARGETS="nginx_proxy_pass warden warden_limits warden_policies warden_run_bound"
for round in $(seq "$ROUNDS"); do
    run "nginx_proxy_pass.$round" http://127.0.0.1:18082/v1/chat/completions
    run "warden.$round" http://127.0.0.1:18083/v1/chat/completions
    SENT=$((SENT + $(cut -d' ' -f4 "$WORK/warden.$round.res")))
    run "warden_limits.$round" http://127.0.0.1:18085/v1/chat/completions
    run "warden_policies.$round" http://127.0.0.1:18087/v1/chat/completions
    run_lua "$round"
    run "warden_run_bound.$round" http://127.0.0.1:18089/v1/chat/completions "$WORK/post-run.$round.lua"
done
# Medians over the rounds (p99 in ms), kept where the single-run figures were.
median() { # name -> "req/s p50 p99 requests" of the median round by req/s, p99 its median
    python3 - "$WORK" "$1" "$ROUNDS" <<'PY'
import statistics, sys
work, name, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
def ms(text):
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
rows = [open(f"{work}/{name}.{r}.res").read().split() for r in range(1, rounds + 1)]
rps = statistics.median(float(r[0]) for r in rows)
p50 = statistics.median(ms(r[1]) for r in rows)
p99 = statistics.median(ms(r[2]) for r in rows)
print(f"{rps:.2f} {p50:.3f}ms {p99:.3f}ms {sum(int(r[3]) for r in rows)}")
PY
}
for target in $TARGETS; do median "$target" > "$WORK/$target.res"; done
for round in $(seq "$ROUNDS"); do
    read -r n _ np99 _ < "$WORK/nginx_proxy_pass.$round.res"
    line="round $round, throughput (p99) / nginx proxy_pass:"
    for target in warden warden_limits warden_policies warden_run_bound; do
        read -r w _ wp99 _ < "$WORK/$target.$round.res"
        line="$line $target $(printf '%.2f (%.2f)' "$(echo "$w / $n" | bc -l)" "$(echo "$(to_ms "$wp99") / $(to_ms "$np99")" | bc -l)")"
    done
    echo "$line"
done

AFTER="$(WARDEN_TOKEN=$TOKEN "$WARDEN" query "SELECT count(*) FROM calls" --format csv --admin-url http://127.0.0.1:18084 | tail -1)"
RECORDED=$((AFTER - BEFORE))
RSS_KB="$(awk '/VmHWM/ {print $2}' /proc/"$WARDEN_PID"/status)"
DROPPED="$(curl -fs http://127.0.0.1:18084/metrics | awk '/^warden_store_records_dropped_total/ {print $2}')"
LIMITED_ADMITTED="$(WARDEN_TOKEN=$TOKEN "$WARDEN" query "SELECT count(*) FILTER (WHERE outcome = 'ok') || ' ok, ' || count(*) FILTER (WHERE outcome IN ('rate_limited', 'budget_exceeded')) || ' refused by limits' FROM calls" --format csv --admin-url http://127.0.0.1:18086 | tail -1)"
POLICY_CALLS="$(WARDEN_TOKEN=$TOKEN "$WARDEN" query "SELECT count(*) FILTER (WHERE outcome = 'ok') || ' ok, ' || count(*) FILTER (WHERE outcome = 'denied') || ' denied' FROM calls" --format csv --admin-url http://127.0.0.1:18088 | tail -1)"
POLICY_STATS="$(WARDEN_TOKEN=$TOKEN "$WARDEN" policy list --format csv --admin-url http://127.0.0.1:18088 | awk -F, 'NR > 1 {printf "%s %s evals p50 %s us p99 %s us; ", $1, $5, $8, $9}')"
RUN="$(cat "$WORK/run.$ROUNDS")"
RUN_CALLS="$(WARDEN_TOKEN=$TOKEN "$WARDEN" query "SELECT count(*) FILTER (WHERE run_id IS NOT NULL AND step_id = 'work') || ' of ' || count(*) || ' calls bound to a run step' FROM calls" --format csv --admin-url http://127.0.0.1:18090 | tail -1)"
RUN_STEP="$(WARDEN_TOKEN=$TOKEN "$WARDEN" runs show "$RUN" --format json --admin-url http://127.0.0.1:18090 | python3 -c 'import json,sys; s=json.load(sys.stdin)["steps"][0]; print(s["status"], s["calls"], "calls, $" + s["cost_usd"], "" if s["error"] is None else "(" + s["error"] + ")")')"
# Calls that did not end well (a failed call fails the step it serves).
RUN_NOT_OK="$(WARDEN_TOKEN=$TOKEN "$WARDEN" query "SELECT outcome || ' ' || status_code || ': ' || count(*) || ' (' || coalesce(any_value(error), '') || ')' FROM calls WHERE outcome <> 'ok' GROUP BY outcome, status_code" --format csv --admin-url http://127.0.0.1:18090 | tail -n +2 | tr '\n' ';')"
read -r R_RPS _ R_P99 _ < "$WORK/warden_run_bound.res"
read -r L_RPS _ L_P99 _ < "$WORK/warden_limits.res"
read -r P_RPS _ P_P99 _ < "$WORK/warden_policies.res"
read -r W_RPS W_P50 W_P99 _ < "$WORK/warden.res"
read -r N_RPS N_P50 N_P99 _ < "$WORK/nginx_proxy_pass.res"
echo
printf 'medians of %s rounds:\n' "$ROUNDS"
printf '  nginx proxy_pass %s req/s p99 %s; warden %s req/s p99 %s\n' "$N_RPS" "$N_P99" "$W_RPS" "$W_P99"
printf 'warden / nginx proxy_pass throughput: %.2f\n' "$(echo "$W_RPS / $N_RPS" | bc -l)"
printf 'warden / nginx proxy_pass p99:        %.2f\n' "$(echo "$(to_ms "$W_P99") / $(to_ms "$N_P99")" | bc -l)"
printf 'warden with limits / nginx throughput: %.2f (p99 %.2f; calls: %s)\n' "$(echo "$L_RPS / $N_RPS" | bc -l)" "$(echo "$(to_ms "$L_P99") / $(to_ms "$N_P99")" | bc -l)" "$LIMITED_ADMITTED"
printf 'warden with policies / nginx throughput: %.2f (p99 %.2f; calls: %s)\n' "$(echo "$P_RPS / $N_RPS" | bc -l)" "$(echo "$(to_ms "$P_P99") / $(to_ms "$N_P99")" | bc -l)" "$POLICY_CALLS"
printf 'warden with a run bound to every call / nginx throughput: %.2f (p99 %.2f; %s; last round'"'"'s step: %s)\n' "$(echo "$R_RPS / $N_RPS" | bc -l)" "$(echo "$(to_ms "$R_P99") / $(to_ms "$N_P99")" | bc -l)" "$RUN_CALLS" "$RUN_STEP"
[ -n "$RUN_NOT_OK" ] && echo "run-bound calls that did not end ok: $RUN_NOT_OK"
echo "policies: $POLICY_STATS"
echo "calls recorded by warden: $RECORDED of $SENT answered by wrk (dropped records: $DROPPED)"
echo "warden peak RSS: $((RSS_KB / 1024)) MB"
