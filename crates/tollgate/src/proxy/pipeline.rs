//! One request, top to bottom. Each phase is a plain function over [`RequestContext`]:
//!
//! 1. `locate`         — canonical path, host, client address, LLM API detection
//!    (`GET /v1/tollgate/usage` is answered here by `usage_report`)
//! 2. `route`          — first matching route (404 otherwise)
//! 3. `admit_pre_auth` — request policies with `phase: pre_auth` (429 before any
//!    credential check)
//! 4. `authenticate`   — JWT or API key → identity (401), per the route's auth mode
//! 5. `read_body`      — LLM calls only: buffer (capped, 413) and inspect the JSON (400)
//! 6. `admit`          — CEL attributes → `auth.authorization` (403) → policy plan →
//!    one atomic store admission (429), shadow policies counted apart
//! 7. `forward`        — rewrite headers/body and send upstream (502/504)
//! 8. respond          — rate-limit headers, and a metered body that settles the call's
//!    real cost when the body ends, is cut off, or the client leaves (`metering`)
//!
//! Errors from any phase go through `GatewayError::into_response`, the one mapping.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{HeaderMap, Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use tollgate_limits::cel::{self, Attrs};
use tollgate_limits::policy::{plan, Accounting, PlanRequest};
use tollgate_limits::store::ReservationId;
use tollgate_limits::{Admission, CounterKind};
use tollgate_llm::{Api, LlmRequest};

use super::body::{full, BoxError, MeteredBody, ProxyBody};
use super::error::GatewayError;
use super::metering::{CallMeter, Cutoff, Settle};
use super::path::canonicalize;
use super::ratelimit_headers;
use super::upstream::{downstream_headers, upstream_headers};
use super::Gateway;
use crate::auth::{self, AuthFailure, Identity};
use crate::config::RouteAuth;
use crate::runtime::{BackendTarget, Route, Runtime};

/// Everything known about one request as it moves through the phases.
pub struct RequestContext {
    pub id: String,
    pub started: Instant,
    pub peer: SocketAddr,
    /// The client: the peer, or from `X-Forwarded-For` when the peer is a trusted proxy.
    pub source: std::net::IpAddr,
    pub method: Method,
    pub raw_path: String,
    pub path: String,
    pub query: Option<String>,
    pub host: String,
    pub api: Option<Api>,
    pub llm: Option<LlmRequest>,
    pub body: Option<Bytes>,
    pub identity: Identity,
    pub route: Option<usize>,
}

pub async fn handle<B>(gw: Arc<Gateway>, req: Request<B>, peer: SocketAddr) -> Response<ProxyBody>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let rt = gw.runtime.load_full();
    let started = Instant::now();
    match run(&gw, &rt, req, peer, started).await {
        Ok(resp) => resp,
        Err((cx, err)) => {
            let route = cx
                .as_ref()
                .and_then(|c| c.route)
                .and_then(|r| rt.routes.get(r));
            gw.stats.refused(
                gw.clock.now_ms(),
                route.map(|r| &*r.name).unwrap_or("-"),
                route
                    .and_then(|r| rt.backends.get(r.backend))
                    .map(|b| &*b.name)
                    .unwrap_or("-"),
                err.status().as_u16(),
                err.decision(),
            );
            if rt.access_log {
                tracing::info!(
                    target: "tollgate::access",
                    id = %cx.as_ref().map(|c| c.id.as_str()).unwrap_or("-"),
                    method = %cx.as_ref().map(|c| c.method.as_str()).unwrap_or("-"),
                    path = %cx.as_ref().map(|c| c.path.as_str()).unwrap_or("-"),
                    route = %cx.as_ref().and_then(|c| c.route).and_then(|r| rt.routes.get(r)).map(|r| &*r.name).unwrap_or("-"),
                    identity = %cx.as_ref().map(|c| &*c.identity.label).unwrap_or("-"),
                    model = %cx.as_ref().and_then(|c| c.llm.as_ref()).and_then(|l| l.model.as_deref()).unwrap_or("-"),
                    status = err.status().as_u16(),
                    decision = err.decision(),
                    reason = %err,
                    duration_us = started.elapsed().as_micros() as u64,
                    "request"
                );
            }
            err.into_response()
        }
    }
}

type Failed = (Option<RequestContext>, GatewayError);

