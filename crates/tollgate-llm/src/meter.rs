//! Response metering: what the proxy wraps around an upstream body to learn what the call
//! cost, while passing the bytes on.
//!
//! [`StreamMeter`] reads an SSE body as it is forwarded. It never changes a forwarded byte;
//! in its default mode every chunk goes on at once, untouched ([`Forward::All`]). Two
//! options need it to hold bytes back:
//!
//! - `strip_usage_chunk` (chat/completions only): the gateway added
//!   `stream_options.include_usage` to the request, so the usage-only chunk
//!   (`"choices": []` plus `usage`) must be removed before the client sees it. Only the
//!   bytes of the *current incomplete event* are held, from its first byte, and only
//!   while it could still be that chunk: as soon as its bytes show a non-empty
//!   `"choices": [` it is released, and a complete event that is not the usage chunk is
//!   released at once. The cost is that the tail of a partial event waits for the rest of
//!   its bytes (typically the same or the next TCP read); every other byte goes on
//!   immediately. Usage on a chunk that also has choices (DeepSeek style) is kept, and
//!   per-chunk `"usage": null` fields are left alone.
//! - `align_to_events`: hold every partial event until it completes, so that the bytes
//!   forwarded so far always end on an event boundary and [`StreamMeter::cutoff_events`]
//!   can be appended cleanly.
//!
//! Usage per API: chat/completions take the last chunk with a non-null `usage`; Responses
//! take `response.usage` of `response.completed` / `.incomplete` / `.failed`; Anthropic
//! merges `message_start`'s `message.usage` with each `message_delta`'s `usage`
//! (latest value per field, output cumulative, never added). Alongside, the generated text
//! actually streamed is estimated (each delta rounded up on its own, since providers send
//! about one token per delta), for streams whose usage never comes.
//!
//! [`BodyMeter`] does the same for non-streamed bodies, buffering up to a cap.

use std::ops::Range;

use memchr::memmem;
use serde_json::Value;

use crate::api::Api;
use crate::sse::{SseEvent, SseScanner, DEFAULT_MAX_EVENT_BYTES};
use crate::usage::{
    usage_from_body, usage_from_complete_body, usage_from_leading, usage_from_raw,
    usage_from_value, AnthropicUsage, Usage,
};
use crate::wire::{
    choice_value_tokens, part_tokens, raw_text_tokens, raw_to_u64, value_text_tokens, ChatChunk,
    MessageHead, MessagesEvent, ResponseHead, ResponsesEvent,
};

/// What to send to the client for one fed chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    /// The chunk as received (the common case: no copy).
    All,
    /// These bytes instead of the chunk: earlier held bytes, part of the chunk, or both.
    Bytes(Vec<u8>),
    /// Nothing yet; the chunk is held.
    Nothing,
}

impl Forward {
    /// The bytes to send, given the chunk this answers.
    pub fn bytes<'a>(&'a self, chunk: &'a [u8]) -> &'a [u8] {
        match self {
            Forward::All => chunk,
            Forward::Bytes(bytes) => bytes,
            Forward::Nothing => &[],
        }
    }
}

/// How a [`StreamMeter`] treats the bytes it forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeterOptions {
    /// Remove the chat/completions usage-only chunk (ignored for other APIs).
    pub strip_usage_chunk: bool,
    /// Forward only whole events, so a cutoff can be appended at any time.
    pub align_to_events: bool,
    /// Bound on one event's buffered bytes; larger events are passed through unread.
    pub max_event_bytes: usize,
}

impl Default for MeterOptions {
    fn default() -> Self {
        MeterOptions {
            strip_usage_chunk: false,
            align_to_events: false,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        }
    }
}

/// What a metered stream amounted to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeterOutcome {
    /// Usage as the provider reported it, normalised. For Anthropic this may be the
    /// `message_start` figures alone (output then a placeholder): see `usage_final`.
    pub usage: Option<Usage>,
    /// `usage` is the provider's last word: the chat usage-only chunk (or usage followed
    /// by `[DONE]`), a Responses terminal event, or an Anthropic `message_delta`.
    pub usage_final: bool,
    /// Estimated tokens of the generated text that was streamed.
    pub streamed_output_estimate: u64,
    /// The stream reached its protocol end: `data: [DONE]`, `message_stop`, or a
    /// Responses terminal event (`response.completed`, `.incomplete` or `.failed`).
    pub saw_done: bool,
    /// An error event came through (Anthropic `event: error`, Responses `error`,
    /// an OpenAI chunk carrying `error`).
    pub saw_error: bool,
    /// The usage-only chunk was removed from the forwarded bytes.
    pub stripped_usage_chunk: bool,
    /// Events seen.
    pub events: u64,
    /// Events whose data was not the expected JSON (skipped).
    pub malformed_events: u64,
    /// Events over the size bound (passed through unread).
    pub oversized_events: u64,
    /// Bytes read from upstream.
    pub bytes: u64,
}

impl MeterOutcome {
    /// Output tokens to charge: the reported figure when final, else the larger of what
    /// was reported so far and what was seen streaming.
    pub fn output_tokens(&self) -> u64 {
        let reported = self.usage.map_or(0, |u| u.output_tokens);
        if self.usage_final {
            reported
        } else {
            reported.max(self.streamed_output_estimate)
        }
    }
}

