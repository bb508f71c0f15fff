//! A primary store (Redis) with a local fallback: what the gateway does when Redis is
//! slow or gone.
//!
//! - Primary healthy: every call goes to it.
//! - A call fails or times out: the store is *degraded*. With [`OnError::FailOpen`]
//!   admissions are answered by a local [`MemoryStore`] (counting in this replica only:
//!   limits are per replica while degraded); with [`OnError::FailClosed`] the error is
//!   returned (the gateway answers 503 with a retry-after). No call waits longer than the
//!   primary's own timeout, and [`ResilientStore::with_call_timeout`] bounds it again.
//! - While degraded, calls skip the primary, except one probe at a time once every
//!   probe interval (the probe is the call itself: no extra traffic when healthy). The
//!   first probe that succeeds makes the store healthy again, with no new store.
//! - Settlements the primary could not take are queued (bounded by `max_deferred`
//!   settlements; beyond it the oldest are dropped, counted and logged) and written by
//!   [`ResilientStore::flush_deferred`], which [`Store::sweep`] calls. A settlement that
//!   timed out may still have been applied: retrying it can charge twice — the error
//!   leans toward counting too much, never too little.
//! - Settlements of admissions the local store made go to the local store (releasing
//!   its holds), even after the primary is back: the admission result knows which store
//!   admitted, and this store remembers it per (reservation, counter) for up to
//!   [`LOCAL_ADMISSIONS`] counters (oldest forgotten first; a forgotten one settles on
//!   the primary, where it only charges the actual cost). Spend counted locally during an
//!   outage is not copied to the primary.
//!
//! Health is [`ResilientStore::state`], for `/readyz` and metrics.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Serialize;

use super::memory::MemoryStore;
use super::{
    Admission, CounterView, InspectFilter, ReservationId, Settlement, Store, StoreError, SweepStats,
};
use crate::counter::{CounterId, CounterOp};
use crate::time::Millis;

/// How many (reservation, counter) pairs admitted locally are remembered for settlement.
pub const LOCAL_ADMISSIONS: usize = 262_144;

/// What to do when the primary store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Answer from the local store (limits become per replica while degraded).
    FailOpen,
    /// Return the error.
    FailClosed,
}

/// Health of the primary, as `/readyz` and metrics show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum StoreState {
    Healthy,
    Degraded {
        /// The engine time (`now`) of the call that found the primary failing.
        since_ms: Millis,
        last_error: String,
    },
}

/// Counts for metrics, since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResilientStats {
    /// Admissions answered by the local store.
    pub local_admissions: u64,
    /// Settlements waiting for the primary.
    pub deferred_settlements: u64,
    /// Deferred settlements written to the primary later.
    pub flushed_settlements: u64,
    /// Deferred settlements dropped because the queue was full.
    pub dropped_settlements: u64,
}

pub struct ResilientStore {
    primary: Arc<dyn Store>,
    local: MemoryStore,
    mode: OnError,
    max_deferred: usize,
    probe_interval: Duration,
    call_timeout: Duration,
    health: Mutex<Option<Degraded>>,
    /// Set while one call probes a degraded primary, so only one waits on it.
    probing: AtomicBool,
    deferred: Mutex<Deferred>,
    /// Held by the one `flush_deferred` running, so batches stay in order.
    flushing: tokio::sync::Mutex<()>,
    local_admissions: Mutex<LocalAdmissions>,
    tallies: Tallies,
}

#[derive(Debug, Default)]
struct Tallies {
    local_admissions: AtomicU64,
    flushed: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Debug, Clone)]
struct Degraded {
    since_ms: Millis,
    last_error: String,
    last_attempt: Instant,
}

/// Settlements waiting for the primary, in batches that share the `now` they were made
/// at (one `settle` call each).
#[derive(Debug, Default)]
struct Deferred {
    batches: VecDeque<(Millis, Vec<Settlement>)>,
    len: usize,
}

impl ResilientStore {
    /// `max_deferred`: settlements kept for the primary while it is away.
    pub fn new(
        primary: Arc<dyn Store>,
        local: MemoryStore,
        mode: OnError,
        max_deferred: usize,
    ) -> Self {
        Self {
            primary,
            local,
            mode,
            max_deferred,
            probe_interval: Duration::from_secs(1),
            call_timeout: Duration::from_secs(1),
            health: Mutex::new(None),
            probing: AtomicBool::new(false),
            deferred: Mutex::new(Deferred::default()),
            flushing: tokio::sync::Mutex::new(()),
            local_admissions: Mutex::new(LocalAdmissions::default()),
            tallies: Tallies::default(),
        }
    }

