//! `warden demo`: Warden end to end with nothing but this binary. A
//! simulated provider plays OpenAI and Anthropic on a local port; a real
//! Warden (real listeners, real DuckDB file) sits in front of it; two agents
//! make calls in both formats, streamed and not; then the store is asked
//! what it all cost.

pub mod sim;

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::config::{Config, sha256_hex};
use crate::gateway::{Gateway, StartError};
use crate::store::audit::Verification;
use crate::store::query::QueryResult;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the simulated provider could not start: {0}")]
    Sim(std::io::Error),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("demo call {what} failed: {message}")]
    Call { what: String, message: String },
    #[error("demo query failed: {0}")]
    Query(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The demo agents' keys: they exist only inside the demo and its tests.
pub const RESEARCHER_KEY: &str = "wk_demo_researcher_key_not_secret";
pub const WRITER_KEY: &str = "wk_demo_writer_key_not_secret";

/// The demo's configuration: both upstreams point at the simulated provider.
pub fn demo_config(sim: &sim::SimProvider, store: &Path) -> Config {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
store = "{store}"

[[upstreams]]
name = "sim-openai"
kind = "openai"
base_url = "{openai}"
models = ["gpt-*", "o3*", "o4*", "text-embedding-*"]

[[upstreams]]
name = "sim-anthropic"
kind = "anthropic"
base_url = "{anthropic}"
models = ["claude-*"]

[[agents]]
name = "researcher"
key_sha256 = "{researcher}"
role = "worker"
capabilities = ["research", "fact-checking"]

[[agents]]
name = "writer"
key_sha256 = "{writer}"
role = "worker"
capabilities = ["writing"]
"#,
        store = store.display().to_string().replace('\\', "\\\\"),
        openai = sim.openai_base_url(),
        anthropic = sim.anthropic_base_url(),
        researcher = sha256_hex(RESEARCHER_KEY),
        writer = sha256_hex(WRITER_KEY),
    );
    Config::parse(&text, Path::new("<demo config>")).expect("the demo config is valid")
}

struct DemoCall {
    agent: &'static str,
    key: &'static str,
    path: &'static str,
    body: Value,
}

