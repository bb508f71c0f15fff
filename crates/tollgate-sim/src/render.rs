//! The wire shapes: JSON bodies and SSE scripts for each API, modelled on real captured
//! responses (the corpus in `shared/corpus/`). Non-streaming OpenAI bodies are
//! pretty-printed like OpenAI's, Anthropic's are compact like Anthropic's.
//!
//! Generated text cycles through 16 lorem-ipsum words: token `j` of a choice is word
//! `j % 16` followed by a space (see [`token_text`]), so a
//! stream of N completion tokens per choice carries N content deltas per choice.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};

use crate::api::{Api, RequestSpec};
use crate::body::SseScript;

/// The text of generated token `j` of a choice (one word and a space).
pub fn token_text(j: u64) -> &'static str {
    // The modulo keeps the index in range; `get` keeps clippy's indexing rule satisfied.
    const SPACED: [&str; 16] = [
        "lorem ",
        "ipsum ",
        "dolor ",
        "sit ",
        "amet ",
        "consectetur ",
        "adipiscing ",
        "elit ",
        "sed ",
        "do ",
        "eiusmod ",
        "tempor ",
        "incididunt ",
        "ut ",
        "labore ",
        "et ",
    ];
    let i = (j % SPACED.len() as u64) as usize;
    SPACED.get(i).copied().unwrap_or("lorem ")
}

/// The full generated text of one choice with `tokens` tokens.
pub fn generated_text(tokens: u64) -> String {
    let mut text = String::new();
    for j in 0..tokens {
        text.push_str(token_text(j));
    }
    text
}

/// Identity of one reply, shared by every event of a stream.
pub(crate) struct ReplyMeta {
    pub id: String,
    pub item_id: String,
    pub model: String,
    pub created: u64,
    /// False under the `no-usage` fault: omit usage everywhere.
    pub with_usage: bool,
}

/// Always a natural stop, even when the text is exactly `max_tokens` long: the SDKs'
/// stream helpers raise on `length`, and a model may well stop right at the limit.
const FINISH_REASON: &str = "stop";

fn sse_data(value: &Value) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    // Serializing a `Value` into a Vec cannot fail (string keys, no I/O).
    let _ = serde_json::to_writer(&mut out, value);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn sse_event(name: &str, value: &Value) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    let _ = serde_json::to_writer(&mut out, value);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

const DONE: &[u8] = b"data: [DONE]\n\n";

/// Usage in the API's own shape.
pub(crate) fn usage_json(spec: &RequestSpec) -> Value {
    let p = spec.prompt_tokens;
    let c = spec.completion_tokens();
    match spec.api {
        Api::ChatCompletions => json!({
            "prompt_tokens": p,
            "completion_tokens": c,
            "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0
            }
        }),
        Api::Completions => json!({
            "prompt_tokens": p,
            "completion_tokens": c,
            "total_tokens": p + c
        }),
        Api::Embeddings => json!({"prompt_tokens": p, "total_tokens": p}),
        Api::Responses => json!({
            "input_tokens": p,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": c,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": p + c
        }),
        Api::Messages => json!({
            "input_tokens": p,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": c
        }),
    }
}

/// The non-streaming body of a successful reply.
pub(crate) fn full_body(spec: &RequestSpec, meta: &ReplyMeta) -> Vec<u8> {
    let mut value = match spec.api {
        Api::ChatCompletions => chat_json(spec, meta),
        Api::Completions => completion_json(spec, meta),
        Api::Responses => response_json(spec, meta, "completed"),
        Api::Embeddings => embeddings_json(spec, meta),
        Api::Messages => message_json(spec, meta),
    };
    if let Some(obj) = value.as_object_mut() {
        if meta.with_usage {
            obj.insert("usage".to_owned(), usage_json(spec));
        } else {
            obj.remove("usage");
        }
    }
    if spec.api.is_anthropic() {
        serde_json::to_vec(&value).unwrap_or_default()
    } else {
        let mut out = serde_json::to_vec_pretty(&value).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

fn chat_json(spec: &RequestSpec, meta: &ReplyMeta) -> Value {
    let text = generated_text(spec.tokens_per_choice);
    let choices: Vec<Value> = (0..spec.choices)
        .map(|i| {
            json!({
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": null, "annotations": []},
                "logprobs": null,
                "finish_reason": FINISH_REASON
            })
        })
        .collect();
    json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": null,
        "service_tier": "default",
        "system_fingerprint": null
    })
}

