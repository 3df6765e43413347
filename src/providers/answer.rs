//! The answer a model gave on a call bound to a workflow step: its text, and
//! whether it is a final answer (the model stopped on its own) rather than a
//! tool call or a cut-off. Read only for bound calls: the meter's own pass
//! over the bytes stays pattern-based and cheap for everything else.

use serde::Deserialize;

use super::Endpoint;

/// Text kept per answer; a step's output beyond it is cut.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    pub text: String,
    /// `finish_reason` `stop`, `stop_reason` `end_turn` / `stop_sequence`,
    /// or a completed Responses answer with no function call.
    pub is_final: bool,
}

impl Answer {
    fn push(&mut self, piece: &str) {
        let room = MAX_ANSWER_BYTES.saturating_sub(self.text.len());
        if piece.len() <= room {
            self.text.push_str(piece);
        } else {
            let mut cut = room;
            while !piece.is_char_boundary(cut) {
                cut -= 1;
            }
            self.text.push_str(&piece[..cut]);
        }
    }

    /// The answer of a whole (non-streamed) response body.
    pub fn from_body(endpoint: Endpoint, body: &[u8]) -> Option<Answer> {
        let mut answer = Answer::default();
        match endpoint {
            Endpoint::ChatCompletions => {
                #[derive(Deserialize)]
                struct Body {
                    choices: Vec<Choice>,
                }
                #[derive(Deserialize)]
                struct Choice {
                    message: Option<Message>,
                    finish_reason: Option<String>,
                }
                #[derive(Deserialize)]
                struct Message {
                    content: Option<String>,
                }
                let parsed: Body = serde_json::from_slice(body).ok()?;
                let choice = parsed.choices.into_iter().next()?;
                if let Some(content) = choice.message.and_then(|m| m.content) {
                    answer.push(&content);
                }
                answer.is_final = choice.finish_reason.as_deref() == Some("stop");
            }
            Endpoint::Messages => {
                #[derive(Deserialize)]
                struct Body {
                    content: Vec<Block>,
                    stop_reason: Option<String>,
                }
                #[derive(Deserialize)]
                struct Block {
                    #[serde(rename = "type")]
                    kind: String,
                    text: Option<String>,
                }
                let parsed: Body = serde_json::from_slice(body).ok()?;
                for block in parsed.content.iter().filter(|b| b.kind == "text") {
                    answer.push(block.text.as_deref().unwrap_or(""));
                }
                answer.is_final = is_anthropic_final(parsed.stop_reason.as_deref());
            }
            Endpoint::Responses => {
                let parsed: ResponsesBody = serde_json::from_slice(body).ok()?;
                parsed.fill(&mut answer);
            }
            _ => return None,
        }
        Some(answer)
    }
}

fn is_anthropic_final(stop_reason: Option<&str>) -> bool {
    matches!(stop_reason, Some("end_turn" | "stop_sequence"))
}

#[derive(Deserialize)]
struct ResponsesBody {
    status: Option<String>,
    #[serde(default)]
    output: Vec<ResponsesItem>,
}

#[derive(Deserialize)]
struct ResponsesItem {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    content: Vec<ResponsesContent>,
}

#[derive(Deserialize)]
struct ResponsesContent {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

impl ResponsesItem {
    fn is_call(&self) -> bool {
        matches!(self.kind.as_str(), "function_call" | "custom_tool_call")
    }
}

impl ResponsesBody {
    /// The output text, and final unless the model called a function.
    fn fill(&self, answer: &mut Answer) {
        answer.text.clear();
        let mut called = false;
        for item in &self.output {
            match item.kind.as_str() {
                "message" => {
                    for part in item.content.iter().filter(|c| c.kind == "output_text") {
                        answer.push(part.text.as_deref().unwrap_or(""));
                    }
                }
                _ if item.is_call() => called = true,
                _ => {}
            }
        }
        answer.is_final = self.status.as_deref() == Some("completed") && !called;
    }
}

/// Builds the answer of a stream event by event.
#[derive(Debug)]
pub struct AnswerStream {
    endpoint: Endpoint,
    answer: Answer,
    /// A Responses stream announced a function call.
    called: bool,
}

impl AnswerStream {
    pub fn new(endpoint: Endpoint) -> AnswerStream {
        AnswerStream {
            endpoint,
            answer: Answer::default(),
            called: false,
        }
    }

