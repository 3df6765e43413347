//! `warden.toml`: typed sections, validated before anything starts.
//!
//! Every refusal names the file, the line and what to change. Secrets are
//! never in the file: agent keys and operator tokens appear only as sha256
//! digests, provider keys only as the name of the environment variable that
//! holds them.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::limits::{BudgetScope, BudgetSpec, LimitScope, LimitValues, OnExceed, Period};
use crate::money::Usd;
use crate::providers::ProviderKind;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8700";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8701";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source} (create one with `warden init`)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    InvalidFile { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    #[serde(default)]
    pub agents: Vec<AgentConfig>,
    #[serde(default)]
    pub operators: Vec<OperatorConfig>,
    #[serde(default)]
    pub prices: PricesConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub budgets: Vec<BudgetConfig>,
    #[serde(default)]
    pub alerts: AlertsConfig,
    #[serde(default)]
    pub approvals: ApprovalsConfig,
    #[serde(default)]
    pub workflows: WorkflowsConfig,
    #[serde(default)]
    pub policies: Vec<ModuleConfig>,
    #[serde(default)]
    pub plugins: Vec<ModuleConfig>,
    /// Where the file was read from, for error messages and relative paths.
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: Spanned<String>,
    pub admin_listen: Spanned<String>,
    pub store: PathBuf,
    /// Largest request body accepted from an agent; larger ones get 413.
    pub max_body_bytes: u64,
    /// How long to wait for an upstream's response headers before a 504.
    pub upstream_timeout_secs: u64,
    /// The store writer commits at least this often.
    pub flush_interval_ms: u64,
    /// On SIGTERM/SIGINT, how long in-flight calls may take to finish.
    pub shutdown_grace_secs: u64,
    /// Capacity of the channel between the request path and the store writer.
    pub record_queue: usize,
    /// DuckDB's buffer pool (written blocks it keeps cached, operators'
    /// queries); queries that need more spill to a file next to the store.
    pub store_memory_mb: u32,
    /// Proxy worker threads; 0 means one per CPU core.
    pub proxy_workers: usize,
    /// Changes one operator may make through the admin API per minute
    /// (approve, reject, halt, resume, budget, limit, deploy).
    pub admin_changes_per_minute: u32,
}

impl ServerConfig {
    pub fn workers(&self) -> usize {
        match self.proxy_workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: Spanned::new(0..0, DEFAULT_LISTEN.to_owned()),
            admin_listen: Spanned::new(0..0, DEFAULT_ADMIN_LISTEN.to_owned()),
            store: PathBuf::from("warden.duckdb"),
            max_body_bytes: 32 * 1024 * 1024,
            upstream_timeout_secs: 600,
            flush_interval_ms: 200,
            shutdown_grace_secs: 30,
            record_queue: 65_536,
            store_memory_mb: crate::store::DEFAULT_MEMORY_MB,
            proxy_workers: 0,
            admin_changes_per_minute: 120,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: Spanned<String>,
    pub kind: ProviderKind,
    pub base_url: Spanned<String>,
    /// Environment variable holding the provider key; absent for keyless
    /// local servers (llama.cpp, Ollama).
    pub api_key_env: Option<Spanned<String>>,
    /// Model-name globs (`gpt-*`, `claude-*`) this upstream serves.
    pub models: Spanned<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub name: Spanned<String>,
    pub key_sha256: Spanned<String>,
    #[serde(default = "default_role")]
    pub role: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
    pub requests_per_minute: Option<Spanned<u32>>,
    pub tokens_per_minute: Option<Spanned<u64>>,
    /// Ready workflow steps for this agent are posted here (JSON, the same
    /// item `GET /v1/warden/work` answers), besides being offered by poll.
    pub dispatch_webhook: Option<Spanned<String>>,
}

/// `[limits]`: global rate limits, and per-model ones in `[[limits.models]]`
/// (the first entry whose glob matches a call's model applies).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub requests_per_minute: Option<Spanned<u32>>,
    pub tokens_per_minute: Option<Spanned<u64>>,
    #[serde(default)]
    pub models: Vec<ModelLimitConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelLimitConfig {
    pub model: Spanned<String>,
    pub requests_per_minute: Option<Spanned<u32>>,
    pub tokens_per_minute: Option<Spanned<u64>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    pub scope: Spanned<String>,
    pub limit_usd: Spanned<Amount>,
    pub period: Spanned<String>,
    #[serde(default)]
    pub on_exceed: Option<Spanned<String>>,
}

/// A dollar amount as written: `"12.50"` (exact) or a TOML number, read
/// through its shortest decimal form.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Amount {
    Text(String),
    Integer(i64),
    Float(f64),
}