async fn run<B>(
    gw: &Arc<Gateway>,
    rt: &Arc<Runtime>,
    req: Request<B>,
    peer: SocketAddr,
    started: Instant,
) -> Result<Response<ProxyBody>, Failed>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();
    let mut cx = locate(gw, rt, &parts, peer, started).map_err(|e| (None, e))?;

    // Routing on `models` needs the body first; otherwise auth comes before buffering,
    // so unauthenticated callers cannot make us hold large bodies.
    let mut body = Some(body);
    if rt.routes_need_model && cx.api.is_some() {
        if let Some(b) = body.take() {
            if let Err(e) = read_body(rt, &mut cx, b, &parts.headers).await {
                return Err((Some(cx), e));
            }
        }
    }
    if cx.path == USAGE_PATH && cx.method == Method::GET {
        return usage_report(gw, rt, cx, &parts.headers).await;
    }
    let route = match route(rt, &mut cx) {
        Ok(r) => r,
        Err(e) => return Err((Some(cx), e)),
    };
    if rt.has_pre_auth {
        if let Err(e) = admit_pre_auth(gw, rt, route, &cx, &parts.headers).await {
            return Err((Some(cx), e));
        }
    }
    if let Err(e) = authenticate(gw, rt, route, &mut cx, &parts.headers).await {
        return Err((Some(cx), e));
    }
    if cx.api.is_some() {
        if let Some(b) = body.take() {
            if let Err(e) = read_body(rt, &mut cx, b, &parts.headers).await {
                return Err((Some(cx), e));
            }
        }
    }
    let admitted = match admit(gw, rt, route, &cx, &parts.headers).await {
        Ok(a) => a,
        Err(e) => return Err((Some(cx), e)),
    };
    forward(gw, rt, route, cx, parts, body, admitted).await
}

/// Where a caller asks where they stand, without spending.
pub const USAGE_PATH: &str = "/v1/tollgate/usage";

/// `GET /v1/tollgate/usage`: the caller's counters (value, limit, remaining, reset) for
/// every route and LLM API they could call, authenticated like any call.
async fn usage_report(
    gw: &Arc<Gateway>,
    rt: &Arc<Runtime>,
    mut cx: RequestContext,
    headers: &HeaderMap,
) -> Result<Response<ProxyBody>, Failed> {
    if rt.auth_configured() {
        let now_s = gw.clock.now_ms() / 1000;
        match auth::identify(rt.api_keys.as_ref(), rt.jwt.as_deref(), headers, now_s).await {
            Ok(Some(id)) => cx.identity = id,
            Ok(None) | Err(AuthFailure::Missing) => {
                return Err((
                    Some(cx),
                    GatewayError::Unauthenticated("Missing credentials."),
                ))
            }
            Err(AuthFailure::Invalid(msg)) => {
                return Err((Some(cx), GatewayError::Unauthenticated(msg)))
            }
        }
    }
    let now = gw.clock.now_ms();
    let mut seen = std::collections::BTreeMap::new();
    for r in &rt.routes {
        for api in Api::ALL {
            let path = format!("/v1/{}", api_path(api));
            let mut probe = RequestContext {
                path: path.clone(),
                raw_path: path,
                method: Method::POST,
                api: Some(api),
                id: cx.id.clone(),
                started: cx.started,
                peer: cx.peer,
                source: cx.source,
                query: None,
                host: cx.host.clone(),
                llm: None,
                body: None,
                identity: cx.identity.clone(),
                route: None,
            };
            if !r.matches(&probe.host, &probe.path, &probe.method, None) && r.models.is_none() {
                continue;
            }
            probe.route = None;
            let attrs = attributes(rt, &probe, headers, now);
            let p = plan(
                &rt.policies,
                &PlanRequest {
                    route: &r.name,
                    is_llm_call: true,
                    attrs: &attrs,
                    estimate: None,
                    pre_auth: false,
                },
            );
            for (op, o) in p.ops.iter().zip(p.origins.iter()) {
                seen.entry(op.id.clone())
                    .or_insert_with(|| (op.clone(), o.clone()));
            }
        }
    }
    let mut out = Vec::new();
    for (id, (op, o)) in seen {
        let views = gw
            .store
            .inspect(
                now,
                &tollgate_limits::InspectFilter {
                    prefix: Some(id.to_string()),
                },
            )
            .await
            .map_err(|e| (None, GatewayError::StoreUnavailable(e.to_string())))?;
        let (window_start, reset_at) = match op.rate {
            tollgate_limits::Rate::Fixed { window, .. } => (window.start(now), window.end(now)),
            _ => (0, now),
        };
        let current = views
            .iter()
            .find(|v| v.id == id.as_str() && (v.window_start == window_start || window_start == 0));
        let limit = op.rate.ceiling();
        let value = current.map(|v| v.value).unwrap_or(0);
        let reserved = current.map(|v| v.reserved).unwrap_or(0);
        let policy = &rt.policies[o.policy];
        out.push(serde_json::json!({
            "policy": &*policy.name,
            "limit_name": &*policy.limits[o.limit].name,
            "counter": id.as_str(),
            "kind": o.kind,
            "limit": limit,
            "value": value,
            "reserved": reserved,
            "remaining": limit.saturating_sub(value.saturating_add(reserved)),
            "reset_at_ms": current.map(|v| v.reset_at).unwrap_or(reset_at),
            "reset_in_ms": current.map(|v| v.reset_at).unwrap_or(reset_at).saturating_sub(now),
        }));
    }
    let body = serde_json::json!({"identity": &*cx.identity.label, "now_ms": now, "counters": out});
    let mut resp = Response::new(full(Bytes::from(body.to_string())));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

fn api_path(api: Api) -> &'static str {
    match api {
        Api::Chat => "chat/completions",
        Api::Completions => "completions",
        Api::Responses => "responses",
        Api::Embeddings => "embeddings",
        Api::Messages => "messages",
    }
}

