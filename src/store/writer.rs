//! The one store writer: a dedicated thread that owns the DuckDB connection
//! and receives rows through a bounded channel, appending them in batches
//! (DuckDB Appender) at least every flush interval and on shutdown.
//!
//! The request path never waits on it: `Recorder::record` is a `try_send`;
//! when the queue is full the row is handed to a task that waits for room,
//! and the wait is counted (`warden_store_backpressure_total`), so nothing is
//! dropped silently. Rows are lost only if the writer itself has died, and
//! then they are counted as dropped.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use duckdb::Connection;
use duckdb::arrow::array::{
    ArrayRef, BooleanArray, Decimal128Array, Float64Array, Int16Array, Int64Array, StringArray,
    TimestampMicrosecondArray,
};
use duckdb::arrow::error::ArrowError;
use duckdb::arrow::record_batch::RecordBatch;
use duckdb::types::{TimeUnit, Value};

use super::audit::{ChainFields, canonical_json, chain_hash, chain_head};
use super::record::{
    AlertRow, ApprovalRow, AuditEntry, CallRecord, DecisionRow, RunRow, SettingChange, StepRow,
    SupervisionChange, UsageSource, WorkflowVersionRow, now_micros,
};
use crate::metering::estimate;
use crate::metrics::Metrics;
use crate::money::Usd;

/// Call records appended per batch before the writer commits without
/// waiting for the flush interval: one row group, so that a busy Warden's
/// commits take DuckDB's direct path (see `ROW_GROUP_ROWS`).
const MAX_BATCH: usize = super::ROW_GROUP_ROWS;

/// How long the writer must have received nothing before it checkpoints.
const QUIET_CHECKPOINT: Duration = Duration::from_secs(1);

// Large rows are boxed: the channel's queue keeps the room of its deepest
// backlog (tens of thousands of commands in a burst of held calls) for good.
pub enum StoreCommand {
    Call(Box<CallRecord>),
    Audit(Box<AuditEntry>),
    Alert(Box<AlertRow>),
    AlertDelivered(Box<str>),
    Setting(Box<SettingChange>),
    Decision(Box<DecisionRow>),
    Supervision(Box<SupervisionChange>),
    WorkflowVersion(Box<WorkflowVersionRow>),
    WorkflowPin(Box<WorkflowPin>),
    Run(Box<RunRow>),
    Step(Box<StepRow>),
    /// Commit everything received so far, then answer.
    Flush(tokio::sync::oneshot::Sender<()>),
    /// Commit everything received so far and stop.
    Shutdown,
}

/// An operator made an older version of a workflow current.
pub struct WorkflowPin {
    workflow: String,
    version_hash: String,
    operator: String,
}

/// The request path's handle to the writer.
#[derive(Clone)]
pub struct Recorder {
    tx: flume::Sender<StoreCommand>,
    metrics: Arc<Metrics>,
    /// The writer thread, woken early for flushes and a filling queue.
    writer: std::thread::Thread,
    high_water: usize,
}

impl Recorder {
    pub fn record(&self, record: CallRecord) {
        self.metrics.observe_call(&record);
        self.send(StoreCommand::Call(Box::new(record)));
    }

    pub fn audit(
        &self,
        actor: &str,
        kind: &str,
        subject: Option<&str>,
        payload: serde_json::Value,
    ) {
        // Written out here, once: the payload's tree of maps and strings is
        // freed at once instead of waiting in the queue, scattered over the
        // heap, for the writer.
        self.send(StoreCommand::Audit(Box::new(AuditEntry {
            actor: actor.to_owned(),
            kind: kind.to_owned(),
            subject: subject.map(str::to_owned),
            payload_canonical: canonical_json(&payload),
        })));
    }

    pub fn decision(&self, row: DecisionRow) {
        self.send(StoreCommand::Decision(Box::new(row)));
    }

    /// Records an approval or halt change; `flush` to know it is durable.
    pub fn supervision(&self, change: SupervisionChange) {
        self.send(StoreCommand::Supervision(Box::new(change)));
    }

    pub fn workflow_version(&self, row: WorkflowVersionRow) {
        self.send(StoreCommand::WorkflowVersion(Box::new(row)));
    }

