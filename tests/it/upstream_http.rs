//! Warden's own HTTP/1.1 client for `http://` upstreams, against an upstream
//! written on a raw socket: connections are pooled and reused, an upstream
//! that closes them (at once, or just as a call arrives) costs no call, and
//! every framing an HTTP/1.1 server may choose reaches the agent intact.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use warden::gateway::Gateway;

use crate::common::*;

/// What the raw upstream does with the `nth` request of a connection.
enum Act {
    /// Writes these bytes and keeps the connection.
    Answer(Vec<u8>),
    /// Writes these bytes and closes the connection.
    AnswerAndClose(Vec<u8>),
    /// Closes the connection without a word.
    Drop,
}

struct RawUpstream {
    url: String,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl RawUpstream {
    async fn start(act: impl Fn(usize) -> Act + Send + Sync + 'static) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let act = Arc::new(act);
        let (accepted, served) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, act.clone(), served.clone()));
            }
        });
        RawUpstream {
            url,
            connections,
            requests,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut stream: TcpStream,
    act: Arc<dyn Fn(usize) -> Act + Send + Sync>,
    served: Arc<AtomicUsize>,
) {
    let mut buf = Vec::new();
    for nth in 0.. {
        if !read_request(&mut stream, &mut buf).await {
            return;
        }
        served.fetch_add(1, Ordering::SeqCst);
        match act(nth) {
            Act::Answer(bytes) => {
                if stream.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Act::AnswerAndClose(bytes) => {
                let _ = stream.write_all(&bytes).await;
                return;
            }
            Act::Drop => return,
        }
    }
}

/// Reads one request (head and content-length body); false at the end of
/// the connection.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + length {
                buf.drain(..end + 4 + length);
                return true;
            }
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn with_length(body: &[u8]) -> Vec<u8> {
    let mut answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(body);
    answer
}

/// A Warden in front of a raw upstream (its store in a temporary
/// directory) and one agent connection to it, reused for every call (so
/// every call is served by the same proxy worker and its pool). One HTTP/1.1
/// connection made by hand: a pooling client may open a second one when
/// the first is not back in its pool yet, which could land on another
/// worker with a pool of its own.
struct Front {
    gateway: Gateway,
    agent: tokio::sync::Mutex<SendRequest<Full<Bytes>>>,
    host: String,
    _dir: tempfile::TempDir,
}

