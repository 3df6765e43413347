//! The JSON a policy reads: the call, the agent's recent activity, the
//! budgets that count the call, the run and step, the time, and the
//! policy's own config. Serialised once per call; each policy gets its
//! config (and, if it opted in, the messages) spliced in front.

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::activity::ActivityCounts;
use crate::providers::members::array_len;
use crate::providers::{BodyParts, Span};

#[derive(Debug, Serialize)]
pub struct PolicyInput<'a> {
    pub call: CallInput<'a>,
    pub activity: ActivityCounts,
    pub budgets: Vec<BudgetInput>,
    pub run: Option<RunInput<'a>>,
    pub time: TimeInput,
}

/// The call, with the names the `calls` table uses. Serialised in this
/// order, the members policies read most first: a module's JSON reader
/// (the C SDK's `wd_get`) walks the object from its start, and finding
/// `estimated_cost_usd` behind the call id, the capabilities and the token
/// counts took `cost_gate` about half of its evaluation.
#[derive(Debug, Serialize)]
pub struct CallInput<'a> {
    pub model: &'a str,
    pub role: &'a str,
    pub agent: &'a str,
    /// Exact decimal; `null` when the model has no price.
    pub estimated_cost_usd: Option<Box<RawValue>>,
    pub provider: &'a str,
    pub upstream: &'a str,
    pub endpoint: &'a str,
    pub stream: bool,
    pub max_tokens: Option<u64>,
    pub estimated_input_tokens: u64,
    pub estimated_output_tokens: u64,
    pub message_count: u64,
    pub capabilities: &'a [String],
    pub tool_names: Vec<Cow<'a, str>>,
    /// The request's `x-warden-*` headers, names in lower case.
    pub headers: Vec<(&'a str, &'a str)>,
    pub call_id: &'a str,
}

#[derive(Debug, Clone, Serialize)]
pub struct BudgetInput {
    pub scope: String,
    pub period: &'static str,
    pub limit_usd: Box<RawValue>,
    pub spent_usd: Box<RawValue>,
    pub reserved_usd: Box<RawValue>,
    pub on_exceed: &'static str,
}

#[derive(Debug, Serialize)]
pub struct RunInput<'a> {
    pub run_id: &'a str,
    pub step_id: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct TimeInput {
    pub unix_ms: i64,
    pub utc: Arc<str>,
}

impl TimeInput {
    pub fn now() -> TimeInput {
        TimeInput::at(crate::store::record::now_micros())
    }

    /// The UTC text changes once a second: each thread formats it once per
    /// second, not once per call (the formatting was a tenth of building
    /// the input).
    fn at(now_us: i64) -> TimeInput {
        thread_local! {
            static UTC: RefCell<(i64, Arc<str>)> = RefCell::new((i64::MIN, Arc::from("")));
        }
        let second = now_us.div_euclid(1_000_000);
        let utc = UTC.with_borrow_mut(|(at, text)| {
            if *at != second {
                *text = crate::limits::period::format_utc(now_us)
                    .unwrap_or_default()
                    .into();
                *at = second;
            }
            text.clone()
        });
        TimeInput {
            unix_ms: now_us.div_euclid(1_000),
            utc,
        }
    }
}

/// An exact amount as a JSON number.
pub fn usd_number(amount: crate::money::Usd) -> Box<RawValue> {
    decimal_number(amount.decimal().to_owned())
}

/// Decimal text (as `Usd` displays it) as a JSON number, without parsing it
/// again.
pub fn decimal_number(text: String) -> Box<RawValue> {
    RawValue::from_string(text)
        .unwrap_or_else(|_| RawValue::from_string("0".into()).expect("0 is JSON"))
}

/// What a policy may need of the request body: the members the parse of
/// its facts found, read where they lie (not parsed again).
#[derive(Debug, Default)]
pub struct BodyShape<'a> {
    messages: Option<&'a [u8]>,
    input: Option<&'a [u8]>,
    system: Option<&'a [u8]>,
    prompt: Option<&'a [u8]>,
    tools: Option<&'a [u8]>,
}

#[derive(Debug, Deserialize)]
struct ToolShape<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    function: Option<FunctionShape<'a>>,
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
struct FunctionShape<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
}

impl<'a> BodyShape<'a> {
    /// The parts of `body` that `RequestFacts::parse(body)` found.
    pub fn of(body: &'a [u8], parts: &BodyParts) -> BodyShape<'a> {
        let text = |span: Option<Span>| span.map(|span| span.bytes(body));
        BodyShape {
            messages: text(parts.messages),
            input: text(parts.input),
            system: text(parts.system),
            prompt: text(parts.prompt),
            tools: text(parts.tools),
        }
    }

    /// Messages (chat, messages), input items (responses) or prompts
    /// (completions), counted; a single string counts one.
    pub fn message_count(&self) -> u64 {
        self.messages
            .or(self.input)
            .or(self.prompt)
            .map_or(0, |raw| array_len(raw).unwrap_or(1))
    }

    /// Names of the tools offered to the model (function tools by their
    /// function's name, built-in tools by their type).
    pub fn tool_names(&self) -> Vec<Cow<'a, str>> {
        let tools: Vec<ToolShape<'a>> = self
            .tools
            .and_then(|raw| serde_json::from_slice(raw).ok())
            .unwrap_or_default();
        tools
            .into_iter()
            .filter_map(|tool| {
                tool.name
                    .or_else(|| tool.function.and_then(|f| f.name))
                    .or(tool.kind)
            })
            .collect()
    }

