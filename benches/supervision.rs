//! Supervision under load, against a real `warden serve` process:
//!
//! - streams: Warden's extra RSS for 1,000 streams in flight mid-body;
//! - halt latency: the same 1,000 streams, one halt; for each stream, the
//!   time from the halt call returning to its error event;
//! - held calls: 10,000 calls held for approval at once; Warden's extra RSS.
//!
//!     cargo bench --bench supervision
//!
//! `WARDEN_BIN=/path/to/warden` runs another build instead of this one.
//!
//! The simulated provider runs in this process and paces its streams, so
//! they are all still running when the halt comes.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use warden::config::sha256_hex;
use warden::demo::sim::{SimOptions, SimProvider};

const STREAMS: usize = 1_000;
const HELD: usize = 10_000;
const STREAM_KEY: &str = "wk_bench_streamer";
const HELD_KEY: &str = "wk_bench_held";
const TOKEN: &str = "wt_bench_operator";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn main() {
    // Criterion's `cargo bench` passes --bench; a filter that is not ours skips.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if filter.is_some_and(|f| !"supervision".contains(&f)) {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

struct Warden {
    child: Child,
    proxy: String,
    admin: String,
}

impl Drop for Warden {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_warden(sim: &SimProvider, dir: &Path) -> Warden {
    let (port, admin_port) = (free_port(), free_port());
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
store = "{store}"

[[upstreams]]
name = "sim-openai"
kind = "openai"
base_url = "{openai}"
models = ["gpt-*"]

[[agents]]
name = "streamer"
key_sha256 = "{streamer}"

[[agents]]
name = "held"
key_sha256 = "{held}"

[[operators]]
name = "bench"
token_sha256 = "{token}"

[[budgets]]
scope = "agent:held"
limit_usd = "0"
period = "day"
on_exceed = "require_approval"

[approvals]
timeout_secs = 600
"#,
        store = dir.join("bench.duckdb").display(),
        openai = sim.openai_base_url(),
        streamer = sha256_hex(STREAM_KEY),
        held = sha256_hex(HELD_KEY),
        token = sha256_hex(TOKEN),
    );
    let path = dir.join("warden.toml");
    std::fs::write(&path, config).unwrap();
    let binary =
        std::env::var("WARDEN_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_warden").to_owned());
    let child = Command::new(binary)
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "error")
        .stderr(Stdio::null())
        .spawn()
        .expect("warden serve starts");
    let warden = Warden {
        child,
        proxy: format!("http://127.0.0.1:{port}"),
        admin: format!("http://127.0.0.1:{admin_port}"),
    };
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    for _ in 0..600 {
        let request = http::Request::get(format!("{}/healthz", warden.admin))
            .body(Full::default())
            .unwrap();
        if client
            .request(request)
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return warden;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("warden serve did not come up");
}

