//! JSON parsing that refuses duplicate object keys.
//!
//! RFC 8259 leaves duplicate keys undefined: serde_json keeps the last value, Python the
//! last, some Go and JavaScript decoders the first. A gateway that reads `max_tokens`
//! with one rule while the upstream reads it with another can be made to admit a request
//! it would have refused, so bodies with a duplicate key anywhere are rejected outright.
//!
//! The check happens while the value is built (a `DeserializeSeed` whose map visitor
//! looks at the keys already read before parsing the next value), and the path to the
//! offending key is assembled only on the error path, as the error unwinds through the
//! enclosing containers.
//!
//! The value built is a [`Json`], not a `serde_json::Value`: a request body is read once,
//! on every call, and then dropped, so strings without escapes stay slices of the body
//! and an object is the list of its members in the order sent (no string copied per key
//! and per value, no tree map per object).

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Number;

/// A JSON value borrowing its strings from the parsed bytes where it can.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

impl<'a> Json<'a> {
    /// The member `key` of an object (keys are unique: [`parse_unique`] refused others).
    pub(crate) fn get(&self, key: &str) -> Option<&Json<'a>> {
        match self {
            Json::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Number(n) => n.as_u64(),
            _ => None,
        }
    }
}

/// Written back as compact JSON, members in the order they were sent.
impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => serializer.serialize_unit(),
            Json::Bool(b) => serializer.serialize_bool(*b),
            Json::Number(n) => n.serialize(serializer),
            Json::String(s) => serializer.serialize_str(s),
            Json::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Object(members) => {
                let mut map = serializer.serialize_map(Some(members.len()))?;
                for (k, v) in members {
                    map.serialize_entry(k.as_ref(), v)?;
                }
                map.end()
            }
        }
    }
}

impl fmt::Display for Json<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Serializing a tree of strings, numbers and containers cannot fail.
        let text = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

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
pub(crate) fn parse_unique(bytes: &[u8]) -> Result<Json<'_>, ParseError> {
    let mut trace = DupTrace::default();
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = JsonSeed { trace: &mut trace }.deserialize(&mut de);
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

/// Objects with more members than this check new keys against a hash set instead of
/// comparing them with every earlier key (so a hostile object of 100,000 members costs
/// 100,000 lookups, not 5·10⁹ comparisons). The set is std's SipHash one: the keys are
/// the client's choosing.
const LINEAR_KEYS: usize = 16;

struct JsonSeed<'t> {
    trace: &'t mut DupTrace,
}

impl<'de> DeserializeSeed<'de> for JsonSeed<'_> {
    type Value = Json<'de>;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Json<'de>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JsonSeed<'_> {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Json<'de>, E> {
        // JSON cannot spell NaN or infinity, so this is always `Some`.
        Ok(Number::from_f64(v).map_or(Json::Null, Json::Number))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v)))
    }

    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_none<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::new();
        loop {
            let index = items.len();
            match seq.next_element_seed(JsonSeed {
                trace: &mut *self.trace,
            }) {
                Ok(Some(item)) => items.push(item),
                Ok(None) => return Ok(Json::Array(items)),
                Err(e) => {
                    self.trace.unwind(Segment::Index(index));
                    return Err(e);
                }
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut members: Vec<(Cow<'de, str>, Json<'de>)> = Vec::new();
        // Built once the object outgrows a linear scan.
        let mut seen: Option<HashSet<Cow<'de, str>>> = None;
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let duplicate = match &mut seen {
                Some(set) => !set.insert(key.clone()),
                None if members.len() < LINEAR_KEYS => members.iter().any(|(k, _)| *k == key),
                None => {
                    let mut set: HashSet<Cow<'de, str>> =
                        members.iter().map(|(k, _)| k.clone()).collect();
                    let duplicate = !set.insert(key.clone());
                    seen = Some(set);
                    duplicate
                }
            };
            if duplicate {
                let message = format!("duplicate key {key:?}");
                self.trace.key = Some(key.into_owned());
                return Err(de::Error::custom(message));
            }
            match map.next_value_seed(JsonSeed {
                trace: &mut *self.trace,
            }) {
                Ok(value) => members.push((key, value)),
                Err(e) => {
                    self.trace.unwind(Segment::Key(key.into_owned()));
                    return Err(e);
                }
            }
        }
        Ok(Json::Object(members))
    }
}

