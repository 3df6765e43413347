//! Warden: a policy-and-governance sidecar for AI agents.
//!
//! Agents point their model base URL at Warden; Warden forwards each call to
//! the real model API, meters its tokens and cost (streamed or not) and
//! records it in an embedded DuckDB store, holding every agent to its rate
//! limits and budgets. See `DESIGN.md` for the contract.

pub mod admin;
pub mod alerts;
pub mod approvals;
pub mod cli;
pub mod config;
pub mod demo;
pub mod events;
pub mod file_stamp;
pub mod gateway;
pub mod halts;
pub mod http_client;
pub mod http_server;
pub mod limits;
pub mod metering;
pub mod metrics;
pub mod money;
pub mod policy;
pub mod providers;
pub mod proxy;
pub mod resident;
pub mod store;
pub mod supervisor;
pub mod workflow;

/// Locks a mutex whatever a panicking holder left behind: every structure
/// guarded this way stays consistent between statements.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The first 12 characters of a content hash, as operators see versions
/// and modules.
pub fn short_hash(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Provider wire-format fixtures for unit tests (`tests/fixtures/`).
#[cfg(test)]
pub(crate) fn test_fixture(path: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{path}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture exists")
}