    /// How long a degraded primary is left alone between probes (default 1 s).
    pub fn with_probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = interval;
        self
    }

    /// An outer bound on every primary call, in case the primary has none (default 1 s;
    /// `RedisStore` has its own, tighter one).
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    pub fn state(&self) -> StoreState {
        match &*lock(&self.health) {
            None => StoreState::Healthy,
            Some(d) => StoreState::Degraded {
                since_ms: d.since_ms,
                last_error: d.last_error.clone(),
            },
        }
    }

    pub fn mode(&self) -> OnError {
        self.mode
    }

    pub fn local(&self) -> &MemoryStore {
        &self.local
    }

    /// Deferred settlements dropped because the queue was full, since start.
    pub fn dropped_settlements(&self) -> u64 {
        self.tallies.dropped.load(Ordering::Relaxed)
    }

    /// Settlements waiting for the primary.
    pub fn deferred_settlements(&self) -> usize {
        lock(&self.deferred).len
    }

    pub fn stats(&self) -> ResilientStats {
        ResilientStats {
            local_admissions: self.tallies.local_admissions.load(Ordering::Relaxed),
            deferred_settlements: self.deferred_settlements() as u64,
            flushed_settlements: self.tallies.flushed.load(Ordering::Relaxed),
            dropped_settlements: self.dropped_settlements(),
        }
    }

    /// Write deferred settlements to the primary, oldest first, each batch with the `now`
    /// it was made at. Stops at the first failure (the batch stays queued). Returns how
    /// many settlements were written. `now` only dates a failure.
    pub async fn flush_deferred(&self, now: Millis) -> Result<usize, StoreError> {
        let _turn = self.flushing.lock().await;
        let mut written = 0;
        loop {
            let Some((at, batch)) = lock(&self.deferred).pop_front() else {
                return Ok(written);
            };
            let result = match self.gate() {
                Gate::Primary(_probe) => {
                    let result = self.bounded(self.primary.settle(at, &batch)).await;
                    self.observe(now, &result);
                    result
                }
                Gate::Skip(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    written += batch.len();
                    self.tallies
                        .flushed
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    lock(&self.deferred).push_front(at, batch);
                    return Err(e);
                }
            }
        }
    }

    /// Whether to call the primary, and as its probe or not.
    fn gate(&self) -> Gate<'_> {
        let health = lock(&self.health);
        let Some(d) = &*health else {
            return Gate::Primary(None);
        };
        if d.last_attempt.elapsed() >= self.probe_interval
            && !self.probing.swap(true, Ordering::AcqRel)
        {
            return Gate::Primary(Some(ProbeTurn(&self.probing)));
        }
        Gate::Skip(StoreError::Unavailable(format!(
            "primary store degraded: {}",
            d.last_error
        )))
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.call_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(
                u64::try_from(self.call_timeout.as_millis()).unwrap_or(u64::MAX),
            )),
        }
    }

    /// Record what a primary call says about its health.
    fn observe<T>(&self, now: Millis, result: &Result<T, StoreError>) {
        let mut health = lock(&self.health);
        match (result, &mut *health) {
            (Ok(_), None) => {}
            (Ok(_), Some(d)) => {
                tracing::info!(degraded_since_ms = d.since_ms, "primary store recovered");
                *health = None;
            }
            (Err(e), None) => {
                tracing::warn!(error = %e, mode = ?self.mode, "primary store failing; degraded");
                *health = Some(Degraded {
                    since_ms: now,
                    last_error: e.to_string(),
                    last_attempt: Instant::now(),
                });
            }
            (Err(e), Some(d)) => {
                d.last_error = e.to_string();
                d.last_attempt = Instant::now();
            }
        }
    }

    /// Call the primary if the gate lets us, recording its health.
    async fn primary<T>(
        &self,
        now: Millis,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match self.gate() {
            Gate::Primary(_probe) => {
                let result = self.bounded(call).await;
                self.observe(now, &result);
                result
            }
            Gate::Skip(e) => Err(e),
        }
    }

    fn defer(&self, now: Millis, settlements: Vec<Settlement>) {
        let dropped = lock(&self.deferred).push_back(now, settlements, self.max_deferred);
        if dropped > 0 {
            self.tallies
                .dropped
                .fetch_add(dropped as u64, Ordering::Relaxed);
            tracing::error!(
                dropped,
                max_deferred = self.max_deferred,
                "deferred settlement queue full; oldest settlements dropped, their tokens not recorded"
            );
        }
    }
}

/// The right to probe a degraded primary; given back when dropped (even if the call
/// is cancelled).
struct ProbeTurn<'a>(&'a AtomicBool);

impl Drop for ProbeTurn<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

enum Gate<'a> {
    Primary(Option<ProbeTurn<'a>>),
    Skip(StoreError),
}

