//! The agent port's HTTP/1.1 over raw sockets: framing a client may choose
//! (chunked bodies, `Expect: 100-continue`, pipelining, HTTP/1.0), requests
//! that are not readable HTTP, and HTTP/2 with prior knowledge.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// One response read off a raw connection.
struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawResponse {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(warden: &TestWarden) -> Raw {
        let stream = TcpStream::connect(warden.gateway().proxy_addr())
            .await
            .unwrap();
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
            .await
            .expect("Warden answers within 10 s")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Reads one response (content-length or chunked framing).
    async fn response(&mut self) -> RawResponse {
        let head_end = loop {
            if let Some(at) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(
                self.fill().await > 0,
                "connection closed before a response head"
            );
        };
        let head = String::from_utf8(self.buf.drain(..head_end).collect()).unwrap();
        let status: u16 = head[9..12].parse().unwrap();
        let mut response = RawResponse {
            status,
            head,
            body: Vec::new(),
        };
        if status == 100 {
            return response;
        }
        if let Some(len) = response.header("content-length") {
            let len: usize = len.parse().unwrap();
            while self.buf.len() < len {
                assert!(self.fill().await > 0, "connection closed inside a body");
            }
            response.body = self.buf.drain(..len).collect();
        } else if response.header("transfer-encoding") == Some("chunked") {
            loop {
                let line_end = loop {
                    if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break at;
                    }
                    assert!(self.fill().await > 0);
                };
                let size =
                    usize::from_str_radix(std::str::from_utf8(&self.buf[..line_end]).unwrap(), 16)
                        .unwrap();
                while self.buf.len() < line_end + 2 + size + 2 {
                    assert!(self.fill().await > 0);
                }
                response
                    .body
                    .extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
                self.buf.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    break;
                }
            }
        }
        response
    }

    /// Whether Warden closed the connection (reads to its end).
    async fn closed(&mut self) -> bool {
        self.fill().await == 0
    }
}

fn chat_body() -> String {
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).to_string()
}

async fn chat_warden() -> TestWarden {
    TestWarden::start(|_| Reply::json(fixture("openai/chat_completion.json"))).await
}

/// A whole chat request from agent alpha, with `extra` header lines.
fn chat_request(extra: &str) -> String {
    let body = chat_body();
    format!(
        "{}{body}",
        post_head(&format!("content-length: {}\r\n{extra}", body.len()))
    )
}

