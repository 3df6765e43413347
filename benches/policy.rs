//! One policy evaluation as a call meets it: a fresh instance of the shipped
//! `cost_gate` module, its input written in, `warden_evaluate`, and the
//! decision parsed; also `model_allowlist`, the two together, the per-call
//! input serialisation, `redact_pii` on a chat body, and the floor: a module
//! that answers allow without reading its input (what the host's side of an
//! evaluation costs). The two policies and the floor are also timed with
//! caches cold, as a loaded proxy meets them.
//!
//!     cargo bench --bench policy
//!
//! Besides criterion's estimates it prints p50 and p99 over 100 000 single
//! evaluations timed one by one (the bar is on both).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use warden::policy::input::{CallInput, PolicyInput, TimeInput};
use warden::policy::{FailMode, ModuleKind, ModuleSet, ModuleSpec};

fn spec(name: &str, kind: ModuleKind, path: &str, config: &str) -> ModuleSpec {
    ModuleSpec {
        name: name.into(),
        kind,
        path: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path),
        fail: FailMode::Closed,
        timeout_ms: 5,
        max_memory_mb: 16,
        include_messages: false,
        config_json: config.into(),
    }
}

fn modules(specs: &[ModuleSpec]) -> ModuleSet {
    ModuleSet::load(specs, None, Arc::new(|_| {})).unwrap()
}

fn shared_input() -> Vec<u8> {
    let capabilities = vec!["search".to_owned(), "summarise".to_owned()];
    let input = PolicyInput {
        call: CallInput {
            call_id: "01936a8e-7c1d-7b2a-9a4e-3f0c2d1b5e6f",
            agent: "researcher",
            role: "analyst",
            capabilities: &capabilities,
            provider: "openai",
            upstream: "openai-main",
            model: "gpt-4o-mini",
            endpoint: "chat.completions",
            stream: false,
            max_tokens: Some(256),
            estimated_input_tokens: 96,
            estimated_output_tokens: 256,
            estimated_cost_usd: Some(warden::money::Usd::parse("0.0001680").unwrap()),
            message_count: 2,
            tool_names: vec!["get_weather".into()],
            headers: vec![],
        },
        activity: Default::default(),
        budgets: vec![],
        run: None,
        time: TimeInput::now(),
    };
    let mut shared = Vec::with_capacity(1024);
    input.write_json(&mut shared);
    shared
}

/// The cheapest module ABI v1 allows: its answer is a constant and only the
/// first KiB of its memory is put back after each evaluation.
fn floor_module() -> PathBuf {
    // One file, rewritten by every run: nothing left behind per run.
    let path = std::env::temp_dir().join("warden-bench-floor.wat");
    std::fs::write(
        &path,
        r#"(module
            (memory (export "memory") 1)
            (global (export "__heap_base") i32 (i32.const 1024))
            (global (export "wd_heap_next") i32 (i32.const 1020))
            (data (i32.const 0) "{\"action\":\"allow\"}")
            (func (export "warden_alloc") (param i32) (result i32) (i32.const 1024))
            (func (export "warden_evaluate") (param i32 i32) (result i64) (i64.const 18)))"#,
    )
    .unwrap();
    path
}

fn percentiles(mut run: impl FnMut()) -> (Duration, Duration) {
    for _ in 0..10_000 {
        run();
    }
    let mut times: Vec<Duration> = (0..100_000)
        .map(|_| {
            let started = Instant::now();
            run();
            started.elapsed()
        })
        .collect();
    times.sort();
    (times[times.len() / 2], times[times.len() * 99 / 100])
}

fn bench_policies(c: &mut Criterion) {
    let gate = modules(&[spec(
        "cost_gate",
        ModuleKind::Policy,
        "policies/cost_gate.wasm",
        r#"{"max_call_usd":0.5,"hard_max_usd":5}"#,
    )]);
    let allowlist_spec = spec(
        "model_allowlist",
        ModuleKind::Policy,
        "policies/model_allowlist.wasm",
        r#"{"analyst":["gpt-4o*","claude-*"],"*":["gpt-4o-mini"]}"#,
    );
    let allowlist = modules(std::slice::from_ref(&allowlist_spec));
    let both = modules(&[
        spec(
            "cost_gate",
            ModuleKind::Policy,
            "policies/cost_gate.wasm",
            r#"{"max_call_usd":0.5,"hard_max_usd":5}"#,
        ),
        allowlist_spec,
    ]);
    let input = shared_input();
    let floor = modules(&[spec(
        "allow_at_once",
        ModuleKind::Policy,
        floor_module().to_str().unwrap(),
        "{}",
    )]);

    c.bench_function("cost_gate: instantiate + evaluate + parse", |b| {
        b.iter(|| black_box(gate.evaluate(black_box(&input), None)))
    });
    c.bench_function("model_allowlist", |b| {
        b.iter(|| black_box(allowlist.evaluate(black_box(&input), None)))
    });
    c.bench_function("cost_gate + model_allowlist", |b| {
        b.iter(|| black_box(both.evaluate(black_box(&input), None)))
    });
    c.bench_function("floor: a module that answers allow at once", |b| {
        b.iter(|| black_box(floor.evaluate(black_box(&input), None)))
    });
    // In a loaded proxy the network stack runs between two evaluations and
    // leaves little of the evaluation's working set in L1/L2: the same
    // evaluations, each after 4 MiB of other memory has been written (not
    // timed).
    let mut evict = vec![0u8; 4 << 20];
    let mut cold = |name: &str, set: &ModuleSet| {
        c.bench_function(&format!("{name}, caches cold"), |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for i in 0..iterations {
                    for line in evict.chunks_mut(64) {
                        line[0] = line[0].wrapping_add(i as u8);
                    }
                    let started = Instant::now();
                    black_box(set.evaluate(black_box(&input), None));
                    total += started.elapsed();
                }
                total
            })
        });
    };
    cold("cost_gate + model_allowlist", &both);
    cold("floor", &floor);
    c.bench_function("policy input serialisation", |b| {
        b.iter(|| black_box(shared_input()))
    });

    let redact = modules(&[spec(
        "redact_pii",
        ModuleKind::Plugin,
        "plugins/redact_pii.wasm",
        "{}",
    )]);
    let body = br#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a careful research assistant."},{"role":"user","content":"Summarise the attached quarterly report in three bullet points and send it to jane.doe@example.com or call +1 415 555 0100."}],"max_tokens":256}"#;
    c.bench_function("redact_pii on a 300-byte chat body", |b| {
        b.iter(|| black_box(redact.transform(black_box(body)).unwrap()))
    });

    let (p50, p99) = percentiles(|| {
        black_box(gate.evaluate(&input, None));
    });
    println!(
        "cost_gate single evaluations: p50 {p50:?}, p99 {p99:?} (bar: p50 <= 5 µs, p99 <= 20 µs)"
    );
    let (p50, p99) = percentiles(|| {
        black_box(both.evaluate(&input, None));
    });
    println!("cost_gate + model_allowlist: p50 {p50:?}, p99 {p99:?}");
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = bench_policies
}
criterion_main!(benches);
