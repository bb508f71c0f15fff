//! Token usage as providers report it, normalised to one shape.
//!
//! Accounting rules, read off real captures (see `tests/corpus.rs`):
//! - OpenAI (chat, completions, embeddings, Responses): the prompt count *includes* cached
//!   tokens and the completion count *includes* reasoning tokens; `total = prompt +
//!   completion`.
//! - Anthropic: `input_tokens` *excludes* cache reads and writes, so the normalised input
//!   is `input_tokens + cache_creation_input_tokens + cache_read_input_tokens`; there is no
//!   total field.
//! - Every count is optional and may be `null` (Azure, vLLM, Gemini's OpenAI-compatible
//!   endpoint all differ); unknown fields are ignored. A usage object with no recognised
//!   count at all is treated as absent, but all-zero counts are kept: the Responses API
//!   really reports zeros on some `response.incomplete` streams.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::api::Api;

/// Normalised token usage of one exchange.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// All prompt tokens, cached or not, cache writes included.
    pub input_tokens: u64,
    /// All generated tokens, reasoning included.
    pub output_tokens: u64,
    /// Prompt tokens served from the provider's cache (part of `input_tokens`).
    pub cached_input_tokens: u64,
    /// Prompt tokens written to the cache (Anthropic; part of `input_tokens`).
    pub cache_creation_input_tokens: u64,
    /// Reasoning/thinking tokens (part of `output_tokens`).
    pub reasoning_tokens: u64,
    /// The provider's total if it gave one, else `input_tokens + output_tokens`.
    pub total_tokens: u64,
}

/// Usage of a complete (non-streamed) JSON response body, success or error.
///
/// Returns `None` when the body is not JSON, has no top-level `usage` object, or that
/// object has no recognised count. Only the `usage` member is materialised; the rest of
/// the body (possibly megabytes of embeddings) is skipped without allocation.
pub fn usage_from_body(api: Api, body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct Envelope<'a> {
        #[serde(borrow, default)]
        usage: Option<&'a RawValue>,
    }
    let envelope: Envelope<'_> = serde_json::from_slice(body).ok()?;
    let usage: Value = serde_json::from_str(envelope.usage?.get()).ok()?;
    usage_from_value(api, &usage)
}

/// Normalises a provider `usage` object according to the API's accounting rules.
pub(crate) fn usage_from_value(api: Api, usage: &Value) -> Option<Usage> {
    let obj = usage.as_object()?;
    match api {
        Api::Messages => AnthropicUsage::from_object(obj).and_then(|a| a.normalise()),
        Api::Chat | Api::Completions | Api::Embeddings | Api::Responses => openai_usage(obj),
    }
}

/// OpenAI chat/completions/embeddings and Responses share one reader: the two naming
/// schemes (`prompt_tokens` vs `input_tokens`) never mix in one object, and
/// OpenAI-compatible servers are known to send either on either endpoint.
fn openai_usage(obj: &serde_json::Map<String, Value>) -> Option<Usage> {
    let input = count(obj, "prompt_tokens").or_else(|| count(obj, "input_tokens"));
    let output = count(obj, "completion_tokens").or_else(|| count(obj, "output_tokens"));
    let total = count(obj, "total_tokens");
    if input.is_none() && output.is_none() && total.is_none() {
        return None;
    }
    let input_details = obj
        .get("prompt_tokens_details")
        .or_else(|| obj.get("input_tokens_details"));
    let output_details = obj
        .get("completion_tokens_details")
        .or_else(|| obj.get("output_tokens_details"));
    let cached = nested_count(input_details, "cached_tokens")
        // DeepSeek reports its cache hits at the top level.
        .or_else(|| count(obj, "prompt_cache_hit_tokens"))
        .unwrap_or(0);
    let reasoning = nested_count(output_details, "reasoning_tokens").unwrap_or(0);
    let input = input.unwrap_or(0);
    let output = output.unwrap_or(0);
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: cached,
        cache_creation_input_tokens: 0,
        reasoning_tokens: reasoning,
        total_tokens: total.unwrap_or_else(|| input.saturating_add(output)),
    })
}

/// Anthropic's usage fields as reported, before normalisation. Streams report them in
/// two installments (`message_start`, then `message_delta`), so the meter merges these.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AnthropicUsage {
    pub(crate) input_tokens: Option<u64>,
    pub(crate) cache_creation_input_tokens: Option<u64>,
    pub(crate) cache_read_input_tokens: Option<u64>,
    pub(crate) output_tokens: Option<u64>,
    pub(crate) thinking_tokens: Option<u64>,
}

impl AnthropicUsage {
    pub(crate) fn from_object(obj: &serde_json::Map<String, Value>) -> Option<AnthropicUsage> {
        let usage = AnthropicUsage {
            input_tokens: count(obj, "input_tokens"),
            cache_creation_input_tokens: count(obj, "cache_creation_input_tokens"),
            cache_read_input_tokens: count(obj, "cache_read_input_tokens"),
            output_tokens: count(obj, "output_tokens"),
            thinking_tokens: nested_count(obj.get("output_tokens_details"), "thinking_tokens"),
        };
        (usage != AnthropicUsage::default()).then_some(usage)
    }

