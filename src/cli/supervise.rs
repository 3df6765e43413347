//! Operator commands for supervision: the approval queue, halts, the live
//! event stream and the audit trail.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use super::budgets::table;
use super::query::{Format, render};
use super::{AdminArgs, AdminClient};
use crate::limits::period::format_utc;
use crate::store::audit::Verification;
use crate::store::export::ExportFormat;
use crate::store::record::now_micros;

pub fn list_approvals(all: bool, format: Format, admin: &AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::new(admin);
    let path = if all {
        "/admin/v1/approvals?all=true"
    } else {
        "/admin/v1/approvals"
    };
    let value = super::runtime()?.block_on(client.get(path))?;
    let approvals = value["approvals"]
        .as_array()
        .context("unexpected answer from the admin API")?;
    if approvals.is_empty() && format == Format::Table {
        println!(
            "{}",
            if all {
                "no approvals"
            } else {
                "no pending approvals"
            }
        );
        return Ok(());
    }
    let now = now_micros();
    let rows: Vec<Value> = approvals
        .iter()
        .map(|a| {
            let requested = a["requested_at_us"].as_i64().unwrap_or(now);
            json!({
                "id": a["approval_id"],
                "age": human_age(now - requested),
                "status": a["status"],
                "agent": a["agent"],
                "model": a["model"],
                "estimated_usd": a["estimated_cost_usd"],
                "requested_by": a["requested_by"],
                "rule": a["rule"],
                "reason": a["reason"],
                "run": a["run_id"],
                "decided_by": a["decided_by"],
                "decision_reason": a["decision_reason"],
            })
        })
        .collect();
    let mut fields = vec![
        ("id", "text"),
        ("age", "text"),
        ("agent", "text"),
        ("model", "text"),
        ("estimated_usd", "number"),
        ("requested_by", "text"),
        ("rule", "text"),
        ("reason", "text"),
        ("run", "text"),
    ];
    if all {
        fields.insert(2, ("status", "text"));
        fields.push(("decided_by", "text"));
        fields.push(("decision_reason", "text"));
    }
    print!("{}", render(&table(&fields, &rows), format));
    Ok(())
}

pub fn human_age(micros: i64) -> String {
    let secs = (micros / 1_000_000).max(0);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86_400 => format!("{}h{:02}m", secs / 3600, secs / 60 % 60),
        _ => format!("{}d{:02}h", secs / 86_400, secs / 3600 % 24),
    }
}

pub fn decide(
    id: &str,
    approve: bool,
    reason: Option<&str>,
    admin: &AdminArgs,
) -> anyhow::Result<()> {
    let client = AdminClient::new(admin);
    let verb = if approve { "approve" } else { "reject" };
    let body = json!({"reason": reason});
    let value = super::runtime()?
        .block_on(client.post(&format!("/admin/v1/approvals/{id}/{verb}"), &body))?;
    let approval = &value["approval"];
    println!(
        "approval {} {} (agent {}, {}); the agent's call {}",
        approval["approval_id"].as_str().unwrap_or(id),
        approval["status"].as_str().unwrap_or(verb),
        approval["agent"].as_str().unwrap_or("?"),
        approval["model"].as_str().unwrap_or("?"),
        if approve {
            "goes ahead (or its identical retry will)"
        } else {
            "is refused with your reason"
        }
    );
    Ok(())
}

/// `--run ID | --agent NAME | --all` as a scope.
pub fn scope_text(run: Option<&str>, agent: Option<&str>, all: bool) -> anyhow::Result<String> {
    match (run, agent, all) {
        (Some(run), None, false) => Ok(format!("run:{run}")),
        (None, Some(agent), false) => Ok(format!("agent:{agent}")),
        (None, None, true) => Ok("all".into()),
        _ => bail!("say exactly one of --run ID, --agent NAME or --all"),
    }
}

pub fn halt(scope: &str, drain: bool, reason: &str, admin: &AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::new(admin);
    let body = json!({"scope": scope, "drain": drain, "reason": reason});
    let value = super::runtime()?.block_on(client.post("/admin/v1/halts", &body))?;
    let halt = &value["halt"];
    println!(
        "{} halted ({}): new calls are refused{}. `warden resume` lifts it.",
        halt["scope"].as_str().unwrap_or(scope),
        if drain { "drain" } else { "immediate" },
        if drain {
            "; calls in flight finish"
        } else {
            " and calls in flight are cut"
        }
    );
    Ok(())
}

pub fn resume(scope: &str, admin: &AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::new(admin);
    let value =
        super::runtime()?.block_on(client.post("/admin/v1/resume", &json!({"scope": scope})))?;
    println!(
        "{} resumed (it was halted by {}: {})",
        scope,
        value["resumed"]["by"].as_str().unwrap_or("?"),
        value["resumed"]["reason"].as_str().unwrap_or("")
    );
    Ok(())
}

