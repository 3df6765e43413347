//! The stream meter: reads the SSE bytes an upstream sends (the same bytes the
//! agent receives) and keeps the usage, the finish reason and enough output
//! text to estimate tokens if the stream ends without usage.
//!
//! Most chunks are text deltas; the meter finds what it needs in them by
//! substring search and parses JSON only for the few events that carry usage.

use std::sync::LazyLock;

use bytes::{Buf, Bytes, BytesMut};
use memchr::memmem::Finder;
use serde::Deserialize;

use super::sse::{SseEvent, SseParser};
use crate::providers::answer::{Answer, AnswerStream};
use crate::providers::{Endpoint, ProviderKind, RawUsage, Usage};

/// Output text kept for estimates; beyond it, only its length counts.
const MAX_TEXT: usize = 1 << 20;

/// What the meter learned from a stream.
#[derive(Debug, Clone, Default)]
pub struct MeterReport {
    pub usage: Usage,
    /// The provider reported the input side (prompt and cache tokens).
    pub input_known: bool,
    /// The provider reported the final output count.
    pub output_known: bool,
    pub finish_reason: Option<String>,
    /// The stream reached its natural end (`[DONE]`, `message_stop`,
    /// `response.completed`).
    pub completed: bool,
    /// A provider error event, as `type: message`.
    pub error: Option<String>,
    /// Output text (content, tool arguments, thinking) for estimates.
    pub text: Vec<u8>,
    /// Output bytes seen beyond `MAX_TEXT`.
    pub text_overflow: u64,
    /// The model's answer, read for calls bound to a workflow step.
    pub answer: Option<Answer>,
}

pub struct StreamMeter {
    endpoint: Endpoint,
    parser: SseParser,
    report: MeterReport,
    /// Drop OpenAI's usage-only chunk because the agent did not ask for it.
    strip_usage_chunk: bool,
    last_event_end: u64,
    drops: Vec<(u64, u64)>,
    answer: Option<Box<AnswerStream>>,
}

struct Patterns {
    usage: Finder<'static>,
    finish_reason: Finder<'static>,
    content: Finder<'static>,
    arguments: Finder<'static>,
    text: Finder<'static>,
    reasoning: Finder<'static>,
    thinking: Finder<'static>,
    partial_json: Finder<'static>,
    delta: Finder<'static>,
    type_field: Finder<'static>,
}

static PATTERNS: LazyLock<Patterns> = LazyLock::new(|| Patterns {
    usage: Finder::new(b"\"usage\""),
    finish_reason: Finder::new(b"\"finish_reason\":\""),
    content: Finder::new(b"\"content\":\""),
    arguments: Finder::new(b"\"arguments\":\""),
    text: Finder::new(b"\"text\":\""),
    reasoning: Finder::new(b"\"reasoning_content\":\""),
    thinking: Finder::new(b"\"thinking\":\""),
    partial_json: Finder::new(b"\"partial_json\":\""),
    delta: Finder::new(b"\"delta\":\""),
    type_field: Finder::new(b"\"type\":\""),
});

impl StreamMeter {
    pub fn new(endpoint: Endpoint, strip_usage_chunk: bool) -> Self {
        StreamMeter {
            endpoint,
            parser: SseParser::new(),
            report: MeterReport::default(),
            strip_usage_chunk,
            last_event_end: 0,
            drops: Vec::new(),
            answer: None,
        }
    }

    /// Also reads the answer's text (a call bound to a workflow step).
    pub fn with_answer(mut self) -> Self {
        self.answer = Some(Box::new(AnswerStream::new(self.endpoint)));
        self
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        let StreamMeter {
            endpoint,
            parser,
            report,
            strip_usage_chunk,
            last_event_end,
            drops,
            answer,
        } = self;
        parser.feed(chunk, |event| {
            if let Some(answer) = answer.as_mut() {
                answer.on_event(event.event, event.data);
            }
            let start = *last_event_end;
            *last_event_end = event.end;
            let drop = match endpoint.protocol() {
                ProviderKind::Anthropic => {
                    on_anthropic_event(report, &event);
                    false
                }
                ProviderKind::OpenAi if *endpoint == Endpoint::Responses => {
                    on_responses_event(report, &event);
                    false
                }
                ProviderKind::OpenAi => on_openai_chunk(report, &event) && *strip_usage_chunk,
            };
            if drop {
                drops.push((start, event.end));
            }
        });
    }

    pub fn report(&self) -> &MeterReport {
        &self.report
    }

    pub fn into_report(mut self) -> MeterReport {
        self.take_report()
    }

    pub fn take_report(&mut self) -> MeterReport {
        let mut report = std::mem::take(&mut self.report);
        report.answer = self.answer.take().map(|a| a.finish());
        report
    }

