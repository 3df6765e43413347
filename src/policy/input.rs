//! The JSON a policy reads: the call, the agent's recent activity, the
//! budgets that count the call, the run and step, the time, and the
//! policy's own config. Serialised once per call; each policy gets its
//! config (and, if it opted in, the messages) spliced in front.

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;

use serde::Deserialize;

use super::activity::ActivityCounts;
use crate::money::Usd;
use crate::providers::members::array_len;
use crate::providers::{BodyParts, Span};

#[derive(Debug)]
pub struct PolicyInput<'a> {
    pub call: CallInput<'a>,
    pub activity: ActivityCounts,
    pub budgets: Vec<BudgetInput>,
    pub run: Option<RunInput<'a>>,
    pub time: TimeInput,
}

/// The call, with the names the `calls` table uses. Written in this order,
/// the members policies read most first: a module's JSON reader (the C
/// SDK's `wd_get`) walks the object from its start, and finding
/// `estimated_cost_usd` behind the call id, the capabilities and the token
/// counts took `cost_gate` about half of its evaluation.
#[derive(Debug)]
pub struct CallInput<'a> {
    pub model: &'a str,
    pub role: &'a str,
    pub agent: &'a str,
    /// The upper bound budgets reserve; `null` when the model has no price.
    pub estimated_cost_usd: Option<Usd>,
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

/// A budget that counts the call; amounts as the exact decimal text
/// `Usd` displays.
#[derive(Debug, Clone)]
pub struct BudgetInput {
    pub scope: String,
    pub period: &'static str,
    pub limit_usd: String,
    pub spent_usd: String,
    pub reserved_usd: String,
    pub on_exceed: &'static str,
}

#[derive(Debug)]
pub struct RunInput<'a> {
    pub run_id: &'a str,
    pub step_id: Option<&'a str>,
}

#[derive(Debug)]
pub struct TimeInput {
    pub unix_ms: i64,
    pub utc: Arc<str>,
}

