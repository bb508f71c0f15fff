//! Borrowing views of the response JSON the meter reads, for the per-chunk hot path.
//!
//! Only the fields the meter needs are declared; serde skips the rest without building
//! them. Generated text is never copied: [`TextTokens`] estimates a string's tokens while
//! the parser hands it over. Anything that does not fit these shapes falls back to a
//! `serde_json::Value` walk (see `meter`), so an odd type in one field costs speed, not
//! correctness.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::estimate::estimate_output_tokens;

/// Estimated tokens of a JSON string (0 for `null`), computed without allocating.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TextTokens(pub(crate) u64);

impl<'de> Deserialize<'de> for TextTokens {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TextTokens;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or null")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<TextTokens, E> {
                Ok(TextTokens(estimate_output_tokens(s)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<TextTokens, E> {
                Ok(TextTokens(0))
            }
        }
        d.deserialize_any(V)
    }
}

/// A string borrowed from the input when it has no escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BStr<'a>(pub(crate) Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for BStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<BStr<'de>, E> {
                Ok(BStr(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<BStr<'de>, E> {
                Ok(BStr(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// An OpenAI chat/completions stream chunk.
#[derive(Deserialize)]
pub(crate) struct ChatChunk<'a> {
    #[serde(borrow, default)]
    pub(crate) id: Option<BStr<'a>>,
    #[serde(borrow, default)]
    pub(crate) model: Option<BStr<'a>>,
    #[serde(borrow, default)]
    pub(crate) created: Option<&'a RawValue>,
    #[serde(default)]
    pub(crate) choices: Option<Vec<ChatChoice>>,
    #[serde(borrow, default)]
    pub(crate) usage: Option<&'a RawValue>,
}

#[derive(Deserialize)]
pub(crate) struct ChatChoice {
    #[serde(default)]
    pub(crate) index: Option<u64>,
    #[serde(default)]
    pub(crate) delta: Option<ChatDelta>,
    /// Legacy completions put generated text here.
    #[serde(default)]
    pub(crate) text: Option<TextTokens>,
}

#[derive(Deserialize)]
pub(crate) struct ChatDelta {
    #[serde(default)]
    pub(crate) content: Option<TextTokens>,
    /// DeepSeek and vLLM reasoning parsers.
    #[serde(default)]
    pub(crate) reasoning_content: Option<TextTokens>,
    /// OpenRouter, newer vLLM.
    #[serde(default)]
    pub(crate) reasoning: Option<TextTokens>,
    #[serde(default)]
    pub(crate) refusal: Option<TextTokens>,
    #[serde(default)]
    pub(crate) tool_calls: Option<Vec<ToolCallDelta>>,
    #[serde(default)]
    pub(crate) function_call: Option<FunctionDelta>,
}

#[derive(Deserialize)]
pub(crate) struct ToolCallDelta {
    #[serde(default)]
    pub(crate) function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
pub(crate) struct FunctionDelta {
    #[serde(default)]
    pub(crate) name: Option<TextTokens>,
    #[serde(default)]
    pub(crate) arguments: Option<TextTokens>,
}

impl ChatChoice {
    pub(crate) fn output_tokens(&self) -> u64 {
        let mut n = self.text.map_or(0, |t| t.0);
        if let Some(delta) = &self.delta {
            for text in [
                delta.content,
                delta.reasoning_content,
                delta.reasoning,
                delta.refusal,
            ]
            .into_iter()
            .flatten()
            {
                n = n.saturating_add(text.0);
            }
            let calls = delta
                .tool_calls
                .iter()
                .flatten()
                .filter_map(|c| c.function.as_ref());
            for f in calls.chain(delta.function_call.as_ref()) {
                n = n
                    .saturating_add(f.name.map_or(0, |t| t.0))
                    .saturating_add(f.arguments.map_or(0, |t| t.0));
            }
        }
        n
    }
}

/// A Responses API stream event.
#[derive(Deserialize)]
pub(crate) struct ResponsesEvent<'a> {
    #[serde(borrow, rename = "type")]
    pub(crate) kind: BStr<'a>,
    #[serde(default)]
    pub(crate) sequence_number: Option<u64>,
    #[serde(borrow, default)]
    pub(crate) delta: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) response: Option<&'a RawValue>,
}

/// The parts of a Responses `response` object the meter keeps.
#[derive(Deserialize)]
pub(crate) struct ResponseHead<'a> {
    #[serde(borrow, default)]
    pub(crate) id: Option<BStr<'a>>,
    #[serde(borrow, default)]
    pub(crate) model: Option<BStr<'a>>,
    #[serde(borrow, default)]
    pub(crate) created_at: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(crate) usage: Option<&'a RawValue>,
}

/// An Anthropic Messages stream event.
#[derive(Deserialize)]
pub(crate) struct MessagesEvent<'a> {
    #[serde(borrow, rename = "type")]
    pub(crate) kind: BStr<'a>,
    #[serde(default)]
    pub(crate) index: Option<u64>,
    #[serde(borrow, default)]
    pub(crate) message: Option<&'a RawValue>,
    #[serde(default)]
    pub(crate) delta: Option<MessagesDelta>,
    #[serde(borrow, default)]
    pub(crate) usage: Option<&'a RawValue>,
}

#[derive(Deserialize)]
pub(crate) struct MessagesDelta {
    #[serde(default)]
    pub(crate) text: Option<TextTokens>,
    #[serde(default)]
    pub(crate) partial_json: Option<TextTokens>,
    #[serde(default)]
    pub(crate) thinking: Option<TextTokens>,
}

