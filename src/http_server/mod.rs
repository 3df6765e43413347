//! The listeners. The admin port is served by hyper (HTTP/1.1 and h2c on one
//! port, one task per connection); the agent port by `h1`, Warden's own
//! HTTP/1.1 server that keeps no buffers while a call waits. Both stop
//! gracefully: the listener closes, in-flight requests finish within a grace
//! period, then the function returns.

pub mod h1;

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::proxy::body::ProxyBody;

/// A request body as the agent port hands it to the proxy.
pub enum RequestBody {
    /// Read whole before the handler ran (HTTP/1.1).
    Whole(bytes::Bytes),
    /// Over `[server] max_body_bytes`: left unread, and the connection closes
    /// after the answer.
    TooLarge,
    /// Read by the handler as it needs it (HTTP/2).
    Streaming(Incoming),
}

#[derive(Debug, thiserror::Error)]
pub enum BodyReadError {
    #[error(
        "the request body is larger than this Warden accepts ({limit} bytes, [server] max_body_bytes)"
    )]
    TooLarge { limit: u64 },
    #[error("could not read the request body: {0}")]
    Failed(String),
}

impl BodyReadError {
    /// How the caller is told: its provider's error kind and Warden's code.
    pub fn kind_and_code(&self) -> (crate::providers::ErrorKind, &'static str) {
        match self {
            BodyReadError::TooLarge { .. } => {
                (crate::providers::ErrorKind::TooLarge, "request_too_large")
            }
            BodyReadError::Failed(_) => (
                crate::providers::ErrorKind::InvalidRequest,
                "body_read_failed",
            ),
        }
    }
}

impl RequestBody {
    /// The whole body, at most `limit` bytes.
    pub async fn read(self, limit: u64) -> Result<bytes::Bytes, BodyReadError> {
        use http_body_util::{BodyExt, Limited};
        match self {
            RequestBody::Whole(bytes) if bytes.len() as u64 <= limit => Ok(bytes),
            RequestBody::Whole(_) | RequestBody::TooLarge => Err(BodyReadError::TooLarge { limit }),
            RequestBody::Streaming(body) => {
                match Limited::new(body, limit as usize).collect().await {
                    Ok(collected) => Ok(collected.to_bytes()),
                    Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                        Err(BodyReadError::TooLarge { limit })
                    }
                    Err(e) => Err(BodyReadError::Failed(e.to_string())),
                }
            }
        }
    }
}

pub async fn serve<F, Fut>(
    listener: TcpListener,
    handler: F,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    name: &'static str,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    loop {
        tokio::select! {
            stream = accept(&listener, name) => {
                let handler = handler.clone();
                let service = service_fn(move |request| {
                    let response = handler(request);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(listener = name, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!(listener = name, "all connections finished"),
        () = tokio::time::sleep(grace) => tracing::warn!(listener = name, grace_secs = grace.as_secs(), "grace period over; closing remaining connections"),
    }
}

/// The next connection, with Nagle off. A failed accept (out of file
/// descriptors and the like) backs off and keeps serving.
async fn accept(listener: &TcpListener, name: &'static str) -> tokio::net::TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                return stream;
            }
            Err(e) => {
                tracing::warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
