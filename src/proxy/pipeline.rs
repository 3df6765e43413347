//! The request path, one stage after another:
//!
//! identify -> read -> inspect -> route -> forward -> respond (meter, settle,
//! record).
//!
//! Each stage either hands the call on or refuses it with a `Refusal`, which
//! the driver answers in the caller's format and records.

use std::sync::Arc;

use crate::http_client::ResponseBody;
use bytes::Bytes;
use futures_util::future::Either;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use tracing::Instrument;

use super::ProxyState;
use super::body::{MeteredStream, ProxyBody};
use super::call::{BUDGET_REMAINING_HEADER, COST_HEADER, Call, Refusal, Settlement};
use super::govern;
use super::headers;
use super::supervise::{self, ApprovalAsk};
use super::upstream::{Route, Upstream};
use crate::http_server::RequestBody;
use crate::limits::rate::{HeaderNumbers, LimitedBy, RateHeaders, openai_duration};
use crate::limits::{AdmitError, CallFacts, CallSubject, OnExceed};
use crate::metering::{MeterReport, StreamMeter};
use crate::providers::{self, Endpoint, ErrorKind, ProviderKind, RequestFacts, anthropic, openai};
use crate::store::record::Outcome;

/// The driver: runs the stages and turns a refusal into an answer.
///
/// A plain function returning the driver itself rather than an `async fn`
/// awaiting it: rustc lays an awaited future out twice in the awaiting one
/// (rust-lang/rust#62958), which was 1.3 KB of every held call.
pub fn handle(
    state: Arc<ProxyState>,
    request: Request<RequestBody>,
) -> impl Future<Output = Response<ProxyBody>> + Send {
    if request.uri().path().starts_with(super::work::PREFIX) {
        return Either::Left(Box::pin(async move {
            super::work::handle(&state, request).await
        }));
    }
    let endpoint = Endpoint::from_request(request.method(), request.uri().path());
    // The model list is shared by both APIs: the caller's SDK tells which.
    let protocol = match endpoint {
        Some(endpoint) if endpoint != Endpoint::Models => endpoint.protocol(),
        _ => Endpoint::guess_protocol(request.uri().path(), request.headers()),
    };
    let mut call = Call::begin(state.clone(), protocol);
    let span = tracing::debug_span!("call", call_id = %call.id);
    // What the block captures stays in its frame for the whole call, even
    // once moved on: boxed, and the box handed on to `admit` (which frees
    // it), the request costs a held call nothing.
    let request = Box::new(request);
    let driver = async move {
        let Some(endpoint) = endpoint else {
            call.set_unknown_path(request.uri().path());
            let message = format!(
                "Warden does not serve {} {}; it serves the OpenAI and Anthropic endpoints under /v1",
                request.method(),
                request.uri().path()
            );
            return call.refuse(Refusal::new(
                ErrorKind::NotFound,
                "unknown_endpoint",
                message,
            ));
        };
        call.endpoint = Some(endpoint);
        // The stages before and after an approval hold are boxed: a call
        // waiting for an operator (minutes, thousands at once) keeps only
        // this frame, not the largest state any stage ever needs. Values
        // are moved on whole, not matched apart, and what is borrowed lives
        // in a block: rustc keeps room across every later await for a local
        // moved out of only in part, or ever borrowed, until its scope ends.
        let admitted = {
            let admitting = Box::pin(admit(&state, &mut call, endpoint, request));
            let (mut admitted, approval) = match admitting.await {
                Ok(Stage::Done(response)) => return response,
                Ok(Stage::Admitted(admitted, approval)) => (admitted, approval),
                Err(refusal) => return call.refuse(refusal),
            };
            let held = match supervise::ask_approval(
                &state,
                &mut call,
                approval,
                endpoint,
                &admitted.facts,
                &admitted.body,
            ) {
                Ok(held) => held,
                Err(refusal) => return call.refuse(refusal),
            };
            if held.is_some() {
                admitted.headers = headers::keep_upstream_headers(&admitted.headers);
            }
            let decided = supervise::await_decision(&state, &mut call, held).await;
            if let Err(refusal) = decided {
                return call.refuse(refusal);
            }
            admitted
        };
        let forwarded = Box::pin(forward(&state, &mut call, endpoint, admitted)).await;
        let responding = Box::pin(respond(call, endpoint, forwarded));
        responding.await
    };
    Either::Right(driver.instrument(span))
}

