//! Workflow runs driven through a real Warden: agents poll for work over
//! HTTP, their model calls (bound by headers, or header-less) complete
//! steps, an approval step waits in the operators' queue, a model step is
//! sent by Warden through its own proxy; skips, retries, failures, cancels,
//! version edits and restarts.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::common::*;

pub const DIAMOND: &str = r#"
name = "brief"
description = "Research, then draft and fact-check in parallel, approve, publish."

[inputs]
topic = { type = "string", required = true }
words = { type = "number", default = 300 }

[[steps]]
id = "research"
agent = "alpha"
instructions = "Research {{ inputs.topic }}."

[[steps]]
id = "draft"
agent = "beta"
needs = ["research"]
instructions = "Write {{ inputs.words }} words from: {{ steps.research.output }}"

[[steps]]
id = "fact_check"
agent = "alpha"
needs = ["research"]
retries = 1
retry_backoff_secs = 0

[[steps]]
id = "approve"
kind = "approval"
needs = ["draft", "fact_check"]
message = "Publish the brief on {{ inputs.topic }}?"

[[steps]]
id = "publish"
kind = "model"
model = "gpt-4o-mini"
needs = ["approve"]
when = "steps.fact_check.output != 'reject'"
prompt = "Polish this brief: {{ steps.draft.output }}"
"#;

/// A chat completion whose answer is `content`.
pub fn chat_answer(content: &str) -> Bytes {
    Bytes::from(
        json!({
            "id": "chatcmpl-test", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}
        })
        .to_string(),
    )
}

