//! The supervision stages of the request path: the halt check, halts that
//! policies and budgets take, and the approval hold.

use std::sync::Arc;

use tokio::sync::oneshot;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};

use super::ProxyState;
use super::call::{Call, Refusal};
use crate::approvals::{ApprovalRequest, Gate, GateRefusal, Heard, RefusalKind};
use crate::halts::{AlreadyHalted, Halt, HaltScope};
use crate::limits::{BudgetRefusal, BudgetScope};
use crate::providers::{Endpoint, ErrorKind, RequestFacts};
use crate::store::record::Outcome;

pub const APPROVAL_ID_HEADER: &str = "x-warden-approval-id";

/// Why a call must wait for an operator.
#[derive(Debug)]
pub struct ApprovalAsk {
    /// `policy:NAME` or `budget:SCOPE`.
    pub requested_by: String,
    pub rule: String,
    pub reason: String,
}

impl ApprovalAsk {
    pub fn for_budget(refusal: &BudgetRefusal) -> ApprovalAsk {
        ApprovalAsk {
            requested_by: format!("budget:{}", refusal.scope_text()),
            rule: "budget_exceeded".into(),
            reason: refusal.message(),
        }
    }
}

/// New calls in a halted scope are refused.
pub fn check_halts(state: &ProxyState, agent: &str, run: Option<&str>) -> Result<(), Refusal> {
    match state.supervisor.halts.refusing(agent, run) {
        Some(halt) => Err(Refusal::halted(&halt)),
        None => Ok(()),
    }
}

/// Takes a halt for a policy or a budget; a scope already halted keeps its
/// first halt, which refuses the call all the same.
pub fn halt_for(state: &ProxyState, scope: HaltScope, reason: &str, by: &str) -> Arc<Halt> {
    match state.supervisor.halt(scope, false, reason, by) {
        Ok(halt) | Err(AlreadyHalted(halt)) => halt,
    }
}

/// An exhausted `on_exceed = "halt"` budget halts its agent or run (for a
/// global, model or workflow budget: the call's run, else its agent).
pub fn budget_halt(
    state: &ProxyState,
    agent: &str,
    run: Option<&str>,
    refusal: &BudgetRefusal,
) -> Refusal {
    let scope = match (&refusal.scope, &refusal.run) {
        (_, Some(budget_run)) => HaltScope::Run(budget_run.clone()),
        (BudgetScope::Agent(name), None) => HaltScope::Agent(name.clone()),
        _ => match run {
            Some(run) => HaltScope::Run(run.to_owned()),
            None => HaltScope::Agent(agent.to_owned()),
        },
    };
    let halt = halt_for(
        state,
        scope,
        &refusal.message(),
        &format!("budget:{}", refusal.scope_text()),
    );
    Refusal::halted(&halt)
}

/// A call waiting for an operator's decision.
pub struct Held {
    approval_id: String,
    heard: oneshot::Receiver<Heard>,
}

/// Asks the approval queue about a call that needs an approval: `None`
/// when it needs none or an approved ticket admits it now, the hold to
/// wait on otherwise.
pub fn ask_approval(
    state: &ProxyState,
    call: &mut Call,
    ask: Option<ApprovalAsk>,
    endpoint: Endpoint,
    facts: &RequestFacts,
    body: &Bytes,
) -> Result<Option<Held>, Refusal> {
    let Some(ask) = ask else {
        return Ok(None);
    };
    let queue = &state.supervisor.approvals;
    let agent = call.agent.clone().unwrap_or_else(|| "".into());
    let bound = call.upper_bound(endpoint, body, facts.max_tokens);
    let gate = queue.gate(ApprovalRequest {
        call_id: &call.id,
        agent: &agent,
        model: &facts.model,
        endpoint: endpoint.as_str(),
        body,
        estimated_input_tokens: bound.input_tokens,
        estimated_cost: bound.cost,
        requested_by: ask.requested_by,
        rule: ask.rule,
        reason: ask.reason,
        run_id: call.run_id.as_deref(),
        step_id: call.step_id.as_deref(),
    });
    match gate {
        Gate::Admitted { approval_id } => {
            tracing::info!(call_id = %call.id, %approval_id, "approved ticket admits the call");
            Ok(None)
        }
        Gate::Refused(refusal) => Err(gate_refusal(refusal)),
        Gate::Wait { approval_id, heard } => {
            tracing::info!(call_id = %call.id, %approval_id, "call held for approval");
            call.watch_halts();
            Ok(Some(Held { approval_id, heard }))
        }
    }
}

/// Waits for the operator's decision on a held call (ready at once with
/// none). This frame is what a held call keeps for minutes: a plain fn
/// returning an `async` block, as an `async fn` stores its arguments twice
/// (rust-lang/rust#62958), and the hold's fields used in place.
#[allow(clippy::manual_async_fn)]
pub fn await_decision<'a>(
    state: &'a ProxyState,
    call: &'a mut Call,
    mut held: Option<Held>,
) -> impl Future<Output = Result<(), Refusal>> + Send + 'a {
    async move {
        let queue = &state.supervisor.approvals;
        let Some(held) = held.as_mut() else {
            return Ok(());
        };
        let approval_id = &held.approval_id;
        let waited = tokio::select! {
            heard = &mut held.heard => Waited::Heard(heard.unwrap_or(Heard::Released)),
            halt = call.halted() => Waited::Halted(halt),
        };
        let refusal = |kind, message: String| {
            gate_refusal(GateRefusal {
                kind,
                approval_id: approval_id.clone(),
                message,
            })
        };
        match waited {
            Waited::Heard(Heard::Approved { by }) => {
                queue.mark_used(approval_id, &call.id);
                tracing::info!(call_id = %call.id, %approval_id, by, "approved; the call goes ahead");
                Ok(())
            }
            Waited::Heard(Heard::Rejected { by, reason }) => Err(refusal(
                RefusalKind::Rejected,
                format!("an operator ({by}) rejected this call (approval {approval_id}): {reason}"),
            )),
            Waited::Heard(Heard::Released) => Err(refusal(
                RefusalKind::Pending,
                format!(
                    "Warden is restarting; approval {approval_id} stays pending. Retry the same request once it is approved (`warden approvals approve {approval_id}`)."
                ),
            )),
            Waited::Heard(Heard::Expired) => Err(refusal(
                RefusalKind::Expired,
                format!(
                    "no operator decided on approval {approval_id} within {} s ([approvals] timeout_secs); the call was not sent",
                    queue.timeout.as_secs()
                ),
            )),
            Waited::Halted(halt) => {
                queue.close_halted(approval_id, &halt);
                Err(Refusal::halted(&halt))
            }
        }
    }
}

enum Waited {
    Heard(Heard),
    Halted(Arc<Halt>),
}

fn gate_refusal(refusal: GateRefusal) -> Refusal {
    let (code, outcome) = match refusal.kind {
        RefusalKind::Pending => ("approval_pending", Outcome::Denied),
        RefusalKind::Rejected => ("approval_rejected", Outcome::ApprovalRejected),
        RefusalKind::Expired => ("approval_timeout", Outcome::ApprovalTimeout),
        RefusalKind::Halted => ("halted", Outcome::Halted),
    };
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&refusal.approval_id) {
        headers.insert(APPROVAL_ID_HEADER, value);
    }
    Refusal::new(ErrorKind::Forbidden, code, refusal.message)
        .with_outcome(outcome)
        .with_headers(headers)
}
