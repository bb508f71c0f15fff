//! Redis store: counters shared by every replica, with the memory store's semantics
//! (the shared suite proves it against a single node and a 3-node cluster).
//!
//! - [`keys`]: key layout, hash tags, cluster slots (CRC16).
//! - [`scripts`]: the Lua scripts — admission, settlement, cluster compensation, sweep,
//!   inspection, reset — documented KEYS/ARGV each.
//! - here: connection handling, timeouts, turning script replies into snapshots and
//!   retry-afters (exact `u64` math, as in `memory.rs`), the per-replica gauge.
//!
//! A request costs one round trip to admit and one to settle: a single script call on a
//! single node, one per slot (sent concurrently) on a cluster. On a single node the
//! common after-mode request is cheaper: its admission only reads (one pipelined `HMGET`
//! per counter, no script), and its settlement is a plain charge batched with the other
//! plain charges of its proxy thread into one call of the small `CHARGE` script
//! ([`ChargeBatch`]). Calls share one multiplexed connection per proxy thread (per node),
//! so they are pipelined; there is no connection per request. Every call is bounded by
//! `timeout_ms`
//! ([`StoreError::Timeout`]); a connection that cannot be made is
//! [`StoreError::Unavailable`].
//!
//! **Atomicity.** On a single node every key carries the same hash tag and one script
//! checks and takes all of a request's counters: all-or-nothing, atomically. On a
//! cluster each counter carries its own tag, so counters spread over the shards. Within
//! one slot the same script keeps the same guarantee. Across slots, admission runs one
//! script per slot concurrently; if any slot refuses (or fails), the slots that admitted
//! are compensated by a rollback script that releases the reservation and takes back the
//! commits. The result is all-or-nothing *by compensation*: a concurrent observer may
//! briefly see the partial take (and so be refused by a counter that is about to be
//! given back), and if the rollback itself cannot reach a node, that node's holds are
//! released at their deadline while its commits stay counted (errs toward refusing).
//! Settlement is one script per slot; each counter's settlement is atomic.
//!
//! **Time.** Scripts use the engine's `now`, never Redis `TIME`, so every replica and the
//! injected test clock agree. Window starts and ends are computed here with [`Window`]
//! and passed in. Key expiry (`PEXPIREAT`, set on every write) is absolute milliseconds
//! of that clock: with a test clock far from real time keys expire early or late; the
//! scripts judge "past its grace" by `now` themselves, so only early expiry (a clock in
//! the real past) loses state. The shared suite runs at the next real UTC midnight, so
//! its keys outlive it.
//!
//! **Numbers.** Lua numbers are doubles: values, limits and deadlines are capped at
//! 2^53 - 1 on the way in ([`MAX_EXACT`]). A bucket's deficit is kept in 1/period token
//! units, so its debt saturates at 2^53 / period ms (≈10^8 tokens for a one-day period);
//! changing a bucket's period is exact for periods up to ~26 h.
//!
//! **Gauge.** [`Store::outstanding_reservations`] is this replica's: holds admitted
//! through this `RedisStore` and neither settled nor past their deadline (or, for a
//! window, past its grace). Other replicas' holds are not counted.

mod call;
mod keys;
mod scripts;
mod shared_reads;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::{ClusterClient, ClusterConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{
    MultipleNodeRoutingInfo, ResponsePolicy, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};
use ::redis::{
    Client, ClientTlsConfig, FromRedisValue, RedisError, RedisResult, Script, TlsCertificates,
    Value,
};
use async_trait::async_trait;
use futures_util::future::join_all;
use serde::Deserialize;

use self::call::Call;
use self::keys::{holds_key, CounterKeys, KeySpace};
use self::shared_reads::{SharedReads, Turn};
use super::{
    Admission, CounterSnapshot, CounterView, InspectFilter, Refusal, ReservationId, Settlement,
    Store, StoreError, SweepStats,
};
use crate::counter::{CounterId, CounterKind, CounterOp, Need, Rate};
use crate::time::Millis;

/// Largest integer the scripts hold exactly (Lua numbers are doubles).
pub const MAX_EXACT: u64 = (1 << 53) - 1;

/// How many keys one SCAN page asks for, and how many inspection/sweep scripts are in
/// flight at once.
const SCAN_COUNT: u64 = 1_000;
const BATCH: usize = 64;

static ADMIT: LazyLock<Script> = LazyLock::new(|| Script::new(scripts::ADMIT));
static SETTLE: LazyLock<Script> = LazyLock::new(|| Script::new(scripts::SETTLE));
static CHARGE: LazyLock<Script> = LazyLock::new(|| Script::new(scripts::CHARGE));
static ROLLBACK: LazyLock<Script> = LazyLock::new(|| Script::new(scripts::ROLLBACK));
static SWEEP: LazyLock<Script> = LazyLock::new(|| Script::new(scripts::SWEEP));
static VIEW: LazyLock<Script> = LazyLock::new(|| Script::new(scripts::VIEW));
static RESET: LazyLock<Script> = LazyLock::new(|| Script::new(scripts::RESET));

/// Where Redis is and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// A single node, e.g. `redis://127.0.0.1:6379/0`, or `rediss://…` for TLS (rustls;
    /// the system's trust store unless [`RedisTls::ca_pem`] is given). Ignored when
    /// `cluster` is set; when neither is, `redis://127.0.0.1:6379`.
    pub url: Option<String>,
    /// Redis Cluster seed nodes (`redis://host:port`); the topology is discovered.
    pub cluster: Option<Vec<String>>,
    /// First part of every key (inside the hash tag): non-empty, no `{` or `}`. Give
    /// each deployment (and each test run on a shared server) its own.
    pub key_prefix: String,
    /// Bound on every call (admission, settlement, each page of inspect/sweep/reset).
    pub timeout_ms: u64,
    /// Bound on [`RedisStore::connect`].
    pub connect_timeout_ms: u64,
    /// How long ended windows are kept for late settlements (as `MemoryStore::new`).
    /// Make it at least the longest call the gateway allows.
    pub settle_grace_ms: u64,
    /// `sweep` walks the whole keyspace (SCAN) at most this often, by the engine clock;
    /// in between it only updates this replica's gauge. Admissions release due holds of
    /// the counters they touch anyway, and keys expire by themselves, so the walk only
    /// tidies counters nobody uses any more.
    pub sweep_scan_interval_ms: u64,
    /// Certificates for `rediss://` nodes (the caller reads the files).
    #[serde(skip)]
    pub tls: Option<RedisTls>,
    /// Optional pre-aggregation of plain charges (after-mode settlements) on a single
    /// node: each proxy thread holds them up to this long, adds up those of one counter,
    /// and writes them in one call. 0 = off: a charge is sent as soon as no call of its
    /// thread is out. See [`RedisConfig::batch_max`] and the README's trade-off.
    pub batch_interval_ms: u64,
    /// With batching on, a thread writes as soon as this many charges wait, before the
    /// interval is up (bounds one call's size).
    pub batch_max: usize,
    /// With batching on: read-only admissions (after-mode tokens) judge a counter by what
    /// this replica learned of it from Redis less than two `batch_interval_ms` ago (a
    /// read, or the reply to its own write) plus the charges it holds, instead of reading
    /// it on every request. A counter this replica writes is kept fresh by its writes'
    /// replies; other replicas' spend shows up to three intervals late (their hold, then
    /// the age of this replica's view).
    pub batch_cache_reads: bool,
}

/// PEM material for TLS to Redis: a private CA to trust instead of the system's roots,
/// and a client certificate for mutual TLS. Never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    pub ca_pem: Option<Vec<u8>>,
    pub client_cert_pem: Option<Vec<u8>>,
    pub client_key_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |x: &Option<Vec<u8>>| if x.is_some() { "<set>" } else { "<none>" };
        f.debug_struct("RedisTls")
            .field("ca_pem", &set(&self.ca_pem))
            .field("client_cert_pem", &set(&self.client_cert_pem))
            .field("client_key_pem", &set(&self.client_key_pem))
            .finish()
    }
}

impl RedisTls {
    /// `None` when nothing beyond the system trust store is asked for.
    fn certificates(&self) -> Result<Option<TlsCertificates>, StoreError> {
        let client_tls =
            match (&self.client_cert_pem, &self.client_key_pem) {
                (Some(cert), Some(key)) => Some(ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
                (None, None) => None,
                _ => return Err(StoreError::Unavailable(
                    "redis config: a client certificate needs its key, and a key its certificate"
                        .into(),
                )),
            };
        if client_tls.is_none() && self.ca_pem.is_none() {
            return Ok(None);
        }
        Ok(Some(TlsCertificates {
            client_tls,
            root_cert: self.ca_pem.clone(),
        }))
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            cluster: None,
            key_prefix: "tollgate".to_owned(),
            timeout_ms: 50,
            connect_timeout_ms: 1_000,
            settle_grace_ms: 300_000,
            sweep_scan_interval_ms: 60_000,
            tls: None,
            batch_interval_ms: 0,
            batch_max: 1_000,
            batch_cache_reads: true,
        }
    }
}

