//! Gloo's tutorial through the real server: the seed's own JWT for Alice, verified with
//! the seed's public key; per-`sub` token counters over minute/hour/day windows (the
//! hour tier blocks while the minute tier still has room); authorization by the token's
//! `llms.openai` claim; bad tokens refused with 401 and never forwarded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/jwt/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
    .trim()
    .to_owned()
}

fn config(up: std::net::SocketAddr) -> String {
    let pem = fixture("alice.pub.pem").replace('\n', "\n          ");
    format!(
        r#"
backends:
  - name: up
    url: http://{up}
routes:
  - name: openai
    match: {{ path_prefix: /v1 }}
    backend: up
auth:
  authorization:
    - request.model in auth.identity.llms.openai
  jwt:
    providers:
      - name: selfminted
        issuer: solo.io
        public_key_pem: |
          {pem}
        identity:
          userid: claims.sub
policies:
  - name: per-user
    kind: TokenRateLimitPolicy
    limits:
      tiers:
        rates: [{{ limit: 100, window: 1m }}, {{ limit: 1000, window: 1h }}, {{ limit: 10000, window: 1d }}]
        counters: [auth.identity.sub]
"#
    )
}

fn body(model: &str, max_tokens: u64) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens})
}

#[tokio::test]
async fn alice_tiers_and_authorization() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(up.addr));
    let alice = fixture("alice.jwt");
    let c = client();
    let call = |model: &'static str, max_tokens: u64| {
        c.post(gw.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {alice}"))
            .json(&body(model, max_tokens))
            .send()
    };
    // Alice may call gpt-3.5-turbo (her llms.openai claim), nothing else.
    let r = call("gpt-3.5-turbo", 5).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "100");
    let r = call("gpt-4o", 5).await.unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "permission_denied");

    // ~47 tokens a call, two calls per minute: the minute tier never blocks; the hour
    // tier (1,000) does.
    let mut spent = 5 + 3; // first call: 5 completion + prompt
    let mut calls = 0;
    let refused = loop {
        let r = call("gpt-3.5-turbo", 44).await.unwrap();
        if r.status() == 429 {
            break r;
        }
        assert_eq!(r.status(), 200);
        spent += r.json::<Value>().await.unwrap()["usage"]["total_tokens"]
            .as_u64()
            .unwrap();
        calls += 1;
        if calls % 2 == 0 {
            gw.advance(60_000).await;
        }
        assert!(calls < 60, "hour tier never blocked");
    };
    assert!(spent >= 1000, "{spent}");
    assert_eq!(refused.headers()["x-ratelimit-limit-tokens"], "1000");
    let minute = gw.counters("per-user/tiers/60000/alice").await;
    assert!(
        minute.iter().all(|c| c["value"].as_u64().unwrap() < 100),
        "{minute:?}"
    );
    let hour = gw.counters("per-user/tiers/3600000/alice").await;
    assert!(
        hour.iter().any(|c| c["value"].as_u64().unwrap() >= 1000),
        "{hour:?}"
    );
}

#[tokio::test]
async fn bad_tokens_are_401_with_www_authenticate() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(up.addr));
    let alice = fixture("alice.jwt");
    let mut parts: Vec<String> = alice.split('.').map(str::to_owned).collect();
    // Tampered payload: same signature, different claims.
    let tampered = {
        use base64::Engine as _;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut claims: Value = serde_json::from_slice(&e.decode(&parts[1]).unwrap()).unwrap();
        claims["sub"] = "mallory".into();
        parts[1] = e.encode(claims.to_string());
        parts.join(".")
    };
    let none_alg = {
        use base64::Engine as _;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            e.encode(r#"{"alg":"none","typ":"JWT"}"#),
            alice.split('.').nth(1).unwrap()
        )
    };
    for token in [tampered, none_alg, "a.b.c".to_owned(), format!("{alice}x")] {
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {token}"))
            .json(&body("gpt-3.5-turbo", 1))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{token}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    assert_eq!(up.served(), 0);
    assert!(!gw.logs().contains(&alice[..40]), "token in logs");
}