    pub fn strips_usage_chunk(&self) -> bool {
        self.strip_usage_chunk
    }
}

/// Forwards stream bytes minus the byte ranges the meter marked for dropping.
/// Bytes of an unfinished event are held until the event completes, so a
/// dropped event never reaches the agent in part.
#[derive(Default)]
pub struct ChunkFilter {
    held: BytesMut,
    held_start: u64,
}

impl ChunkFilter {
    /// Feeds `chunk` to the meter and returns what the agent should receive.
    pub fn pass(&mut self, meter: &mut StreamMeter, chunk: Bytes) -> Bytes {
        meter.feed(&chunk);
        let upto = meter.last_event_end;
        let chunk_end = meter.parser.offset();
        if self.held.is_empty() && meter.drops.is_empty() && upto == chunk_end {
            self.held_start = chunk_end;
            return chunk;
        }
        self.held.extend_from_slice(&chunk);
        let mut out = BytesMut::with_capacity((upto - self.held_start) as usize);
        let mut cursor = self.held_start;
        for (start, end) in meter.drops.drain(..) {
            out.extend_from_slice(
                &self.held[(cursor - self.held_start) as usize..(start - self.held_start) as usize],
            );
            cursor = end;
        }
        out.extend_from_slice(
            &self.held[(cursor - self.held_start) as usize..(upto - self.held_start) as usize],
        );
        self.held.advance((upto - self.held_start) as usize);
        self.held_start = upto;
        out.freeze()
    }

    /// Whatever is still held when the stream ends (an unterminated event).
    pub fn finish(&mut self) -> Bytes {
        std::mem::take(&mut self.held).freeze()
    }
}

/// The answer text of a non-streamed body that carried no usage, for an
/// estimate.
pub fn output_text_of_body(body: &[u8]) -> Vec<u8> {
    let mut report = MeterReport::default();
    let p = &*PATTERNS;
    for finder in [&p.content, &p.text, &p.arguments] {
        each_string_after(body, finder, |s| keep_text(&mut report, s));
    }
    report.text
}

fn keep_text(report: &mut MeterReport, text: &[u8]) {
    let room = MAX_TEXT.saturating_sub(report.text.len());
    let take = room.min(text.len());
    report.text.extend_from_slice(&text[..take]);
    report.text_overflow += (text.len() - take) as u64;
}

/// The raw (still escaped) contents of every JSON string that follows
/// `finder`'s pattern, which must end in the opening quote.
fn each_string_after(data: &[u8], finder: &Finder<'_>, mut each: impl FnMut(&[u8])) {
    let mut pos = 0;
    while let Some(found) = finder.find(&data[pos..]) {
        let start = pos + found + finder.needle().len();
        let end = string_end(data, start);
        each(&data[start..end]);
        pos = end.max(start);
        if pos >= data.len() {
            break;
        }
    }
}

fn first_string_after<'a>(data: &'a [u8], finder: &Finder<'_>) -> Option<&'a [u8]> {
    let found = finder.find(data)?;
    let start = found + finder.needle().len();
    Some(&data[start..string_end(data, start)])
}

/// Where the string whose contents start at `start` ends: its closing
/// quote, or the end of `data` when the string runs past it.
fn string_end(data: &[u8], start: usize) -> usize {
    crate::providers::members::closing_quote(data, start).unwrap_or(data.len())
}

/// Whether `"usage"` in `data` is followed by an object, not `null`.
fn has_usage_object(data: &[u8]) -> bool {
    let Some(found) = PATTERNS.usage.find(data) else {
        return false;
    };
    let rest = &data[found + 7..];
    let mut bytes = rest.iter().copied().skip_while(|b| b.is_ascii_whitespace());
    if bytes.next() != Some(b':') {
        return false;
    }
    bytes.find(|b| !b.is_ascii_whitespace()) == Some(b'{')
}

fn describe_error(data: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Envelope {
        error: Option<ErrorObject>,
    }
    #[derive(Deserialize)]
    struct ErrorObject {
        #[serde(rename = "type")]
        kind: Option<String>,
        code: Option<serde_json::Value>,
        message: Option<String>,
    }
    match serde_json::from_slice::<Envelope>(data)
        .ok()
        .and_then(|e| e.error)
    {
        Some(error) => {
            let kind = error
                .kind
                .or_else(|| error.code.map(|c| c.to_string()))
                .unwrap_or_else(|| "error".into());
            format!("{kind}: {}", error.message.unwrap_or_default())
        }
        None => "provider sent an error event".to_owned(),
    }
}

