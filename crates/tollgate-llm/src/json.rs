//! JSON parsing that refuses duplicate object keys.
//!
//! RFC 8259 leaves duplicate keys undefined: serde_json keeps the last value, Python the
//! last, some Go and JavaScript decoders the first. A gateway that reads `max_tokens`
//! with one rule while the upstream reads it with another can be made to admit a request
//! it would have refused, so bodies with a duplicate key anywhere are rejected outright.
//!
//! The check happens while the value is built (a `DeserializeSeed` whose map visitor
//! looks up each key before parsing its value), so it costs one map lookup per key, and
//! the path to the offending key is assembled only on the error path, as the error
//! unwinds through the enclosing containers.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// A duplicate key and where it was found, e.g. `key = "model"`, `path = "$.messages[1]"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DuplicateKey {
    pub(crate) key: String,
    pub(crate) path: String,
}

/// Why [`parse_unique`] failed.
#[derive(Debug)]
pub(crate) enum ParseError {
    Duplicate(DuplicateKey),
    Syntax(serde_json::Error),
}

/// Parses one JSON value from `bytes` (trailing whitespace only), refusing duplicate keys
/// at any depth. serde_json's recursion limit (128) still applies, so hostile nesting is
/// an error, not a stack overflow.
pub(crate) fn parse_unique(bytes: &[u8]) -> Result<Value, ParseError> {
    let mut trace = DupTrace::default();
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = ValueSeed { trace: &mut trace }.deserialize(&mut de);
    let value = match parsed {
        Ok(v) => v,
        Err(e) => {
            return Err(match trace.take() {
                Some(dup) => ParseError::Duplicate(dup),
                None => ParseError::Syntax(e),
            })
        }
    };
    de.end().map_err(ParseError::Syntax)?;
    Ok(value)
}

enum Segment {
    Key(String),
    Index(usize),
}

/// Side channel for the duplicate found, since serde errors can only carry a message.
#[derive(Default)]
struct DupTrace {
    key: Option<String>,
    /// Innermost first, pushed while unwinding.
    path: Vec<Segment>,
}

impl DupTrace {
    fn unwind(&mut self, segment: Segment) {
        if self.key.is_some() {
            self.path.push(segment);
        }
    }

    fn take(&mut self) -> Option<DuplicateKey> {
        let key = self.key.take()?;
        let mut path = String::from("$");
        for segment in self.path.iter().rev() {
            match segment {
                Segment::Key(k) => {
                    path.push('.');
                    path.push_str(k);
                }
                Segment::Index(i) => {
                    path.push('[');
                    path.push_str(&i.to_string());
                    path.push(']');
                }
            }
        }
        Some(DuplicateKey { key, path })
    }
}

struct ValueSeed<'t> {
    trace: &'t mut DupTrace,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON cannot spell NaN or infinity, so this is always `Some`.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        loop {
            let index = items.len();
            match seq.next_element_seed(ValueSeed {
                trace: &mut *self.trace,
            }) {
                Ok(Some(item)) => items.push(item),
                Ok(None) => return Ok(Value::Array(items)),
                Err(e) => {
                    self.trace.unwind(Segment::Index(index));
                    return Err(e);
                }
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                let message = format!("duplicate key {key:?}");
                self.trace.key = Some(key);
                return Err(de::Error::custom(message));
            }
            match map.next_value_seed(ValueSeed {
                trace: &mut *self.trace,
            }) {
                Ok(value) => {
                    object.insert(key, value);
                }
                Err(e) => {
                    self.trace.unwind(Segment::Key(key));
                    return Err(e);
                }
            }
        }
        Ok(Value::Object(object))
    }
}

/// Where a top-level member of a JSON object is, as [`top_level_member`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Member {
    /// The member's value starts at this offset (after the `:`; whitespace may lead).
    At(usize),
    /// The body is one object, balanced, and has no such member.
    Absent,
    /// Not decided here: not an object, unbalanced or truncated, the key given twice, or
    /// a top-level key spelled with escapes. The caller parses the body in full instead.
    Unsure,
}

/// Finds the value of the top-level member `key` of the JSON object in `bytes` without
/// parsing the rest. It stops only at quotes and braces (`memchr3`, so whitespace,
/// numbers and brackets pass at vector speed) and skips each string to its closing quote
/// (`memchr2`), tracking how many objects are open. A quoted `key` followed by `:` is a
/// member name (inside a string its quotes would be escaped) of the innermost open
/// object, so with one object open it is a top-level member; arrays do not change whose
/// member a name is, so brackets need no tracking. Numbers, literals and brackets are not
/// checked: a body broken elsewhere but balanced in braces can still yield its member.
/// Everything this cannot decide for certain is [`Member::Unsure`].
pub(crate) fn top_level_member(bytes: &[u8], key: &[u8]) -> Member {
    // Offset of the first non-whitespace byte at or after `from`.
    let past_whitespace = |from: usize| bytes.len() - bytes[from..].trim_ascii_start().len();
    let open = past_whitespace(0);
    if bytes.get(open) != Some(&b'{') {
        return Member::Unsure;
    }
    let mut depth = 1usize;
    let mut found = None;
    let mut i = open + 1;
    loop {
        let Some(off) = bytes
            .get(i..)
            .and_then(|rest| memchr::memchr3(b'"', b'{', b'}', rest))
        else {
            return Member::Unsure;
        };
        i += off;
        match bytes[i] {
            b'"' => {
                let start = i + 1;
                let Some(end) = string_end(bytes, start) else {
                    return Member::Unsure;
                };
                i = end + 1;
                if depth != 1 {
                    continue;
                }
                let colon = past_whitespace(i);
                if bytes.get(colon) != Some(&b':') {
                    continue;
                }
                let name = &bytes[start..end];
                if name.contains(&b'\\') {
                    return Member::Unsure;
                }
                if name == key {
                    if found.is_some() {
                        return Member::Unsure;
                    }
                    found = Some(colon + 1);
                }
                i = colon + 1;
            }
            b'{' => {
                depth += 1;
                i += 1;
            }
            _ => {
                depth -= 1;
                i += 1;
                if depth == 0 {
                    break;
                }
            }
        }
    }
    if past_whitespace(i) == bytes.len() {
        found.map_or(Member::Absent, Member::At)
    } else {
        Member::Unsure
    }
}

