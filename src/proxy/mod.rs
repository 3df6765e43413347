//! The agent-facing proxy: who is calling, where the call goes, and the
//! pipeline that forwards, meters and records it.

pub mod body;
pub mod call;
pub mod govern;
pub mod headers;
pub mod pipeline;
pub mod supervise;
pub mod upstream;
pub mod work;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, header};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::limits::Limits;
use crate::metering::PriceTable;
use crate::metrics::Metrics;
use crate::policy::ModuleSet;
use crate::providers::ProviderKind;
use crate::store::Recorder;
use body::ProxyBody;
use call::Call;
use upstream::{Router, Upstream, UpstreamError};

/// An agent as configured.
#[derive(Debug)]
pub struct Agent {
    pub name: Arc<str>,
    pub role: String,
    pub capabilities: Vec<String>,
    /// Calls and errors in the last minute, for policies.
    pub activity: crate::policy::activity::Activity,
}

/// Agents by the sha256 of their key: the key itself is never kept.
pub struct AgentDirectory {
    by_digest: HashMap<[u8; 32], Arc<Agent>>,
}

impl AgentDirectory {
    /// The configured agents, and Warden itself (the agent of its own
    /// model-step calls) under a key that exists only in memory.
    pub fn from_config(config: &Config, internal_key_digest: [u8; 32]) -> AgentDirectory {
        let mut by_digest: HashMap<[u8; 32], Arc<Agent>> = config
            .agents
            .iter()
            .filter_map(|agent| {
                let mut digest = [0u8; 32];
                hex::decode_to_slice(agent.key_sha256.get_ref(), &mut digest).ok()?;
                let entry = Agent {
                    name: agent.name.get_ref().as_str().into(),
                    role: agent.role.clone(),
                    capabilities: agent.capabilities.clone(),
                    activity: Default::default(),
                };
                Some((digest, Arc::new(entry)))
            })
            .collect();
        by_digest.insert(
            internal_key_digest,
            Arc::new(Agent {
                name: crate::workflow::WARDEN_AGENT.into(),
                role: "workflow".into(),
                capabilities: Vec::new(),
                activity: Default::default(),
            }),
        );
        AgentDirectory { by_digest }
    }

    /// The agent whose key is in `Authorization: Bearer` or `x-api-key`.
    pub fn identify(&self, headers: &HeaderMap) -> Option<&Arc<Agent>> {
        let key = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))?;
        let digest: [u8; 32] = Sha256::digest(key.trim().as_bytes()).into();
        self.by_digest.get(&digest)
    }
}

/// Everything the request path reads, built once at start. Each proxy
/// worker has its own (its own upstream connection pool); the rest is shared.
pub struct ProxyState {
    pub agents: Arc<AgentDirectory>,
    pub router: Arc<Router>,
    pub prices: Arc<PriceTable>,
    pub limits: Arc<Limits>,
    pub modules: Arc<ModuleSet>,
    pub supervisor: Arc<crate::supervisor::Supervisor>,
    pub runs: Arc<crate::workflow::Runs>,
    /// This worker's in-flight calls, woken by halts.
    pub halt_slots: Arc<crate::halts::WakerSlots>,
    pub client: crate::http_client::UpstreamClient,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub max_body_bytes: u64,
    pub upstream_timeout: Duration,
    models_openai: Bytes,
    models_anthropic: Bytes,
}

/// The services every proxy worker shares.
pub struct Shared {
    pub prices: Arc<PriceTable>,
    pub limits: Arc<Limits>,
    pub modules: Arc<ModuleSet>,
    pub supervisor: Arc<crate::supervisor::Supervisor>,
    pub runs: Arc<crate::workflow::Runs>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
}

