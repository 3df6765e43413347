//! The operator-facing listener: `/healthz`, `/metrics`, and the admin API
//! under `/admin/v1/` behind operator tokens.

mod runs;
mod supervision;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::limits::rate::RateLimits;
use crate::limits::{BudgetScope, BudgetSpec, LimitScope, LimitValues, Limits, OnExceed, Period};
use crate::metrics::Metrics;
use crate::money::Usd;
use crate::policy::ModuleSet;
use crate::proxy::body::ProxyBody;
use crate::store::audit::Verification;
use crate::store::query::QueryError;
use crate::store::record::{SettingChange, now_micros};
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
    agents: HashSet<String>,
    reader: StoreReader,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    limits: Arc<Limits>,
    modules: Arc<ModuleSet>,
    supervisor: Arc<crate::supervisor::Supervisor>,
    runs: Arc<crate::workflow::Runs>,
    /// Changes per operator per minute.
    changes: governor::DefaultKeyedRateLimiter<String>,
    changes_per_minute: u32,
}

/// The running parts of Warden the admin API reads and changes.
pub struct Services {
    pub reader: StoreReader,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub limits: Arc<Limits>,
    pub modules: Arc<ModuleSet>,
    pub supervisor: Arc<crate::supervisor::Supervisor>,
    pub runs: Arc<crate::workflow::Runs>,
}

