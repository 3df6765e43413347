//! The governance stages of the request path: the operator's wasm policies
//! decide whether the call may go, then the plugins may rewrite its body.
//! Every decision worth keeping lands in `decisions` and the audit log.

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use serde_json::json;

use super::call::{Call, Refusal};
use super::supervise::{self, ApprovalAsk};
use super::upstream::Upstream;
use super::{Agent, ProxyState};
use crate::halts::HaltScope;
use crate::limits::CallSubject;
use crate::policy::input::{BodyShape, BudgetInput, CallInput, RunInput, TimeInput};
use crate::policy::{Action, Decision, PolicyInput, Verdict};
use crate::providers::{Endpoint, ErrorKind, RequestFacts};
use crate::store::record::{DecisionRow, Outcome, now_micros};

/// What the policy stage needs to know about the call.
pub struct CallContext<'a> {
    pub agent: &'a Arc<Agent>,
    pub upstream: &'a Upstream,
    pub endpoint: Endpoint,
    pub facts: &'a RequestFacts,
    pub body: &'a [u8],
    pub headers: &'a HeaderMap,
}

/// Runs the policies: refuses the call on deny, halts on halt_agent and
/// halt_run, and says so when the verdict is require_approval.
pub async fn apply_policies(
    state: &ProxyState,
    call: &mut Call,
    context: CallContext<'_>,
) -> Result<Option<ApprovalAsk>, Refusal> {
    let CallContext {
        agent,
        upstream,
        endpoint,
        facts,
        body,
        headers,
    } = context;
    // One reading of the clock for the whole stage: the activity window,
    // the budgets' periods and the input's time.
    let now_us = now_micros();
    agent.activity.call_started(now_us);
    call.counted_agent = Some(agent.clone());
    let shape = BodyShape::of(body, &facts.parts);
    let bound = call.upper_bound(endpoint, body, facts.max_tokens);
    let subject = CallSubject {
        agent: &agent.name,
        model: &facts.model,
        run_id: call.run_id.as_deref(),
        workflow: None,
    };
    let budgets = state
        .limits
        .budgets()
        .status_for(&subject, now_us)
        .into_iter()
        .map(|s| BudgetInput {
            scope: s.run.map_or(s.scope, |run| format!("run:{run}")),
            period: s.period.as_str(),
            limit_usd: s.limit_usd,
            spent_usd: s.spent_usd,
            reserved_usd: s.reserved_usd,
            on_exceed: s.on_exceed.as_str(),
        })
        .collect();
    let warden_headers: Vec<(&str, &str)> = headers
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("x-warden-"))
        .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)))
        .collect();
    let input = PolicyInput {
        call: CallInput {
            call_id: &call.id,
            agent: &agent.name,
            role: &agent.role,
            capabilities: &agent.capabilities,
            provider: upstream.kind.as_str(),
            upstream: &upstream.name,
            model: &facts.model,
            endpoint: endpoint.as_str(),
            stream: facts.stream,
            max_tokens: facts.max_tokens,
            estimated_input_tokens: bound.input_tokens,
            estimated_output_tokens: bound.output_tokens,
            estimated_cost_usd: bound.cost,
            message_count: shape.message_count(),
            tool_names: shape.tool_names(),
            headers: warden_headers,
        },
        activity: agent.activity.counts(now_us),
        budgets,
        run: call.run_id.as_deref().map(|run_id| RunInput {
            run_id,
            step_id: call.step_id.as_deref(),
        }),
        time: TimeInput::at(now_us),
    };
    // Sized for a typical input (~700 bytes), written once.
    let mut shared = Vec::with_capacity(1024);
    input.write_json(&mut shared);
    let messages = state
        .modules
        .wants_messages()
        .then(|| shape.message_members());
    let verdict = if state.modules.needs_blocking() {
        // A module overran its deadline before: keep its evaluations off the
        // worker that serves other calls.
        let modules = state.modules.clone();
        tokio::task::spawn_blocking(move || modules.evaluate(&shared, messages.as_deref()))
            .await
            .unwrap_or_else(|e| Verdict::failed(e.to_string()))
    } else {
        state.modules.evaluate(&shared, messages.as_deref())
    };
    record_decisions(state, &call.id, verdict.to_record());
    let decision = match verdict.outcome() {
        (Action::Allow, _) | (_, None) => return Ok(None),
        (_, Some(decision)) => decision,
    };
    let by = format!("policy:{}", decision.policy);
    let reason = format!("rule `{}`: {}", decision.rule, decision.reason);
    match decision.action {
        Action::RequireApproval => Ok(Some(ApprovalAsk {
            requested_by: by,
            rule: decision.rule.clone(),
            reason: decision.reason.clone(),
        })),
        Action::HaltAgent => {
            let halt = supervise::halt_for(
                state,
                HaltScope::Agent(agent.name.to_string()),
                &reason,
                &by,
            );
            Err(Refusal::halted(&halt))
        }
        Action::HaltRun => match call.run_id.clone() {
            Some(run) => {
                let halt = supervise::halt_for(state, HaltScope::Run(run), &reason, &by);
                Err(Refusal::halted(&halt))
            }
            None => Err(Refusal::new(
                ErrorKind::Forbidden,
                "halted",
                format!(
                    "policy `{}` halts this call's run ({reason}), but the call names no run (x-warden-run); the call is refused and nothing else is halted",
                    decision.policy
                ),
            )
            .with_outcome(Outcome::Halted)),
        },
        Action::Allow | Action::Deny => {
            state.supervisor.events.publish(|| crate::events::EventParts {
                kind: "policy_deny",
                actor: by.clone(),
                subject: Some(call.id.clone()),
                message: format!(
                    "{by} denied a {} call of agent {} ({reason})",
                    facts.model, agent.name
                ),
                data: json!({"call_id": call.id, "agent": &*agent.name, "model": facts.model, "rule": decision.rule, "reason": decision.reason, "error": decision.error}),
            });
            Err(policy_refusal(decision))
        }
    }
}