/// An object key, borrowed from the input unless it had escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
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

/// [`top_level_member`] read from the other end: the value of the *last* top-level member
/// `key`, found by scanning backward from the closing brace, so a body that ends with it
/// (OpenAI, Anthropic, vLLM and embeddings bodies end with `usage` or a member or two
/// after it) is decided by its last few hundred bytes, however long the rest.
///
/// Scanning backward is as exact as forward: from outside a string, an unescaped quote
/// (one not preceded by an odd run of backslashes) closes a string whose opening quote
/// is the previous unescaped one, and a `}` opens one more object going backward. What
/// this cannot see is whether the body's last `}` really closes the object its first `{`
/// opened, so it is for **complete** bodies only (the transport saw the last byte the
/// upstream framed): in a truncated one, the last `}` may close a nested object and a
/// nested `key` would pass for a top-level one. The part before the member is not read,
/// except for one vector search: if the quoted `key` occurs there at all (a duplicate at
/// any depth, or only text that looks like one), the answer is [`Member::Unsure`].
/// A top-level key with escapes met on the way is [`Member::Unsure`] too; one before the
/// member is not seen (a duplicate spelled with escapes, which no encoder writes).
pub(crate) fn last_top_level_member(bytes: &[u8], key: &[u8]) -> Member {
    let start = bytes.len() - bytes.trim_ascii_start().len();
    let end = bytes.trim_ascii_end().len();
    if start >= end || bytes[start] != b'{' || bytes[end - 1] != b'}' {
        return Member::Unsure;
    }
    // Everything strictly between the root's braces.
    let inner = start + 1;
    let past_whitespace = |from: usize| bytes.len() - bytes[from..].trim_ascii_start().len();
    let mut depth = 1usize;
    let mut i = end - 1;
    loop {
        let Some(at) = bytes
            .get(inner..i)
            .and_then(|rest| memchr::memrchr3(b'"', b'{', b'}', rest))
            .map(|off| inner + off)
        else {
            return if depth == 1 {
                Member::Absent
            } else {
                Member::Unsure
            };
        };
        match bytes[at] {
            b'"' => {
                if escaped(bytes, inner, at) {
                    // A quote escaped outside any string: not JSON.
                    return Member::Unsure;
                }
                let Some(open) = string_start(bytes, inner, at) else {
                    return Member::Unsure;
                };
                i = open;
                if depth != 1 {
                    continue;
                }
                let colon = past_whitespace(at + 1);
                if bytes.get(colon) != Some(&b':') {
                    continue;
                }
                let name = &bytes[open + 1..at];
                if name.contains(&b'\\') {
                    return Member::Unsure;
                }
                if name == key {
                    let before = &bytes[..open];
                    let repeated = memchr::memmem::find_iter(before, key).any(|p| {
                        p > 0 && before[p - 1] == b'"' && before.get(p + key.len()) == Some(&b'"')
                    });
                    return if repeated {
                        Member::Unsure
                    } else {
                        Member::At(colon + 1)
                    };
                }
            }
            b'}' => {
                depth += 1;
                i = at;
            }
            _ => {
                depth -= 1;
                i = at;
                if depth == 0 {
                    // An object closed before the root's own brace: unbalanced.
                    return Member::Unsure;
                }
            }
        }
    }
}

/// Whether the byte at `at` is escaped: preceded (no further back than `floor`) by an odd
/// run of backslashes.
fn escaped(bytes: &[u8], floor: usize, at: usize) -> bool {
    let run = bytes
        .get(floor..at)
        .unwrap_or_default()
        .iter()
        .rev()
        .take_while(|&&b| b == b'\\')
        .count();
    run % 2 == 1
}

