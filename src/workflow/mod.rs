//! Workflows: DAGs of agent work defined in TOML, validated with petgraph.
//!
//! Definitions and their validation (`definition`), the set served from
//! `[workflows] dir` with every version stored (`registry`), one run's state
//! machine (`run`), the engine that drives runs from the calls Warden sees
//! (`engine`), and reading runs back from the store (`store`).

pub mod definition;
pub mod engine;
pub mod insights;
pub mod registry;
pub mod run;
pub mod store;

pub use definition::{Definition, DefinitionError, InputType, Step, StepKind, WorkflowAgents};
pub use engine::{
    Binding, BoundStep, CallEnded, ModelCaller, RunView, Runs, RunsError, StepView, WARDEN_AGENT,
    WorkItem,
};
pub use registry::{WorkflowSet, WorkflowSummary};
pub use run::{RunStatus, StepStatus};
