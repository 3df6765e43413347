//! The model APIs Warden speaks: which endpoints exist, what Warden reads from
//! a request, the usage a response reports, and each provider's error shape.
//! Provider quirks stay in `openai.rs` and `anthropic.rs`.

pub mod answer;
pub mod anthropic;
pub mod members;
pub mod openai;

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

/// The wire format of an upstream or of a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum ProviderKind {
    #[serde(rename = "openai")]
    OpenAi,
    #[serde(rename = "anthropic")]
    Anthropic,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
        }
    }
}

/// The agent-facing endpoints of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    ChatCompletions,
    Responses,
    Embeddings,
    Completions,
    Models,
    Messages,
    CountTokens,
}

impl Endpoint {
    pub const ALL: [Endpoint; 7] = [
        Endpoint::ChatCompletions,
        Endpoint::Responses,
        Endpoint::Embeddings,
        Endpoint::Completions,
        Endpoint::Models,
        Endpoint::Messages,
        Endpoint::CountTokens,
    ];

    /// Position in `ALL`, for tables built once per upstream.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether the provider charges for calls here; counting tokens is free.
    pub fn is_billed(self) -> bool {
        !matches!(self, Endpoint::CountTokens | Endpoint::Models)
    }

    /// Maps a method and path to an endpoint; `None` for anything else.
    pub fn from_request(method: &http::Method, path: &str) -> Option<Endpoint> {
        let path = path.strip_suffix('/').unwrap_or(path);
        let endpoint = match path {
            "/v1/chat/completions" => Endpoint::ChatCompletions,
            "/v1/responses" => Endpoint::Responses,
            "/v1/embeddings" => Endpoint::Embeddings,
            "/v1/completions" => Endpoint::Completions,
            "/v1/models" => Endpoint::Models,
            "/v1/messages" => Endpoint::Messages,
            "/v1/messages/count_tokens" => Endpoint::CountTokens,
            _ => return None,
        };
        let expected = if endpoint == Endpoint::Models {
            http::Method::GET
        } else {
            http::Method::POST
        };
        (method == expected).then_some(endpoint)
    }

    /// The format the caller speaks on this endpoint, and so the shape of
    /// every error Warden sends it.
    pub fn protocol(self) -> ProviderKind {
        match self {
            Endpoint::Messages | Endpoint::CountTokens => ProviderKind::Anthropic,
            _ => ProviderKind::OpenAi,
        }
    }

    /// The path after `/v1`, appended to an upstream's base URL.
    pub fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Responses => "/responses",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::Completions => "/completions",
            Endpoint::Models => "/models",
            Endpoint::Messages => "/messages",
            Endpoint::CountTokens => "/messages/count_tokens",
        }
    }

    /// The value of the `calls.endpoint` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Responses => "/v1/responses",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Models => "/v1/models",
            Endpoint::Messages => "/v1/messages",
            Endpoint::CountTokens => "/v1/messages/count_tokens",
        }
    }

    /// Chat-style OpenAI streams that support `stream_options.include_usage`.
    pub fn takes_stream_options(self) -> bool {
        matches!(self, Endpoint::ChatCompletions | Endpoint::Completions)
    }

    /// The caller's format for a path Warden does not serve: Anthropic's SDK
    /// announces itself with `anthropic-version`.
    pub fn guess_protocol(path: &str, headers: &http::HeaderMap) -> ProviderKind {
        if path.starts_with("/v1/messages") || headers.contains_key("anthropic-version") {
            ProviderKind::Anthropic
        } else {
            ProviderKind::OpenAi
        }
    }
}

/// What Warden reads from a request body; everything else is forwarded
/// untouched without being parsed into values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    pub model: String,
    pub stream: bool,
    /// `stream_options.include_usage` as the agent sent it.
    pub include_usage: Option<bool>,
    /// Whether the body has a `stream_options` key at all.
    pub has_stream_options: bool,
    pub max_tokens: Option<u64>,
    /// Where the members policies read lie in the body.
    pub parts: BodyParts,
}

