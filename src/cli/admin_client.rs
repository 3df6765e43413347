//! A small HTTP client for the admin API, used by the operator commands.

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::AdminArgs;

pub struct AdminClient {
    base: String,
    token: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    pub fn new(args: &AdminArgs) -> AdminClient {
        AdminClient {
            base: args.admin_url.trim_end_matches('/').to_owned(),
            token: args.token.clone(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        self.send(Method::GET, path, Bytes::new(), "application/json")
            .await
    }

    pub async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        self.send(
            Method::POST,
            path,
            Bytes::from(body.to_string()),
            "application/json",
        )
        .await
    }

    /// Posts raw bytes (a wasm module).
    pub async fn post_bytes(&self, path: &str, body: Bytes) -> anyhow::Result<serde_json::Value> {
        self.send(Method::POST, path, body, "application/wasm")
            .await
    }

    /// A GET whose answer is not JSON (an export).
    pub async fn get_bytes(&self, path: &str) -> anyhow::Result<Bytes> {
        let response = self
            .request(Method::GET, path, Bytes::new(), "application/json")
            .await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("{} (HTTP {})", error_message(&bytes), status.as_u16());
        }
        Ok(bytes)
    }

    /// A GET whose body is read as it comes (the event stream).
    pub async fn stream(&self, path: &str) -> anyhow::Result<hyper::body::Incoming> {
        let response = self
            .request(Method::GET, path, Bytes::new(), "application/json")
            .await?;
        let status = response.status();
        if !status.is_success() {
            let bytes = response.into_body().collect().await?.to_bytes();
            bail!("{} (HTTP {})", error_message(&bytes), status.as_u16());
        }
        Ok(response.into_body())
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        content_type: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let response = self.request(method, path, body, content_type).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&bytes).with_context(|| {
            format!("the admin API answered {status} with a body that is not JSON")
        })?;
        if !status.is_success() {
            let message = value["error"]["message"].as_str().unwrap_or("no message");
            bail!("{message} (HTTP {})", status.as_u16());
        }
        Ok(value)
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        content_type: &str,
    ) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
        let Some(token) = &self.token else {
            bail!(
                "no operator token: pass --token or set WARDEN_TOKEN (`warden init` printed one)"
            );
        };
        let url = format!("{}{path}", self.base);
        let request = Request::builder()
            .method(method)
            .uri(&url)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, content_type)
            .body(Full::new(body))
            .with_context(|| format!("bad admin URL {url}"))?;
        self.client.request(request).await.map_err(|e| {
            anyhow!("cannot reach Warden's admin API at {}: {e}; is `warden serve` running? (--admin-url / WARDEN_ADMIN_URL)", self.base)
        })
    }
}

fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(500).collect())
}
