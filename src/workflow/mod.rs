//! Workflows: DAGs of agent work defined in TOML, validated with petgraph.
//!
//! So far: definitions and their validation (`warden workflows validate`),
//! and the set served from `[workflows] dir` with every version stored.
//! Runs, dispatch and advancing from completions build on these.

pub mod definition;
pub mod registry;

pub use definition::{Definition, DefinitionError, InputType, Step, StepKind, WorkflowAgents};
pub use registry::{WorkflowSet, WorkflowSummary};
