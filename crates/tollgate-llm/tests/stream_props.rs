//! Property tests: the SSE scanner and the strip mode give the same answer whatever the
//! chunking, line endings and multi-byte characters.

// Test helpers outside #[test] fns are not covered by clippy.toml's test allowances.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use tollgate_llm::{Api, Forward, OwnedSseEvent, SseScanner, StreamMeter};

/// (event name, data, range) of a dispatched event.
type EventView = (Option<Vec<u8>>, Vec<u8>, std::ops::Range<u64>);

#[derive(Debug, Clone)]
struct ModelEvent {
    name: Option<String>,
    data_lines: Vec<String>,
    id: Option<String>,
    comment: bool,
    retry: bool,
}

fn text() -> impl Strategy<Value = String> {
    // ASCII, JSON punctuation, a colon and a leading space, 2-, 3- and 4-byte characters.
    proptest::string::string_regex("[ a-z0-9{}\":,é日本🦀]{0,24}").unwrap()
}

fn model_event() -> impl Strategy<Value = ModelEvent> {
    (
        proptest::option::of("[a-z_.]{1,12}"),
        proptest::collection::vec(text(), 0..4),
        proptest::option::of("[a-z0-9]{1,6}"),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(name, data_lines, id, comment, retry)| ModelEvent {
            name,
            data_lines,
            id,
            comment,
            retry,
        })
}

/// Serialises events with one line ending; returns the bytes and, per event, its range.
fn serialise(events: &[ModelEvent], eol: &str) -> (Vec<u8>, Vec<std::ops::Range<u64>>) {
    let mut out = String::new();
    let mut ranges = Vec::new();
    for e in events {
        let start = out.len() as u64;
        if e.comment {
            out.push_str(": keep-alive");
            out.push_str(eol);
        }
        if let Some(name) = &e.name {
            out.push_str(&format!("event: {name}{eol}"));
        }
        for line in &e.data_lines {
            out.push_str(&format!("data: {line}{eol}"));
        }
        if let Some(id) = &e.id {
            out.push_str(&format!("id:{id}{eol}"));
        }
        if e.retry {
            out.push_str(&format!("retry: 1000{eol}"));
        }
        // An event with no lines at all would just be a stray blank line.
        if out.len() as u64 == start {
            out.push_str(&format!("data{eol}"));
        }
        out.push_str(eol);
        ranges.push(start..out.len() as u64);
    }
    (out.into_bytes(), ranges)
}

fn scan(chunks: &[&[u8]]) -> Vec<OwnedSseEvent> {
    let mut scanner = SseScanner::default();
    let mut events = Vec::new();
    for chunk in chunks {
        scanner.feed(chunk, |e| events.push(e.to_owned_event()));
    }
    scanner.finish(|e| events.push(e.to_owned_event()));
    events
}

fn split<'a>(input: &'a [u8], points: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = points.iter().map(|p| p % (input.len() + 1)).collect();
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

