//! `warden workflows validate FILE` (the offline DAG check) and `warden
//! workflows list`.

use std::path::Path;

use anyhow::Context;

use crate::config::Config;
use crate::workflow::{Definition, StepKind, WorkflowAgents};

pub fn validate(file: &Path, config: Option<&Path>) -> anyhow::Result<()> {
    // Agents are checked against the config when there is one.
    let default = Path::new("warden.toml");
    let config_path = config.or_else(|| default.exists().then_some(default));
    let agents = match config_path {
        Some(path) => WorkflowAgents::from_config(
            &Config::load(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        None => WorkflowAgents::default(),
    };
    let definition = Definition::load(file, &agents)?;
    println!(
        "{}: workflow `{}` is valid: {} steps, {} inputs, version {}",
        file.display(),
        definition.name,
        definition.steps.len(),
        definition.inputs.len(),
        crate::short_hash(&definition.hash)
    );
    for step in &definition.steps {
        let who = match &step.kind {
            StepKind::Agent {
                agent: Some(agent), ..
            } => format!("agent {agent}"),
            StepKind::Agent {
                capability: Some(capability),
                ..
            } => format!("any agent with {capability}"),
            StepKind::Agent { .. } => "agent".to_owned(),
            StepKind::Model { model, .. } => format!("model {model}"),
            StepKind::Approval { .. } => "approval".to_owned(),
        };
        let needs = if step.needs.is_empty() {
            String::new()
        } else {
            format!(" after {}", step.needs.join(", "))
        };
        println!("  {:<16} {who}{needs}", step.id);
    }
    if config_path.is_none() {
        println!("(no warden.toml here: agents and capabilities were not checked; pass --config)");
    }
    Ok(())
}

pub fn list(format: super::query::Format, admin: &super::AdminArgs) -> anyhow::Result<()> {
    let client = super::AdminClient::new(admin);
    let value = super::runtime()?.block_on(client.get("/admin/v1/workflows"))?;
    let workflows = value["workflows"]
        .as_array()
        .context("unexpected answer from the admin API")?;
    if workflows.is_empty() && format == super::query::Format::Table {
        println!("no workflows ([workflows] dir in warden.toml)");
        return Ok(());
    }
    let rows: Vec<serde_json::Value> = workflows
        .iter()
        .map(|w| {
            serde_json::json!({
                "name": w["name"],
                "version": w["version_hash"].as_str().map(crate::short_hash),
                "steps": w["steps"],
                "description": w["description"],
                "file": w["file"],
            })
        })
        .collect();
    let fields = [
        ("name", "text"),
        ("version", "text"),
        ("steps", "number"),
        ("description", "text"),
        ("file", "text"),
    ];
    print!(
        "{}",
        super::query::render(&super::budgets::table(&fields, &rows), format)
    );
    Ok(())
}
