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
/// tokenizing happens on the writer's thread, off the request path, and the
/// call's rate-limit and budget charges are settled there once it is priced.
#[derive(Debug)]
pub struct PendingEstimate {
    pub request_body: Bytes,
    pub input_known: bool,
    pub output_text: Vec<u8>,
    pub output_overflow: u64,
    pub output_known: bool,
    pub price: Option<Arc<ModelPrice>>,
    pub admission: Option<crate::limits::Admission>,
}

/// One row of `calls`.
#[derive(Debug)]
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
    /// The payload as canonical JSON (what the chain hashes and the row stores).
    pub payload_canonical: String,
}

pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// One row of `decisions`: a policy's (or failed plugin's) decision.
#[derive(Debug, Clone)]
pub struct DecisionRow {
    pub decision_id: String,
    pub call_id: Option<String>,
    pub ts_us: i64,
    pub policy: String,
    pub policy_hash: String,
    pub rule_id: String,
    pub action: &'static str,
    pub reason: String,
    pub eval_us: u64,
}

/// One row of `alerts`.
#[derive(Debug, Clone)]
pub struct AlertRow {
    pub alert_id: String,
    pub ts_us: i64,
    pub rule: String,
    pub severity: &'static str,
    pub subject: String,
    pub message: String,
}

/// An operator's runtime change to a budget or a rate limit, kept so that
/// it survives restarts (`budget_changes`, `limit_changes`).
#[derive(Debug, Clone)]
pub enum SettingChange {
    Budget {
        operator: String,
        scope: String,
        period: &'static str,
        limit_usd: Usd,
        on_exceed: &'static str,
    },
    Limit {
        operator: String,
        scope: String,
        requests_per_minute: Option<u32>,
        tokens_per_minute: Option<u64>,
    },
}

/// A pending approval as first recorded (`approvals`).
#[derive(Debug, Clone)]
pub struct ApprovalRow {
    pub approval_id: String,
    pub call_id: String,
    pub run_id: Option<String>,
    pub step_id: Option<String>,
    pub requested_at_us: i64,
    pub agent: String,
    pub model: String,
    pub endpoint: String,
    pub estimated_input_tokens: u64,
    pub estimated_cost: Option<Usd>,
    pub requested_by: String,
    pub rule: String,
    pub request_reason: String,
    pub fingerprint: String,
    pub mode: &'static str,
}

/// Approvals and halts as they change (`approvals`, `halts`).
#[derive(Debug, Clone)]
pub enum SupervisionChange {
    ApprovalRequested(Box<ApprovalRow>),
    ApprovalDecided {
        approval_id: String,
        decision: &'static str,
        operator: String,
        reason: String,
        at_us: i64,
    },
    ApprovalUsed {
        approval_id: String,
        call_id: String,
        at_us: i64,
    },
    HaltStarted {
        halt_id: String,
        scope: String,
        drain: bool,
        reason: String,
        by: String,
        at_us: i64,
    },
    /// Lifts every open halt of the scope (a drain made immediate leaves two).
    HaltResumed {
        scope: String,
        by: String,
        at_us: i64,
    },
}

/// A workflow definition seen for the first time (`workflow_versions`).
#[derive(Debug, Clone)]
pub struct WorkflowVersionRow {
    pub workflow: String,
    pub version_hash: String,
    pub definition: String,
    pub source: String,
    pub loaded_at_us: i64,
    pub loaded_by: String,
}

/// A workflow run as it stands (`runs`): written whole on every change.
#[derive(Debug, Clone)]
pub struct RunRow {
    pub run_id: String,
    pub workflow: String,
    pub version_hash: String,
    pub status: &'static str,
    pub triggered_by: String,
    pub inputs: String,
    pub started_at_us: i64,
    pub ended_at_us: Option<i64>,
    pub error: Option<String>,
    pub cost: Usd,
}

/// A step of a run as it stands (`steps`): written whole on every change.
#[derive(Debug, Clone)]
pub struct StepRow {
    pub run_id: String,
    pub step_id: String,
    pub state: crate::workflow::run::StepState,
}