    /// `"messages":…,"system":…` as raw JSON members, for policies that
    /// asked for the text.
    pub fn message_members(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (key, value) in [
            ("messages", self.messages),
            ("input", self.input),
            ("system", self.system),
            ("prompt", self.prompt),
        ] {
            if let Some(raw) = value {
                for piece in [&b",\""[..], key.as_bytes(), b"\":", raw] {
                    out.extend_from_slice(piece);
                }
            }
        }
        out
    }
}

/// The bytes one policy reads, in the pieces the sandbox writes one after
/// another into the module's memory (no joined copy per policy):
/// `{"config":…,` then the shared input's members (and the messages when the
/// policy asked for them).
pub fn for_policy<'a>(
    config_json: &'a [u8],
    shared: &'a [u8],
    messages: Option<&'a [u8]>,
) -> [&'a [u8]; 6] {
    // `shared` is a JSON object: its opening brace is dropped, and its
    // closing one when members follow.
    match messages {
        Some(members) if !members.is_empty() => [
            b"{\"config\":",
            config_json,
            b",",
            &shared[1..shared.len() - 1],
            members,
            b"}",
        ],
        _ => [b"{\"config\":", config_json, b",", &shared[1..], b"", b""],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::RequestFacts;

    fn shape_of(body: &[u8]) -> BodyShape<'_> {
        BodyShape::of(body, &RequestFacts::parse(body).unwrap().parts)
    }

    #[test]
    fn reads_counts_and_tool_names_of_each_format() {
        let chat = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}],
            "tools":[{"type":"function","function":{"name":"get_weather"}}]}"#;
        let shape = shape_of(chat);
        assert_eq!(shape.message_count(), 2);
        assert_eq!(shape.tool_names(), ["get_weather"]);
        let messages = br#"{"model":"claude","system":"be brief","messages":[{"role":"user","content":"hi"}],
            "tools":[{"name":"search","input_schema":{}},{"type":"web_search_20250305","name":"web_search"}]}"#;
        let shape = shape_of(messages);
        assert_eq!(shape.tool_names(), ["search", "web_search"]);
        let members = String::from_utf8(shape.message_members()).unwrap();
        assert!(members.contains(r#""system":"be brief""#));
        let responses =
            br#"{"model":"gpt-4o","input":"tell me","tools":[{"type":"web_search_preview"}]}"#;
        let shape = shape_of(responses);
        assert_eq!(shape.message_count(), 1);
        assert_eq!(shape.tool_names(), ["web_search_preview"]);
        let prompts = br#"{"model":"davinci","prompt":["a", "b, c", "[d]"],"messages":null}"#;
        assert_eq!(shape_of(prompts).message_count(), 3);
        // Tools of an unknown shape are no tools; the rest still reads.
        let odd = br#"{"model":"m","messages":[{"role":"user"}],"tools":"none"}"#;
        assert_eq!(shape_of(odd).tool_names(), Vec::<Cow<str>>::new());
        assert_eq!(shape_of(odd).message_count(), 1);
    }

    #[test]
    fn the_time_text_is_the_seconds_of_the_moment_asked() {
        let second = 1_764_000_000_000_000; // 2025-11-24T16:00:00Z
        for (now_us, utc) in [
            (second, "2025-11-24T16:00:00Z"),
            (second + 999_999, "2025-11-24T16:00:00Z"),
            (second + 1_000_000, "2025-11-24T16:00:01Z"),
            (second - 1, "2025-11-24T15:59:59Z"),
            (second, "2025-11-24T16:00:00Z"),
        ] {
            let time = TimeInput::at(now_us);
            assert_eq!(&*time.utc, utc, "{now_us}");
            assert_eq!(time.unix_ms, now_us / 1_000);
        }
    }

    #[test]
    fn splices_config_and_messages_into_valid_json() {
        let shared = br#"{"call":{"model":"m"},"run":null}"#;
        let plain = for_policy(br#"{"max":1}"#, shared, None).concat();
        let value: serde_json::Value = serde_json::from_slice(&plain).unwrap();
        assert_eq!(value["config"]["max"], 1);
        assert_eq!(value["call"]["model"], "m");
        let with = for_policy(b"{}", shared, Some(br#","messages":[{"content":"x"}]"#)).concat();
        let value: serde_json::Value = serde_json::from_slice(&with).unwrap();
        assert_eq!(value["messages"][0]["content"], "x");
        assert!(value["run"].is_null());
    }
}
