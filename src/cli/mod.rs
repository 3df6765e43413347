//! The `warden` command line. Each command group lives in its own file;
//! this one parses arguments and dispatches.

mod admin_client;
mod budgets;
mod demo;
mod init;
mod policy;
mod query;
mod runs;
mod serve;
mod supervise;
mod workflows;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use admin_client::AdminClient;
pub use query::render_table;
pub use runs::draw_run;

#[derive(Parser)]
#[command(name = "warden", version, about = "A policy-and-governance sidecar for AI agents", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How commands reach a running Warden's admin API.
#[derive(clap::Args, Clone)]
pub struct AdminArgs {
    /// Admin API of the running Warden.
    #[arg(
        long,
        env = "WARDEN_ADMIN_URL",
        default_value = "http://127.0.0.1:8701",
        global = true
    )]
    pub admin_url: String,
    /// Operator token (printed once by `warden init`).
    #[arg(long, env = "WARDEN_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy and the admin API.
    Serve {
        /// The configuration file.
        #[arg(long, short, default_value = "warden.toml")]
        config: PathBuf,
    },
    /// Offline, no keys: run Warden against a built-in simulated provider,
    /// send calls from two agents through it and print their cost.
    Demo {
        /// Keep the demo's store at this path instead of a temporary one.
        #[arg(long)]
        store: Option<PathBuf>,
    },
    /// Write a commented warden.toml and print a fresh agent key and
    /// operator token (only their sha256 goes in the file).
    Init {
        /// Where to write the file.
        #[arg(long, default_value = "warden.toml")]
        path: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Read-only SQL on the live store, e.g. `warden query "FROM cost_by_agent"`.
    Query {
        /// The SQL (SELECT, WITH, FROM, SHOW, DESCRIBE, SUMMARIZE).
        sql: String,
        #[arg(long, value_enum, default_value_t = query::Format::Table)]
        format: query::Format,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Spend, reserved and remaining per budget; `budgets set` changes one.
    Budgets {
        #[command(subcommand)]
        action: Option<BudgetsAction>,
        #[arg(long, value_enum, default_value_t = query::Format::Table)]
        format: query::Format,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Rate limits per scope; `limits set` changes one.
    Limits {
        #[command(subcommand)]
        action: Option<LimitsAction>,
        #[arg(long, value_enum, default_value_t = query::Format::Table)]
        format: query::Format,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The approval queue: calls waiting for an operator.
    Approvals {
        #[command(subcommand)]
        action: ApprovalsAction,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Halt an agent, a run or everything: new calls are refused and, unless
    /// --drain, calls in flight are cut.
    Halt {
        #[command(flatten)]
        scope: ScopeArgs,
        /// Refuse new calls but let those in flight finish.
        #[arg(long)]
        drain: bool,
        /// Why: refused and cut calls carry it.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Lift a halt.
    Resume {
        #[command(flatten)]
        scope: ScopeArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The active halts: scope, since, by whom, why.
    Halts {
        #[arg(long, value_enum, default_value_t = query::Format::Table)]
        format: query::Format,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print approvals, halts, budget alerts, denials and refusals as they
    /// happen, one line each.
    Watch {
        /// Only these kinds (repeat or comma-separate): approval_requested,
        /// approval_decided, halt, resume, budget_alert, policy_deny,
        /// call_refused.
        #[arg(long, value_delimiter = ',')]
        kind: Vec<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The hash-chained audit trail: verify it, export it.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Success rates, cost and duration per workflow version and per agent
    /// and step, with suggestions once 10 runs have completed.
    Insights {
        #[arg(long, value_enum, default_value_t = query::Format::Table)]
        format: query::Format,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Workflow runs: `start`, `list`, `show` (the DAG), `watch`, `cancel`.
    Runs {
        #[command(subcommand)]
        action: RunsAction,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Workflow definitions: `validate` a file offline, `list` those served,
    /// `history` of versions, `rollback` to one.
    Workflows {
        #[command(subcommand)]
        action: WorkflowsAction,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Wasm policies and plugins: `list`, `deploy`, and `test` offline.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct ScopeArgs {
    /// A workflow run (its x-warden-run id).
    #[arg(long)]
    run: Option<String>,
    /// An agent by name.
    #[arg(long)]
    agent: Option<String>,
    /// Every agent.
    #[arg(long)]
    all: bool,
}

impl ScopeArgs {
    fn text(&self) -> anyhow::Result<String> {
        supervise::scope_text(self.run.as_deref(), self.agent.as_deref(), self.all)
    }
}

#[derive(Subcommand)]
enum ApprovalsAction {
    /// Pending approvals (id, age, agent, model, estimated cost, rule, reason).
    List {
        /// Decided ones too.
        #[arg(long)]
        all: bool,
        #[arg(long, value_enum, default_value_t = query::Format::Table)]
        format: query::Format,
    },
    /// Let the held call (or its identical retry) go upstream.
    Approve {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Refuse the call; the agent receives the reason.
    Reject {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum WorkflowsAction {
    /// Check a workflow file: its DAG, references and agents.
    Validate {
        file: PathBuf,
        /// The Warden config whose agents the steps name (default:
        /// ./warden.toml when it exists).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// The workflows a running Warden serves, with their current versions.
    List {
        #[arg(long, value_enum, default_value_t = query::Format::Table)]
        format: query::Format,
    },
    /// A workflow's versions with their run counts and success rates.
    History {
        workflow: String,
        #[arg(long, value_enum, default_value_t = query::Format::Table)]
        format: query::Format,
    },
    /// Make an older version current (audited); new runs use it.
    Rollback {
        workflow: String,
        /// The version's hash (or a unique prefix of 8+ characters).
        version: String,
    },
}

#[derive(Subcommand)]
enum RunsAction {
    /// Start a run; prints the estimated cost and, last, the run id.
    Start {
        workflow: String,
        /// An input, NAME=VALUE (repeat for each).
        #[arg(long = "input", short = 'i')]
        inputs: Vec<String>,
        /// Run this older version (hash or 8+ character prefix).
        #[arg(long)]
        version: Option<String>,
        /// `json` prints {"run_id", "estimated_cost_usd"}.
        #[arg(long, value_enum, default_value_t = query::Format::Table)]
        format: query::Format,
    },
    /// Runs, newest first.
    List {
        /// running, succeeded, failed or cancelled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, value_enum, default_value_t = query::Format::Table)]
        format: query::Format,
    },
    /// The run's DAG with each step's state, agent, duration, tokens and cost.
    Show {
        run: String,
        #[arg(long, value_enum, default_value_t = query::Format::Table)]
        format: query::Format,
    },
    /// Redraw the run live until it ends.
    Watch { run: String },
    /// Halt the run: its in-flight calls are cut, pending steps cancelled.
    Cancel {
        run: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuditAction {
    /// Recompute the hash chain and name the first entry that does not hold.
    Verify {
        /// Check this store file of a stopped Warden instead.
        #[arg(long)]
        store: Option<PathBuf>,
    },
    /// Write the audit log out as jsonl, csv or parquet.
    Export {
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// Entries at or after this time (e.g. 2026-11-24 or "2026-11-24 13:00").
        #[arg(long)]
        since: Option<String>,
        /// Entries before this time.
        #[arg(long)]
        until: Option<String>,
        /// Write here instead of standard output (needed for parquet).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Read this store file of a stopped Warden instead.
        #[arg(long)]
        store: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PolicyAction {
    /// The loaded modules: hashes, evaluations, p50/p99 µs, errors.
    List {
        #[arg(long, value_enum, default_value_t = query::Format::Table)]
        format: query::Format,
    },
    /// Replace a loaded policy or plugin with FILE, without a restart.
    Deploy {
        /// The `name` of its [[policies]] or [[plugins]] entry.
        name: String,
        /// The new module (.wasm).
        file: PathBuf,
    },
    /// Offline: run a module on an input file and print its decision (or a
    /// plugin's new body) and its time.
    Test {
        /// The module (.wasm, or .wat text).
        module: PathBuf,
        /// The input JSON: a policy input (`{"call": …}`) or, for a plugin,
        /// a request body.
        #[arg(long)]
        input: PathBuf,
        /// The policy's config as JSON (default: the input's `config`).
        #[arg(long)]
        config: Option<String>,
        /// CPU deadline per run.
        #[arg(long, default_value_t = crate::policy::DEFAULT_TIMEOUT_MS)]
        timeout_ms: u64,
    },
}

#[derive(Subcommand)]
enum BudgetsAction {
    /// Change a budget's limit, or add a budget (kept across restarts).
    Set {
        /// `global`, `agent:NAME`, `model:NAME`, `workflow:NAME` or `run`.
        scope: String,
        /// The new limit in dollars, e.g. 25 or 0.50.
        #[arg(long)]
        limit_usd: String,
        /// hour, day, week, month or total; needed when the scope has
        /// budgets for several periods (a new budget defaults to day).
        #[arg(long)]
        period: Option<String>,
        /// deny, require_approval, halt or alert (default: unchanged, or deny).
        #[arg(long)]
        on_exceed: Option<String>,
    },
}

#[derive(Subcommand)]
enum LimitsAction {
    /// Set a scope's rate limits (kept across restarts); a limit left out
    /// is removed.
    Set {
        /// `global`, `agent:NAME` or `model:GLOB`.
        scope: String,
        #[arg(long)]
        requests_per_minute: Option<u32>,
        #[arg(long)]
        tokens_per_minute: Option<u64>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve::run(&config),
        Command::Demo { store } => demo::run(store),
        Command::Init { path, force } => init::run(&path, force),
        Command::Query { sql, format, admin } => query::run(&sql, format, &admin),
        Command::Budgets {
            action,
            format,
            admin,
        } => match action {
            None => budgets::show_budgets(format, &admin),
            Some(BudgetsAction::Set {
                scope,
                limit_usd,
                period,
                on_exceed,
            }) => budgets::set_budget(
                budgets::BudgetChange {
                    scope: &scope,
                    limit_usd: &limit_usd,
                    period: period.as_deref(),
                    on_exceed: on_exceed.as_deref(),
                },
                &admin,
            ),
        },
        Command::Limits {
            action,
            format,
            admin,
        } => match action {
            None => budgets::show_limits(format, &admin),
            Some(LimitsAction::Set {
                scope,
                requests_per_minute,
                tokens_per_minute,
            }) => budgets::set_limit(&scope, requests_per_minute, tokens_per_minute, &admin),
        },
        Command::Approvals { action, admin } => match action {
            ApprovalsAction::List { all, format } => supervise::list_approvals(all, format, &admin),
            ApprovalsAction::Approve { id, reason } => {
                supervise::decide(&id, true, reason.as_deref(), &admin)
            }
            ApprovalsAction::Reject { id, reason } => {
                supervise::decide(&id, false, Some(&reason), &admin)
            }
        },
        Command::Halt {
            scope,
            drain,
            reason,
            admin,
        } => scope
            .text()
            .and_then(|scope| supervise::halt(&scope, drain, &reason, &admin)),
        Command::Resume { scope, admin } => scope
            .text()
            .and_then(|scope| supervise::resume(&scope, &admin)),
        Command::Halts { format, admin } => supervise::list_halts(format, &admin),
        Command::Watch { kind, admin } => supervise::watch(&kind, &admin),
        Command::Audit { action, admin } => match action {
            AuditAction::Verify { store } => supervise::audit_verify(store.as_deref(), &admin),
            AuditAction::Export {
                format,
                since,
                until,
                output,
                store,
            } => supervise::audit_export(
                supervise::ExportArgs {
                    format: &format,
                    since: since.as_deref(),
                    until: until.as_deref(),
                    output: output.as_deref(),
                    store: store.as_deref(),
                },
                &admin,
            ),
        },
        Command::Workflows { action, admin } => match action {
            WorkflowsAction::Validate { file, config } => {
                workflows::validate(&file, config.as_deref())
            }
            WorkflowsAction::List { format } => workflows::list(format, &admin),
            WorkflowsAction::History { workflow, format } => {
                runs::history(&workflow, format, &admin)
            }
            WorkflowsAction::Rollback { workflow, version } => {
                runs::rollback(&workflow, &version, &admin)
            }
        },
        Command::Insights { format, admin } => runs::insights(format, &admin),
        Command::Runs { action, admin } => match action {
            RunsAction::Start {
                workflow,
                inputs,
                version,
                format,
            } => runs::start(&workflow, &inputs, version.as_deref(), format, &admin),
            RunsAction::List { status, format } => runs::list(status.as_deref(), format, &admin),
            RunsAction::Show { run, format } => runs::show(&run, format, &admin),
            RunsAction::Watch { run } => runs::watch(&run, &admin),
            RunsAction::Cancel { run, reason } => runs::cancel(&run, reason.as_deref(), &admin),
        },
        Command::Policy { action, admin } => match action {
            PolicyAction::List { format } => policy::list(format, &admin),
            PolicyAction::Deploy { name, file } => policy::deploy(&name, &file, &admin),
            PolicyAction::Test {
                module,
                input,
                config,
                timeout_ms,
            } => policy::test(&module, &input, config.as_deref(), timeout_ms),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr; `RUST_LOG` overrides the level.
pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
