//! Token estimates for calls whose usage the provider never reported (the
//! agent hung up, the upstream broke off).
//!
//! OpenAI models are counted with their own tokenizer (tiktoken: `o200k_base`
//! for the GPT-4o, GPT-4.1, GPT-5 and o-series families, `cl100k_base` for
//! older ones). Anthropic publishes no tokenizer; Claude text is counted with
//! `cl100k_base`, which on English prose lands within about 10-20 % of
//! Claude's count. Chat framing adds 3 tokens per message and 3 per reply, as
//! OpenAI documents for its chat models. These run on the store writer's
//! thread, never on the request path.

use super::bpe::{self, Vocabulary};

/// Escaped JSON string fragments are unescaped cheaply before counting.
fn unescape_lossy(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    if !text.contains('\\') {
        return text.into_owned();
    }
    serde_json::from_str::<String>(&format!("\"{text}\""))
        .unwrap_or_else(|_| text.replace("\\n", "\n"))
}

fn tokenizer(model: &str) -> &'static Vocabulary {
    let bare = model.rsplit_once('/').map_or(model, |(_, m)| m);
    let o200k = [
        "gpt-4o",
        "gpt-4.1",
        "gpt-4.5",
        "gpt-5",
        "o1",
        "o3",
        "o4",
        "chatgpt-4o",
        "gpt-oss",
    ];
    if o200k.iter().any(|prefix| bare.starts_with(prefix)) {
        bpe::o200k_base()
    } else {
        bpe::cl100k_base()
    }
}

pub fn count_tokens(model: &str, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    tokenizer(model).count(text)
}

/// Output tokens from the text the stream meter kept (raw JSON string
/// contents) plus bytes it saw beyond its cap, at four bytes a token.
pub fn estimate_output(model: &str, text: &[u8], overflow_bytes: u64) -> u64 {
    count_tokens(model, &unescape_lossy(text)) + overflow_bytes.div_ceil(4)
}

/// Input tokens of a request body: every string under the prompt-bearing
/// keys, plus the per-message framing. Inline images and files (data: URLs,
/// base64 blobs) are not text and are left out.
pub fn estimate_input(model: &str, body: &[u8]) -> u64 {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (body.len() as u64).div_ceil(4);
    };
    let mut text = String::new();
    let mut messages = 0u64;
    for key in [
        "messages",
        "input",
        "system",
        "prompt",
        "instructions",
        "tools",
        "functions",
    ] {
        if let Some(part) = value.get(key) {
            if let Some(list) = part.as_array()
                && matches!(key, "messages" | "input")
            {
                messages += list.len() as u64;
            }
            collect_text(part, &mut text);
        }
    }
    let framing = if messages > 0 { messages * 3 + 3 } else { 0 };
    count_tokens(model, &text) + framing
}

fn collect_text(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::String(s) => {
            if s.starts_with("data:") || (s.len() > 4096 && !s.contains(' ')) {
                return;
            }
            out.push_str(s);
            out.push('\n');
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_text(v, out)),
        serde_json::Value::Object(map) => map.values().for_each(|v| collect_text(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_with_the_model_family_tokenizer() {
        assert_eq!(count_tokens("gpt-4o", "hello world"), 2);
        assert_eq!(count_tokens("claude-sonnet-4-5", "hello world"), 2);
        assert_eq!(count_tokens("gpt-4o", ""), 0);
    }

    #[test]
    fn input_estimate_counts_messages_and_framing() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello world"}]}"#;
        // "user\nhello world\n" plus 3 per message and 3 for the reply
        let tokens = estimate_input("gpt-4o", body);
        assert!((6..=12).contains(&tokens), "{tokens}");
    }

    #[test]
    fn images_are_not_counted_as_text() {
        let image = format!("data:image/png;base64,{}", "A".repeat(100_000));
        let body = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": image}}]}]});
        assert!(estimate_input("gpt-4o", body.to_string().as_bytes()) < 30);
    }

    #[test]
    fn output_estimate_unescapes() {
        assert_eq!(
            estimate_output("gpt-4o", br#"hello\nworld"#, 0),
            count_tokens("gpt-4o", "hello\nworld")
        );
        assert_eq!(estimate_output("gpt-4o", b"", 10), 3);
    }
}
