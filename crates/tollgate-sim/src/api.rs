//! Which API a request speaks, what it asks for, and the deterministic token rules.
//!
//! Everything here is pure: a parsed JSON body in, numbers out. The gateway's tests use
//! [`prompt_tokens_for`] and [`completion_tokens_for`] to predict the exact usage the
//! simulator will report.
//!
//! # The token rules
//!
//! A "word" is a run of non-whitespace characters (`str::split_whitespace`).
//!
//! * **Prompt tokens**
//!   * chat completions: for each entry of `messages`, 1 + words of its content;
//!   * Anthropic messages: the same over `messages`, plus 1 + words of `system` when present;
//!   * responses: words of `instructions`, plus words of `input` when it is a string, or for
//!     each item of an `input` array, 1 + words of its content;
//!   * completions and embeddings: words of `prompt` / `input` (a string, or each string of an
//!     array; an array of integers counts its length, as it is already tokens).
//!
//!   Content may be a string or an array of parts; the `text` of every part counts
//!   (other parts, e.g. images, count 0).
//! * **Completion tokens**: `max_completion_tokens`, else `max_tokens` (chat, completions,
//!   messages), `max_output_tokens` (responses), else the configured default; multiplied by
//!   `n` for chat and completions. Embeddings have none.

use serde_json::Value;

/// Largest per-choice completion the simulator will generate.
pub const MAX_COMPLETION_TOKENS: u64 = 1_000_000;
/// Largest `n` accepted (OpenAI's own bound).
pub const MAX_CHOICES: u64 = 128;

/// The LLM APIs the simulator speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/responses`
    Responses,
    /// `POST /v1/embeddings`
    Embeddings,
    /// `POST /v1/messages` (Anthropic)
    Messages,
}

impl Api {
    /// The API served at `path` (exact match, query already stripped).
    pub fn from_path(path: &str) -> Option<Api> {
        match path {
            "/v1/chat/completions" => Some(Api::ChatCompletions),
            "/v1/completions" => Some(Api::Completions),
            "/v1/responses" => Some(Api::Responses),
            "/v1/embeddings" => Some(Api::Embeddings),
            "/v1/messages" => Some(Api::Messages),
            _ => None,
        }
    }

    /// Errors on this API use Anthropic's envelope rather than OpenAI's.
    pub fn is_anthropic(self) -> bool {
        matches!(self, Api::Messages)
    }
}

/// Why a request body was refused (becomes a 400 in the API's own error shape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRequest {
    pub(crate) message: String,
    pub(crate) param: Option<&'static str>,
}

impl InvalidRequest {
    fn new(message: impl Into<String>, param: Option<&'static str>) -> Self {
        InvalidRequest {
            message: message.into(),
            param,
        }
    }
}

/// What one request asks for, read once from its JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestSpec {
    pub api: Api,
    /// The request's `model`, if it named one.
    pub model: Option<String>,
    pub stream: bool,
    /// `stream_options.include_usage` (chat and completions streams).
    pub include_usage: bool,
    /// Completion tokens per choice.
    pub tokens_per_choice: u64,
    /// Whether a token limit came from the request (echoed as `max_output_tokens`).
    pub limit_given: bool,
    /// Number of choices (`n`), 1 where the API has no such field.
    pub choices: u64,
    pub prompt_tokens: u64,
    /// Embeddings: how many vectors to return, their size, and whether base64 was asked.
    pub embedding: EmbeddingSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct EmbeddingSpec {
    pub inputs: u64,
    pub dimensions: u64,
    pub base64: bool,
}

/// Default embedding size (small on purpose: the numbers are meaningless anyway).
pub const DEFAULT_DIMENSIONS: u64 = 16;
/// Largest `dimensions` accepted.
pub const MAX_DIMENSIONS: u64 = 4096;

impl RequestSpec {
    pub(crate) fn completion_tokens(&self) -> u64 {
        self.tokens_per_choice.saturating_mul(self.choices)
    }