/// Where the members a policy may read (the conversation and the tools)
/// lie in the body, found by the parse that read its facts: the policy
/// stage reads them there instead of parsing the body again (on a long
/// conversation each parse is a scan of every message).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BodyParts {
    pub messages: Option<Span>,
    pub input: Option<Span>,
    pub system: Option<Span>,
    pub prompt: Option<Span>,
    pub tools: Option<Span>,
}

/// A member's raw JSON value as a byte range of the body it was read from
/// (bodies are far below 4 GiB: `max_body_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn of(body: &[u8], raw: Option<&RawValue>) -> Option<Span> {
        let raw = raw?.get().as_bytes();
        let start = (raw.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
        let end = start
            .checked_add(raw.len())
            .filter(|end| *end <= body.len())?;
        Some(Span {
            start: u32::try_from(start).ok()?,
            end: u32::try_from(end).ok()?,
        })
    }

    /// The value's raw JSON in `body`, the body the span was read from
    /// (not checked as UTF-8 again: on a long conversation that would be
    /// another scan of every message); empty for another, shorter body.
    pub fn bytes(self, body: &[u8]) -> &[u8] {
        body.get(self.start as usize..self.end as usize)
            .unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("the request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("the request body has no `model`; say which model to call")]
    MissingModel,
}

#[derive(Deserialize)]
struct RequestHead<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
    #[serde(borrow)]
    system: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

impl RequestFacts {
    pub fn parse(body: &[u8]) -> Result<RequestFacts, RequestError> {
        let head: RequestHead<'_> =
            serde_json::from_slice(body).map_err(|e| RequestError::MalformedJson(e.to_string()))?;
        let model = head
            .model
            .filter(|m| !m.is_empty())
            .ok_or(RequestError::MissingModel)?;
        Ok(RequestFacts {
            model: model.into_owned(),
            stream: head.stream.unwrap_or(false),
            include_usage: head.stream_options.as_ref().and_then(|o| o.include_usage),
            has_stream_options: head.stream_options.is_some(),
            max_tokens: head
                .max_tokens
                .or(head.max_completion_tokens)
                .or(head.max_output_tokens),
            parts: BodyParts {
                messages: Span::of(body, head.messages),
                input: Span::of(body, head.input),
                system: Span::of(body, head.system),
                prompt: Span::of(body, head.prompt),
                tools: Span::of(body, head.tools),
            },
        })
    }
}

/// Token counts in one shape for every provider.
///
/// `input_tokens` counts every input token the model read, cached or not
/// (Anthropic reports cache reads and writes outside `input_tokens`; they are
/// added here), so sums across providers compare. `cached_input_tokens` and
/// `cache_write_tokens` are subsets of it; `reasoning_tokens` is a subset of
/// `output_tokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub reasoning_tokens: u64,
}

/// The union of the usage objects of every supported API; absent and `null`
/// fields both read as `None`.
#[derive(Debug, Default, Deserialize)]
pub struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    prompt_tokens_details: Option<CachedDetails>,
    input_tokens_details: Option<CachedDetails>,
    completion_tokens_details: Option<ReasoningDetails>,
    output_tokens_details: Option<ReasoningDetails>,
}

