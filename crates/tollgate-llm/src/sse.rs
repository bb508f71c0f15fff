//! An incremental, byte-level Server-Sent Events scanner.
//!
//! The proxy forwards upstream bytes unchanged and only *reads* the stream, so this
//! scanner never re-encodes anything: it reports each event's fields together with the
//! byte range the event occupies in the overall stream, which is what lets the meter drop
//! one event from the forwarded bytes.
//!
//! It follows the WHATWG parsing rules on bytes: lines end in `\r\n`, `\n` or `\r`
//! (a `\r\n` split across two chunks is one line end); `:` starts a comment; a line
//! without a colon is a field with an empty value; one space after the colon is dropped;
//! `data` lines are joined with `\n`; an event is dispatched at a blank line and only if
//! it had a `data` field; a leading UTF-8 BOM is skipped. Payloads are handed out as
//! bytes and decoded only by whoever reads them whole, so a multi-byte character split
//! across chunks is never an issue. Events therefore come out the same whatever the
//! chunking.
//!
//! Memory is bounded: data beyond `max_event_bytes` (default 4 MiB) for one event, or a
//! single line longer than that, is discarded as it arrives and the event is reported with
//! `oversized = true` and no data.
//!
//! One deliberate delay: when the blank line that ends an event is terminated by a `\r`
//! that is the last byte of a chunk, the event is reported with the next chunk (or at
//! [`SseScanner::finish`]), once it is known whether a `\n` follows. That keeps event
//! ranges independent of chunking; only bare-`\r` streams or `\r\n` split exactly there
//! are affected.

use std::ops::Range;

/// Default bound on one event's data (and on one line).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// One dispatched event, borrowing the scanner's buffers until the callback returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` field, if the event had one.
    pub event: Option<&'a [u8]>,
    /// The `data:` lines joined with `\n` (empty when `oversized`).
    pub data: &'a [u8],
    /// The `id:` field, if this event set one.
    pub id: Option<&'a [u8]>,
    /// Where the event lies in the whole stream: from the start of its first line to the
    /// end of the blank line that terminated it (line terminator included).
    pub range: Range<u64>,
    /// The data exceeded the scanner's bound and was discarded.
    pub oversized: bool,
    /// Reported by [`SseScanner::finish`]: the stream ended before the blank line.
    pub unterminated: bool,
}

impl SseEvent<'_> {
    /// The event name as UTF-8, if present and valid.
    pub fn event_str(&self) -> Option<&str> {
        self.event.and_then(|e| std::str::from_utf8(e).ok())
    }

    /// The data as UTF-8, if valid.
    pub fn data_str(&self) -> Option<&str> {
        std::str::from_utf8(self.data).ok()
    }

    /// An owned copy, for callers that keep events past the callback.
    pub fn to_owned_event(&self) -> OwnedSseEvent {
        OwnedSseEvent {
            event: self.event.map(<[u8]>::to_vec),
            data: self.data.to_vec(),
            id: self.id.map(<[u8]>::to_vec),
            range: self.range.clone(),
            oversized: self.oversized,
            unterminated: self.unterminated,
        }
    }
}

/// Owned form of [`SseEvent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedSseEvent {
    /// See [`SseEvent::event`].
    pub event: Option<Vec<u8>>,
    /// See [`SseEvent::data`].
    pub data: Vec<u8>,
    /// See [`SseEvent::id`].
    pub id: Option<Vec<u8>>,
    /// See [`SseEvent::range`].
    pub range: Range<u64>,
    /// See [`SseEvent::oversized`].
    pub oversized: bool,
    /// See [`SseEvent::unterminated`].
    pub unterminated: bool,
}

/// Incremental SSE scanner; feed it chunks as they arrive.
#[derive(Debug)]
pub struct SseScanner {
    max_event_bytes: usize,
    /// Stream offset of the next byte to be fed.
    pos: u64,
    /// Start offset of the line being read.
    line_start: u64,
    /// The current line's bytes, when it spans chunks.
    line: Vec<u8>,
    /// The current line outgrew the bound; its bytes are being dropped.
    line_overflow: bool,
    /// The last byte fed was a `\r` ending a line; a `\n` first in the next chunk is part
    /// of that line end.
    after_cr: bool,
    /// That `\r` ended the blank line closing an event, dispatched once resolved.
    dispatch_after_cr: bool,
    /// Start of the event being read, once it has a line.
    event_start: Option<u64>,
    data: Vec<u8>,
    has_data: bool,
    event: Vec<u8>,
    has_event: bool,
    id: Vec<u8>,
    has_id: bool,
    oversized: bool,
}

impl Default for SseScanner {
    fn default() -> Self {
        SseScanner::new(DEFAULT_MAX_EVENT_BYTES)
    }
}

