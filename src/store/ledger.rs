//! What budgets and limits rebuild from the store at start: operators'
//! runtime changes, the spend of the current periods, the alerts already
//! raised in them.

use duckdb::Connection;

use crate::money::Usd;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedBudget {
    pub scope: String,
    pub period: String,
    pub limit_usd: Usd,
    pub on_exceed: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedLimit {
    pub scope: String,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

/// Priced spend of calls that started in a period, by who and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendRow {
    pub agent: Option<String>,
    pub model: Option<String>,
    pub run_id: Option<String>,
    pub cost: Usd,
}

fn usd(text: String) -> duckdb::Result<Usd> {
    Usd::parse(&text).map_err(|e| {
        duckdb::Error::FromSqlConversionFailure(0, duckdb::types::Type::Text, Box::new(e))
    })
}

/// The latest change per budget (scope and period), oldest first.
pub fn saved_budgets(conn: &Connection) -> duckdb::Result<Vec<SavedBudget>> {
    let mut stmt = conn.prepare(
        "SELECT scope, period, CAST(limit_usd AS VARCHAR), on_exceed FROM budget_changes
         QUALIFY row_number() OVER (PARTITION BY scope, period ORDER BY ts DESC, rowid DESC) = 1
         ORDER BY ts",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, String>(3)?,
        ))
    })?;
    rows.map(|row| {
        let (scope, period, limit, on_exceed) = row?;
        Ok(SavedBudget {
            scope,
            period,
            limit_usd: usd(limit)?,
            on_exceed,
        })
    })
    .collect()
}

/// The latest change per rate-limit scope, oldest first.
pub fn saved_limits(conn: &Connection) -> duckdb::Result<Vec<SavedLimit>> {
    let mut stmt = conn.prepare(
        "SELECT scope, requests_per_minute, tokens_per_minute FROM limit_changes
         QUALIFY row_number() OVER (PARTITION BY scope ORDER BY ts DESC, rowid DESC) = 1
         ORDER BY ts",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok(SavedLimit {
            scope: row.get(0)?,
            requests_per_minute: row
                .get::<_, Option<i64>>(1)?
                .map(|n| n.clamp(0, u32::MAX as i64) as u32),
            tokens_per_minute: row.get::<_, Option<i64>>(2)?.map(|n| n.max(0) as u64),
        })
    })?;
    rows.collect()
}

/// Spend of the calls that started at or after `since_us` (all calls when
/// `None`), summed per agent, model and run.
pub fn spend_since(conn: &Connection, since_us: Option<i64>) -> duckdb::Result<Vec<SpendRow>> {
    let sql = "SELECT agent, model, run_id, CAST(sum(cost_usd) AS VARCHAR) FROM calls
               WHERE cost_usd IS NOT NULL AND (CAST(? AS BIGINT) IS NULL OR ts_start >= make_timestamp(CAST(? AS BIGINT)))
               GROUP BY ALL";
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map(duckdb::params![since_us, since_us], |row| {
        Ok((
            row.get::<_, Option<String>>(0)?,
            row.get::<_, Option<String>>(1)?,
            row.get::<_, Option<String>>(2)?,
            row.get::<_, String>(3)?,
        ))
    })?;
    rows.map(|row| {
        let (agent, model, run_id, cost) = row?;
        Ok(SpendRow {
            agent,
            model,
            run_id,
            cost: usd(cost)?,
        })
    })
    .collect()
}

/// `(rule, subject)` of the alerts raised at or after `since_us`.
pub fn alerts_since(
    conn: &Connection,
    since_us: Option<i64>,
) -> duckdb::Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare(
        "SELECT rule, subject FROM alerts WHERE CAST(? AS BIGINT) IS NULL OR ts >= make_timestamp(CAST(? AS BIGINT))",
    )?;
    let rows = stmt.query_map(duckdb::params![since_us, since_us], |row| {
        Ok((row.get(0)?, row.get(1)?))
    })?;
    rows.collect()
}
