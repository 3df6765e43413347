//! What the run history says: per workflow version and per agent and step,
//! success rates, average cost and duration (the `workflow_stats` and
//! `agent_step_stats` views), and plain suggestions where the data is
//! enough to support one.

use duckdb::Connection;
use serde::Serialize;

/// Completed runs (or steps) a figure needs before it suggests anything.
pub const MIN_COMPLETED: i64 = 10;
/// Success rates this close count as equal.
const EQUAL_RATE: f64 = 0.02;

#[derive(Debug, Clone, Serialize)]
pub struct VersionStat {
    pub workflow: String,
    pub version_hash: String,
    pub runs: i64,
    pub completed: i64,
    pub succeeded: i64,
    pub success_rate: Option<f64>,
    pub avg_cost_usd: Option<f64>,
    pub avg_duration_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentStepStat {
    pub workflow: String,
    pub step_id: String,
    pub agent: String,
    pub completed: i64,
    pub success_rate: Option<f64>,
    pub avg_cost_usd: Option<f64>,
    pub avg_duration_s: Option<f64>,
}

/// Both views, versions in the order they were first run.
pub fn read(conn: &Connection) -> duckdb::Result<(Vec<VersionStat>, Vec<AgentStepStat>)> {
    let mut stmt = conn.prepare(
        "SELECT workflow, version_hash, runs, completed, succeeded, success_rate, CAST(avg_cost_usd AS DOUBLE), avg_duration_s FROM workflow_stats",
    )?;
    let versions = stmt
        .query_map([], |row| {
            Ok(VersionStat {
                workflow: row.get(0)?,
                version_hash: row.get::<_, Option<String>>(1)?.unwrap_or_default(),
                runs: row.get(2)?,
                completed: row.get(3)?,
                succeeded: row.get(4)?,
                success_rate: row.get(5)?,
                avg_cost_usd: row.get(6)?,
                avg_duration_s: row.get(7)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut stmt = conn.prepare(
        "SELECT workflow, step_id, agent, succeeded + failed, success_rate, CAST(avg_cost_usd AS DOUBLE), avg_duration_s FROM agent_step_stats",
    )?;
    let steps = stmt
        .query_map([], |row| {
            Ok(AgentStepStat {
                workflow: row.get(0)?,
                step_id: row.get(1)?,
                agent: row.get(2)?,
                completed: row.get(3)?,
                success_rate: row.get(4)?,
                avg_cost_usd: row.get(5)?,
                avg_duration_s: row.get(6)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok((versions, steps))
}

/// A success rate as operators read it.
pub fn percent(rate: f64) -> String {
    format!("{:.0}%", rate * 100.0)
}

/// Suggestions the figures support, each from `MIN_COMPLETED` completed
/// runs or steps on both sides of the comparison.
pub fn suggestions(versions: &[VersionStat], steps: &[AgentStepStat]) -> Vec<String> {
    let mut out = Vec::new();
    // A version that does worse than the one before it.
    for pair in versions.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        if before.workflow != after.workflow
            || before.completed < MIN_COMPLETED
            || after.completed < MIN_COMPLETED
        {
            continue;
        }
        if let (Some(old), Some(new)) = (before.success_rate, after.success_rate)
            && new + EQUAL_RATE < old
        {
            out.push(format!(
                "workflow {}: version {} succeeds in {} of {} runs, the version before it ({}) in {} of {}; consider `warden workflows rollback {} {}`",
                after.workflow,
                crate::short_hash(&after.version_hash),
                percent(new),
                after.completed,
                crate::short_hash(&before.version_hash),
                percent(old),
                before.completed,
                after.workflow,
                crate::short_hash(&before.version_hash),
            ));
        }
    }
    // An agent as good as another on a step, for less.
    for (i, a) in steps.iter().enumerate() {
        for b in &steps[i + 1..] {
            if a.workflow != b.workflow || a.step_id != b.step_id {
                continue;
            }
            if a.completed < MIN_COMPLETED || b.completed < MIN_COMPLETED {
                continue;
            }
            let (Some(rate_a), Some(rate_b), Some(cost_a), Some(cost_b)) = (
                a.success_rate,
                b.success_rate,
                a.avg_cost_usd,
                b.avg_cost_usd,
            ) else {
                continue;
            };
            if (rate_a - rate_b).abs() > EQUAL_RATE || cost_a == cost_b {
                continue;
            }
            let (cheap, dear, cheap_cost, dear_cost) = if cost_a < cost_b {
                (a, b, cost_a, cost_b)
            } else {
                (b, a, cost_b, cost_a)
            };
            out.push(format!(
                "workflow {} step {}: agent {} costs ${cheap_cost:.6} per step against ${dear_cost:.6} for {}, with the same success rate ({}); consider giving the step to {}",
                cheap.workflow,
                cheap.step_id,
                cheap.agent,
                dear.agent,
                percent(rate_a.max(rate_b)),
                cheap.agent,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(hash: &str, completed: i64, rate: f64) -> VersionStat {
        VersionStat {
            workflow: "brief".into(),
            version_hash: hash.into(),
            runs: completed,
            completed,
            succeeded: (completed as f64 * rate) as i64,
            success_rate: Some(rate),
            avg_cost_usd: Some(0.01),
            avg_duration_s: Some(3.0),
        }
    }

    fn agent(name: &str, completed: i64, rate: f64, cost: f64) -> AgentStepStat {
        AgentStepStat {
            workflow: "brief".into(),
            step_id: "draft".into(),
            agent: name.into(),
            completed,
            success_rate: Some(rate),
            avg_cost_usd: Some(cost),
            avg_duration_s: Some(1.0),
        }
    }

    #[test]
    fn a_worse_new_version_is_named_only_with_enough_runs() {
        let worse = suggestions(&[version("aaaa", 12, 0.9), version("bbbb", 10, 0.6)], &[]);
        assert_eq!(worse.len(), 1);
        assert!(
            worse[0].contains("version bbbb succeeds in 60% of 10 runs")
                && worse[0].contains("rollback brief aaaa"),
            "{worse:?}"
        );
        assert!(
            suggestions(&[version("aaaa", 12, 0.9), version("bbbb", 9, 0.1)], &[]).is_empty(),
            "9 runs are not enough"
        );
        assert!(
            suggestions(&[version("aaaa", 12, 0.9), version("bbbb", 12, 0.95)], &[]).is_empty(),
            "better is no news"
        );
    }

    #[test]
    fn a_cheaper_agent_with_an_equal_success_rate_is_suggested() {
        let cheaper = suggestions(
            &[],
            &[
                agent("writer", 20, 0.9, 0.004),
                agent("drafter", 15, 0.9, 0.001),
            ],
        );
        assert_eq!(cheaper.len(), 1);
        assert!(
            cheaper[0].contains("agent drafter costs $0.001000")
                && cheaper[0].contains("giving the step to drafter"),
            "{cheaper:?}"
        );
        assert!(
            suggestions(
                &[],
                &[
                    agent("writer", 20, 0.9, 0.004),
                    agent("drafter", 15, 0.7, 0.001)
                ]
            )
            .is_empty(),
            "cheaper but worse"
        );
        assert!(
            suggestions(
                &[],
                &[
                    agent("writer", 20, 0.9, 0.004),
                    agent("drafter", 5, 0.9, 0.001)
                ]
            )
            .is_empty(),
            "too few steps"
        );
    }
}