impl Amount {
    pub fn to_usd(&self) -> Result<Usd, String> {
        let text = match self {
            Amount::Text(text) => text.clone(),
            Amount::Integer(n) => n.to_string(),
            Amount::Float(f) => f.to_string(),
        };
        match Usd::parse(&text) {
            Ok(usd) if usd >= Usd::ZERO => Ok(usd),
            Ok(_) => Err(format!(
                "`{text}` is negative; a limit is zero or more dollars"
            )),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// A Slack-compatible incoming webhook that receives every alert.
    pub webhook: Option<Spanned<String>>,
}

/// `[workflows]`: where the workflow definitions live.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowsConfig {
    /// A directory of `*.toml` workflow files, relative to this file.
    pub dir: Option<Spanned<PathBuf>>,
}

/// `[approvals]`: how calls that need an operator's approval wait.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalsConfig {
    /// `hold`: the agent's request waits for the decision; `ticket`: it is
    /// refused at once and its identical retry goes through once approved.
    pub mode: crate::approvals::Mode,
    /// How long a held call waits before it is answered `approval_timeout`.
    pub timeout_secs: u64,
    /// How long a pending or approved ticket stays usable.
    pub ticket_ttl_secs: u64,
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        ApprovalsConfig {
            mode: crate::approvals::Mode::Hold,
            timeout_secs: 300,
            ticket_ttl_secs: 86_400,
        }
    }
}

/// A `[[policies]]` or `[[plugins]]` entry: a wasm module and how it runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleConfig {
    pub name: Spanned<String>,
    pub module: Spanned<PathBuf>,
    #[serde(default)]
    pub fail: Option<Spanned<String>>,
    pub timeout_ms: Option<Spanned<u64>>,
    pub max_memory_mb: Option<Spanned<u64>>,
    #[serde(default)]
    pub include_messages: bool,
    /// Handed to the module as JSON (`config` in its input, and to
    /// `warden_init`).
    #[serde(default)]
    pub config: Option<toml::Table>,
}