    /// An operator made an older version of a workflow current.
    pub fn workflow_pin(&self, workflow: &str, version_hash: &str, operator: &str) {
        self.send(StoreCommand::WorkflowPin(Box::new(WorkflowPin {
            workflow: workflow.to_owned(),
            version_hash: version_hash.to_owned(),
            operator: operator.to_owned(),
        })));
    }

    /// A run's row as it stands now; `flush` to know it is durable.
    pub fn run_state(&self, row: RunRow) {
        self.send(StoreCommand::Run(Box::new(row)));
    }

    /// A step's row as it stands now.
    pub fn step_state(&self, row: StepRow) {
        self.send(StoreCommand::Step(Box::new(row)));
    }

    pub fn alert(&self, row: AlertRow) {
        self.send(StoreCommand::Alert(Box::new(row)));
    }

    pub fn alert_delivered(&self, alert_id: String) {
        self.send(StoreCommand::AlertDelivered(alert_id.into_boxed_str()));
    }

    /// Records an operator's change; `flush` afterwards to know it is durable.
    pub fn setting(&self, change: SettingChange) {
        self.send(StoreCommand::Setting(Box::new(change)));
    }

    /// Waits until everything recorded before this call is committed.
    pub async fn flush(&self) {
        let (ack, done) = tokio::sync::oneshot::channel();
        if self.tx.send_async(StoreCommand::Flush(ack)).await.is_ok() {
            self.writer.unpark();
            let _ = done.await;
        }
    }

    /// Asks the writer to commit what it holds and stop; join its handle
    /// afterwards. Records sent later are counted as dropped.
    pub async fn shutdown(&self) {
        let _ = self.tx.send_async(StoreCommand::Shutdown).await;
        self.writer.unpark();
    }

    pub fn queue_depth(&self) -> usize {
        self.tx.len()
    }

    fn send(&self, command: StoreCommand) {
        match self.tx.try_send(command) {
            Ok(()) => {
                if self.tx.len() >= self.high_water {
                    self.writer.unpark();
                }
            }
            Err(flume::TrySendError::Full(command)) => {
                self.metrics.store_backpressure.inc();
                self.writer.unpark();
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => {
                        let tx = self.tx.clone();
                        let metrics = self.metrics.clone();
                        runtime.spawn(async move {
                            if tx.send_async(command).await.is_err() {
                                metrics.records_dropped.inc();
                            }
                        });
                    }
                    // Outside the runtime (a Drop during shutdown) blocking is fine.
                    Err(_) => {
                        if self.tx.send(command).is_err() {
                            self.metrics.records_dropped.inc();
                        }
                    }
                }
            }
            Err(flume::TrySendError::Disconnected(_)) => {
                self.metrics.records_dropped.inc();
                tracing::error!("store writer is gone; a record was dropped");
            }
        }
    }
}

pub struct WriterHandle {
    thread: Option<JoinHandle<()>>,
}

