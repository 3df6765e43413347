//! The official Python SDKs against a running Warden, with the built-in
//! simulated provider behind it. The test makes its own virtualenv with
//! `openai` and `anthropic` from PyPI unless `WARDEN_E2E_PYTHON` names a
//! Python that has them.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use warden::demo::sim::{SimOptions, SimProvider};
use warden::gateway::Gateway;

pub fn python_with_sdks() -> PathBuf {
    if let Ok(python) = std::env::var("WARDEN_E2E_PYTHON") {
        return PathBuf::from(python);
    }
    let target = PathBuf::from(env!("CARGO_BIN_EXE_warden"))
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let venv = target.join("e2e-venv");
    let python = venv.join("bin/python");
    let has_sdks = |python: &PathBuf| {
        Command::new(python)
            .args(["-c", "import openai, anthropic"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_sdks(&python) {
        let made = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()
            .expect("python3 is needed");
        assert!(made.success(), "could not create {}", venv.display());
        let pip = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "openai", "anthropic"])
            .status()
            .expect("pip runs");
        assert!(pip.success(), "pip install openai anthropic failed");
    }
    python
}

/// A Warden in front of the built-in simulated provider, on the demo's
/// config as `customize` leaves it. Keep the provider alive with the Warden.
pub async fn sim_gateway(
    dir: &std::path::Path,
    customize: impl FnOnce(&mut warden::config::Config),
) -> (SimProvider, Gateway) {
    sim_gateway_paced(dir, std::time::Duration::ZERO, customize).await
}

/// `sim_gateway` whose provider streams one chunk per `chunk_delay`.
pub async fn sim_gateway_paced(
    dir: &std::path::Path,
    chunk_delay: std::time::Duration,
    customize: impl FnOnce(&mut warden::config::Config),
) -> (SimProvider, Gateway) {
    let sim = SimProvider::start(SimOptions { chunk_delay })
        .await
        .unwrap();
    let mut config = warden::demo::demo_config(&sim, &dir.join("w.duckdb"));
    customize(&mut config);
    let gateway = Gateway::start(config).await.unwrap();
    (sim, gateway)
}

/// Runs `tests/e2e/<script>` with the SDKs' Python and the given
/// environment; the script prints one JSON object.
pub async fn run_sdk_script(script: &str, env: Vec<(&'static str, String)>) -> Value {
    let python = tokio::task::spawn_blocking(python_with_sdks).await.unwrap();
    let path = format!("{}/tests/e2e/{script}", env!("CARGO_MANIFEST_DIR"));
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python).arg(path).envs(env).output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn official_sdks_work_unchanged_and_every_call_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (_sim, gateway) = sim_gateway(dir.path(), |_| {}).await;
    let results = run_sdk_script(
        "sdk_check.py",
        vec![
            ("WARDEN_URL", format!("http://{}", gateway.proxy_addr())),
            ("WARDEN_AGENT_KEY", warden::demo::RESEARCHER_KEY.to_owned()),
        ],
    )
    .await;

    assert!(!results["chat"]["text"].as_str().unwrap().is_empty());
    assert!(
        results["chat"]["cost"]
            .as_str()
            .is_some_and(|c| c.starts_with("0.0")),
        "{}",
        results["chat"]
    );
    assert_eq!(
        results["chat_stream"]["chunks_without_choices"], 0,
        "the usage chunk Warden asked for is stripped"
    );
    assert_eq!(results["chat_stream"]["usage_seen"], false);
    assert!(
        results["chat_stream_usage"]["usage"]["prompt_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(results["responses"]["input_tokens"].as_u64().unwrap() > 0);
    assert!(
        results["responses_stream"]["types"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "response.completed")
    );
    assert!(results["messages"]["output_tokens"].as_u64().unwrap() > 0);
    assert!(
        !results["messages_stream"]["text"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    assert!(results["count_tokens"]["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(results["errors"]["openai_bad_key"], 401);
    assert_eq!(results["errors"]["anthropic_bad_key"], 401);
    assert_eq!(results["errors"]["openai_unknown_model"], 404);
    assert_eq!(results["errors"]["anthropic_bad_request"], 400);

    gateway.flush().await;
    let reader = gateway.reader().clone();
    let rows = tokio::task::spawn_blocking(move || {
        reader.query(
            "SELECT endpoint, stream, outcome, usage_source, input_tokens, output_tokens, cost_usd IS NOT NULL FROM calls WHERE outcome = 'ok' ORDER BY ts_start",
            100,
        )
    })
    .await
    .unwrap()
    .unwrap();
    let ok: Vec<Vec<String>> = rows
        .rows
        .iter()
        .map(|r| r.iter().map(|v| v.clone().unwrap_or_default()).collect())
        .collect();
    let shape: Vec<(String, String)> = ok.iter().map(|r| (r[0].clone(), r[1].clone())).collect();
    let expected = [
        ("/v1/chat/completions", "false"),
        ("/v1/chat/completions", "true"),
        ("/v1/chat/completions", "true"),
        ("/v1/responses", "false"),
        ("/v1/responses", "true"),
        ("/v1/messages", "false"),
        ("/v1/messages", "true"),
        ("/v1/messages/count_tokens", "false"),
    ];
    assert_eq!(shape, expected.map(|(a, b)| (a.to_owned(), b.to_owned())));
    for row in &ok {
        assert_eq!(row[3], "provider", "exact usage for {row:?}");
        assert_ne!(row[4], "0", "input tokens for {row:?}");
        assert_eq!(row[6], "true", "priced: {row:?}");
    }
    let chat_call = results["chat"]["call_id"].as_str().unwrap().to_owned();
    let reader = gateway.reader().clone();
    let tokens = tokio::task::spawn_blocking(move || {
        reader.query(
            &format!("SELECT input_tokens, output_tokens FROM calls WHERE call_id = '{chat_call}'"),
            1,
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        tokens.rows[0][0].as_deref(),
        Some(results["chat"]["prompt_tokens"].to_string().as_str())
    );
    assert_eq!(
        tokens.rows[0][1].as_deref(),
        Some(results["chat"]["completion_tokens"].to_string().as_str())
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn official_sdks_wait_for_approvals_and_are_cut_by_halts() {
    use warden::config::{BudgetConfig, OperatorConfig};
    use warden::limits::Period;
    let dir = tempfile::tempdir().unwrap();
    let token = "wt_sdk_supervision_operator";
    let spanned = |s: &str| toml::Spanned::new(0..0, s.to_owned());
    let (_sim, gateway) = sim_gateway_paced(
        dir.path(),
        std::time::Duration::from_millis(150),
        |config| {
            config.operators.push(OperatorConfig {
                name: spanned("olga"),
                token_sha256: spanned(&warden::config::sha256_hex(token)),
                read_only: false,
            });
            // Every call of the writer needs an operator's approval.
            config.budgets.push(BudgetConfig {
                scope: spanned("agent:writer"),
                limit_usd: toml::Spanned::new(0..0, warden::config::Amount::Text("0".into())),
                period: spanned(Period::Day.as_str()),
                on_exceed: Some(spanned("require_approval")),
            });
            config.approvals.timeout_secs = 3;
        },
    )
    .await;
    let results = run_sdk_script(
        "sdk_supervision.py",
        vec![
            ("WARDEN_URL", format!("http://{}", gateway.proxy_addr())),
            ("WARDEN_ADMIN", format!("http://{}", gateway.admin_addr())),
            ("WARDEN_TOKEN", token.to_owned()),
            ("HELD_KEY", warden::demo::WRITER_KEY.to_owned()),
            ("FREE_KEY", warden::demo::RESEARCHER_KEY.to_owned()),
        ],
    )
    .await;
    assert!(
        results["approved"].as_str().is_some_and(|t| !t.is_empty()),
        "{results}"
    );
    assert!(
        results["approved_stream"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{results}"
    );
    assert_eq!(
        results["rejected"]["class"], "PermissionDeniedError",
        "{results}"
    );
    assert_eq!(results["rejected"]["code"], "approval_rejected");
    assert!(
        results["rejected"]["message"]
            .as_str()
            .unwrap()
            .contains("not during the freeze")
    );
    assert_eq!(results["second_decision"]["status"], 409);
    assert!(
        results["second_decision"]["message"]
            .as_str()
            .unwrap()
            .contains("rejected by olga")
    );
    assert_eq!(results["timeout"]["code"], "approval_timeout", "{results}");
    assert_eq!(results["halt_status"], 200);
    assert_eq!(results["streams_raised"], 50, "{results}");
    assert_eq!(results["stream_error_mentions_reason"], true, "{results}");
    assert_eq!(results["after_halt"]["code"], "halted");
    assert_eq!(results["after_resume"], true);

    gateway.flush().await;
    let reader = gateway.reader().clone();
    let outcomes = tokio::task::spawn_blocking(move || {
        reader
            .query(
                "SELECT outcome, count(*) FROM calls GROUP BY outcome ORDER BY outcome",
                100,
            )
            .unwrap()
    })
    .await
    .unwrap();
    let count = |outcome: &str| {
        outcomes
            .rows
            .iter()
            .find(|r| r[0].as_deref() == Some(outcome))
            .and_then(|r| r[1].clone())
    };
    assert_eq!(count("halted").as_deref(), Some("51"), "{outcomes:?}");
    assert_eq!(count("approval_rejected").as_deref(), Some("1"));
    assert_eq!(count("approval_timeout").as_deref(), Some("1"));
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_workflow_run_is_driven_by_agents_using_the_official_sdks() {
    let dir = tempfile::tempdir().unwrap();
    let flows = dir.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(
        flows.join("research_brief.toml"),
        warden::demo::SAMPLE_WORKFLOW,
    )
    .unwrap();
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    let config =
        warden::demo::demo_config_with_workflows(&sim, &dir.path().join("w.duckdb"), Some(&flows));
    let gateway = Gateway::start(config).await.unwrap();
    let results = run_sdk_script(
        "sdk_workflow.py",
        vec![
            ("WARDEN_URL", format!("http://{}", gateway.proxy_addr())),
            ("WARDEN_ADMIN", format!("http://{}", gateway.admin_addr())),
            ("WARDEN_TOKEN", warden::demo::OPERATOR_TOKEN.to_owned()),
            ("RESEARCHER_KEY", warden::demo::RESEARCHER_KEY.to_owned()),
            ("WRITER_KEY", warden::demo::WRITER_KEY.to_owned()),
        ],
    )
    .await;
    let run = &results["run"];
    assert_eq!(run["status"], "succeeded", "{results:#}");
    let step = |id: &str| {
        run["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["step_id"] == id)
            .unwrap()
            .clone()
    };
    // Each step's output is what the SDK saw as the answer.
    for (id, answer) in [
        ("research", "research_answer"),
        ("draft", "draft_answer"),
        ("fact_check", "fact_check_answer"),
    ] {
        assert_eq!(step(id)["output"], results[answer], "{id}");
        assert_eq!(step(id)["status"], "succeeded");
    }
    assert_eq!(step("draft")["agent"], "writer");
    assert_eq!(
        step("fact_check")["agent"],
        "researcher",
        "taken by capability"
    );
    assert_eq!(step("approve")["agent"], "demo-operator");
    assert_eq!(step("publish")["agent"], "warden");
    // The fact-check's instructions were rendered from research's output.
    let instructions = results["work"]["fact_check"]["instructions"]
        .as_str()
        .unwrap();
    assert!(instructions.contains(results["research_answer"].as_str().unwrap()));
    gateway.flush().await;
    let reader = gateway.reader().clone();
    let run_id = results["run_id"].as_str().unwrap().to_owned();
    let bound = tokio::task::spawn_blocking(move || {
        reader
            .query(
                &format!("SELECT string_agg(step_id || '@' || agent, ',' ORDER BY ts_start) FROM calls WHERE run_id = '{run_id}'"),
                10,
            )
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        bound.rows[0][0].as_deref(),
        Some("research@researcher,draft@writer,fact_check@researcher,publish@warden")
    );
    gateway.shutdown().await;
}
