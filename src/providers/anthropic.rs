//! Anthropic's wire format: error bodies and stream error events.

use bytes::Bytes;
use serde_json::json;

use super::ErrorKind;

/// The `anthropic-version` Warden sends when the agent sent none.
pub const DEFAULT_VERSION: &str = "2023-06-01";

fn error_type(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidKey => "authentication_error",
        ErrorKind::InvalidRequest | ErrorKind::Conflict => "invalid_request_error",
        ErrorKind::NotFound => "not_found_error",
        ErrorKind::TooLarge => "request_too_large",
        ErrorKind::Forbidden => "permission_error",
        ErrorKind::RateLimited => "rate_limit_error",
        ErrorKind::UpstreamFailed => "api_error",
        ErrorKind::UpstreamTimeout => "timeout_error",
    }
}

fn error_value(kind: ErrorKind, message: &str) -> serde_json::Value {
    json!({"type": "error", "error": {"type": error_type(kind), "message": message}})
}

/// `{"type": "error", "error": {"type", "message"}}`, as Anthropic sends it.
pub fn error_body(kind: ErrorKind, message: &str) -> Bytes {
    Bytes::from(error_value(kind, message).to_string())
}

/// Anthropic reports a failure inside a stream as an `error` event.
pub fn stream_error_event(kind: ErrorKind, message: &str) -> Bytes {
    Bytes::from(format!(
        "event: error\ndata: {}\n\n",
        error_value(kind, message)
    ))
}