/// Counts for metrics (this replica's, since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedisStats {
    /// Holds this replica admitted and has not seen settled or expired.
    pub outstanding_reservations: u64,
    /// Settlements whose window was past its grace, and the units they carried.
    pub settlements_dropped: u64,
    pub units_dropped: u64,
    /// Admissions undone (per slot): another cluster slot refused or failed, or a
    /// [`Store::roll_back`] (the split store's replica side refused).
    pub rollbacks: u64,
    /// Rollbacks that could not be written (their holds expire at their deadline).
    pub rollbacks_failed: u64,
}

/// The Redis implementation of [`Store`]. Cheap to share behind an `Arc`. Requests use
/// one multiplexed connection per proxy thread (see [`crate::affinity`]), opened on
/// first use on that thread, so its I/O is driven where the request runs.
pub struct RedisStore {
    keys: KeySpace,
    cluster: bool,
    timeout: Duration,
    timeout_ms: u64,
    grace: u64,
    scan_interval: u64,
    /// Engine time of the last keyspace walk by `sweep` (`u64::MAX`: never).
    last_scan: AtomicU64,
    target: Target,
    conns: Box<[tokio::sync::OnceCell<Conn>]>,
    /// Plain charges waiting to be sent, per proxy thread.
    charges: Box<[ChargeBatch]>,
    /// `Some` when plain charges are held and added up before they are sent.
    batching: Option<Batching>,
    /// With batching: per counter-window key, the charges this replica holds (queued or
    /// being written), which its own read-only admissions add to what Redis says.
    held: dashmap::DashMap<String, u64>,
    /// With batching and its read cache: per counter-window key, what this replica last
    /// learned of it from Redis (see [`Seen`]).
    seen: dashmap::DashMap<String, Seen>,
    /// Concurrent read-only admissions of one counter share one `HMGET`.
    reads: SharedReads,
    book: Mutex<HoldBook>,
    outstanding: AtomicU64,
    tallies: Tallies,
}

#[derive(Debug, Default)]
struct Tallies {
    settlements_dropped: AtomicU64,
    units_dropped: AtomicU64,
    rollbacks: AtomicU64,
    rollbacks_failed: AtomicU64,
}

enum Target {
    Single(Client, ConnectionManagerConfig),
    Cluster(ClusterClient, Duration),
}