    /// One SSE event: its `event:` name (may be empty) and its data.
    pub fn on_event(&mut self, event: &[u8], data: &[u8]) {
        match self.endpoint {
            Endpoint::ChatCompletions => {
                #[derive(Deserialize)]
                struct Chunk {
                    #[serde(default)]
                    choices: Vec<Choice>,
                }
                #[derive(Deserialize)]
                struct Choice {
                    delta: Option<Delta>,
                    finish_reason: Option<String>,
                }
                #[derive(Deserialize)]
                struct Delta {
                    content: Option<String>,
                }
                if data == b"[DONE]" {
                    return;
                }
                let Ok(chunk) = serde_json::from_slice::<Chunk>(data) else {
                    return;
                };
                if let Some(choice) = chunk.choices.into_iter().next() {
                    if let Some(content) = choice.delta.and_then(|d| d.content) {
                        self.answer.push(&content);
                    }
                    if let Some(reason) = choice.finish_reason {
                        self.answer.is_final = reason == "stop";
                    }
                }
            }
            Endpoint::Messages => {
                #[derive(Deserialize)]
                struct Event {
                    #[serde(rename = "type")]
                    kind: String,
                    delta: Option<Delta>,
                }
                #[derive(Deserialize)]
                struct Delta {
                    #[serde(rename = "type")]
                    kind: Option<String>,
                    text: Option<String>,
                    stop_reason: Option<String>,
                }
                if !event.is_empty() && event != b"content_block_delta" && event != b"message_delta"
                {
                    return;
                }
                let Ok(parsed) = serde_json::from_slice::<Event>(data) else {
                    return;
                };
                let Some(delta) = parsed.delta else {
                    return;
                };
                match parsed.kind.as_str() {
                    "content_block_delta" if delta.kind.as_deref() == Some("text_delta") => {
                        self.answer.push(delta.text.as_deref().unwrap_or(""));
                    }
                    "message_delta" => {
                        self.answer.is_final = is_anthropic_final(delta.stop_reason.as_deref());
                    }
                    _ => {}
                }
            }
            Endpoint::Responses => {
                #[derive(Deserialize)]
                struct Event {
                    #[serde(rename = "type")]
                    kind: String,
                    delta: Option<String>,
                    item: Option<ResponsesItem>,
                    response: Option<ResponsesBody>,
                }
                let Ok(parsed) = serde_json::from_slice::<Event>(data) else {
                    return;
                };
                match parsed.kind.as_str() {
                    "response.output_text.delta" => {
                        self.answer.push(parsed.delta.as_deref().unwrap_or(""));
                    }
                    "response.output_item.added" | "response.output_item.done"
                        if parsed.item.as_ref().is_some_and(ResponsesItem::is_call) =>
                    {
                        self.called = true;
                    }
                    "response.completed" => {
                        let Some(response) = parsed.response else {
                            return;
                        };
                        // The completed response repeats the output when the
                        // provider sends it whole; the deltas stand otherwise.
                        let mut whole = Answer::default();
                        response.fill(&mut whole);
                        if !whole.text.is_empty() {
                            self.answer.text = whole.text;
                        }
                        self.answer.is_final = whole.is_final && !self.called;
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    pub fn finish(self) -> Answer {
        self.answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_fixture as fixture;

    fn stream(endpoint: Endpoint, bytes: &[u8]) -> Answer {
        let mut answer = AnswerStream::new(endpoint);
        let mut parser = crate::metering::sse::SseParser::new();
        parser.feed(bytes, |event| answer.on_event(event.event, event.data));
        answer.finish()
    }

    #[test]
    fn chat_answers_streamed_and_whole() {
        let whole = Answer::from_body(
            Endpoint::ChatCompletions,
            br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Paris."},"finish_reason":"stop"}]}"#,
        )
        .unwrap();
        assert_eq!(whole.text, "Paris.");
        assert!(whole.is_final);
        let tool = Answer::from_body(
            Endpoint::ChatCompletions,
            br#"{"choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[]},"finish_reason":"tool_calls"}]}"#,
        )
        .unwrap();
        assert!(!tool.is_final);
        let streamed = stream(
            Endpoint::ChatCompletions,
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Par\"},\"finish_reason\":null}]}\n\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"is \\\"x\\\"\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n",
        );
        assert_eq!(streamed.text, "Paris \"x\"");
        assert!(streamed.is_final);
    }

    #[test]
    fn answers_of_the_provider_fixtures() {
        let whole =
            Answer::from_body(Endpoint::Messages, &fixture("anthropic/message.json")).unwrap();
        assert!(whole.is_final && !whole.text.is_empty());
        let streamed = stream(Endpoint::Messages, &fixture("anthropic/message_stream.sse"));
        assert!(streamed.is_final && !streamed.text.is_empty());
        let thinking = stream(
            Endpoint::Messages,
            &fixture("anthropic/message_stream_cache_thinking.sse"),
        );
        assert!(!thinking.text.is_empty());
        let broken = stream(
            Endpoint::Messages,
            &fixture("anthropic/message_stream_error_midway.sse"),
        );
        assert!(
            !broken.is_final,
            "a stream cut by an error event is no final answer"
        );
        let chat = Answer::from_body(
            Endpoint::ChatCompletions,
            &fixture("openai/chat_completion.json"),
        )
        .unwrap();
        assert!(chat.is_final && !chat.text.is_empty());
        let chat_stream = stream(
            Endpoint::ChatCompletions,
            &fixture("openai/chat_stream_include_usage.sse"),
        );
        assert!(chat_stream.is_final && !chat_stream.text.is_empty());
        let tools = stream(
            Endpoint::ChatCompletions,
            &fixture("openai/chat_stream_tool_calls_usage_null.sse"),
        );
        assert!(!tools.is_final, "a tool call is no final answer");
        let responses =
            Answer::from_body(Endpoint::Responses, &fixture("openai/responses.json")).unwrap();
        assert!(responses.is_final && !responses.text.is_empty());
        let responses_stream = stream(Endpoint::Responses, &fixture("openai/responses_stream.sse"));
        assert!(responses_stream.is_final && !responses_stream.text.is_empty());
    }

    #[test]
    fn anthropic_thinking_and_tools_are_not_the_answer() {
        let whole = Answer::from_body(
            Endpoint::Messages,
            br#"{"content":[{"type":"thinking","thinking":"hm"},{"type":"text","text":"Hello"}],"stop_reason":"end_turn"}"#,
        )
        .unwrap();
        assert_eq!(whole.text, "Hello");
        assert!(whole.is_final);
        let tool = Answer::from_body(
            Endpoint::Messages,
            br#"{"content":[{"type":"tool_use","id":"t","name":"f","input":{}}],"stop_reason":"tool_use"}"#,
        )
        .unwrap();
        assert!(!tool.is_final);
        let streamed = stream(
            Endpoint::Messages,
            b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}\n\n",
        );
        assert_eq!(streamed.text, "Hi");
        assert!(streamed.is_final);
    }

    #[test]
    fn responses_answer_is_final_without_function_calls() {
        let body = br#"{"status":"completed","output":[{"type":"reasoning","summary":[]},{"type":"message","content":[{"type":"output_text","text":"Done"}]}]}"#;
        let whole = Answer::from_body(Endpoint::Responses, body).unwrap();
        assert_eq!(whole.text, "Done");
        assert!(whole.is_final);
        let called = br#"{"status":"completed","output":[{"type":"function_call","name":"f","arguments":"{}"}]}"#;
        assert!(
            !Answer::from_body(Endpoint::Responses, called)
                .unwrap()
                .is_final
        );
        let mut event = b"{\"type\":\"response.completed\",\"response\":".to_vec();
        event.extend_from_slice(body);
        event.push(b'}');
        let mut sse = b"event: response.completed\ndata: ".to_vec();
        sse.extend_from_slice(&event);
        sse.extend_from_slice(b"\n\n");
        let streamed = stream(Endpoint::Responses, &sse);
        assert_eq!(streamed.text, "Done");
        assert!(streamed.is_final);
    }
}