/// Identity of a stream, used to write a cutoff in its own terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutoffContext {
    /// The stream's `id` (chat/completions chunk id, Responses id, Anthropic message id).
    pub id: Option<String>,
    /// The stream's `model`.
    pub model: Option<String>,
    /// Chat `created` / Responses `created_at`.
    pub created: Option<u64>,
    /// Highest choice index seen (chat/completions with `n > 1`).
    pub max_choice_index: u64,
    /// Responses: the sequence number the next event should carry.
    pub next_sequence_number: Option<u64>,
    /// Anthropic: the content block still open, to be closed first.
    pub open_content_block: Option<u64>,
    /// Output tokens to report in Anthropic's closing `message_delta`.
    pub output_tokens: u64,
}

/// A clean end of stream in the client's format, for a gateway that stops a stream early:
/// chat/completions a final chunk per choice with `finish_reason: "length"` then
/// `data: [DONE]`; Responses a `response.incomplete` event (reason `max_output_tokens`);
/// Anthropic `content_block_stop` for an open block, `message_delta` with
/// `stop_reason: "max_tokens"`, then `message_stop`. Embeddings do not stream: empty.
///
/// Only well-formed if appended on an event boundary (see
/// [`StreamMeter::at_event_boundary`]).
pub fn cutoff_events(api: Api, ctx: &CutoffContext) -> Vec<u8> {
    use serde_json::json;
    let id = ctx.id.as_deref().unwrap_or("");
    let model = ctx.model.as_deref().unwrap_or("");
    let created = ctx.created.unwrap_or(0);
    let mut out = String::new();
    let mut event = |name: Option<&str>, data: &Value| {
        if let Some(name) = name {
            out.push_str("event: ");
            out.push_str(name);
            out.push('\n');
        }
        out.push_str("data: ");
        out.push_str(&data.to_string());
        out.push_str("\n\n");
    };
    match api {
        Api::Chat | Api::Completions => {
            let choices: Vec<Value> = (0..=ctx.max_choice_index.min(127))
                .map(|index| {
                    if api == Api::Chat {
                        json!({"index": index, "delta": {}, "finish_reason": "length"})
                    } else {
                        json!({"text": "", "index": index, "logprobs": null, "finish_reason": "length"})
                    }
                })
                .collect();
            let object = if api == Api::Chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            };
            event(
                None,
                &json!({"id": id, "object": object, "created": created, "model": model, "choices": choices}),
            );
            out.push_str("data: [DONE]\n\n");
        }
        Api::Responses => {
            let mut data = json!({
                "type": "response.incomplete",
                "response": {
                    "id": id,
                    "object": "response",
                    "created_at": created,
                    "status": "incomplete",
                    "incomplete_details": {"reason": "max_output_tokens"},
                    "model": model,
                    "output": [],
                    "usage": null,
                },
            });
            if let (Some(seq), Some(obj)) = (ctx.next_sequence_number, data.as_object_mut()) {
                obj.insert("sequence_number".to_owned(), seq.into());
            }
            event(Some("response.incomplete"), &data);
        }
        Api::Messages => {
            if let Some(index) = ctx.open_content_block {
                event(
                    Some("content_block_stop"),
                    &json!({"type": "content_block_stop", "index": index}),
                );
            }
            event(
                Some("message_delta"),
                &json!({
                    "type": "message_delta",
                    "delta": {"stop_reason": "max_tokens", "stop_sequence": null},
                    "usage": {"output_tokens": ctx.output_tokens},
                }),
            );
            event(Some("message_stop"), &json!({"type": "message_stop"}));
        }
        Api::Embeddings => {}
    }
    out.into_bytes()
}

/// Meters an SSE response body while it is forwarded.
#[derive(Debug)]
pub struct StreamMeter {
    strip: bool,
    align: bool,
    max_event_bytes: usize,
    scanner: SseScanner,
    state: StreamState,
    /// Bytes not yet forwarded: the start of the current incomplete event.
    held: Vec<u8>,
    /// Stream offset of `held[0]`; everything before it has been forwarded or dropped.
    held_from: u64,
    /// An incomplete event already released early (it cannot be the usage chunk).
    released_event: Option<u64>,
    /// How much of `held` the usage-chunk check has already searched.
    checked: usize,
    /// Ranges of events to drop from this feed's output (reused allocation).
    drops: Vec<Range<u64>>,
    ended: bool,
}

impl StreamMeter {
    /// A meter for `api` that forwards everything at once, or that strips the usage-only
    /// chunk when `strip_usage_chunk` (chat/completions only).
    pub fn new(api: Api, strip_usage_chunk: bool) -> Self {
        StreamMeter::with_options(
            api,
            MeterOptions {
                strip_usage_chunk,
                ..MeterOptions::default()
            },
        )
    }

    /// A meter with all options.
    pub fn with_options(api: Api, options: MeterOptions) -> Self {
        StreamMeter {
            strip: options.strip_usage_chunk && api.has_usage_chunk(),
            align: options.align_to_events,
            max_event_bytes: options.max_event_bytes,
            scanner: SseScanner::new(options.max_event_bytes),
            state: StreamState::new(api),
            held: Vec::new(),
            held_from: 0,
            released_event: None,
            checked: 0,
            drops: Vec::new(),
            ended: false,
        }
    }

    /// Reads `chunk` and says what to forward.
    pub fn feed(&mut self, chunk: &[u8]) -> Forward {
        if self.ended {
            // Bytes after the end would be forwarded by a caller that ignored `end`; keep
            // the contract simple and pass them on.
            return Forward::All;
        }
        let chunk_start = self.scanner.position();
        self.state.bytes = self.state.bytes.saturating_add(chunk.len() as u64);
        self.scan(chunk, false);
        if !(self.strip || self.align) {
            return Forward::All;
        }
        let end = chunk_start + chunk.len() as u64;
        self.release(chunk, chunk_start, end)
    }

