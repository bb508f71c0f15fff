//! The proxy listener and the state every request shares.
//!
//! [`Gateway`] holds the current [`Runtime`] (swapped atomically on reload; a request
//! keeps the one it started with), the counter store, the clock and the upstream client.
//! [`serve`] accepts connections (HTTP/1.1 and h2c via hyper-util's auto builder, h2 and
//! HTTP/1.1 over TLS when `server.tls` is set), sheds load past
//! `server.max_concurrent_requests`, and runs each request through `pipeline::handle`.

pub mod body;
pub mod error;
pub mod metering;
pub mod path;
pub mod pipeline;
pub mod pool;
pub mod ratelimit_headers;
pub mod tls;
pub mod upstream;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tollgate_limits::policy::LimitEvalError;
use tollgate_limits::{Clock, Store};

use crate::metrics::{LimitLabels, Metrics};
use crate::runtime::Runtime;
use crate::usage::UsageLedger;
use upstream::UpstreamClient;

/// Request and token accounting for `/metrics`, `/admin/status` and the dashboard.
/// Plain atomics for the totals (Relaxed: statistics, read independently), the
/// Prometheus families in [`Metrics`], and a short per-10-second history.
#[derive(Default)]
pub struct Stats {
    pub metrics: Metrics,
    pub allowed: AtomicU64,
    pub limited: AtomicU64,
    pub unauthenticated: AtomicU64,
    pub forbidden: AtomicU64,
    pub errors: AtomicU64,
    pub limit_eval_errors: AtomicU64,
    history: Mutex<VecDeque<HistoryBucket>>,
}

/// Allowed and limited requests in one 10-second bucket.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct HistoryBucket {
    pub at_ms: u64,
    pub allowed: u64,
    pub limited: u64,
}

const HISTORY_BUCKET_MS: u64 = 10_000;
const HISTORY_BUCKETS: usize = 60;

impl Stats {
    fn bump_history(&self, now_ms: u64, limited: bool) {
        let at = now_ms - now_ms % HISTORY_BUCKET_MS;
        let mut h = match self.history.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match h.back_mut() {
            Some(b) if b.at_ms == at => {}
            _ => {
                h.push_back(HistoryBucket {
                    at_ms: at,
                    allowed: 0,
                    limited: 0,
                });
                while h.len() > HISTORY_BUCKETS {
                    h.pop_front();
                }
            }
        }
        if let Some(b) = h.back_mut() {
            if limited {
                b.limited += 1;
            } else {
                b.allowed += 1;
            }
        }
    }

    pub fn history(&self) -> Vec<HistoryBucket> {
        match self.history.lock() {
            Ok(g) => g.iter().copied().collect(),
            Err(p) => p.into_inner().iter().copied().collect(),
        }
    }

    /// A request answered by tollgate itself (refused or failed before upstream).
    pub fn refused(&self, now_ms: u64, route: &str, backend: &str, status: u16, decision: &str) {
        let c = match decision {
            "limited" => &self.limited,
            "unauth" => &self.unauthenticated,
            "forbidden" => &self.forbidden,
            _ => &self.errors,
        };
        c.fetch_add(1, Ordering::Relaxed);
        if decision == "limited" {
            self.bump_history(now_ms, true);
        }
        self.metrics.request(route, backend, status, decision);
    }

    /// A request that was admitted and answered by the upstream. The upstream's own 429s
    /// are labelled `upstream_limited`, apart from tollgate's refusals (`limited`).
    pub fn served(&self, now_ms: u64, route: &str, backend: &str, status: u16) {
        self.allowed.fetch_add(1, Ordering::Relaxed);
        self.bump_history(now_ms, false);
        let decision = if status == 429 {
            "upstream_limited"
        } else {
            "allowed"
        };
        self.metrics.request(route, backend, status, decision);
    }

    pub fn shadow_refusal(&self, policy: &str, limit: &str) {
        self.metrics
            .shadow_refusals
            .get_or_create(&LimitLabels {
                policy: policy.to_owned(),
                limit: limit.to_owned(),
            })
            .inc();
    }

    pub fn limit_eval_error(&self, e: &LimitEvalError) {
        let n = self.limit_eval_errors.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .limit_eval_errors
            .get_or_create(&LimitLabels {
                policy: e.policy.to_string(),
                limit: e.limit.to_string(),
            })
            .inc();
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
        self.metrics.settle_failures.inc();
    }

    pub fn stream_cutoff(&self) {
        self.metrics.stream_cutoffs.inc();
    }

    pub fn reservation_overshoot(&self, tokens: u64) {
        self.metrics.reservation_overshoot_tokens.inc_by(tokens);
    }
}

