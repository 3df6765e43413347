//! Criterion benches for the pieces on the request path: the SSE meter, the
//! usage-chunk filter, cost calculation and request inspection.
//!
//!     cargo bench --bench meter

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, black_box, criterion_group, criterion_main};
use warden::metering::{ChunkFilter, PriceTable, StreamMeter};
use warden::providers::{Endpoint, RequestFacts, Usage, usage_from_body};

/// A 1,000-chunk OpenAI chat stream as the provider sends it: one content
/// delta per chunk, a finish chunk, the usage chunk and [DONE].
fn openai_stream(chunks: usize) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(chunks + 3);
    for i in 0..chunks {
        out.push(Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG\",\"object\":\"chat.completion.chunk\",\"created\":1741570283,\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_fc9f1d7035\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word{i}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null,\"obfuscation\":\"Xq1\"}}\n\n"
        )));
    }
    out.push(Bytes::from_static(b"data: {\"id\":\"chatcmpl-B9\",\"object\":\"chat.completion.chunk\",\"created\":1741570283,\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":null}\n\n"));
    out.push(Bytes::from_static(b"data: {\"id\":\"chatcmpl-B9\",\"object\":\"chat.completion.chunk\",\"created\":1741570283,\"model\":\"gpt-4o-2024-08-06\",\"choices\":[],\"usage\":{\"prompt_tokens\":1117,\"completion_tokens\":1001,\"total_tokens\":2118,\"prompt_tokens_details\":{\"cached_tokens\":1024,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}\n\n"));
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    out
}

fn anthropic_stream(chunks: usize) -> Vec<Bytes> {
    let mut out = vec![Bytes::from_static(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5-20250929\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":472,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":2048,\"output_tokens\":2}}}\n\n")];
    for i in 0..chunks {
        out.push(Bytes::from(format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\" word{i}\"}}}}\n\n"
        )));
    }
    out.push(Bytes::from_static(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":1001}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    out
}

fn meter_benches(c: &mut Criterion) {
    let openai = openai_stream(1000);
    let anthropic = anthropic_stream(1000);
    let mut group = c.benchmark_group("stream_meter_1000_chunks");
    group.throughput(Throughput::Elements(openai.len() as u64));
    group.bench_function("openai_chat", |b| {
        b.iter(|| {
            let mut meter = StreamMeter::new(Endpoint::ChatCompletions, false);
            for chunk in &openai {
                meter.feed(black_box(chunk));
            }
            assert_eq!(meter.report().usage.output_tokens, 1001);
        })
    });
    group.bench_function("openai_chat_strip_usage_chunk", |b| {
        b.iter_batched(
            || openai.clone(),
            |chunks| {
                let mut meter = StreamMeter::new(Endpoint::ChatCompletions, true);
                let mut filter = ChunkFilter::default();
                for chunk in chunks {
                    black_box(filter.pass(&mut meter, chunk));
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("anthropic_messages", |b| {
        b.iter(|| {
            let mut meter = StreamMeter::new(Endpoint::Messages, false);
            for chunk in &anthropic {
                meter.feed(black_box(chunk));
            }
            assert_eq!(meter.report().usage.output_tokens, 1001);
        })
    });
    group.finish();
}

fn cost_benches(c: &mut Criterion) {
    let table = PriceTable::builtin();
    let usage = Usage {
        input_tokens: 1117,
        output_tokens: 1001,
        cached_input_tokens: 1024,
        cache_write_tokens: 0,
        reasoning_tokens: 200,
    };
    c.bench_function("price_lookup_and_cost", |b| {
        b.iter(|| {
            table
                .lookup(black_box("gpt-4o-2024-08-06"))
                .map(|p| p.cost(black_box(&usage)))
        })
    });
    let body = br#"{"model":"gpt-4o-mini","stream":true,"max_tokens":512,"messages":[{"role":"system","content":"You are a careful research assistant."},{"role":"user","content":"List three sources on AI agent governance and summarise each in two sentences."}],"temperature":0.2}"#;
    c.bench_function("request_facts_parse", |b| {
        b.iter(|| RequestFacts::parse(black_box(body)).unwrap())
    });
    let completion = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/openai/chat_completion.json"
    ))
    .unwrap();
    c.bench_function("usage_from_body (707-byte chat completion)", |b| {
        b.iter(|| usage_from_body(Endpoint::ChatCompletions, black_box(&completion)).unwrap())
    });
    // The same answer with 16 KiB of text in its message, as a long answer
    // or a tool call's arguments make it.
    let long_text = "All work and no play makes Jack a dull boy. \\\"Quoted.\\\" ".repeat(300);
    let long = String::from_utf8(completion.clone())
        .unwrap()
        .replace("Hello! How can I assist you today?", &long_text);
    assert!(long.len() > 16 << 10);
    c.bench_function("usage_from_body (17-KiB chat completion)", |b| {
        b.iter(|| usage_from_body(Endpoint::ChatCompletions, black_box(long.as_bytes())).unwrap())
    });
    // A cancelled call's input estimate (on the store writer's thread).
    c.bench_function("estimate_input (o200k_base, 2 messages)", |b| {
        b.iter(|| warden::metering::estimate::estimate_input("gpt-4o", black_box(body)))
    });
}

criterion_group!(benches, meter_benches, cost_benches);
criterion_main!(benches);