/// The offset of the quote closing the string whose contents start at `from`.
fn string_end(bytes: &[u8], mut from: usize) -> Option<usize> {
    loop {
        let at = from + memchr::memchr2(b'"', b'\\', bytes.get(from..)?)?;
        if bytes[at] == b'"' {
            return Some(at);
        }
        from = at + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dup(json: &str) -> Option<DuplicateKey> {
        match parse_unique(json.as_bytes()) {
            Err(ParseError::Duplicate(d)) => Some(d),
            _ => None,
        }
    }

    #[test]
    fn finds_only_a_top_level_member() {
        let at = |json: &str| top_level_member(json.as_bytes(), b"usage");
        let body = r#"{"id":"x", "usage" :{"a":1}}"#;
        assert_eq!(at(body), Member::At(body.find(":{").unwrap() + 1));
        assert_eq!(at("\n {\"usage\":null}\n"), Member::At(11));
        // Nested, or only inside strings: not the body's usage.
        for json in [
            r#"{"x":{"usage":{"a":1}}}"#,
            r#"{"x":[{"usage":1}],"y":"\"usage\":{"}"#,
            r#"{"text":"usage","usages":1}"#,
            r#"{"a":"}}]]\\","b":"{\"usage\":1}"}"#,
            "{}",
        ] {
            assert_eq!(at(json), Member::Absent, "{json}");
        }
        // What a full parse must decide.
        for json in [
            r#"{"usage":1,"usage":2}"#,
            r#"{"usa\u0067e":1}"#,
            r#"[{"usage":1}]"#,
            r#"{"usage":{"a":1}"#,
            r#"{"usage":"open"#,
            r#"{"usage":1} x"#,
            r#"{"usage":1}}"#,
            "",
            "   ",
        ] {
            assert_eq!(at(json), Member::Unsure, "{json}");
        }
    }

    #[test]
    fn parses_like_serde_json() {
        let text =
            r#"{"a":[1,-2,3.5,"x",null,true,{"b":{}}],"c":"\u00e9\n","big":18446744073709551615}"#;
        let ours = parse_unique(text.as_bytes()).ok();
        let theirs: Value = serde_json::from_str(text).unwrap();
        assert_eq!(ours, Some(theirs));
    }

    #[test]
    fn top_level_duplicate() {
        let d = dup(r#"{"model":"a","stream":true,"model":"b"}"#).unwrap();
        assert_eq!(d.key, "model");
        assert_eq!(d.path, "$");
    }

    #[test]
    fn nested_duplicate_in_array_has_path() {
        let d = dup(r#"{"messages":[{"role":"user","content":"x"},{"role":"user","content":[{"type":"text","text":"a","text":"b"}]}]}"#)
            .unwrap();
        assert_eq!(d.key, "text");
        assert_eq!(d.path, "$.messages[1].content[0]");
    }

    #[test]
    fn escaped_spelling_of_the_same_key_is_a_duplicate() {
        // "\u006dodel" decodes to "model": an upstream would see two `model`s.
        let d = dup(r#"{"model":"a","\u006dodel":"b"}"#).unwrap();
        assert_eq!(d.key, "model");
    }

    #[test]
    fn same_key_in_sibling_objects_is_fine() {
        assert!(parse_unique(br#"{"a":{"x":1},"b":{"x":1},"c":[{"x":1},{"x":2}]}"#).is_ok());
    }

    #[test]
    fn syntax_errors_and_trailing_garbage() {
        assert!(matches!(
            parse_unique(b"{\"a\":1"),
            Err(ParseError::Syntax(_))
        ));
        assert!(matches!(
            parse_unique(b"{\"a\":1} x"),
            Err(ParseError::Syntax(_))
        ));
        assert!(matches!(
            parse_unique(b"{\"a\":1}{}"),
            Err(ParseError::Syntax(_))
        ));
        assert!(parse_unique(b" {\"a\":1} \n").is_ok());
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = "[".repeat(100_000);
        assert!(matches!(
            parse_unique(deep.as_bytes()),
            Err(ParseError::Syntax(_))
        ));
    }

    #[test]
    fn syntax_error_after_duplicate_free_prefix_is_syntax() {
        // The trace must not report a duplicate for an ordinary error inside a nested value.
        assert!(matches!(
            parse_unique(br#"{"a":{"b":[1,2,}]}}"#),
            Err(ParseError::Syntax(_))
        ));
    }
}
