//! Wasm policies and plugins: the operator's rules, run in a sandbox on
//! every call. A policy decides (allow, require approval, deny, halt the run
//! or the agent) with a rule id and a reason; a plugin rewrites the request
//! body before it leaves. See `policies/ABI.md` for the module contract.

pub mod activity;
pub mod engine;
pub mod input;
pub mod sandbox;
pub mod stats;
#[cfg(test)]
mod tests;

use crate::file_stamp::FileStamp;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

pub use engine::WasmRuntime;
pub use input::PolicyInput;
pub use sandbox::{ModuleKind, RunError, Sandbox};
use stats::{ModuleStats, StatsSnapshot};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("the wasm engine failed: {0}")]
    Engine(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: String },
    #[error("cannot write {path}: {error}")]
    Write { path: PathBuf, error: String },
    #[error("no policy or plugin is named `{0}`; `warden policy list` shows the loaded ones")]
    Unknown(String),
}

/// A policy's verdict, in increasing order of restriction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    RequireApproval,
    Deny,
    HaltRun,
    HaltAgent,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::RequireApproval => "require_approval",
            Action::Deny => "deny",
            Action::HaltRun => "halt_run",
            Action::HaltAgent => "halt_agent",
        }
    }
}

/// What a module's failure (trap, timeout, memory, bad output) decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    #[default]
    Closed,
    Open,
}

pub const DEFAULT_TIMEOUT_MS: u64 = 5;
pub const DEFAULT_MAX_MEMORY_MB: u64 = 16;
/// The rule of a decision made for a module that failed.
pub const POLICY_ERROR_RULE: &str = "policy_error";

/// A `[[policies]]` or `[[plugins]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleSpec {
    pub name: String,
    pub kind: ModuleKind,
    pub path: PathBuf,
    pub fail: FailMode,
    pub timeout_ms: u64,
    pub max_memory_mb: u64,
    pub include_messages: bool,
    /// The `config` table as JSON.
    pub config_json: String,
}

/// A module in service.
pub struct LoadedModule {
    pub spec: ModuleSpec,
    /// `spec.name` and the module's hash, shared by every decision it makes
    /// rather than copied into each.
    pub name: Arc<str>,
    pub sha256: Arc<str>,
    pub loaded_at_us: i64,
    sandbox: Sandbox,
    /// The file's stamp when last looked at by the reloader.
    stamp: std::sync::Mutex<Option<FileStamp>>,
    stats: ModuleStats,
    /// It used up its CPU deadline once: its evaluations leave the async
    /// workers for blocking threads, so it cannot stall other calls. (Fuel
    /// counts the module's own instructions: preemption never sets this.)
    quarantined: AtomicBool,
}

impl LoadedModule {
    /// Runs the module on `input` (its pieces joined), counting the
    /// evaluation.
    fn run(&self, input: &[&[u8]]) -> (Result<Vec<u8>, RunError>, Duration) {
        self.run_with(input, <[u8]>::to_vec)
    }

    /// `run`, the output read where it lies (see `Sandbox::run_with`).
    fn run_with<T>(
        &self,
        input: &[&[u8]],
        read: impl FnOnce(&[u8]) -> T,
    ) -> (Result<T, RunError>, Duration) {
        let (output, took) = self
            .sandbox
            .run_with(self.spec.config_json.as_bytes(), input, read);
        if matches!(output, Err(RunError::Timeout(_))) {
            self.quarantined.store(true, Ordering::Relaxed);
        }
        let timeout = matches!(output, Err(RunError::Timeout(_) | RunError::WallClock(_)));
        self.stats.observe(took, output.is_err(), timeout);
        (output, took)
    }
}

/// One policy's (or failed plugin's) decision on one call.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub policy: Arc<str>,
    pub policy_hash: Arc<str>,
    pub action: Action,
    pub rule: String,
    pub reason: String,
    pub annotations: Option<serde_json::Value>,
    pub eval_us: u64,
    /// Why the module failed, when the decision was made for it.
    pub error: Option<String>,
}

impl Decision {
    /// An allow with no rule: the default, not worth a row unless the call
    /// is refused.
    pub fn is_plain_allow(&self) -> bool {
        self.action == Action::Allow && self.rule.is_empty() && self.error.is_none()
    }
}