fn chat(key: &str, base: &str, stream: bool, n: usize) -> http::Request<Full<Bytes>> {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "max_tokens": 64,
        "stream": stream,
        "messages": [{"role": "user", "content": format!("call {n}")}],
    });
    http::Request::post(format!("{base}/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn admin(
    client: &HttpClient,
    warden: &Warden,
    path: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let request = http::Request::post(format!("{}{path}", warden.admin))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// Resident memory by where it lives: mimalloc's arenas (Warden's Rust heap,
/// reserved from 2 TiB up), other anonymous memory (DuckDB's malloc heap,
/// stacks), and file pages (the binary's code).
fn rss_by_mapping(pid: u32) -> String {
    let (mut rust, mut other, mut files) = (0u64, 0u64, 0u64);
    let mut bucket = &mut other;
    for line in std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap()
        .lines()
    {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let Some((start, _)) = fields.first().and_then(|f| f.split_once('-'))
            && let Ok(start) = u64::from_str_radix(start, 16)
        {
            bucket = match fields.get(5) {
                Some(path) if path.starts_with('/') => &mut files,
                _ if (0x200_0000_0000..0x400_0000_0000).contains(&start) => &mut rust,
                _ => &mut other,
            };
        } else if fields.first() == Some(&"Rss:") {
            *bucket += fields[1].parse::<u64>().unwrap_or(0);
        }
    }
    format!(
        "mimalloc (Rust heap) {:.1} MB, other anonymous (DuckDB, stacks) {:.1} MB, files {:.1} MB",
        rust as f64 / 1024.0,
        other as f64 / 1024.0,
        files as f64 / 1024.0
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

async fn run() {
    raise_fd_limit();
    let sim = SimProvider::start(SimOptions {
        chunk_delay: Duration::from_millis(250),
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let warden = start_warden(&sim, dir.path()).await;
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();

    // --- streams in flight, then halt latency -----------------------------
    let pid = warden.child.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_streams = rss_kib(pid);
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(STREAMS);
    let mut streams = Vec::with_capacity(STREAMS);
    for n in 0..STREAMS {
        let (client, base, started) = (client.clone(), warden.proxy.clone(), started_tx.clone());
        streams.push(tokio::spawn(async move {
            let response = client
                .request(chat(STREAM_KEY, &base, true, n))
                .await
                .unwrap();
            let mut body = response.into_body();
            let mut first = true;
            let mut seen = Vec::new();
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame.unwrap().into_data() else {
                    continue;
                };
                if first {
                    first = false;
                    started.send(()).await.unwrap();
                }
                seen.extend_from_slice(&data);
                if memchr::memmem::find(&seen, b"\"halted\"").is_some() {
                    return Some(Instant::now());
                }
            }
            None
        }));
        if n % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for _ in 0..STREAMS {
        started_rx.recv().await.unwrap();
    }
    // Each stream sends a chunk every 250 ms for several seconds more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let streaming = rss_kib(pid);
    println!(
        "streams: {STREAMS} streams mid-body; Warden RSS {:.1} MB before, {:.1} MB with them: {:.0} bytes per stream",
        before_streams as f64 / 1024.0,
        streaming as f64 / 1024.0,
        streaming.saturating_sub(before_streams) as f64 * 1024.0 / STREAMS as f64,
    );
    let before_halt = Instant::now();
    let (status, _) = admin(
        &client,
        &warden,
        "/admin/v1/halts",
        serde_json::json!({"scope": "agent:streamer", "reason": "bench"}),
    )
    .await;
    assert_eq!(status, 200);
    let returned = Instant::now();
    let (mut after_return, mut after_sent) = (Vec::new(), Vec::new());
    for stream in streams {
        if let Some(at) = stream.await.unwrap() {
            after_return.push(at.saturating_duration_since(returned).as_secs_f64() * 1000.0);
            after_sent.push((at - before_halt).as_secs_f64() * 1000.0);
        }
    }
    after_return.sort_by(|a, b| a.total_cmp(b));
    after_sent.sort_by(|a, b| a.total_cmp(b));
    println!(
        "halt: {STREAMS} streams in flight, {} cut; the halt call took {:.1} ms (it commits the halt before answering)",
        after_sent.len(),
        (returned - before_halt).as_secs_f64() * 1000.0,
    );
    println!(
        "halt: error event after the call returned p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; after it was sent p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&after_return, 0.50),
        percentile(&after_return, 0.99),
        after_return.last().copied().unwrap_or(f64::NAN),
        percentile(&after_sent, 0.50),
        percentile(&after_sent, 0.99),
        after_sent.last().copied().unwrap_or(f64::NAN),
    );
    admin(
        &client,
        &warden,
        "/admin/v1/resume",
        serde_json::json!({"scope": "agent:streamer"}),
    )
    .await;

    // --- held calls -----------------------------------------------------
    tokio::time::sleep(Duration::from_millis(500)).await;
    // What the connections alone cost: 10,000 open, idle, no request yet.
    let idle_before = rss_kib(pid);
    let address = warden.proxy.trim_start_matches("http://").to_owned();
    let mut idle = Vec::with_capacity(HELD);
    for n in 0..HELD {
        idle.push(tokio::net::TcpStream::connect(&address).await.unwrap());
        if n % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let idle_with = rss_kib(pid);
    println!(
        "held: {HELD} idle connections alone add {:.1} MB ({:.0} bytes each)",
        idle_with.saturating_sub(idle_before) as f64 / 1024.0,
        idle_with.saturating_sub(idle_before) as f64 * 1024.0 / HELD as f64,
    );
    drop(idle);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let baseline = rss_kib(pid);
    println!("held: before, {}", rss_by_mapping(pid));
    let mut held = Vec::with_capacity(HELD);
    for n in 0..HELD {
        let (client, base) = (client.clone(), warden.proxy.clone());
        held.push(tokio::spawn(async move {
            client
                .request(chat(HELD_KEY, &base, false, n))
                .await
                .map(|r| r.status().as_u16())
        }));
        if n % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let list = || async {
        let request = http::Request::get(format!("{}/admin/v1/approvals", warden.admin))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Full::default())
            .unwrap();
        let bytes = client
            .request(request)
            .await
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        value["approvals"].as_array().map_or(0, Vec::len)
    };
    let waiting_since = Instant::now();
    loop {
        let pending = list().await;
        if pending >= HELD {
            break;
        }
        if waiting_since.elapsed() > Duration::from_secs(120) {
            let finished: Vec<_> = held.iter().filter(|h| h.is_finished()).collect();
            panic!(
                "only {pending} of {HELD} calls are held; {} were answered instead",
                finished.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let just_held = rss_kib(pid);
    // Calls wait for minutes: measured once the store writer has gone quiet
    // and checkpointed the burst's rows (after 1 s without new ones).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let holding = rss_kib(pid);
    println!(
        "held: RSS {:.1} MB half a second after the last call was held (the store still writing its rows), {:.1} MB 3 s later",
        just_held as f64 / 1024.0,
        holding as f64 / 1024.0
    );
    println!(
        "held: {HELD} calls waiting for approval; Warden RSS {:.1} MB before, {:.1} MB holding them: {:.1} MB extra ({:.0} bytes per held call)",
        baseline as f64 / 1024.0,
        holding as f64 / 1024.0,
        (holding.saturating_sub(baseline)) as f64 / 1024.0,
        (holding.saturating_sub(baseline)) as f64 * 1024.0 / HELD as f64,
    );
    println!("held: holding, {}", rss_by_mapping(pid));
    let (status, _) = admin(
        &client,
        &warden,
        "/admin/v1/halts",
        serde_json::json!({"scope": "agent:held", "reason": "bench over"}),
    )
    .await;
    assert_eq!(status, 200);
    let mut answered = 0;
    for call in held {
        if call.await.unwrap().is_ok_and(|status| status == 403) {
            answered += 1;
        }
    }
    println!("held: a halt answered {answered} of {HELD} held calls with 403 halted");
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "held: RSS {:.1} MB once they are answered (what stays is allocator and store memory, not held calls)",
        rss_kib(pid) as f64 / 1024.0
    );
}

fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