    /// Read and validate a body for `api`.
    pub(crate) fn parse(
        api: Api,
        body: &Value,
        default_max_tokens: u64,
    ) -> Result<RequestSpec, InvalidRequest> {
        let obj = body
            .as_object()
            .ok_or_else(|| InvalidRequest::new("the request body must be a JSON object", None))?;
        match api {
            Api::ChatCompletions | Api::Messages => {
                if !obj.get("messages").is_some_and(Value::is_array) {
                    return Err(InvalidRequest::new(
                        "messages: Field required (an array)",
                        Some("messages"),
                    ));
                }
            }
            Api::Completions => {
                if !obj.contains_key("prompt") {
                    return Err(InvalidRequest::new(
                        "prompt: Field required",
                        Some("prompt"),
                    ));
                }
            }
            Api::Embeddings => {
                if !obj.contains_key("input") {
                    return Err(InvalidRequest::new("input: Field required", Some("input")));
                }
            }
            Api::Responses => {}
        }
        if api == Api::Messages && !obj.contains_key("max_tokens") {
            return Err(InvalidRequest::new(
                "max_tokens: Field required",
                Some("max_tokens"),
            ));
        }
        let (limit, limit_given) = match requested_limit(api, body)? {
            Some(n) => (n, true),
            None => (default_max_tokens, false),
        };
        let choices = match api {
            Api::ChatCompletions | Api::Completions => uint_field(body, "n")?.unwrap_or(1),
            _ => 1,
        };
        if choices == 0 || choices > MAX_CHOICES {
            return Err(InvalidRequest::new(
                format!("n must be between 1 and {MAX_CHOICES}"),
                Some("n"),
            ));
        }
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(InvalidRequest::new(
                    "stream must be a boolean",
                    Some("stream"),
                ))
            }
        };
        if stream && api == Api::Embeddings {
            return Err(InvalidRequest::new(
                "embeddings do not support streaming",
                Some("stream"),
            ));
        }
        let include_usage = body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let embedding = if api == Api::Embeddings {
            embedding_spec(body)?
        } else {
            EmbeddingSpec::default()
        };
        Ok(RequestSpec {
            api,
            model: body.get("model").and_then(Value::as_str).map(str::to_owned),
            stream,
            include_usage,
            tokens_per_choice: if api == Api::Embeddings { 0 } else { limit },
            limit_given: limit_given && api != Api::Embeddings,
            choices,
            prompt_tokens: prompt_tokens_for(api, body),
            embedding,
        })
    }
}

fn embedding_spec(body: &Value) -> Result<EmbeddingSpec, InvalidRequest> {
    let inputs = match body.get("input") {
        Some(Value::Array(items)) if items.iter().any(|i| !i.is_number()) => items.len() as u64,
        Some(Value::Array(items)) if items.is_empty() => 0,
        _ => 1,
    };
    let dimensions = uint_field(body, "dimensions")?.unwrap_or(DEFAULT_DIMENSIONS);
    if dimensions == 0 || dimensions > MAX_DIMENSIONS {
        return Err(InvalidRequest::new(
            format!("dimensions must be between 1 and {MAX_DIMENSIONS}"),
            Some("dimensions"),
        ));
    }
    let base64 = match body.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(_) => {
            return Err(InvalidRequest::new(
                "encoding_format must be \"float\" or \"base64\"",
                Some("encoding_format"),
            ))
        }
    };
    Ok(EmbeddingSpec {
        inputs,
        dimensions,
        base64,
    })
}

/// The completion-token limit the request names, if any.
fn requested_limit(api: Api, body: &Value) -> Result<Option<u64>, InvalidRequest> {
    let names: &[&'static str] = match api {
        Api::ChatCompletions => &["max_completion_tokens", "max_tokens"],
        Api::Completions | Api::Messages => &["max_tokens"],
        Api::Responses => &["max_output_tokens"],
        Api::Embeddings => &[],
    };
    for name in names {
        if let Some(n) = uint_field(body, name)? {
            if n > MAX_COMPLETION_TOKENS {
                return Err(InvalidRequest::new(
                    format!("{name} must be at most {MAX_COMPLETION_TOKENS}"),
                    Some(name),
                ));
            }
            return Ok(Some(n));
        }
    }
    Ok(None)
}

/// A non-negative integer field; absent and `null` are `None`, anything else is an error.
fn uint_field(body: &Value, name: &'static str) -> Result<Option<u64>, InvalidRequest> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            InvalidRequest::new(format!("{name} must be a non-negative integer"), Some(name))
        }),
    }
}

/// Prompt tokens the simulator reports for `body` on `api` (see the module doc for the rule).
pub fn prompt_tokens_for(api: Api, body: &Value) -> u64 {
    match api {
        Api::ChatCompletions => per_message(body.get("messages")),
        Api::Messages => {
            let system = match body.get("system") {
                None | Some(Value::Null) => 0,
                Some(s) => 1 + content_words(s),
            };
            system + per_message(body.get("messages"))
        }
        Api::Responses => {
            let instructions = body.get("instructions").map_or(0, content_words);
            let input = match body.get("input") {
                Some(Value::Array(items)) => items.iter().map(|item| 1 + item_words(item)).sum(),
                Some(other) => content_words(other),
                None => 0,
            };
            instructions + input
        }
        Api::Completions => body.get("prompt").map_or(0, prompt_words),
        Api::Embeddings => body.get("input").map_or(0, prompt_words),
    }
}