    /// The upstream body ended: reports a final unterminated event and returns the bytes
    /// still held (to forward before closing the client's body).
    pub fn end(&mut self) -> Forward {
        if self.ended {
            return Forward::Nothing;
        }
        self.ended = true;
        self.scan(&[], true);
        if !(self.strip || self.align) {
            return Forward::Nothing;
        }
        let end = self.scanner.position();
        let out = self.emit(&[], end, end);
        self.held.clear();
        self.held_from = end;
        if out.is_empty() {
            Forward::Nothing
        } else {
            Forward::Bytes(out)
        }
    }

    /// The final figures. Reads a pending unterminated event if [`StreamMeter::end`] was not
    /// called (the bytes it would have returned are then dropped).
    pub fn finish(mut self) -> MeterOutcome {
        if !self.ended {
            self.ended = true;
            self.scan(&[], true);
        }
        self.state.outcome()
    }

    /// The figures so far, e.g. to settle when the client disconnects mid-stream.
    pub fn snapshot(&self) -> MeterOutcome {
        self.state.outcome()
    }

    /// Output tokens so far: the larger of the last reported count and the streamed
    /// estimate.
    pub fn output_tokens_so_far(&self) -> u64 {
        let reported = self.state.reported_output();
        reported.max(self.state.output_estimate)
    }

    /// Whether the bytes forwarded so far end exactly on an event boundary, so that
    /// [`StreamMeter::cutoff_events`] can be appended. Always true with
    /// `align_to_events`, except while an event over `max_event_bytes` passes through
    /// (it is too big to hold); otherwise only between events.
    pub fn at_event_boundary(&self) -> bool {
        match self.scanner.pending_event_start() {
            None => true,
            // Passing through: the partial event's bytes have gone out.
            Some(_) if !(self.strip || self.align) => false,
            Some(start) => start >= self.held_from && self.released_event.is_none(),
        }
    }

    /// The identity seen so far, for [`cutoff_events`].
    pub fn cutoff_context(&self) -> CutoffContext {
        let s = &self.state;
        CutoffContext {
            id: s.id.clone(),
            model: s.model.clone(),
            created: s.created,
            max_choice_index: s.max_choice_index,
            next_sequence_number: s.last_sequence_number.map(|n| n.saturating_add(1)),
            open_content_block: s.open_block,
            output_tokens: self.output_tokens_so_far(),
        }
    }

    /// A clean end of this stream in its own format (see [`cutoff_events`]). Held bytes
    /// of an incomplete event are discarded by the caller, which stops forwarding.
    pub fn cutoff_events(&self) -> Vec<u8> {
        cutoff_events(self.state.api, &self.cutoff_context())
    }

    /// Bytes currently held back (for tests and metrics).
    pub fn held_bytes(&self) -> usize {
        self.held.len()
    }

    fn scan(&mut self, chunk: &[u8], finish: bool) {
        let StreamMeter {
            scanner,
            state,
            drops,
            strip,
            held_from,
            ..
        } = self;
        let forwarded_upto = *held_from;
        let mut on_event = |event: SseEvent<'_>| {
            let usage_only = state.on_event(&event);
            // Only an event none of whose bytes went out can be dropped.
            if *strip && usage_only && event.range.start >= forwarded_upto {
                state.stripped = true;
                drops.push(event.range);
            }
        };
        if finish {
            scanner.finish(&mut on_event);
        } else {
            scanner.feed(chunk, &mut on_event);
        }
    }

    /// Decides which bytes go out after scanning `chunk` (stream offsets
    /// `chunk_start..end`).
    fn release(&mut self, chunk: &[u8], chunk_start: u64, end: u64) -> Forward {
        let pending = self.scanner.pending_event_start();
        if pending.is_none() || pending != self.released_event {
            self.released_event = None;
        }
        let mut cut = match pending {
            Some(start) if self.released_event.is_none() => start.max(self.held_from),
            _ => end,
        };
        if end.saturating_sub(cut) > self.max_event_bytes as u64 {
            // Too big to be anything we would drop; stop holding it.
            self.released_event = pending;
            cut = end;
        }

        // Fast paths: nothing held and nothing dropped.
        if self.held.is_empty() && self.drops.is_empty() {
            if cut == end {
                self.held_from = end;
                return Forward::All;
            }
            if cut == chunk_start {
                self.held.extend_from_slice(chunk);
                self.held_from = chunk_start;
                self.checked = 0;
                return self.release_early(Vec::new(), pending, end);
            }
        }
        // Still inside the same held event: just keep accumulating.
        if cut == self.held_from && self.drops.is_empty() {
            self.held.extend_from_slice(chunk);
            return self.release_early(Vec::new(), pending, end);
        }

        let out = self.emit(chunk, chunk_start, cut);
        let kept = abs_slice(&self.held, self.held_from, chunk, chunk_start, cut..end);
        let new_held = kept.to_vec_pair();
        if cut != self.held_from {
            self.checked = 0;
        }
        self.held = new_held;
        self.held_from = cut;
        self.release_early(out, pending, end)
    }

    /// Releases the held partial event if it can no longer be the usage-only chunk.
    fn release_early(&mut self, mut out: Vec<u8>, pending: Option<u64>, end: u64) -> Forward {
        if self.strip && !self.align && !self.held.is_empty() {
            match choices_verdict(&self.held, self.checked) {
                Verdict::NotUsageOnly => {
                    out.append(&mut self.held);
                    self.held_from = end;
                    self.released_event = pending;
                    self.checked = 0;
                }
                Verdict::Unknown { resume_at } => self.checked = resume_at,
            }
        }
        if out.is_empty() {
            Forward::Nothing
        } else {
            Forward::Bytes(out)
        }
    }

    /// The bytes from `held_from` up to `cut`, minus this round's dropped events.
    fn emit(&mut self, chunk: &[u8], chunk_start: u64, cut: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut from = self.held_from;
        self.drops.sort_by_key(|r| r.start);
        for drop in self.drops.drain(..) {
            let drop_start = drop.start.max(from).min(cut);
            abs_slice(
                &self.held,
                self.held_from,
                chunk,
                chunk_start,
                from..drop_start,
            )
            .append_to(&mut out);
            from = drop.end.max(from).min(cut);
        }
        abs_slice(&self.held, self.held_from, chunk, chunk_start, from..cut).append_to(&mut out);
        out
    }
}