impl Front {
    async fn before(upstream: &RawUpstream) -> Front {
        let dir = tempfile::tempdir().unwrap();
        let gateway = gateway_for(&upstream.url, &upstream.url, dir.path()).await;
        let stream = TcpStream::connect(gateway.proxy_addr()).await.unwrap();
        let (agent, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        Front {
            host: gateway.proxy_addr().to_string(),
            gateway,
            agent: tokio::sync::Mutex::new(agent),
            _dir: dir,
        }
    }

    async fn call(&self) -> (u16, Bytes) {
        let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
        let request = http::Request::post("/v1/chat/completions")
            .header("host", &self.host)
            .header("authorization", format!("Bearer {AGENT_KEY}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let mut agent = self.agent.lock().await;
        agent.ready().await.unwrap();
        let response = agent.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.into_body().collect().await.unwrap().to_bytes(),
        )
    }

    /// Outcome, status and output tokens of every recorded call, in order.
    async fn recorded(&self) -> Vec<Vec<Option<String>>> {
        self.gateway.flush().await;
        self.gateway
            .reader()
            .query(
                "SELECT outcome, status_code, output_tokens FROM calls ORDER BY ts_start",
                100,
            )
            .unwrap()
            .rows
    }

    async fn shutdown(self) {
        self.gateway.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_share_one_kept_alive_upstream_connection() {
    let completion = fixture("openai/chat_completion.json");
    let answer = with_length(&completion);
    let upstream = RawUpstream::start(move |_| Act::Answer(answer.clone())).await;
    let warden = Front::before(&upstream).await;
    for _ in 0..20 {
        let (status, body) = warden.call().await;
        assert_eq!(status, 200);
        assert_eq!(body, completion);
    }
    assert_eq!(upstream.requests(), 20);
    assert_eq!(
        upstream.connections(),
        1,
        "every call went over one connection"
    );
    let rows = warden.recorded().await;
    assert_eq!(rows.len(), 20);
    assert!(rows.iter().all(|r| r[0].as_deref() == Some("ok")));
    warden.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_closes_its_connections_costs_no_call() {
    // One answer per connection: without `Connection: close` (an upstream
    // whose keep-alive ran out) and with it.
    let completion = fixture("openai/chat_completion.json");
    for announced in [false, true] {
        let mut answer = with_length(&completion);
        if announced {
            answer.splice(17..17, b"connection: close\r\n".iter().copied());
        }
        let upstream = RawUpstream::start(move |_| Act::AnswerAndClose(answer.clone())).await;
        let warden = Front::before(&upstream).await;
        for _ in 0..5 {
            let (status, body) = warden.call().await;
            assert_eq!(status, 200, "announced close: {announced}");
            assert_eq!(body, completion);
            // Time for the upstream's FIN to arrive.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(upstream.requests(), 5);
        assert_eq!(
            upstream.connections(),
            5,
            "a closed connection is never reused"
        );
        warden.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kept_connection_dropped_as_a_call_arrives_is_retried_only_when_it_had_idled() {
    // The upstream takes the second request of every connection and closes
    // without answering: what an upstream whose keep-alive timer fires just
    // as the request arrives looks like from Warden.
    let completion = fixture("openai/chat_completion.json");
    let answer = with_length(&completion);
    let upstream = RawUpstream::start(move |nth| {
        if nth == 0 {
            Act::Answer(answer.clone())
        } else {
            Act::Drop
        }
    })
    .await;
    let warden = Front::before(&upstream).await;
    assert_eq!(warden.call().await.0, 200);

    // Right after an answer the upstream may have started on the call: not
    // sent again (it could run twice), the agent gets a 502 to retry on.
    let (status, body) = warden.call().await;
    assert_eq!(status, 502);
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"]["code"], "upstream_unreachable");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("closed the connection before it answered"),
        "{error}"
    );
    assert_eq!(upstream.connections(), 1);

    // A connection that idled past a second: retried once on a new one.
    assert_eq!(warden.call().await.0, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = warden.call().await;
    assert_eq!(status, 200);
    assert_eq!(body, completion);
    assert_eq!(upstream.connections(), 3);
    assert_eq!(upstream.requests(), 5);

    let rows = warden.recorded().await;
    let outcomes: Vec<_> = rows.iter().map(|r| r[1].clone().unwrap()).collect();
    assert_eq!(outcomes, ["200", "502", "200", "200"]);
    warden.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_and_close_delimited_answers_reach_the_agent_whole() {
    let completion = fixture("openai/chat_completion.json");
    let (first, rest) = completion.split_at(40);
    let mut chunked =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    for piece in [first, rest] {
        chunked.extend_from_slice(format!("{:x};ext=1\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\nx-trailer: yes\r\n\r\n");
    let mut until_close = b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n".to_vec();
    until_close.extend_from_slice(&completion);
    let mut interim = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
    interim.extend_from_slice(&with_length(&completion));

    for (name, wire, closes) in [
        ("chunked", chunked, false),
        ("close-delimited", until_close, true),
        ("after 100 Continue", interim, false),
    ] {
        let act_wire = wire.clone();
        let upstream = RawUpstream::start(move |_| {
            if closes {
                Act::AnswerAndClose(act_wire.clone())
            } else {
                Act::Answer(act_wire.clone())
            }
        })
        .await;
        let warden = Front::before(&upstream).await;
        for _ in 0..3 {
            let (status, body) = warden.call().await;
            assert_eq!(status, 200, "{name}");
            assert_eq!(body, completion, "{name}");
        }
        let expected_connections = if closes { 3 } else { 1 };
        assert_eq!(upstream.connections(), expected_connections, "{name}");
        let rows = warden.recorded().await;
        assert!(
            rows.iter()
                .all(|r| r[0].as_deref() == Some("ok") && r[2].as_deref() == Some("10")),
            "{name}: {rows:?}"
        );
        warden.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_that_is_not_http_gets_502_and_is_recorded() {
    for wire in [
        &b"SSH-2.0-OpenSSH_9.6\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: ten\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    ] {
        let upstream = RawUpstream::start(move |_| Act::AnswerAndClose(wire.to_vec())).await;
        let warden = Front::before(&upstream).await;
        let (status, body) = warden.call().await;
        let text = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, 502, "{text}");
        assert!(text.contains("not valid HTTP/1.1"), "{text}");
        let rows = warden.recorded().await;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0][..2], [Some("error".into()), Some("502".into())]);
        warden.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_answer_ends_at_once_and_keeps_its_connection() {
    let upstream = RawUpstream::start(|_| {
        Act::Answer(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n"
                .to_vec(),
        )
    })
    .await;
    let warden = Front::before(&upstream).await;
    for _ in 0..2 {
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), warden.call())
            .await
            .expect("an empty answer is not waited on");
        assert_eq!((status, body.len()), (200, 0));
    }
    assert_eq!(
        upstream.connections(),
        1,
        "the connection went back to the pool"
    );
    warden.shutdown().await;
}