/// Phase 1: canonical path, host, LLM API.
fn locate(
    gw: &Gateway,
    rt: &Runtime,
    parts: &http::request::Parts,
    peer: SocketAddr,
    started: Instant,
) -> Result<RequestContext, GatewayError> {
    check_header_limits(&rt.limits, &parts.headers)?;
    let path =
        canonicalize(parts.uri.path()).map_err(|e| GatewayError::BadRequest(e.to_string()))?;
    let host = parts
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .map(strip_port)
        .unwrap_or_default()
        .to_ascii_lowercase();
    let api = if parts.method == Method::POST {
        Api::from_path(&path)
    } else {
        None
    };
    if parts.method == Method::POST && is_disguised_llm_path(&path, api) {
        return Err(GatewayError::NoRoute {
            method: parts.method.to_string(),
            path,
        });
    }
    let id = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(|| gw.next_request_id());
    Ok(RequestContext {
        id,
        started,
        peer,
        source: client_address(rt, peer, &parts.headers),
        method: parts.method.clone(),
        raw_path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned()),
        path,
        query: parts.uri.query().map(str::to_owned),
        host,
        api,
        llm: None,
        body: None,
        identity: Identity::anonymous(),
        route: None,
    })
}

/// An LLM endpoint under another spelling — a trailing slash, or letters in another
/// case — that a lenient upstream might serve while a predicate written for the
/// canonical path (`request.path == "/v1/chat/completions"`) would not see it. Refused
/// (404), so no spelling escapes a budget.
fn is_disguised_llm_path(path: &str, api: Option<Api>) -> bool {
    if path.len() > 1 && path.ends_with('/') {
        return Api::from_path(&path.trim_end_matches('/').to_ascii_lowercase()).is_some();
    }
    if !path.bytes().any(|b| b.is_ascii_uppercase()) {
        return false;
    }
    // `/openai/deployments/GPT4/chat/completions` is the same API in any case; not so
    // `/v1/Chat/Completions` (none) or `/v1/CHAT/completions` (legacy completions).
    let folded = Api::from_path(&path.to_ascii_lowercase());
    folded.is_some() && folded != api
}

/// `server.max_headers` / `server.max_header_bytes` (names plus values) → 431.
fn check_header_limits(
    limits: &crate::runtime::Limits,
    headers: &HeaderMap,
) -> Result<(), GatewayError> {
    if headers.len() > limits.max_headers {
        return Err(GatewayError::HeadersTooLarge(format!(
            "Request has {} header fields; at most {} are accepted.",
            headers.len(),
            limits.max_headers
        )));
    }
    let bytes: u64 = headers
        .iter()
        .map(|(k, v)| (k.as_str().len() + v.len()) as u64)
        .sum();
    if bytes > limits.max_header_bytes {
        return Err(GatewayError::HeadersTooLarge(format!(
            "Request headers are {bytes} bytes; at most {} are accepted.",
            limits.max_header_bytes
        )));
    }
    Ok(())
}

/// `X-Forwarded-For` is believed only from trusted proxies: walk it from the right,
/// skipping trusted hops; the first untrusted address is the client.
fn client_address(rt: &Runtime, peer: SocketAddr, headers: &HeaderMap) -> std::net::IpAddr {
    let trusted = |ip: &std::net::IpAddr| rt.trusted_proxies.iter().any(|n| n.contains(ip));
    if rt.trusted_proxies.is_empty() || !trusted(&peer.ip()) {
        return peer.ip();
    }
    let mut client = peer.ip();
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        match hop.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !trusted(&ip) {
                    break;
                }
            }
            // A malformed hop: stop at the last address we could trust.
            Err(_) => break,
        }
    }
    client
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [::1]:8080
        return host
            .split_once(']')
            .map(|(h, _)| &host[..h.len() + 1])
            .unwrap_or(host);
    }
    host.rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map(|(h, _)| h)
        .unwrap_or(host)
}

/// Phase 2: the first matching route.
fn route<'a>(rt: &'a Runtime, cx: &mut RequestContext) -> Result<&'a Route, GatewayError> {
    let model = cx.llm.as_ref().and_then(|l| l.model.as_deref());
    let idx = rt
        .routes
        .iter()
        .position(|r| r.matches(&cx.host, &cx.path, &cx.method, model))
        .ok_or_else(|| GatewayError::NoRoute {
            method: cx.method.to_string(),
            path: cx.path.clone(),
        })?;
    cx.route = Some(idx);
    rt.routes
        .get(idx)
        .ok_or_else(|| GatewayError::Internal("route index out of range".into()))
}

