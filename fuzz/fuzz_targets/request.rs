//! Request inspection and the stream-usage rewrite on arbitrary bodies.
//!
//! Input: byte 0 picks the API, the rest is the body. Invariants: when the gateway
//! rewrites a body it accepted (adding `stream_options.include_usage`), the rewritten
//! body is accepted too and reads the same model, stream flag, output cap, `n` and
//! prompt; and it then asks for usage, so it is not rewritten again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_llm::{ensure_stream_usage, inspect_request, Api};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let api = Api::ALL[usize::from(mode) % Api::ALL.len()];
    let inspected = inspect_request(api, body);
    if let Ok(req) = &inspected {
        let _ = req.output_reservation(1024);
        let _ = req.prompt_text();
    }
    let Some(rewritten) = ensure_stream_usage(api, body) else {
        return;
    };
    let Ok(before) = inspected else {
        return;
    };
    let after = match inspect_request(api, &rewritten) {
        Ok(after) => after,
        Err(e) => panic!("rewritten body refused: {e}"),
    };
    assert_eq!(before.model, after.model);
    assert_eq!(before.stream, after.stream);
    assert_eq!(before.max_output_tokens, after.max_output_tokens);
    assert_eq!(before.n, after.n);
    assert_eq!(before.prompt_text(), after.prompt_text());
    assert_eq!(after.include_usage, Some(true));
    assert_eq!(
        ensure_stream_usage(api, &rewritten),
        None,
        "rewrite is not idempotent"
    );
});