    /// Later installments override earlier ones field by field: `output_tokens` in
    /// `message_delta` is cumulative (never add), and newer API versions repeat the
    /// input/cache fields there with final values.
    pub(crate) fn merge(&mut self, later: AnthropicUsage) {
        fn take(into: &mut Option<u64>, from: Option<u64>) {
            if from.is_some() {
                *into = from;
            }
        }
        take(&mut self.input_tokens, later.input_tokens);
        take(
            &mut self.cache_creation_input_tokens,
            later.cache_creation_input_tokens,
        );
        take(
            &mut self.cache_read_input_tokens,
            later.cache_read_input_tokens,
        );
        take(&mut self.output_tokens, later.output_tokens);
        take(&mut self.thinking_tokens, later.thinking_tokens);
    }

    pub(crate) fn normalise(&self) -> Option<Usage> {
        if *self == AnthropicUsage::default() {
            return None;
        }
        let creation = self.cache_creation_input_tokens.unwrap_or(0);
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let input = self
            .input_tokens
            .unwrap_or(0)
            .saturating_add(creation)
            .saturating_add(read);
        let output = self.output_tokens.unwrap_or(0);
        Some(Usage {
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: read,
            cache_creation_input_tokens: creation,
            reasoning_tokens: self.thinking_tokens.unwrap_or(0),
            total_tokens: input.saturating_add(output),
        })
    }
}

/// Usage of a native Gemini `generateContent` body, or of a native
/// `streamGenerateContent` body (a JSON array of chunks; the last `usageMetadata` wins,
/// the counts being cumulative).
///
/// Not reachable through [`Api`]: native Gemini paths (`/v1beta/models/{m}:generateContent`)
/// are not one of the five routed APIs. It is here so a route can meter Gemini once the
/// proxy maps such paths. `thoughtsTokenCount` is *not* part of `candidatesTokenCount`
/// (unlike OpenAI's reasoning tokens), so output = candidates + thoughts.
pub fn gemini_usage_from_body(body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct Chunk<'a> {
        #[serde(borrow, default, rename = "usageMetadata")]
        usage_metadata: Option<&'a RawValue>,
    }
    // An untagged enum would buffer the body and lose `RawValue` borrowing, so look at
    // the first byte instead.
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    let raw = if *first == b'[' {
        let chunks: Vec<Chunk<'_>> = serde_json::from_slice(body).ok()?;
        chunks.iter().rev().find_map(|c| c.usage_metadata)?
    } else {
        serde_json::from_slice::<Chunk<'_>>(body)
            .ok()?
            .usage_metadata?
    };
    let meta: Value = serde_json::from_str(raw.get()).ok()?;
    let obj = meta.as_object()?;
    let prompt = count(obj, "promptTokenCount");
    let candidates = count(obj, "candidatesTokenCount");
    let thoughts = count(obj, "thoughtsTokenCount");
    let total = count(obj, "totalTokenCount");
    if prompt.is_none() && candidates.is_none() && total.is_none() {
        return None;
    }
    let input = prompt.unwrap_or(0);
    let output = candidates
        .unwrap_or(0)
        .saturating_add(thoughts.unwrap_or(0));
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: count(obj, "cachedContentTokenCount").unwrap_or(0),
        cache_creation_input_tokens: 0,
        reasoning_tokens: thoughts.unwrap_or(0),
        total_tokens: total.unwrap_or_else(|| input.saturating_add(output)),
    })
}

fn nested_count(parent: Option<&Value>, key: &str) -> Option<u64> {
    parent
        .and_then(Value::as_object)
        .and_then(|obj| count(obj, key))
}