/// Runs the plugins over the body; returns the body to send.
pub async fn apply_plugins(
    state: &ProxyState,
    call: &Call,
    body: Bytes,
    facts: &RequestFacts,
) -> Result<(Bytes, Option<RequestFacts>), Refusal> {
    let transformed = if state.modules.needs_blocking() {
        let (modules, input) = (state.modules.clone(), body.clone());
        match tokio::task::spawn_blocking(move || modules.transform(&input)).await {
            Ok(transformed) => transformed,
            Err(e) => {
                return Err(Refusal::new(
                    ErrorKind::Forbidden,
                    "plugin_error",
                    format!("the plugins could not run ({e}); the request was not sent"),
                )
                .with_outcome(Outcome::Denied));
            }
        }
    } else {
        state.modules.transform(&body)
    };
    let transformed = match transformed {
        Ok(transformed) => transformed,
        Err(refusal) => {
            record_decisions(state, &call.id, std::iter::once(&*refusal.decision));
            return Err(Refusal::new(
                ErrorKind::Forbidden,
                "plugin_error",
                refusal.decision.reason,
            )
            .with_outcome(Outcome::Denied));
        }
    };
    record_decisions(state, &call.id, transformed.failures.iter());
    let Some(new_body) = transformed.body else {
        return Ok((body, None));
    };
    let new_facts = RequestFacts::parse(&new_body)
        .ok()
        .filter(|f| f.model == facts.model);
    match new_facts {
        Some(new_facts) => Ok((new_body, Some(new_facts))),
        None => Err(Refusal::new(
            ErrorKind::Forbidden,
            "plugin_error",
            "a plugin rewrote the request into one without the same `model`; plugins may change what is sent, not where",
        )
        .with_outcome(Outcome::Denied)),
    }
}

fn record_decisions<'a>(
    state: &ProxyState,
    call_id: &str,
    decisions: impl Iterator<Item = &'a Decision>,
) {
    let ts_us = now_micros();
    for decision in decisions {
        state.recorder.decision(DecisionRow {
            decision_id: uuid::Uuid::now_v7().to_string(),
            call_id: Some(call_id.to_owned()),
            ts_us,
            policy: decision.policy.to_string(),
            policy_hash: decision.policy_hash.to_string(),
            rule_id: decision.rule.clone(),
            action: decision.action.as_str(),
            reason: decision.reason.clone(),
            eval_us: decision.eval_us,
        });
        state.recorder.audit(
            &format!("policy:{}", decision.policy),
            "policy_decision",
            Some(call_id),
            json!({
                "action": decision.action.as_str(),
                "rule": decision.rule,
                "reason": decision.reason,
                "policy_hash": decision.policy_hash,
                "eval_us": decision.eval_us,
                "error": decision.error,
                "annotations": decision.annotations,
            }),
        );
    }
}

fn policy_refusal(decision: &Decision) -> Refusal {
    let code = if decision.error.is_some() {
        "policy_error"
    } else {
        "policy_denied"
    };
    Refusal::new(
        ErrorKind::Forbidden,
        code,
        format!(
            "policy `{}` denied the call (rule `{}`): {}",
            decision.policy, decision.rule, decision.reason
        ),
    )
    .with_outcome(Outcome::Denied)
}
