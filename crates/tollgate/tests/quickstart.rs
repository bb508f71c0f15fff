//! The Kuadrant tutorial end to end through the real server: free and gold users, 401s,
//! 429 shape and headers, window rollover on the test clock, settlement into the
//! admission window, blocked requests never reaching the upstream, credentials, paths.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;

async fn chat(gw: &Gateway, key: &str, path: &str, max_tokens: u64) -> reqwest::Response {
    client()
        .post(gw.url(path))
        .header("authorization", format!("APIKEY {key}"))
        .json(&chat_body(max_tokens))
        .send()
        .await
        .unwrap()
}

fn usage_total(v: &Value) -> u64 {
    v["usage"]["total_tokens"].as_u64().unwrap()
}

#[tokio::test]
async fn free_user_hits_budget_gold_carries_on_and_window_rolls_over() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&quickstart_config(&sim_backend(up.addr)));

    // Free: spend until refused. Every admitted call is charged its real usage.
    let mut spent = 0;
    let mut admitted = 0;
    let refused = loop {
        let r = chat(&gw, "iamafreeuser", "/v1/chat/completions", 10).await;
        if r.status() == 429 {
            break r;
        }
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        spent += usage_total(&v);
        admitted += 1;
        assert!(admitted < 20, "never limited");
    };
    // Admitted while below 50; the call that crossed it completed.
    assert!(spent >= 50, "refused at {spent} < 50");
    let per_call = spent / admitted;
    assert!(
        spent - per_call < 50,
        "admitted a call after the budget was spent"
    );

    // 429: OpenAI-style body and headers.
    let h = refused.headers().clone();
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    let retry_ms: u64 = h["retry-after-ms"].to_str().unwrap().parse().unwrap();
    assert!(retry_ms <= 60_000 && retry_ms > 0);
    assert_eq!(h["x-ratelimit-limit-tokens"], "50");
    assert_eq!(h["x-ratelimit-remaining-tokens"], "0");
    assert_eq!(h["x-ratelimit-limit"], "50");
    assert_eq!(h["x-ratelimit-remaining"], "0");
    assert_eq!(h["content-type"], "application/json");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "tokens");
    assert!(body["error"]["param"].is_null());
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("trlp/free"));

    // The counter holds exactly what was charged.
    let id = "trlp/free/60000/user-1";
    assert_eq!(gw.counter_value(id, Some(T0)).await, Some(spent));

    // Gold is unaffected by free's spending.
    let r = chat(&gw, "iamagolduser", "/v1/chat/completions", 10).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "200");
    assert_eq!(r.headers()["x-ratelimit-remaining-tokens"], "200");

    // Next window: free is admitted again.
    gw.advance(60_000).await;
    let r = chat(&gw, "iamafreeuser", "/v1/chat/completions", 10).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-remaining-tokens"], "50");
    assert_eq!(r.headers()["x-ratelimit-reset-tokens"], "1m0s");
}

#[tokio::test]
async fn blocked_requests_never_reach_the_upstream() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&quickstart_config(&sim_backend(up.addr)));
    // One big call spends the whole free budget.
    let r = chat(&gw, "iamafreeuser", "/v1/chat/completions", 60).await;
    assert_eq!(r.status(), 200);
    let served = up.served();
    for _ in 0..5 {
        let r = chat(&gw, "iamafreeuser", "/v1/chat/completions", 1).await;
        assert_eq!(r.status(), 429);
    }
    assert_eq!(
        up.served(),
        served,
        "a refused request reached the upstream"
    );
}

#[tokio::test]
async fn missing_or_bad_key_is_401_and_not_forwarded() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&quickstart_config(&sim_backend(up.addr)));
    let c = client();
    for req in [
        c.post(gw.url("/v1/chat/completions")).json(&chat_body(1)),
        c.post(gw.url("/v1/chat/completions"))
            .header("authorization", "APIKEY nope")
            .json(&chat_body(1)),
        c.post(gw.url("/v1/chat/completions"))
            .header("authorization", "Basic iamafreeuser")
            .json(&chat_body(1)),
        c.post(gw.url("/v1/chat/completions"))
            .header("x-api-key", "wrong")
            .json(&chat_body(1)),
        c.get(gw.url("/v1/models")),
    ] {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    assert_eq!(up.served(), 0);
    // x-api-key works too; GET /v1/models is never token-checked.
    let r = c
        .get(gw.url("/v1/models"))
        .header("x-api-key", "iamafreeuser")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-ratelimit-limit-tokens").is_none());
}

#[tokio::test]
async fn settled_in_the_window_it_was_admitted_in() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&quickstart_config(&sim_backend(up.addr)));
    // Admitted at T0 + 59s; the stream ends after the clock crossed into the next window.
    gw.set_clock(T0 + 59_000).await;
    let mut body = chat_body(8);
    body["stream"] = Value::Bool(true);
    let mut r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer iamagolduser")
        .header("x-sim-ms-per-token", "25")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap();
    assert!(first.is_some());
    gw.advance(2_000).await; // now T0 + 61s: next window
    let mut text = String::from_utf8_lossy(&first.unwrap()).to_string();
    while let Some(c) = r.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&c));
    }
    assert!(text.contains("[DONE]"));
    // The client did not ask for usage: the usage-only chunk was removed.
    assert!(
        !text.contains("\"total_tokens\""),
        "usage chunk leaked: {text}"
    );

    let id = "trlp/gold/60000/user-2";
    let old = gw.counter_value(id, Some(T0)).await.unwrap_or(0);
    assert!(
        old > 8,
        "charge did not land in the admission window: {old}"
    );
    let new = gw.counter_value(id, Some(T0 + 60_000)).await.unwrap_or(0);
    assert_eq!(new, 0, "charge leaked into the next window");
}

