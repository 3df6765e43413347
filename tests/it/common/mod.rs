//! Test harness: a scripted model provider on a real socket (the only thing
//! simulated), a real Warden in front of it with a real DuckDB file, and a
//! plain HTTP client playing the agent.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

use warden::config::{Config, sha256_hex};
use warden::gateway::Gateway;
use warden::store::query::QueryResult;

pub const AGENT_KEY: &str = "wk_test_agent_alpha_0123456789";
pub const OTHER_AGENT_KEY: &str = "wk_test_agent_beta_0123456789";
pub const OPERATOR_TOKEN: &str = "wt_test_operator_0123456789";
pub const READONLY_TOKEN: &str = "wt_test_readonly_0123456789";
pub const PROVIDER_KEY: &str = "sk-test-provider-key-must-never-leak";
pub const PROVIDER_KEY_ENV: &str = "WARDEN_TEST_PROVIDER_KEY";

pub fn fixture(path: &str) -> Bytes {
    Bytes::from(
        std::fs::read(format!(
            "{}/tests/fixtures/{path}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
    )
}

/// One step of a scripted upstream body.
#[derive(Clone)]
pub enum Chunk {
    Data(Bytes),
    Sleep(Duration),
    /// Pause until the test says go on.
    Wait(Arc<Notify>),
    /// Break the connection mid-body.
    Die,
}

/// What the scripted upstream answers.
#[derive(Clone)]
pub enum Reply {
    Body {
        status: StatusCode,
        content_type: &'static str,
        body: Bytes,
    },
    Stream {
        chunks: Vec<Chunk>,
    },
    /// Never answer.
    Hang,
}

impl Reply {
    pub fn json(body: Bytes) -> Reply {
        Reply::Body {
            status: StatusCode::OK,
            content_type: "application/json",
            body,
        }
    }

    pub fn status(status: u16, body: Bytes) -> Reply {
        Reply::Body {
            status: StatusCode::from_u16(status).unwrap(),
            content_type: "application/json",
            body,
        }
    }

    /// An SSE fixture sent one event per chunk.
    pub fn sse_events(body: &[u8]) -> Reply {
        let text = String::from_utf8_lossy(body).into_owned();
        let chunks = text
            .split_inclusive("\n\n")
            .map(|e| Chunk::Data(Bytes::from(e.to_owned())))
            .collect();
        Reply::Stream { chunks }
    }
}

#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

type Script = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A scripted provider on a real socket.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Fires when a streamed body could not be delivered: the client left.
    pub client_gone: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeUpstream {
    pub async fn start(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> FakeUpstream {
        let script: Script = Arc::new(script);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let client_gone = Arc::new(Notify::new());
        let (seen2, gone2) = (seen.clone(), client_gone.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (script, seen, gone) = (script.clone(), seen2.clone(), gone2.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (script, seen, gone) = (script.clone(), seen.clone(), gone.clone());
                        async move { Ok::<_, Infallible>(serve(request, script, seen, gone).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeUpstream {
            addr,
            seen,
            client_gone,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The bodies of every request seen so far, in arrival order.
    pub fn bodies(&self) -> Vec<Bytes> {
        self.requests().into_iter().map(|seen| seen.body).collect()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type FakeBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

async fn serve(
    request: Request<Incoming>,
    script: Script,
    seen: Arc<Mutex<Vec<Seen>>>,
    gone: Arc<Notify>,
) -> Response<FakeBody> {
    let path = request.uri().path().to_owned();
    let headers = request.headers().clone();
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let entry = Seen {
        path,
        headers,
        body,
    };
    let reply = script(&entry);
    seen.lock().unwrap().push(entry);
    match reply {
        Reply::Body {
            status,
            content_type,
            body,
        } => {
            let mut response =
                Response::new(Full::new(body).map_err(|never| match never {}).boxed());
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert("content-type", content_type.parse().unwrap());
            response
        }
        Reply::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Reply::Stream { chunks } => {
            let (tx, mut rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
            tokio::spawn(async move {
                for chunk in chunks {
                    match chunk {
                        Chunk::Data(bytes) => {
                            if tx.send(Ok(Frame::data(bytes))).await.is_err() {
                                gone.notify_one();
                                return;
                            }
                        }
                        Chunk::Sleep(d) => tokio::time::sleep(d).await,
                        Chunk::Wait(notify) => {
                            tokio::select! {
                                () = notify.notified() => {}
                                () = tx.closed() => { gone.notify_one(); return; }
                            }
                        }
                        Chunk::Die => {
                            let _ = tx.send(Err(std::io::Error::other("upstream died"))).await;
                            return;
                        }
                    }
                }
            });
            let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
            let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            response.headers_mut().insert(
                "content-type",
                "text/event-stream; charset=utf-8".parse().unwrap(),
            );
            response
        }
    }
}

pub struct Options {
    pub max_body_bytes: u64,
    pub upstream_timeout_secs: u64,
    pub extra: String,
    /// More lines of agent alpha's [[agents]] table.
    pub alpha_extra: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_body_bytes: 1 << 20,
            upstream_timeout_secs: 30,
            extra: String::new(),
            alpha_extra: String::new(),
        }
    }
}

pub fn config_text(
    openai_base: &str,
    anthropic_base: &str,
    store: &Path,
    options: &Options,
) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
store = "{store}"
max_body_bytes = {max_body}
upstream_timeout_secs = {timeout}
flush_interval_ms = 50

[[upstreams]]
name = "openai-main"
kind = "openai"
base_url = "{openai_base}"
api_key_env = "{PROVIDER_KEY_ENV}"
models = ["gpt-*", "o3*", "text-embedding-*", "local-*"]

[[upstreams]]
name = "anthropic-main"
kind = "anthropic"
base_url = "{anthropic_base}"
api_key_env = "{PROVIDER_KEY_ENV}"
models = ["claude-*"]

[[agents]]
name = "alpha"
key_sha256 = "{alpha}"
role = "researcher"
{alpha_extra}

[[agents]]
name = "beta"
key_sha256 = "{beta}"

[[operators]]
name = "olga"
token_sha256 = "{op}"

[[operators]]
name = "reader"
token_sha256 = "{ro}"
read_only = true
{extra}
"#,
        store = store.display(),
        max_body = options.max_body_bytes,
        timeout = options.upstream_timeout_secs,
        alpha = sha256_hex(AGENT_KEY),
        beta = sha256_hex(OTHER_AGENT_KEY),
        op = sha256_hex(OPERATOR_TOKEN),
        ro = sha256_hex(READONLY_TOKEN),
        extra = options.extra,
        alpha_extra = options.alpha_extra,
    )
}

/// A real Warden in front of one scripted upstream that plays both formats.
pub struct TestWarden {
    pub gateway: Option<Gateway>,
    pub config_text: String,
    pub upstream: FakeUpstream,
    pub dir: tempfile::TempDir,
    pub client: Client<HttpConnector, Full<Bytes>>,
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    }
}

impl TestWarden {
    pub async fn start(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> TestWarden {
        TestWarden::start_with(Options::default(), script).await
    }

    /// A Warden refusing request bodies over `max_body_bytes`, in front of an
    /// upstream that answers every call with a chat completion.
    pub async fn start_with_body_limit(max_body_bytes: u64) -> TestWarden {
        let options = Options {
            max_body_bytes,
            ..Options::default()
        };
        TestWarden::start_with(options, |_| {
            Reply::json(fixture("openai/chat_completion.json"))
        })
        .await
    }

    pub async fn start_with(
        options: Options,
        script: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> TestWarden {
        // SAFETY: every test sets the same value; nothing reads it concurrently in a conflicting way.
        unsafe { std::env::set_var(PROVIDER_KEY_ENV, PROVIDER_KEY) };
        let upstream = FakeUpstream::start(script).await;
        let dir = tempfile::tempdir().unwrap();
        let text = config_text(
            &format!("{}/v1", upstream.url()),
            &upstream.url(),
            &dir.path().join("warden.duckdb"),
            &options,
        );
        let config = Config::parse(&text, Path::new("test.toml")).unwrap();
        let gateway = Gateway::start(config).await.unwrap();
        TestWarden {
            gateway: Some(gateway),
            config_text: text,
            upstream,
            dir,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn gateway(&self) -> &Gateway {
        self.gateway.as_ref().unwrap()
    }

    pub fn store_path(&self) -> PathBuf {
        self.dir.path().join("warden.duckdb")
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.gateway().proxy_addr())
    }

    pub fn admin(&self) -> String {
        format!("http://{}", self.gateway().admin_addr())
    }

    pub fn request(&self, path: &str, key: Option<&str>) -> http::request::Builder {
        let mut builder = Request::post(format!("{}{path}", self.base()))
            .header("content-type", "application/json");
        if let Some(key) = key {
            builder = builder.header("authorization", format!("Bearer {key}"));
        }
        builder
    }

    pub async fn send(&self, request: Request<Full<Bytes>>) -> Answer {
        answer(&self.client, request).await
    }

    /// Sends a request from a task of its own, for calls that wait (held
    /// for approval, or on a hanging upstream) while the test acts.
    pub fn spawn_send(&self, request: Request<Full<Bytes>>) -> tokio::task::JoinHandle<Answer> {
        let client = self.client.clone();
        tokio::spawn(async move { answer(&client, request).await })
    }

    /// The admin event stream (`query`: "" or like "?kind=halt"), read past
    /// its greeting comment.
    pub async fn events(&self, query: &str) -> Incoming {
        let request = Request::get(format!("{}/admin/v1/events{query}", self.admin()))
            .header("authorization", format!("Bearer {OPERATOR_TOKEN}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let mut body = self.client.request(request).await.unwrap().into_body();
        next_chunk(&mut body).await;
        body
    }

    pub async fn post(&self, path: &str, key: &str, body: impl Into<Bytes>) -> Answer {
        let body = body.into();
        let request = self.request(path, Some(key)).body(Full::new(body)).unwrap();
        self.send(request).await
    }

    /// Streams a request and returns the response head and its body.
    pub async fn open(&self, path: &str, key: &str, body: impl Into<Bytes>) -> Response<Incoming> {
        let body = body.into();
        let request = self.request(path, Some(key)).body(Full::new(body)).unwrap();
        self.client.request(request).await.unwrap()
    }

    pub async fn query(&self, sql: &str) -> QueryResult {
        self.gateway().flush().await;
        let reader = self.gateway().reader().clone();
        let sql = sql.to_owned();
        tokio::task::spawn_blocking(move || reader.query(&sql, 10_000))
            .await
            .unwrap()
            .unwrap()
    }

    /// The single value of a one-row, one-column query.
    pub async fn scalar(&self, sql: &str) -> Option<String> {
        let result = self.query(sql).await;
        assert_eq!(
            result.rows.len(),
            1,
            "{sql} returned {} rows",
            result.rows.len()
        );
        result.rows[0][0].clone()
    }

    /// Waits (bounded) until the store has `n` calls: streamed calls are
    /// recorded when their body ends, which may be just after the client
    /// read the last byte.
    pub async fn wait_for_calls(&self, n: usize) {
        for _ in 0..200 {
            let count: usize = self
                .scalar("SELECT count(*) FROM calls")
                .await
                .unwrap()
                .parse()
                .unwrap();
            if count >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the store never reached {n} calls");
    }

    pub async fn admin_request(
        &self,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> Answer {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.admin()));
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        self.send(builder.body(Full::new(body)).unwrap()).await
    }

    /// The version of a workflow in service ("" when none is).
    pub async fn workflow_version(&self, workflow: &str) -> String {
        let answer = self
            .admin_request(
                http::Method::GET,
                "/admin/v1/workflows",
                Some(OPERATOR_TOKEN),
                None,
            )
            .await;
        answer.json()["workflows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == workflow)
            .and_then(|w| w["version_hash"].as_str())
            .unwrap_or_default()
            .to_owned()
    }

    /// Rewrites `dir/WORKFLOW.toml` and waits (bounded) until Warden serves
    /// the edit; returns the versions before and after.
    pub async fn edit_workflow(&self, dir: &Path, workflow: &str, text: &str) -> (String, String) {
        let before = self.workflow_version(workflow).await;
        std::fs::write(dir.join(format!("{workflow}.toml")), text).unwrap();
        for _ in 0..200 {
            let version = self.workflow_version(workflow).await;
            if !version.is_empty() && version != before {
                return (before, version);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("workflow {workflow} never changed version");
    }

    pub async fn stop(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.shutdown().await;
        }
    }

    /// Starts Warden again on the same config and store (after `stop`).
    pub async fn restart(&mut self) {
        self.stop().await;
        let config = Config::parse(&self.config_text, Path::new("test.toml")).unwrap();
        self.gateway = Some(Gateway::start(config).await.unwrap());
    }
}

async fn answer(
    client: &Client<HttpConnector, Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Answer {
    let response = client.request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Reads a streamed body to its end, chunk by chunk.
pub async fn read_all(mut body: Incoming) -> Bytes {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            out.extend_from_slice(&data);
        }
    }
    Bytes::from(out)
}

/// Reads the next data frame, failing the test if none comes in 10 s (a
/// liveness bound, not a speed assertion).
pub async fn next_chunk(body: &mut Incoming) -> Bytes {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("no chunk arrived within 10 s")
            .expect("the stream ended")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            return data;
        }
    }
}

/// A Warden in front of upstreams at the given base URLs (no scripted
/// provider), with its store in `dir`.
pub async fn gateway_for(openai_base: &str, anthropic_base: &str, dir: &Path) -> Gateway {
    // SAFETY: every test sets the same value.
    unsafe { std::env::set_var(PROVIDER_KEY_ENV, PROVIDER_KEY) };
    let text = config_text(
        openai_base,
        anthropic_base,
        &dir.join("warden.duckdb"),
        &Options::default(),
    );
    Gateway::start(Config::parse(&text, Path::new("test.toml")).unwrap())
        .await
        .unwrap()
}

/// Posts a JSON body to a gateway as the test agent; returns the status and
/// the JSON answer.
pub async fn post_json(
    gateway: &Gateway,
    path: &str,
    body: serde_json::Value,
) -> (StatusCode, serde_json::Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = Request::post(format!("http://{}{path}", gateway.proxy_addr()))
        .header("authorization", format!("Bearer {AGENT_KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}
