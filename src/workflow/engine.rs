//! The workflow engine: the runs in flight, advanced by what Warden sees.
//!
//! Agents take ready work by polling (`GET /v1/warden/work`); their model
//! calls are bound to a step by the `x-warden-run` / `x-warden-step` headers
//! (or, without headers, to the agent's only running step); the call that
//! gives the step's final answer completes it and advances the DAG in the
//! same moment. Model steps are calls Warden sends through its own proxy,
//! approval steps are approvals in the operators' queue. Every change is
//! written to `runs` / `steps`, announced as an event and audited.

use crate::lock;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::definition::{Definition, StepKind};
use super::registry::WorkflowSet;
use super::run::{Changes, RunState, RunStatus, StepError, StepStatus};
use crate::approvals::{Approval, GateRequest, Status as ApprovalStatus};
use crate::events::{EventBus, EventParts};
use crate::money::Usd;
use crate::providers::ProviderKind;
use crate::providers::answer::Answer;
use crate::store::Recorder;
use crate::store::record::{RunRow, StepRow, now_micros};
use crate::supervisor::Supervisor;

/// The agent name Warden's own model-step calls carry.
pub const WARDEN_AGENT: &str = "warden";
/// Ended runs kept in memory for `runs show` without a store query.
const ENDED_KEPT: usize = 1_024;
/// How often deadlines, retry backoffs and decisions are looked at.
const TICK: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum RunsError {
    #[error("no workflow `{name}`; the workflows in service are: {known}")]
    UnknownWorkflow { name: String, known: String },
    #[error(
        "workflow `{workflow}` has no version `{hash}`; `warden workflows history {workflow}` lists its versions"
    )]
    UnknownVersion { workflow: String, hash: String },
    #[error("{0}")]
    BadInputs(String),
    #[error("no run `{0}` in flight; `warden runs list` shows the runs")]
    UnknownRun(String),
    #[error("run `{run}` has no step `{step}`")]
    UnknownStep { run: String, step: String },
    #[error("step `{step}` of run `{run}` is assigned to agent `{owner}`, not to `{agent}`")]
    NotYourStep {
        run: String,
        step: String,
        owner: String,
        agent: String,
    },
    #[error(
        "agent `{agent}` has no running step `{step}`; name the run (x-warden-run or \"run_id\")"
    )]
    NoSuchWork { agent: String, step: String },
    #[error(
        "step `{step}` of run `{run}` failed an attempt and is retried in {in_secs} s (retry_backoff_secs); call again then"
    )]
    RetryLater {
        run: String,
        step: String,
        in_secs: i64,
    },
    #[error(transparent)]
    Step(#[from] StepError),
}

/// A call bound to a run (and usually to one of its steps).
#[derive(Debug, Clone)]
pub struct Binding {
    pub run_id: String,
    /// The run's definition (its `name` is the `workflow:NAME` budget scope).
    pub workflow: Arc<Definition>,
    pub step: Option<BoundStep>,
}

#[derive(Debug, Clone)]
pub struct BoundStep {
    pub index: usize,
    pub id: String,
    /// The step ends with this call's final answer (not for
    /// `complete_on = "explicit"`); a model step ends with any answer.
    pub ends_on_answer: bool,
    pub any_answer: bool,
    /// Cost held against the step's `budget_usd` until the call ends.
    pub reserved: Usd,
    /// The step's `budget_usd` cannot afford this call: it is refused (and
    /// the refusal fails the attempt like any).
    pub over_budget: Option<String>,
}

/// How a bound call ended.
pub struct CallEnded {
    pub call_id: String,
    pub ok: bool,
    pub status: u16,
    pub error: Option<String>,
    pub cost: Option<Usd>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub answer: Option<Answer>,
}

/// Ready work as an agent's poll answers it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkItem {
    pub run_id: String,
    pub step_id: String,
    pub workflow: String,
    pub instructions: String,
    pub inputs: Map<String, Value>,
    /// Outputs of the steps upstream of this one.
    pub outputs: Map<String, Value>,
    pub headers: Map<String, Value>,
    pub attempt: u32,
    /// How the step ends: `final_answer` or `explicit`.
    pub complete_on: &'static str,
    pub deadline_us: Option<i64>,
}

/// A step as operators see it: its place in the DAG and its state.
#[derive(Debug, Clone, Serialize)]
pub struct StepView {
    pub step_id: String,
    pub kind: &'static str,
    pub needs: Vec<String>,
    #[serde(flatten)]
    pub state: super::run::StepState,
}

/// A run as operators see it.
#[derive(Debug, Clone, Serialize)]
pub struct RunView {
    pub run_id: String,
    pub workflow: String,
    pub version_hash: String,
    pub status: RunStatus,
    pub triggered_by: String,
    pub inputs: Map<String, Value>,
    pub started_at_us: i64,
    pub ended_at_us: Option<i64>,
    pub error: Option<String>,
    pub cost_usd: String,
    pub steps: Vec<StepView>,
}

/// The protocol of the upstream that serves a model.
pub type ProtocolOf = Box<dyn Fn(&str) -> Option<ProviderKind> + Send + Sync>;

/// How Warden sends a model step through its own proxy.
pub struct ModelCaller {
    pub proxy_addr: SocketAddr,
    /// The protocol of the upstream serving a model, if one does.
    pub protocol_of: ProtocolOf,
}