impl AdminState {
    pub fn new(config: &Config, services: Services) -> AdminState {
        let Services {
            reader,
            recorder,
            metrics,
            limits,
            modules,
            supervisor,
            runs,
        } = services;
        let per_minute = std::num::NonZeroU32::new(config.server.admin_changes_per_minute)
            .unwrap_or(std::num::NonZeroU32::MIN);
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
            agents: config
                .agents
                .iter()
                .map(|a| a.name.get_ref().clone())
                .collect(),
            reader,
            recorder,
            metrics,
            limits,
            modules,
            supervisor,
            runs,
            changes: governor::RateLimiter::keyed(governor::Quota::per_minute(per_minute)),
            changes_per_minute: per_minute.get(),
        }
    }

    /// Gate for every mutating admin call: the operator must be allowed to
    /// change things and within its rate of changes. Refusals are audited.
    fn may_change(&self, operator: &Operator, what: &str) -> Option<Response<ProxyBody>> {
        if operator.read_only {
            self.recorder.audit(
                &operator.name,
                "admin_refused",
                None,
                json!({"action": what, "reason": "read_only"}),
            );
            return Some(error(
                StatusCode::FORBIDDEN,
                "read_only_operator",
                format!(
                    "operator `{}` is read-only (read_only = true in [[operators]]) and lacks the `write` permission needed to {what}; ask an operator who may change settings",
                    operator.name
                ),
            ));
        }
        if self.changes.check_key(&operator.name).is_err() {
            self.recorder.audit(
                &operator.name,
                "admin_refused",
                None,
                json!({"action": what, "reason": "rate_limited"}),
            );
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                "admin_rate_limited",
                format!(
                    "operator `{}` made more than {} changes in the last minute ([server] admin_changes_per_minute); wait and retry",
                    operator.name, self.changes_per_minute
                ),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return Some(response);
        }
        None
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
    ProxyBody::json(status, Bytes::from(body.to_string()))
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
        (Method::GET, "/admin/v1/budgets") => json_response(
            StatusCode::OK,
            json!({"budgets": state.limits.budgets().status(now_micros())}),
        ),
        (Method::POST, "/admin/v1/budgets") => {
            if let Some(refused) = state.may_change(&operator, "change a budget") {
                return refused;
            }
            match read_json::<BudgetChange>(
                request,
                r#"{"scope": "agent:NAME", "limit_usd": "5.00", "period": "day"}"#,
            )
            .await
            {
                Ok(change) => set_budget(state, &operator, change).await,
                Err(response) => response,
            }
        }
        (Method::GET, "/admin/v1/limits") => json_response(
            StatusCode::OK,
            json!({"limits": limits_status(&state.limits.rates())}),
        ),
        (Method::POST, "/admin/v1/limits") => {
            if let Some(refused) = state.may_change(&operator, "change a rate limit") {
                return refused;
            }
            match read_json::<LimitChange>(request, r#"{"scope": "agent:NAME", "requests_per_minute": 60, "tokens_per_minute": 100000}"#).await {
                Ok(change) => set_limit(state, &operator, change).await,
                Err(response) => response,
            }
        }
        (Method::GET, "/admin/v1/policies") => {
            json_response(StatusCode::OK, json!({"modules": state.modules.list()}))
        }
        (Method::POST, p) if p.starts_with("/admin/v1/policies/") => {
            if let Some(refused) = state.may_change(&operator, "deploy a module") {
                return refused;
            }
            let name = p.trim_start_matches("/admin/v1/policies/").to_owned();
            deploy_module(state, &operator, name, request).await
        }
        (Method::POST, "/admin/v1/query") => {
            let query: QueryRequest = match read_json(request, r#"{"sql": "..."}"#).await {
                Ok(query) => query,
                Err(response) => return response,
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
                Ok(Err(e @ QueryError::OutOfMemory(_))) => error(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "query_out_of_memory",
                    e.to_string(),
                ),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
            }
        }
        (Method::GET, "/admin/v1/approvals") => {
            let all = query_flag(request.uri(), "all");
            json_response(
                StatusCode::OK,
                json!({"approvals": state.supervisor.approvals.list(all)}),
            )
        }
        (Method::POST, p) if p.starts_with("/admin/v1/approvals/") => {
            let rest = p.trim_start_matches("/admin/v1/approvals/");
            let Some((id, verb)) = rest.rsplit_once('/') else {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "POST /admin/v1/approvals/ID/approve or /admin/v1/approvals/ID/reject",
                );
            };
            let approve = match verb {
                "approve" => true,
                "reject" => false,
                _ => {
                    return error(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        format!("no action `{verb}`; use approve or reject"),
                    );
                }
            };
            if let Some(refused) = state.may_change(&operator, &format!("{verb} a call")) {
                return refused;
            }
            let id = id.to_owned();
            supervision::decide(state, &operator, &id, approve, request).await
        }
        (Method::GET, "/admin/v1/workflows") => json_response(
            StatusCode::OK,
            json!({"workflows": state.runs.workflows().list()}),
        ),
        (Method::GET, p) if p.starts_with("/admin/v1/workflows/") && p.ends_with("/history") => {
            let name = &p["/admin/v1/workflows/".len()..p.len() - "/history".len()];
            runs::history(state, name).await
        }
        (Method::POST, p) if p.starts_with("/admin/v1/workflows/") && p.ends_with("/rollback") => {
            if let Some(refused) = state.may_change(&operator, "roll back a workflow") {
                return refused;
            }
            let name = p["/admin/v1/workflows/".len()..p.len() - "/rollback".len()].to_owned();
            runs::rollback(state, &operator, &name, request).await
        }
        (Method::GET, "/admin/v1/insights") => runs::insights(state).await,
        (Method::POST, "/admin/v1/runs") => {
            if let Some(refused) = state.may_change(&operator, "start a run") {
                return refused;
            }
            runs::start(state, &operator, request).await
        }
        (Method::GET, "/admin/v1/runs") => runs::list(state, request.uri()).await,
        (Method::POST, p) if p.starts_with("/admin/v1/runs/") && p.ends_with("/cancel") => {
            if let Some(refused) = state.may_change(&operator, "cancel a run") {
                return refused;
            }
            let run_id = p["/admin/v1/runs/".len()..p.len() - "/cancel".len()].to_owned();
            runs::cancel(state, &operator, &run_id, request).await
        }
        (Method::GET, p) if p.starts_with("/admin/v1/runs/") => {
            runs::show(state, &p["/admin/v1/runs/".len()..]).await
        }
        (Method::GET, "/admin/v1/halts") => json_response(
            StatusCode::OK,
            json!({"halts": state.supervisor.halts.list()}),
        ),
        (Method::POST, "/admin/v1/halts") => {
            if let Some(refused) = state.may_change(&operator, "halt") {
                return refused;
            }
            supervision::halt(state, &operator, request).await
        }
        (Method::POST, "/admin/v1/resume") => {
            if let Some(refused) = state.may_change(&operator, "resume") {
                return refused;
            }
            supervision::resume(state, &operator, request).await
        }
        (Method::GET, "/admin/v1/events") => supervision::events(state, request.uri()),
        (Method::GET, "/admin/v1/audit/export") => {
            supervision::export_audit(state, &operator, request.uri()).await
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

/// `?NAME=true` or `?NAME=1` or a bare `?NAME`.
fn query_flag(uri: &http::Uri, name: &str) -> bool {
    query_param(uri, name).is_some_and(|v| v.is_empty() || v == "true" || v == "1")
}

/// One query parameter, percent-decoded.
fn query_param(uri: &http::Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| {
            // Form encoding: `+` is a space, a literal `+` is `%2B`.
            percent_encoding::percent_decode_str(&value.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

async fn read_json<T: serde::de::DeserializeOwned>(
    request: Request<Incoming>,
    example: &str,
) -> Result<T, Response<ProxyBody>> {
    let body = Limited::new(request.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("could not read the body: {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("expected JSON like {example}: {e}"),
        )
    })
}

/// Largest module `warden policy deploy` accepts.
const MAX_MODULE_BYTES: usize = 64 << 20;

async fn deploy_module(
    state: &AdminState,
    operator: &Operator,
    name: String,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let bytes = match Limited::new(request.into_body(), MAX_MODULE_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "bad_module",
                format!("could not read the module (at most {MAX_MODULE_BYTES} bytes): {e}"),
            );
        }
    };
    let modules = state.modules.clone();
    let by = operator.name.clone();
    let deployed = tokio::task::spawn_blocking(move || modules.deploy(&name, &bytes, &by)).await;
    match deployed {
        Ok(Ok(sha256)) => {
            state.recorder.flush().await;
            json_response(StatusCode::OK, json!({"deployed": true, "sha256": sha256}))
        }
        Ok(Err(crate::policy::PolicyError::Unknown(name))) => error(
            StatusCode::NOT_FOUND,
            "unknown_module",
            format!(
                "no policy or plugin is named `{name}`; `warden policy list` shows the loaded ones"
            ),
        ),
        Ok(Err(e)) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "module_refused",
            format!("the module was refused and the previous version keeps serving: {e}"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetChange {
    scope: String,
    limit_usd: crate::config::Amount,
    period: Option<String>,
    on_exceed: Option<String>,
}

async fn set_budget(
    state: &AdminState,
    operator: &Operator,
    change: BudgetChange,
) -> Response<ProxyBody> {
    let bad = |message: String| error(StatusCode::BAD_REQUEST, "invalid_budget", message);
    let scope = match BudgetScope::parse(&change.scope) {
        Ok(scope) => scope,
        Err(e) => return bad(e.to_string()),
    };
    if let BudgetScope::Agent(name) = &scope
        && !state.agents.contains(name)
    {
        return bad(format!("no agent named `{name}` is configured"));
    }
    let limit: Usd = match change.limit_usd.to_usd() {
        Ok(limit) => limit,
        Err(e) => return bad(format!("limit_usd: {e}")),
    };
    let existing: Vec<BudgetSpec> = state
        .limits
        .budgets()
        .budgets()
        .iter()
        .filter(|b| b.scope == scope)
        .map(|b| b.spec())
        .collect();
    let period = match change.period.as_deref() {
        Some(text) => match Period::parse(text) {
            Some(period) => period,
            None => {
                return bad(format!(
                    "period `{text}` is not one of hour, day, week, month, total"
                ));
            }
        },
        None => match existing.as_slice() {
            [] => Period::Day,
            [only] => only.period,
            _ => {
                return bad(format!(
                    "`{scope}` has budgets for several periods; say which with period (--period)"
                ));
            }
        },
    };
    let on_exceed = match change.on_exceed.as_deref() {
        Some(text) => match OnExceed::parse(text) {
            Some(on_exceed) => on_exceed,
            None => {
                return bad(format!(
                    "on_exceed `{text}` is not one of deny, require_approval, halt, alert"
                ));
            }
        },
        None => existing
            .iter()
            .find(|b| b.period == period)
            .map_or(OnExceed::Deny, |b| b.on_exceed),
    };
    let spec = BudgetSpec {
        scope,
        period,
        limit,
        on_exceed,
    };
    // Durable first: the change is committed before it is reported done.
    state.recorder.setting(SettingChange::Budget {
        operator: operator.name.clone(),
        scope: spec.scope.to_string(),
        period: spec.period.as_str(),
        limit_usd: spec.limit,
        on_exceed: spec.on_exceed.as_str(),
    });
    state.recorder.audit(
        &operator.name,
        "budget_set",
        Some(&spec.scope.to_string()),
        json!({"period": spec.period.as_str(), "limit_usd": spec.limit.to_string(), "on_exceed": spec.on_exceed.as_str()}),
    );
    state.recorder.flush().await;
    let created = state.limits.budgets().set(&spec, now_micros());
    let scope_text = spec.scope.to_string();
    let status: Vec<_> = state
        .limits
        .budgets()
        .status(now_micros())
        .into_iter()
        .filter(|b| b.scope == scope_text && b.period == spec.period)
        .collect();
    json_response(
        StatusCode::OK,
        json!({"created": created, "budgets": status}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitChange {
    scope: String,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u64>,
}

async fn set_limit(
    state: &AdminState,
    operator: &Operator,
    change: LimitChange,
) -> Response<ProxyBody> {
    let bad = |message: String| error(StatusCode::BAD_REQUEST, "invalid_limit", message);
    let scope = match LimitScope::parse(&change.scope) {
        Ok(scope) => scope,
        Err(e) => return bad(e.to_string()),
    };
    if let LimitScope::Agent(name) = &scope
        && !state.agents.contains(name)
    {
        return bad(format!("no agent named `{name}` is configured"));
    }
    if change.requests_per_minute == Some(0) || change.tokens_per_minute == Some(0) {
        return bad("a limit must be above 0; send null (or leave it out) for no limit".into());
    }
    let values = LimitValues {
        requests_per_minute: change.requests_per_minute,
        tokens_per_minute: change.tokens_per_minute,
    };
    state.recorder.setting(SettingChange::Limit {
        operator: operator.name.clone(),
        scope: scope.to_string(),
        requests_per_minute: values.requests_per_minute,
        tokens_per_minute: values.tokens_per_minute,
    });
    state.recorder.audit(
        &operator.name,
        "limit_set",
        Some(&scope.to_string()),
        json!({"requests_per_minute": values.requests_per_minute, "tokens_per_minute": values.tokens_per_minute}),
    );
    state.recorder.flush().await;
    state.limits.set_rate(scope, values);
    json_response(
        StatusCode::OK,
        json!({"limits": limits_status(&state.limits.rates())}),
    )
}

fn limits_status(rates: &RateLimits) -> serde_json::Value {
    rates
        .all()
        .iter()
        .map(|limit| {
            json!({
                "scope": limit.scope.to_string(),
                "requests_per_minute": limit.values.requests_per_minute,
                "tokens_per_minute": limit.values.tokens_per_minute,
                "tokens_available": RateLimits::tokens_available(limit),
            })
        })
        .collect()
}
