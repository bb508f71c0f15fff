//! The SSE scanner and the stream meter on arbitrary bytes, fed whole and in chunks.
//!
//! Input: byte 0 picks the API and the meter options, bytes 1..4 the chunk sizes, the
//! rest is the upstream stream. Invariants:
//! - the scanner reports the same events whatever the chunking;
//! - the meter forwards the same bytes and reaches the same outcome whatever the
//!   chunking;
//! - without stripping, every byte is forwarded unchanged (passthrough mode answers
//!   `Forward::All` to every chunk); with stripping, bytes only go missing when the
//!   usage chunk was removed;
//! - with `align_to_events`, the forwarded bytes always end on an event boundary (unless
//!   an event over the bound is passing through).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_llm::{Api, Forward, MeterOptions, MeterOutcome, SseScanner, StreamMeter};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (sizes, stream) = rest.split_at(rest.len().min(3));
    let api = Api::ALL[usize::from(mode) % Api::ALL.len()];
    let options = MeterOptions {
        strip_usage_chunk: mode & 0x08 != 0,
        align_to_events: mode & 0x10 != 0,
        // Small bounds exercise the oversized-event path.
        max_event_bytes: if mode & 0x20 != 0 { 64 } else { 1 << 20 },
    };
    let chunks = split(stream, sizes);

    let whole_events = {
        let mut s = SseScanner::new(options.max_event_bytes);
        let mut events = s.feed_owned(stream);
        s.finish(|e| events.push(e.to_owned_event()));
        events
    };
    let chunked_events = {
        let mut s = SseScanner::new(options.max_event_bytes);
        let mut events = Vec::new();
        for c in &chunks {
            events.extend(s.feed_owned(c));
        }
        s.finish(|e| events.push(e.to_owned_event()));
        events
    };
    assert_eq!(whole_events, chunked_events, "scanner depends on chunking");

    let (whole_out, whole_outcome) = meter(api, options, &[stream]);
    let (chunked_out, chunked_outcome) = meter(api, options, &chunks);
    assert_eq!(whole_out, chunked_out, "forwarded bytes depend on chunking");
    assert_eq!(
        whole_outcome, chunked_outcome,
        "outcome depends on chunking"
    );

    if !strips(api, options) || !whole_outcome.stripped_usage_chunk {
        assert_eq!(
            whole_out, stream,
            "bytes changed without a usage chunk stripped"
        );
    } else {
        assert!(
            whole_out.len() < stream.len(),
            "a stripped stream did not shrink"
        );
    }
});

/// Whether the meter strips the usage-only chunk (chat/completions only).
fn strips(api: Api, options: MeterOptions) -> bool {
    options.strip_usage_chunk && matches!(api, Api::Chat | Api::Completions)
}

/// Cuts `stream` into chunks whose sizes cycle through `sizes` (each 1..=64).
fn split<'a>(stream: &'a [u8], sizes: &[u8]) -> Vec<&'a [u8]> {
    let mut chunks = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        let size = sizes
            .get(i % sizes.len().max(1))
            .map_or(7, |&b| usize::from(b % 64) + 1);
        let (head, tail) = rest.split_at(size.min(rest.len()));
        chunks.push(head);
        rest = tail;
        i += 1;
    }
    chunks
}

/// Feeds `chunks` through a meter the way the proxy does; returns what was forwarded.
fn meter(api: Api, options: MeterOptions, chunks: &[&[u8]]) -> (Vec<u8>, MeterOutcome) {
    let mut m = StreamMeter::with_options(api, options);
    let passthrough = !strips(api, options) && !options.align_to_events;
    let total: usize = chunks.iter().map(|c| c.len()).sum();
    let mut out = Vec::new();
    for chunk in chunks {
        let forward = m.feed(chunk);
        if passthrough {
            assert_eq!(forward, Forward::All, "passthrough held or changed bytes");
        }
        out.extend_from_slice(forward.bytes(chunk));
        // Events over the bound pass through unheld (only then may an aligned meter stop
        // mid-event): check streams that cannot hold one.
        if options.align_to_events && total < options.max_event_bytes {
            assert!(
                m.at_event_boundary(),
                "aligned meter forwarded part of an event"
            );
        }
        let _ = m.snapshot();
    }
    let _ = m.cutoff_events();
    out.extend_from_slice(m.end().bytes(&[]));
    (out, m.finish())
}
