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
use tollgate_limits::policy::{cost, CallEstimate, OpOrigin, TokenFigures};
use tollgate_limits::store::ReservationId;
use tollgate_limits::{CounterKind, CounterOp, Settlement};
use tollgate_llm::{Api, LlmRequest, Usage};

use super::body::{BodyEnd, ChunkMeter, Step};
use super::Gateway;
use crate::runtime::Runtime;

/// Output assumed for an unreadable response to a request that set no cap.
pub const ASSUMED_OUTPUT_TOKENS: u64 = 1024;

/// What is known about a call before it is made (prompt from the fast estimate; the
/// pipeline replaces it with an exact count when a policy asks for one).
pub fn estimate(llm: &LlmRequest) -> CallEstimate {
    CallEstimate {
        input_tokens: llm.prompt_tokens_estimate,
        max_output_tokens: llm.max_output_tokens,
        n: llm.n.max(1),
        generates_output: llm.api != Api::Embeddings,
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
    pub estimate: CallEstimate,
    pub request_id: String,
    pub route: Arc<str>,
    pub backend: Arc<str>,
    pub identity: Arc<str>,
    pub model: Option<String>,
    pub method: Method,
    pub path: String,
    pub started: Instant,
    pub status: u16,
    pub estimated: bool,
    /// The request went to the upstream: from here on, a call dropped before its response
    /// (the client left) has cost the prompt at least.
    pub sent_upstream: bool,
    /// Charged (or released) already; `Drop` settles a call nobody settled.
    pub done: bool,
}

/// Status logged for a call whose client left before the response (nginx's 499).
const CLIENT_CLOSED_REQUEST: u16 = 499;

impl Drop for Settle {
    /// A call dropped before its response (the client left while the upstream was still
    /// answering, so the pipeline future was cancelled) is settled here: charged the
    /// prompt estimate if the request had gone upstream, else released. Without this its
    /// reservation would be held until the deadline and the call never logged.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if !self.sent_upstream {
            self.release_now();
            return;
        }
        self.status = CLIENT_CLOSED_REQUEST;
        self.estimated = true;
        let input = self.estimate.input_tokens;
        let est = TokenFigures {
            input_tokens: input,
            total_tokens: input,
            ..Default::default()
        };
        self.charge(Some(est), true, "client_gone");
    }
}

impl Settle {
    /// Tokens by route, model, policy, limit and type, once per (policy, limit).
    fn token_metrics(&self, origins: &[OpOrigin], f: &TokenFigures, estimated: bool) {
        let m = &self.gw.stats.metrics;
        let model = m.model_label(self.model.as_deref());
        let mut seen: Vec<(usize, usize)> = Vec::new();
        for o in origins.iter().filter(|o| o.kind == CounterKind::Tokens) {
            if seen.contains(&(o.policy, o.limit)) {
                continue;
            }
            seen.push((o.policy, o.limit));
            let Some(p) = self.rt.policies.get(o.policy) else {
                continue;
            };
            let limit = p.limits.get(o.limit).map_or("", |l| &*l.name);
            let types: [(&str, u64); 4] = if estimated {
                [
                    ("estimated", f.total_tokens),
                    ("prompt", 0),
                    ("completion", 0),
                    ("cached", 0),
                ]
            } else {
                [
                    ("prompt", f.input_tokens),
                    ("completion", f.output_tokens),
                    ("cached", f.cached_input_tokens),
                    ("estimated", 0),
                ]
            };
            for (t, n) in types {
                if n == 0 {
                    continue;
                }
                m.add_tokens(&self.route, model, &p.name, limit, t, n);
            }
        }
    }

    /// The call never reached the upstream: release everything, charge nothing.
    pub fn release_now(&mut self) {
        self.charge(None, false, "released");
    }

