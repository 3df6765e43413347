//! The store writer alone: call records sent at a steady rate (as the proxy
//! workers do under load) through the real `Recorder` into a real DuckDB
//! file. Prints the writer thread's CPU time per row, the rows committed,
//! and the process's resident memory before and at its peak.
//!
//!     cargo bench --bench store              # ROWS=400000 RATE=20000
//!     SMAPS=1 cargo bench --bench store      # and the mappings holding memory
//!     MEMORY_MB=64 cargo bench --bench store # another `[server] store_memory_mb`

use std::sync::Arc;
use std::time::{Duration, Instant};

use warden::metrics::Metrics;
use warden::money::Usd;
use warden::providers::Usage;
use warden::store::{CallRecord, Outcome, Store, UsageSource};

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if filter.is_some_and(|f| !"store".contains(&f)) {
        return;
    }
    let rows: u64 = env_or("ROWS", 400_000);
    let rate: u64 = env_or("RATE", 20_000);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(drive(rows, rate));
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn drive(rows: u64, rate: u64) {
    let dir = tempfile::tempdir().unwrap();
    let memory_mb = env_or("MEMORY_MB", warden::store::DEFAULT_MEMORY_MB.into()) as u32;
    let store = Store::open_with_memory(&dir.path().join("bench.duckdb"), memory_mb).unwrap();
    let metrics = Arc::new(Metrics::default());
    let (recorder, writer, reader) = store
        .start(Duration::from_millis(200), 65_536, metrics.clone())
        .unwrap();
    let rss_before = rss_kb();
    let writer_cpu_before = thread_cpu("warden-store-wr");
    let agents: Vec<Arc<str>> = (0..4).map(|i| Arc::from(format!("agent-{i}"))).collect();
    let upstream: Arc<str> = Arc::from("openai");
    let started = Instant::now();
    // Sent in 1 ms ticks, as a steady stream of finished calls.
    let per_tick = (rate / 1000).max(1);
    let mut peak_rss = rss_before;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut sent = 0u64;
    while sent < rows {
        tick.tick().await;
        for _ in 0..per_tick.min(rows - sent) {
            let now = warden::store::record::now_micros();
            recorder.record(CallRecord {
                call_id: uuid::Uuid::now_v7().to_string(),
                ts_start_us: now - 1200,
                ts_end_us: now,
                agent: Some(agents[sent as usize % agents.len()].clone()),
                upstream: Some(upstream.clone()),
                provider: Some("openai"),
                model: Some("gpt-4o-mini-2024-07-18".to_owned()),
                endpoint: "/v1/chat/completions".to_owned(),
                stream: sent.is_multiple_of(3),
                status_code: 200,
                outcome: Outcome::Ok,
                usage: Usage {
                    input_tokens: 120 + sent % 50,
                    output_tokens: 40 + sent % 200,
                    ..Usage::default()
                },
                usage_source: UsageSource::Provider,
                cost: Some(Usd::from_nanos(21_000 + (sent % 977) as i64)),
                latency_ms: 1.2,
                ttft_ms: None,
                run_id: None,
                step_id: None,
                error: None,
                pending_estimate: None,
            });
            sent += 1;
        }
        if sent % (rate / 2).max(1) < per_tick {
            peak_rss = peak_rss.max(rss_kb());
        }
    }
    recorder.flush().await;
    let elapsed = started.elapsed();
    peak_rss = peak_rss.max(rss_kb());
    let writer_cpu = thread_cpu("warden-store-wr") - writer_cpu_before;
    let counted = reader
        .query("SELECT count(*) FROM calls", 1)
        .unwrap()
        .rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .unwrap_or_default();
    println!(
        "store: {sent} rows at {rate}/s in {:.1} s; committed {counted}; dropped {}",
        elapsed.as_secs_f64(),
        metrics.records_dropped.get()
    );
    println!(
        "store: writer CPU {:.2} s = {:.2} µs per row",
        writer_cpu.as_secs_f64(),
        writer_cpu.as_secs_f64() * 1e6 / sent as f64
    );
    println!(
        "store: RSS {} MB before, {} MB peak (sampled twice a second; VmHWM {} MB)",
        rss_before / 1024,
        peak_rss / 1024,
        status_kb("VmHWM") / 1024
    );
    if std::env::var_os("SMAPS").is_some() {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut name = String::new();
        for line in smaps.lines() {
            if line.contains('-') && !line.starts_with(|c: char| c.is_ascii_uppercase()) {
                name = line.to_owned();
            } else if let Some(v) = line.strip_prefix("Rss:") {
                let kb: u64 = v.trim().trim_end_matches(" kB").parse().unwrap_or(0);
                if kb > 2048 {
                    println!("  {kb} kB {name}");
                }
            }
        }
    }
    drop(recorder);
    writer.join();
}

fn rss_kb() -> u64 {
    status_kb("VmRSS")
}

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

/// User plus system time of the thread with this name.
fn thread_cpu(name: &str) -> Duration {
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let utime: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let stime: f64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        total += (utime + stime) / ticks_per_s;
    }
    Duration::from_secs_f64(total)
}
