//! Metering and settlement: what a call really cost, charged exactly once.
//!
//! [`CallMeter`] sits in the response body. It feeds each chunk to the wire-format
//! meter (SSE for streams, a capped buffer for JSON) and, when the body ends — completed,
//! cut by the upstream, or dropped by a client that left — hands the usage to
//! [`Settle`], which charges every token counter of the admission's windows and releases
//! reservations and in-flight slots.
//!
//! What is charged:
//! - usage present → its cost, whatever the status;
//! - no usage, status ≥ 400 → nothing (an error does not eat quota);
//! - no usage otherwise (missing, stream cut, client gone, malformed body) → an estimate:
//!   prompt estimated from the request plus output counted from the content actually
//!   returned, marked `estimated` in logs and metrics.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::Method;
use tollgate_limits::cel::Attrs;
use tollgate_limits::policy::{cost, OpOrigin, TokenFigures};
use tollgate_limits::store::ReservationId;
use tollgate_limits::{CounterKind, CounterOp, Settlement};
use tollgate_llm::{Api, LlmRequest, Usage};

use super::body::{BodyEnd, ChunkMeter};
use super::Gateway;
use crate::runtime::Runtime;

/// Default output tokens assumed for a reservation when the request sets no cap.
pub const DEFAULT_OUTPUT_RESERVATION: u64 = 1024;

/// The pre-call estimate used for reservations and as the prompt part of estimates.
pub fn estimate(llm: &LlmRequest) -> TokenFigures {
    let input = llm.prompt_tokens_estimate;
    let output = llm.output_reservation(DEFAULT_OUTPUT_RESERVATION);
    TokenFigures {
        input_tokens: input,
        output_tokens: output,
        total_tokens: input.saturating_add(output),
        ..Default::default()
    }
}

pub fn figures(u: &Usage) -> TokenFigures {
    TokenFigures {
        input_tokens: u.input_tokens,
        output_tokens: u.output_tokens,
        cached_input_tokens: u.cached_input_tokens,
        cache_creation_input_tokens: u.cache_creation_input_tokens,
        reasoning_tokens: u.reasoning_tokens,
        total_tokens: u.total_tokens,
    }
}

/// Everything needed to settle one admitted call.
pub struct Settle {
    pub gw: Arc<Gateway>,
    pub rt: Arc<Runtime>,
    pub attrs: Attrs,
    pub ops: Vec<CounterOp>,
    pub origins: Vec<OpOrigin>,
    pub window_starts: Vec<u64>,
    pub reservation: ReservationId,
    pub estimate: TokenFigures,
    pub request_id: String,
    pub route: Arc<str>,
    pub identity: Arc<str>,
    pub model: Option<String>,
    pub method: Method,
    pub path: String,
    pub started: Instant,
    pub status: u16,
    pub estimated: bool,
}

impl Settle {
    /// The call never reached the upstream: release everything, charge nothing.
    pub fn release_now(&mut self) {
        self.charge(None, false, "released");
    }

    /// Charge `usage` (None = nothing) on every token counter and release reservations.
    fn charge(&mut self, usage: Option<TokenFigures>, estimated: bool, end: &'static str) {
        let now = self.gw.clock.now_ms();
        let mut settlements = Vec::with_capacity(self.ops.len());
        let mut charged = 0u64;
        for ((op, origin), window_start) in self
            .ops
            .iter()
            .zip(self.origins.iter())
            .zip(self.window_starts.iter())
        {
            let actual = match (origin.kind, usage.as_ref()) {
                (CounterKind::Tokens, Some(u)) => {
                    let policy = &self.rt.policies[origin.policy];
                    match cost(policy, u, &self.attrs) {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(policy = %policy.name, error = %e, "cost expression failed; charging total tokens");
                            u.total_tokens
                        }
                    }
                }
                _ => 0,
            };
            if origin.kind == CounterKind::Tokens {
                charged = charged.max(actual);
            }
            if actual == 0 && op.reserve == 0 {
                continue;
            }
            settlements.push(Settlement {
                op: op.clone(),
                window_start: *window_start,
                reservation: self.reservation,
                actual,
            });
        }
        // Clear so a second call (drop after end) settles nothing twice.
        self.ops.clear();
        self.origins.clear();
        self.window_starts.clear();