/// Work outside the engine's lock, after a change.
enum Effect {
    CallModel {
        run_id: String,
        step_id: String,
        model: String,
        prompt: String,
    },
    OpenGate {
        workflow: String,
        run_id: String,
        step_id: String,
        message: String,
    },
    Withdraw {
        approval_id: String,
        by: String,
        reason: String,
    },
    Dispatch {
        url: http::Uri,
        item: Box<WorkItem>,
    },
}

/// What the engine knows of a configured agent.
#[derive(Debug, Clone, Default)]
pub struct AgentInfo {
    pub capabilities: Vec<String>,
    pub dispatch_webhook: Option<http::Uri>,
}

#[derive(Default)]
struct EngineState {
    runs: HashMap<String, RunState>,
    ended: VecDeque<String>,
}

pub struct Runs {
    state: Mutex<EngineState>,
    workflows: Arc<WorkflowSet>,
    agents: HashMap<String, AgentInfo>,
    /// For dispatch webhooks, built on first use.
    webhook_client: OnceLock<crate::http_client::TlsClient>,
    recorder: Recorder,
    events: EventBus,
    supervisor: Arc<Supervisor>,
    model_caller: OnceLock<ModelCaller>,
    /// The key Warden's own model-step calls carry; lives only in memory.
    internal_key: String,
    /// Approvals closed since the driver last looked.
    closed_approvals: Mutex<Vec<Approval>>,
    /// Agent → its running agent steps (run, step position), so that a
    /// call without headers finds its step without looking at every run.
    /// Locked after `state` when both are held, never before it.
    running: Mutex<HashMap<String, Vec<(String, usize)>>>,
    /// How many agents `running` holds, read without its lock: while no
    /// agent step runs, a call without run headers costs no lock at all.
    running_agents: AtomicUsize,
    wake: tokio::sync::Notify,
}

impl Runs {
    pub fn new(
        workflows: Arc<WorkflowSet>,
        agents: HashMap<String, AgentInfo>,
        restored: Vec<RunState>,
        recorder: Recorder,
        supervisor: Arc<Supervisor>,
    ) -> Arc<Runs> {
        let mut state = EngineState::default();
        for run in restored {
            state.runs.insert(run.run_id.clone(), run);
        }
        let runs = Arc::new(Runs {
            state: Mutex::new(state),
            workflows,
            agents,
            webhook_client: OnceLock::new(),
            recorder,
            events: supervisor.events.clone(),
            supervisor: supervisor.clone(),
            model_caller: OnceLock::new(),
            internal_key: crate::config::new_secret("wi_"),
            closed_approvals: Mutex::new(Vec::new()),
            running: Mutex::new(HashMap::new()),
            running_agents: AtomicUsize::new(0),
            wake: tokio::sync::Notify::new(),
        });
        {
            let state = lock(&runs.state);
            for run in state.runs.values() {
                for index in 0..run.steps.len() {
                    runs.index_running(run, index);
                }
            }
        }
        // A gate decided just before a stop, whose step row never heard.
        let waiting: Vec<String> = lock(&runs.state)
            .runs
            .values()
            .flat_map(|run| {
                run.steps
                    .iter()
                    .filter(|s| s.status == StepStatus::Running)
                    .filter_map(|s| s.approval_id.clone())
            })
            .collect();
        if !waiting.is_empty() {
            let closed: Vec<Approval> = supervisor
                .approvals
                .list(true)
                .into_iter()
                .filter(|a| waiting.contains(&a.approval_id) && a.status != ApprovalStatus::Pending)
                .collect();
            lock(&runs.closed_approvals).extend(closed);
        }
        let observer = Arc::downgrade(&runs);
        supervisor
            .approvals
            .observe_decisions(Box::new(move |approval: &Approval| {
                if approval.requested_by.starts_with("workflow:")
                    && let Some(runs) = observer.upgrade()
                {
                    lock(&runs.closed_approvals).push(approval.clone());
                    runs.wake.notify_one();
                }
            }));
        runs
    }

    /// The sha256 of the key Warden's model-step calls carry, for the agent
    /// directory.
    pub fn internal_key_digest(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        Sha256::digest(self.internal_key.as_bytes()).into()
    }

    /// Model steps can be sent once the proxy listens.
    pub fn set_model_caller(&self, caller: ModelCaller) {
        let _ = self.model_caller.set(caller);
        self.wake.notify_one();
    }

    pub fn workflows(&self) -> &Arc<WorkflowSet> {
        &self.workflows
    }