/// A token count, read leniently: non-negative integers, and floats with no fraction
/// (some OpenAI-compatible servers emit `12.0`). `null`, negatives, strings and anything
/// else count as absent rather than failing the whole usage object.
fn count(obj: &serde_json::Map<String, Value>, key: &str) -> Option<u64> {
    let n = obj.get(key)?.as_number()?;
    if let Some(u) = n.as_u64() {
        return Some(u);
    }
    let f = n.as_f64()?;
    // 2^64 as f64; anything at or above it does not fit.
    const U64_LIMIT: f64 = 18_446_744_073_709_551_616.0;
    if f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f < U64_LIMIT {
        // Exact: `f` is a non-negative integer below 2^64.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        return Some(f as u64);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(api: Api, json: &str) -> Option<Usage> {
        usage_from_body(api, json.as_bytes())
    }

    #[test]
    fn openai_chat_with_details() {
        let u = body(
            Api::Chat,
            r#"{"id":"x","usage":{"prompt_tokens":1149,"completion_tokens":353,"total_tokens":1502,
              "prompt_tokens_details":{"cached_tokens":1024},"completion_tokens_details":{"reasoning_tokens":7}}}"#,
        );
        assert_eq!(
            u,
            Some(Usage {
                input_tokens: 1149,
                output_tokens: 353,
                cached_input_tokens: 1024,
                cache_creation_input_tokens: 0,
                reasoning_tokens: 7,
                total_tokens: 1502,
            })
        );
    }

    #[test]
    fn total_defaults_to_sum_and_nulls_are_absent() {
        let u = body(
            Api::Completions,
            r#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":null,"prompt_tokens_details":null}}"#,
        );
        assert_eq!(
            u.map(|u| (u.total_tokens, u.cached_input_tokens)),
            Some((7, 0))
        );
    }

    #[test]
    fn responses_naming() {
        let u = body(
            Api::Responses,
            r#"{"usage":{"input_tokens":54,"input_tokens_details":{"cached_tokens":0},"output_tokens":164,
              "output_tokens_details":{"reasoning_tokens":128},"total_tokens":218}}"#,
        );
        assert_eq!(
            u.map(|u| (
                u.input_tokens,
                u.output_tokens,
                u.reasoning_tokens,
                u.total_tokens
            )),
            Some((54, 164, 128, 218))
        );
    }

    #[test]
    fn anthropic_adds_cache_fields_to_input() {
        let u = body(
            Api::Messages,
            r#"{"type":"message","usage":{"input_tokens":4,"cache_creation_input_tokens":1163,
              "cache_read_input_tokens":10,"output_tokens":187}}"#,
        );
        assert_eq!(
            u,
            Some(Usage {
                input_tokens: 1177,
                output_tokens: 187,
                cached_input_tokens: 10,
                cache_creation_input_tokens: 1163,
                reasoning_tokens: 0,
                total_tokens: 1364,
            })
        );
    }

    #[test]
    fn lenient_numbers() {
        let u = body(
            Api::Chat,
            r#"{"usage":{"prompt_tokens":12.0,"completion_tokens":-3,"total_tokens":"9"}}"#,
        );
        assert_eq!(
            u.map(|u| (u.input_tokens, u.output_tokens, u.total_tokens)),
            Some((12, 0, 12))
        );
        // 1e30 does not fit in u64: absent, not saturated.
        assert_eq!(
            body(
                Api::Chat,
                r#"{"usage":{"prompt_tokens":1e30,"completion_tokens":1}}"#
            )
            .map(|u| u.input_tokens),
            Some(0)
        );
    }

    #[test]
    fn absent_or_empty_usage_is_none() {
        assert_eq!(body(Api::Chat, r#"{"usage":null}"#), None);
        assert_eq!(body(Api::Chat, r#"{"usage":{}}"#), None);
        assert_eq!(body(Api::Chat, r#"{"usage":{"foo":1}}"#), None);
        assert_eq!(body(Api::Chat, r#"{"usage":[1,2]}"#), None);
        assert_eq!(body(Api::Chat, r#"{"error":{"message":"no"}}"#), None);
        assert_eq!(
            body(Api::Messages, r#"{"usage":{"service_tier":"standard"}}"#),
            None
        );
        assert_eq!(body(Api::Chat, "not json"), None);
        assert_eq!(body(Api::Chat, "[1]"), None);
        assert_eq!(body(Api::Chat, ""), None);
    }

    #[test]
    fn zeros_are_kept() {
        let u = body(
            Api::Responses,
            r#"{"usage":{"input_tokens":0,"output_tokens":0,"total_tokens":0}}"#,
        );
        assert_eq!(u, Some(Usage::default()));
    }

    #[test]
    fn error_body_carrying_usage() {
        let u = body(
            Api::Chat,
            r#"{"error":{"message":"content filter"},"usage":{"prompt_tokens":5,"completion_tokens":0}}"#,
        );
        assert_eq!(u.map(|u| u.input_tokens), Some(5));
    }

    #[test]
    fn anthropic_merge_takes_latest_fields() {
        let mut start = AnthropicUsage {
            input_tokens: Some(598),
            cache_creation_input_tokens: Some(0),
            cache_read_input_tokens: Some(0),
            output_tokens: Some(8),
            thinking_tokens: None,
        };
        start.merge(AnthropicUsage {
            output_tokens: Some(92),
            thinking_tokens: Some(53),
            ..AnthropicUsage::default()
        });
        let u = start.normalise();
        assert_eq!(
            u.map(|u| (u.input_tokens, u.output_tokens, u.reasoning_tokens)),
            Some((598, 92, 53))
        );
    }

    #[test]
    fn gemini_single_and_array() {
        let one = br#"{"candidates":[],"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":877,"thoughtsTokenCount":1058,"totalTokenCount":1940}}"#;
        assert_eq!(
            gemini_usage_from_body(one).map(|u| (
                u.input_tokens,
                u.output_tokens,
                u.reasoning_tokens,
                u.total_tokens
            )),
            Some((5, 1935, 1058, 1940))
        );
        let many = br#"[{"usageMetadata":{"promptTokenCount":1,"totalTokenCount":1}},{"x":1},{"usageMetadata":{"promptTokenCount":2,"candidatesTokenCount":3,"totalTokenCount":5}}]"#;
        assert_eq!(
            gemini_usage_from_body(many).map(|u| u.total_tokens),
            Some(5)
        );
        assert_eq!(gemini_usage_from_body(br#"{"error":{"code":429}}"#), None);
    }
}
