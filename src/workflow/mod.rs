//! Workflows: DAGs of agent work defined in TOML, validated with petgraph.
//!
//! This part is the definition and its validation (`warden workflows
//! validate`); runs, dispatch and advancing from completions build on it.

pub mod definition;

pub use definition::{Definition, DefinitionError, InputType, Step, StepKind, WorkflowAgents};