/// A stream range that lies across the held bytes and the current chunk.
struct AbsSlice<'a>(&'a [u8], &'a [u8]);

impl AbsSlice<'_> {
    fn append_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.0);
        out.extend_from_slice(self.1);
    }

    fn to_vec_pair(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.0.len() + self.1.len());
        self.append_to(&mut v);
        v
    }
}

/// The bytes of stream range `range`, where `held` starts at `held_from` and `chunk` at
/// `chunk_start` (right after `held`). Out-of-range parts are empty, never a panic.
fn abs_slice<'a>(
    held: &'a [u8],
    held_from: u64,
    chunk: &'a [u8],
    chunk_start: u64,
    range: Range<u64>,
) -> AbsSlice<'a> {
    let part = |buf: &'a [u8], base: u64| -> &'a [u8] {
        let lo = range.start.max(base);
        let hi = range.end.min(base + buf.len() as u64);
        if lo >= hi {
            return &[];
        }
        let lo = usize::try_from(lo - base).unwrap_or(usize::MAX);
        let hi = usize::try_from(hi - base).unwrap_or(usize::MAX);
        buf.get(lo..hi).unwrap_or_default()
    };
    AbsSlice(part(held, held_from), part(chunk, chunk_start))
}

enum Verdict {
    /// A non-empty `"choices": [` was seen: not the usage-only chunk.
    NotUsageOnly,
    /// Undecided; search again from this offset once more bytes arrive.
    Unknown { resume_at: usize },
}

/// Looks for `"choices"`, optional whitespace, `:`, `[`, then something other than `]` in
/// the raw bytes of a partial event. A quoted `"choices"` with unescaped quotes can only
/// be a JSON key (inside a string value its quotes would be escaped), though possibly a
/// nested one; a nested match only means the event is forwarded unstripped.
fn choices_verdict(buf: &[u8], from: usize) -> Verdict {
    const KEY: &[u8] = b"\"choices\"";
    let mut at = from.min(buf.len());
    while let Some(found) = buf.get(at..).and_then(|rest| memmem::find(rest, KEY)) {
        let key_at = at + found;
        let mut i = key_at + KEY.len();
        let mut expect = [b':', b'['].into_iter();
        let mut want = expect.next();
        loop {
            let Some(&b) = buf.get(i) else {
                return Verdict::Unknown { resume_at: key_at };
            };
            if b.is_ascii_whitespace() {
                i += 1;
                continue;
            }
            match want {
                Some(w) if b == w => {
                    want = expect.next();
                    i += 1;
                }
                Some(_) => break, // not the shape we look for; search on
                None if b == b']' => break,
                None => return Verdict::NotUsageOnly,
            }
        }
        at = key_at + 1;
    }
    // Keep an overlap so a key split across feeds is still found.
    Verdict::Unknown {
        resume_at: buf.len().saturating_sub(KEY.len()),
    }
}

/// Per-stream metering state, fed one event at a time.
#[derive(Debug)]
struct StreamState {
    api: Api,
    events: u64,
    malformed_events: u64,
    oversized_events: u64,
    saw_done: bool,
    saw_error: bool,
    stripped: bool,
    bytes: u64,
    usage: Option<Usage>,
    usage_final: bool,
    anthropic: AnthropicUsage,
    output_estimate: u64,
    id: Option<String>,
    model: Option<String>,
    created: Option<u64>,
    max_choice_index: u64,
    last_sequence_number: Option<u64>,
    open_block: Option<u64>,
}

impl StreamState {
    fn new(api: Api) -> Self {
        StreamState {
            api,
            events: 0,
            malformed_events: 0,
            oversized_events: 0,
            saw_done: false,
            saw_error: false,
            stripped: false,
            bytes: 0,
            usage: None,
            usage_final: false,
            anthropic: AnthropicUsage::default(),
            output_estimate: 0,
            id: None,
            model: None,
            created: None,
            max_choice_index: 0,
            last_sequence_number: None,
            open_block: None,
        }
    }

    fn outcome(&self) -> MeterOutcome {
        MeterOutcome {
            usage: self.usage,
            usage_final: self.usage_final,
            streamed_output_estimate: self.output_estimate,
            saw_done: self.saw_done,
            saw_error: self.saw_error,
            stripped_usage_chunk: self.stripped,
            events: self.events,
            malformed_events: self.malformed_events,
            oversized_events: self.oversized_events,
            bytes: self.bytes,
        }
    }