/// Phase 4: who is calling.
async fn authenticate(
    gw: &Gateway,
    rt: &Runtime,
    route: &Route,
    cx: &mut RequestContext,
    headers: &HeaderMap,
) -> Result<(), GatewayError> {
    if !rt.auth_configured() || route.auth == RouteAuth::None {
        return Ok(());
    }
    // Only a JWT's expiry needs the time: API keys are looked up without a clock read.
    let now_s = rt.jwt.as_ref().map_or(0, |_| gw.clock.now_ms() / 1000);
    match auth::identify(rt.api_keys.as_ref(), rt.jwt.as_deref(), headers, now_s).await {
        Ok(Some(id)) => {
            cx.identity = id;
            Ok(())
        }
        Ok(None) | Err(AuthFailure::Missing) if route.auth == RouteAuth::Optional => Ok(()),
        Ok(None) | Err(AuthFailure::Missing) => Err(GatewayError::Unauthenticated(
            "Missing credentials: send 'Authorization: Bearer <key or token>' or 'x-api-key: <key>'.",
        )),
        Err(AuthFailure::Invalid(msg)) => Err(GatewayError::Unauthenticated(msg)),
    }
}

/// Phase 3: request policies that run before authentication (floods of bad
/// credentials are refused before any key or JWT check). Request counts only: nothing
/// to settle.
async fn admit_pre_auth(
    gw: &Arc<Gateway>,
    rt: &Runtime,
    route: &Route,
    cx: &RequestContext,
    headers: &HeaderMap,
) -> Result<(), GatewayError> {
    let now = gw.clock.now_ms();
    let attrs = attributes(rt, cx, headers, now);
    let p = plan(
        &rt.policies,
        &PlanRequest {
            route: &route.name,
            is_llm_call: cx.api.is_some(),
            attrs: &attrs,
            estimate: None,
            pre_auth: true,
        },
    );
    let ops: Vec<_> = p
        .ops
        .iter()
        .zip(p.origins.iter())
        .filter(|(_, o)| !o.shadow)
        .map(|(op, _)| op.clone())
        .collect();
    if ops.is_empty() {
        return Ok(());
    }
    let kinds: Vec<CounterKind> = ops.iter().map(|o| o.kind).collect();
    let reservation = ReservationId(gw.next_reservation_id());
    match gw.store.admit(now, &ops, reservation, now).await {
        Ok(Admission::Admitted { .. }) => Ok(()),
        Ok(Admission::Refused(r)) => Err(GatewayError::RateLimited {
            message: "Too many requests from this address. Please slow down.".into(),
            kind: "requests",
            retry_after_ms: r.retry_after_ms,
            headers: ratelimit_headers::compute(&r.snapshots, &kinds, now),
        }),
        Err(e) => Err(GatewayError::StoreUnavailable(e.to_string())),
    }
}

/// Phase 5: buffer and inspect an LLM request body.
async fn read_body<B>(
    rt: &Runtime,
    cx: &mut RequestContext,
    body: B,
    headers: &HeaderMap,
) -> Result<(), GatewayError>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let limit = rt.limits.max_request_body_bytes;
    if let Some(len) = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit {
            return Err(GatewayError::BodyTooLarge { limit });
        }
    }
    let cap = usize::try_from(limit).unwrap_or(usize::MAX);
    // A body trickled in (slowloris after the headers) must not hold the request forever.
    let wait = rt.limits.request_body_timeout;
    let mut collect = std::pin::pin!(Limited::new(body, cap).collect());
    // A small body usually came with the headers: taken as it is, with no timer to arm.
    let collected = match futures_util::FutureExt::now_or_never(&mut collect) {
        Some(c) => c,
        None => tokio::time::timeout(wait, collect)
            .await
            .map_err(|_| GatewayError::BodyTimeout(wait.as_millis() as u64))?,
    };
    let bytes = match collected {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return Err(if e.is::<http_body_util::LengthLimitError>() {
                GatewayError::BodyTooLarge { limit }
            } else {
                GatewayError::BadRequest(format!("could not read the request body: {e}"))
            })
        }
    };
    if let Some(api) = cx.api {
        let llm = tollgate_llm::inspect_request(api, &bytes)
            .map_err(|e| GatewayError::BadRequest(format!("invalid request body: {e}")))?;
        cx.llm = Some(llm);
    }
    cx.body = Some(bytes);
    Ok(())
}

