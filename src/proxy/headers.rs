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
    let listed = connection_listed(headers);
    remove_where(headers, |name| is_hop_by_hop(name) || listed.contains(name));
}

/// Removes the headers whose names are `doomed`, noting them in a fixed
/// array first (a map's keys are unique): no allocation for the usual few.
fn remove_where(headers: &mut HeaderMap, doomed: impl Fn(&HeaderName) -> bool) {
    const AT_ONCE: usize = 16;
    loop {
        let mut names = [const { None::<HeaderName> }; AT_ONCE];
        let mut noted = 0;
        for (slot, name) in names
            .iter_mut()
            .zip(headers.keys().filter(|name| doomed(name)))
        {
            *slot = Some(name.clone());
            noted += 1;
        }
        for name in names.into_iter().flatten() {
            headers.remove(name);
        }
        if noted < AT_ONCE {
            return;
        }
    }
}

/// The agent's headers made into those that should reach the upstream, in
/// place: the map the request was read into is reused, not copied.
pub fn upstream_request_headers(mut headers: HeaderMap) -> HeaderMap {
    let listed = connection_listed(&headers);
    remove_where(&mut headers, |name| stays_behind(name, &listed));
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

/// The agent's headers that go upstream.
fn going_upstream(agent_headers: &HeaderMap) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
    let listed = connection_listed(agent_headers);
    agent_headers
        .iter()
        .filter(move |(name, _)| !stays_behind(name, &listed))
}

/// What does not go upstream: hop-by-hop headers and those named in the
/// agent's `Connection` (`listed`), its credentials, Warden's own headers
/// and the framing.
fn stays_behind(name: &HeaderName, listed: &[HeaderName]) -> bool {
    is_hop_by_hop(name)
        || listed.contains(name)
        || *name == header::HOST
        || *name == header::AUTHORIZATION
        || *name == header::CONTENT_LENGTH
        || *name == header::ACCEPT_ENCODING
        || name.as_str() == "x-api-key"
        || name.as_str().starts_with("x-warden-")
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
        let out = upstream_request_headers(agent);
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
    fn more_doomed_headers_than_one_pass_notes_all_go() {
        let mut agent = HeaderMap::new();
        for n in 0..40 {
            agent.insert(
                HeaderName::from_bytes(format!("x-warden-tag-{n}").as_bytes()).unwrap(),
                "1".parse().unwrap(),
            );
        }
        agent.insert("authorization", "Bearer wk_secret".parse().unwrap());
        agent.insert("content-type", "application/json".parse().unwrap());
        agent.insert("user-agent", "sdk/1".parse().unwrap());
        let out = upstream_request_headers(agent);
        let mut left: Vec<_> = out.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept-encoding", "content-type", "user-agent"]);
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
