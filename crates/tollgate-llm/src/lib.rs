//! LLM wire formats, with no sockets and no async runtime.
//!
//! What is inside, in the order a request meets it:
//!
//! - [`api`]: which API a path speaks ([`Api::from_path`]).
//! - [`request`]: [`inspect_request`] parses the JSON body once (refusing duplicate keys
//!   at any depth, so gateway and upstream cannot read different values) and returns
//!   what the limits need: model, stream flags, output cap, `n`, a prompt-token estimate
//!   and the prompt text for an exact tokeniser.
//! - [`estimate`]: the fast token heuristic behind those estimates.
//! - [`rewrite`]: [`ensure_stream_usage`] makes streamed chat/completions calls report
//!   usage (`stream_options.include_usage`).
//! - [`sse`]: [`SseScanner`], an incremental byte-level SSE scanner that reports each
//!   event with its byte range in the stream.
//! - [`meter`]: what the proxy wraps around the upstream body. [`StreamMeter`] reads an
//!   SSE body as it is forwarded (unchanged, except for the usage chunk the gateway
//!   itself asked for) and yields the usage, or an estimate of what was streamed;
//!   [`BodyMeter`] does the same for non-streamed bodies.
//! - [`usage`]: provider usage objects normalised to one [`Usage`].
//!
//! The proxy's use: `Api::from_path` → `inspect_request` (refuse on error, admit with
//! `prompt_tokens_estimate` + `output_reservation`) → `ensure_stream_usage` when
//! streaming → forward → `StreamMeter::feed` each chunk, sending what
//! [`Forward`] says → `StreamMeter::end` and `finish` (or `snapshot` when the client
//! goes away) → settle with the [`MeterOutcome`].

pub mod api;
pub mod estimate;
pub mod exact;
mod json;
pub mod meter;
pub mod request;
pub mod rewrite;
pub mod sse;
pub mod usage;
mod wire;

pub use api::Api;
pub use estimate::{estimate_output_tokens, estimate_tokens, EstimateConfig};
pub use exact::{bpe_tokens, exact_prompt_tokens};
pub use meter::{
    cutoff_events, BodyMeter, BodyOutcome, CutoffContext, Forward, MeterOptions, MeterOutcome,
    StreamMeter,
};
pub use request::{inspect_request, inspect_request_with, LlmRequest, MediaCounts, RequestError};
pub use rewrite::ensure_stream_usage;
pub use sse::{OwnedSseEvent, SseEvent, SseScanner, DEFAULT_MAX_EVENT_BYTES};
pub use usage::{gemini_usage_from_body, usage_from_body, usage_from_complete_body, Usage};
