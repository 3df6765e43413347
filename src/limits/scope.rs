//! What a limit or a budget applies to, written as operators write it:
//! `global`, `agent:NAME`, `model:GLOB`, `workflow:NAME`, `run`.

use std::fmt;

use crate::proxy::upstream::glob_match;

/// The scope of a rate limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LimitScope {
    Global,
    Agent(String),
    Model(String),
}

/// The scope of a budget. `Run` is one ledger per workflow run.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BudgetScope {
    Global,
    Agent(String),
    Model(String),
    Workflow(String),
    Run,
}

/// What a call is, for deciding which budgets apply to it.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallSubject<'a> {
    pub agent: &'a str,
    pub model: &'a str,
    pub run_id: Option<&'a str>,
    pub workflow: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a scope; write {expected}")]
pub struct ScopeError {
    text: String,
    expected: &'static str,
}

fn split(text: &str) -> (&str, Option<&str>) {
    match text.split_once(':') {
        Some((kind, name)) => (kind, Some(name)),
        None => (text, None),
    }
}

impl LimitScope {
    pub fn parse(text: &str) -> Result<LimitScope, ScopeError> {
        let error = || ScopeError {
            text: text.to_owned(),
            expected: "`global`, `agent:NAME` or `model:GLOB`",
        };
        match split(text.trim()) {
            ("global", None) => Ok(LimitScope::Global),
            ("agent", Some(name)) if !name.is_empty() => Ok(LimitScope::Agent(name.to_owned())),
            ("model", Some(glob)) if !glob.is_empty() => Ok(LimitScope::Model(glob.to_owned())),
            _ => Err(error()),
        }
    }
}

impl fmt::Display for LimitScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitScope::Global => f.write_str("global"),
            LimitScope::Agent(name) => write!(f, "agent:{name}"),
            LimitScope::Model(glob) => write!(f, "model:{glob}"),
        }
    }
}

impl BudgetScope {
    pub fn parse(text: &str) -> Result<BudgetScope, ScopeError> {
        let error = || ScopeError {
            text: text.to_owned(),
            expected: "`global`, `agent:NAME`, `model:NAME`, `workflow:NAME` or `run`",
        };
        match split(text.trim()) {
            ("global", None) => Ok(BudgetScope::Global),
            ("run", None) => Ok(BudgetScope::Run),
            ("agent", Some(name)) if !name.is_empty() => Ok(BudgetScope::Agent(name.to_owned())),
            ("model", Some(glob)) if !glob.is_empty() => Ok(BudgetScope::Model(glob.to_owned())),
            ("workflow", Some(name)) if !name.is_empty() => {
                Ok(BudgetScope::Workflow(name.to_owned()))
            }
            _ => Err(error()),
        }
    }

    /// Whether the budget counts this call, and under which ledger key
    /// (the run id for `run` budgets, empty otherwise).
    pub fn ledger_key<'a>(&self, call: &CallSubject<'a>) -> Option<&'a str> {
        match self {
            BudgetScope::Global => Some(""),
            BudgetScope::Agent(name) => (name == call.agent).then_some(""),
            BudgetScope::Model(glob) => glob_match(glob, call.model).then_some(""),
            BudgetScope::Workflow(name) => (call.workflow == Some(name.as_str())).then_some(""),
            BudgetScope::Run => call.run_id,
        }
    }
}

impl fmt::Display for BudgetScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BudgetScope::Global => f.write_str("global"),
            BudgetScope::Agent(name) => write!(f, "agent:{name}"),
            BudgetScope::Model(glob) => write!(f, "model:{glob}"),
            BudgetScope::Workflow(name) => write!(f, "workflow:{name}"),
            BudgetScope::Run => f.write_str("run"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_print_back() {
        for text in [
            "global",
            "agent:researcher",
            "model:gpt-4o*",
            "workflow:triage",
            "run",
        ] {
            assert_eq!(BudgetScope::parse(text).unwrap().to_string(), text);
        }
        for text in ["global", "agent:a", "model:claude-*"] {
            assert_eq!(LimitScope::parse(text).unwrap().to_string(), text);
        }
        assert!(BudgetScope::parse("agent:").is_err());
        assert!(BudgetScope::parse("team:x").is_err());
        assert!(LimitScope::parse("run").is_err());
    }

    #[test]
    fn which_calls_a_budget_counts() {
        let call = CallSubject {
            agent: "a",
            model: "gpt-4o-mini",
            run_id: Some("r1"),
            workflow: None,
        };
        assert_eq!(BudgetScope::Global.ledger_key(&call), Some(""));
        assert_eq!(BudgetScope::Agent("b".into()).ledger_key(&call), None);
        assert_eq!(
            BudgetScope::Model("gpt-4o*".into()).ledger_key(&call),
            Some("")
        );
        assert_eq!(BudgetScope::Run.ledger_key(&call), Some("r1"));
        assert_eq!(BudgetScope::Workflow("w".into()).ledger_key(&call), None);
    }
}