enum Stage {
    /// Answered by Warden itself.
    Done(Response<ProxyBody>),
    /// Identified, read, routed, within its limits, passed by the policies;
    /// it may still need an operator's approval.
    Admitted(Admitted, Option<ApprovalAsk>),
}

/// What a call carries from admission, through a possible hold, to its upstream.
struct Admitted {
    headers: HeaderMap,
    body: Bytes,
    facts: RequestFacts,
    upstream: Arc<Upstream>,
}

struct UpstreamResponse {
    response: Response<ResponseBody>,
    strip_usage_chunk: bool,
}

async fn admit(
    state: &ProxyState,
    call: &mut Call,
    endpoint: Endpoint,
    request: Box<Request<RequestBody>>,
) -> Result<Stage, Refusal> {
    let (parts, body) = (*request).into_parts();

    // identify
    let agent = state.agents.identify(&parts.headers).ok_or_else(|| {
        Refusal::new(
            ErrorKind::InvalidKey,
            "invalid_api_key",
            "Warden does not know this API key. Use the agent key your operator issued (Authorization: Bearer <key> or x-api-key).",
        )
    })?;
    call.agent = Some(agent.name.clone());
    call.run_id = header_text(&parts.headers, &RUN_HEADER);
    call.step_id = header_text(&parts.headers, &STEP_HEADER);
    if endpoint == Endpoint::Models {
        return Ok(Stage::Done(state.models_response(call)));
    }

    // halt check
    supervise::check_halts(state, &agent.name, call.run_id.as_deref())?;

    // read
    let body = read_body(body, state.max_body_bytes).await?;

    // inspect
    let facts = RequestFacts::parse(&body).map_err(|e| {
        let code = match e {
            providers::RequestError::MalformedJson(_) => "invalid_json",
            providers::RequestError::MissingModel => "missing_model",
        };
        Refusal::new(ErrorKind::InvalidRequest, code, e.to_string())
    })?;
    call.model = Some(facts.model.clone());
    call.stream = facts.stream;

    // route
    let upstream = match state.router.route(&facts.model, endpoint.protocol()) {
        Route::Found(upstream) => upstream.clone(),
        Route::WrongFormat(upstream) => {
            return Err(Refusal::new(
                ErrorKind::InvalidRequest,
                "wrong_api_format",
                format!(
                    "model `{}` is served by upstream `{}`, which speaks the {} format; call it on that API's endpoint",
                    facts.model,
                    upstream.name,
                    upstream.kind.as_str()
                ),
            ));
        }
        Route::Unknown => {
            return Err(Refusal::new(
                ErrorKind::NotFound,
                "model_not_found",
                format!(
                    "The model `{}` does not exist or no configured upstream serves it; GET /v1/models lists the models Warden serves.",
                    facts.model
                ),
            ));
        }
    };
    call.upstream = Some(upstream.name.clone());
    call.provider = Some(upstream.kind.as_str());
    call.price = state.prices.lookup(&facts.model);

    // the workflow run and step the call serves
    bind_to_run(state, call, &agent.name, endpoint, &body, facts.max_tokens)?;

    // limit: requests, then the budget reservation, then tokens
    let mut admission = state
        .limits
        .admit(&CallFacts {
            subject: CallSubject {
                agent: &agent.name,
                model: &facts.model,
                run_id: call.run_id.as_deref(),
                workflow: call.binding.as_ref().map(|b| b.workflow.name.as_str()),
            },
            endpoint,
            body: &body,
            max_tokens: facts.max_tokens,
            price: call.price.as_deref(),
        })
        .map_err(|e| match e {
            AdmitError::Budget(refusal) if refusal.on_exceed == OnExceed::Halt => {
                supervise::budget_halt(state, &agent.name, call.run_id.as_deref(), &refusal)
            }
            e => admission_refusal(e, &facts.model),
        })?;
    let mut approval = admission
        .take_needs_approval()
        .map(|refusal| ApprovalAsk::for_budget(&refusal));
    call.admission = Some(admission);
    // policies (the hold and the plugins come after admission)
    if state.modules.has_policies()
        && let Some(ask) = govern::apply_policies(
            state,
            call,
            govern::CallContext {
                agent,
                upstream: &upstream,
                endpoint,
                facts: &facts,
                body: &body,
                headers: &parts.headers,
            },
        )
        .await?
    {
        approval = Some(ask);
    }
    Ok(Stage::Admitted(
        Admitted {
            headers: parts.headers,
            body,
            facts,
            upstream,
        },
        approval,
    ))
}

