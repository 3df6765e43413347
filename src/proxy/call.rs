//! One call as it moves through the pipeline: what is known about it so far,
//! and the guarantee that it is recorded exactly once, whether it succeeds,
//! is refused, or is dropped half-way because the agent hung up.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode};

use super::ProxyState;
use super::body::ProxyBody;
use crate::limits::Admission;
use crate::metering::MeterReport;
use crate::metering::prices::ModelPrice;
use crate::money::Usd;
use crate::providers::{self, Endpoint, ErrorKind, ProviderKind, Usage};
use crate::store::record::{CallRecord, Outcome, PendingEstimate, UsageSource};

// Names, not strings: inserting by `&str` parses and hashes the name again
// on every call.
pub static CALL_ID_HEADER: HeaderName = HeaderName::from_static("x-warden-call-id");
pub static COST_HEADER: HeaderName = HeaderName::from_static("x-warden-cost-usd");

pub static BUDGET_REMAINING_HEADER: HeaderName =
    HeaderName::from_static("x-warden-budget-remaining");

/// A refusal or failure, answered in the caller's format and recorded.
#[derive(Debug)]
pub struct Refusal {
    pub kind: ErrorKind,
    pub code: &'static str,
    pub message: String,
    pub outcome: Outcome,
    /// Extra response headers (`retry-after`, `x-ratelimit-*`).
    pub headers: Option<Box<http::HeaderMap>>,
    /// The call was cut after it reached the upstream: its usage is
    /// estimated and its charges settled, not given back.
    pub used_upstream: bool,
}

impl Refusal {
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Self {
        let outcome = if kind == ErrorKind::InvalidKey {
            Outcome::Denied
        } else {
            Outcome::Error
        };
        Refusal {
            kind,
            code,
            message: message.into(),
            outcome,
            headers: None,
            used_upstream: false,
        }
    }

    /// A call refused or cut by a halt: 403 `halted` with the halt's reason.
    pub fn halted(halt: &crate::halts::Halt) -> Self {
        Refusal::new(ErrorKind::Forbidden, "halted", halt.message()).with_outcome(Outcome::Halted)
    }

    /// Cut in flight: the upstream may already have used tokens.
    pub fn after_upstream(mut self) -> Self {
        self.used_upstream = true;
        self
    }

    pub fn with_outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }

    pub fn with_headers(mut self, headers: http::HeaderMap) -> Self {
        self.headers = Some(Box::new(headers));
        self
    }
}

/// What settling a call found: its exact cost when known now, and what is
/// left of its tightest budget.
#[derive(Debug, Default, Clone, Copy)]
pub struct Settled {
    pub cost: Option<Usd>,
    pub budget_remaining: Option<Usd>,
}

thread_local! {
    static CALL_ID_CLOCK: uuid::timestamp::context::ContextV7 =
        const { uuid::timestamp::context::ContextV7::new() };
}

/// Each worker orders its own call ids: `Uuid::now_v7` shares one
/// mutex-guarded counter between threads, whose cache line then moved
/// between the cores with every call.
static CALL_ID_CONTEXT: uuid::timestamp::context::ThreadLocalContext<
    uuid::timestamp::context::ContextV7,
> = uuid::timestamp::context::ThreadLocalContext::new(&CALL_ID_CLOCK);

/// A new call id (UUIDv7) and the call's start in Unix microseconds, from
/// one reading of the clock.
fn new_call_id() -> (String, i64) {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let timestamp = uuid::Timestamp::from_unix(
        &CALL_ID_CONTEXT,
        since_epoch.as_secs(),
        since_epoch.subsec_nanos(),
    );
    (
        uuid::Uuid::new_v7(timestamp).to_string(),
        since_epoch.as_micros() as i64,
    )
}

/// How a call that reached the upstream ended.
pub struct Settlement {
    pub status: StatusCode,
    pub outcome: Outcome,
    pub usage: Usage,
    pub input_known: bool,
    pub output_known: bool,
    pub output_text: Vec<u8>,
    pub output_overflow: u64,
    pub error: Option<String>,
    pub answer: Option<crate::providers::answer::Answer>,
}

impl Settlement {
    pub fn from_report(
        status: StatusCode,
        outcome: Outcome,
        report: MeterReport,
        error: Option<String>,
    ) -> Self {
        Settlement {
            status,
            outcome,
            usage: report.usage,
            input_known: report.input_known,
            output_known: report.output_known,
            output_text: report.text,
            output_overflow: report.text_overflow,
            error: error.or(report.error),
            answer: report.answer,
        }
    }
}

