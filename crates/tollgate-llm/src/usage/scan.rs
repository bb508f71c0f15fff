//! Finding one member of a JSON object's top level without parsing the rest: a walk over
//! the bytes that checks the syntax as strictly as serde_json does (strings, escapes,
//! control characters, literals, number grammar, nesting up to serde_json's depth) and
//! returns the member's raw bytes. Whatever it is unsure of is left to serde_json.

/// What [`top_level_member`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Member<'a> {
    /// The member's value, as raw JSON.
    Found(&'a [u8]),
    /// A well-formed object without it.
    Absent,
    /// Not an object, not well-formed, or a case this walk leaves to serde_json (a key
    /// with escapes, the member twice, a surrogate escape, not UTF-8).
    Unsure,
}

/// serde_json's recursion limit.
const MAX_DEPTH: usize = 128;

/// The value of `key` in the object `body`.
pub(crate) fn top_level_member<'a>(body: &'a [u8], key: &[u8]) -> Member<'a> {
    if std::str::from_utf8(body).is_err() {
        return Member::Unsure;
    }
    let mut found = None;
    let end = object(body, ws(body, 0), 1, &mut |k, v| {
        if k == key {
            if found.is_some() {
                return false;
            }
            found = Some(v);
        }
        true
    });
    match end {
        Some(end) if ws(body, end) == body.len() => match found {
            Some(v) => Member::Found(v),
            None => Member::Absent,
        },
        _ => Member::Unsure,
    }
}

fn ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

/// The object at `i` (which must start there); calls `top` with each member when at the
/// top level (`depth` 1), which may refuse. Returns the index after it.
fn object<'a>(
    b: &'a [u8],
    mut i: usize,
    depth: usize,
    top: &mut dyn FnMut(&'a [u8], &'a [u8]) -> bool,
) -> Option<usize> {
    if b.get(i) != Some(&b'{') || depth > MAX_DEPTH {
        return None;
    }
    i = ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return Some(i + 1);
    }
    loop {
        let key_end = string(b, i)?;
        // The key's bytes between the quotes; escaped keys are left to serde_json.
        let key = b.get(i + 1..key_end - 1)?;
        if key.contains(&b'\\') {
            return None;
        }
        i = ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = ws(b, i + 1);
        let start = i;
        i = value(b, i, depth)?;
        if depth == 1 && !top(key, b.get(start..i)?) {
            return None;
        }
        i = ws(b, i);
        match b.get(i) {
            Some(b',') => i = ws(b, i + 1),
            Some(b'}') => return Some(i + 1),
            _ => return None,
        }
    }
}

fn array(b: &[u8], mut i: usize, depth: usize) -> Option<usize> {
    if b.get(i) != Some(&b'[') || depth > MAX_DEPTH {
        return None;
    }
    i = ws(b, i + 1);
    if b.get(i) == Some(&b']') {
        return Some(i + 1);
    }
    loop {
        i = ws(b, value(b, i, depth)?);
        match b.get(i) {
            Some(b',') => i = ws(b, i + 1),
            Some(b']') => return Some(i + 1),
            _ => return None,
        }
    }
}

/// The value at `i`; the index after it.
fn value(b: &[u8], i: usize, depth: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string(b, i),
        b'{' => object(b, i, depth + 1, &mut |_, _| true),
        b'[' => array(b, i, depth + 1),
        b't' => literal(b, i, b"true"),
        b'f' => literal(b, i, b"false"),
        b'n' => literal(b, i, b"null"),
        b'-' | b'0'..=b'9' => number(b, i),
        _ => None,
    }
}

fn literal(b: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    (b.get(i..i + word.len())? == word).then_some(i + word.len())
}

/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
fn number(b: &[u8], mut i: usize) -> Option<usize> {
    let digits = |b: &[u8], mut i: usize| {
        let s = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        (i > s).then_some(i)
    };
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => i = digits(b, i)?,
        _ => return None,
    }
    if b.get(i) == Some(&b'.') {
        i = digits(b, i + 1)?;
    }
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = b.get(i) {
            i += 1;
        }
        i = digits(b, i)?;
    }
    Some(i)
}

/// The string at `i` (its opening quote); the index after its closing quote.
fn string(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let mut j = i + 1;
    loop {
        match *b.get(j)? {
            b'"' => return Some(j + 1),
            b'\\' => {
                j += 1;
                match *b.get(j)? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => j += 1,
                    b'u' => {
                        let hex = b.get(j + 1..j + 5)?;
                        if !hex.iter().all(u8::is_ascii_hexdigit) {
                            return None;
                        }
                        // Surrogates (pairs or lone) are left to serde_json's rules.
                        if matches!(hex[0], b'd' | b'D')
                            && matches!(hex[1], b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F')
                        {
                            return None;
                        }
                        j += 5;
                    }
                    _ => return None,
                }
            }
            0..=0x1f => return None,
            _ => j += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn finds_the_top_level_member_only() {
        let body = br#"{"choices":[{"usage":1}],"x":{"usage":2},"usage":{"total_tokens":3}}"#;
        assert_eq!(
            top_level_member(body, b"usage"),
            Member::Found(br#"{"total_tokens":3}"#)
        );
        assert_eq!(
            top_level_member(
                br#" { "a" : [ 1 , -2.5e3 , true , null , "s\n\u00e9" ] } "#,
                b"usage"
            ),
            Member::Absent
        );
        assert_eq!(top_level_member(b"{}", b"usage"), Member::Absent);
    }

    #[test]
    fn unsure_of_what_serde_json_must_judge() {
        for body in [
            &br#"{"usage":1,"usage":2}"#[..],
            br#"{"us\u0061ge":1}"#,
            br#"{"a":"\ud83d\ude00","usage":1}"#,
            br#"{"a":tru,"usage":1}"#,
            br#"{"a":01,"usage":1}"#,
            br#"{"a":1.,"usage":1}"#,
            br#"{"a":"x
y","usage":1}"#,
            br#"{"a":1,}"#,
            br#"{"a":1"#,
            br#"[{"usage":1}]"#,
            br#"{"usage":1} x"#,
            b"{\"a\":\"\xff\",\"usage\":1}",
            br#"{"a":{"b":1,},"usage":1}"#,
        ] {
            assert_eq!(
                top_level_member(body, b"usage"),
                Member::Unsure,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