/// plugins, then forward
async fn forward(
    state: &ProxyState,
    call: &mut Call,
    endpoint: Endpoint,
    admitted: Admitted,
) -> Result<UpstreamResponse, Refusal> {
    let Admitted {
        headers: agent_headers,
        mut body,
        mut facts,
        upstream,
        ..
    } = admitted;
    if state.modules.has_plugins() {
        let (new_body, new_facts) = govern::apply_plugins(state, call, body, &facts).await?;
        body = new_body;
        if let Some(new_facts) = new_facts {
            facts = new_facts;
        }
    }
    let strip_usage_chunk = facts.stream
        && endpoint.takes_stream_options()
        && upstream.kind == ProviderKind::OpenAi
        && facts.include_usage != Some(true);
    let upstream_body = if strip_usage_chunk {
        openai::request_usage_in_stream(&body, facts.has_stream_options)
    } else {
        body.clone()
    };
    call.request_body = body;
    let request = upstream_request(&upstream, endpoint, agent_headers, upstream_body)?;
    call.watch_halts();
    // Built inside the select: a future bound to a local first is laid out
    // twice in this one, once as the local and once in the select.
    let exchanged = tokio::select! {
        halt = call.halted() => return Err(Refusal::halted(&halt).after_upstream()),
        exchanged = tokio::time::timeout(state.upstream_timeout, state.client.request(request)) => exchanged,
    };
    let response = exchanged
        .map_err(|_| {
            Refusal::new(
                ErrorKind::UpstreamTimeout,
                "upstream_timeout",
                format!(
                    "the upstream `{}` did not answer within {} s",
                    upstream.name,
                    state.upstream_timeout.as_secs()
                ),
            )
        })?
        .map_err(|e| {
            Refusal::new(
                ErrorKind::UpstreamFailed,
                "upstream_unreachable",
                format!(
                    "cannot reach the upstream `{}`: {}",
                    upstream.name,
                    error_chain(&e)
                ),
            )
        })?;
    call.mark_first_byte();
    Ok(UpstreamResponse {
        response,
        strip_usage_chunk,
    })
}

/// Binds the call to the workflow run and step it serves (its
/// `x-warden-run` / `x-warden-step` headers, or its agent's only running
/// step), so that run budgets apply and its answer can end the step. A step
/// with a `budget_usd` holds the call's upper-bound cost.
fn bind_to_run(
    state: &ProxyState,
    call: &mut Call,
    agent: &str,
    endpoint: Endpoint,
    body: &[u8],
    max_tokens: Option<u64>,
) -> Result<(), Refusal> {
    use crate::workflow::RunsError;
    // The headers are taken for the lookup so that the cost bound can use
    // (and fill) the call's own upper-bound memo; a binding then sets them.
    let (run_header, step_header) = (call.run_id.take(), call.step_id.take());
    let mut cost_bound = || {
        call.upper_bound(endpoint, body, max_tokens)
            .cost
            .unwrap_or(crate::money::Usd::ZERO)
    };
    let binding = state
        .runs
        .bind(
            agent,
            run_header.as_deref(),
            step_header.as_deref(),
            &mut cost_bound,
        )
        .map_err(|e| {
            let (kind, code) = match e {
                RunsError::UnknownStep { .. } => (ErrorKind::InvalidRequest, "unknown_step"),
                RunsError::RetryLater { .. } => (ErrorKind::Conflict, "step_retry_pending"),
                _ => (ErrorKind::Forbidden, "step_not_assigned"),
            };
            Refusal::new(kind, code, e.to_string())
        });
    call.run_id = run_header;
    call.step_id = step_header;
    let binding = binding?;
    let Some(binding) = binding else {
        return Ok(());
    };
    call.run_id = Some(binding.run_id.clone());
    call.step_id = binding.step.as_ref().map(|s| s.id.clone());
    let over_budget = binding.step.as_ref().and_then(|s| s.over_budget.clone());
    // Bound even when refused: the refusal fails the step's attempt.
    call.binding = Some(Box::new(binding));
    if let Some(message) = over_budget {
        let mut headers = HeaderMap::new();
        headers.insert("x-should-retry", HeaderValue::from_static("false"));
        return Err(
            Refusal::new(ErrorKind::RateLimited, "budget_exceeded", message)
                .with_outcome(Outcome::BudgetExceeded)
                .with_headers(headers),
        );
    }
    Ok(())
}

