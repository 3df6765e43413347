#!/usr/bin/env bash
# The whole-path load harness: in one run on this box, the same wrk load
# against (1) a static nginx upstream that returns a real chat completion,
# (2) nginx proxy_pass in front of it (a second nginx), (3) Warden in front of it (metering
# and recording on), then alone: (4) Warden with rate limits and budgets,
# (5) Warden with the cost_gate and model_allowlist policies, (6) Warden with
# every call bound to a workflow run's step (x-warden-run / x-warden-step:
# the step's spend is kept and its budget checked per call). Prints req/s,
# p50 and p99 for each, the Warden/nginx ratios, whether every Warden call
# reached the store, and Warden's peak RSS.
#
# nginx proxy_pass and Warden take turns ROUNDS times (this box's speed
# drifts by a fifth between runs a minute apart); their figures are the
# medians of the rounds, and each round's ratio is printed too.
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
"$WARDEN" serve --config "$WORK/warden.toml" 2>"$WORK/warden.log" &
echo $! > "$WORK/warden.pid"
WARDEN_PID="$(cat "$WORK/warden.pid")"
wait_healthy 18084

write_post_lua "$WORK/post.lua"

run() { # name url
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$WORK/post.lua" "$2" > "$WORK/$1.out"
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
}
to_ms() { case "$1" in *us) echo "${1%us} / 1000" | bc -l;; *ms) echo "${1%ms}";; *s) echo "${1%s} * 1000" | bc -l;; esac; }

# Warm up connections and code paths.
wrk -t1 -c8 -d2s -s "$WORK/post.lua" http://127.0.0.1:18083/v1/chat/completions >/dev/null
wrk -t1 -c8 -d2s -s "$WORK/post.lua" http://127.0.0.1:18082/v1/chat/completions >/dev/null
BEFORE="$(WARDEN_TOKEN=$TOKEN "$WARDEN" query "SELECT count(*) FROM calls" --format csv --admin-url http://127.0.0.1:18084 | tail -1)"

echo "wrk: $THREADS threads, $CONNECTIONS connections, ${DURATION}s per target, POST /v1/chat/completions"
printf '%-22s %12s %10s %10s %10s\n' target "req/s" p50 p99 requests
run nginx_static http://127.0.0.1:18081/v1/chat/completions
SENT=0
for round in $(seq "$ROUNDS"); do
    run "nginx_proxy_pass.$round" http://127.0.0.1:18082/v1/chat/completions
    run "warden.$round" http://127.0.0.1:18083/v1/chat/completions
    SENT=$((SENT + $(cut -d' ' -f4 "$WORK/warden.$round.res")))
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
median nginx_proxy_pass > "$WORK/nginx_proxy_pass.res"
median warden > "$WORK/warden.res"
for round in $(seq "$ROUNDS"); do
    read -r n _ np99 _ < "$WORK/nginx_proxy_pass.$round.res"
    read -r w _ wp99 _ < "$WORK/warden.$round.res"
    printf 'round %s: warden / nginx proxy_pass throughput %.2f, p99 %.2f\n' "$round" \
        "$(echo "$w / $n" | bc -l)" "$(echo "$(to_ms "$wp99") / $(to_ms "$np99")" | bc -l)"
done

sleep 1 # one flush interval and more
AFTER="$(WARDEN_TOKEN=$TOKEN "$WARDEN" query "SELECT count(*) FROM calls" --format csv --admin-url http://127.0.0.1:18084 | tail -1)"
RECORDED=$((AFTER - BEFORE))
RSS_KB="$(awk '/VmHWM/ {print $2}' /proc/"$WARDEN_PID"/status)"
DROPPED="$(curl -fs http://127.0.0.1:18084/metrics | awk '/^warden_store_records_dropped_total/ {print $2}')"

# The second Warden runs alone: the first one stops (and stops writing).
kill "$WARDEN_PID"; wait "$WARDEN_PID" 2>/dev/null || true
"$WARDEN" serve --config "$WORK/warden-limits.toml" 2>"$WORK/warden-limits.log" &
echo $! > "$WORK/warden-limits.pid"
wait_healthy 18086
wrk -t1 -c8 -d2s -s "$WORK/post.lua" http://127.0.0.1:18085/v1/chat/completions >/dev/null
run warden_limits http://127.0.0.1:18085/v1/chat/completions
sleep 1

