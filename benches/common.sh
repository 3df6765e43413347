# What the whole-path benches (load.sh, instructions.sh) share: the tools,
# the build, the static upstream, Warden's config and wrk's request.
# Sourced from the repository's root.

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/warden-target}"
KEY="wk_load_harness_key_0123456789"
TOKEN="wt_load_harness_token_0123456789"

# Installs the Debian packages named (commands of the same name) that are
# missing, builds Warden, and sets NGINX and WARDEN (WARDEN_BIN: another build).
bench_setup() {
    local missing=()
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        local packages=("${missing[@]/#nginx/nginx-light}")
        apt-get install -y -qq "${packages[@]}" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "${packages[@]}" >/dev/null; }
    fi
    NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
    cargo build --release --quiet
    WARDEN="${WARDEN_BIN:-$CARGO_TARGET_DIR/release/warden}"
}

# Starts one nginx worker in DIR answering every request on PORT with the
# fixture's real chat completion (or FIXTURE, served as CONTENT_TYPE).
start_static_upstream() { # dir port [fixture content_type]
    local body fixture="${3:-tests/fixtures/openai/chat_completion.json}" type="${4:-application/json}"
    # JSON answers on one line; event streams keep their lines (events end
    # with an empty line).
    if [ "$type" = application/json ]; then
        body="$(tr -d '\n' < "$fixture" | sed "s/'/\\\\'/g")"
    else
        body="$(sed "s/'/\\\\'/g" "$fixture")"$'\n\n'
    fi
    mkdir -p "$1"
    cat > "$1/nginx.conf" <<NGINX
worker_processes 1;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$2;
        location / { default_type $type; return 200 '$body'; }
    }
}
NGINX
    "$NGINX" -p "$1" -c "$1/nginx.conf"
}

stop_nginx() { # dir
    "$NGINX" -p "$1" -c "$1/nginx.conf" -s stop 2>/dev/null || true
}

# Warden on PORT (admin on ADMIN_PORT) in front of the static upstream on
# UPSTREAM_PORT, one agent (KEY) and one operator (TOKEN).
write_warden_config() { # file port admin_port store upstream_port
    cat > "$1" <<TOML
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
store = "$4"

[[upstreams]]
name = "static"
kind = "openai"
base_url = "http://127.0.0.1:$5/v1"
models = ["gpt-*"]

[[agents]]
name = "load"
key_sha256 = "$(printf '%s' "$KEY" | sha256sum | cut -d' ' -f1)"

[[operators]]
name = "bench"
token_sha256 = "$(printf '%s' "$TOKEN" | sha256sum | cut -d' ' -f1)"
TOML
}

# Appends a global rate limit and the agent's and a global budget to a
# Warden config, all far above what a bench spends: every call is checked
# and charged, none refused.
append_limits_and_budgets() { # file
    cat >> "$1" <<TOML

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
}

# Appends the shipped model_allowlist and cost_gate policies to a Warden
# config, both allowing the agent's calls: the allowlist lets its role use
# MODELS (TOML array items), the gate's thresholds are far above their cost.
append_shipped_policies() { # file [models]
    cat >> "$1" <<TOML

[[policies]]
name = "model_allowlist"
module = "$PWD/policies/model_allowlist.wasm"
config = { agent = [${2:-\"gpt-4o*\"}] }

[[policies]]
name = "cost_gate"
module = "$PWD/policies/cost_gate.wasm"
config = { max_call_usd = 1.0, hard_max_usd = 10.0 }
TOML
}

# wrk's script: a small chat completion from the agent.
write_post_lua() { # file
    cat > "$1" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY"
LUA
}

wait_healthy() { # admin_port [tries of 0.1 s]
    for _ in $(seq "${2:-100}"); do
        curl -fs "http://127.0.0.1:$1/healthz" >/dev/null 2>&1 && return
        sleep 0.1
    done
}
