//! Admin endpoints for workflows and their runs: trigger, list, show,
//! cancel, version history and rollback.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{AdminState, Operator, error, json_response, query_param, read_json};
use crate::halts::HaltScope;
use crate::proxy::body::ProxyBody;
use crate::store::StoreError;
use crate::workflow::RunsError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    workflow: String,
    #[serde(default)]
    inputs: Map<String, Value>,
    version: Option<String>,
}

/// `POST /admin/v1/runs`: starts a run, with its estimated cost from the
/// version's completed runs.
pub async fn start(
    state: &AdminState,
    operator: &Operator,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let body: StartBody = match read_json(
        request,
        r#"{"workflow": "NAME", "inputs": {"topic": "..."}, "version": "HASH (optional)"}"#,
    )
    .await
    {
        Ok(body) => body,
        Err(response) => return response,
    };
    let runs = state.runs.clone();
    let name = operator.name.clone();
    let started = tokio::task::spawn_blocking(move || {
        runs.start(&body.workflow, body.version.as_deref(), body.inputs, &name)
    })
    .await;
    let view = match started {
        Ok(Ok(view)) => view,
        Ok(Err(e)) => return runs_error(e),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    };
    let reader = state.reader.clone();
    let hash = view.version_hash.clone();
    let estimate = tokio::task::spawn_blocking(move || {
        reader.with_connection(|conn| {
            crate::workflow::store::estimated_cost(conn, &hash)
                .map_err(|e| StoreError::Sql(e.to_string()))
        })
    })
    .await;
    let (estimate, from_runs) = match estimate {
        Ok(Ok((estimate, count))) => (estimate.map(|c| c.to_string()), count),
        _ => (None, 0),
    };
    json_response(
        StatusCode::OK,
        json!({
            "run_id": view.run_id,
            "run": view,
            "estimated_cost_usd": estimate,
            "estimate_from_runs": from_runs,
        }),
    )
}

/// `GET /admin/v1/runs[?status=S]`: from the store, with runs in flight as
/// they stand now.
pub async fn list(state: &AdminState, uri: &http::Uri) -> Response<ProxyBody> {
    let status = query_param(uri, "status");
    if let Some(status) = &status
        && crate::workflow::RunStatus::parse(status).is_none()
    {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_status",
            format!("no run status `{status}`; use running, succeeded, failed or cancelled"),
        );
    }
    state.recorder.flush().await;
    let reader = state.reader.clone();
    let filter = status.clone();
    let stored = tokio::task::spawn_blocking(move || {
        reader.with_connection(|conn| {
            crate::workflow::store::list_runs(conn, filter.as_deref(), 1_000)
                .map_err(|e| StoreError::Sql(e.to_string()))
        })
    })
    .await;
    let mut stored = match stored {
        Ok(Ok(stored)) => stored,
        Ok(Err(e)) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "store_error",
                e.to_string(),
            );
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    };
    for run in &mut stored {
        if let Some(live) = state.runs.view(&run.run_id) {
            run.status = live.status.as_str().to_owned();
            run.cost_usd = live.cost_usd;
            run.ended_at_us = live.ended_at_us;
            run.error = live.error;
        }
    }
    stored.retain(|r| status.as_deref().is_none_or(|s| r.status == s));
    json_response(StatusCode::OK, json!({"runs": stored}))
}