/// The CEL activation for this request.
fn attributes(rt: &Runtime, cx: &RequestContext, headers: &HeaderMap, now_ms: u64) -> Attrs {
    // The header map is the costliest attribute to build: only when an expression reads it.
    let mut hdrs = Vec::new();
    if rt.cel_reads_headers {
        hdrs.reserve(headers.len());
        for (k, v) in headers {
            if let Ok(v) = v.to_str() {
                hdrs.push((k.as_str().to_owned(), cel::string(v)));
            }
        }
    }
    // Only the fields some expression reads: converting the map is most of what an
    // evaluation costs, per field.
    let wanted = |f: &str| rt.cel_request_fields.as_ref().is_none_or(|s| s.contains(f));
    let mut request = Vec::with_capacity(10);
    let mut add = |name: &'static str, value: &dyn Fn() -> cel::Value| {
        if wanted(name) {
            request.push((name, value()));
        }
    };
    add("method", &|| cel::string(cx.method.as_str()));
    add("path", &|| cel::string(cx.path.as_str()));
    add("url_path", &|| cel::string(cx.path.as_str()));
    add("raw_path", &|| cel::string(cx.raw_path.as_str()));
    add("host", &|| cel::string(cx.host.as_str()));
    add("query", &|| cel::string(cx.query.as_deref().unwrap_or("")));
    add("id", &|| cel::string(cx.id.as_str()));
    add("time", &|| {
        cel::int(i64::try_from(now_ms).unwrap_or(i64::MAX))
    });
    if let Some(m) = cx.llm.as_ref().and_then(|l| l.model.as_deref()) {
        add("model", &|| cel::string(m));
    }
    if wanted("headers") {
        request.push(("headers", cel::map(hdrs)));
    }
    let mut a = Attrs::new();
    a.set("request", cel::Record::new(request));
    if rt.cel_vars.contains("source") {
        a.set(
            "source",
            cel::Record::new([
                ("address", cel::string(cx.source.to_string())),
                ("port", cel::int(i64::from(cx.peer.port()))),
            ]),
        );
    }
    if rt.cel_vars.contains("auth") {
        a.set("auth", cx.identity.to_attr());
    }
    if !rt.cel_vars.contains("llm") {
        return a;
    }
    let mut llm = Vec::new();
    if let Some(api) = cx.api {
        llm.push(("api", cel::string(api.as_str())));
    }
    if let Some(l) = &cx.llm {
        llm.push(("stream", cel::Value::Bool(l.stream)));
        if let Some(m) = &l.model {
            llm.push(("model", cel::string(m.as_str())));
        }
    }
    a.set("llm", cel::Record::new(llm));
    a
}

/// The input document of `auth.opa` rules, shaped as Authorino's authorization JSON.
/// The client's credential headers are left out.
fn opa_input(cx: &RequestContext, headers: &HeaderMap) -> serde_json::Value {
    let hdrs: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .filter(|(k, _)| *k != http::header::AUTHORIZATION && k.as_str() != "x-api-key")
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.into())))
        .collect();
    let http = serde_json::json!({
        "method": cx.method.as_str(),
        "path": cx.path.as_str(),
        "host": cx.host.as_str(),
        "headers": hdrs,
    });
    serde_json::json!({
        "auth": {
            "identity": tollgate_limits::cel::to_json(&cx.identity.identity),
            "method": cx.identity.method,
        },
        "context": { "request": { "http": http.clone() } },
        "request": http,
    })
}

/// What admission decided, carried into forwarding and settlement.
pub struct Admitted {
    pub settle: Settle,
    pub headers: Vec<(http::HeaderName, HeaderValue)>,
    pub cutoff: Option<Cutoff>,
}

