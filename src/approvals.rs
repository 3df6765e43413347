//! The approval queue: calls a policy or a budget marked `require_approval`
//! wait here for an operator.
//!
//! In `hold` mode the agent's own request waits (a oneshot receiver in its
//! task: no thread, a few hundred bytes); in `ticket` mode, and whenever a
//! held agent hangs up or Warden stops, the approval stays pending and the
//! agent's identical retry (same agent, same body: the fingerprint) is
//! admitted once it is approved, exactly once.
//!
//! Decisions are committed to the store before the waiting call learns of
//! them, and every change is audited and published as an event.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::events::{EventBus, EventParts};
use crate::money::Usd;
use crate::store::Recorder;
use crate::store::record::{ApprovalRow, SupervisionChange, now_micros};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Hold,
    Ticket,
}

impl Mode {
    pub fn parse(text: &str) -> Option<Mode> {
        match text {
            "hold" => Some(Mode::Hold),
            "ticket" => Some(Mode::Ticket),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Hold => "hold",
            Mode::Ticket => "ticket",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Approved,
    Rejected,
    Expired,
    Halted,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Rejected => "rejected",
            Status::Expired => "expired",
            Status::Halted => "halted",
        }
    }

    pub fn parse(text: &str) -> Option<Status> {
        [
            Status::Pending,
            Status::Approved,
            Status::Rejected,
            Status::Expired,
            Status::Halted,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// What a call that needs approval tells the queue.
pub struct ApprovalRequest<'a> {
    pub call_id: &'a str,
    pub agent: &'a str,
    pub model: &'a str,
    pub endpoint: &'static str,
    pub body: &'a [u8],
    pub estimated_input_tokens: u64,
    pub estimated_cost: Option<Usd>,
    /// `policy:NAME` or `budget:SCOPE`.
    pub requested_by: String,
    pub rule: String,
    pub reason: String,
    pub run_id: Option<&'a str>,
    pub step_id: Option<&'a str>,
}

/// One approval as operators see it.
#[derive(Debug, Clone, Serialize)]
pub struct Approval {
    pub approval_id: String,
    pub call_id: String,
    pub agent: String,
    pub model: String,
    pub endpoint: String,
    pub estimated_input_tokens: u64,
    pub estimated_cost_usd: Option<String>,
    pub requested_by: String,
    pub rule: String,
    pub reason: String,
    pub run_id: Option<String>,
    pub step_id: Option<String>,
    pub requested_at_us: i64,
    pub mode: Mode,
    pub status: Status,
    pub decided_at_us: Option<i64>,
    pub decided_by: Option<String>,
    pub decision_reason: Option<String>,
    pub used_by_call: Option<String>,
    #[serde(skip)]
    pub fingerprint: [u8; 32],
}

/// What a held call hears.
#[derive(Debug)]
pub enum Heard {
    Approved {
        by: String,
    },
    Rejected {
        by: String,
        reason: String,
    },
    /// Warden is stopping: the approval stays pending.
    Released,
    /// No operator decided within `timeout_secs`: the approval is expired.
    Expired,
}

/// The queue's answer to a call that needs approval.
pub enum Gate {
    /// An approved ticket admits this call (its identical earlier call was
    /// approved).
    Admitted { approval_id: String },
    /// Wait for the operator (hold mode).
    Wait {
        approval_id: String,
        heard: oneshot::Receiver<Heard>,
    },
    /// Refuse now.
    Refused(GateRefusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    Pending,
    Rejected,
    Expired,
    Halted,
}

#[derive(Debug)]
pub struct GateRefusal {
    pub kind: RefusalKind,
    pub approval_id: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error(
        "no approval `{0}`; `warden approvals list --all` shows them (ids are printed in full)"
    )]
    NotFound(String),
    #[error("approval `{id}` was already {status} by {by}{}", reason_suffix(.reason))]
    AlreadyDecided {
        id: String,
        status: &'static str,
        by: String,
        reason: String,
    },
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(" ({reason})")
    }
}

struct Entry {
    approval: Approval,
    waiter: Option<oneshot::Sender<Heard>>,
    /// When the waiting call began to wait (a retry waits afresh).
    waiting_since_us: i64,
    /// The approval was handed to the call waiting on it: that call is its
    /// one use, and an identical call arriving before the held one has
    /// marked it used must not take it as a ticket too.
    promised: bool,
}

impl Entry {
    fn has_live_waiter(&self) -> bool {
        self.waiter.as_ref().is_some_and(|w| !w.is_closed())
    }
}

#[derive(Default)]
struct QueueState {
    /// Boxed: the table has room for up to twice its entries, and an
    /// entry is ~400 bytes; 10,000 held calls' table was 7 MB inline.
    /// Keyed by the id's 128 bits rather than a copy of its text.
    by_id: HashMap<Key, Box<Entry>>,
    /// The newest approval for each (agent, body).
    by_fingerprint: HashMap<[u8; 32], Key>,
    gates_since_sweep: u32,
}

pub struct ApprovalQueue {
    state: Mutex<QueueState>,
    pub mode: Mode,
    pub timeout: Duration,
    ticket_ttl_us: i64,
    recorder: Recorder,
    events: EventBus,
    alerts: crate::alerts::AlertSink,
    /// Warden is stopping: nothing new is held.
    closing: AtomicBool,
    /// Told of every decision (workflow approval steps advance on it).
    on_decided: std::sync::OnceLock<DecisionObserver>,
}

/// Hears every closed approval (approved, rejected, expired, halted).
pub type DecisionObserver = Box<dyn Fn(&Approval) + Send + Sync>;

/// A human gate of a workflow run: an approval with no call behind it.
pub struct GateRequest<'a> {
    pub workflow: &'a str,
    pub run_id: &'a str,
    pub step_id: &'a str,
    pub message: String,
}

