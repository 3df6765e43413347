//! Upstreams: where a model's calls go, with which key, over a pooled
//! HTTP/1.1 + HTTP/2 client with rustls (certificates verified against the
//! Mozilla roots). URLs and auth headers are built once at start.

use std::sync::Arc;

use http::{HeaderName, HeaderValue, Uri};

use crate::config::{Config, UpstreamConfig, line_in_file};
use crate::providers::{Endpoint, ProviderKind};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(
        "{path}:{line}: upstream `{upstream}` reads its key from the environment variable {var}, which is not set; export it before starting Warden"
    )]
    MissingKey {
        path: String,
        line: usize,
        upstream: String,
        var: String,
    },
    #[error(
        "upstream `{upstream}`: the key in {var} cannot be sent as an HTTP header (it has control characters)"
    )]
    BadKey { upstream: String, var: String },
    #[error("upstream `{upstream}`: base_url `{url}` does not form valid URLs: {message}")]
    BadUrl {
        upstream: String,
        url: String,
        message: String,
    },
    #[error(transparent)]
    Client(#[from] crate::http_client::ClientError),
}

pub struct Upstream {
    pub name: Arc<str>,
    pub kind: ProviderKind,
    models: Vec<String>,
    /// Indexed by `Endpoint::index`.
    urls: Vec<Uri>,
    /// `authorization: Bearer …` or `x-api-key: …`, marked sensitive.
    auth: Option<(HeaderName, HeaderValue)>,
}

impl Upstream {
    pub fn from_config(
        config: &Config,
        upstream: &UpstreamConfig,
    ) -> Result<Upstream, UpstreamError> {
        let name = upstream.name.get_ref().clone();
        let auth = match &upstream.api_key_env {
            None => None,
            Some(var) => {
                let var_name = var.get_ref();
                let key = std::env::var(var_name)
                    .ok()
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| UpstreamError::MissingKey {
                        path: config.source.display().to_string(),
                        line: line_in_file(&config.source, var.span()),
                        upstream: name.clone(),
                        var: var_name.clone(),
                    })?;
                let bad_key = || UpstreamError::BadKey {
                    upstream: name.clone(),
                    var: var_name.clone(),
                };
                let (header, value) = match upstream.kind {
                    ProviderKind::OpenAi => (http::header::AUTHORIZATION, format!("Bearer {key}")),
                    ProviderKind::Anthropic => (HeaderName::from_static("x-api-key"), key),
                };
                let mut value = HeaderValue::from_str(&value).map_err(|_| bad_key())?;
                value.set_sensitive(true);
                Some((header, value))
            }
        };
        let base = api_root(upstream.base_url.get_ref());
        let urls = Endpoint::ALL
            .iter()
            .map(|&endpoint| {
                let url = format!("{base}{}", endpoint.upstream_path());
                url.parse::<Uri>().map_err(|e| UpstreamError::BadUrl {
                    upstream: name.clone(),
                    url: upstream.base_url.get_ref().clone(),
                    message: e.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Upstream {
            name: name.into(),
            kind: upstream.kind,
            models: upstream.models.get_ref().clone(),
            urls,
            auth,
        })
    }

    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|pattern| glob_match(pattern, model))
    }

    pub fn url(&self, endpoint: Endpoint) -> &Uri {
        &self.urls[endpoint.index()]
    }

    pub fn auth_header(&self) -> Option<&(HeaderName, HeaderValue)> {
        self.auth.as_ref()
    }

    /// The literal (glob-free) model names, for `GET /v1/models`.
    pub fn model_patterns(&self) -> &[String] {
        &self.models
    }
}

/// The URL prefix ending in `/v1`, whatever way the base URL was written:
/// `https://api.openai.com/v1`, `https://api.anthropic.com` and
/// `https://gateway.example/openai` become `…/v1`, `…/v1`, `…/openai/v1`.
pub fn api_root(base_url: &str) -> String {
    let trimmed = base_url.trim_end_matches('/');
    if trimmed.ends_with("/v1") {
        trimmed.to_owned()
    } else {
        format!("{trimmed}/v1")
    }
}

/// `*` matches any run of characters, `?` any one; everything else itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((star_p, star_t)) = star {
            pi = star_p + 1;
            ti = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Routes a model to the first upstream, in config order, that serves it in
/// the caller's format.
pub struct Router {
    upstreams: Vec<Arc<Upstream>>,
}

pub enum Route<'a> {
    Found(&'a Arc<Upstream>),
    /// Served, but only by upstreams speaking another format.
    WrongFormat(&'a Arc<Upstream>),
    Unknown,
}

impl Router {
    pub fn new(upstreams: Vec<Arc<Upstream>>) -> Router {
        Router { upstreams }
    }

    pub fn route(&self, model: &str, protocol: ProviderKind) -> Route<'_> {
        let mut other = None;
        for upstream in &self.upstreams {
            if upstream.serves(model) {
                if upstream.kind == protocol {
                    return Route::Found(upstream);
                }
                other.get_or_insert(upstream);
            }
        }
        other.map_or(Route::Unknown, Route::WrongFormat)
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_with_or_without_v1_reaches_the_same_path() {
        assert_eq!(
            api_root("https://api.openai.com/v1"),
            "https://api.openai.com/v1"
        );
        assert_eq!(
            api_root("https://api.openai.com/v1/"),
            "https://api.openai.com/v1"
        );
        assert_eq!(
            api_root("https://api.anthropic.com"),
            "https://api.anthropic.com/v1"
        );
        assert_eq!(
            api_root("http://localhost:11434/v1"),
            "http://localhost:11434/v1"
        );
        assert_eq!(
            api_root("https://gateway.example/openai"),
            "https://gateway.example/openai/v1"
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("gpt-*", "gpt-4o-mini"));
        assert!(glob_match("claude-*-4-5*", "claude-sonnet-4-5-20250929"));
        assert!(glob_match("o?", "o3"));
        assert!(glob_match("*", ""));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("gpt-*", "claude-3"));
        assert!(!glob_match("o?", "o3-mini"));
        assert!(!glob_match("a*b", "a-c"));
    }
}
