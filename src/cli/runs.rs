//! `warden runs start|list|show|watch|cancel` and `warden workflows
//! history|rollback`: operators' view of workflow runs, with the DAG drawn
//! in the terminal.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};

use super::budgets::table;
use super::query::{Format, render};
use super::{AdminArgs, AdminClient};
use crate::store::record::now_micros;

/// `--input k=v`: the value stays text; Warden reads it as the input's type.
pub fn parse_inputs(pairs: &[String]) -> anyhow::Result<Map<String, Value>> {
    let mut inputs = Map::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("--input takes NAME=VALUE, not `{pair}`");
        };
        inputs.insert(key.trim().to_owned(), Value::from(value));
    }
    Ok(inputs)
}

pub fn start(
    workflow: &str,
    inputs: &[String],
    version: Option<&str>,
    format: Format,
    admin: &AdminArgs,
) -> anyhow::Result<()> {
    let inputs = parse_inputs(inputs)?;
    let client = AdminClient::new(admin);
    let mut body = json!({"workflow": workflow, "inputs": inputs});
    if let Some(version) = version {
        body["version"] = Value::from(version);
    }
    let answer = super::runtime()?.block_on(client.post("/admin/v1/runs", &body))?;
    let run_id = answer["run_id"]
        .as_str()
        .context("unexpected answer from the admin API")?;
    if format == Format::Json {
        println!(
            "{}",
            json!({"run_id": run_id, "estimated_cost_usd": answer["estimated_cost_usd"]})
        );
        return Ok(());
    }
    let run = &answer["run"];
    let hash = run["version_hash"].as_str().unwrap_or("");
    println!(
        "started {} (version {})",
        run["workflow"].as_str().unwrap_or(workflow),
        crate::short_hash(hash)
    );
    match answer["estimated_cost_usd"].as_str() {
        Some(cost) => println!(
            "estimated cost: ${cost} (average of {} completed runs of this version)",
            answer["estimate_from_runs"]
        ),
        None => println!("estimated cost: unknown (no completed runs of this version yet)"),
    }
    println!("{run_id}");
    Ok(())
}

pub fn list(status: Option<&str>, format: Format, admin: &AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::new(admin);
    let path = match status {
        Some(status) => format!("/admin/v1/runs?status={status}"),
        None => "/admin/v1/runs".to_owned(),
    };
    let answer = super::runtime()?.block_on(client.get(&path))?;
    let runs = answer["runs"]
        .as_array()
        .context("unexpected answer from the admin API")?;
    if runs.is_empty() && format == Format::Table {
        println!("no runs");
        return Ok(());
    }
    let now = now_micros();
    let rows: Vec<Value> = runs
        .iter()
        .map(|r| {
            let started = r["started_at_us"].as_i64().unwrap_or(now);
            let ended = r["ended_at_us"].as_i64();
            json!({
                "run_id": r["run_id"],
                "workflow": r["workflow"],
                "version": r["version_hash"].as_str().map(crate::short_hash),
                "status": r["status"],
                "started": super::supervise::human_age(now - started) + " ago",
                "duration": human_duration(ended.unwrap_or(now) - started),
                "cost_usd": r["cost_usd"],
                "triggered_by": r["triggered_by"],
                "error": r["error"],
            })
        })
        .collect();
    let fields = [
        ("run_id", "text"),
        ("workflow", "text"),
        ("version", "text"),
        ("status", "text"),
        ("started", "text"),
        ("duration", "text"),
        ("cost_usd", "number"),
        ("triggered_by", "text"),
        ("error", "text"),
    ];
    print!("{}", render(&table(&fields, &rows), format));
    Ok(())
}

pub fn show(run_id: &str, format: Format, admin: &AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::new(admin);
    let answer = super::runtime()?.block_on(client.get(&format!("/admin/v1/runs/{run_id}")))?;
    if format == Format::Json {
        println!("{}", answer["run"]);
        return Ok(());
    }
    print!("{}", draw_run(&answer["run"], now_micros()));
    Ok(())
}

