//! `warden init`: a commented config with fresh credentials.

use std::path::Path;

use crate::config::{init_template, new_secret, sha256_hex};
use anyhow::bail;

pub fn run(path: &Path, force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        bail!(
            "{} already exists; pass --force to overwrite it",
            path.display()
        );
    }
    let agent_key = new_secret("wk_");
    let operator_token = new_secret("wt_");
    std::fs::write(
        path,
        init_template(&sha256_hex(&agent_key), &sha256_hex(&operator_token)),
    )?;
    println!("wrote {}", path.display());
    println!();
    println!("These are shown once; only their sha256 is in the file.");
    println!("  agent key (agent-1):     {agent_key}");
    println!("  operator token (admin):  {operator_token}");
    println!();
    println!(
        "Next: export OPENAI_API_KEY / ANTHROPIC_API_KEY, then `warden serve --config {}`",
        path.display()
    );
    println!("Agents use base_url http://127.0.0.1:8700/v1 and the agent key as their API key.");
    Ok(())
}