/// How the counter store is doing, for `/readyz`, `/admin/status` and the dashboard.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoreStatus {
    pub kind: &'static str,
    pub healthy: bool,
    pub state: &'static str,
    pub detail: String,
}

/// The result of the last configuration (re)load.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadStatus {
    pub ok: bool,
    pub at_ms: u64,
    pub error: Option<String>,
    pub reloads: u64,
    /// Times a file event (or SIGHUP) had the config re-read to look for a change.
    pub checks: u64,
}

/// Reports the store's health (memory: always healthy; Redis: from its fallback state).
pub type StoreHealth = Box<dyn Fn() -> StoreStatus + Send + Sync>;

pub struct Gateway {
    pub runtime: ArcSwap<Runtime>,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub client: UpstreamClient,
    pub stats: Stats,
    pub usage: UsageLedger,
    pub started: Instant,
    store_health: StoreHealth,
    last_reload: Mutex<ReloadStatus>,
    seq: AtomicU64,
    /// Requests in progress on the proxy listener (see [`RequestSlot`]).
    in_flight: AtomicUsize,
    /// Settlements being written to the store (see [`PendingSettlement`]).
    settling: AtomicUsize,
    /// Random per process, so reservation and request ids never collide across replicas.
    instance: u64,
}

impl Gateway {
    pub fn new(
        runtime: Runtime,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        store_health: StoreHealth,
    ) -> Self {
        let client = UpstreamClient::new(runtime.limits.upstream_connect_timeout);
        let now = clock.now_ms();
        Self {
            runtime: ArcSwap::from_pointee(runtime),
            store,
            clock,
            client,
            stats: Stats::default(),
            usage: UsageLedger::default(),
            started: Instant::now(),
            store_health,
            last_reload: Mutex::new(ReloadStatus {
                ok: true,
                at_ms: now,
                error: None,
                reloads: 0,
                checks: 0,
            }),
            seq: AtomicU64::new(1),
            in_flight: AtomicUsize::new(0),
            settling: AtomicUsize::new(0),
            instance: rand::random::<u64>(),
        }
    }

    pub fn store_status(&self) -> StoreStatus {
        (self.store_health)()
    }

    pub fn last_reload(&self) -> ReloadStatus {
        match self.last_reload.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Publish a new runtime (in-flight requests keep the one they started with).
    pub fn swap_runtime(&self, runtime: Runtime) {
        self.runtime.store(Arc::new(runtime));
        self.record_reload(None);
    }

    /// Count one look at the config file after an event.
    pub fn record_config_check(&self) {
        match self.last_reload.lock() {
            Ok(mut g) => g.checks += 1,
            Err(p) => p.into_inner().checks += 1,
        }
    }

    /// Record a reload attempt; `Some(error)` when it was refused.
    pub fn record_reload(&self, error: Option<String>) {
        let ok = error.is_none();
        self.stats
            .metrics
            .config_reloads
            .get_or_create(&crate::metrics::ResultLabels {
                result: if ok { "success" } else { "failure" }.into(),
            })
            .inc();
        let mut g = match self.last_reload.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.ok = ok;
        g.at_ms = self.clock.now_ms();
        g.error = error;
        g.reloads += 1;
    }

    pub fn next_reservation_id(&self) -> u64 {
        // High 24 bits from the instance, low 40 from a sequence.
        (self.instance << 40) ^ self.seq.fetch_add(1, Ordering::Relaxed)
    }

    pub fn next_request_id(&self) -> String {
        request_id(
            self.instance & 0xff_ffff,
            self.seq.fetch_add(1, Ordering::Relaxed),
        )
    }
}

/// `{instance:06x}-{seq:x}`, written digit by digit: it runs on every request, where the
/// formatting machinery cost about 1k instructions.
fn request_id(instance: u64, seq: u64) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digit = |v: u64, nibble: u32| char::from(HEX[((v >> (nibble * 4)) & 0xf) as usize]);
    let seq_digits = (u64::BITS - seq.leading_zeros()).div_ceil(4).max(1);
    let mut id = String::with_capacity(7 + seq_digits as usize);
    id.extend((0..6).rev().map(|n| digit(instance, n)));
    id.push('-');
    id.extend((0..seq_digits).rev().map(|n| digit(seq, n)));
    id
}