fn default_role() -> String {
    "agent".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    pub name: Spanned<String>,
    pub token_sha256: Spanned<String>,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricesConfig {
    /// A file in LiteLLM's `model_prices_and_context_window.json` format whose
    /// entries override the built-in table.
    pub file: Option<Spanned<PathBuf>>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let locate = |span: Option<Range<usize>>, message: String| match span {
            Some(span) => ConfigError::Invalid {
                path: path.to_owned(),
                line: line_of(text, span.start),
                message,
            },
            None => ConfigError::InvalidFile {
                path: path.to_owned(),
                message,
            },
        };
        let mut config: Config =
            toml::from_str(text).map_err(|e| locate(e.span(), e.message().trim().to_owned()))?;
        config.source = path.to_owned();
        config
            .validate()
            .map_err(|(span, message)| locate(Some(span), message))?;
        Ok(config)
    }

    /// A path from the config, taken relative to the config file's folder.
    pub fn resolve_path(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            return path.to_owned();
        }
        match self.source.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(path),
            _ => path.to_owned(),
        }
    }

    pub fn listen_addr(&self) -> SocketAddr {
        parse_addr(&self.server.listen).expect("validated at load")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        parse_addr(&self.server.admin_listen).expect("validated at load")
    }

    fn validate(&self) -> Result<(), (Range<usize>, String)> {
        for addr in [&self.server.listen, &self.server.admin_listen] {
            if parse_addr(addr).is_none() {
                return Err((
                    addr.span(),
                    format!(
                        "`{}` is not a socket address; write it like \"127.0.0.1:8700\"",
                        addr.get_ref()
                    ),
                ));
            }
        }
        if self.server.max_body_bytes == 0 {
            return Err((0..0, "server.max_body_bytes must be above 0".to_owned()));
        }
        if self.server.flush_interval_ms == 0 || self.server.flush_interval_ms > 200 {
            return Err((
                0..0,
                "server.flush_interval_ms must be between 1 and 200: records are committed at least every 200 ms".to_owned(),
            ));
        }
        if self.server.store_memory_mb < crate::store::MIN_MEMORY_MB {
            return Err((
                0..0,
                format!(
                    "server.store_memory_mb must be at least {}: with less, DuckDB's checkpoint can run out of memory under load and invalidate the store",
                    crate::store::MIN_MEMORY_MB
                ),
            ));
        }
        if self.server.record_queue == 0 {
            return Err((0..0, "server.record_queue must be above 0".to_owned()));
        }
        let mut names = HashSet::new();
        for upstream in &self.upstreams {
            let name = upstream.name.get_ref();
            if !names.insert(name.as_str()) {
                return Err((
                    upstream.name.span(),
                    format!("upstream name `{name}` is used twice; names must be unique"),
                ));
            }
            let url = upstream.base_url.get_ref();
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || url.parse::<http::Uri>().is_err()
            {
                return Err((
                    upstream.base_url.span(),
                    format!(
                        "upstream `{name}`: base_url `{url}` is not an http:// or https:// URL"
                    ),
                ));
            }
            if upstream.models.get_ref().is_empty() {
                return Err((
                    upstream.models.span(),
                    format!(
                        "upstream `{name}`: models is empty; list the model globs it serves, like [\"gpt-*\"]"
                    ),
                ));
            }
            if let Some(env) = &upstream.api_key_env
                && env.get_ref().is_empty()
            {
                return Err((
                    env.span(),
                    format!("upstream `{name}`: api_key_env is empty"),
                ));
            }
        }
        let mut agent_names = HashSet::new();
        let mut digests = HashSet::new();
        for agent in &self.agents {
            let name = agent.name.get_ref();
            if name.is_empty() || !agent_names.insert(name.as_str()) {
                return Err((
                    agent.name.span(),
                    format!("agent name `{name}` is empty or used twice"),
                ));
            }
            check_digest(&agent.key_sha256, &format!("agent `{name}`: key_sha256"))?;
            if !digests.insert(agent.key_sha256.get_ref().to_ascii_lowercase()) {
                return Err((
                    agent.key_sha256.span(),
                    format!("agent `{name}`: key_sha256 is shared with another agent"),
                ));
            }
        }
        for agent in &self.agents {
            check_rates(
                agent.requests_per_minute.as_ref(),
                agent.tokens_per_minute.as_ref(),
            )?;
        }
        check_rates(
            self.limits.requests_per_minute.as_ref(),
            self.limits.tokens_per_minute.as_ref(),
        )?;
        for entry in &self.limits.models {
            if entry.model.get_ref().is_empty() {
                return Err((
                    entry.model.span(),
                    "limits.models: model is empty; write a model glob like \"gpt-4o*\"".to_owned(),
                ));
            }
            check_rates(
                entry.requests_per_minute.as_ref(),
                entry.tokens_per_minute.as_ref(),
            )?;
        }
        let mut budgets = HashSet::new();
        for budget in &self.budgets {
            let spec = budget_spec(budget)?;
            if let BudgetScope::Agent(name) = &spec.scope
                && !agent_names.contains(name.as_str())
            {
                return Err((
                    budget.scope.span(),
                    format!("budget scope `agent:{name}` names no configured agent"),
                ));
            }
            if !budgets.insert((spec.scope.clone(), spec.period)) {
                return Err((
                    budget.scope.span(),
                    format!(
                        "a budget for `{}` per {} is configured twice; keep one",
                        spec.scope, spec.period
                    ),
                ));
            }
        }
        if self.approvals.timeout_secs == 0 || self.approvals.ticket_ttl_secs == 0 {
            return Err((
                0..0,
                "approvals.timeout_secs and approvals.ticket_ttl_secs must be above 0".to_owned(),
            ));
        }
        if self.server.admin_changes_per_minute == 0 {
            return Err((
                0..0,
                "server.admin_changes_per_minute must be above 0".to_owned(),
            ));
        }
        let webhooks = self
            .alerts
            .webhook
            .iter()
            .map(|w| ("alerts.webhook".to_owned(), w))
            .chain(self.agents.iter().filter_map(|a| {
                a.dispatch_webhook
                    .as_ref()
                    .map(|w| (format!("agent `{}`: dispatch_webhook", a.name.get_ref()), w))
            }));
        for (what, webhook) in webhooks {
            let url = webhook.get_ref();
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || url.parse::<http::Uri>().is_err()
            {
                return Err((
                    webhook.span(),
                    format!("{what} `{url}` is not an http:// or https:// URL"),
                ));
            }
        }
        let mut module_names = HashSet::new();
        for (kind, entry) in self.module_entries() {
            let spec = self.module_spec(kind, entry)?;
            if spec.name.is_empty() || !module_names.insert(spec.name.clone()) {
                return Err((
                    entry.name.span(),
                    format!(
                        "{} name `{}` is empty or used twice (policies and plugins share names)",
                        kind.as_str(),
                        spec.name
                    ),
                ));
            }
        }
        let mut operator_names = HashSet::new();
        for operator in &self.operators {
            let name = operator.name.get_ref();
            if name.is_empty() || !operator_names.insert(name.as_str()) {
                return Err((
                    operator.name.span(),
                    format!("operator name `{name}` is empty or used twice"),
                ));
            }
            check_digest(
                &operator.token_sha256,
                &format!("operator `{name}`: token_sha256"),
            )?;
        }
        Ok(())
    }
}

