//! Admin endpoints for supervision: approvals, halts, the live event stream
//! and the audit export.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;

use super::{AdminState, Operator, error, json_response, query_param, read_json};
use crate::approvals::DecideError;
use crate::events::Received;
use crate::halts::HaltScope;
use crate::proxy::body::ProxyBody;
use crate::store::export::ExportFormat;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    reason: Option<String>,
}

pub async fn decide(
    state: &AdminState,
    operator: &Operator,
    id: &str,
    approve: bool,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let body: DecisionBody = match read_json(request, r#"{"reason": "..."}"#).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let reason = body.reason.unwrap_or_default();
    if !approve && reason.trim().is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "reason_required",
            "a rejection needs a reason (--reason TEXT): the agent receives it",
        );
    }
    match state
        .supervisor
        .approvals
        .decide(id, approve, &operator.name, reason.trim())
        .await
    {
        Ok(approval) => json_response(StatusCode::OK, json!({"approval": approval})),
        Err(e @ DecideError::NotFound(_)) => {
            error(StatusCode::NOT_FOUND, "unknown_approval", e.to_string())
        }
        Err(e @ DecideError::AlreadyDecided { .. }) => {
            error(StatusCode::CONFLICT, "already_decided", e.to_string())
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HaltBody {
    scope: String,
    #[serde(default)]
    drain: bool,
    reason: String,
}

pub async fn halt(
    state: &AdminState,
    operator: &Operator,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let body: HaltBody = match read_json(
        request,
        r#"{"scope": "agent:NAME" | "run:ID" | "all", "drain": false, "reason": "..."}"#,
    )
    .await
    {
        Ok(body) => body,
        Err(response) => return response,
    };
    let scope = match scope_of(state, &body.scope) {
        Ok(scope) => scope,
        Err(message) => return error(StatusCode::BAD_REQUEST, "invalid_scope", message),
    };
    if body.reason.trim().is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "reason_required",
            "a halt needs a reason (--reason TEXT): refused calls carry it",
        );
    }
    match state
        .supervisor
        .halt(scope, body.drain, body.reason.trim(), &operator.name)
    {
        Ok(halt) => {
            state.supervisor.flush().await;
            json_response(StatusCode::OK, json!({"halt": &*halt}))
        }
        Err(e) => error(StatusCode::CONFLICT, "already_halted", e.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeBody {
    scope: String,
}

pub async fn resume(
    state: &AdminState,
    operator: &Operator,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let body: ResumeBody = match read_json(request, r#"{"scope": "agent:NAME"}"#).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let scope = match scope_of(state, &body.scope) {
        Ok(scope) => scope,
        Err(message) => return error(StatusCode::BAD_REQUEST, "invalid_scope", message),
    };
    match state.supervisor.resume(&scope, &operator.name) {
        Ok(lifted) => {
            state.supervisor.flush().await;
            json_response(StatusCode::OK, json!({"resumed": &*lifted}))
        }
        Err(e) => error(
            StatusCode::NOT_FOUND,
            "not_halted",
            format!("{e}; `warden halts` lists the active halts"),
        ),
    }
}

fn scope_of(state: &AdminState, text: &str) -> Result<HaltScope, String> {
    let scope = HaltScope::parse(text)?;
    if let HaltScope::Agent(name) = &scope
        && !state.agents.contains(name)
    {
        return Err(format!("no agent named `{name}` is configured"));
    }
    Ok(scope)
}

/// How often an idle event stream gets a comment, so proxies and clients
/// keep it open.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// `GET /admin/v1/events[?kind=a,b]`: server-sent events, one per
/// supervision event, as they happen.
pub fn events(state: &Arc<AdminState>, uri: &http::Uri) -> Response<ProxyBody> {
    let kinds: Option<Vec<String>> = query_param(uri, "kind").map(|k| {
        k.split(',')
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
            .collect()
    });
    if let Some(unknown) = kinds
        .iter()
        .flatten()
        .find(|k| !crate::events::KINDS.contains(&k.as_str()))
    {
        return error(
            StatusCode::BAD_REQUEST,
            "unknown_kind",
            format!(
                "no event kind `{unknown}`; the kinds are {}",
                crate::events::KINDS.join(", ")
            ),
        );
    }
    let mut watcher = state.supervisor.events.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        if tx
            .send(Bytes::from_static(b": watching Warden's events\n\n"))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let chunk = tokio::select! {
                received = watcher.next() => match received {
                    Received::Event(event) => {
                        if kinds.as_ref().is_some_and(|k| !k.iter().any(|k| k == event.what.kind)) {
                            continue;
                        }
                        let data = serde_json::to_string(&*event).unwrap_or_default();
                        format!("event: {}\ndata: {data}\n\n", event.what.kind)
                    }
                    Received::Lagged(lost) => format!(": {lost} events were lost (this watcher fell behind)\n\n"),
                    Received::Closed => return,
                },
                () = tokio::time::sleep(KEEPALIVE) => ": keepalive\n\n".to_owned(),
                () = tx.closed() => return,
            };
            if tx.send(Bytes::from(chunk)).await.is_err() {
                return;
            }
        }
    });
    let mut response = Response::new(ProxyBody::Channel(rx));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /admin/v1/audit/export?format=jsonl|csv|parquet[&since=T][&until=T]`.
pub async fn export_audit(
    state: &AdminState,
    operator: &Operator,
    uri: &http::Uri,
) -> Response<ProxyBody> {
    let format_text = query_param(uri, "format").unwrap_or_else(|| "jsonl".into());
    let Some(format) = ExportFormat::parse(&format_text) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_format",
            format!("format `{format_text}` is not jsonl, csv or parquet"),
        );
    };
    let since = query_param(uri, "since");
    let until = query_param(uri, "until");
    state.recorder.audit(
        &operator.name,
        "audit_export",
        None,
        json!({"format": format_text, "since": since, "until": until}),
    );
    let reader = state.reader.clone();
    let exported = tokio::task::spawn_blocking(move || {
        reader.export_audit(format, since.as_deref(), until.as_deref())
    })
    .await;
    match exported {
        Ok(Ok(bytes)) => {
            let mut response = Response::new(ProxyBody::full(Bytes::from(bytes)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            );
            response
        }
        Ok(Err(e)) => error(
            StatusCode::BAD_REQUEST,
            "export_failed",
            format!("{e} (since/until take timestamps like 2026-11-24 or 2026-11-24 13:00:00)"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}