type Key = u128;

/// An approval id's key in the queue: its uuid's bits (every id Warden
/// makes is a uuid); any other text by a digest of it.
fn key(approval_id: &str) -> Key {
    match uuid::Uuid::parse_str(approval_id) {
        Ok(id) => id.as_u128(),
        Err(_) => {
            let digest: [u8; 32] = Sha256::digest(approval_id.as_bytes()).into();
            Key::from_be_bytes(digest[..16].try_into().expect("16 of 32 bytes"))
        }
    }
}

/// The fingerprint of a call for ticket retries: its agent and exact body.
pub fn fingerprint(agent: &str, body: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(agent.as_bytes());
    hasher.update([0]);
    hasher.update(body);
    hasher.finalize().into()
}

impl ApprovalQueue {
    pub fn new(
        mode: Mode,
        timeout: Duration,
        ticket_ttl: Duration,
        restored: Vec<Approval>,
        recorder: Recorder,
        events: EventBus,
        alerts: crate::alerts::AlertSink,
    ) -> ApprovalQueue {
        let mut state = QueueState::default();
        for approval in restored {
            state
                .by_fingerprint
                .insert(approval.fingerprint, key(&approval.approval_id));
            state.by_id.insert(
                key(&approval.approval_id),
                Box::new(Entry {
                    approval,
                    waiter: None,
                    waiting_since_us: 0,
                    promised: false,
                }),
            );
        }
        ApprovalQueue {
            state: Mutex::new(state),
            mode,
            timeout,
            ticket_ttl_us: ticket_ttl.as_micros() as i64,
            recorder,
            events,
            alerts,
            closing: AtomicBool::new(false),
            on_decided: std::sync::OnceLock::new(),
        }
    }

    /// Sets who hears decisions; only the first observer set counts.
    pub fn observe_decisions(&self, observer: DecisionObserver) {
        let _ = self.on_decided.set(observer);
    }

