//! Built-in simulated LLM: an OpenAI- and Anthropic-compatible fake upstream.
//!
//! The gateway uses it in-process as its default upstream, and `tollgate sim` serves it on a
//! socket. It answers `GET /v1/models` and `POST /v1/chat/completions`, `/v1/completions`,
//! `/v1/responses`, `/v1/embeddings` and `/v1/messages`, streaming or not, with the wire
//! shapes of the real APIs and **deterministic usage**, so tests can predict to the token
//! what the gateway must charge.
//!
//! A request moves through [`Simulator::handle`] in this order:
//! 1. `GET /healthz` and `GET /sim/stats` are answered at once (and not counted);
//! 2. every other request is counted ([`Simulator::requests_served`]);
//! 3. the `x-sim-*` headers are read ([`options`]): fault, latency overrides, echo;
//! 4. the latency before the first byte is waited out;
//! 5. the path picks the [`Api`]; the JSON body is parsed into a request spec
//!    ([`api`]: token rules live there);
//! 6. a fault, if asked for, replaces or damages the reply;
//! 7. the reply is rendered ([`render`]): a whole JSON body after `completion_tokens ×
//!    ms_per_token`, or an SSE stream whose token events are spaced `ms_per_token` apart
//!    ([`body`]).
//!
//! [`serve`] puts a [`Simulator`] on a TCP listener (hyper 1, HTTP/1.1 and h2c, keep-alive).

pub mod api;
mod body;
pub mod options;
pub mod render;
mod server;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use serde_json::{json, Value};

pub use api::{completion_tokens_for, prompt_tokens_for, Api};
pub use body::SimBody;
pub use options::Fault;
pub use server::serve;

use api::RequestSpec;
use body::{full, SseScript, TimedBody};
use options::RequestOptions;
use render::ReplyMeta;

/// How the simulator behaves by default (headers can override per request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// Model listed by `/v1/models` and reported when a request names none.
    pub model: String,
    /// Wait before the first byte of every reply.
    pub latency_ms: u64,
    /// Wait per generated token (between stream events; summed for whole bodies).
    pub ms_per_token: u64,
    /// Completion tokens per choice when the request sets no limit.
    pub default_max_tokens: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            model: "sim-model".to_owned(),
            latency_ms: 0,
            ms_per_token: 0,
            default_max_tokens: 16,
        }
    }
}

/// The simulated LLM. Cheap to share behind an `Arc`; all state is one counter.
#[derive(Debug)]
pub struct Simulator {
    cfg: SimConfig,
    /// Requests counted (everything but `/healthz` and `/sim/stats`). Relaxed: a statistic,
    /// read by tests after the requests they made have completed.
    served: AtomicU64,
}

const JSON: HeaderValue = HeaderValue::from_static("application/json");
const EVENT_STREAM: HeaderValue = HeaderValue::from_static("text/event-stream; charset=utf-8");