impl ProxyState {
    pub fn new(config: &Config, shared: Shared) -> Result<ProxyState, UpstreamError> {
        let Shared {
            prices,
            limits,
            modules,
            supervisor,
            runs,
            recorder,
            metrics,
        } = shared;
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| Upstream::from_config(config, u).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let router = Router::new(upstreams);
        let (models_openai, models_anthropic) = model_listings(&router, &prices);
        Ok(ProxyState {
            agents: Arc::new(AgentDirectory::from_config(
                config,
                runs.internal_key_digest(),
            )),
            router: Arc::new(router),
            prices,
            limits,
            modules,
            halt_slots: supervisor.halts.worker_slots(),
            supervisor,
            runs,
            client: crate::http_client::UpstreamClient::new()?,
            recorder,
            metrics,
            max_body_bytes: config.server.max_body_bytes,
            upstream_timeout: Duration::from_secs(config.server.upstream_timeout_secs),
            models_openai,
            models_anthropic,
        })
    }

    /// The state for another proxy worker: the same agents, routes and
    /// prices, a connection pool of its own.
    pub fn for_worker(&self) -> Result<ProxyState, UpstreamError> {
        Ok(ProxyState {
            agents: self.agents.clone(),
            router: self.router.clone(),
            prices: self.prices.clone(),
            limits: self.limits.clone(),
            modules: self.modules.clone(),
            supervisor: self.supervisor.clone(),
            runs: self.runs.clone(),
            halt_slots: self.supervisor.halts.worker_slots(),
            client: crate::http_client::UpstreamClient::new()?,
            recorder: self.recorder.clone(),
            metrics: self.metrics.clone(),
            max_body_bytes: self.max_body_bytes,
            upstream_timeout: self.upstream_timeout,
            models_openai: self.models_openai.clone(),
            models_anthropic: self.models_anthropic.clone(),
        })
    }

    /// `GET /v1/models`, answered by Warden in the caller's format.
    fn models_response(&self, call: &mut Call) -> Response<ProxyBody> {
        let body = match call.protocol {
            ProviderKind::OpenAi => self.models_openai.clone(),
            ProviderKind::Anthropic => self.models_anthropic.clone(),
        };
        let mut response = Response::new(ProxyBody::full(body));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
            .headers_mut()
            .insert(call::CALL_ID_HEADER.clone(), call.id_header());
        call.settle_local(http::StatusCode::OK);
        response
    }
}

/// The models each upstream serves: its literal names, and the priced models
/// its globs match.
fn model_listings(router: &Router, prices: &PriceTable) -> (Bytes, Bytes) {
    let mut models: Vec<(String, Arc<str>, ProviderKind)> = Vec::new();
    for upstream in router.upstreams() {
        for pattern in upstream.model_patterns() {
            if !pattern.contains(['*', '?']) {
                models.push((pattern.clone(), upstream.name.clone(), upstream.kind));
            }
        }
        for name in prices.model_names() {
            if upstream.serves(name) && !upstream.model_patterns().iter().any(|p| p == name) {
                models.push((name.to_owned(), upstream.name.clone(), upstream.kind));
            }
        }
    }
    models.sort_by(|a, b| a.0.cmp(&b.0));
    models.dedup_by(|a, b| a.0 == b.0);
    let openai = json!({
        "object": "list",
        "data": models.iter().map(|(id, owner, _)| json!({"id": id, "object": "model", "created": 0, "owned_by": &**owner})).collect::<Vec<_>>(),
    });
    let anthropic_models: Vec<_> = models
        .iter()
        .filter(|(_, _, kind)| *kind == ProviderKind::Anthropic)
        .map(|(id, _, _)| json!({"type": "model", "id": id, "display_name": id, "created_at": "1970-01-01T00:00:00Z"}))
        .collect();
    let anthropic = json!({
        "data": anthropic_models,
        "has_more": false,
        "first_id": anthropic_models.first().map(|m| m["id"].clone()),
        "last_id": anthropic_models.last().map(|m| m["id"].clone()),
    });
    (
        Bytes::from(openai.to_string()),
        Bytes::from(anthropic.to_string()),
    )
}
