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

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::api::Api;
use crate::json::{last_top_level_member, top_level_member, Member};

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
/// object has no recognised count. The `usage` member is read straight into its counts,
/// and the rest of the body is skipped without allocation: by serde for bodies under
/// [`SCAN_FROM`] (a chat answer: fastest when most of it is structure), and for larger
/// ones by [`usage_from_scan`], which passes numbers and whitespace at vector speed (an
/// embeddings list of 1,536 floats: about 25× faster than serde skipping them).
pub fn usage_from_body(api: Api, body: &[u8]) -> Option<Usage> {
    if body.len() >= SCAN_FROM {
        usage_from_scan(api, body)
    } else {
        usage_from_parsed_body(api, body)
    }
}

/// [`usage_from_body`] for a body known to be complete (the transport saw the last byte
/// its framing announced): the top-level `usage` is looked for from the end first
/// ([`last_top_level_member`]), where OpenAI, Anthropic, vLLM and embeddings bodies put
/// it, so the rest of the body is not read at all. What that scan cannot decide (no
/// closing brace, unbalanced, `usage` possibly given twice) goes to [`usage_from_body`].
/// The same leniency as [`usage_from_scan`], a little wider: a body whose end is sound
/// yields its `usage` whatever precedes it (the upstream's own count beats an estimate).
pub fn usage_from_complete_body(api: Api, body: &[u8]) -> Option<Usage> {
    match last_top_level_member(body, b"usage") {
        Member::At(at) => usage_from_leading(api, body.get(at..)?),
        Member::Absent => None,
        Member::Unsure => usage_from_body(api, body),
    }
}

/// The body size from which [`usage_from_body`] scans for `usage` instead of parsing.
pub const SCAN_FROM: usize = 4096;

/// [`usage_from_body`] by locating the top-level `usage` member with a scan that only
/// tracks objects and string bounds ([`top_level_member`]) and parsing that member alone.
/// Bodies the scan cannot decide (not an object, unbalanced, `usage` given twice, a
/// top-level key with escapes) are parsed in full. One difference from a full parse, on
/// purpose: a body balanced in braces but broken elsewhere (a bad number, say) still
/// yields its top-level `usage`: the upstream's own count beats an estimate.
pub fn usage_from_scan(api: Api, body: &[u8]) -> Option<Usage> {
    match top_level_member(body, b"usage") {
        Member::At(at) => usage_from_leading(api, body.get(at..)?),
        Member::Absent => None,
        Member::Unsure => usage_from_parsed_body(api, body),
    }
}

/// [`usage_from_body`] by a full parse of the body (serde skipping every other member).
pub(crate) fn usage_from_parsed_body(api: Api, body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct Envelope {
        #[serde(default)]
        usage: UsageObject,
    }
    let envelope: Envelope = serde_json::from_slice(body).ok()?;
    envelope.usage.0?.normalise(api)
}

/// Normalises a provider `usage` object according to the API's accounting rules.
pub(crate) fn usage_from_value(api: Api, usage: &Value) -> Option<Usage> {
    UsageObject::deserialize(usage).ok()?.0?.normalise(api)
}

/// [`usage_from_value`] for a `usage` member still in its raw form (a stream chunk's).
pub(crate) fn usage_from_raw(api: Api, usage: &RawValue) -> Option<Usage> {
    serde_json::from_str::<UsageObject>(usage.get())
        .ok()?
        .0?
        .normalise(api)
}

/// The usage in the first JSON value of `bytes` (whatever follows it is not read): the
/// `usage` member found in a truncated body's tail.
pub(crate) fn usage_from_leading(api: Api, bytes: &[u8]) -> Option<Usage> {
    serde_json::Deserializer::from_slice(bytes)
        .into_iter::<UsageObject>()
        .next()?
        .ok()?
        .0?
        .normalise(api)
}

/// A `usage` member: `Some` when it is a JSON object, `None` for anything else (`null`, a
/// number, an array), which counts as no usage.
#[derive(Debug, Default)]
struct UsageObject(Option<UsageFields>);

/// Every count a provider's `usage` object may carry, OpenAI's and Anthropic's names both,
/// read in one pass without building a map. As with a JSON object read into a map, a key
/// given twice takes its last value; unknown keys are skipped.
#[derive(Debug, Default, Clone, Copy)]
struct UsageFields {
    prompt_tokens: Option<u64>,
    input_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    prompt_cache_hit_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    prompt_tokens_details: Details,
    input_tokens_details: Details,
    completion_tokens_details: Details,
    output_tokens_details: Details,
}

