//! Request inspection: what a JSON request body asks of the model, read once before the
//! limits are evaluated.
//!
//! Strict where the gateway's decision depends on a field (`model`, `stream`, the output
//! token caps, `n`/`best_of`): a wrong type there is refused, since guessing could let a
//! request past a limit the upstream then honours differently. Lenient everywhere else
//! (message and content shapes): unknown shapes contribute nothing to the estimate and
//! are left for the upstream to judge.

use crate::api::Api;
use crate::estimate::{estimate_tokens, EstimateConfig};
use crate::json::{parse_unique, Json, ParseError};

/// Why a request body was refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No bytes at all.
    #[error("request body is empty")]
    Empty,
    /// Not parseable as one JSON value (includes nesting deeper than 128 levels).
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(#[source] serde_json::Error),
    /// Valid JSON, but not an object.
    #[error("request body must be a JSON object")]
    NotAnObject,
    /// The same key appears twice in one object; gateway and upstream could disagree on
    /// which one counts.
    #[error("duplicate key {key:?} in request body at {path}")]
    DuplicateKey {
        /// The repeated key, unescaped.
        key: String,
        /// JSONPath-like location of the object holding it, e.g. `$.messages[1]`.
        path: String,
    },
    /// A field the gateway relies on has the wrong type or range.
    #[error("field `{field}` must be {expected}")]
    InvalidField {
        /// Top-level field name (`stream_options.include_usage` for the nested one).
        field: &'static str,
        /// What was expected, in words.
        expected: &'static str,
    },
}

/// Media parts found in the prompt, counted per item rather than by payload size (a
/// base64 image's byte length says little about its token cost).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MediaCounts {
    /// `image_url`, `input_image`, Anthropic `image`.
    pub images: u64,
    /// `input_audio` parts.
    pub audio: u64,
    /// `file`, `input_file`, Anthropic `document`.
    pub files: u64,
}

impl MediaCounts {
    /// All media items.
    pub fn total(&self) -> u64 {
        self.images
            .saturating_add(self.audio)
            .saturating_add(self.files)
    }
}

/// What the gateway needs to know about an LLM request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmRequest {
    /// The API the body was read as.
    pub api: Api,
    /// `model`, if given (Azure deployments may omit it).
    pub model: Option<String>,
    /// `stream: true`.
    pub stream: bool,
    /// Chat/completions `stream_options.include_usage`, if present.
    pub include_usage: Option<bool>,
    /// The client's output cap: chat `max_completion_tokens` (else `max_tokens`),
    /// completions and Anthropic `max_tokens`, Responses `max_output_tokens`.
    pub max_output_tokens: Option<u64>,
    /// Number of completions asked for: the larger of `n` and `best_of`, at least 1.
    pub n: u64,
    /// Fast estimate of the prompt's tokens (text heuristic, per-message framing,
    /// per-media-item constants, pre-tokenised inputs counted exactly).
    pub prompt_tokens_estimate: u64,
    /// Image, audio and file parts in the prompt (`media.total()`).
    pub media_items: u64,
    /// The same, by kind.
    pub media: MediaCounts,
    /// Messages / input items the per-message overhead was charged for.
    pub messages: u64,
    /// Prompt tokens given as token ids (completions `prompt`, embeddings `input`);
    /// counted exactly and not part of [`LlmRequest::prompt_text`].
    pub pretokenized_tokens: u64,
    /// End-user identifier the client supplied: OpenAI `user` / `safety_identifier`,
    /// Anthropic `metadata.user_id`.
    pub user: Option<String>,
    prompt_text: String,
}

impl LlmRequest {
    /// All prompt text (messages, system/instructions, tool definitions as JSON), joined
    /// with `\n`, for an exact tokeniser to count. Excludes media and token-id inputs.
    pub fn prompt_text(&self) -> &str {
        &self.prompt_text
    }

    /// Takes the prompt text without copying it.
    pub fn into_prompt_text(self) -> String {
        self.prompt_text
    }

    /// Output tokens to reserve before the call: the client's cap (or `default_max` when
    /// it set none) times `n`. Embeddings generate nothing.
    pub fn output_reservation(&self, default_max: u64) -> u64 {
        if self.api == Api::Embeddings {
            return 0;
        }
        self.max_output_tokens
            .unwrap_or(default_max)
            .saturating_mul(self.n)
    }
}