/// Returns true for the usage-only chunk (`choices` empty or null).
fn on_openai_chunk(report: &mut MeterReport, event: &SseEvent<'_>) -> bool {
    let data = event.data;
    if data == b"[DONE]" {
        report.completed = true;
        return false;
    }
    if data.starts_with(b"{\"error\"") || event.event == b"error" {
        report.error = Some(describe_error(data));
        return false;
    }
    let p = &*PATTERNS;
    if let Some(reason) = first_string_after(data, &p.finish_reason) {
        report.finish_reason = Some(String::from_utf8_lossy(reason).into_owned());
    }
    for finder in [&p.content, &p.arguments, &p.text, &p.reasoning] {
        each_string_after(data, finder, |s| keep_text(report, s));
    }
    if !has_usage_object(data) {
        return false;
    }
    #[derive(Deserialize)]
    struct UsageChunk {
        usage: Option<RawUsage>,
        choices: Option<Vec<serde::de::IgnoredAny>>,
    }
    match serde_json::from_slice::<UsageChunk>(data) {
        Ok(chunk) => {
            if let Some(raw) = chunk.usage {
                report.usage = raw.normalize(ProviderKind::OpenAi);
                report.input_known = true;
                report.output_known = true;
            }
            chunk.choices.is_none_or(|c| c.is_empty())
        }
        Err(_) => false,
    }
}

fn event_type<'a>(event: &SseEvent<'a>) -> &'a [u8] {
    if !event.event.is_empty() {
        return event.event;
    }
    first_string_after(event.data, &PATTERNS.type_field).unwrap_or(b"")
}

fn on_responses_event(report: &mut MeterReport, event: &SseEvent<'_>) {
    let kind = event_type(event);
    match kind {
        b"response.completed" | b"response.incomplete" | b"response.failed" => {
            #[derive(Deserialize)]
            struct Terminal {
                response: Option<TerminalResponse>,
            }
            #[derive(Deserialize)]
            struct TerminalResponse {
                usage: Option<RawUsage>,
                status: Option<String>,
                error: Option<serde_json::Value>,
            }
            report.completed = true;
            if let Ok(Terminal {
                response: Some(response),
            }) = serde_json::from_slice::<Terminal>(event.data)
            {
                if let Some(raw) = response.usage {
                    report.usage = raw.normalize(ProviderKind::OpenAi);
                    report.input_known = true;
                    report.output_known = true;
                }
                report.finish_reason = response.status;
                if kind == b"response.failed" {
                    report.error = Some(match response.error {
                        Some(error) => format!("response.failed: {error}"),
                        None => "response.failed".to_owned(),
                    });
                }
            }
        }
        b"error" => report.error = Some(describe_error(event.data)),
        _ if kind.ends_with(b".delta") => {
            each_string_after(event.data, &PATTERNS.delta, |s| keep_text(report, s));
        }
        _ => {}
    }
}

