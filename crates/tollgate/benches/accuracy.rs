//! Accuracy benchmark: how many tokens a budget really admits under concurrency.
//!
//! Starts the real gateway (test clock, so the whole run falls in one window) in front of
//! the simulator (50 ms latency, so calls overlap), then 50 concurrent clients send
//! ~100-token calls against a 1,000-token/minute budget until refused, for `after`
//! (charge after the call) and `reserve` (hold an estimate at admission) accounting.
//! Then the same with three gateway replicas sharing one budget on Redis
//! (`REDIS_URL`, by default redis://127.0.0.1:6379), clients spread over the replicas,
//! without and with settlements batched (`storage.redis.batching`).
//! Prints: mode, replicas, limit, concurrency, requests admitted, tokens admitted, ÷ limit.
//!
//!   cargo bench -p tollgate --bench accuracy

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

const LIMIT: u64 = 1_000;
const CONCURRENCY: usize = 50;
const T0: u64 = 1_800_000_000_000 - (1_800_000_000_000 % 86_400_000) + 8 * 3_600_000;

struct Proc(std::process::Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_gateway(config: &str, t0: u64) -> (Proc, String) {
    let dir =
        std::env::temp_dir().join(format!("tg-accuracy-{}-{}", std::process::id(), rand_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.yaml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "-c"])
        .arg(&path)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg(format!("--test-clock={t0}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let line = loop {
        let l = lines.next().unwrap().unwrap();
        if l.starts_with("tollgate listening") {
            break l;
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let proxy = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("proxy="))
        .unwrap()
        .to_owned();
    (Proc(child), proxy)
}

fn rand_id() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

async fn run(
    mode: &str,
    upstream: std::net::SocketAddr,
    replicas: usize,
    batching: Option<(&str, bool)>,
) -> (u64, u64) {
    // Replicas share counters through Redis (`REDIS_URL`, a prefix of this run's own),
    // optionally with settlements batched (`storage.redis.batching.flush_interval`), with
    // or without cached reads.
    let batching = batching
        .map(|(i, cache)| {
            format!("    batching: {{ flush_interval: {i}, cache_reads: {cache} }}\n")
        })
        .unwrap_or_default();
    let storage = if replicas > 1 {
        format!(
            "storage:\n  kind: redis\n  redis:\n    url: {}\n    key_prefix: tgbench-acc-{}-{mode}\n    timeout: 500ms\n{batching}  on_error: fail_closed\n",
            std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned()),
            rand_id() % 1_000_000_000
        )
    } else {
        String::new()
    };
    let cfg = format!(
        "{storage}backends:\n  - name: up\n    url: http://{upstream}\nroutes:\n  - name: llm\n    backend: up\nauth:\n  api_keys:\n    keys:\n      - key: k\n        identity: {{ userid: u }}\npolicies:\n  - name: tok\n    kind: TokenRateLimitPolicy\n    accounting: {mode}\n    limits:\n      user:\n        rates: [{{ limit: {LIMIT}, window: 1m }}]\n        counters: [auth.identity.userid]\nlogging:\n  access_log: false\n"
    );
    // On the shared Redis, a clock near now so the keys expire within the hour.
    let t0 = if replicas > 1 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        now - now % 60_000
    } else {
        T0
    };
    let gateways: Vec<(Proc, String)> = (0..replicas).map(|_| start_gateway(&cfg, t0)).collect();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .unwrap();
    let urls: Vec<Arc<String>> = gateways
        .iter()
        .map(|(_, p)| Arc::new(format!("http://{p}/v1/chat/completions")))
        .collect();
    let body = serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": "one two three four five six seven eight"}],
        "max_tokens": 90,
    });
    let mut tasks = Vec::new();
    for i in 0..CONCURRENCY {
        let client = client.clone();
        let url = urls[i % urls.len()].clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let (mut n, mut tokens) = (0u64, 0u64);
            // Keep calling until the budget refuses twice in a row.
            let mut refused = 0;
            while refused < 2 {
                let r = client
                    .post(url.as_str())
                    .header("authorization", "Bearer k")
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                if r.status() == 429 {
                    refused += 1;
                    continue;
                }
                refused = 0;
                let v: serde_json::Value = r.json().await.unwrap();
                n += 1;
                tokens += v["usage"]["total_tokens"].as_u64().unwrap_or(0);
            }
            (n, tokens)
        }));
    }
    let mut admitted = 0;
    let mut tokens = 0;
    for t in tasks {
        let (n, k) = t.await.unwrap();
        admitted += n;
        tokens += k;
    }
    (admitted, tokens)
}

fn main() {
    // `cargo bench` passes harness flags such as --bench; nothing to parse.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let sim = Arc::new(tollgate_sim::Simulator::new(tollgate_sim::SimConfig {
            model: "m".into(),
            latency_ms: 50,
            ms_per_token: 0,
            default_max_tokens: 16,
        }));
        tokio::spawn(tollgate_sim::serve(l, sim));
        println!("accuracy: {CONCURRENCY} concurrent clients, ~100-token calls (max_tokens 90), one {LIMIT}-token window, upstream latency 50 ms");
        println!("| accounting | replicas (store) | limit | concurrency | requests admitted | tokens admitted | tokens ÷ limit |");
        println!("|---|---|---|---|---|---|---|");
        for (mode, replicas, batching) in [
            ("after", 1, None),
            ("reserve", 1, None),
            ("after", 3, None),
            ("reserve", 3, None),
            ("after", 3, Some(("5ms", false))),
            ("after", 3, Some(("5ms", true))),
            ("after", 3, Some(("100ms", true))),
            ("reserve", 3, Some(("100ms", true))),
        ] {
            let (n, tokens) = run(mode, addr, replicas, batching).await;
            let store = match (replicas, batching) {
                (1, _) => "memory".to_owned(),
                (_, None) => "redis".to_owned(),
                (_, Some((i, false))) => format!("redis, batching {i}, reads uncached"),
                (_, Some((i, true))) => format!("redis, batching {i}, cached reads"),
            };
            println!(
                "| {mode} | {replicas} ({store}) | {LIMIT} | {CONCURRENCY} | {n} | {tokens} | {:.2} |",
                tokens as f64 / LIMIT as f64
            );
        }
    });
}