impl SseScanner {
    /// A scanner that bounds one event's data (and one line) to `max_event_bytes`.
    pub fn new(max_event_bytes: usize) -> Self {
        SseScanner {
            max_event_bytes,
            pos: 0,
            line_start: 0,
            line: Vec::new(),
            line_overflow: false,
            after_cr: false,
            dispatch_after_cr: false,
            event_start: None,
            data: Vec::new(),
            has_data: false,
            event: Vec::new(),
            has_event: false,
            id: Vec::new(),
            has_id: false,
            oversized: false,
        }
    }

    /// Bytes fed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Offset where the bytes of a not-yet-dispatched event begin, if any: everything
    /// before it belongs to dispatched events or to nothing.
    pub fn pending_event_start(&self) -> Option<u64> {
        self.event_start
            .or_else(|| (!self.line.is_empty() || self.line_overflow).then_some(self.line_start))
    }

    /// Scans `chunk`, calling `on_event` for every event it completes.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(SseEvent<'_>)) {
        if chunk.is_empty() {
            return;
        }
        let mut i = 0;
        if self.after_cr {
            self.after_cr = false;
            if chunk.first() == Some(&b'\n') {
                i = 1;
            }
            let end = self.pos + i as u64;
            self.line_start = end;
            if self.dispatch_after_cr {
                self.dispatch_after_cr = false;
                self.dispatch(end, false, &mut on_event);
            }
        }
        while let Some(rest) = chunk.get(i..).filter(|r| !r.is_empty()) {
            let Some(eol) = memchr::memchr2(b'\r', b'\n', rest) else {
                self.append_partial(rest);
                break;
            };
            let content = rest.get(..eol).unwrap_or_default();
            // Length of the line terminator, and whether it may continue in the next chunk.
            let (term, open_cr) = match (rest.get(eol), rest.get(eol + 1)) {
                (Some(b'\r'), Some(b'\n')) => (2, false),
                (Some(b'\r'), None) => (1, true),
                _ => (1, false),
            };
            let line_end = self.pos + (i + eol + term) as u64;
            if self.line.is_empty() && !self.line_overflow {
                self.process_line(content, line_end, open_cr, &mut on_event);
            } else {
                self.append_partial(content);
                let line = std::mem::take(&mut self.line);
                let overflow = std::mem::replace(&mut self.line_overflow, false);
                if overflow {
                    self.overflowed_line();
                } else {
                    self.process_line(&line, line_end, open_cr, &mut on_event);
                }
                // Keep the allocation for the next split line.
                self.line = line;
                self.line.clear();
            }
            if open_cr {
                self.after_cr = true;
            } else {
                self.line_start = line_end;
            }
            i += eol + term;
        }
        self.pos += chunk.len() as u64;
    }

    /// [`SseScanner::feed`] collecting owned events, for callers that do not mind one
    /// allocation per event (tests, simulators).
    pub fn feed_owned(&mut self, chunk: &[u8]) -> Vec<OwnedSseEvent> {
        let mut events = Vec::new();
        self.feed(chunk, |e| events.push(e.to_owned_event()));
        events
    }

    /// Ends the stream: resolves a trailing `\r`, then reports an event the stream cut
    /// off before its blank line (`unterminated = true`), if it had data. Browsers drop
    /// such an event; a meter wants its usage.
    pub fn finish(&mut self, mut on_event: impl FnMut(SseEvent<'_>)) {
        if self.after_cr {
            self.after_cr = false;
            self.line_start = self.pos;
            if self.dispatch_after_cr {
                self.dispatch_after_cr = false;
                self.dispatch(self.pos, false, &mut on_event);
            }
        }
        if self.line_overflow {
            self.line_overflow = false;
            self.overflowed_line();
        } else if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.process_line(&line, self.pos, false, &mut on_event);
        }
        if self.event_start.is_some() {
            self.dispatch(self.pos, true, &mut on_event);
        }
        self.line_start = self.pos;
    }

    fn append_partial(&mut self, bytes: &[u8]) {
        if self.line_overflow {
            return;
        }
        if self.line.len() + bytes.len() > self.max_event_bytes {
            self.line_overflow = true;
            self.line = Vec::new();
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    /// A line too long to keep: whatever field it was, the event is now oversized.
    fn overflowed_line(&mut self) {
        if self.event_start.is_none() {
            self.event_start = Some(self.line_start);
        }
        self.oversized = true;
        self.data = Vec::new();
    }

    fn process_line(
        &mut self,
        mut line: &[u8],
        line_end: u64,
        open_cr: bool,
        on_event: &mut impl FnMut(SseEvent<'_>),
    ) {
        // The same bound as a line split across chunks, so that chunking never changes
        // which events are reported (found by fuzzing: a long non-`data` line).
        if line.len() > self.max_event_bytes {
            self.overflowed_line();
            return;
        }
        if self.line_start == 0 {
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        if line.is_empty() {
            if self.event_start.is_some() {
                if open_cr {
                    self.dispatch_after_cr = true;
                } else {
                    self.dispatch(line_end, false, on_event);
                }
            }
            return;
        }
        if self.event_start.is_none() {
            self.event_start = Some(self.line_start);
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(0) => return, // comment
            Some(colon) => {
                let value = line.get(colon + 1..).unwrap_or_default();
                (
                    line.get(..colon).unwrap_or_default(),
                    value.strip_prefix(b" ").unwrap_or(value),
                )
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.oversized {
                    return;
                }
                let extra = value.len() + usize::from(self.has_data);
                if self.data.len() + extra > self.max_event_bytes {
                    self.oversized = true;
                    self.data = Vec::new();
                    return;
                }
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
                self.has_event = true;
            }
            // Per spec an id containing NUL is ignored.
            b"id" if memchr::memchr(0, value).is_none() => {
                self.id.clear();
                self.id.extend_from_slice(value);
                self.has_id = true;
            }
            // `retry` only matters to reconnecting clients; other fields are ignored.
            _ => {}
        }
    }

    fn dispatch(&mut self, end: u64, unterminated: bool, on_event: &mut impl FnMut(SseEvent<'_>)) {
        if let Some(start) = self.event_start.take() {
            if self.has_data || self.oversized {
                on_event(SseEvent {
                    event: self.has_event.then_some(self.event.as_slice()),
                    data: &self.data,
                    id: self.has_id.then_some(self.id.as_slice()),
                    range: start..end,
                    oversized: self.oversized,
                    unterminated,
                });
            }
        }
        self.data.clear();
        self.has_data = false;
        self.event.clear();
        self.has_event = false;
        self.id.clear();
        self.has_id = false;
        self.oversized = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_chunks(chunks: &[&[u8]], max: usize) -> Vec<OwnedSseEvent> {
        let mut scanner = SseScanner::new(max);
        let mut events = Vec::new();
        for chunk in chunks {
            scanner.feed(chunk, |e| events.push(e.to_owned_event()));
        }
        scanner.finish(|e| events.push(e.to_owned_event()));
        events
    }

    fn scan(input: &[u8]) -> Vec<OwnedSseEvent> {
        scan_chunks(&[input], DEFAULT_MAX_EVENT_BYTES)
    }

    fn data(events: &[OwnedSseEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| String::from_utf8(e.data.clone()).unwrap())
            .collect()
    }

    #[test]
    fn basic_fields_and_ranges() {
        let input = b"event: a\ndata: x\nid: 7\n\ndata:y\ndata:  z\n\n";
        let events = scan(input);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].event.as_deref(), Some(&b"a"[..]));
        assert_eq!(events[0].data, b"x");
        assert_eq!(events[0].id.as_deref(), Some(&b"7"[..]));
        assert_eq!(events[0].range, 0..24);
        assert_eq!(events[1].event, None);
        assert_eq!(events[1].data, b"y\n z");
        assert_eq!(events[1].range, 24..input.len() as u64);
    }

    #[test]
    fn feed_owned_matches_callback() {
        let mut scanner = SseScanner::default();
        let events = scanner.feed_owned(b"event: e\ndata: 1\n\ndata: 2\n");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event.as_deref(), Some(&b"e"[..]));
        assert_eq!(scanner.feed_owned(b"\n")[0].data, b"2");
    }

    #[test]
    fn line_endings() {
        for input in [
            &b"data: a\r\n\r\ndata: b\r\n\r\n"[..],
            b"data: a\r\rdata: b\r\r",
            b"data: a\n\ndata: b\n\n",
            b"data: a\r\n\rdata: b\n\r\n",
        ] {
            let events = scan(input);
            assert_eq!(data(&events), ["a", "b"], "{input:?}");
            assert_eq!(events[1].range.end, input.len() as u64);
            assert_eq!(events[0].range.end, events[1].range.start);
        }
    }

    #[test]
    fn crlf_split_between_chunks_is_one_line_end() {
        let input = b"data: a\r\n\r\ndata: b\r\n\r\n";
        for split in 0..=input.len() {
            let (x, y) = input.split_at(split);
            let events = scan_chunks(&[x, y], DEFAULT_MAX_EVENT_BYTES);
            assert_eq!(data(&events), ["a", "b"], "split {split}");
            assert_eq!(events[0].range, 0..11, "split {split}");
            assert_eq!(events[1].range, 11..22, "split {split}");
        }
    }

    #[test]
    fn event_ending_in_split_crlf_waits_for_next_byte() {
        let mut scanner = SseScanner::default();
        let mut seen = Vec::new();
        scanner.feed(b"data: a\r\n\r", |e| seen.push(e.to_owned_event()));
        assert!(seen.is_empty());
        assert_eq!(scanner.pending_event_start(), Some(0));
        scanner.feed(b"\ndata: b", |e| seen.push(e.to_owned_event()));
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].range, 0..11);
        assert_eq!(scanner.pending_event_start(), Some(11));
    }

    #[test]
    fn comments_no_colon_fields_and_empty_data() {
        let events = scan(b": keep-alive\n\ndata\n\n:c\ndata:\ndata: q\nretry: 10\nfoo: bar\n\n");
        // The comment-only block dispatches nothing; `data` with no colon is an empty
        // data line; `data:` too.
        assert_eq!(data(&events), ["", "\nq"]);
        assert_eq!(events[0].range, 14..20);
    }

    #[test]
    fn events_without_data_are_not_dispatched() {
        let events = scan(b"event: ping\n\nevent: x\ndata: 1\n\n");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event.as_deref(), Some(&b"x"[..]));
        assert_eq!(events[0].range, 13..31);
    }

    #[test]
    fn bom_is_skipped_only_at_stream_start() {
        let events = scan(b"\xEF\xBB\xBFdata: a\n\n\xEF\xBB\xBFdata: b\n\n");
        assert_eq!(events.len(), 1, "a BOM later is part of the field name");
        assert_eq!(events[0].data, b"a");
        let events = scan_chunks(
            &[b"\xEF", b"\xBB", b"\xBFdata: a\n\n"],
            DEFAULT_MAX_EVENT_BYTES,
        );
        assert_eq!(data(&events), ["a"]);
    }

    #[test]
    fn multibyte_split_survives() {
        let input = "data: {\"t\":\"日本\"}\n\n".as_bytes();
        for split in 0..=input.len() {
            let (x, y) = input.split_at(split);
            let events = scan_chunks(&[x, y], DEFAULT_MAX_EVENT_BYTES);
            assert_eq!(data(&events), ["{\"t\":\"日本\"}"]);
        }
    }

    #[test]
    fn unterminated_final_event_reported_at_finish() {
        let events = scan(b"data: a\n\ndata: b");
        assert_eq!(data(&events), ["a", "b"]);
        assert!(!events[0].unterminated);
        assert!(events[1].unterminated);
        assert_eq!(events[1].range, 9..16);
        let events = scan(b"data: a\n\ndata: b\n");
        assert!(events[1].unterminated);
    }

    #[test]
    fn oversized_event_is_skipped_and_flagged() {
        // Oversized by many data lines.
        let events = scan_chunks(&[b"data: 0123456789\ndata: 0123456789\n\ndata: ok\n\n"], 16);
        assert_eq!(events.len(), 2);
        assert!(events[0].oversized);
        assert!(events[0].data.is_empty());
        assert_eq!(events[0].range, 0..35);
        assert_eq!(events[1].data, b"ok");
        // Oversized by one line spanning chunks: memory stays bounded.
        let mut scanner = SseScanner::new(64);
        let mut seen = Vec::new();
        scanner.feed(b"data: ", |e| seen.push(e.to_owned_event()));
        for _ in 0..1000 {
            scanner.feed(&[b'x'; 100], |e| seen.push(e.to_owned_event()));
            assert!(scanner.line.capacity() <= 64);
        }
        scanner.feed(b"\n\ndata: ok\n\n", |e| seen.push(e.to_owned_event()));
        assert_eq!(seen.len(), 2);
        assert!(seen[0].oversized);
        assert_eq!(seen[0].range, 0..100_008);
        assert_eq!(seen[1].data, b"ok");
    }

    /// Fuzzing found this: a line over the bound that is not `data` (here a mistyped
    /// field) made the event oversized only when the line arrived split across chunks.
    #[test]
    fn long_non_data_line_is_oversized_whatever_the_chunking() {
        let input = b"event: done\nditata: {\"usage\": 1234567890}\n\ndata: ok\n\n";
        let whole = scan_chunks(&[input], 24);
        let bytewise: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(scan_chunks(&bytewise, 24), whole);
        assert_eq!(whole.len(), 2);
        assert!(whole[0].oversized);
        assert_eq!(whole[0].event.as_deref(), Some(&b"done"[..]));
        assert_eq!(whole[0].range, 0..43);
        assert_eq!(whole[1].data, b"ok");
    }

    #[test]
    fn pending_event_start_tracks_partial_events() {
        let mut scanner = SseScanner::default();
        scanner.feed(b"data: a\n\n\n", |_| {});
        assert_eq!(scanner.pending_event_start(), None);
        scanner.feed(b"da", |_| {});
        assert_eq!(scanner.pending_event_start(), Some(10));
        scanner.feed(b"ta: b\n", |_| {});
        assert_eq!(scanner.pending_event_start(), Some(10));
        scanner.feed(b"\n", |_| {});
        assert_eq!(scanner.pending_event_start(), None);
        assert_eq!(scanner.position(), 19);
    }
}