impl Simulator {
    pub fn new(cfg: SimConfig) -> Self {
        Simulator {
            cfg,
            served: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// Requests counted so far (see the type's doc for which).
    pub fn requests_served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Usage this simulator reports for `body` on `api` without faults:
    /// `(prompt_tokens, completion_tokens)`, or `None` when the body would be refused.
    pub fn expected_usage(&self, api: Api, body: &Value) -> Option<(u64, u64)> {
        RequestSpec::parse(api, body, self.cfg.default_max_tokens)
            .ok()
            .map(|spec| (spec.prompt_tokens, spec.completion_tokens()))
    }

    /// Handle one request whose body has already been read. Works in-process (no socket).
    /// `path` is the path only (no query).
    pub async fn handle(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Response<SimBody> {
        match (method, path) {
            (&Method::GET, "/healthz") => return text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/sim/stats") => {
                let stats = json!({"requests": self.requests_served()});
                return json_response(StatusCode::OK, stats.to_string().into_bytes());
            }
            _ => {}
        }
        let seq = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        let opts =
            match RequestOptions::from_headers(headers, self.cfg.latency_ms, self.cfg.ms_per_token)
            {
                Ok(opts) => opts,
                Err(message) => return invalid(false, &message, None),
            };
        if !opts.latency.is_zero() {
            tokio::time::sleep(opts.latency).await;
        }
        let mut response = self.reply(method, path, body, &opts, seq).await;
        if opts.echo {
            echo_headers(headers, response.headers_mut());
        }
        response
    }

    async fn reply(
        &self,
        method: &Method,
        path: &str,
        body: Bytes,
        opts: &RequestOptions,
        seq: u64,
    ) -> Response<SimBody> {
        if path == "/v1/models" {
            if method != Method::GET {
                return method_not_allowed(false);
            }
            let list = json!({"object": "list", "data": [
                {"id": self.cfg.model, "object": "model", "created": 0, "owned_by": "tollgate-sim"}
            ]});
            return json_response(StatusCode::OK, list.to_string().into_bytes());
        }
        let Some(api) = Api::from_path(path) else {
            let body = render::error_body(
                false,
                "invalid_request_error",
                &format!("Unknown request URL: {method} {path}."),
                None,
                Some("unknown_url"),
                None,
            );
            return json_response(StatusCode::NOT_FOUND, body);
        };
        let anthropic = api.is_anthropic();
        if method != Method::POST {
            return method_not_allowed(anthropic);
        }
        match opts.fault {
            Some(Fault::Status500) => {
                let body = render::error_body(
                    anthropic,
                    if anthropic { "api_error" } else { "server_error" },
                    "The server had an error while processing your request (x-sim-fault: status-500).",
                    None,
                    None,
                    None,
                );
                return json_response(StatusCode::INTERNAL_SERVER_ERROR, body);
            }
            Some(Fault::Status429) => {
                let body = render::error_body(
                    anthropic,
                    if anthropic {
                        "rate_limit_error"
                    } else {
                        "requests"
                    },
                    "Rate limit reached (x-sim-fault: status-429). Please try again in 7s.",
                    None,
                    Some("rate_limit_exceeded"),
                    None,
                );
                let mut response = json_response(StatusCode::TOO_MANY_REQUESTS, body);
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
                return response;
            }
            _ => {}
        }
        let value: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                let message = format!(
                    "We could not parse the JSON body of your request. ({e}) \
                     The request body must be valid JSON."
                );
                return invalid(anthropic, &message, None);
            }
        };
        let spec = match RequestSpec::parse(api, &value, self.cfg.default_max_tokens) {
            Ok(spec) => spec,
            Err(e) => return invalid(anthropic, &e.message, e.param),
        };
        match opts.fault {
            Some(Fault::UsageInError) => {
                let body = render::error_body(
                    anthropic,
                    "invalid_request_error",
                    "The request was refused after processing (x-sim-fault: usage-in-error).",
                    None,
                    Some("sim_usage_in_error"),
                    Some(render::usage_json(&spec)),
                );
                return json_response(StatusCode::BAD_REQUEST, body);
            }
            Some(Fault::Malformed) => {
                return if spec.stream {
                    sse_response(full(Bytes::from_static(render::malformed_stream())))
                } else {
                    json_response(StatusCode::OK, render::malformed_body().to_vec())
                };
            }
            _ => {}
        }
        let meta = self.reply_meta(&spec, seq, opts.fault != Some(Fault::NoUsage));
        let stall = opts.fault == Some(Fault::StallStream);
        let cut = opts.fault == Some(Fault::CutStream) || stall;
        if spec.stream {
            let script = render::stream_script(&spec, meta, cut);
            let body = TimedBody::new(script, opts.per_token);
            let body = if stall { body.stalled() } else { body };
            return sse_response(SimBody::new(body));
        }
        let generation = opts
            .per_token
            .saturating_mul(u32::try_from(spec.completion_tokens()).unwrap_or(u32::MAX));
        if !generation.is_zero() {
            tokio::time::sleep(generation.min(Duration::from_secs(24 * 3600))).await;
        }
        let mut body = render::full_body(&spec, &meta);
        if cut {
            body.truncate(body.len() / 2);
        }
        if stall {
            let script = SseScript {
                head: std::collections::VecDeque::from([Bytes::from(body)]),
                tokens: 0,
                render: Box::new(|_| Bytes::new()),
                tail: std::collections::VecDeque::new(),
            };
            let mut response = Response::new(SimBody::new(
                TimedBody::new(script, Duration::ZERO).stalled(),
            ));
            response.headers_mut().insert(header::CONTENT_TYPE, JSON);
            return response;
        }
        let mut response = json_response(StatusCode::OK, body);
        if anthropic {
            if let Ok(v) = HeaderValue::from_str(&meta.id) {
                response.headers_mut().insert("request-id", v);
            }
        }
        response
    }

    fn reply_meta(&self, spec: &RequestSpec, seq: u64, with_usage: bool) -> ReplyMeta {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let prefix = match spec.api {
            Api::ChatCompletions => "chatcmpl-sim",
            Api::Completions => "cmpl-sim",
            Api::Responses => "resp_sim",
            Api::Embeddings => "embd-sim",
            Api::Messages => "msg_sim",
        };
        ReplyMeta {
            id: format!("{prefix}{seq:012}"),
            item_id: format!("msg_sim{seq:012}"),
            model: spec.model.clone().unwrap_or_else(|| self.cfg.model.clone()),
            created,
            with_usage,
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<SimBody> {
    let mut response = Response::new(full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<SimBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, JSON);
    response
}

fn sse_response(body: SimBody) -> Response<SimBody> {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, EVENT_STREAM);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn invalid(anthropic: bool, message: &str, param: Option<&str>) -> Response<SimBody> {
    let body = render::error_body(
        anthropic,
        "invalid_request_error",
        message,
        param,
        None,
        None,
    );
    json_response(StatusCode::BAD_REQUEST, body)
}

fn method_not_allowed(anthropic: bool) -> Response<SimBody> {
    let body = render::error_body(
        anthropic,
        "invalid_request_error",
        "Method not allowed on this path.",
        None,
        Some("method_not_allowed"),
        None,
    );
    json_response(StatusCode::METHOD_NOT_ALLOWED, body)
}

/// `x-sim-seen-headers` lists the request's header names; each credential header present is
/// echoed as `x-sim-auth-<name>`.
fn echo_headers(request: &HeaderMap, response: &mut HeaderMap) {
    let mut names: Vec<&str> = Vec::new();
    for name in request.keys() {
        names.push(name.as_str());
    }
    if let Ok(v) = HeaderValue::from_str(&names.join(",")) {
        response.insert(options::SEEN_HEADERS, v);
    }
    for name in options::ECHOED_CREDENTIALS {
        let values = request.get_all(name);
        for value in values {
            if let Ok(echo) = HeaderName::from_bytes(format!("x-sim-auth-{name}").as_bytes()) {
                response.append(echo, value.clone());
            }
        }
    }
}
