//! The simulator over real sockets: every endpoint, streaming and not, usage numbers,
//! faults, timing (lower bounds only) and the request counter.

// Test helpers outside `#[test]` fns are not covered by clippy.toml's test allowance.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tollgate_sim::{prompt_tokens_for, render, serve, Api, SimConfig, Simulator};

struct Sim {
    base: String,
    sim: Arc<Simulator>,
    client: reqwest::Client,
    _task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(cfg: SimConfig) -> Sim {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sim = Arc::new(Simulator::new(cfg));
    let task = tokio::spawn(serve(listener, Arc::clone(&sim)));
    Sim {
        base: format!("http://{addr}"),
        sim,
        client: reqwest::Client::new(),
        _task: task,
    }
}

async fn start_default() -> Sim {
    start(SimConfig::default()).await
}

impl Sim {
    fn post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string())
    }
}

/// One SSE event: its `event:` name (if any) and its `data:` payload.
#[derive(Debug)]
struct Event {
    name: Option<String>,
    data: String,
}

impl Event {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap()
    }
}

fn parse_sse(text: &str) -> Vec<Event> {
    assert!(
        text.ends_with("\n\n"),
        "SSE must end with a blank line: {text:?}"
    );
    text.split("\n\n")
        .filter(|block| !block.is_empty())
        .map(|block| {
            let mut name = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(v.to_owned());
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            Event {
                name,
                data: data.unwrap(),
            }
        })
        .collect()
}

fn chat_body(max_tokens: u64) -> Value {
    json!({
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello to the world"}
        ],
        "max_tokens": max_tokens
    })
}

#[tokio::test]
async fn models_list_names_the_configured_model() {
    let s = start(SimConfig {
        model: "my-model".into(),
        ..SimConfig::default()
    })
    .await;
    let v: Value = s
        .client
        .get(format!("{}/v1/models", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "my-model");
    assert_eq!(v["data"][0]["object"], "model");
}

#[tokio::test]
async fn chat_non_stream_usage_and_text() {
    let s = start_default().await;
    let body = chat_body(5);
    let resp = s.post("/v1/chat/completions", &body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let v: Value = resp.json().await.unwrap();
    // 2 messages: (1 + 3) + (1 + 5)
    assert_eq!(prompt_tokens_for(Api::ChatCompletions, &body), 10);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-test");
    assert_eq!(v["usage"]["prompt_tokens"], 10);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], 15);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content, render::generated_text(5));
    assert_eq!(content.split_whitespace().count(), 5);
    assert_eq!(
        s.sim.expected_usage(Api::ChatCompletions, &body),
        Some((10, 5))
    );
}

#[tokio::test]
async fn chat_default_max_tokens_and_n() {
    let s = start(SimConfig {
        default_max_tokens: 7,
        ..SimConfig::default()
    })
    .await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "n": 3});
    let v: Value = s
        .post("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"].as_array().unwrap().len(), 3);
    assert_eq!(v["choices"][2]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 21);
    assert_eq!(v["usage"]["prompt_tokens"], 2);
    let body = json!({"messages": [], "max_tokens": 2, "max_completion_tokens": 4});
    let v: Value = s
        .post("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 4);
}

#[tokio::test]
async fn chat_stream_with_include_usage() {
    let s = start_default().await;
    let mut body = chat_body(6);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = s.post("/v1/chat/completions", &body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = parse_sse(&resp.text().await.unwrap());
    let (done, chunks) = events.split_last().unwrap();
    assert_eq!(done.data, "[DONE]");
    let chunks: Vec<Value> = chunks.iter().map(Event::json).collect();
    // role chunk, 6 content chunks, finish chunk, usage chunk
    assert_eq!(chunks.len(), 9);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let contents: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    assert_eq!(contents.len(), 6);
    assert!(contents
        .iter()
        .all(|t| t.ends_with(' ') && t.split_whitespace().count() == 1));
    for c in &chunks[..8] {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(c.as_object().unwrap().contains_key("usage") && c["usage"].is_null());
    }
    assert_eq!(chunks[7]["choices"][0]["finish_reason"], "stop");
    let last = &chunks[8];
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], 10);
    assert_eq!(last["usage"]["completion_tokens"], 6);
    assert_eq!(last["usage"]["total_tokens"], 16);
}

