//! Process metrics as plain atomics, rendered in Prometheus text format by
//! the admin listener. Nothing here locks.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::store::record::{CallRecord, Outcome};

#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the latency buckets, in milliseconds.
const LATENCY_BUCKETS_MS: [f64; 14] = [
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
];

#[derive(Default, Debug)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_MS.len()],
    count: AtomicU64,
    /// Sum in microseconds, to keep it an integer.
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe_ms(&self, ms: f64) {
        if let Some(i) = LATENCY_BUCKETS_MS.iter().position(|&bound| ms <= bound) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((ms * 1000.0) as u64, Ordering::Relaxed);
    }
}

#[derive(Default, Debug)]
pub struct Metrics {
    calls_by_outcome: [Counter; Outcome::ALL.len()],
    latency: Histogram,
    input_tokens: Counter,
    output_tokens: Counter,
    cached_input_tokens: Counter,
    reasoning_tokens: Counter,
    /// Nano-dollars; the ledger itself is exact in the store.
    cost_nanos: AtomicI64,
    pub calls_in_flight: AtomicI64,
    pub unpriced_calls: Counter,
    pub estimated_usage_calls: Counter,
    pub records_written: Counter,
    pub records_dropped: Counter,
    pub store_backpressure: Counter,
}

impl Metrics {
    /// Counted when the request path hands the record over.
    pub fn observe_call(&self, record: &CallRecord) {
        self.calls_by_outcome[record.outcome.index()].inc();
        self.latency.observe_ms(record.latency_ms);
    }

    /// Counted by the writer, once estimates are complete.
    pub fn observe_usage(&self, record: &CallRecord) {
        self.input_tokens.add(record.usage.input_tokens);
        self.output_tokens.add(record.usage.output_tokens);
        self.cached_input_tokens
            .add(record.usage.cached_input_tokens);
        self.reasoning_tokens.add(record.usage.reasoning_tokens);
        if let Some(cost) = record.cost {
            self.cost_nanos.fetch_add(cost.nanos(), Ordering::Relaxed);
        }
        if record.usage_source == crate::store::record::UsageSource::Estimated {
            self.estimated_usage_calls.inc();
        }
    }

    pub fn calls(&self, outcome: Outcome) -> u64 {
        self.calls_by_outcome[outcome.index()].get()
    }

    pub fn render(&self, queue_depth: usize) -> String {
        let mut out = String::with_capacity(4096);
        let name = family_into(
            &mut out,
            "warden_calls_total",
            "counter",
            "Model calls by outcome.",
        );
        for outcome in Outcome::ALL {
            let _ = writeln!(
                out,
                "{name}{{outcome=\"{}\"}} {}",
                outcome.as_str(),
                self.calls(outcome)
            );
        }

        let name = family_into(
            &mut out,
            "warden_call_duration_seconds",
            "histogram",
            "Call latency, request to last byte.",
        );
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS_MS.iter().enumerate() {
            cumulative += self.latency.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {cumulative}",
                bound / 1000.0
            );
        }
        let count = self.latency.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.latency.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");

        let name = family_into(
            &mut out,
            "warden_tokens_total",
            "counter",
            "Tokens metered, by kind.",
        );
        for (kind, counter) in [
            ("input", &self.input_tokens),
            ("output", &self.output_tokens),
            ("cached_input", &self.cached_input_tokens),
            ("reasoning", &self.reasoning_tokens),
        ] {
            let _ = writeln!(out, "{name}{{kind=\"{kind}\"}} {}", counter.get());
        }
        let simple: [(&str, &str, &str, String); 8] = [
            (
                "warden_cost_usd_total",
                "counter",
                "Cost of metered calls in USD.",
                format!("{}", self.cost_nanos.load(Ordering::Relaxed) as f64 / 1e9),
            ),
            (
                "warden_calls_in_flight",
                "gauge",
                "Calls being served now.",
                self.calls_in_flight.load(Ordering::Relaxed).to_string(),
            ),
            (
                "warden_unpriced_calls_total",
                "counter",
                "Calls to models with no price (cost recorded as NULL).",
                self.unpriced_calls.get().to_string(),
            ),
            (
                "warden_estimated_usage_calls_total",
                "counter",
                "Calls whose tokens were estimated because the provider reported none.",
                self.estimated_usage_calls.get().to_string(),
            ),
            (
                "warden_store_queue_depth",
                "gauge",
                "Records waiting for the store writer.",
                queue_depth.to_string(),
            ),
            (
                "warden_store_records_written_total",
                "counter",
                "Call records committed to the store.",
                self.records_written.get().to_string(),
            ),
            (
                "warden_store_records_dropped_total",
                "counter",
                "Records lost because the store failed.",
                self.records_dropped.get().to_string(),
            ),
            (
                "warden_store_backpressure_total",
                "counter",
                "Records that had to wait for room in the writer queue.",
                self.store_backpressure.get().to_string(),
            ),
        ];
        for (name, kind, help, value) in simple {
            let name = family_into(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}

fn family_into(out: &mut String, name: &'static str, kind: &str, help: &str) -> &'static str {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    name
}
