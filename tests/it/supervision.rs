//! Supervision through a running Warden: held calls approved, rejected and
//! timed out; tickets; halts that cut streams in flight; restarts; operator
//! identity; the event stream and the audit trail.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::common::*;

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(path)
        .display()
        .to_string()
}

/// cost_gate asks approval for calls that may cost over $0.05 (gpt-4o with
/// 40 000 output tokens may cost $0.40) and denies over $5.
fn gated(approvals: &str) -> Options {
    Options {
        extra: format!(
            "{approvals}\n[[policies]]\nname = \"cost_gate\"\nmodule = \"{}\"\nconfig = {{ max_call_usd = 0.05, hard_max_usd = 5.0 }}\n",
            repo("policies/cost_gate.wasm")
        ),
        ..Options::default()
    }
}

fn costly(text: &str, stream: bool) -> String {
    json!({
        "model": "gpt-4o",
        "max_tokens": 40_000,
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
    })
    .to_string()
}

fn cheap(text: &str) -> String {
    json!({"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": text}]})
        .to_string()
}

fn answer_in_kind(seen: &Seen) -> Reply {
    if seen.body.windows(13).any(|w| w == b"\"stream\":true") {
        Reply::sse_events(&fixture("openai/chat_stream_include_usage.sse"))
    } else {
        Reply::json(fixture("openai/chat_completion.json"))
    }
}

async fn admin_get(tw: &TestWarden, path: &str) -> Value {
    let answer = tw
        .admin_request(Method::GET, path, Some(OPERATOR_TOKEN), None)
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    answer.json()
}

async fn admin_post(tw: &TestWarden, token: &str, path: &str, body: Value) -> Answer {
    tw.admin_request(Method::POST, path, Some(token), Some(body))
        .await
}