pub struct Call {
    state: Arc<ProxyState>,
    pub id: String,
    started: Instant,
    ts_start_us: i64,
    pub protocol: ProviderKind,
    pub endpoint: Option<Endpoint>,
    raw_path: Option<String>,
    pub agent: Option<Arc<str>>,
    pub upstream: Option<Arc<str>>,
    pub provider: Option<&'static str>,
    pub model: Option<String>,
    pub stream: bool,
    pub run_id: Option<String>,
    pub step_id: Option<String>,
    /// The workflow run and step this call serves (boxed: most calls serve
    /// none, and every call's frame would carry its size).
    pub binding: Option<Box<crate::workflow::Binding>>,
    pub request_body: Bytes,
    pub price: Option<Arc<ModelPrice>>,
    /// Rate-limit and budget charges, settled when the call ends.
    pub admission: Option<Admission>,
    /// The agent, when its activity is counted (policies are loaded).
    pub counted_agent: Option<Arc<super::Agent>>,
    /// Its upper-bound usage and cost, worked out once when first needed.
    upper_bound: Option<crate::limits::UpperBound>,
    /// Set once the call may be cut by a halt (it waits on an operator or
    /// the upstream).
    halt_watch: Option<crate::halts::HaltWatch>,
    ttft_ms: Option<f64>,
    /// When the call ended, from `started`: read once for the budget's
    /// settlement and the record.
    ended: Option<std::time::Duration>,
    recorded: bool,
}

impl Call {
    pub fn begin(state: Arc<ProxyState>, protocol: ProviderKind) -> Call {
        let (id, ts_start_us) = new_call_id();
        state
            .metrics
            .calls_in_flight
            .fetch_add(1, Ordering::Relaxed);
        Call {
            state,
            id,
            started: Instant::now(),
            ts_start_us,
            protocol,
            endpoint: None,
            raw_path: None,
            agent: None,
            upstream: None,
            provider: None,
            model: None,
            stream: false,
            run_id: None,
            step_id: None,
            binding: None,
            request_body: Bytes::new(),
            price: None,
            admission: None,
            counted_agent: None,
            upper_bound: None,
            halt_watch: None,
            ttft_ms: None,
            ended: None,
            recorded: false,
        }
    }

    pub fn set_unknown_path(&mut self, path: &str) {
        self.raw_path = Some(path.chars().take(200).collect());
    }

    /// The upstream's name for messages; "upstream" before routing.
    pub fn upstream_name(&self) -> Arc<str> {
        self.upstream.clone().unwrap_or_else(|| "upstream".into())
    }

    /// The most this call can use and cost (its body, `max_tokens`, price).
    pub fn upper_bound(
        &mut self,
        endpoint: Endpoint,
        body: &[u8],
        max_tokens: Option<u64>,
    ) -> crate::limits::UpperBound {
        let price = self.price.as_deref();
        *self
            .upper_bound
            .get_or_insert_with(|| crate::limits::UpperBound::of(endpoint, body, max_tokens, price))
    }

    /// Whether the answer is read: the call may end its workflow step.
    pub fn reads_answer(&self) -> bool {
        self.binding
            .as_ref()
            .and_then(|b| b.step.as_ref())
            .is_some_and(|s| s.ends_on_answer)
    }

    /// From now on an immediate halt of this call's agent or run cuts it.
    pub fn watch_halts(&mut self) {
        if self.halt_watch.is_none() {
            self.halt_watch = Some(self.state.supervisor.halts.watch(&self.state.halt_slots));
        }
    }

    /// Ready with the halt that cuts this call.
    pub fn poll_halted(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Arc<crate::halts::Halt>> {
        match (&mut self.halt_watch, &self.agent) {
            (Some(watch), Some(agent)) => watch.poll_cut(cx, agent, self.run_id.as_deref()),
            _ => std::task::Poll::Pending,
        }
    }

    /// Waits for a halt that cuts this call; never ready without one.
    pub async fn halted(&mut self) -> Arc<crate::halts::Halt> {
        std::future::poll_fn(|cx| self.poll_halted(cx)).await
    }

    /// The upstream's first byte (headers, or the first chunk of a stream).
    pub fn mark_first_byte(&mut self) {
        if self.ttft_ms.is_none() {
            self.ttft_ms = Some(self.elapsed_ms());
        }
    }

    /// Ends the call's clock (once; later calls give the same end) and
    /// returns the end in Unix µs: the start's wall-clock time plus the
    /// time elapsed on the monotonic clock, so that the record's end minus
    /// its start is its latency whatever the wall clock does meanwhile.
    fn end_now(&mut self) -> i64 {
        let ended = *self.ended.get_or_insert_with(|| self.started.elapsed());
        self.ts_start_us + ended.as_micros() as i64
    }

    fn elapsed_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }

