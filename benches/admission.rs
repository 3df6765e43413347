//! Criterion benches for admission: request and token rate limits, budget
//! reservation and settlement, as a call meets them on the request path.
//!
//!     cargo bench --bench admission
//!
//! `admit+settle/2 threads` runs two threads against the same agent, model
//! and budgets; one iteration is one call on each thread, so the two-thread
//! rate relative to one thread is 2 × (1-thread time) / (2-thread time).

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use warden::alerts::AlertSink;
use warden::limits::{
    BudgetBook, BudgetScope, BudgetSpec, CallFacts, CallSubject, LimitScope, LimitValues, Limits,
    OnExceed, Period, RateLimits,
};
use warden::metering::PriceTable;
use warden::money::Usd;
use warden::providers::{Endpoint, Usage};

const BODY: &[u8] = br#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a careful research assistant."},{"role":"user","content":"Summarise the attached quarterly report in three bullet points."}],"max_tokens":256}"#;

/// Limits that never refuse, far above what the bench spends: per-agent
/// request and token limits and an agent budget; with `global`, the same
/// again for everyone together.
fn limits(global: bool) -> Limits {
    let generous = LimitValues {
        requests_per_minute: Some(u32::MAX),
        tokens_per_minute: Some(1 << 50),
    };
    let mut scopes = vec![(LimitScope::Agent("researcher".into()), generous)];
    let mut budgets = vec![BudgetScope::Agent("researcher".into())];
    if global {
        scopes.push((LimitScope::Global, generous));
        budgets.push(BudgetScope::Global);
    }
    let rates = RateLimits::new(scopes);
    let budget = |scope| BudgetSpec {
        scope,
        period: Period::Day,
        limit: Usd::from_whole_dollars(1 << 40),
        on_exceed: OnExceed::Deny,
    };
    let book = BudgetBook::new(
        &budgets.into_iter().map(budget).collect::<Vec<_>>(),
        AlertSink::log_only(),
        warden::store::record::now_micros(),
    );
    Limits::new(rates, book)
}

fn one_call(limits: &Limits, price: &warden::metering::prices::ModelPrice) {
    let admission = limits
        .admit(&CallFacts {
            subject: CallSubject {
                agent: "researcher",
                model: "gpt-4o-mini",
                run_id: None,
                workflow: None,
            },
            endpoint: Endpoint::ChatCompletions,
            body: BODY,
            max_tokens: Some(256),
            price: Some(price),
        })
        .expect("the bench's limits never refuse");
    let usage = Usage {
        input_tokens: 38,
        output_tokens: 120,
        ..Usage::default()
    };
    black_box(admission.settle(
        &usage,
        Some(price.cost(&usage)),
        warden::store::record::now_micros(),
    ));
}

fn bench_admission(c: &mut Criterion) {
    let prices = PriceTable::builtin();
    let price = prices.lookup("gpt-4o-mini").unwrap();
    for (name, global) in [("agent limits", false), ("agent and global limits", true)] {
        let limits = Arc::new(limits(global));
        let mut group = c.benchmark_group(format!("admit+settle, {name}"));
        group.bench_function("1 thread", |b| b.iter(|| one_call(&limits, &price)));
        group.bench_function("2 threads", |b| {
            b.iter_custom(|iters| two_threads(&limits, &price, iters))
        });
        group.finish();
    }

    let nothing = Limits::new(
        RateLimits::default(),
        BudgetBook::new(&[], AlertSink::log_only(), 0),
    );
    c.bench_function("admit+settle/nothing configured", |b| {
        b.iter(|| one_call(&nothing, &price))
    });
    c.bench_function("input upper bound (190-byte body)", |b| {
        b.iter(|| warden::limits::input_upper_bound(black_box(BODY)))
    });
}

/// `iters` calls on each of two threads at once; the wall time of both.
fn two_threads(
    limits: &Arc<Limits>,
    price: &Arc<warden::metering::prices::ModelPrice>,
    iters: u64,
) -> Duration {
    let start = Arc::new(Barrier::new(3));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (limits, price, start) = (limits.clone(), price.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..iters {
                    one_call(&limits, &price);
                }
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    for worker in workers {
        worker.join().unwrap();
    }
    began.elapsed()
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = bench_admission
}
criterion_main!(benches);