/// One multiplexed connection (per node, for a cluster); clones share it.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisStore {
    /// Connect now. Fails with [`StoreError::Unavailable`] within `connect_timeout_ms`
    /// when Redis cannot be reached. Once connected, connections are re-established in
    /// the background after failures.
    pub async fn connect(cfg: RedisConfig) -> Result<RedisStore, StoreError> {
        let store = Self::new_lazy(cfg)?;
        let wait = Duration::from_millis(store_connect_timeout(&store));
        let conn = match tokio::time::timeout(wait, store.open(true)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(StoreError::Unavailable(e.to_string())),
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "could not connect within {} ms",
                    wait.as_millis()
                )))
            }
        };
        // The cell was empty: nobody else has the store yet.
        let _ = store.conns[crate::affinity::slot()].set(conn);
        Ok(store)
    }

    /// A store that connects on first use and keeps reconnecting in the background, so
    /// the gateway can start while Redis is down (calls fail fast meanwhile). Only the
    /// configuration is checked here.
    pub fn new_lazy(cfg: RedisConfig) -> Result<RedisStore, StoreError> {
        let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
        let connect_timeout = Duration::from_millis(cfg.connect_timeout_ms.max(1));
        let bad = |e: RedisError| StoreError::Unavailable(format!("redis config: {e}"));
        keys::check_prefix(&cfg.key_prefix)
            .map_err(|e| StoreError::Unavailable(format!("redis config: {e}")))?;
        let certs = match &cfg.tls {
            Some(tls) => tls.certificates()?,
            None => None,
        };
        let (target, cluster) = match cfg.cluster.as_deref() {
            Some(nodes) if !nodes.is_empty() => {
                let mut builder = ClusterClient::builder(nodes.iter().map(String::as_str))
                    .connection_timeout(connect_timeout)
                    .response_timeout(timeout)
                    .retries(3)
                    .min_retry_wait(10)
                    .max_retry_wait(200);
                if let Some(certs) = certs {
                    builder = builder.certs(certs);
                }
                let client = builder.build().map_err(bad)?;
                (Target::Cluster(client, connect_timeout), true)
            }
            _ => {
                let url = cfg.url.as_deref().unwrap_or("redis://127.0.0.1:6379");
                let client = match certs {
                    Some(certs) => Client::build_with_tls(url, certs),
                    None => Client::open(url),
                }
                .map_err(bad)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    // Every call is bounded by `bounded` already; a second timer per call
                    // inside the client would only cost.
                    .set_response_timeout(None)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_secs(1))
                    .set_number_of_retries(6);
                (Target::Single(client, config), false)
            }
        };
        if cluster && cfg.batch_interval_ms > 0 {
            return Err(StoreError::Unavailable(
                "redis config: batching is for a single node (url), not a cluster".into(),
            ));
        }
        let batching = (cfg.batch_interval_ms > 0).then(|| Batching {
            interval: Duration::from_millis(cfg.batch_interval_ms),
            max: cfg.batch_max.max(1),
            cache_interval_ms: cfg.batch_cache_reads.then_some(cfg.batch_interval_ms),
        });
        Ok(RedisStore {
            batching,
            held: dashmap::DashMap::new(),
            seen: dashmap::DashMap::new(),
            reads: SharedReads::default(),
            keys: KeySpace::new(&cfg.key_prefix, cluster),
            cluster,
            timeout,
            timeout_ms: cfg.timeout_ms.max(1),
            grace: cfg.settle_grace_ms,
            scan_interval: cfg.sweep_scan_interval_ms,
            last_scan: AtomicU64::new(u64::MAX),
            target,
            conns: (0..crate::affinity::SLOTS)
                .map(|_| tokio::sync::OnceCell::new())
                .collect(),
            charges: (0..crate::affinity::SLOTS)
                .map(|_| ChargeBatch::default())
                .collect(),
            book: Mutex::new(HoldBook::default()),
            outstanding: AtomicU64::new(0),
            tallies: Tallies::default(),
        })
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    pub fn settle_grace_ms(&self) -> u64 {
        self.grace
    }

    /// The longest one call of this store may take by its own bounds: a batched charge
    /// waits for its batch (up to the flush interval), then for the write (each call is
    /// bounded by `timeout_ms`). An outer bound (the resilient store's) must be longer,
    /// or it would give up on settlements that are still going to be written.
    pub fn call_bound(&self) -> Duration {
        self.timeout.saturating_mul(2)
            + self
                .batching
                .as_ref()
                .map_or(Duration::ZERO, |b| b.interval)
    }

    pub fn stats(&self) -> RedisStats {
        RedisStats {
            outstanding_reservations: self.outstanding.load(Ordering::Relaxed),
            settlements_dropped: self.tallies.settlements_dropped.load(Ordering::Relaxed),
            units_dropped: self.tallies.units_dropped.load(Ordering::Relaxed),
            rollbacks: self.tallies.rollbacks.load(Ordering::Relaxed),
            rollbacks_failed: self.tallies.rollbacks_failed.load(Ordering::Relaxed),
        }
    }

    /// A cheap round trip (every node of a cluster), for readiness probes.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        let cmd = ::redis::cmd("PING");
        self.bounded(async move {
            match conn {
                Conn::Single(mut c) => c.req_packed_command(&cmd).await.map(drop),
                Conn::Cluster(mut c) => c
                    .route_command(
                        cmd,
                        RoutingInfo::MultiNode((
                            MultipleNodeRoutingInfo::AllMasters,
                            Some(ResponsePolicy::AllSucceeded),
                        )),
                    )
                    .await
                    .map(drop),
            }
        })
        .await
    }

    /// The Redis keys (state hash, holds set) a counter-window lives in, and its cluster
    /// slot — for operators and tests.
    pub fn keys_of(&self, op: &CounterOp, window_start: Millis) -> (String, String, u16) {
        let k = self.keys.for_op(op, window_start);
        let slot = keys::slot(k.state.as_bytes());
        (k.state, k.holds, slot)
    }

    async fn open(&self, eager: bool) -> RedisResult<Conn> {
        match &self.target {
            Target::Single(client, config) => {
                if eager {
                    ConnectionManager::new_with_config(client.clone(), config.clone())
                        .await
                        .map(Conn::Single)
                } else {
                    ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                        .map(Conn::Single)
                }
            }
            Target::Cluster(client, connect_timeout) => {
                let config = ClusterConfig::new()
                    .set_connection_timeout(*connect_timeout)
                    .set_response_timeout(self.timeout);
                if eager {
                    client
                        .get_async_connection_with_config(config)
                        .await
                        .map(Conn::Cluster)
                } else {
                    Ok(Conn::Cluster(
                        client.get_pending_async_connection_with_config(config),
                    ))
                }
            }
        }
    }

    /// This thread's connection, created lazily (connecting in the background) on first
    /// use.
    async fn conn(&self) -> Result<Conn, StoreError> {
        self.conns[crate::affinity::slot()]
            .get_or_try_init(|| self.open(false))
            .await
            .cloned()
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    async fn bounded<T>(&self, fut: impl Future<Output = RedisResult<T>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(store_error(e, self.timeout_ms)),
            Err(_) => Err(StoreError::Timeout(self.timeout_ms)),
        }
    }

    /// Ops (or settlements) grouped by the slot of their keys, in order of first
    /// appearance: one group on a single node.
    fn group(&self, keys: &[CounterKeys]) -> Vec<Vec<usize>> {
        if !self.cluster {
            return if keys.is_empty() {
                Vec::new()
            } else {
                vec![(0..keys.len()).collect()]
            };
        }
        let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let slot = keys::slot(k.state.as_bytes());
            match groups.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, members)) => members.push(i),
                None => groups.push((slot, vec![i])),
            }
        }
        groups.into_iter().map(|(_, members)| members).collect()
    }

    /// The end of an admission: snapshots and retry-afters from the replies, and the
    /// holds of an admitted request recorded in the gauge.
    #[allow(clippy::too_many_arguments)]
    fn conclude(
        &self,
        now: Millis,
        ops: &[CounterOp],
        plans: &[OpPlan],
        earlier: &[u64],
        replies: &[Option<OpReply>],
        all_admitted: bool,
        reservation: ReservationId,
        deadline: Millis,
    ) -> Result<Admission, StoreError> {
        let mut snapshots = Vec::with_capacity(ops.len());
        let mut blocking = Vec::new();
        let mut retry: Option<Option<u64>> = None;
        for (k, ((op, plan), reply)) in ops.iter().zip(plans).zip(replies).enumerate() {
            let reply = reply.ok_or_else(|| {
                StoreError::Protocol("admission script: an op got no reply".into())
            })?;
            let (snapshot, verdict) =
                judge(now, op, plan, &reply, earlier.get(k).copied().unwrap_or(0));
            snapshots.push(snapshot);
            if let Some(retry_after_ms) = verdict {
                blocking.push(k);
                retry = Some(match (retry, retry_after_ms) {
                    (None, r) => r,
                    (Some(Some(a)), Some(b)) => Some(a.max(b)),
                    (Some(_), _) => None,
                });
            }
        }
        if !all_admitted {
            return Ok(Admission::Refused(Refusal {
                snapshots,
                blocking,
                retry_after_ms: retry.flatten(),
            }));
        }

        let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
        for (op, plan) in ops.iter().zip(plans) {
            if plan.held > 0 {
                let expiry = match op.rate {
                    Rate::Fixed { .. } => deadline.min(plan.window_end.saturating_add(self.grace)),
                    _ => deadline,
                };
                book.insert(reservation.0, &plan.keys.state, expiry, &op.id);
            }
        }
        self.outstanding
            .store(book.live.len() as u64, Ordering::Relaxed);
        Ok(Admission::Admitted { snapshots })
    }

    /// Admission that only reads: every op a fixed window taking nothing (after-mode
    /// tokens). On a single node that is one `HMGET` per counter, pipelined, instead of
    /// a script call: nothing is written, so nothing needs the script's atomicity. When a
    /// counter has reservations (due holds to release first) or the request takes
    /// anything, `None`: the admission script decides. With batching's read cache, no
    /// read at all while every counter was learned of recently (see [`Seen`]).
    async fn check_only(
        &self,
        now: Millis,
        ops: &[CounterOp],
        plans: &[OpPlan],
        earlier: &[u64],
    ) -> Result<Option<(bool, Vec<Option<OpReply>>)>, StoreError> {
        if self.cluster {
            return Ok(None);
        }
        let reads_only = ops.iter().zip(plans).all(|(op, plan)| {
            matches!(op.rate, Rate::Fixed { .. })
                && plan.commit == 0
                && plan.held == 0
                && op.reserve == 0
        });
        if !reads_only {
            return Ok(None);
        }
        let interval = self.cache_interval();
        let rows = match interval.and_then(|i| self.recall(now, plans, i)) {
            Some(rows) => rows,
            None => {
                let rows = self.read_counters(plans).await?;
                if let Some(i) = interval {
                    for (plan, &(v, r)) in plans.iter().zip(&rows) {
                        learn(&self.seen, &plan.keys.state, v, r, now, i);
                    }
                }
                rows
            }
        };
        if rows.iter().any(|&(_, r)| r > 0) {
            return Ok(None);
        }
        let mut all = true;
        let replies = ops
            .iter()
            .zip(&rows)
            .enumerate()
            .map(|(k, (op, &(v, _)))| {
                // Held charges leave the book once their write's reply is handled, so
                // one landing in Redis while this read is out may count twice, or not
                // at all, for about a round trip: the race of any read with a
                // concurrent write, bounded by the charges in flight.
                let held = match (&self.batching, plans.get(k)) {
                    (Some(_), Some(p)) => self.held.get(p.keys.state.as_str()).map_or(0, |h| *h),
                    _ => 0,
                };
                let value = v.saturating_add(held);
                let limit = match op.rate {
                    Rate::Fixed { limit, .. } => exact(limit),
                    _ => 0,
                };
                let used = value.saturating_add(exact(earlier.get(k).copied().unwrap_or(0)));
                let passed = match op.need {
                    Need::Room => used < limit,
                    Need::Fits => used <= limit,
                };
                all &= passed;
                Some(OpReply {
                    passed,
                    raw: value,
                    reserved: 0,
                    soonest: None,
                })
            })
            .collect();
        Ok(Some((all, replies)))
    }

    /// With batching's read cache: the flush interval in engine ms (see [`Seen`]).
    fn cache_interval(&self) -> Option<u64> {
        self.batching.as_ref().and_then(|b| b.cache_interval_ms)
    }

    /// `(value, reserved)` of every counter in `plans`, as Redis has them: one `HMGET`
    /// per counter, pipelined. One counter (the usual request) is one command, and
    /// concurrent reads of it share it (see [`shared_reads`]).
    async fn read_counters(&self, plans: &[OpPlan]) -> Result<Vec<(u64, u64)>, StoreError> {
        if let [plan] = plans {
            let key = plan.keys.state.as_str();
            let lead = match self.reads.turn(key) {
                // The leader's read is bounded, so a joiner needs no timer of its own.
                Turn::Join(slot) => match shared_reads::answer(slot).await {
                    Some(result) => return result.map(|row| vec![row]),
                    // The leader went away: read alone.
                    None => None,
                },
                Turn::Lead(lead) => Some(lead),
            };
            let result = self.read_one(key).await;
            if let Some(lead) = lead {
                lead.finish(&result);
            }
            return result.map(|row| vec![row]);
        }
        let mut c = self.single_conn().await?;
        let mut pipe = ::redis::pipe();
        for plan in plans {
            pipe.cmd("HMGET").arg(&plan.keys.state).arg("v").arg("r");
        }
        let rows: Vec<(Option<u64>, Option<u64>)> = self.bounded(pipe.query_async(&mut c)).await?;
        if rows.len() != plans.len() {
            return Err(StoreError::Protocol(format!(
                "HMGET pipeline: {} replies for {} counters",
                rows.len(),
                plans.len()
            )));
        }
        Ok(rows
            .into_iter()
            .map(|(v, r)| (v.unwrap_or(0), r.unwrap_or(0)))
            .collect())
    }

    /// This thread's connection to a single node (counters are read by `HMGET` only there).
    async fn single_conn(&self) -> Result<ConnectionManager, StoreError> {
        match self.conn().await? {
            Conn::Single(c) => Ok(c),
            Conn::Cluster(_) => Err(StoreError::Protocol(
                "a counter read by HMGET on a cluster".into(),
            )),
        }
    }

    /// `(value, reserved)` of one counter: one `HMGET`.
    async fn read_one(&self, key: &str) -> Result<(u64, u64), StoreError> {
        let mut c = self.single_conn().await?;
        let (v, r): (Option<u64>, Option<u64>) = self
            .bounded(
                ::redis::cmd("HMGET")
                    .arg(key)
                    .arg("v")
                    .arg("r")
                    .query_async(&mut c),
            )
            .await?;
        Ok((v.unwrap_or(0), r.unwrap_or(0)))
    }

    /// `(reads sent, reads joined)` by read-only admissions of one counter so far (see
    /// [`shared_reads`]).
    pub fn shared_read_counts(&self) -> (u64, u64) {
        self.reads.counts()
    }

    /// `(value, reserved)` of every counter in `plans` from the read cache, if every
    /// entry still stands at `now` (`interval`: the flush interval; see [`Seen`]).
    fn recall(&self, now: Millis, plans: &[OpPlan], interval: u64) -> Option<Vec<(u64, u64)>> {
        plans
            .iter()
            .map(|p| {
                let e = self.seen.get(p.keys.state.as_str())?;
                stands(&e, now, interval).then_some((e.value, e.reserved))
            })
            .collect()
    }

    /// With the read cache: drop what was learned of counters a script is writing (an
    /// admission that takes, a settlement that releases, a rollback), so the next
    /// read-only admission reads them again. A read sent before the write and answered
    /// after this can still leave the older figure for up to two intervals.
    fn forget<'a>(&self, keys: impl Iterator<Item = &'a CounterKeys>) {
        if self.cache_interval().is_some() {
            for k in keys {
                self.seen.remove(k.state.as_str());
            }
        }
    }

    /// A settlement that only adds to a fixed window still within its grace, with no
    /// hold to release (after-mode tokens, request counts).
    fn is_plain_charge(&self, now: Millis, s: &Settlement) -> bool {
        let Rate::Fixed { window, .. } = s.op.rate else {
            return false;
        };
        s.op.reserve == 0 && window.end(s.window_start).saturating_add(self.grace) > now
    }

    /// Plain charges (see [`Self::is_plain_charge`]) through the small
    /// [`scripts::CHARGE`] instead of [`scripts::SETTLE`], batched per proxy thread (see
    /// [`ChargeBatch`]).
    async fn charge(
        &self,
        now: Millis,
        settlements: &[Settlement],
        keys: &[CounterKeys],
    ) -> Result<(), StoreError> {
        let mut args = Vec::with_capacity(settlements.len());
        for (s, k) in settlements.iter().zip(keys) {
            let actual = exact(s.actual);
            let Rate::Fixed { window, limit } = s.op.rate else {
                continue;
            };
            if actual == 0 {
                continue;
            }
            let end = window.end(s.window_start);
            args.push(ChargeArgs {
                key: k.state.clone(),
                actual,
                id: s.op.id.as_str().to_owned(),
                kind: kind_code(s.op.kind),
                limit: exact(limit),
                start: s.window_start,
                end,
                expire_at: exact(end.saturating_add(self.grace)),
                now,
            });
        }
        if args.is_empty() {
            return Ok(());
        }
        if self.batching.is_some() {
            for a in &args {
                let mut h = self.held.entry(a.key.clone()).or_insert(0);
                *h = h.saturating_add(a.actual);
            }
        }
        let batch = &self.charges[crate::affinity::slot()];
        let (tx, rx) = tokio::sync::oneshot::channel();
        let lead = {
            let mut q = batch.lock();
            q.pending = q.pending.saturating_add(args.len());
            q.waiting.push((args, tx));
            if self.batching.as_ref().is_some_and(|b| q.pending >= b.max) {
                // A full batch goes now rather than at the end of the interval.
                batch.full.notify_one();
            }
            !std::mem::replace(&mut q.flushing, true)
        };
        if lead {
            self.flush_charges(batch).await;
        }
        // The leader answers every charge it takes, within `call_bound` (its linger and
        // its call are bounded), or drops the sender if it is itself dropped mid-call:
        // then this charge's fate is unknown, reported as a timeout. Charges it has not
        // taken are failed by its `Reopen` guard. So no timer of its own here.
        rx.await
            .unwrap_or(Err(StoreError::Timeout(self.timeout_ms)))
    }

    /// Send the charges waiting on `batch`, in one script call per round, until none are
    /// left. Charges that arrive while a call is out wait for the next round: under load,
    /// many requests' settlements share one call; alone, a charge goes after one pass of
    /// the thread's scheduler. With
    /// batching, each round first waits out the interval (or until the batch is full),
    /// and charges to one counter are added up into one.
    async fn flush_charges(&self, batch: &ChargeBatch) {
        // If this future is dropped mid-call, the batch is open again and nobody waits
        // on a leader that is gone.
        let mut guard = Reopen {
            batch,
            held: &self.held,
            armed: true,
        };
        loop {
            if let Some(b) = &self.batching {
                let full = batch.full.notified();
                let pending = {
                    let mut q = batch.lock();
                    if q.waiting.is_empty() {
                        // Nothing came while the last call was out: done, without
                        // lingering (the next charge leads).
                        q.flushing = false;
                        guard.armed = false;
                        return;
                    }
                    q.pending
                };
                if pending < b.max {
                    tokio::select! {
                        () = tokio::time::sleep(b.interval) => {}
                        () = full => {}
                    }
                }
            } else {
                // One pass of this thread's scheduler first: the settlements of every
                // request that finishes in it join this round instead of the next. It
                // costs a charge no wait on an idle thread; at saturation it cut the
                // script calls per request by a third (see bench/RESULTS.md).
                tokio::task::yield_now().await;
            }
            let (args, answers): (Vec<Vec<ChargeArgs>>, Vec<_>) = {
                let mut q = batch.lock();
                let round = std::mem::take(&mut q.waiting);
                q.pending = 0;
                if round.is_empty() {
                    // Done: the next charge leads (decided under this same lock).
                    q.flushing = false;
                    guard.armed = false;
                    return;
                }
                round.into_iter().unzip()
            };
            let merged = merge_charges(args.iter().flatten());
            // Whatever becomes of this call, these charges are no longer held here once
            // it is over (written, or failed back to their callers).
            let _release = self.batching.is_some().then(|| Release {
                held: &self.held,
                charges: &args,
            });
            // Its reply is each counter's value after it: a read that admissions of these
            // counters may join while it is out (see [`shared_reads`]). Only where
            // admissions read with `HMGET`: a single node, without batching's book.
            let offers: Vec<_> = if self.batching.is_none() && !self.cluster {
                merged
                    .iter()
                    .map(|&(a, _)| self.reads.offer(&a.key))
                    .collect()
            } else {
                Vec::new()
            };
            let mut call = Call::new(&CHARGE, merged.len(), 7 * merged.len());
            for &(a, _) in &merged {
                call.key(&a.key);
            }
            for &(a, actual) in &merged {
                call.arg(actual)
                    .arg(&a.id)
                    .arg(a.kind)
                    .arg(a.limit)
                    .arg(a.start)
                    .arg(a.end)
                    .arg(a.expire_at);
            }
            let result = match self.conn().await {
                Ok(conn) => self.bounded(conn.call::<Vec<i64>>(&call)).await,
                Err(e) => Err(e),
            };
            // Each counter's figure after the call, if the reply has it.
            let rows = || {
                result
                    .as_deref()
                    .ok()
                    .and_then(|r| charge_rows(r, merged.len()))
            };
            // Joiners take it; with no usable reply they read for themselves (the
            // offers are dropped unanswered).
            if let Some(rows) = rows() {
                for (lead, row) in offers.into_iter().zip(rows) {
                    lead.finish(&Ok(row));
                }
            }
            // Landed or not (a timeout may have), reads sent before it are not joined.
            self.reads.wrote();
            // What the write says of its counters, learned before their charges leave
            // the held book (`_release`), so the view never loses them in between. A
            // reply of another shape teaches nothing; the write stands.
            if let (Some(rows), Some(interval)) = (rows(), self.cache_interval()) {
                // The latest settlement of the round: no later than the call.
                let at = args.iter().flatten().map(|a| a.now).max().unwrap_or(0);
                for ((a, _), (value, reserved)) in merged.iter().zip(rows) {
                    learn(&self.seen, &a.key, value, reserved, at, interval);
                }
            }
            let result = result.map(drop);
            for tx in answers {
                let _ = tx.send(result.clone());
            }
        }
    }

    fn prune(&self, now: Millis) {
        let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
        if book.prune(now) > 0 {
            self.outstanding
                .store(book.live.len() as u64, Ordering::Relaxed);
        }
    }

    /// Run `calls` concurrently, each bounded, all within one timeout.
    async fn run_all<T: FromRedisValue>(
        &self,
        conn: &Conn,
        calls: Vec<Call>,
    ) -> Vec<Result<T, StoreError>> {
        let calls = calls.iter().map(|call| {
            let conn = conn.clone();
            async move { self.bounded(conn.call::<T>(call)).await }
        });
        let results = join_all(calls).await;
        // Every script may write: reads sent before it are not joined (see [`shared_reads`]).
        self.reads.wrote();
        results
    }

    /// Undo the admissions of the groups that admitted (cluster compensation, and
    /// [`Store::roll_back`]). Failures are counted and logged; the first is returned.
    async fn compensate(
        &self,
        conn: &Conn,
        plans: &[OpPlan],
        groups: &[&Vec<usize>],
        reservation: ReservationId,
    ) -> Result<(), StoreError> {
        let calls = groups
            .iter()
            .map(|members| {
                let listed = || members.iter().filter_map(|&i| plans.get(i));
                let n = listed().count();
                let mut call = Call::new(&ROLLBACK, 2 * n, 2 + 2 * n);
                for p in listed() {
                    call.key(&p.keys.state).key(&p.keys.holds);
                }
                call.arg(reservation.0).arg(members.len());
                for p in listed() {
                    call.arg(p.ty).arg(p.commit);
                }
                call
            })
            .collect();
        let mut failure = None;
        for result in self.run_all::<i64>(conn, calls).await {
            self.tallies.rollbacks.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = result {
                self.tallies
                    .rollbacks_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "redis store: rollback failed; holds expire at their deadline, commits stay counted");
                failure.get_or_insert(e);
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Every key matching `pattern` of `kind` (`hash`, `zset`): on a cluster, every
    /// master is scanned (or only the one serving `slot`).
    async fn scan(
        &self,
        conn: &Conn,
        pattern: &str,
        kind: &str,
        slot: Option<u16>,
    ) -> Result<Vec<String>, StoreError> {
        let nodes: Vec<Option<u16>> = match (conn, slot) {
            (Conn::Single(_), _) => vec![None],
            (Conn::Cluster(_), Some(slot)) => vec![Some(slot)],
            (Conn::Cluster(c), None) => self.master_slots(c).await?.into_iter().map(Some).collect(),
        };
        let mut found = Vec::new();
        for node in nodes {
            let mut cursor = 0u64;
            loop {
                let mut cmd = ::redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT)
                    .arg("TYPE")
                    .arg(kind);
                let conn = conn.clone();
                let (next, keys): (u64, Vec<String>) = self
                    .bounded(async move {
                        let value = match (conn, node) {
                            (Conn::Single(mut c), _) => c.req_packed_command(&cmd).await?,
                            (Conn::Cluster(mut c), node) => {
                                let route = Route::new(node.unwrap_or(0), SlotAddr::Master);
                                c.route_command(
                                    cmd,
                                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                                        route,
                                    )),
                                )
                                .await?
                            }
                        };
                        <(u64, Vec<String>)>::from_redis_value(value).map_err(RedisError::from)
                    })
                    .await?;
                found.extend(keys);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        found.sort_unstable();
        found.dedup();
        Ok(found)
    }

    /// One slot served by each master (from `CLUSTER SLOTS`), to route SCAN by.
    async fn master_slots(&self, conn: &ClusterConnection) -> Result<Vec<u16>, StoreError> {
        let mut conn = conn.clone();
        let value = self
            .bounded(async move {
                conn.route_command(
                    ::redis::cmd("CLUSTER").arg("SLOTS").clone(),
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                )
                .await
            })
            .await?;
        let mut masters: Vec<(Vec<u8>, i64, u16)> = Vec::new();
        let Value::Array(ranges) = value else {
            return Err(StoreError::Protocol("CLUSTER SLOTS: not an array".into()));
        };
        for range in ranges {
            let Value::Array(parts) = range else { continue };
            let (Some(Value::Int(start)), Some(Value::Array(master))) =
                (parts.first(), parts.get(2))
            else {
                continue;
            };
            let host = match master.first() {
                Some(Value::BulkString(h)) => h.clone(),
                Some(Value::SimpleString(h)) => h.clone().into_bytes(),
                _ => continue,
            };
            let port = match master.get(1) {
                Some(Value::Int(p)) => *p,
                _ => continue,
            };
            let Ok(start) = u16::try_from(*start) else {
                continue;
            };
            if !masters.iter().any(|(h, p, _)| *h == host && *p == port) {
                masters.push((host, port, start));
            }
        }
        Ok(masters.into_iter().map(|(_, _, slot)| slot).collect())
    }

    /// Run a one-key script over `keys` (state hashes), `BATCH` at a time.
    async fn per_key<T: FromRedisValue>(
        &self,
        conn: &Conn,
        script: &'static Script,
        keys: &[String],
        args: &[String],
    ) -> Result<Vec<(String, T)>, StoreError> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(BATCH) {
            let calls = chunk
                .iter()
                .map(|k| {
                    let mut call = Call::new(script, 2, args.len());
                    call.key(k).key(holds_key(k));
                    for a in args {
                        call.arg(a);
                    }
                    call
                })
                .collect();
            for (k, r) in chunk.iter().zip(self.run_all::<T>(conn, calls).await) {
                out.push((k.clone(), r?));
            }
        }
        Ok(out)
    }
}

