//! The admin listener (loopback by default): health, readiness, counters and, only when
//! started with `--test-clock`, an endpoint that sets and advances the engine's clock.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use tollgate_limits::{InspectFilter, ManualClock};

use crate::proxy::Gateway;

#[derive(Clone)]
pub struct AdminState {
    pub gw: Arc<Gateway>,
    pub test_clock: Option<Arc<ManualClock>>,
}

pub fn router(state: AdminState) -> Router {
    let mut r = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/admin/counters", get(counters));
    if state.test_clock.is_some() {
        r = r.route("/admin/test-clock", get(clock_get).post(clock_set));
    }
    r.fallback(not_found).with_state(state)
}

fn json_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({"error": {"message": message, "type": "admin_error", "code": status.as_u16()}})),
    )
        .into_response()
}

async fn not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, "no such admin endpoint")
}

async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let rt = s.gw.runtime.load();
    Json(serde_json::json!({
        "status": "ready",
        "routes": rt.routes.len(),
        "policies": rt.policies.len(),
        "store": "memory",
    }))
}

#[derive(Deserialize)]
struct CounterQuery {
    prefix: Option<String>,
    policy: Option<String>,
    limit: Option<String>,
}

async fn counters(State(s): State<AdminState>, Query(q): Query<CounterQuery>) -> Response {
    let prefix = match (q.prefix, q.policy, q.limit) {
        (Some(p), _, _) => Some(p),
        (None, Some(p), Some(l)) => Some(format!("{p}/{l}/")),
        (None, Some(p), None) => Some(format!("{p}/")),
        (None, None, _) => None,
    };
    let now = s.gw.clock.now_ms();
    match s.gw.store.inspect(now, &InspectFilter { prefix }).await {
        Ok(views) => Json(serde_json::json!({"now_ms": now, "counters": views})).into_response(),
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
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