fn completion_json(spec: &RequestSpec, meta: &ReplyMeta) -> Value {
    let text = generated_text(spec.tokens_per_choice);
    let choices: Vec<Value> = (0..spec.choices)
        .map(
            |i| json!({"text": text, "index": i, "logprobs": null, "finish_reason": FINISH_REASON}),
        )
        .collect();
    json!({
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": null
    })
}

fn output_message(meta: &ReplyMeta, status: &str, text: &str) -> Value {
    let content: Vec<Value> = if status == "in_progress" {
        Vec::new()
    } else {
        vec![json!({"type": "output_text", "annotations": [], "logprobs": [], "text": text})]
    };
    json!({
        "id": meta.item_id,
        "type": "message",
        "status": status,
        "content": content,
        "role": "assistant"
    })
}

fn response_json(spec: &RequestSpec, meta: &ReplyMeta, status: &str) -> Value {
    let done = status == "completed";
    let output = if done {
        vec![output_message(
            meta,
            "completed",
            &generated_text(spec.tokens_per_choice),
        )]
    } else {
        Vec::new()
    };
    json!({
        "id": meta.id,
        "object": "response",
        "created_at": meta.created,
        "status": status,
        "background": false,
        "completed_at": if done { Value::from(meta.created) } else { Value::Null },
        "error": null,
        "incomplete_details": null,
        "instructions": null,
        "max_output_tokens": if spec.limit_given { Value::from(spec.tokens_per_choice) } else { Value::Null },
        "model": meta.model,
        "output": output,
        "parallel_tool_calls": true,
        "previous_response_id": null,
        "reasoning": {"effort": null, "summary": null},
        "service_tier": "default",
        "store": false,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": null,
        "user": null,
        "metadata": {}
    })
}

/// Deterministic, meaningless vector component `d` of input `i`.
fn embedding_value(i: u64, d: u64) -> f32 {
    let x = ((i * 31 + d * 7) % 1000) as f32;
    x / 1000.0 - 0.5
}