/// Phase 6: evaluate policies and take counters atomically.
async fn admit(
    gw: &Arc<Gateway>,
    rt: &Arc<Runtime>,
    route: &Route,
    cx: &RequestContext,
    headers: &HeaderMap,
) -> Result<Admitted, GatewayError> {
    let now = gw.clock.now_ms();
    let attrs = attributes(rt, cx, headers, now);
    let mut estimate = cx.llm.as_ref().map(super::metering::estimate);
    // Exact BPE counts only when a reserving policy on this route asks, and off the
    // async workers: tokenizing costs tens of µs per KB.
    if let (Some(est), Some(llm)) = (estimate.as_mut(), cx.llm.as_ref()) {
        let wants_exact = rt.policies.iter().any(|p| {
            p.exact_prompt && p.accounting == Accounting::Reserve && p.covers_route(&route.name)
        });
        if wants_exact {
            let llm = llm.clone();
            match tokio::task::spawn_blocking(move || tollgate_llm::exact_prompt_tokens(&llm)).await
            {
                Ok(n) => est.input_tokens = n,
                Err(e) => {
                    tracing::warn!(error = %e, "exact tokenization failed; using the fast estimate")
                }
            }
        }
    }
    if route.auth != RouteAuth::None {
        for pred in &rt.authorization {
            match pred.eval_bool(&attrs) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(GatewayError::Forbidden(format!(
                        "Permission denied: `{}` does not hold for this caller.",
                        pred.source()
                    )))
                }
                Err(e) => {
                    return Err(GatewayError::Forbidden(format!(
                        "Permission denied: `{}` could not be evaluated ({e}).",
                        pred.source()
                    )))
                }
            }
        }
    }
    if route.auth != RouteAuth::None && !rt.opa.is_empty() {
        let input = opa_input(cx, headers);
        for rule in &rt.opa {
            match rule.allows(&input) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(GatewayError::Forbidden(format!(
                        "Permission denied by the `{}` rule.",
                        rule.name
                    )))
                }
                Err(e) => {
                    return Err(GatewayError::Forbidden(format!(
                        "Permission denied: the `{}` rule could not be evaluated ({e}).",
                        rule.name
                    )))
                }
            }
        }
    }
    let plan = plan(
        &rt.policies,
        &PlanRequest {
            route: &route.name,
            is_llm_call: cx.api.is_some(),
            attrs: &attrs,
            estimate: estimate.as_ref(),
            pre_auth: false,
        },
    );
    for e in &plan.errors {
        gw.stats.limit_eval_error(e);
    }
    if let Some(e) = plan.denied() {
        return Err(GatewayError::RateLimited {
            message: format!(
                "Rate limit `{}/{}` could not be evaluated for this request and is set to deny.",
                e.policy, e.limit
            ),
            kind: "requests",
            retry_after_ms: None,
            headers: Vec::new(),
        });
    }
    let reservation = ReservationId(gw.next_reservation_id());
    let deadline = now.saturating_add(rt.limits.reservation_deadline_ms);
    // Enforced ops first, shadow ones after, moved out of the plan (no shadow policy: the
    // second pair stays empty and never allocates).
    let mut enforced_ops = Vec::with_capacity(plan.ops.len());
    let mut enforced = Vec::with_capacity(plan.ops.len());
    let mut shadow_ops = Vec::new();
    let mut shadow = Vec::new();
    for (op, origin) in plan.ops.into_iter().zip(plan.origins) {
        if origin.shadow {
            shadow_ops.push(op);
            shadow.push(origin);
        } else {
            enforced_ops.push(op);
            enforced.push(origin);
        }
    }
    let kinds: Vec<CounterKind> = enforced.iter().map(|o| o.kind).collect();
    let outcome = if enforced_ops.is_empty() {
        Admission::Admitted {
            snapshots: Vec::new(),
        }
    } else {
        let t = Instant::now();
        let r = gw
            .store
            .admit(now, &enforced_ops, reservation, deadline)
            .await;
        gw.stats
            .metrics
            .observe_store("admit", t.elapsed(), r.is_ok());
        r.map_err(|e| GatewayError::StoreUnavailable(e.to_string()))?
    };
    let snapshots = match outcome {
        Admission::Admitted { snapshots } => snapshots,
        Admission::Refused(refusal) => {
            let hdrs = ratelimit_headers::compute(&refusal.snapshots, &kinds, now);
            let blocking_kind = refusal
                .blocking
                .first()
                .and_then(|&i| kinds.get(i))
                .copied()
                .unwrap_or(CounterKind::Requests);
            let names: Vec<String> = refusal
                .blocking
                .iter()
                .filter_map(|&i| enforced.get(i))
                .map(|o| {
                    format!(
                        "{}/{}",
                        rt.policies[o.policy].name, rt.policies[o.policy].limits[o.limit].name
                    )
                })
                .collect();
            let (kind, what) = match blocking_kind {
                CounterKind::Tokens => ("tokens", "token"),
                CounterKind::Requests => ("requests", "request"),
                CounterKind::InFlight => ("requests", "concurrent request"),
            };
            let message = match refusal.retry_after_ms {
                Some(ms) => format!(
                    "Rate limit reached: {what} limit {} exceeded. Please try again in {}.",
                    names.join(", "),
                    crate::config::duration::format_reset(ms)
                ),
                None => format!(
                    "Request too large: its estimated cost exceeds the {what} limit {} itself, so it can never be admitted. Lower max_tokens or the prompt size.",
                    names.join(", ")
                ),
            };
            return Err(GatewayError::RateLimited {
                message,
                kind,
                retry_after_ms: refusal.retry_after_ms,
                headers: hdrs,
            });
        }
    };
    let hdrs = ratelimit_headers::compute(&snapshots, &kinds, now);

    // Stream hard cap: what each cutoff policy's tightest token counter had left.
    let mut allowances: Vec<(usize, u64)> = Vec::new();
    for (j, o) in enforced.iter().enumerate() {
        if o.kind != CounterKind::Tokens || !rt.policies[o.policy].stream_cutoff {
            continue;
        }
        let Some(s) = snapshots.get(j) else { continue };
        let left = s.limit.saturating_sub(s.value.saturating_add(s.reserved));
        match allowances.iter_mut().find(|(p, _)| *p == o.policy) {
            Some(a) => a.1 = a.1.min(left),
            None => allowances.push((o.policy, left)),
        }
    }
    let cutoff = (!allowances.is_empty()).then_some(Cutoff { allowances });

    // Shadow policies: counted, never enforced; a would-be refusal is only reported.
    let mut shadow_snapshots = Vec::new();
    if !shadow_ops.is_empty() {
        match gw
            .store
            .admit(now, &shadow_ops, reservation, deadline)
            .await
        {
            Ok(Admission::Admitted { snapshots }) => shadow_snapshots = snapshots,
            Ok(Admission::Refused(r)) => {
                for &b in &r.blocking {
                    if let Some(o) = shadow.get(b) {
                        let p = &rt.policies[o.policy];
                        gw.stats.shadow_refusal(&p.name, &p.limits[o.limit].name);
                    }
                }
                tracing::info!(request = %cx.id, "shadow policy would refuse this request");
                shadow_snapshots = r.snapshots;
                // Nothing was taken; settle only charges tokens into these windows.
                for s in shadow_snapshots.iter_mut() {
                    s.reserved = 0;
                }
            }
            Err(e) => tracing::warn!(error = %e, "shadow admission failed"),
        }
    }

    // Settlement sees the enforced ops, then the shadow ones, each with its window.
    let window_starts: Vec<u64> = (0..enforced.len())
        .map(|j| snapshots.get(j).map_or(0, |s| s.window_start))
        .chain((0..shadow.len()).map(|j| shadow_snapshots.get(j).map_or(0, |s| s.window_start)))
        .collect();
    let mut origins = enforced;
    origins.extend(shadow);
    let mut ops = enforced_ops;
    ops.extend(shadow_ops);
    Ok(Admitted {
        settle: Settle {
            gw: gw.clone(),
            rt: rt.clone(),
            attrs,
            ops,
            origins,
            window_starts,
            reservation,
            estimate: estimate.unwrap_or_default(),
            request_id: cx.id.clone(),
            route: route.name.clone(),
            backend: rt
                .backends
                .get(route.backend)
                .map(|b| b.name.clone())
                .unwrap_or_else(|| Arc::from("-")),
            identity: cx.identity.label.clone(),
            model: cx.llm.as_ref().and_then(|l| l.model.clone()),
            method: cx.method.clone(),
            path: cx.path.clone(),
            started: cx.started,
            status: 0,
            estimated: false,
            sent_upstream: false,
            done: false,
        },
        headers: hdrs,
        cutoff,
    })
}