impl Config {
    fn module_entries(&self) -> impl Iterator<Item = (crate::policy::ModuleKind, &ModuleConfig)> {
        use crate::policy::ModuleKind;
        self.policies
            .iter()
            .map(|p| (ModuleKind::Policy, p))
            .chain(self.plugins.iter().map(|p| (ModuleKind::Plugin, p)))
    }

    /// Every policy and plugin, in config order, paths resolved.
    pub fn module_specs(&self) -> Vec<crate::policy::ModuleSpec> {
        self.module_entries()
            .map(|(kind, entry)| self.module_spec(kind, entry).expect("validated at load"))
            .collect()
    }

    fn module_spec(
        &self,
        kind: crate::policy::ModuleKind,
        entry: &ModuleConfig,
    ) -> Result<crate::policy::ModuleSpec, (Range<usize>, String)> {
        use crate::policy::{
            DEFAULT_MAX_MEMORY_MB, DEFAULT_TIMEOUT_MS, FailMode, ModuleSpec, engine,
        };
        let name = entry.name.get_ref().clone();
        let what = format!("{} `{name}`", kind.as_str());
        let fail = match &entry.fail {
            None => FailMode::Closed,
            Some(fail) => match fail.get_ref().as_str() {
                "closed" => FailMode::Closed,
                "open" => FailMode::Open,
                other => {
                    return Err((
                        fail.span(),
                        format!("{what}: fail = \"{other}\" is not \"closed\" or \"open\""),
                    ));
                }
            },
        };
        let timeout_ms = match &entry.timeout_ms {
            None => DEFAULT_TIMEOUT_MS,
            Some(t) if (1..=10_000).contains(t.get_ref()) => *t.get_ref(),
            Some(t) => {
                return Err((
                    t.span(),
                    format!("{what}: timeout_ms must be between 1 and 10000"),
                ));
            }
        };
        let max_memory_mb = match &entry.max_memory_mb {
            None => DEFAULT_MAX_MEMORY_MB,
            Some(m) if (1..=engine::MAX_MEMORY_CAP_MB).contains(m.get_ref()) => *m.get_ref(),
            Some(m) => {
                return Err((
                    m.span(),
                    format!(
                        "{what}: max_memory_mb must be between 1 and {}",
                        engine::MAX_MEMORY_CAP_MB
                    ),
                ));
            }
        };
        if kind == crate::policy::ModuleKind::Plugin && entry.include_messages {
            return Err((
                entry.name.span(),
                format!(
                    "{what}: include_messages is for policies; a plugin always gets the whole request body"
                ),
            ));
        }
        let config_json = serde_json::to_string(&entry.config.clone().unwrap_or_default())
            .map_err(|e| (entry.name.span(), format!("{what}: config: {e}")))?;
        Ok(ModuleSpec {
            name,
            kind,
            path: self.resolve_path(entry.module.get_ref()),
            fail,
            timeout_ms,
            max_memory_mb,
            include_messages: entry.include_messages,
            config_json,
        })
    }
}