fn embeddings_json(spec: &RequestSpec, meta: &ReplyMeta) -> Value {
    use base64::Engine as _;
    let e = spec.embedding;
    let data: Vec<Value> = (0..e.inputs)
        .map(|i| {
            let values = (0..e.dimensions).map(|d| embedding_value(i, d));
            let embedding = if e.base64 {
                let bytes: Vec<u8> = values.flat_map(f32::to_le_bytes).collect();
                Value::from(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Value::from(values.map(f64::from).collect::<Vec<f64>>())
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json!({"object": "list", "data": data, "model": meta.model, "usage": null})
}

fn message_json(spec: &RequestSpec, meta: &ReplyMeta) -> Value {
    json!({
        "id": meta.id,
        "type": "message",
        "role": "assistant",
        "model": meta.model,
        "content": [{"type": "text", "text": generated_text(spec.tokens_per_choice)}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": null
    })
}

/// The SSE script of a streamed reply. With `cut`, only half the tokens are sent and
/// nothing after them (no finish, no usage, no `[DONE]`).
pub(crate) fn stream_script(spec: &RequestSpec, meta: ReplyMeta, cut: bool) -> SseScript {
    let total = spec.completion_tokens();
    let tokens = if cut { total / 2 } else { total };
    let mut script = match spec.api {
        Api::ChatCompletions => chat_script(spec, meta),
        Api::Completions => completion_script(spec, meta),
        Api::Responses => response_script(spec, meta),
        Api::Messages => message_script(spec, meta),
        // Refused at parse time; an empty stream is the harmless answer.
        Api::Embeddings => SseScript {
            head: VecDeque::new(),
            tokens: 0,
            render: Box::new(|_| Bytes::new()),
            tail: VecDeque::new(),
        },
    };
    script.tokens = tokens;
    if cut {
        script.tail.clear();
    }
    script
}

fn chat_script(spec: &RequestSpec, meta: ReplyMeta) -> SseScript {
    let usage_null = spec.include_usage && meta.with_usage;
    let base = {
        let mut b = json!({
            "id": meta.id,
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": meta.model,
            "service_tier": "default",
            "system_fingerprint": null,
            "choices": []
        });
        if usage_null {
            if let Some(obj) = b.as_object_mut() {
                obj.insert("usage".to_owned(), Value::Null);
            }
        }
        Arc::new(b)
    };
    let chunk = |base: &Value, choice: Value| {
        let mut c = base.clone();
        if let Some(obj) = c.as_object_mut() {
            obj.insert("choices".to_owned(), Value::Array(vec![choice]));
        }
        sse_data(&c)
    };
    let head = (0..spec.choices)
        .map(|i| {
            chunk(
                &base,
                json!({"index": i, "delta": {"role": "assistant", "content": "", "refusal": null}, "logprobs": null, "finish_reason": null}),
            )
        })
        .collect();
    let mut tail: VecDeque<Bytes> = (0..spec.choices)
        .map(|i| {
            chunk(
                &base,
                json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": FINISH_REASON}),
            )
        })
        .collect();
    if spec.include_usage && meta.with_usage {
        let mut last = (*base).clone();
        if let Some(obj) = last.as_object_mut() {
            obj.insert("usage".to_owned(), usage_json(spec));
        }
        tail.push_back(sse_data(&last));
    }
    tail.push_back(Bytes::from_static(DONE));
    let n = spec.choices.max(1);
    let render_base = Arc::clone(&base);
    SseScript {
        head,
        tokens: 0,
        render: Box::new(move |k| {
            chunk(
                &render_base,
                json!({"index": k % n, "delta": {"content": token_text(k / n)}, "logprobs": null, "finish_reason": null}),
            )
        }),
        tail,
    }
}

fn completion_script(spec: &RequestSpec, meta: ReplyMeta) -> SseScript {
    let usage_null = spec.include_usage && meta.with_usage;
    let make = move |id: &str, created: u64, model: &str, choice: Value| {
        let mut c = json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "choices": [choice],
            "model": model
        });
        if usage_null {
            if let Some(obj) = c.as_object_mut() {
                obj.insert("usage".to_owned(), Value::Null);
            }
        }
        sse_data(&c)
    };
    let mut tail: VecDeque<Bytes> = (0..spec.choices)
        .map(|i| {
            make(
                &meta.id,
                meta.created,
                &meta.model,
                json!({"text": "", "index": i, "logprobs": null, "finish_reason": FINISH_REASON}),
            )
        })
        .collect();
    if spec.include_usage && meta.with_usage {
        tail.push_back(sse_data(&json!({
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "usage": usage_json(spec),
            "choices": []
        })));
    }
    tail.push_back(Bytes::from_static(DONE));
    let n = spec.choices.max(1);
    SseScript {
        head: VecDeque::new(),
        tokens: 0,
        render: Box::new(move |k| {
            make(
                &meta.id,
                meta.created,
                &meta.model,
                json!({"text": token_text(k / n), "index": k % n, "logprobs": null, "finish_reason": null}),
            )
        }),
        tail,
    }
}

/// Responses API events before the tokens (sequence numbers 0..=3).
const RESPONSE_HEAD_EVENTS: u64 = 4;

fn response_script(spec: &RequestSpec, meta: ReplyMeta) -> SseScript {
    let text = generated_text(spec.tokens_per_choice);
    let mut in_progress = response_json(spec, &meta, "in_progress");
    let mut completed = response_json(spec, &meta, "completed");
    if let Some(obj) = completed.as_object_mut() {
        let usage = if meta.with_usage {
            usage_json(spec)
        } else {
            Value::Null
        };
        obj.insert("usage".to_owned(), usage);
    }
    if let Some(obj) = in_progress.as_object_mut() {
        obj.insert("usage".to_owned(), Value::Null);
    }
    let part_empty = json!({"type": "output_text", "annotations": [], "logprobs": [], "text": ""});
    let part_done = json!({"type": "output_text", "annotations": [], "logprobs": [], "text": text});
    let head = VecDeque::from([
        sse_event(
            "response.created",
            &json!({"type": "response.created", "response": in_progress, "sequence_number": 0}),
        ),
        sse_event(
            "response.in_progress",
            &json!({"type": "response.in_progress", "response": in_progress, "sequence_number": 1}),
        ),
        sse_event(
            "response.output_item.added",
            &json!({"type": "response.output_item.added", "item": output_message(&meta, "in_progress", ""), "output_index": 0, "sequence_number": 2}),
        ),
        sse_event(
            "response.content_part.added",
            &json!({"type": "response.content_part.added", "content_index": 0, "item_id": meta.item_id, "output_index": 0, "part": part_empty, "sequence_number": 3}),
        ),
    ]);
    let seq = RESPONSE_HEAD_EVENTS + spec.completion_tokens();
    let tail = VecDeque::from([
        sse_event(
            "response.output_text.done",
            &json!({"type": "response.output_text.done", "content_index": 0, "item_id": meta.item_id, "logprobs": [], "output_index": 0, "sequence_number": seq, "text": text}),
        ),
        sse_event(
            "response.content_part.done",
            &json!({"type": "response.content_part.done", "content_index": 0, "item_id": meta.item_id, "output_index": 0, "part": part_done, "sequence_number": seq + 1}),
        ),
        sse_event(
            "response.output_item.done",
            &json!({"type": "response.output_item.done", "item": output_message(&meta, "completed", &text), "output_index": 0, "sequence_number": seq + 2}),
        ),
        sse_event(
            "response.completed",
            &json!({"type": "response.completed", "response": completed, "sequence_number": seq + 3}),
        ),
    ]);
    let item_id = meta.item_id;
    SseScript {
        head,
        tokens: 0,
        render: Box::new(move |k| {
            sse_event(
                "response.output_text.delta",
                &json!({"type": "response.output_text.delta", "content_index": 0, "delta": token_text(k), "item_id": item_id, "logprobs": [], "output_index": 0, "sequence_number": RESPONSE_HEAD_EVENTS + k}),
            )
        }),
        tail,
    }
}

fn message_script(spec: &RequestSpec, meta: ReplyMeta) -> SseScript {
    let mut message = json!({
        "id": meta.id,
        "type": "message",
        "role": "assistant",
        "model": meta.model,
        "content": [],
        "stop_reason": null,
        "stop_sequence": null
    });
    let mut delta = json!({
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null}
    });
    if meta.with_usage {
        if let Some(obj) = message.as_object_mut() {
            obj.insert(
                "usage".to_owned(),
                json!({"input_tokens": spec.prompt_tokens, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 1}),
            );
        }
        if let Some(obj) = delta.as_object_mut() {
            obj.insert(
                "usage".to_owned(),
                json!({"output_tokens": spec.completion_tokens()}),
            );
        }
    }
    let head = VecDeque::from([
        sse_event(
            "message_start",
            &json!({"type": "message_start", "message": message}),
        ),
        sse_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        sse_event("ping", &json!({"type": "ping"})),
    ]);
    let tail = VecDeque::from([
        sse_event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": 0}),
        ),
        sse_event("message_delta", &delta),
        sse_event("message_stop", &json!({"type": "message_stop"})),
    ]);
    SseScript {
        head,
        tokens: 0,
        render: Box::new(move |k| {
            sse_event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token_text(k)}}),
            )
        }),
        tail,
    }
}

/// An error body in the API's own envelope; `usage` is added when given.
pub(crate) fn error_body(
    anthropic: bool,
    kind: &str,
    message: &str,
    param: Option<&str>,
    code: Option<&str>,
    usage: Option<Value>,
) -> Vec<u8> {
    let mut value = if anthropic {
        json!({"type": "error", "error": {"type": kind, "message": message}})
    } else {
        json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
    };
    if let (Some(usage), Some(obj)) = (usage, value.as_object_mut()) {
        obj.insert("usage".to_owned(), usage);
    }
    serde_json::to_vec(&value).unwrap_or_default()
}

/// The `malformed` fault's body for a stream: SSE framing around payloads that are not JSON.
pub(crate) fn malformed_stream() -> &'static [u8] {
    b"data: {\"id\": \"sim-malformed\", this is not json\n\ndata: <html>upstream exploded</html>\n\ndata: [DONE]\n\n"
}

/// The `malformed` fault's body for a non-streaming reply.
pub(crate) fn malformed_body() -> &'static [u8] {
    b"<html><body>502 upstream sim: this is not JSON {\"usage\": </body></html>\n"
}