fn demo_calls() -> Vec<DemoCall> {
    let chat = |model: &str, stream: bool, text: &str| {
        json!({"model": model, "stream": stream, "messages": [
            {"role": "system", "content": "You are a careful research assistant."},
            {"role": "user", "content": text}]})
    };
    let message = |model: &str, stream: bool, text: &str| json!({"model": model, "max_tokens": 512, "stream": stream, "messages": [{"role": "user", "content": text}]});
    vec![
        DemoCall {
            agent: "researcher",
            key: RESEARCHER_KEY,
            path: "/v1/chat/completions",
            body: chat(
                "gpt-4o-mini",
                false,
                "List three sources on AI agent governance.",
            ),
        },
        DemoCall {
            agent: "researcher",
            key: RESEARCHER_KEY,
            path: "/v1/chat/completions",
            body: chat(
                "gpt-4o",
                true,
                "Summarise the strongest source in two sentences.",
            ),
        },
        DemoCall {
            agent: "researcher",
            key: RESEARCHER_KEY,
            path: "/v1/responses",
            body: json!({"model": "gpt-4.1", "stream": true, "input": "Which claims need a fact-check?"}),
        },
        DemoCall {
            agent: "researcher",
            key: RESEARCHER_KEY,
            path: "/v1/embeddings",
            body: json!({"model": "text-embedding-3-small", "input": ["agent governance", "cost controls"]}),
        },
        DemoCall {
            agent: "writer",
            key: WRITER_KEY,
            path: "/v1/messages",
            body: message(
                "claude-sonnet-4-5",
                false,
                "Draft a 100-word brief on agent governance.",
            ),
        },
        DemoCall {
            agent: "writer",
            key: WRITER_KEY,
            path: "/v1/messages",
            body: message("claude-haiku-4-5", true, "Suggest a title for the brief."),
        },
        DemoCall {
            agent: "writer",
            key: WRITER_KEY,
            path: "/v1/chat/completions",
            body: json!({"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "Polish the title."}]}),
        },
    ]
}

/// Runs the demo, writing its report to `out`.
pub async fn run(store: PathBuf, out: &mut dyn Write) -> Result<(), DemoError> {
    let sim = sim::SimProvider::start(sim::SimOptions::default())
        .await
        .map_err(DemoError::Sim)?;
    let gateway = Gateway::start(demo_config(&sim, &store)).await?;
    writeln!(
        out,
        "Warden demo: simulated provider at {}, Warden at http://{}/v1",
        sim.addr(),
        gateway.proxy_addr()
    )?;
    writeln!(out, "store: {}\n", store.display())?;

    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    writeln!(
        out,
        "{:<11} {:<21} {:<24} {:>6} {:>6}  cost (x-warden-cost-usd)",
        "agent", "endpoint", "model", "stream", "status"
    )?;
    for call in demo_calls() {
        let model = call.body["model"].as_str().unwrap_or("").to_owned();
        let stream = call.body["stream"].as_bool().unwrap_or(false);
        let what = format!("{} {} {model}", call.agent, call.path);
        let request = Request::post(format!("http://{}{}", gateway.proxy_addr(), call.path))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, format!("Bearer {}", call.key))
            .header("anthropic-version", "2023-06-01")
            .body(Full::new(Bytes::from(call.body.to_string())))
            .map_err(|e| DemoError::Call {
                what: what.clone(),
                message: e.to_string(),
            })?;
        let response = client.request(request).await.map_err(|e| DemoError::Call {
            what: what.clone(),
            message: e.to_string(),
        })?;
        let status = response.status();
        let cost = response
            .headers()
            .get("x-warden-cost-usd")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| DemoError::Call {
                what: what.clone(),
                message: e.to_string(),
            })?
            .to_bytes();
        if !status.is_success() {
            return Err(DemoError::Call {
                what,
                message: format!("{status}: {}", String::from_utf8_lossy(&body)),
            });
        }
        let shown = cost.map_or_else(|| "in the store (streamed)".to_owned(), |c| format!("${c}"));
        writeln!(
            out,
            "{:<11} {:<21} {:<24} {:>6} {:>6}  {shown}",
            call.agent,
            call.path,
            model,
            stream,
            status.as_u16()
        )?;
    }
    gateway.flush().await;

    let reader = gateway.reader().clone();
    let queries = [
        (
            "Cost by agent",
            "SELECT agent, calls, input_tokens, output_tokens, cost_usd FROM cost_by_agent",
        ),
        (
            "Cost by model",
            "SELECT provider, model, calls, input_tokens, output_tokens, cost_usd FROM cost_by_model",
        ),
        (
            "Calls",
            "SELECT agent, endpoint, model, stream, outcome, input_tokens AS input, output_tokens AS output, usage_source, cost_usd, round(latency_ms, 1) AS latency_ms FROM calls ORDER BY ts_start",
        ),
    ];
    for (title, sql) in queries {
        let reader = reader.clone();
        let result: QueryResult = tokio::task::spawn_blocking(move || reader.query(sql, 100))
            .await
            .map_err(|e| DemoError::Query(e.to_string()))?
            .map_err(|e| DemoError::Query(e.to_string()))?;
        writeln!(out, "\n{title}  (warden query \"{sql}\")")?;
        write!(out, "{}", crate::cli::render_table(&result))?;
    }
    let verification = tokio::task::spawn_blocking(move || reader.verify_audit())
        .await
        .map_err(|e| DemoError::Query(e.to_string()))?
        .map_err(|e| DemoError::Query(e.to_string()))?;
    match verification {
        Verification::Intact { rows, head } => writeln!(
            out,
            "\nAudit chain: intact, {rows} entries, head {}",
            &head[..16]
        )?,
        Verification::Broken { seq, reason } => {
            writeln!(out, "\nAudit chain: BROKEN at seq {seq}: {reason}")?
        }
    }
    gateway.shutdown().await;
    Ok(())
}