    fn reported_output(&self) -> u64 {
        self.usage.map_or(0, |u| u.output_tokens)
    }

    fn add_output(&mut self, tokens: u64) {
        self.output_estimate = self.output_estimate.saturating_add(tokens);
    }

    fn remember_identity(&mut self, id: Option<&str>, model: Option<&str>, created: Option<u64>) {
        if self.id.is_none() {
            self.id = id.filter(|s| !s.is_empty()).map(str::to_owned);
        }
        if self.model.is_none() {
            self.model = model.filter(|s| !s.is_empty()).map(str::to_owned);
        }
        if self.created.is_none() {
            self.created = created.filter(|&c| c != 0);
        }
    }

    /// Reads one event; returns whether it is a chat/completions usage-only chunk.
    fn on_event(&mut self, event: &SseEvent<'_>) -> bool {
        self.events += 1;
        if event.oversized {
            self.oversized_events += 1;
            return false;
        }
        let data = event.data;
        match self.api {
            Api::Chat | Api::Completions | Api::Embeddings => self.on_chat(event, data),
            Api::Responses => {
                self.on_responses(data);
                false
            }
            Api::Messages => {
                self.on_messages(event, data);
                false
            }
        }
    }

    fn on_chat(&mut self, event: &SseEvent<'_>, data: &[u8]) -> bool {
        if data.trim_ascii() == b"[DONE]" {
            self.saw_done = true;
            if self.usage.is_some() {
                self.usage_final = true;
            }
            return false;
        }
        if event.event == Some(&b"error"[..]) {
            self.saw_error = true;
        }
        let (usage, choices_empty) = match serde_json::from_slice::<ChatChunk<'_>>(data) {
            Ok(chunk) => {
                self.remember_identity(
                    chunk.id.as_ref().map(|s| s.0.as_ref()),
                    chunk.model.as_ref().map(|s| s.0.as_ref()),
                    chunk.created.and_then(raw_to_u64),
                );
                let choices = chunk.choices.unwrap_or_default();
                for choice in &choices {
                    self.add_output(choice.output_tokens());
                    self.max_choice_index = self.max_choice_index.max(choice.index.unwrap_or(0));
                }
                let usage = chunk.usage.and_then(|raw| usage_from_raw(self.api, raw));
                (usage, choices.is_empty())
            }
            Err(_) => match serde_json::from_slice::<Value>(data) {
                Ok(Value::Object(obj)) => {
                    if obj.contains_key("error") {
                        self.saw_error = true;
                    }
                    let choices = obj.get("choices").and_then(Value::as_array);
                    for choice in choices.into_iter().flatten() {
                        self.add_output(choice_value_tokens(choice));
                    }
                    let usage = obj.get("usage").and_then(|u| usage_from_value(self.api, u));
                    (usage, choices.is_none_or(|c| c.is_empty()))
                }
                _ => {
                    self.malformed_events += 1;
                    return false;
                }
            },
        };
        let Some(usage) = usage else { return false };
        self.usage = Some(usage);
        // With `continuous_usage_stats` every chunk carries usage; it is final only on
        // the usage-only chunk or once `[DONE]` follows.
        self.usage_final = choices_empty;
        choices_empty
    }

    fn on_responses(&mut self, data: &[u8]) {
        let Ok(ev) = serde_json::from_slice::<ResponsesEvent<'_>>(data) else {
            self.malformed_events += 1;
            return;
        };
        if let Some(seq) = ev.sequence_number {
            self.last_sequence_number = Some(seq);
        }
        let kind = ev.kind.0.as_ref();
        if kind.ends_with(".delta") {
            // Audio deltas are base64 audio, not text: their size says nothing useful.
            if kind != "response.audio.delta" {
                if let Some(delta) = ev.delta {
                    self.add_output(raw_text_tokens(delta));
                }
            }
            return;
        }
        let terminal = matches!(
            kind,
            "response.completed" | "response.incomplete" | "response.failed"
        );
        if kind == "error" || kind == "response.failed" {
            self.saw_error = true;
        }
        let Some(head) = ev
            .response
            .and_then(|raw| serde_json::from_str::<ResponseHead<'_>>(raw.get()).ok())
        else {
            if terminal {
                self.saw_done = true;
            }
            return;
        };
        self.remember_identity(
            head.id.as_ref().map(|s| s.0.as_ref()),
            head.model.as_ref().map(|s| s.0.as_ref()),
            head.created_at.and_then(raw_to_u64),
        );
        if terminal {
            self.saw_done = true;
            if let Some(usage) = head
                .usage
                .and_then(|raw| usage_from_raw(Api::Responses, raw))
            {
                self.usage = Some(usage);
                self.usage_final = true;
            }
        }
    }

    fn on_messages(&mut self, event: &SseEvent<'_>, data: &[u8]) {
        if event.event == Some(&b"error"[..]) {
            self.saw_error = true;
        }
        let Ok(ev) = serde_json::from_slice::<MessagesEvent<'_>>(data) else {
            self.malformed_events += 1;
            return;
        };
        match ev.kind.0.as_ref() {
            "content_block_delta" => {
                if let Some(delta) = &ev.delta {
                    self.add_output(delta.output_tokens());
                }
            }
            "content_block_start" => self.open_block = ev.index,
            "content_block_stop" => self.open_block = None,
            "message_start" => {
                let Some(head) = ev
                    .message
                    .and_then(|raw| serde_json::from_str::<MessageHead<'_>>(raw.get()).ok())
                else {
                    return;
                };
                self.remember_identity(
                    head.id.as_ref().map(|s| s.0.as_ref()),
                    head.model.as_ref().map(|s| s.0.as_ref()),
                    None,
                );
                if let Some(first) = head.usage.and_then(AnthropicUsage::from_raw) {
                    self.anthropic.merge(first);
                    self.usage = self.anthropic.normalise();
                }
            }
            "message_delta" => {
                if let Some(later) = ev.usage.and_then(AnthropicUsage::from_raw) {
                    self.anthropic.merge(later);
                    self.usage = self.anthropic.normalise();
                    self.usage_final = true;
                }
            }
            "message_stop" => self.saw_done = true,
            "error" => self.saw_error = true,
            _ => {}
        }
    }
}