/// Completion tokens the simulator generates for `body` on `api`, before any fault.
/// `None` when the body would be refused.
pub fn completion_tokens_for(api: Api, body: &Value, default_max_tokens: u64) -> Option<u64> {
    RequestSpec::parse(api, body, default_max_tokens)
        .ok()
        .map(|spec| spec.completion_tokens())
}

fn per_message(messages: Option<&Value>) -> u64 {
    match messages {
        Some(Value::Array(list)) => list.iter().map(|m| 1 + item_words(m)).sum(),
        _ => 0,
    }
}

/// Words of a message or response input item: its `content`, or for a bare part its text.
fn item_words(item: &Value) -> u64 {
    match item.get("content") {
        Some(content) => content_words(content),
        None => content_words(item),
    }
}

/// Words of a content value: a string, an array of parts with `text`, or a single part.
fn content_words(content: &Value) -> u64 {
    match content {
        Value::String(s) => words(s),
        Value::Array(parts) => parts.iter().map(content_words).sum(),
        Value::Object(part) => part.get("text").and_then(Value::as_str).map_or(0, words),
        _ => 0,
    }
}

/// Words of a completions prompt or embeddings input (strings or token-id arrays).
fn prompt_words(prompt: &Value) -> u64 {
    match prompt {
        Value::String(s) => words(s),
        Value::Array(items) => {
            if items.iter().all(Value::is_number) {
                items.len() as u64
            } else {
                items.iter().map(prompt_words).sum()
            }
        }
        _ => 0,
    }
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chat_prompt_counts_words_plus_one_per_message() {
        let body = json!({"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello  there\nfriend"}, {"type": "image_url", "image_url": {"url": "x"}}]}
        ]});
        assert_eq!(prompt_tokens_for(Api::ChatCompletions, &body), 3 + 4);
    }

    #[test]
    fn anthropic_counts_system() {
        let body = json!({"system": [{"type": "text", "text": "a b"}], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5});
        assert_eq!(prompt_tokens_for(Api::Messages, &body), 3 + 2);
    }

    #[test]
    fn responses_string_and_items() {
        assert_eq!(
            prompt_tokens_for(Api::Responses, &json!({"input": "one two three"})),
            3
        );
        let body = json!({"instructions": "x y", "input": [{"role": "user", "content": [{"type": "input_text", "text": "q r s"}]}]});
        assert_eq!(prompt_tokens_for(Api::Responses, &body), 2 + 4);
    }

    #[test]
    fn completions_and_embeddings_inputs() {
        assert_eq!(
            prompt_tokens_for(Api::Completions, &json!({"prompt": ["a b", "c"]})),
            3
        );
        assert_eq!(
            prompt_tokens_for(Api::Embeddings, &json!({"input": [1, 2, 3, 4]})),
            4
        );
        assert_eq!(
            prompt_tokens_for(Api::Embeddings, &json!({"input": [[1, 2], [3]]})),
            3
        );
    }

    #[test]
    fn completion_tokens_follow_limits_and_n() {
        let chat = json!({"messages": [], "max_tokens": 5, "n": 3});
        assert_eq!(
            completion_tokens_for(Api::ChatCompletions, &chat, 16),
            Some(15)
        );
        let chat = json!({"messages": [], "max_tokens": 5, "max_completion_tokens": 7});
        assert_eq!(
            completion_tokens_for(Api::ChatCompletions, &chat, 16),
            Some(7)
        );
        let resp = json!({"input": "x", "max_output_tokens": 9});
        assert_eq!(completion_tokens_for(Api::Responses, &resp, 16), Some(9));
        assert_eq!(
            completion_tokens_for(Api::Responses, &json!({"input": "x"}), 16),
            Some(16)
        );
        assert_eq!(
            completion_tokens_for(Api::Messages, &json!({"messages": []}), 16),
            None
        );
    }

    #[test]
    fn bad_fields_are_refused() {
        for body in [
            json!([1]),
            json!({"messages": [], "max_tokens": -1}),
            json!({"messages": [], "max_tokens": "5"}),
            json!({"messages": [], "n": 0}),
            json!({"messages": [], "stream": "yes"}),
            json!({"model": "m"}),
        ] {
            assert!(
                RequestSpec::parse(Api::ChatCompletions, &body, 16).is_err(),
                "{body}"
            );
        }
    }
}