impl WriterHandle {
    /// Waits for the writer to commit what it holds and stop. Every
    /// `Recorder` must be dropped first, which is what ends the writer.
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub(crate) fn start(
    conn: Connection,
    catalog: Arc<super::Catalog>,
    flush_interval: Duration,
    capacity: usize,
    metrics: Arc<Metrics>,
) -> std::io::Result<(Recorder, WriterHandle)> {
    let (tx, rx) = flume::bounded(capacity);
    let writer_metrics = metrics.clone();
    let thread = std::thread::Builder::new()
        .name("warden-store-writer".into())
        .spawn(move || {
            // Not niced: at nice 10 on a saturated box the writer got a few
            // percent of a core, fell 20-60k records behind and caught up in
            // bursts, the queue's records making Warden's peak RSS; at the
            // default priority it stays within a few thousand, with the
            // same throughput and p99 (benches/RESULTS.md, session 14).
            Writer::new(conn, catalog, writer_metrics).run(rx, flush_interval);
        })?;
    let recorder = Recorder {
        tx,
        metrics,
        writer: thread.thread().clone(),
        // Woken as soon as a row group's worth waits: steady commits of one
        // group each instead of bursts of four that let the queue (and the
        // heap holding its records) reach its capacity under load.
        high_water: MAX_BATCH.min(capacity / 4).max(1),
    };
    Ok((
        recorder,
        WriterHandle {
            thread: Some(thread),
        },
    ))
}

/// Call rows committed before the writer attaches the store file afresh,
/// letting go of their row groups' metadata: ~10 MB at most. Each time
/// costs the writer ~80 ms (a checkpoint and the attach) and took the store
/// bench's peak RSS at 2.4 million rows from 92 to 79-83 MB.
pub(crate) const REATTACH_ROWS: u64 = 1 << 20;

struct Writer {
    conn: Connection,
    catalog: Arc<super::Catalog>,
    /// Call rows committed since the store file was last attached.
    rows_since_attach: u64,
    metrics: Arc<Metrics>,
    calls: Vec<CallRecord>,
    audits: Vec<AuditEntry>,
    decisions: Vec<DecisionRow>,
    /// Alerts, deliveries and settings: rare, written one statement each.
    others: Vec<StoreCommand>,
    acks: Vec<tokio::sync::oneshot::Sender<()>>,
    chain: Option<(i64, String)>,
    stopping: bool,
    /// When `flush` last ran: a part-filled batch waits at most a flush
    /// interval from then.
    committed_at: Instant,
}

impl Writer {
    fn new(conn: Connection, catalog: Arc<super::Catalog>, metrics: Arc<Metrics>) -> Self {
        // Room for every row statement the writer runs (16 of them).
        conn.set_prepared_statement_cache_capacity(32);
        Writer {
            conn,
            catalog,
            rows_since_attach: 0,
            metrics,
            calls: Vec::new(),
            audits: Vec::new(),
            decisions: Vec::new(),
            others: Vec::new(),
            acks: Vec::new(),
            chain: None,
            stopping: false,
            committed_at: Instant::now(),
        }
    }

    /// The writer sleeps between commits rather than blocking on the
    /// channel: a blocked receiver would be woken (a futex call and a context
    /// switch) by every record. Producers wake it only for urgent commands
    /// and when the queue passes its high-water mark.
    fn run(mut self, rx: flume::Receiver<StoreCommand>, interval: Duration) {
        // Rows committed since the last checkpoint live in DuckDB's memory,
        // uncompressed (about 1-2 KB for each held call's approval and
        // audit rows) until the WAL reaches 16 MB. A quiet second is the
        // cheap moment to move them into the file: under load there is none,
        // so the calls table's row groups are still compressed once.
        let mut written_since_checkpoint = false;
        let mut quiet_since = Instant::now();
        let mut wait = interval;
        loop {
            std::thread::park_timeout(wait);
            let mut received = false;
            loop {
                match rx.try_recv() {
                    Ok(command) => {
                        received = true;
                        self.take(command);
                        if self.calls.len() >= MAX_BATCH {
                            self.flush();
                        }
                    }
                    Err(flume::TryRecvError::Empty) => break,
                    Err(flume::TryRecvError::Disconnected) => {
                        self.stopping = true;
                        break;
                    }
                }
            }
            // Under load a part-filled batch waits for the rest of its row
            // group, at most until a flush interval has passed since the
            // last commit: a commit of fewer rows than a row group goes
            // through the WAL, whose checkpoints then compress those rows a
            // second time and merge their small row groups, in bursts that
            // left the writer seconds behind (and its queue at 60,000
            // records) on a saturated box.
            let since_commit = self.committed_at.elapsed();
            let hold = !self.stopping
                && self.acks.is_empty()
                && !self.calls.is_empty()
                && since_commit < interval;
            if hold {
                wait = interval.saturating_sub(since_commit);
            } else {
                self.flush();
                wait = interval;
            }
            if self.stopping {
                let _ = self.conn.execute_batch("CHECKPOINT");
                return;
            }
            if received {
                written_since_checkpoint = true;
                quiet_since = Instant::now();
            } else if !hold && written_since_checkpoint && quiet_since.elapsed() >= QUIET_CHECKPOINT
            {
                written_since_checkpoint = false;
                // An operator's open transaction makes DuckDB refuse; the
                // next quiet second tries again only after new rows.
                match self.conn.execute_batch("CHECKPOINT") {
                    Ok(()) => trim_c_heap(),
                    Err(e) => tracing::debug!(error = %e, "idle checkpoint skipped"),
                }
            }
        }
    }