    /// Opens an approval for a workflow's approval step. Nothing waits on it
    /// in memory: the decision reaches the run through the observer, so it
    /// survives restarts like any pending ticket.
    pub fn open_gate(&self, request: GateRequest<'_>) -> Approval {
        let requested_by = format!("workflow:{}", request.workflow);
        let mut hasher = Sha256::new();
        for part in [
            "gate",
            request.run_id,
            request.step_id,
            &uuid::Uuid::now_v7().to_string(),
        ] {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
        let approval = Approval {
            approval_id: uuid::Uuid::now_v7().to_string(),
            call_id: String::new(),
            agent: requested_by.clone(),
            model: String::new(),
            endpoint: String::new(),
            estimated_input_tokens: 0,
            estimated_cost_usd: None,
            requested_by,
            rule: format!("step:{}", request.step_id),
            reason: request.message,
            run_id: Some(request.run_id.to_owned()),
            step_id: Some(request.step_id.to_owned()),
            requested_at_us: now_micros(),
            mode: Mode::Ticket,
            status: Status::Pending,
            decided_at_us: None,
            decided_by: None,
            decision_reason: None,
            used_by_call: None,
            fingerprint: hasher.finalize().into(),
        };
        self.lock().by_id.insert(
            key(&approval.approval_id),
            Box::new(Entry {
                approval: approval.clone(),
                waiter: None,
                waiting_since_us: 0,
                promised: false,
            }),
        );
        self.announce(&approval, None);
        approval
    }

    fn holds(&self) -> bool {
        self.mode == Mode::Hold && !self.closing.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits, holds or refuses a call that needs approval.
    pub fn gate(&self, request: ApprovalRequest<'_>) -> Gate {
        let print = fingerprint(request.agent, request.body);
        let now_us = now_micros();
        let mut state = self.lock();
        state.gates_since_sweep += 1;
        if state.gates_since_sweep >= 1_024 {
            state.gates_since_sweep = 0;
            self.sweep(&mut state, now_us);
        }
        let known = state.by_fingerprint.get(&print).copied();
        if let Some(known) = known
            && let Some(entry) = state.by_id.get_mut(&known)
        {
            let id = entry.approval.approval_id.clone();
            self.expire_stale(entry, now_us);
            let live_waiter = entry.has_live_waiter();
            let approval = &mut entry.approval;
            match approval.status {
                Status::Approved
                    if approval.used_by_call.is_none() && !live_waiter && !entry.promised =>
                {
                    approval.used_by_call = Some(request.call_id.to_owned());
                    entry.waiter = None;
                    drop(state);
                    self.record_use(&id, request.call_id, now_us);
                    return Gate::Admitted { approval_id: id };
                }
                Status::Pending if !live_waiter => {
                    if self.holds() {
                        // The agent hung up and retried: wait again.
                        let (tx, rx) = oneshot::channel();
                        entry.waiter = Some(tx);
                        entry.waiting_since_us = now_us;
                        return Gate::Wait {
                            approval_id: id,
                            heard: rx,
                        };
                    }
                    return Gate::Refused(pending_refusal(&entry.approval, self.mode));
                }
                Status::Rejected | Status::Expired | Status::Halted
                    if approval.used_by_call.is_none() =>
                {
                    // The ticket's answer stands for its retries.
                    return Gate::Refused(decided_refusal(approval));
                }
                // Used already, or the same body is held by another live
                // call: this call needs an approval of its own.
                _ => {}
            }
        }
        let approval = Approval {
            approval_id: uuid::Uuid::now_v7().to_string(),
            call_id: request.call_id.to_owned(),
            agent: request.agent.to_owned(),
            model: request.model.to_owned(),
            endpoint: request.endpoint.to_owned(),
            estimated_input_tokens: request.estimated_input_tokens,
            estimated_cost_usd: request.estimated_cost.map(|c| c.to_string()),
            requested_by: request.requested_by,
            rule: request.rule,
            reason: request.reason,
            run_id: request.run_id.map(str::to_owned),
            step_id: request.step_id.map(str::to_owned),
            requested_at_us: now_us,
            mode: self.mode,
            status: Status::Pending,
            decided_at_us: None,
            decided_by: None,
            decision_reason: None,
            used_by_call: None,
            fingerprint: print,
        };
        let id = approval.approval_id.clone();
        let (gate, waiter) = if self.holds() {
            let (tx, rx) = oneshot::channel();
            let gate = Gate::Wait {
                approval_id: id.clone(),
                heard: rx,
            };
            (gate, Some(tx))
        } else {
            (Gate::Refused(pending_refusal(&approval, self.mode)), None)
        };
        state.by_fingerprint.insert(print, key(&id));
        state.by_id.insert(
            key(&id),
            Box::new(Entry {
                approval: approval.clone(),
                waiter,
                waiting_since_us: now_us,
                promised: false,
            }),
        );
        drop(state);
        self.announce(&approval, request.estimated_cost);
        gate
    }

    /// Row, audit entry, event and webhook for a new approval.
    fn announce(&self, approval: &Approval, cost: Option<Usd>) {
        self.recorder
            .supervision(SupervisionChange::ApprovalRequested(Box::new(
                ApprovalRow {
                    approval_id: approval.approval_id.clone(),
                    call_id: approval.call_id.clone(),
                    run_id: approval.run_id.clone(),
                    step_id: approval.step_id.clone(),
                    requested_at_us: approval.requested_at_us,
                    agent: approval.agent.clone(),
                    model: approval.model.clone(),
                    endpoint: approval.endpoint.clone(),
                    estimated_input_tokens: approval.estimated_input_tokens,
                    estimated_cost: cost,
                    requested_by: approval.requested_by.clone(),
                    rule: approval.rule.clone(),
                    request_reason: approval.reason.clone(),
                    fingerprint: hex::encode(approval.fingerprint),
                    mode: approval.mode.as_str(),
                },
            )));
        let summary = match (&approval.run_id, &approval.step_id) {
            // A workflow's approval step: no call waits behind it.
            (Some(run), Some(step)) if approval.call_id.is_empty() => format!(
                "{} asks approval for step `{step}` of run {run}: {}",
                approval.requested_by, approval.reason
            ),
            _ => format!(
                "{} asks approval for a {} call of agent {} (~${}, rule {}): {}",
                approval.requested_by,
                approval.model,
                approval.agent,
                approval.estimated_cost_usd.as_deref().unwrap_or("?"),
                approval.rule,
                approval.reason
            ),
        };
        self.recorder.audit(
            &approval.requested_by,
            "approval_requested",
            Some(&approval.approval_id),
            json!({
                "call_id": approval.call_id,
                "agent": approval.agent,
                "model": approval.model,
                "endpoint": approval.endpoint,
                "estimated_input_tokens": approval.estimated_input_tokens,
                "estimated_cost_usd": approval.estimated_cost_usd,
                "rule": approval.rule,
                "reason": approval.reason,
                "run_id": approval.run_id,
                "step_id": approval.step_id,
                "mode": approval.mode.as_str(),
            }),
        );
        self.events.publish(|| EventParts {
            kind: "approval_requested",
            actor: approval.requested_by.clone(),
            subject: Some(approval.approval_id.clone()),
            message: summary.clone(),
            data: serde_json::to_value(approval).unwrap_or_default(),
        });
        self.alerts.post(crate::alerts::Alert {
            rule: "approval_requested".into(),
            severity: crate::alerts::Severity::Warning,
            subject: approval.approval_id.clone(),
            message: format!(
                "{summary}. Approve with `warden approvals approve {}`.",
                approval.approval_id
            ),
        });
    }

    fn record_use(&self, id: &str, call_id: &str, at_us: i64) {
        self.recorder.supervision(SupervisionChange::ApprovalUsed {
            approval_id: id.to_owned(),
            call_id: call_id.to_owned(),
            at_us,
        });
        self.recorder.audit(
            "warden",
            "approval_used",
            Some(id),
            json!({"call_id": call_id}),
        );
    }

    /// A held call approved while it waited goes ahead: the approval is
    /// used by it.
    pub fn mark_used(&self, id: &str, call_id: &str) {
        let mut state = self.lock();
        if let Some(entry) = state.by_id.get_mut(&key(id)) {
            entry.approval.used_by_call = Some(call_id.to_owned());
            entry.waiter = None;
        }
        drop(state);
        self.record_use(id, call_id, now_micros());
    }

    /// How often held calls are checked for having waited too long: a
    /// call is answered at most this late.
    pub fn expiry_tick(&self) -> Duration {
        (self.timeout / 4).clamp(Duration::from_millis(20), Duration::from_millis(500))
    }

    /// Expires the approval of every call that has waited `timeout_secs`
    /// and tells it so. One timer for all held calls rather than one in each
    /// (a timer entry is ~120 bytes of every held call's frame).
    pub fn expire_overdue(&self) {
        let now_us = now_micros();
        let timeout_us = i64::try_from(self.timeout.as_micros()).unwrap_or(i64::MAX);
        let reason = format!(
            "no operator decided within {} s ([approvals] timeout_secs)",
            self.timeout.as_secs()
        );
        let mut expired = Vec::new();
        {
            let mut state = self.lock();
            for entry in state.by_id.values_mut() {
                if entry.approval.status != Status::Pending
                    || !entry.has_live_waiter()
                    || entry.waiting_since_us.saturating_add(timeout_us) > now_us
                {
                    continue;
                }
                expired.push(close(
                    &mut entry.approval,
                    Status::Expired,
                    "warden",
                    &reason,
                ));
                if let Some(waiter) = entry.waiter.take() {
                    let _ = waiter.send(Heard::Expired);
                }
            }
        }
        for changed in expired {
            self.record_decision(&changed);
        }
    }

    /// A held call was cut by a halt: its approval is closed with it.
    pub fn close_halted(&self, id: &str, halt: &crate::halts::Halt) {
        self.withdraw(id, &halt.by, &halt.message());
    }

    /// Closes a pending approval nobody needs any more (its call was cut, its
    /// run cancelled), as `halted`, by whoever withdrew it.
    pub fn withdraw(&self, id: &str, by: &str, reason: &str) {
        let mut state = self.lock();
        let Some(entry) = state.by_id.get_mut(&key(id)) else {
            return;
        };
        entry.waiter = None;
        if entry.approval.status != Status::Pending {
            return;
        }
        let changed = close(&mut entry.approval, Status::Halted, by, reason);
        drop(state);
        self.record_decision(&changed);
    }

    /// An operator's decision. Committed before the waiting call hears it.
    pub async fn decide(
        &self,
        id: &str,
        approve: bool,
        operator: &str,
        reason: &str,
    ) -> Result<Approval, DecideError> {
        let now_us = now_micros();
        let changed = {
            let mut state = self.lock();
            let Some(entry) = state.by_id.get_mut(&key(id)) else {
                return Err(DecideError::NotFound(id.to_owned()));
            };
            self.expire_stale(entry, now_us);
            let approval = &mut entry.approval;
            if approval.status != Status::Pending {
                return Err(DecideError::AlreadyDecided {
                    id: id.to_owned(),
                    status: approval.status.as_str(),
                    by: approval.decided_by.clone().unwrap_or_default(),
                    reason: approval.decision_reason.clone().unwrap_or_default(),
                });
            }
            let status = if approve {
                Status::Approved
            } else {
                Status::Rejected
            };
            close(approval, status, operator, reason)
        };
        self.record_decision(&changed);
        self.recorder.flush().await;
        // The waiter stays in the entry until now: while the decision is
        // committed, an identical call sees the approval still has its
        // caller and asks for one of its own instead of taking it as a
        // ticket.
        let heard = if approve {
            Heard::Approved {
                by: operator.to_owned(),
            }
        } else {
            Heard::Rejected {
                by: operator.to_owned(),
                reason: reason.to_owned(),
            }
        };
        let mut state = self.lock();
        if let Some(entry) = state.by_id.get_mut(&key(id))
            && let Some(waiter) = entry.waiter.take()
        {
            match waiter.send(heard) {
                Ok(()) => entry.promised = approve,
                // The agent hung up meanwhile: the approval is a ticket for
                // its retry.
                Err(heard) => tracing::debug!(
                    approval_id = id,
                    ?heard,
                    "held call is gone; approval kept as a ticket"
                ),
            }
        }
        Ok(changed)
    }

    fn record_decision(&self, approval: &Approval) {
        if let Some(observer) = self.on_decided.get() {
            observer(approval);
        }
        let status = approval.status.as_str();
        let by = approval.decided_by.clone().unwrap_or_default();
        let reason = approval.decision_reason.clone().unwrap_or_default();
        self.recorder
            .supervision(SupervisionChange::ApprovalDecided {
                approval_id: approval.approval_id.clone(),
                decision: status,
                operator: by.clone(),
                reason: reason.clone(),
                at_us: approval.decided_at_us.unwrap_or_else(now_micros),
            });
        self.recorder.audit(
            &by,
            "approval_decided",
            Some(&approval.approval_id),
            json!({"decision": status, "reason": reason, "call_id": approval.call_id, "agent": approval.agent}),
        );
        self.events.publish(|| EventParts {
            kind: "approval_decided",
            actor: by.clone(),
            subject: Some(approval.approval_id.clone()),
            message: format!(
                "approval {} for agent {} {status} by {by}{}",
                approval.approval_id,
                approval.agent,
                reason_suffix(&reason)
            ),
            data: serde_json::to_value(approval).unwrap_or_default(),
        });
    }

    /// Pending approvals, oldest first; with `all`, decided ones too.
    pub fn list(&self, all: bool) -> Vec<Approval> {
        let now_us = now_micros();
        let mut state = self.lock();
        self.sweep(&mut state, now_us);
        let mut approvals: Vec<Approval> = state
            .by_id
            .values()
            .filter(|e| all || e.approval.status == Status::Pending)
            .map(|e| e.approval.clone())
            .collect();
        approvals.sort_by(|a, b| a.approval_id.cmp(&b.approval_id));
        approvals
    }

    /// Warden is stopping: every held call is answered that its approval
    /// stays pending.
    pub fn release_all(&self) {
        self.closing.store(true, Ordering::Release);
        let mut state = self.lock();
        for entry in state.by_id.values_mut() {
            if let Some(waiter) = entry.waiter.take() {
                let _ = waiter.send(Heard::Released);
            }
        }
    }

    /// A ticket past its time is expired; decided approvals past it are
    /// forgotten (the store keeps them).
    fn sweep(&self, state: &mut QueueState, now_us: i64) {
        let mut expired = Vec::new();
        for entry in state.by_id.values_mut() {
            if let Some(changed) = self.expire_stale_inner(entry, now_us) {
                expired.push(changed);
            }
        }
        let horizon = now_us - self.ticket_ttl_us;
        let stale: Vec<Key> = state
            .by_id
            .iter()
            .filter(|(_, e)| {
                e.approval.status != Status::Pending
                    && e.approval.decided_at_us.unwrap_or(i64::MAX) < horizon
            })
            .map(|(key, _)| *key)
            .collect();
        for id in stale {
            if let Some(entry) = state.by_id.remove(&id)
                && state.by_fingerprint.get(&entry.approval.fingerprint) == Some(&id)
            {
                state.by_fingerprint.remove(&entry.approval.fingerprint);
            }
        }
        for changed in expired {
            self.record_decision(&changed);
        }
    }

    fn expire_stale(&self, entry: &mut Entry, now_us: i64) {
        if let Some(changed) = self.expire_stale_inner(entry, now_us) {
            self.record_decision(&changed);
        }
    }

    /// A pending ticket nobody waits on, or an approved one never used,
    /// older than the ticket lifetime.
    fn expire_stale_inner(&self, entry: &mut Entry, now_us: i64) -> Option<Approval> {
        let live_waiter = entry.has_live_waiter();
        let approval = &mut entry.approval;
        let since = match approval.status {
            Status::Pending if !live_waiter => approval.requested_at_us,
            Status::Approved if approval.used_by_call.is_none() => {
                approval.decided_at_us.unwrap_or(approval.requested_at_us)
            }
            _ => return None,
        };
        if now_us - since < self.ticket_ttl_us {
            return None;
        }
        Some(close(
            approval,
            Status::Expired,
            "warden",
            &format!(
                "not used within {} s ([approvals] ticket_ttl_secs)",
                self.ticket_ttl_us / 1_000_000
            ),
        ))
    }
}

fn close(approval: &mut Approval, status: Status, by: &str, reason: &str) -> Approval {
    approval.status = status;
    approval.decided_at_us = Some(now_micros());
    approval.decided_by = Some(by.to_owned());
    approval.decision_reason = Some(reason.to_owned());
    approval.clone()
}

fn pending_refusal(approval: &Approval, mode: Mode) -> GateRefusal {
    let why = match mode {
        Mode::Ticket => "",
        Mode::Hold => " (the earlier request stopped waiting)",
    };
    GateRefusal {
        kind: RefusalKind::Pending,
        approval_id: approval.approval_id.clone(),
        message: format!(
            "this call needs an operator's approval ({} rule `{}`: {}); approval {} is pending{why}. Retry the same request once it is approved (`warden approvals approve {}`).",
            approval.requested_by,
            approval.rule,
            approval.reason,
            approval.approval_id,
            approval.approval_id
        ),
    }
}

fn decided_refusal(approval: &Approval) -> GateRefusal {
    let by = approval.decided_by.as_deref().unwrap_or("warden");
    let reason = approval.decision_reason.as_deref().unwrap_or("");
    let (kind, what) = match approval.status {
        Status::Rejected => (RefusalKind::Rejected, "rejected"),
        Status::Halted => (RefusalKind::Halted, "closed by a halt"),
        _ => (RefusalKind::Expired, "expired"),
    };
    GateRefusal {
        kind,
        approval_id: approval.approval_id.clone(),
        message: format!(
            "approval {} for this call was {what} by {by}: {reason}",
            approval.approval_id
        ),
    }
}

/// Approvals a restarted Warden must still know: pending ones, approved
/// tickets not yet used, and decisions young enough to answer a retry.
pub fn restore(conn: &duckdb::Connection, ticket_ttl: Duration) -> duckdb::Result<Vec<Approval>> {
    let horizon = now_micros() - ticket_ttl.as_micros() as i64;
    let mut stmt = conn.prepare(
        "SELECT approval_id, coalesce(call_id, ''), agent, coalesce(model, ''), coalesce(endpoint, ''), \
                coalesce(estimated_input_tokens, 0), CAST(estimated_cost_usd AS VARCHAR), requested_by, \
                coalesce(rule, ''), coalesce(request_reason, ''), run_id, step_id, epoch_us(requested_at), mode, \
                decision, epoch_us(decided_at), operator, reason, used_by_call, fingerprint \
         FROM approvals \
         WHERE decision IS NULL OR (decision = 'approved' AND used_at IS NULL) OR decided_at >= make_timestamp(?) \
         ORDER BY requested_at",
    )?;
    let rows = stmt.query_map([horizon], |row| {
        let mode: String = row.get(13)?;
        let decision: Option<String> = row.get(14)?;
        let print: String = row.get(19)?;
        let mut fingerprint = [0u8; 32];
        let _ = hex::decode_to_slice(&print, &mut fingerprint);
        let cost: Option<String> = row.get(6)?;
        Ok(Approval {
            approval_id: row.get(0)?,
            call_id: row.get(1)?,
            agent: row.get(2)?,
            model: row.get(3)?,
            endpoint: row.get(4)?,
            estimated_input_tokens: row.get::<_, i64>(5)?.max(0) as u64,
            estimated_cost_usd: cost
                .and_then(|c| Usd::parse(&c).ok())
                .map(|c| c.to_string()),
            requested_by: row.get(7)?,
            rule: row.get(8)?,
            reason: row.get(9)?,
            run_id: row.get(10)?,
            step_id: row.get(11)?,
            requested_at_us: row.get(12)?,
            mode: Mode::parse(&mode).unwrap_or_default(),
            status: decision.as_deref().map_or(Status::Pending, |d| {
                Status::parse(d).unwrap_or(Status::Expired)
            }),
            decided_at_us: row.get(15)?,
            decided_by: row.get(16)?,
            decision_reason: row.get(17)?,
            used_by_call: row.get(18)?,
            fingerprint,
        })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn request<'a>(call_id: &'a str, body: &'a [u8]) -> ApprovalRequest<'a> {
        ApprovalRequest {
            call_id,
            agent: "researcher",
            model: "gpt-4o",
            endpoint: "/v1/chat/completions",
            body,
            estimated_input_tokens: 10,
            estimated_cost: None,
            requested_by: "policy:cost_gate".into(),
            rule: "max_call_usd".into(),
            reason: "costly".into(),
            run_id: None,
            step_id: None,
        }
    }

    #[test]
    fn an_approval_handed_to_its_held_call_is_no_ticket_for_an_identical_call() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("w.duckdb")).unwrap();
        let (recorder, writer, _reader) = store
            .start(Duration::from_millis(50), 1_024, Arc::default())
            .unwrap();
        let events = EventBus::default();
        let (alerts, _) = crate::alerts::AlertSink::new(recorder.clone(), None, events.clone());
        let queue = ApprovalQueue::new(
            Mode::Hold,
            Duration::from_secs(60),
            Duration::from_secs(3_600),
            Vec::new(),
            recorder.clone(),
            events,
            alerts,
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let body = br#"{"model":"gpt-4o","messages":[]}"#;
        let Gate::Wait { approval_id, heard } = queue.gate(request("call-a", body)) else {
            panic!("the first call is held");
        };
        runtime
            .block_on(queue.decide(&approval_id, true, "alice", "fine"))
            .unwrap();
        // The held call has been told but has not run yet: the approval is
        // its, not a ticket for the identical call that arrives now.
        match queue.gate(request("call-b", body)) {
            Gate::Wait {
                approval_id: second,
                ..
            } => assert_ne!(second, approval_id),
            Gate::Admitted { .. } => panic!("one approval admitted two calls"),
            Gate::Refused(refusal) => panic!("refused: {}", refusal.message),
        }
        assert!(matches!(
            runtime.block_on(heard),
            Ok(Heard::Approved { .. })
        ));

        // A held call that hung up before the decision leaves a ticket.
        let other = br#"{"model":"gpt-4o","messages":[{"role":"user"}]}"#;
        let Gate::Wait { approval_id, heard } = queue.gate(request("call-c", other)) else {
            panic!("held");
        };
        drop(heard);
        runtime
            .block_on(queue.decide(&approval_id, true, "alice", "fine"))
            .unwrap();
        assert!(matches!(
            queue.gate(request("call-d", other)),
            Gate::Admitted { approval_id: admitted } if admitted == approval_id
        ));
        drop(queue);
        runtime.block_on(recorder.shutdown());
        drop(recorder);
        writer.join();
    }
}
