//! Fast token estimates, for admission before the exact count is known.
//!
//! The heuristic: one token per 4 ASCII bytes (rounded up) plus one token per non-ASCII
//! character. BPE vocabularies of current models average 3.5–4.5 bytes per token on
//! English text and code, while CJK and other non-Latin scripts come out at roughly one
//! token per character, which a plain `bytes / 4` would undercount by 3–4×. Counting
//! non-ASCII characters separately keeps the estimate on the high side for every script,
//! which is the safe side for a limiter: an overestimate is refunded at settlement, an
//! underestimate lets a request through that should have waited.
//!
//! One pass over the bytes, no allocation. Exact BPE counts, when enabled, are done
//! elsewhere and off the hot path.

/// Knobs for the request-side estimate. The defaults are documented per field; the proxy
/// can override them from configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EstimateConfig {
    /// Tokens added per chat/Anthropic/Responses message for the role and framing
    /// (OpenAI documents 3–4 for chat models). Default 4.
    pub per_message_tokens: u64,
    /// Tokens the model spends priming its reply. Default 3 (OpenAI's cookbook figure).
    pub reply_priming_tokens: u64,
    /// Tokens charged per image part. Default 765: a 1024×1024 image at `detail: high`
    /// on GPT-4o (85 base + 4 tiles × 170); Claude charges about (w·h)/750, ≈1.4k for a
    /// 1024² image, so this is a middle figure, not a bound.
    pub image_tokens: u64,
    /// Tokens charged per audio clip. Default 200 (about 20 s at OpenAI's ~10 tokens/s).
    pub audio_tokens: u64,
    /// Tokens charged per attached file or document (PDF etc.). Default 1500: files are
    /// billed by their extracted text and page images, unknowable without opening them.
    pub file_tokens: u64,
}

impl Default for EstimateConfig {
    fn default() -> Self {
        EstimateConfig {
            per_message_tokens: 4,
            reply_priming_tokens: 3,
            image_tokens: 765,
            audio_tokens: 200,
            file_tokens: 1500,
        }
    }
}

/// Estimated token count of `text` (see the module docs for the heuristic).
pub fn estimate_tokens(text: &str) -> u64 {
    estimate_bytes(text.as_bytes())
}

/// Estimated token count of generated text. Same heuristic as [`estimate_tokens`]; a
/// separate name so call sites say which side of the exchange they count.
pub fn estimate_output_tokens(text: &str) -> u64 {
    estimate_bytes(text.as_bytes())
}

/// The heuristic over raw bytes. Continuation bytes (`10xxxxxx`) are skipped so that
/// every non-ASCII character counts once whatever its encoded length; invalid UTF-8
/// still yields a finite, sensible count.
pub(crate) fn estimate_bytes(bytes: &[u8]) -> u64 {
    let mut ascii: u64 = 0;
    let mut non_ascii_chars: u64 = 0;
    for &b in bytes {
        // Branch-free counting keeps this loop vectorisable.
        ascii += u64::from(b < 0x80);
        non_ascii_chars += u64::from(b >= 0xC0);
    }
    ascii.div_ceil(4) + non_ascii_chars
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_rounds_up_per_four_bytes() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("a"), 1);
        assert_eq!(estimate_tokens("abcd"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
        assert_eq!(estimate_tokens(&"x".repeat(4000)), 1000);
    }

    #[test]
    fn non_ascii_counts_per_character() {
        // Three CJK characters, 9 bytes: 3 tokens, not ceil(9/4) = 3 by luck; check a
        // longer run where bytes/4 would be far off.
        assert_eq!(estimate_tokens("日本語"), 3);
        assert_eq!(estimate_tokens(&"語".repeat(100)), 100);
        // Mixed: "héllo" = 4 ASCII bytes (1 token) + 1 accented char.
        assert_eq!(estimate_tokens("héllo"), 2);
        // A 4-byte emoji is one character.
        assert_eq!(estimate_tokens("🦀"), 1);
    }

    #[test]
    fn output_uses_the_same_heuristic() {
        let text = "The quick brown fox jumps over the lazy dog. 狐狸";
        assert_eq!(estimate_output_tokens(text), estimate_tokens(text));
        assert_eq!(estimate_tokens(text), 12 + 2);
    }

    #[test]
    fn invalid_utf8_is_finite() {
        assert_eq!(estimate_bytes(&[0xFF, 0xFE, 0x80, 0x80]), 2);
    }
}
