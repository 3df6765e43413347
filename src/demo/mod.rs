//! `warden demo`: Warden end to end with nothing but this binary. A
//! simulated provider plays OpenAI and Anthropic on a local port; a real
//! Warden (real listeners, real DuckDB file) sits in front of it and serves
//! the sample workflow of `examples/`. The demo operator starts a run; two
//! simulated agents poll for their steps and do them with model calls in
//! both formats, streamed and not; the operator grants the approval step;
//! Warden sends the publish step itself. Then the run's DAG, the cost
//! tables and the audit check are printed.

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

/// The demo agents' keys and the demo operator's token: they exist only
/// inside the demo and its tests.
pub const RESEARCHER_KEY: &str = "wk_demo_researcher_key_not_secret";
pub const WRITER_KEY: &str = "wk_demo_writer_key_not_secret";
pub const OPERATOR_TOKEN: &str = "wt_demo_operator_token_not_secret";

/// The sample workflow the demo runs (`examples/research_brief.toml`).
pub const SAMPLE_WORKFLOW: &str = include_str!("../../examples/research_brief.toml");

/// The demo's configuration: both upstreams point at the simulated provider.
pub fn demo_config(sim: &sim::SimProvider, store: &Path) -> Config {
    demo_config_with_workflows(sim, store, None)
}

/// The demo's configuration, serving the workflows of `workflows` if given.
pub fn demo_config_with_workflows(
    sim: &sim::SimProvider,
    store: &Path,
    workflows: Option<&Path>,
) -> Config {
    let escape = |p: &Path| p.display().to_string().replace('\\', "\\\\");
    let workflows = workflows
        .map(|dir| format!("\n[workflows]\ndir = \"{}\"\n", escape(dir)))
        .unwrap_or_default();
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

[[operators]]
name = "demo-operator"
token_sha256 = "{operator}"
{workflows}"#,
        store = escape(store),
        openai = sim.openai_base_url(),
        anthropic = sim.anthropic_base_url(),
        researcher = sha256_hex(RESEARCHER_KEY),
        writer = sha256_hex(WRITER_KEY),
        operator = sha256_hex(OPERATOR_TOKEN),
    );
    Config::parse(&text, Path::new("<demo config>")).expect("the demo config is valid")
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One HTTP exchange of the demo, its body as JSON (or text for streams).
pub async fn exchange(
    client: &HttpClient,
    request: Request<Full<Bytes>>,
    what: &str,
) -> Result<(http::StatusCode, http::HeaderMap, Bytes), DemoError> {
    let failed = |message: String| DemoError::Call {
        what: what.to_owned(),
        message,
    };
    let response = client
        .request(request)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| failed(e.to_string()))?
        .to_bytes();
    if !parts.status.is_success() {
        return Err(failed(format!(
            "{}: {}",
            parts.status,
            String::from_utf8_lossy(&body)
        )));
    }
    Ok((parts.status, parts.headers, body))
}

pub fn json_request(
    method: http::Method,
    url: String,
    auth: &str,
    body: &Value,
) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(url)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {auth}"))
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid demo request")
}

/// A simulated agent: polls Warden for its work and does each step with a
/// model call through Warden, in its own style: the researcher calls
/// OpenAI's chat API with the step headers (streamed for a fact-check), the
/// writer Anthropic's messages API, streamed, with no headers at all when
/// `headerless` (Warden binds the call to its only running step).
pub struct SimAgent {
    pub name: &'static str,
    pub key: &'static str,
    pub headerless: bool,
}

impl SimAgent {
    /// Polls and works until `stop` turns true; each poll's items are worked
    /// on concurrently. Says what it does on `log`.
    pub async fn work(
        self,
        base: String,
        client: HttpClient,
        log: tokio::sync::mpsc::UnboundedSender<String>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), DemoError> {
        let SimAgent {
            name,
            key,
            headerless,
        } = self;
        loop {
            let poll = Request::get(format!("{base}/v1/warden/work"))
                .header(header::AUTHORIZATION, format!("Bearer {key}"))
                .body(Full::new(Bytes::new()))
                .expect("a valid demo request");
            let (_, _, body) = exchange(&client, poll, &format!("{name} polls for work")).await?;
            let work: Value = serde_json::from_slice(&body).unwrap_or_default();
            let items = work["work"].as_array().cloned().unwrap_or_default();
            let tasks = items.iter().map(|item| {
                let (base, client, log) = (&base, &client, &log);
                async move {
                    let step = item["step_id"].as_str().unwrap_or("?");
                    let run = item["run_id"].as_str().unwrap_or("?");
                    let instructions = item["instructions"].as_str().unwrap_or("");
                    let _ = log.send(format!("{name:<10} takes `{step}`: {instructions}"));
                    let writer = name == "writer";
                    let (path, body) = if writer {
                        (
                            "/v1/messages",
                            json!({"model": "claude-sonnet-4-5", "max_tokens": 600, "stream": true,
                                   "messages": [{"role": "user", "content": instructions}]}),
                        )
                    } else {
                        (
                            "/v1/chat/completions",
                            json!({"model": if step == "research" { "gpt-4o" } else { "gpt-4o-mini" },
                                   "stream": step != "research",
                                   "messages": [{"role": "system", "content": "You are a careful research assistant."},
                                                {"role": "user", "content": instructions}]}),
                        )
                    };
                    let mut request =
                        json_request(http::Method::POST, format!("{base}{path}"), key, &body);
                    let bound_by = if headerless {
                        "no headers: its only running step"
                    } else {
                        let headers = request.headers_mut();
                        for header_name in ["x-warden-run", "x-warden-step"] {
                            if let Some(value) = item["headers"][header_name]
                                .as_str()
                                .and_then(|v| http::HeaderValue::from_str(v).ok())
                            {
                                headers.insert(header_name, value);
                            }
                        }
                        "x-warden-run / x-warden-step"
                    };
                    let (_, headers, _) =
                        exchange(client, request, &format!("{name} works on `{step}`")).await?;
                    let call = headers
                        .get("x-warden-call-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("?");
                    let _ = log.send(format!(
                        "{name:<10} answered `{step}` of {run} via {path} ({bound_by}); call {call}"
                    ));
                    Ok::<_, DemoError>(())
                }
            });
            for result in futures_util::future::join_all(tasks).await {
                result?;
            }
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                () = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
            }
        }
    }
}