#[derive(Debug, Default, Deserialize)]
struct CachedDetails {
    cached_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct ReasoningDetails {
    reasoning_tokens: Option<u64>,
}

impl RawUsage {
    /// Reads a usage object's raw JSON (or `null`) by its members, without
    /// serde: as strict about the counts (unsigned integers or `null`),
    /// blind to the members Warden does not read. `Err` for text that is
    /// not such an object.
    pub fn from_json(raw: &[u8]) -> Result<Option<RawUsage>, UnreadableUsage> {
        if raw == b"null" {
            return Ok(None);
        }
        let [
            prompt_tokens,
            completion_tokens,
            input_tokens,
            output_tokens,
            cache_creation_input_tokens,
            cache_read_input_tokens,
            prompt_tokens_details,
            input_tokens_details,
            completion_tokens_details,
            output_tokens_details,
        ] = members::top_level_members(
            raw,
            [
                b"prompt_tokens",
                b"completion_tokens",
                b"input_tokens",
                b"output_tokens",
                b"cache_creation_input_tokens",
                b"cache_read_input_tokens",
                b"prompt_tokens_details",
                b"input_tokens_details",
                b"completion_tokens_details",
                b"output_tokens_details",
            ],
        )
        .ok_or(UnreadableUsage)?;
        // A details object's one count: `None` when the object is absent
        // or null (`normalize` then looks at the other spelling), `Some` of
        // its count, itself maybe absent, when it is there.
        let detail = |value: Option<&[u8]>, key: &[u8]| match value {
            None | Some(b"null") => Ok(None),
            Some(object) => {
                let [count] = members::top_level_members(object, [key]).ok_or(UnreadableUsage)?;
                token_count(count).map(Some)
            }
        };
        let cached = |value| {
            detail(value, b"cached_tokens")
                .map(|count| count.map(|cached_tokens| CachedDetails { cached_tokens }))
        };
        let reasoning = |value| {
            detail(value, b"reasoning_tokens")
                .map(|count| count.map(|reasoning_tokens| ReasoningDetails { reasoning_tokens }))
        };
        Ok(Some(RawUsage {
            prompt_tokens: token_count(prompt_tokens)?,
            completion_tokens: token_count(completion_tokens)?,
            input_tokens: token_count(input_tokens)?,
            output_tokens: token_count(output_tokens)?,
            cache_creation_input_tokens: token_count(cache_creation_input_tokens)?,
            cache_read_input_tokens: token_count(cache_read_input_tokens)?,
            prompt_tokens_details: cached(prompt_tokens_details)?,
            input_tokens_details: cached(input_tokens_details)?,
            completion_tokens_details: reasoning(completion_tokens_details)?,
            output_tokens_details: reasoning(output_tokens_details)?,
        }))
    }

    pub fn output_tokens(&self) -> Option<u64> {
        self.completion_tokens.or(self.output_tokens)
    }

    pub fn has_input(&self) -> bool {
        self.prompt_tokens.is_some() || self.input_tokens.is_some()
    }

    pub fn normalize(&self, protocol: ProviderKind) -> Usage {
        let cached = self
            .prompt_tokens_details
            .as_ref()
            .or(self.input_tokens_details.as_ref())
            .and_then(|d| d.cached_tokens)
            .or(self.cache_read_input_tokens)
            .unwrap_or(0);
        let reasoning = self
            .completion_tokens_details
            .as_ref()
            .or(self.output_tokens_details.as_ref())
            .and_then(|d| d.reasoning_tokens)
            .unwrap_or(0);
        let cache_write = self.cache_creation_input_tokens.unwrap_or(0);
        let reported_input = self.prompt_tokens.or(self.input_tokens).unwrap_or(0);
        let input_tokens = match protocol {
            ProviderKind::Anthropic => reported_input + cached + cache_write,
            ProviderKind::OpenAi => reported_input,
        };
        Usage {
            input_tokens,
            output_tokens: self.output_tokens().unwrap_or(0),
            cached_input_tokens: cached,
            cache_write_tokens: cache_write,
            reasoning_tokens: reasoning,
        }
    }
}

/// A usage object that is not one: not an object, or a count that is not
/// an unsigned integer.
#[derive(Debug)]
pub struct UnreadableUsage;

/// A token count as JSON writes it: digits, or `null` / absent for none.
fn token_count(value: Option<&[u8]>) -> Result<Option<u64>, UnreadableUsage> {
    match value {
        None | Some(b"null") => Ok(None),
        Some(digits) if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) => {
            std::str::from_utf8(digits)
                .ok()
                .and_then(|text| text.parse().ok())
                .map(Some)
                .ok_or(UnreadableUsage)
        }
        Some(_) => Err(UnreadableUsage),
    }
}

