//! Exact prompt counts with a real BPE tokenizer (tiktoken's `o200k_base`, the
//! vocabulary of GPT-4o and later; its table is embedded in the binary, nothing is
//! downloaded). Costs roughly 25–60 µs per KB of prompt on this class of machine, so the
//! proxy runs it off its async workers and only for policies that ask.
//!
//! Other vendors' tokenizers differ by some percent; for them this is a much closer
//! estimate than the byte heuristic, not the bill.

use crate::estimate::estimate_tokens;
use crate::request::LlmRequest;

/// Tokens of `text` under `o200k_base`.
pub fn bpe_tokens(text: &str) -> u64 {
    tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(text)
        .len() as u64
}

/// The request's prompt tokens with the text counted exactly; framing, media and
/// pre-tokenised parts as in the fast estimate.
pub fn exact_prompt_tokens(req: &LlmRequest) -> u64 {
    let text = req.prompt_text();
    req.prompt_tokens_estimate
        .saturating_sub(estimate_tokens(text))
        .saturating_add(bpe_tokens(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{inspect_request, Api};

    #[test]
    fn counts_known_strings() {
        // Reference counts from OpenAI's tokenizer for o200k_base.
        assert_eq!(bpe_tokens("hello world"), 2);
        assert_eq!(bpe_tokens(""), 0);
        assert!(bpe_tokens("tokenization is fun, isn't it?") >= 7);
    }

    #[test]
    fn exact_replaces_only_the_text_part() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hello world"}]}"#;
        let r = inspect_request(Api::Chat, body).unwrap();
        let framing = r.prompt_tokens_estimate - estimate_tokens("hello world");
        assert_eq!(exact_prompt_tokens(&r), framing + 2);
    }
}
