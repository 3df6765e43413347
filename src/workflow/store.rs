//! Runs read back from the store: the runs in flight at start (the store is
//! the source of truth after a restart), and runs and versions for operators.

use std::sync::Arc;

use duckdb::Connection;
use serde::Serialize;
use serde_json::{Map, Value};

use super::definition::StepKind;
use super::engine::WARDEN_AGENT;
use super::registry::WorkflowSet;
use super::run::{RunState, RunStatus, StepState, StepStatus};
use crate::money::Usd;

fn usd(text: Option<String>) -> Usd {
    text.and_then(|t| Usd::parse(&t).ok()).unwrap_or(Usd::ZERO)
}

/// The runs that were in flight when Warden stopped, with their steps as
/// recorded and each step's spend recounted from its calls. A model step
/// whose call died with the process is sent again.
pub fn restore_runs(conn: &Connection, workflows: &WorkflowSet) -> duckdb::Result<Vec<RunState>> {
    let mut runs = read_runs(conn, workflows, "status = 'running'", None)?;
    for run in &mut runs {
        for (index, step) in run.steps.iter_mut().enumerate() {
            // A model step's call died with the process, or an approval
            // step stopped before its approval was opened: do it again.
            let redo = match run.definition.steps[index].kind {
                StepKind::Model { .. } => step.agent.as_deref() == Some(WARDEN_AGENT),
                StepKind::Approval { .. } => step.approval_id.is_none(),
                StepKind::Agent { .. } => false,
            };
            if step.status == StepStatus::Running && redo {
                step.status = StepStatus::Ready;
                step.attempts = step.attempts.saturating_sub(1);
            }
        }
    }
    Ok(runs)
}

/// One run as the store has it (an ended one, for `runs show`).
pub fn load_run(
    conn: &Connection,
    workflows: &WorkflowSet,
    run_id: &str,
) -> duckdb::Result<Option<RunState>> {
    Ok(read_runs(conn, workflows, "run_id = ?", Some(run_id))?.pop())
}

