//! The store's tables and views, as numbered migrations. A file records the
//! versions applied in `schema_version`; opening an older file applies the
//! missing ones in order, each in its own transaction.

use duckdb::Connection;

/// Money columns: exact to 1e-18 USD, the resolution of `money::Usd`.
pub const MONEY: &str = "DECIMAL(38, 18)";

pub struct Migration {
    pub version: i32,
    pub description: &'static str,
    pub sql: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "calls and the hash-chained audit log",
        sql: r#"
CREATE TABLE calls (
    call_id VARCHAR NOT NULL,
    ts_start TIMESTAMP NOT NULL,
    ts_end TIMESTAMP NOT NULL,
    agent VARCHAR,
    upstream VARCHAR,
    provider VARCHAR,
    model VARCHAR,
    endpoint VARCHAR NOT NULL,
    stream BOOLEAN NOT NULL,
    status_code SMALLINT NOT NULL,
    outcome VARCHAR NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cached_input_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    usage_source VARCHAR NOT NULL,
    cost_usd DECIMAL(38, 18),
    latency_ms DOUBLE NOT NULL,
    ttft_ms DOUBLE,
    run_id VARCHAR,
    step_id VARCHAR,
    error VARCHAR
);
CREATE TABLE audit_log (
    seq BIGINT NOT NULL,
    ts TIMESTAMP NOT NULL,
    actor VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    subject VARCHAR,
    payload JSON NOT NULL,
    prev_hash VARCHAR NOT NULL,
    hash VARCHAR NOT NULL
);
"#,
    },
    Migration {
        version: 2,
        description: "decisions, runs and the cost views",
        sql: r#"
CREATE TABLE decisions (
    decision_id VARCHAR NOT NULL,
    call_id VARCHAR,
    ts TIMESTAMP NOT NULL,
    policy VARCHAR NOT NULL,
    policy_hash VARCHAR,
    rule_id VARCHAR,
    action VARCHAR NOT NULL,
    reason VARCHAR,
    eval_us BIGINT
);
CREATE TABLE runs (
    run_id VARCHAR NOT NULL,
    workflow VARCHAR NOT NULL,
    version_hash VARCHAR,
    status VARCHAR NOT NULL,
    triggered_by VARCHAR,
    inputs JSON,
    started_at TIMESTAMP,
    ended_at TIMESTAMP,
    error VARCHAR,
    cost_usd DECIMAL(38, 18)
);
CREATE VIEW cost_by_agent AS
SELECT agent,
       count(*) AS calls,
       count(*) FILTER (WHERE outcome <> 'ok') AS failed_calls,
       sum(input_tokens) AS input_tokens,
       sum(output_tokens) AS output_tokens,
       sum(cost_usd) AS cost_usd,
       count(*) FILTER (WHERE cost_usd IS NULL AND input_tokens + output_tokens > 0) AS unpriced_calls
FROM calls GROUP BY agent ORDER BY cost_usd DESC NULLS LAST, agent;
CREATE VIEW cost_by_model AS
SELECT provider, model,
       count(*) AS calls,
       sum(input_tokens) AS input_tokens,
       sum(cached_input_tokens) AS cached_input_tokens,
       sum(output_tokens) AS output_tokens,
       sum(reasoning_tokens) AS reasoning_tokens,
       sum(cost_usd) AS cost_usd,
       count(*) FILTER (WHERE cost_usd IS NULL AND input_tokens + output_tokens > 0) AS unpriced_calls
FROM calls WHERE model IS NOT NULL GROUP BY provider, model ORDER BY cost_usd DESC NULLS LAST, model;
CREATE VIEW cost_by_run AS
SELECT run_id, count(*) AS calls, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
       sum(cost_usd) AS cost_usd, min(ts_start) AS first_call, max(ts_end) AS last_call
FROM calls WHERE run_id IS NOT NULL GROUP BY run_id ORDER BY cost_usd DESC NULLS LAST;
CREATE VIEW cost_by_workflow AS
SELECT r.workflow, count(DISTINCT r.run_id) AS runs, count(c.call_id) AS calls, sum(c.cost_usd) AS cost_usd
FROM runs r LEFT JOIN calls c ON c.run_id = r.run_id GROUP BY r.workflow ORDER BY cost_usd DESC NULLS LAST;
CREATE VIEW spend_daily AS
SELECT CAST(date_trunc('day', ts_start) AS DATE) AS day, agent, model,
       count(*) AS calls, sum(cost_usd) AS cost_usd
FROM calls GROUP BY ALL ORDER BY day, cost_usd DESC NULLS LAST;
"#,
    },
    Migration {
        version: 3,
        description: "alerts and operators' runtime budget and limit changes",
        sql: r#"
CREATE TABLE alerts (
    alert_id VARCHAR NOT NULL,
    ts TIMESTAMP NOT NULL,
    rule VARCHAR NOT NULL,
    severity VARCHAR NOT NULL,
    subject VARCHAR NOT NULL,
    message VARCHAR NOT NULL,
    delivered BOOLEAN NOT NULL
);
CREATE TABLE budget_changes (
    ts TIMESTAMP NOT NULL,
    operator VARCHAR NOT NULL,
    scope VARCHAR NOT NULL,
    period VARCHAR NOT NULL,
    limit_usd DECIMAL(38, 18) NOT NULL,
    on_exceed VARCHAR NOT NULL
);
CREATE TABLE limit_changes (
    ts TIMESTAMP NOT NULL,
    operator VARCHAR NOT NULL,
    scope VARCHAR NOT NULL,
    requests_per_minute INTEGER,
    tokens_per_minute BIGINT
);
"#,
    },
    Migration {
        version: 4,
        description: "approvals and halts",
        sql: r#"
CREATE TABLE approvals (
    approval_id VARCHAR NOT NULL,
    call_id VARCHAR,
    run_id VARCHAR,
    step_id VARCHAR,
    requested_at TIMESTAMP NOT NULL,
    decided_at TIMESTAMP,
    decision VARCHAR,
    operator VARCHAR,
    reason VARCHAR,
    agent VARCHAR NOT NULL,
    model VARCHAR,
    endpoint VARCHAR,
    estimated_input_tokens BIGINT,
    estimated_cost_usd DECIMAL(38, 18),
    requested_by VARCHAR NOT NULL,
    rule VARCHAR,
    request_reason VARCHAR,
    fingerprint VARCHAR NOT NULL,
    mode VARCHAR NOT NULL,
    used_at TIMESTAMP,
    used_by_call VARCHAR
);
CREATE TABLE halts (
    halt_id VARCHAR NOT NULL,
    scope VARCHAR NOT NULL,
    drain BOOLEAN NOT NULL,
    reason VARCHAR NOT NULL,
    halted_by VARCHAR NOT NULL,
    halted_at TIMESTAMP NOT NULL,
    resumed_by VARCHAR,
    resumed_at TIMESTAMP
);
"#,
    },
    Migration {
        version: 5,
        description: "workflow versions",
        sql: r#"
CREATE TABLE workflow_versions (
    workflow VARCHAR NOT NULL,
    version_hash VARCHAR NOT NULL,
    definition VARCHAR NOT NULL,
    source VARCHAR,
    loaded_at TIMESTAMP NOT NULL,
    loaded_by VARCHAR NOT NULL
);
"#,
    },
    Migration {
        version: 6,
        description: "workflow steps, current-version pins and the workflow insight views",
        sql: r#"
CREATE TABLE steps (
    run_id VARCHAR NOT NULL,
    step_id VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    agent VARCHAR,
    attempts INTEGER NOT NULL,
    started_at TIMESTAMP,
    ended_at TIMESTAMP,
    output VARCHAR,
    output_json JSON,
    error VARCHAR,
    call_id VARCHAR,
    calls INTEGER NOT NULL,
    cost_usd DECIMAL(38, 18) NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    retry_at TIMESTAMP,
    deadline TIMESTAMP,
    approval_id VARCHAR
);
CREATE TABLE workflow_pins (
    ts TIMESTAMP NOT NULL,
    workflow VARCHAR NOT NULL,
    version_hash VARCHAR NOT NULL,
    operator VARCHAR NOT NULL
);
CREATE VIEW workflow_stats AS
SELECT workflow, version_hash,
       count(*) AS runs,
       count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status IN ('succeeded', 'failed')) AS completed,
       round(count(*) FILTER (WHERE status = 'succeeded') / nullif(count(*) FILTER (WHERE status IN ('succeeded', 'failed')), 0), 4) AS success_rate,
       avg(cost_usd) FILTER (WHERE status IN ('succeeded', 'failed')) AS avg_cost_usd,
       avg(epoch(ended_at) - epoch(started_at)) FILTER (WHERE status IN ('succeeded', 'failed')) AS avg_duration_s,
       min(started_at) AS first_run, max(started_at) AS last_run
