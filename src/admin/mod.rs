//! The operator-facing listener: `/healthz`, `/metrics`, and the admin API
//! under `/admin/v1/` behind operator tokens.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::body::ProxyBody;
use crate::store::audit::Verification;
use crate::store::query::QueryError;
use crate::store::{Recorder, StoreReader};

/// Rows returned by one query at most; `warden query` says when it cut.
pub const MAX_QUERY_ROWS: usize = 10_000;
const MAX_ADMIN_BODY: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct Operator {
    pub name: String,
    pub read_only: bool,
}

pub struct AdminState {
    operators: HashMap<[u8; 32], Operator>,
    reader: StoreReader,
    recorder: Recorder,
    metrics: Arc<Metrics>,
}

impl AdminState {
    pub fn new(
        config: &Config,
        reader: StoreReader,
        recorder: Recorder,
        metrics: Arc<Metrics>,
    ) -> AdminState {
        let operators = config
            .operators
            .iter()
            .filter_map(|op| {
                let mut digest = [0u8; 32];
                hex::decode_to_slice(op.token_sha256.get_ref(), &mut digest).ok()?;
                Some((
                    digest,
                    Operator {
                        name: op.name.get_ref().clone(),
                        read_only: op.read_only,
                    },
                ))
            })
            .collect();
        AdminState {
            operators,
            reader,
            recorder,
            metrics,
        }
    }

    fn authenticate(&self, headers: &http::HeaderMap) -> Option<&Operator> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))?;
        let digest: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        self.operators.get(&digest)
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<ProxyBody> {
    json_response(
        status,
        json!({"error": {"code": code, "message": message.into()}}),
    )
}

pub async fn handle(state: Arc<AdminState>, request: Request<Incoming>) -> Response<ProxyBody> {
    let path = request.uri().path().to_owned();
    match (request.method(), path.as_str()) {
        (&Method::GET, "/healthz") => json_response(
            StatusCode::OK,
            json!({"status": "ok", "store_queue_depth": state.recorder.queue_depth()}),
        ),
        (&Method::GET, "/metrics") => {
            let mut response = Response::new(ProxyBody::full(Bytes::from(
                state.metrics.render(state.recorder.queue_depth()),
            )));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        (_, p) if p.starts_with("/admin/v1/") => {
            let Some(operator) = state.authenticate(request.headers()).cloned() else {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_token",
                    "unknown operator token; pass it with --token or WARDEN_TOKEN (Authorization: Bearer)",
                );
            };
            admin_api(&state, operator, request).await
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no admin endpoint at {path}"),
        ),
    }
}

#[derive(Deserialize)]
struct QueryRequest {
    sql: String,
    max_rows: Option<usize>,
}

async fn admin_api(
    state: &Arc<AdminState>,
    operator: Operator,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    match (method, path.as_str()) {
        (Method::GET, "/admin/v1/whoami") => json_response(
            StatusCode::OK,
            json!({"operator": operator.name, "read_only": operator.read_only}),
        ),
        (Method::POST, "/admin/v1/query") => {
            let body = match Limited::new(request.into_body(), MAX_ADMIN_BODY)
                .collect()
                .await
            {
                Ok(body) => body.to_bytes(),
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_body",
                        format!("could not read the body: {e}"),
                    );
                }
            };
            let query: QueryRequest = match serde_json::from_slice(&body) {
                Ok(query) => query,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_body",
                        format!("expected {{\"sql\": \"...\"}}: {e}"),
                    );
                }
            };
            let max_rows = query.max_rows.unwrap_or(MAX_QUERY_ROWS).min(MAX_QUERY_ROWS);
            state
                .recorder
                .audit(&operator.name, "query", None, json!({"sql": query.sql}));
            let reader = state.reader.clone();
            let sql = query.sql;
            let result = tokio::task::spawn_blocking(move || reader.query(&sql, max_rows)).await;
            match result {
                Ok(Ok(result)) => json_response(
                    StatusCode::OK,
                    serde_json::to_value(result).unwrap_or_default(),
                ),
                Ok(Err(QueryError::NotARead(message))) => error(
                    StatusCode::FORBIDDEN,
                    "read_only",
                    format!("warden query is read-only: {message}"),
                ),
                Ok(Err(QueryError::Sql(message))) => {
                    error(StatusCode::BAD_REQUEST, "sql_error", message)
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
            }
        }
        (Method::GET, "/admin/v1/audit/verify") => {
            let reader = state.reader.clone();
            match tokio::task::spawn_blocking(move || reader.verify_audit()).await {
                Ok(Ok(Verification::Intact { rows, head })) => json_response(
                    StatusCode::OK,
                    json!({"intact": true, "rows": rows, "head": head}),
                ),
                Ok(Ok(Verification::Broken { seq, reason })) => json_response(
                    StatusCode::OK,
                    json!({"intact": false, "seq": seq, "reason": reason}),
                ),
                Ok(Err(e)) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store_error",
                    e.to_string(),
                ),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
            }
        }
        (_, p) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no admin endpoint at {p}"),
        ),
    }
}
