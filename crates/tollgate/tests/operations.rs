//! Operating it: admin API (with and without a token), counters inspect/reset, redacted
//! config, status and usage export, the caller's own usage endpoint, hot reload (file
//! swap and SIGHUP, refusal keeps the old config, counters survive), and drain on
//! SIGTERM with a stream in flight.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;

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
async fn admin_api_with_token_counters_config_status_usage() {
    let up = Upstream::start().await;
    let cfg = quickstart_config(&sim_backend(up.addr)).replace(
        "listen: 127.0.0.1:0\n",
        "listen: 127.0.0.1:0\nadmin:\n  token_env: TG_ADMIN_TOKEN\n",
    );
    let gw = Gateway::start_with_env(&cfg, &[("TG_ADMIN_TOKEN", "s3cret-admin")]);
    let c = client();
    // Health is open; the API needs the token.
    assert_eq!(
        c.get(gw.admin_url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = c.get(gw.admin_url("/admin/counters")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "admin_error");
    let r = c
        .get(gw.admin_url("/metrics"))
        .header("authorization", "Bearer wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let auth = ("authorization", "Bearer s3cret-admin");

    let r = chat(&gw, "iamafreeuser", 10).await;
    let spent = r.json::<Value>().await.unwrap()["usage"]["total_tokens"]
        .as_u64()
        .unwrap();

    let v: Value = c
        .get(gw.admin_url("/admin/counters?policy=trlp&limit=free"))
        .header(auth.0, auth.1)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cs = v["counters"].as_array().unwrap();
    assert_eq!(cs.len(), 1, "{v}");
    assert_eq!(cs[0]["id"], "trlp/free/60000/user-1");
    assert_eq!(cs[0]["value"], spent);
    assert_eq!(cs[0]["limit"], 50);
    assert_eq!(cs[0]["remaining"], 50 - spent);
    assert_eq!(cs[0]["reset_at"], T0 + 60_000);

    // The caller's own view, without spending.
    let v: Value = c
        .get(gw.url("/v1/tollgate/usage"))
        .header("authorization", "Bearer iamafreeuser")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mine = v["counters"].as_array().unwrap();
    assert!(
        mine.iter()
            .any(|c| c["counter"] == "trlp/free/60000/user-1" && c["value"] == spent),
        "{v}"
    );
    assert!(
        !mine.iter().any(|c| c["limit_name"] == "gold"),
        "gold limit shown to a free user: {v}"
    );
    let r = c.get(gw.url("/v1/tollgate/usage")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(up.served(), 1, "the usage endpoint reached the upstream");

    // Usage export and status.
    let v: Value = c
        .get(gw.admin_url("/admin/usage?since=1h"))
        .header(auth.0, auth.1)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rows = v["identities"].as_array().unwrap();
    assert_eq!(rows[0]["identity"], "user-1");
    assert_eq!(rows[0]["total_tokens"], spent);
    assert_eq!(rows[0]["policy"], "trlp");
    let st: Value = c
        .get(gw.admin_url("/admin/status"))
        .header(auth.0, auth.1)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["requests"]["allowed"], 1);
    assert_eq!(st["store"]["kind"], "memory");
    assert_eq!(st["store"]["healthy"], true);
    assert!(st["version"].is_string());

    // Effective config: no secrets.
    let text = c
        .get(gw.admin_url("/admin/config"))
        .header(auth.0, auth.1)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("trlp"));
    assert!(
        !text.contains("iamafreeuser") && !text.contains("s3cret-admin"),
        "{text}"
    );

    // Reset one counter.
    let r = c
        .delete(gw.admin_url("/admin/counters?id=trlp/free/60000/user-1"))
        .header(auth.0, auth.1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = chat(&gw, "iamafreeuser", 1).await;
    assert_eq!(r.headers()["x-ratelimit-remaining-tokens"], "50");
    let r = c
        .delete(gw.admin_url("/admin/counters?id=nope/x/1/y"))
        .header(auth.0, auth.1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // The dashboard page is served from the binary.
    let page = c.get(gw.admin_url("/dashboard")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
}

#[tokio::test]
async fn reload_swaps_refuses_and_keeps_counters() {
    let up = Upstream::start().await;
    let cfg = quickstart_config(&sim_backend(up.addr));
    let gw = Gateway::start(&cfg);
    let r = chat(&gw, "iamafreeuser", 10).await;
    let spent = r.json::<Value>().await.unwrap()["usage"]["total_tokens"]
        .as_u64()
        .unwrap();

    // Raise the free limit by swapping the file: counters survive.
    gw.rewrite_config(&cfg.replace("limit: 50,", "limit: 500,"));
    let st = gw.wait_reloads(0).await;
    assert_eq!(st["last_reload"]["ok"], true, "{st}");
    let r = chat(&gw, "iamafreeuser", 1).await;
    assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "500");
    assert_eq!(
        r.headers()["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap(),
        (500 - spent).to_string()
    );

    // A broken config is refused; the old one keeps serving.
    gw.rewrite_config(&cfg.replace("limit: 50,", "limit: fifty,"));
    let st = gw.wait_reloads(1).await;
    assert_eq!(st["last_reload"]["ok"], false);
    assert!(
        st["last_reload"]["error"]
            .as_str()
            .unwrap()
            .contains("limit"),
        "{st}"
    );
    let r = chat(&gw, "iamafreeuser", 1).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "500");

    // SIGHUP reloads too (the file is now fixed, back to 50).
    std::fs::write(&gw.config_path, &cfg).unwrap();
    gw.signal("HUP");
    let st = gw.wait_reloads(2).await;
    assert_eq!(st["last_reload"]["ok"], true, "{st}");
    let r = chat(&gw, "iamagolduser", 1).await;
    assert_eq!(r.status(), 200);
    let r = chat(&gw, "iamafreeuser", 1).await;
    assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "50");
    let metrics = client()
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tollgate_config_reloads_total{result=\"failure\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn sigterm_drains_a_stream_in_flight_and_counts_it() {
    let up = Upstream::start().await;
    let mut gw = Gateway::start(&quickstart_config(&sim_backend(up.addr)));
    let mut body = chat_body(30);
    body["stream"] = Value::Bool(true);
    let mut r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer iamagolduser")
        .header("x-sim-ms-per-token", "20")
        .json(&body)
        .send()
        .await
        .unwrap();
    let first = r.chunk().await.unwrap().unwrap();
    gw.signal("TERM");
    let mut text = String::from_utf8_lossy(&first).to_string();
    while let Some(c) = r.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&c));
    }
    assert!(text.contains("[DONE]"), "stream cut by shutdown: {text}");
    // New connections are refused while draining / after exit.
    let status = tokio::task::spawn_blocking(move || {
        let st = gw.child.wait().unwrap();
        (st, gw)
    })
    .await
    .unwrap();
    let (st, gw) = status;
    assert!(st.success(), "exit status {st:?}");
    let logs = gw.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("tollgate::access") && l.contains("user-2"))
        .unwrap_or_else(|| panic!("no access line: {logs}"));
    assert!(line.contains("charged="), "{line}");
    assert!(!line.contains("charged=0"), "{line}");
    assert!(line.contains("estimated=false"), "{line}");
}