impl Deferred {
    fn pop_front(&mut self) -> Option<(Millis, Vec<Settlement>)> {
        let batch = self.batches.pop_front()?;
        self.len -= batch.1.len();
        Some(batch)
    }

    fn push_front(&mut self, now: Millis, batch: Vec<Settlement>) {
        self.len += batch.len();
        self.batches.push_front((now, batch));
    }

    /// Queue a batch; returns how many of the oldest settlements were dropped to stay
    /// within `max`.
    fn push_back(&mut self, now: Millis, batch: Vec<Settlement>, max: usize) -> usize {
        self.len += batch.len();
        self.batches.push_back((now, batch));
        let mut dropped = 0;
        while self.len > max {
            let Some((_, front)) = self.batches.front_mut() else {
                break;
            };
            let excess = (self.len - max).min(front.len());
            front.drain(..excess);
            self.len -= excess;
            dropped += excess;
            if front.is_empty() {
                self.batches.pop_front();
            }
        }
        dropped
    }
}

/// (reservation, counter) pairs the local store admitted, oldest forgotten first.
/// Entries leave when settled; the queue may hold settled ones until compacted.
#[derive(Debug, Default)]
struct LocalAdmissions {
    live: HashMap<(u64, CounterId), u64>,
    order: VecDeque<(u64, (u64, CounterId))>,
    next: u64,
}

impl LocalAdmissions {
    fn insert(&mut self, reservation: ReservationId, id: &CounterId) {
        let key = (reservation.0, id.clone());
        self.next += 1;
        self.live.insert(key.clone(), self.next);
        self.order.push_back((self.next, key));
        while self.live.len() > LOCAL_ADMISSIONS {
            let Some((seq, key)) = self.order.pop_front() else {
                break;
            };
            if self.live.get(&key) == Some(&seq) {
                self.live.remove(&key);
            }
        }
        if self.order.len() > 2 * LOCAL_ADMISSIONS.max(self.live.len()) {
            let live = &self.live;
            self.order.retain(|(seq, key)| live.get(key) == Some(seq));
        }
    }