/// Waits (bounded) until `n` approvals are pending; returns their ids.
async fn pending(tw: &TestWarden, n: usize) -> Vec<String> {
    for _ in 0..400 {
        let listing = admin_get(tw, "/admin/v1/approvals").await;
        let ids: Vec<String> = listing["approvals"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["approval_id"].as_str().unwrap().to_owned())
            .collect();
        if ids.len() >= n {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{n} approvals never became pending");
}

fn spawn_post(tw: &TestWarden, body: String) -> tokio::task::JoinHandle<Answer> {
    tw.spawn_send(
        tw.request("/v1/chat/completions", Some(AGENT_KEY))
            .body(http_body_util::Full::new(Bytes::from(body)))
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_call_goes_upstream_once_approved_streamed_or_not() {
    let tw = TestWarden::start_with(gated(""), answer_in_kind).await;
    // A cheap call is not held.
    assert_eq!(
        tw.post("/v1/chat/completions", AGENT_KEY, cheap("hi"))
            .await
            .status,
        StatusCode::OK
    );
    for stream in [false, true] {
        let before = tw.upstream.requests().len();
        let held = spawn_post(&tw, costly(&format!("stream {stream}"), stream));
        let ids = pending(&tw, 1).await;
        assert_eq!(
            tw.upstream.requests().len(),
            before,
            "nothing leaves while held"
        );
        let listing = admin_get(&tw, "/admin/v1/approvals").await;
        let approval = &listing["approvals"][0];
        assert_eq!(approval["agent"], "alpha");
        assert_eq!(approval["model"], "gpt-4o");
        assert_eq!(approval["requested_by"], "policy:cost_gate");
        assert!(approval["estimated_cost_usd"].as_str().is_some());
        let decided = admin_post(
            &tw,
            OPERATOR_TOKEN,
            &format!("/admin/v1/approvals/{}/approve", ids[0]),
            json!({"reason": "expected spend"}),
        )
        .await;
        assert_eq!(decided.status, StatusCode::OK, "{}", decided.text());
        let answer = held.await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        if stream {
            assert!(answer.text().contains("data: [DONE]"), "{}", answer.text());
        } else {
            assert_eq!(answer.json()["object"], "chat.completion");
        }
        assert_eq!(tw.upstream.requests().len(), before + 1);
    }
    tw.wait_for_calls(3).await;
    let rows = tw
        .query("SELECT decision, operator, reason, used_by_call IS NOT NULL FROM approvals ORDER BY requested_at")
        .await;
    assert_eq!(rows.rows.len(), 2);
    for row in &rows.rows {
        assert_eq!(row[0].as_deref(), Some("approved"));
        assert_eq!(row[1].as_deref(), Some("olga"));
        assert_eq!(row[2].as_deref(), Some("expected spend"));
        assert_eq!(row[3].as_deref(), Some("true"));
    }
    assert_eq!(
        tw.scalar("SELECT count(*) FROM calls WHERE outcome = 'ok' AND cost_usd > 0")
            .await
            .as_deref(),
        Some("3")
    );
    assert_eq!(
        tw.scalar(
            "SELECT count(*) FROM audit_log WHERE kind = 'approval_decided' AND actor = 'olga'"
        )
        .await
        .as_deref(),
        Some("2")
    );
    // Each request is an approvals row and an audit entry; with no webhook
    // to deliver to, it is not recorded again as an alert.
    assert_eq!(
        tw.scalar("SELECT count(*) FROM audit_log WHERE kind = 'approval_requested'")
            .await
            .as_deref(),
        Some("2")
    );
    assert_eq!(
        tw.scalar("SELECT count(*) FROM alerts").await.as_deref(),
        Some("0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_timeout_and_double_decisions() {
    let tw = TestWarden::start_with(gated("[approvals]\ntimeout_secs = 1\n"), answer_in_kind).await;

    let held = spawn_post(&tw, costly("reject me", false));
    let ids = pending(&tw, 1).await;
    let no_reason = admin_post(
        &tw,
        OPERATOR_TOKEN,
        &format!("/admin/v1/approvals/{}/reject", ids[0]),
        json!({}),
    )
    .await;
    assert_eq!(no_reason.status, StatusCode::BAD_REQUEST);
    let rejected = admin_post(
        &tw,
        OPERATOR_TOKEN,
        &format!("/admin/v1/approvals/{}/reject", ids[0]),
        json!({"reason": "too expensive for a test"}),
    )
    .await;
    assert_eq!(rejected.status, StatusCode::OK);
    let answer = held.await.unwrap();
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(answer.json()["error"]["code"], "approval_rejected");
    assert!(answer.text().contains("too expensive for a test"));
    assert_eq!(
        answer.header("x-warden-approval-id").as_deref(),
        Some(ids[0].as_str())
    );

    // A second decision names who decided first.
    let again = admin_post(
        &tw,
        OPERATOR_TOKEN,
        &format!("/admin/v1/approvals/{}/approve", ids[0]),
        json!({}),
    )
    .await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert!(
        again.text().contains("rejected by olga"),
        "{}",
        again.text()
    );

    // No decision within timeout_secs.
    let timed_out = tw
        .post(
            "/v1/chat/completions",
            AGENT_KEY,
            costly("wait forever", false),
        )
        .await;
    assert_eq!(timed_out.status, StatusCode::FORBIDDEN);
    assert_eq!(timed_out.json()["error"]["code"], "approval_timeout");

    tw.wait_for_calls(2).await;
    let outcomes = tw
        .query("SELECT outcome FROM calls ORDER BY ts_start")
        .await;
    assert_eq!(outcomes.rows[0][0].as_deref(), Some("approval_rejected"));
    assert_eq!(outcomes.rows[1][0].as_deref(), Some("approval_timeout"));
    assert_eq!(
        tw.scalar("SELECT string_agg(decision || ':' || operator, ',' ORDER BY requested_at) FROM approvals")
            .await
            .as_deref(),
        Some("rejected:olga,expired:warden")
    );
    assert!(
        tw.upstream.requests().is_empty(),
        "nothing was sent upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_admits_the_identical_retry_once_and_survives_a_restart() {
    let mut tw =
        TestWarden::start_with(gated("[approvals]\nmode = \"ticket\"\n"), answer_in_kind).await;
    let body = costly("ticket please", false);
    let first = tw
        .post("/v1/chat/completions", AGENT_KEY, body.clone())
        .await;
    assert_eq!(first.status, StatusCode::FORBIDDEN);
    assert_eq!(first.json()["error"]["code"], "approval_pending");
    let id = first.header("x-warden-approval-id").unwrap();
    assert!(first.text().contains(&id));
    // Still pending: the retry names the same approval.
    let retry = tw
        .post("/v1/chat/completions", AGENT_KEY, body.clone())
        .await;
    assert_eq!(retry.header("x-warden-approval-id"), Some(id.clone()));

    // Pending approvals outlive a restart.
    tw.restart().await;
    assert_eq!(pending(&tw, 1).await, vec![id.clone()]);
    let approved = admin_post(
        &tw,
        OPERATOR_TOKEN,
        &format!("/admin/v1/approvals/{id}/approve"),
        json!({}),
    )
    .await;
    assert_eq!(approved.status, StatusCode::OK);
    // Another agent's identical body is not covered by the ticket.
    let other = tw
        .post("/v1/chat/completions", OTHER_AGENT_KEY, body.clone())
        .await;
    assert_eq!(other.json()["error"]["code"], "approval_pending");
    assert_ne!(other.header("x-warden-approval-id"), Some(id.clone()));

    let admitted = tw
        .post("/v1/chat/completions", AGENT_KEY, body.clone())
        .await;
    assert_eq!(admitted.status, StatusCode::OK, "{}", admitted.text());
    let once_more = tw
        .post("/v1/chat/completions", AGENT_KEY, body.clone())
        .await;
    assert_eq!(once_more.json()["error"]["code"], "approval_pending");
    assert_ne!(once_more.header("x-warden-approval-id"), Some(id.clone()));
    assert_eq!(tw.upstream.requests().len(), 1, "admitted exactly once");

    // A rejected ticket refuses its retry with the reason.
    let new_id = once_more.header("x-warden-approval-id").unwrap();
    admin_post(
        &tw,
        OPERATOR_TOKEN,
        &format!("/admin/v1/approvals/{new_id}/reject"),
        json!({"reason": "once is enough"}),
    )
    .await;
    let refused = tw.post("/v1/chat/completions", AGENT_KEY, body).await;
    assert_eq!(refused.json()["error"]["code"], "approval_rejected");
    assert!(refused.text().contains("once is enough"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_held_calls_are_approved_at_once() {
    let tw = TestWarden::start_with(gated(""), answer_in_kind).await;
    let held: Vec<_> = (0..100)
        .map(|i| spawn_post(&tw, costly(&format!("call {i}"), false)))
        .collect();
    let ids = pending(&tw, 100).await;
    let decisions: Vec<_> = ids
        .iter()
        .map(|id| {
            tw.spawn_send(
                http::Request::post(format!("{}/admin/v1/approvals/{id}/approve", tw.admin()))
                    .header("authorization", format!("Bearer {OPERATOR_TOKEN}"))
                    .body(http_body_util::Full::new(Bytes::from_static(b"{}")))
                    .unwrap(),
            )
        })
        .collect();
    for decision in decisions {
        assert_eq!(decision.await.unwrap().status, StatusCode::OK);
    }
    for call in held {
        assert_eq!(call.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(tw.upstream.requests().len(), 100);
}

/// A stream that sends one chunk and then waits for `release`.
fn parked_stream(release: Arc<Notify>) -> impl Fn(&Seen) -> Reply {
    move |seen: &Seen| {
        if !seen.body.windows(13).any(|w| w == b"\"stream\":true") {
            return Reply::json(fixture("openai/chat_completion.json"));
        }
        Reply::Stream {
            chunks: vec![
                Chunk::Data(Bytes::from_static(b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"working on it\"},\"finish_reason\":null}]}\n\n")),
                Chunk::Wait(release.clone()),
                Chunk::Data(Bytes::from_static(b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8}}\n\ndata: [DONE]\n\n")),
            ],
        }
    }
}

fn stream_body(text: &str) -> String {
    json!({"model": "gpt-4o", "max_tokens": 10, "stream": true, "messages": [{"role": "user", "content": text}]})
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immediate_halt_cuts_live_streams_and_refuses_new_calls_until_resumed() {
    let release = Arc::new(Notify::new());
    let mut tw = TestWarden::start_with(Options::default(), parked_stream(release.clone())).await;
    let mut watcher = tw.events("?kind=halt,resume").await;

    let mut streams = Vec::new();
    for i in 0..10 {
        let response = tw
            .open(
                "/v1/chat/completions",
                AGENT_KEY,
                stream_body(&format!("s{i}")),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        assert!(String::from_utf8_lossy(&next_chunk(&mut body).await).contains("working on it"));
        streams.push(body);
    }
    // Another agent's stream is not in scope.
    let spared = tw
        .open("/v1/chat/completions", OTHER_AGENT_KEY, stream_body("beta"))
        .await;
    let mut spared = spared.into_body();
    next_chunk(&mut spared).await;

    let halted = admin_post(
        &tw,
        OPERATOR_TOKEN,
        "/admin/v1/halts",
        json!({"scope": "agent:alpha", "reason": "runaway loop"}),
    )
    .await;
    assert_eq!(halted.status, StatusCode::OK, "{}", halted.text());
    for body in streams {
        let rest = String::from_utf8_lossy(&read_all(body).await).into_owned();
        assert!(rest.contains("\"code\":\"halted\""), "{rest}");
        assert!(rest.contains("runaway loop"), "{rest}");
    }
    let event = String::from_utf8_lossy(&next_chunk(&mut watcher).await).into_owned();
    assert!(
        event.starts_with("event: halt\n") && event.contains("olga"),
        "{event}"
    );

    let refused = tw
        .post("/v1/chat/completions", AGENT_KEY, cheap("still there?"))
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.json()["error"]["code"], "halted");
    assert!(refused.text().contains("runaway loop") && refused.text().contains("olga"));

    // Beta's stream runs on and finishes.
    release.notify_waiters();
    let rest = String::from_utf8_lossy(&read_all(spared).await).into_owned();
    assert!(rest.contains("[DONE]"), "{rest}");

    tw.wait_for_calls(12).await;
    assert_eq!(
        tw.scalar("SELECT count(*) FROM calls WHERE outcome = 'halted' AND agent = 'alpha' AND stream AND usage_source = 'estimated' AND input_tokens > 0")
            .await
            .as_deref(),
        Some("10")
    );
    let listing = admin_get(&tw, "/admin/v1/halts").await;
    assert_eq!(listing["halts"][0]["scope"], "agent:alpha");
    assert_eq!(listing["halts"][0]["by"], "olga");

    // Halts survive a restart.
    tw.restart().await;
    let refused = tw
        .post("/v1/chat/completions", AGENT_KEY, cheap("after restart"))
        .await;
    assert_eq!(refused.json()["error"]["code"], "halted");
    let resumed = admin_post(
        &tw,
        OPERATOR_TOKEN,
        "/admin/v1/resume",
        json!({"scope": "agent:alpha"}),
    )
    .await;
    assert_eq!(resumed.status, StatusCode::OK);
    let ok = tw
        .post("/v1/chat/completions", AGENT_KEY, cheap("back"))
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(
        tw.scalar("SELECT resumed_by FROM halts").await.as_deref(),
        Some("olga")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_halt_lets_calls_in_flight_finish_and_a_halt_answers_held_calls() {
    let release = Arc::new(Notify::new());
    let options = gated("");
    let tw = TestWarden::start_with(options, parked_stream(release.clone())).await;
    let response = tw
        .open("/v1/chat/completions", AGENT_KEY, stream_body("drain me"))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    next_chunk(&mut body).await;
    let halted = admin_post(
        &tw,
        OPERATOR_TOKEN,
        "/admin/v1/halts",
        json!({"scope": "all", "drain": true, "reason": "maintenance"}),
    )
    .await;
    assert_eq!(halted.status, StatusCode::OK);
    let refused = tw
        .post("/v1/chat/completions", OTHER_AGENT_KEY, cheap("new"))
        .await;
    assert_eq!(refused.json()["error"]["code"], "halted");
    release.notify_waiters();
    let rest = String::from_utf8_lossy(&read_all(body).await).into_owned();
    assert!(
        rest.contains("[DONE]") && !rest.contains("halted"),
        "{rest}"
    );
    admin_post(
        &tw,
        OPERATOR_TOKEN,
        "/admin/v1/resume",
        json!({"scope": "all"}),
    )
    .await;

    // A held call in a halted run is answered `halted`.
    let held = tw.spawn_send(
        tw.request("/v1/chat/completions", Some(AGENT_KEY))
            .header("x-warden-run", "run-7")
            .body(http_body_util::Full::new(Bytes::from(costly(
                "held in a run",
                false,
            ))))
            .unwrap(),
    );
    pending(&tw, 1).await;
    admin_post(
        &tw,
        OPERATOR_TOKEN,
        "/admin/v1/halts",
        json!({"scope": "run:run-7", "reason": "run went wrong"}),
    )
    .await;
    let answer = held.await.unwrap();
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(answer.text().contains("run went wrong"));
    assert_eq!(
        tw.scalar("SELECT decision FROM approvals").await.as_deref(),
        Some("halted")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_halt_or_hold_their_scope_when_exhausted() {
    let extra = r#"
[[budgets]]
scope = "agent:alpha"
limit_usd = "0.00001"
period = "day"
on_exceed = "halt"

[[budgets]]
scope = "agent:beta"
limit_usd = "0.00001"
period = "day"
on_exceed = "require_approval"

[approvals]
mode = "ticket"
"#;
    let tw = TestWarden::start_with(
        Options {
            extra: extra.into(),
            ..Options::default()
        },
        answer_in_kind,
    )
    .await;
    let halted = tw
        .post("/v1/chat/completions", AGENT_KEY, cheap("over"))
        .await;
    assert_eq!(halted.status, StatusCode::FORBIDDEN);
    assert_eq!(halted.json()["error"]["code"], "halted");
    let halts = admin_get(&tw, "/admin/v1/halts").await;
    assert_eq!(halts["halts"][0]["scope"], "agent:alpha");
    assert_eq!(halts["halts"][0]["by"], "budget:agent:alpha");

    let held = tw
        .post("/v1/chat/completions", OTHER_AGENT_KEY, cheap("over too"))
        .await;
    assert_eq!(held.json()["error"]["code"], "approval_pending");
    let id = held.header("x-warden-approval-id").unwrap();
    let listing = admin_get(&tw, "/admin/v1/approvals").await;
    assert_eq!(listing["approvals"][0]["requested_by"], "budget:agent:beta");
    admin_post(
        &tw,
        OPERATOR_TOKEN,
        &format!("/admin/v1/approvals/{id}/approve"),
        json!({}),
    )
    .await;
    let admitted = tw
        .post("/v1/chat/completions", OTHER_AGENT_KEY, cheap("over too"))
        .await;
    assert_eq!(admitted.status, StatusCode::OK, "{}", admitted.text());
    tw.wait_for_calls(3).await;
    // The approved call's cost counts against the budget it overran.
    let budgets = admin_get(&tw, "/admin/v1/budgets").await;
    let beta = budgets["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["scope"] == "agent:beta")
        .unwrap()
        .clone();
    assert_ne!(beta["spent_usd"], "0", "{beta}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_are_named_read_only_ones_refused_and_changes_rate_limited() {
    let tw = TestWarden::start_with(
        Options {
            extra: String::new(),
            ..Options::default()
        },
        answer_in_kind,
    )
    .await;
    let refused = admin_post(
        &tw,
        READONLY_TOKEN,
        "/admin/v1/halts",
        json!({"scope": "all", "reason": "x"}),
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(
        refused.text().contains("`write` permission"),
        "{}",
        refused.text()
    );
    // Listing is fine for a read-only operator.
    let listing = tw
        .admin_request(Method::GET, "/admin/v1/halts", Some(READONLY_TOKEN), None)
        .await;
    assert_eq!(listing.status, StatusCode::OK);
    let unknown = admin_post(
        &tw,
        OPERATOR_TOKEN,
        "/admin/v1/approvals/nope/approve",
        json!({}),
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    // 120 changes per minute by default: the 121st within the minute waits.
    let mut limited = None;
    for i in 0..130 {
        let answer = admin_post(
            &tw,
            OPERATOR_TOKEN,
            "/admin/v1/resume",
            json!({"scope": "agent:alpha"}),
        )
        .await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(i);
            break;
        }
        assert_eq!(
            answer.status,
            StatusCode::NOT_FOUND,
            "not halted: {}",
            answer.text()
        );
    }
    assert_eq!(
        limited,
        Some(119),
        "the unknown-approval attempt counted too"
    );
    assert_eq!(
        tw.scalar(
            "SELECT count(*) FROM audit_log WHERE kind = 'admin_refused' AND actor = 'reader'"
        )
        .await
        .as_deref(),
        Some("1")
    );
    assert!(
        tw.scalar("SELECT count(*) FROM audit_log WHERE kind = 'admin_refused' AND payload->>'reason' = 'rate_limited'")
            .await
            .unwrap()
            .parse::<u32>()
            .unwrap()
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_warden_answers_held_calls_pending_and_their_retry_goes_once_approved() {
    let mut tw = TestWarden::start_with(gated(""), answer_in_kind).await;
    let body = costly("held across a restart", false);
    let held = spawn_post(&tw, body.clone());
    let ids = pending(&tw, 1).await;
    tw.stop().await;
    let answer = held.await.unwrap();
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(answer.json()["error"]["code"], "approval_pending");
    assert_eq!(answer.header("x-warden-approval-id"), Some(ids[0].clone()));

    tw.restart().await;
    assert_eq!(pending(&tw, 1).await, ids);
    let approved = admin_post(
        &tw,
        OPERATOR_TOKEN,
        &format!("/admin/v1/approvals/{}/approve", ids[0]),
        json!({}),
    )
    .await;
    assert_eq!(approved.status, StatusCode::OK);
    let retry = tw.post("/v1/chat/completions", AGENT_KEY, body).await;
    assert_eq!(retry.status, StatusCode::OK, "{}", retry.text());
    assert_eq!(tw.upstream.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_answers_a_call_waiting_on_its_upstream() {
    let tw = TestWarden::start(|seen: &Seen| {
        if seen.body.windows(4).any(|w| w == b"hang") {
            Reply::Hang
        } else {
            Reply::json(fixture("openai/chat_completion.json"))
        }
    })
    .await;
    let waiting = spawn_post(&tw, cheap("hang"));
    for _ in 0..400 {
        if !tw.upstream.requests().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        tw.upstream.requests().len(),
        1,
        "the call reached the upstream"
    );
    admin_post(
        &tw,
        OPERATOR_TOKEN,
        "/admin/v1/halts",
        json!({"scope": "agent:alpha", "reason": "stuck"}),
    )
    .await;
    let answer = waiting.await.unwrap();
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(answer.json()["error"]["code"], "halted");
    assert!(answer.text().contains("stuck"));
    tw.wait_for_calls(1).await;
    assert_eq!(
        tw.scalar("SELECT outcome || ':' || usage_source || ':' || (input_tokens > 0) FROM calls")
            .await
            .as_deref(),
        Some("halted:estimated:true")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_halts_the_run_of_a_call_and_only_that_run() {
    let extra = format!(
        "[[policies]]\nname = \"stop_runs\"\nmodule = \"{}\"\n",
        repo("tests/wat/halt_run.wat")
    );
    let tw = TestWarden::start_with(
        Options {
            extra,
            ..Options::default()
        },
        answer_in_kind,
    )
    .await;
    let in_run = |run: &str| {
        tw.request("/v1/chat/completions", Some(AGENT_KEY))
            .header("x-warden-run", run)
            .body(http_body_util::Full::new(Bytes::from(cheap("step"))))
            .unwrap()
    };
    let halted = tw.send(in_run("run-42")).await;
    assert_eq!(
        halted.json()["error"]["code"],
        "halted",
        "{}",
        halted.text()
    );
    assert!(halted.text().contains("the run is over"));
    let halts = admin_get(&tw, "/admin/v1/halts").await;
    assert_eq!(halts["halts"].as_array().unwrap().len(), 1, "{halts}");
    assert_eq!(halts["halts"][0]["scope"], "run:run-42");
    assert_eq!(halts["halts"][0]["by"], "policy:stop_runs");
    // A call in no run is refused, and nothing else is halted.
    let loose = tw
        .post("/v1/chat/completions", AGENT_KEY, cheap("no run"))
        .await;
    assert_eq!(loose.json()["error"]["code"], "halted");
    assert!(loose.text().contains("names no run"), "{}", loose.text());
    assert_eq!(
        admin_get(&tw, "/admin/v1/halts").await["halts"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        tw.scalar("SELECT count(*) FROM audit_log WHERE kind = 'halt' AND actor = 'policy:stop_runs' AND subject = 'run:run-42'")
            .await
            .as_deref(),
        Some("1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_event_reaches_a_watcher_and_approvals_post_to_the_webhook() {
    let hook = FakeUpstream::start(|_| Reply::json(Bytes::from_static(b"{\"ok\":true}"))).await;
    let options = gated(&format!(
        "[approvals]\nmode = \"ticket\"\n\n[alerts]\nwebhook = \"{}/hook\"\n\n[[budgets]]\nscope = \"agent:beta\"\nlimit_usd = \"0.00001\"\nperiod = \"day\"\n",
        hook.url()
    ));
    let tw = TestWarden::start_with(options, answer_in_kind).await;
    let mut events = tw.events("").await;
    let unknown = tw
        .admin_request(
            Method::GET,
            "/admin/v1/events?kind=nope",
            Some(OPERATOR_TOKEN),
            None,
        )
        .await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST);

    let pending_call = tw
        .post("/v1/chat/completions", AGENT_KEY, costly("ticket", false))
        .await;
    let id = pending_call.header("x-warden-approval-id").unwrap();
    admin_post(
        &tw,
        OPERATOR_TOKEN,
        &format!("/admin/v1/approvals/{id}/approve"),
        json!({}),
    )
    .await;
    let denied = tw
        .post(
            "/v1/chat/completions",
            AGENT_KEY,
            json!({"model": "gpt-4o", "max_tokens": 1_000_000, "messages": [{"role": "user", "content": "x"}]}).to_string(),
        )
        .await;
    assert_eq!(denied.json()["error"]["code"], "policy_denied");
    tw.post(
        "/v1/chat/completions",
        OTHER_AGENT_KEY,
        cheap("over budget"),
    )
    .await;
    admin_post(
        &tw,
        OPERATOR_TOKEN,
        "/admin/v1/halts",
        json!({"scope": "all", "reason": "r"}),
    )
    .await;
    admin_post(
        &tw,
        OPERATOR_TOKEN,
        "/admin/v1/resume",
        json!({"scope": "all"}),
    )
    .await;

    // Run and step events have their own test (runs.rs).
    let expected: std::collections::BTreeSet<String> = warden::events::KINDS
        .iter()
        .filter(|k| !k.starts_with("run_") && !k.starts_with("step_"))
        .map(|k| (*k).to_owned())
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < expected.len() {
        let chunk = String::from_utf8_lossy(&next_chunk(&mut events).await).into_owned();
        for event in chunk.split("\n\n") {
            if let Some(kind) = event.strip_prefix("event: ").and_then(|e| e.lines().next()) {
                let data: Value = serde_json::from_str(
                    event
                        .lines()
                        .find_map(|l| l.strip_prefix("data: "))
                        .unwrap(),
                )
                .unwrap();
                assert_eq!(data["kind"], kind);
                assert!(!data["message"].as_str().unwrap().is_empty());
                seen.insert(kind.to_owned());
            }
        }
    }
    assert_eq!(seen, expected);

    // The approval request was posted to the webhook, off the request path.
    for _ in 0..100 {
        if hook
            .bodies()
            .iter()
            .any(|p| String::from_utf8_lossy(p).contains(&id))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let posted = hook.bodies();
    let approval_post = posted
        .iter()
        .map(|p| serde_json::from_slice::<Value>(p).unwrap())
        .find(|p| p["warden"]["rule"] == "approval_requested")
        .expect("the approval request was posted");
    assert!(
        approval_post["text"]
            .as_str()
            .unwrap()
            .contains(&format!("warden approvals approve {id}")),
        "{approval_post}"
    );
    // The post's delivery is tracked by an alerts row, without a second
    // audit entry (the approval has its own).
    let mut delivered = None;
    for _ in 0..50 {
        delivered = tw
            .scalar(&format!(
                "SELECT delivered FROM alerts WHERE rule = 'approval_requested' AND subject = '{id}'"
            ))
            .await;
        if delivered.as_deref() == Some("true") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(delivered.as_deref(), Some("true"));
    assert_eq!(
        tw.scalar(&format!(
            "SELECT count(*) FROM audit_log WHERE kind = 'alert' AND subject = '{id}'"
        ))
        .await
        .as_deref(),
        Some("0")
    );
}