LIMITED_ADMITTED="$(WARDEN_TOKEN=$TOKEN "$WARDEN" query "SELECT count(*) FILTER (WHERE outcome = 'ok') || ' ok, ' || count(*) FILTER (WHERE outcome IN ('rate_limited', 'budget_exceeded')) || ' refused by limits' FROM calls" --format csv --admin-url http://127.0.0.1:18086 | tail -1)"

kill "$(cat "$WORK/warden-limits.pid")"; wait "$(cat "$WORK/warden-limits.pid")" 2>/dev/null || true
"$WARDEN" serve --config "$WORK/warden-policies.toml" 2>"$WORK/warden-policies.log" &
echo $! > "$WORK/warden-policies.pid"
wait_healthy 18088
wrk -t1 -c8 -d2s -s "$WORK/post.lua" http://127.0.0.1:18087/v1/chat/completions >/dev/null
run warden_policies http://127.0.0.1:18087/v1/chat/completions
sleep 1
POLICY_CALLS="$(WARDEN_TOKEN=$TOKEN "$WARDEN" query "SELECT count(*) FILTER (WHERE outcome = 'ok') || ' ok, ' || count(*) FILTER (WHERE outcome = 'denied') || ' denied' FROM calls" --format csv --admin-url http://127.0.0.1:18088 | tail -1)"
POLICY_STATS="$(WARDEN_TOKEN=$TOKEN "$WARDEN" policy list --format csv --admin-url http://127.0.0.1:18088 | awk -F, 'NR > 1 {printf "%s %s evals p50 %s us p99 %s us; ", $1, $5, $8, $9}')"
kill "$(cat "$WORK/warden-policies.pid")"; wait "$(cat "$WORK/warden-policies.pid")" 2>/dev/null || true
"$WARDEN" serve --config "$WORK/warden-runs.toml" 2>"$WORK/warden-runs.log" &
echo $! > "$WORK/warden-runs.pid"
wait_healthy 18090
RUN="$(WARDEN_TOKEN=$TOKEN "$WARDEN" runs start load --admin-url http://127.0.0.1:18090 | tail -1)"
sed -e '$a wrk.headers["x-warden-run"] = "'"$RUN"'"' -e '$a wrk.headers["x-warden-step"] = "work"' "$WORK/post.lua" > "$WORK/post-run.lua"
# Warmed up unbound: wrk stops with calls in flight, and an agent hanging up
# mid-call fails the step it serves (a warm-up bound to the step failed it
# after ~74k calls, so the measured run was not bound at all).
wrk -t1 -c8 -d2s -s "$WORK/post.lua" http://127.0.0.1:18089/v1/chat/completions >/dev/null
cp "$WORK/post.lua" "$WORK/post-plain.lua"; cp "$WORK/post-run.lua" "$WORK/post.lua"
run warden_run_bound http://127.0.0.1:18089/v1/chat/completions
cp "$WORK/post-plain.lua" "$WORK/post.lua"
sleep 1
RUN_CALLS="$(WARDEN_TOKEN=$TOKEN "$WARDEN" query "SELECT count(*) FILTER (WHERE run_id = '$RUN' AND step_id = 'work') || ' of ' || count(*) || ' calls bound to the run step' FROM calls" --format csv --admin-url http://127.0.0.1:18090 | tail -1)"
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
printf 'warden with a run bound to every call / nginx throughput: %.2f (p99 %.2f; %s; step: %s)\n' "$(echo "$R_RPS / $N_RPS" | bc -l)" "$(echo "$(to_ms "$R_P99") / $(to_ms "$N_P99")" | bc -l)" "$RUN_CALLS" "$RUN_STEP"
[ -n "$RUN_NOT_OK" ] && echo "run-bound calls that did not end ok: $RUN_NOT_OK"
echo "policies: $POLICY_STATS"
echo "calls recorded by warden: $RECORDED of $SENT answered by wrk (dropped records: $DROPPED)"
echo "warden peak RSS: $((RSS_KB / 1024)) MB"
