//! Every captured provider response in `/work/shared/corpus` yields exactly the usage its
//! `SOURCES.md` entry gives, whatever the chunking, and the forwarded bytes are the
//! input (or the input minus exactly the usage-only chunk when stripping).

// Test helpers outside #[test] fns are not covered by clippy.toml's test allowances.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use proptest::prelude::*;
use tollgate_llm::{
    gemini_usage_from_body, usage_from_body, Api, BodyMeter, Forward, MeterOutcome, StreamMeter,
    Usage,
};

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/corpus");

fn read(name: &str) -> Vec<u8> {
    let path = PathBuf::from(CORPUS).join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `Usage` from the figures SOURCES.md states (input as normalised, i.e. Anthropic cache
/// fields added in).
const fn usage(
    input: u64,
    output: u64,
    total: u64,
    cached: u64,
    creation: u64,
    reasoning: u64,
) -> Usage {
    Usage {
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: cached,
        cache_creation_input_tokens: creation,
        reasoning_tokens: reasoning,
        total_tokens: total,
    }
}

/// (file, API it was called on, expected usage) for every non-streamed body.
const BODIES: &[(&str, Api, Option<Usage>)] = &[
    // prompt 1149 / completion 353 / total 1502 (cached 1024, reasoning 0)
    (
        "openai/chat-nonstream-1.json",
        Api::Chat,
        Some(usage(1149, 353, 1502, 1024, 0, 0)),
    ),
    // prompt 11 / completion 228 / total 239 (cached 0, reasoning 192)
    (
        "openai/chat-nonstream-2.json",
        Api::Chat,
        Some(usage(11, 228, 239, 0, 0, 192)),
    ),
    (
        "openai/completions-nonstream-1.json",
        Api::Completions,
        Some(usage(8, 16, 24, 0, 0, 0)),
    ),
    (
        "openai/responses-nonstream-1.json",
        Api::Responses,
        Some(usage(11, 5, 16, 0, 0, 0)),
    ),
    (
        "openai/responses-nonstream-2.json",
        Api::Responses,
        Some(usage(1515, 8, 1523, 1390, 0, 0)),
    ),
    (
        "openai/responses-nonstream-3.json",
        Api::Responses,
        Some(usage(54, 164, 218, 0, 0, 128)),
    ),
    // prompt 2 / total 2, no completion_tokens
    (
        "openai/embeddings-nonstream-1.json",
        Api::Embeddings,
        Some(usage(2, 0, 2, 0, 0, 0)),
    ),
    ("openai/error-401-nonstream-1.json", Api::Completions, None),
    ("openai/error-401-nonstream-2.json", Api::Responses, None),
    ("openai/error-404-nonstream-1.json", Api::Chat, None),
    (
        "azure/chat-nonstream-1.json",
        Api::Chat,
        Some(usage(11, 203, 214, 0, 0, 192)),
    ),
    // input 4 + cache_creation 1163 + cache_read 0; output 187
    (
        "anthropic/messages-nonstream-1.json",
        Api::Messages,
        Some(usage(1167, 187, 1354, 0, 1163, 0)),
    ),
    // input 4 + cache_creation 0 + cache_read 1163; output 202
    (
        "anthropic/messages-nonstream-2.json",
        Api::Messages,
        Some(usage(1167, 202, 1369, 1163, 0, 0)),
    ),
    // input 17 + cache_creation 2056 + cache_read 0; output 100
    (
        "anthropic/messages-nonstream-3.json",
        Api::Messages,
        Some(usage(2073, 100, 2173, 0, 2056, 0)),
    ),
    ("anthropic/error-400-nonstream-1.json", Api::Messages, None),
    ("anthropic/error-401-nonstream-1.json", Api::Messages, None),
    (
        "vllm/completions-nonstream-1.json",
        Api::Completions,
        Some(usage(20, 20, 40, 0, 0, 0)),
    ),
    // Native Gemini is not OpenAI-shaped: no usage through any `Api` (see the Gemini test).
    ("gemini/generatecontent-nonstream-1.json", Api::Chat, None),
    (
        "gemini/streamgeneratecontent-stream-2.json",
        Api::Chat,
        None,
    ),
    ("gemini/error-429-nonstream-1.json", Api::Chat, None),
];

struct StreamCase {
    file: &'static str,
    api: Api,
    usage: Option<Usage>,
    saw_done: bool,
    /// Events SOURCES.md counts (JSON chunks + `[DONE]`), where it gives a count.
    events: Option<u64>,
    /// The stream has a chat/completions usage-only chunk that strip mode removes.
    usage_chunk: bool,
}

const STREAMS: &[StreamCase] = &[
    // 3 JSON chunks + [DONE]; usage 12 / 100 / 112 (cached 0, reasoning 100), choices=[]
    StreamCase {
        file: "openai/chat-stream-1.sse",
        api: Api::Chat,
        usage: Some(usage(12, 100, 112, 0, 0, 100)),
        saw_done: true,
        events: Some(4),
        usage_chunk: true,
    },
    // 50 JSON chunks + [DONE], no usage anywhere
    StreamCase {
        file: "openai/chat-stream-3.sse",
        api: Api::Chat,
        usage: None,
        saw_done: true,
        events: Some(51),
        usage_chunk: false,
    },
    // 26 JSON chunks + [DONE]; usage 31 / 25 / 56, choices=[] after usage
    StreamCase {
        file: "openai/completions-stream-1.sse",
        api: Api::Completions,
        usage: Some(usage(31, 25, 56, 0, 0, 0)),
        saw_done: true,
        events: Some(27),
        usage_chunk: true,
    },
    StreamCase {
        file: "openai/completions-stream-2.sse",
        api: Api::Completions,
        usage: None,
        saw_done: true,
        events: Some(26),
        usage_chunk: false,
    },
    StreamCase {
        file: "openai/responses-stream-1.sse",
        api: Api::Responses,
        usage: Some(usage(11, 5, 16, 0, 0, 0)),
        saw_done: true,
        events: None,
        usage_chunk: false,
    },
    StreamCase {
        file: "openai/responses-stream-2.sse",
        api: Api::Responses,
        usage: Some(usage(1515, 8, 1523, 1390, 0, 0)),
        saw_done: true,
        events: None,
        usage_chunk: false,
    },
    // terminal response.incomplete with an all-zero usage object: zeros, not "missing"
    StreamCase {
        file: "openai/responses-stream-3.sse",
        api: Api::Responses,
        usage: Some(usage(0, 0, 0, 0, 0, 0)),
        saw_done: true,
        events: None,
        usage_chunk: false,
    },
    // 41 JSON chunks + [DONE]; the first has choices=[] but no usage: not a usage chunk
    StreamCase {
        file: "azure/chat-stream-1.sse",
        api: Api::Chat,
        usage: None,
        saw_done: true,
        events: Some(42),
        usage_chunk: false,
    },
    // message_start: input 4, cache_creation 0, cache_read 1165, output 1; message_delta: output 221
    StreamCase {
        file: "anthropic/messages-stream-1.sse",
        api: Api::Messages,
        usage: Some(usage(1169, 221, 1390, 1165, 0, 0)),
        saw_done: true,
        events: None,
        usage_chunk: false,
    },
    // message_delta repeats input 598 / cache 0 / 0, output 92, thinking_tokens 53
    StreamCase {
        file: "anthropic/messages-stream-2.sse",
        api: Api::Messages,
        usage: Some(usage(598, 92, 690, 0, 0, 53)),
        saw_done: true,
        events: None,
        usage_chunk: false,
    },
    // 16 JSON chunks + [DONE]; usage 46 / 14 / 60 (cached 0), choices=[]
    StreamCase {
        file: "vllm/chat-stream-1.sse",
        api: Api::Chat,
        usage: Some(usage(46, 14, 60, 0, 0, 0)),
        saw_done: true,
        events: Some(17),
        usage_chunk: true,
    },
    // 20 JSON chunks + [DONE], "usage":null on every chunk
    StreamCase {
        file: "vllm/completions-stream-1.sse",
        api: Api::Completions,
        usage: None,
        saw_done: true,
        events: Some(21),
        usage_chunk: false,
    },
    // Native Gemini SSE read as chat: 3 events, nothing OpenAI-shaped, no [DONE].
    StreamCase {
        file: "gemini/streamgeneratecontent-stream-1.sse",
        api: Api::Chat,
        usage: None,
        saw_done: false,
        events: Some(3),
        usage_chunk: false,
    },
];

/// Feeds `chunks` through a meter; returns the forwarded bytes and the outcome.
fn meter(api: Api, strip: bool, chunks: &[&[u8]]) -> (Vec<u8>, MeterOutcome) {
    let mut meter = StreamMeter::new(api, strip);
    let mut out = Vec::new();
    for chunk in chunks {
        match meter.feed(chunk) {
            Forward::All => out.extend_from_slice(chunk),
            Forward::Bytes(bytes) => out.extend_from_slice(&bytes),
            Forward::Nothing => {}
        }
    }
    out.extend_from_slice(meter.end().bytes(&[]));
    (out, meter.finish())
}

/// The input minus the usage-only event, located by plain text search (independently of
/// the scanner): the `\n\n`-framed event holding `"choices":[]` and a `"usage":{`.
fn without_usage_chunk(input: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(input).unwrap();
    let mut out = String::new();
    let mut removed = 0;
    for event in text.split_inclusive("\n\n") {
        if event.contains("\"choices\":[]") && event.contains("\"usage\":{") {
            removed += 1;
        } else {
            out.push_str(event);
        }
    }
    assert_eq!(removed, 1, "exactly one usage-only chunk expected");
    out.into_bytes()
}

fn split_at_points(input: &[u8], mut points: Vec<usize>) -> Vec<&[u8]> {
    points.iter_mut().for_each(|p| *p %= input.len() + 1);
    points.sort_unstable();
    let mut chunks = Vec::new();
    let mut from = 0;
    for p in points {
        chunks.push(&input[from..p]);
        from = p;
    }
    chunks.push(&input[from..]);
    chunks
}

fn check_stream(case: &StreamCase, input: &[u8], chunks: &[&[u8]], strip: bool) {
    let (out, outcome) = meter(case.api, strip, chunks);
    assert_eq!(outcome.usage, case.usage, "{}: usage", case.file);
    assert_eq!(outcome.saw_done, case.saw_done, "{}: saw_done", case.file);
    assert_eq!(outcome.malformed_events, 0, "{}", case.file);
    assert_eq!(outcome.bytes, input.len() as u64, "{}", case.file);
    if let Some(events) = case.events {
        assert_eq!(outcome.events, events, "{}: events", case.file);
    }
    if strip && case.usage_chunk {
        assert!(outcome.stripped_usage_chunk, "{}", case.file);
        assert_eq!(
            out,
            without_usage_chunk(input),
            "{}: stripped bytes",
            case.file
        );
    } else {
        assert!(!outcome.stripped_usage_chunk, "{}", case.file);
        assert_eq!(out, input, "{}: forwarded bytes", case.file);
    }
}

#[test]
fn corpus_is_fully_covered() {
    let mut listed: Vec<&str> = BODIES
        .iter()
        .map(|b| b.0)
        .chain(STREAMS.iter().map(|s| s.file))
        .collect();
    listed.sort_unstable();
    let mut on_disk = Vec::new();
    for dir in std::fs::read_dir(CORPUS).unwrap() {
        let dir = dir.unwrap();
        if !dir.file_type().unwrap().is_dir() {
            continue;
        }
        for file in std::fs::read_dir(dir.path()).unwrap() {
            let file = file.unwrap();
            on_disk.push(format!(
                "{}/{}",
                dir.file_name().to_string_lossy(),
                file.file_name().to_string_lossy()
            ));
        }
    }
    on_disk.sort_unstable();
    assert_eq!(listed, on_disk);
}

#[test]
fn bodies_yield_their_usage() {
    for (file, api, expected) in BODIES {
        let body = read(file);
        assert_eq!(usage_from_body(*api, &body), *expected, "{file}");
        // The scan used for large bodies reads every real body alike, whatever its size.
        assert_eq!(
            tollgate_llm::usage::usage_from_scan(*api, &body),
            *expected,
            "{file}: scan"
        );
        // BodyMeter agrees, in any chunking, and flags nothing on real bodies.
        let mut meter = BodyMeter::new(*api, 1 << 20);
        for chunk in body.chunks(97) {
            meter.feed(chunk);
        }
        let outcome = meter.finish(true);
        assert_eq!(outcome.usage, *expected, "{file}: BodyMeter");
        assert!(!outcome.truncated && !outcome.malformed, "{file}");
        assert_eq!(outcome.bytes, body.len() as u64);
        // The read from the end, which a complete body gets, and a body cut short.
        assert_eq!(
            tollgate_llm::usage_from_complete_body(*api, &body),
            *expected,
            "{file}: from the end"
        );
        let mut meter = BodyMeter::new(*api, 1 << 20);
        meter.feed(&body);
        assert_eq!(meter.finish(false).usage, *expected, "{file}: not complete");
    }
}

#[test]
fn bodies_truncated_by_the_cap_still_find_usage_in_the_tail() {
    for (file, api, expected) in BODIES {
        let body = read(file);
        let mut meter = BodyMeter::new(*api, 64);
        for chunk in body.chunks(50) {
            meter.feed(chunk);
        }
        let outcome = meter.finish(true);
        assert!(outcome.truncated, "{file}");
        // Gemini bodies have no `usage` key; every other expectation holds from the tail.
        assert_eq!(outcome.usage, *expected, "{file}: tail");
    }
}

#[test]
fn bodies_without_usage_get_an_output_estimate() {
    // Remove usage from real bodies: the estimate comes from the generated content.
    for (file, api) in [
        ("openai/chat-nonstream-1.json", Api::Chat),
        ("openai/responses-nonstream-1.json", Api::Responses),
        ("anthropic/messages-nonstream-1.json", Api::Messages),
        ("openai/completions-nonstream-1.json", Api::Completions),
    ] {
        let mut value: serde_json::Value = serde_json::from_slice(&read(file)).unwrap();
        value.as_object_mut().unwrap().remove("usage");
        let mut meter = BodyMeter::new(api, 1 << 20);
        meter.feed(value.to_string().as_bytes());
        let outcome = meter.finish(true);
        assert_eq!(outcome.usage, None);
        assert!(outcome.output_estimate > 0, "{file}");
    }
}

#[test]
fn gemini_native_usage() {
    let one = gemini_usage_from_body(&read("gemini/generatecontent-nonstream-1.json"));
    // prompt 5, candidates 877 + thoughts 1058, total 1940
    assert_eq!(one, Some(usage(5, 1935, 1940, 0, 0, 1058)));
    let array = gemini_usage_from_body(&read("gemini/streamgeneratecontent-stream-2.json"));
    // final chunk: prompt 11, candidates 2 + thoughts 291, total 304
    assert_eq!(array, Some(usage(11, 293, 304, 0, 0, 291)));
    assert_eq!(
        gemini_usage_from_body(&read("gemini/error-429-nonstream-1.json")),
        None
    );
}

#[test]
fn streams_whole_and_byte_by_byte() {
    for case in STREAMS {
        let input = read(case.file);
        for strip in [false, true] {
            check_stream(case, &input, &[&input], strip);
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            check_stream(case, &input, &bytes, strip);
        }
    }
}

#[test]
fn streams_split_at_every_position() {
    for case in STREAMS {
        let input = read(case.file);
        // Every position for files up to 5 KiB; a prime stride for the larger ones keeps
        // the debug-build run short (random splits below cover them fully). Strip mode is
        // used wherever it applies, since it exercises the scanner and the hold logic.
        let step = if input.len() <= 5 * 1024 { 1 } else { 11 };
        let strip = matches!(case.api, Api::Chat | Api::Completions);
        for split in (0..=input.len()).step_by(step) {
            let (a, b) = input.split_at(split);
            check_stream(case, &input, &[a, b], strip);
        }
    }
}

#[test]
fn streams_with_other_line_endings() {
    // The corpus (Gemini aside) is LF-framed and its JSON escapes newlines, so every
    // `\n` is framing: CRLF and bare-CR versions are the same streams.
    for case in STREAMS.iter().filter(|c| !c.file.starts_with("gemini")) {
        let input = read(case.file);
        for ending in ["\r\n", "\r"] {
            let converted = String::from_utf8(input.clone())
                .unwrap()
                .replace('\n', ending)
                .into_bytes();
            let (out, outcome) = meter(case.api, false, &converted.chunks(5).collect::<Vec<_>>());
            assert_eq!(outcome.usage, case.usage, "{} with {ending:?}", case.file);
            assert_eq!(outcome.saw_done, case.saw_done);
            assert_eq!(out, converted);
        }
    }
}

#[test]
fn streamed_content_is_estimated() {
    // Without usage, the meter still reports what was streamed.
    for (file, api) in [
        ("openai/chat-stream-3.sse", Api::Chat),
        ("azure/chat-stream-1.sse", Api::Chat),
        ("openai/completions-stream-2.sse", Api::Completions),
        ("vllm/completions-stream-1.sse", Api::Completions),
        ("openai/responses-stream-1.sse", Api::Responses),
        ("anthropic/messages-stream-1.sse", Api::Messages),
        ("anthropic/messages-stream-2.sse", Api::Messages),
    ] {
        let input = read(file);
        let (_, outcome) = meter(api, false, &[&input]);
        assert!(outcome.streamed_output_estimate > 0, "{file}");
        if outcome.usage.is_none() {
            assert_eq!(outcome.output_tokens(), outcome.streamed_output_estimate);
        }
    }
    // vLLM chat streams one token per delta: 13 text deltas, and the reported 14
    // completion tokens include the end-of-sequence token, which has no text.
    let (_, outcome) = meter(Api::Chat, false, &[&read("vllm/chat-stream-1.sse")]);
    assert_eq!(outcome.streamed_output_estimate, 13);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Every stream, cut at the same random relative positions.
    #[test]
    fn streams_at_random_splits(
        fractions in proptest::collection::vec(0.0f64..=1.0, 0..48),
        strip in any::<bool>(),
    ) {
        for case in STREAMS {
            let input = read(case.file);
            let points = fractions.iter().map(|f| (f * input.len() as f64) as usize).collect();
            let chunks = split_at_points(&input, points);
            check_stream(case, &input, &chunks, strip);
        }
    }
}