    fn lock(&self) -> MutexGuard<'_, EngineState> {
        lock(&self.state)
    }

    /// Starts a run of the current version of `workflow`, or of `version`.
    /// Blocking: an older version may be read from the store.
    pub fn start(
        self: &Arc<Self>,
        workflow: &str,
        version: Option<&str>,
        inputs: Map<String, Value>,
        operator: &str,
    ) -> Result<RunView, RunsError> {
        let definition = self.definition(workflow, version)?;
        let inputs = super::run::check_inputs(&definition, inputs).map_err(RunsError::BadInputs)?;
        let now = now_micros();
        let run_id = format!("run-{}", uuid::Uuid::now_v7());
        let (run, changes) =
            RunState::start(run_id.clone(), definition, inputs, operator.to_owned(), now);
        self.recorder.run_state(run_row(&run));
        self.recorder.audit(
            operator,
            "run_started",
            Some(&run_id),
            json!({"workflow": run.definition.name, "version_hash": run.definition.hash, "inputs": run.inputs}),
        );
        self.events.publish(|| EventParts {
            kind: "run_started",
            actor: operator.to_owned(),
            subject: Some(run_id.clone()),
            message: format!(
                "{operator} started run {run_id} of {} (version {})",
                run.definition.name,
                crate::short_hash(&run.definition.hash)
            ),
            data: json!({"run_id": run_id, "workflow": run.definition.name, "version_hash": run.definition.hash}),
        });
        let mut state = self.lock();
        let run = state.runs.entry(run_id).or_insert(run);
        let mut effects = Vec::new();
        self.after_change(run, changes, "warden", now, &mut effects);
        let view = view_of(run);
        drop(state);
        self.execute(effects);
        Ok(view)
    }

    fn definition(
        &self,
        workflow: &str,
        version: Option<&str>,
    ) -> Result<Arc<Definition>, RunsError> {
        let current = self.workflows.current(workflow);
        match (version, current) {
            (None, Some(current)) => Ok(current),
            (None, None) => Err(RunsError::UnknownWorkflow {
                name: workflow.to_owned(),
                known: self.workflows.names().join(", "),
            }),
            (Some(hash), _) => {
                self.workflows
                    .version(workflow, hash)
                    .ok_or_else(|| RunsError::UnknownVersion {
                        workflow: workflow.to_owned(),
                        hash: hash.to_owned(),
                    })
            }
        }
    }

    /// Records, announces and dispatches what a change did. Called with
    /// the lock held; the effects that leave the engine run after it.
    fn after_change(
        &self,
        run: &mut RunState,
        changes: Changes,
        actor: &str,
        now_us: i64,
        effects: &mut Vec<Effect>,
    ) {
        self.record_changes(run, &changes, actor, effects);
        if run.status == RunStatus::Running {
            self.take_warden_steps(run, now_us, effects);
        }
    }

    /// Rows, audit entries and events for what a change touched.
    fn record_changes(
        &self,
        run: &RunState,
        changes: &Changes,
        actor: &str,
        effects: &mut Vec<Effect>,
    ) {
        for &index in &changes.steps {
            self.step_changed(run, index, actor, effects);
        }
        if changes.run_ended {
            self.run_ended(run, actor);
        }
    }

    /// Keeps `running` in step with an agent step's status.
    fn index_running(&self, run: &RunState, index: usize) {
        let step = &run.steps[index];
        let (StepKind::Agent { .. }, Some(agent)) =
            (&run.definition.steps[index].kind, &step.agent)
        else {
            return;
        };
        let now_running = step.status == StepStatus::Running && run.status == RunStatus::Running;
        let mut running = lock(&self.running);
        match running.get_mut(agent.as_str()) {
            Some(entries) => {
                entries.retain(|(run_id, i)| !(*i == index && *run_id == run.run_id));
                if now_running {
                    entries.push((run.run_id.clone(), index));
                } else if entries.is_empty() {
                    running.remove(agent.as_str());
                }
            }
            None if now_running => {
                running.insert(agent.clone(), vec![(run.run_id.clone(), index)]);
            }
            None => {}
        }
        self.running_agents.store(running.len(), Ordering::Release);
    }

    fn step_changed(&self, run: &RunState, index: usize, actor: &str, effects: &mut Vec<Effect>) {
        self.index_running(run, index);
        let step = &run.steps[index];
        let id = run.step_id(index);
        self.recorder.step_state(step_row(run, index));
        // An approval step that stopped waiting withdraws its approval (a
        // no-op when the approval is what ended it).
        if step.status != StepStatus::Running
            && matches!(run.definition.steps[index].kind, StepKind::Approval { .. })
            && let Some(approval_id) = &step.approval_id
        {
            effects.push(Effect::Withdraw {
                approval_id: approval_id.clone(),
                by: actor.to_owned(),
                reason: format!(
                    "step `{id}` of run {} is {}",
                    run.run_id,
                    step.status.as_str()
                ),
            });
        }
        let status = step.status.as_str();
        let detail = match step.status {
            StepStatus::Running => format!(" by {}", step.agent.as_deref().unwrap_or("?")),
            StepStatus::Failed | StepStatus::Skipped | StepStatus::Cancelled => {
                format!(": {}", step.error.as_deref().unwrap_or(""))
            }
            StepStatus::Ready if step.attempts > 0 => format!(
                " again (attempt {} failed: {})",
                step.attempts,
                step.error.as_deref().unwrap_or("")
            ),
            _ => String::new(),
        };
        let payload = json!({
            "run_id": run.run_id,
            "workflow": run.definition.name,
            "step_id": id,
            "status": status,
            "agent": step.agent,
            "attempts": step.attempts,
            "call_id": step.call_id,
            "error": step.error,
            "cost_usd": step.cost.to_string(),
        });
        self.recorder.audit(
            actor,
            "step_changed",
            Some(&format!("{}/{id}", run.run_id)),
            payload.clone(),
        );
        self.events.publish(|| EventParts {
            kind: "step_changed",
            actor: actor.to_owned(),
            subject: Some(run.run_id.clone()),
            message: format!("run {} step {id} {status}{detail}", run.run_id),
            data: payload,
        });
    }

    fn run_ended(&self, run: &RunState, actor: &str) {
        self.recorder.run_state(run_row(run));
        let status = run.status.as_str();
        let cost = run.cost();
        let payload = json!({
            "run_id": run.run_id,
            "workflow": run.definition.name,
            "version_hash": run.definition.hash,
            "status": status,
            "error": run.error,
            "cost_usd": cost.to_string(),
        });
        self.recorder
            .audit(actor, "run_ended", Some(&run.run_id), payload.clone());
        self.events.publish(|| EventParts {
            kind: "run_ended",
            actor: actor.to_owned(),
            subject: Some(run.run_id.clone()),
            message: format!(
                "run {} of {} {status} (${cost}){}",
                run.run_id,
                run.definition.name,
                run.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
            data: payload,
        });
    }

    /// Model and approval steps are Warden's own work: taken as soon as
    /// they are offered.
    fn take_warden_steps(&self, run: &mut RunState, now_us: i64, effects: &mut Vec<Effect>) {
        for index in 0..run.steps.len() {
            if !run.steps[index].is_offered(now_us) {
                continue;
            }
            let effect = match &run.definition.steps[index].kind {
                StepKind::Agent {
                    agent,
                    capability,
                    instructions,
                    explicit_completion,
                } => {
                    if !run.steps[index].dispatched {
                        run.steps[index].dispatched = true;
                        let targets: Vec<http::Uri> = self
                            .agents
                            .iter()
                            .filter(|(name, _)| {
                                eligible(
                                    agent.as_deref(),
                                    capability.as_deref(),
                                    name,
                                    &self.agents,
                                )
                            })
                            .filter_map(|(_, info)| info.dispatch_webhook.clone())
                            .collect();
                        if !targets.is_empty() {
                            let instructions = run.render(instructions).unwrap_or_else(|e| e);
                            let complete_on = if *explicit_completion {
                                "explicit"
                            } else {
                                "final_answer"
                            };
                            let item = work_item(run, index, instructions, complete_on);
                            for url in targets {
                                effects.push(Effect::Dispatch {
                                    url,
                                    item: Box::new(item.clone()),
                                });
                            }
                        }
                    }
                    continue;
                }
                StepKind::Model { .. } if self.model_caller.get().is_none() => continue,
                StepKind::Model { model, prompt } => {
                    let (model, prompt) = (model.clone(), prompt.clone());
                    match run.render(&prompt) {
                        Ok(prompt) => Effect::CallModel {
                            run_id: run.run_id.clone(),
                            step_id: run.step_id(index).to_owned(),
                            model,
                            prompt,
                        },
                        Err(error) => {
                            // A prompt that cannot be rendered fails the attempt.
                            if run.claim(index, WARDEN_AGENT, now_us).is_ok()
                                && let Ok(changes) = run.fail_attempt(index, error, None, now_us)
                            {
                                self.record_changes(run, &changes, "warden", effects);
                            }
                            continue;
                        }
                    }
                }
                StepKind::Approval { message } => {
                    let message = run.render(message).unwrap_or_else(|e| e);
                    Effect::OpenGate {
                        workflow: run.definition.name.clone(),
                        run_id: run.run_id.clone(),
                        step_id: run.step_id(index).to_owned(),
                        message,
                    }
                }
            };
            let agent = match effect {
                Effect::OpenGate { .. } => "operator",
                _ => WARDEN_AGENT,
            };
            if let Ok(changes) = run.claim(index, agent, now_us) {
                self.record_changes(run, &changes, "warden", effects);
                effects.push(effect);
            }
        }
    }

    fn execute(self: &Arc<Self>, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::CallModel {
                    run_id,
                    step_id,
                    model,
                    prompt,
                } => self.call_model(run_id, step_id, model, prompt),
                Effect::OpenGate {
                    workflow,
                    run_id,
                    step_id,
                    message,
                } => {
                    let approval = self.supervisor.approvals.open_gate(GateRequest {
                        workflow: &workflow,
                        run_id: &run_id,
                        step_id: &step_id,
                        message,
                    });
                    let mut state = self.lock();
                    if let Some(run) = state.runs.get_mut(&run_id)
                        && let Some(&index) = run.definition.positions.get(&step_id)
                        && run.steps[index].status == StepStatus::Running
                    {
                        run.steps[index].approval_id = Some(approval.approval_id.clone());
                        self.recorder.step_state(step_row(run, index));
                    } else {
                        drop(state);
                        self.supervisor.approvals.withdraw(
                            &approval.approval_id,
                            "warden",
                            "the step no longer waits for it",
                        );
                    }
                }
                Effect::Withdraw {
                    approval_id,
                    by,
                    reason,
                } => self
                    .supervisor
                    .approvals
                    .withdraw(&approval_id, &by, &reason),
                Effect::Dispatch { url, item } => self.dispatch(url, *item),
            }
        }
    }

    /// Posts ready work to an agent's dispatch webhook, retried with
    /// backoff; the step stays offered to polls meanwhile.
    fn dispatch(&self, url: http::Uri, item: WorkItem) {
        let client = match self.webhook_client.get() {
            Some(client) => client.clone(),
            None => match crate::http_client::tls_client() {
                Ok(client) => self.webhook_client.get_or_init(|| client).clone(),
                Err(e) => {
                    tracing::error!(error = %e, "cannot build the dispatch webhook client");
                    return;
                }
            },
        };
        let body = Bytes::from(json!({"work": [item]}).to_string());
        let Some(runtime) = runtime() else {
            return;
        };
        runtime.spawn(async move {
            let what = format!("work {}/{}", item.run_id, item.step_id);
            if !crate::alerts::post_with_retries(&client, &url, body, &what).await {
                tracing::error!(run_id = %item.run_id, step_id = %item.step_id, "gave up posting work to a dispatch webhook; the step stays offered to polls");
            }
        });
    }

    /// Sends a model step through Warden's own proxy, so that it is
    /// identified, limited, policed, metered and recorded like any call;
    /// the pipeline completes the step from the answer. Only a call that
    /// never reached the proxy fails the attempt here.
    fn call_model(
        self: &Arc<Self>,
        run_id: String,
        step_id: String,
        model: String,
        prompt: String,
    ) {
        let Some(caller) = self.model_caller.get() else {
            return;
        };
        let protocol = (caller.protocol_of)(&model).unwrap_or(ProviderKind::OpenAi);
        let (path, body) = match protocol {
            ProviderKind::OpenAi => (
                "/v1/chat/completions",
                json!({"model": model, "messages": [{"role": "user", "content": prompt}]}),
            ),
            ProviderKind::Anthropic => (
                "/v1/messages",
                json!({"model": model, "max_tokens": 4096, "messages": [{"role": "user", "content": prompt}]}),
            ),
        };
        let uri = format!("http://{}{path}", caller.proxy_addr);
        let key = self.internal_key.clone();
        let runs = Arc::downgrade(self);
        // Outside a runtime (a call dropped while Warden stops) the step
        // stays running and is sent again after the restart.
        let Some(runtime) = runtime() else {
            return;
        };
        runtime.spawn(async move {
            let result = send_model_call(&uri, &key, &run_id, &step_id, body).await;
            if let Err(error) = result
                && let Some(runs) = runs.upgrade()
            {
                runs.fail_step(
                    &run_id,
                    &step_id,
                    format!("could not send the model step: {error}"),
                );
            }
        });
    }

    fn fail_step(self: &Arc<Self>, run_id: &str, step_id: &str, error: String) {
        let now = now_micros();
        let mut state = self.lock();
        let Some(run) = state.runs.get_mut(run_id) else {
            return;
        };
        let Some(&index) = run.definition.positions.get(step_id) else {
            return;
        };
        let mut effects = Vec::new();
        if let Ok(changes) = run.fail_attempt(index, error, None, now) {
            self.after_change(run, changes, "warden", now, &mut effects);
        }
        drop(state);
        self.execute(effects);
    }
}