/// Accept connections until `shutdown` flips to true, then stop accepting and let
/// in-flight connections finish (up to the runtime's shutdown grace).
///
/// With `workers` > 0, connections are handed round-robin to that many proxy threads,
/// each running a single-threaded runtime with its own upstream connection pool: a
/// request is then served start to finish on one thread (client connection, pipeline,
/// upstream connection), with no cross-thread wake-ups. With 0, connections are served
/// on the calling (multi-threaded) runtime.
///
/// Each connection is served with the limits of the runtime current when it was
/// accepted: HTTP/1.1 (keep-alive, header read timeout) or HTTP/2 (h2c by prior
/// knowledge, h2 over TLS by ALPN), over TLS when `server.tls` is set.
pub async fn serve(
    listener: TcpListener,
    gw: Arc<Gateway>,
    mut shutdown: watch::Receiver<bool>,
    workers: usize,
) -> std::io::Result<()> {
    let pool = WorkerPool::start(workers, &gw)?;
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
        match &pool {
            Some(pool) => pool.dispatch(stream, peer),
            None => serve_connection(stream, peer, &gw, &graceful),
        }
    }
    match pool {
        Some(pool) => pool.stop().await,
        None => drain(&gw, graceful).await,
    }
    tracing::info!("proxy listener closed; connections drained or cut at the grace");
    Ok(())
}

/// A settlement on its way to the store; shutdown waits for these.
pub(crate) struct PendingSettlement(Arc<Gateway>);

impl PendingSettlement {
    pub(crate) fn new(gw: &Arc<Gateway>) -> Self {
        gw.settling.fetch_add(1, Ordering::AcqRel);
        Self(gw.clone())
    }
}

impl Drop for PendingSettlement {
    fn drop(&mut self) {
        self.0.settling.fetch_sub(1, Ordering::AcqRel);
    }
}

/// After the connections drained: let settlements still being written (network store)
/// finish, so spent tokens are recorded, bounded by the store's own timeouts and at most
/// the shutdown grace.
async fn finish_settlements(gw: &Gateway) {
    let deadline = tokio::time::Instant::now() + gw.runtime.load().limits.shutdown_grace;
    while gw.settling.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Wait for the connections `graceful` watches to finish, up to the shutdown grace, then
/// for the settlements they started (see [`finish_settlements`]).
async fn drain(gw: &Gateway, graceful: hyper_util::server::graceful::GracefulShutdown) {
    let grace = gw.runtime.load().limits.shutdown_grace;
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!("shutdown grace elapsed; closing remaining connections");
        }
    }
    finish_settlements(gw).await;
}

/// The proxy threads: one single-threaded runtime each, fed accepted connections.
struct WorkerPool {
    senders: Vec<tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr)>>,
    done: Vec<tokio::sync::oneshot::Receiver<()>>,
    next: AtomicUsize,
}

impl WorkerPool {
    fn start(workers: usize, gw: &Arc<Gateway>) -> std::io::Result<Option<Self>> {
        if workers == 0 {
            return Ok(None);
        }
        let mut senders = Vec::with_capacity(workers);
        let mut done = Vec::with_capacity(workers);
        for i in 0..workers {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let gw = gw.clone();
            std::thread::Builder::new()
                .name(format!("tollgate-proxy-{i}"))
                .spawn(move || {
                    tollgate_limits::affinity::set_proxy_thread(i + 1);
                    rt.block_on(worker(rx, gw));
                    let _ = done_tx.send(());
                })?;
            senders.push(tx);
            done.push(done_rx);
        }
        Ok(Some(Self {
            senders,
            done,
            next: AtomicUsize::new(0),
        }))
    }

    fn dispatch(&self, stream: tokio::net::TcpStream, peer: SocketAddr) {
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, %peer, "cannot hand the connection to a worker");
                return;
            }
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.senders.len();
        if self.senders[i].send((stream, peer)).is_err() {
            tracing::error!(worker = i, "proxy worker is gone; connection dropped");
        }
    }

    /// Close the hand-over channels (each worker then drains) and wait for every worker.
    async fn stop(self) {
        drop(self.senders);
        for d in self.done {
            let _ = d.await;
        }
    }
}

/// One proxy thread: serve the connections it is handed; when the channel closes
/// (shutdown), drain them, then let tasks they spawned (settlements on a network store)
/// finish, bounded by the shutdown grace.
async fn worker(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>,
    gw: Arc<Gateway>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    while let Some((stream, peer)) = rx.recv().await {
        match tokio::net::TcpStream::from_std(stream) {
            Ok(s) => serve_connection(s, peer, &gw, &graceful),
            Err(e) => tracing::warn!(error = %e, %peer, "cannot register the connection"),
        }
    }
    drain(&gw, graceful).await;
}

