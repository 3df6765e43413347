//! Every refusal: the caller's own error format, the status its SDK
//! understands, and a row in `calls`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Full, StreamBody};
use hyper::body::Frame;
use serde_json::json;

use crate::common::*;

async fn last_call(warden: &TestWarden) -> Vec<Option<String>> {
    warden.wait_for_calls(1).await;
    let rows = warden
        .query(
            "SELECT outcome, status_code, agent, error FROM calls ORDER BY ts_start DESC LIMIT 1",
        )
        .await;
    rows.rows[0].clone()
}

fn assert_openai_error(answer: &Answer, status: u16, code: &str) {
    assert_eq!(answer.status, status, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().len() > 20,
        "a message that explains: {body}"
    );
    assert!(body["error"]["type"].is_string());
    assert!(answer.header("x-warden-call-id").is_some());
}

fn assert_anthropic_error(answer: &Answer, status: u16, kind: &str) {
    assert_eq!(answer.status, status, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert!(body["error"]["message"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_key_gets_401_in_each_callers_format_and_is_recorded() {
    let warden = TestWarden::start(|_| Reply::json(fixture("openai/chat_completion.json"))).await;
    let answer = warden
        .post(
            "/v1/chat/completions",
            "wk_not_a_real_key",
            json!({"model": "gpt-4o"}).to_string(),
        )
        .await;
    assert_openai_error(&answer, 401, "invalid_api_key");
    let request = warden
        .request("/v1/messages", None)
        .header("x-api-key", "wk_wrong")
        .body(Full::new(Bytes::from(
            json!({"model": "claude-sonnet-4-5"}).to_string(),
        )))
        .unwrap();
    assert_anthropic_error(&warden.send(request).await, 401, "authentication_error");
    let missing = warden
        .request("/v1/chat/completions", None)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(warden.send(missing).await.status, 401);
    assert!(warden.upstream.requests().is_empty());
    warden.wait_for_calls(3).await;
    assert_eq!(warden.scalar("SELECT count(*) FROM calls WHERE outcome = 'denied' AND status_code = 401 AND agent IS NULL").await.as_deref(), Some("3"));
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_json_gets_400_and_is_recorded() {
    let warden = TestWarden::start(|_| Reply::json(fixture("openai/chat_completion.json"))).await;
    let answer = warden
        .post(
            "/v1/chat/completions",
            AGENT_KEY,
            "{\"model\": \"gpt-4o\", ",
        )
        .await;
    assert_openai_error(&answer, 400, "invalid_json");
    let call = last_call(&warden).await;
    assert_eq!(
        call[..3],
        [
            Some("error".into()),
            Some("400".into()),
            Some("alpha".into())
        ]
    );
    assert!(call[3].as_deref().unwrap().contains("not valid JSON"));

    let request = warden
        .request("/v1/messages", Some(AGENT_KEY))
        .body(Full::new(Bytes::from_static(b"{\"messages\": []}")))
        .unwrap();
    assert_anthropic_error(&warden.send(request).await, 400, "invalid_request_error");
    assert!(warden.upstream.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_model_gets_404_model_not_found_and_is_recorded() {
    let warden = TestWarden::start(|_| Reply::json(fixture("openai/chat_completion.json"))).await;
    let answer = warden
        .post(
            "/v1/chat/completions",
            AGENT_KEY,
            json!({"model": "gemini-pro", "messages": []}).to_string(),
        )
        .await;
    assert_openai_error(&answer, 404, "model_not_found");
    assert!(
        answer.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("gemini-pro")
    );
    let call = last_call(&warden).await;
    assert_eq!(call[..2], [Some("error".into()), Some("404".into())]);
    // A Claude model asked for in OpenAI's format is not silently translated.
    let answer = warden
        .post(
            "/v1/chat/completions",
            AGENT_KEY,
            json!({"model": "claude-sonnet-4-5", "messages": []}).to_string(),
        )
        .await;
    assert_openai_error(&answer, 400, "wrong_api_format");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_body_gets_413_whether_announced_or_streamed() {
    let warden = TestWarden::start_with_body_limit(1024).await;
    let big =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(4096)}]})
            .to_string();
    let answer = warden
        .post("/v1/chat/completions", AGENT_KEY, big.clone())
        .await;
    assert_openai_error(&answer, 413, "request_too_large");

    // Chunked, no content-length: the limit still holds while reading.
    let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = big
        .as_bytes()
        .chunks(100)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let request = http::Request::post(format!("{}/v1/messages", warden.base()))
        .header("x-api-key", AGENT_KEY)
        .body(body)
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 413);
    warden.wait_for_calls(2).await;
    assert_eq!(
        warden
            .scalar("SELECT count(*) FROM calls WHERE status_code = 413")
            .await
            .as_deref(),
        Some("2")
    );
    assert!(warden.upstream.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_upstream_gets_502() {
    // Upstreams on a port nobody listens on.
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gateway = gateway_for(
        &format!("http://{closed}/v1"),
        &format!("http://{closed}"),
        dir.path(),
    )
    .await;
    let (status, body) = post_json(
        &gateway,
        "/v1/messages",
        json!({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []}),
    )
    .await;
    assert_eq!(status, 502);
    assert_eq!(body["error"]["type"], "api_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot reach the upstream `anthropic-main`")
    );
    gateway.flush().await;
    let rows = gateway
        .reader()
        .query("SELECT outcome, status_code FROM calls", 10)
        .unwrap();
    assert_eq!(
        rows.rows[0],
        [Some("error".to_owned()), Some("502".to_owned())]
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_upstream_gets_504_after_the_configured_timeout() {
    let options = Options {
        upstream_timeout_secs: 1,
        ..Options::default()
    };
    let warden = TestWarden::start_with(options, |_| Reply::Hang).await;
    let answer = warden
        .post(
            "/v1/chat/completions",
            AGENT_KEY,
            json!({"model": "gpt-4o", "messages": []}).to_string(),
        )
        .await;
    assert_openai_error(&answer, 504, "upstream_timeout");
    let call = last_call(&warden).await;
    assert_eq!(call[..2], [Some("error".into()), Some("504".into())]);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_errors_pass_through_and_are_recorded_without_their_message() {
    let warden = TestWarden::start(|seen| {
        if seen.path == "/v1/chat/completions" {
            Reply::status(429, fixture("openai/error_rate_limit.json"))
        } else {
            Reply::status(401, fixture("openai/error_invalid_key.json"))
        }
    })
    .await;
    let answer = warden
        .post(
            "/v1/chat/completions",
            AGENT_KEY,
            json!({"model": "gpt-4o", "messages": []}).to_string(),
        )
        .await;
    assert_eq!(answer.status, 429);
    assert_eq!(
        answer.body,
        fixture("openai/error_rate_limit.json"),
        "the SDK sees the provider's own error"
    );
    let call = last_call(&warden).await;
    assert_eq!(call[..2], [Some("error".into()), Some("429".into())]);
    assert_eq!(
        call[3].as_deref(),
        Some("upstream answered 429: requests rate_limit_exceeded")
    );

    // The provider refusing Warden's own key is not the agent's fault, and
    // the provider's echo of that key never reaches the agent.
    let answer = warden
        .post(
            "/v1/responses",
            AGENT_KEY,
            json!({"model": "gpt-4o", "input": "x"}).to_string(),
        )
        .await;
    assert_openai_error(&answer, 502, "upstream_auth_failed");
    assert!(!answer.text().contains("sk-"));
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_endpoint_gets_404_in_openai_format() {
    let warden = TestWarden::start(|_| Reply::json(Bytes::new())).await;
    let answer = warden.post("/v1/assistants", AGENT_KEY, "{}").await;
    assert_openai_error(&answer, 404, "unknown_endpoint");
    let call = last_call(&warden).await;
    assert_eq!(call[1].as_deref(), Some("404"));
    assert_eq!(
        warden.scalar("SELECT endpoint FROM calls").await.as_deref(),
        Some("/v1/assistants")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_hanging_up_before_the_answer_is_recorded_as_cancelled() {
    let warden = TestWarden::start(|_| Reply::Hang).await;
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "a question that never gets an answer"}]}).to_string();
    let request = warden
        .request("/v1/chat/completions", Some(AGENT_KEY))
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let client = warden.client.clone();
    let pending = tokio::spawn(async move { client.request(request).await });
    // Wait until the call reached the upstream, then hang up.
    for _ in 0..200 {
        if !warden.upstream.requests().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(warden.upstream.requests().len(), 1);
    pending.abort();
    let _ = pending.await;
    warden.wait_for_calls(1).await;
    let row = warden
        .query("SELECT outcome, usage_source, input_tokens > 0 FROM calls")
        .await;
    assert_eq!(
        row.rows[0],
        [
            Some("cancelled".into()),
            Some("estimated".into()),
            Some("true".into())
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_with_an_untrusted_certificate_is_refused() {
    // An https upstream whose certificate no public root vouches for: a
    // verifying client must refuse it (502), never send the key to it.
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let completed = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            if acceptor.accept(stream).await.is_ok() {
                completed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });

    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway_for(
        &format!("https://{addr}/v1"),
        &format!("https://{addr}"),
        dir.path(),
    )
    .await;
    let (status, body) = post_json(
        &gateway,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": []}),
    )
    .await;
    assert_eq!(status, 502);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("certificate"), "{message}");
    assert_eq!(
        handshakes.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no TLS session was established"
    );
    gateway.shutdown().await;
}
