//! The one canonical path used for routing, predicates and forwarding.
//!
//! `.`/`..` resolved, `//` collapsed, percent-encoded unreserved characters decoded
//! (so `%2e%2e` is `..` and `%761` is `v1`), no case folding, trailing slash kept. An
//! encoded `/` or `\` (`%2F`, `%5C`) or a raw `\` is refused: a path the upstream would
//! serve as `/v1/chat/completions` must not reach it under another name.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request path must start with '/'")]
    NotAbsolute,
    #[error("encoded '/' or '\\' in the request path is not allowed")]
    EncodedSeparator,
    #[error("'\\' in the request path is not allowed")]
    Backslash,
    #[error("malformed percent-encoding in the request path")]
    BadEncoding,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decode unreserved escapes in one segment; keep other escapes (upper-cased hex).
fn normalize_segment(seg: &str, out: &mut String) -> Result<(), PathError> {
    let bytes = seg.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex);
            let lo = bytes.get(i + 2).copied().and_then(hex);
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(PathError::BadEncoding);
            };
            let v = hi * 16 + lo;
            if v == b'/' || v == b'\\' {
                return Err(PathError::EncodedSeparator);
            }
            if is_unreserved(v) {
                out.push(char::from(v));
            } else {
                out.push('%');
                out.push(char::from(b"0123456789ABCDEF"[usize::from(hi)]));
                out.push(char::from(b"0123456789ABCDEF"[usize::from(lo)]));
            }
            i += 3;
        } else if b == b'\\' {
            return Err(PathError::Backslash);
        } else {
            // Multi-byte UTF-8 is copied whole: we only ever split on ASCII bytes.
            let ch_len = seg[i..].chars().next().map(char::len_utf8).unwrap_or(1);
            out.push_str(&seg[i..i + ch_len]);
            i += ch_len;
        }
    }
    Ok(())
}

/// Whether `raw` (starting with '/') is already its own canonical form: no escapes, no
/// `\\`, no empty segment but a trailing one, no `.` or `..` segment. Most requests are,
/// and are then copied once instead of rebuilt segment by segment.
fn is_canonical(raw: &str) -> bool {
    let rest = &raw.as_bytes()[1..];
    if rest.iter().any(|&b| b == b'%' || b == b'\\') {
        return false;
    }
    let mut segments = rest.split(|&b| b == b'/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        match seg {
            b"." | b".." => return false,
            // "/" alone and a trailing slash are canonical; "//" anywhere is not.
            b"" if !last => return false,
            _ => {}
        }
    }
    true
}

pub fn canonicalize(raw: &str) -> Result<String, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_canonical(raw) {
        return Ok(raw.to_owned());
    }
    let mut segments: Vec<String> = Vec::new();
    let mut trailing = false;
    let parts: Vec<&str> = raw[1..].split('/').collect();
    let last = parts.len().saturating_sub(1);
    for (i, part) in parts.iter().enumerate() {
        let mut seg = String::with_capacity(part.len());
        normalize_segment(part, &mut seg)?;
        let is_last = i == last;
        match seg.as_str() {
            "" => {
                if is_last {
                    trailing = !segments.is_empty();
                }
            }
            "." => {
                if is_last {
                    trailing = !segments.is_empty();
                }
            }
            ".." => {
                segments.pop();
                if is_last {
                    trailing = !segments.is_empty();
                }
            }
            _ => {
                segments.push(seg);
                if is_last {
                    trailing = false;
                }
            }
        }
    }
    let mut out = String::with_capacity(raw.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_tricks_to_one_name() {
        for p in [
            "/v1/chat/completions",
            "//v1/chat/completions",
            "/v1//chat/completions",
            "/v1/./chat/completions",
            "/v1/x/../chat/completions",
            "/v1/%63hat/completions",
            "/v1/chat/%2e/completions",
            "/x/%2e%2e/v1/chat/completions",
            "/../v1/chat/completions",
        ] {
            assert_eq!(canonicalize(p).unwrap(), "/v1/chat/completions", "{p}");
        }
    }

    #[test]
    fn keeps_trailing_slash_and_case() {
        assert_eq!(canonicalize("/v1/models/").unwrap(), "/v1/models/");
        assert_eq!(canonicalize("/V1/Models").unwrap(), "/V1/Models");
        assert_eq!(canonicalize("/").unwrap(), "/");
        assert_eq!(canonicalize("/a/..").unwrap(), "/");
    }

    #[test]
    fn refuses_encoded_separators() {
        assert_eq!(
            canonicalize("/v1%2Fchat/completions"),
            Err(PathError::EncodedSeparator)
        );
        assert_eq!(canonicalize("/v1%5cchat"), Err(PathError::EncodedSeparator));
        assert_eq!(canonicalize("/v1\\chat"), Err(PathError::Backslash));
        assert_eq!(canonicalize("/v1%zz"), Err(PathError::BadEncoding));
        assert_eq!(canonicalize("v1"), Err(PathError::NotAbsolute));
    }

    /// The copy-through path and the full rebuild agree on every path made of the
    /// characters that matter (`/`, `.`, `%`, `\\`, a letter, hex digits).
    #[test]
    fn fast_path_agrees_with_the_rebuild() {
        fn rebuild(raw: &str) -> Result<String, PathError> {
            // canonicalize without its fast path: prefix a segment that `..` removes.
            canonicalize(&format!("/x/..{raw}"))
        }
        let alphabet = ['/', '.', '%', '2', 'e', 'F', 'a', '\\'];
        let mut checked = 0;
        for len in 0..=6u32 {
            for mut n in 0..alphabet.len().pow(len) {
                let mut raw = String::from("/");
                for _ in 0..len {
                    raw.push(alphabet[n % alphabet.len()]);
                    n /= alphabet.len();
                }
                let fast = canonicalize(&raw);
                if is_canonical(&raw) {
                    assert_eq!(fast.as_deref(), Ok(raw.as_str()), "{raw}");
                    checked += 1;
                }
                match (rebuild(&raw), fast) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b, "{raw}"),
                    (Err(a), Err(b)) => assert_eq!(a, b, "{raw}"),
                    (a, b) => panic!("{raw}: rebuild {a:?}, canonicalize {b:?}"),
                }
            }
        }
        assert!(checked > 1000, "only {checked} canonical paths were tried");
    }

    #[test]
    fn keeps_reserved_escapes() {
        assert_eq!(canonicalize("/a%20b/%3f").unwrap(), "/a%20b/%3F");
    }
}