impl Runs {
    /// Binds a call to a run and step: the step the headers name, or the
    /// agent's only running step. A ready step the agent may take is taken
    /// by the call. `None`: the call serves no run Warden is driving.
    ///
    /// A step with a `budget_usd` holds `cost_bound()` (the call's upper
    /// bound) against it until the call ends, in the same moment.
    pub fn bind(
        self: &Arc<Self>,
        agent: &str,
        run_header: Option<&str>,
        step_header: Option<&str>,
        cost_bound: &mut dyn FnMut() -> Usd,
    ) -> Result<Option<Binding>, RunsError> {
        // Most calls serve no workflow: one look at the index, no engine
        // lock (and none at all while no agent step runs).
        if run_header.is_none()
            && (self.running_agents.load(Ordering::Acquire) == 0
                || !lock(&self.running).contains_key(agent))
        {
            return Ok(None);
        }
        let now = now_micros();
        let mut state = self.lock();
        let (run_id, index) = match (run_header, step_header) {
            (Some(run_id), step) => {
                let Some(run) = state.runs.get(run_id) else {
                    return Ok(None);
                };
                let index = match step {
                    Some(step) => Some(*run.definition.positions.get(step).ok_or_else(|| {
                        RunsError::UnknownStep {
                            run: run_id.to_owned(),
                            step: step.to_owned(),
                        }
                    })?),
                    None => sole_running_step(run, agent).map(|(_, index)| index),
                };
                (run_id.to_owned(), index)
            }
            (None, step) => {
                // Without a run header: the agent's running steps (of that
                // id, if named) must be exactly one.
                let Some(running) = lock(&self.running).get(agent).cloned() else {
                    return Ok(None);
                };
                let mut found = running.into_iter().filter(|(run_id, index)| {
                    step.is_none_or(|step| {
                        state
                            .runs
                            .get(run_id)
                            .is_some_and(|r| r.step_id(*index) == step)
                    })
                });
                match (found.next(), found.next()) {
                    (Some((run_id, index)), None) => (run_id, Some(index)),
                    _ => return Ok(None),
                }
            }
        };
        let Some(run) = state.runs.get_mut(&run_id) else {
            return Ok(None);
        };
        let workflow = run.definition.clone();
        let Some(index) = index else {
            return Ok(Some(Binding {
                run_id,
                workflow,
                step: None,
            }));
        };
        let spec = &workflow.steps[index];
        let step = &run.steps[index];
        let id = run.step_id(index).to_owned();
        if step.status.is_terminal() || run.status != RunStatus::Running {
            // Late calls of a finished step still count for the run.
            return Ok(Some(Binding {
                run_id,
                workflow,
                step: None,
            }));
        }
        let may_take = match &spec.kind {
            StepKind::Agent {
                agent: named,
                capability,
                ..
            } => eligible(named.as_deref(), capability.as_deref(), agent, &self.agents),
            StepKind::Model { .. } => agent == WARDEN_AGENT,
            StepKind::Approval { .. } => false,
        };
        let mut effects = Vec::new();
        match step.status {
            StepStatus::Running if step.agent.as_deref() == Some(agent) => {}
            StepStatus::Ready if may_take && step.is_offered(now) => {
                if let Ok(changes) = run.claim(index, agent, now) {
                    self.after_change(run, changes, agent, now, &mut effects);
                }
            }
            StepStatus::Ready if may_take => {
                let at = step.retry_at_us.unwrap_or(now);
                return Err(RunsError::RetryLater {
                    run: run_id,
                    step: id,
                    in_secs: ((at - now) as f64 / 1e6).ceil() as i64,
                });
            }
            _ => {
                return Err(RunsError::NotYourStep {
                    run: run_id,
                    step: id,
                    owner: step.agent.clone().unwrap_or_else(|| owner_of(&spec.kind)),
                    agent: agent.to_owned(),
                });
            }
        }
        let (ends_on_answer, any_answer) = match &spec.kind {
            StepKind::Agent {
                explicit_completion,
                ..
            } => (!explicit_completion, false),
            StepKind::Model { .. } => (true, true),
            StepKind::Approval { .. } => (false, false),
        };
        let (mut reserved, mut over_budget) = (Usd::ZERO, None);
        if let Some(budget) = spec.budget_usd {
            let cost = cost_bound();
            let step = &mut run.steps[index];
            if step.cost + step.reserved + cost > budget {
                over_budget = Some(format!(
                    "step `{id}` of run {run_id} has a budget of ${budget} (budget_usd); it has spent ${} and holds ${} for calls in flight, and this call may cost up to ${cost}",
                    step.cost, step.reserved
                ));
            } else {
                step.reserved += cost;
                reserved = cost;
            }
        }
        drop(state);
        self.execute(effects);
        Ok(Some(Binding {
            run_id,
            workflow,
            step: Some(BoundStep {
                index,
                id,
                ends_on_answer,
                any_answer,
                reserved,
                over_budget,
            }),
        }))
    }

