//! The admin listener (loopback by default; optional bearer token): health, readiness,
//! metrics, counters (inspect and reset), effective config (secrets redacted), status,
//! usage export, the dashboard, and — only with `--test-clock` — the test clock.
//!
//! Errors are JSON: `{"error": {"message", "type": "admin_error", "code": <status>}}`.

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tollgate_limits::{CounterId, InspectFilter, ManualClock};

use crate::proxy::Gateway;

#[derive(Clone)]
pub struct AdminState {
    pub gw: Arc<Gateway>,
    pub test_clock: Option<Arc<ManualClock>>,
    /// Bearer token required on everything but health checks and the page itself.
    pub token: Option<Arc<str>>,
}

pub fn router(state: AdminState) -> Router {
    let mut protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/admin/counters", get(counters).delete(reset_counter))
        .route("/admin/config", get(config))
        .route("/admin/status", get(status))
        .route("/admin/usage", get(usage));
    if state.test_clock.is_some() {
        protected = protected.route("/admin/test-clock", get(clock_get).post(clock_set));
    }
    let protected =
        protected.route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/", get(dashboard))
        .route("/dashboard", get(dashboard))
        .merge(protected)
        .fallback(not_found)
        .with_state(state)
}

pub fn json_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({"error": {"message": message, "type": "admin_error", "code": status.as_u16()}})),
    )
        .into_response()
}

async fn require_token(State(s): State<AdminState>, req: Request, next: Next) -> Response {
    if let Some(expected) = &s.token {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .unwrap_or("");
        let ok: bool = presented.as_bytes().ct_eq(expected.as_bytes()).into();
        if !ok {
            let mut r = json_error(
                StatusCode::UNAUTHORIZED,
                "admin API requires a bearer token",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
    }
    next.run(req).await
}

async fn not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, "no such admin endpoint")
}

async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(s): State<AdminState>) -> Response {
    let rt = s.gw.runtime.load();
    let store = s.gw.store_status();
    let body = serde_json::json!({
        "status": if store.healthy { "ready" } else { "degraded" },
        "routes": rt.routes.len(),
        "policies": rt.policies.len(),
        "store": store,
    });
    Json(body).into_response()
}