FROM runs GROUP BY workflow, version_hash ORDER BY workflow, first_run;
CREATE VIEW agent_step_stats AS
SELECT r.workflow, s.step_id, s.agent,
       count(*) AS steps,
       count(*) FILTER (WHERE s.status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE s.status = 'failed') AS failed,
       round(count(*) FILTER (WHERE s.status = 'succeeded') / nullif(count(*) FILTER (WHERE s.status IN ('succeeded', 'failed')), 0), 4) AS success_rate,
       avg(s.cost_usd) FILTER (WHERE s.status IN ('succeeded', 'failed')) AS avg_cost_usd,
       avg(epoch(s.ended_at) - epoch(s.started_at)) FILTER (WHERE s.status IN ('succeeded', 'failed')) AS avg_duration_s
FROM steps s JOIN runs r ON r.run_id = s.run_id
WHERE s.agent IS NOT NULL
GROUP BY r.workflow, s.step_id, s.agent ORDER BY r.workflow, s.step_id, s.agent;
"#,
    },
];

pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// The highest version applied to this file; 0 for a new file.
pub fn current_version(conn: &Connection) -> duckdb::Result<i32> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, description VARCHAR, applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp)",
    )?;
    conn.query_row(
        "SELECT coalesce(max(version), 0) FROM schema_version",
        [],
        |row| row.get(0),
    )
}

/// Applies every migration above the file's version up to `target`.
/// Returns the versions applied.
pub fn migrate_to(conn: &Connection, target: i32) -> duckdb::Result<Vec<i32>> {
    let current = current_version(conn)?;
    let mut applied = Vec::new();
    for migration in MIGRATIONS
        .iter()
        .filter(|m| m.version > current && m.version <= target)
    {
        conn.execute_batch("BEGIN TRANSACTION")?;
        let result = conn.execute_batch(migration.sql).and_then(|()| {
            conn.execute(
                "INSERT INTO schema_version (version, description) VALUES (?, ?)",
                duckdb::params![migration.version, migration.description],
            )
        });
        match result {
            Ok(_) => conn.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
        applied.push(migration.version);
    }
    Ok(applied)
}
