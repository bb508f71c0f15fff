//! Global limits through the real server on Redis: three replicas share one budget
//! exactly (reserve mode never admits past the limit), counters survive a gateway
//! restart, and a Redis that goes away under traffic: fail_open keeps serving (no 5xx),
//! fail_closed answers 503 with retry-after, both recover without a restart, and a
//! settlement that could not be written is written after reconnection.
//!
//! Uses the shared Redis on 127.0.0.1:6379 with a key prefix of its own (nothing is
//! flushed); the outage test starts its own redis-server on a free port.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A test clock near real time (start of the current minute), so keys written with it
/// expire within the hour on the shared server.
fn near_now() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    now - now % 60_000
}

fn prefix(tag: &str) -> String {
    format!(
        "tgtest-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            % 1_000_000_000
    )
}

fn config(
    up: std::net::SocketAddr,
    redis_url: &str,
    prefix: &str,
    on_error: &str,
    limit: u64,
) -> String {
    format!(
        r#"
storage:
  kind: redis
  redis:
    url: {redis_url}
    key_prefix: {prefix}
    timeout: 500ms
    connect_timeout: 200ms
  on_error: {on_error}
backends:
  - name: up
    url: http://{up}
routes:
  - name: llm
    match: {{ path_prefix: /v1 }}
    backend: up
auth:
  api_keys:
    keys:
      - key: k1
        identity: {{ userid: u1 }}
policies:
  - name: tok
    kind: TokenRateLimitPolicy
    accounting: reserve
    limits:
      user:
        rates: [{{ limit: {limit}, window: 1h }}]
        counters: [auth.identity.userid]
logging:
  access_log: false
"#
    )
}

fn chat(max_tokens: u64) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "one two three four five six seven eight"}], "max_tokens": max_tokens})
}

#[tokio::test]
async fn three_replicas_share_one_budget_exactly() {
    let up = Upstream::start().await;
    let p = prefix("replicas");
    let t0 = near_now();
    let cfg = config(up.addr, "redis://127.0.0.1:6379", &p, "fail_closed", 1000);
    let gws: Vec<Gateway> = (0..3).map(|_| Gateway::start_at(&cfg, &[], t0)).collect();
    let urls: Vec<String> = gws.iter().map(|g| g.url("/v1/chat/completions")).collect();
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..30 {
        let c = c.clone();
        let url = urls[i % 3].clone();
        tasks.push(tokio::spawn(async move {
            let (mut n, mut tokens, mut refused) = (0u64, 0u64, 0);
            while refused < 2 {
                let r = c
                    .post(&url)
                    .header("authorization", "Bearer k1")
                    .header("x-sim-latency-ms", "20")
                    .json(&chat(90))
                    .send()
                    .await
                    .unwrap();
                match r.status().as_u16() {
                    200 => {
                        refused = 0;
                        n += 1;
                        tokens += r.json::<Value>().await.unwrap()["usage"]["total_tokens"]
                            .as_u64()
                            .unwrap();
                    }
                    429 => refused += 1,
                    s => panic!("unexpected status {s}"),
                }
            }
            (n, tokens)
        }));
    }
    let (mut n, mut tokens) = (0, 0);
    for t in tasks {
        let (a, b) = t.await.unwrap();
        n += a;
        tokens += b;
    }
    assert!(
        tokens <= 1000,
        "three replicas admitted {tokens} tokens past a shared 1000 limit"
    );
    assert!(n >= 9, "only {n} calls admitted: the budget was not used");
    // Every replica sees the same counter.
    for g in &gws {
        let v = g.counter_value("tok/user/3600000/u1", None).await.unwrap();
        assert_eq!(v, tokens);
    }
    // A restarted gateway keeps the spend.
    drop(gws);
    let g = Gateway::start_at(&cfg, &[], t0);
    let r = client()
        .post(g.url("/v1/chat/completions"))
        .header("authorization", "Bearer k1")
        .json(&chat(1))
        .send()
        .await
        .unwrap();
    let remaining: u64 = r.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(remaining, 1000u64.saturating_sub(tokens));
}

