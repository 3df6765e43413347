//! `warden budgets` and `warden limits`: see and change spend budgets and
//! rate limits on a running Warden.

use anyhow::Context;
use serde_json::{Value, json};

use super::query::{Format, render};
use super::{AdminArgs, AdminClient};
use crate::store::query::{Column, QueryResult};

pub fn show_budgets(format: Format, admin: &AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::new(admin);
    let value = super::runtime()?.block_on(client.get("/admin/v1/budgets"))?;
    print!("{}", render(&budget_table(&value)?, format));
    Ok(())
}

pub struct BudgetChange<'a> {
    pub scope: &'a str,
    pub limit_usd: &'a str,
    pub period: Option<&'a str>,
    pub on_exceed: Option<&'a str>,
}

pub fn set_budget(change: BudgetChange<'_>, admin: &AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::new(admin);
    let mut body = json!({"scope": change.scope, "limit_usd": change.limit_usd});
    if let Some(period) = change.period {
        body["period"] = json!(period);
    }
    if let Some(on_exceed) = change.on_exceed {
        body["on_exceed"] = json!(on_exceed);
    }
    let value = super::runtime()?.block_on(client.post("/admin/v1/budgets", &body))?;
    let verb = if value["created"].as_bool() == Some(true) {
        "added"
    } else {
        "changed"
    };
    println!("budget {verb}:");
    print!("{}", render(&budget_table(&value)?, Format::Table));
    Ok(())
}

fn budget_table(value: &Value) -> anyhow::Result<QueryResult> {
    let budgets = value["budgets"]
        .as_array()
        .context("unexpected answer from the admin API")?;
    let fields = [
        ("scope", "text"),
        ("run", "text"),
        ("period", "text"),
        ("period_start", "text"),
        ("on_exceed", "text"),
        ("limit_usd", "number"),
        ("spent_usd", "number"),
        ("reserved_usd", "number"),
        ("remaining_usd", "number"),
    ];
    Ok(table(&fields, budgets))
}

pub fn show_limits(format: Format, admin: &AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::new(admin);
    let value = super::runtime()?.block_on(client.get("/admin/v1/limits"))?;
    print!("{}", render(&limit_table(&value)?, format));
    Ok(())
}

pub fn set_limit(
    scope: &str,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u64>,
    admin: &AdminArgs,
) -> anyhow::Result<()> {
    let client = AdminClient::new(admin);
    let body = json!({
        "scope": scope,
        "requests_per_minute": requests_per_minute,
        "tokens_per_minute": tokens_per_minute,
    });
    let value = super::runtime()?.block_on(client.post("/admin/v1/limits", &body))?;
    print!("{}", render(&limit_table(&value)?, Format::Table));
    Ok(())
}

fn limit_table(value: &Value) -> anyhow::Result<QueryResult> {
    let limits = value["limits"]
        .as_array()
        .context("unexpected answer from the admin API")?;
    let fields = [
        ("scope", "text"),
        ("requests_per_minute", "number"),
        ("tokens_per_minute", "number"),
        ("tokens_available", "number"),
    ];
    Ok(table(&fields, limits))
}

pub(super) fn table(fields: &[(&str, &str)], rows: &[Value]) -> QueryResult {
    QueryResult {
        columns: fields
            .iter()
            .map(|(name, kind)| Column {
                name: (*name).to_owned(),
                kind: (*kind).to_owned(),
            })
            .collect(),
        rows: rows
            .iter()
            .map(|row| {
                fields
                    .iter()
                    .map(|(name, _)| match &row[*name] {
                        Value::Null => None,
                        Value::String(s) => Some(s.clone()),
                        other => Some(other.to_string()),
                    })
                    .collect()
            })
            .collect(),
        truncated: false,
    }
}