/// Reading the config (an open event on it) and logs written beside it do not wake the
/// reloader: no re-reading loop. A change to the config does, once.
#[tokio::test]
async fn reloader_wakes_for_config_changes_only() {
    let up = Upstream::start().await;
    let cfg = quickstart_config(&sim_backend(up.addr));
    let g = Gateway::start(&cfg);
    let dir = g.config_path.parent().unwrap().to_path_buf();
    // Access logs go to stderr, a file beside the config; and another file there.
    for i in 0..5 {
        assert_eq!(chat(&g, "iamafreeuser", 1).await.status(), 200);
        std::fs::write(dir.join("other.log"), format!("line {i}\n")).unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    assert_eq!(g.status().await["last_reload"]["checks"], 0);

    g.rewrite_config(&format!("{cfg}\n# touched\n"));
    let st = g.wait_reloads(0).await;
    let checks = st["last_reload"]["checks"].as_u64().unwrap();
    assert!(checks >= 1, "{st}");
    // Reading it to reload is not a change: it stays quiet afterwards.
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    assert_eq!(
        g.status().await["last_reload"]["checks"].as_u64().unwrap(),
        checks
    );
}

/// `server.workers`: with 0 (the shared runtime), 1 and 3 proxy threads, many clients on
/// connections of their own are all served and every token lands on the counter; the
/// admin API, which runs apart from the proxy threads, sees the same counters.
#[tokio::test]
async fn proxy_workers_serve_and_count_alike() {
    let up = Upstream::start().await;
    for workers in [0, 1, 3] {
        let cfg = quickstart_config(&sim_backend(up.addr)).replace(
            "listen: 127.0.0.1:0\n",
            &format!("listen: 127.0.0.1:0\nserver:\n  workers: {workers}\n"),
        );
        let gw = Gateway::start(&cfg);
        let mut tasks = Vec::new();
        for _ in 0..12 {
            // A client each: a connection each, handed to the workers in turn.
            let url = gw.url("/v1/chat/completions");
            tasks.push(tokio::spawn(async move {
                let c = client();
                let mut spent = 0;
                for _ in 0..3 {
                    let r = c
                        .post(&url)
                        .header("authorization", "Bearer iamagolduser")
                        .json(&chat_body(1))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    spent += r.json::<Value>().await.unwrap()["usage"]["total_tokens"]
                        .as_u64()
                        .unwrap();
                }
                spent
            }));
        }
        let mut spent = 0;
        for t in tasks {
            spent += t.await.unwrap();
        }
        assert_eq!(
            gw.counter_value("trlp/gold/60000/user-2", None).await,
            Some(spent),
            "workers={workers}"
        );
    }
}

/// A response delivered whole is logged `end=complete`: a non-streamed body (whose
/// length the server knows, so it stops reading at the last byte) as much as a stream.
#[tokio::test]
async fn whole_responses_are_logged_complete() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&quickstart_config(&sim_backend(up.addr)));
    let r = chat(&gw, "iamagolduser", 5).await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    let mut body = chat_body(5);
    body["stream"] = Value::Bool(true);
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer iamagolduser")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    // The line is written when the body ends, just after the client has it.
    let mut lines = Vec::new();
    for _ in 0..200 {
        lines = gw
            .logs()
            .lines()
            .filter(|l| l.contains("tollgate::access") && l.contains("user-2"))
            .map(str::to_owned)
            .collect();
        if lines.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        assert!(
            l.contains("end=\"complete\"") || l.contains("end=complete"),
            "{l}"
        );
    }
}