fn read_runs(
    conn: &Connection,
    workflows: &WorkflowSet,
    filter: &str,
    param: Option<&str>,
) -> duckdb::Result<Vec<RunState>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT run_id, workflow, version_hash, coalesce(triggered_by, ''), coalesce(CAST(inputs AS VARCHAR), '{{}}'), epoch_us(started_at), status, epoch_us(ended_at), error FROM runs WHERE {filter}"
    ))?;
    type Head = (
        String,
        String,
        String,
        String,
        String,
        i64,
        String,
        Option<i64>,
        Option<String>,
    );
    let map = |row: &duckdb::Row<'_>| -> duckdb::Result<Head> {
        Ok((
            row.get(0)?,
            row.get(1)?,
            row.get(2)?,
            row.get(3)?,
            row.get(4)?,
            row.get(5)?,
            row.get(6)?,
            row.get(7)?,
            row.get(8)?,
        ))
    };
    let heads: Vec<Head> = match param {
        Some(param) => stmt.query_map([param], map)?.collect::<Result<_, _>>()?,
        None => stmt.query_map([], map)?.collect::<Result<_, _>>()?,
    };
    let mut runs = Vec::with_capacity(heads.len());
    for (run_id, workflow, hash, triggered_by, inputs, started_at_us, status, ended_at_us, error) in
        heads
    {
        let Some(definition) = workflows.version(&workflow, &hash) else {
            tracing::error!(
                run_id,
                workflow,
                version = hash,
                "cannot resume a run: its workflow version is not in workflow_versions"
            );
            continue;
        };
        let mut steps: Vec<StepState> = definition
            .steps
            .iter()
            .map(|_| StepState::pending())
            .collect();
        let mut stmt = conn.prepare(
            "SELECT step_id, status, agent, attempts, epoch_us(started_at), epoch_us(ended_at), output, CAST(output_json AS VARCHAR), error, call_id, calls, CAST(cost_usd AS VARCHAR), input_tokens, output_tokens, epoch_us(retry_at), epoch_us(deadline), approval_id FROM steps WHERE run_id = ?",
        )?;
        let mut rows = stmt.query([&run_id])?;
        while let Some(row) = rows.next()? {
            let step_id: String = row.get(0)?;
            let Some(&index) = definition.positions.get(&step_id) else {
                continue;
            };
            let status: String = row.get(1)?;
            let step = &mut steps[index];
            step.status = StepStatus::parse(&status).unwrap_or(StepStatus::Pending);
            step.agent = row.get(2)?;
            step.attempts = row.get::<_, i64>(3)? as u32;
            step.started_at_us = row.get(4)?;
            step.ended_at_us = row.get(5)?;
            step.output = row.get(6)?;
            step.output_value = row
                .get::<_, Option<String>>(7)?
                .and_then(|t| serde_json::from_str(&t).ok());
            step.error = row.get(8)?;
            step.call_id = row.get(9)?;
            step.calls = row.get::<_, i64>(10)? as u32;
            step.cost = usd(row.get(11)?);
            step.input_tokens = row.get::<_, i64>(12)? as u64;
            step.output_tokens = row.get::<_, i64>(13)? as u64;
            step.retry_at_us = row.get(14)?;
            step.deadline_us = row.get(15)?;
            step.approval_id = row.get(16)?;
        }
        // The calls table is the truth for spend: a step's row is written on
        // its changes, its calls on every call.
        let mut stmt = conn.prepare(
            "SELECT step_id, count(*), CAST(coalesce(sum(cost_usd), 0) AS VARCHAR), sum(input_tokens), sum(output_tokens) FROM calls WHERE run_id = ? AND step_id IS NOT NULL GROUP BY step_id",
        )?;
        let mut rows = stmt.query([&run_id])?;
        while let Some(row) = rows.next()? {
            let step_id: String = row.get(0)?;
            if let Some(&index) = definition.positions.get(&step_id) {
                let step = &mut steps[index];
                step.calls = row.get::<_, i64>(1)? as u32;
                step.cost = usd(row.get(2)?);
                step.input_tokens = row.get::<_, Option<i128>>(3)?.unwrap_or(0) as u64;
                step.output_tokens = row.get::<_, Option<i128>>(4)?.unwrap_or(0) as u64;
            }
        }
        let inputs: Map<String, Value> = serde_json::from_str(&inputs).unwrap_or_default();
        runs.push(RunState {
            run_id,
            definition: Arc::clone(&definition),
            inputs,
            triggered_by,
            started_at_us,
            ended_at_us,
            status: RunStatus::parse(&status).unwrap_or(RunStatus::Running),
            error,
            steps,
        });
    }
    Ok(runs)
}

/// A run as the store has it, for runs no longer in memory.
#[derive(Debug, Clone, Serialize)]
pub struct StoredRun {
    pub run_id: String,
    pub workflow: String,
    pub version_hash: String,
    pub status: String,
    pub triggered_by: String,
    pub started_at_us: i64,
    pub ended_at_us: Option<i64>,
    pub error: Option<String>,
    pub cost_usd: String,
}

/// Runs, newest first, optionally of one status.
pub fn list_runs(
    conn: &Connection,
    status: Option<&str>,
    limit: usize,
) -> duckdb::Result<Vec<StoredRun>> {
    let mut stmt = conn.prepare(
        "SELECT run_id, workflow, coalesce(version_hash, ''), status, coalesce(triggered_by, ''), epoch_us(started_at), epoch_us(ended_at), error, CAST(coalesce(cost_usd, 0) AS VARCHAR) FROM runs WHERE ? IS NULL OR status = ? ORDER BY started_at DESC LIMIT ?",
    )?;
    let rows = stmt.query_map(duckdb::params![status, status, limit as i64], |row| {
        Ok(StoredRun {
            run_id: row.get(0)?,
            workflow: row.get(1)?,
            version_hash: row.get(2)?,
            status: row.get(3)?,
            triggered_by: row.get(4)?,
            started_at_us: row.get::<_, Option<i64>>(5)?.unwrap_or(0),
            ended_at_us: row.get(6)?,
            error: row.get(7)?,
            cost_usd: Usd::parse(&row.get::<_, String>(8)?)
                .map(|u| u.to_string())
                .unwrap_or_default(),
        })
    })?;
    rows.collect()
}

