//! The workflow load script: 100 concurrent runs of the demo workflow
//! (research -> draft + fact_check -> approve -> publish) driven through a
//! real Warden over real HTTP by the demo's two simulated agents (with step
//! headers), an operator approving every gate through the admin API, and
//! Warden's own model steps. Checks that every run and every step ended
//! succeeded, and prints the wall time, calls and runs per second.
//!
//!     cargo bench --bench workflow_load          # RUNS=100 by default

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use warden::demo::sim::{SimOptions, SimProvider};
use warden::demo::{self, HttpClient, SimAgent, exchange, json_request};
use warden::gateway::Gateway;

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if filter.is_some_and(|f| !"workflow_load".contains(&f)) {
        return;
    }
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(100);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(drive(runs));
}

async fn drive(count: usize) {
    let dir = tempfile::tempdir().unwrap();
    let flows = dir.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("research_brief.toml"), demo::SAMPLE_WORKFLOW).unwrap();
    let sim = SimProvider::start(SimOptions {
        chunk_delay: Duration::ZERO,
    })
    .await
    .unwrap();
    let mut config =
        demo::demo_config_with_workflows(&sim, &dir.path().join("w.duckdb"), Some(&flows));
    // One operator starts every run and grants every gate.
    config.server.admin_changes_per_minute = 100_000;
    let gateway = Gateway::start(config).await.unwrap();
    let base = format!("http://{}", gateway.proxy_addr());
    let admin = format!("http://{}", gateway.admin_addr());
    let client: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(256)
            .build_http();

    let started = Instant::now();
    let starts = (0..count).map(|i| {
        let client = client.clone();
        let url = format!("{admin}/admin/v1/runs");
        async move {
            let body = json!({"workflow": "research_brief", "inputs": {"topic": format!("topic {i}"), "words": 100}});
            let request = json_request(http::Method::POST, url, demo::OPERATOR_TOKEN, &body);
            let (_, _, answer) = exchange(&client, request, "start a run").await.unwrap();
            serde_json::from_slice::<Value>(&answer).unwrap()["run_id"].as_str().unwrap().to_owned()
        }
    });
    let run_ids: Vec<String> = futures_util::future::join_all(starts).await;
    let started_all = started.elapsed();

    let (log, mut lines) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move { while lines.recv().await.is_some() {} });
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let agents: Vec<_> = [
        ("researcher", demo::RESEARCHER_KEY),
        ("writer", demo::WRITER_KEY),
    ]
    .into_iter()
    .map(|(name, key)| {
        let agent = SimAgent {
            name,
            key,
            headerless: false,
        };
        tokio::spawn(agent.work(base.clone(), client.clone(), log.clone(), stop.clone()))
    })
    .collect();

    // The operator: grants every open gate, until no run is in flight.
    let get = |path: String| {
        http::Request::get(format!("{admin}{path}"))
            .header("authorization", format!("Bearer {}", demo::OPERATOR_TOKEN))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    let mut approved = 0;
    loop {
        let (_, _, body) = exchange(&client, get("/admin/v1/approvals".into()), "list approvals")
            .await
            .unwrap();
        let pending: Value = serde_json::from_slice(&body).unwrap();
        let grants = pending["approvals"].as_array().unwrap().iter().map(|a| {
            let id = a["approval_id"].as_str().unwrap().to_owned();
            let client = client.clone();
            let url = format!("{admin}/admin/v1/approvals/{id}/approve");
            async move {
                let request = json_request(
                    http::Method::POST,
                    url,
                    demo::OPERATOR_TOKEN,
                    &json!({"reason": "load"}),
                );
                exchange(&client, request, "approve").await.unwrap();
            }
        });
        approved += futures_util::future::join_all(grants).await.len();
        let (_, _, body) = exchange(
            &client,
            get("/admin/v1/runs?status=running".into()),
            "list runs",
        )
        .await
        .unwrap();
        let running = serde_json::from_slice::<Value>(&body).unwrap()["runs"]
            .as_array()
            .unwrap()
            .len();
        if running == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            panic!("{running} runs still in flight after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let _ = stop_tx.send(true);
    for agent in agents {
        agent.await.unwrap().unwrap();
    }
    gateway.flush().await;
    let reader = gateway.reader().clone();
    let ids = run_ids.clone();
    let (runs_ok, steps_ok, calls, bound) = tokio::task::spawn_blocking(move || {
        let scalar = |sql: &str| {
            reader.query(sql, 10).unwrap().rows[0][0]
                .clone()
                .unwrap_or_default()
        };
        let list = ids
            .iter()
            .map(|id| format!("'{id}'"))
            .collect::<Vec<_>>()
            .join(",");
        (
            scalar(&format!(
                "SELECT count(*) FROM runs WHERE status = 'succeeded' AND run_id IN ({list})"
            )),
            scalar(&format!(
                "SELECT count(*) FROM steps WHERE status = 'succeeded' AND run_id IN ({list})"
            )),
            scalar("SELECT count(*) FROM calls"),
            scalar("SELECT count(*) FROM calls WHERE run_id IS NOT NULL AND step_id IS NOT NULL"),
        )
    })
    .await
    .unwrap();
    println!(
        "workflow load: {count} concurrent runs of research_brief (5 steps: 3 agent, 1 approval, 1 model)"
    );
    println!(
        "  all started in {:.0} ms; all ended in {:.2} s ({:.1} runs/s)",
        started_all.as_secs_f64() * 1000.0,
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  runs succeeded: {runs_ok} of {count}; steps succeeded: {steps_ok} of {}; gates approved: {approved}",
        count * 5
    );
    println!("  calls: {calls}, bound to a run and step: {bound}");
    assert_eq!(runs_ok, count.to_string(), "every run succeeds");
    assert_eq!(steps_ok, (count * 5).to_string(), "every step succeeds");
    gateway.shutdown().await;
}