    fn take(&mut self, command: StoreCommand) {
        match command {
            StoreCommand::Call(record) => self.calls.push(*record),
            StoreCommand::Audit(entry) => self.audits.push(*entry),
            StoreCommand::Decision(row) => self.decisions.push(*row),
            StoreCommand::Flush(ack) => self.acks.push(ack),
            StoreCommand::Shutdown => self.stopping = true,
            other @ (StoreCommand::Alert(_)
            | StoreCommand::AlertDelivered(_)
            | StoreCommand::Setting(_)
            | StoreCommand::Supervision(_)
            | StoreCommand::WorkflowVersion(_)
            | StoreCommand::WorkflowPin(_)
            | StoreCommand::Run(_)
            | StoreCommand::Step(_)) => self.others.push(other),
        }
    }

    fn flush(&mut self) {
        self.committed_at = Instant::now();
        if !self.calls.is_empty() {
            let mut calls = std::mem::take(&mut self.calls);
            for record in &mut calls {
                complete_estimate(record);
            }
            match self.append_calls(&calls) {
                Ok(()) => {
                    self.rows_since_attach += calls.len() as u64;
                    self.metrics.records_written.add(calls.len() as u64);
                    for record in &calls {
                        self.metrics.observe_usage(record);
                    }
                }
                Err(e) => {
                    self.metrics.records_dropped.add(calls.len() as u64);
                    tracing::error!(error = %e, rows = calls.len(), "could not write call records");
                }
            }
            calls.clear();
            self.calls = calls;
        }
        if !self.decisions.is_empty() {
            let decisions = std::mem::take(&mut self.decisions);
            if let Err(e) = self.append_decisions(&decisions) {
                self.metrics.records_dropped.add(decisions.len() as u64);
                tracing::error!(error = %e, rows = decisions.len(), "could not write policy decisions");
            }
        }
        if !self.audits.is_empty() {
            let audits = std::mem::take(&mut self.audits);
            if let Err(e) = self.append_audits(&audits) {
                self.metrics.records_dropped.add(audits.len() as u64);
                tracing::error!(error = %e, rows = audits.len(), "could not write audit entries");
                // Re-read the head: the failed rows never landed.
                self.chain = None;
            }
        }
        let others = std::mem::take(&mut self.others);
        if !others.is_empty() {
            // One transaction per batch: a burst of held calls is thousands
            // of approval rows, each its own commit otherwise.
            let batched = others.len() > 1 && self.conn.execute_batch("BEGIN TRANSACTION").is_ok();
            // New alerts and approvals (two per held call) go through
            // appenders: a one-row INSERT costs DuckDB 0.6-0.9 ms even
            // prepared. Anything else is written in order, after them.
            let (mut alerts, mut approvals) = (Vec::new(), Vec::new());
            for command in &others {
                if let StoreCommand::Alert(row) = command {
                    alerts.push(row.as_ref());
                } else if let StoreCommand::Supervision(change) = command
                    && let SupervisionChange::ApprovalRequested(row) = change.as_ref()
                {
                    approvals.push(row.as_ref());
                } else {
                    self.append_new_rows(&mut alerts, &mut approvals);
                    if let Err(e) = self.write_other(command) {
                        self.metrics.records_dropped.inc();
                        tracing::error!(error = %e, "could not write an alert, setting, approval or halt row");
                    }
                }
            }
            self.append_new_rows(&mut alerts, &mut approvals);
            if batched && let Err(e) = self.conn.execute_batch("COMMIT") {
                self.metrics.records_dropped.add(others.len() as u64);
                tracing::error!(error = %e, rows = others.len(), "could not commit alert, setting, approval or halt rows");
                let _ = self.conn.execute_batch("ROLLBACK");
            }
        }
        for ack in self.acks.drain(..) {
            let _ = ack.send(());
        }
        if self.rows_since_attach >= self.catalog.reattach_rows {
            self.reattach();
        }
    }