/// A version of a workflow with how its runs went.
#[derive(Debug, Clone, Serialize)]
pub struct VersionHistory {
    pub version_hash: String,
    pub loaded_at_us: i64,
    pub loaded_by: String,
    pub source: String,
    pub runs: i64,
    pub succeeded: i64,
    pub failed: i64,
    /// Of the runs that ended succeeded or failed; `None` before any did.
    pub success_rate: Option<f64>,
    pub avg_cost_usd: Option<String>,
}

pub fn history(conn: &Connection, workflow: &str) -> duckdb::Result<Vec<VersionHistory>> {
    let mut stmt = conn.prepare(
        "SELECT v.version_hash, epoch_us(min(v.loaded_at)), any_value(v.loaded_by), any_value(coalesce(v.source, '')),
                count(DISTINCT r.run_id),
                count(DISTINCT r.run_id) FILTER (WHERE r.status = 'succeeded'),
                count(DISTINCT r.run_id) FILTER (WHERE r.status = 'failed'),
                CAST(sum(r.cost_usd) FILTER (WHERE r.status IN ('succeeded', 'failed')) AS VARCHAR)
         FROM workflow_versions v LEFT JOIN runs r ON r.workflow = v.workflow AND r.version_hash = v.version_hash
         WHERE v.workflow = ? GROUP BY v.version_hash ORDER BY min(v.loaded_at)",
    )?;
    let rows = stmt.query_map([workflow], |row| {
        let (succeeded, failed): (i64, i64) = (row.get(5)?, row.get(6)?);
        let completed = (succeeded + failed) as u64;
        let spent = row
            .get::<_, Option<String>>(7)?
            .and_then(|t| Usd::parse(&t).ok());
        Ok(VersionHistory {
            version_hash: row.get(0)?,
            loaded_at_us: row.get(1)?,
            loaded_by: row.get(2)?,
            source: row.get(3)?,
            runs: row.get(4)?,
            succeeded,
            failed,
            success_rate: (completed > 0).then(|| succeeded as f64 / completed as f64),
            avg_cost_usd: spent
                .filter(|_| completed > 0)
                .map(|s| s.divided_by(completed).to_string()),
        })
    })?;
    rows.collect()
}

/// What a run of this version is expected to cost: the average of its
/// completed runs, with how many there were (none: `None`).
pub fn estimated_cost(conn: &Connection, version_hash: &str) -> duckdb::Result<(Option<Usd>, i64)> {
    let (spent, count): (Option<String>, i64) = conn.query_row(
        "SELECT CAST(sum(cost_usd) AS VARCHAR), count(*) FROM runs WHERE version_hash = ? AND status IN ('succeeded', 'failed')",
        [version_hash],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    let average = spent
        .and_then(|s| Usd::parse(&s).ok())
        .filter(|_| count > 0)
        .map(|s| s.divided_by(count as u64));
    Ok((average, count))
}
/// The latest rollback of each workflow: (workflow, version, when).
pub fn latest_pins(conn: &Connection) -> duckdb::Result<Vec<(String, String, i64)>> {
    let mut stmt = conn.prepare(
        "SELECT workflow, arg_max(version_hash, ts), epoch_us(max(ts)) FROM workflow_pins GROUP BY workflow",
    )?;
    let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
    rows.collect()
}

/// When a version was first loaded.
pub fn first_loaded(conn: &Connection, version_hash: &str) -> duckdb::Result<Option<i64>> {
    conn.query_row(
        "SELECT epoch_us(min(loaded_at)) FROM workflow_versions WHERE version_hash = ?",
        [version_hash],
        |row| row.get(0),
    )
}