/// Redraws the run every half second until it ends.
pub fn watch(run_id: &str, admin: &AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::new(admin);
    let runtime = super::runtime()?;
    let mut last = String::new();
    loop {
        let answer = runtime.block_on(client.get(&format!("/admin/v1/runs/{run_id}")))?;
        let run = &answer["run"];
        let drawn = draw_run(run, now_micros());
        if drawn != last {
            // Clear the screen and draw from the top.
            print!("\x1b[2J\x1b[H{drawn}");
            last = drawn;
        }
        if run["status"].as_str() != Some("running") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn cancel(run_id: &str, reason: Option<&str>, admin: &AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::new(admin);
    let body = json!({"reason": reason});
    let answer = super::runtime()?
        .block_on(client.post(&format!("/admin/v1/runs/{run_id}/cancel"), &body))?;
    print!("{}", draw_run(&answer["run"], now_micros()));
    Ok(())
}

pub fn history(workflow: &str, format: Format, admin: &AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::new(admin);
    let answer = super::runtime()?
        .block_on(client.get(&format!("/admin/v1/workflows/{workflow}/history")))?;
    let current = answer["current"].as_str().unwrap_or("");
    let versions = answer["versions"]
        .as_array()
        .context("unexpected answer from the admin API")?;
    let rows: Vec<Value> = versions
        .iter()
        .map(|v| {
            let hash = v["version_hash"].as_str().unwrap_or("");
            json!({
                "version": hash,
                "current": if hash == current { "*" } else { "" },
                "loaded": crate::limits::period::format_utc(v["loaded_at_us"].as_i64().unwrap_or(0)),
                "runs": v["runs"],
                "succeeded": v["succeeded"],
                "failed": v["failed"],
                "success_rate": v["success_rate"].as_f64().map(crate::workflow::insights::percent),
                "avg_cost_usd": v["avg_cost_usd"],
            })
        })
        .collect();
    let fields = [
        ("version", "text"),
        ("current", "text"),
        ("loaded", "text"),
        ("runs", "number"),
        ("succeeded", "number"),
        ("failed", "number"),
        ("success_rate", "text"),
        ("avg_cost_usd", "number"),
    ];
    print!("{}", render(&table(&fields, &rows), format));
    Ok(())
}

pub fn rollback(workflow: &str, version: &str, admin: &AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::new(admin);
    let answer = super::runtime()?.block_on(client.post(
        &format!("/admin/v1/workflows/{workflow}/rollback"),
        &json!({"version": version}),
    ))?;
    println!(
        "workflow {workflow} now runs version {} (was {}); new runs use it until its file changes",
        answer["current"].as_str().unwrap_or("?"),
        answer["previous"].as_str().unwrap_or("none"),
    );
    Ok(())
}

/// `warden insights`: per workflow version and per agent and step, with
/// the suggestions the data supports.
pub fn insights(format: Format, admin: &AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::new(admin);
    let answer = super::runtime()?.block_on(client.get("/admin/v1/insights"))?;
    if format == Format::Json {
        println!("{answer}");
        return Ok(());
    }
    let rate = |v: &Value| v.as_f64().map(crate::workflow::insights::percent);
    let money = |v: &Value| v.as_f64().map(|c| format!("{c:.6}"));
    let seconds = |v: &Value| v.as_f64().map(|s| format!("{s:.1}"));
    let empty = Vec::new();
    let versions: Vec<Value> = answer["workflow_stats"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|v| {
            json!({
                "workflow": v["workflow"],
                "version": v["version_hash"].as_str().map(crate::short_hash),
                "runs": v["runs"],
                "completed": v["completed"],
                "success_rate": rate(&v["success_rate"]),
                "avg_cost_usd": money(&v["avg_cost_usd"]),
                "avg_duration_s": seconds(&v["avg_duration_s"]),
            })
        })
        .collect();
    println!("Workflow versions (workflow_stats)");
    let fields = [
        ("workflow", "text"),
        ("version", "text"),
        ("runs", "number"),
        ("completed", "number"),
        ("success_rate", "text"),
        ("avg_cost_usd", "number"),
        ("avg_duration_s", "number"),
    ];
    print!("{}", render(&table(&fields, &versions), format));
    let steps: Vec<Value> = answer["agent_step_stats"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|s| {
            json!({
                "workflow": s["workflow"],
                "step": s["step_id"],
                "agent": s["agent"],
                "completed": s["completed"],
                "success_rate": rate(&s["success_rate"]),
                "avg_cost_usd": money(&s["avg_cost_usd"]),
                "avg_duration_s": seconds(&s["avg_duration_s"]),
            })
        })
        .collect();
    println!("\nAgents by step (agent_step_stats)");
    let fields = [
        ("workflow", "text"),
        ("step", "text"),
        ("agent", "text"),
        ("completed", "number"),
        ("success_rate", "text"),
        ("avg_cost_usd", "number"),
        ("avg_duration_s", "number"),
    ];
    print!("{}", render(&table(&fields, &steps), format));
    let suggestions = answer["suggestions"].as_array().unwrap_or(&empty);
    println!();
    if suggestions.is_empty() {
        println!(
            "No suggestions: they need {} completed runs (or steps) on each side of a comparison.",
            answer["min_completed"]
        );
    }
    for suggestion in suggestions {
        println!("suggestion: {}", suggestion.as_str().unwrap_or(""));
    }
    Ok(())
}

/// Seconds to a tenth under a minute; beyond, as `human_age` counts.
fn human_duration(micros: i64) -> String {
    if micros < 60_000_000 {
        format!("{:.1} s", micros as f64 / 1e6)
    } else {
        super::supervise::human_age(micros)
    }
}

fn glyph(status: &str) -> &'static str {
    match status {
        "succeeded" => "✔",
        "failed" => "✘",
        "running" => "▶",
        "ready" => "○",
        "skipped" => "↷",
        "cancelled" => "■",
        _ => "·",
    }
}

/// The run's DAG, drawn in layers: every step below the steps it needs,
/// steps of one layer side by side in parallel lanes, each with its state,
/// agent, duration, tokens and cost; the run's total at the bottom.
pub fn draw_run(run: &Value, now_us: i64) -> String {
    let mut out = String::new();
    let hash = run["version_hash"].as_str().unwrap_or("");
    let started = run["started_at_us"].as_i64().unwrap_or(now_us);
    let ended = run["ended_at_us"].as_i64();
    let _ = writeln!(
        out,
        "run {}  {} (version {})  {}  {}  by {}",
        run["run_id"].as_str().unwrap_or("?"),
        run["workflow"].as_str().unwrap_or("?"),
        crate::short_hash(hash),
        run["status"].as_str().unwrap_or("?").to_uppercase(),
        human_duration(ended.unwrap_or(now_us) - started),
        run["triggered_by"].as_str().unwrap_or("?"),
    );
    let empty = Vec::new();
    let steps = run["steps"].as_array().unwrap_or(&empty);
    // Layer = longest chain of needs above the step.
    let mut layer: HashMap<&str, usize> = HashMap::new();
    for step in steps {
        let depth = step["needs"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .filter_map(|n| n.as_str().and_then(|n| layer.get(n)))
            .map(|d| d + 1)
            .max()
            .unwrap_or(0);
        layer.insert(step["step_id"].as_str().unwrap_or(""), depth);
    }
    let depth = layer.values().copied().max().unwrap_or(0);
    let width = steps
        .iter()
        .filter_map(|s| s["step_id"].as_str().map(str::len))
        .max()
        .unwrap_or(4);
    for level in 0..=depth {
        let lane: Vec<&Value> = steps
            .iter()
            .filter(|s| layer.get(s["step_id"].as_str().unwrap_or("")) == Some(&level))
            .collect();
        if level > 0 {
            let _ = writeln!(out, "    │");
        }
        for (i, step) in lane.iter().enumerate() {
            let branch = match (lane.len(), i) {
                (1, _) => "  ",
                (_, 0) => "┬ ",
                (n, i) if i + 1 == n => "└ ",
                _ => "├ ",
            };
            let status = step["status"].as_str().unwrap_or("?");
            let started = step["started_at_us"].as_i64();
            let duration = started
                .map(|s| human_duration(step["ended_at_us"].as_i64().unwrap_or(now_us) - s))
                .unwrap_or_default();
            let tokens = match (
                step["input_tokens"].as_u64(),
                step["output_tokens"].as_u64(),
            ) {
                (Some(i), Some(o)) if i + o > 0 => format!("{i}+{o} tok"),
                _ => String::new(),
            };
            let who = match (step["agent"].as_str(), step["kind"].as_str()) {
                (Some(agent), _) => agent.to_owned(),
                (None, Some("model")) => "(model)".into(),
                (None, Some("approval")) => "(approval)".into(),
                _ => String::new(),
            };
            let attempts = match step["attempts"].as_u64() {
                Some(n) if n > 1 => format!(" attempt {n}"),
                _ => String::new(),
            };
            let _ = write!(
                out,
                "  {branch}{} {:<width$}  {:<9} {:<12} {:>8} {:>14} {:>12}{attempts}",
                glyph(status),
                step["step_id"].as_str().unwrap_or("?"),
                status,
                who,
                duration,
                tokens,
                format!("${}", step["cost_usd"].as_str().unwrap_or("0")),
            );
            let note = match status {
                "failed" | "skipped" | "cancelled" => step["error"].as_str().map(str::to_owned),
                "running" if step["kind"].as_str() == Some("approval") => step["approval_id"]
                    .as_str()
                    .map(|id| format!("waiting: warden approvals approve {id}")),
                "ready" if step["attempts"].as_u64().unwrap_or(0) > 0 => step["error"]
                    .as_str()
                    .map(|e| format!("retrying after: {e}")),
                _ => None,
            };
            if let Some(note) = note {
                let _ = write!(out, "  {}", truncate(&note, 100));
            }
            out.push('\n');
        }
    }
    let done = steps
        .iter()
        .filter(|s| matches!(s["status"].as_str(), Some("succeeded" | "skipped")))
        .count();
    let _ = writeln!(
        out,
        "total ${}  ·  {done}/{} steps done",
        run["cost_usd"].as_str().unwrap_or("0"),
        steps.len()
    );
    if let Some(error) = run["error"].as_str() {
        let _ = writeln!(out, "error: {error}");
    }
    out
}

fn truncate(text: &str, max: usize) -> String {
    let one_line = text.replace('\n', " ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        one_line.chars().take(max).collect::<String>() + "…"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dag_is_drawn_in_layers_with_parallel_lanes() {
        let run = json!({
            "run_id": "run-1", "workflow": "brief", "version_hash": "0123456789abcdef",
            "status": "running", "triggered_by": "alice", "started_at_us": 0, "cost_usd": "0.0042",
            "steps": [
                {"step_id": "research", "kind": "agent", "needs": [], "status": "succeeded", "agent": "researcher",
                 "started_at_us": 0, "ended_at_us": 2_000_000, "input_tokens": 10, "output_tokens": 20, "cost_usd": "0.001", "attempts": 1},
                {"step_id": "draft", "kind": "agent", "needs": ["research"], "status": "running", "agent": "writer",
                 "started_at_us": 2_000_000, "cost_usd": "0", "attempts": 1},
                {"step_id": "fact_check", "kind": "agent", "needs": ["research"], "status": "failed", "agent": "checker",
                 "started_at_us": 2_000_000, "ended_at_us": 3_000_000, "cost_usd": "0", "attempts": 2, "error": "call answered 500"},
                {"step_id": "publish", "kind": "model", "needs": ["draft", "fact_check"], "status": "pending", "cost_usd": "0"},
            ]
        });
        let drawn = draw_run(&run, 5_000_000);
        let lines: Vec<&str> = drawn.lines().collect();
        assert!(
            lines[0].contains("run-1")
                && lines[0].contains("RUNNING")
                && lines[0].contains("0123456789ab")
        );
        let at = |needle: &str| lines.iter().position(|l| l.contains(needle)).unwrap();
        assert!(at("research") < at("draft"));
        assert!(
            lines[at("draft")].contains('┬') && lines[at("fact_check")].contains('└'),
            "{drawn}"
        );
        assert!(
            lines[at("fact_check")].contains("call answered 500")
                && lines[at("fact_check")].contains("attempt 2")
        );
        assert!(at("fact_check") < at("publish"));
        assert!(
            lines[at("research")].contains("10+20 tok") && lines[at("research")].contains("2.0 s")
        );
        assert!(drawn.contains("total $0.0042") && drawn.contains("1/4 steps done"));
    }

    #[test]
    fn inputs_are_name_value_pairs() {
        let inputs = parse_inputs(&["topic=tides and moons".into(), "words=300".into()]).unwrap();
        assert_eq!(inputs["topic"], "tides and moons");
        assert_eq!(inputs["words"], "300");
        assert!(parse_inputs(&["topic".into()]).is_err());
    }
}
