//! The workflow endpoints agents call with their own key:
//! `GET /v1/warden/work` (the agent's ready and running steps; ready ones
//! are taken by the poll) and `POST /v1/warden/work/{step}/complete` (ends a
//! step whose definition says `complete_on = "explicit"`, or any running
//! step of the agent, with its output).

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use super::ProxyState;
use super::body::ProxyBody;
use crate::http_server::RequestBody;
use crate::providers::{self, Endpoint, ErrorKind};
use crate::workflow::RunsError;
use crate::workflow::run::StepError;

pub const PREFIX: &str = "/v1/warden/";

pub async fn handle(state: &ProxyState, request: Request<RequestBody>) -> Response<ProxyBody> {
    let protocol = Endpoint::guess_protocol(request.uri().path(), request.headers());
    match serve(state, request).await {
        Ok(body) => ProxyBody::json(StatusCode::OK, Bytes::from(body.to_string())),
        Err((kind, code, message)) => ProxyBody::json(
            kind.status(),
            providers::error_body(protocol, kind, code, &message),
        ),
    }
}

type Failure = (ErrorKind, &'static str, String);

async fn serve(state: &ProxyState, request: Request<RequestBody>) -> Result<Value, Failure> {
    let agent = state
        .agents
        .identify(request.headers())
        .ok_or_else(|| {
            (
                ErrorKind::InvalidKey,
                "invalid_api_key",
                "Warden does not know this API key. Use the agent key your operator issued (Authorization: Bearer <key> or x-api-key).".to_owned(),
            )
        })?
        .clone();
    let path = request.uri().path().trim_end_matches('/').to_owned();
    let method = request.method().clone();
    let rest = path.strip_prefix("/v1/warden/").unwrap_or("");
    let segments: Vec<&str> = rest.split('/').collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["work"]) => {
            let work = state.runs.work_for(&agent.name);
            Ok(json!({"work": work}))
        }
        (&Method::POST, ["work", step, "complete"]) => {
            let step = (*step).to_owned();
            let header_run = request
                .headers()
                .get("x-warden-run")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = read_json(request, state.max_body_bytes).await?;
            let run_id = body
                .get("run_id")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .or(header_run);
            let output = match body.get("output") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(text)) => text.clone(),
                Some(other) => other.to_string(),
            };
            let view = state
                .runs
                .complete_explicit(&agent.name, run_id.as_deref(), &step, output)
                .map_err(run_failure)?;
            Ok(json!({
                "run_id": view.run_id,
                "step_id": step,
                "status": "succeeded",
                "run_status": view.status,
            }))
        }
        _ => Err((
            ErrorKind::NotFound,
            "unknown_endpoint",
            format!(
                "Warden does not serve {method} {path}; agents use GET /v1/warden/work and POST /v1/warden/work/STEP/complete"
            ),
        )),
    }
}

async fn read_json(request: Request<RequestBody>, limit: u64) -> Result<Value, Failure> {
    let collected = request.into_body().read(limit).await.map_err(|e| {
        let (kind, code) = e.kind_and_code();
        (kind, code, e.to_string())
    })?;
    if collected.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(&collected).map_err(|e| {
        (
            ErrorKind::InvalidRequest,
            "invalid_json",
            format!("the body is not valid JSON ({e}); send {{\"output\": …, \"run_id\": …}}"),
        )
    })
}

fn run_failure(error: RunsError) -> Failure {
    let (kind, code) = match &error {
        RunsError::UnknownRun(_) | RunsError::UnknownStep { .. } | RunsError::NoSuchWork { .. } => {
            (ErrorKind::NotFound, "unknown_work")
        }
        RunsError::NotYourStep { .. } => (ErrorKind::Forbidden, "step_not_assigned"),
        RunsError::Step(StepError::RunEnded { .. } | StepError::WrongStatus { .. }) => {
            (ErrorKind::Conflict, "step_not_running")
        }
        _ => (ErrorKind::InvalidRequest, "invalid_request"),
    };
    (kind, code, error.to_string())
}