/// Serve one accepted connection on a task of the current runtime.
fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    gw: &Arc<Gateway>,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
) {
    let rt = gw.runtime.load_full();
    let builder = connection_builder(&rt.limits);
    let gw_svc = gw.clone();
    let first_request = Arc::new(tokio::sync::Notify::new());
    let seen = first_request.clone();
    let svc = service_fn(move |req| {
        seen.notify_one();
        let gw = gw_svc.clone();
        async move { Ok::<_, std::convert::Infallible>(handle_counted(gw, req, peer).await) }
    });
    let watcher = graceful.watcher();
    let first_deadline = rt.limits.header_read_timeout;
    match rt.tls.clone() {
        None => {
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .into_owned();
            tokio::spawn(drive(
                watcher.watch(conn),
                first_request,
                first_deadline,
                peer,
            ));
        }
        Some(tls) => {
            // The handshake runs on the connection's task, bounded like a request's
            // headers, so a silent client cannot hold the accept loop.
            let handshake_timeout = rt.limits.header_read_timeout;
            tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                let stream =
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .into_owned();
                drive(watcher.watch(conn), first_request, first_deadline, peer).await;
            });
        }
    }
}

/// Run one connection. hyper's header read timeout starts once a request has begun; a
/// client that connects and sends nothing (or only part of the HTTP/2 preface) is closed
/// when no first request arrives within `first_deadline`.
async fn drive<C, E>(
    conn: C,
    first_request: Arc<tokio::sync::Notify>,
    first_deadline: Duration,
    peer: SocketAddr,
) where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        r = &mut conn => Some(r),
        _ = first_request.notified() => None,
        _ = tokio::time::sleep(first_deadline) => {
            tracing::debug!(%peer, "no request within server.header_read_timeout; closing");
            return;
        }
    };
    let result = match ended {
        Some(r) => r,
        None => conn.await,
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, %peer, "connection ended with error");
    }
}

/// hyper's own default read buffer (8 KiB + 100 × 4 KiB).
const HYPER_DEFAULT_BUF: usize = 8192 + 4096 * 100;

/// The connection settings from `server.*`. hyper's parser limits are set well above
/// `max_headers` / `max_header_bytes`, so a request a little over them reaches
/// `pipeline::handle` and gets tollgate's JSON 431; one far beyond gets hyper's bare 431.
fn connection_builder(limits: &crate::runtime::Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    let header_room = usize::try_from(limits.max_header_bytes)
        .unwrap_or(usize::MAX)
        .saturating_mul(2);
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(limits.keep_alive)
        .max_headers(limits.max_headers.saturating_mul(2).max(100))
        .max_buf_size(header_room.max(HYPER_DEFAULT_BUF));
    b.http2()
        .max_header_list_size(u32::try_from(header_room).unwrap_or(u32::MAX).max(16 << 10));
    b
}

/// At most `server.max_concurrent_requests` requests in progress on the listener, a
/// response body counting until it ends; beyond, 503 with `retry-after`.
async fn handle_counted(
    gw: Arc<Gateway>,
    req: http::Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> http::Response<body::ProxyBody> {
    let limit = gw.runtime.load().limits.max_concurrent_requests;
    let Some(slot) = RequestSlot::take(&gw, limit) else {
        gw.stats.metrics.requests_shed.inc();
        let err = error::GatewayError::Overloaded { limit };
        gw.stats.refused(
            gw.clock.now_ms(),
            "-",
            "-",
            err.status().as_u16(),
            err.decision(),
        );
        return err.into_response();
    };
    let resp = pipeline::handle(gw.clone(), req, peer).await;
    resp.map(|b| http_body_util::BodyExt::boxed_unsync(body::Held::new(b, slot)))
}

/// One request's place under `max_concurrent_requests`, given back on drop.
pub struct RequestSlot(Arc<Gateway>);

impl RequestSlot {
    fn take(gw: &Arc<Gateway>, limit: usize) -> Option<Self> {
        // Relaxed: a bound on work, not a synchronisation point.
        let before = gw.in_flight.fetch_add(1, Ordering::Relaxed);
        if before >= limit {
            gw.in_flight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        gw.stats.metrics.requests_in_flight.inc();
        Some(Self(gw.clone()))
    }
}

impl Drop for RequestSlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.stats.metrics.requests_in_flight.dec();
    }
}

pub fn local_addr(l: &TcpListener) -> Option<SocketAddr> {
    l.local_addr().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_read_as_formatted() {
        for instance in [0, 1, 0xabc, 0xff_ffff] {
            for seq in [
                0,
                1,
                9,
                10,
                15,
                16,
                255,
                256,
                0xdead_beef,
                u64::MAX >> 1,
                u64::MAX,
            ] {
                assert_eq!(
                    super::request_id(instance, seq),
                    format!("{instance:06x}-{seq:x}")
                );
            }
        }
    }
}