/// `GET /admin/v1/runs/ID`: the run with every step.
pub async fn show(state: &AdminState, run_id: &str) -> Response<ProxyBody> {
    if let Some(view) = state.runs.view(run_id) {
        return json_response(StatusCode::OK, json!({"run": view}));
    }
    state.recorder.flush().await;
    let reader = state.reader.clone();
    let workflows = state.runs.workflows().clone();
    let id = run_id.to_owned();
    let loaded = tokio::task::spawn_blocking(move || {
        reader.with_connection(|conn| {
            crate::workflow::store::load_run(conn, &workflows, &id)
                .map_err(|e| StoreError::Sql(e.to_string()))
        })
    })
    .await;
    match loaded {
        Ok(Ok(Some(run))) => json_response(
            StatusCode::OK,
            json!({"run": crate::workflow::engine::view_of(&run)}),
        ),
        Ok(Ok(None)) => error(
            StatusCode::NOT_FOUND,
            "unknown_run",
            format!("no run `{run_id}`; `warden runs list` shows the runs"),
        ),
        Ok(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store_error",
            e.to_string(),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    reason: Option<String>,
}

/// `POST /admin/v1/runs/ID/cancel`: halts the run (its in-flight calls are
/// cut) and cancels its unfinished steps.
pub async fn cancel(
    state: &AdminState,
    operator: &Operator,
    run_id: &str,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let body: CancelBody = match read_json(request, r#"{"reason": "..."}"#).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    if !state.runs.is_running(run_id) {
        return error(
            StatusCode::NOT_FOUND,
            "not_running",
            format!(
                "run `{run_id}` is not in flight; `warden runs list --status running` shows those that are"
            ),
        );
    }
    let reason = body
        .reason
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| "run cancelled".to_owned());
    // End the run first: a call cut by the halt (or finishing meanwhile)
    // then changes nothing, instead of failing the run before it is cancelled.
    let result = state.runs.cancel(run_id, &operator.name, &reason);
    if result.is_ok()
        && let Err(e) = state.supervisor.halt(
            HaltScope::Run(run_id.to_owned()),
            false,
            &reason,
            &operator.name,
        )
    {
        tracing::debug!(run_id, "run was already halted: {e}");
    }
    state.supervisor.flush().await;
    match result {
        Ok(view) => json_response(StatusCode::OK, json!({"run": view})),
        Err(e) => runs_error(e),
    }
}

/// `GET /admin/v1/workflows/NAME/history`.
pub async fn history(state: &AdminState, workflow: &str) -> Response<ProxyBody> {
    state.recorder.flush().await;
    let reader = state.reader.clone();
    let name = workflow.to_owned();
    let current = state
        .runs
        .workflows()
        .current(workflow)
        .map(|d| d.hash.clone());
    let versions = tokio::task::spawn_blocking(move || {
        reader.with_connection(|conn| {
            crate::workflow::store::history(conn, &name).map_err(|e| StoreError::Sql(e.to_string()))
        })
    })
    .await;
    match versions {
        Ok(Ok(versions)) if versions.is_empty() => error(
            StatusCode::NOT_FOUND,
            "unknown_workflow",
            format!(
                "no versions of workflow `{workflow}` are stored; `warden workflows list` shows the workflows"
            ),
        ),
        Ok(Ok(versions)) => json_response(
            StatusCode::OK,
            json!({"workflow": workflow, "current": current, "versions": versions}),
        ),
        Ok(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store_error",
            e.to_string(),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    version: String,
}

/// `POST /admin/v1/workflows/NAME/rollback`: an older version becomes
/// current (until the file changes again).
pub async fn rollback(
    state: &AdminState,
    operator: &Operator,
    workflow: &str,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let body: RollbackBody = match read_json(request, r#"{"version": "HASH"}"#).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let workflows = state.runs.workflows().clone();
    let name = workflow.to_owned();
    let by = operator.name.clone();
    let pinned =
        tokio::task::spawn_blocking(move || workflows.pin(&name, &body.version, &by)).await;
    match pinned {
        Ok(Ok((definition, previous))) => {
            state.recorder.flush().await;
            json_response(
                StatusCode::OK,
                json!({"workflow": workflow, "current": definition.hash, "previous": previous}),
            )
        }
        Ok(Err(e)) => runs_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// `GET /admin/v1/insights`: both insight views and the suggestions
/// they support.
pub async fn insights(state: &AdminState) -> Response<ProxyBody> {
    state.recorder.flush().await;
    let reader = state.reader.clone();
    let read = tokio::task::spawn_blocking(move || {
        reader.with_connection(|conn| {
            crate::workflow::insights::read(conn).map_err(|e| StoreError::Sql(e.to_string()))
        })
    })
    .await;
    match read {
        Ok(Ok((versions, steps))) => {
            let suggestions = crate::workflow::insights::suggestions(&versions, &steps);
            json_response(
                StatusCode::OK,
                json!({
                    "workflow_stats": versions,
                    "agent_step_stats": steps,
                    "suggestions": suggestions,
                    "min_completed": crate::workflow::insights::MIN_COMPLETED,
                }),
            )
        }
        Ok(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store_error",
            e.to_string(),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

fn runs_error(e: RunsError) -> Response<ProxyBody> {
    let (status, code) = match &e {
        RunsError::UnknownWorkflow { .. } => (StatusCode::NOT_FOUND, "unknown_workflow"),
        RunsError::UnknownVersion { .. } => (StatusCode::NOT_FOUND, "unknown_version"),
        RunsError::BadInputs(_) => (StatusCode::BAD_REQUEST, "invalid_inputs"),
        RunsError::UnknownRun(_) => (StatusCode::NOT_FOUND, "unknown_run"),
        RunsError::UnknownStep { .. } | RunsError::NoSuchWork { .. } => {
            (StatusCode::NOT_FOUND, "unknown_step")
        }
        RunsError::NotYourStep { .. } => (StatusCode::FORBIDDEN, "step_not_assigned"),
        RunsError::RetryLater { .. } => (StatusCode::CONFLICT, "step_retry_pending"),
        RunsError::Step(_) => (StatusCode::CONFLICT, "run_ended"),
    };
    error(status, code, e.to_string())
}
