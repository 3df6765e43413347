//! Criterion benches for workflows:
//! - validation of a 1,000-step definition, every step needing earlier ones
//!   and reading an upstream output in its instructions (parse, petgraph
//!   checks, template references);
//! - advancing a step: what the call that completes a step adds, through
//!   the real engine (`Runs::call_ended`: usage, output, the DAG advanced,
//!   step rows and audit entries queued to a real DuckDB writer, events),
//!   for the sample diamond (research done, two lanes open).
//!
//!     cargo bench --bench workflow

use std::fmt::Write;
use std::path::Path;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use serde_json::{Map, json};
use warden::providers::answer::Answer;
use warden::workflow::{CallEnded, Definition, Runs, WorkflowAgents, WorkflowSet};

fn thousand_steps() -> String {
    let mut text = String::from(
        "name = \"big\"\ndescription = \"1,000 steps\"\n\n[inputs]\ntopic = { type = \"string\", required = true }\n",
    );
    for i in 0..1_000 {
        let _ = write!(text, "\n[[steps]]\nid = \"s{i}\"\nagent = \"worker\"\n");
        if i > 0 {
            let needs: Vec<String> = [i - 1, i / 2, i / 3]
                .iter()
                .filter(|n| **n < i)
                .map(|n| format!("\"s{n}\""))
                .collect();
            let _ = writeln!(text, "needs = [{}]", needs.join(", "));
            let _ = writeln!(
                text,
                "instructions = \"Continue {{{{ inputs.topic }}}} from {{{{ steps.s{}.output }}}}\"",
                i / 2
            );
        } else {
            text.push_str("instructions = \"Start on {{ inputs.topic }}\"\n");
        }
    }
    text
}

fn validation(c: &mut Criterion) {
    let text = thousand_steps();
    let agents = WorkflowAgents {
        agents: Some([("worker".to_owned(), Vec::new())].into_iter().collect()),
    };
    Definition::parse(&text, Path::new("big.toml"), &agents)
        .expect("the generated workflow is valid");
    c.bench_function("validate 1,000-step workflow", |b| {
        b.iter(|| Definition::parse(black_box(&text), Path::new("big.toml"), &agents).unwrap())
    });
}

/// A real engine over a real store, serving the files of `dir`.
fn engine(dir: &Path) -> (Arc<Runs>, warden::store::WriterHandle) {
    let store = warden::store::Store::open(&dir.join("bench.duckdb")).unwrap();
    let (recorder, writer, _reader) = store
        .start(
            Duration::from_millis(50),
            65_536,
            Arc::new(warden::metrics::Metrics::default()),
        )
        .unwrap();
    let events = warden::events::EventBus::default();
    let queue = warden::approvals::ApprovalQueue::new(
        warden::approvals::Mode::Hold,
        Duration::from_secs(300),
        Duration::from_secs(86_400),
        Vec::new(),
        recorder.clone(),
        events.clone(),
        warden::alerts::AlertSink::log_only(),
    );
    let supervisor = Arc::new(warden::supervisor::Supervisor::new(
        Arc::new(warden::halts::Halts::new(Vec::new())),
        queue,
        events,
        recorder.clone(),
    ));
    let workflows = Arc::new(WorkflowSet::load(
        Some(dir.to_owned()),
        WorkflowAgents::default(),
        HashSet::new(),
        None,
        recorder.clone(),
    ));
    let agents = ["researcher", "writer"]
        .into_iter()
        .map(|a| (a.to_owned(), Default::default()))
        .collect::<HashMap<_, _>>();
    (
        Runs::new(workflows, agents, Vec::new(), recorder, supervisor),
        writer,
    )
}

/// Times only the call that completes `step`: each iteration starts a run
/// (untimed), takes the step, completes it (timed) and cancels the run
/// (untimed) so that the engine does not grow.
fn advance_bench(
    c: &mut Criterion,
    name: &str,
    runs: &Arc<Runs>,
    workflow: &str,
    inputs: serde_json::Value,
    step: &str,
    agent: &str,
) {
    let inputs: Map<String, serde_json::Value> = serde_json::from_value(inputs).unwrap();
    c.bench_function(name, |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let run = runs.start(workflow, None, inputs.clone(), "bench").unwrap();
                let binding = runs
                    .bind(agent, Some(&run.run_id), Some(step), &mut || {
                        warden::money::Usd::ZERO
                    })
                    .unwrap()
                    .expect("the call is bound");
                let ended = CallEnded {
                    call_id: "call".into(),
                    ok: true,
                    status: 200,
                    error: None,
                    cost: Some(warden::money::Usd::from_nanos(12_345)),
                    input_tokens: 120,
                    output_tokens: 40,
                    answer: Some(Answer {
                        text: "Three sources: tide tables, almanacs, harbour logs.".into(),
                        is_final: true,
                    }),
                };
                let started = Instant::now();
                runs.call_ended(black_box(&binding), ended);
                total += started.elapsed();
                runs.cancel(&run.run_id, "bench", "done").unwrap();
            }
            total
        })
    });
}

fn advancing(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("research_brief.toml"),
        warden::demo::SAMPLE_WORKFLOW,
    )
    .unwrap();
    let (runs, _writer) = engine(dir.path());
    advance_bench(
        c,
        "advance: diamond research done, two lanes open",
        &runs,
        "research_brief",
        json!({"topic": "tides"}),
        "research",
        "researcher",
    );
}

criterion_group!(benches, validation, advancing);
criterion_main!(benches);