/// The decision `wd_allow()` answers with.
const PLAIN_ALLOW: &[u8] = br#"{"action":"allow"}"#;

#[derive(Debug, Deserialize)]
struct RawDecision {
    action: Action,
    #[serde(default)]
    rule: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    annotations: Option<serde_json::Value>,
}

/// The decisions of every policy on one call, and what they add up to.
#[derive(Debug, Default)]
pub struct Verdict {
    pub decisions: Vec<Decision>,
}

impl Verdict {
    /// The evaluation itself could not run (its thread died): deny, never
    /// allow by accident.
    pub fn failed(error: String) -> Verdict {
        Verdict {
            decisions: vec![Decision {
                policy: "warden".into(),
                policy_hash: "".into(),
                action: Action::Deny,
                rule: POLICY_ERROR_RULE.into(),
                reason: format!("the policies could not be evaluated: {error}"),
                annotations: None,
                eval_us: 0,
                error: Some(error),
            }],
        }
    }

    /// The most restrictive action, and the decision that made it.
    pub fn outcome(&self) -> (Action, Option<&Decision>) {
        match self.decisions.iter().max_by_key(|d| d.action) {
            Some(d) => (d.action, Some(d)),
            None => (Action::Allow, None),
        }
    }

    /// The decisions to record: all of a refused call's, otherwise those
    /// that are not plain allows.
    pub fn to_record(&self) -> impl Iterator<Item = &Decision> {
        let refused = self.outcome().0 != Action::Allow;
        self.decisions
            .iter()
            .filter(move |d| refused || !d.is_plain_allow())
    }
}

/// A decision as the module wrote it, read in its memory.
fn parse_decision(bytes: &[u8]) -> Result<RawDecision, String> {
    // Most evaluations end in the SDK's constant allow: no parse for it.
    if bytes == PLAIN_ALLOW {
        return Ok(RawDecision {
            action: Action::Allow,
            rule: String::new(),
            reason: String::new(),
            annotations: None,
        });
    }
    serde_json::from_slice::<RawDecision>(bytes).map_err(|e| {
        let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(120)]).into_owned();
        format!("returned a malformed decision ({e}): {shown:?}")
    })
}

/// Runs a policy on `input` and makes its decision.
fn evaluate_policy(module: &LoadedModule, input: &[&[u8]]) -> Decision {
    let (output, took) = module.run_with(input, parse_decision);
    let eval_us = took.as_micros() as u64;
    match output.map_err(|e| e.to_string()).and_then(|parsed| parsed) {
        Ok(raw) => Decision {
            policy: module.name.clone(),
            policy_hash: module.sha256.clone(),
            action: raw.action,
            rule: raw.rule,
            reason: raw.reason,
            annotations: raw.annotations,
            eval_us,
            error: None,
        },
        Err(error) => failure_decision(module, error, eval_us),
    }
}

fn failure_decision(module: &LoadedModule, error: String, eval_us: u64) -> Decision {
    tracing::warn!(module = %module.spec.name, %error, "a wasm module failed");
    let (action, outcome) = match module.spec.fail {
        FailMode::Closed => (Action::Deny, "the call is refused (fail = \"closed\")"),
        FailMode::Open => (Action::Allow, "the call goes on (fail = \"open\")"),
    };
    Decision {
        policy: module.name.clone(),
        policy_hash: module.sha256.clone(),
        action,
        rule: POLICY_ERROR_RULE.into(),
        reason: format!(
            "{} `{}` {error}; {outcome}",
            module.spec.kind.as_str(),
            module.spec.name
        ),
        annotations: None,
        eval_us,
        error: Some(error),
    }
}

/// A plugin that failed with `fail = "closed"`: the call may not leave.
#[derive(Debug)]
pub struct PluginRefusal {
    pub decision: Box<Decision>,
}

/// What `transform` did: the new body (if any plugin changed it) and the
/// decisions made for plugins that failed.
#[derive(Debug, Default)]
pub struct Transformed {
    pub body: Option<bytes::Bytes>,
    pub failures: Vec<Decision>,
}