#[tokio::test]
async fn chat_stream_without_include_usage_has_no_usage_key() {
    let s = start_default().await;
    let mut body = chat_body(3);
    body["stream"] = json!(true);
    body["n"] = json!(2);
    let text = s
        .post("/v1/chat/completions", &body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = parse_sse(&text);
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(Event::json).collect();
    assert!(chunks
        .iter()
        .all(|c| !c.as_object().unwrap().contains_key("usage")));
    // 2 role chunks + 3 tokens x 2 choices + 2 finish chunks
    assert_eq!(chunks.len(), 10);
    for choice in 0..2 {
        let n = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == choice)
            .filter(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
            })
            .count();
        assert_eq!(n, 3);
    }
}

#[tokio::test]
async fn completions_non_stream_and_stream() {
    let s = start_default().await;
    let body = json!({"model": "davinci", "prompt": "Once upon a time", "max_tokens": 4});
    let v: Value = s
        .post("/v1/completions", &body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8})
    );
    assert_eq!(v["choices"][0]["text"], render::generated_text(4));

    let body = json!({"prompt": "Once upon a time", "max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}});
    let text = s
        .post("/v1/completions", &body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = parse_sse(&text);
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(Event::json).collect();
    assert_eq!(chunks.len(), 4 + 1 + 1);
    assert!(chunks[..5]
        .iter()
        .all(|c| c["usage"].is_null() && c["object"] == "text_completion"));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 4);
    assert_eq!(last["usage"]["prompt_tokens"], 4);
}

#[tokio::test]
async fn responses_non_stream_and_stream() {
    let s = start_default().await;
    let body = json!({"model": "gpt-5", "input": "ping pong", "instructions": "be brief", "max_output_tokens": 3});
    let v: Value = s
        .post("/v1/responses", &body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["usage"]["input_tokens"], 4);
    assert_eq!(v["usage"]["output_tokens"], 3);
    assert_eq!(v["usage"]["total_tokens"], 7);
    assert_eq!(
        v["output"][0]["content"][0]["text"],
        render::generated_text(3)
    );

    let mut body = body;
    body["stream"] = json!(true);
    let text = s
        .post("/v1/responses", &body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = parse_sse(&text);
    let names: Vec<&str> = events.iter().map(|e| e.name.as_deref().unwrap()).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (i, e) in events.iter().enumerate() {
        let v = e.json();
        assert_eq!(v["type"], e.name.as_deref().unwrap());
        assert_eq!(v["sequence_number"], i as u64);
    }
    let completed = events.last().unwrap().json();
    assert_eq!(completed["response"]["usage"]["input_tokens"], 4);
    assert_eq!(completed["response"]["usage"]["output_tokens"], 3);
    assert!(events[0].json()["response"]["usage"].is_null());
}

#[tokio::test]
async fn embeddings_float_and_base64() {
    let s = start_default().await;
    let body = json!({"model": "text-embedding-3-small", "input": ["hello world", "a b c"], "dimensions": 4});
    let v: Value = s
        .post("/v1/embeddings", &body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 4);
    assert_eq!(v["usage"], json!({"prompt_tokens": 5, "total_tokens": 5}));

    let body = json!({"input": "hello", "encoding_format": "base64"});
    let v: Value = s
        .post("/v1/embeddings", &body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let b64 = v["data"][0]["embedding"].as_str().unwrap();
    // 16 f32 = 64 bytes = 88 base64 chars
    assert_eq!(b64.len(), 88);
    assert_eq!(v["usage"]["prompt_tokens"], 1);
}

#[tokio::test]
async fn anthropic_messages_non_stream_and_stream() {
    let s = start_default().await;
    let body = json!({
        "model": "claude-test",
        "system": "Be nice",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    });
    let resp = s.post("/v1/messages", &body).send().await.unwrap();
    assert!(resp.headers().contains_key("request-id"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["usage"]["input_tokens"], 6);
    assert_eq!(v["usage"]["output_tokens"], 5);
    assert_eq!(v["content"][0]["text"], render::generated_text(5));

    let mut body = body;
    body["stream"] = json!(true);
    let text = s
        .post("/v1/messages", &body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = parse_sse(&text);
    let names: Vec<&str> = events.iter().map(|e| e.name.as_deref().unwrap()).collect();
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(["content_block_delta"; 5]);
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    for e in &events {
        assert_eq!(e.json()["type"], e.name.as_deref().unwrap());
    }
    let start = events[0].json();
    assert_eq!(start["message"]["usage"]["input_tokens"], 6);
    assert_eq!(start["message"]["usage"]["output_tokens"], 1);
    let delta = events[events.len() - 2].json();
    assert_eq!(delta["usage"]["output_tokens"], 5);
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
}

#[tokio::test]
async fn anthropic_requires_max_tokens_and_uses_its_error_shape() {
    let s = start_default().await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}]});
    let resp = s.post("/v1/messages", &body).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn bad_input_and_unknown_paths() {
    let s = start_default().await;
    let resp = s
        .client
        .post(format!("{}/v1/chat/completions", s.base))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");

    let resp = s.post("/v2/nothing", &json!({})).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v2/nothing"));

    let resp = s
        .client
        .get(format!("{}/v1/chat/completions", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);

    let resp = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [], "max_tokens": "x"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "max_tokens");

    let resp = s
        .post("/v1/chat/completions", &chat_body(1))
        .header("x-sim-fault", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn fault_status_500_and_429() {
    let s = start_default().await;
    let resp = s
        .post("/v1/chat/completions", &chat_body(3))
        .header("x-sim-fault", "status-500")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    let v: Value = resp.json().await.unwrap();
    assert!(v.get("usage").is_none());
    assert_eq!(v["error"]["type"], "server_error");

    let resp = s
        .post("/v1/chat/completions", &chat_body(3))
        .header("x-sim-fault", "status-429")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");

    let body = json!({"max_tokens": 3, "messages": []});
    let resp = s
        .post("/v1/messages", &body)
        .header("x-sim-fault", "status-429")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
}

#[tokio::test]
async fn fault_no_usage() {
    let s = start_default().await;
    let v: Value = s
        .post("/v1/chat/completions", &chat_body(3))
        .header("x-sim-fault", "no-usage")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v.get("usage").is_none());
    assert_eq!(
        v["choices"][0]["message"]["content"],
        render::generated_text(3)
    );

    let mut body = chat_body(3);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let text = s
        .post("/v1/chat/completions", &body)
        .header("x-sim-fault", "no-usage")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("usage"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));

    let body = json!({"max_tokens": 3, "messages": [], "stream": true});
    let text = s
        .post("/v1/messages", &body)
        .header("x-sim-fault", "no-usage")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("usage"), "{text}");
    assert!(text.contains("message_stop"));
}

#[tokio::test]
async fn fault_cut_stream() {
    let s = start_default().await;
    let mut body = chat_body(10);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let text = s
        .post("/v1/chat/completions", &body)
        .header("x-sim-fault", "cut-stream")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("[DONE]"));
    assert!(!text.contains("\"prompt_tokens\""));
    assert!(!text.contains("finish_reason\":\"stop"));
    let events = parse_sse(&text);
    // role chunk + 5 of 10 tokens
    assert_eq!(events.len(), 6);

    let resp = s
        .post("/v1/chat/completions", &chat_body(10))
        .header("x-sim-fault", "cut-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let bytes = resp.bytes().await.unwrap();
    assert!(serde_json::from_slice::<Value>(&bytes).is_err());
    assert!(!bytes.is_empty());
}

#[tokio::test]
async fn fault_malformed_and_usage_in_error() {
    let s = start_default().await;
    let resp = s
        .post("/v1/chat/completions", &chat_body(3))
        .header("x-sim-fault", "malformed")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(serde_json::from_slice::<Value>(&resp.bytes().await.unwrap()).is_err());

    let mut body = chat_body(3);
    body["stream"] = json!(true);
    let resp = s
        .post("/v1/chat/completions", &body)
        .header("x-sim-fault", "malformed")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.starts_with("data: "));
    assert!(serde_json::from_str::<Value>(&parse_sse(&text)[0].data).is_err());

    let resp = s
        .post("/v1/chat/completions", &chat_body(3))
        .header("x-sim-fault", "usage-in-error")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["usage"]["prompt_tokens"], 10);
    assert_eq!(v["usage"]["completion_tokens"], 3);

    let body = json!({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}]});
    let v: Value = s
        .post("/v1/messages", &body)
        .header("x-sim-fault", "usage-in-error")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["usage"]["input_tokens"], 2);
    assert_eq!(v["usage"]["output_tokens"], 4);
}