    /// Attaches the store file afresh (see `Catalog`), between batches.
    fn reattach(&mut self) {
        let started = Instant::now();
        match self.catalog.reattach(&self.conn) {
            Ok(true) => {
                self.rows_since_attach = 0;
                trim_c_heap();
                tracing::debug!(
                    took_ms = started.elapsed().as_millis() as u64,
                    "store attached afresh"
                );
            }
            // A reader is busy: after the next batch, then.
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "could not attach the store file afresh; retrying after the next batch");
                // Back on the store if it is still attached; the next
                // attempt attaches it if it is not.
                let _ = self.conn.execute_batch(&format!("USE {}", super::CATALOG));
            }
        }
    }

    /// One Arrow record batch per flush: DuckDB takes whole columns
    /// (`duckdb_append_data_chunk`) instead of a type-checked FFI call and a
    /// string copy per value, a fifth of the writer's CPU per row.
    fn append_calls(&self, calls: &[CallRecord]) -> duckdb::Result<()> {
        let mut appender = self.conn.appender("calls")?;
        appender.append_record_batch(calls_batch(calls)?)?;
        appender.flush()
    }

    fn append_decisions(&self, decisions: &[DecisionRow]) -> duckdb::Result<()> {
        let mut appender = self.conn.appender("decisions")?;
        for row in decisions {
            appender.append_row(duckdb::params![
                row.decision_id,
                row.call_id,
                Value::Timestamp(TimeUnit::Microsecond, row.ts_us),
                row.policy,
                row.policy_hash,
                row.rule_id,
                row.action,
                row.reason,
                row.eval_us as i64,
            ])?;
        }
        appender.flush()
    }

    /// One row statement through DuckDB's prepared-statement cache: parsing
    /// and planning it anew took ~1.5 ms, so a burst of 10,000 held calls
    /// (an approval and an alert row each) held the writer for 30 s.
    fn execute(&self, sql: &str, params: impl duckdb::Params) -> duckdb::Result<usize> {
        self.conn.prepare_cached(sql)?.execute(params)
    }

    /// Appends the alerts and approvals gathered so far, and empties both.
    fn append_new_rows(&self, alerts: &mut Vec<&AlertRow>, approvals: &mut Vec<&ApprovalRow>) {
        if !alerts.is_empty() {
            if let Err(e) = self.append_alerts(alerts) {
                self.metrics.records_dropped.add(alerts.len() as u64);
                tracing::error!(error = %e, rows = alerts.len(), "could not write alerts");
            }
            alerts.clear();
        }
        if !approvals.is_empty() {
            if let Err(e) = self.append_approvals(approvals) {
                self.metrics.records_dropped.add(approvals.len() as u64);
                tracing::error!(error = %e, rows = approvals.len(), "could not write approvals");
            }
            approvals.clear();
        }
    }

    fn append_alerts(&self, rows: &[&AlertRow]) -> duckdb::Result<()> {
        let mut appender = self.conn.appender("alerts")?;
        for row in rows {
            appender.append_row(duckdb::params![
                row.alert_id,
                Value::Timestamp(TimeUnit::Microsecond, row.ts_us),
                row.rule,
                row.severity,
                row.subject,
                row.message,
                false,
            ])?;
        }
        appender.flush()
    }

    fn append_approvals(&self, rows: &[&ApprovalRow]) -> duckdb::Result<()> {
        let mut appender = self.conn.appender_with_columns(
            "approvals",
            &[
                "approval_id",
                "call_id",
                "run_id",
                "step_id",
                "requested_at",
                "agent",
                "model",
                "endpoint",
                "estimated_input_tokens",
                "estimated_cost_usd",
                "requested_by",
                "rule",
                "request_reason",
                "fingerprint",
                "mode",
            ],
        )?;
        for row in rows {
            appender.append_row(duckdb::params![
                row.approval_id,
                row.call_id,
                row.run_id,
                row.step_id,
                Value::Timestamp(TimeUnit::Microsecond, row.requested_at_us),
                row.agent,
                row.model,
                row.endpoint,
                row.estimated_input_tokens as i64,
                match row.estimated_cost {
                    Some(cost) => Value::Decimal(money_decimal(cost)?),
                    None => Value::Null,
                },
                row.requested_by,
                row.rule,
                row.request_reason,
                row.fingerprint,
                row.mode,
            ])?;
        }
        appender.flush()
    }

    fn write_other(&self, command: &StoreCommand) -> duckdb::Result<()> {
        match command {
            StoreCommand::Alert(row) => self.append_alerts(&[row]).map(|()| 1),
            StoreCommand::AlertDelivered(alert_id) => self.execute(
                "UPDATE alerts SET delivered = true WHERE alert_id = ?",
                [alert_id.as_ref()],
            ),
            StoreCommand::Setting(change) => self.write_setting(change),
            StoreCommand::Supervision(change) => self.write_supervision(change),
            StoreCommand::WorkflowVersion(row) => self.execute(
                "INSERT INTO workflow_versions (workflow, version_hash, definition, source, loaded_at, loaded_by) VALUES (?, ?, ?, ?, ?, ?)",
                duckdb::params![
                    row.workflow,
                    row.version_hash,
                    row.definition,
                    row.source,
                    Value::Timestamp(TimeUnit::Microsecond, row.loaded_at_us),
                    row.loaded_by
                ],
            ),
            StoreCommand::WorkflowPin(pin) => self.execute(
                "INSERT INTO workflow_pins (ts, workflow, version_hash, operator) VALUES (?, ?, ?, ?)",
                duckdb::params![
                    Value::Timestamp(TimeUnit::Microsecond, now_micros()),
                    pin.workflow,
                    pin.version_hash,
                    pin.operator
                ],
            ),
            StoreCommand::Run(row) => self.write_run(row),
            StoreCommand::Step(row) => self.write_step(row),
            _ => Ok(0),
        }
        .map(|_| ())
    }

    fn write_setting(&self, change: &SettingChange) -> duckdb::Result<usize> {
        match change {
            SettingChange::Budget {
                operator,
                scope,
                period,
                limit_usd,
                on_exceed,
            } => self.execute(
                "INSERT INTO budget_changes (ts, operator, scope, period, limit_usd, on_exceed) VALUES (make_timestamp(?), ?, ?, ?, ?, ?)",
                duckdb::params![
                    now_micros(),
                    operator,
                    scope,
                    period,
                    Value::Decimal(money_decimal(*limit_usd)?),
                    on_exceed
                ],
            ),
            SettingChange::Limit {
                operator,
                scope,
                requests_per_minute,
                tokens_per_minute,
            } => self.execute(
                "INSERT INTO limit_changes (ts, operator, scope, requests_per_minute, tokens_per_minute) VALUES (make_timestamp(?), ?, ?, ?, ?)",
                duckdb::params![
                    now_micros(),
                    operator,
                    scope,
                    requests_per_minute,
                    tokens_per_minute.map(|t| t as i64)
                ],
            ),
        }
    }

    /// Runs and steps are rewritten whole: a row per run or step, as it
    /// stands after its latest change.
    fn write_run(&self, row: &RunRow) -> duckdb::Result<usize> {
        let ts = |us: i64| Value::Timestamp(TimeUnit::Microsecond, us);
        self.conn
            .prepare_cached("DELETE FROM runs WHERE run_id = ?")?
            .execute([&row.run_id])?;
        self.conn
            .prepare_cached("INSERT INTO runs (run_id, workflow, version_hash, status, triggered_by, inputs, started_at, ended_at, error, cost_usd) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")?
            .execute(duckdb::params![
                row.run_id,
                row.workflow,
                row.version_hash,
                row.status,
                row.triggered_by,
                row.inputs,
                ts(row.started_at_us),
                row.ended_at_us.map(ts),
                row.error,
                Value::Decimal(money_decimal(row.cost)?),
            ])
    }

    fn write_step(&self, row: &StepRow) -> duckdb::Result<usize> {
        let ts = |us: i64| Value::Timestamp(TimeUnit::Microsecond, us);
        let step = &row.state;
        self.conn
            .prepare_cached("DELETE FROM steps WHERE run_id = ? AND step_id = ?")?
            .execute([&row.run_id, &row.step_id])?;
        self.conn
            .prepare_cached("INSERT INTO steps (run_id, step_id, status, agent, attempts, started_at, ended_at, output, output_json, error, call_id, calls, cost_usd, input_tokens, output_tokens, retry_at, deadline, approval_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")?
            .execute(duckdb::params![
                row.run_id,
                row.step_id,
                step.status.as_str(),
                step.agent,
                step.attempts,
                step.started_at_us.map(ts),
                step.ended_at_us.map(ts),
                step.output,
                step.output_value.as_ref().map(serde_json::Value::to_string),
                step.error,
                step.call_id,
                step.calls,
                Value::Decimal(money_decimal(step.cost)?),
                step.input_tokens as i64,
                step.output_tokens as i64,
                step.retry_at_us.map(ts),
                step.deadline_us.map(ts),
                step.approval_id,
            ])
    }

    fn write_supervision(&self, change: &SupervisionChange) -> duckdb::Result<usize> {
        let ts = |us: i64| Value::Timestamp(TimeUnit::Microsecond, us);
        match change {
            SupervisionChange::ApprovalRequested(row) => {
                self.append_approvals(&[row.as_ref()]).map(|()| 1)
            }
            SupervisionChange::ApprovalDecided {
                approval_id,
                decision,
                operator,
                reason,
                at_us,
            } => self.execute(
                "UPDATE approvals SET decided_at = ?, decision = ?, operator = ?, reason = ? WHERE approval_id = ?",
                duckdb::params![ts(*at_us), decision, operator, reason, approval_id],
            ),
            SupervisionChange::ApprovalUsed {
                approval_id,
                call_id,
                at_us,
            } => self.execute(
                "UPDATE approvals SET used_at = ?, used_by_call = ? WHERE approval_id = ?",
                duckdb::params![ts(*at_us), call_id, approval_id],
            ),
            SupervisionChange::HaltStarted {
                halt_id,
                scope,
                drain,
                reason,
                by,
                at_us,
            } => self.execute(
                "INSERT INTO halts (halt_id, scope, drain, reason, halted_by, halted_at) VALUES (?, ?, ?, ?, ?, ?)",
                duckdb::params![halt_id, scope, drain, reason, by, ts(*at_us)],
            ),
            SupervisionChange::HaltResumed { scope, by, at_us } => self.execute(
                "UPDATE halts SET resumed_by = ?, resumed_at = ? WHERE scope = ? AND resumed_at IS NULL",
                duckdb::params![by, ts(*at_us), scope],
            ),
        }
    }

    fn append_audits(&mut self, audits: &[AuditEntry]) -> duckdb::Result<()> {
        let (mut seq, mut prev) = match self.chain.take() {
            Some(head) => head,
            None => chain_head(&self.conn)?,
        };
        // One appender flush per batch: the chain is computed here, so the
        // rows go in as fast as call records do. Should a batch fail half-way,
        // the rows that landed still chain; the head is read again.
        let result = (|| {
            let mut appender = self.conn.appender("audit_log")?;
            for entry in audits {
                seq += 1;
                let ts_us = now_micros();
                let payload = &entry.payload_canonical;
                let fields = ChainFields {
                    seq,
                    ts_us,
                    actor: &entry.actor,
                    kind: &entry.kind,
                    subject: entry.subject.as_deref(),
                    payload_canonical: payload,
                };
                let hash = chain_hash(&prev, &fields);
                appender.append_row(duckdb::params![
                    seq,
                    Value::Timestamp(TimeUnit::Microsecond, ts_us),
                    entry.actor,
                    entry.kind,
                    entry.subject,
                    payload,
                    prev,
                    hash
                ])?;
                prev = hash;
            }
            appender.flush()
        })();
        result.map(|()| self.chain = Some((seq, prev)))
    }
}

