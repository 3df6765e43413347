//! Wasm policies and plugins through a running Warden: the shipped modules
//! on real calls, failures as decisions, hot reload under load, deploys.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::common::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

fn chat_fixture() -> Reply {
    Reply::json(fixture("openai/chat_completion.json"))
}

fn answer_in_format(seen: &Seen) -> Reply {
    if seen.path.contains("messages") {
        Reply::json(fixture("anthropic/message.json"))
    } else {
        chat_fixture()
    }
}

fn with(extra: String) -> Options {
    Options {
        extra,
        ..Options::default()
    }
}

/// A chat completion by agent `key`, answered through Warden.
async fn ask(tw: &TestWarden, key: &str, model: &str, max_tokens: u64, text: &str) -> Answer {
    tw.post("/v1/chat/completions", key, chat(model, max_tokens, text))
        .await
}

fn chat(model: &str, max_tokens: u64, text: &str) -> String {
    serde_json::json!({
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
    })
    .to_string()
}

const SHIPPED: &str = r#"
[approvals]
mode = "ticket"

[[policies]]
name = "model_allowlist"
module = "POLICIES/model_allowlist.wasm"
config = { researcher = ["gpt-4o*", "claude-*"], "*" = ["gpt-4o-mini"] }

[[policies]]
name = "cost_gate"
module = "POLICIES/cost_gate.wasm"
config = { max_call_usd = 0.05, hard_max_usd = 0.5 }

[[policies]]
name = "secret_guard"
module = "POLICIES/secret_guard.wasm"
include_messages = true
"#;

