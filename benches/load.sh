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
# own ports and store) take turns ROUNDS times, and every Warden turn sits
# between two nginx turns: this box's speed drifts by a fifth from one
# minute to the next, so a target is compared with the mean of the nginx
# runs right before and right after it (a drift that is steady over the
# pair cancels). Figures are the medians of those per-turn ratios; each
# round's ratios are printed too. An A/A check (the same Warden as both
# targets of such pairs) put single pairs within +-8 % and the median of
# ten within +-1 %.
#
#     benches/load.sh                # 32 connections, 8 s per turn, 5 rounds
#     CONNECTIONS=64 DURATION=15 ROUNDS=7 benches/load.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CONNECTIONS="${CONNECTIONS:-32}"
DURATION="${DURATION:-8}"
THREADS="${THREADS:-2}"
ROUNDS="${ROUNDS:-5}"
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
append_limits_and_budgets "$WORK/warden-limits.toml"
# The same Warden with the shipped cost_gate and model_allowlist policies,
# both allowing every call of the run (each call still runs both modules).
sed -e 's/18083/18087/; s/18084/18088/; s#warden.duckdb#warden-policies.duckdb#' "$WORK/warden.toml" > "$WORK/warden-policies.toml"
append_shipped_policies "$WORK/warden-policies.toml"
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
WARDENS="warden warden_limits warden_policies warden_run_bound"
TARGETS="nginx_proxy_pass $WARDENS"
port_of() { case "$1" in warden) echo 18083;; warden_limits) echo 18085;; warden_policies) echo 18087;; warden_run_bound) echo 18089;; esac; }
NGINX_TURN=0
nginx_turn() {
    NGINX_TURN=$((NGINX_TURN + 1))
    run "nginx_proxy_pass.$NGINX_TURN" http://127.0.0.1:18082/v1/chat/completions
}
nginx_turn
for round in $(seq "$ROUNDS"); do
    for target in $WARDENS; do
        lua="$WORK/post.lua"
        if [ "$target" = warden_run_bound ]; then run_lua "$round"; lua="$WORK/post-run.$round.lua"; fi
        run "$target.$round" "http://127.0.0.1:$(port_of "$target")/v1/chat/completions" "$lua"
        [ "$target" = warden ] && SENT=$((SENT + $(cut -d' ' -f4 "$WORK/warden.$round.res")))
        echo "$NGINX_TURN" > "$WORK/$target.$round.before"
        nginx_turn
    done
done
# Per turn: the target's req/s over the mean of the nginx turns around it,
# its p99 over theirs. Medians over the rounds, req/s and p99 in ms.
python3 - "$WORK" "$ROUNDS" "$NGINX_TURN" $WARDENS > "$WORK/ratios.txt" <<'PY'
import statistics, sys
work, rounds, turns, targets = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
def ms(text):
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
def res(name):
    rps, p50, p99, total = open(f"{work}/{name}.res").read().split()
    return float(rps), ms(p50), ms(p99), int(total)
nginx = [res(f"nginx_proxy_pass.{t}") for t in range(1, turns + 1)]
ratios = {t: [] for t in targets}
for r in range(1, rounds + 1):
    line = f"round {r}, throughput (p99) / nginx proxy_pass around it:"
    for t in targets:
        before = int(open(f"{work}/{t}.{r}.before").read())
        around = (nginx[before - 1], nginx[before])
        n_rps = sum(x[0] for x in around) / 2
        n_p99 = sum(x[2] for x in around) / 2
        rps, _, p99, _ = res(f"{t}.{r}")
        ratios[t].append((rps / n_rps, p99 / n_p99))
        line += f" {t} {rps / n_rps:.2f} ({p99 / n_p99:.2f})"
    print(line)
def summary(name, rows):
    return (statistics.median(x[0] for x in rows), statistics.median(x[1] for x in rows),
            statistics.median(x[2] for x in rows), sum(x[3] for x in rows))
medians = {"nginx_proxy_pass": summary("nginx_proxy_pass", nginx)}
for t in targets:
    medians[t] = summary(t, [res(f"{t}.{r}") for r in range(1, rounds + 1)])
    tput = statistics.median(x[0] for x in ratios[t])
    p99 = statistics.median(x[1] for x in ratios[t])
    print(f"median ratio {t} {tput:.2f} {p99:.2f}")
for name, (rps, p50, p99, total) in medians.items():
    print(f"median {name} {rps:.2f} {p50:.3f}ms {p99:.3f}ms {total}")
PY
grep '^round' "$WORK/ratios.txt"
for target in $TARGETS; do
    grep "^median $target " "$WORK/ratios.txt" | cut -d' ' -f3- > "$WORK/$target.res"
done
ratio_of() { grep "^median ratio $1 " "$WORK/ratios.txt" | cut -d' ' -f4-; }

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
read -r W_RPS W_P50 W_P99 _ < "$WORK/warden.res"
read -r N_RPS N_P50 N_P99 _ < "$WORK/nginx_proxy_pass.res"
echo
printf 'medians of %s rounds (each Warden turn over the nginx proxy_pass turns around it):\n' "$ROUNDS"
printf '  nginx proxy_pass %s req/s p99 %s; warden %s req/s p99 %s\n' "$N_RPS" "$N_P99" "$W_RPS" "$W_P99"
read -r W_T W_P <<< "$(ratio_of warden)"
read -r L_T L_P <<< "$(ratio_of warden_limits)"
read -r P_T P_P <<< "$(ratio_of warden_policies)"
read -r R_T R_P <<< "$(ratio_of warden_run_bound)"
echo "warden / nginx proxy_pass throughput: $W_T (p99 $W_P)"
echo "warden with limits / nginx throughput: $L_T (p99 $L_P; calls: $LIMITED_ADMITTED)"
echo "warden with policies / nginx throughput: $P_T (p99 $P_P; calls: $POLICY_CALLS)"
echo "warden with a run bound to every call / nginx throughput: $R_T (p99 $R_P; $RUN_CALLS; last round's step: $RUN_STEP)"
[ -n "$RUN_NOT_OK" ] && echo "run-bound calls that did not end ok: $RUN_NOT_OK"
echo "policies: $POLICY_STATS"
echo "calls recorded by warden: $RECORDED of $SENT answered by wrk (dropped records: $DROPPED)"
echo "warden peak RSS: $((RSS_KB / 1024)) MB"
