//! A workflow definition as written in its TOML file, and its validation:
//! cycles (naming the steps on the cycle), unknown `needs`, unknown agents
//! and capabilities no agent has, template and `when` references to inputs
//! that do not exist or to steps that are not upstream, bad input types —
//! each with the file, the line and what to change.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use petgraph::graph::{DiGraph, NodeIndex};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::config::line_of;

#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("cannot read {path}: {source}")]
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputType {
    String,
    Number,
    Boolean,
}

impl InputType {
    fn accepts(self, value: &toml::Value) -> bool {
        matches!(
            (self, value),
            (InputType::String, toml::Value::String(_))
                | (
                    InputType::Number,
                    toml::Value::Integer(_) | toml::Value::Float(_)
                )
                | (InputType::Boolean, toml::Value::Boolean(_))
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            InputType::String => "string",
            InputType::Number => "number",
            InputType::Boolean => "boolean",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    #[serde(rename = "type")]
    kind: Spanned<String>,
    #[serde(default)]
    required: bool,
    default: Option<Spanned<toml::Value>>,
    description: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    id: Spanned<String>,
    needs: Option<Spanned<Vec<String>>>,
    when: Option<Spanned<String>>,
    #[serde(default)]
    retries: u32,
    #[serde(default)]
    retry_backoff_secs: Option<u64>,
    timeout_secs: Option<u64>,
    budget_usd: Option<Spanned<crate::config::Amount>>,
    kind: Option<Spanned<String>>,
    agent: Option<Spanned<String>>,
    capability: Option<Spanned<String>>,
    instructions: Option<Spanned<String>>,
    complete_on: Option<Spanned<String>>,
    model: Option<Spanned<String>>,
    prompt: Option<Spanned<String>>,
    message: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefinition {
    name: Spanned<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    inputs: BTreeMap<String, Spanned<RawInput>>,
    #[serde(default)]
    steps: Vec<Spanned<RawStep>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub kind: InputType,
    pub required: bool,
    pub default: Option<toml::Value>,
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StepKind {
    /// Work done by an external agent: a named one, or any agent with the
    /// capability.
    Agent {
        agent: Option<String>,
        capability: Option<String>,
        instructions: String,
        /// The step ends with the first final answer, or only when the
        /// agent says so (`complete_on = "explicit"`).
        explicit_completion: bool,
    },
    /// A call Warden sends itself through its own pipeline.
    Model { model: String, prompt: String },
    /// A human gate through the approval queue.
    Approval { message: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub id: String,
    pub needs: Vec<String>,
    pub when: Option<String>,
    pub retries: u32,
    pub retry_backoff_secs: u64,
    pub timeout_secs: Option<u64>,
    pub budget_usd: Option<crate::money::Usd>,
    pub kind: StepKind,
}

/// A validated definition.
#[derive(Debug, Clone)]
pub struct Definition {
    pub name: String,
    pub description: String,
    pub inputs: BTreeMap<String, Input>,
    /// In a topological order: every step after the steps it needs.
    pub steps: Vec<Step>,
    /// Step id → its position in `steps`.
    pub positions: HashMap<String, usize>,
    /// Each step's needs as positions in `steps` (all before it).
    pub need_positions: Vec<Vec<usize>>,
    /// sha256 of the file's exact text: the version a run is pinned to.
    pub hash: String,
    pub text: String,
}

/// What validation needs to know about the configured agents.
#[derive(Debug, Clone, Default)]
pub struct WorkflowAgents {
    /// Agent name → its capabilities. `None`: agents are not checked
    /// (validating a file with no config at hand).
    pub agents: Option<HashMap<String, Vec<String>>>,
}

impl WorkflowAgents {
    pub fn from_config(config: &crate::config::Config) -> WorkflowAgents {
        WorkflowAgents {
            agents: Some(
                config
                    .agents
                    .iter()
                    .map(|a| (a.name.get_ref().clone(), a.capabilities.clone()))
                    .collect(),
            ),
        }
    }
}

impl Definition {
    pub fn load(path: &Path, agents: &WorkflowAgents) -> Result<Definition, DefinitionError> {
        let text = std::fs::read_to_string(path).map_err(|source| DefinitionError::Read {
            path: path.to_owned(),
            source,
        })?;
        Definition::parse(&text, path, agents)
    }

    pub fn parse(
        text: &str,
        path: &Path,
        agents: &WorkflowAgents,
    ) -> Result<Definition, DefinitionError> {
        let invalid = |offset: usize, message: String| DefinitionError::Invalid {
            path: path.to_owned(),
            line: line_of(text, offset),
            message,
        };
        let raw: RawDefinition = toml::from_str(text).map_err(|e| {
            invalid(
                e.span().map_or(0, |s| s.start),
                e.message().trim().to_owned(),
            )
        })?;
        validate(raw, text, agents).map_err(|(offset, message)| invalid(offset, message))
    }
}

type Problem = (usize, String);

fn validate(
    raw: RawDefinition,
    text: &str,
    agents: &WorkflowAgents,
) -> Result<Definition, Problem> {
    let name = raw.name.get_ref().trim().to_owned();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err((
            raw.name.span().start,
            format!("workflow name `{name}` must be letters, digits, `_` or `-`"),
        ));
    }
    let mut inputs = BTreeMap::new();
    for (input_name, spanned) in &raw.inputs {
        let input = spanned.get_ref();
        let kind = match input.kind.get_ref().as_str() {
            "string" => InputType::String,
            "number" => InputType::Number,
            "boolean" => InputType::Boolean,
            other => {
                return Err((
                    input.kind.span().start,
                    format!(
                        "input `{input_name}` has type `{other}`; use string, number or boolean"
                    ),
                ));
            }
        };
        if let Some(default) = &input.default
            && !kind.accepts(default.get_ref())
        {
            return Err((
                default.span().start,
                format!(
                    "input `{input_name}` is a {} but its default `{}` is not; write a {} default",
                    kind.as_str(),
                    default.get_ref(),
                    kind.as_str()
                ),
            ));
        }
        inputs.insert(
            input_name.clone(),
            Input {
                kind,
                required: input.required,
                default: input.default.as_ref().map(|d| d.get_ref().clone()),
                description: input.description.clone(),
            },
        );
    }
    if raw.steps.is_empty() {
        return Err((
            raw.name.span().start,
            "the workflow has no steps; add [[steps]] entries".into(),
        ));
    }

    // Steps by id, then the graph of their needs.
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, step) in raw.steps.iter().enumerate() {
        let id = step.get_ref().id.get_ref().as_str();
        if id.is_empty() || id.contains(['.', ' ']) {
            return Err((
                step.get_ref().id.span().start,
                format!("step id `{id}` must be non-empty, without dots or spaces"),
            ));
        }
        if index.insert(id, i).is_some() {
            return Err((
                step.get_ref().id.span().start,
                format!("step id `{id}` is used twice; step ids must be unique"),
            ));
        }
    }
    let mut graph: DiGraph<usize, ()> = DiGraph::with_capacity(raw.steps.len(), raw.steps.len());
    let nodes: Vec<NodeIndex> = (0..raw.steps.len()).map(|i| graph.add_node(i)).collect();
    for (i, step) in raw.steps.iter().enumerate() {
        let step = step.get_ref();
        let Some(needs) = &step.needs else {
            continue;
        };
        for need in needs.get_ref() {
            let Some(&from) = index.get(need.as_str()) else {
                return Err((
                    needs.span().start,
                    format!(
                        "step `{}` needs `{need}`, which is not a step of this workflow{}",
                        step.id.get_ref(),
                        closest(need, index.keys().copied())
                            .map(|c| format!(" (did you mean `{c}`?)"))
                            .unwrap_or_default()
                    ),
                ));
            };
            graph.add_edge(nodes[from], nodes[i], ());
        }
    }
    let order = match petgraph::algo::toposort(&graph, None) {
        Ok(order) => order,
        Err(_) => {
            let cycle = petgraph::algo::tarjan_scc(&graph)
                .into_iter()
                .find(|scc| scc.len() > 1 || graph.contains_edge(scc[0], scc[0]))
                .unwrap_or_default();
            let members = cycle_order(&graph, &cycle);
            let names: Vec<&str> = members
                .iter()
                .map(|i| raw.steps[*i].get_ref().id.get_ref().as_str())
                .collect();
            let first = raw.steps[members.first().copied().unwrap_or(0)].get_ref();
            return Err((
                first
                    .needs
                    .as_ref()
                    .map_or(first.id.span().start, |n| n.span().start),
                format!(
                    "the steps {} need each other in a cycle; remove one of their `needs` so the work has a start",
                    names
                        .iter()
                        .chain(names.first())
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(" → ")
                ),
            ));
        }
    };

    // Each step's upstream steps as a bit set, built in topological order:
    // a step's ancestors are its needs and their ancestors.
    let words = raw.steps.len().div_ceil(64);
    let mut upstream = vec![vec![0u64; words]; raw.steps.len()];
    for node in &order {
        let i = graph[*node];
        let mut set = vec![0u64; words];
        for parent in graph.neighbors_directed(*node, petgraph::Direction::Incoming) {
            let p = graph[parent];
            set[p / 64] |= 1 << (p % 64);
            for (word, bits) in set.iter_mut().zip(&upstream[p]) {
                *word |= bits;
            }
        }
        upstream[i] = set;
    }

    let templates = minijinja::Environment::new();
    let mut steps = Vec::with_capacity(raw.steps.len());
    for node in &order {
        let i = graph[*node];
        let raw_step = raw.steps[i].get_ref();
        let id = raw_step.id.get_ref().clone();
        let kind = step_kind(raw_step, agents)?;
        // Every template and condition may read the inputs and the outputs
        // of steps upstream of this one.
        let mut texts: Vec<(&Spanned<String>, bool)> = Vec::new();
        for text in [&raw_step.instructions, &raw_step.prompt, &raw_step.message]
            .into_iter()
            .flatten()
        {
            texts.push((text, false));
        }
        if let Some(when) = &raw_step.when {
            texts.push((when, true));
        }
        for (text, is_condition) in texts {
            let variables = if is_condition {
                templates
                    .compile_expression(text.get_ref())
                    .map(|e| e.undeclared_variables(true))
            } else {
                templates
                    .template_from_str(text.get_ref())
                    .map(|t| t.undeclared_variables(true))
            }
            .map_err(|e| {
                (
                    text.span().start,
                    format!(
                        "step `{id}`: {} does not parse: {e}",
                        if is_condition {
                            "`when`"
                        } else {
                            "the template"
                        }
                    ),
                )
            })?;
            let mut variables: Vec<String> = variables.into_iter().collect();
            variables.sort();
            for variable in variables {
                check_reference(&variable, &id, &upstream[i], &inputs, &index)
                    .map_err(|message| (text.span().start, message))?;
            }
        }
        let budget_usd = match &raw_step.budget_usd {
            Some(amount) => Some(
                amount
                    .get_ref()
                    .to_usd()
                    .map_err(|e| (amount.span().start, format!("step `{id}`: budget_usd {e}")))?,
            ),
            None => None,
        };
        steps.push(Step {
            id,
            needs: raw_step
                .needs
                .as_ref()
                .map(|n| n.get_ref().clone())
                .unwrap_or_default(),
            when: raw_step.when.as_ref().map(|w| w.get_ref().clone()),
            retries: raw_step.retries,
            retry_backoff_secs: raw_step.retry_backoff_secs.unwrap_or(5),
            timeout_secs: raw_step.timeout_secs,
            budget_usd,
            kind,
        });
    }
    let positions: HashMap<String, usize> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.clone(), i))
        .collect();
    let need_positions = steps
        .iter()
        .map(|s| {
            s.needs
                .iter()
                .filter_map(|n| positions.get(n).copied())
                .collect()
        })
        .collect();
    Ok(Definition {
        name,
        description: raw.description,
        inputs,
        steps,
        positions,
        need_positions,
        hash: hex::encode(Sha256::digest(text.as_bytes())),
        text: text.to_owned(),
    })
}

/// The steps of a strongly connected component in the order the work
/// would flow round one cycle, starting from the step written first.
fn cycle_order(graph: &DiGraph<usize, ()>, component: &[NodeIndex]) -> Vec<usize> {
    let Some(&start) = component.iter().min_by_key(|n| graph[**n]) else {
        return Vec::new();
    };
    let inside: std::collections::HashSet<NodeIndex> = component.iter().copied().collect();
    // Depth-first from `start` inside the component until an edge leads back.
    let mut path = vec![start];
    let mut seen = std::collections::HashSet::from([start]);
    let mut branches = vec![graph.neighbors(start).collect::<Vec<_>>()];
    while let Some(next) = branches.last_mut().and_then(Vec::pop) {
        if next == start {
            return path.iter().map(|n| graph[*n]).collect();
        }
        if inside.contains(&next) && seen.insert(next) {
            path.push(next);
            branches.push(graph.neighbors(next).collect());
        }
        while branches.last().is_some_and(Vec::is_empty) {
            branches.pop();
            path.pop();
        }
    }
    vec![graph[start]]
}

fn step_kind(step: &RawStep, agents: &WorkflowAgents) -> Result<StepKind, Problem> {
    let id = step.id.get_ref();
    let at = step.id.span().start;
    let kind = step.kind.as_ref().map(|k| k.get_ref().as_str());
    let stray = |fields: &[(&str, bool)], kind: &str| -> Result<(), Problem> {
        match fields.iter().find(|(_, set)| *set) {
            Some((field, _)) => Err((
                at,
                format!("step `{id}`: `{field}` does not belong in a {kind} step"),
            )),
            None => Ok(()),
        }
    };
    match kind {
        None | Some("agent") => {
            stray(
                &[
                    ("model", step.model.is_some()),
                    ("prompt", step.prompt.is_some()),
                    ("message", step.message.is_some()),
                ],
                "agent",
            )?;
            let explicit = match step.complete_on.as_ref().map(|c| c.get_ref().as_str()) {
                None | Some("final_answer") => false,
                Some("explicit") => true,
                Some(other) => {
                    return Err((
                        step.complete_on.as_ref().map_or(at, |c| c.span().start),
                        format!(
                            "step `{id}`: complete_on `{other}` is not `final_answer` or `explicit`"
                        ),
                    ));
                }
            };
            match (&step.agent, &step.capability) {
                (Some(_), Some(_)) | (None, None) => Err((
                    at,
                    format!(
                        "step `{id}` needs exactly one of `agent = \"NAME\"` or `capability = \"...\"` (or a `kind` of model or approval)"
                    ),
                )),
                (Some(agent), None) => {
                    if let Some(known) = &agents.agents
                        && !known.contains_key(agent.get_ref())
                    {
                        let mut names: Vec<&String> = known.keys().collect();
                        names.sort();
                        return Err((
                            agent.span().start,
                            format!(
                                "step `{id}`: no agent named `{}` is configured (agents: {})",
                                agent.get_ref(),
                                names
                                    .iter()
                                    .map(|n| n.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ));
                    }
                    Ok(StepKind::Agent {
                        agent: Some(agent.get_ref().clone()),
                        capability: None,
                        instructions: text_of(&step.instructions),
                        explicit_completion: explicit,
                    })
                }
                (None, Some(capability)) => {
                    if let Some(known) = &agents.agents
                        && !known
                            .values()
                            .any(|caps| caps.contains(capability.get_ref()))
                    {
                        return Err((
                            capability.span().start,
                            format!(
                                "step `{id}`: no configured agent has the capability `{}`; add it to an agent's capabilities or name an agent",
                                capability.get_ref()
                            ),
                        ));
                    }
                    Ok(StepKind::Agent {
                        agent: None,
                        capability: Some(capability.get_ref().clone()),
                        instructions: text_of(&step.instructions),
                        explicit_completion: explicit,
                    })
                }
            }
        }
        Some("model") => {
            stray(
                &[
                    ("agent", step.agent.is_some()),
                    ("capability", step.capability.is_some()),
                    ("message", step.message.is_some()),
                ],
                "model",
            )?;
            match (&step.model, &step.prompt) {
                (Some(model), Some(prompt)) => Ok(StepKind::Model {
                    model: model.get_ref().clone(),
                    prompt: prompt.get_ref().clone(),
                }),
                _ => Err((
                    at,
                    format!("step `{id}` is a model step: it needs `model` and `prompt`"),
                )),
            }
        }
        Some("approval") => {
            stray(
                &[
                    ("agent", step.agent.is_some()),
                    ("capability", step.capability.is_some()),
                    ("model", step.model.is_some()),
                    ("prompt", step.prompt.is_some()),
                ],
                "approval",
            )?;
            match &step.message {
                Some(message) => Ok(StepKind::Approval {
                    message: message.get_ref().clone(),
                }),
                None => Err((
                    at,
                    format!(
                        "step `{id}` is an approval step: it needs a `message` for the operator"
                    ),
                )),
            }
        }
        Some(other) => Err((
            step.kind.as_ref().map_or(at, |k| k.span().start),
            format!("step `{id}`: kind `{other}` is not agent, model or approval"),
        )),
    }
}

fn text_of(text: &Option<Spanned<String>>) -> String {
    text.as_ref()
        .map(|t| t.get_ref().clone())
        .unwrap_or_default()
}

/// `inputs.NAME` must be an input; `steps.ID.output` must name a step
/// upstream of this one.
fn check_reference(
    variable: &str,
    step: &str,
    upstream: &[u64],
    inputs: &BTreeMap<String, Input>,
    index: &HashMap<&str, usize>,
) -> Result<(), String> {
    let mut parts = variable.split('.');
    match (parts.next(), parts.next()) {
        (Some("inputs"), Some(name)) => {
            if inputs.contains_key(name) {
                Ok(())
            } else {
                Err(format!(
                    "step `{step}` reads `inputs.{name}`, which is not declared; add it under [inputs]"
                ))
            }
        }
        (Some("inputs"), None) => Ok(()),
        (Some("steps"), Some(other)) => {
            let Some(&other_index) = index.get(other) else {
                return Err(format!(
                    "step `{step}` reads `steps.{other}`, which is not a step of this workflow"
                ));
            };
            if upstream[other_index / 64] & (1 << (other_index % 64)) != 0 {
                Ok(())
            } else {
                Err(format!(
                    "step `{step}` reads the output of `{other}`, which is not upstream of it; add `{other}` to its needs (or to a step it needs)"
                ))
            }
        }
        (Some(root), _) => Err(format!(
            "step `{step}` reads `{variable}`; templates and conditions may read `inputs.NAME` and `steps.ID.output` only (`{root}` is neither)"
        )),
        (None, _) => Ok(()),
    }
}

/// The known name closest to a misspelt one, if any is close.
fn closest<'a>(wanted: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    known
        .map(|k| (strsim(wanted, k), k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Edit distance (Levenshtein) for short names.
fn strsim(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = if ca == *cb {
                previous
            } else {
                1 + previous.min(row[j]).min(row[j + 1])
            };
            previous = current;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIAMOND: &str = include_str!("../../examples/research_brief.toml");

    fn agents() -> WorkflowAgents {
        WorkflowAgents {
            agents: Some(HashMap::from([
                (
                    "researcher".to_owned(),
                    vec!["research".to_owned(), "fact-checking".to_owned()],
                ),
                ("writer".to_owned(), vec!["writing".to_owned()]),
            ])),
        }
    }

    fn problem(text: &str) -> (usize, String) {
        match Definition::parse(text, Path::new("w.toml"), &agents()) {
            Err(DefinitionError::Invalid { line, message, .. }) => (line, message),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    fn line_with(text: &str, needle: &str) -> usize {
        text.lines().position(|l| l.contains(needle)).unwrap() + 1
    }

    #[test]
    fn the_example_diamond_is_valid_and_ordered() {
        let definition = Definition::parse(DIAMOND, Path::new("w.toml"), &agents()).unwrap();
        let order: Vec<&str> = definition.steps.iter().map(|s| s.id.as_str()).collect();
        let at = |id: &str| order.iter().position(|s| *s == id).unwrap();
        assert!(at("research") < at("draft") && at("research") < at("fact_check"));
        assert!(at("draft") < at("approve") && at("fact_check") < at("approve"));
        assert!(at("approve") < at("publish"));
        assert_eq!(definition.hash.len(), 64);
        assert_eq!(
            definition.inputs["words"].default,
            Some(toml::Value::Integer(300))
        );
        let publish = definition.steps.iter().find(|s| s.id == "publish").unwrap();
        assert_eq!(
            publish.budget_usd,
            Some(crate::money::Usd::parse("0.50").unwrap())
        );
    }

    #[test]
    fn a_cycle_is_named_step_by_step() {
        let text = DIAMOND.replace(
            "id = \"research\"\nagent = \"researcher\"",
            "id = \"research\"\nagent = \"researcher\"\nneeds = [\"publish\"]",
        );
        let (line, message) = problem(&text);
        assert!(message.contains("cycle"), "{message}");
        assert!(
            message.contains("`research` → `draft` → `approve` → `publish` → `research`")
                || message
                    .contains("`research` → `fact_check` → `approve` → `publish` → `research`"),
            "{message}"
        );
        assert_eq!(line, line_with(&text, "needs = [\"publish\"]"));
    }

    #[test]
    fn unknown_needs_agents_and_capabilities_are_named() {
        let text = DIAMOND.replace(
            "needs = [\"research\"]\ninstructions",
            "needs = [\"reserch\"]\ninstructions",
        );
        let (line, message) = problem(&text);
        assert!(
            message.contains("`reserch`") && message.contains("did you mean `research`"),
            "{message}"
        );
        assert_eq!(line, line_with(&text, "reserch"));

        let text = DIAMOND.replace("agent = \"writer\"", "agent = \"editor\"");
        let (line, message) = problem(&text);
        assert!(message.contains("no agent named `editor`"), "{message}");
        assert_eq!(line, line_with(&text, "editor"));

        let text = DIAMOND.replace("\"fact-checking\"", "\"proofreading\"");
        let (_, message) = problem(&text);
        assert!(
            message.contains("no configured agent has the capability `proofreading`"),
            "{message}"
        );
    }

    #[test]
    fn references_must_be_declared_inputs_and_upstream_steps() {
        let text = DIAMOND.replace("{{ inputs.words }}", "{{ inputs.length }}");
        let (line, message) = problem(&text);
        assert!(
            message.contains("`inputs.length`") && message.contains("[inputs]"),
            "{message}"
        );
        assert_eq!(line, line_with(&text, "inputs.length"));

        // The draft reads the fact check, which runs beside it, not before.
        let text = DIAMOND.replace(
            "from: {{ steps.research.output }}",
            "from: {{ steps.fact_check.output }}",
        );
        let (_, message) = problem(&text);
        assert!(
            message.contains("`fact_check`, which is not upstream"),
            "{message}"
        );

        let text = DIAMOND.replace(
            "when = \"steps.fact_check.output",
            "when = \"steps.nothing.output",
        );
        let (line, message) = problem(&text);
        assert!(message.contains("`steps.nothing`"), "{message}");
        assert_eq!(line, line_with(&text, "steps.nothing"));

        let text = DIAMOND.replace("{{ inputs.topic }}?", "{{ secrets.key }}?");
        let (_, message) = problem(&text);
        assert!(message.contains("`secrets.key`"), "{message}");
    }

    #[test]
    fn bad_input_types_and_step_kinds_are_refused() {
        let text = DIAMOND.replace(
            "type = \"number\", default = 300",
            "type = \"integer\", default = 300",
        );
        let (line, message) = problem(&text);
        assert!(
            message.contains("`integer`") && message.contains("string, number or boolean"),
            "{message}"
        );
        assert_eq!(line, line_with(&text, "integer"));

        let text = DIAMOND.replace("default = 300", "default = \"300\"");
        let (_, message) = problem(&text);
        assert!(message.contains("its default"), "{message}");

        let text = DIAMOND.replace("kind = \"approval\"", "kind = \"human\"");
        assert!(problem(&text).1.contains("kind `human`"));
        let text = DIAMOND.replace("prompt = \"Polish", "message = \"Polish");
        assert!(
            problem(&text)
                .1
                .contains("`message` does not belong in a model step")
        );
        let text = DIAMOND.replace("id = \"draft\"", "id = \"research\"");
        assert!(problem(&text).1.contains("used twice"));
        let text = DIAMOND.replace("{{ inputs.topic }}.", "{{ inputs.topic ");
        assert!(problem(&text).1.contains("does not parse"));
    }

    #[test]
    fn without_a_config_agents_are_not_checked() {
        let text = DIAMOND.replace("agent = \"writer\"", "agent = \"editor\"");
        Definition::parse(&text, Path::new("w.toml"), &WorkflowAgents::default()).unwrap();
    }
}