/// The offset of the quote opening the string closed by the quote at `close`, found no
/// further back than `floor`.
fn string_start(bytes: &[u8], floor: usize, close: usize) -> Option<usize> {
    let mut to = close;
    loop {
        let at = floor + memchr::memrchr(b'"', bytes.get(floor..to)?)?;
        if !escaped(bytes, floor, at) {
            return Some(at);
        }
        to = at;
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

    /// What both member scans, front to back and from the end, must decide alike:
    /// `at` finds the member `usage` in a body.
    fn scans_decide_alike(at: impl Fn(&str) -> Member) {
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
    fn finds_only_a_top_level_member() {
        let at = |json: &str| top_level_member(json.as_bytes(), b"usage");
        scans_decide_alike(at);
        assert_eq!(at(r#"{"usa\u0067e":1}"#), Member::Unsure);
    }

    #[test]
    fn finds_the_last_top_level_member_from_the_end() {
        let at = |json: &str| last_top_level_member(json.as_bytes(), b"usage");
        scans_decide_alike(at);
        // Members after it, strings with braces, quotes and backslashes on the way.
        let body = r#"{"c":[{"u":"}{\"usage\":{\\"}],"usage":{"a":1},"s":"x\\","t":{"usage":2}}"#;
        assert_eq!(
            at(body),
            Member::At(body.find(r#""usage":{"a""#).unwrap() + 8)
        );
        assert_eq!(at(" { } "), Member::Absent);
        // What a full parse must decide.
        for json in [
            // Given twice at any depth, or text before it that looks like a key.
            r#"{"x":{"usage":1},"usage":2}"#,
            r#"{"x":"\"usage","usage":2}"#,
            // A top-level key with escapes after it.
            r#"{"usage":1,"usa\u0067e":1}"#,
            // Closed early, or a quote escaped outside any string.
            r#"{"a":1,"usage":{"b":2}"#,
            r#"{"a":"x\"}"#,
            r#"{"a":1\"}"#,
            "}",
            "{",
        ] {
            assert_eq!(at(json), Member::Unsure, "{json}");
        }
    }

    #[test]
    fn parses_like_serde_json() {
        let text =
            r#"{"a":[1,-2,3.5,"x",null,true,{"b":{}}],"c":"\u00e9\n","big":18446744073709551615}"#;
        let ours = parse_unique(text.as_bytes()).map(|v| serde_json::to_value(&v).unwrap());
        let theirs: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(ours.ok(), Some(theirs));
    }

    #[test]
    fn strings_borrow_unless_escaped_and_members_keep_their_order() {
        let v = parse_unique(br#"{"z":"plain","a":"esc\"aped","m\u0061":[1,"x"]}"#).unwrap();
        let Json::Object(members) = &v else {
            panic!("not an object: {v:?}")
        };
        let keys: Vec<&str> = members.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(keys, ["z", "a", "ma"]);
        assert!(matches!(members[0].0, Cow::Borrowed(_)));
        assert!(matches!(members[2].0, Cow::Owned(_)));
        assert!(matches!(
            v.get("z"),
            Some(Json::String(Cow::Borrowed("plain")))
        ));
        assert!(matches!(v.get("a"), Some(Json::String(Cow::Owned(s))) if s == "esc\"aped"));
        assert_eq!(v.get("ma").and_then(|a| a.get("x")), None);
        assert_eq!(v.get("nope"), None);
        assert_eq!(
            v.to_string(),
            r#"{"z":"plain","a":"esc\"aped","ma":[1,"x"]}"#
        );
    }

    #[test]
    fn duplicates_in_large_objects() {
        // Past LINEAR_KEYS the check switches to a set: a duplicate of an early key, of a
        // key added after the switch, and none at all.
        let members = |n: usize| (0..n).map(|i| format!("\"k{i}\":{i}")).collect::<Vec<_>>();
        for (n, repeat) in [
            (40, "k0"),
            (40, "k3"),
            (40, "k15"),
            (40, "k16"),
            (40, "k39"),
            (17, "k16"),
        ] {
            let mut m = members(n);
            m.push(format!("\"{repeat}\":null"));
            let json = format!("{{{}}}", m.join(","));
            let d = dup(&json).unwrap_or_else(|| panic!("{n} keys, {repeat} again: not refused"));
            assert_eq!((d.key.as_str(), d.path.as_str()), (repeat, "$"));
        }
        for n in [15, 16, 17, 200] {
            let json = format!("{{\"o\":{{{}}}}}", members(n).join(","));
            let v = parse_unique(json.as_bytes()).unwrap();
            assert_eq!(
                v.get("o")
                    .and_then(|o| o.get(&format!("k{}", n - 1)))
                    .and_then(Json::as_u64),
                Some(n as u64 - 1)
            );
        }
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
