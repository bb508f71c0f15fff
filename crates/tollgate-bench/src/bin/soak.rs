//! `tollgate-soak`: long mixed traffic through a running gateway, then the accounting
//! audit (see `tollgate_bench::soak` and `tollgate_bench::audit`). `bench/soak.sh` starts
//! the simulator and the gateway and runs it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tollgate_bench::cli::parse_duration;
use tollgate_bench::soak::{self, CallEnd, SoakPlan, Stop};
use tollgate_bench::{audit, probe};

/// Mixed LLM traffic (streamed and not, upstream faults, clients leaving) through a
/// gateway; prints throughput, latency, the gateway's memory and the accounting audit.
/// Exits 1 when the audit finds a mismatch.
#[derive(Debug, Parser)]
#[command(name = "tollgate-soak", version)]
struct Args {
    /// The gateway's proxy listener.
    #[arg(long)]
    proxy: SocketAddr,
    /// The gateway's admin listener.
    #[arg(long)]
    admin: SocketAddr,
    /// Environment variable holding the admin token, if the admin API has one.
    #[arg(long)]
    admin_token_env: Option<String>,
    /// API keys to use, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    keys: Vec<String>,
    /// How long to send (e.g. 10m, 30s).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    duration: Duration,
    /// Stop after this many calls instead of after `--duration`.
    #[arg(long)]
    requests: Option<u64>,
    #[arg(short = 'c', long, default_value_t = 16)]
    concurrency: usize,
    /// Calls started per second over all clients (0: as fast as the clients can).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Percent of calls with an upstream fault.
    #[arg(long, default_value_t = 10)]
    fault_percent: u64,
    /// Percent of calls whose client leaves early.
    #[arg(long, default_value_t = 10)]
    disconnect_percent: u64,
    /// The gateway's process id (for its RSS).
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// The gateway's JSON log (stderr), for the access lines.
    #[arg(long)]
    gateway_log: PathBuf,
    /// Counters the calls are charged to: an id prefix (`policy/limit/`).
    #[arg(long, default_value = "soak/all/")]
    counters: String,
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
            eprintln!("tollgate-soak: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(soak_main(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tollgate-soak: {e}");
            ExitCode::from(2)
        }
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

async fn soak_main(args: Args) -> Result<bool, String> {
    let token = match &args.admin_token_env {
        Some(var) => Some(std::env::var(var).map_err(|_| format!("{var} is not set"))?),
        None => None,
    };
    let token = token.as_deref();
    let plan = SoakPlan {
        proxy: args.proxy,
        keys: args.keys.clone(),
        concurrency: args.concurrency,
        rate: (args.rate > 0.0).then_some(args.rate),
        stop: match args.requests {
            Some(n) => Stop::Requests(n),
            None => Stop::After(args.duration),
        },
        seed: args.seed,
        fault_percent: args.fault_percent,
        disconnect_percent: args.disconnect_percent,
        timeout: Duration::from_secs(30),
    };
    let rss_start = args.gateway_pid.and_then(probe::rss_kib);
    println!(
        "soak: {} clients, {} calls/s, {}, {}% faults, {}% clients leaving; gateway RSS at start {}",
        plan.concurrency,
        plan.rate.map_or_else(|| "max".to_owned(), |r| format!("{r}")),
        match plan.stop {
            Stop::After(d) => format!("{d:?}"),
            Stop::Requests(n) => format!("{n} calls"),
        },
        plan.fault_percent,
        plan.disconnect_percent,
        mib(rss_start)
    );
    let run = soak::run(&plan).await?;
    let outstanding = probe::outstanding_when_idle(args.admin, token).await?;
    let rss_end = args.gateway_pid.and_then(probe::rss_kib);
    let counters = probe::counters_total(args.admin, &args.counters, token).await?;
    // The last access lines are written as the calls settle: give the log a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = std::fs::read_to_string(&args.gateway_log)
        .map_err(|e| format!("{}: {e}", args.gateway_log.display()))?;
    let audit = audit::audit(&run.calls, &log, counters, outstanding);

    let secs = run.elapsed.as_secs_f64();
    let complete = run
        .calls
        .iter()
        .filter(|c| matches!(c.end, CallEnd::Complete(_)))
        .count();
    let left = run
        .calls
        .iter()
        .filter(|c| matches!(c.end, CallEnd::Left(_)))
        .count();
    let mut statuses = std::collections::BTreeMap::new();
    for c in &run.calls {
        if let CallEnd::Complete(s) = c.end {
            *statuses.entry(s).or_insert(0u64) += 1;
        }
    }
    let failures: Vec<&str> = run
        .calls
        .iter()
        .filter_map(|c| match &c.end {
            CallEnd::Failed(e) => Some(e.as_str()),
            _ => None,
        })
        .take(3)
        .collect();
    println!(
        "requests: {} in {:.1}s ({:.0}/s): {} complete {:?}, {} clients left, {} transport failures {:?}",
        run.calls.len(),
        secs,
        run.calls.len() as f64 / secs.max(0.001),
        complete,
        statuses,
        left,
        audit.failed_calls,
        failures
    );
    println!(
        "latency of complete calls: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        run.latency.value_at_quantile(0.5) as f64 / 1000.0,
        run.latency.value_at_quantile(0.99) as f64 / 1000.0,
        run.latency.max() as f64 / 1000.0
    );
    println!(
        "gateway RSS: start {}, end {}",
        mib(rss_start),
        mib(rss_end)
    );
    println!("reservations outstanding at the end: {outstanding}");
    print!("{}", audit.render());
    println!("audit: {}", if audit.ok() { "PASS" } else { "FAIL" });
    Ok(audit.ok())
}
