//! The rows the request path hands to the store writer.

use std::sync::Arc;

use bytes::Bytes;

use crate::metering::prices::ModelPrice;
use crate::money::Usd;
use crate::providers::Usage;

/// How a call ended; the `calls.outcome` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Ok,
    Error,
    Denied,
    RateLimited,
    BudgetExceeded,
    Halted,
    Cancelled,
    ApprovalRejected,
    ApprovalTimeout,
}

impl Outcome {
    pub const ALL: [Outcome; 9] = [
        Outcome::Ok,
        Outcome::Error,
        Outcome::Denied,
        Outcome::RateLimited,
        Outcome::BudgetExceeded,
        Outcome::Halted,
        Outcome::Cancelled,
        Outcome::ApprovalRejected,
        Outcome::ApprovalTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Denied => "denied",
            Outcome::RateLimited => "rate_limited",
            Outcome::BudgetExceeded => "budget_exceeded",
            Outcome::Halted => "halted",
            Outcome::Cancelled => "cancelled",
            Outcome::ApprovalRejected => "approval_rejected",
            Outcome::ApprovalTimeout => "approval_timeout",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageSource {
    Provider,
    Estimated,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Provider => "provider",
            UsageSource::Estimated => "estimated",
        }
    }
}

/// What the writer still has to count because the provider did not say:
/// tokenizing happens on the writer's thread, off the request path.
#[derive(Debug, Clone)]
pub struct PendingEstimate {
    pub request_body: Bytes,
    pub input_known: bool,
    pub output_text: Vec<u8>,
    pub output_overflow: u64,
    pub output_known: bool,
    pub price: Option<Arc<ModelPrice>>,
}

/// One row of `calls`.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub call_id: String,
    pub ts_start_us: i64,
    pub ts_end_us: i64,
    pub agent: Option<Arc<str>>,
    pub upstream: Option<Arc<str>>,
    pub provider: Option<&'static str>,
    pub model: Option<String>,
    pub endpoint: String,
    pub stream: bool,
    pub status_code: u16,
    pub outcome: Outcome,
    pub usage: Usage,
    pub usage_source: UsageSource,
    pub cost: Option<Usd>,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub run_id: Option<String>,
    pub step_id: Option<String>,
    pub error: Option<String>,
    pub pending_estimate: Option<Box<PendingEstimate>>,
}

/// One entry of the audit log, before the writer chains it.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub actor: String,
    pub kind: String,
    pub subject: Option<String>,
    pub payload: serde_json::Value,
}

pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