/// Usage reported in a non-streamed success body, if any: its top-level
/// `usage` object, or a bare `input_tokens` (count_tokens answers so).
///
/// Both are looked for from the body's end, where every provider writes its
/// usage: however long the answer, its choices are not walked.
pub fn usage_from_body(endpoint: Endpoint, body: &[u8]) -> Option<Usage> {
    let usage = match members::top_level_member_from_end(body, b"usage")? {
        Some(raw) => RawUsage::from_json(raw).ok()?,
        None => None,
    };
    match usage {
        Some(raw) => Some(raw.normalize(endpoint.protocol())),
        None => Some(Usage {
            input_tokens: token_count(members::top_level_member_from_end(body, b"input_tokens")?)
                .ok()??,
            ..Usage::default()
        }),
    }
}

/// Why Warden refused or failed a call, in terms every provider shape can
/// express.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidKey,
    InvalidRequest,
    NotFound,
    TooLarge,
    /// A policy or an operator said no (403).
    Forbidden,
    /// The request does not fit the current state (409).
    Conflict,
    /// A rate limit or a budget (429).
    RateLimited,
    UpstreamFailed,
    UpstreamTimeout,
}

impl ErrorKind {
    pub fn status(self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            ErrorKind::InvalidKey => StatusCode::UNAUTHORIZED,
            ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::UpstreamFailed => StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// An error body in the caller's own format.
pub fn error_body(protocol: ProviderKind, kind: ErrorKind, code: &str, message: &str) -> Bytes {
    match protocol {
        ProviderKind::OpenAi => openai::error_body(kind, code, message),
        ProviderKind::Anthropic => anthropic::error_body(kind, message),
    }
}

/// An error event that ends a stream the caller is already reading.
pub fn stream_error_event(
    protocol: ProviderKind,
    kind: ErrorKind,
    code: &str,
    message: &str,
) -> Bytes {
    match protocol {
        ProviderKind::OpenAi => openai::stream_error_event(kind, code, message),
        ProviderKind::Anthropic => anthropic::stream_error_event(kind, message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_fixture as fixture;

    #[test]
    fn reads_request_facts_without_touching_the_rest() {
        let facts = RequestFacts::parse(
            br#"{"messages":[{"role":"user","content":"hi"}],"model":"gpt-4o","stream":true,"stream_options":{"include_usage":false},"max_completion_tokens":64}"#,
        )
        .unwrap();
        assert_eq!(facts.model, "gpt-4o");
        assert!(facts.stream && facts.has_stream_options);
        assert_eq!(facts.include_usage, Some(false));
        assert_eq!(facts.max_tokens, Some(64));
    }

    #[test]
    fn escaped_model_names_are_decoded() {
        let facts = RequestFacts::parse(br#"{"model":"gpt\u002d4o"}"#).unwrap();
        assert_eq!(facts.model, "gpt-4o");
    }

    #[test]
    fn refuses_bad_bodies() {
        assert!(matches!(
            RequestFacts::parse(b"{\"model\":"),
            Err(RequestError::MalformedJson(_))
        ));
        assert!(matches!(
            RequestFacts::parse(b"[1]"),
            Err(RequestError::MalformedJson(_))
        ));
        assert_eq!(
            RequestFacts::parse(b"{\"messages\":[]}"),
            Err(RequestError::MissingModel)
        );
        assert_eq!(
            RequestFacts::parse(b"{\"model\":\"\"}"),
            Err(RequestError::MissingModel)
        );
    }

    #[test]
    fn openai_usage_keeps_cached_and_reasoning_as_subsets() {
        let usage = usage_from_body(
            Endpoint::ChatCompletions,
            &fixture("openai/chat_completion_cached_reasoning.json"),
        )
        .unwrap();
        assert!(usage.cached_input_tokens > 0 && usage.cached_input_tokens <= usage.input_tokens);
        assert!(usage.reasoning_tokens > 0 && usage.reasoning_tokens <= usage.output_tokens);
        assert_eq!(usage.cache_write_tokens, 0);
    }

    #[test]
    fn anthropic_usage_adds_cache_reads_and_writes_to_input() {
        let usage =
            usage_from_body(Endpoint::Messages, &fixture("anthropic/message_cache.json")).unwrap();
        assert_eq!(
            usage,
            Usage {
                input_tokens: 21 + 188_086,
                output_tokens: 393,
                cached_input_tokens: 0,
                cache_write_tokens: 188_086,
                reasoning_tokens: 0
            }
        );
    }

    #[test]
    fn only_the_answers_own_usage_counts() {
        // A tool's input is the model's own JSON: its `usage` is not the call's.
        let body = br#"{"content": [{"type": "tool_use", "name": "bill",
            "input": {"usage": {"input_tokens": 999999, "output_tokens": 999999}}}],
            "usage": {"input_tokens": 12, "output_tokens": 7}}"#;
        let usage = usage_from_body(Endpoint::Messages, body).unwrap();
        assert_eq!((usage.input_tokens, usage.output_tokens), (12, 7));
        assert_eq!(
            usage_from_body(Endpoint::CountTokens, br#"{"input_tokens": 42}"#)
                .map(|u| u.input_tokens),
            Some(42)
        );
        for nothing in [
            &br#"{"usage": null}"#[..],
            b"{}",
            b"not json",
            br#"{"usage": 5}"#,
        ] {
            assert_eq!(usage_from_body(Endpoint::Messages, nothing), None);
        }
    }

    #[test]
    fn usage_read_by_members_matches_serde_on_every_fixture() {
        for (name, endpoint) in [
            ("openai/chat_completion.json", Endpoint::ChatCompletions),
            (
                "openai/chat_completion_cached_reasoning.json",
                Endpoint::ChatCompletions,
            ),
            ("openai/responses.json", Endpoint::Responses),
            ("anthropic/message.json", Endpoint::Messages),
            ("anthropic/message_cache.json", Endpoint::Messages),
        ] {
            let body = fixture(name);
            let whole: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let by_serde: RawUsage = serde_json::from_value(whole["usage"].clone()).unwrap();
            let expected = by_serde.normalize(endpoint.protocol());
            assert_eq!(usage_from_body(endpoint, &body), Some(expected), "{name}");
        }
    }

    #[test]
    fn usage_counts_are_unsigned_integers_or_null() {
        let read = |json: &str| RawUsage::from_json(json.as_bytes()).map(|u| u.is_some());
        assert!(matches!(read("null"), Ok(false)));
        for fine in [
            r#"{"prompt_tokens": 3, "completion_tokens": null}"#,
            r#"{"input_tokens": 0, "input_tokens_details": null, "extra": [1.5, "x"]}"#,
            r#"{"output_tokens_details": {"reasoning_tokens": 18446744073709551615}}"#,
        ] {
            assert!(matches!(read(fine), Ok(true)), "{fine}");
        }
        for bad in [
            r#"{"prompt_tokens": 1.5}"#,
            r#"{"prompt_tokens": -1}"#,
            r#"{"prompt_tokens": "3"}"#,
            r#"{"completion_tokens_details": {"reasoning_tokens": true}}"#,
            r#"{"output_tokens_details": {"reasoning_tokens": 18446744073709551616}}"#,
            r#"{"prompt_tokens_details": 4}"#,
            "[]",
            "",
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_usage_is_read() {
        let usage =
            usage_from_body(Endpoint::Responses, &fixture("openai/responses.json")).unwrap();
        assert!(usage.input_tokens > 0 && usage.output_tokens > 0);
    }

    #[test]
    fn endpoints_need_their_method() {
        assert_eq!(
            Endpoint::from_request(&http::Method::POST, "/v1/messages"),
            Some(Endpoint::Messages)
        );
        assert_eq!(
            Endpoint::from_request(&http::Method::GET, "/v1/messages"),
            None
        );
        assert_eq!(
            Endpoint::from_request(&http::Method::GET, "/v1/models/"),
            Some(Endpoint::Models)
        );
        assert_eq!(
            Endpoint::from_request(&http::Method::POST, "/v2/chat"),
            None
        );
    }
}