pub fn list_halts(format: Format, admin: &AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::new(admin);
    let value = super::runtime()?.block_on(client.get("/admin/v1/halts"))?;
    let halts = value["halts"]
        .as_array()
        .context("unexpected answer from the admin API")?;
    if halts.is_empty() && format == Format::Table {
        println!("no active halts");
        return Ok(());
    }
    let rows: Vec<Value> = halts
        .iter()
        .map(|h| {
            json!({
                "scope": h["scope"],
                "mode": if h["drain"].as_bool() == Some(true) { "drain" } else { "immediate" },
                "since": h["since_us"].as_i64().and_then(format_utc),
                "by": h["by"],
                "reason": h["reason"],
            })
        })
        .collect();
    let fields = [
        ("scope", "text"),
        ("mode", "text"),
        ("since", "text"),
        ("by", "text"),
        ("reason", "text"),
    ];
    print!("{}", render(&table(&fields, &rows), format));
    Ok(())
}

/// `warden watch`: one line per event as it happens, until interrupted.
pub fn watch(kinds: &[String], admin: &AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::new(admin);
    let path = if kinds.is_empty() {
        "/admin/v1/events".to_owned()
    } else {
        format!("/admin/v1/events?kind={}", kinds.join(","))
    };
    super::runtime()?.block_on(async move {
        let mut body = client.stream(&path).await?;
        let mut pending = Vec::new();
        let stdout = std::io::stdout();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("the event stream broke off")?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = memchr::memmem::find(&pending, b"\n\n") {
                let event: Vec<u8> = pending.drain(..end + 2).collect();
                if let Some(line) = event_line(&event) {
                    let mut out = stdout.lock();
                    writeln!(out, "{line}")?;
                    out.flush()?;
                }
            }
        }
        bail!("Warden closed the event stream (it stopped?)")
    })
}

/// `HH:MM:SS kind  message` for one SSE event; comments are skipped.
fn event_line(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let data = text.lines().find_map(|line| line.strip_prefix("data: "))?;
    let value: Value = serde_json::from_str(data).ok()?;
    let time = value["ts_us"]
        .as_i64()
        .and_then(format_utc)
        .map(|t| t[11..19].to_owned())
        .unwrap_or_default();
    Some(format!(
        "{time} {:<18} {}",
        value["kind"].as_str().unwrap_or("?"),
        value["message"].as_str().unwrap_or("")
    ))
}

pub fn audit_verify(store: Option<&Path>, admin: &AdminArgs) -> anyhow::Result<()> {
    let value = match store {
        Some(path) => {
            let conn = open_stopped_store(path)?;
            match crate::store::audit::verify(&conn)? {
                Verification::Intact { rows, head } => {
                    json!({"intact": true, "rows": rows, "head": head})
                }
                Verification::Broken { seq, reason } => {
                    json!({"intact": false, "seq": seq, "reason": reason})
                }
            }
        }
        None => {
            let client = AdminClient::new(admin);
            super::runtime()?.block_on(client.get("/admin/v1/audit/verify"))?
        }
    };
    if value["intact"].as_bool() == Some(true) {
        println!(
            "audit chain intact: {} entries, head {}",
            value["rows"],
            value["head"].as_str().unwrap_or("?")
        );
        Ok(())
    } else {
        bail!(
            "audit chain broken at entry seq {}: {} (that entry, or one before it, was edited, deleted, inserted or reordered)",
            value["seq"],
            value["reason"].as_str().unwrap_or("?")
        )
    }
}

pub struct ExportArgs<'a> {
    pub format: &'a str,
    pub since: Option<&'a str>,
    pub until: Option<&'a str>,
    pub output: Option<&'a Path>,
    pub store: Option<&'a Path>,
}

pub fn audit_export(args: ExportArgs<'_>, admin: &AdminArgs) -> anyhow::Result<()> {
    let Some(format) = ExportFormat::parse(args.format) else {
        bail!("--format {} is not jsonl, csv or parquet", args.format);
    };
    let bytes = match args.store {
        Some(path) => {
            let conn = open_stopped_store(path)?;
            crate::store::export::export_audit(&conn, format, args.since, args.until)?
        }
        None => {
            let mut query = format!("format={}", args.format);
            for (name, value) in [("since", args.since), ("until", args.until)] {
                if let Some(value) = value {
                    query.push_str(&format!(
                        "&{name}={}",
                        percent_encoding::utf8_percent_encode(
                            value,
                            percent_encoding::NON_ALPHANUMERIC
                        )
                    ));
                }
            }
            let client = AdminClient::new(admin);
            super::runtime()?
                .block_on(client.get_bytes(&format!("/admin/v1/audit/export?{query}")))?
                .to_vec()
        }
    };
    match args.output {
        Some(path) => {
            std::fs::write(path, &bytes)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote {} bytes to {}", bytes.len(), path.display());
        }
        None if format == ExportFormat::Parquet => {
            bail!("Parquet is binary: write it to a file with --output FILE")
        }
        None => std::io::stdout().write_all(&bytes)?,
    }
    Ok(())
}

/// The store file of a stopped Warden, opened read-only.
fn open_stopped_store(path: &Path) -> anyhow::Result<duckdb::Connection> {
    if !path.exists() {
        bail!("no store at {}", path.display());
    }
    let config = duckdb::Config::default().access_mode(duckdb::AccessMode::ReadOnly)?;
    duckdb::Connection::open_with_flags(path, config).with_context(|| {
        format!(
            "cannot open {} (is Warden still running on it? then leave out --store and ask it through the admin API)",
            path.display()
        )
    })
}
