//! Request rewriting: make streamed chat/completions calls report their usage.
//!
//! OpenAI-compatible servers only send usage on a stream when the request carries
//! `stream_options.include_usage: true`. Without it the gateway could only estimate what
//! the call cost, so it adds the option and, when the client had not asked for it, the
//! stream meter strips the resulting usage-only chunk before the client sees it.
//!
//! The body is re-emitted from its own bytes: every member other than `stream_options` is
//! copied verbatim (values through `RawValue`, so numbers keep their exact spelling),
//! members keep their order, and only insignificant whitespace between top-level members
//! is lost. This does not need serde_json's `preserve_order` feature.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::api::Api;

/// Returns a rewritten body with `stream_options.include_usage = true` when `body` is a
/// streaming chat/completions request that does not already ask for usage, else `None`.
///
/// `None` also when the body cannot be read as a JSON object, has a duplicate top-level
/// key, or has a non-object `stream_options`: such bodies are refused by
/// [`crate::inspect_request`] first, or by the upstream, and are never worth touching.
/// An explicit `include_usage: false` is overridden; the meter hides the usage chunk.
pub fn ensure_stream_usage(api: Api, body: &[u8]) -> Option<Vec<u8>> {
    if !api.has_usage_chunk() {
        return None;
    }
    let members = object_members(body)?;
    if !members
        .iter()
        .any(|(k, v)| k == "stream" && v.get() == "true")
    {
        return None;
    }
    let options = members.iter().find(|(k, _)| k == "stream_options");
    let new_options = match options {
        None => "{\"include_usage\":true}".to_owned(),
        Some((_, raw)) if raw.get() == "null" => "{\"include_usage\":true}".to_owned(),
        Some((_, raw)) => {
            let inner = object_members(raw.get().as_bytes())?;
            if inner
                .iter()
                .any(|(k, v)| k == "include_usage" && v.get() == "true")
            {
                return None;
            }
            let mut fields = vec![("include_usage".to_owned(), "true")];
            fields.extend(
                inner
                    .iter()
                    .filter(|(k, _)| k != "include_usage")
                    .map(|(k, v)| (k.clone(), v.get())),
            );
            write_object(fields.iter().map(|(k, v)| (k.as_str(), *v)))
        }
    };

    let mut out: Vec<(&str, &str)> = members
        .iter()
        .map(|(k, v)| {
            if k == "stream_options" {
                (k.as_str(), new_options.as_str())
            } else {
                (k.as_str(), v.get())
            }
        })
        .collect();
    if options.is_none() {
        out.push(("stream_options", new_options.as_str()));
    }
    Some(write_object(out.into_iter()).into_bytes())
}

/// An object's members in document order, values as raw JSON. `None` when the bytes are
/// not one JSON object or repeat a key.
fn object_members(bytes: &[u8]) -> Option<Vec<(String, &RawValue)>> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let members = de.deserialize_map(MembersVisitor).ok()?;
    de.end().ok()?;
    let mut keys: Vec<&str> = members.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort_unstable();
    if keys.windows(2).any(|w| w.first() == w.get(1)) {
        return None;
    }
    Some(members)
}

struct MembersVisitor;

impl<'de> Visitor<'de> for MembersVisitor {
    type Value = Vec<(String, &'de RawValue)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::new();
        while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
            members.push(entry);
        }
        Ok(members)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom("not an object"))
    }
}

fn write_object<'a>(members: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::from("{");
    for (i, (key, raw)) in members.enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Serialising a `&str` cannot fail; fall back to an empty key rather than panic.
        out.push_str(&serde_json::to_string(key).unwrap_or_else(|_| "\"\"".to_owned()));
        out.push(':');
        out.push_str(raw);
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(api: Api, json: &str) -> Option<String> {
        ensure_stream_usage(api, json.as_bytes()).map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn adds_stream_options_at_the_end() {
        assert_eq!(
            rewrite(
                Api::Chat,
                r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#
            )
            .as_deref(),
            Some(
                r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true}}"#
            )
        );
    }

    #[test]
    fn keeps_other_options_order_and_exact_values() {
        let body = r#"{ "z": 1.0e0, "stream" : true, "stream_options": {"continuous_usage_stats": true, "include_usage": false}, "a": 12345678901234567890123 }"#;
        assert_eq!(
            rewrite(Api::Completions, body).as_deref(),
            Some(
                r#"{"z":1.0e0,"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true},"a":12345678901234567890123}"#
            )
        );
    }

    #[test]
    fn null_options_replaced() {
        assert_eq!(
            rewrite(Api::Chat, r#"{"stream":true,"stream_options":null}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#)
        );
    }

    #[test]
    fn no_rewrite_needed_or_possible() {
        assert_eq!(
            rewrite(
                Api::Chat,
                r#"{"stream":true,"stream_options":{"include_usage":true}}"#
            ),
            None
        );
        assert_eq!(rewrite(Api::Chat, r#"{"stream":false}"#), None);
        assert_eq!(rewrite(Api::Chat, r#"{"model":"m"}"#), None);
        assert_eq!(rewrite(Api::Chat, r#"{"stream":"true"}"#), None);
        assert_eq!(rewrite(Api::Responses, r#"{"stream":true}"#), None);
        assert_eq!(rewrite(Api::Messages, r#"{"stream":true}"#), None);
        assert_eq!(rewrite(Api::Embeddings, r#"{"stream":true}"#), None);
        assert_eq!(
            rewrite(Api::Chat, r#"{"stream":true,"stream_options":"x"}"#),
            None
        );
        assert_eq!(
            rewrite(Api::Chat, r#"{"stream":true,"stream":false}"#),
            None
        );
        assert_eq!(rewrite(Api::Chat, r#"[{"stream":true}]"#), None);
        assert_eq!(rewrite(Api::Chat, r#"{"stream":true} trailing"#), None);
        assert_eq!(rewrite(Api::Chat, ""), None);
    }

    #[test]
    fn rewritten_body_means_the_same_plus_the_option() {
        let body = r#"{"model":"gpt","stream":true,"messages":[{"role":"user","content":"\u00e9\"q\""}],"temperature":0.2}"#;
        let out = rewrite(Api::Chat, body).unwrap();
        let mut expected: serde_json::Value = serde_json::from_str(body).unwrap();
        expected["stream_options"] = serde_json::json!({"include_usage": true});
        let got: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(got, expected);
        // And the meter-side request reader sees it.
        let r = crate::inspect_request(Api::Chat, out.as_bytes()).unwrap();
        assert_eq!(r.include_usage, Some(true));
    }
}