/// A refused admission in the caller's format. Rate limits carry the
/// headers the official SDKs read to wait (`retry-after-ms`, `retry-after`)
/// and OpenAI's `x-ratelimit-*`; an exhausted budget says not to retry.
fn admission_refusal(error: AdmitError, model: &str) -> Refusal {
    match error {
        AdmitError::Rate(refusal) => {
            let mut headers = HeaderMap::new();
            rate_headers(&mut headers, &refusal.headers);
            let limit = match refusal.what {
                LimitedBy::Requests => "requests per minute",
                LimitedBy::Tokens { .. } => "tokens per minute",
            };
            let Some(wait) = refusal.retry_after else {
                let asked = match refusal.what {
                    LimitedBy::Tokens { asked } => asked,
                    LimitedBy::Requests => 0,
                };
                return Refusal::new(
                    ErrorKind::InvalidRequest,
                    "request_exceeds_token_limit",
                    format!(
                        "this call may use up to {asked} tokens (its input and max_tokens), more than the {limit} limit of {} allows at once; lower max_tokens or shorten the input",
                        refusal.scope
                    ),
                )
                .with_outcome(Outcome::RateLimited)
                .with_headers(headers);
            };
            let millis = wait.as_millis().max(1);
            insert_header(&mut headers, "retry-after-ms", millis.to_string());
            insert_header(&mut headers, "retry-after", wait.as_secs_f64().ceil().max(1.0).to_string());
            Refusal::new(
                ErrorKind::RateLimited,
                "rate_limit_exceeded",
                format!(
                    "rate limit of {} reached ({limit}); retry in {}",
                    refusal.scope,
                    openai_duration(wait)
                ),
            )
            .with_outcome(Outcome::RateLimited)
            .with_headers(headers)
        }
        AdmitError::Budget(refusal) => {
            let mut headers = HeaderMap::new();
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
            Refusal::new(ErrorKind::RateLimited, "budget_exceeded", refusal.message())
                .with_outcome(Outcome::BudgetExceeded)
                .with_headers(headers)
        }
        AdmitError::Unpriced => Refusal::new(
            ErrorKind::Forbidden,
            "model_not_priced",
            format!(
                "a budget counts this call, but Warden has no price for model `{model}` and cannot hold it to the budget; add the model to the [prices] file"
            ),
        )
        .with_outcome(Outcome::BudgetExceeded),
    }
}

fn rate_headers(headers: &mut HeaderMap, numbers: &RateHeaders) {
    let mut put = |kind: &str, n: &HeaderNumbers| {
        insert_header(
            headers,
            &format!("x-ratelimit-limit-{kind}"),
            n.limit.to_string(),
        );
        insert_header(
            headers,
            &format!("x-ratelimit-remaining-{kind}"),
            n.remaining.to_string(),
        );
        insert_header(
            headers,
            &format!("x-ratelimit-reset-{kind}"),
            openai_duration(n.reset),
        );
    };
    if let Some(n) = &numbers.requests {
        put("requests", n);
    }
    if let Some(n) = &numbers.tokens {
        put("tokens", n);
    }
}

fn insert_header(headers: &mut HeaderMap, name: &str, value: String) {
    if let (Ok(name), Ok(value)) = (
        http::HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(&value),
    ) {
        headers.insert(name, value);
    }
}

// Names, not strings: a lookup by `&str` parses the name on every call.
static RUN_HEADER: HeaderName = HeaderName::from_static("x-warden-run");
static STEP_HEADER: HeaderName = HeaderName::from_static("x-warden-step");