async fn dashboard() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        Html(include_str!("dashboard.html")),
    )
        .into_response()
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let gw = &s.gw;
    gw.stats
        .metrics
        .reservations_outstanding
        .set(i64::try_from(gw.store.outstanding_reservations()).unwrap_or(i64::MAX));
    let views = gw
        .store
        .inspect(gw.clock.now_ms(), &InspectFilter::default())
        .await
        .unwrap_or_default();
    gw.stats
        .metrics
        .counters_live
        .set(i64::try_from(views.len()).unwrap_or(i64::MAX));
    let mut text = gw.stats.metrics.encode();
    let opts = gw.runtime.load().config.metrics.clone();
    if opts.counter_labels {
        // Opted in: one series per counter key, the most spent first, capped.
        let mut views = views;
        views.sort_by(|a, b| b.value.cmp(&a.value).then_with(|| a.id.cmp(&b.id)));
        views.truncate(opts.max_counter_series.unwrap_or(500));
        let body = text.strip_suffix("# EOF\n").unwrap_or(&text).to_owned();
        let mut values = String::from("# HELP tollgate_counter_value Spent in a counter window, per counter key (opt-in).\n# TYPE tollgate_counter_value gauge\n");
        let mut limits = String::from("# HELP tollgate_counter_limit Limit per counter key (opt-in).\n# TYPE tollgate_counter_limit gauge\n");
        for v in &views {
            let id = escape_label(&v.id);
            let w = v.window_start;
            values.push_str(&format!(
                "tollgate_counter_value{{counter=\"{id}\",window_start=\"{w}\"}} {}\n",
                v.value
            ));
            limits.push_str(&format!(
                "tollgate_counter_limit{{counter=\"{id}\",window_start=\"{w}\"}} {}\n",
                v.limit
            ));
        }
        text = format!("{body}{values}{limits}# EOF\n");
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// OpenMetrics label value escaping: backslash, quote, newline.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[derive(Deserialize)]
struct CounterQuery {
    prefix: Option<String>,
    policy: Option<String>,
    limit: Option<String>,
    id: Option<String>,
}

async fn counters(State(s): State<AdminState>, Query(q): Query<CounterQuery>) -> Response {
    let prefix = match (q.id, q.prefix, q.policy, q.limit) {
        (Some(id), _, _, _) => Some(id),
        (None, Some(p), _, _) => Some(p),
        (None, None, Some(p), Some(l)) => Some(format!("{p}/{l}/")),
        (None, None, Some(p), None) => Some(format!("{p}/")),
        (None, None, None, _) => None,
    };
    let now = s.gw.clock.now_ms();
    match s.gw.store.inspect(now, &InspectFilter { prefix }).await {
        Ok(views) => Json(serde_json::json!({"now_ms": now, "counters": views})).into_response(),
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

async fn reset_counter(State(s): State<AdminState>, Query(q): Query<CounterQuery>) -> Response {
    let Some(id) = q.id else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "give the counter to reset as ?id=policy/limit/window_ms/values",
        );
    };
    match s.gw.store.reset(&CounterId::from_encoded(&id)).await {
        Ok(0) => json_error(StatusCode::NOT_FOUND, "no such counter"),
        Ok(n) => Json(serde_json::json!({"reset": id, "windows_removed": n})).into_response(),
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

async fn config(State(s): State<AdminState>) -> Response {
    // Inline keys are never serialised (`skip_serializing`); key sources appear by name.
    match serde_json::to_value(&s.gw.runtime.load().config) {
        Ok(v) => Json(v).into_response(),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn status(State(s): State<AdminState>) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let gw = &s.gw;
    let st = &gw.stats;
    Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": gw.started.elapsed().as_secs(),
        "now_ms": gw.clock.now_ms(),
        "store": gw.store_status(),
        "last_reload": gw.last_reload(),
        "requests": {
            "allowed": st.allowed.load(Relaxed),
            "limited": st.limited.load(Relaxed),
            "unauth": st.unauthenticated.load(Relaxed),
            "forbidden": st.forbidden.load(Relaxed),
            "error": st.errors.load(Relaxed),
        },
        "reservations_outstanding": gw.store.outstanding_reservations(),
        "history": st.history(),
    }))
    .into_response()
}

#[derive(Deserialize)]
struct UsageQuery {
    /// Epoch ms, or a duration back from now (`1h`).
    since: Option<String>,
}

async fn usage(State(s): State<AdminState>, Query(q): Query<UsageQuery>) -> Response {
    let now = s.gw.clock.now_ms();
    let since = match q.since.as_deref() {
        None => 0,
        Some(t) => match t.parse::<u64>() {
            Ok(ms) => ms,
            Err(_) => match crate::config::duration::parse(t) {
                Ok(d) => now.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                Err(e) => return json_error(StatusCode::BAD_REQUEST, &format!("since: {e}")),
            },
        },
    };
    Json(serde_json::json!({"since_ms": since, "now_ms": now, "identities": s.gw.usage.totals(since)}))
        .into_response()
}

async fn clock_get(State(s): State<AdminState>) -> Response {
    Json(serde_json::json!({"now_ms": s.gw.clock.now_ms()})).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockChange {
    set_ms: Option<u64>,
    advance_ms: Option<u64>,
}

async fn clock_set(State(s): State<AdminState>, body: axum::body::Bytes) -> Response {
    let Some(clock) = s.test_clock.as_ref() else {
        return json_error(StatusCode::NOT_FOUND, "test clock not enabled");
    };
    let change: ClockChange = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"set_ms\": N}} or {{\"advance_ms\": N}}: {e}"),
            )
        }
    };
    if let Some(ms) = change.set_ms {
        clock.set(ms);
    }
    if let Some(ms) = change.advance_ms {
        clock.advance(ms);
    }
    Json(serde_json::json!({"now_ms": s.gw.clock.now_ms()})).into_response()
}