/// Inspects a request body with the default [`EstimateConfig`].
pub fn inspect_request(api: Api, body: &[u8]) -> Result<LlmRequest, RequestError> {
    inspect_request_with(api, body, &EstimateConfig::default())
}

/// Inspects a request body: parses it (refusing duplicate keys at any depth), reads the
/// fields the limits need and estimates the prompt's tokens.
pub fn inspect_request_with(
    api: Api,
    body: &[u8],
    config: &EstimateConfig,
) -> Result<LlmRequest, RequestError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RequestError::Empty);
    }
    let value = parse_unique(body).map_err(|e| match e {
        ParseError::Duplicate(d) => RequestError::DuplicateKey {
            key: d.key,
            path: d.path,
        },
        ParseError::Syntax(e) => RequestError::InvalidJson(e),
    })?;
    let obj = &value;
    if !matches!(obj, Json::Object(_)) {
        return Err(RequestError::NotAnObject);
    }

    let model = opt_string(obj, "model")?;
    let stream = opt_bool(obj, "stream")?.unwrap_or(false);
    let (include_usage, max_output_tokens, n) = match api {
        Api::Chat => (
            include_usage(obj)?,
            match opt_u64(obj, "max_completion_tokens")? {
                Some(max) => Some(max),
                None => opt_u64(obj, "max_tokens")?,
            },
            opt_u64(obj, "n")?.unwrap_or(1),
        ),
        Api::Completions => (
            include_usage(obj)?,
            opt_u64(obj, "max_tokens")?,
            opt_u64(obj, "n")?
                .unwrap_or(1)
                .max(opt_u64(obj, "best_of")?.unwrap_or(1)),
        ),
        Api::Responses => (None, opt_u64(obj, "max_output_tokens")?, 1),
        Api::Messages => (None, opt_u64(obj, "max_tokens")?, 1),
        Api::Embeddings => (None, None, 1),
    };
    let user = match api {
        Api::Messages => obj
            .get("metadata")
            .and_then(|m| m.get("user_id"))
            .and_then(Json::as_str)
            .map(str::to_owned),
        _ => obj
            .get("user")
            .or_else(|| obj.get("safety_identifier"))
            .and_then(Json::as_str)
            .map(str::to_owned),
    };

    let mut prompt = PromptCollector::default();
    match api {
        Api::Chat => prompt.chat(obj),
        Api::Completions => prompt.completions(obj),
        Api::Responses => prompt.responses(obj),
        Api::Embeddings => prompt.embeddings(obj),
        Api::Messages => prompt.messages(obj),
    }
    let prompt_tokens_estimate = prompt.estimate(api, config);

    Ok(LlmRequest {
        api,
        model,
        stream,
        include_usage,
        max_output_tokens,
        n: n.max(1),
        prompt_tokens_estimate,
        media_items: prompt.media.total(),
        media: prompt.media,
        messages: prompt.messages,
        pretokenized_tokens: prompt.pretokenized,
        user,
        prompt_text: prompt.text,
    })
}

fn opt_string(obj: &Json<'_>, field: &'static str) -> Result<Option<String>, RequestError> {
    match obj.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.as_ref().to_owned())),
        Some(_) => Err(RequestError::InvalidField {
            field,
            expected: "a string",
        }),
    }
}

fn opt_bool(obj: &Json<'_>, field: &'static str) -> Result<Option<bool>, RequestError> {
    match obj.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(RequestError::InvalidField {
            field,
            expected: "a boolean",
        }),
    }
}

fn opt_u64(obj: &Json<'_>, field: &'static str) -> Result<Option<u64>, RequestError> {
    match obj.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(RequestError::InvalidField {
            field,
            expected: "a non-negative integer below 2^64",
        }),
    }
}