    /// A bound call ended: its cost counts for the step; its final answer
    /// completes the step; a refusal or failure fails the attempt.
    pub fn call_ended(self: &Arc<Self>, binding: &Binding, ended: CallEnded) {
        let Some(bound) = &binding.step else {
            return;
        };
        let now = now_micros();
        let mut state = self.lock();
        let Some(run) = state.runs.get_mut(&binding.run_id) else {
            return;
        };
        let step = &mut run.steps[bound.index];
        step.reserved = if step.reserved > bound.reserved {
            step.reserved - bound.reserved
        } else {
            Usd::ZERO
        };
        run.add_usage(
            bound.index,
            ended.cost,
            ended.input_tokens,
            ended.output_tokens,
        );
        let agent = run.steps[bound.index]
            .agent
            .clone()
            .unwrap_or_else(|| WARDEN_AGENT.to_owned());
        let changes = if ended.ok {
            match ended.answer {
                Some(answer) if bound.ends_on_answer && (answer.is_final || bound.any_answer) => {
                    run.complete(bound.index, answer.text, Some(&ended.call_id), now)
                }
                _ => return,
            }
        } else {
            let error = match ended.error {
                Some(error) => format!("call answered {}: {error}", ended.status),
                None => format!("call answered {}", ended.status),
            };
            run.fail_attempt(bound.index, error, Some(&ended.call_id), now)
        };
        let mut effects = Vec::new();
        if let Ok(changes) = changes {
            self.after_change(run, changes, &agent, now, &mut effects);
            self.retire_if_ended(&mut state, &binding.run_id);
        }
        drop(state);
        self.execute(effects);
    }