#[tokio::test]
async fn echo_headers_and_request_counter() {
    let s = start_default().await;
    let stats = |s: &Sim| {
        let url = format!("{}/sim/stats", s.base);
        let client = s.client.clone();
        async move {
            client
                .get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()["requests"]
                .as_u64()
                .unwrap()
        }
    };
    assert_eq!(stats(&s).await, 0);
    let resp = s
        .post("/v1/chat/completions", &chat_body(1))
        .header("authorization", "Bearer backend-key")
        .header("x-api-key", "anthropic-key")
        .header("x-sim-echo-headers", "1")
        .send()
        .await
        .unwrap();
    let h = resp.headers();
    assert_eq!(h["x-sim-auth-authorization"], "Bearer backend-key");
    assert_eq!(h["x-sim-auth-x-api-key"], "anthropic-key");
    assert!(!h.contains_key("x-sim-auth-api-key"));
    let seen = h["x-sim-seen-headers"].to_str().unwrap();
    assert!(seen.split(',').any(|n| n == "authorization"));
    assert!(seen.split(',').any(|n| n == "content-type"));

    // Without the echo header nothing leaks back.
    let resp = s
        .post("/v1/chat/completions", &chat_body(1))
        .header("authorization", "Bearer k")
        .send()
        .await
        .unwrap();
    assert!(!resp.headers().contains_key("x-sim-auth-authorization"));

    let _ = s.post("/nope", &json!({})).send().await.unwrap();
    let _ = s
        .client
        .get(format!("{}/healthz", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(stats(&s).await, 3);
    assert_eq!(s.sim.requests_served(), 3);
}

#[tokio::test]
async fn latency_and_per_token_delay_are_honoured() {
    let s = start(SimConfig {
        latency_ms: 150,
        ..SimConfig::default()
    })
    .await;
    let t = Instant::now();
    let resp = s
        .post("/v1/chat/completions", &chat_body(2))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(t.elapsed() >= Duration::from_millis(150));

    // Per-request overrides: no latency, 40 ms per token, 5 tokens, non-streaming.
    let t = Instant::now();
    let resp = s
        .post("/v1/chat/completions", &chat_body(5))
        .header("x-sim-latency-ms", "0")
        .header("x-sim-ms-per-token", "40")
        .send()
        .await
        .unwrap();
    let _ = resp.bytes().await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn streams_are_sent_as_produced() {
    let s = start(SimConfig {
        latency_ms: 50,
        ms_per_token: 60,
        ..SimConfig::default()
    })
    .await;
    let mut body = chat_body(6);
    body["stream"] = json!(true);
    let t = Instant::now();
    let resp = s.post("/v1/chat/completions", &body).send().await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(50));
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    let first_at = Instant::now();
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    // The remaining tokens arrived over at least 5 further token delays.
    assert!(first_at.elapsed() >= Duration::from_millis(5 * 60 - 20));
    assert!(String::from_utf8(rest)
        .unwrap()
        .ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn in_process_handle_needs_no_socket() {
    use http_body_util::BodyExt;
    let sim = Simulator::new(SimConfig::default());
    let body =
        json!({"max_tokens": 2, "messages": [{"role": "user", "content": "a b"}], "stream": true});
    let resp = sim
        .handle(
            &http::Method::POST,
            "/v1/messages",
            &http::HeaderMap::new(),
            body.to_string().into(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let events = parse_sse(std::str::from_utf8(&bytes).unwrap());
    assert_eq!(events.len(), 3 + 2 + 3);
    assert_eq!(sim.requests_served(), 1);
}