/// A row of `warden policy list`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModuleListing {
    pub name: String,
    pub kind: String,
    pub module: String,
    pub sha256: String,
    pub loaded_at: Option<String>,
    pub fail: FailMode,
    pub timeout_ms: u64,
    pub max_memory_mb: u64,
    pub evaluations: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub quarantined: bool,
}

/// Someone to tell when a module is (re)loaded or refused: the audit log.
pub type LoadObserver = Arc<dyn Fn(LoadEvent<'_>) + Send + Sync>;

pub enum LoadEvent<'a> {
    Loaded {
        name: &'a str,
        kind: ModuleKind,
        sha256: &'a str,
        previous: Option<&'a str>,
        by: &'a str,
    },
    Refused {
        name: &'a str,
        kind: ModuleKind,
        error: &'a str,
        by: &'a str,
    },
}

/// Every policy and plugin in service, swapped atomically on reload.
pub struct ModuleSet {
    /// Made only when some module is configured: its epoch thread and
    /// instance pool cost nothing otherwise.
    runtime: Option<Arc<WasmRuntime>>,
    policies: ArcSwap<Vec<Arc<LoadedModule>>>,
    plugins: ArcSwap<Vec<Arc<LoadedModule>>>,
    observer: LoadObserver,
    /// Serialises reloads and deploys.
    edit: std::sync::Mutex<()>,
}

impl ModuleSet {
    /// Loads every configured module; any that fails refuses the start.
    pub fn load(
        specs: &[ModuleSpec],
        cache_dir: Option<PathBuf>,
        observer: LoadObserver,
    ) -> Result<ModuleSet, PolicyError> {
        let runtime = if specs.is_empty() {
            None
        } else {
            Some(Arc::new(WasmRuntime::new(cache_dir)?))
        };
        let mut policies = Vec::new();
        let mut plugins = Vec::new();
        for spec in specs {
            let runtime = runtime.as_ref().expect("made when specs exist");
            let module = load_module(runtime, spec).map_err(|e| {
                PolicyError::Invalid(format!(
                    "{} `{}` ({}): {e}",
                    spec.kind.as_str(),
                    spec.name,
                    spec.path.display()
                ))
            })?;
            match spec.kind {
                ModuleKind::Policy => policies.push(Arc::new(module)),
                ModuleKind::Plugin => plugins.push(Arc::new(module)),
            }
        }
        Ok(ModuleSet {
            runtime,
            policies: ArcSwap::from_pointee(policies),
            plugins: ArcSwap::from_pointee(plugins),
            observer,
            edit: std::sync::Mutex::new(()),
        })
    }

    pub fn has_policies(&self) -> bool {
        !self.policies.load().is_empty()
    }

    pub fn has_plugins(&self) -> bool {
        !self.plugins.load().is_empty()
    }

    /// Whether some policy asked for the messages' text.
    pub fn wants_messages(&self) -> bool {
        self.policies.load().iter().any(|p| p.spec.include_messages)
    }

    /// Whether a module has overrun its deadline: evaluations should then
    /// run on a blocking thread.
    pub fn needs_blocking(&self) -> bool {
        let quarantined = |set: &ArcSwap<Vec<Arc<LoadedModule>>>| {
            set.load()
                .iter()
                .any(|m| m.quarantined.load(Ordering::Relaxed))
        };
        quarantined(&self.policies) || quarantined(&self.plugins)
    }

    /// Runs every policy in config order on the shared input (and the
    /// message members for those that asked). Stops early only at
    /// `halt_agent`, which nothing can outrank.
    pub fn evaluate(&self, shared_input: &[u8], message_members: Option<&[u8]>) -> Verdict {
        let policies = self.policies.load();
        let mut verdict = Verdict {
            decisions: Vec::with_capacity(policies.len()),
        };
        for policy in policies.iter() {
            let messages = message_members.filter(|_| policy.spec.include_messages);
            let input =
                input::for_policy(policy.spec.config_json.as_bytes(), shared_input, messages);
            let decision = evaluate_policy(policy, &input);
            let stop = decision.action == Action::HaltAgent;
            verdict.decisions.push(decision);
            if stop {
                break;
            }
        }
        verdict
    }

