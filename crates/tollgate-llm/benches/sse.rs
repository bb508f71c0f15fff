//! Hot paths of the wire-format crate: SSE scan + meter per MB of a realistic chat stream,
//! request inspection of a ~2 KB chat body, and usage read from whole response bodies.
//!
//! `cargo bench -p tollgate-llm -- --warm-up-time 1 --measurement-time 3`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tollgate_llm::{
    ensure_stream_usage, inspect_request, usage_from_body, Api, Forward, SseScanner, StreamMeter,
};

/// About 1 MiB of OpenAI chat chunks shaped like the captured gpt-5-nano stream: one
/// short content delta per event, `usage: null`, then the usage-only chunk and `[DONE]`.
fn chat_stream() -> Vec<u8> {
    let words = [
        "Hello", " there", ",", " how", " can", " I", " help", " you", " today", "?", " 日本",
    ];
    let mut out = String::new();
    let mut i = 0;
    while out.len() < 1 << 20 {
        let word = words[i % words.len()];
        out.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-C4Hq5a6K3RaPMymUv70btQNYv6SvY\",\"object\":\"chat.completion.chunk\",\"created\":1755137921,\"model\":\"gpt-5-nano-2025-08-07\",\"service_tier\":\"default\",\"system_fingerprint\":null,\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}},\"finish_reason\":null}}],\"usage\":null,\"obfuscation\":\"WuQNX\"}}\n\n"
        ));
        i += 1;
    }
    out.push_str("data: {\"id\":\"chatcmpl-C4Hq5a6K3RaPMymUv70btQNYv6SvY\",\"object\":\"chat.completion.chunk\",\"created\":1755137921,\"model\":\"gpt-5-nano-2025-08-07\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":100,\"total_tokens\":112}}\n\n");
    out.push_str("data: [DONE]\n\n");
    out.into_bytes()
}

/// Chunks as they would come off the socket: one event per chunk (how OpenAI writes)
/// and 1400-byte segments that split events anywhere.
fn per_event(stream: &[u8]) -> Vec<&[u8]> {
    std::str::from_utf8(stream)
        .unwrap()
        .split_inclusive("\n\n")
        .map(str::as_bytes)
        .collect()
}

fn meter_all(api: Api, strip: bool, chunks: &[&[u8]]) -> usize {
    let mut meter = StreamMeter::new(api, strip);
    let mut forwarded = 0;
    for chunk in chunks {
        forwarded += match meter.feed(chunk) {
            Forward::All => chunk.len(),
            Forward::Bytes(b) => b.len(),
            Forward::Nothing => 0,
        };
    }
    forwarded += meter.end().bytes(&[]).len();
    let outcome = meter.finish();
    assert!(outcome.usage.is_some());
    forwarded
}

fn sse(c: &mut Criterion) {
    let stream = chat_stream();
    let events = per_event(&stream);
    let segments: Vec<&[u8]> = stream.chunks(1400).collect();

    let mut group = c.benchmark_group("sse_chat_1MiB");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("scan_only/event_chunks", |b| {
        b.iter(|| {
            let mut scanner = SseScanner::default();
            let mut n = 0usize;
            for chunk in &events {
                scanner.feed(chunk, |e| n += e.data.len());
            }
            black_box(n)
        })
    });
    group.bench_function("meter_passthrough/event_chunks", |b| {
        b.iter(|| black_box(meter_all(Api::Chat, false, &events)))
    });
    group.bench_function("meter_passthrough/1400B_segments", |b| {
        b.iter(|| black_box(meter_all(Api::Chat, false, &segments)))
    });
    group.bench_function("meter_strip/event_chunks", |b| {
        b.iter(|| black_box(meter_all(Api::Chat, true, &events)))
    });
    group.bench_function("meter_strip/1400B_segments", |b| {
        b.iter(|| black_box(meter_all(Api::Chat, true, &segments)))
    });
    group.finish();
}

