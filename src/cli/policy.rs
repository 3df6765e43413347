//! `warden policy`: the loaded modules and their numbers, hot deploys, and
//! an offline evaluator for policy authors.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::budgets::table;
use super::query::{Format, render};
use super::{AdminArgs, AdminClient};
use crate::policy::{
    self, DEFAULT_MAX_MEMORY_MB, FailMode, ModuleKind, ModuleSpec, WasmRuntime, input,
};

pub fn list(format: Format, admin: &AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::new(admin);
    let value = super::runtime()?.block_on(client.get("/admin/v1/policies"))?;
    let modules = value["modules"]
        .as_array()
        .context("unexpected answer from the admin API")?;
    let fields = [
        ("name", "text"),
        ("kind", "text"),
        ("sha256", "text"),
        ("loaded_at", "text"),
        ("evaluations", "number"),
        ("errors", "number"),
        ("timeouts", "number"),
        ("p50_us", "number"),
        ("p99_us", "number"),
        ("fail", "text"),
        ("module", "text"),
    ];
    print!("{}", render(&table(&fields, modules), format));
    Ok(())
}

pub fn deploy(name: &str, file: &Path, admin: &AdminArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let client = AdminClient::new(admin);
    let value = super::runtime()?
        .block_on(client.post_bytes(&format!("/admin/v1/policies/{name}"), bytes.into()))?;
    println!(
        "deployed `{name}`: sha256 {}",
        value["sha256"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// Runs a module offline on an input file and prints its decision (or, for
/// a plugin, the body it returns) and how long it took.
pub fn test(
    module: &Path,
    input_file: &Path,
    config: Option<&str>,
    timeout_ms: u64,
) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(module).with_context(|| format!("cannot read {}", module.display()))?;
    let input_text = std::fs::read(input_file)
        .with_context(|| format!("cannot read {}", input_file.display()))?;
    let input_value: Value = serde_json::from_slice(&input_text)
        .with_context(|| format!("{} is not JSON", input_file.display()))?;
    let config_json = match config {
        Some(text) => {
            let value: Value = serde_json::from_str(text).context("--config is not JSON")?;
            value.to_string()
        }
        None => input_value
            .get("config")
            .map_or_else(|| "{}".to_owned(), Value::to_string),
    };
    let runtime = WasmRuntime::new(None)?;
    let compiled = runtime.compile(&bytes)?;
    let kind = if compiled.module.get_export("warden_transform").is_some()
        && compiled.module.get_export("warden_evaluate").is_none()
    {
        ModuleKind::Plugin
    } else {
        ModuleKind::Policy
    };
    let spec = ModuleSpec {
        name: module
            .file_stem()
            .map_or("module".into(), |s| s.to_string_lossy().into_owned()),
        kind,
        path: module.to_owned(),
        fail: FailMode::Closed,
        timeout_ms,
        max_memory_mb: DEFAULT_MAX_MEMORY_MB,
        include_messages: true,
        config_json: config_json.clone(),
    };
    let loaded = policy::prepare(&runtime, &spec, &bytes)?;
    let payload = match kind {
        ModuleKind::Plugin => input_text.clone(),
        ModuleKind::Policy => {
            let mut without_config = input_value.clone();
            if let Some(object) = without_config.as_object_mut() {
                object.remove("config");
            } else {
                bail!("the input must be a JSON object like {{\"call\": {{…}}}}");
            }
            input::for_policy(
                config_json.as_bytes(),
                without_config.to_string().as_bytes(),
                None,
            )
            .concat()
        }
    };
    let first = Instant::now();
    let outcome = policy::run_once(&loaded, &payload);
    let first = first.elapsed();
    let mut times: Vec<Duration> = (0..1_000)
        .map(|_| {
            let started = Instant::now();
            let _ = policy::run_once(&loaded, &payload);
            started.elapsed()
        })
        .collect();
    times.sort();
    match outcome {
        policy::RunOutcome::Decision(decision) => {
            println!("{}", serde_json::to_string_pretty(&decision)?);
        }
        policy::RunOutcome::Body(Ok(body)) => println!("{}", String::from_utf8_lossy(&body)),
        policy::RunOutcome::Body(Err(e)) => bail!("the plugin failed: {e}"),
    }
    eprintln!(
        "{} `{}` (sha256 {}): first run {} µs; over 1000 runs p50 {} µs, p99 {} µs",
        kind.as_str(),
        spec.name,
        crate::short_hash(&loaded.sha256),
        first.as_micros(),
        times[times.len() / 2].as_micros(),
        times[times.len() * 99 / 100].as_micros()
    );
    Ok(())
}