fn store_connect_timeout(store: &RedisStore) -> u64 {
    match &store.target {
        Target::Single(_, config) => config
            .connection_timeout()
            .map_or(1_000, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        Target::Cluster(_, d) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
    }
}

impl Conn {
    async fn call<T: FromRedisValue>(&self, call: &Call) -> RedisResult<T> {
        match self.clone() {
            Conn::Single(mut c) => call.invoke(&mut c).await,
            Conn::Cluster(mut c) => call.invoke(&mut c).await,
        }
    }
}

fn store_error(e: RedisError, timeout_ms: u64) -> StoreError {
    if e.is_timeout() {
        return StoreError::Timeout(timeout_ms);
    }
    let transient = matches!(
        e.code(),
        Some("LOADING" | "BUSY" | "MASTERDOWN" | "CLUSTERDOWN" | "TRYAGAIN" | "READONLY")
    );
    if transient
        || e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_unrecoverable_error()
        || e.is_cluster_error()
    {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Protocol(e.to_string())
    }
}

// ---------------------------------------------------------------------------------------
// Batched plain charges.

/// One counter's plain charge: the [`scripts::CHARGE`] arguments.
#[derive(Debug)]
struct ChargeArgs {
    key: String,
    actual: u64,
    id: String,
    kind: &'static str,
    limit: u64,
    start: Millis,
    end: Millis,
    expire_at: Millis,
    /// Engine time of the settlement.
    now: Millis,
}

type ChargeWaiter = (
    Vec<ChargeArgs>,
    tokio::sync::oneshot::Sender<Result<(), StoreError>>,
);

/// Plain charges waiting for a script call, per proxy thread. One caller at a time (the
/// leader) sends them; the others wait for its answer.
#[derive(Default)]
struct ChargeBatch {
    queue: Mutex<ChargeQueue>,
    /// With batching: the batch reached its size bound, send it now.
    full: tokio::sync::Notify,
}

#[derive(Default)]
struct ChargeQueue {
    waiting: Vec<ChargeWaiter>,
    /// Charges (counter-windows) in `waiting`.
    pending: usize,
    /// A leader is sending.
    flushing: bool,
}

impl ChargeBatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, ChargeQueue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One round's charges leaving the held book (see `RedisStore::held`) when dropped.
struct Release<'a> {
    held: &'a dashmap::DashMap<String, u64>,
    charges: &'a [Vec<ChargeArgs>],
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        release_held(self.held, self.charges.iter().flatten());
    }
}