    /// The agent's ready and running work: ready steps it may take are
    /// taken by this poll.
    pub fn work_for(self: &Arc<Self>, agent: &str) -> Vec<WorkItem> {
        let now = now_micros();
        let mut state = self.lock();
        let mut effects = Vec::new();
        let mut items = Vec::new();
        for run in state.runs.values_mut() {
            if run.status != RunStatus::Running {
                continue;
            }
            for index in 0..run.steps.len() {
                let StepKind::Agent {
                    agent: named,
                    capability,
                    instructions,
                    explicit_completion,
                } = &run.definition.steps[index].kind
                else {
                    continue;
                };
                let step = &run.steps[index];
                let mine = match step.status {
                    StepStatus::Running => step.agent.as_deref() == Some(agent),
                    StepStatus::Ready => {
                        step.is_offered(now)
                            && eligible(
                                named.as_deref(),
                                capability.as_deref(),
                                agent,
                                &self.agents,
                            )
                    }
                    _ => false,
                };
                if !mine {
                    continue;
                }
                let (instructions, complete_on) = (
                    instructions.clone(),
                    if *explicit_completion {
                        "explicit"
                    } else {
                        "final_answer"
                    },
                );
                if run.steps[index].status == StepStatus::Ready {
                    match run.claim(index, agent, now) {
                        Ok(changes) => self.after_change(run, changes, agent, now, &mut effects),
                        Err(_) => continue,
                    }
                }
                let instructions = run.render(&instructions).unwrap_or_else(|e| e);
                items.push(work_item(run, index, instructions, complete_on));
            }
        }
        drop(state);
        self.execute(effects);
        items.sort_by(|a, b| (&a.run_id, &a.step_id).cmp(&(&b.run_id, &b.step_id)));
        items
    }

