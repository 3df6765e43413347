//! Non-streamed calls in every format: forwarded intact, metered, priced,
//! recorded.

use bytes::Bytes;
use http_body_util::Full;
use serde_json::json;
use warden::metering::PriceTable;
use warden::providers::{Endpoint, usage_from_body};

use crate::common::*;

fn expected_cost(model: &str, endpoint: Endpoint, body: &[u8]) -> String {
    let usage = usage_from_body(endpoint, body).unwrap();
    PriceTable::builtin()
        .lookup(model)
        .unwrap()
        .cost(&usage)
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_completion_is_forwarded_metered_priced_and_recorded() {
    let fixture_body = fixture("openai/chat_completion.json");
    let reply = fixture_body.clone();
    let warden = TestWarden::start(move |_| Reply::json(reply.clone())).await;
    let request = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
        .to_string();
    let answer = warden
        .post("/v1/chat/completions", AGENT_KEY, request.clone())
        .await;

    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.body, fixture_body,
        "the body reaches the agent byte for byte"
    );
    let call_id = answer.header("x-warden-call-id").expect("call id header");
    let cost = answer.header("x-warden-cost-usd").expect("cost header");
    assert_eq!(
        cost,
        expected_cost("gpt-4o-mini", Endpoint::ChatCompletions, &fixture_body)
    );

    let seen = &warden.upstream.requests()[0];
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {PROVIDER_KEY}")
    );
    assert_eq!(
        seen.body,
        Bytes::from(request),
        "the request body is forwarded unchanged"
    );

    let row = warden
        .query(&format!(
            "SELECT agent, upstream, provider, model, endpoint, stream, status_code, outcome, input_tokens, output_tokens, usage_source, cost_usd FROM calls WHERE call_id = '{call_id}'"
        ))
        .await;
    let usage = usage_from_body(Endpoint::ChatCompletions, &fixture_body).unwrap();
    let values: Vec<String> = row.rows[0]
        .iter()
        .map(|v| v.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        &values[..8],
        [
            "alpha",
            "openai-main",
            "openai",
            "gpt-4o-mini",
            "/v1/chat/completions",
            "false",
            "200",
            "ok"
        ]
    );
    assert_eq!(values[8], usage.input_tokens.to_string());
    assert_eq!(values[9], usage.output_tokens.to_string());
    assert_eq!(values[10], "provider");
    assert_eq!(
        warden::money::Usd::parse(&values[11]).unwrap().to_string(),
        cost
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn anthropic_message_with_cache_writes_is_priced_with_cache_prices() {
    let body = fixture("anthropic/message_cache.json");
    let reply = body.clone();
    let warden = TestWarden::start(move |_| Reply::json(reply.clone())).await;
    let request = json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]});
    let req = warden
        .request("/v1/messages", None)
        .header("x-api-key", AGENT_KEY)
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::from(request.to_string())))
        .unwrap();
    let answer = warden.send(req).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, body);
    // 21 x $3/M + 188,086 x $3.75/M + 393 x $15/M
    assert_eq!(answer.header("x-warden-cost-usd").unwrap(), "0.7112805");

    let seen = &warden.upstream.requests()[0];
    assert_eq!(
        seen.path, "/v1/messages",
        "a base_url without /v1 gets it added"
    );
    assert_eq!(seen.headers["x-api-key"], PROVIDER_KEY);
    assert!(!seen.headers.contains_key("authorization"));
    let row = warden.query("SELECT agent, input_tokens, cache_write_tokens, cached_input_tokens, output_tokens FROM calls").await;
    assert_eq!(
        row.rows[0],
        ["alpha", "188107", "188086", "0", "393"].map(|s| Some(s.to_owned()))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_embeddings_and_count_tokens_are_metered() {
    let warden = TestWarden::start(|seen| match seen.path.as_str() {
        "/v1/responses" => Reply::json(fixture("openai/responses.json")),
        "/v1/embeddings" => Reply::json(Bytes::from(
            json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}], "model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}}).to_string(),
        )),
        "/v1/messages/count_tokens" => Reply::json(Bytes::from_static(br#"{"input_tokens": 42}"#)),
        _ => Reply::status(404, Bytes::new()),
    })
    .await;
    let responses = warden
        .post(
            "/v1/responses",
            AGENT_KEY,
            json!({"model": "gpt-4.1", "input": "hi"}).to_string(),
        )
        .await;
    assert_eq!(responses.status, 200);
    assert_eq!(
        responses.header("x-warden-cost-usd").unwrap(),
        expected_cost(
            "gpt-4.1",
            Endpoint::Responses,
            &fixture("openai/responses.json")
        )
    );
    let embeddings = warden
        .post(
            "/v1/embeddings",
            AGENT_KEY,
            json!({"model": "text-embedding-3-small", "input": "hi"}).to_string(),
        )
        .await;
    assert_eq!(
        embeddings.header("x-warden-cost-usd").unwrap(),
        "0.00000016"
    );
    let count = warden
        .post(
            "/v1/messages/count_tokens",
            AGENT_KEY,
            json!({"model": "claude-sonnet-4-5", "messages": []}).to_string(),
        )
        .await;
    assert_eq!(count.json()["input_tokens"], 42);
    assert_eq!(count.header("x-warden-cost-usd").unwrap(), "0");

    let rows = warden
        .query("SELECT endpoint, input_tokens, output_tokens FROM calls ORDER BY ts_start")
        .await;
    let endpoints: Vec<_> = rows.rows.iter().map(|r| r[0].clone().unwrap()).collect();
    assert_eq!(
        endpoints,
        [
            "/v1/responses",
            "/v1/embeddings",
            "/v1/messages/count_tokens"
        ]
    );
    assert_eq!(rows.rows[1][1].as_deref(), Some("8"));
    assert_eq!(rows.rows[2][1].as_deref(), Some("42"));
    // Counting tokens is free in the store too, not only in the header.
    let free = warden
        .scalar("SELECT cost_usd = 0 FROM calls WHERE endpoint = '/v1/messages/count_tokens'")
        .await;
    assert_eq!(free.as_deref(), Some("true"));
}

#[tokio::test(flavor = "multi_thread")]
async fn models_lists_what_the_upstreams_serve_in_the_callers_format() {
    let warden = TestWarden::start(|_| Reply::status(500, Bytes::new())).await;
    let request = warden
        .request("/v1/models", Some(AGENT_KEY))
        .method("GET")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let openai = warden.send(request).await.json();
    assert_eq!(openai["object"], "list");
    let ids: Vec<&str> = openai["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"gpt-4o-mini") && ids.contains(&"claude-sonnet-4-5"),
        "{ids:?}"
    );

    let request = warden
        .request("/v1/models", None)
        .method("GET")
        .header("x-api-key", AGENT_KEY)
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let anthropic = warden.send(request).await.json();
    assert_eq!(anthropic["has_more"], false);
    assert!(
        anthropic["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["type"] == "model" && m["id"].as_str().unwrap().starts_with("claude"))
    );
    assert!(
        warden.upstream.requests().is_empty(),
        "Warden answers the model list itself"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_and_warden_headers_stop_at_warden_and_tie_the_call_to_a_step() {
    let warden = TestWarden::start(|_| Reply::json(fixture("openai/chat_completion.json"))).await;
    let request = warden
        .request("/v1/chat/completions", Some(AGENT_KEY))
        .header("connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "1")
        .header("x-warden-run", "run-7")
        .header("x-warden-step", "draft")
        .header("openai-organization", "org-kept")
        .header("accept-encoding", "gzip")
        .body(Full::new(Bytes::from(
            json!({"model": "gpt-4o-mini", "messages": []}).to_string(),
        )))
        .unwrap();
    let answer = warden.send(request).await;
    assert_eq!(answer.status, 200);
    let seen = &warden.upstream.requests()[0];
    for gone in ["x-drop-me", "x-warden-run", "x-warden-step", "connection"] {
        assert!(
            !seen.headers.contains_key(gone),
            "{gone} reached the upstream"
        );
    }
    assert_eq!(seen.headers["openai-organization"], "org-kept");
    assert_eq!(seen.headers["accept-encoding"], "identity");
    let row = warden.query("SELECT run_id, step_id FROM calls").await;
    assert_eq!(
        row.rows[0],
        [Some("run-7".to_owned()), Some("draft".to_owned())]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_without_a_price_is_recorded_with_null_cost_and_counted() {
    let body = Bytes::from(
        json!({"id": "x", "object": "chat.completion", "created": 1, "model": "local-llama",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})
        .to_string(),
    );
    let warden = TestWarden::start(move |_| Reply::json(body.clone())).await;
    let answer = warden
        .post(
            "/v1/chat/completions",
            AGENT_KEY,
            json!({"model": "local-llama", "messages": []}).to_string(),
        )
        .await;
    assert_eq!(answer.status, 200);
    assert!(
        answer.header("x-warden-cost-usd").is_none(),
        "no price means no cost, not $0"
    );
    let row = warden
        .query("SELECT cost_usd IS NULL, input_tokens FROM calls")
        .await;
    assert_eq!(row.rows[0], [Some("true".to_owned()), Some("5".to_owned())]);
    assert_eq!(warden.gateway().metrics().unpriced_calls.get(), 1);
    let view = warden
        .query("SELECT unpriced_calls FROM cost_by_agent WHERE agent = 'alpha'")
        .await;
    assert_eq!(view.rows[0][0].as_deref(), Some("1"));
}