/// Take `charges` off the held book; an entry goes when nothing is left of it.
fn release_held<'a>(
    held: &dashmap::DashMap<String, u64>,
    charges: impl Iterator<Item = &'a ChargeArgs>,
) {
    for c in charges {
        held.remove_if_mut(c.key.as_str(), |_, v| {
            *v = v.saturating_sub(c.actual);
            *v == 0
        });
    }
}

/// `storage.redis.batching`: how long a plain charge may wait to share a call.
#[derive(Debug, Clone, Copy)]
struct Batching {
    interval: Duration,
    max: usize,
    /// With the read cache: the flush interval in engine ms (see [`Seen`]).
    cache_interval_ms: Option<u64>,
}

/// What a batching replica learned of one counter-window from Redis: its value and
/// reserved units, from a read or from the reply to one of its own writes.
///
/// With `interval` the flush interval (`cache_interval_ms`):
/// - An entry stands for two intervals from `born`, the engine time its figure was asked
///   for; then the counter is read again before a check uses it.
/// - A figure asked for at least one interval after `born` replaces the entry. So a
///   reset, or spend that no write of this replica reported, shows within two intervals;
///   and this replica's own writes (about one per interval while it has traffic) keep a
///   busy counter's entry standing, so its checks never wait for a read.
/// - A figure asked for sooner only raises the entry (a window's value only grows): a
///   reply that was overtaken (a read sent before one of this replica's writes landed,
///   answered after it) cannot take that write back out of the view while its charges
///   have left [`RedisStore::held`]. Two replies crossing on two connections can still
///   have the later-sent one replace the other: the view then lacks about a round trip's
///   charges until the next figure.
#[derive(Debug, Clone, Copy)]
struct Seen {
    value: u64,
    reserved: u64,
    born: Millis,
}

/// Beyond this many entries, learning something new first drops the entries that no
/// longer stand (sweep does so every second anyway).
const SEEN_MAX: usize = 1 << 16;

/// Whether `e` may still be used at `now` (see [`Seen`]).
fn stands(e: &Seen, now: Millis, interval: u64) -> bool {
    now >= e.born && now < e.born.saturating_add(interval.saturating_mul(2))
}

/// `(value, reserved)` of each of `n` counters from a [`scripts::CHARGE`] reply, or `None`
/// when the reply has another shape.
fn charge_rows(reply: &[i64], n: usize) -> Option<impl Iterator<Item = (u64, u64)> + '_> {
    let num = |x: i64| u64::try_from(x).unwrap_or(0);
    (reply.len() == 2 * n).then(|| {
        reply.chunks_exact(2).map(move |vr| match *vr {
            [v, r] => (num(v), num(r)),
            _ => (0, 0),
        })
    })
}

