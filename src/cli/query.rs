//! `warden query`: read-only SQL through the admin API, printed as a table,
//! CSV or JSON.

use std::fmt::Write as _;

use anyhow::Context;
use serde_json::json;

use super::{AdminArgs, AdminClient};
use crate::store::query::QueryResult;

#[derive(Clone, Copy, Debug, clap::ValueEnum, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
}

pub fn run(sql: &str, format: Format, admin: &AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::new(admin);
    let value = super::runtime()?.block_on(client.post("/admin/v1/query", &json!({"sql": sql})))?;
    let result: QueryResult =
        serde_json::from_value(value).context("unexpected answer from the admin API")?;
    print!("{}", render(&result, format));
    if result.truncated {
        eprintln!(
            "(only the first {} rows are shown; add a LIMIT or aggregate)",
            result.rows.len()
        );
    }
    Ok(())
}

pub fn render(result: &QueryResult, format: Format) -> String {
    match format {
        Format::Table => render_table(result),
        Format::Csv => render_csv(result),
        Format::Json => render_json(result),
    }
}

pub fn render_table(result: &QueryResult) -> String {
    let cell = |v: &Option<String>| v.clone().unwrap_or_else(|| "NULL".into());
    let cells: Vec<Vec<String>> = result
        .rows
        .iter()
        .map(|row| row.iter().map(|v| trim_decimal(&cell(v))).collect())
        .collect();
    let widths: Vec<usize> = result
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.name.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |out: &mut String, values: &[String], numeric: &dyn Fn(usize) -> bool| {
        let parts: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if numeric(i) {
                    format!("{v:>w$}", w = widths[i])
                } else {
                    format!("{v:<w$}", w = widths[i])
                }
            })
            .collect();
        let _ = writeln!(out, "{}", parts.join("  ").trim_end());
    };
    let names: Vec<String> = result.columns.iter().map(|c| c.name.clone()).collect();
    line(&mut out, &names, &|_| false);
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    line(&mut out, &rule, &|_| false);
    for row in &cells {
        line(&mut out, row, &|i| result.columns[i].kind == "number");
    }
    let _ = writeln!(
        out,
        "({} row{})",
        cells.len(),
        if cells.len() == 1 { "" } else { "s" }
    );
    out
}

/// `0.001230000000000000` -> `0.00123`: DuckDB prints every decimal place.
fn trim_decimal(text: &str) -> String {
    if text.contains('.')
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text.to_owned()
    }
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

fn render_csv(result: &QueryResult) -> String {
    let mut out = String::new();
    let names: Vec<String> = result.columns.iter().map(|c| csv_field(&c.name)).collect();
    let _ = writeln!(out, "{}", names.join(","));
    for row in &result.rows {
        let fields: Vec<String> = row
            .iter()
            .map(|v| {
                v.as_deref()
                    .map(|t| csv_field(&trim_decimal(t)))
                    .unwrap_or_default()
            })
            .collect();
        let _ = writeln!(out, "{}", fields.join(","));
    }
    out
}

/// One JSON object per row; numbers keep their exact decimal text.
fn render_json(result: &QueryResult) -> String {
    let mut out = String::from("[");
    for (r, row) in result.rows.iter().enumerate() {
        out.push_str(if r == 0 { "\n  {" } else { ",\n  {" });
        for (i, (column, value)) in result.columns.iter().zip(row).enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            let _ = write!(out, "{}: ", serde_json::Value::String(column.name.clone()));
            match value {
                None => out.push_str("null"),
                Some(v)
                    if column.kind == "number"
                        && serde_json::from_str::<serde_json::Number>(v).is_ok() =>
                {
                    out.push_str(&trim_decimal(v))
                }
                Some(v) if column.kind == "boolean" => out.push_str(v),
                Some(v) => out.push_str(&serde_json::Value::String(v.clone()).to_string()),
            }
        }
        out.push('}');
    }
    out.push_str(if result.rows.is_empty() {
        "]\n"
    } else {
        "\n]\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::query::Column;

    fn sample() -> QueryResult {
        QueryResult {
            columns: vec![
                Column {
                    name: "agent".into(),
                    kind: "text".into(),
                },
                Column {
                    name: "cost_usd".into(),
                    kind: "number".into(),
                },
            ],
            rows: vec![
                vec![
                    Some("writer, inc".into()),
                    Some("0.001230000000000000".into()),
                ],
                vec![None, Some("12.000000000000000000".into())],
            ],
            truncated: false,
        }
    }

    #[test]
    fn table_aligns_and_trims_decimals() {
        let table = render(&sample(), Format::Table);
        assert!(table.contains("writer, inc   0.00123\n"), "{table}");
        assert!(table.contains("NULL               12\n"), "{table}");
        assert!(table.ends_with("(2 rows)\n"));
    }

    #[test]
    fn csv_quotes_and_json_keeps_exact_numbers() {
        let csv = render(&sample(), Format::Csv);
        assert_eq!(csv, "agent,cost_usd\n\"writer, inc\",0.00123\n,12\n");
        let json: serde_json::Value =
            serde_json::from_str(&render(&sample(), Format::Json)).unwrap();
        assert_eq!(json[0]["agent"], "writer, inc");
        assert_eq!(json[1]["agent"], serde_json::Value::Null);
        assert_eq!(json[1]["cost_usd"], 12);
    }
}