/// What a metered non-streamed body amounted to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BodyOutcome {
    /// Usage from the body (or, for a truncated body, from its tail).
    pub usage: Option<Usage>,
    /// Estimated tokens of the generated content, when the body was readable JSON.
    pub output_estimate: u64,
    /// The body exceeded the cap; only its head and tail were kept.
    pub truncated: bool,
    /// The body was not valid JSON (within the cap).
    pub malformed: bool,
    /// Bytes read.
    pub bytes: u64,
}

/// How much of a truncated body's end is kept to look for `usage` in: it closes OpenAI
/// bodies, and embeddings responses are the ones that outgrow a sane cap.
const TAIL_BYTES: usize = 64 * 1024;

/// Meters a non-streamed JSON body, buffering up to `cap` bytes.
#[derive(Debug)]
pub struct BodyMeter {
    api: Api,
    cap: usize,
    buf: Vec<u8>,
    tail: Vec<u8>,
    bytes: u64,
    truncated: bool,
}

impl BodyMeter {
    /// A meter that keeps at most `cap` bytes of the body (plus a 64 KiB tail).
    pub fn new(api: Api, cap: usize) -> Self {
        BodyMeter {
            api,
            cap,
            buf: Vec::new(),
            tail: Vec::new(),
            bytes: 0,
            truncated: false,
        }
    }

    /// Reads the next chunk (the caller forwards it unchanged).
    pub fn feed(&mut self, chunk: &[u8]) {
        self.bytes = self.bytes.saturating_add(chunk.len() as u64);
        if !self.truncated {
            if self.buf.len() + chunk.len() <= self.cap {
                self.buf.extend_from_slice(chunk);
                return;
            }
            self.truncated = true;
            // The tail continues from where the kept head ends.
            let tail_start = self.buf.len().saturating_sub(TAIL_BYTES);
            self.tail = self.buf.get(tail_start..).unwrap_or_default().to_vec();
            // The head is of no further use: a truncated body is not parsed whole.
            self.buf = Vec::new();
        }
        self.tail.extend_from_slice(chunk);
        if self.tail.len() > 2 * TAIL_BYTES {
            let excess = self.tail.len() - TAIL_BYTES;
            self.tail.drain(..excess);
        }
    }

    /// The final figures. `complete`: the body ended where its framing said (the
    /// transport saw its last byte), so its end can be trusted to close the root object
    /// and `usage` is looked for there first ([`usage_from_complete_body`]); a body cut
    /// short (upstream error, client gone) is parsed in full.
    pub fn finish(self, complete: bool) -> BodyOutcome {
        let mut outcome = BodyOutcome {
            truncated: self.truncated,
            bytes: self.bytes,
            ..BodyOutcome::default()
        };
        if self.truncated {
            outcome.usage = usage_from_tail(self.api, &self.tail);
            return outcome;
        }
        outcome.usage = if complete {
            usage_from_complete_body(self.api, &self.buf)
        } else {
            usage_from_body(self.api, &self.buf)
        };
        if outcome.usage.is_none() {
            match serde_json::from_slice::<Value>(&self.buf) {
                Ok(value) => outcome.output_estimate = body_output_tokens(self.api, &value),
                Err(_) => outcome.malformed = true,
            }
        }
        outcome
    }
}

/// The last `"usage": {...}` in a body's tail, parsed on its own.
fn usage_from_tail(api: Api, tail: &[u8]) -> Option<Usage> {
    let at = memmem::rfind(tail, b"\"usage\"")?;
    let rest = tail.get(at + b"\"usage\"".len()..)?.trim_ascii_start();
    let rest = rest.strip_prefix(b":")?;
    usage_from_leading(api, rest)
}