fn shipped() -> String {
    SHIPPED.replace("POLICIES", &repo("policies").display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_policies_decide_real_calls_in_each_format() {
    let tw = TestWarden::start_with(with(shipped()), answer_in_format).await;

    // alpha is a researcher: gpt-4o is allowed and cheap enough.
    let ok = ask(&tw, AGENT_KEY, "gpt-4o", 100, "hi").await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());

    // beta has the default role: gpt-4o-mini only.
    let denied = ask(&tw, OTHER_AGENT_KEY, "gpt-4o", 100, "hi").await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    let error = &denied.json()["error"];
    assert_eq!(error["code"], "policy_denied");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("model_allowlist") && message.contains("model_not_allowed"),
        "{message}"
    );

    // The same refusal in Anthropic's shape on its endpoint.
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
    let request = tw
        .request("/v1/messages", None)
        .header("x-api-key", OTHER_AGENT_KEY)
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let anthropic = tw.send(request).await;
    assert_eq!(anthropic.status, StatusCode::FORBIDDEN);
    assert_eq!(anthropic.json()["type"], "error");
    assert!(
        anthropic.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("model_not_allowed")
    );

    // 40 000 output tokens of gpt-4o may cost $0.40: above the approval
    // threshold, under the hard limit.
    let approval = ask(&tw, AGENT_KEY, "gpt-4o", 40_000, "hi").await;
    assert_eq!(approval.status, StatusCode::FORBIDDEN);
    assert_eq!(approval.json()["error"]["code"], "approval_pending");
    assert!(approval.header("x-warden-approval-id").is_some());
    let hard = ask(&tw, AGENT_KEY, "gpt-4o", 100_000, "hi").await;
    assert_eq!(hard.json()["error"]["code"], "policy_denied");
    assert!(hard.text().contains("hard_max_usd"), "{}", hard.text());

    let secret = ask(
        &tw,
        AGENT_KEY,
        "gpt-4o",
        100,
        "deploy with AKIAIOSFODNN7EXAMPLE please",
    )
    .await;
    assert_eq!(secret.status, StatusCode::FORBIDDEN);
    assert!(
        secret.text().contains("aws_access_key"),
        "{}",
        secret.text()
    );

    assert_eq!(
        tw.upstream.requests().len(),
        1,
        "only the allowed call left Warden"
    );
    let outcomes = tw
        .query("SELECT outcome, count(*) FROM calls GROUP BY outcome ORDER BY outcome")
        .await;
    let outcomes: Vec<(String, String)> = outcomes
        .rows
        .iter()
        .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
        .collect();
    assert_eq!(
        outcomes,
        [("denied".into(), "5".into()), ("ok".into(), "1".into())]
    );

    // Every decision of a refused call is kept, with the module's hash.
    let rows = tw
        .query("SELECT d.policy, d.policy_hash, d.action, d.rule_id, d.eval_us FROM decisions d JOIN calls c USING (call_id) WHERE c.outcome = 'denied' ORDER BY d.ts, d.policy")
        .await;
    assert!(rows.rows.len() >= 5, "{:?}", rows.rows);
    let hash_of = |policy: &str| sha256_file(&repo(&format!("policies/{policy}.wasm")));
    for row in &rows.rows {
        let policy = row[0].as_deref().unwrap();
        assert_eq!(row[1].as_deref(), Some(hash_of(policy).as_str()), "{row:?}");
    }
    let rules: Vec<&str> = rows.rows.iter().filter_map(|r| r[3].as_deref()).collect();
    for rule in [
        "model_not_allowed",
        "max_call_usd",
        "hard_max_usd",
        "aws_access_key",
    ] {
        assert!(rules.contains(&rule), "{rule} missing from {rules:?}");
    }
    // The allowed call's plain allows are not worth a row.
    let allowed = tw
        .scalar("SELECT count(*) FROM decisions WHERE call_id IN (SELECT call_id FROM calls WHERE outcome = 'ok')")
        .await;
    assert_eq!(allowed.as_deref(), Some("0"));
    let audited = tw
        .scalar("SELECT count(*) FROM audit_log WHERE kind = 'policy_decision' AND actor LIKE 'policy:%'")
        .await
        .unwrap();
    assert_eq!(audited, rows.rows.len().to_string());

    // `warden policy list` numbers through the admin API.
    let listing = tw
        .admin_request(
            Method::GET,
            "/admin/v1/policies",
            Some(READONLY_TOKEN),
            None,
        )
        .await
        .json();
    let gate = listing["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "cost_gate")
        .unwrap()
        .clone();
    assert_eq!(gate["sha256"], hash_of("cost_gate"));
    assert!(gate["evaluations"].as_u64().unwrap() >= 4, "{gate}");
    assert!(gate["p99_us"].as_u64().unwrap() >= gate["p50_us"].as_u64().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_guard_halts_an_agent_that_loops() {
    let extra = format!(
        "[[policies]]\nname = \"runaway_guard\"\nmodule = \"{}\"\nconfig = {{ max_calls_per_minute = 3 }}\n",
        repo("policies/runaway_guard.wasm").display()
    );
    let tw = TestWarden::start_with(with(extra), |_| chat_fixture()).await;
    for _ in 0..3 {
        let ok = ask(&tw, AGENT_KEY, "gpt-4o", 10, "again").await;
        assert_eq!(ok.status, StatusCode::OK);
    }
    let halted = ask(&tw, AGENT_KEY, "gpt-4o", 10, "again").await;
    assert_eq!(halted.status, StatusCode::FORBIDDEN);
    assert_eq!(halted.json()["error"]["code"], "halted");
    assert!(halted.text().contains("made 4 calls"), "{}", halted.text());
    // Another agent is not affected.
    let other = ask(&tw, OTHER_AGENT_KEY, "gpt-4o", 10, "hi").await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(
        tw.scalar("SELECT count(*) FROM calls WHERE outcome = 'halted'")
            .await
            .as_deref(),
        Some("1")
    );
    assert_eq!(
        tw.scalar("SELECT action FROM decisions").await.as_deref(),
        Some("halt_agent")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redact_pii_rewrites_what_leaves_and_nothing_else() {
    let extra = format!(
        "[[plugins]]\nname = \"redact_pii\"\nmodule = \"{}\"\n",
        repo("plugins/redact_pii.wasm").display()
    );
    let tw = TestWarden::start_with(with(extra), |_| chat_fixture()).await;
    let body = r#"{"model":"gpt-4o","stream":false,"messages":[{"role":"user","content":"write to ann@example.org or +44 20 7946 0958"}]}"#;
    let ok = tw.post("/v1/chat/completions", AGENT_KEY, body).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let sent: Value = serde_json::from_slice(&tw.upstream.requests()[0].body).unwrap();
    assert_eq!(
        sent["messages"][0]["content"],
        "write to [email] or [phone]"
    );
    assert_eq!(sent["model"], "gpt-4o");
    // A body without PII goes out byte for byte.
    let clean = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}]}"#;
    tw.post("/v1/chat/completions", AGENT_KEY, clean).await;
    assert_eq!(tw.upstream.requests()[1].body, Bytes::from(clean));
}

/// Each failure mode of a module, behind a running Warden, closed and open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_modules_are_decisions_not_crashes() {
    let mut extra = String::new();
    for (name, file, fail) in [
        ("loop", "endless_loop", "open"),
        ("bomb", "memory_bomb", "open"),
        ("garbage", "garbage_output", "open"),
        ("stateful", "stateful", "closed"),
    ] {
        extra.push_str(&format!(
            "[[policies]]\nname = \"{name}\"\nmodule = \"{}\"\nfail = \"{fail}\"\nmax_memory_mb = 4\n\n",
            repo(&format!("tests/wat/{file}.wat")).display()
        ));
    }
    let tw = TestWarden::start_with(with(extra), |_| chat_fixture()).await;
    // Concurrent calls all get through: the looping module costs each call
    // its deadline, never a stalled worker.
    let tw = Arc::new(tw);
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let tw = tw.clone();
            tokio::spawn(async move { ask(&tw, AGENT_KEY, "gpt-4o", 10, "hi").await })
        })
        .collect();
    for call in calls {
        let answer = call.await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    let rows = tw
        .query("SELECT policy, action, rule_id, reason FROM decisions ORDER BY policy")
        .await;
    let errors_of = |policy: &str| {
        rows.rows
            .iter()
            .filter(|r| r[0].as_deref() == Some(policy))
            .map(|r| {
                (
                    r[1].clone().unwrap(),
                    r[2].clone().unwrap(),
                    r[3].clone().unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    // A looping module uses up its CPU deadline, or, with eight
    // of them on two cores, may hit the wall-clock backstop first.
    for (policy, what) in [
        ("loop", &["CPU deadline", "wall-clock"][..]),
        ("bomb", &["memory cap"]),
        ("garbage", &["malformed decision"]),
    ] {
        let decisions = errors_of(policy);
        assert_eq!(decisions.len(), 8, "{policy}: {decisions:?}");
        for (action, rule, reason) in decisions {
            assert_eq!((action.as_str(), rule.as_str()), ("allow", "policy_error"));
            assert!(
                what.iter().any(|w| reason.contains(w)),
                "{policy}: {reason}"
            );
        }
    }
    assert!(
        errors_of("stateful").is_empty(),
        "no state survived between calls"
    );
    let listing = tw
        .admin_request(
            Method::GET,
            "/admin/v1/policies",
            Some(OPERATOR_TOKEN),
            None,
        )
        .await
        .json();
    let looping = &listing["modules"][0];
    assert_eq!(looping["name"], "loop");
    assert_eq!(
        (looping["timeouts"].as_u64(), looping["errors"].as_u64()),
        (Some(8), Some(8))
    );

    // Closed, the same failure refuses the call.
    let extra = format!(
        "[[policies]]\nname = \"trap\"\nmodule = \"{}\"\n",
        repo("tests/wat/trap.wat").display()
    );
    let closed = TestWarden::start_with(with(extra), |_| chat_fixture()).await;
    let refused = ask(&closed, AGENT_KEY, "gpt-4o", 10, "hi").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.json()["error"]["code"], "policy_error");
    assert!(closed.upstream.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_with_a_forbidden_import_refuses_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        "http://127.0.0.1:9/v1",
        "http://127.0.0.1:9",
        &dir.path().join("w.duckdb"),
        &with(format!(
            "[[policies]]\nname = \"wasi\"\nmodule = \"{}\"\n",
            repo("tests/wat/wasi_import.wat").display()
        )),
    );
    // SAFETY: every test sets the same value.
    unsafe { std::env::set_var(PROVIDER_KEY_ENV, PROVIDER_KEY) };
    let config = warden::config::Config::parse(&text, Path::new("test.toml")).unwrap();
    let error = warden::gateway::Gateway::start(config)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("policy `wasi`"), "{error}");
    assert!(error.contains("wasi_snapshot_preview1.fd_write"), "{error}");
}

/// Swaps a policy file while four clients call without pause, then deploys
/// through the admin API: every answer is a clean allow or deny.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_reload_and_deploy_under_load_fail_no_request() {
    let modules = tempfile::tempdir().unwrap();
    let path = modules.path().join("gate.wasm");
    std::fs::copy(repo("tests/wat/allow_all.wat"), &path).unwrap();
    let extra = format!(
        "[[policies]]\nname = \"gate\"\nmodule = \"{}\"\n",
        path.display()
    );
    let tw = Arc::new(TestWarden::start_with(with(extra), |_| chat_fixture()).await);
    let allow_hash = sha256_file(&path);

    let stop = Arc::new(AtomicBool::new(false));
    let (allowed, denied) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (tw, stop, allowed, denied) =
                (tw.clone(), stop.clone(), allowed.clone(), denied.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let answer = ask(&tw, AGENT_KEY, "gpt-4o", 10, "hi").await;
                    match answer.status {
                        StatusCode::OK => allowed.fetch_add(1, Ordering::Relaxed),
                        StatusCode::FORBIDDEN
                            if answer.json()["error"]["code"] == "policy_denied" =>
                        {
                            denied.fetch_add(1, Ordering::Relaxed)
                        }
                        other => {
                            panic!("a failed request during reload: {other} {}", answer.text())
                        }
                    };
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::copy(repo("tests/wat/deny_all.wat"), &path).unwrap();
    let deny_hash = sha256_file(&path);
    wait_until(|| denied.load(Ordering::Relaxed) > 20).await;

    // A broken file is refused; the deny module keeps serving.
    std::fs::write(&path, b"not wasm at all").unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let before = allowed.load(Ordering::Relaxed);

    // The operator deploys the allow module back; read-only ones may not.
    let wasm = std::fs::read(repo("tests/wat/allow_all.wat")).unwrap();
    let deploy = |token: &'static str, body: Vec<u8>| {
        let tw = tw.clone();
        async move {
            let request = http::Request::post(format!("{}/admin/v1/policies/gate", tw.admin()))
                .header("authorization", format!("Bearer {token}"))
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            tw.send(request).await
        }
    };
    let refused = deploy(READONLY_TOKEN, wasm.clone()).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let garbage = deploy(OPERATOR_TOKEN, b"\0asm garbage".to_vec()).await;
    assert_eq!(
        garbage.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        garbage.text()
    );
    assert_eq!(
        allowed.load(Ordering::Relaxed),
        before,
        "still denying after refusals"
    );
    let deployed = deploy(OPERATOR_TOKEN, wasm).await;
    assert_eq!(deployed.status, StatusCode::OK, "{}", deployed.text());
    assert_eq!(deployed.json()["sha256"], allow_hash);
    wait_until(|| allowed.load(Ordering::Relaxed) > before + 20).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }

    let hashes = tw
        .query("SELECT DISTINCT policy_hash FROM decisions ORDER BY 1")
        .await;
    let hashes: Vec<String> = hashes.rows.iter().map(|r| r[0].clone().unwrap()).collect();
    let mut expected = vec![allow_hash.clone(), deny_hash.clone()];
    expected.sort();
    assert_eq!(hashes, expected);
    let audit = tw
        .query("SELECT actor, kind, subject FROM audit_log WHERE kind LIKE 'module_%' ORDER BY seq")
        .await;
    let audit: Vec<Vec<String>> = audit
        .rows
        .iter()
        .map(|r| r.iter().map(|c| c.clone().unwrap_or_default()).collect())
        .collect();
    for (actor, kind) in [
        ("warden", "module_loaded"),
        ("warden", "module_refused"),
        ("olga", "module_refused"),
        ("olga", "module_loaded"),
    ] {
        let row: Vec<String> = vec![actor.into(), kind.into(), "gate".into()];
        assert!(audit.contains(&row), "{audit:?}");
    }
}