/// Record what Redis said of `key` at `at` (engine ms when the call was sent).
fn learn(
    seen: &dashmap::DashMap<String, Seen>,
    key: &str,
    value: u64,
    reserved: u64,
    at: Millis,
    interval: u64,
) {
    if let Some(mut e) = seen.get_mut(key) {
        if at < e.born.saturating_add(interval) {
            e.value = e.value.max(value);
            e.reserved = e.reserved.max(reserved);
        } else {
            *e = Seen {
                value,
                reserved,
                born: at,
            };
        }
        return;
    }
    if seen.len() >= SEEN_MAX {
        seen.retain(|_, e| stands(e, at, interval));
    }
    seen.insert(
        key.to_owned(),
        Seen {
            value,
            reserved,
            born: at,
        },
    );
}

/// One charge per counter-window: charges to the same key (one counter, one window, so
/// the same id, kind, limit and bounds) are added up, in first-seen order. Each is the
/// first charge seen for its key, with the sum of the key's charges.
fn merge_charges<'a>(charges: impl Iterator<Item = &'a ChargeArgs>) -> Vec<(&'a ChargeArgs, u64)> {
    let mut out: Vec<(&'a ChargeArgs, u64)> = Vec::new();
    let mut at: HashMap<&'a str, usize> = HashMap::new();
    for c in charges {
        match at.get(c.key.as_str()) {
            Some(&i) => {
                if let Some((_, sum)) = out.get_mut(i) {
                    *sum = sum.saturating_add(c.actual).min(MAX_EXACT);
                }
            }
            None => {
                at.insert(c.key.as_str(), out.len());
                out.push((c, c.actual));
            }
        }
    }
    out
}

/// A leader's turn, if it ends early (its future dropped): the batch is open again, and
/// charges it did not take fail (they would otherwise wait for a leader that is gone).
struct Reopen<'a> {
    batch: &'a ChargeBatch,
    held: &'a dashmap::DashMap<String, u64>,
    armed: bool,
}

impl Drop for Reopen<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut q = self.batch.lock();
        q.flushing = false;
        q.pending = 0;
        for (args, tx) in q.waiting.drain(..) {
            release_held(self.held, args.iter());
            let _ = tx.send(Err(StoreError::Unavailable(
                "charge abandoned by its batch's sender".into(),
            )));
        }
    }
}

// ---------------------------------------------------------------------------------------
// The per-replica gauge.

/// Holds this replica admitted, until settled or expired. Keyed by (reservation, state
/// key): a counter named twice in one request is one hold, as in the memory store.
#[derive(Debug, Default)]
struct HoldBook {
    live: HashMap<(u64, String), (Millis, CounterId)>,
    by_expiry: BTreeSet<(Millis, u64, String)>,
}

impl HoldBook {
    fn insert(&mut self, reservation: u64, state: &str, expiry: Millis, id: &CounterId) {
        let key = (reservation, state.to_owned());
        if let Some((old, _)) = self.live.get(&key).cloned() {
            if old >= expiry {
                return;
            }
            self.by_expiry.remove(&(old, reservation, state.to_owned()));
        }
        self.by_expiry
            .insert((expiry, reservation, state.to_owned()));
        self.live.insert(key, (expiry, id.clone()));
    }

    fn remove(&mut self, reservation: u64, state: &str) {
        if let Some((expiry, _)) = self.live.remove(&(reservation, state.to_owned())) {
            self.by_expiry
                .remove(&(expiry, reservation, state.to_owned()));
        }
    }

    /// Forget holds expired at `now`. Returns how many.
    fn prune(&mut self, now: Millis) -> usize {
        let mut n = 0;
        while let Some(first) = self.by_expiry.first() {
            if first.0 > now {
                break;
            }
            if let Some((_, r, s)) = self.by_expiry.pop_first() {
                self.live.remove(&(r, s));
                n += 1;
            }
        }
        n
    }

    fn forget_counter(&mut self, id: &CounterId) {
        let gone: Vec<(u64, String)> = self
            .live
            .iter()
            .filter(|(_, (_, c))| c == id)
            .map(|(k, _)| k.clone())
            .collect();
        for (r, s) in gone {
            self.remove(r, &s);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Admission and settlement plans: what Rust computes before the scripts run.

/// One op as the scripts see it.
#[derive(Debug)]
struct OpPlan {
    keys: CounterKeys,
    ty: &'static str,
    window_start: Millis,
    window_end: Millis,
    commit: u64,
    /// What this op holds if admitted (0: nothing).
    held: u64,
}

fn type_code(rate: &Rate) -> &'static str {
    match rate {
        Rate::Fixed { .. } => "f",
        Rate::Bucket { .. } => "b",
        Rate::Concurrency { .. } => "c",
    }
}

fn kind_code(kind: CounterKind) -> &'static str {
    match kind {
        CounterKind::Tokens => "t",
        CounterKind::Requests => "r",
        CounterKind::InFlight => "i",
    }
}

fn kind_from(code: Option<&str>) -> CounterKind {
    match code {
        Some("r") => CounterKind::Requests,
        Some("i") => CounterKind::InFlight,
        _ => CounterKind::Tokens,
    }
}

fn exact(x: u64) -> u64 {
    x.min(MAX_EXACT)
}

/// The script's `limit`, `p` and `q` arguments for a rate (see [`scripts::ADMIT`]).
fn rate_args(rate: &Rate, window_start: Millis, window_end: Millis) -> (u64, u64, u64) {
    match *rate {
        Rate::Fixed { limit, .. } => (exact(limit), window_start, window_end),
        Rate::Bucket {
            limit,
            per_ms,
            burst,
        } => (exact(limit), exact(per_ms.max(1)), exact(burst)),
        Rate::Concurrency { limit } => (exact(limit), 0, 0),
    }
}

/// What one op's script reply says.
#[derive(Debug, Clone, Copy)]
struct OpReply {
    passed: bool,
    /// Fixed: value; bucket: deficit in 1/per_ms token.
    raw: u64,
    reserved: u64,
    soonest: Option<Millis>,
}

fn parse_admit(reply: &[i64], n: usize) -> Result<(bool, Vec<OpReply>), StoreError> {
    let bad = || StoreError::Protocol(format!("admission script: unexpected reply {reply:?}"));
    if reply.len() != 2 + 4 * n {
        return Err(bad());
    }
    let admitted = reply.first().copied().ok_or_else(bad)? == 1;
    let ops = reply
        .get(2..)
        .unwrap_or_default()
        .chunks_exact(4)
        .map(|c| match *c {
            [passed, raw, reserved, soonest] => OpReply {
                passed: passed == 1,
                raw: u64::try_from(raw).unwrap_or(0),
                reserved: u64::try_from(reserved).unwrap_or(0),
                soonest: u64::try_from(soonest).ok(),
            },
            _ => OpReply {
                passed: false,
                raw: 0,
                reserved: 0,
                soonest: None,
            },
        })
        .collect();
    Ok((admitted, ops))
}

/// Milliseconds until a bucket with `deficit` (1/per_ms token units) refilling `limit`
/// per ms has at most `tokens` missing (`None`: it never refills). As in `memory.rs`.
fn bucket_wait(deficit: u64, per_ms: u64, limit: u64, tokens: u64) -> Option<u64> {
    let target = tokens.saturating_mul(per_ms);
    if deficit <= target {
        return Some(0);
    }
    if limit == 0 {
        return None;
    }
    Some((deficit - target).div_ceil(limit))
}

/// The snapshot, and for a refused op its retry-after (`Some(None)`: never), exactly as
/// `memory.rs` computes them.
fn judge(
    now: Millis,
    op: &CounterOp,
    plan: &OpPlan,
    reply: &OpReply,
    earlier: u64,
) -> (CounterSnapshot, Option<Option<u64>>) {
    let soonest_release = || reply.soonest.map(|d| d.saturating_sub(now));
    let (snapshot, bucket) = match op.rate {
        Rate::Fixed { limit, .. } => (
            CounterSnapshot {
                limit,
                value: reply.raw,
                reserved: reply.reserved,
                window_start: plan.window_start,
                reset_at: plan.window_end,
            },
            None,
        ),
        Rate::Bucket {
            limit,
            per_ms,
            burst,
        } => {
            let per_ms = per_ms.max(1);
            let deficit = reply.raw;
            (
                CounterSnapshot {
                    limit: limit.saturating_add(burst),
                    value: deficit.div_ceil(per_ms),
                    reserved: reply.reserved,
                    window_start: 0,
                    reset_at: bucket_wait(deficit, per_ms, limit, 0)
                        .map_or(Millis::MAX, |w| now.saturating_add(w)),
                },
                Some((deficit, per_ms, limit)),
            )
        }
        Rate::Concurrency { limit } => (
            CounterSnapshot {
                limit,
                value: 0,
                reserved: reply.reserved,
                window_start: 0,
                reset_at: now,
            },
            None,
        ),
    };
    if reply.passed {
        return (snapshot, None);
    }
    let limit = snapshot.limit;
    let alone = match op.need {
        Need::Room => 1,
        Need::Fits => op.commit.saturating_add(op.reserve),
    };
    let retry = if alone.saturating_add(earlier) > limit {
        None
    } else {
        match (op.rate, bucket) {
            (Rate::Fixed { .. }, _) => Some(snapshot.reset_at.saturating_sub(now)),
            (Rate::Bucket { .. }, Some((deficit, per_ms, refill))) => {
                let free_needed = snapshot
                    .reserved
                    .saturating_add(earlier)
                    .saturating_add(alone);
                match limit.checked_sub(free_needed) {
                    Some(spent_allowed) => bucket_wait(deficit, per_ms, refill, spent_allowed),
                    None => soonest_release(),
                }
            }
            _ => soonest_release(),
        }
    };
    (snapshot, Some(retry.map(|ms| ms.max(1))))
}

#[async_trait]
impl Store for RedisStore {
    async fn admit(
        &self,
        now: Millis,
        ops: &[CounterOp],
        reservation: ReservationId,
        deadline: Millis,
    ) -> Result<Admission, StoreError> {
        self.prune(now);
        if ops.is_empty() {
            return Ok(Admission::Admitted {
                snapshots: Vec::new(),
            });
        }
        let deadline = exact(deadline);
        let plans: Vec<OpPlan> = ops
            .iter()
            .map(|op| {
                let (window_start, window_end) = match op.rate {
                    Rate::Fixed { window, .. } => (window.start(now), window.end(now)),
                    _ => (0, 0),
                };
                let amount = match op.rate {
                    Rate::Concurrency { .. } => op.commit.saturating_add(op.reserve),
                    _ => op.reserve,
                };
                OpPlan {
                    keys: self.keys.for_op(op, window_start),
                    ty: type_code(&op.rate),
                    window_start,
                    window_end,
                    commit: exact(op.commit),
                    held: if deadline > now { exact(amount) } else { 0 },
                }
            })
            .collect();
        // Units this request's earlier ops take from the same counter.
        let earlier: Vec<u64> = ops
            .iter()
            .enumerate()
            .map(|(k, op)| {
                ops.iter()
                    .take(k)
                    .filter(|o| o.id == op.id)
                    .fold(0u64, |acc, o| {
                        acc.saturating_add(o.commit.saturating_add(o.reserve))
                    })
            })
            .collect();
        if let Some((all_admitted, replies)) = self.check_only(now, ops, &plans, &earlier).await? {
            return self.conclude(
                now,
                ops,
                &plans,
                &earlier,
                &replies,
                all_admitted,
                reservation,
                deadline,
            );
        }
        let keys: Vec<CounterKeys> = plans.iter().map(|p| p.keys.clone()).collect();
        let groups = self.group(&keys);
        let calls = groups
            .iter()
            .map(|members| {
                let listed = || {
                    members
                        .iter()
                        .filter_map(|&i| Some((i, ops.get(i)?, plans.get(i)?)))
                };
                let n = listed().count();
                let mut call = Call::new(&ADMIT, 2 * n, 5 + 10 * n);
                for (_, _, plan) in listed() {
                    call.key(&plan.keys.state).key(&plan.keys.holds);
                }
                call.arg(now)
                    .arg(reservation.0)
                    .arg(deadline)
                    .arg(self.grace)
                    .arg(members.len());
                for (i, op, plan) in listed() {
                    let (limit, p, q) = rate_args(&op.rate, plan.window_start, plan.window_end);
                    call.arg(plan.ty)
                        .arg(op.id.as_str())
                        .arg(kind_code(op.kind))
                        .arg(match op.need {
                            Need::Room => "room",
                            Need::Fits => "fits",
                        })
                        .arg(plan.commit)
                        .arg(exact(op.reserve))
                        .arg(limit)
                        .arg(exact(earlier.get(i).copied().unwrap_or(0)))
                        .arg(p)
                        .arg(q);
                }
                call
            })
            .collect();
        let conn = self.conn().await?;
        let results = self.run_all::<Vec<i64>>(&conn, calls).await;
        self.forget(keys.iter());

        let mut replies: Vec<Option<OpReply>> = vec![None; ops.len()];
        let mut admitted_groups = Vec::new();
        let mut all_admitted = true;
        let mut failure = None;
        for (members, result) in groups.iter().zip(results) {
            let parsed = result.and_then(|reply| parse_admit(&reply, members.len()));
            match parsed {
                Ok((admitted, op_replies)) => {
                    if admitted {
                        admitted_groups.push(members);
                    } else {
                        all_admitted = false;
                    }
                    for (&i, r) in members.iter().zip(op_replies) {
                        if let Some(slot) = replies.get_mut(i) {
                            *slot = Some(r);
                        }
                    }
                }
                Err(e) => {
                    all_admitted = false;
                    failure.get_or_insert(e);
                }
            }
        }
        if !all_admitted && !admitted_groups.is_empty() {
            // Failures are counted and logged inside; the refusal or error stands.
            let _ = self
                .compensate(&conn, &plans, &admitted_groups, reservation)
                .await;
        }
        if let Some(e) = failure {
            return Err(e);
        }
        self.conclude(
            now,
            ops,
            &plans,
            &earlier,
            &replies,
            all_admitted,
            reservation,
            deadline,
        )
    }