fn include_usage(obj: &Json<'_>) -> Result<Option<bool>, RequestError> {
    match obj.get("stream_options") {
        None | Some(Json::Null) => Ok(None),
        Some(options @ Json::Object(_)) => match options.get("include_usage") {
            None | Some(Json::Null) => Ok(None),
            Some(Json::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(RequestError::InvalidField {
                field: "stream_options.include_usage",
                expected: "a boolean",
            }),
        },
        Some(_) => Err(RequestError::InvalidField {
            field: "stream_options",
            expected: "an object",
        }),
    }
}

/// Walks the prompt-bearing parts of a body, gathering text and counting media.
#[derive(Default)]
struct PromptCollector {
    text: String,
    media: MediaCounts,
    messages: u64,
    pretokenized: u64,
}

impl PromptCollector {
    fn estimate(&self, api: Api, config: &EstimateConfig) -> u64 {
        let framing = match api {
            Api::Chat | Api::Responses | Api::Messages => self
                .messages
                .saturating_mul(config.per_message_tokens)
                .saturating_add(config.reply_priming_tokens),
            Api::Completions | Api::Embeddings => 0,
        };
        estimate_tokens(&self.text)
            .saturating_add(self.pretokenized)
            .saturating_add(framing)
            .saturating_add(self.media.images.saturating_mul(config.image_tokens))
            .saturating_add(self.media.audio.saturating_mul(config.audio_tokens))
            .saturating_add(self.media.files.saturating_mul(config.file_tokens))
    }

    fn push_text(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        self.text.push_str(s);
    }

    /// Tool definitions and tool-call arguments are sent to the model as JSON text.
    fn push_json(&mut self, v: &Json<'_>) {
        match v {
            Json::Null => {}
            Json::String(s) => self.push_text(s),
            other => self.push_text(&other.to_string()),
        }
    }

    fn chat(&mut self, obj: &Json<'_>) {
        for message in array(obj.get("messages")) {
            self.messages += 1;
            self.content(message.get("content"));
            if let Some(refusal) = message.get("refusal").and_then(Json::as_str) {
                self.push_text(refusal);
            }
            for call in array(message.get("tool_calls")) {
                self.function_call(call.get("function"));
            }
            self.function_call(message.get("function_call"));
        }
        self.tools(obj);
    }

    fn completions(&mut self, obj: &Json<'_>) {
        self.text_or_token_ids(obj.get("prompt"));
        if let Some(suffix) = obj.get("suffix").and_then(Json::as_str) {
            self.push_text(suffix);
        }
    }

    fn embeddings(&mut self, obj: &Json<'_>) {
        self.text_or_token_ids(obj.get("input"));
    }

    fn responses(&mut self, obj: &Json<'_>) {
        if let Some(instructions) = obj.get("instructions").and_then(Json::as_str) {
            self.messages += 1;
            self.push_text(instructions);
        }
        match obj.get("input") {
            Some(Json::String(s)) => {
                self.messages += 1;
                self.push_text(s);
            }
            Some(Json::Array(items)) => {
                for item in items {
                    self.messages += 1;
                    self.response_item(item);
                }
            }
            _ => {}
        }
        self.tools(obj);
    }

    fn response_item(&mut self, item: &Json<'_>) {
        if item.get("content").is_some() {
            self.content(item.get("content"));
            return;
        }
        match item.get("type").and_then(Json::as_str) {
            Some("function_call" | "custom_tool_call") => {
                self.push_json(item.get("name").unwrap_or(&Json::Null));
                self.push_json(
                    item.get("arguments")
                        .or_else(|| item.get("input"))
                        .unwrap_or(&Json::Null),
                );
            }
            Some("function_call_output" | "custom_tool_call_output") => {
                self.content(item.get("output"));
            }
            Some("reasoning") => {
                for part in array(item.get("summary")) {
                    self.part(part);
                }
            }
            _ => self.part(item),
        }
    }

    fn messages(&mut self, obj: &Json<'_>) {
        if let Some(system) = obj.get("system") {
            self.messages += 1;
            self.content(Some(system));
        }
        for message in array(obj.get("messages")) {
            self.messages += 1;
            self.content(message.get("content"));
        }
        self.tools(obj);
    }

    fn tools(&mut self, obj: &Json<'_>) {
        for key in ["tools", "functions"] {
            if let Some(tools) = obj.get(key) {
                self.push_json(tools);
            }
        }
    }

    fn function_call(&mut self, function: Option<&Json<'_>>) {
        let Some(function) = function else { return };
        self.push_json(function.get("name").unwrap_or(&Json::Null));
        self.push_json(function.get("arguments").unwrap_or(&Json::Null));
    }

    /// Message content in any of the three APIs: a string or an array of parts.
    fn content(&mut self, content: Option<&Json<'_>>) {
        match content {
            Some(Json::String(s)) => self.push_text(s),
            Some(Json::Array(parts)) => {
                for part in parts {
                    self.part(part);
                }
            }
            _ => {}
        }
    }

    fn part(&mut self, part: &Json<'_>) {
        let kind = part.get("type").and_then(Json::as_str).unwrap_or("");
        match kind {
            "image_url" | "input_image" | "image" => self.media.images += 1,
            "input_audio" | "audio" => self.media.audio += 1,
            "file" | "input_file" | "document" => self.media.files += 1,
            // Anthropic tool use: the arguments are JSON the model wrote.
            "tool_use" | "server_tool_use" => {
                self.push_json(part.get("name").unwrap_or(&Json::Null));
                self.push_json(part.get("input").unwrap_or(&Json::Null));
            }
            // Anthropic tool results nest content of their own.
            "tool_result" => self.content(part.get("content")),
            _ => {
                for key in ["text", "thinking", "refusal"] {
                    if let Some(s) = part.get(key).and_then(Json::as_str) {
                        self.push_text(s);
                    }
                }
            }
        }
    }

    /// Completions `prompt` / embeddings `input`: a string, an array of strings, an array
    /// of token ids, or an array of such arrays.
    fn text_or_token_ids(&mut self, input: Option<&Json<'_>>) {
        match input {
            Some(Json::String(s)) => self.push_text(s),
            Some(Json::Array(items)) => {
                for item in items {
                    match item {
                        Json::String(s) => self.push_text(s),
                        Json::Number(_) => self.pretokenized += 1,
                        Json::Array(ids) => {
                            for id in ids {
                                match id {
                                    Json::Number(_) => self.pretokenized += 1,
                                    Json::String(s) => self.push_text(s),
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
}

fn array<'j, 'a>(v: Option<&'j Json<'a>>) -> &'j [Json<'a>] {
    match v {
        Some(Json::Array(items)) => items,
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inspect(api: Api, json: &str) -> Result<LlmRequest, RequestError> {
        inspect_request(api, json.as_bytes())
    }

    #[test]
    fn chat_fields() {
        let r = inspect(
            Api::Chat,
            r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":false},
               "max_tokens":100,"max_completion_tokens":50,"n":3,"user":"u1",
               "messages":[{"role":"system","content":"Be brief."},
                           {"role":"user","content":[{"type":"text","text":"Hello"},
                                                     {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}},
                                                     {"type":"input_audio","input_audio":{"data":"AAAA","format":"wav"}}]},
                           {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"x\":1}"}}]}],
               "tools":[{"type":"function","function":{"name":"f","description":"d"}}]}"#,
        )
        .unwrap();
        assert_eq!(r.model.as_deref(), Some("gpt-4o"));
        assert!(r.stream);
        assert_eq!(r.include_usage, Some(false));
        assert_eq!(r.max_output_tokens, Some(50));
        assert_eq!(r.n, 3);
        assert_eq!(r.user.as_deref(), Some("u1"));
        assert_eq!(r.messages, 3);
        assert_eq!(
            r.media,
            MediaCounts {
                images: 1,
                audio: 1,
                files: 0
            }
        );
        assert_eq!(r.media_items, 2);
        // Tool JSON is re-serialised compactly, members in the order the client sent them.
        let tools = r#"[{"type":"function","function":{"name":"f","description":"d"}}]"#;
        assert_eq!(
            r.prompt_text(),
            format!("Be brief.\nHello\nf\n{{\"x\":1}}\n{tools}")
        );
        let c = EstimateConfig::default();
        let expected = estimate_tokens(r.prompt_text())
            + 3 * c.per_message_tokens
            + c.reply_priming_tokens
            + c.image_tokens
            + c.audio_tokens;
        assert_eq!(r.prompt_tokens_estimate, expected);
        assert_eq!(r.output_reservation(4096), 150);
    }

    #[test]
    fn chat_defaults() {
        let r = inspect(Api::Chat, r#"{"messages":[]}"#).unwrap();
        assert_eq!(r.model, None);
        assert!(!r.stream);
        assert_eq!(r.include_usage, None);
        assert_eq!(r.max_output_tokens, None);
        assert_eq!(r.n, 1);
        assert_eq!(r.prompt_tokens_estimate, 3);
        assert_eq!(r.output_reservation(4096), 4096);
        // max_tokens alone is used when max_completion_tokens is absent.
        let r = inspect(Api::Chat, r#"{"max_tokens":7,"n":0}"#).unwrap();
        assert_eq!((r.max_output_tokens, r.n), (Some(7), 1));
    }

    #[test]
    fn completions_prompt_forms_and_best_of() {
        let r = inspect(
            Api::Completions,
            r#"{"model":"m","prompt":["abcd","efgh"],"n":2,"best_of":5,"max_tokens":16}"#,
        )
        .unwrap();
        assert_eq!(r.n, 5);
        assert_eq!(r.prompt_text(), "abcd\nefgh");
        assert_eq!(r.prompt_tokens_estimate, 3); // 9 ASCII bytes
        let r = inspect(Api::Completions, r#"{"prompt":[[1,2,3],[4,5]]}"#).unwrap();
        assert_eq!((r.pretokenized_tokens, r.prompt_tokens_estimate), (5, 5));
        assert_eq!(r.prompt_text(), "");
    }

    #[test]
    fn embeddings_inputs() {
        let r = inspect(Api::Embeddings, r#"{"model":"e","input":"hello world"}"#).unwrap();
        assert_eq!(r.prompt_tokens_estimate, 3);
        let r = inspect(Api::Embeddings, r#"{"input":[1,2,3,4]}"#).unwrap();
        assert_eq!(r.prompt_tokens_estimate, 4);
        assert_eq!(r.output_reservation(4096), 0);
        let r = inspect(Api::Embeddings, r#"{"input":["a","b"],"max_tokens":9}"#).unwrap();
        assert_eq!(r.max_output_tokens, None);
        assert_eq!(r.prompt_text(), "a\nb");
    }

    #[test]
    fn responses_input_items() {
        let r = inspect(
            Api::Responses,
            r#"{"model":"gpt-5","instructions":"Sys","max_output_tokens":64,"stream":true,
               "input":[{"role":"user","content":[{"type":"input_text","text":"Hi"},{"type":"input_image","image_url":"x"},{"type":"input_file","file_id":"f"}]},
                        {"type":"function_call","name":"g","arguments":"{}","call_id":"c"},
                        {"type":"function_call_output","call_id":"c","output":"42"}]}"#,
        )
        .unwrap();
        assert_eq!(r.max_output_tokens, Some(64));
        assert_eq!(r.include_usage, None);
        assert_eq!(r.messages, 4);
        assert_eq!(
            r.media,
            MediaCounts {
                images: 1,
                audio: 0,
                files: 1
            }
        );
        assert_eq!(r.prompt_text(), "Sys\nHi\ng\n{}\n42");
        let r = inspect(Api::Responses, r#"{"input":"Tell me a joke"}"#).unwrap();
        assert_eq!((r.messages, r.prompt_text()), (1, "Tell me a joke"));
    }

    #[test]
    fn anthropic_messages() {
        let r = inspect(
            Api::Messages,
            r#"{"model":"claude","max_tokens":1024,"stream":true,"metadata":{"user_id":"abc"},
               "system":[{"type":"text","text":"You are terse."}],
               "messages":[{"role":"user","content":"Q"},
                           {"role":"assistant","content":[{"type":"thinking","thinking":"hm","signature":"s"},{"type":"tool_use","id":"t","name":"calc","input":{"a":1}}]},
                           {"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"text","text":"2"}]},{"type":"image","source":{}},{"type":"document","source":{}}]}],
               "tools":[{"name":"calc","input_schema":{}}]}"#,
        )
        .unwrap();
        assert_eq!(r.max_output_tokens, Some(1024));
        assert_eq!(r.user.as_deref(), Some("abc"));
        assert_eq!(r.messages, 4);
        assert_eq!(
            r.media,
            MediaCounts {
                images: 1,
                audio: 0,
                files: 1
            }
        );
        let tools = r#"[{"name":"calc","input_schema":{}}]"#;
        assert_eq!(
            r.prompt_text(),
            format!("You are terse.\nQ\nhm\ncalc\n{{\"a\":1}}\n2\n{tools}")
        );
    }

    #[test]
    fn refusals() {
        assert!(matches!(inspect(Api::Chat, ""), Err(RequestError::Empty)));
        assert!(matches!(
            inspect(Api::Chat, "  \n"),
            Err(RequestError::Empty)
        ));
        assert!(matches!(
            inspect(Api::Chat, "model=gpt"),
            Err(RequestError::InvalidJson(_))
        ));
        assert!(matches!(
            inspect(Api::Chat, "[1,2]"),
            Err(RequestError::NotAnObject)
        ));
        assert!(matches!(
            inspect(Api::Chat, "\"text\""),
            Err(RequestError::NotAnObject)
        ));
        assert!(matches!(
            inspect(Api::Chat, "null"),
            Err(RequestError::NotAnObject)
        ));
        assert!(matches!(
            inspect_request(Api::Chat, b"{\"a\":\"\xff\"}"),
            Err(RequestError::InvalidJson(_))
        ));
    }

    #[test]
    fn duplicate_keys_anywhere() {
        let err = inspect(
            Api::Chat,
            r#"{"model":"a","max_tokens":1,"max_tokens":100000}"#,
        )
        .unwrap_err();
        assert!(
            matches!(&err, RequestError::DuplicateKey { key, path } if key == "max_tokens" && path == "$"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "duplicate key \"max_tokens\" in request body at $"
        );
        let err = inspect(
            Api::Chat,
            r#"{"messages":[{"role":"user","content":"a"},{"role":"user","role":"system","content":"b"}]}"#,
        )
        .unwrap_err();
        assert!(
            matches!(&err, RequestError::DuplicateKey { key, path } if key == "role" && path == "$.messages[1]")
        );
        let err = inspect(
            Api::Chat,
            r#"{"stream_options":{"include_usage":true,"include_usage":false}}"#,
        )
        .unwrap_err();
        assert!(
            matches!(&err, RequestError::DuplicateKey { path, .. } if path == "$.stream_options")
        );
    }

    #[test]
    fn wrong_types_on_decisive_fields() {
        let field = |json: &str| match inspect(Api::Chat, json) {
            Err(RequestError::InvalidField { field, .. }) => Some(field),
            _ => None,
        };
        assert_eq!(field(r#"{"model":5}"#), Some("model"));
        assert_eq!(field(r#"{"stream":"yes"}"#), Some("stream"));
        assert_eq!(field(r#"{"max_tokens":-1}"#), Some("max_tokens"));
        assert_eq!(field(r#"{"max_tokens":1.5}"#), Some("max_tokens"));
        assert_eq!(
            field(r#"{"max_completion_tokens":"100"}"#),
            Some("max_completion_tokens")
        );
        assert_eq!(field(r#"{"n":true}"#), Some("n"));
        assert_eq!(field(r#"{"stream_options":"x"}"#), Some("stream_options"));
        assert_eq!(
            field(r#"{"stream_options":{"include_usage":1}}"#),
            Some("stream_options.include_usage")
        );
        // Nulls are "not given".
        assert_eq!(
            field(
                r#"{"model":null,"stream":null,"max_tokens":null,"n":null,"stream_options":null}"#
            ),
            None
        );
    }

    #[test]
    fn huge_numbers() {
        // u64::MAX is accepted as is; the reservation saturates.
        let r = inspect(Api::Chat, r#"{"max_tokens":18446744073709551615,"n":2}"#).unwrap();
        assert_eq!(r.output_reservation(1), u64::MAX);
        // One more does not fit: refused, not wrapped or clamped.
        assert!(matches!(
            inspect(Api::Chat, r#"{"max_tokens":18446744073709551616}"#),
            Err(RequestError::InvalidField {
                field: "max_tokens",
                ..
            })
        ));
        assert!(matches!(
            inspect(Api::Chat, r#"{"max_tokens":1e400}"#),
            Err(RequestError::InvalidJson(_))
        ));
        // Huge numbers elsewhere are the upstream's business.
        assert!(inspect(
            Api::Chat,
            r#"{"temperature":1e300,"seed":123456789012345678901234567890}"#
        )
        .is_ok());
    }

    #[test]
    fn unknown_content_shapes_are_tolerated() {
        let r = inspect(
            Api::Chat,
            r#"{"messages":[{"role":"user","content":{"weird":true}},"not a message",{"content":[1,null,{"type":"text","text":7}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.messages, 3);
        assert_eq!(r.prompt_text(), "");
    }
}