    /// `POST /v1/warden/work/{step}/complete`: the agent says its step is
    /// done, with its output.
    pub fn complete_explicit(
        self: &Arc<Self>,
        agent: &str,
        run_id: Option<&str>,
        step_id: &str,
        output: String,
    ) -> Result<RunView, RunsError> {
        let now = now_micros();
        let mut state = self.lock();
        let run_id = match run_id {
            Some(run_id) => run_id.to_owned(),
            None => {
                let mut found = state.runs.values().filter(|r| {
                    r.definition.positions.get(step_id).is_some_and(|&i| {
                        r.steps[i].status == StepStatus::Running
                            && r.steps[i].agent.as_deref() == Some(agent)
                    })
                });
                match (found.next(), found.next()) {
                    (Some(run), None) => run.run_id.clone(),
                    _ => {
                        return Err(RunsError::NoSuchWork {
                            agent: agent.to_owned(),
                            step: step_id.to_owned(),
                        });
                    }
                }
            }
        };
        let run = state
            .runs
            .get_mut(&run_id)
            .ok_or_else(|| RunsError::UnknownRun(run_id.clone()))?;
        let index =
            *run.definition
                .positions
                .get(step_id)
                .ok_or_else(|| RunsError::UnknownStep {
                    run: run_id.clone(),
                    step: step_id.to_owned(),
                })?;
        let step = &run.steps[index];
        if step.status == StepStatus::Running && step.agent.as_deref() != Some(agent) {
            return Err(RunsError::NotYourStep {
                run: run_id,
                step: step_id.to_owned(),
                owner: step.agent.clone().unwrap_or_default(),
                agent: agent.to_owned(),
            });
        }
        let changes = run.complete(index, output, None, now)?;
        let mut effects = Vec::new();
        self.after_change(run, changes, agent, now, &mut effects);
        let view = view_of(run);
        self.retire_if_ended(&mut state, &run_id);
        drop(state);
        self.execute(effects);
        Ok(view)
    }

    /// `warden runs cancel`: every unfinished step is cancelled and a
    /// pending approval step withdrawn. The caller halts the run's calls.
    pub fn cancel(
        self: &Arc<Self>,
        run_id: &str,
        by: &str,
        reason: &str,
    ) -> Result<RunView, RunsError> {
        let now = now_micros();
        let mut state = self.lock();
        let run = state
            .runs
            .get_mut(run_id)
            .ok_or_else(|| RunsError::UnknownRun(run_id.to_owned()))?;
        let changes = run.cancel(by, reason, now)?;
        let mut effects = Vec::new();
        self.after_change(run, changes, by, now, &mut effects);
        let view = view_of(run);
        self.retire_if_ended(&mut state, run_id);
        drop(state);
        self.execute(effects);
        Ok(view)
    }

    /// Whether Warden is driving this run (it is in flight).
    pub fn is_running(&self, run_id: &str) -> bool {
        self.lock()
            .runs
            .get(run_id)
            .is_some_and(|r| r.status == RunStatus::Running)
    }

    pub fn view(&self, run_id: &str) -> Option<RunView> {
        self.lock().runs.get(run_id).map(view_of)
    }

    /// Ended runs stay in memory a while for `runs show`; the oldest go.
    fn retire_if_ended(&self, state: &mut EngineState, run_id: &str) {
        if state
            .runs
            .get(run_id)
            .is_some_and(|r| r.status != RunStatus::Running)
        {
            state.ended.push_back(run_id.to_owned());
            while state.ended.len() > ENDED_KEPT {
                if let Some(old) = state.ended.pop_front() {
                    state.runs.remove(&old);
                }
            }
        }
    }

    /// Timeouts, retry backoffs, approval decisions and model steps that
    /// were waiting for the proxy: looked at every tick, and at once when
    /// a decision comes in.
    pub fn drive(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let runs = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = runs.wake.notified() => {}
                    () = tokio::time::sleep(TICK) => {}
                }
                runs.tick();
            }
        })
    }

    pub fn tick(self: &Arc<Self>) {
        let now = now_micros();
        let closed = std::mem::take(&mut *lock(&self.closed_approvals));
        let mut state = self.lock();
        let mut effects = Vec::new();
        let mut ended = Vec::new();
        for approval in closed {
            let (Some(run_id), Some(step_id)) = (&approval.run_id, &approval.step_id) else {
                continue;
            };
            let Some(run) = state.runs.get_mut(run_id) else {
                continue;
            };
            let Some(&index) = run.definition.positions.get(step_id) else {
                continue;
            };
            if run.steps[index].approval_id.as_deref() != Some(approval.approval_id.as_str()) {
                continue;
            }
            let by = approval
                .decided_by
                .clone()
                .unwrap_or_else(|| "warden".into());
            let reason = approval.decision_reason.clone().unwrap_or_default();
            // The step was the operator's to do: it is recorded as theirs.
            run.steps[index].agent = Some(by.clone());
            let changes = match approval.status {
                ApprovalStatus::Approved => run.complete(
                    index,
                    json!({"approved": true, "by": by, "reason": reason}).to_string(),
                    None,
                    now,
                ),
                ApprovalStatus::Pending => continue,
                status => run.fail_attempt(
                    index,
                    format!(
                        "approval {} {} by {by}{}",
                        approval.approval_id,
                        status.as_str(),
                        if reason.is_empty() {
                            String::new()
                        } else {
                            format!(": {reason}")
                        }
                    ),
                    None,
                    now,
                ),
            };
            if let Ok(changes) = changes {
                self.after_change(run, changes, &by, now, &mut effects);
                ended.push(run_id.clone());
            }
        }
        for run in state.runs.values_mut() {
            if run.status != RunStatus::Running {
                continue;
            }
            let changes = run.expire(now);
            if !changes.is_empty() {
                ended.push(run.run_id.clone());
            }
            self.after_change(run, changes, "warden", now, &mut effects);
        }
        for run_id in ended {
            self.retire_if_ended(&mut state, &run_id);
        }
        drop(state);
        self.execute(effects);
    }
}