#[tokio::test]
async fn gateway_credential_not_forwarded_backend_key_injected_in_each_style() {
    let up = Upstream::start().await;
    let backends = format!(
        "  - name: up\n    url: http://{a}\n    api_key_env: TG_TEST_KEY_A\n  - name: anth\n    url: http://{a}\n    api_key_env: TG_TEST_KEY_B\n    api_key_header: x-api-key\n    headers: {{ anthropic-version: \"2023-06-01\" }}\n  - name: azure\n    url: http://{a}/\n    api_key_env: TG_TEST_KEY_C\n    api_key_header: api-key\n",
        a = up.addr
    );
    let mut cfg = quickstart_config(&backends);
    cfg = cfg.replace(
        "routes:\n  - name: llm\n",
        "routes:\n  - name: anth\n    match: { path_prefix: /anthropic }\n    backend: anth\n  - name: azure\n    match: { path_prefix: /azure }\n    backend: azure\n  - name: llm\n",
    );
    let gw = Gateway::start_with_env(
        &cfg,
        &[
            ("TG_TEST_KEY_A", "sk-upstream-a"),
            ("TG_TEST_KEY_B", "sk-upstream-b"),
            ("TG_TEST_KEY_C", "sk-upstream-c"),
        ],
    );
    let c = client();
    let r = c
        .get(gw.url("/v1/models"))
        .header("authorization", "Bearer iamafreeuser")
        .header("x-sim-echo-headers", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["x-sim-auth-authorization"], "Bearer sk-upstream-a");
    assert!(h.get("x-sim-auth-x-api-key").is_none());

    // Client sends both headers; neither reaches the upstream.
    let r = c
        .get(gw.url("/anthropic/x"))
        .header("x-api-key", "iamafreeuser")
        .header("x-sim-echo-headers", "1")
        .send()
        .await
        .unwrap();
    let h = r.headers();
    assert_eq!(h["x-sim-auth-x-api-key"], "sk-upstream-b");
    assert!(h.get("x-sim-auth-authorization").is_none(), "{h:?}");
    let seen = h["x-sim-seen-headers"].to_str().unwrap();
    assert!(seen.contains("anthropic-version"), "{seen}");

    let r = c
        .get(gw.url("/azure/x"))
        .header("authorization", "APIKEY iamagolduser")
        .header("x-sim-echo-headers", "1")
        .send()
        .await
        .unwrap();
    let h = r.headers();
    assert_eq!(h["x-sim-auth-api-key"], "sk-upstream-c");
    assert!(h.get("x-sim-auth-authorization").is_none());
    // The gateway key never appears in the logs.
    let logs = gw.logs();
    assert!(!logs.contains("iamafreeuser") && !logs.contains("iamagolduser"));
    assert!(!logs.contains("sk-upstream"));
}

#[tokio::test]
async fn path_tricks_do_not_dodge_the_predicate() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&quickstart_config(&sim_backend(up.addr)));
    let r = chat(&gw, "iamafreeuser", "/v1/chat/completions", 60).await;
    assert_eq!(r.status(), 200);
    let served = up.served();
    for p in [
        "/v1/chat/completions?x=1",
        "//v1/chat/completions",
        "/v1//chat/completions",
        "/v1/x/../chat/completions",
        "/v1/./chat/completions",
        "/v1/chat/%63ompletions",
        "/v1/chat/./completions",
    ] {
        let r = chat(&gw, "iamafreeuser", p, 1).await;
        assert_eq!(r.status(), 429, "{p} dodged the limit");
    }
    for p in [
        "/v1/chat%2Fcompletions",
        "/v1%2fchat/completions",
        "/v1/chat%5Ccompletions",
    ] {
        let r = chat(&gw, "iamafreeuser", p, 1).await;
        assert_eq!(r.status(), 400, "{p}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "bad_request");
    }
    assert_eq!(up.served(), served);
}

#[tokio::test]
async fn upstream_down_is_502_json_and_nothing_charged() {
    // A port nothing listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let gw = Gateway::start(&quickstart_config(&sim_backend(addr)));
    let r = chat(&gw, "iamafreeuser", "/v1/chat/completions", 5).await;
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "api_error");
    assert_eq!(
        gw.counter_value("trlp/free/60000/user-1", None)
            .await
            .unwrap_or(0),
        0
    );
}

#[tokio::test]
async fn in_process_simulator_serves_the_quickstart() {
    let cfg = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/quickstart.yaml"
    ))
    .unwrap();
    let gw = Gateway::start(&cfg);
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer iamagolduser")
        .json(&serde_json::json!({"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["model"], "meta-llama/Llama-3.1-8B-Instruct");
}