fn eol() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("\n"), Just("\r\n"), Just("\r")]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any chunking gives the events the model describes, with their exact ranges.
    #[test]
    fn scanner_matches_model_for_any_chunking(
        events in proptest::collection::vec(model_event(), 0..8),
        eol in eol(),
        points in proptest::collection::vec(any::<usize>(), 0..32),
    ) {
        let (input, ranges) = serialise(&events, eol);
        let got = scan(&split(&input, &points));
        let expected: Vec<EventView> = events
            .iter()
            .zip(ranges)
            .filter(|(e, _)| !e.data_lines.is_empty() || (!e.comment && e.name.is_none() && e.id.is_none() && !e.retry))
            .map(|(e, r)| (
                e.name.as_ref().map(|n| n.clone().into_bytes()),
                e.data_lines.join("\n").into_bytes(),
                r,
            ))
            .collect();
        let got: Vec<_> = got.into_iter().map(|e| (e.event, e.data, e.range)).collect();
        prop_assert_eq!(got, expected);
    }

    /// Mixed line endings (including `\r` then `\n` on separate lines, which reads as one
    /// CRLF) still give the same events for any chunking as for one chunk.
    #[test]
    fn scanner_chunking_invariant_with_mixed_endings(
        lines in proptest::collection::vec((text(), 0u8..6, eol()), 0..24),
        points in proptest::collection::vec(any::<usize>(), 0..32),
    ) {
        let mut input = Vec::new();
        for (value, kind, eol) in &lines {
            let line = match kind {
                0 => format!("data: {value}"),
                1 => format!("event: {value}"),
                2 => format!(":{value}"),
                3 => String::new(),
                4 => format!("id: {value}"),
                _ => value.clone(),
            };
            input.extend_from_slice(line.as_bytes());
            input.extend_from_slice(eol.as_bytes());
        }
        let whole = scan(&[&input]);
        let chunked = scan(&split(&input, &points));
        prop_assert_eq!(chunked, whole);
    }

    /// Strip mode forwards the input minus exactly the usage-only event, for any
    /// chunking, and never holds anything but the current incomplete event.
    #[test]
    fn strip_removes_exactly_the_usage_event(
        contents in proptest::collection::vec(text(), 1..10),
        usage_at in any::<prop::sample::Index>(),
        with_usage_chunk in any::<bool>(),
        eol in prop_oneof![Just("\n"), Just("\r\n")],
        points in proptest::collection::vec(any::<usize>(), 0..32),
        api in prop_oneof![Just(Api::Chat), Just(Api::Completions)],
    ) {
        let mut input = String::new();
        let mut usage_range = None;
        let usage_index = usage_at.index(contents.len() + 1);
        for (i, content) in contents.iter().enumerate() {
            if with_usage_chunk && i == usage_index {
                let start = input.len();
                input.push_str(&format!(
                    "data: {{\"id\":\"x\",\"choices\":[],\"usage\":{{\"prompt_tokens\":7,\"completion_tokens\":{i},\"total_tokens\":{}}}}}{eol}{eol}",
                    7 + i
                ));
                usage_range = Some(start..input.len());
            }
            let choice = if api == Api::Chat {
                serde_json::json!({"index": 0, "delta": {"content": content}})
            } else {
                serde_json::json!({"index": 0, "text": content})
            };
            let chunk = serde_json::json!({"id": "x", "choices": [choice], "usage": null});
            input.push_str(&format!("data: {chunk}{eol}{eol}"));
        }
        if with_usage_chunk && usage_index == contents.len() {
            let start = input.len();
            input.push_str(&format!("data: {{\"usage\":{{\"prompt_tokens\":7,\"completion_tokens\":1}},\"choices\":[]}}{eol}{eol}"));
            usage_range = Some(start..input.len());
        }
        input.push_str(&format!("data: [DONE]{eol}{eol}"));
        let input = input.into_bytes();

        let mut meter = StreamMeter::new(api, true);
        let mut out = Vec::new();
        let mut fed = 0usize;
        for chunk in split(&input, &points) {
            match meter.feed(chunk) {
                Forward::All => out.extend_from_slice(chunk),
                Forward::Bytes(b) => out.extend_from_slice(&b),
                Forward::Nothing => {}
            }
            fed += chunk.len();
            // Nothing is delayed except the current event: what is neither forwarded nor
            // dropped fits inside the event being read.
            let dropped = usage_range.as_ref().filter(|r| r.end <= fed).map_or(0, |r| r.len());
            let pending = fed - out.len() - dropped;
            prop_assert_eq!(pending, meter.held_bytes());
            let since_last_event_end = fed - input[..fed]
                .windows(eol.len() * 2)
                .rposition(|w| w == format!("{eol}{eol}").as_bytes())
                .map_or(0, |p| p + eol.len() * 2);
            prop_assert!(meter.held_bytes() <= since_last_event_end);
        }
        out.extend_from_slice(meter.end().bytes(&[]));
        let outcome = meter.finish();
        let mut expected = input.clone();
        if let Some(r) = usage_range.clone() {
            expected.drain(r);
        }
        prop_assert_eq!(out, expected);
        prop_assert_eq!(outcome.stripped_usage_chunk, with_usage_chunk);
        prop_assert_eq!(outcome.usage.is_some(), with_usage_chunk);
        prop_assert!(outcome.saw_done);
    }
}