impl PolicyInput<'_> {
    /// The input as JSON (`policies/ABI.md`), written straight into `out`:
    /// every call builds it, and serde's serializer, its boxed raw numbers
    /// and its per-piece writes took about a microsecond.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let call = &self.call;
        let mut json = JsonWriter(out);
        json.member(br#"{"call":{"model":"#).string(call.model);
        json.member(br#","role":"#).string(call.role);
        json.member(br#","agent":"#).string(call.agent);
        json.member(br#","estimated_cost_usd":"#)
            .optional(call.estimated_cost_usd, |json, cost| {
                json.raw(cost.decimal().as_bytes())
            });
        json.member(br#","provider":"#).string(call.provider);
        json.member(br#","upstream":"#).string(call.upstream);
        json.member(br#","endpoint":"#).string(call.endpoint);
        json.member(br#","stream":"#)
            .raw(if call.stream { b"true" } else { b"false" });
        json.member(br#","max_tokens":"#)
            .optional(call.max_tokens, JsonWriter::integer);
        json.member(br#","estimated_input_tokens":"#)
            .integer(call.estimated_input_tokens);
        json.member(br#","estimated_output_tokens":"#)
            .integer(call.estimated_output_tokens);
        json.member(br#","message_count":"#)
            .integer(call.message_count);
        json.member(br#","capabilities":"#)
            .strings(call.capabilities.iter().map(String::as_str));
        json.member(br#","tool_names":"#)
            .strings(call.tool_names.iter().map(|name| &**name));
        json.raw(br#","headers":["#);
        for (i, (name, value)) in call.headers.iter().enumerate() {
            json.member(if i == 0 { b"[" } else { b",[" }).string(name);
            json.member(b",").string(value);
            json.raw(b"]");
        }
        json.member(br#"],"call_id":"#).string(call.call_id);
        json.member(br#"},"activity":{"calls_last_minute":"#)
            .integer(self.activity.calls_last_minute);
        json.member(br#","errors_last_minute":"#)
            .integer(self.activity.errors_last_minute);
        json.raw(br#"},"budgets":["#);
        for (i, budget) in self.budgets.iter().enumerate() {
            json.member(if i == 0 {
                br#"{"scope":"#
            } else {
                br#",{"scope":"#
            })
            .string(&budget.scope);
            json.member(br#","period":"#).string(budget.period);
            json.member(br#","limit_usd":"#)
                .number_text(&budget.limit_usd);
            json.member(br#","spent_usd":"#)
                .number_text(&budget.spent_usd);
            json.member(br#","reserved_usd":"#)
                .number_text(&budget.reserved_usd);
            json.member(br#","on_exceed":"#).string(budget.on_exceed);
            json.raw(b"}");
        }
        json.member(br#"],"run":"#)
            .optional(self.run.as_ref(), |json, run| {
                json.member(br#"{"run_id":"#).string(run.run_id);
                json.member(br#","step_id":"#)
                    .optional(run.step_id, JsonWriter::string);
                json.raw(b"}");
            });
        json.member(br#","time":{"unix_ms":"#)
            .integer(self.time.unix_ms);
        json.member(br#","utc":"#).string(&self.time.utc);
        json.raw(b"}}");
    }
}

struct JsonWriter<'a>(&'a mut Vec<u8>);

impl JsonWriter<'_> {
    fn raw(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    /// The text before a value (punctuation and its key), for the value's
    /// writer to follow: `json.member(br#","role":"#).string(role)`.
    fn member(&mut self, before: &[u8]) -> &mut Self {
        self.raw(before);
        self
    }

    fn integer(&mut self, value: impl itoa::Integer) {
        self.raw(itoa::Buffer::new().format(value).as_bytes());
    }

    /// `value` as `write` writes it, or `null`.
    fn optional<T>(&mut self, value: Option<T>, write: impl FnOnce(&mut Self, T)) {
        match value {
            Some(value) => write(self, value),
            None => self.raw(b"null"),
        }
    }

    /// Decimal text that should be a JSON number; `null` if it is not, so
    /// the input stays JSON whatever the text.
    fn number_text(&mut self, text: &str) {
        if serde_json::from_str::<serde_json::Number>(text).is_ok() {
            self.raw(text.as_bytes());
        } else {
            self.raw(b"null");
        }
    }

    /// A JSON string; almost every one needs no escape and is copied whole,
    /// the others are escaped by serde_json.
    fn string(&mut self, text: &str) {
        if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            let out = &mut *self.0;
            out.push(b'"');
            out.extend_from_slice(text.as_bytes());
            out.push(b'"');
        } else {
            serde_json::to_writer(&mut *self.0, text).expect("a string serialises into a Vec");
        }
    }

    fn strings<'s>(&mut self, items: impl Iterator<Item = &'s str>) {
        self.raw(b"[");
        for (i, item) in items.enumerate() {
            if i > 0 {
                self.raw(b",");
            }
            self.string(item);
        }
        self.raw(b"]");
    }
}

impl TimeInput {
    pub fn now() -> TimeInput {
        TimeInput::at(crate::store::record::now_micros())
    }

    /// The time `now_us` (Unix µs). The UTC text changes once a second:
    /// each thread formats it once per second, not once per call (the
    /// formatting was a tenth of building the input).
    pub fn at(now_us: i64) -> TimeInput {
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
    fn the_input_is_json_with_every_member_and_escapes_what_needs_it() {
        let capabilities = vec!["search".to_owned(), "say \"hi\"".to_owned()];
        let odd = "tab\there, line\nbreak, back\\slash, bell\u{7}, é ✓";
        let mut input = PolicyInput {
            call: CallInput {
                model: "gpt-4o-mini",
                role: odd,
                agent: "researcher",
                estimated_cost_usd: Some(Usd::parse("0.000168").unwrap()),
                provider: "openai",
                upstream: "main",
                endpoint: "chat.completions",
                stream: true,
                max_tokens: Some(256),
                estimated_input_tokens: 96,
                estimated_output_tokens: 256,
                message_count: 2,
                capabilities: &capabilities,
                tool_names: vec!["get_weather".into(), Cow::Owned("x\u{1f}".into())],
                headers: vec![("x-warden-run", "r-17"), ("x-warden-note", "a \"b\"")],
                call_id: "0193-abc",
            },
            activity: ActivityCounts {
                calls_last_minute: 12,
                errors_last_minute: 1,
            },
            budgets: vec![BudgetInput {
                scope: "agent:researcher".into(),
                period: "day",
                limit_usd: "40".into(),
                spent_usd: "3.21".into(),
                reserved_usd: "-0.5".into(),
                on_exceed: "deny",
            }],
            run: Some(RunInput {
                run_id: "r-17",
                step_id: None,
            }),
            time: TimeInput {
                unix_ms: 1_764_000_000_123,
                utc: "2025-11-24T16:00:00Z".into(),
            },
        };
        let written = |input: &PolicyInput<'_>| {
            let mut out = Vec::new();
            input.write_json(&mut out);
            let text = String::from_utf8(out).expect("UTF-8");
            let value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
            (text, value)
        };
        let (text, value) = written(&input);
        assert_eq!(
            value,
            serde_json::json!({
                "call": {
                    "model": "gpt-4o-mini", "role": odd, "agent": "researcher",
                    "estimated_cost_usd": 0.000168, "provider": "openai", "upstream": "main",
                    "endpoint": "chat.completions", "stream": true, "max_tokens": 256,
                    "estimated_input_tokens": 96, "estimated_output_tokens": 256,
                    "message_count": 2, "capabilities": ["search", "say \"hi\""],
                    "tool_names": ["get_weather", "x\u{1f}"],
                    "headers": [["x-warden-run", "r-17"], ["x-warden-note", "a \"b\""]],
                    "call_id": "0193-abc"
                },
                "activity": {"calls_last_minute": 12, "errors_last_minute": 1},
                "budgets": [{"scope": "agent:researcher", "period": "day", "limit_usd": 40,
                    "spent_usd": 3.21, "reserved_usd": -0.5, "on_exceed": "deny"}],
                "run": {"run_id": "r-17", "step_id": null},
                "time": {"unix_ms": 1_764_000_000_123_i64, "utc": "2025-11-24T16:00:00Z"}
            })
        );
        // Money is written as its exact decimal text, not through a float.
        assert!(text.contains(r#""estimated_cost_usd":0.000168,"#), "{text}");
        // What policies read most comes first.
        assert!(
            text.starts_with(r#"{"call":{"model":"gpt-4o-mini","role":"#),
            "{text}"
        );

        // The empty and absent cases, and amount text that is not a number.
        input.call.estimated_cost_usd = None;
        input.call.max_tokens = None;
        input.call.tool_names.clear();
        input.call.headers.clear();
        input.budgets[0].limit_usd = "1.2.3".into();
        input.run = None;
        let (_, value) = written(&input);
        assert!(value["call"]["estimated_cost_usd"].is_null());
        assert!(value["call"]["max_tokens"].is_null());
        assert_eq!(value["call"]["tool_names"], serde_json::json!([]));
        assert_eq!(value["call"]["headers"], serde_json::json!([]));
        assert!(value["budgets"][0]["limit_usd"].is_null());
        assert!(value["run"].is_null());
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