/// The agent's only running step of a run.
fn sole_running_step<'a>(run: &'a RunState, agent: &str) -> Option<(&'a str, usize)> {
    let mut running = run
        .steps
        .iter()
        .enumerate()
        .filter(|(_, s)| s.status == StepStatus::Running && s.agent.as_deref() == Some(agent));
    match (running.next(), running.next()) {
        (Some((index, _)), None) => Some((run.run_id.as_str(), index)),
        _ => None,
    }
}

fn eligible(
    named: Option<&str>,
    capability: Option<&str>,
    agent: &str,
    agents: &HashMap<String, AgentInfo>,
) -> bool {
    match (named, capability) {
        (Some(named), _) => named == agent,
        (None, Some(capability)) => agents
            .get(agent)
            .is_some_and(|info| info.capabilities.iter().any(|c| c == capability)),
        (None, None) => false,
    }
}

fn owner_of(kind: &StepKind) -> String {
    match kind {
        StepKind::Agent {
            agent: Some(agent), ..
        } => agent.clone(),
        StepKind::Agent {
            capability: Some(capability),
            ..
        } => format!("an agent with capability {capability}"),
        StepKind::Agent { .. } => "an agent".into(),
        StepKind::Model { .. } => WARDEN_AGENT.into(),
        StepKind::Approval { .. } => "the operators (an approval step)".into(),
    }
}

fn work_item(
    run: &RunState,
    index: usize,
    instructions: String,
    complete_on: &'static str,
) -> WorkItem {
    let step_id = run.step_id(index).to_owned();
    // The outputs of every step upstream of this one.
    let mut upstream = vec![false; run.steps.len()];
    let mut stack: Vec<usize> = run.definition.need_positions[index].clone();
    while let Some(need) = stack.pop() {
        if !upstream[need] {
            upstream[need] = true;
            stack.extend(&run.definition.need_positions[need]);
        }
    }
    let outputs = upstream
        .iter()
        .enumerate()
        .filter(|(i, up)| **up && run.steps[*i].status == StepStatus::Succeeded)
        .map(|(i, _)| {
            (
                run.step_id(i).to_owned(),
                run.steps[i].output_for_templates(),
            )
        })
        .collect();
    let mut headers = Map::new();
    headers.insert("x-warden-run".into(), Value::from(run.run_id.clone()));
    headers.insert("x-warden-step".into(), Value::from(step_id.clone()));
    WorkItem {
        run_id: run.run_id.clone(),
        step_id,
        workflow: run.definition.name.clone(),
        instructions,
        inputs: run.inputs.clone(),
        outputs,
        headers,
        attempt: run.steps[index].attempts,
        complete_on,
        deadline_us: run.steps[index].deadline_us,
    }
}

fn kind_name(kind: &StepKind) -> &'static str {
    match kind {
        StepKind::Agent { .. } => "agent",
        StepKind::Model { .. } => "model",
        StepKind::Approval { .. } => "approval",
    }
}

pub fn view_of(run: &RunState) -> RunView {
    RunView {
        run_id: run.run_id.clone(),
        workflow: run.definition.name.clone(),
        version_hash: run.definition.hash.clone(),
        status: run.status,
        triggered_by: run.triggered_by.clone(),
        inputs: run.inputs.clone(),
        started_at_us: run.started_at_us,
        ended_at_us: run.ended_at_us,
        error: run.error.clone(),
        cost_usd: run.cost().to_string(),
        steps: run
            .steps
            .iter()
            .enumerate()
            .map(|(index, step)| {
                let spec = &run.definition.steps[index];
                StepView {
                    step_id: spec.id.clone(),
                    kind: kind_name(&spec.kind),
                    needs: spec.needs.clone(),
                    state: step.clone(),
                }
            })
            .collect(),
    }
}

fn run_row(run: &RunState) -> RunRow {
    RunRow {
        run_id: run.run_id.clone(),
        workflow: run.definition.name.clone(),
        version_hash: run.definition.hash.clone(),
        status: run.status.as_str(),
        triggered_by: run.triggered_by.clone(),
        inputs: Value::Object(run.inputs.clone()).to_string(),
        started_at_us: run.started_at_us,
        ended_at_us: run.ended_at_us,
        error: run.error.clone(),
        cost: run.cost(),
    }
}

fn step_row(run: &RunState, index: usize) -> StepRow {
    StepRow {
        run_id: run.run_id.clone(),
        step_id: run.step_id(index).to_owned(),
        state: run.steps[index].clone(),
    }
}

async fn send_model_call(
    uri: &str,
    key: &str,
    run_id: &str,
    step_id: &str,
    body: Value,
) -> Result<(), String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::AUTHORIZATION, format!("Bearer {key}"))
        .header("x-api-key", key)
        .header("x-warden-run", run_id)
        .header("x-warden-step", step_id)
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    // The proxy has metered, recorded and bound the call by now; the
    // answer itself reached the step through the pipeline.
    let _ = response.into_body().collect().await;
    Ok(())
}

/// The runtime this thread runs on, if any: effects can be set off from a
/// call dropped during shutdown.
fn runtime() -> Option<tokio::runtime::Handle> {
    let handle = tokio::runtime::Handle::try_current();
    if handle.is_err() {
        tracing::warn!("no runtime to send workflow work from; it is picked up after a restart");
    }
    handle.ok()
}
