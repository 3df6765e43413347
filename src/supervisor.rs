//! The supervisor: halts and the approval queue together, with the store,
//! the audit log and the event stream that every change of theirs reaches.
//! Operators (through the admin API), policies and budgets all act through
//! it, so each halt is recorded the same way whoever took it.

use std::sync::Arc;

use serde_json::json;

use crate::approvals::ApprovalQueue;
use crate::events::{EventBus, EventParts};
use crate::halts::{AlreadyHalted, Halt, HaltScope, Halts, NotHalted};
use crate::store::Recorder;
use crate::store::record::{SupervisionChange, now_micros};

pub struct Supervisor {
    pub halts: Arc<Halts>,
    pub approvals: ApprovalQueue,
    pub events: EventBus,
    recorder: Recorder,
}

impl Supervisor {
    pub fn new(
        halts: Arc<Halts>,
        approvals: ApprovalQueue,
        events: EventBus,
        recorder: Recorder,
    ) -> Supervisor {
        Supervisor {
            halts,
            approvals,
            events,
            recorder,
        }
    }

    /// Halts a scope and records who did it and why. The row is queued to
    /// the store; callers that answer an operator flush it first.
    pub fn halt(
        &self,
        scope: HaltScope,
        drain: bool,
        reason: &str,
        by: &str,
    ) -> Result<Arc<Halt>, AlreadyHalted> {
        let halt = self.halts.halt(Halt {
            halt_id: uuid::Uuid::now_v7().to_string(),
            scope,
            drain,
            reason: reason.to_owned(),
            by: by.to_owned(),
            since_us: now_micros(),
        })?;
        let scope_text = halt.scope.to_string();
        tracing::warn!(scope = %scope_text, by, drain, reason, "halt");
        self.recorder.supervision(SupervisionChange::HaltStarted {
            halt_id: halt.halt_id.clone(),
            scope: scope_text.clone(),
            drain,
            reason: reason.to_owned(),
            by: by.to_owned(),
            at_us: halt.since_us,
        });
        self.recorder.audit(
            by,
            "halt",
            Some(&scope_text),
            json!({"halt_id": halt.halt_id, "drain": drain, "reason": reason}),
        );
        self.events.publish(|| EventParts {
            kind: "halt",
            actor: by.to_owned(),
            subject: Some(scope_text.clone()),
            message: format!(
                "{scope_text} halted ({}) by {by}: {reason}",
                if drain { "drain" } else { "immediate" }
            ),
            data: serde_json::to_value(&*halt).unwrap_or_default(),
        });
        Ok(halt)
    }

    pub fn resume(&self, scope: &HaltScope, by: &str) -> Result<Arc<Halt>, NotHalted> {
        let lifted = self.halts.resume(scope)?;
        let scope_text = scope.to_string();
        tracing::info!(scope = %scope_text, by, "resume");
        self.recorder.supervision(SupervisionChange::HaltResumed {
            scope: scope_text.clone(),
            by: by.to_owned(),
            at_us: now_micros(),
        });
        self.recorder.audit(
            by,
            "resume",
            Some(&scope_text),
            json!({"halt_id": lifted.halt_id, "halted_by": lifted.by, "halt_reason": lifted.reason}),
        );
        self.events.publish(|| EventParts {
            kind: "resume",
            actor: by.to_owned(),
            subject: Some(scope_text.clone()),
            message: format!("{scope_text} resumed by {by}"),
            data: json!({"halt_id": lifted.halt_id}),
        });
        Ok(lifted)
    }

    pub async fn flush(&self) {
        self.recorder.flush().await;
    }
}

/// The halts in force when Warden last stopped.
pub fn restore_halts(conn: &duckdb::Connection) -> duckdb::Result<Vec<Halt>> {
    let mut stmt = conn.prepare(
        "SELECT halt_id, scope, drain, reason, halted_by, epoch_us(halted_at) FROM halts WHERE resumed_at IS NULL ORDER BY halted_at",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, bool>(2)?,
            row.get::<_, String>(3)?,
            row.get::<_, String>(4)?,
            row.get::<_, i64>(5)?,
        ))
    })?;
    let mut halts: Vec<Halt> = Vec::new();
    for row in rows {
        let (halt_id, scope, drain, reason, by, since_us) = row?;
        let scope = match HaltScope::parse(&scope) {
            Ok(scope) => scope,
            Err(e) => {
                tracing::error!(%halt_id, error = %e, "a stored halt has a scope Warden cannot read; it is not restored");
                continue;
            }
        };
        // A later halt of the same scope (a drain made immediate) replaces it.
        halts.retain(|h| h.scope != scope);
        halts.push(Halt {
            halt_id,
            scope,
            drain,
            reason,
            by,
            since_us,
        });
    }
    Ok(halts)
}
