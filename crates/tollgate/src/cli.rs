//! The command line: `serve` (`--config` and/or `--manifests`), `convert`, `validate`,
//! `sim`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tollgate_limits::store::memory::MemoryStore;
use tollgate_limits::{Clock, ManualClock, SystemClock};

use crate::config::{self, LogFormat, Severity};
use crate::proxy::Gateway;
use crate::runtime::Runtime;

#[derive(Parser)]
#[command(name = "tollgate", version, about = "Token-aware gateway for LLM APIs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Native config file (YAML). At least one of --config and --manifests.
        #[arg(short, long, required_unless_present = "manifests")]
        config: Option<PathBuf>,
        /// Kubernetes manifests (a file or a folder of multi-document YAML): Gateway API,
        /// Kuadrant, agentgateway and Gloo resources. Repeatable.
        #[arg(long, value_name = "PATH")]
        manifests: Vec<PathBuf>,
        /// URL of a Service the manifests route to: NAME=URL (NAME or NAMESPACE/NAME).
        #[arg(long, value_name = "NAME=URL")]
        backend: Vec<String>,
        /// A YAML mapping of Service names to URLs (--backend wins).
        #[arg(long, value_name = "FILE")]
        backends_file: Option<PathBuf>,
        /// Override `listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Override `admin.listen`.
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
        /// TESTS ONLY: the engine's clock starts at this epoch-ms value (default: now)
        /// and moves only through POST /admin/test-clock.
        #[arg(long, value_name = "START_MS", num_args = 0..=1, default_missing_value = "now")]
        test_clock: Option<String>,
    },
    /// Print the native config equivalent to Kubernetes manifests.
    Convert {
        /// A file or a folder of multi-document YAML. Repeatable.
        #[arg(long, value_name = "PATH", required = true)]
        manifests: Vec<PathBuf>,
        /// URL of a Service the manifests route to: NAME=URL.
        #[arg(long, value_name = "NAME=URL")]
        backend: Vec<String>,
        /// A YAML mapping of Service names to URLs (--backend wins).
        #[arg(long, value_name = "FILE")]
        backends_file: Option<PathBuf>,
    },
    /// Check a config file: exit 0, or print every problem and exit 1.
    Validate {
        #[arg(short, long, required_unless_present = "manifests")]
        config: Option<PathBuf>,
        /// Check Kubernetes manifests too (or instead). Repeatable.
        #[arg(long, value_name = "PATH")]
        manifests: Vec<PathBuf>,
        #[arg(long, value_name = "NAME=URL")]
        backend: Vec<String>,
        #[arg(long, value_name = "FILE")]
        backends_file: Option<PathBuf>,
    },
    /// Run the built-in simulated LLM on its own.
    Sim {
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: SocketAddr,
        #[arg(long, default_value = "meta-llama/Llama-3.1-8B-Instruct")]
        model: String,
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        #[arg(long, default_value_t = 0)]
        ms_per_token: u64,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate {
            config,
            manifests,
            backend,
            backends_file,
        } => match parse_backends(&backend, backends_file.as_deref()) {
            Ok(backends) => validate(&Sources {
                config,
                manifests,
                backends,
            }),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve {
            config,
            manifests,
            backend,
            backends_file,
            listen,
            admin_listen,
            test_clock,
        } => match parse_backends(&backend, backends_file.as_deref()) {
            Ok(backends) => run_async(serve(
                Sources {
                    config,
                    manifests,
                    backends,
                },
                listen,
                admin_listen,
                test_clock,
            )),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Convert {
            manifests,
            backend,
            backends_file,
        } => match parse_backends(&backend, backends_file.as_deref()) {
            Ok(backends) => convert(&Sources {
                config: None,
                manifests,
                backends,
            }),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Sim {
            listen,
            model,
            latency_ms,
            ms_per_token,
        } => {
            init_logging(LogFormat::Text, None);
            run_async(async move {
                let l = TcpListener::bind(listen).await?;
                let addr = l.local_addr()?;
                println!("tollgate sim listening on {addr}");
                let _ = std::io::stdout().flush();
                let sim = Arc::new(tollgate_sim::Simulator::new(tollgate_sim::SimConfig {
                    model,
                    latency_ms,
                    ms_per_token,
                    default_max_tokens: 16,
                }));
                tokio::select! {
                    r = tollgate_sim::serve(l, sim) => r.map_err(anyhow::Error::from),
                    _ = tokio::signal::ctrl_c() => Ok(()),
                }
            })
        }
    }
}

fn run_async<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_problems(path: &std::path::Path, problems: &[config::Problem]) {
    for p in problems {
        eprintln!("{}: {p}", path.display());
    }
}

fn load(path: &std::path::Path) -> Result<(Runtime, Vec<config::Problem>), Vec<config::Problem>> {
    let (_src, cfg, index) = config::read(path)?;
    Runtime::build(cfg, &index)
}

/// Where the configuration comes from: a native file, manifests, or both.
struct Sources {
    config: Option<PathBuf>,
    manifests: Vec<PathBuf>,
    backends: std::collections::BTreeMap<String, String>,
}

impl Sources {
    /// What to name in messages.
    fn label(&self) -> PathBuf {
        match (&self.config, self.manifests.first()) {
            (Some(c), _) => c.clone(),
            (None, Some(m)) => m.clone(),
            (None, None) => PathBuf::from("-"),
        }
    }

    fn build(&self) -> Result<(Runtime, Vec<config::Problem>), Vec<config::Problem>> {
        if self.manifests.is_empty() {
            let path = self.config.as_deref().unwrap_or(std::path::Path::new("-"));
            return load(path);
        }
        let (cfg, index, origins, mut warnings) = crate::manifests::build_config(
            self.config.as_deref(),
            &self.manifests,
            &self.backends,
        )?;
        match Runtime::build(cfg, &index) {
            Ok((rt, w)) => {
                warnings.extend(origins.relocate_all(w));
                Ok((rt, warnings))
            }
            Err(problems) => Err(origins.relocate_all(problems)),
        }
    }
}

/// `--backends-file` (a YAML mapping NAME: URL), then `--backend NAME=URL` over it.
fn parse_backends(
    args: &[String],
    file: Option<&std::path::Path>,
) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    if let Some(f) = file {
        let text =
            std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        let map: std::collections::BTreeMap<String, String> =
            yaml_serde::from_str(&text).map_err(|e| {
                format!(
                    "{}: expected a mapping of Service names to URLs: {e}",
                    f.display()
                )
            })?;
        out.extend(map);
    }
    for a in args {
        match a.split_once('=') {
            Some((n, u)) if !n.is_empty() && !u.is_empty() => {
                out.insert(n.to_owned(), u.to_owned());
            }
            _ => return Err(format!("--backend takes NAME=URL, got `{a}`")),
        }
    }
    Ok(out)
}

/// `tollgate convert`: the native config the manifests mean, on stdout; problems on
/// stderr. The output loads with `serve --config` and behaves the same (API keys are
/// written as SHA-256 digests, never in clear).
fn convert(sources: &Sources) -> ExitCode {
    let label = sources.label();
    let built = crate::manifests::build_config(None, &sources.manifests, &sources.backends)
        .and_then(|(cfg, index, origins, warnings)| {
            let check =
                Runtime::build(cfg.clone(), &index).map_err(|ps| origins.relocate_all(ps))?;
            let mut all = warnings;
            all.extend(origins.relocate_all(check.1));
            Ok((cfg, all))
        });
    match built {
        Ok((cfg, warnings)) => {
            print_problems(&label, &warnings);
            match crate::manifests::to_yaml(&cfg) {
                Ok(text) => {
                    let from: Vec<String> = sources
                        .manifests
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect();
                    println!(
                        "# Generated by `tollgate convert` from {}.\n{text}",
                        from.join(", ")
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: cannot write the config: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(problems) => {
            print_problems(&label, &problems);
            ExitCode::FAILURE
        }
    }
}

fn validate(sources: &Sources) -> ExitCode {
    let label = sources.label();
    let path = label.as_path();
    match sources.build() {
        Ok((_, warnings)) => {
            print_problems(path, &warnings);
            println!("{}: ok ({} warning(s))", path.display(), warnings.len());
            ExitCode::SUCCESS
        }
        Err(problems) => {
            print_problems(path, &problems);
            let n = problems
                .iter()
                .filter(|p| p.severity == Severity::Error)
                .count();
            eprintln!("{}: {n} error(s)", path.display());
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, level: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level.unwrap_or("info")))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// `storage.redis.batching.flush_interval` when batching is on but the interval is not
/// given.
const DEFAULT_BATCH_INTERVAL_MS: u64 = 5;

/// The counter store the config asks for: in-process memory, or Redis (single node or
/// cluster) behind a local fallback that follows `storage.on_error`, with the counters of
/// `scope: replica` policies kept in process beside it.
fn build_store(
    rt: &Runtime,
) -> anyhow::Result<(Arc<dyn tollgate_limits::Store>, crate::proxy::StoreHealth)> {
    use crate::config::{StorageKind, StoreOnError};
    use tollgate_limits::store::resilient::OnError;
    let grace = rt.limits.settle_grace_ms;
    let storage = &rt.config.storage;
    match storage.kind {
        StorageKind::Memory => {
            let health: crate::proxy::StoreHealth = Box::new(|| crate::proxy::StoreStatus {
                kind: "memory",
                healthy: true,
                state: "healthy",
                detail: "in-process counters".into(),
            });
            Ok((Arc::new(MemoryStore::new(grace)), health))
        }
        StorageKind::Redis => {
            let r = storage.redis.clone().unwrap_or_default();
            let defaults = tollgate_limits::RedisConfig::default();
            let batching = r.batching.as_ref();
            let cfg = tollgate_limits::RedisConfig {
                url: r.url,
                cluster: r.cluster,
                key_prefix: r.key_prefix.unwrap_or(defaults.key_prefix),
                timeout_ms: r
                    .timeout
                    .map(|d| d.as_millis_u64())
                    .unwrap_or(defaults.timeout_ms),
                connect_timeout_ms: r
                    .connect_timeout
                    .map(|d| d.as_millis_u64())
                    .unwrap_or(defaults.connect_timeout_ms),
                settle_grace_ms: grace,
                sweep_scan_interval_ms: defaults.sweep_scan_interval_ms,
                tls: rt.redis_tls.clone(),
                batch_interval_ms: batching.map_or(0, |b| {
                    b.flush_interval
                        .as_ref()
                        .map_or(DEFAULT_BATCH_INTERVAL_MS, |d| d.as_millis_u64())
                }),
                batch_max: batching
                    .and_then(|b| b.max_batch)
                    .unwrap_or(defaults.batch_max),
                batch_cache_reads: batching
                    .and_then(|b| b.cache_reads)
                    .unwrap_or(defaults.batch_cache_reads),
            };
            // Lazy: the gateway starts (and follows on_error) while Redis is away, and
            // connects by itself when it answers.
            let primary = tollgate_limits::RedisStore::new_lazy(cfg)
                .map_err(|e| anyhow::anyhow!("storage.redis: {e}"))?;
            let mode = match storage.on_error {
                StoreOnError::FailOpen => OnError::FailOpen,
                StoreOnError::FailClosed => OnError::FailClosed,
            };
            // The outer bound stays above the Redis store's own, so a settlement held
            // for a long batching interval is not given up on (and written twice).
            let outer = primary.call_bound() + std::time::Duration::from_secs(1);
            let resilient = Arc::new(
                tollgate_limits::ResilientStore::new(
                    Arc::new(primary),
                    MemoryStore::new(grace),
                    mode,
                    storage.max_deferred_settlements.unwrap_or(100_000),
                )
                .with_call_timeout(outer),
            );
            let probe = resilient.clone();
            let health: crate::proxy::StoreHealth = Box::new(move || {
                match probe.state() {
                tollgate_limits::StoreState::Healthy => crate::proxy::StoreStatus {
                    kind: "redis",
                    healthy: true,
                    state: "healthy",
                    detail: format!("deferred settlements: {}", probe.deferred_settlements()),
                },
                tollgate_limits::StoreState::Degraded { since_ms, last_error } => {
                    crate::proxy::StoreStatus {
                        kind: "redis",
                        healthy: false,
                        state: "degraded",
                        detail: format!(
                            "since {since_ms} ms: {last_error}; {}; deferred settlements: {}, dropped: {}",
                            match probe.mode() {
                                OnError::FailOpen => "serving on local counters (fail_open)",
                                OnError::FailClosed => "refusing with 503 (fail_closed)",
                            },
                            probe.deferred_settlements(),
                            probe.dropped_settlements()
                        ),
                    }
                }
            }
            });
            // `scope: replica` counters stay in this process, beside the shared ones.
            let split =
                tollgate_limits::store::split::SplitStore::new(MemoryStore::new(grace), resilient);
            Ok((Arc::new(split), health))
        }
    }
}

async fn serve(
    sources: Sources,
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    test_clock: Option<String>,
) -> anyhow::Result<()> {
    let path = sources.label();
    let (runtime, warnings) = match sources.build() {
        Ok(x) => x,
        Err(problems) => {
            print_problems(&path, &problems);
            anyhow::bail!("{}: invalid configuration", path.display());
        }
    };
    init_logging(
        runtime.config.logging.format,
        runtime.config.logging.level.as_deref(),
    );
    for w in &warnings {
        tracing::warn!("{}: {w}", path.display());
    }

    let manual = match test_clock.as_deref() {
        None => None,
        Some(start) => {
            let start_ms = if start == "now" {
                SystemClock.now_ms()
            } else {
                start
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--test-clock takes epoch milliseconds"))?
            };
            for _ in 0..3 {
                tracing::warn!("TEST CLOCK ENABLED: time only moves through POST /admin/test-clock. Never use this in production.");
            }
            Some(Arc::new(ManualClock::new(start_ms)))
        }
    };
    let clock: Arc<dyn Clock> = match &manual {
        Some(m) => m.clone(),
        None => Arc::new(SystemClock),
    };
    let (store, store_health) = build_store(&runtime)?;
    let listen = listen.unwrap_or(runtime.listen);
    let admin_listen = admin_listen.unwrap_or(runtime.admin_listen);
    let proxy_l = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let admin_l = TcpListener::bind(admin_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {admin_listen} (admin): {e}"))?;
    let proxy_addr = proxy_l.local_addr()?;
    let admin_addr = admin_l.local_addr()?;

    let admin_token = runtime.admin_token.clone();
    let gw = Arc::new(Gateway::new(
        runtime,
        store.clone(),
        clock.clone(),
        store_health,
    ));
    let (tx, rx) = watch::channel(false);

    // Reclaim ended windows and expired reservations; memory stays bounded.
    // Also writes deferred settlements back after Redis returns, and says so in the logs
    // when the store changes state.
    let sweeper = {
        let store = store.clone();
        let clock = clock.clone();
        let gw = gw.clone();
        let mut rx = rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            let mut last_state = gw.store_status().state;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = store.sweep(clock.now_ms()).await {
                            tracing::warn!(error = %e, "sweep failed");
                        }
                        let st = gw.store_status();
                        gw.stats.metrics.store_degraded.set(i64::from(!st.healthy));
                        if st.state != last_state {
                            if st.healthy {
                                tracing::info!(store = st.kind, detail = %st.detail, "counter store healthy again");
                            } else {
                                tracing::error!(store = st.kind, detail = %st.detail, "counter store degraded");
                            }
                            last_state = st.state;
                        }
                    }
                    _ = rx.changed() => break,
                }
            }
        })
    };

    let admin = crate::admin::router(crate::admin::AdminState {
        gw: gw.clone(),
        test_clock: manual.clone(),
        token: admin_token,
    });
    let mut admin_rx = rx.clone();
    let admin_task = tokio::spawn(async move {
        let _ = axum::serve(admin_l, admin)
            .with_graceful_shutdown(async move {
                let _ = admin_rx.changed().await;
            })
            .await;
    });

    tracing::info!(%proxy_addr, %admin_addr, "tollgate listening");
    println!("tollgate listening proxy={proxy_addr} admin={admin_addr}");
    let _ = std::io::stdout().flush();

    if let Some(j) = &gw.runtime.load().jwt {
        j.spawn_refresh();
    }
    // A reload reads every source again (manifests translated on top of the native file).
    let source = crate::reload::Source {
        config: sources.config.clone(),
        manifests: sources.manifests.clone(),
        build: Box::new(move || sources.build()),
    };
    crate::reload::spawn(gw.clone(), source, rx.clone());
    let workers = gw.runtime.load().limits.workers;
    let proxy_task = tokio::spawn(crate::proxy::serve(proxy_l, gw.clone(), rx, workers));
    shutdown_signal().await;
    tracing::info!("shutting down: no new connections; draining in-flight requests");
    let _ = tx.send(true);
    let _ = proxy_task.await;
    let _ = admin_task.await;
    let _ = sweeper.await;
    tracing::info!("bye");
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