/// The `calls` columns, in table order.
fn calls_batch(calls: &[CallRecord]) -> duckdb::Result<RecordBatch> {
    fn text<'a>(calls: &'a [CallRecord], field: impl Fn(&'a CallRecord) -> &'a str) -> ArrayRef {
        Arc::new(StringArray::from_iter_values(calls.iter().map(field)))
    }
    fn optional_text<'a>(
        calls: &'a [CallRecord],
        field: impl Fn(&'a CallRecord) -> Option<&'a str>,
    ) -> ArrayRef {
        Arc::new(calls.iter().map(field).collect::<StringArray>())
    }
    fn count(calls: &[CallRecord], field: impl Fn(&CallRecord) -> u64) -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(
            calls.iter().map(|r| field(r) as i64),
        ))
    }
    fn timestamp(calls: &[CallRecord], field: impl Fn(&CallRecord) -> i64) -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from_iter_values(
            calls.iter().map(field),
        ))
    }
    let arrow_err = |e: ArrowError| duckdb::Error::ToSqlConversionFailure(Box::new(e));
    let cost = calls
        .iter()
        .map(|r| r.cost.map(Usd::atto))
        .collect::<Decimal128Array>()
        .with_precision_and_scale(38, crate::money::SCALE as i8)
        .map_err(arrow_err)?;
    RecordBatch::try_from_iter([
        ("call_id", text(calls, |r| &r.call_id)),
        ("ts_start", timestamp(calls, |r| r.ts_start_us)),
        ("ts_end", timestamp(calls, |r| r.ts_end_us)),
        ("agent", optional_text(calls, |r| r.agent.as_deref())),
        ("upstream", optional_text(calls, |r| r.upstream.as_deref())),
        ("provider", optional_text(calls, |r| r.provider)),
        ("model", optional_text(calls, |r| r.model.as_deref())),
        ("endpoint", text(calls, |r| &r.endpoint)),
        (
            "stream",
            Arc::new(
                calls
                    .iter()
                    .map(|r| Some(r.stream))
                    .collect::<BooleanArray>(),
            ) as ArrayRef,
        ),
        (
            "status_code",
            Arc::new(Int16Array::from_iter_values(
                calls.iter().map(|r| r.status_code as i16),
            )),
        ),
        ("outcome", text(calls, |r| r.outcome.as_str())),
        ("input_tokens", count(calls, |r| r.usage.input_tokens)),
        ("output_tokens", count(calls, |r| r.usage.output_tokens)),
        (
            "cached_input_tokens",
            count(calls, |r| r.usage.cached_input_tokens),
        ),
        (
            "cache_write_tokens",
            count(calls, |r| r.usage.cache_write_tokens),
        ),
        (
            "reasoning_tokens",
            count(calls, |r| r.usage.reasoning_tokens),
        ),
        ("usage_source", text(calls, |r| r.usage_source.as_str())),
        ("cost_usd", Arc::new(cost)),
        (
            "latency_ms",
            Arc::new(Float64Array::from_iter_values(
                calls.iter().map(|r| r.latency_ms),
            )),
        ),
        (
            "ttft_ms",
            Arc::new(calls.iter().map(|r| r.ttft_ms).collect::<Float64Array>()),
        ),
        ("run_id", optional_text(calls, |r| r.run_id.as_deref())),
        ("step_id", optional_text(calls, |r| r.step_id.as_deref())),
        ("error", optional_text(calls, |r| r.error.as_deref())),
    ])
    .map_err(arrow_err)
}