    async fn settle(&self, now: Millis, settlements: &[Settlement]) -> Result<(), StoreError> {
        self.prune(now);
        if settlements.is_empty() {
            return Ok(());
        }
        let keys: Vec<CounterKeys> = settlements
            .iter()
            .map(|s| self.keys.for_op(&s.op, s.window_start))
            .collect();
        if !self.cluster && settlements.iter().all(|s| self.is_plain_charge(now, s)) {
            return self.charge(now, settlements, &keys).await;
        }
        let groups = self.group(&keys);
        let calls = groups
            .iter()
            .map(|members| {
                let listed = || {
                    members
                        .iter()
                        .filter_map(|&i| Some((settlements.get(i)?, keys.get(i)?)))
                };
                let n = listed().count();
                let mut call = Call::new(&SETTLE, 2 * n, 3 + 9 * n);
                for (_, k) in listed() {
                    call.key(&k.state).key(&k.holds);
                }
                call.arg(now).arg(self.grace).arg(members.len());
                for (s, _) in listed() {
                    let window_end = match s.op.rate {
                        Rate::Fixed { window, .. } => window.end(s.window_start),
                        _ => 0,
                    };
                    let (limit, p, q) = rate_args(&s.op.rate, s.window_start, window_end);
                    // Admission holds `reserve` (a concurrency counter: `commit` too).
                    let may_hold = s.op.reserve > 0
                        || (matches!(s.op.rate, Rate::Concurrency { .. }) && s.op.commit > 0);
                    call.arg(type_code(&s.op.rate))
                        .arg(s.reservation.0)
                        .arg(exact(s.actual))
                        .arg(s.op.id.as_str())
                        .arg(kind_code(s.op.kind))
                        .arg(limit)
                        .arg(p)
                        .arg(q)
                        .arg(u8::from(may_hold));
                }
                call
            })
            .collect();
        let conn = self.conn().await?;
        let results = self.run_all::<Vec<i64>>(&conn, calls).await;
        self.forget(keys.iter());
        let mut failure = None;
        let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
        for (members, result) in groups.iter().zip(results) {
            let reply = match result {
                Ok(reply) if reply.len() == 1 + 2 * members.len() => reply,
                Ok(reply) => {
                    failure.get_or_insert(StoreError::Protocol(format!(
                        "settlement script: unexpected reply {reply:?}"
                    )));
                    continue;
                }
                Err(e) => {
                    failure.get_or_insert(e);
                    continue;
                }
            };
            let flags = reply.get(1..).unwrap_or_default().chunks_exact(2);
            for (&i, flag) in members.iter().zip(flags) {
                let (Some(s), Some(k)) = (settlements.get(i), keys.get(i)) else {
                    continue;
                };
                book.remove(s.reservation.0, &k.state);
                if flag.get(1) == Some(&1) {
                    self.tallies
                        .settlements_dropped
                        .fetch_add(1, Ordering::Relaxed);
                    self.tallies
                        .units_dropped
                        .fetch_add(s.actual, Ordering::Relaxed);
                }
            }
        }
        self.outstanding
            .store(book.live.len() as u64, Ordering::Relaxed);
        drop(book);
        failure.map_or(Ok(()), Err)
    }

    async fn roll_back(
        &self,
        now: Millis,
        ops: &[CounterOp],
        reservation: ReservationId,
    ) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let plans: Vec<OpPlan> = ops
            .iter()
            .map(|op| {
                let (window_start, window_end) = match op.rate {
                    Rate::Fixed { window, .. } => (window.start(now), window.end(now)),
                    _ => (0, 0),
                };
                OpPlan {
                    keys: self.keys.for_op(op, window_start),
                    ty: type_code(&op.rate),
                    window_start,
                    window_end,
                    commit: exact(op.commit),
                    held: 0,
                }
            })
            .collect();
        let keys: Vec<CounterKeys> = plans.iter().map(|p| p.keys.clone()).collect();
        let groups = self.group(&keys);
        let conn = self.conn().await?;
        let all: Vec<&Vec<usize>> = groups.iter().collect();
        let result = self.compensate(&conn, &plans, &all, reservation).await;
        self.forget(keys.iter());
        let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
        for p in &plans {
            book.remove(reservation.0, &p.keys.state);
        }
        self.outstanding
            .store(book.live.len() as u64, Ordering::Relaxed);
        result
    }

