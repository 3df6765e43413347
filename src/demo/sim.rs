//! A simulated model provider for the demo and the benchmarks: real HTTP on
//! a local port, speaking OpenAI's and Anthropic's exact wire formats
//! (chat completions, responses, embeddings, messages, count_tokens),
//! streaming with realistic pacing and plausible usage. It needs no key and
//! no network.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

type SimBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Pause between streamed chunks, like a model producing tokens.
    pub chunk_delay: Duration,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            chunk_delay: Duration::from_millis(15),
        }
    }
}

/// A running simulated provider; it stops when dropped.
pub struct SimProvider {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl SimProvider {
    pub async fn start(options: SimOptions) -> std::io::Result<SimProvider> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let options = options.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let options = options.clone();
                        async move { Ok::<_, Infallible>(answer(request, &options).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(SimProvider { addr, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL for an OpenAI-format upstream.
    pub fn openai_base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Base URL for an Anthropic-format upstream (no `/v1`, as Anthropic
    /// documents its own).
    pub fn anthropic_base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for SimProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<SimBody> {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        content_type.parse().expect("static content type"),
    );
    response
}

fn json_response(value: Value) -> Response<SimBody> {
    full(StatusCode::OK, "application/json", value.to_string())
}

fn openai_error(status: StatusCode, message: &str) -> Response<SimBody> {
    full(
        status,
        "application/json",
        json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}}).to_string(),
    )
}

/// Streams `events` with a pause before each, as SSE.
fn sse(events: Vec<String>, delay: Duration) -> Response<SimBody> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(async move {
        for event in events {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                return; // the client went away
            }
        }
    });
    let body = StreamBody::new(tokio_stream_from(rx));
    let mut response = Response::new(BodyExt::boxed(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        "text/event-stream; charset=utf-8".parse().expect("static"),
    );
    headers.insert(header::CACHE_CONTROL, "no-cache".parse().expect("static"));
    response
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Rough prompt size: the simulated provider's own "tokenizer".
fn prompt_tokens(body: &Value) -> u64 {
    let text = body
        .get("messages")
        .or_else(|| body.get("input"))
        .map(|v| v.to_string())
        .unwrap_or_default();
    let system = body
        .get("system")
        .map(|v| v.to_string())
        .unwrap_or_default();
    ((text.len() + system.len()) as u64 / 4).max(1) + 7
}

/// A plausible answer, different per prompt but deterministic.
fn reply_words(body: &Value) -> Vec<String> {
    let seed = body
        .to_string()
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let openings = [
        "Here is a concise summary of what I found.",
        "Short answer: yes, with two caveats.",
        "I checked the sources and drafted the key points.",
        "The draft below keeps the claims that hold up.",
    ];
    let body_text = "Governance sidecars meter every model call, enforce budgets before money is spent, and keep an audit trail that operators can query with plain SQL.";
    let text = format!(
        "{} {}",
        openings[(seed % openings.len() as u64) as usize],
        body_text
    );
    text.split(' ').map(str::to_owned).collect()
}

fn model_of(body: &Value) -> String {
    body["model"].as_str().unwrap_or("unknown").to_owned()
}

async fn answer(request: Request<Incoming>, options: &SimOptions) -> Response<SimBody> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let Ok(bytes) = request.into_body().collect().await.map(|b| b.to_bytes()) else {
        return openai_error(StatusCode::BAD_REQUEST, "could not read the body");
    };
    if method != Method::POST {
        return openai_error(
            StatusCode::NOT_FOUND,
            "the simulated provider only serves POST",
        );
    }
    let Ok(body) = serde_json::from_slice::<Value>(&bytes) else {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request.",
        );
    };
    let stream = body["stream"].as_bool().unwrap_or(false);
    let delay = options.chunk_delay;
    match path.as_str() {
        "/v1/chat/completions" => chat(&body, stream, delay),
        "/v1/responses" => responses(&body, stream, delay),
        "/v1/embeddings" => embeddings(&body),
        "/v1/messages" => messages(&body, stream, delay),
        "/v1/messages/count_tokens" => json_response(json!({"input_tokens": prompt_tokens(&body)})),
        _ => openai_error(StatusCode::NOT_FOUND, &format!("Invalid URL (POST {path})")),
    }
}

fn chat(body: &Value, stream: bool, delay: Duration) -> Response<SimBody> {
    let model = model_of(body);
    let words = reply_words(body);
    let prompt = prompt_tokens(body);
    let completion = words.len() as u64 + 2;
    let usage = json!({
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    });
    let id = "chatcmpl-sim0001";
    let created = 1_764_000_000;
    if !stream {
        return json_response(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": words.join(" "), "refusal": null, "annotations": []}, "logprobs": null, "finish_reason": "stop"}],
            "usage": usage, "service_tier": "default", "system_fingerprint": "fp_sim"
        }));
    }
    let chunk = |delta: Value, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": "fp_sim",
                   "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
        )
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        Value::Null,
    )];
    for (i, word) in words.iter().enumerate() {
        let piece = if i == 0 {
            word.clone()
        } else {
            format!(" {word}")
        };
        events.push(chunk(json!({"content": piece}), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    if body["stream_options"]["include_usage"].as_bool() == Some(true) {
        events.push(format!(
            "data: {}\n\n",
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": "fp_sim", "choices": [], "usage": usage})
        ));
    }
    events.push("data: [DONE]\n\n".to_owned());
    sse(events, delay)
}

fn responses(body: &Value, stream: bool, delay: Duration) -> Response<SimBody> {
    let model = model_of(body);
    let words = reply_words(body);
    let text = words.join(" ");
    let prompt = prompt_tokens(body);
    let output = words.len() as u64 + 2;
    let usage = json!({"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": output,
                       "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + output});
    let message = json!({"id": "msg_sim1", "type": "message", "status": "completed", "role": "assistant",
                         "content": [{"type": "output_text", "text": text, "annotations": []}]});
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": "resp_sim1", "object": "response", "created_at": 1_764_000_000, "status": status, "model": model,
               "output": output, "parallel_tool_calls": true, "tools": [], "metadata": {}, "usage": usage})
    };
    if !stream {
        return json_response(response("completed", json!([message]), usage));
    }
    let mut seq = 0;
    let mut event = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        seq += 1;
        format!("event: {kind}\ndata: {data}\n\n")
    };
    let mut events = vec![
        event(
            "response.created",
            json!({"response": response("in_progress", json!([]), Value::Null)}),
        ),
        event(
            "response.in_progress",
            json!({"response": response("in_progress", json!([]), Value::Null)}),
        ),
        event(
            "response.output_item.added",
            json!({"output_index": 0, "item": {"id": "msg_sim1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
        ),
        event(
            "response.content_part.added",
            json!({"item_id": "msg_sim1", "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}),
        ),
    ];
    for (i, word) in words.iter().enumerate() {
        let piece = if i == 0 {
            word.clone()
        } else {
            format!(" {word}")
        };
        events.push(event(
            "response.output_text.delta",
            json!({"item_id": "msg_sim1", "output_index": 0, "content_index": 0, "delta": piece}),
        ));
    }
    events.push(event(
        "response.output_text.done",
        json!({"item_id": "msg_sim1", "output_index": 0, "content_index": 0, "text": text}),
    ));
    events.push(event("response.content_part.done", json!({"item_id": "msg_sim1", "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": text, "annotations": []}})));
    events.push(event(
        "response.output_item.done",
        json!({"output_index": 0, "item": message}),
    ));
    events.push(event(
        "response.completed",
        json!({"response": response("completed", json!([message]), usage)}),
    ));
    sse(events, delay)
}

fn embeddings(body: &Value) -> Response<SimBody> {
    let inputs = match &body["input"] {
        Value::Array(items) => items.len(),
        _ => 1,
    };
    let prompt = prompt_tokens(body);
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.0023, -0.0093, 0.0158, -0.0027, 0.0311, 0.0006, -0.0144, 0.0202]}))
        .collect();
    json_response(
        json!({"object": "list", "data": data, "model": model_of(body), "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}),
    )
}

fn messages(body: &Value, stream: bool, delay: Duration) -> Response<SimBody> {
    let model = model_of(body);
    let words = reply_words(body);
    let input = prompt_tokens(body);
    let output = words.len() as u64 + 2;
    let id = "msg_01SimWardenDemo";
    if !stream {
        return json_response(json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": words.join(" ")}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": input, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                      "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
                      "output_tokens": output, "service_tier": "standard"}
        }));
    }
    let event = |kind: &str, data: Value| format!("event: {kind}\ndata: {data}\n\n");
    let mut events = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 1, "service_tier": "standard"}}}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    for (i, word) in words.iter().enumerate() {
        let piece = if i == 0 {
            word.clone()
        } else {
            format!(" {word}")
        };
        events.push(event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}})));
    }
    events.push(event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": output}})));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    sse(events, delay)
}