/// Phases 7 and 8: send upstream, answer with a metered body.
async fn forward<B>(
    gw: &Arc<Gateway>,
    rt: &Arc<Runtime>,
    route: &Route,
    cx: RequestContext,
    parts: http::request::Parts,
    body: Option<B>,
    admitted: Admitted,
) -> Result<Response<ProxyBody>, Failed>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let Admitted {
        mut settle,
        headers: rl_headers,
        cutoff,
    } = admitted;
    let Some(backend) = rt.backends.get(route.backend) else {
        settle.release_now();
        return Err((
            Some(cx),
            GatewayError::Internal("route has no backend".into()),
        ));
    };
    let forward_credentials = backend.forward_client_credentials
        && (!rt.auth_configured() || route.auth == RouteAuth::None);
    let http::request::Parts {
        method, headers, ..
    } = parts;
    let client_length = headers.get(CONTENT_LENGTH).cloned();
    let mut up_headers = upstream_headers(headers, backend, forward_credentials);

    // A stream without include_usage gets it upstream; the usage chunk is removed again
    // on the way back so the client sees the stream it asked for.
    let mut strip_usage = false;
    let mut out_body = cx.body.clone();
    if let (Some(api), Some(b), Some(llm)) = (cx.api, cx.body.as_ref(), cx.llm.as_ref()) {
        if llm.stream {
            if let Some(rewritten) = tollgate_llm::ensure_stream_usage(api, b) {
                out_body = Some(Bytes::from(rewritten));
                strip_usage = llm.include_usage != Some(true);
            }
        }
    }

    let upstream_started = Instant::now();
    let result = match &backend.target {
        BackendTarget::Simulator(sim) => {
            let bytes = match out_body {
                Some(b) => b,
                None => match body {
                    Some(b) => match Limited::new(
                        b,
                        usize::try_from(rt.limits.max_request_body_bytes).unwrap_or(usize::MAX),
                    )
                    .collect()
                    .await
                    {
                        Ok(c) => c.to_bytes(),
                        Err(_) => {
                            settle.release_now();
                            return Err((
                                Some(cx),
                                GatewayError::BodyTooLarge {
                                    limit: rt.limits.max_request_body_bytes,
                                },
                            ));
                        }
                    },
                    None => Bytes::new(),
                },
            };
            settle.sent_upstream = true;
            let resp = sim.handle(&method, &cx.path, &up_headers, bytes).await;
            let (p, b) = resp.into_parts();
            Ok((p, b.map_err(|never| match never {}).boxed_unsync()))
        }
        BackendTarget::Url {
            scheme,
            authority,
            host,
            base_path,
        } => {
            let uri =
                match upstream_uri(scheme, authority, base_path, &cx.path, cx.query.as_deref()) {
                    Ok(u) => u,
                    Err(e) => {
                        settle.release_now();
                        return Err((
                            Some(cx),
                            GatewayError::BadRequest(format!("cannot build upstream URI: {e}")),
                        ));
                    }
                };
            if let Some(h) = host {
                up_headers.insert(HOST, h.clone());
            }
            let req_body: ProxyBody = match out_body {
                Some(b) => {
                    up_headers.insert(CONTENT_LENGTH, HeaderValue::from(b.len()));
                    full(b)
                }
                None => match body {
                    Some(b) => {
                        if let Some(cl) = client_length {
                            up_headers.insert(CONTENT_LENGTH, cl);
                        }
                        b.map_err(Into::into).boxed_unsync()
                    }
                    None => full(Bytes::new()),
                },
            };
            let mut req = Request::new(req_body);
            *req.method_mut() = method;
            *req.uri_mut() = uri;
            *req.headers_mut() = up_headers;
            let timeout = rt.limits.upstream_response_timeout;
            settle.sent_upstream = true;
            let client = backend.client.as_ref().unwrap_or(&gw.client);
            // The deadline from the clock read the latency metric uses anyway.
            let deadline = tokio::time::Instant::from_std(upstream_started) + timeout;
            match tokio::time::timeout_at(deadline, client.send(req)).await {
                Err(_) => Err(GatewayError::UpstreamTimeout(timeout.as_millis() as u64)),
                Ok(Err(e)) => Err(GatewayError::UpstreamConnect(e.0)),
                Ok(Ok(resp)) => Ok(resp.into_parts()),
            }
        }
    };
    let (resp_parts, resp_body) = match result {
        Ok(r) => r,
        Err(e) => {
            // Nothing was served: release reservations, charge nothing.
            settle.release_now();
            return Err((Some(cx), e));
        }
    };
    gw.stats.metrics.observe_upstream_latency(
        &route.name,
        &backend.name,
        upstream_started.elapsed(),
    );

    settle.status = resp_parts.status.as_u16();
    let is_sse = resp_parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.starts_with("text/event-stream"))
        .unwrap_or(false);
    let mut headers = downstream_headers(resp_parts.headers, !rl_headers.is_empty());
    for (k, v) in rl_headers {
        headers.insert(k, v);
    }
    let streamed = is_sse || cx.llm.as_ref().map(|l| l.stream).unwrap_or(false);
    let meter = CallMeter::new(
        settle,
        cx.api,
        streamed,
        strip_usage,
        rt.limits.max_response_buffer_bytes,
        cutoff,
    );
    if !meter_passthrough(&meter) {
        headers.remove(CONTENT_LENGTH);
    }
    let body = MeteredBody::new(resp_body, meter)
        .with_idle_timeout(rt.limits.upstream_idle_timeout, streamed);
    let mut resp = Response::new(body.boxed_unsync());
    *resp.status_mut() = resp_parts.status;
    *resp.headers_mut() = headers;
    Ok(resp)
}