    /// Runs every plugin in order on the request body. A plugin must answer
    /// with a JSON body; one that fails is skipped (`fail = "open"`) or
    /// stops the call (`"closed"`).
    pub fn transform(&self, body: &[u8]) -> Result<Transformed, PluginRefusal> {
        let plugins = self.plugins.load();
        let mut out = Transformed::default();
        for plugin in plugins.iter() {
            let current = out.body.as_deref().unwrap_or(body);
            let (output, took) = plugin.run(&[current]);
            let checked = output.map_err(|e| e.to_string()).and_then(|bytes| {
                serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
                    .map(|_| bytes)
                    .map_err(|e| format!("returned a body that is not JSON ({e})"))
            });
            match checked {
                Ok(bytes) => {
                    if bytes.as_slice() != current {
                        out.body = Some(bytes::Bytes::from(bytes));
                    }
                }
                Err(error) => {
                    let decision = failure_decision(plugin, error, took.as_micros() as u64);
                    if decision.action != Action::Allow {
                        return Err(PluginRefusal {
                            decision: Box::new(decision),
                        });
                    }
                    out.failures.push(decision);
                }
            }
        }
        Ok(out)
    }

    pub fn list(&self) -> Vec<ModuleListing> {
        let policies = self.policies.load();
        let plugins = self.plugins.load();
        policies
            .iter()
            .chain(plugins.iter())
            .map(|m| {
                let StatsSnapshot {
                    evaluations,
                    errors,
                    timeouts,
                    p50_us,
                    p99_us,
                } = m.stats.snapshot();
                ModuleListing {
                    name: m.spec.name.clone(),
                    kind: m.spec.kind.as_str().into(),
                    module: m.spec.path.display().to_string(),
                    sha256: m.sha256.to_string(),
                    loaded_at: crate::limits::period::format_utc(m.loaded_at_us),
                    fail: m.spec.fail,
                    timeout_ms: m.spec.timeout_ms,
                    max_memory_mb: m.spec.max_memory_mb,
                    evaluations,
                    errors,
                    timeouts,
                    p50_us,
                    p99_us,
                    quarantined: m.quarantined.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    fn find(&self, name: &str) -> Option<Arc<LoadedModule>> {
        let policies = self.policies.load();
        let plugins = self.plugins.load();
        policies
            .iter()
            .chain(plugins.iter())
            .find(|m| m.spec.name == name)
            .cloned()
    }

    fn swap_in(&self, module: LoadedModule) {
        let set = match module.spec.kind {
            ModuleKind::Policy => &self.policies,
            ModuleKind::Plugin => &self.plugins,
        };
        let mut next = set.load().as_ref().clone();
        if let Some(slot) = next.iter_mut().find(|m| m.spec.name == module.spec.name) {
            *slot = Arc::new(module);
        }
        set.store(Arc::new(next));
    }

    /// Reloads every module whose file changed since it was loaded. A file
    /// that fails to load is reported and the loaded version keeps serving
    /// (until the file changes again). Call off the request path: it
    /// compiles.
    pub fn reload_changed(&self) {
        let _edit = self.edit.lock().unwrap_or_else(|p| p.into_inner());
        let Some(runtime) = &self.runtime else {
            return;
        };
        let modules: Vec<Arc<LoadedModule>> = {
            let policies = self.policies.load();
            let plugins = self.plugins.load();
            policies.iter().chain(plugins.iter()).cloned().collect()
        };
        for current in modules {
            let stamp = FileStamp::of(&current.spec.path);
            {
                let mut seen = current.stamp.lock().unwrap_or_else(|p| p.into_inner());
                if stamp.is_none() || stamp == *seen {
                    continue;
                }
                // Looked at once per change: a bad file is reported once.
                *seen = stamp;
            }
            match load_module(runtime, &current.spec) {
                Ok(module) if module.sha256 == current.sha256 => {}
                Ok(module) => {
                    (self.observer)(LoadEvent::Loaded {
                        name: &module.spec.name,
                        kind: module.spec.kind,
                        sha256: &module.sha256,
                        previous: Some(&current.sha256),
                        by: "file",
                    });
                    tracing::info!(module = %module.spec.name, sha256 = %module.sha256, "reloaded a changed module");
                    self.swap_in(module);
                }
                Err(error) => {
                    let error = error.to_string();
                    tracing::error!(module = %current.spec.name, %error, "a changed module failed to load; the previous version keeps serving");
                    (self.observer)(LoadEvent::Refused {
                        name: &current.spec.name,
                        kind: current.spec.kind,
                        error: &error,
                        by: "file",
                    });
                }
            }
        }
    }

    /// Replaces a module with `bytes`, checked and compiled first, and
    /// writes them to the module's file so a restart keeps them.
    pub fn deploy(&self, name: &str, bytes: &[u8], operator: &str) -> Result<String, PolicyError> {
        let _edit = self.edit.lock().unwrap_or_else(|p| p.into_inner());
        let current = self
            .find(name)
            .ok_or_else(|| PolicyError::Unknown(name.to_owned()))?;
        let runtime = self.runtime.as_ref().expect("a module is loaded");
        let prepared = prepare(runtime, &current.spec, bytes);
        let mut module = match prepared {
            Ok(module) => module,
            Err(error) => {
                (self.observer)(LoadEvent::Refused {
                    name,
                    kind: current.spec.kind,
                    error: &error.to_string(),
                    by: operator,
                });
                return Err(error);
            }
        };
        write_atomically(&current.spec.path, bytes)?;
        module.stamp = std::sync::Mutex::new(FileStamp::of(&current.spec.path));
        let sha256 = module.sha256.to_string();
        (self.observer)(LoadEvent::Loaded {
            name,
            kind: module.spec.kind,
            sha256: &sha256,
            previous: Some(&current.sha256),
            by: operator,
        });
        self.swap_in(module);
        Ok(sha256)
    }

    /// Polls the module files every `every` and reloads changed ones.
    pub fn watch(self: &Arc<Self>, every: Duration) -> Option<tokio::task::JoinHandle<()>> {
        self.runtime.as_ref()?;
        let set = self.clone();
        Some(crate::file_stamp::poll_blocking(
            every,
            "module",
            move || set.reload_changed(),
        ))
    }
}

fn load_module(runtime: &WasmRuntime, spec: &ModuleSpec) -> Result<LoadedModule, PolicyError> {
    let stamp = FileStamp::of(&spec.path);
    let bytes = std::fs::read(&spec.path).map_err(|e| PolicyError::Read {
        path: spec.path.clone(),
        error: e.to_string(),
    })?;
    let module = prepare(runtime, spec, &bytes)?;
    *module.stamp.lock().unwrap_or_else(|p| p.into_inner()) = stamp;
    Ok(module)
}

/// Compiles and checks module bytes for `spec`.
pub fn prepare(
    runtime: &WasmRuntime,
    spec: &ModuleSpec,
    bytes: &[u8],
) -> Result<LoadedModule, PolicyError> {
    let compiled = runtime.compile(bytes)?;
    let sandbox = Sandbox::new(
        runtime,
        &compiled,
        spec.kind,
        &spec.name,
        Duration::from_millis(spec.timeout_ms),
        spec.max_memory_mb,
    )?;
    Ok(LoadedModule {
        spec: spec.clone(),
        name: spec.name.as_str().into(),
        sha256: compiled.sha256.into(),
        loaded_at_us: crate::store::record::now_micros(),
        sandbox,
        stamp: std::sync::Mutex::new(None),
        stats: ModuleStats::default(),
        quarantined: AtomicBool::new(false),
    })
}

/// What one offline run of a module gave.
pub enum RunOutcome {
    Decision(Decision),
    Body(Result<Vec<u8>, RunError>),
}

/// Runs a module once, offline (for `warden policy test`).
pub fn run_once(module: &LoadedModule, input: &[u8]) -> RunOutcome {
    match module.spec.kind {
        ModuleKind::Policy => RunOutcome::Decision(evaluate_policy(module, &[input])),
        ModuleKind::Plugin => RunOutcome::Body(module.run(&[input]).0),
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), PolicyError> {
    let temp = path.with_extension(format!("deploy{}", std::process::id()));
    std::fs::write(&temp, bytes)
        .and_then(|()| std::fs::rename(&temp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            PolicyError::Write {
                path: path.to_path_buf(),
                error: e.to_string(),
            }
        })
}
