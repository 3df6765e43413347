//! OpenAI's wire format (also spoken by compatible servers: vLLM, llama.cpp,
//! Ollama): error bodies, stream error events and the `include_usage` rewrite.

use bytes::Bytes;
use serde_json::json;

use super::ErrorKind;

fn error_type(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidKey
        | ErrorKind::InvalidRequest
        | ErrorKind::NotFound
        | ErrorKind::TooLarge
        | ErrorKind::Conflict => "invalid_request_error",
        ErrorKind::Forbidden => "permission_error",
        ErrorKind::RateLimited => "rate_limit_exceeded",
        ErrorKind::UpstreamFailed | ErrorKind::UpstreamTimeout => "api_error",
    }
}

fn error_value(kind: ErrorKind, code: &str, message: &str) -> serde_json::Value {
    json!({"error": {"message": message, "type": error_type(kind), "param": null, "code": code}})
}

/// `{"error": {"message", "type", "param", "code"}}`, as OpenAI sends it.
pub fn error_body(kind: ErrorKind, code: &str, message: &str) -> Bytes {
    Bytes::from(error_value(kind, code, message).to_string())
}

/// OpenAI ends a failed stream with a `data:` line carrying the error object;
/// the official SDKs raise it as an `APIError`.
pub fn stream_error_event(kind: ErrorKind, code: &str, message: &str) -> Bytes {
    Bytes::from(format!("data: {}\n\n", error_value(kind, code, message)))
}

/// Returns the body with `stream_options.include_usage = true`, so the
/// upstream reports usage at the end of the stream.
///
/// When the body has no `stream_options` the key is spliced in after the
/// opening brace and every other byte stays as the agent sent it; otherwise
/// the body is re-serialised.
pub fn request_usage_in_stream(body: &Bytes, has_stream_options: bool) -> Bytes {
    const INSERT: &[u8] = br#""stream_options":{"include_usage":true},"#;
    if !has_stream_options
        && let Some(open) = body.iter().position(|b| !b.is_ascii_whitespace())
        && body[open] == b'{'
    {
        let rest = &body[open + 1..];
        let empty_object = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
        let mut out = Vec::with_capacity(body.len() + INSERT.len());
        out.extend_from_slice(&body[..=open]);
        out.extend_from_slice(if empty_object {
            &INSERT[..INSERT.len() - 1]
        } else {
            INSERT
        });
        out.extend_from_slice(rest);
        return Bytes::from(out);
    }
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return body.clone();
    };
    if let Some(object) = value.as_object_mut() {
        let options = object.entry("stream_options").or_insert_with(|| json!({}));
        if !options.is_object() {
            *options = json!({});
        }
        options["include_usage"] = json!(true);
    }
    Bytes::from(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splices_include_usage_without_reserialising() {
        let body = Bytes::from_static(br#"{"model":"gpt-4o","stream":true,"messages":[]}"#);
        let out = request_usage_in_stream(&body, false);
        assert_eq!(
            &out[..],
            br#"{"stream_options":{"include_usage":true},"model":"gpt-4o","stream":true,"messages":[]}"#
        );
        let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed["stream_options"]["include_usage"], true);
    }

    #[test]
    fn rewrites_existing_stream_options() {
        let body =
            Bytes::from_static(br#"{"model":"m","stream_options":{"include_usage":false,"x":1}}"#);
        let out: serde_json::Value =
            serde_json::from_slice(&request_usage_in_stream(&body, true)).unwrap();
        assert_eq!(
            out["stream_options"],
            json!({"include_usage": true, "x": 1})
        );
    }

    #[test]
    fn error_event_is_a_data_line() {
        let event = stream_error_event(ErrorKind::UpstreamFailed, "upstream_error", "boom");
        let text = std::str::from_utf8(&event).unwrap();
        assert!(text.starts_with("data: {\"error\":") && text.ends_with("\n\n"));
    }
}