/// A `*_tokens_details` member. `present` is whether the key was there at all (even as
/// `null`): OpenAI's reader takes `prompt_tokens_details` over `input_tokens_details`
/// whenever the former is present.
#[derive(Debug, Default, Clone, Copy)]
struct Details {
    present: bool,
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
    thinking_tokens: Option<u64>,
}

impl UsageFields {
    fn normalise(&self, api: Api) -> Option<Usage> {
        match api {
            Api::Messages => self.anthropic().normalise(),
            Api::Chat | Api::Completions | Api::Embeddings | Api::Responses => self.openai(),
        }
    }

    /// OpenAI chat/completions/embeddings and Responses share one reader: the two naming
    /// schemes (`prompt_tokens` vs `input_tokens`) never mix in one object, and
    /// OpenAI-compatible servers are known to send either on either endpoint.
    fn openai(&self) -> Option<Usage> {
        let input = self.prompt_tokens.or(self.input_tokens);
        let output = self.completion_tokens.or(self.output_tokens);
        let total = self.total_tokens;
        if input.is_none() && output.is_none() && total.is_none() {
            return None;
        }
        let input_details = if self.prompt_tokens_details.present {
            self.prompt_tokens_details
        } else {
            self.input_tokens_details
        };
        let output_details = if self.completion_tokens_details.present {
            self.completion_tokens_details
        } else {
            self.output_tokens_details
        };
        let cached = input_details
            .cached_tokens
            // DeepSeek reports its cache hits at the top level.
            .or(self.prompt_cache_hit_tokens)
            .unwrap_or(0);
        let reasoning = output_details.reasoning_tokens.unwrap_or(0);
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

    fn anthropic(&self) -> AnthropicUsage {
        AnthropicUsage {
            input_tokens: self.input_tokens,
            cache_creation_input_tokens: self.cache_creation_input_tokens,
            cache_read_input_tokens: self.cache_read_input_tokens,
            output_tokens: self.output_tokens,
            thinking_tokens: self.output_tokens_details.thinking_tokens,
        }
    }
}

/// The keys the usage readers look at; anything else is `Other` and skipped.
enum Key {
    PromptTokens,
    InputTokens,
    CompletionTokens,
    OutputTokens,
    TotalTokens,
    PromptCacheHitTokens,
    CacheCreationInputTokens,
    CacheReadInputTokens,
    PromptTokensDetails,
    InputTokensDetails,
    CompletionTokensDetails,
    OutputTokensDetails,
    CachedTokens,
    ReasoningTokens,
    ThinkingTokens,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: de::Error>(self, k: &str) -> Result<Key, E> {
                Ok(match k {
                    "prompt_tokens" => Key::PromptTokens,
                    "input_tokens" => Key::InputTokens,
                    "completion_tokens" => Key::CompletionTokens,
                    "output_tokens" => Key::OutputTokens,
                    "total_tokens" => Key::TotalTokens,
                    "prompt_cache_hit_tokens" => Key::PromptCacheHitTokens,
                    "cache_creation_input_tokens" => Key::CacheCreationInputTokens,
                    "cache_read_input_tokens" => Key::CacheReadInputTokens,
                    "prompt_tokens_details" => Key::PromptTokensDetails,
                    "input_tokens_details" => Key::InputTokensDetails,
                    "completion_tokens_details" => Key::CompletionTokensDetails,
                    "output_tokens_details" => Key::OutputTokensDetails,
                    "cached_tokens" => Key::CachedTokens,
                    "reasoning_tokens" => Key::ReasoningTokens,
                    "thinking_tokens" => Key::ThinkingTokens,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

/// Skips whatever is left of a map or sequence the readers do not look into.
fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Implements the visitor methods of a type that reads any JSON value and answers
/// `$absent` for every kind of value it does not look into (objects are handled by each
/// type itself; with `numbers`, numbers are absent too).
macro_rules! lenient_visitor {
    ($ty:ty, $absent:expr, numbers) => {
        lenient_visitor!($ty, $absent);
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($absent)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($absent)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($absent)
        }
    };
    ($ty:ty, $absent:expr) => {
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            <$ty>::deserialize(d)
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($absent)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($absent)
        }
        fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Self::Value, E> {
            Ok($absent)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($absent)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($absent)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            drain_seq(seq)?;
            Ok($absent)
        }
    };
}

impl<'de> Deserialize<'de> for UsageObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UsageObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a usage object")
            }
            lenient_visitor!(UsageObject, UsageObject(None), numbers);
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UsageObject, A::Error> {
                let mut u = UsageFields::default();
                while let Some(key) = map.next_key::<Key>()? {
                    let count = |map: &mut A| map.next_value::<Count>().map(|c| c.0);
                    let details = |map: &mut A| map.next_value::<Details>();
                    match key {
                        Key::PromptTokens => u.prompt_tokens = count(&mut map)?,
                        Key::InputTokens => u.input_tokens = count(&mut map)?,
                        Key::CompletionTokens => u.completion_tokens = count(&mut map)?,
                        Key::OutputTokens => u.output_tokens = count(&mut map)?,
                        Key::TotalTokens => u.total_tokens = count(&mut map)?,
                        Key::PromptCacheHitTokens => u.prompt_cache_hit_tokens = count(&mut map)?,
                        Key::CacheCreationInputTokens => {
                            u.cache_creation_input_tokens = count(&mut map)?
                        }
                        Key::CacheReadInputTokens => u.cache_read_input_tokens = count(&mut map)?,
                        Key::PromptTokensDetails => u.prompt_tokens_details = details(&mut map)?,
                        Key::InputTokensDetails => u.input_tokens_details = details(&mut map)?,
                        Key::CompletionTokensDetails => {
                            u.completion_tokens_details = details(&mut map)?
                        }
                        Key::OutputTokensDetails => u.output_tokens_details = details(&mut map)?,
                        Key::CachedTokens
                        | Key::ReasoningTokens
                        | Key::ThinkingTokens
                        | Key::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(UsageObject(Some(u)))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Details {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const PRESENT: Details = Details {
            present: true,
            cached_tokens: None,
            reasoning_tokens: None,
            thinking_tokens: None,
        };
        impl<'de> Visitor<'de> for V {
            type Value = Details;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a usage details object")
            }
            lenient_visitor!(Details, PRESENT, numbers);
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Details, A::Error> {
                let mut out = PRESENT;
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::CachedTokens => out.cached_tokens = map.next_value::<Count>()?.0,
                        Key::ReasoningTokens => out.reasoning_tokens = map.next_value::<Count>()?.0,
                        Key::ThinkingTokens => out.thinking_tokens = map.next_value::<Count>()?.0,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

/// A token count, read leniently: non-negative integers, and floats with no fraction
/// (some OpenAI-compatible servers emit `12.0`). `null`, negatives, strings and anything
/// else count as absent rather than failing the whole usage object.
struct Count(Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a token count")
            }
            lenient_visitor!(Count, Count(None));
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Count, E> {
                Ok(Count(Some(n)))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Count, E> {
                Ok(Count(u64::try_from(n).ok()))
            }
            fn visit_f64<E: de::Error>(self, f: f64) -> Result<Count, E> {
                Ok(Count(whole_f64(f)))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Count, A::Error> {
                drain_map(map)?;
                Ok(Count(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// `f` as a count when it is a non-negative whole number that fits in `u64`.
fn whole_f64(f: f64) -> Option<u64> {
    // 2^64 as f64; anything at or above it does not fit.
    const U64_LIMIT: f64 = 18_446_744_073_709_551_616.0;
    if f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f < U64_LIMIT {
        // Exact: `f` is a non-negative integer below 2^64.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        return Some(f as u64);
    }
    None
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
    /// Anthropic's fields of a raw `usage` member; `None` when it is not an object or
    /// carries none of them.
    pub(crate) fn from_raw(raw: &RawValue) -> Option<AnthropicUsage> {
        let usage = serde_json::from_str::<UsageObject>(raw.get())
            .ok()?
            .0?
            .anthropic();
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

/// A count in a Gemini `usageMetadata` map, read as leniently as [`Count`].
fn count(obj: &serde_json::Map<String, Value>, key: &str) -> Option<u64> {
    let n = obj.get(key)?.as_number()?;
    n.as_u64().or_else(|| whole_f64(n.as_f64()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(api: Api, json: &str) -> Option<Usage> {
        let parsed = usage_from_body(api, json.as_bytes());
        assert_eq!(
            usage_from_scan(api, json.as_bytes()),
            parsed,
            "scan: {json}"
        );
        assert_eq!(
            usage_from_complete_body(api, json.as_bytes()),
            parsed,
            "from the end: {json}"
        );
        parsed
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

    /// The reading rules stated over a `serde_json::Value` map, as the readers were first
    /// written: the oracle the one-pass readers must agree with.
    mod reference {
        use super::super::{count, Usage};
        use crate::api::Api;
        use serde_json::{Map, Value};

        fn nested(parent: Option<&Value>, key: &str) -> Option<u64> {
            parent
                .and_then(Value::as_object)
                .and_then(|o| count(o, key))
        }

        pub fn usage(api: Api, body: &[u8]) -> Option<Usage> {
            let v: Value = serde_json::from_slice(body).ok()?;
            let obj = v.as_object()?.get("usage")?.as_object()?;
            match api {
                Api::Messages => anthropic(obj),
                _ => openai(obj),
            }
        }

        fn openai(obj: &Map<String, Value>) -> Option<Usage> {
            let input = count(obj, "prompt_tokens").or_else(|| count(obj, "input_tokens"));
            let output = count(obj, "completion_tokens").or_else(|| count(obj, "output_tokens"));
            let total = count(obj, "total_tokens");
            if input.is_none() && output.is_none() && total.is_none() {
                return None;
            }
            let idet = obj
                .get("prompt_tokens_details")
                .or_else(|| obj.get("input_tokens_details"));
            let odet = obj
                .get("completion_tokens_details")
                .or_else(|| obj.get("output_tokens_details"));
            let (input, output) = (input.unwrap_or(0), output.unwrap_or(0));
            Some(Usage {
                input_tokens: input,
                output_tokens: output,
                cached_input_tokens: nested(idet, "cached_tokens")
                    .or_else(|| count(obj, "prompt_cache_hit_tokens"))
                    .unwrap_or(0),
                cache_creation_input_tokens: 0,
                reasoning_tokens: nested(odet, "reasoning_tokens").unwrap_or(0),
                total_tokens: total.unwrap_or_else(|| input.saturating_add(output)),
            })
        }

        fn anthropic(obj: &Map<String, Value>) -> Option<Usage> {
            let i = count(obj, "input_tokens");
            let c = count(obj, "cache_creation_input_tokens");
            let r = count(obj, "cache_read_input_tokens");
            let o = count(obj, "output_tokens");
            let t = nested(obj.get("output_tokens_details"), "thinking_tokens");
            if [i, c, r, o, t].iter().all(Option::is_none) {
                return None;
            }
            let (c, r) = (c.unwrap_or(0), r.unwrap_or(0));
            let input = i.unwrap_or(0).saturating_add(c).saturating_add(r);
            let output = o.unwrap_or(0);
            Some(Usage {
                input_tokens: input,
                output_tokens: output,
                cached_input_tokens: r,
                cache_creation_input_tokens: c,
                reasoning_tokens: t.unwrap_or(0),
                total_tokens: input.saturating_add(output),
            })
        }
    }

    #[test]
    fn odd_shapes_read_as_the_map_reading_does() {
        for (api, json) in [
            (
                Api::Chat,
                r#"{"usage":{"prompt_tokens":1,"prompt_tokens":"x","completion_tokens":2}}"#,
            ),
            (
                Api::Chat,
                r#"{"usage":{"prompt_tokens":"x","prompt_tokens":7}}"#,
            ),
            (
                Api::Chat,
                r#"{"usage":{"prompt_tokens":3,"prompt_tokens_details":null,"input_tokens_details":{"cached_tokens":2},"prompt_cache_hit_tokens":1}}"#,
            ),
            (
                Api::Chat,
                r#"{"usage":{"prompt_tokens":3,"input_tokens_details":{"cached_tokens":2}}}"#,
            ),
            (
                Api::Chat,
                r#"{"usage":{"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":2},"prompt_tokens_details":[1]}}"#,
            ),
            (
                Api::Chat,
                r#"{"usage":{"total_tokens":{"a":[1,{"b":2}]},"completion_tokens":[1,2],"prompt_tokens":true}}"#,
            ),
            (
                Api::Chat,
                r#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":18446744073709551616}}"#,
            ),
            (
                Api::Chat,
                r#"{"usage":{"prompt_tokens":1e2,"completion_tokens":-0.0,"total_tokens":2.5}}"#,
            ),
            (
                Api::Chat,
                r#"{"usa\u0067e":{"prompt_tokens":4},"x":{"usage":{"prompt_tokens":9}}}"#,
            ),
            (Api::Chat, r#"{"usage":{"prompt\u005ftokens":4}}"#),
            (
                Api::Messages,
                r#"{"usage":{"output_tokens_details":{"thinking_tokens":5}}}"#,
            ),
            (
                Api::Messages,
                r#"{"usage":{"output_tokens_details":{"thinking_tokens":null}}}"#,
            ),
            (
                Api::Messages,
                r#"{"usage":{"input_tokens":-1,"output_tokens":2}}"#,
            ),
            (
                Api::Messages,
                r#"{"usage":{"cache_read_input_tokens":18446744073709551615,"input_tokens":5}}"#,
            ),
            (
                Api::Responses,
                r#"{"usage":{"input_tokens":1,"output_tokens_details":{"reasoning_tokens":3},"completion_tokens_details":null}}"#,
            ),
            (Api::Chat, r#"{"usage":{"prompt_tokens":1}} trailing"#),
            (
                Api::Chat,
                r#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#,
            ),
        ] {
            let want = if json.contains("\"usage\":{\"prompt_tokens\":1},\"usage\"") {
                // A repeated top-level `usage` is refused by both the struct reader and
                // as a matter of principle (which one would be the bill?).
                None
            } else {
                reference::usage(api, json.as_bytes())
            };
            assert_eq!(body(api, json), want, "{json}");
        }
    }

    mod agreement {
        use super::reference;
        use crate::api::Api;
        use proptest::prelude::*;

        fn count_value() -> impl Strategy<Value = String> {
            prop_oneof![
                (0u64..100_000).prop_map(|n| n.to_string()),
                any::<u64>().prop_map(|n| n.to_string()),
                (-1000i64..0).prop_map(|n| n.to_string()),
                (0u32..1000).prop_map(|n| format!("{n}.0")),
                (0u32..1000).prop_map(|n| format!("{n}.5")),
                Just("1e30".to_string()),
                Just("null".to_string()),
                Just("true".to_string()),
                Just("\"12\"".to_string()),
                Just("[1,2]".to_string()),
                Just("{\"cached_tokens\":3}".to_string()),
            ]
        }

        const COUNT_KEYS: [&str; 11] = [
            "prompt_tokens",
            "input_tokens",
            "completion_tokens",
            "output_tokens",
            "total_tokens",
            "prompt_cache_hit_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "cached_tokens",
            "service_tier",
            "reasoning_tokens",
        ];
        const DETAIL_KEYS: [&str; 4] = [
            "prompt_tokens_details",
            "input_tokens_details",
            "completion_tokens_details",
            "output_tokens_details",
        ];
        const INNER_KEYS: [&str; 4] = [
            "cached_tokens",
            "reasoning_tokens",
            "thinking_tokens",
            "audio_tokens",
        ];

        fn object(keys: &'static [&'static str], max: usize) -> impl Strategy<Value = String> {
            prop::collection::vec((prop::sample::select(keys), count_value()), 0..max).prop_map(
                |entries| {
                    let body: Vec<String> = entries
                        .iter()
                        .map(|(k, v)| format!("\"{k}\":{v}"))
                        .collect();
                    format!("{{{}}}", body.join(","))
                },
            )
        }

        fn detail_value() -> impl Strategy<Value = String> {
            prop_oneof![
                3 => object(&INNER_KEYS, 4),
                1 => count_value(),
            ]
        }

        fn usage_object() -> impl Strategy<Value = String> {
            (
                prop::collection::vec((prop::sample::select(&COUNT_KEYS[..]), count_value()), 0..8),
                prop::collection::vec(
                    (prop::sample::select(&DETAIL_KEYS[..]), detail_value()),
                    0..6,
                ),
                any::<u64>(),
            )
                .prop_map(|(counts, details, shuffle)| {
                    let mut entries: Vec<String> = counts
                        .iter()
                        .chain(details.iter())
                        .map(|(k, v)| format!("\"{k}\":{v}"))
                        .collect();
                    let n = entries.len().max(1);
                    entries.rotate_left(usize::try_from(shuffle).unwrap_or(0) % n);
                    format!("{{{}}}", entries.join(","))
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2048))]
            #[test]
            fn one_pass_reader_agrees_with_the_map_reading(usage in usage_object(), before in any::<bool>()) {
                let body = if before {
                    format!("{{\"usage\":{usage},\"choices\":[{{\"text\":\"hi\"}}]}}")
                } else {
                    format!("{{\"id\":\"x\",\"usage\":{usage}}}")
                };
                for api in [Api::Chat, Api::Responses, Api::Messages] {
                    prop_assert_eq!(
                        super::super::usage_from_body(api, body.as_bytes()),
                        reference::usage(api, body.as_bytes()),
                        "{:?} {}", api, body
                    );
                    let value: serde_json::Value = serde_json::from_str(&usage).unwrap();
                    prop_assert_eq!(
                        super::super::usage_from_value(api, &value),
                        reference::usage(api, body.as_bytes()),
                        "value {:?} {}", api, usage
                    );
                }
            }
        }
    }

    /// The scan that finds the top-level `usage` must agree with a full parse on every
    /// valid body, whatever nests where, and on every truncation of one.
    mod scan_agreement {
        use crate::api::Api;
        use proptest::prelude::*;
        use serde_json::{Map, Value};

        const KEYS: [&str; 7] = ["usage", "choices", "data", "id", "u\"sage", "usage\\", "x"];

        fn leaf() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                (0u32..1000).prop_map(|n| Value::from(f64::from(n) + 0.5)),
                prop::sample::select(vec![
                    "",
                    "usage",
                    "\"usage\":{\"prompt_tokens\":9}",
                    "a \\\" b",
                    "}]{[",
                    "\\",
                    "é \u{1F600}",
                ])
                .prop_map(|s| Value::from(s.to_owned())),
            ]
        }

        fn usage_value() -> impl Strategy<Value = Value> {
            prop_oneof![
                (0u64..1000, 0u64..1000).prop_map(|(p, c)| serde_json::json!({
                    "prompt_tokens": p, "completion_tokens": c, "input_tokens": p,
                    "output_tokens": c, "completion_tokens_details": {"reasoning_tokens": 1}
                })),
                Just(Value::Null),
                Just(serde_json::json!([1, 2])),
            ]
        }

        fn value() -> impl Strategy<Value = Value> {
            leaf().prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                    prop::collection::vec(
                        (
                            prop::sample::select(&KEYS[..]),
                            prop_oneof![inner, usage_value()]
                        ),
                        0..6,
                    )
                    .prop_map(|entries| {
                        Value::Object(
                            entries
                                .into_iter()
                                .map(|(k, v)| (k.to_owned(), v))
                                .collect::<Map<String, Value>>(),
                        )
                    }),
                ]
            })
        }

        fn body() -> impl Strategy<Value = Value> {
            (
                prop::collection::vec((prop::sample::select(&KEYS[..]), value()), 0..6),
                prop::option::of(usage_value()),
            )
                .prop_map(|(entries, usage)| {
                    let mut map: Map<String, Value> = entries
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect();
                    if let Some(u) = usage {
                        map.insert("usage".to_owned(), u);
                    }
                    Value::Object(map)
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]
            #[test]
            fn the_scan_agrees_with_a_full_parse(
                v in body(),
                pretty in any::<bool>(),
                cut in any::<prop::sample::Index>(),
                flip in any::<prop::sample::Index>(),
            ) {
                let text = if pretty {
                    serde_json::to_string_pretty(&v).unwrap()
                } else {
                    serde_json::to_string(&v).unwrap()
                };
                let bytes = text.as_bytes();
                for api in [Api::Chat, Api::Messages] {
                    prop_assert_eq!(
                        super::super::usage_from_scan(api, bytes),
                        super::super::usage_from_parsed_body(api, bytes),
                        "{}", text
                    );
                    prop_assert_eq!(
                        super::super::usage_from_complete_body(api, bytes),
                        super::super::usage_from_parsed_body(api, bytes),
                        "from the end: {}", text
                    );
                    let prefix = &bytes[..cut.index(bytes.len())];
                    prop_assert_eq!(
                        super::super::usage_from_scan(api, prefix),
                        super::super::usage_from_parsed_body(api, prefix),
                        "prefix of {}", text
                    );
                    // A corrupted body: whatever a full parse still reads, the scan reads too.
                    let mut broken = bytes.to_vec();
                    let at = flip.index(broken.len());
                    const NOISE: &[u8] = b"{}[]\",: 1\\";
                    broken[at] = NOISE[at % NOISE.len()];
                    let full = super::super::usage_from_parsed_body(api, &broken);
                    if full.is_some() {
                        prop_assert_eq!(super::super::usage_from_scan(api, &broken), full);
                        prop_assert_eq!(
                            super::super::usage_from_complete_body(api, &broken),
                            full
                        );
                    }
                }
            }
        }
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
