//! Header rules at the proxy boundary (RFC 9110 §7.6.1): hop-by-hop headers,
//! and those named in `Connection`, stop here in both directions; agent
//! credentials and Warden's own headers never go upstream.

use http::HeaderValue;
use http::header::{self, HeaderMap, HeaderName};

/// The hop-by-hop headers (RFC 9110 §7.6.1, and the legacy ones), in the
/// lower case `HeaderName`s are kept in.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Compared as text, lengths first: nine `HeaderName` comparisons per
/// header cost more.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// The names a `Connection` header lists beyond the hop-by-hop ones, which
/// go anyway: nothing, and no allocation, for the usual `keep-alive` or
/// `close`.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|name| {
            !(name.eq_ignore_ascii_case("close")
                || HOP_BY_HOP.iter().any(|hop| name.eq_ignore_ascii_case(hop)))
        })
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect()
}

/// Removes only what is there: an answer usually carries a few headers and
/// none or one of the nine, and a removal hashes its name.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut doomed = connection_listed(headers);
    doomed.extend(headers.keys().filter(|name| is_hop_by_hop(name)).cloned());
    for name in doomed {
        headers.remove(name);
    }
}

/// The agent's headers as they should reach the upstream, built in one pass
/// (copying the map and removing from it costs a hash per removal).
pub fn upstream_request_headers(agent_headers: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(agent_headers.len() + 2);
    for (name, value) in going_upstream(agent_headers) {
        headers.append(name.clone(), value.clone());
    }
    // The meter reads the bytes, so ask for them uncompressed.
    headers.insert(
        header::ACCEPT_ENCODING,
        http::HeaderValue::from_static("identity"),
    );
    headers
}

/// Only the agent's headers that will go upstream, in a map sized for them:
/// what a call held for an operator keeps for minutes (the agent's key is
/// not among them).
pub fn keep_upstream_headers(agent_headers: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(going_upstream(agent_headers).count());
    for (name, value) in going_upstream(agent_headers) {
        // Copied, not shared: a shared value keeps the copy of the whole
        // request head alive, the agent's key included.
        let value = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        headers.append(name.clone(), value);
    }
    headers
}

/// The agent's headers that go upstream: not hop-by-hop ones or those named
/// in `Connection`, not its credentials, Warden's own or the framing.
fn going_upstream(agent_headers: &HeaderMap) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
    let listed = connection_listed(agent_headers);
    agent_headers.iter().filter(move |(name, _)| {
        !(is_hop_by_hop(name)
            || listed.contains(name)
            || **name == header::HOST
            || **name == header::AUTHORIZATION
            || **name == header::CONTENT_LENGTH
            || **name == header::ACCEPT_ENCODING
            || name.as_str() == "x-api-key"
            || name.as_str().starts_with("x-warden-"))
    })
}

/// The upstream's response headers as they should reach the agent. The
/// length is dropped because the body may change (usage chunk stripped);
/// hyper sets it again for bodies of known size.
pub fn agent_response_headers(upstream_headers: &mut HeaderMap) {
    strip_hop_by_hop(upstream_headers);
    upstream_headers.remove(header::CONTENT_LENGTH);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_loses_the_headers_its_connection_header_names() {
        let mut answer = HeaderMap::new();
        answer.insert(
            "connection",
            "Keep-Alive, X-Upstream-Hop,close".parse().unwrap(),
        );
        answer.insert("keep-alive", "timeout=5".parse().unwrap());
        answer.insert("x-upstream-hop", "1".parse().unwrap());
        answer.insert("content-length", "12".parse().unwrap());
        answer.insert("x-request-id", "req_1".parse().unwrap());
        assert_eq!(connection_listed(&answer), ["x-upstream-hop"]);
        agent_response_headers(&mut answer);
        let left: Vec<&str> = answer.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-request-id"]);
    }

    #[test]
    fn credentials_hop_headers_and_warden_headers_stay_behind() {
        let mut agent = HeaderMap::new();
        agent.insert("authorization", "Bearer wk_secret".parse().unwrap());
        agent.insert("x-api-key", "wk_secret".parse().unwrap());
        agent.insert("connection", "keep-alive, x-custom-hop".parse().unwrap());
        agent.insert("x-custom-hop", "1".parse().unwrap());
        agent.insert("te", "trailers".parse().unwrap());
        agent.insert("x-warden-run", "r1".parse().unwrap());
        agent.insert("accept-encoding", "gzip".parse().unwrap());
        agent.insert("anthropic-version", "2023-06-01".parse().unwrap());
        agent.insert("openai-beta", "assistants=v2".parse().unwrap());
        let out = upstream_request_headers(&agent);
        for gone in [
            "authorization",
            "x-api-key",
            "connection",
            "x-custom-hop",
            "te",
            "x-warden-run",
        ] {
            assert!(!out.contains_key(gone), "{gone} was forwarded");
        }
        assert_eq!(out["accept-encoding"], "identity");
        assert_eq!(out["anthropic-version"], "2023-06-01");
        assert_eq!(out["openai-beta"], "assistants=v2");
    }

    #[test]
    fn answers_lose_hop_headers_and_their_length_only() {
        let mut answer = HeaderMap::new();
        answer.insert("connection", "keep-alive, x-upstream-hop".parse().unwrap());
        answer.insert("keep-alive", "timeout=5".parse().unwrap());
        answer.insert("x-upstream-hop", "1".parse().unwrap());
        answer.insert("transfer-encoding", "chunked".parse().unwrap());
        answer.insert("content-length", "12".parse().unwrap());
        answer.insert("content-type", "text/event-stream".parse().unwrap());
        answer.insert("x-request-id", "req_1".parse().unwrap());
        agent_response_headers(&mut answer);
        let mut left: Vec<_> = answer.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-request-id"]);
    }
}
