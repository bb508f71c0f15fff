//! Routing on host (exact, wildcard, port ignored), path prefix on whole segments,
//! method and model; auth modes; upstream timeouts; request policies on non-LLM calls.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;

fn config(up: std::net::SocketAddr) -> String {
    format!(
        r#"
backends:
  - name: up
    url: http://{up}
server:
  upstream_response_timeout: 300ms
routes:
  - name: public-models
    match: {{ path: /v1/models, methods: [GET] }}
    backend: up
    auth: none
  - name: tutorial
    hostnames: ["trlp-tutorial.example.com", "*.llm.example.com"]
    match: {{ path_prefix: /v1 }}
    backend: up
  - name: big-model
    match: {{ path_prefix: /v1, models: [big] }}
    backend: up
    auth: optional
auth:
  api_keys:
    keys:
      - key: k1
        identity: {{ userid: u1 }}
policies:
  - name: req
    kind: RateLimitPolicy
    target: {{ route: public-models }}
    limits:
      per-ip:
        rates: [{{ limit: 3, window: 1m }}]
        counters: [source.address]
"#
    )
}

#[tokio::test]
async fn host_path_method_model_and_auth_modes() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(up.addr));
    let c = client();

    // auth: none — credentials not needed, and stripped even when sent.
    let r = c
        .get(gw.url("/v1/models"))
        .header("authorization", "Bearer k1")
        .header("x-sim-echo-headers", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-sim-auth-authorization").is_none());
    // Request policy on a non-LLM call: 3 per minute per source address, then 429.
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "3");
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "3");
    for _ in 0..2 {
        assert_eq!(
            c.get(gw.url("/v1/models")).send().await.unwrap().status(),
            200
        );
    }
    let r = c.get(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "requests");

    // Host routing, port ignored, wildcard; POST /v1/models is not the public route.
    for host in [
        "trlp-tutorial.example.com:8080",
        "a.llm.example.com",
        "TRLP-TUTORIAL.example.com",
    ] {
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .header("host", host)
            .header("authorization", "Bearer k1")
            .json(&chat_body(2))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{host}");
    }
    // Unknown host and no model match: 404 JSON.
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .header("host", "llm.example.com")
        .header("authorization", "Bearer k1")
        .json(&chat_body(2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_found");

    // Model routing + auth: optional — anonymous allowed, a bad key is still 401.
    let mut body = chat_body(2);
    body["model"] = "big".into();
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .header("host", "other.example.com")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .header("host", "other.example.com")
        .header("authorization", "Bearer wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Prefix matches whole segments only.
    let r = c
        .post(gw.url("/v1x/chat/completions"))
        .header("host", "trlp-tutorial.example.com")
        .json(&chat_body(2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn slow_upstream_is_504_json_and_bad_body_is_400() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(up.addr));
    let c = client();
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .header("host", "trlp-tutorial.example.com")
        .header("authorization", "Bearer k1")
        .header("x-sim-latency-ms", "2000")
        .json(&chat_body(2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_timeout");

    for body in [
        "not json",
        r#"{"model":"a","model":"b","messages":[]}"#,
        "[1,2]",
    ] {
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .header("host", "trlp-tutorial.example.com")
            .header("authorization", "Bearer k1")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
}