fn post_head(extra: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: warden\r\nauthorization: Bearer {AGENT_KEY}\r\ncontent-type: application/json\r\n{extra}\r\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunked_request_body_reaches_the_upstream_whole() {
    let warden = chat_warden().await;
    let body = chat_body();
    let (first, second) = body.split_at(10);
    let mut raw = Raw::connect(&warden).await;
    raw.send(post_head("transfer-encoding: chunked\r\n").as_bytes())
        .await;
    raw.send(format!("{:x};note=1\r\n{first}\r\n", first.len()).as_bytes())
        .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    raw.send(
        format!(
            "{:x}\r\n{second}\r\n0\r\nx-trailer: t\r\n\r\n",
            second.len()
        )
        .as_bytes(),
    )
    .await;
    let response = raw.response().await;
    assert_eq!(response.status, 200, "{}", response.head);
    assert!(response.json()["usage"]["total_tokens"].is_number());
    let forwarded: serde_json::Value =
        serde_json::from_slice(&warden.upstream.bodies()[0]).unwrap();
    assert_eq!(forwarded["messages"][0]["content"], "hi");
}

#[tokio::test(flavor = "multi_thread")]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let warden = chat_warden().await;
    let body = chat_body();
    let mut raw = Raw::connect(&warden).await;
    raw.send(
        post_head(&format!(
            "content-length: {}\r\nexpect: 100-continue\r\n",
            body.len()
        ))
        .as_bytes(),
    )
    .await;
    // A client that waits for the interim answer before sending its body.
    let interim = raw.response().await;
    assert_eq!(interim.status, 100, "{}", interim.head);
    raw.send(body.as_bytes()).await;
    let response = raw.response().await;
    assert_eq!(response.status, 200, "{}", response.head);
    assert!(response.header("x-warden-call-id").is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let warden = chat_warden().await;
    let body = chat_body();
    let one = chat_request("");
    let unknown = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nauthorization: Bearer wk_nobody\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut raw = Raw::connect(&warden).await;
    // Three requests in one write: the second's key is unknown.
    raw.send(format!("{one}{unknown}{one}").as_bytes()).await;
    let statuses = [
        raw.response().await.status,
        raw.response().await.status,
        raw.response().await.status,
    ];
    assert_eq!(statuses, [200, 401, 200]);
    assert_eq!(warden.upstream.requests().len(), 2);
    // Still open for a fourth.
    raw.send(one.as_bytes()).await;
    assert_eq!(raw.response().await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn http_1_0_and_connection_close_end_the_connection_after_the_answer() {
    let warden = chat_warden().await;
    let body = chat_body();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nauthorization: Bearer {AGENT_KEY}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut raw = Raw::connect(&warden).await;
    raw.send(request.as_bytes()).await;
    let response = raw.response().await;
    assert_eq!(response.status, 200);
    assert!(response.header("content-length").is_some());
    assert!(raw.closed().await, "HTTP/1.0 without keep-alive closes");

    let mut raw = Raw::connect(&warden).await;
    raw.send(chat_request("connection: close\r\n").as_bytes())
        .await;
    let response = raw.response().await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("connection"), Some("close"));
    assert!(raw.closed().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_that_are_not_http_get_a_provider_shaped_error_and_a_close() {
    let warden = chat_warden().await;
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"HELLO\r\n\r\n".to_vec(), 400),
        (
            post_head("content-length: 3\r\ntransfer-encoding: chunked\r\n").into_bytes(),
            400,
        ),
        (
            post_head("content-length: 3\r\ncontent-length: 4\r\n").into_bytes(),
            400,
        ),
        (
            format!(
                "POST /v1/messages HTTP/1.1\r\nx-api-key: {AGENT_KEY}\r\nx-big: {}\r\n\r\n",
                "a".repeat(70_000)
            )
            .into_bytes(),
            431,
        ),
        (
            format!("{}zz\r\n", post_head("transfer-encoding: chunked\r\n")).into_bytes(),
            400,
        ),
    ];
    for (request, status) in cases {
        let mut raw = Raw::connect(&warden).await;
        raw.send(&request).await;
        let response = raw.response().await;
        assert_eq!(
            response.status,
            status,
            "{}: {}",
            String::from_utf8_lossy(&request[..40]),
            String::from_utf8_lossy(&response.body)
        );
        let body = response.json();
        let code = body["error"]["code"]
            .as_str()
            .or(body["error"]["type"].as_str())
            .unwrap_or_default()
            .to_owned();
        assert!(
            code == "bad_http_request" || code == "invalid_request_error",
            "{body}"
        );
        assert!(
            body["error"]["message"].as_str().unwrap().len() > 20,
            "{body}"
        );
        assert_eq!(response.header("connection"), Some("close"));
        assert!(raw.closed().await);
    }
    assert!(warden.upstream.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_over_the_limit_is_not_read_and_the_connection_closes() {
    let warden = TestWarden::start_with_body_limit(1024).await;
    let mut raw = Raw::connect(&warden).await;
    // Only the head is sent: Warden must answer without waiting for 5 MB.
    raw.send(post_head("content-length: 5000000\r\n").as_bytes())
        .await;
    let response = raw.response().await;
    assert_eq!(response.status, 413);
    assert_eq!(response.json()["error"]["code"], "request_too_large");
    assert_eq!(response.header("connection"), Some("close"));
    assert!(raw.closed().await);

    // Chunked: the limit holds while decoding.
    let mut raw = Raw::connect(&warden).await;
    let chunk = "x".repeat(800);
    raw.send(
        format!(
            "{}320\r\n{chunk}\r\n320\r\n{chunk}\r\n0\r\n\r\n",
            post_head("transfer-encoding: chunked\r\n")
        )
        .as_bytes(),
    )
    .await;
    let response = raw.response().await;
    assert_eq!(response.status, 413);
    assert!(raw.closed().await);
    warden.wait_for_calls(2).await;
    assert_eq!(
        warden
            .scalar("SELECT count(*) FROM calls WHERE status_code = 413")
            .await
            .as_deref(),
        Some("2")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_with_prior_knowledge_is_served_on_the_same_port() {
    let warden = chat_warden().await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let mut answers = Vec::new();
    for _ in 0..3 {
        let request = warden
            .request("/v1/chat/completions", Some(AGENT_KEY))
            .body(Full::new(Bytes::from(chat_body())))
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        answers.push((status, body));
    }
    for (status, body) in answers {
        assert_eq!(status, 200);
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(body["usage"]["total_tokens"].is_number());
    }
    warden.wait_for_calls(3).await;
    // An announced body over [server] max_body_bytes (1 MiB here) is refused as on HTTP/1.1.
    let big = Bytes::from(vec![b' '; 2 << 20]);
    let request = warden
        .request("/v1/chat/completions", Some(AGENT_KEY))
        .body(Full::new(big))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 413);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "request_too_large");
}