/// The upstream URI: the backend's scheme and authority (parsed once, at load) and its base
/// path followed by the request's canonical path and query, which alone are parsed here.
fn upstream_uri(
    scheme: &http::uri::Scheme,
    authority: &http::uri::Authority,
    base_path: &str,
    path: &str,
    query: Option<&str>,
) -> Result<http::Uri, http::Error> {
    let mut pq =
        String::with_capacity(base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1));
    pq.push_str(base_path);
    pq.push_str(path);
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    http::Uri::builder()
        .scheme(scheme.clone())
        .authority(authority.clone())
        .path_and_query(pq)
        .build()
}

fn meter_passthrough(m: &CallMeter) -> bool {
    use super::body::ChunkMeter;
    m.passthrough()
}

#[cfg(test)]
mod tests {
    use super::strip_port;

    #[test]
    fn upstream_uri_joins_base_path_path_and_query() {
        let uri = |scheme: &str, authority: &str, base: &str, path: &str, query: Option<&str>| {
            super::upstream_uri(
                &scheme.parse().unwrap(),
                &authority.parse().unwrap(),
                base,
                path,
                query,
            )
            .map(|u| u.to_string())
        };
        assert_eq!(
            uri("http", "127.0.0.1:8000", "", "/v1/chat/completions", None).unwrap(),
            "http://127.0.0.1:8000/v1/chat/completions"
        );
        assert_eq!(
            uri(
                "https",
                "api.example.com",
                "/openai",
                "/v1/models",
                Some("a=1&b=%20")
            )
            .unwrap(),
            "https://api.example.com/openai/v1/models?a=1&b=%20"
        );
        assert_eq!(uri("http", "h", "", "/", Some("")).unwrap(), "http://h/?");
        // A byte a URI cannot carry is an error, not a panic.
        assert!(uri("http", "h", "", "/a b", None).is_err());
    }

    #[test]
    fn disguised_llm_paths() {
        use super::is_disguised_llm_path as d;
        use tollgate_llm::Api;
        let api = |p: &str| Api::from_path(p);
        for p in [
            "/v1/chat/completions/",
            "/v1/Chat/Completions",
            "/v1/CHAT/completions",
            "/V1/MESSAGES",
            "/v1/embeddings//",
        ] {
            assert!(d(p, api(p)), "{p}");
        }
        for p in [
            "/v1/chat/completions",
            "/openai/deployments/GPT4/chat/completions",
            "/v1/models/",
            "/",
            "/Admin",
        ] {
            assert!(!d(p, api(p)), "{p}");
        }
    }

    #[test]
    fn strips_ports() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