struct RedisServer {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl RedisServer {
    fn start(port: u16, dir: &std::path::Path) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test.sh installs it)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer {
            child,
            port,
            dir: dir.to_owned(),
        }
    }
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    fn restart(&mut self) {
        self.stop();
        *self = RedisServer::start(self.port, &self.dir.clone());
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn status_of(g: &Gateway, max_tokens: u64) -> u16 {
    client()
        .post(g.url("/v1/chat/completions"))
        .header("authorization", "Bearer k1")
        .json(&chat(max_tokens))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn redis_outage_fail_open_fail_closed_recovery_and_deferred_settlement() {
    let up = Upstream::start().await;
    let dir = std::env::temp_dir().join(format!("tg-redis-{}", prefix("dir")));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let mut redis = RedisServer::start(port, &dir);
    let url = format!("redis://127.0.0.1:{port}");
    let t0 = near_now();
    let open = Gateway::start_at(
        &config(up.addr, &url, "tgopen", "fail_open", 1_000_000),
        &[],
        t0,
    );
    let closed = Gateway::start_at(
        &config(up.addr, &url, "tgclosed", "fail_closed", 1_000_000),
        &[],
        t0,
    );
    assert_eq!(status_of(&open, 5).await, 200);
    assert_eq!(status_of(&closed, 5).await, 200);

    // A stream admitted on Redis, still running when Redis goes away.
    let mut body = chat(40);
    body["stream"] = json!(true);
    let mut stream = client()
        .post(open.url("/v1/chat/completions"))
        .header("authorization", "Bearer k1")
        .header("x-sim-ms-per-token", "10")
        .json(&body)
        .send()
        .await
        .unwrap();
    let _ = stream.chunk().await.unwrap();
    let before = open
        .counter_value("tok/user/3600000/u1", None)
        .await
        .unwrap();

    redis.stop();
    while stream.chunk().await.unwrap().is_some() {}

    // fail_open: no 5xx; fail_closed: 503 JSON with retry-after, quickly.
    for _ in 0..5 {
        let started = std::time::Instant::now();
        assert_eq!(status_of(&open, 5).await, 200);
        assert!(started.elapsed() < Duration::from_secs(2), "fail_open hung");
        let r = client()
            .post(closed.url("/v1/chat/completions"))
            .header("authorization", "Bearer k1")
            .json(&chat(5))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert!(r.headers().contains_key("retry-after"));
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_store_unavailable");
    }
    let ready: Value = client()
        .get(open.admin_url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["store"]["state"], "degraded", "{ready}");
    // The metric follows within a sweep tick (1 s).
    let mut degraded = false;
    for _ in 0..60 {
        let m = client()
            .get(open.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if m.contains("tollgate_store_degraded 1") {
            degraded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(degraded, "tollgate_store_degraded never became 1");

    // Redis returns: both recover by themselves; the stream's settlement is written.
    redis.restart();
    let mut recovered = false;
    for _ in 0..200 {
        if status_of(&closed, 5).await == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "fail_closed did not recover");
    // The new Redis is empty; the deferred settlement of the stream lands in it.
    let mut written = None;
    for _ in 0..100 {
        if let Some(v) = open.counter_value("tok/user/3600000/u1", None).await {
            if v >= 40 {
                written = Some(v);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let written = written.unwrap_or_else(|| {
        panic!(
            "deferred settlement not written; before outage {before}; {}",
            open.logs()
        )
    });
    assert!(written >= 40, "{written}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `scope: replica` on Redis: two gateway processes on one Redis. A replica-scoped limit
/// counts per process, a shared one across both, and a request refused by its replica
/// counter takes nothing from the shared ones (the gateway-wide ceiling counts exactly
/// the admitted requests).
#[tokio::test]
async fn replica_scope_is_per_process_shared_is_global() {
    let up = Upstream::start().await;
    let p = prefix("scope");
    let t0 = near_now();
    let cfg = format!(
        r#"
storage:
  kind: redis
  redis: {{ url: "redis://127.0.0.1:6379", key_prefix: {p}, timeout: 500ms }}
  on_error: fail_closed
backends:
  - name: up
    url: http://{up}
routes:
  - name: shared
    hostnames: [shared.test]
    match: {{ path_prefix: /v1 }}
    backend: up
    auth: none
  - name: replica
    hostnames: [replica.test]
    match: {{ path_prefix: /v1 }}
    backend: up
    auth: none
policies:
  - name: ceiling
    kind: RateLimitPolicy
    limits:
      n: {{ rates: [{{ limit: 100, window: 1h }}] }}
  - name: global
    kind: RateLimitPolicy
    target: {{ route: shared }}
    limits:
      n: {{ rates: [{{ limit: 3, window: 1h }}] }}
  - name: local
    kind: RateLimitPolicy
    scope: replica
    target: {{ route: replica }}
    limits:
      n: {{ rates: [{{ limit: 2, window: 1h }}] }}
logging:
  access_log: false
"#,
        up = up.addr
    );
    let a = Gateway::start_at(&cfg, &[], t0);
    let b = Gateway::start_at(&cfg, &[], t0);
    let send = |gw: &Gateway, host: &'static str| {
        client()
            .post(gw.url("/v1/chat/completions"))
            .header("host", host)
            .json(&chat(1))
            .send()
    };
    let status = |r: reqwest::Result<reqwest::Response>| r.unwrap().status().as_u16();
    // Shared: three in all, whichever gateway takes them.
    for _ in 0..3 {
        assert_eq!(status(send(&a, "shared.test").await), 200);
    }
    assert_eq!(status(send(&b, "shared.test").await), 429);
    // Replica: two per gateway process.
    for gw in [&a, &b] {
        for _ in 0..2 {
            assert_eq!(status(send(gw, "replica.test").await), 200);
        }
        assert_eq!(status(send(gw, "replica.test").await), 429);
    }
    for gw in [&a, &b] {
        assert_eq!(gw.counter_value("local/n/3600000", None).await, Some(2));
        assert_eq!(gw.counter_value("global/n/3600000", None).await, Some(3));
        // 3 + 2 + 2 admitted; the three refusals took nothing from the ceiling.
        assert_eq!(gw.counter_value("ceiling/n/3600000", None).await, Some(7));
    }
}

/// On SIGTERM, a stream in flight finishes and its settlement, written to Redis on a task
/// of its own, is waited for before the process exits: the tokens are on the counter.
/// Redis (a server of the test's own) is paused for writes just before, so the
/// settlement is still on its way when the connections have drained.
#[tokio::test]
async fn sigterm_waits_for_settlements_on_their_way_to_redis() {
    let up = Upstream::start().await;
    let dir = std::env::temp_dir().join(format!("tg-redis-{}", prefix("drain")));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let _redis = RedisServer::start(port, &dir);
    let url = format!("redis://127.0.0.1:{port}");
    let t0 = near_now();
    // After-the-fact accounting: the counter holds nothing until the settlement lands.
    let cfg = config(up.addr, &url, "tgdrain", "fail_closed", 100_000)
        .replace("    accounting: reserve\n", "")
        .replace("timeout: 500ms", "timeout: 2s");
    let mut gw = Gateway::start_at(&cfg, &[], t0);
    let mut body = chat(20);
    body["stream"] = Value::Bool(true);
    body["stream_options"] = json!({"include_usage": true});
    let mut r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer k1")
        .header("x-sim-ms-per-token", "10")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().unwrap();
    {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(b"CLIENT PAUSE 700 WRITE\r\n").unwrap();
        let mut ok = [0u8; 5];
        c.read_exact(&mut ok).unwrap();
        assert_eq!(&ok, b"+OK\r\n");
    }
    gw.signal("TERM");
    let mut text = String::from_utf8_lossy(&first).to_string();
    while let Some(c) = r.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&c));
    }
    assert!(text.contains("[DONE]"), "stream cut by shutdown: {text}");
    let total: u64 = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| v["usage"]["total_tokens"].as_u64())
        .unwrap_or_else(|| panic!("no usage in the stream: {text}"));
    let (st, _gw) = tokio::task::spawn_blocking(move || (gw.child.wait().unwrap(), gw))
        .await
        .unwrap();
    assert!(st.success(), "exit status {st:?}");
    let g = Gateway::start_at(&cfg, &[], t0);
    assert_eq!(
        g.counter_value("tok/user/3600000/u1", None).await,
        Some(total),
        "the settlement written during shutdown is on the counter"
    );
}

/// [`config`] on the shared Redis with after-the-fact accounting, a budget nothing
/// reaches, and `storage.redis.batching: <batching>` (inline YAML).
fn batching_config(
    up: std::net::SocketAddr,
    prefix: &str,
    on_error: &str,
    batching: &str,
) -> String {
    config(up, "redis://127.0.0.1:6379", prefix, on_error, 1_000_000)
        .replace("    accounting: reserve\n", "")
        .replace(
            "    connect_timeout: 200ms\n",
            &format!("    connect_timeout: 200ms\n    batching: {batching}\n"),
        )
}

/// The `usage.total_tokens` an answer reports.
async fn tokens_of(r: reqwest::Response) -> u64 {
    r.json::<Value>().await.unwrap()["usage"]["total_tokens"]
        .as_u64()
        .unwrap()
}

/// `storage.redis.batching`: two replicas hold their after-mode settlements up to the
/// flush interval and write each counter's sum in one call. Every token still lands
/// (both replicas read the same total), and a gateway told to stop writes what it holds.
#[tokio::test]
async fn batched_settlements_all_land_and_are_written_at_shutdown() {
    let up = Upstream::start().await;
    let p = prefix("batching");
    let t0 = near_now();
    // After-the-fact accounting, and a 300 ms interval: long enough that shutdown
    // finds settlements still held.
    let cfg = batching_config(
        up.addr,
        &p,
        "fail_closed",
        "{ flush_interval: 300ms, max_batch: 1000 }",
    );
    let mut gws: Vec<Gateway> = (0..2).map(|_| Gateway::start_at(&cfg, &[], t0)).collect();
    let c = client();
    let mut total = 0u64;
    for i in 0..40u64 {
        let g = &gws[(i % 2) as usize];
        let r = c
            .post(g.url("/v1/chat/completions"))
            .header("authorization", "Bearer k1")
            .json(&chat(1 + i % 7))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        total += tokens_of(r).await;
    }
    // Written within an interval or so; wait for it without assuming how long.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let seen = [
            gws[0].counter_value("tok/user/3600000/u1", None).await,
            gws[1].counter_value("tok/user/3600000/u1", None).await,
        ];
        if seen == [Some(total), Some(total)] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "counters {seen:?}, want {total} on both replicas"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Calls whose settlements are still held when the gateway is told to stop.
    let mut more = 0u64;
    for _ in 0..5 {
        let r = c
            .post(gws[0].url("/v1/chat/completions"))
            .header("authorization", "Bearer k1")
            .json(&chat(3))
            .send()
            .await
            .unwrap();
        more += tokens_of(r).await;
    }
    let mut g0 = gws.remove(0);
    g0.signal("TERM");
    let (st, _g0) = tokio::task::spawn_blocking(move || (g0.child.wait().unwrap(), g0))
        .await
        .unwrap();
    assert!(st.success(), "exit status {st:?}");
    assert_eq!(
        gws[0].counter_value("tok/user/3600000/u1", None).await,
        Some(total + more),
        "settlements held at shutdown were written"
    );
}

/// The longest flush interval (1 s) is not cut short by the gateway's outer bound on
/// store calls: a settlement held for a whole interval is written once, and the store
/// stays healthy (the outer bound used to give up on it first, marking Redis degraded
/// and deferring a charge that the next attempt gave up on again).
#[tokio::test]
async fn a_one_second_flush_interval_is_written_once_and_stays_healthy() {
    let up = Upstream::start().await;
    let p = prefix("batching-1s");
    let cfg = batching_config(up.addr, &p, "fail_open", "{ flush_interval: 1s }");
    let g = Gateway::start_at(&cfg, &[], near_now());
    let c = client();
    let r = c
        .post(g.url("/v1/chat/completions"))
        .header("authorization", "Bearer k1")
        .json(&chat(5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let total = tokens_of(r).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let seen = g.counter_value("tok/user/3600000/u1", None).await;
        if seen == Some(total) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "counter {seen:?}, want {total}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready: Value = c
        .get(g.admin_url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["store"]["state"], "healthy", "{ready}");
    // Nothing was given up on, so nothing waits to be written a second time.
    assert!(
        ready["store"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("deferred settlements: 0")),
        "{ready}"
    );
    let m = c
        .get(g.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("tollgate_store_degraded 0"), "{m}");
}