    /// Whether the local store admitted it (forgetting it: it is being settled).
    fn take(&mut self, reservation: ReservationId, id: &CounterId) -> bool {
        self.live.remove(&(reservation.0, id.clone())).is_some()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[async_trait]
impl Store for ResilientStore {
    async fn admit(
        &self,
        now: Millis,
        ops: &[CounterOp],
        reservation: ReservationId,
        deadline: Millis,
    ) -> Result<Admission, StoreError> {
        let error = match self
            .primary(now, self.primary.admit(now, ops, reservation, deadline))
            .await
        {
            Ok(admission) => return Ok(admission),
            Err(e) => e,
        };
        match self.mode {
            OnError::FailClosed => Err(error),
            OnError::FailOpen => {
                let admission = self.local.admit_sync(now, ops, reservation, deadline)?;
                self.tallies
                    .local_admissions
                    .fetch_add(1, Ordering::Relaxed);
                if matches!(admission, Admission::Admitted { .. }) {
                    let mut local = lock(&self.local_admissions);
                    for op in ops {
                        local.insert(reservation, &op.id);
                    }
                }
                Ok(admission)
            }
        }
    }

    /// Never fails: what the primary cannot take now is deferred.
    async fn settle(&self, now: Millis, settlements: &[Settlement]) -> Result<(), StoreError> {
        // While the local store has admitted nothing (the primary is healthy, or has been
        // long enough), every settlement is the primary's: no copy, no lookup.
        let remote: Cow<'_, [Settlement]> = {
            let mut admitted_here = lock(&self.local_admissions);
            if admitted_here.live.is_empty() {
                Cow::Borrowed(settlements)
            } else {
                let (local, remote): (Vec<Settlement>, Vec<Settlement>) = settlements
                    .iter()
                    .cloned()
                    .partition(|s| admitted_here.take(s.reservation, &s.op.id));
                drop(admitted_here);
                if !local.is_empty() {
                    self.local.settle_sync(now, &local);
                }
                Cow::Owned(remote)
            }
        };
        if remote.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.primary(now, self.primary.settle(now, &remote)).await {
            tracing::debug!(error = %e, n = remote.len(), "settlement deferred");
            self.defer(now, remote.into_owned());
        }
        Ok(())
    }

    async fn inspect(
        &self,
        now: Millis,
        filter: &InspectFilter,
    ) -> Result<Vec<CounterView>, StoreError> {
        match self.primary(now, self.primary.inspect(now, filter)).await {
            Ok(views) => Ok(views),
            Err(e) => match self.mode {
                OnError::FailClosed => Err(e),
                OnError::FailOpen => Ok(self.local.inspect_sync(now, filter)),
            },
        }
    }

    /// Resets both stores; returns the primary's count (the local one's when the primary
    /// is away and the mode is fail-open).
    async fn reset(&self, id: &CounterId) -> Result<u64, StoreError> {
        let local = self.local.reset_sync(id);
        match self.primary(0, self.primary.reset(id)).await {
            Ok(n) => Ok(n),
            Err(e) => match self.mode {
                OnError::FailClosed => Err(e),
                OnError::FailOpen => Ok(local),
            },
        }
    }

    /// Undoes on whichever store admitted (the local one: the ops it remembers).
    async fn roll_back(
        &self,
        now: Millis,
        ops: &[CounterOp],
        reservation: ReservationId,
    ) -> Result<(), StoreError> {
        let (local, remote): (Vec<CounterOp>, Vec<CounterOp>) = {
            let mut admitted_here = lock(&self.local_admissions);
            // Per counter, once: the same counter may be named twice in one admission.
            let mut here: Vec<&CounterId> = Vec::new();
            for op in ops {
                if admitted_here.take(reservation, &op.id) {
                    here.push(&op.id);
                }
            }
            ops.iter().cloned().partition(|op| here.contains(&&op.id))
        };
        if !local.is_empty() {
            self.local.roll_back_sync(now, &local, reservation);
        }
        if remote.is_empty() {
            return Ok(());
        }
        self.primary(now, self.primary.roll_back(now, &remote, reservation))
            .await
    }

    /// Flushes deferred settlements, then sweeps both stores.
    async fn sweep(&self, now: Millis) -> Result<SweepStats, StoreError> {
        if let Err(e) = self.flush_deferred(now).await {
            tracing::debug!(error = %e, "deferred settlements not flushed yet");
        }
        let mut stats = self.local.sweep_sync(now);
        match self.primary(now, self.primary.sweep(now)).await {
            Ok(primary) => {
                stats.reservations_expired += primary.reservations_expired;
                stats.windows_reclaimed += primary.windows_reclaimed;
                Ok(stats)
            }
            Err(e) => match self.mode {
                OnError::FailClosed => Err(e),
                OnError::FailOpen => Ok(stats),
            },
        }
    }

    fn outstanding_reservations(&self) -> u64 {
        self.primary
            .outstanding_reservations()
            .saturating_add(self.local.outstanding_reservations())
    }
}

impl std::fmt::Debug for ResilientStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResilientStore")
            .field("mode", &self.mode)
            .field("state", &self.state())
            .field("max_deferred", &self.max_deferred)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counter::{CounterKind, Need, Rate};
    use crate::window::Window;

    fn settlement(r: u64) -> Settlement {
        Settlement {
            op: CounterOp {
                id: CounterId::from_encoded("x"),
                kind: CounterKind::Tokens,
                rate: Rate::Fixed {
                    limit: 1,
                    window: Window::aligned(1_000),
                },
                need: Need::Fits,
                commit: 0,
                reserve: 0,
                replica: false,
            },
            window_start: 0,
            reservation: ReservationId(r),
            actual: 1,
        }
    }

    #[test]
    fn deferred_queue_drops_oldest_beyond_its_bound() {
        let mut q = Deferred::default();
        assert_eq!(q.push_back(1, vec![settlement(1), settlement(2)], 3), 0);
        assert_eq!(q.push_back(2, vec![settlement(3), settlement(4)], 3), 1);
        assert_eq!(q.len, 3);
        let (at, first) = q.pop_front().unwrap();
        assert_eq!((at, first.len(), first[0].reservation.0), (1, 1, 2));
        assert_eq!(q.push_back(3, (5..10).map(settlement).collect(), 3), 4);
        let kept: Vec<u64> = q
            .batches
            .iter()
            .flat_map(|(_, b)| b.iter().map(|s| s.reservation.0))
            .collect();
        assert_eq!(kept, vec![7, 8, 9]);
        assert_eq!(q.len, 3);
    }

    #[test]
    fn local_admissions_are_bounded_and_taken_once() {
        let mut local = LocalAdmissions::default();
        let id = CounterId::from_encoded("a");
        for r in 0..(LOCAL_ADMISSIONS as u64 + 10) {
            local.insert(ReservationId(r), &id);
        }
        assert_eq!(local.live.len(), LOCAL_ADMISSIONS);
        assert!(!local.take(ReservationId(0), &id));
        assert!(local.take(ReservationId(LOCAL_ADMISSIONS as u64), &id));
        assert!(!local.take(ReservationId(LOCAL_ADMISSIONS as u64), &id));
        assert!(local.order.len() <= 2 * LOCAL_ADMISSIONS);
    }
}