    async fn inspect(
        &self,
        now: Millis,
        filter: &InspectFilter,
    ) -> Result<Vec<CounterView>, StoreError> {
        let id_prefix = filter.prefix.as_deref().unwrap_or("");
        let conn = self.conn().await?;
        let found = self
            .scan(&conn, &self.keys.scan_pattern(id_prefix), "hash", None)
            .await?;
        let args = [now.to_string(), self.grace.to_string()];
        let mut views = Vec::new();
        for (_, fields) in self
            .per_key::<Vec<Option<String>>>(&conn, &VIEW, &found, &args)
            .await?
        {
            if let Some(view) = view_of(now, &fields) {
                if view.id.starts_with(id_prefix) {
                    views.push(view);
                }
            }
        }
        views.sort_by(|a, b| (&a.id, a.window_start).cmp(&(&b.id, b.window_start)));
        Ok(views)
    }

    async fn reset(&self, id: &CounterId) -> Result<u64, StoreError> {
        let conn = self.conn().await?;
        let slot = keys::slot(self.keys.base(id).as_bytes());
        let found = self
            .scan(&conn, &self.keys.counter_pattern(id), "hash", Some(slot))
            .await?;
        let args = [id.as_str().to_owned()];
        let removed = self
            .per_key::<i64>(&conn, &RESET, &found, &args)
            .await?
            .into_iter()
            .filter(|(_, deleted)| *deleted == 1)
            .count() as u64;
        // This replica's read cache forgets the counter with it (others' within their
        // interval).
        for key in &found {
            self.seen.remove(key.as_str());
        }
        let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
        book.forget_counter(id);
        self.outstanding
            .store(book.live.len() as u64, Ordering::Relaxed);
        Ok(removed)
    }

    async fn sweep(&self, now: Millis) -> Result<SweepStats, StoreError> {
        self.prune(now);
        if let Some(interval) = self.cache_interval() {
            self.seen.retain(|_, e| stands(e, now, interval));
        }
        let last = self.last_scan.load(Ordering::Relaxed);
        let due = last == u64::MAX || now < last || now - last >= self.scan_interval;
        if !due
            || self
                .last_scan
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return Ok(SweepStats::default());
        }
        let conn = self.conn().await?;
        let holds = self
            .scan(&conn, &self.keys.scan_pattern(""), "zset", None)
            .await?;
        // `per_key` takes state keys; a holds key is its state key plus `:h`.
        let states: Vec<String> = holds
            .iter()
            .filter_map(|h| h.strip_suffix(":h").map(str::to_owned))
            .collect();
        let args = [now.to_string(), self.grace.to_string()];
        let mut stats = SweepStats::default();
        for (_, reply) in self
            .per_key::<Vec<i64>>(&conn, &SWEEP, &states, &args)
            .await?
        {
            if let [expired, reclaimed] = reply.as_slice() {
                stats.reservations_expired += u64::try_from(*expired).unwrap_or(0);
                stats.windows_reclaimed += u64::try_from(*reclaimed).unwrap_or(0);
            }
        }
        Ok(stats)
    }

    fn outstanding_reservations(&self) -> u64 {
        self.outstanding.load(Ordering::Relaxed)
    }
}

/// A counter-window from the [`scripts::VIEW`] fields `y id k lim s e v r d at pm bu`.
fn view_of(now: Millis, fields: &[Option<String>]) -> Option<CounterView> {
    let text = |i: usize| fields.get(i).and_then(|f| f.as_deref());
    let num = |i: usize| text(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    let id = text(1)?.to_owned();
    let kind = kind_from(text(2));
    let (limit, value, reserved, window_start, reset_at) = match text(0)? {
        "f" => (num(3), num(6), num(7), num(4), num(5)),
        "b" => {
            let (lim, at, per_ms) = (num(3), num(9), num(10).max(1));
            let mut deficit = num(8);
            if now > at {
                let back = u128::from(now - at) * u128::from(lim);
                deficit = u64::try_from(u128::from(deficit).saturating_sub(back)).unwrap_or(0);
            }
            let reset_at =
                bucket_wait(deficit, per_ms, lim, 0).map_or(Millis::MAX, |w| now.saturating_add(w));
            (
                lim.saturating_add(num(11)),
                deficit.div_ceil(per_ms),
                num(7),
                0,
                reset_at,
            )
        }
        "c" => (num(3), 0, num(7), 0, now),
        _ => return None,
    };
    Some(CounterView {
        id,
        kind,
        limit,
        value,
        reserved,
        remaining: limit.saturating_sub(value.saturating_add(reserved)),
        window_start,
        reset_at,
    })
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &self.cluster)
            .field("timeout_ms", &self.timeout_ms)
            .field("settle_grace_ms", &self.grace)
            .field(
                "connected",
                &self.conns.iter().any(tokio::sync::OnceCell::initialized),
            )
            .field("tallies", &self.tallies)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(key: &str, actual: u64) -> ChargeArgs {
        ChargeArgs {
            key: key.to_owned(),
            actual,
            id: format!("id-{key}"),
            kind: "t",
            limit: 100,
            start: 0,
            end: 60_000,
            expire_at: 360_000,
            now: 0,
        }
    }

    #[test]
    fn what_was_learned_rises_within_an_interval_then_is_replaced() {
        let seen = dashmap::DashMap::new();
        let get = |seen: &dashmap::DashMap<String, Seen>| {
            seen.get("k").map(|e| (e.value, e.reserved, e.born))
        };
        learn(&seen, "k", 10, 0, 1_000, 5);
        assert_eq!(get(&seen), Some((10, 0, 1_000)));
        // Within an interval, an overtaken reply (lower figures) does not lower the view;
        // a higher one raises it without renewing it.
        learn(&seen, "k", 7, 0, 1_002, 5);
        assert_eq!(get(&seen), Some((10, 0, 1_000)));
        learn(&seen, "k", 12, 3, 1_004, 5);
        assert_eq!(get(&seen), Some((12, 3, 1_000)));
        // A figure asked for an interval or more later replaces it (a reset shows) and
        // renews it: it stands for two intervals from then.
        learn(&seen, "k", 0, 0, 1_005, 5);
        assert_eq!(get(&seen), Some((0, 0, 1_005)));
        let e = seen.get("k").map(|e| *e).unwrap();
        assert!(stands(&e, 1_005, 5) && stands(&e, 1_014, 5));
        assert!(!stands(&e, 1_015, 5) && !stands(&e, 1_004, 5));
        // Past the size bound, entries that no longer stand make room.
        for i in 0..SEEN_MAX {
            learn(&seen, &format!("old{i}"), 1, 0, 0, 5);
        }
        learn(&seen, "new", 1, 0, 2_000, 5);
        assert_eq!(seen.len(), 1, "only the new entry stands at 2000");
    }

    #[test]
    fn charges_to_one_counter_are_added_up_in_first_seen_order() {
        let all = [
            charge("b", 1),
            charge("a", 2),
            charge("b", 3),
            charge("c", 0),
            charge("a", MAX_EXACT),
        ];
        let merged = merge_charges(all.iter());
        let got: Vec<(&str, u64)> = merged
            .iter()
            .map(|(c, sum)| (c.key.as_str(), *sum))
            .collect();
        // Sums never pass what the scripts hold exactly.
        assert_eq!(got, [("b", 4), ("a", MAX_EXACT), ("c", 0)]);
        assert_eq!(merged[0].0.id, "id-b");
        assert!(merge_charges([].iter()).is_empty());
    }

    #[test]
    fn bucket_wait_matches_memory() {
        // 3 per second, one token missing: 334 ms (exact units: 1000 per token).
        assert_eq!(bucket_wait(1_000, 1_000, 3, 0), Some(334));
        assert_eq!(bucket_wait(1_000, 1_000, 0, 0), None);
        assert_eq!(bucket_wait(1_000, 1_000, 0, 1), Some(0));
    }

    #[test]
    fn view_refills_buckets() {
        let f = |s: &str| Some(s.to_owned());
        // 10 per 1000 ms, 5 tokens missing at t=0 (5000 units); at t=250 2500 refilled.
        let fields = [
            f("b"),
            f("x"),
            f("t"),
            f("10"),
            None,
            None,
            None,
            f("0"),
            f("5000"),
            f("0"),
            f("1000"),
            f("2"),
        ];
        let view = view_of(250, &fields).unwrap();
        assert_eq!((view.limit, view.value, view.reset_at), (12, 3, 500));
    }

    #[test]
    fn hold_book_merges_and_prunes() {
        let mut book = HoldBook::default();
        let id = CounterId::from_encoded("a");
        book.insert(1, "k", 10, &id);
        book.insert(1, "k", 20, &id);
        book.insert(2, "k", 15, &id);
        assert_eq!(book.live.len(), 2);
        assert_eq!(book.prune(15), 1);
        assert_eq!(book.live.len(), 1);
        book.remove(1, "k");
        assert_eq!((book.live.len(), book.by_expiry.len()), (0, 0));
    }
}