async fn wait_until(condition: impl Fn() -> bool) {
    for _ in 0..200 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the condition never held");
}

#[test]
fn policy_test_runs_a_module_offline() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.json");
    std::fs::write(
        &input,
        r#"{"call":{"agent":"alpha","role":"researcher","model":"gpt-4o","estimated_cost_usd":0.30}}"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_warden"))
        .args(["policy", "test"])
        .arg(repo("policies/cost_gate.wasm"))
        .arg("--input")
        .arg(&input)
        .args(["--config", r#"{"max_call_usd":0.25}"#])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decision: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(decision["action"], "require_approval");
    assert_eq!(decision["rule"], "max_call_usd");
    let timing = String::from_utf8_lossy(&out.stderr);
    assert!(timing.contains("p50") && timing.contains("µs"), "{timing}");

    let body = dir.path().join("body.json");
    std::fs::write(
        &body,
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"mail bo@corp.io"}]}"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_warden"))
        .args(["policy", "test"])
        .arg(repo("plugins/redact_pii.wasm"))
        .arg("--input")
        .arg(&body)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("mail [email]"));
}

/// CI rebuilds the shipped modules from source and they must match.
#[test]
fn shipped_modules_match_their_sources() {
    if Command::new("clang").arg("--version").output().is_err() {
        panic!("clang is needed to rebuild the shipped modules (.ci/run installs it)");
    }
    let out_dir = tempfile::tempdir().unwrap();
    let status = Command::new(repo("policies/build.sh"))
        .arg(out_dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    for module in [
        "policies/cost_gate.wasm",
        "policies/model_allowlist.wasm",
        "policies/runaway_guard.wasm",
        "policies/secret_guard.wasm",
        "plugins/redact_pii.wasm",
    ] {
        assert_eq!(
            std::fs::read(out_dir.path().join(module)).unwrap(),
            std::fs::read(repo(module)).unwrap(),
            "{module} differs from what its source builds; run policies/build.sh and commit"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn official_sdks_read_policy_refusals_and_redacted_calls_still_stream() {
    use toml::Spanned;
    let module =
        |name: &str, path: &str, config: Option<toml::Table>| warden::config::ModuleConfig {
            name: Spanned::new(0..0, name.into()),
            module: Spanned::new(0..0, repo(path)),
            fail: None,
            timeout_ms: None,
            max_memory_mb: None,
            include_messages: false,
            config,
        };
    let dir = tempfile::tempdir().unwrap();
    let (_sim, gateway) = crate::e2e_sdk::sim_gateway(dir.path(), |config| {
        config.policies.push(module(
            "cost_gate",
            "policies/cost_gate.wasm",
            Some(toml::from_str("hard_max_usd = 0.01").unwrap()),
        ));
        config
            .plugins
            .push(module("redact_pii", "plugins/redact_pii.wasm", None));
    })
    .await;
    let results = crate::e2e_sdk::run_sdk_script(
        "sdk_policies.py",
        vec![
            ("WARDEN_URL", format!("http://{}", gateway.proxy_addr())),
            ("WARDEN_KEY", warden::demo::RESEARCHER_KEY.to_owned()),
        ],
    )
    .await;
    assert_eq!(results["openai_allowed"], true, "{results}");
    assert!(
        results["openai_stream_chunks"].as_u64().unwrap() > 2,
        "{results}"
    );
    let openai = &results["openai_denied"];
    assert_eq!(openai["status"], 403, "{results}");
    assert_eq!(openai["code"], "policy_denied");
    assert!(openai["message"].as_str().unwrap().contains("hard_max_usd"));
    let anthropic = &results["anthropic_denied"];
    assert_eq!(anthropic["status"], 403, "{results}");
    assert_eq!(anthropic["type"], "permission_error");
    // The SDKs do not retry a 403: two refusals, one decision each.
    gateway.flush().await;
    let reader = gateway.reader().clone();
    let counts = tokio::task::spawn_blocking(move || {
        reader.query(
            "SELECT (SELECT count(*) FROM decisions), (SELECT count(*) FROM calls WHERE outcome = 'denied')",
            10,
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(counts.rows[0], [Some("2".to_owned()), Some("2".to_owned())]);
    gateway.shutdown().await;
}
