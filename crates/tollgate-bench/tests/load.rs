//! The load generator against the simulator on a real socket.

// Test helpers outside `#[test]` fns are not covered by clippy.toml's test allowance.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tollgate_bench::cli::Args;
use tollgate_bench::{report, run};
use tollgate_sim::{serve, SimConfig, Simulator};

async fn sim(cfg: SimConfig) -> (String, Arc<Simulator>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sim = Arc::new(Simulator::new(cfg));
    tokio::spawn(serve(listener, Arc::clone(&sim)));
    (format!("http://{addr}"), sim)
}

fn args(extra: &[&str]) -> Args {
    let mut argv = vec!["tollgate-load"];
    argv.extend_from_slice(extra);
    Args::parse_from(argv)
}

#[tokio::test]
async fn closed_loop_counts_statuses() {
    let (base, sim) = sim(SimConfig::default()).await;
    let url = format!("{base}/v1/chat/completions");
    let a = args(&[
        "--url",
        &url,
        "--body",
        r#"{"messages":[],"max_tokens":4}"#,
        "-c",
        "2",
        "-d",
        "300ms",
        "--warmup",
        "100ms",
    ]);
    let plan = a.plan().unwrap();
    let stats = run::run(plan.clone()).await.unwrap();
    assert!(stats.statuses[&200] > 10, "{:?}", stats.statuses);
    assert_eq!(stats.error_count(), 0);
    // Warm-up requests reached the server but were not recorded.
    assert!(sim.requests_served() > stats.responses());
    let line = report::report(&url, &plan, 1, &stats);
    assert_eq!(line["mode"], "closed");
    assert!(line["rps"].as_f64().unwrap() > 0.0);
    assert!(
        line["latency_us"]["p99"].as_u64().unwrap() >= line["latency_us"]["p50"].as_u64().unwrap()
    );
    assert!(line.get("ttfb_us").is_none());
}

#[tokio::test]
async fn open_loop_sends_at_the_offered_rate() {
    let (base, sim) = sim(SimConfig::default()).await;
    let url = format!("{base}/v1/chat/completions");
    let a = args(&[
        "--url",
        &url,
        "--body",
        r#"{"messages":[],"max_tokens":1}"#,
        "-c",
        "4",
        "-d",
        "1s",
        "--warmup",
        "0s",
        "--rate",
        "50",
    ]);
    let stats = run::run(a.plan().unwrap()).await.unwrap();
    assert_eq!(stats.responses(), 50);
    assert_eq!(sim.requests_served(), 50);
    assert_eq!(stats.not_sent, 0);
}

#[tokio::test]
async fn open_loop_latency_includes_queueing() {
    // One worker, 100 ms per request, offered 20/s: requests queue behind each other and
    // the latency measured from the scheduled time must grow well past 100 ms.
    let (base, _sim) = sim(SimConfig {
        latency_ms: 100,
        ..SimConfig::default()
    })
    .await;
    let url = format!("{base}/v1/chat/completions");
    let a = args(&[
        "--url",
        &url,
        "--body",
        r#"{"messages":[]}"#,
        "-c",
        "1",
        "-d",
        "1s",
        "--warmup",
        "0s",
        "--rate",
        "20",
    ]);
    let stats = run::run(a.plan().unwrap()).await.unwrap();
    assert!(
        stats.latency.max() >= 300_000,
        "max {}",
        stats.latency.max()
    );
    assert!(stats.latency.min() >= 100_000);
}

#[tokio::test]
async fn stream_mode_records_time_to_first_byte() {
    let (base, _sim) = sim(SimConfig {
        ms_per_token: 5,
        ..SimConfig::default()
    })
    .await;
    let url = format!("{base}/v1/chat/completions");
    let body =
        r#"{"messages":[],"max_tokens":20,"stream":true,"stream_options":{"include_usage":true}}"#;
    let a = args(&[
        "--url", &url, "--body", body, "-c", "2", "-d", "500ms", "--warmup", "0s", "--stream",
    ]);
    let plan = a.plan().unwrap();
    let stats = run::run(plan.clone()).await.unwrap();
    assert!(stats.responses() > 0);
    // 20 tokens at 5 ms each: the whole stream takes >= 100 ms, the first byte far less.
    assert!(stats.latency.min() >= 100_000);
    assert!(stats.ttfb.max() < stats.latency.min());
    let line = report::report(&url, &plan, 1, &stats);
    assert!(line["ttfb_us"]["p50"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn refused_connections_are_counted_not_fatal() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let url = format!("http://{addr}/");
    let a = args(&[
        "--url", &url, "-c", "2", "-d", "200ms", "--warmup", "0s", "--method", "GET",
    ]);
    let stats = run::run(a.plan().unwrap()).await.unwrap();
    assert_eq!(stats.responses(), 0);
    assert!(stats.error_count() > 0);
}

#[tokio::test]
async fn timeouts_are_counted() {
    let (base, _sim) = sim(SimConfig {
        latency_ms: 2_000,
        ..SimConfig::default()
    })
    .await;
    let url = format!("{base}/v1/models");
    let a = args(&[
        "--url",
        &url,
        "-c",
        "1",
        "-d",
        "200ms",
        "--warmup",
        "0s",
        "--method",
        "GET",
        "--timeout",
        "100ms",
    ]);
    let started = std::time::Instant::now();
    let stats = run::run(a.plan().unwrap()).await.unwrap();
    assert!(stats.error_count() >= 1);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a timed-out request must not hold the run"
    );
}