    /// Charge `usage` (None = nothing) on every token counter and release reservations.
    fn charge(&mut self, usage: Option<TokenFigures>, estimated: bool, end: &'static str) {
        self.done = true;
        let now = self.gw.clock.now_ms();
        let mut settlements = Vec::with_capacity(self.ops.len());
        let mut charged = 0u64;
        // Taken, so a second call (drop after end) settles nothing twice.
        let ops = std::mem::take(&mut self.ops);
        let origins = std::mem::take(&mut self.origins);
        let window_starts = std::mem::take(&mut self.window_starts);
        // A policy's cost is the same for all its counters (tiers): price it once.
        let mut costs: Vec<(usize, u64)> = Vec::new();
        for ((op, origin), window_start) in ops.into_iter().zip(origins.iter()).zip(window_starts) {
            let actual = match (origin.kind, usage.as_ref()) {
                (CounterKind::Tokens, Some(u)) => {
                    match costs.iter().find(|(p, _)| *p == origin.policy) {
                        Some(&(_, c)) => c,
                        None => {
                            let policy = &self.rt.policies[origin.policy];
                            let c = cost(policy, u, &self.attrs).unwrap_or_else(|e| {
                                tracing::warn!(policy = %policy.name, error = %e, "cost expression failed; charging total tokens");
                                u.total_tokens
                            });
                            costs.push((origin.policy, c));
                            c
                        }
                    }
                }
                _ => 0,
            };
            if origin.kind == CounterKind::Tokens {
                charged = charged.max(actual);
                // The guarantee "never above the limit" holds for calls that bound their
                // output; where a default was assumed and passed, count the overshoot.
                if op.reserve > 0
                    && actual > op.reserve
                    && self.estimate.max_output_tokens.is_none()
                {
                    self.gw.stats.reservation_overshoot(actual - op.reserve);
                }
            }
            if actual == 0 && op.reserve == 0 {
                continue;
            }
            settlements.push(Settlement {
                op,
                window_start,
                reservation: self.reservation,
                actual,
            });
        }

        let figures = usage.unwrap_or_default();
        if end != "released" {
            let stats = &self.gw.stats;
            stats.served(now, &self.route, &self.backend, self.status);
            if estimated {
                stats.metrics.estimated_calls.inc();
            }
            self.token_metrics(&origins, &figures, estimated);
            if usage.is_some() {
                let policy = origins
                    .iter()
                    .find(|o| o.kind == CounterKind::Tokens)
                    .and_then(|o| self.rt.policies.get(o.policy))
                    .map_or("-", |p| &*p.name);
                self.gw.usage.record(
                    now,
                    &self.identity,
                    policy,
                    self.model.as_deref().unwrap_or("-"),
                    figures.input_tokens,
                    figures.output_tokens,
                    figures.total_tokens,
                    estimated,
                );
            }
        }
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
        let pending = super::PendingSettlement::new(&self.gw);
        let fut = async move {
            let _pending = pending;
            let t = std::time::Instant::now();
            let r = store.settle(now, &settlements).await;
            gw.stats
                .metrics
                .observe_store("settle", t.elapsed(), r.is_ok());
            if let Err(e) = r {
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

/// A stream's hard cap: the cost (under each cutoff policy) it may reach.
pub struct Cutoff {
    /// (policy index, tokens its tightest counter had left at admission).
    pub allowances: Vec<(usize, u64)>,
}

pub struct CallMeter {
    settle: Settle,
    first_byte_seen: bool,
    wire: Wire,
    strip: bool,
    cutoff: Option<Cutoff>,
}

impl CallMeter {
    pub fn new(
        settle: Settle,
        api: Option<Api>,
        stream: bool,
        strip_usage: bool,
        buffer_cap: u64,
        cutoff: Option<Cutoff>,
    ) -> Self {
        let cutoff = cutoff.filter(|_| stream);
        let wire = match api {
            None => Wire::None,
            Some(api) if stream => Wire::Stream(Box::new(tollgate_llm::StreamMeter::with_options(
                api,
                tollgate_llm::MeterOptions {
                    strip_usage_chunk: strip_usage,
                    // A cutoff may be appended only between whole events.
                    align_to_events: cutoff.is_some(),
                    ..Default::default()
                },
            ))),
            Some(api) => Wire::Body(Box::new(tollgate_llm::BodyMeter::new(
                api,
                usize::try_from(buffer_cap).unwrap_or(usize::MAX),
            ))),
        };
        Self {
            settle,
            first_byte_seen: false,
            strip: (strip_usage && stream) || cutoff.is_some(),
            wire,
            cutoff,
        }
    }

    /// Whether the stream's cost so far passes what any cutoff policy allows.
    fn over_allowance(&self, m: &tollgate_llm::StreamMeter) -> bool {
        let Some(c) = &self.cutoff else {
            return false;
        };
        let snap = m.snapshot();
        let output = m.output_tokens_so_far();
        let input = snap
            .usage
            .map(|u| u.input_tokens)
            .unwrap_or(self.settle.estimate.input_tokens);
        let so_far = TokenFigures {
            input_tokens: input,
            output_tokens: output,
            total_tokens: input.saturating_add(output),
            ..Default::default()
        };
        c.allowances.iter().any(|(pi, allowed)| {
            self.settle
                .rt
                .policies
                .get(*pi)
                .map(|p| {
                    cost(p, &so_far, &self.settle.attrs).unwrap_or(so_far.total_tokens) > *allowed
                })
                .unwrap_or(false)
        })
    }
}

impl ChunkMeter for CallMeter {
    fn on_chunk(&mut self, chunk: Bytes) -> Step {
        if !self.first_byte_seen && !chunk.is_empty() {
            self.first_byte_seen = true;
            if matches!(self.wire, Wire::Stream(_)) {
                let s = &self.settle;
                s.gw.stats
                    .metrics
                    .observe_first_token(&s.route, &s.backend, s.started.elapsed());
            }
        }
        let out = match &mut self.wire {
            Wire::None => return Step::Forward(chunk),
            Wire::Body(m) => {
                m.feed(&chunk);
                return Step::Forward(chunk);
            }
            Wire::Stream(m) => match m.feed(&chunk) {
                tollgate_llm::Forward::All => chunk,
                tollgate_llm::Forward::Bytes(b) => Bytes::from(b),
                tollgate_llm::Forward::Nothing => Bytes::new(),
            },
        };
        let cut = match &self.wire {
            Wire::Stream(m) => self.over_allowance(m) && !m.snapshot().saw_done,
            _ => false,
        };
        if !cut {
            return Step::Forward(out);
        }
        // Hard cap reached: end the stream cleanly in the client's own format and charge
        // what was generated (upstream usage if it came, else the count).
        let Wire::Stream(m) = std::mem::replace(&mut self.wire, Wire::None) else {
            return Step::Forward(out);
        };
        let tail = m.cutoff_events();
        let outcome = m.finish();
        let output = outcome.output_tokens();
        let input = outcome
            .usage
            .map(|u| u.input_tokens)
            .unwrap_or(self.settle.estimate.input_tokens);
        let figures = TokenFigures {
            input_tokens: input,
            output_tokens: output,
            total_tokens: input.saturating_add(output),
            ..Default::default()
        };
        self.settle.gw.stats.stream_cutoff();
        tracing::info!(request = %self.settle.request_id, output_tokens = output, "stream cut off: budget reached");
        self.settle
            .charge(Some(figures), !outcome.usage_final, "cutoff");
        let mut all = Vec::with_capacity(out.len() + tail.len());
        all.extend_from_slice(&out);
        all.extend_from_slice(&tail);
        Step::Last(Bytes::from(all))
    }

    fn on_end(&mut self, end: BodyEnd) -> Bytes {
        let status = self.settle.status;
        let end_label = match end {
            BodyEnd::Complete => "complete",
            BodyEnd::UpstreamError => "upstream_error",
            BodyEnd::ClientGone => "client_gone",
            BodyEnd::UpstreamIdle => "upstream_idle",
        };
        if end == BodyEnd::UpstreamIdle {
            self.settle.gw.stats.metrics.upstream_idle_timeouts.inc();
            tracing::warn!(request = %self.settle.request_id, "upstream went silent; response ended");
        }
        // `complete_usage`: the provider's own final figures; `partial`: figures that
        // still need the streamed estimate (e.g. Anthropic's message_start alone).
        let (usage, complete_usage, output_estimate, rest) =
            match std::mem::replace(&mut self.wire, Wire::None) {
                Wire::None => {
                    self.settle.charge(None, false, end_label);
                    return Bytes::new();
                }
                Wire::Body(m) => {
                    let out = m.finish(end == BodyEnd::Complete);
                    // A body we could not read (truncated, not JSON) says nothing about
                    // its output: assume what the request allowed (max_tokens × n, or
                    // the default), the same figure a reservation holds.
                    let output = if (out.truncated || out.malformed) && out.output_estimate == 0 {
                        self.settle
                            .estimate
                            .figures(ASSUMED_OUTPUT_TOKENS)
                            .output_tokens
                    } else {
                        out.output_estimate
                    };
                    (out.usage, true, output, Bytes::new())
                }
                Wire::Stream(mut m) => {
                    let rest = match end {
                        BodyEnd::Complete => match m.end() {
                            tollgate_llm::Forward::Bytes(b) => Bytes::from(b),
                            _ => Bytes::new(),
                        },
                        // Close the stream in the client's own format where that can
                        // be appended cleanly (held bytes of a partial event are
                        // dropped); mid-event, the body just ends.
                        BodyEnd::UpstreamIdle
                            if m.at_event_boundary() && !m.snapshot().saw_done =>
                        {
                            Bytes::from(m.cutoff_events())
                        }
                        _ => Bytes::new(),
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