    /// Made when answering rather than kept: a clone of a kept one would
    /// allocate just the same, and a held call would carry it for minutes.
    pub fn id_header(&self) -> HeaderValue {
        HeaderValue::from_str(&self.id).expect("a uuid is a valid header value")
    }

    /// Answers the refusal in the caller's format and records it.
    pub fn refuse(mut self, refusal: Refusal) -> Response<ProxyBody> {
        let body =
            providers::error_body(self.protocol, refusal.kind, refusal.code, &refusal.message);
        tracing::info!(call_id = %self.id, code = refusal.code, status = refusal.kind.status().as_u16(), "call refused");
        let status = refusal.kind.status();
        self.state
            .supervisor
            .events
            .publish(|| crate::events::EventParts {
                kind: "call_refused",
                actor: "warden".into(),
                subject: Some(self.id.clone()),
                message: format!(
                    "{} call of agent {} refused ({} {}): {}",
                    self.model.as_deref().unwrap_or("a"),
                    self.agent.as_deref().unwrap_or("?"),
                    status.as_u16(),
                    refusal.code,
                    refusal.message
                ),
                data: serde_json::json!({
                    "call_id": self.id,
                    "agent": self.agent.as_deref(),
                    "model": self.model,
                    "status": status.as_u16(),
                    "code": refusal.code,
                    "message": refusal.message,
                }),
            });
        let pending = if refusal.used_upstream {
            Some(self.estimate_pending(false))
        } else {
            // A refused call used nothing: its charges are given back.
            self.admission = None;
            None
        };
        self.record(CallEnd {
            answer: None,
            status,
            outcome: refusal.outcome,
            usage: Usage::default(),
            usage_source: UsageSource::Provider,
            cost: None,
            error: Some(refusal.message),
            pending,
        });
        let mut response = Response::new(ProxyBody::full(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(CALL_ID_HEADER.clone(), self.id_header());
        if let Some(extra) = refusal.headers {
            headers.extend(*extra);
        }
        response
    }

    /// Records a call that reached the upstream. Returns the exact cost when
    /// it is known now: free endpoints and calls that used no tokens (upstream
    /// errors) cost zero; otherwise the provider's usage at the model's price.
    /// Estimated calls are priced (and their charges settled) by the writer.
    pub fn settle(mut self, settlement: Settlement) -> Settled {
        let exact = settlement.input_known && settlement.output_known;
        let free = !self.endpoint.is_none_or(Endpoint::is_billed)
            || (exact && settlement.usage == Usage::default());
        let cost = match (free, exact) {
            (true, _) => Some(Usd::ZERO),
            (false, true) => self.price.as_ref().map(|p| p.cost(&settlement.usage)),
            (false, false) => None,
        };
        if !free && self.price.is_none() {
            self.state.metrics.unpriced_calls.inc();
            tracing::warn!(call_id = %self.id, model = self.model.as_deref().unwrap_or(""), "no price for this model; cost recorded as NULL");
        }
        let pending = (!exact).then(|| {
            Box::new(PendingEstimate {
                request_body: self.request_body.clone(),
                input_known: settlement.input_known,
                output_text: settlement.output_text,
                output_overflow: settlement.output_overflow,
                output_known: settlement.output_known,
                price: self.price.clone().filter(|_| !free),
                admission: self.admission.take(),
            })
        });
        let ended_us = self.end_now();
        let budget_remaining = match self.admission.take() {
            Some(admission) => admission.settle(&settlement.usage, cost, ended_us),
            None => None,
        };
        self.record(CallEnd {
            answer: settlement.answer,
            status: settlement.status,
            outcome: settlement.outcome,
            usage: settlement.usage,
            usage_source: UsageSource::Provider,
            cost,
            error: settlement.error,
            pending,
        });
        Settled {
            cost,
            budget_remaining,
        }
    }

    /// Records a call Warden answered itself (the model list).
    pub fn settle_local(&mut self, status: StatusCode) {
        self.record(CallEnd {
            answer: None,
            status,
            outcome: Outcome::Ok,
            usage: Usage::default(),
            usage_source: UsageSource::Provider,
            cost: Some(Usd::ZERO),
            error: None,
            pending: None,
        });
    }

    /// What the writer estimates for a call that ended before the provider
    /// reported usage: the input from the request body, no output.
    fn estimate_pending(&mut self, output_known: bool) -> Box<PendingEstimate> {
        Box::new(PendingEstimate {
            request_body: self.request_body.clone(),
            input_known: self.request_body.is_empty(),
            output_text: Vec::new(),
            output_overflow: 0,
            output_known,
            price: self.price.clone(),
            admission: self.admission.take(),
        })
    }

    fn record(&mut self, end: CallEnd) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        if end.outcome != Outcome::Ok
            && let Some(agent) = &self.counted_agent
        {
            agent.activity.call_failed();
        }
        self.state
            .metrics
            .calls_in_flight
            .fetch_sub(1, Ordering::Relaxed);
        let endpoint = match (self.endpoint, &self.raw_path) {
            (Some(endpoint), _) => endpoint.as_str().to_owned(),
            (None, Some(path)) => path.clone(),
            (None, None) => String::new(),
        };
        if let Some(binding) = self.binding.take() {
            self.state.runs.call_ended(
                &binding,
                crate::workflow::CallEnded {
                    call_id: self.id.clone(),
                    ok: end.outcome == Outcome::Ok && end.status.is_success(),
                    status: end.status.as_u16(),
                    error: end.error.clone(),
                    cost: end.cost,
                    input_tokens: end.usage.input_tokens,
                    output_tokens: end.usage.output_tokens,
                    answer: end.answer,
                },
            );
        }
        let ts_end_us = self.end_now();
        let latency_ms = (ts_end_us - self.ts_start_us) as f64 / 1000.0;
        let record = CallRecord {
            call_id: std::mem::take(&mut self.id),
            ts_start_us: self.ts_start_us,
            ts_end_us,
            agent: self.agent.clone(),
            upstream: self.upstream.clone(),
            provider: self.provider,
            model: self.model.take(),
            endpoint,
            stream: self.stream,
            status_code: end.status.as_u16(),
            outcome: end.outcome,
            usage: end.usage,
            usage_source: end.usage_source,
            cost: end.cost,
            latency_ms,
            ttft_ms: self.ttft_ms,
            run_id: self.run_id.take(),
            step_id: self.step_id.take(),
            error: end.error,
            pending_estimate: end.pending,
        };
        self.state.recorder.record(record);
    }
}

struct CallEnd {
    answer: Option<crate::providers::answer::Answer>,
    status: StatusCode,
    outcome: Outcome,
    usage: Usage,
    usage_source: UsageSource,
    cost: Option<Usd>,
    error: Option<String>,
    pending: Option<Box<PendingEstimate>>,
}

impl Drop for Call {
    /// The agent hung up before Warden answered: the upstream request is
    /// dropped with this future, and the call is recorded as cancelled with
    /// its input estimated from the request.
    fn drop(&mut self) {
        if self.recorded {
            return;
        }
        let pending = self.estimate_pending(true);
        self.record(CallEnd {
            answer: None,
            status: StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            outcome: Outcome::Cancelled,
            usage: Usage::default(),
            usage_source: UsageSource::Provider,
            cost: None,
            error: Some("the agent closed the connection before the response".into()),
            pending: Some(pending),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::new_call_id;

    #[test]
    fn call_ids_are_v7_in_order_and_carry_the_start_time() {
        let ids: Vec<(String, i64)> = (0..1000).map(|_| new_call_id()).collect();
        for pair in ids.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{} then {}", pair[0].0, pair[1].0);
        }
        for (id, start_us) in &ids {
            let uuid = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(uuid.get_version_num(), 7);
            let (secs, nanos) = uuid.get_timestamp().unwrap().to_unix();
            let uuid_ms = secs as i64 * 1000 + i64::from(nanos) / 1_000_000;
            assert!((uuid_ms - start_us / 1000).abs() <= 1, "{id} vs {start_us}");
        }
    }
}
