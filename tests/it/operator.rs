//! The admin listener: health, metrics, and read-only SQL behind tokens.

use http::Method;
use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread")]
async fn query_needs_a_token_and_answers_reads() {
    let warden = TestWarden::start(|_| Reply::json(fixture("openai/chat_completion.json"))).await;
    warden
        .post(
            "/v1/chat/completions",
            AGENT_KEY,
            json!({"model": "gpt-4o-mini", "messages": []}).to_string(),
        )
        .await;
    warden.gateway().flush().await;

    let sql = json!({"sql": "SELECT agent, calls, cost_usd FROM cost_by_agent"});
    let anonymous = warden
        .admin_request(Method::POST, "/admin/v1/query", None, Some(sql.clone()))
        .await;
    assert_eq!(anonymous.status, 401);
    let wrong = warden
        .admin_request(
            Method::POST,
            "/admin/v1/query",
            Some("wt_wrong"),
            Some(sql.clone()),
        )
        .await;
    assert_eq!(wrong.status, 401);

    let answer = warden
        .admin_request(
            Method::POST,
            "/admin/v1/query",
            Some(READONLY_TOKEN),
            Some(sql),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["columns"][0]["name"], "agent");
    assert_eq!(body["columns"][2]["kind"], "number");
    assert_eq!(body["rows"][0][0], "alpha");
    assert_eq!(body["rows"][0][1], "1");

    let audited = warden
        .scalar("SELECT actor || ':' || kind FROM audit_log WHERE kind = 'query' LIMIT 1")
        .await;
    assert_eq!(
        audited.as_deref(),
        Some("reader:query"),
        "queries are audited with the operator's name"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn query_refuses_anything_but_a_read() {
    let warden = TestWarden::start(|_| Reply::json(fixture("openai/chat_completion.json"))).await;
    for sql in [
        "DELETE FROM calls",
        "DROP TABLE calls",
        "UPDATE audit_log SET actor = 'x'",
        "INSERT INTO calls SELECT * FROM calls",
        "CREATE TABLE t AS SELECT 1",
        "ATTACH '/tmp/other.duckdb' AS other",
        "COPY calls TO '/tmp/calls.csv'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT 1; DROP TABLE calls",
        "SET enable_external_access = true",
    ] {
        let answer = warden
            .admin_request(
                Method::POST,
                "/admin/v1/query",
                Some(OPERATOR_TOKEN),
                Some(json!({"sql": sql})),
            )
            .await;
        assert!(
            answer.status == 403 || answer.status == 400,
            "{sql}: {} {}",
            answer.status,
            answer.text()
        );
        assert!(answer.json()["error"]["message"].as_str().unwrap().len() > 10);
    }
    // The store is intact afterwards.
    assert_eq!(
        warden
            .scalar("SELECT count(*) FROM audit_log WHERE kind = 'warden_started'")
            .await
            .as_deref(),
        Some("1")
    );
    // A bad read is a clear SQL error, not a crash.
    let answer = warden
        .admin_request(
            Method::POST,
            "/admin/v1/query",
            Some(OPERATOR_TOKEN),
            Some(json!({"sql": "SELECT nope FROM calls"})),
        )
        .await;
    assert_eq!(answer.status, 400);
    assert!(
        answer.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nope")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_metrics_report_calls_tokens_and_the_writer() {
    let warden = TestWarden::start(|_| Reply::json(fixture("openai/chat_completion.json"))).await;
    warden
        .post(
            "/v1/chat/completions",
            AGENT_KEY,
            json!({"model": "gpt-4o-mini", "messages": []}).to_string(),
        )
        .await;
    warden.post("/v1/chat/completions", "wk_bad", "{}").await;
    warden.gateway().flush().await;
    let health = warden
        .admin_request(Method::GET, "/healthz", None, None)
        .await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");
    let metrics = warden
        .admin_request(Method::GET, "/metrics", None, None)
        .await
        .text();
    for line in [
        "warden_calls_total{outcome=\"ok\"} 1",
        "warden_calls_total{outcome=\"denied\"} 1",
        "warden_call_duration_seconds_count 2",
        "warden_store_records_written_total 2",
        "warden_store_records_dropped_total 0",
        "warden_store_queue_depth 0",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    let usage = warden::providers::usage_from_body(
        warden::providers::Endpoint::ChatCompletions,
        &fixture("openai/chat_completion.json"),
    )
    .unwrap();
    assert!(metrics.contains(&format!(
        "warden_tokens_total{{kind=\"input\"}} {}",
        usage.input_tokens
    )));
}
