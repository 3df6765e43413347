//! `warden init`: a commented config with fresh credentials.

use std::path::Path;

use anyhow::bail;
use rand::Rng;

use crate::config::{init_template, sha256_hex};

/// A random secret with a readable prefix: `wk_` agent keys, `wt_` tokens.
pub fn new_secret(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let body: String = (0..40)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{body}")
}

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
