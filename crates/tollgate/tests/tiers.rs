//! Tiers and bursts: minute/hour/day windows stacked, agentgateway's combined request
//! (burst) + token limits, a gateway-level ceiling shared by two routes, shadow mode,
//! calls in flight, authorization (403), pre-auth limits by source address behind a
//! trusted proxy. All through the real server on the test clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;

fn head(up: std::net::SocketAddr) -> String {
    format!(
        r#"
backends:
  - name: up
    url: http://{up}
routes:
  - name: a
    match: {{ path_prefix: /a }}
    backend: up
  - name: llm
    match: {{ path_prefix: /v1 }}
    backend: up
auth:
  api_keys:
    keys:
      - key: k1
        identity: {{ userid: u1, llms: {{ openai: [sim-model] }} }}
      - key: k2
        identity: {{ userid: u2, llms: {{ openai: [other] }} }}
"#
    )
}

async fn chat(gw: &Gateway, key: &str, max_tokens: u64) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .json(&chat_body(max_tokens))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn hour_tier_blocks_while_minute_tier_has_room() {
    let up = Upstream::start().await;
    let cfg = format!(
        "{}policies:\n  - name: tiers\n    kind: TokenRateLimitPolicy\n    limits:\n      user:\n        rates: [{{limit: 100, window: 1m}}, {{limit: 250, window: 1h}}, {{limit: 10000, window: 1d}}]\n        counters: [auth.identity.userid]\n",
        head(up.addr)
    );
    let gw = Gateway::start(&cfg);
    // Each call ~40 tokens: two per minute fit the minute tier.
    let mut spent = 0;
    let mut minute = 0;
    let refused = loop {
        let r = chat(&gw, "k1", 36).await;
        if r.status() == 429 {
            break r;
        }
        spent += r.json::<Value>().await.unwrap()["usage"]["total_tokens"]
            .as_u64()
            .unwrap();
        // Move to the next minute after every two calls: the minute tier never blocks.
        minute += 1;
        if minute % 2 == 0 {
            gw.advance(60_000).await;
        }
        assert!(spent < 1000, "never refused");
    };
    assert!((250..250 + 40).contains(&spent), "{spent}");
    let h = refused.headers();
    // The hour tier is the blocking one: headers report it, Retry-After waits for it.
    assert_eq!(h["x-ratelimit-limit-tokens"], "250");
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        retry > 60,
        "retry-after {retry} should wait for the hour window"
    );
    let v: Value = refused.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tiers/user"));
    // The minute tier has room right now.
    let cs = gw.counters("tiers/user/60000/").await;
    assert!(
        cs.iter().all(|c| c["value"].as_u64().unwrap() < 100),
        "{cs:?}"
    );
    // Next hour: admitted again.
    gw.advance(3_600_000).await;
    assert_eq!(chat(&gw, "k1", 1).await.status(), 200);
}

#[tokio::test]
async fn combined_request_burst_and_token_limits() {
    // agentgateway's scenario: 10 requests/min with burst 5, plus 1000 tokens/min.
    let up = Upstream::start().await;
    let cfg = format!(
        "{}policies:\n  - name: req\n    kind: RateLimitPolicy\n    limits:\n      user:\n        rates: [{{limit: 10, window: 1m, burst: 5}}]\n        counters: [auth.identity.userid]\n  - name: tok\n    kind: TokenRateLimitPolicy\n    limits:\n      user:\n        rates: [{{limit: 1000, window: 1m}}]\n        counters: [auth.identity.userid]\n",
        head(up.addr)
    );
    let gw = Gateway::start(&cfg);
    for i in 1..=15 {
        let r = chat(&gw, "k1", 2).await;
        assert_eq!(r.status(), 200, "request {i}");
        if i == 1 {
            assert_eq!(r.headers()["x-ratelimit-limit-requests"], "15");
        }
    }
    let r = chat(&gw, "k1", 2).await;
    assert_eq!(r.status(), 429, "request 16 must be refused");
    let tokens_left: u64 = r.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(tokens_left > 0, "tokens were left");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "requests");
    // The bucket refills continuously: 6 s buys one more request.
    gw.advance(6_000).await;
    assert_eq!(chat(&gw, "k1", 2).await.status(), 200);
    assert_eq!(chat(&gw, "k1", 2).await.status(), 429);
}

