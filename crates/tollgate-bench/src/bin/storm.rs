//! `tollgate-storm`: thousands of idle connections on the proxy listener while active
//! clients keep calling and the admin API is probed; prints whether (and how fast)
//! admin endpoints and active requests kept answering, against a baseline without the
//! idle connections. `bench/storm.sh` starts the simulator and the gateway and runs it.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http::{HeaderMap, HeaderValue, Method};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tollgate_bench::cli::parse_duration;
use tollgate_bench::probe;
use tollgate_bench::run::{self, Plan, Target};

/// Idle-connection storm against a running gateway.
#[derive(Debug, Parser)]
#[command(name = "tollgate-storm", version)]
struct Args {
    /// The gateway's proxy listener.
    #[arg(long)]
    proxy: SocketAddr,
    /// The gateway's admin listener.
    #[arg(long)]
    admin: SocketAddr,
    /// API key for the active traffic (`Authorization: Bearer`).
    #[arg(long)]
    key: String,
    /// Idle connections to open (mind `ulimit -n`, for this process and the gateway).
    #[arg(long, default_value_t = 4000)]
    idle: usize,
    /// Of those, how many send half a request line first (slowloris) instead of nothing.
    #[arg(long, default_value_t = 0)]
    partial: usize,
    /// Active clients (closed loop, one keep-alive connection each).
    #[arg(short = 'c', long, default_value_t = 8)]
    concurrency: usize,
    /// Length of each phase (baseline, then storm).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Time between admin probes.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    probe_every: Duration,
    /// The gateway's process id (for its RSS).
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate-storm: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(storm(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tollgate-storm: {e}");
            ExitCode::from(2)
        }
    }
}

/// Admin probes over one phase.
struct Probes {
    latency: Histogram<u64>,
    failures: u64,
    first_failure: Option<String>,
}

async fn probe_admin(admin: SocketAddr, every: Duration, until: Instant) -> Result<Probes, String> {
    let mut p = Probes {
        latency: Histogram::new_with_bounds(1, 60_000_000, 3)
            .map_err(|e| format!("histogram: {e}"))?,
        failures: 0,
        first_failure: None,
    };
    let paths = [
        "/healthz",
        "/readyz",
        "/metrics",
        "/admin/status",
        "/admin/counters",
    ];
    let mut i = 0;
    while Instant::now() < until {
        let path = paths[i % paths.len()];
        i += 1;
        match probe::get(admin, path, None, Duration::from_secs(5)).await {
            Ok((status, _, took)) if (200..300).contains(&status) => {
                let _ = p
                    .latency
                    .record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1));
            }
            Ok((status, _, _)) => {
                p.failures += 1;
                p.first_failure
                    .get_or_insert_with(|| format!("{path}: status {status}"));
            }
            Err(e) => {
                p.failures += 1;
                p.first_failure.get_or_insert(e);
            }
        }
        tokio::time::sleep(every).await;
    }
    Ok(p)
}

fn active_plan(args: &Args) -> Result<Plan, String> {
    let mut headers = HeaderMap::new();
    let auth = HeaderValue::from_str(&format!("Bearer {}", args.key))
        .map_err(|e| format!("--key: {e}"))?;
    headers.insert(http::header::AUTHORIZATION, auth);
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(Plan {
        target: Target {
            authority: args.proxy.to_string(),
            path_and_query: "/v1/chat/completions".into(),
        },
        method: Method::POST,
        headers,
        body: Bytes::from_static(
            br#"{"model":"sim-model","messages":[{"role":"user","content":"storm"}],"max_tokens":8}"#,
        ),
        concurrency: args.concurrency,
        duration: args.duration,
        warmup: Duration::ZERO,
        interval: None,
        timeout: Duration::from_secs(10),
        stream: false,
    })
}

/// One phase: active traffic and admin probes side by side.
async fn phase(args: &Args, name: &str) -> Result<bool, String> {
    let until = Instant::now() + args.duration;
    let probes = tokio::spawn(probe_admin(args.admin, args.probe_every, until));
    let stats = run::run(active_plan(args)?).await?;
    let probes = probes.await.map_err(|e| format!("probe task: {e}"))??;
    let ok_statuses: u64 = stats
        .statuses
        .iter()
        .filter(|(s, _)| (200..300).contains(*s))
        .map(|(_, n)| n)
        .sum();
    let secs = args.duration.as_secs_f64();
    println!(
        "{name:>9}: active {:.0} req/s ({} ok, {} other statuses, {} transport errors), p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        stats.responses() as f64 / secs,
        ok_statuses,
        stats.responses() - ok_statuses,
        stats.error_count(),
        stats.latency.value_at_quantile(0.5) as f64 / 1000.0,
        stats.latency.value_at_quantile(0.99) as f64 / 1000.0,
        stats.latency.max() as f64 / 1000.0,
    );
    println!(
        "{:>9}  admin {} probes answered, {} failed{}, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        "",
        probes.latency.len(),
        probes.failures,
        probes
            .first_failure
            .as_deref()
            .map(|f| format!(" (first: {f})"))
            .unwrap_or_default(),
        probes.latency.value_at_quantile(0.5) as f64 / 1000.0,
        probes.latency.value_at_quantile(0.99) as f64 / 1000.0,
        probes.latency.max() as f64 / 1000.0,
    );
    Ok(probes.failures == 0 && stats.error_count() == 0 && ok_statuses > 0)
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

async fn storm(args: Args) -> Result<bool, String> {
    let rss = || args.gateway_pid.and_then(probe::rss_kib);
    println!(
        "storm: {} idle connections ({} with half a request line), {} active clients, {:?} per phase; gateway RSS {}",
        args.idle,
        args.partial.min(args.idle),
        args.concurrency,
        args.duration,
        mib(rss())
    );
    let baseline_ok = phase(&args, "baseline").await?;

    let opening = Instant::now();
    let mut idle = Vec::with_capacity(args.idle);
    let mut refused = 0u64;
    let mut first_error = None;
    for i in 0..args.idle {
        match TcpStream::connect(args.proxy).await {
            Ok(mut s) => {
                if i < args.partial {
                    let _ = s
                        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                        .await;
                }
                idle.push(s);
            }
            Err(e) => {
                refused += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    println!(
        "opened {} idle connections in {:.2}s ({} failed{}); gateway RSS {}",
        idle.len(),
        opening.elapsed().as_secs_f64(),
        refused,
        first_error.map(|e| format!(": {e}")).unwrap_or_default(),
        mib(rss())
    );
    let storm_ok = phase(&args, "storm").await?;

    // Which idle connections did the gateway close meanwhile?
    let closed = idle.iter().filter(|s| is_closed(s)).count();
    println!(
        "after the storm: {} of {} idle connections closed by the gateway; gateway RSS {}",
        closed,
        idle.len(),
        mib(rss())
    );
    drop(idle);
    let ok = baseline_ok && storm_ok;
    println!(
        "storm: {}",
        if ok {
            "admin and active requests kept answering"
        } else {
            "FAILURES (see above)"
        }
    );
    Ok(ok)
}

/// A connection the peer has closed reads 0 bytes (or an error) without blocking.
fn is_closed(s: &TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match s.try_read(&mut buf) {
            Ok(0) => return true,
            // An answer (e.g. 408 or 400) arrived: drain it and look again.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}