/// A ~2 KB chat request: system prompt, a few turns, one tool.
fn chat_body() -> Vec<u8> {
    let turn = "Could you summarise the main points of the attached meeting notes and list the action items with owners? ";
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "stream": true,
        "max_completion_tokens": 512,
        "temperature": 0.2,
        "messages": [
            {"role": "system", "content": "You are a concise assistant for an engineering team. Answer in short bullet points."},
            {"role": "user", "content": turn.repeat(10)},
            {"role": "assistant", "content": "- Release moved to Friday\n- Alice owns the migration\n- Bob reviews the rate limiter"},
            {"role": "user", "content": [{"type": "text", "text": turn.repeat(3)}]},
        ],
        "tools": [{"type": "function", "function": {"name": "lookup_ticket", "description": "Fetch a ticket by id", "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}}}],
    });
    body.to_string().into_bytes()
}

fn request(c: &mut Criterion) {
    let body = chat_body();
    let mut group = c.benchmark_group("request_chat");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function(format!("inspect_request/{}B", body.len()), |b| {
        b.iter(|| black_box(inspect_request(Api::Chat, black_box(&body)).unwrap()))
    });
    group.bench_function(format!("ensure_stream_usage/{}B", body.len()), |b| {
        b.iter(|| black_box(ensure_stream_usage(Api::Chat, black_box(&body)).unwrap()))
    });
    group.finish();
}

/// Usage read from whole (non-streamed) bodies, as the proxy does once per response: a
/// pretty-printed chat completion (OpenAI's layout, and the simulator's) and an
/// embeddings list of 1,536 floats, usage last in both; each read front to back (parse or
/// scan) and from the end.
fn usage_bodies(c: &mut Criterion) {
    let usage = serde_json::json!({
        "completion_tokens": 16,
        "completion_tokens_details": {"accepted_prediction_tokens": 0, "audio_tokens": 0,
            "reasoning_tokens": 0, "rejected_prediction_tokens": 0},
        "prompt_tokens": 2,
        "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 0},
        "total_tokens": 18
    });
    let chat = serde_json::to_vec_pretty(&serde_json::json!({
        "choices": [{"finish_reason": "stop", "index": 0, "logprobs": null, "message": {
            "annotations": [], "refusal": null, "role": "assistant",
            "content": "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et "}}],
        "created": 1_795_426_438u64, "id": "chatcmpl-sim000000000001",
        "model": "meta-llama/Llama-3.1-8B-Instruct", "object": "chat.completion",
        "service_tier": "default", "system_fingerprint": null, "usage": usage
    }))
    .unwrap();
    let floats: Vec<f64> = (0..1536)
        .map(|i| f64::from(i) * 0.000_123_4 - 0.09)
        .collect();
    let embeddings = serde_json::to_vec(&serde_json::json!({
        "object": "list", "model": "text-embedding-3-small",
        "data": [{"object": "embedding", "index": 0, "embedding": floats}],
        "usage": {"prompt_tokens": 8, "total_tokens": 8}
    }))
    .unwrap();
    let mut group = c.benchmark_group("usage_from_body");
    for (name, api, body) in [
        ("chat_pretty", Api::Chat, &chat),
        ("embeddings_1536", Api::Embeddings, &embeddings),
    ] {
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(format!("{name}/{}B", body.len()), |b| {
            b.iter(|| black_box(usage_from_body(api, black_box(body)).unwrap()))
        });
        // What the proxy uses for a body that ended cleanly: `usage` looked for from the end.
        group.bench_function(format!("{name}_from_end/{}B", body.len()), |b| {
            b.iter(|| {
                black_box(tollgate_llm::usage_from_complete_body(api, black_box(body)).unwrap())
            })
        });
        // Bodies from SCAN_FROM on are scanned by `usage_from_body` already.
        if body.len() < tollgate_llm::usage::SCAN_FROM {
            group.bench_function(format!("{name}_scan/{}B", body.len()), |b| {
                b.iter(|| {
                    black_box(tollgate_llm::usage::usage_from_scan(api, black_box(body)).unwrap())
                })
            });
        }
    }
    group.finish();
}

/// Exact BPE (o200k_base) per KB of English-like prompt text; runs off the async
/// workers in the proxy, only for policies with `prompt_estimate: exact`.
fn bpe(c: &mut Criterion) {
    let text =
        "The quick brown fox jumps over the lazy dog while the gateway counts tokens. ".repeat(14);
    let kb = &text[..1024];
    let _ = tollgate_llm::bpe_tokens(kb); // load the vocabulary outside the measurement
    let mut g = c.benchmark_group("bpe");
    g.throughput(Throughput::Bytes(1024));
    g.bench_function("o200k_base per KB", |b| {
        b.iter(|| std::hint::black_box(tollgate_llm::bpe_tokens(std::hint::black_box(kb))))
    });
    g.finish();
}

criterion_group!(benches, sse, request, usage_bodies, bpe);
criterion_main!(benches);