/// Runs the demo, writing its report to `out`.
pub async fn run(store: PathBuf, out: &mut dyn Write) -> Result<(), DemoError> {
    let sim = sim::SimProvider::start(sim::SimOptions::default())
        .await
        .map_err(DemoError::Sim)?;
    let flows = store.with_extension("workflows");
    std::fs::create_dir_all(&flows)?;
    std::fs::write(flows.join("research_brief.toml"), SAMPLE_WORKFLOW)?;
    let gateway = Gateway::start(demo_config_with_workflows(&sim, &store, Some(&flows))).await?;
    let base = format!("http://{}", gateway.proxy_addr());
    let admin = format!("http://{}", gateway.admin_addr());
    writeln!(
        out,
        "Warden demo: simulated provider at {}, Warden at {base}/v1, admin at {admin}",
        sim.addr(),
    )?;
    writeln!(out, "store: {}\n", store.display())?;

    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    // The operator starts the sample workflow (`warden runs start`).
    let (_, _, started) = exchange(
        &client,
        json_request(
            http::Method::POST,
            format!("{admin}/admin/v1/runs"),
            OPERATOR_TOKEN,
            &json!({"workflow": "research_brief", "inputs": {"topic": "AI agent governance", "words": 120}}),
        ),
        "start the sample workflow",
    )
    .await?;
    let started: Value = serde_json::from_slice(&started).unwrap_or_default();
    let run_id = started["run_id"].as_str().unwrap_or("").to_owned();
    writeln!(
        out,
        "demo-operator started run {run_id} of research_brief (research -> draft + fact_check -> approve -> publish)\n"
    )?;

    let (log_tx, mut log_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let agents = [
        SimAgent {
            name: "researcher",
            key: RESEARCHER_KEY,
            headerless: false,
        },
        SimAgent {
            name: "writer",
            key: WRITER_KEY,
            headerless: true,
        },
    ]
    .map(|agent| {
        tokio::spawn(agent.work(
            base.clone(),
            client.clone(),
            log_tx.clone(),
            stop_rx.clone(),
        ))
    });
    drop(log_tx);

    // The operator watches the run and grants the approval step.
    let show = || {
        Request::get(format!("{admin}/admin/v1/runs/{run_id}"))
            .header(header::AUTHORIZATION, format!("Bearer {OPERATOR_TOKEN}"))
            .body(Full::new(Bytes::new()))
            .expect("a valid demo request")
    };
    let mut approved = false;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let run = loop {
        while let Ok(line) = log_rx.try_recv() {
            writeln!(out, "{line}")?;
        }
        let (_, _, body) = exchange(&client, show(), "watch the run").await?;
        let run: Value = serde_json::from_slice::<Value>(&body).unwrap_or_default()["run"].clone();
        if run["status"] != "running" {
            break run;
        }
        let gate = run["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["step_id"] == "approve")
            .and_then(|s| s["approval_id"].as_str())
            .map(str::to_owned);
        if let (false, Some(approval)) = (approved, gate) {
            exchange(
                &client,
                json_request(
                    http::Method::POST,
                    format!("{admin}/admin/v1/approvals/{approval}/approve"),
                    OPERATOR_TOKEN,
                    &json!({"reason": "draft and fact-check look right"}),
                ),
                "approve the gate",
            )
            .await?;
            writeln!(
                out,
                "demo-operator approves {approval} (warden approvals approve)"
            )?;
            approved = true;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(DemoError::Call {
                what: "the sample run".into(),
                message: format!("did not finish within 60 s: {run}"),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let _ = stop_tx.send(true);
    for agent in agents {
        agent.await.map_err(|e| DemoError::Query(e.to_string()))??;
    }
    while let Ok(line) = log_rx.try_recv() {
        writeln!(out, "{line}")?;
    }
    writeln!(
        out,
        "\n{}",
        crate::cli::draw_run(&run, crate::store::record::now_micros())
    )?;
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
            "Steps",
            "SELECT step_id, status, agent, attempts, calls, input_tokens, output_tokens, cost_usd FROM steps ORDER BY started_at",
        ),
        (
            "Calls",
            "SELECT agent, step_id, endpoint, model, stream, outcome, input_tokens AS input, output_tokens AS output, cost_usd, round(latency_ms, 1) AS latency_ms FROM calls ORDER BY ts_start",
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
    let _ = std::fs::remove_dir_all(&flows);
    Ok(())
}