impl MessagesDelta {
    pub(crate) fn output_tokens(&self) -> u64 {
        [self.text, self.partial_json, self.thinking]
            .into_iter()
            .flatten()
            .fold(0u64, |n, t| n.saturating_add(t.0))
    }
}

/// `message_start`'s `message` object.
#[derive(Deserialize)]
pub(crate) struct MessageHead<'a> {
    #[serde(borrow, default)]
    pub(crate) id: Option<BStr<'a>>,
    #[serde(borrow, default)]
    pub(crate) model: Option<BStr<'a>>,
    #[serde(borrow, default)]
    pub(crate) usage: Option<&'a RawValue>,
}

/// A raw non-negative integer (`created`, `created_at`), `None` for anything else.
pub(crate) fn raw_to_u64(raw: &RawValue) -> Option<u64> {
    raw.get().parse().ok()
}

/// Estimated tokens of a delta that is normally a string but may be JSON of another
/// shape (MCP argument deltas): strings are decoded, anything else counted as its text.
pub(crate) fn raw_text_tokens(raw: &RawValue) -> u64 {
    serde_json::from_str::<TextTokens>(raw.get())
        .map(|t| t.0)
        .unwrap_or_else(|_| crate::estimate::estimate_bytes(raw.get().as_bytes()))
}

/// Estimated tokens of generated text in a JSON value, for the slow paths (fallback
/// stream parsing and non-streamed bodies): strings under the given keys, recursively
/// through `content`-like containers.
pub(crate) fn value_text_tokens(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::String(s)) => estimate_output_tokens(s),
        Some(Value::Array(items)) => items
            .iter()
            .fold(0u64, |n, item| n.saturating_add(part_tokens(item))),
        _ => 0,
    }
}

/// One content part / output block: the text-bearing members a model generates.
pub(crate) fn part_tokens(part: &Value) -> u64 {
    let Some(obj) = part.as_object() else {
        return value_text_tokens(Some(part));
    };
    let mut n = 0u64;
    for key in ["text", "thinking", "refusal", "arguments", "partial_json"] {
        if let Some(Value::String(s)) = obj.get(key) {
            n = n.saturating_add(estimate_output_tokens(s));
        }
    }
    // Anthropic tool_use blocks carry the generated arguments as a JSON object.
    if obj.get("type").and_then(Value::as_str) == Some("tool_use") {
        if let Some(input) = obj.get("input") {
            n = n.saturating_add(estimate_output_tokens(&input.to_string()));
        }
    }
    for key in ["content", "summary"] {
        if let Some(Value::Array(_)) = obj.get(key) {
            n = n.saturating_add(value_text_tokens(obj.get(key)));
        }
    }
    n
}

/// Generated text of one OpenAI choice, streamed (`delta`) or not (`message`).
pub(crate) fn choice_value_tokens(choice: &Value) -> u64 {
    let mut n = match choice.get("text") {
        Some(Value::String(s)) => estimate_output_tokens(s),
        _ => 0,
    };
    for holder in ["delta", "message"] {
        let Some(msg) = choice.get(holder).and_then(Value::as_object) else {
            continue;
        };
        n = n.saturating_add(value_text_tokens(msg.get("content")));
        for key in ["reasoning_content", "reasoning", "refusal"] {
            if let Some(Value::String(s)) = msg.get(key) {
                n = n.saturating_add(estimate_output_tokens(s));
            }
        }
        let calls = msg
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("function"));
        for f in calls.chain(msg.get("function_call")) {
            for key in ["name", "arguments"] {
                if let Some(Value::String(s)) = f.get(key) {
                    n = n.saturating_add(estimate_output_tokens(s));
                }
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_tokens_from_strings_and_null() {
        let t: TextTokens = serde_json::from_str(r#""hello world""#).unwrap();
        assert_eq!(t, TextTokens(3));
        let t: Option<TextTokens> = serde_json::from_str("null").unwrap();
        assert_eq!(t, None);
        assert!(serde_json::from_str::<TextTokens>("5").is_err());
        // Escapes are decoded before counting: "\u65e5" is one CJK character.
        let t: TextTokens = serde_json::from_str(r#""\u65e5""#).unwrap();
        assert_eq!(t, TextTokens(1));
    }

    #[test]
    fn bstr_borrows_when_unescaped() {
        let s: BStr<'_> = serde_json::from_str(r#""abc""#).unwrap();
        assert!(matches!(s.0, Cow::Borrowed("abc")));
        let s: BStr<'_> = serde_json::from_str(r#""a\nb""#).unwrap();
        assert_eq!(s.0, "a\nb");
    }

    #[test]
    fn chat_choice_counts_every_generated_field() {
        let chunk: ChatChunk<'_> = serde_json::from_str(
            r#"{"choices":[{"index":0,"delta":{"content":"abcd","reasoning_content":"efgh","tool_calls":[{"function":{"name":"f","arguments":"{}"}}]}}],"usage":null}"#,
        )
        .unwrap();
        assert!(chunk.usage.is_none());
        let choices = chunk.choices.unwrap();
        assert_eq!(choices[0].output_tokens(), 4);
        let v: Value = serde_json::from_str(
            r#"{"message":{"content":"abcd","reasoning_content":"efgh","tool_calls":[{"function":{"name":"f","arguments":"{}"}}]}}"#,
        )
        .unwrap();
        assert_eq!(choice_value_tokens(&v), 4);
    }

    #[test]
    fn raw_text_tokens_handles_non_strings() {
        let raw: Box<RawValue> = serde_json::from_str(r#""abcdefgh""#).unwrap();
        assert_eq!(raw_text_tokens(&raw), 2);
        let raw: Box<RawValue> = serde_json::from_str(r#"{"a":1}"#).unwrap();
        assert_eq!(raw_text_tokens(&raw), 2);
    }
}