fn check_rates(
    requests: Option<&Spanned<u32>>,
    tokens: Option<&Spanned<u64>>,
) -> Result<(), (Range<usize>, String)> {
    if let Some(rpm) = requests
        && *rpm.get_ref() == 0
    {
        return Err((
            rpm.span(),
            "requests_per_minute must be above 0; leave it out for no limit".to_owned(),
        ));
    }
    if let Some(tpm) = tokens
        && *tpm.get_ref() == 0
    {
        return Err((
            tpm.span(),
            "tokens_per_minute must be above 0; leave it out for no limit".to_owned(),
        ));
    }
    Ok(())
}

fn budget_spec(budget: &BudgetConfig) -> Result<BudgetSpec, (Range<usize>, String)> {
    let scope = BudgetScope::parse(budget.scope.get_ref())
        .map_err(|e| (budget.scope.span(), format!("budget scope: {e}")))?;
    let period = Period::parse(budget.period.get_ref()).ok_or_else(|| {
        (
            budget.period.span(),
            format!(
                "budget period `{}` is not one of hour, day, week, month, total",
                budget.period.get_ref()
            ),
        )
    })?;
    let limit = budget
        .limit_usd
        .get_ref()
        .to_usd()
        .map_err(|e| (budget.limit_usd.span(), format!("budget limit_usd: {e}")))?;
    let on_exceed = match &budget.on_exceed {
        None => OnExceed::Deny,
        Some(text) => OnExceed::parse(text.get_ref()).ok_or_else(|| {
            (
                text.span(),
                format!(
                    "budget on_exceed `{}` is not one of deny, require_approval, halt, alert",
                    text.get_ref()
                ),
            )
        })?,
    };
    Ok(BudgetSpec {
        scope,
        period,
        limit,
        on_exceed,
    })
}

fn rate_values(requests: Option<&Spanned<u32>>, tokens: Option<&Spanned<u64>>) -> LimitValues {
    LimitValues {
        requests_per_minute: requests.map(|r| *r.get_ref()),
        tokens_per_minute: tokens.map(|t| *t.get_ref()),
    }
}

impl Config {
    /// The configured budgets (validated at load).
    pub fn budget_specs(&self) -> Vec<BudgetSpec> {
        self.budgets
            .iter()
            .filter_map(|b| budget_spec(b).ok())
            .collect()
    }

    /// The configured rate limits, scope by scope.
    pub fn rate_limits(&self) -> Vec<(LimitScope, LimitValues)> {
        let mut limits = vec![(
            LimitScope::Global,
            rate_values(
                self.limits.requests_per_minute.as_ref(),
                self.limits.tokens_per_minute.as_ref(),
            ),
        )];
        for agent in &self.agents {
            limits.push((
                LimitScope::Agent(agent.name.get_ref().clone()),
                rate_values(
                    agent.requests_per_minute.as_ref(),
                    agent.tokens_per_minute.as_ref(),
                ),
            ));
        }
        for entry in &self.limits.models {
            limits.push((
                LimitScope::Model(entry.model.get_ref().clone()),
                rate_values(
                    entry.requests_per_minute.as_ref(),
                    entry.tokens_per_minute.as_ref(),
                ),
            ));
        }
        limits.retain(|(_, values)| !values.is_empty());
        limits
    }
}