fn on_anthropic_event(report: &mut MeterReport, event: &SseEvent<'_>) {
    let p = &*PATTERNS;
    match event_type(event) {
        b"content_block_delta" => {
            for finder in [&p.text, &p.thinking, &p.partial_json] {
                each_string_after(event.data, finder, |s| keep_text(report, s));
            }
        }
        b"message_start" => {
            #[derive(Deserialize)]
            struct Start {
                message: StartMessage,
            }
            #[derive(Deserialize)]
            struct StartMessage {
                usage: Option<RawUsage>,
            }
            if let Ok(Start {
                message: StartMessage { usage: Some(raw) },
            }) = serde_json::from_slice(event.data)
            {
                // `output_tokens` here is a placeholder; the final count comes
                // with message_delta.
                let output = report.usage.output_tokens;
                report.usage = raw.normalize(ProviderKind::Anthropic);
                report.usage.output_tokens = output;
                report.input_known = raw.has_input();
            }
        }
        b"message_delta" => {
            #[derive(Deserialize)]
            struct Delta {
                delta: Option<DeltaBody>,
                usage: Option<RawUsage>,
            }
            #[derive(Deserialize)]
            struct DeltaBody {
                stop_reason: Option<String>,
            }
            if let Ok(delta) = serde_json::from_slice::<Delta>(event.data) {
                if let Some(reason) = delta.delta.and_then(|d| d.stop_reason) {
                    report.finish_reason = Some(reason);
                }
                if let Some(raw) = delta.usage {
                    // Cumulative counts: take them, never add them up.
                    if raw.has_input() {
                        let normalized = raw.normalize(ProviderKind::Anthropic);
                        report.usage = Usage {
                            output_tokens: report.usage.output_tokens,
                            ..normalized
                        };
                        report.input_known = true;
                    }
                    if let Some(output) = raw.output_tokens() {
                        report.usage.output_tokens = output;
                        report.output_known = true;
                    }
                }
            }
        }
        b"message_stop" => report.completed = true,
        b"error" => report.error = Some(describe_error(event.data)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_fixture as fixture;

    fn meter_all(endpoint: Endpoint, bytes: &[u8], chunk: usize) -> MeterReport {
        let mut meter = StreamMeter::new(endpoint, false);
        for piece in bytes.chunks(chunk) {
            meter.feed(piece);
        }
        meter.into_report()
    }

    #[test]
    fn openai_stream_usage_from_final_chunk() {
        let bytes = fixture("openai/chat_stream_tool_calls_usage_null.sse");
        for chunk in [1, 7, 64, bytes.len()] {
            let report = meter_all(Endpoint::ChatCompletions, &bytes, chunk);
            assert!(report.completed && report.input_known && report.output_known);
            assert_eq!(report.usage.input_tokens, 81);
            assert_eq!(report.usage.output_tokens, 17);
            assert_eq!(report.usage.cached_input_tokens, 64);
            assert_eq!(report.finish_reason.as_deref(), Some("tool_calls"));
            assert!(String::from_utf8_lossy(&report.text).contains("Paris"));
        }
    }

    #[test]
    fn compat_usage_with_null_choices() {
        let report = meter_all(
            Endpoint::ChatCompletions,
            &fixture("compat/llamacpp_stream_usage_choices_null.sse"),
            13,
        );
        assert_eq!(report.usage.input_tokens, 75);
        assert_eq!(report.usage.output_tokens, 31);
        assert_eq!(report.usage.cached_input_tokens, 60);
    }

    #[test]
    fn anthropic_takes_cumulative_delta_and_ignores_placeholder() {
        let report = meter_all(
            Endpoint::Messages,
            &fixture("anthropic/message_stream_cache_thinking.sse"),
            5,
        );
        assert!(report.completed && report.output_known);
        assert_eq!(report.usage.output_tokens, 31);
        assert_eq!(report.usage.cached_input_tokens, 2048);
        assert_eq!(report.usage.input_tokens, 135 + 2048);
        assert_eq!(report.finish_reason.as_deref(), Some("end_turn"));
        assert!(String::from_utf8_lossy(&report.text).contains("The user wants"));
    }

    #[test]
    fn anthropic_error_midway_keeps_input_and_flags_output_unknown() {
        let report = meter_all(
            Endpoint::Messages,
            &fixture("anthropic/message_stream_error_midway.sse"),
            9,
        );
        assert!(report.input_known && !report.output_known && !report.completed);
        assert_eq!(report.usage.input_tokens, 472);
        assert_eq!(report.usage.output_tokens, 0);
        assert!(
            report
                .error
                .as_deref()
                .unwrap()
                .starts_with("overloaded_error")
        );
        assert_eq!(report.text, b"Okay, let me");
    }

    #[test]
    fn responses_usage_from_completed_event() {
        let report = meter_all(
            Endpoint::Responses,
            &fixture("openai/responses_stream.sse"),
            11,
        );
        let expected = crate::providers::usage_from_body(
            Endpoint::Responses,
            &fixture("openai/responses.json"),
        );
        assert!(report.completed && report.input_known && report.output_known);
        assert!(report.usage.input_tokens > 0 && report.usage.output_tokens > 0);
        assert!(expected.is_some());
        assert!(!report.text.is_empty());
    }

    #[test]
    fn filter_strips_only_the_usage_chunk_at_any_split() {
        let bytes = fixture("openai/chat_stream_include_usage.sse");
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let expected: String = text
            .split_inclusive("\n\n")
            .filter(|event| !event.contains("\"choices\":[]"))
            .collect();
        assert_ne!(expected, text);
        for chunk in [1, 3, 50, bytes.len()] {
            let mut meter = StreamMeter::new(Endpoint::ChatCompletions, true);
            let mut filter = ChunkFilter::default();
            let mut out = Vec::new();
            for piece in bytes.chunks(chunk) {
                out.extend_from_slice(&filter.pass(&mut meter, Bytes::copy_from_slice(piece)));
            }
            out.extend_from_slice(&filter.finish());
            assert_eq!(
                String::from_utf8(out).unwrap(),
                expected,
                "chunk size {chunk}"
            );
            assert!(meter.report().output_known);
        }
    }

    #[test]
    fn filter_passes_everything_when_not_stripping() {
        let bytes = fixture("openai/chat_stream_include_usage.sse");
        let mut meter = StreamMeter::new(Endpoint::ChatCompletions, false);
        let mut filter = ChunkFilter::default();
        let mut out = Vec::new();
        for piece in bytes.chunks(17) {
            out.extend_from_slice(&filter.pass(&mut meter, Bytes::copy_from_slice(piece)));
        }
        out.extend_from_slice(&filter.finish());
        assert_eq!(out, bytes);
    }
}
