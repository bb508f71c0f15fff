//! Usage extraction from arbitrary response bodies.
//!
//! Input: byte 0 picks the API and the chunk size, the rest is the body. Invariants:
//! `BodyMeter` under its cap finds exactly what `usage_from_body` finds for a body cut
//! short, and what `usage_from_complete_body` finds for a complete one, whatever the
//! chunking; on valid JSON, reading from the end finds what the full read finds; over a
//! small cap it keeps going without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_llm::{
    gemini_usage_from_body, usage_from_body, usage_from_complete_body, Api, BodyMeter,
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let api = Api::ALL[usize::from(mode) % Api::ALL.len()];
    let chunk = usize::from(mode >> 3) + 1;

    let direct = usage_from_body(api, body);
    let _ = gemini_usage_from_body(body);

    let from_end = usage_from_complete_body(api, body);
    if direct.is_some() && serde_json::from_slice::<serde_json::Value>(body).is_ok() {
        assert_eq!(from_end, direct, "read from the end differs on valid JSON");
    }

    let mut cut = BodyMeter::new(api, body.len());
    cut.feed(body);
    assert_eq!(cut.finish(false).usage, direct, "BodyMeter (cut short) differs");

    let mut whole = BodyMeter::new(api, body.len());
    whole.feed(body);
    let whole = whole.finish(true);
    assert!(!whole.truncated);
    assert_eq!(
        whole.usage, from_end,
        "BodyMeter disagrees with usage_from_complete_body"
    );

    let mut chunked = BodyMeter::new(api, body.len());
    for c in body.chunks(chunk) {
        chunked.feed(c);
    }
    assert_eq!(chunked.finish(true), whole, "BodyMeter depends on chunking");

    // Over the cap: only the tail is read.
    let mut small = BodyMeter::new(api, 8);
    for c in body.chunks(chunk) {
        small.feed(c);
    }
    let small = small.finish(true);
    assert_eq!(small.bytes, body.len() as u64);
});