/// DuckDB frees what a checkpoint moved to the file, but glibc keeps freed
/// pages in its arenas unless asked to give them back.
fn trim_c_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn money_decimal(usd: Usd) -> duckdb::Result<duckdb::types::Decimal> {
    duckdb::types::Decimal::new(38, crate::money::SCALE as u8, usd.atto())
        .map_err(|e| duckdb::Error::ToSqlConversionFailure(Box::new(e)))
}

/// Fills in the token counts the provider never reported and prices them.
fn complete_estimate(record: &mut CallRecord) {
    let Some(pending) = record.pending_estimate.take() else {
        return;
    };
    let model = record.model.as_deref().unwrap_or("");
    let mut estimated = false;
    if !pending.input_known && !pending.request_body.is_empty() {
        record.usage.input_tokens = estimate::estimate_input(model, &pending.request_body);
        estimated = true;
    }
    if !pending.output_known {
        record.usage.output_tokens =
            estimate::estimate_output(model, &pending.output_text, pending.output_overflow);
        estimated = true;
    }
    if estimated {
        record.usage_source = UsageSource::Estimated;
    }
    if let Some(price) = pending.price {
        record.cost = Some(price.cost(&record.usage));
    }
    if let Some(admission) = pending.admission {
        admission.settle(&record.usage, record.cost, record.ts_end_us);
    }
}
