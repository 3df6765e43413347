//! One run of a workflow: the state of its steps and the rules that move
//! them. No IO here: every change reports what it touched, and the engine
//! records, announces and dispatches from that.

use std::sync::{Arc, LazyLock};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::definition::{Definition, InputType};
use crate::money::Usd;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<RunStatus> {
        [
            RunStatus::Running,
            RunStatus::Succeeded,
            RunStatus::Failed,
            RunStatus::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    Ready,
    Running,
    Succeeded,
    Failed,
    Skipped,
    Cancelled,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Ready => "ready",
            StepStatus::Running => "running",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
            StepStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<StepStatus> {
        [
            StepStatus::Pending,
            StepStatus::Ready,
            StepStatus::Running,
            StepStatus::Succeeded,
            StepStatus::Failed,
            StepStatus::Skipped,
            StepStatus::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StepStatus::Succeeded
                | StepStatus::Failed
                | StepStatus::Skipped
                | StepStatus::Cancelled
        )
    }
}

/// A step's state; serialised as operators see it (`runs show`), the
/// engine's bookkeeping left out.
#[derive(Debug, Clone, Serialize)]
pub struct StepState {
    pub status: StepStatus,
    pub agent: Option<String>,
    pub attempts: u32,
    pub started_at_us: Option<i64>,
    pub ended_at_us: Option<i64>,
    /// The answer's text.
    pub output: Option<String>,
    /// The answer parsed, when it is JSON.
    #[serde(skip)]
    pub output_value: Option<Value>,
    pub error: Option<String>,
    /// The call that ended (or failed) the step.
    pub call_id: Option<String>,
    pub calls: u32,
    #[serde(rename = "cost_usd")]
    pub cost: Usd,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// A retried step is not offered before this time.
    pub retry_at_us: Option<i64>,
    /// A running step fails its attempt at this time (`timeout_secs`).
    #[serde(skip)]
    pub deadline_us: Option<i64>,
    /// The approval an approval step waits on.
    pub approval_id: Option<String>,
    /// Cost held by the step's calls in flight, for `budget_usd`.
    #[serde(skip)]
    pub reserved: Usd,
    /// This offer of the step was posted to its agents' dispatch webhooks.
    #[serde(skip)]
    pub dispatched: bool,
}

impl StepState {
    pub fn pending() -> StepState {
        StepState {
            status: StepStatus::Pending,
            agent: None,
            attempts: 0,
            started_at_us: None,
            ended_at_us: None,
            output: None,
            output_value: None,
            error: None,
            call_id: None,
            calls: 0,
            cost: Usd::ZERO,
            input_tokens: 0,
            output_tokens: 0,
            retry_at_us: None,
            deadline_us: None,
            approval_id: None,
            reserved: Usd::ZERO,
            dispatched: false,
        }
    }

    /// Offered to agents now: ready, and any retry backoff has passed.
    pub fn is_offered(&self, now_us: i64) -> bool {
        self.status == StepStatus::Ready && self.retry_at_us.is_none_or(|at| at <= now_us)
    }

    /// The output as templates and conditions see it: the parsed JSON value
    /// when there is one, else the text.
    pub fn output_for_templates(&self) -> Value {
        match (&self.output_value, &self.output) {
            (Some(value), _) => value.clone(),
            (None, Some(text)) => Value::String(text.clone()),
            (None, None) => Value::Null,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunState {
    pub run_id: String,
    pub definition: Arc<Definition>,
    pub inputs: Map<String, Value>,
    pub triggered_by: String,
    pub started_at_us: i64,
    pub ended_at_us: Option<i64>,
    pub status: RunStatus,
    pub error: Option<String>,
    pub steps: Vec<StepState>,
}

/// What one change touched.
#[derive(Debug, Default)]
pub struct Changes {
    /// Steps whose state changed, in the order they changed.
    pub steps: Vec<usize>,
    pub run_ended: bool,
}

impl Changes {
    fn touch(&mut self, step: usize) {
        if !self.steps.contains(&step) {
            self.steps.push(step);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty() && !self.run_ended
    }
}

/// Why a step's change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    #[error("run `{run}` has ended ({status})")]
    RunEnded { run: String, status: &'static str },
    #[error("step `{step}` of run `{run}` is {status}, not {expected}")]
    WrongStatus {
        run: String,
        step: String,
        status: &'static str,
        expected: &'static str,
    },
}

static TEMPLATES: LazyLock<minijinja::Environment<'static>> = LazyLock::new(|| {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
    env
});

impl RunState {
    /// A new run: the steps with no needs become ready at once.
    pub fn start(
        run_id: String,
        definition: Arc<Definition>,
        inputs: Map<String, Value>,
        triggered_by: String,
        now_us: i64,
    ) -> (RunState, Changes) {
        let steps = definition
            .steps
            .iter()
            .map(|_| StepState::pending())
            .collect();
        let mut run = RunState {
            run_id,
            definition,
            inputs,
            triggered_by,
            started_at_us: now_us,
            ended_at_us: None,
            status: RunStatus::Running,
            error: None,
            steps,
        };
        let mut changes = Changes::default();
        run.advance(now_us, &mut changes);
        (run, changes)
    }

    pub fn step_id(&self, index: usize) -> &str {
        &self.definition.steps[index].id
    }

    pub fn cost(&self) -> Usd {
        self.steps.iter().fold(Usd::ZERO, |sum, s| sum + s.cost)
    }

    fn check_running(&self) -> Result<(), StepError> {
        if self.status == RunStatus::Running {
            Ok(())
        } else {
            Err(StepError::RunEnded {
                run: self.run_id.clone(),
                status: self.status.as_str(),
            })
        }
    }

    fn check_step(&self, index: usize, expected: StepStatus) -> Result<(), StepError> {
        self.check_running()?;
        let status = self.steps[index].status;
        if status == expected {
            Ok(())
        } else {
            Err(StepError::WrongStatus {
                run: self.run_id.clone(),
                step: self.step_id(index).to_owned(),
                status: status.as_str(),
                expected: expected.as_str(),
            })
        }
    }

    /// Moves every pending step whose needs have ended: ready, or skipped
    /// (a need was skipped, or its `when` is false). Ends the run when every
    /// step has ended. Steps are in topological order, so one pass carries
    /// a skip down a whole lane.
    fn advance(&mut self, now_us: i64, changes: &mut Changes) {
        if self.status != RunStatus::Running {
            return;
        }
        for index in 0..self.steps.len() {
            if self.steps[index].status != StepStatus::Pending {
                continue;
            }
            let needs = &self.definition.need_positions[index];
            if needs.iter().any(|&n| !self.steps[n].status.is_terminal()) {
                continue;
            }
            let skipped_need = needs
                .iter()
                .find(|&&n| self.steps[n].status != StepStatus::Succeeded)
                .map(|&n| self.step_id(n).to_owned());
            if let Some(need) = skipped_need {
                self.end_step(
                    index,
                    StepStatus::Skipped,
                    Some(format!("skipped because `{need}` did not succeed")),
                    now_us,
                    changes,
                );
                continue;
            }
            match self.condition_holds(index) {
                Ok(true) => {
                    self.steps[index].status = StepStatus::Ready;
                    changes.touch(index);
                }
                Ok(false) => {
                    let when = self.definition.steps[index]
                        .when
                        .clone()
                        .unwrap_or_default();
                    self.end_step(
                        index,
                        StepStatus::Skipped,
                        Some(format!("`when` is false: {when}")),
                        now_us,
                        changes,
                    );
                }
                Err(error) => {
                    self.steps[index].error = Some(error.clone());
                    self.end_step(index, StepStatus::Failed, Some(error), now_us, changes);
                    self.fail_run(index, None, now_us, changes);
                    return;
                }
            }
        }
        if self.steps.iter().all(|s| s.status.is_terminal()) {
            self.status = if self.steps.iter().any(|s| s.status == StepStatus::Failed) {
                RunStatus::Failed
            } else {
                RunStatus::Succeeded
            };
            self.ended_at_us = Some(now_us);
            changes.run_ended = true;
        }
    }

    fn end_step(
        &mut self,
        index: usize,
        status: StepStatus,
        error: Option<String>,
        now_us: i64,
        changes: &mut Changes,
    ) {
        let step = &mut self.steps[index];
        step.status = status;
        step.ended_at_us = Some(now_us);
        step.deadline_us = None;
        step.retry_at_us = None;
        if error.is_some() {
            step.error = error;
        }
        changes.touch(index);
    }

    /// The values templates and conditions see: `inputs`, and for each step
    /// that has ended `steps.<id>.output` (the parsed JSON answer, or its
    /// text), `.text` and `.status`.
    pub fn template_context(&self) -> Value {
        let mut steps = Map::new();
        for (index, step) in self.steps.iter().enumerate() {
            if step.status == StepStatus::Pending {
                continue;
            }
            steps.insert(
                self.step_id(index).to_owned(),
                serde_json::json!({
                    "output": step.output_for_templates(),
                    "text": step.output.as_deref().unwrap_or(""),
                    "status": step.status.as_str(),
                }),
            );
        }
        serde_json::json!({"inputs": self.inputs, "steps": steps})
    }

    fn condition_holds(&self, index: usize) -> Result<bool, String> {
        let Some(when) = &self.definition.steps[index].when else {
            return Ok(true);
        };
        let id = self.step_id(index);
        let expression = TEMPLATES
            .compile_expression(when)
            .map_err(|e| format!("step `{id}`: cannot read its `when` ({when}): {e}"))?;
        let value = expression
            .eval(self.template_context())
            .map_err(|e| format!("step `{id}`: its `when` ({when}) failed: {e}"))?;
        Ok(value.is_true())
    }

    /// A template of this run (instructions, a prompt, a message) rendered
    /// over its inputs and the outputs so far.
    pub fn render(&self, template: &str) -> Result<String, String> {
        TEMPLATES
            .render_str(template, self.template_context())
            .map_err(|e| format!("cannot render `{template}`: {e}"))
    }

    /// An agent (or Warden, or the approval queue) takes a ready step.
    pub fn claim(&mut self, index: usize, agent: &str, now_us: i64) -> Result<Changes, StepError> {
        self.check_step(index, StepStatus::Ready)?;
        let timeout = self.definition.steps[index].timeout_secs;
        let step = &mut self.steps[index];
        step.status = StepStatus::Running;
        step.agent = Some(agent.to_owned());
        step.attempts += 1;
        step.started_at_us = Some(now_us);
        step.ended_at_us = None;
        step.retry_at_us = None;
        step.deadline_us = timeout.map(|secs| now_us + secs as i64 * 1_000_000);
        let mut changes = Changes::default();
        changes.touch(index);
        Ok(changes)
    }

    /// The call (or decision) that ends a running step: its output is kept
    /// and the run advances.
    pub fn complete(
        &mut self,
        index: usize,
        output: String,
        call_id: Option<&str>,
        now_us: i64,
    ) -> Result<Changes, StepError> {
        self.check_step(index, StepStatus::Running)?;
        let step = &mut self.steps[index];
        let trimmed = output.trim_start();
        step.output_value = if trimmed.starts_with(['{', '[']) {
            serde_json::from_str(trimmed).ok()
        } else {
            None
        };
        step.output = Some(output);
        step.error = None;
        if let Some(call_id) = call_id {
            step.call_id = Some(call_id.to_owned());
        }
        let mut changes = Changes::default();
        self.end_step(index, StepStatus::Succeeded, None, now_us, &mut changes);
        self.advance(now_us, &mut changes);
        Ok(changes)
    }

    /// An attempt failed (a refused or failed call, a timeout, a rejected
    /// approval): the step is retried after its backoff while it has retries
    /// left; otherwise it fails and takes its run with it.
    pub fn fail_attempt(
        &mut self,
        index: usize,
        error: String,
        call_id: Option<&str>,
        now_us: i64,
    ) -> Result<Changes, StepError> {
        self.check_step(index, StepStatus::Running)?;
        let spec = &self.definition.steps[index];
        let (retries, backoff_secs) = (spec.retries, spec.retry_backoff_secs);
        let step = &mut self.steps[index];
        step.error = Some(error);
        step.call_id = call_id.map(str::to_owned).or(step.call_id.take());
        let mut changes = Changes::default();
        if step.attempts <= retries {
            // Exponential backoff: base, 2 × base, 4 × base …
            let factor = 1i64 << (step.attempts.saturating_sub(1)).min(16);
            step.status = StepStatus::Ready;
            step.dispatched = false;
            step.deadline_us = None;
            step.retry_at_us = Some(now_us + backoff_secs as i64 * factor * 1_000_000);
            changes.touch(index);
            return Ok(changes);
        }
        self.end_step(index, StepStatus::Failed, None, now_us, &mut changes);
        self.fail_run(index, call_id, now_us, &mut changes);
        Ok(changes)
    }

    /// A failed step fails its run: the steps that depend on it are skipped,
    /// every other unfinished step is cancelled.
    fn fail_run(
        &mut self,
        failed: usize,
        call_id: Option<&str>,
        now_us: i64,
        changes: &mut Changes,
    ) {
        let failed_id = self.step_id(failed).to_owned();
        let error = self.steps[failed].error.clone().unwrap_or_default();
        self.error = Some(match call_id {
            Some(call) => format!("step `{failed_id}` failed: {error} (call {call})"),
            None => format!("step `{failed_id}` failed: {error}"),
        });
        let mut downstream = vec![false; self.steps.len()];
        downstream[failed] = true;
        for index in failed + 1..self.steps.len() {
            downstream[index] = self.definition.need_positions[index]
                .iter()
                .any(|&n| downstream[n]);
        }
        for (index, is_downstream) in downstream.into_iter().enumerate() {
            if self.steps[index].status.is_terminal() {
                continue;
            }
            let (status, why) = if is_downstream {
                (
                    StepStatus::Skipped,
                    format!("skipped: `{failed_id}` failed"),
                )
            } else {
                (
                    StepStatus::Cancelled,
                    format!("cancelled: the run failed at `{failed_id}`"),
                )
            };
            self.end_step(index, status, Some(why), now_us, changes);
        }
        self.status = RunStatus::Failed;
        self.ended_at_us = Some(now_us);
        changes.run_ended = true;
    }

    /// An operator cancels the run: every unfinished step is cancelled.
    pub fn cancel(&mut self, by: &str, reason: &str, now_us: i64) -> Result<Changes, StepError> {
        self.check_running()?;
        let mut changes = Changes::default();
        let why = format!("cancelled by {by}: {reason}");
        for index in 0..self.steps.len() {
            if !self.steps[index].status.is_terminal() {
                self.end_step(
                    index,
                    StepStatus::Cancelled,
                    Some(why.clone()),
                    now_us,
                    &mut changes,
                );
            }
        }
        self.status = RunStatus::Cancelled;
        self.error = Some(why);
        self.ended_at_us = Some(now_us);
        changes.run_ended = true;
        Ok(changes)
    }

    /// Running steps past their `timeout_secs` fail their attempt.
    pub fn expire(&mut self, now_us: i64) -> Changes {
        let mut changes = Changes::default();
        for index in 0..self.steps.len() {
            let step = &self.steps[index];
            if step.status == StepStatus::Running && step.deadline_us.is_some_and(|d| d <= now_us) {
                let secs = self.definition.steps[index].timeout_secs.unwrap_or(0);
                if let Ok(more) = self.fail_attempt(
                    index,
                    format!("timed out after {secs} s (timeout_secs)"),
                    None,
                    now_us,
                ) {
                    for step in more.steps {
                        changes.touch(step);
                    }
                    changes.run_ended |= more.run_ended;
                }
            }
        }
        changes
    }

    /// The cost and tokens of a call on a step.
    pub fn add_usage(&mut self, index: usize, cost: Option<Usd>, input: u64, output: u64) {
        let step = &mut self.steps[index];
        step.calls += 1;
        step.cost += cost.unwrap_or(Usd::ZERO);
        step.input_tokens += input;
        step.output_tokens += output;
    }
}

/// Inputs given to a trigger, checked against the workflow's declared ones:
/// unknown names and wrong types are refused, required ones must be given,
/// defaults fill the rest. Text values (from the command line) are read as
/// the declared type.
pub fn check_inputs(
    definition: &Definition,
    given: Map<String, Value>,
) -> Result<Map<String, Value>, String> {
    let mut inputs = Map::new();
    for (name, value) in given {
        let Some(input) = definition.inputs.get(&name) else {
            let known: Vec<&str> = definition.inputs.keys().map(String::as_str).collect();
            return Err(format!(
                "workflow `{}` has no input `{name}`; its inputs are: {}",
                definition.name,
                if known.is_empty() {
                    "(none)".to_owned()
                } else {
                    known.join(", ")
                }
            ));
        };
        let typed = match (input.kind, value) {
            (InputType::String, Value::String(text)) => Value::String(text),
            (InputType::Number, Value::Number(n)) => Value::Number(n),
            (InputType::Number, Value::String(text)) => number_from_text(&text)
                .ok_or_else(|| format!("input `{name}` is a number; `{text}` is not"))?,
            (InputType::Boolean, Value::Bool(b)) => Value::Bool(b),
            (InputType::Boolean, Value::String(text)) => match text.as_str() {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                _ => {
                    return Err(format!(
                        "input `{name}` is a boolean; write true or false, not `{text}`"
                    ));
                }
            },
            (kind, other) => {
                return Err(format!(
                    "input `{name}` is a {}; `{other}` is not",
                    kind.as_str()
                ));
            }
        };
        inputs.insert(name, typed);
    }
    for (name, input) in &definition.inputs {
        if inputs.contains_key(name) {
            continue;
        }
        match &input.default {
            Some(default) => {
                let value = serde_json::to_value(default)
                    .map_err(|e| format!("input `{name}`: default unusable: {e}"))?;
                inputs.insert(name.clone(), value);
            }
            None if input.required => {
                return Err(format!(
                    "input `{name}` is required; give it with --input {name}=…"
                ));
            }
            None => {}
        }
    }
    Ok(inputs)
}

fn number_from_text(text: &str) -> Option<Value> {
    if let Ok(whole) = text.trim().parse::<i64>() {
        return Some(Value::from(whole));
    }
    let float = text.trim().parse::<f64>().ok()?;
    serde_json::Number::from_f64(float).map(Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::definition::WorkflowAgents;

    const DIAMOND: &str = r#"
name = "diamond"
[inputs]
topic = { type = "string", required = true }
words = { type = "number", default = 300 }

[[steps]]
id = "research"
agent = "researcher"
instructions = "Research {{ inputs.topic }}"

[[steps]]
id = "draft"
agent = "writer"
needs = ["research"]
instructions = "Write {{ inputs.words }} words from {{ steps.research.output }}"

[[steps]]
id = "fact_check"
agent = "researcher"
needs = ["research"]
retries = 1
retry_backoff_secs = 2
timeout_secs = 60

[[steps]]
id = "approve"
kind = "approval"
needs = ["draft", "fact_check"]
message = "Publish {{ inputs.topic }}?"

[[steps]]
id = "publish"
kind = "model"
model = "gpt-4o-mini"
needs = ["approve"]
when = "steps.fact_check.output != 'reject'"
prompt = "Polish {{ steps.draft.output }}"
"#;

    fn diamond() -> Arc<Definition> {
        Arc::new(
            Definition::parse(
                DIAMOND,
                std::path::Path::new("d.toml"),
                &WorkflowAgents::default(),
            )
            .unwrap(),
        )
    }

    fn start() -> RunState {
        let definition = diamond();
        let inputs = check_inputs(
            &definition,
            Map::from_iter([("topic".to_owned(), Value::from("tides"))]),
        )
        .unwrap();
        let (run, changes) = RunState::start("r1".into(), definition, inputs, "op".into(), 0);
        assert_eq!(now_ready(&run, &changes), vec![0]);
        run
    }

    /// The steps a change made ready.
    fn now_ready(run: &RunState, changes: &Changes) -> Vec<usize> {
        let mut ready: Vec<usize> = changes
            .steps
            .iter()
            .copied()
            .filter(|&i| run.steps[i].status == StepStatus::Ready)
            .collect();
        ready.sort();
        ready
    }

    fn at(run: &RunState, id: &str) -> usize {
        run.definition.positions[id]
    }

    #[test]
    fn a_diamond_runs_lane_by_lane_to_the_end() {
        let mut run = start();
        let research = at(&run, "research");
        run.claim(research, "researcher", 1).unwrap();
        let changes = run
            .complete(research, "{\"sources\": 3}".into(), Some("c1"), 2)
            .unwrap();
        let (draft, check) = (at(&run, "draft"), at(&run, "fact_check"));
        let ready = now_ready(&run, &changes);
        let mut expected = vec![draft, check];
        expected.sort();
        assert_eq!(ready, expected, "both lanes open together");
        assert_eq!(
            run.render("{{ steps.research.output.sources }} from {{ inputs.topic }}")
                .unwrap(),
            "3 from tides"
        );
        run.claim(draft, "writer", 3).unwrap();
        run.claim(check, "researcher", 3).unwrap();
        run.complete(draft, "the draft".into(), Some("c2"), 4)
            .unwrap();
        let changes = run.complete(check, "ok".into(), Some("c3"), 5).unwrap();
        let approve = at(&run, "approve");
        assert_eq!(now_ready(&run, &changes), vec![approve]);
        run.claim(approve, "operator", 6).unwrap();
        let changes = run.complete(approve, "approved".into(), None, 7).unwrap();
        let publish = at(&run, "publish");
        assert_eq!(
            now_ready(&run, &changes),
            vec![publish],
            "`when` holds: fact check passed"
        );
        run.claim(publish, "warden", 8).unwrap();
        let changes = run
            .complete(publish, "polished".into(), Some("c4"), 9)
            .unwrap();
        assert!(changes.run_ended);
        assert_eq!(run.status, RunStatus::Succeeded);
        assert_eq!(run.ended_at_us, Some(9));
    }

    #[test]
    fn a_false_when_skips_the_step_and_the_run_still_succeeds() {
        let mut run = start();
        for (id, output) in [
            ("research", "r"),
            ("draft", "d"),
            ("fact_check", "reject"),
            ("approve", "approved"),
        ] {
            let index = at(&run, id);
            run.claim(index, "a", 1).unwrap();
            run.complete(index, output.into(), None, 2).unwrap();
        }
        let publish = at(&run, "publish");
        assert_eq!(run.steps[publish].status, StepStatus::Skipped);
        assert!(
            run.steps[publish]
                .error
                .as_deref()
                .unwrap()
                .contains("`when` is false")
        );
        assert_eq!(run.status, RunStatus::Succeeded);
    }

    #[test]
    fn a_failed_attempt_is_retried_after_its_backoff_then_fails_the_run() {
        let mut run = start();
        let research = at(&run, "research");
        run.claim(research, "researcher", 0).unwrap();
        run.complete(research, "r".into(), None, 1).unwrap();
        let check = at(&run, "fact_check");
        let draft = at(&run, "draft");
        run.claim(draft, "writer", 1).unwrap();
        run.claim(check, "researcher", 1_000_000).unwrap();
        let changes = run
            .fail_attempt(
                check,
                "upstream answered 500".into(),
                Some("call-a"),
                1_000_000,
            )
            .unwrap();
        assert_eq!(now_ready(&run, &changes), vec![check]);
        assert!(!run.steps[check].is_offered(2_999_999), "backoff of 2 s");
        assert!(run.steps[check].is_offered(3_000_000));
        run.claim(check, "researcher", 3_000_000).unwrap();
        assert_eq!(run.steps[check].attempts, 2);
        let changes = run
            .fail_attempt(
                check,
                "refused: budget_exceeded".into(),
                Some("call-b"),
                4_000_000,
            )
            .unwrap();
        assert!(changes.run_ended);
        assert_eq!(run.status, RunStatus::Failed);
        let error = run.error.clone().unwrap();
        assert!(
            error.contains("fact_check")
                && error.contains("budget_exceeded")
                && error.contains("call-b"),
            "{error}"
        );
        let status_of = |id: &str| run.steps[at(&run, id)].status.as_str();
        assert_eq!(
            ["research", "draft", "fact_check", "approve", "publish"].map(status_of),
            ["succeeded", "cancelled", "failed", "skipped", "skipped"]
        );
    }

    #[test]
    fn a_timeout_fails_the_attempt() {
        let mut run = start();
        let research = at(&run, "research");
        run.claim(research, "r", 0).unwrap();
        run.complete(research, "r".into(), None, 0).unwrap();
        let check = at(&run, "fact_check");
        run.claim(check, "r", 0).unwrap();
        assert!(run.expire(59_999_999).is_empty());
        let changes = run.expire(60_000_000);
        assert_eq!(now_ready(&run, &changes), vec![check]);
        assert!(
            run.steps[check]
                .error
                .as_deref()
                .unwrap()
                .contains("timed out after 60 s")
        );
    }

    #[test]
    fn cancel_ends_every_unfinished_step_and_refuses_later_changes() {
        let mut run = start();
        let research = at(&run, "research");
        run.claim(research, "r", 0).unwrap();
        run.cancel("alice", "wrong topic", 1).unwrap();
        assert_eq!(run.status, RunStatus::Cancelled);
        assert!(run.steps.iter().all(|s| s.status == StepStatus::Cancelled));
        assert!(matches!(
            run.complete(research, "late".into(), None, 2),
            Err(StepError::RunEnded { .. })
        ));
    }

    #[test]
    fn inputs_are_typed_required_and_defaulted() {
        let definition = diamond();
        let given = |pairs: &[(&str, &str)]| {
            Map::from_iter(pairs.iter().map(|(k, v)| (k.to_string(), Value::from(*v))))
        };
        let inputs = check_inputs(&definition, given(&[("topic", "x"), ("words", "120")])).unwrap();
        assert_eq!(inputs["words"], Value::from(120));
        let inputs = check_inputs(&definition, given(&[("topic", "x")])).unwrap();
        assert_eq!(inputs["words"], Value::from(300));
        assert!(
            check_inputs(&definition, given(&[("words", "1")]))
                .unwrap_err()
                .contains("`topic` is required")
        );
        assert!(
            check_inputs(&definition, given(&[("topic", "x"), ("words", "many")]))
                .unwrap_err()
                .contains("is a number")
        );
        assert!(
            check_inputs(&definition, given(&[("topic", "x"), ("colour", "red")]))
                .unwrap_err()
                .contains("no input `colour`")
        );
    }
}
