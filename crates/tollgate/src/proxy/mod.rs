//! The proxy listener and the state every request shares.
//!
//! [`Gateway`] holds the current [`Runtime`] (swapped atomically on reload; a request
//! keeps the one it started with), the counter store, the clock and the upstream client.
//! [`serve`] accepts connections (HTTP/1.1 and h2c via hyper-util's auto builder) and
//! runs each request through `pipeline::handle`.

pub mod body;
pub mod error;
pub mod metering;
pub mod path;
pub mod pipeline;
pub mod ratelimit_headers;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tollgate_limits::policy::{LimitEvalError, TokenFigures};
use tollgate_limits::{Clock, Store};

use crate::runtime::Runtime;
use upstream::UpstreamClient;

/// Plain counters for status and (later) metrics. Relaxed: they are statistics, read
/// independently of each other.
#[derive(Debug, Default)]
pub struct Stats {
    pub admitted: AtomicU64,
    pub limited: AtomicU64,
    pub unauthenticated: AtomicU64,
    pub forbidden: AtomicU64,
    pub errors: AtomicU64,
    pub shadow_refusals: AtomicU64,
    pub limit_eval_errors: AtomicU64,
    pub settle_failures: AtomicU64,
    pub input_tokens: AtomicU64,
    pub output_tokens: AtomicU64,
    pub estimated_calls: AtomicU64,
    pub upstream_latency_us_total: AtomicU64,
    pub upstream_calls: AtomicU64,
}

impl Stats {
    pub fn admitted(&self) {
        self.admitted.fetch_add(1, Ordering::Relaxed);
    }
    pub fn record_refusal(&self, decision: &str) {
        let c = match decision {
            "limited" => &self.limited,
            "unauth" => &self.unauthenticated,
            "forbidden" => &self.forbidden,
            _ => &self.errors,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub fn shadow_refusal(&self) {
        self.shadow_refusals.fetch_add(1, Ordering::Relaxed);
    }
    pub fn limit_eval_error(&self, e: &LimitEvalError) {
        let n = self.limit_eval_errors.fetch_add(1, Ordering::Relaxed);
        // Logged, but rate-limited: the first, then every 1000th.
        if n.is_multiple_of(1000) {
            tracing::warn!(
                policy = %e.policy, limit = %e.limit, expression = %e.expression,
                error = %e.message, action = ?e.action, occurrences = n + 1,
                "limit could not be evaluated"
            );
        }
    }
    pub fn settle_failed(&self) {
        self.settle_failures.fetch_add(1, Ordering::Relaxed);
    }
    pub fn tokens(&self, f: &TokenFigures, estimated: bool) {
        self.input_tokens
            .fetch_add(f.input_tokens, Ordering::Relaxed);
        self.output_tokens
            .fetch_add(f.output_tokens, Ordering::Relaxed);
        if estimated {
            self.estimated_calls.fetch_add(1, Ordering::Relaxed);
        }
    }
    pub fn upstream_latency(&self, d: Duration) {
        self.upstream_calls.fetch_add(1, Ordering::Relaxed);
        self.upstream_latency_us_total
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

pub struct Gateway {
    pub runtime: ArcSwap<Runtime>,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub client: UpstreamClient,
    pub stats: Stats,
    seq: AtomicU64,
    /// Random per process, so reservation and request ids never collide across replicas.
    instance: u64,
}

impl Gateway {
    pub fn new(runtime: Runtime, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        let client = UpstreamClient::new(runtime.limits.upstream_connect_timeout);
        Self {
            runtime: ArcSwap::from_pointee(runtime),
            store,
            clock,
            client,
            stats: Stats::default(),
            seq: AtomicU64::new(1),
            instance: rand::random::<u64>(),
        }
    }

    pub fn next_reservation_id(&self) -> u64 {
        // High 24 bits from the instance, low 40 from a sequence.
        (self.instance << 40) ^ self.seq.fetch_add(1, Ordering::Relaxed)
    }

    pub fn next_request_id(&self) -> String {
        format!(
            "{:06x}-{:x}",
            self.instance & 0xff_ffff,
            self.seq.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// Accept connections until `shutdown` flips to true, then stop accepting and let
/// in-flight connections finish (up to the runtime's shutdown grace).
pub async fn serve(
    listener: TcpListener,
    gw: Arc<Gateway>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let gw = gw.clone();
        let svc = service_fn(move |req| {
            let gw = gw.clone();
            async move { Ok::<_, std::convert::Infallible>(pipeline::handle(gw, req, peer).await) }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with error");
            }
        });
    }
    let grace = gw.runtime.load().limits.shutdown_grace;
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(grace) => tracing::warn!("shutdown grace elapsed; closing remaining connections"),
    }
    Ok(())
}

pub fn local_addr(l: &TcpListener) -> Option<SocketAddr> {
    l.local_addr().ok()
}