#[tokio::test]
async fn gateway_ceiling_shared_across_routes_plus_route_budget() {
    let up = Upstream::start().await;
    let cfg = format!(
        "{}policies:\n  - name: ceiling\n    kind: RateLimitPolicy\n    target: gateway\n    limits:\n      all:\n        rates: [{{limit: 5, window: 1m}}]\n  - name: route-a\n    kind: RateLimitPolicy\n    target: {{ route: a }}\n    limits:\n      per-user:\n        rates: [{{limit: 2, window: 1m}}]\n        counters: [auth.identity.userid]\n",
        head(up.addr)
    );
    let gw = Gateway::start(&cfg);
    let c = client();
    let get = |p: &'static str, k: &'static str| {
        c.get(gw.url(p))
            .header("authorization", format!("Bearer {k}"))
            .send()
    };
    assert_eq!(get("/a/x", "k1").await.unwrap().status(), 404); // upstream 404, admitted
    assert_eq!(get("/a/x", "k1").await.unwrap().status(), 404);
    assert_eq!(get("/a/x", "k1").await.unwrap().status(), 429); // route budget
    assert_eq!(get("/a/x", "k2").await.unwrap().status(), 404);
    assert_eq!(get("/v1/models", "k1").await.unwrap().status(), 200);
    assert_eq!(get("/v1/models", "k2").await.unwrap().status(), 200);
    // 5 admitted across both routes: the ceiling refuses the 6th anywhere.
    let r = get("/v1/models", "k2").await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.text().await.unwrap().contains("ceiling/all"));
}

#[tokio::test]
async fn shadow_counts_but_never_refuses_and_in_flight_is_capped() {
    let up = Upstream::start().await;
    let cfg = format!(
        "{}policies:\n  - name: trial\n    kind: RateLimitPolicy\n    mode: shadow\n    limits:\n      user:\n        rates: [{{limit: 1, window: 1m}}]\n        counters: [auth.identity.userid]\n  - name: conc\n    kind: RateLimitPolicy\n    limits:\n      user:\n        max_in_flight: 1\n        counters: [auth.identity.userid]\n",
        head(up.addr)
    );
    let gw = Gateway::start(&cfg);
    for _ in 0..3 {
        assert_eq!(chat(&gw, "k1", 1).await.status(), 200);
    }
    let m = client()
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("tollgate_shadow_refusals_total{policy=\"trial\",limit=\"user\"} 2"),
        "{m}"
    );
    // One stream in flight: a second call waits its turn (429), then goes through.
    let mut body = chat_body(20);
    body["stream"] = Value::Bool(true);
    let mut s = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer k1")
        .header("x-sim-ms-per-token", "20")
        .json(&body)
        .send()
        .await
        .unwrap();
    let _ = s.chunk().await.unwrap();
    let r = chat(&gw, "k1", 1).await;
    assert_eq!(r.status(), 429);
    assert_eq!(
        chat(&gw, "k2", 1).await.status(),
        200,
        "another user is not capped"
    );
    while s.chunk().await.unwrap().is_some() {}
    assert_eq!(chat(&gw, "k1", 1).await.status(), 200, "slot not released");
}

#[tokio::test]
async fn authorization_is_403_and_not_forwarded() {
    let up = Upstream::start().await;
    let cfg = head(up.addr).replace(
        "auth:\n  api_keys:",
        "auth:\n  authorization:\n    - request.model in auth.identity.llms.openai\n  api_keys:",
    );
    let gw = Gateway::start(&cfg);
    assert_eq!(chat(&gw, "k1", 1).await.status(), 200);
    let served = up.served();
    let r = chat(&gw, "k2", 1).await;
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "permission_denied");
    assert_eq!(up.served(), served);
}

#[tokio::test]
async fn pre_auth_limit_by_client_address_behind_trusted_proxy() {
    let up = Upstream::start().await;
    let cfg = format!(
        "server:\n  trusted_proxies: [127.0.0.0/8]\n{}policies:\n  - name: flood\n    kind: RateLimitPolicy\n    phase: pre_auth\n    limits:\n      ip:\n        rates: [{{limit: 3, window: 1m}}]\n        counters: [source.address]\n",
        head(up.addr)
    );
    let gw = Gateway::start(&cfg);
    let c = client();
    let bad = |xff: &'static str| {
        c.get(gw.url("/v1/models"))
            .header("authorization", "Bearer wrong")
            .header("x-forwarded-for", xff)
            .send()
    };
    for _ in 0..3 {
        assert_eq!(bad("203.0.113.7").await.unwrap().status(), 401);
    }
    // The 4th bad attempt from that client is refused before auth even runs.
    assert_eq!(bad("203.0.113.7").await.unwrap().status(), 429);
    // Another client behind the same proxy is unaffected.
    assert_eq!(bad("198.51.100.1, 127.0.0.1").await.unwrap().status(), 401);
    let cs = gw.counters("flood/ip/60000/").await;
    assert!(
        cs.iter().any(|c| c["id"] == "flood/ip/60000/203.0.113.7"),
        "{cs:?}"
    );
}
