//! Streams: passed through as they arrive, metered on the side, usage chunk
//! handled as the agent asked, and every way a stream can end recorded.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tokio::sync::Notify;

use crate::common::*;

fn without_usage_chunk(stream: &[u8]) -> String {
    String::from_utf8_lossy(stream)
        .split_inclusive("\n\n")
        .filter(|e| !e.contains("\"choices\":[]"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_stream_gets_usage_from_upstream_but_agent_sees_no_extra_chunk() {
    let stream = fixture("openai/chat_stream_include_usage.sse");
    let reply = stream.clone();
    let warden = TestWarden::start(move |_| Reply::sse_events(&reply)).await;
    let request = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let response = warden
        .open("/v1/chat/completions", AGENT_KEY, request.to_string())
        .await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-warden-call-id"));
    assert!(
        !response.headers().contains_key("x-warden-cost-usd"),
        "a stream's cost is not known at its start"
    );
    let body = read_all(response.into_body()).await;
    assert_eq!(String::from_utf8_lossy(&body), without_usage_chunk(&stream));

    let upstream_body: serde_json::Value =
        serde_json::from_slice(&warden.upstream.requests()[0].body).unwrap();
    assert_eq!(
        upstream_body["stream_options"]["include_usage"], true,
        "Warden asked the upstream for usage"
    );

    warden.wait_for_calls(1).await;
    let row = warden.query("SELECT stream, outcome, usage_source, input_tokens, output_tokens, cost_usd IS NOT NULL, ttft_ms IS NOT NULL FROM calls").await;
    let values: Vec<_> = row.rows[0].iter().map(|v| v.clone().unwrap()).collect();
    assert_eq!(values[..3], ["true", "ok", "provider"]);
    assert_ne!(values[3], "0");
    assert_ne!(values[4], "0");
    assert_eq!(values[5..], ["true", "true"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_stream_keeps_the_usage_chunk_when_the_agent_asked() {
    let stream = fixture("openai/chat_stream_tool_calls_usage_null.sse");
    let reply = stream.clone();
    let warden = TestWarden::start(move |_| Reply::sse_events(&reply)).await;
    let request = json!({"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true}, "messages": []});
    let response = warden
        .open("/v1/chat/completions", AGENT_KEY, request.to_string())
        .await;
    let body = read_all(response.into_body()).await;
    assert_eq!(body, stream, "byte for byte");
    assert_eq!(
        warden.upstream.requests()[0].body,
        Bytes::from(request.to_string()),
        "nothing to rewrite"
    );
    warden.wait_for_calls(1).await;
    let row = warden
        .query("SELECT input_tokens, output_tokens, cached_input_tokens FROM calls")
        .await;
    assert_eq!(row.rows[0], ["81", "17", "64"].map(|s| Some(s.to_owned())));
}

#[tokio::test(flavor = "multi_thread")]
async fn anthropic_and_responses_streams_pass_through_byte_for_byte() {
    let anthropic = fixture("anthropic/message_stream_cache_thinking.sse");
    let responses = fixture("openai/responses_stream.sse");
    let (a, r) = (anthropic.clone(), responses.clone());
    let warden = TestWarden::start(move |seen| {
        if seen.path == "/v1/messages" {
            Reply::sse_events(&a)
        } else {
            Reply::sse_events(&r)
        }
    })
    .await;
    let body = read_all(
        warden
            .open("/v1/messages", AGENT_KEY, json!({"model": "claude-sonnet-4-5", "stream": true, "max_tokens": 10, "messages": []}).to_string())
            .await
            .into_body(),
    )
    .await;
    assert_eq!(body, anthropic);
    let body = read_all(
        warden
            .open(
                "/v1/responses",
                AGENT_KEY,
                json!({"model": "gpt-4.1", "stream": true, "input": "x"}).to_string(),
            )
            .await
            .into_body(),
    )
    .await;
    assert_eq!(body, responses);
    warden.wait_for_calls(2).await;
    let rows = warden.query("SELECT endpoint, outcome, usage_source, input_tokens, output_tokens, cached_input_tokens FROM calls ORDER BY endpoint").await;
    assert_eq!(
        rows.rows[0][..6],
        ["/v1/messages", "ok", "provider", "2183", "31", "2048"].map(|s| Some(s.to_owned()))
    );
    assert_eq!(rows.rows[1][1].as_deref(), Some("ok"));
    assert_eq!(rows.rows[1][2].as_deref(), Some("provider"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_chunk_reaches_the_agent_before_the_upstream_has_finished() {
    let go_on = Arc::new(Notify::new());
    let release = go_on.clone();
    let warden = TestWarden::start(move |_| Reply::Stream {
        chunks: vec![
            Chunk::Data(Bytes::from_static(b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n")),
            Chunk::Wait(release.clone()),
            Chunk::Data(Bytes::from_static(b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\ndata: [DONE]\n\n")),
        ],
    })
    .await;
    let response = warden
        .open(
            "/v1/chat/completions",
            AGENT_KEY,
            json!({"model": "gpt-4o", "stream": true, "messages": []}).to_string(),
        )
        .await;
    let mut body = response.into_body();
    // The upstream is parked until we release it: this chunk can only come
    // through if Warden forwards without waiting for the end.
    let first = next_chunk(&mut body).await;
    assert!(String::from_utf8_lossy(&first).contains("Hel"));
    assert_eq!(
        warden.scalar("SELECT count(*) FROM calls").await.as_deref(),
        Some("0"),
        "still in flight"
    );
    go_on.notify_one();
    let rest = read_all(body).await;
    assert_eq!(
        String::from_utf8_lossy(&rest),
        "data: [DONE]\n\n",
        "the usage chunk is stripped"
    );
    warden.wait_for_calls(1).await;
    assert_eq!(
        warden
            .scalar("SELECT input_tokens || '/' || output_tokens FROM calls")
            .await
            .as_deref(),
        Some("3/1")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_cut_by_client_cancels_upstream_and_is_recorded_as_cancelled() {
    let never = Arc::new(Notify::new());
    let parked = never.clone();
    let warden = TestWarden::start(move |_| Reply::Stream {
        chunks: vec![
            Chunk::Data(Bytes::from_static(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":120,\"output_tokens\":1}}}\n\n")),
            Chunk::Data(Bytes::from_static(b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"The quick brown fox jumps over the lazy dog\"}}\n\n")),
            Chunk::Wait(parked.clone()),
        ],
    })
    .await;
    let request = json!({"model": "claude-sonnet-4-5", "stream": true, "max_tokens": 100, "messages": [{"role": "user", "content": "tell me a story"}]});
    let response = warden
        .open("/v1/messages", AGENT_KEY, request.to_string())
        .await;
    let mut body = response.into_body();
    let mut received = Vec::new();
    while !String::from_utf8_lossy(&received).contains("lazy dog") {
        received.extend_from_slice(&next_chunk(&mut body).await);
    }
    drop(body); // the agent hangs up

    tokio::time::timeout(
        Duration::from_secs(10),
        warden.upstream.client_gone.notified(),
    )
    .await
    .expect("the upstream connection was not closed after the agent left");
    warden.wait_for_calls(1).await;
    let row = warden
        .query("SELECT outcome, usage_source, input_tokens, output_tokens, cost_usd > 0 FROM calls")
        .await;
    let values: Vec<_> = row.rows[0].iter().map(|v| v.clone().unwrap()).collect();
    assert_eq!(values[0], "cancelled");
    assert_eq!(values[1], "estimated");
    assert_eq!(
        values[2], "120",
        "the input count the provider sent is kept"
    );
    assert!(
        values[3].parse::<u64>().unwrap() >= 8,
        "output estimated from the streamed text: {}",
        values[3]
    );
    assert_eq!(values[4], "true");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_dying_mid_stream_ends_with_a_provider_error_event_and_is_recorded() {
    let warden = TestWarden::start(|_| Reply::Stream {
        chunks: vec![
            Chunk::Data(Bytes::from_static(b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"partial answer\"},\"finish_reason\":null}]}\n\n")),
            Chunk::Sleep(Duration::from_millis(20)),
            Chunk::Die,
        ],
    })
    .await;
    let request = json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hello there"}]});
    let body = read_all(
        warden
            .open("/v1/chat/completions", AGENT_KEY, request.to_string())
            .await
            .into_body(),
    )
    .await;
    let text = String::from_utf8_lossy(&body);
    assert!(text.starts_with("data: {\"id\":\"c\""), "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let event: serde_json::Value =
        serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(event["error"]["code"], "upstream_error", "{text}");

    warden.wait_for_calls(1).await;
    let row = warden
        .query(
            "SELECT outcome, usage_source, input_tokens > 0, output_tokens > 0, error FROM calls",
        )
        .await;
    let values: Vec<_> = row.rows[0].iter().map(|v| v.clone().unwrap()).collect();
    assert_eq!(values[..4], ["error", "estimated", "true", "true"]);
    assert!(values[4].contains("broke off"), "{}", values[4]);
}

#[tokio::test(flavor = "multi_thread")]
async fn anthropic_error_event_mid_stream_reaches_the_agent_and_is_recorded() {
    let stream = fixture("anthropic/message_stream_error_midway.sse");
    let reply = stream.clone();
    let warden = TestWarden::start(move |_| Reply::sse_events(&reply)).await;
    let request =
        json!({"model": "claude-sonnet-4-5", "stream": true, "max_tokens": 10, "messages": []});
    let body = read_all(
        warden
            .open("/v1/messages", AGENT_KEY, request.to_string())
            .await
            .into_body(),
    )
    .await;
    assert_eq!(
        body, stream,
        "the provider's own error event is passed through"
    );
    warden.wait_for_calls(1).await;
    let row = warden
        .query("SELECT outcome, usage_source, input_tokens, output_tokens, error FROM calls")
        .await;
    let values: Vec<_> = row.rows[0].iter().map(|v| v.clone().unwrap()).collect();
    assert_eq!(values[..3], ["error", "estimated", "472"]);
    assert!(values[3].parse::<u64>().unwrap() > 0);
    assert!(values[4].contains("overloaded_error"));
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_closing_a_stream_early_is_an_error_for_the_agent() {
    let warden = TestWarden::start(|_| Reply::Stream {
        chunks: vec![Chunk::Data(Bytes::from_static(b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"cut\"},\"finish_reason\":null}]}\n\n"))],
    })
    .await;
    let body = read_all(
        warden
            .open(
                "/v1/chat/completions",
                AGENT_KEY,
                json!({"model": "gpt-4o", "stream": true, "messages": []}).to_string(),
            )
            .await
            .into_body(),
    )
    .await;
    assert!(String::from_utf8_lossy(&body).contains("closed the stream before it finished"));
    warden.wait_for_calls(1).await;
    assert_eq!(
        warden.scalar("SELECT outcome FROM calls").await.as_deref(),
        Some("error")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_lets_an_in_flight_stream_finish_and_records_it() {
    let go_on = Arc::new(Notify::new());
    let release = go_on.clone();
    let stream = fixture("openai/chat_stream_include_usage.sse");
    let text = String::from_utf8_lossy(&stream).into_owned();
    let mut events: Vec<Chunk> = text
        .split_inclusive("\n\n")
        .map(|e| Chunk::Data(Bytes::from(e.to_owned())))
        .collect();
    events.insert(1, Chunk::Wait(release.clone()));
    let mut warden = TestWarden::start(move |_| Reply::Stream {
        chunks: events.clone(),
    })
    .await;
    let request = json!({"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true}, "messages": []});
    let mut body = warden
        .open("/v1/chat/completions", AGENT_KEY, request.to_string())
        .await
        .into_body();
    let first = next_chunk(&mut body).await;

    // SIGTERM's path: stop accepting, drain, flush. The stream is mid-way.
    let gateway = warden.gateway.take().unwrap();
    let stopping = tokio::spawn(gateway.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !stopping.is_finished(),
        "shutdown waits for the in-flight stream"
    );
    go_on.notify_one();
    let rest = read_all(body).await;
    let mut received = first.to_vec();
    received.extend_from_slice(&rest);
    assert_eq!(
        received, stream,
        "the stream finished intact during shutdown"
    );
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown finished")
        .unwrap();

    let conn = duckdb::Connection::open(warden.store_path()).unwrap();
    let (outcome, source): (String, String) = conn
        .query_row("SELECT outcome, usage_source FROM calls", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((outcome.as_str(), source.as_str()), ("ok", "provider"));
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_completions_stream_is_metered_and_its_usage_chunk_stripped() {
    let chunk = |text: &str, finish: &str| {
        format!(
            "data: {{\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"model\":\"gpt-3.5-turbo-instruct\",\"choices\":[{{\"text\":\"{text}\",\"index\":0,\"logprobs\":null,\"finish_reason\":{finish}}}]}}\n\n"
        )
    };
    let usage = "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"model\":\"gpt-3.5-turbo-instruct\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n";
    let agent_view = format!(
        "{}{}data: [DONE]\n\n",
        chunk("Hello", "null"),
        chunk(" there", "\"stop\"")
    );
    let upstream = format!(
        "{}{}{usage}data: [DONE]\n\n",
        chunk("Hello", "null"),
        chunk(" there", "\"stop\"")
    );
    let warden = TestWarden::start(move |_| Reply::sse_events(upstream.as_bytes())).await;
    let request = json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Say hello", "stream": true});
    let body = read_all(
        warden
            .open("/v1/completions", AGENT_KEY, request.to_string())
            .await
            .into_body(),
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&body), agent_view);
    let sent: serde_json::Value =
        serde_json::from_slice(&warden.upstream.requests()[0].body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    warden.wait_for_calls(1).await;
    let row = warden
        .query("SELECT endpoint, input_tokens, output_tokens, usage_source FROM calls")
        .await;
    assert_eq!(
        row.rows[0],
        ["/v1/completions", "5", "2", "provider"].map(|s| Some(s.to_owned()))
    );
}