fn header_text(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(|v| v.chars().take(200).collect())
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn read_body(body: RequestBody, limit: u64) -> Result<Bytes, Refusal> {
    body.read(limit).await.map_err(|e| {
        let (kind, code) = e.kind_and_code();
        Refusal::new(kind, code, e.to_string())
    })
}

fn upstream_request(
    upstream: &Upstream,
    endpoint: Endpoint,
    agent_headers: HeaderMap,
    body: Bytes,
) -> Result<Request<Bytes>, Refusal> {
    let mut headers = headers::upstream_request_headers(agent_headers);
    if let Some((name, value)) = upstream.auth_header() {
        headers.insert(name.clone(), value.clone());
    }
    if upstream.kind == ProviderKind::Anthropic && !headers.contains_key("anthropic-version") {
        headers.insert(
            "anthropic-version",
            HeaderValue::from_static(anthropic::DEFAULT_VERSION),
        );
    }
    if !headers.contains_key(header::CONTENT_TYPE) {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    let mut request = Request::new(body);
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = upstream.url(endpoint).clone();
    *request.headers_mut() = headers;
    Ok(request)
}

/// meter, settle, record
async fn respond(
    mut call: Call,
    endpoint: Endpoint,
    forwarded: Result<UpstreamResponse, Refusal>,
) -> Response<ProxyBody> {
    let upstream = match forwarded {
        Ok(upstream) => upstream,
        Err(refusal) => return call.refuse(refusal),
    };
    let (mut parts, body) = upstream.response.into_parts();
    if parts.status == StatusCode::UNAUTHORIZED {
        // The agent's key was fine; Warden's provider key was not. Saying so
        // keeps the agent from blaming its own key, and keeps the provider's
        // echo of the key out of the agent's hands.
        let upstream_name = call.upstream_name();
        return call.refuse(Refusal::new(
            ErrorKind::UpstreamFailed,
            "upstream_auth_failed",
            format!("the upstream `{upstream_name}` rejected Warden's provider key; tell the Warden operator"),
        ));
    }
    headers::agent_response_headers(&mut parts.headers);
    parts
        .headers
        .insert(super::call::CALL_ID_HEADER.clone(), call.id_header());
    let is_stream = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));

    if is_stream && parts.status.is_success() {
        let mut meter = StreamMeter::new(endpoint, upstream.strip_usage_chunk);
        if call.reads_answer() {
            meter = meter.with_answer();
        }
        let stream = MeteredStream::new(body, meter, call, parts.status);
        return Response::from_parts(parts, ProxyBody::Metered(Box::new(stream)));
    }

    let collected = tokio::select! {
        halt = call.halted() => return call.refuse(Refusal::halted(&halt).after_upstream()),
        collected = body.bytes() => collected,
    };
    let bytes = match collected {
        Ok(bytes) => bytes,
        Err(e) => {
            let upstream_name = call.upstream_name();
            return call.refuse(Refusal::new(
                ErrorKind::UpstreamFailed,
                "upstream_error",
                format!("the upstream `{upstream_name}` broke off its response: {e}"),
            ));
        }
    };
    let status = parts.status;
    let settlement = if status.is_success() {
        let mut report = MeterReport::default();
        if call.reads_answer() {
            report.answer = crate::providers::answer::Answer::from_body(endpoint, &bytes);
        }
        match providers::usage_from_body(endpoint, &bytes) {
            Some(usage) => {
                report.usage = usage;
                report.input_known = true;
                report.output_known = true;
            }
            None => report.text = crate::metering::meter::output_text_of_body(&bytes),
        }
        Settlement::from_report(status, Outcome::Ok, report, None)
    } else {
        let mut report = MeterReport {
            input_known: true,
            output_known: true,
            ..MeterReport::default()
        };
        report.error = Some(upstream_error_summary(status, &bytes));
        Settlement::from_report(status, Outcome::Error, report, None)
    };
    let settled = call.settle(settlement);
    for (name, amount) in [
        (&COST_HEADER, settled.cost),
        (&BUDGET_REMAINING_HEADER, settled.budget_remaining),
    ] {
        if let Some(value) = amount.and_then(|a| HeaderValue::from_str(&a.decimal()).ok()) {
            parts.headers.insert(name.clone(), value);
        }
    }
    Response::from_parts(parts, ProxyBody::full(bytes))
}

/// The upstream's error type and code, without its message: provider
/// messages can echo parts of keys.
fn upstream_error_summary(status: StatusCode, body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Envelope {
        error: Option<Inner>,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        #[serde(rename = "type")]
        kind: Option<String>,
        code: Option<serde_json::Value>,
    }
    let detail = serde_json::from_slice::<Envelope>(body)
        .ok()
        .and_then(|e| e.error)
        .map(|inner| {
            let code = inner
                .code
                .filter(|c| !c.is_null())
                .map(|c| c.as_str().map_or(c.to_string(), str::to_owned));
            [inner.kind, code]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    format!(
        "upstream answered {}{}{}",
        status.as_u16(),
        if detail.is_empty() { "" } else { ": " },
        detail
    )
}