/// Estimated generated tokens of a non-streamed response.
fn body_output_tokens(api: Api, body: &Value) -> u64 {
    let sum = |items: Option<&Value>, f: fn(&Value) -> u64| {
        items
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .fold(0u64, |n, item| n.saturating_add(f(item)))
    };
    match api {
        Api::Chat | Api::Completions => sum(body.get("choices"), choice_value_tokens),
        Api::Responses => sum(body.get("output"), part_tokens),
        Api::Messages => value_text_tokens(body.get("content")),
        Api::Embeddings => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &str = concat!(
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":5,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello world\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n",
        "data: [DONE]\n\n",
    );

    fn usage_event_range() -> Range<usize> {
        let start = CHAT.find("data: {\"id\":\"c1\",\"choices\":[],").unwrap();
        let end = CHAT.find("data: [DONE]").unwrap();
        start..end
    }

    fn run(meter: &mut StreamMeter, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend_from_slice(meter.feed(chunk).bytes(chunk));
        }
        out.extend_from_slice(meter.end().bytes(&[]));
        out
    }

    #[test]
    fn passthrough_forwards_everything_untouched() {
        let mut meter = StreamMeter::new(Api::Chat, false);
        for chunk in CHAT.as_bytes().chunks(7) {
            assert_eq!(meter.feed(chunk), Forward::All);
        }
        assert_eq!(meter.end(), Forward::Nothing);
        let out = meter.finish();
        assert_eq!(
            out.usage.map(|u| (u.input_tokens, u.output_tokens)),
            Some((3, 2))
        );
        assert!(out.usage_final && out.saw_done && !out.stripped_usage_chunk);
        assert_eq!(out.streamed_output_estimate, 3);
        assert_eq!(out.events, 4);
        assert_eq!(out.bytes, CHAT.len() as u64);
    }

    #[test]
    fn strip_removes_exactly_the_usage_chunk_for_any_two_way_split() {
        let input = CHAT.as_bytes();
        let mut expected = input.to_vec();
        expected.drain(usage_event_range());
        for split in 0..=input.len() {
            let (a, b) = input.split_at(split);
            let mut meter = StreamMeter::new(Api::Chat, true);
            let out = run(&mut meter, &[a, b]);
            assert_eq!(out, expected, "split at {split}");
            let outcome = meter.finish();
            assert!(outcome.stripped_usage_chunk);
            assert_eq!(outcome.usage.map(|u| u.total_tokens), Some(5));
        }
    }

    #[test]
    fn strip_never_holds_more_than_the_current_event() {
        let input = CHAT.as_bytes();
        let mut meter = StreamMeter::new(Api::Chat, true);
        for (i, byte) in input.iter().enumerate() {
            let _ = meter.feed(std::slice::from_ref(byte));
            let pending = meter.scanner.pending_event_start();
            match pending {
                // Held bytes are a suffix of the current event.
                Some(start) => assert!(meter.held_bytes() as u64 <= (i as u64 + 1) - start),
                None => assert_eq!(meter.held_bytes(), 0, "at {i}"),
            }
        }
    }

    #[test]
    fn early_release_once_choices_are_non_empty() {
        let mut meter = StreamMeter::new(Api::Chat, true);
        let first = b"data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"He";
        assert_eq!(meter.feed(first), Forward::Bytes(first.to_vec()));
        assert_eq!(meter.held_bytes(), 0);
        assert!(!meter.at_event_boundary());
        // The rest of that event goes straight through.
        assert_eq!(meter.feed(b"llo\"}}]}\n\n"), Forward::All);
        assert!(meter.at_event_boundary());
        // A usage-only chunk in the making is held until complete.
        let usage = b"data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,";
        assert_eq!(meter.feed(usage), Forward::Nothing);
        assert_eq!(meter.held_bytes(), usage.len());
        assert_eq!(
            meter.feed(b"\"completion_tokens\":1}}\n\n"),
            Forward::Nothing
        );
        assert_eq!(meter.feed(b"data: [DONE]\n\n"), Forward::All);
    }

    #[test]
    fn usage_on_a_chunk_with_choices_is_kept() {
        let input = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
        let mut meter = StreamMeter::new(Api::Chat, true);
        assert_eq!(run(&mut meter, &[input]), input.to_vec());
        let out = meter.finish();
        assert!(!out.stripped_usage_chunk);
        assert!(out.usage_final);
        assert_eq!(out.usage.map(|u| u.total_tokens), Some(2));
    }

    #[test]
    fn strip_is_ignored_for_other_apis() {
        let input = b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":1,\"output_tokens\":2}}}\n\n";
        let mut meter = StreamMeter::new(Api::Responses, true);
        assert_eq!(meter.feed(input), Forward::All);
        assert_eq!(meter.finish().usage.map(|u| u.total_tokens), Some(3));
    }

    #[test]
    fn align_mode_forwards_whole_events_only() {
        let mut meter = StreamMeter::with_options(
            Api::Chat,
            MeterOptions {
                align_to_events: true,
                ..MeterOptions::default()
            },
        );
        let input = CHAT.as_bytes();
        let mut out = Vec::new();
        for chunk in input.chunks(10) {
            out.extend_from_slice(meter.feed(chunk).bytes(chunk));
            assert!(meter.at_event_boundary());
            assert!(out.is_empty() || out.ends_with(b"\n\n"));
        }
        out.extend_from_slice(meter.end().bytes(&[]));
        assert_eq!(out, input);
    }

    #[test]
    fn unterminated_usage_chunk_at_end_is_counted() {
        let input =
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":6}}";
        let mut meter = StreamMeter::new(Api::Completions, false);
        assert_eq!(meter.feed(input), Forward::All);
        let out = meter.finish();
        assert_eq!(out.usage.map(|u| u.total_tokens), Some(10));
        assert!(!out.saw_done);
    }

    #[test]
    fn snapshot_mid_stream() {
        let mut meter = StreamMeter::new(Api::Chat, false);
        let head = CHAT.split("\n\n").next().unwrap();
        let _ = meter.feed(format!("{head}\n\n").as_bytes());
        let snap = meter.snapshot();
        assert_eq!(snap.usage, None);
        assert_eq!(snap.streamed_output_estimate, 3);
        assert_eq!(snap.output_tokens(), 3);
        assert_eq!(meter.output_tokens_so_far(), 3);
    }

    #[test]
    fn anthropic_usage_merges_start_and_delta() {
        let input = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude\",\"usage\":{\"input_tokens\":4,\"cache_read_input_tokens\":10,\"output_tokens\":1}}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"abcdefgh\"}}\n\n",
        );
        let mut meter = StreamMeter::new(Api::Messages, false);
        let _ = meter.feed(input.as_bytes());
        let snap = meter.snapshot();
        assert!(!snap.usage_final);
        assert_eq!(
            snap.usage.map(|u| (u.input_tokens, u.output_tokens)),
            Some((14, 1))
        );
        assert_eq!(snap.output_tokens(), 2);
        let cutoff = String::from_utf8(meter.cutoff_events()).unwrap();
        assert!(cutoff.starts_with("event: content_block_stop\ndata: "));
        assert!(cutoff.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
        let _ = meter.feed(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":3}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        let out = meter.finish();
        assert!(out.usage_final && out.saw_done);
        assert_eq!(
            out.usage
                .map(|u| (u.input_tokens, u.output_tokens, u.cached_input_tokens)),
            Some((14, 3, 10))
        );
    }

    #[test]
    fn errors_and_garbage_are_counted_not_fatal() {
        let input = b"data: not json\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n";
        let mut meter = StreamMeter::new(Api::Messages, false);
        let _ = meter.feed(input);
        let out = meter.finish();
        assert_eq!(out.malformed_events, 1);
        assert!(out.saw_error);
        assert_eq!(out.usage, None);
    }

    #[test]
    fn cutoff_chat_and_responses() {
        let mut meter = StreamMeter::new(Api::Chat, false);
        let _ = meter.feed(
            CHAT.split("data: {\"id\":\"c1\",\"choices\":[{")
                .next()
                .unwrap()
                .as_bytes(),
        );
        let text = String::from_utf8(meter.cutoff_events()).unwrap();
        let mut events = text.split("\n\n");
        let chunk: Value =
            serde_json::from_str(events.next().unwrap().strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(chunk["id"], "c1");
        assert_eq!(chunk["model"], "m");
        assert_eq!(chunk["created"], 5);
        assert_eq!(chunk["choices"][0]["finish_reason"], "length");
        assert_eq!(events.next(), Some("data: [DONE]"));

        let ctx = CutoffContext {
            id: Some("resp_1".into()),
            next_sequence_number: Some(9),
            ..CutoffContext::default()
        };
        let text = String::from_utf8(cutoff_events(Api::Responses, &ctx)).unwrap();
        let data = text
            .strip_prefix("event: response.incomplete\ndata: ")
            .and_then(|t| t.strip_suffix("\n\n"))
            .unwrap();
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["sequence_number"], 9);
        assert_eq!(v["response"]["id"], "resp_1");
        assert_eq!(
            v["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );
        // Our own cutoff reads back as a clean end.
        let mut check = StreamMeter::new(Api::Responses, false);
        let _ = check.feed(text.as_bytes());
        assert!(check.finish().saw_done);
        assert!(cutoff_events(Api::Embeddings, &ctx).is_empty());
    }

    #[test]
    fn choices_verdict_cases() {
        let not = |s: &str| matches!(choices_verdict(s.as_bytes(), 0), Verdict::NotUsageOnly);
        assert!(not(r#"{"choices":[{"#));
        assert!(not(r#"{"choices" : [ {"#));
        assert!(!not(r#"{"choices":[]"#));
        assert!(!not(r#"{"choices":[ "#));
        assert!(!not(r#"{"choices""#));
        assert!(!not(r#"{"content":"\"choices\":[1]"}"#));
        // A non-matching earlier occurrence does not stop the search.
        assert!(not(r#"{"a":{"choices":5},"choices":[{"#));
        match choices_verdict(br#"{"id":"x","choices":["#, 0) {
            Verdict::Unknown { resume_at } => assert_eq!(resume_at, 10),
            Verdict::NotUsageOnly => panic!("undecided input"),
        }
    }

    #[test]
    fn body_meter_usage_and_estimates() {
        let mut meter = BodyMeter::new(Api::Chat, 1024);
        meter.feed(br#"{"choices":[{"message":{"content":"abcdefgh"}}],"#);
        meter.feed(br#""usage":{"prompt_tokens":3,"completion_tokens":2}}"#);
        let out = meter.finish(true);
        assert_eq!(out.usage.map(|u| u.total_tokens), Some(5));
        assert!(!out.truncated && !out.malformed);

        let mut meter = BodyMeter::new(Api::Messages, 1024);
        meter.feed(br#"{"content":[{"type":"text","text":"abcdefgh"},{"type":"tool_use","input":{"q":"x"}}]}"#);
        let out = meter.finish(true);
        assert_eq!(out.usage, None);
        assert_eq!(out.output_estimate, 2 + 3);

        let mut meter = BodyMeter::new(Api::Chat, 1024);
        meter.feed(b"<html>502</html>");
        let out = meter.finish(true);
        assert!(out.malformed);
        assert_eq!((out.usage, out.output_estimate), (None, 0));
    }

    #[test]
    fn body_meter_truncated_reads_usage_from_tail() {
        let mut meter = BodyMeter::new(Api::Embeddings, 100);
        meter.feed(br#"{"object":"list","data":[{"embedding":["#);
        for _ in 0..20_000 {
            meter.feed(b"0.0123456789,");
        }
        meter.feed(br#"1.0]}],"model":"e","usage":{"prompt_tokens":8,"total_tokens":8}}"#);
        let out = meter.finish(true);
        assert!(out.truncated);
        assert_eq!(out.usage.map(|u| u.input_tokens), Some(8));
        assert!(out.bytes > 260_000);
    }
}