/// The scripted provider: a request whose text holds `REPLY=word` gets
/// `word` as its answer, `FAIL` gets a 500; Anthropic calls stream the
/// fixture; anything else gets the chat fixture.
pub fn script(seen: &Seen) -> Reply {
    let body = String::from_utf8_lossy(&seen.body);
    if body.contains("FAIL") {
        return Reply::status(
            500,
            Bytes::from_static(br#"{"error":{"type":"server_error","message":"boom"}}"#),
        );
    }
    if seen.path.ends_with("/messages") {
        return Reply::sse_events(&fixture("anthropic/message_stream.sse"));
    }
    if let Some(at) = body.find("REPLY=") {
        let word: String = body[at + 6..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        return Reply::json(chat_answer(&word));
    }
    Reply::json(fixture("openai/chat_completion.json"))
}

pub async fn with_flows(
    flows: &[(&str, &str)],
    script: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
) -> (TestWarden, std::path::PathBuf) {
    with_flows_and("", flows, script).await
}

/// `with_flows` with more config (budgets) after the [workflows] table.
pub async fn with_flows_and(
    more: &str,
    flows: &[(&str, &str)],
    script: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
) -> (TestWarden, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flows");
    std::fs::create_dir(&path).unwrap();
    for (name, text) in flows {
        std::fs::write(path.join(name), text).unwrap();
    }
    let tw = TestWarden::start_with(
        Options {
            extra: format!("[workflows]\ndir = \"{}\"\n{more}", path.display()),
            ..Options::default()
        },
        script,
    )
    .await;
    // The tempdir must outlive the test: keep it with the warden's own.
    std::mem::forget(dir);
    (tw, path)
}

pub async fn start_run(tw: &TestWarden, workflow: &str, inputs: Value) -> Value {
    let answer = tw
        .admin_request(
            Method::POST,
            "/admin/v1/runs",
            Some(OPERATOR_TOKEN),
            Some(json!({"workflow": workflow, "inputs": inputs})),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    answer.json()
}

/// Starts a run and returns its id.
pub async fn start_run_id(tw: &TestWarden, workflow: &str, inputs: Value) -> String {
    start_run(tw, workflow, inputs).await["run_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

pub async fn poll(tw: &TestWarden, key: &str) -> Vec<Value> {
    let request = http::Request::get(format!("{}/v1/warden/work", tw.base()))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = tw.send(request).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    answer.json()["work"].as_array().unwrap().clone()
}

pub async fn show(tw: &TestWarden, run_id: &str) -> Value {
    let answer = tw
        .admin_request(
            Method::GET,
            &format!("/admin/v1/runs/{run_id}"),
            Some(OPERATOR_TOKEN),
            None,
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    answer.json()["run"].clone()
}

pub fn step<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step_id"] == id)
        .unwrap_or_else(|| panic!("no step {id} in {run}"))
}

/// Waits (bounded) until `check` holds for the run.
pub async fn wait_run(
    tw: &TestWarden,
    run_id: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let mut run = Value::Null;
    for _ in 0..200 {
        run = show(tw, run_id).await;
        if check(&run) {
            return run;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("run {run_id} never reached {what}: {run:#}");
}

/// An OpenAI call bound to a step by its headers.
pub async fn step_call(tw: &TestWarden, key: &str, item: &Value, text: &str) -> Answer {
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]});
    let request = tw
        .request("/v1/chat/completions", Some(key))
        .header(
            "x-warden-run",
            item["headers"]["x-warden-run"].as_str().unwrap(),
        )
        .header(
            "x-warden-step",
            item["headers"]["x-warden-step"].as_str().unwrap(),
        )
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    tw.send(request).await
}

async fn approve_gate(tw: &TestWarden, run_id: &str) {
    let run = wait_run(tw, run_id, "an open approval", |r| {
        step(r, "approve")["approval_id"].is_string()
    })
    .await;
    let approval_id = step(&run, "approve")["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let answer = tw
        .admin_request(
            Method::POST,
            &format!("/admin/v1/approvals/{approval_id}/approve"),
            Some(OPERATOR_TOKEN),
            Some(json!({"reason": "looks right"})),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diamond_run_is_advanced_by_the_calls_warden_sees() {
    let (mut tw, _) = with_flows(&[("brief.toml", DIAMOND)], script).await;
    let mut events = tw.events("?kind=run_started,step_changed,run_ended").await;
    let started = start_run(&tw, "brief", json!({"topic": "tides"})).await;
    let run_id = started["run_id"].as_str().unwrap().to_owned();
    assert!(
        started["estimated_cost_usd"].is_null(),
        "no completed runs yet: {started}"
    );
    assert!(
        poll(&tw, OTHER_AGENT_KEY).await.is_empty(),
        "beta has nothing before research ends"
    );

    // research: alpha polls, then calls with the step headers.
    let work = poll(&tw, AGENT_KEY).await;
    assert_eq!(work.len(), 1, "{work:?}");
    assert_eq!(work[0]["step_id"], "research");
    assert_eq!(work[0]["instructions"], "Research tides.");
    assert_eq!(work[0]["inputs"]["words"], 300);
    let answer = step_call(&tw, AGENT_KEY, &work[0], "REPLY=sources").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let research_call = answer.header("x-warden-call-id").unwrap();
    let run = show(&tw, &run_id).await;
    assert_eq!(
        step(&run, "research")["status"],
        "succeeded",
        "the answer ended the step at once"
    );
    assert_eq!(step(&run, "research")["output"], "sources");
    assert_eq!(step(&run, "research")["call_id"], research_call.as_str());
    assert_eq!(step(&run, "draft")["status"], "ready");
    assert_eq!(step(&run, "fact_check")["status"], "ready");

    // The lanes run in parallel: beta drafts with Anthropic's streaming API
    // and no headers at all (its only running step); alpha fact-checks.
    let draft = poll(&tw, OTHER_AGENT_KEY).await;
    assert_eq!(draft[0]["step_id"], "draft");
    assert_eq!(draft[0]["instructions"], "Write 300 words from: sources");
    assert_eq!(draft[0]["outputs"]["research"], "sources");
    let check = poll(&tw, AGENT_KEY).await;
    assert_eq!(check[0]["step_id"], "fact_check");
    let stream = tw
        .open(
            "/v1/messages",
            OTHER_AGENT_KEY,
            json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "stream": true, "messages": [{"role": "user", "content": "draft"}]}).to_string(),
        )
        .await;
    assert_eq!(stream.status(), StatusCode::OK);
    read_all(stream.into_body()).await;
    let answer = step_call(&tw, AGENT_KEY, &check[0], "REPLY=ok").await;
    assert_eq!(answer.status, StatusCode::OK);

    let run = wait_run(&tw, &run_id, "draft done", |r| {
        step(r, "draft")["status"] == "succeeded"
    })
    .await;
    assert_eq!(step(&run, "draft")["output"], "Hello there!");
    assert_eq!(step(&run, "draft")["agent"], "beta");
    assert_eq!(step(&run, "approve")["status"], "running");

    // The human gate: an approval in the operators' queue.
    approve_gate(&tw, &run_id).await;

    // publish: Warden sends the prompt through its own proxy.
    let run = wait_run(&tw, &run_id, "the end", |r| r["status"] != "running").await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let publish = step(&run, "publish");
    assert_eq!(publish["agent"], "warden");
    assert_eq!(publish["status"], "succeeded");
    let prompt_seen = tw
        .upstream
        .requests()
        .iter()
        .any(|s| String::from_utf8_lossy(&s.body).contains("Polish this brief: Hello there!"));
    assert!(
        prompt_seen,
        "the model step's prompt was rendered from the draft"
    );

    // The store: every step row, the run row, calls bound to their steps.
    assert_eq!(
        tw.scalar(&format!(
            "SELECT status FROM runs WHERE run_id = '{run_id}'"
        ))
        .await
        .as_deref(),
        Some("succeeded")
    );
    assert_eq!(
        tw.scalar(&format!("SELECT string_agg(step_id || ':' || status, ',' ORDER BY step_id) FROM steps WHERE run_id = '{run_id}'")).await.as_deref(),
        Some("approve:succeeded,draft:succeeded,fact_check:succeeded,publish:succeeded,research:succeeded")
    );
    assert_eq!(
        tw.scalar(&format!("SELECT string_agg(coalesce(step_id, '-') || '@' || agent, ',' ORDER BY ts_start) FROM calls WHERE run_id = '{run_id}'")).await.as_deref(),
        Some("research@alpha,draft@beta,fact_check@alpha,publish@warden")
    );
    let cost = tw
        .scalar(&format!(
            "SELECT CAST(cost_usd AS VARCHAR) FROM runs WHERE run_id = '{run_id}'"
        ))
        .await
        .unwrap();
    let summed = tw
        .scalar(&format!(
            "SELECT CAST(sum(cost_usd) AS VARCHAR) FROM calls WHERE run_id = '{run_id}'"
        ))
        .await
        .unwrap();
    assert_eq!(
        cost.trim_end_matches('0'),
        summed.trim_end_matches('0'),
        "the run's cost is its calls' cost"
    );
    let audits = tw
        .scalar(&format!("SELECT string_agg(DISTINCT kind, ',' ORDER BY kind) FROM audit_log WHERE subject LIKE '{run_id}%'"))
        .await
        .unwrap();
    assert_eq!(audits, "run_ended,run_started,step_changed");

    // Watchers saw the run start, its steps move and its end.
    let mut kinds = Vec::new();
    while !kinds.contains(&"run_ended".to_owned()) {
        let chunk = String::from_utf8_lossy(&next_chunk(&mut events).await).into_owned();
        kinds.extend(
            chunk
                .lines()
                .filter_map(|l| l.strip_prefix("event: "))
                .map(str::to_owned),
        );
    }
    assert_eq!(kinds.first().map(String::as_str), Some("run_started"));
    assert!(
        kinds.iter().filter(|k| *k == "step_changed").count() >= 10,
        "{kinds:?}"
    );
    drop(events);

    // A second run gets an estimate from the first.
    let second = start_run(&tw, "brief", json!({"topic": "moons"})).await;
    assert_eq!(second["estimate_from_runs"], 1);
    assert!(second["estimated_cost_usd"].is_string(), "{second}");
    tw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_false_when_skips_and_a_retry_succeeds() {
    let (mut tw, _) = with_flows(&[("brief.toml", DIAMOND)], script).await;
    let run_id = start_run_id(&tw, "brief", json!({"topic": "tides"})).await;
    let work = poll(&tw, AGENT_KEY).await;
    step_call(&tw, AGENT_KEY, &work[0], "REPLY=sources").await;
    let draft = poll(&tw, OTHER_AGENT_KEY).await;
    step_call(&tw, OTHER_AGENT_KEY, &draft[0], "REPLY=text").await;

    // fact_check fails once (the provider answers 500), is offered again
    // (retries = 1), and its second attempt answers "reject".
    let check = poll(&tw, AGENT_KEY).await;
    let failed = step_call(&tw, AGENT_KEY, &check[0], "FAIL").await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    let run = show(&tw, &run_id).await;
    assert_eq!(step(&run, "fact_check")["status"], "ready", "{run:#}");
    assert!(
        step(&run, "fact_check")["error"]
            .as_str()
            .unwrap()
            .contains("500")
    );
    let again = poll(&tw, AGENT_KEY).await;
    assert_eq!(again[0]["step_id"], "fact_check");
    assert_eq!(again[0]["attempt"], 2);
    step_call(&tw, AGENT_KEY, &again[0], "REPLY=reject").await;

    approve_gate(&tw, &run_id).await;
    let run = wait_run(&tw, &run_id, "the end", |r| r["status"] != "running").await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let publish = step(&run, "publish");
    assert_eq!(publish["status"], "skipped");
    assert!(
        publish["error"]
            .as_str()
            .unwrap()
            .contains("`when` is false")
    );
    assert_eq!(step(&run, "fact_check")["attempts"], 2);
    tw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_fails_its_run_and_names_the_call() {
    let (mut tw, _) = with_flows(&[("brief.toml", DIAMOND)], script).await;
    let run_id = start_run_id(&tw, "brief", json!({"topic": "tides"})).await;
    let work = poll(&tw, AGENT_KEY).await;
    let failed = step_call(&tw, AGENT_KEY, &work[0], "FAIL").await;
    let call_id = failed.header("x-warden-call-id").unwrap();
    let run = show(&tw, &run_id).await;
    assert_eq!(run["status"], "failed");
    let error = run["error"].as_str().unwrap();
    assert!(
        error.contains("research") && error.contains(&call_id) && error.contains("500"),
        "{error}"
    );
    for dependent in ["draft", "fact_check", "approve", "publish"] {
        assert_eq!(step(&run, dependent)["status"], "skipped", "{dependent}");
    }
    assert!(
        poll(&tw, AGENT_KEY).await.is_empty(),
        "a failed run offers no work"
    );
    assert_eq!(
        tw.scalar(&format!("SELECT error FROM runs WHERE run_id = '{run_id}'"))
            .await
            .as_deref(),
        Some(error)
    );
    tw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_run_cuts_its_stream_and_cancels_its_steps() {
    let release = Arc::new(Notify::new());
    let hold = release.clone();
    let (mut tw, _) = with_flows(&[("brief.toml", DIAMOND)], move |seen| {
        let events =
            String::from_utf8_lossy(&fixture("openai/chat_stream_include_usage.sse")).into_owned();
        let mut chunks: Vec<Chunk> = events
            .split_inclusive("\n\n")
            .take(2)
            .map(|e| Chunk::Data(Bytes::from(e.to_owned())))
            .collect();
        chunks.push(Chunk::Wait(hold.clone()));
        let _ = seen;
        Reply::Stream { chunks }
    })
    .await;
    let run_id = start_run_id(&tw, "brief", json!({"topic": "tides"})).await;
    let work = poll(&tw, AGENT_KEY).await;
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "go"}]});
    let request = tw
        .request("/v1/chat/completions", Some(AGENT_KEY))
        .header("x-warden-run", run_id.as_str())
        .header("x-warden-step", "research")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let mut response = tw.client.request(request).await.unwrap();
    let first = next_chunk(response.body_mut()).await;
    assert!(!first.is_empty());
    let _ = work;

    let answer = tw
        .admin_request(
            Method::POST,
            &format!("/admin/v1/runs/{run_id}/cancel"),
            Some(OPERATOR_TOKEN),
            Some(json!({"reason": "wrong topic"})),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["run"]["status"], "cancelled");
    let rest = String::from_utf8_lossy(&read_all(response.into_body()).await).into_owned();
    assert!(
        rest.contains("\"error\"") && rest.contains("wrong topic"),
        "the stream ends with the halt: {rest}"
    );
    let run = show(&tw, &run_id).await;
    assert!(
        run["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "cancelled"),
        "{run:#}"
    );
    assert_eq!(
        tw.scalar(&format!(
            "SELECT outcome FROM calls WHERE run_id = '{run_id}'"
        ))
        .await
        .as_deref(),
        Some("halted")
    );
    release.notify_waiters();
    tw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_steps_end_on_the_agents_word_and_step_budgets_hold() {
    const EXPLICIT: &str = r#"
name = "explicit"
[[steps]]
id = "gather"
agent = "alpha"
complete_on = "explicit"
budget_usd = "0.000001"
"#;
    let (mut tw, _) = with_flows(&[("explicit.toml", EXPLICIT)], script).await;
    let run_id = start_run_id(&tw, "explicit", json!({})).await;
    let work = poll(&tw, AGENT_KEY).await;
    assert_eq!(work[0]["complete_on"], "explicit");
    // gpt-4o-mini with max_tokens 1000 may cost more than the step's budget.
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 1000, "messages": [{"role": "user", "content": "REPLY=x"}]});
    let request = tw
        .request("/v1/chat/completions", Some(AGENT_KEY))
        .header("x-warden-run", run_id.as_str())
        .header("x-warden-step", "gather")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let refused = tw.send(request).await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.text()
    );
    assert!(refused.text().contains("budget_usd"), "{}", refused.text());
    // A refused call fails the attempt: with no retries the run fails.
    let run = show(&tw, &run_id).await;
    assert_eq!(run["status"], "failed", "{run:#}");

    // Another run: a final answer does not end an explicit step; the
    // agent's POST does.
    let run_id = start_run_id(&tw, "explicit", json!({})).await;
    let work = poll(&tw, AGENT_KEY).await;
    let complete = |body: Value| {
        tw.request("/v1/warden/work/gather/complete", Some(AGENT_KEY))
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };
    let _ = work;
    let answer = tw
        .send(complete(json!({"run_id": run_id, "output": {"rows": 3}})))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["run_status"], "succeeded");
    let run = show(&tw, &run_id).await;
    assert_eq!(step(&run, "gather")["output"], "{\"rows\":3}");
    let again = tw
        .send(complete(json!({"run_id": run_id, "output": "late"})))
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.text());
    let stranger = tw
        .send(
            tw.request("/v1/warden/work/gather/complete", Some("wk_nobody"))
                .body(Full::new(Bytes::from("{}")))
                .unwrap(),
        )
        .await;
    assert_eq!(stranger.status, StatusCode::UNAUTHORIZED);
    tw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_keep_their_version_and_resume_after_a_restart() {
    let (mut tw, flows) = with_flows(&[("brief.toml", DIAMOND)], script).await;
    let first = start_run(&tw, "brief", json!({"topic": "tides"})).await;
    let run_id = first["run_id"].as_str().unwrap().to_owned();
    let old_hash = first["run"]["version_hash"].as_str().unwrap().to_owned();
    let work = poll(&tw, AGENT_KEY).await;
    step_call(&tw, AGENT_KEY, &work[0], "REPLY=sources").await;

    // Edit the file while the run is in flight: new runs get the new
    // version, this one keeps its own.
    let (_, new_hash) = tw
        .edit_workflow(
            &flows,
            "brief",
            &DIAMOND.replace(
                "Write {{ inputs.words }} words",
                "Write exactly {{ inputs.words }} words",
            ),
        )
        .await;
    assert_ne!(new_hash, old_hash, "the edit was picked up");
    let draft = poll(&tw, OTHER_AGENT_KEY).await;
    assert_eq!(
        draft[0]["instructions"], "Write 300 words from: sources",
        "the run keeps its version"
    );

    // Restart mid-run: the run resumes from the store.
    tw.restart().await;
    let run = show(&tw, &run_id).await;
    assert_eq!(run["status"], "running");
    assert_eq!(run["version_hash"], old_hash.as_str());
    assert_eq!(step(&run, "research")["status"], "succeeded");
    assert_eq!(step(&run, "draft")["status"], "running");
    assert_eq!(step(&run, "draft")["agent"], "beta");
    // The running step completes when its agent's call arrives; the ready
    // one is offered again.
    let again = poll(&tw, OTHER_AGENT_KEY).await;
    assert_eq!(again[0]["step_id"], "draft");
    step_call(&tw, OTHER_AGENT_KEY, &again[0], "REPLY=text").await;
    let check = poll(&tw, AGENT_KEY).await;
    assert_eq!(check[0]["step_id"], "fact_check");
    step_call(&tw, AGENT_KEY, &check[0], "REPLY=fine").await;
    approve_gate(&tw, &run_id).await;
    let run = wait_run(&tw, &run_id, "the end", |r| r["status"] != "running").await;
    assert_eq!(run["status"], "succeeded", "{run:#}");

    // History lists both versions; rollback makes the old one current.
    let history = tw
        .admin_request(
            Method::GET,
            "/admin/v1/workflows/brief/history",
            Some(OPERATOR_TOKEN),
            None,
        )
        .await;
    assert_eq!(history.status, StatusCode::OK, "{}", history.text());
    let versions = history.json()["versions"].as_array().unwrap().clone();
    assert_eq!(versions.len(), 2, "{versions:?}");
    let old = versions
        .iter()
        .find(|v| v["version_hash"] == old_hash.as_str())
        .unwrap();
    assert_eq!(old["runs"], 1);
    assert_eq!(old["succeeded"], 1);
    let rollback = tw
        .admin_request(
            Method::POST,
            "/admin/v1/workflows/brief/rollback",
            Some(OPERATOR_TOKEN),
            Some(json!({"version": &old_hash[..12]})),
        )
        .await;
    assert_eq!(rollback.status, StatusCode::OK, "{}", rollback.text());
    let next = start_run(&tw, "brief", json!({"topic": "x"})).await;
    assert_eq!(next["run"]["version_hash"], old_hash.as_str());
    assert_eq!(next["estimate_from_runs"], 1);
    tw.restart().await;
    let after = start_run(&tw, "brief", json!({"topic": "y"})).await;
    assert_eq!(
        after["run"]["version_hash"],
        old_hash.as_str(),
        "the rollback survives a restart"
    );
    tw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_check_inputs_and_permissions() {
    let (mut tw, _) = with_flows(&[("brief.toml", DIAMOND)], script).await;
    let post = |token: &'static str, body: Value| {
        tw.admin_request(Method::POST, "/admin/v1/runs", Some(token), Some(body))
    };
    let missing = post(OPERATOR_TOKEN, json!({"workflow": "brief", "inputs": {}})).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert!(
        missing.text().contains("`topic` is required"),
        "{}",
        missing.text()
    );
    let typed = post(
        OPERATOR_TOKEN,
        json!({"workflow": "brief", "inputs": {"topic": "t", "words": "many"}}),
    )
    .await;
    assert_eq!(typed.status, StatusCode::BAD_REQUEST);
    assert!(typed.text().contains("is a number"), "{}", typed.text());
    let unknown = post(OPERATOR_TOKEN, json!({"workflow": "nope", "inputs": {}})).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert!(
        unknown.text().contains("brief"),
        "names the workflows served: {}",
        unknown.text()
    );
    let read_only = post(
        READONLY_TOKEN,
        json!({"workflow": "brief", "inputs": {"topic": "t"}}),
    )
    .await;
    assert_eq!(read_only.status, StatusCode::FORBIDDEN);
    let ok = post(
        OPERATOR_TOKEN,
        json!({"workflow": "brief", "inputs": {"topic": "t", "words": "120"}}),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.json()["run"]["inputs"]["words"], 120);
    assert_eq!(
        tw.scalar("SELECT triggered_by FROM runs").await.as_deref(),
        Some("olga")
    );
    let listed = tw
        .admin_request(
            Method::GET,
            "/admin/v1/runs?status=running",
            Some(OPERATOR_TOKEN),
            None,
        )
        .await;
    assert_eq!(listed.json()["runs"].as_array().unwrap().len(), 1);
    tw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_work_is_posted_to_the_agents_dispatch_webhook() {
    let hook = FakeUpstream::start(|_| Reply::json(Bytes::from_static(b"{}"))).await;
    let dir = tempfile::tempdir().unwrap();
    let flows = dir.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("brief.toml"), DIAMOND).unwrap();
    let mut tw = TestWarden::start_with(
        Options {
            extra: format!("[workflows]\ndir = \"{}\"\n", flows.display()),
            alpha_extra: format!("dispatch_webhook = \"{}/work\"", hook.url()),
            ..Options::default()
        },
        script,
    )
    .await;
    let run_id = start_run_id(&tw, "brief", json!({"topic": "tides"})).await;
    let mut posted = Value::Null;
    for _ in 0..200 {
        if let Some(body) = hook.bodies().first() {
            posted = serde_json::from_slice(body).unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let item = posted["work"][0].clone();
    assert_eq!(item["step_id"], "research", "{posted}");
    assert_eq!(item["instructions"], "Research tides.");
    assert_eq!(item["headers"]["x-warden-run"], run_id.as_str());
    // The agent acts on the post alone: its call takes and ends the step.
    let answer = step_call(&tw, AGENT_KEY, &item, "REPLY=found").await;
    assert_eq!(answer.status, StatusCode::OK);
    let run = show(&tw, &run_id).await;
    assert_eq!(step(&run, "research")["status"], "succeeded");
    assert_eq!(step(&run, "research")["agent"], "alpha");
    // fact_check (alpha's) is posted too; beta's draft is not (no webhook).
    for _ in 0..200 {
        if hook.bodies().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let steps: Vec<String> = hook
        .bodies()
        .iter()
        .map(|b| {
            serde_json::from_slice::<Value>(b).unwrap()["work"][0]["step_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(steps, ["research", "fact_check"]);
    tw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_and_run_budgets_hold_the_calls_bound_to_a_run() {
    let budgets =
        "\n[[budgets]]\nscope = \"workflow:brief\"\nlimit_usd = \"0.000001\"\nperiod = \"day\"\n";
    let (mut tw, _) = with_flows_and(budgets, &[("brief.toml", DIAMOND)], script).await;
    let run_id = start_run_id(&tw, "brief", json!({"topic": "tides"})).await;
    // An unbound call of the same agent is not the workflow's to pay.
    let free = tw
        .post(
            "/v1/chat/completions",
            AGENT_KEY,
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
        )
        .await;
    assert_eq!(free.status, StatusCode::OK, "{}", free.text());
    let work = poll(&tw, AGENT_KEY).await;
    let refused = step_call(&tw, AGENT_KEY, &work[0], "REPLY=x").await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.text()
    );
    assert!(
        refused.text().contains("workflow:brief"),
        "{}",
        refused.text()
    );
    let run = show(&tw, &run_id).await;
    assert_eq!(run["status"], "failed");
    assert!(run["error"].as_str().unwrap().contains("budget"), "{run:#}");
    tw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_waiting_out_its_backoff_refuses_calls_saying_when() {
    const PATIENT: &str = "name = \"patient\"\n[[steps]]\nid = \"try\"\nagent = \"alpha\"\nretries = 2\nretry_backoff_secs = 60\n";
    let (mut tw, _) = with_flows(&[("patient.toml", PATIENT)], script).await;
    let run_id = start_run_id(&tw, "patient", json!({})).await;
    let work = poll(&tw, AGENT_KEY).await;
    let failed = step_call(&tw, AGENT_KEY, &work[0], "FAIL").await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        poll(&tw, AGENT_KEY).await.is_empty(),
        "not offered during the backoff"
    );
    let early = step_call(&tw, AGENT_KEY, &work[0], "REPLY=again").await;
    assert_eq!(early.status, StatusCode::CONFLICT, "{}", early.text());
    assert_eq!(early.json()["error"]["code"], "step_retry_pending");
    assert!(early.text().contains("retried in 60 s"), "{}", early.text());
    let run = show(&tw, &run_id).await;
    assert_eq!(step(&run, "try")["status"], "ready");
    assert_eq!(step(&run, "try")["attempts"], 1);
    tw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_past_its_timeout_fails_its_attempt() {
    const SLOW: &str =
        "name = \"slow\"\n[[steps]]\nid = \"think\"\nagent = \"alpha\"\ntimeout_secs = 1\n";
    let (mut tw, _) = with_flows(&[("slow.toml", SLOW)], script).await;
    let run_id = start_run_id(&tw, "slow", json!({})).await;
    let work = poll(&tw, AGENT_KEY).await;
    assert!(work[0]["deadline_us"].as_i64().is_some());
    let run = wait_run(&tw, &run_id, "the timeout", |r| r["status"] != "running").await;
    assert_eq!(run["status"], "failed");
    assert!(
        run["error"]
            .as_str()
            .unwrap()
            .contains("timed out after 1 s"),
        "{run:#}"
    );
    // The late answer changes nothing.
    let late = step_call(&tw, AGENT_KEY, &work[0], "REPLY=late").await;
    assert_eq!(late.status, StatusCode::OK);
    assert_eq!(step(&show(&tw, &run_id).await, "think")["status"], "failed");
    tw.stop().await;
}
