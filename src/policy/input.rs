//! The JSON a policy reads: the call, the agent's recent activity, the
//! budgets that count the call, the run and step, the time, and the
//! policy's own config. Serialised once per call; each policy gets its
//! config (and, if it opted in, the messages) spliced in front.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::activity::ActivityCounts;

#[derive(Debug, Serialize)]
pub struct PolicyInput<'a> {
    pub call: CallInput<'a>,
    pub activity: ActivityCounts,
    pub budgets: Vec<BudgetInput>,
    pub run: Option<RunInput<'a>>,
    pub time: TimeInput,
}

/// The call, with the names the `calls` table uses.
#[derive(Debug, Serialize)]
pub struct CallInput<'a> {
    pub call_id: &'a str,
    pub agent: &'a str,
    pub role: &'a str,
    pub capabilities: &'a [String],
    pub provider: &'a str,
    pub upstream: &'a str,
    pub model: &'a str,
    pub endpoint: &'a str,
    pub stream: bool,
    pub max_tokens: Option<u64>,
    pub estimated_input_tokens: u64,
    pub estimated_output_tokens: u64,
    /// Exact decimal; `null` when the model has no price.
    pub estimated_cost_usd: Option<Box<RawValue>>,
    pub message_count: u64,
    pub tool_names: Vec<Cow<'a, str>>,
    /// The request's `x-warden-*` headers, names in lower case.
    pub headers: Vec<(&'a str, &'a str)>,
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
    pub utc: String,
}

impl TimeInput {
    pub fn now() -> TimeInput {
        let now_us = crate::store::record::now_micros();
        TimeInput {
            unix_ms: now_us / 1_000,
            utc: crate::limits::period::format_utc(now_us).unwrap_or_default(),
        }
    }
}

/// An exact amount as a JSON number.
pub fn usd_number(amount: crate::money::Usd) -> Box<RawValue> {
    decimal_number(amount.to_string())
}

/// Decimal text (as `Usd` displays it) as a JSON number, without parsing it
/// again.
pub fn decimal_number(text: String) -> Box<RawValue> {
    RawValue::from_string(text)
        .unwrap_or_else(|_| RawValue::from_string("0".into()).expect("0 is JSON"))
}

/// What a policy may need of the request body, read without copying it.
#[derive(Debug, Default, Deserialize)]
pub struct BodyShape<'a> {
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    system: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tools: Option<Vec<ToolShape<'a>>>,
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
    /// The shape of a body that already parsed as JSON; a body of another
    /// shape reads as empty.
    pub fn read(body: &'a [u8]) -> BodyShape<'a> {
        serde_json::from_slice(body).unwrap_or_default()
    }

    /// Messages (chat, messages), input items (responses) or prompts
    /// (completions), counted.
    pub fn message_count(&self) -> u64 {
        let count = |raw: &RawValue| -> u64 {
            match serde_json::from_str::<Vec<serde::de::IgnoredAny>>(raw.get()) {
                Ok(items) => items.len() as u64,
                Err(_) => 1,
            }
        };
        self.messages
            .or(self.input)
            .or(self.prompt)
            .map_or(0, count)
    }

    /// Names of the tools offered to the model (function tools by their
    /// function's name, built-in tools by their type).
    pub fn tool_names(&self) -> Vec<Cow<'a, str>> {
        self.tools
            .iter()
            .flatten()
            .filter_map(|tool| {
                tool.name
                    .clone()
                    .or_else(|| tool.function.as_ref().and_then(|f| f.name.clone()))
                    .or_else(|| tool.kind.clone())
            })
            .collect()
    }

    /// `"messages":…,"system":…` as raw JSON members, for policies that
    /// asked for the text.
    pub fn message_members(&self) -> String {
        let mut out = String::new();
        for (key, value) in [
            ("messages", self.messages),
            ("input", self.input),
            ("system", self.system),
            ("prompt", self.prompt),
        ] {
            if let Some(raw) = value {
                out.push_str(&format!(",\"{key}\":{}", raw.get()));
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
    messages: Option<&'a str>,
) -> [&'a [u8]; 6] {
    // `shared` is a JSON object: its opening brace is dropped, and its
    // closing one when members follow.
    match messages {
        Some(members) if !members.is_empty() => [
            b"{\"config\":",
            config_json,
            b",",
            &shared[1..shared.len() - 1],
            members.as_bytes(),
            b"}",
        ],
        _ => [b"{\"config\":", config_json, b",", &shared[1..], b"", b""],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_counts_and_tool_names_of_each_format() {
        let chat = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}],
            "tools":[{"type":"function","function":{"name":"get_weather"}}]}"#;
        let shape = BodyShape::read(chat);
        assert_eq!(shape.message_count(), 2);
        assert_eq!(shape.tool_names(), ["get_weather"]);
        let messages = br#"{"model":"claude","system":"be brief","messages":[{"role":"user","content":"hi"}],
            "tools":[{"name":"search","input_schema":{}},{"type":"web_search_20250305","name":"web_search"}]}"#;
        let shape = BodyShape::read(messages);
        assert_eq!(shape.tool_names(), ["search", "web_search"]);
        assert!(shape.message_members().contains(r#""system":"be brief""#));
        let responses =
            br#"{"model":"gpt-4o","input":"tell me","tools":[{"type":"web_search_preview"}]}"#;
        let shape = BodyShape::read(responses);
        assert_eq!(shape.message_count(), 1);
        assert_eq!(shape.tool_names(), ["web_search_preview"]);
    }

    #[test]
    fn splices_config_and_messages_into_valid_json() {
        let shared = br#"{"call":{"model":"m"},"run":null}"#;
        let plain = for_policy(br#"{"max":1}"#, shared, None).concat();
        let value: serde_json::Value = serde_json::from_slice(&plain).unwrap();
        assert_eq!(value["config"]["max"], 1);
        assert_eq!(value["call"]["model"], "m");
        let with = for_policy(b"{}", shared, Some(r#","messages":[{"content":"x"}]"#)).concat();
        let value: serde_json::Value = serde_json::from_slice(&with).unwrap();
        assert_eq!(value["messages"][0]["content"], "x");
        assert!(value["run"].is_null());
    }
}