        let figures = usage.unwrap_or_default();
        self.gw.stats.tokens(&figures, estimated);
        if self.rt.access_log {
            tracing::info!(
                target: "tollgate::access",
                id = %self.request_id,
                method = %self.method,
                path = %self.path,
                route = %self.route,
                identity = %self.identity,
                model = %self.model.as_deref().unwrap_or("-"),
                status = self.status,
                decision = "allowed",
                end,
                input_tokens = figures.input_tokens,
                output_tokens = figures.output_tokens,
                total_tokens = figures.total_tokens,
                charged,
                estimated,
                duration_us = self.started.elapsed().as_micros() as u64,
                "request"
            );
        }
        if settlements.is_empty() {
            return;
        }
        let store = self.gw.store.clone();
        let gw = self.gw.clone();
        let fut = async move {
            if let Err(e) = store.settle(now, &settlements).await {
                gw.stats.settle_failed();
                tracing::error!(error = %e, "settlement failed; tokens not recorded");
            }
        };
        // A store that answers at once (memory) settles inline, before the client sees
        // the end of the body; one that must wait (network) finishes on its own task.
        let mut fut = Box::pin(fut);
        if futures_util::FutureExt::now_or_never(&mut fut).is_none() {
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn(fut);
                }
                Err(_) => {
                    self.gw.stats.settle_failed();
                    tracing::error!("no runtime to settle on; tokens not recorded");
                }
            }
        }
    }
}

enum Wire {
    /// Not an LLM call: nothing to meter.
    None,
    Stream(Box<tollgate_llm::StreamMeter>),
    Body(Box<tollgate_llm::BodyMeter>),
}

pub struct CallMeter {
    settle: Settle,
    wire: Wire,
    strip: bool,
}

impl CallMeter {
    pub fn new(
        settle: Settle,
        api: Option<Api>,
        stream: bool,
        strip_usage: bool,
        buffer_cap: u64,
    ) -> Self {
        let wire = match api {
            None => Wire::None,
            Some(api) if stream => {
                Wire::Stream(Box::new(tollgate_llm::StreamMeter::new(api, strip_usage)))
            }
            Some(api) => Wire::Body(Box::new(tollgate_llm::BodyMeter::new(
                api,
                usize::try_from(buffer_cap).unwrap_or(usize::MAX),
            ))),
        };
        Self {
            settle,
            wire,
            strip: strip_usage && stream,
        }
    }
}

impl ChunkMeter for CallMeter {
    fn on_chunk(&mut self, chunk: Bytes) -> Bytes {
        match &mut self.wire {
            Wire::None => chunk,
            Wire::Body(m) => {
                m.feed(&chunk);
                chunk
            }
            Wire::Stream(m) => match m.feed(&chunk) {
                tollgate_llm::Forward::All => chunk,
                tollgate_llm::Forward::Bytes(b) => Bytes::from(b),
                tollgate_llm::Forward::Nothing => Bytes::new(),
            },
        }
    }

    fn on_end(&mut self, end: BodyEnd) -> Bytes {
        let status = self.settle.status;
        let end_label = match end {
            BodyEnd::Complete => "complete",
            BodyEnd::UpstreamError => "upstream_error",
            BodyEnd::ClientGone => "client_gone",
        };
        // `complete_usage`: the provider's own final figures; `partial`: figures that
        // still need the streamed estimate (e.g. Anthropic's message_start alone).
        let (usage, complete_usage, output_estimate, rest) =
            match std::mem::replace(&mut self.wire, Wire::None) {
                Wire::None => {
                    self.settle.charge(None, false, end_label);
                    return Bytes::new();
                }
                Wire::Body(m) => {
                    let out = m.finish();
                    // A body we could not read (truncated, not JSON) says nothing about
                    // its output: assume what the request allowed (max_tokens × n, or
                    // the default), the same figure a reservation holds.
                    let output = if (out.truncated || out.malformed) && out.output_estimate == 0 {
                        self.settle.estimate.output_tokens
                    } else {
                        out.output_estimate
                    };
                    (out.usage, true, output, Bytes::new())
                }
                Wire::Stream(mut m) => {
                    let rest = if end == BodyEnd::Complete {
                        match m.end() {
                            tollgate_llm::Forward::Bytes(b) => Bytes::from(b),
                            _ => Bytes::new(),
                        }
                    } else {
                        Bytes::new()
                    };
                    let out = m.finish();
                    let output = out.output_tokens();
                    let usage = out.usage.map(|mut u| {
                        if !out.usage_final {
                            u.output_tokens = output;
                            u.total_tokens = u.input_tokens.saturating_add(output);
                        }
                        u
                    });
                    (usage, out.usage_final, output, rest)
                }
            };
        match usage {
            Some(u) => self
                .settle
                .charge(Some(figures(&u)), !complete_usage, end_label),
            None if status >= 400 => self.settle.charge(None, false, end_label),
            None => {
                let input = self.settle.estimate.input_tokens;
                let est = TokenFigures {
                    input_tokens: input,
                    output_tokens: output_estimate,
                    total_tokens: input.saturating_add(output_estimate),
                    ..Default::default()
                };
                self.settle.estimated = true;
                self.settle.charge(Some(est), true, end_label);
            }
        }
        rest
    }

    fn passthrough(&self) -> bool {
        !self.strip
    }
}