fn check_digest(digest: &Spanned<String>, what: &str) -> Result<(), (Range<usize>, String)> {
    let text = digest.get_ref();
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err((
            digest.span(),
            format!(
                "{what} must be 64 hex digits (the sha256 of the secret; `warden init` prints one)"
            ),
        ));
    }
    Ok(())
}

fn parse_addr(text: &Spanned<String>) -> Option<SocketAddr> {
    text.get_ref().parse().ok()
}

pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The line of a span, for errors raised after parsing (a missing env var).
pub fn line_in_file(path: &Path, span: Range<usize>) -> usize {
    std::fs::read_to_string(path)
        .map(|text| line_of(&text, span.start))
        .unwrap_or(0)
}

/// The sha256 of a secret as lowercase hex, as written in the config.
/// A random secret with a readable prefix: `wk_` agent keys, `wt_` tokens.
pub fn new_secret(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    use rand::Rng;
    let mut rng = rand::rng();
    let body: String = (0..40)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{body}")
}

pub fn sha256_hex(secret: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The commented config `warden init` writes.
pub fn init_template(agent_key_sha256: &str, operator_token_sha256: &str) -> String {
    format!(
        r#"# warden.toml: the configuration of one Warden.
# Reference: https://github.com/ (see README.md in the Warden repository).

[server]
# Agents point their SDK's base URL here (http://127.0.0.1:8700/v1).
listen = "{DEFAULT_LISTEN}"
# Operators: admin API, /healthz, /metrics and `warden query`.
admin_listen = "{DEFAULT_ADMIN_LISTEN}"
# The DuckDB file that records every call; relative to this file.
store = "warden.duckdb"
# Bodies above this size are refused with 413.
max_body_bytes = 33554432
# Seconds to wait for an upstream's response headers before answering 504.
upstream_timeout_secs = 600

# One entry per model API. base_url is written as the provider documents it
# for its own SDK, with or without the trailing /v1. The real provider key
# is read from the named environment variable and never leaves Warden.
[[upstreams]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"
models = ["gpt-*", "o1*", "o3*", "o4*", "chatgpt-*", "text-embedding-*"]

[[upstreams]]
name = "anthropic"
kind = "anthropic"
base_url = "https://api.anthropic.com"
api_key_env = "ANTHROPIC_API_KEY"
models = ["claude-*"]

# Agents authenticate with `Authorization: Bearer <key>` or `x-api-key`.
# Only the key's sha256 is stored; `warden init` printed the key once.
[[agents]]
name = "agent-1"
key_sha256 = "{agent_key_sha256}"
role = "worker"
capabilities = []
# requests_per_minute = 60
# tokens_per_minute = 200000

# Operators authenticate to the admin API with `Authorization: Bearer <token>`.
# An operator with read_only = true may list and query but change nothing.
[[operators]]
name = "admin"
token_sha256 = "{operator_token_sha256}"
# read_only = false

[prices]
# A file in LiteLLM's model_prices_and_context_window.json format overrides
# the built-in price table, model by model.
# file = "prices.json"

# Rate limits for all agents together; [[limits.models]] per model glob.
# [limits]
# requests_per_minute = 1000
# tokens_per_minute = 2000000

# Budgets: scope global | agent:NAME | model:NAME | workflow:NAME | run,
# period hour | day | week | month | total (UTC),
# on_exceed deny | alert | require_approval | halt.
# [[budgets]]
# scope = "global"
# limit_usd = "50.00"
# period = "day"

# [alerts]
# webhook = "https://hooks.slack.com/services/..."

# Calls a policy or budget marks require_approval wait for an operator
# (`warden approvals approve ID`). hold: the agent's request waits up to
# timeout_secs; ticket: it is refused with the approval id at once and its
# identical retry goes through once approved.
# [approvals]
# mode = "hold"
# timeout_secs = 300

# Workflow definitions, one TOML file each (`warden workflows validate FILE`
# checks one offline); edits are picked up without a restart.
# [workflows]
# dir = "workflows"

# Wasm policies decide every call (allow, require_approval, deny, halt_run,
# halt_agent); plugins rewrite the request before it leaves. See
# policies/ABI.md; `warden policy test` runs a module offline.
# [[policies]]
# name = "cost_gate"
# module = "policies/cost_gate.wasm"
# fail = "closed"          # or "open": a failing module lets calls through
# timeout_ms = 5
# max_memory_mb = 16
# config = {{ max_call_usd = 0.50, hard_max_usd = 5.00 }}
#
# [[plugins]]
# name = "redact_pii"
# module = "plugins/redact_pii.wasm"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("warden.toml"))
    }

    const DIGEST: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn init_template_is_valid() {
        let config = parse(&init_template(DIGEST, &DIGEST.replace('0', "1"))).unwrap();
        assert_eq!(config.upstreams.len(), 2);
        assert_eq!(config.agents[0].name.get_ref(), "agent-1");
        assert_eq!(config.listen_addr().port(), 8700);
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let err = parse("[server]\nlisten = \"127.0.0.1:1\"\nstore = \n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("warden.toml:3: "), "{err}");
    }

    #[test]
    fn unknown_kind_names_its_line() {
        let text = "[[upstreams]]\nname = \"x\"\nkind = \"gemini\"\nbase_url = \"http://a\"\nmodels = [\"a\"]\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.starts_with("warden.toml:3: "), "{err}");
        assert!(err.contains("gemini"), "{err}");
    }

    #[test]
    fn store_memory_is_read_and_too_little_is_refused() {
        let config = parse("[server]\nstore_memory_mb = 128\n").unwrap();
        assert_eq!(config.server.store_memory_mb, 128);
        assert_eq!(
            parse("").unwrap().server.store_memory_mb,
            crate::store::DEFAULT_MEMORY_MB
        );
        let err = parse("[server]\nstore_memory_mb = 8\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("store_memory_mb must be at least 16"), "{err}");
    }

    #[test]
    fn unknown_field_is_refused() {
        let err = parse("[server]\nlisten_port = 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("warden.toml:2: ") && err.contains("listen_port"),
            "{err}"
        );
    }

    #[test]
    fn bad_digest_and_bad_url_name_their_line() {
        let text = format!(
            "[[agents]]\nname = \"a\"\nkey_sha256 = \"{DIGEST}\"\n\n[[agents]]\nname = \"b\"\nkey_sha256 = \"abc\"\n"
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.starts_with("warden.toml:7: ") && err.contains("64 hex"),
            "{err}"
        );

        let text = "[[upstreams]]\nname = \"x\"\nkind = \"openai\"\nbase_url = \"ftp://a\"\nmodels = [\"a\"]\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(
            err.starts_with("warden.toml:4: ") && err.contains("ftp://a"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_agent_key_is_refused() {
        let text = format!(
            "[[agents]]\nname = \"a\"\nkey_sha256 = \"{DIGEST}\"\n[[agents]]\nname = \"b\"\nkey_sha256 = \"{DIGEST}\"\n"
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("shared with another agent"), "{err}");
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/warden.toml"));
        let config = Config::load(path).unwrap();
        assert_eq!(config.upstreams.len(), 3);
        assert!(config.operators.iter().any(|o| o.read_only));
        let modules = config.module_specs();
        assert_eq!(modules.len(), 5);
        for module in modules {
            assert!(
                module.path.exists(),
                "{} is not shipped",
                module.path.display()
            );
        }
    }

    #[test]
    fn policies_and_plugins_are_checked_with_their_line() {
        let ok = parse(
            "[[policies]]\nname = \"gate\"\nmodule = \"p.wasm\"\nfail = \"open\"\nconfig = { max = 1, roles = { a = [\"x\"] } }\n",
        )
        .unwrap();
        let spec = &ok.module_specs()[0];
        assert_eq!(spec.fail, crate::policy::FailMode::Open);
        assert_eq!(spec.timeout_ms, crate::policy::DEFAULT_TIMEOUT_MS);
        assert_eq!(spec.config_json, r#"{"max":1,"roles":{"a":["x"]}}"#);
        for (text, line, needle) in [
            (
                "[[policies]]\nname = \"g\"\nmodule = \"p.wasm\"\nfail = \"maybe\"\n",
                4,
                "not \"closed\"",
            ),
            (
                "[[policies]]\nname = \"g\"\nmodule = \"p.wasm\"\ntimeout_ms = 0\n",
                4,
                "timeout_ms",
            ),
            (
                "[[plugins]]\nname = \"g\"\nmodule = \"p.wasm\"\nmax_memory_mb = 4096\n",
                4,
                "max_memory_mb",
            ),
            (
                "[[plugins]]\nname = \"g\"\nmodule = \"p.wasm\"\ninclude_messages = true\n",
                2,
                "include_messages is for policies",
            ),
            (
                "[[policies]]\nname = \"g\"\nmodule = \"a.wasm\"\n[[plugins]]\nname = \"g\"\nmodule = \"b.wasm\"\n",
                5,
                "used twice",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.contains(&format!("warden.toml:{line}:")) && err.contains(needle),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn budgets_and_limits_are_read_and_checked() {
        let text = format!(
            "[[agents]]\nname = \"a\"\nkey_sha256 = \"{DIGEST}\"\nrequests_per_minute = 60\n\n[limits]\ntokens_per_minute = 1000\n[[limits.models]]\nmodel = \"gpt-4o*\"\nrequests_per_minute = 5\n\n[[budgets]]\nscope = \"agent:a\"\nlimit_usd = 0.1\nperiod = \"day\"\n\n[[budgets]]\nscope = \"global\"\nlimit_usd = \"12.345\"\nperiod = \"month\"\non_exceed = \"alert\"\n"
        );
        let config = parse(&text).unwrap();
        let budgets = config.budget_specs();
        assert_eq!(
            budgets[0].limit,
            Usd::parse("0.1").unwrap(),
            "a TOML float keeps its decimal value"
        );
        assert_eq!(budgets[1].on_exceed, OnExceed::Alert);
        assert_eq!(config.rate_limits().len(), 3);

        for (bad, line, words) in [
            (
                "[[budgets]]\nscope = \"agent:nobody\"\nlimit_usd = 1\nperiod = \"day\"\n",
                2,
                "names no configured agent",
            ),
            (
                "[[budgets]]\nscope = \"global\"\nlimit_usd = 1\nperiod = \"fortnight\"\n",
                4,
                "fortnight",
            ),
            (
                "[[budgets]]\nscope = \"global\"\nlimit_usd = \"-3\"\nperiod = \"day\"\n",
                3,
                "negative",
            ),
            (
                "[[budgets]]\nscope = \"team:x\"\nlimit_usd = 1\nperiod = \"day\"\n",
                2,
                "not a scope",
            ),
            ("[limits]\nrequests_per_minute = 0\n", 2, "above 0"),
            ("[alerts]\nwebhook = \"slack\"\n", 2, "not an http"),
            ("[approvals]\nmode = \"queue\"\n", 2, "`hold` or `ticket`"),
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("warden.toml:{line}: ")) && err.contains(words),
                "{err}"
            );
        }
        let twice = "[[budgets]]\nscope = \"global\"\nlimit_usd = 1\nperiod = \"day\"\n[[budgets]]\nscope = \"global\"\nlimit_usd = 2\nperiod = \"day\"\n";
        assert!(
            parse(twice)
                .unwrap_err()
                .to_string()
                .contains("configured twice")
        );
    }

    #[test]
    fn bad_listen_address_is_refused() {
        let err = parse("[server]\n\nlisten = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("warden.toml:3: ") && err.contains("socket address"),
            "{err}"
        );
    }
}
