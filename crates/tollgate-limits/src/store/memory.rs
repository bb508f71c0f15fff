//! In-memory store: one process, exact, no network.
//!
//! Layout: a fixed array of [`SHARDS`] `Mutex<HashMap<CounterId, Entry>>`, the shard
//! chosen by a keyed hash of the id (keyed so a client choosing user ids cannot pile
//! every counter into one shard).
//!
//! Why plain mutex shards and not `DashMap`: an admission touches 1–6 counters and must
//! check all before taking any. With our own shards, `admit` locks the shards involved
//! in ascending index order (deduplicated), checks every op, applies every op, then
//! unlocks. Every thread takes locks in the same global order, so there is no deadlock,
//! no global lock, and no rollback. DashMap hides its shards (only the unstable
//! `raw-api` exposes them). The std mutex is a futex, uncontended in the common case
//! (64 shards, 2–8 cores); poisoning is recovered with `into_inner`. We never panic
//! while holding a lock, and every update keeps the state consistent.
//!
//! Time is only ever the `now` argument. Nothing runs in the background:
//! - reservations expire lazily when an admission, settlement or inspection touches their
//!   counter, and in bulk in [`MemoryStore::sweep_sync`];
//! - fixed windows are kept until `end + settle_grace_ms`, so late settlements still land
//!   in the window they were admitted in; after that they are reclaimed and a settlement
//!   for them is dropped and counted ([`MemoryStats::settlements_dropped`]);
//! - token buckets keep no timer: the deficit is refilled from `now` when touched. The
//!   math is exact integer arithmetic in units of `1/per_ms` token, so there is no drift
//!   (`limit` per `per_ms` is exactly `limit` tokens after `per_ms`, and never a fraction
//!   more). The deficit saturates at `u64::MAX` scaled units (≈ 2·10¹¹ tokens for a
//!   one-day bucket), far beyond any real debt.
//!
//! Gauges and stats are `AtomicU64` with `Relaxed` ordering: they are only ever changed
//! under the shard lock that guards the state they count, so they are exact; no other
//! memory is published through them, so no stronger ordering is needed.
//!
//! Memory: ~280 bytes per live one-window counter by [`MemoryStore::stats`]'s estimate,
//! ~350 bytes of RSS measured with a million counters (`benches/admit.rs`);
//! `sweep_sync` removes idle counters and shrinks shards that emptied out, so millions of
//! one-off users do not accumulate.
//!
//! A reservation (`hold`) is one counter's share of one request's reservation. The
//! outstanding-reservations gauge counts holds, so a request reserving on three counters
//! counts three. Holds of zero are never stored; neither are holds whose deadline is not
//! after `now` (they would already be expired).

use std::collections::hash_map::{Entry as MapEntry, HashMap, RandomState};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

use super::{
    Admission, CounterSnapshot, CounterView, InspectFilter, Refusal, ReservationId, Settlement,
    Store, StoreError, SweepStats,
};
use crate::counter::{CounterId, CounterKind, CounterOp, Need, Rate};
use crate::time::Millis;
use crate::window::Window;

/// Number of shards. A power of two well above the core count keeps two admissions on
/// different counters from meeting on a lock; more only costs empty hash maps.
pub const SHARDS: usize = 64;

type Shard = HashMap<CounterId, Entry>;

pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    /// Keyed per process: chooses the shard (the maps use their own keyed hasher).
    hasher: RandomState,
    settle_grace_ms: u64,
    tallies: Tallies,
}

#[derive(Debug, Default)]
struct Tallies {
    /// Holds currently stored (the outstanding-reservations gauge).
    outstanding: AtomicU64,
    /// Holds released by their deadline (lazily or by sweep), since start.
    expired: AtomicU64,
    /// Settlements whose window was already reclaimed, and the units they carried.
    settlements_dropped: AtomicU64,
    units_dropped: AtomicU64,
}

/// Counts and an estimate of the memory in use, for metrics and capacity planning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Counters (distinct ids) held.
    pub counters: u64,
    /// Fixed windows held (current and in grace).
    pub windows: u64,
    /// Reservations held (same as `outstanding_reservations`).
    pub outstanding_reservations: u64,
    pub reservations_expired: u64,
    /// Settlements that arrived after their window was reclaimed; their cost was lost.
    pub settlements_dropped: u64,
    pub units_dropped: u64,
    /// Estimated heap bytes: hash-table slots at capacity plus each entry's own
    /// allocations (id string, windows, holds). Excludes allocator overhead.
    pub approx_bytes: u64,
}

impl MemoryStore {
    /// `settle_grace_ms`: how long after a fixed window ends it is kept so that late
    /// settlements (streams that outlive the window) still land in it. Make it at least
    /// the longest call the gateway allows.
    pub fn new(settle_grace_ms: u64) -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::new(Shard::new())).collect();
        Self {
            shards,
            hasher: RandomState::new(),
            settle_grace_ms,
            tallies: Tallies::default(),
        }
    }

    pub fn settle_grace_ms(&self) -> u64 {
        self.settle_grace_ms
    }

    /// [`Store::admit`] without the future: the memory store never waits.
    pub fn admit_sync(
        &self,
        now: Millis,
        ops: &[CounterOp],
        reservation: ReservationId,
        deadline: Millis,
    ) -> Result<Admission, StoreError> {
        self.decide(now, ops, Some((reservation, deadline)))
    }

    /// What [`Self::admit_sync`] would answer at `now`, taking nothing (the split store
    /// reads its local counters this way when the shared side already refused).
    pub fn check_sync(&self, now: Millis, ops: &[CounterOp]) -> Result<Admission, StoreError> {
        self.decide(now, ops, None)
    }

    /// [`Store::roll_back`] without the future.
    pub fn roll_back_sync(&self, now: Millis, ops: &[CounterOp], reservation: ReservationId) {
        let grace = self.settle_grace_ms;
        for op in ops {
            let mut guard = self.lock(self.shard_index(&op.id));
            if let Some(entry) = guard.as_deref_mut().and_then(|map| map.get_mut(&op.id)) {
                entry.advance(now, grace, &self.tallies);
                entry.release(reservation, &self.tallies);
                entry.untake(now, op);
            }
        }
    }

    /// Check every op; with `take`, apply them all when all pass.
    fn decide(
        &self,
        now: Millis,
        ops: &[CounterOp],
        take: Option<(ReservationId, Millis)>,
    ) -> Result<Admission, StoreError> {
        let op_shards: Vec<usize> = ops.iter().map(|op| self.shard_index(&op.id)).collect();
        let mut guards = self.lock_in_order(&op_shards);
        let grace = self.settle_grace_ms;

        // Phase 1: bring every involved counter up to `now` and check it. Expiring due
        // reservations and refilling buckets here is not a change of accounting: it is
        // what any reader at `now` would see.
        let mut snapshots = Vec::with_capacity(ops.len());
        let mut blocking = Vec::new();
        let mut retry: Option<Option<u64>> = None;
        for (k, (op, shard)) in ops.iter().zip(&op_shards).enumerate() {
            let map = find_guard(&mut guards, *shard)?;
            // Earlier ops of this same request on the same counter count as taken.
            let earlier: u64 = ops
                .iter()
                .take(k)
                .filter(|o| o.id == op.id)
                .fold(0, |acc, o| {
                    acc.saturating_add(o.commit.saturating_add(o.reserve))
                });
            let (snapshot, verdict) = match map.get_mut(&op.id) {
                Some(entry) => {
                    entry.advance(now, grace, &self.tallies);
                    entry.adopt(op, &self.tallies);
                    let snapshot = entry.snapshot(now, &op.rate);
                    (snapshot, entry.check(now, op, &snapshot, earlier))
                }
                None => {
                    let fresh = Entry::new(op);
                    let snapshot = fresh.snapshot(now, &op.rate);
                    (snapshot, fresh.check(now, op, &snapshot, earlier))
                }
            };
            snapshots.push(snapshot);
            if let Verdict::Refuse { retry_after_ms } = verdict {
                blocking.push(k);
                // The request can pass once *every* blocking counter can: the maximum
                // wait, and never if any counter never will.
                retry = Some(match (retry, retry_after_ms) {
                    (None, r) => r,
                    (Some(Some(a)), Some(b)) => Some(a.max(b)),
                    (Some(_), _) => None,
                });
            }
        }
        if !blocking.is_empty() {
            return Ok(Admission::Refused(Refusal {
                snapshots,
                blocking,
                retry_after_ms: retry.flatten(),
            }));
        }

        let Some((reservation, deadline)) = take else {
            return Ok(Admission::Admitted { snapshots });
        };
        // Phase 2: everything passed; take it all under the same locks.
        for (op, shard) in ops.iter().zip(&op_shards) {
            let map = find_guard(&mut guards, *shard)?;
            let entry = match map.entry(op.id.clone()) {
                MapEntry::Occupied(e) => e.into_mut(),
                MapEntry::Vacant(v) => v.insert(Entry::new(op)),
            };
            entry.take(now, op, reservation, deadline, &self.tallies);
        }
        Ok(Admission::Admitted { snapshots })
    }

    /// [`Store::settle`] without the future. Returns how many settlements were dropped
    /// because their window had already been reclaimed (also counted in [`Self::stats`]).
    pub fn settle_sync(&self, now: Millis, settlements: &[Settlement]) -> u64 {
        let grace = self.settle_grace_ms;
        let mut dropped = 0;
        for s in settlements {
            let mut map = self.lock(self.shard_index(&s.op.id));
            let Some(map) = map.as_deref_mut() else {
                continue;
            };
            let charged = match map.get_mut(&s.op.id) {
                Some(entry) => {
                    entry.advance(now, grace, &self.tallies);
                    entry.release(s.reservation, &self.tallies);
                    entry.charge(now, grace, s)
                }
                None => match Entry::for_late_charge(now, grace, s) {
                    Some(Some(entry)) => {
                        map.insert(s.op.id.clone(), entry);
                        Charged::Yes
                    }
                    Some(None) => Charged::Yes,
                    None => Charged::WindowGone,
                },
            };
            if charged == Charged::WindowGone {
                dropped += 1;
                self.tallies
                    .settlements_dropped
                    .fetch_add(1, Ordering::Relaxed);
                self.tallies
                    .units_dropped
                    .fetch_add(s.actual, Ordering::Relaxed);
            }
        }
        dropped
    }

    /// [`Store::sweep`] without the future. Holds each shard's lock while it walks that
    /// shard (~1/64 of the counters), never more than one lock at a time.
    pub fn sweep_sync(&self, now: Millis) -> SweepStats {
        let grace = self.settle_grace_ms;
        let mut stats = SweepStats::default();
        for i in 0..self.shards.len() {
            let mut guard = self.lock(i);
            let Some(map) = guard.as_deref_mut() else {
                continue;
            };
            map.retain(|_, entry| {
                let advanced = entry.advance(now, grace, &self.tallies);
                stats.windows_reclaimed += advanced.windows_reclaimed;
                stats.reservations_expired += advanced.holds_expired;
                if entry.is_idle() {
                    // Buckets and concurrency counters have no window; count the counter.
                    if !matches!(entry.meter, Meter::Fixed { .. }) {
                        stats.windows_reclaimed += 1;
                    }
                    false
                } else {
                    true
                }
            });
            // Give memory back after a wave of one-off users has gone.
            if map.capacity() > 64 && map.len() < map.capacity() / 4 {
                map.shrink_to(map.len() * 2);
            }
        }
        stats
    }

    /// [`Store::inspect`] without the future, sorted by id then window start.
    pub fn inspect_sync(&self, now: Millis, filter: &InspectFilter) -> Vec<CounterView> {
        let grace = self.settle_grace_ms;
        let mut views = Vec::new();
        for i in 0..self.shards.len() {
            let mut guard = self.lock(i);
            let Some(map) = guard.as_deref_mut() else {
                continue;
            };
            for (id, entry) in map.iter_mut() {
                if let Some(prefix) = &filter.prefix {
                    if !id.as_str().starts_with(prefix.as_str()) {
                        continue;
                    }
                }
                entry.advance(now, grace, &self.tallies);
                entry.views(now, id, &mut views);
            }
        }
        views.sort_by(|a, b| (&a.id, a.window_start).cmp(&(&b.id, b.window_start)));
        views
    }

    /// [`Store::reset`] without the future.
    pub fn reset_sync(&self, id: &CounterId) -> u64 {
        let mut guard = self.lock(self.shard_index(id));
        let Some(entry) = guard.as_deref_mut().and_then(|map| map.remove(id)) else {
            return 0;
        };
        self.tallies
            .outstanding
            .fetch_sub(entry.holds.len() as u64, Ordering::Relaxed);
        match &entry.meter {
            Meter::Fixed { windows, .. } => windows.len() as u64,
            Meter::Bucket(_) | Meter::Concurrency { .. } => 1,
        }
    }

    pub fn stats(&self) -> MemoryStats {
        let mut stats = MemoryStats {
            outstanding_reservations: self.tallies.outstanding.load(Ordering::Relaxed),
            reservations_expired: self.tallies.expired.load(Ordering::Relaxed),
            settlements_dropped: self.tallies.settlements_dropped.load(Ordering::Relaxed),
            units_dropped: self.tallies.units_dropped.load(Ordering::Relaxed),
            ..MemoryStats::default()
        };
        let slot = (std::mem::size_of::<(CounterId, Entry)>() + 1) as u64;
        for i in 0..self.shards.len() {
            let guard = self.lock(i);
            let Some(map) = guard.as_deref() else {
                continue;
            };
            stats.counters += map.len() as u64;
            stats.approx_bytes += map.capacity() as u64 * slot;
            for (id, entry) in map {
                // Arc<str>: two reference counts plus the bytes.
                stats.approx_bytes += 16 + id.as_str().len() as u64 + entry.heap_bytes();
                if let Meter::Fixed { windows, .. } = &entry.meter {
                    stats.windows += windows.len() as u64;
                }
            }
        }
        stats
    }

    fn shard_index(&self, id: &CounterId) -> usize {
        // High bits: the maps inside use the low bits of their own hash for buckets.
        (self.hasher.hash_one(id) >> 32) as usize % self.shards.len().max(1)
    }

    /// `None` only if `i` is out of range, which `shard_index` rules out.
    fn lock(&self, i: usize) -> Option<MutexGuard<'_, Shard>> {
        self.shards
            .get(i)
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Lock each distinct shard once, in ascending index order: the global lock order
    /// that makes multi-counter admission deadlock-free.
    fn lock_in_order(&self, op_shards: &[usize]) -> Vec<(usize, MutexGuard<'_, Shard>)> {
        let mut order = op_shards.to_vec();
        order.sort_unstable();
        order.dedup();
        order
            .into_iter()
            .filter_map(|i| self.lock(i).map(|g| (i, g)))
            .collect()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.shards.len())
            .field("settle_grace_ms", &self.settle_grace_ms)
            .field("tallies", &self.tallies)
            .finish_non_exhaustive()
    }
}

fn find_guard<'a, 'g>(
    guards: &'a mut [(usize, MutexGuard<'g, Shard>)],
    shard: usize,
) -> Result<&'a mut Shard, StoreError> {
    guards
        .iter_mut()
        .find(|(i, _)| *i == shard)
        .map(|(_, g)| &mut **g)
        .ok_or_else(|| StoreError::Unavailable("memory store: shard lock missing".into()))
}

#[async_trait]
impl Store for MemoryStore {
    async fn admit(
        &self,
        now: Millis,
        ops: &[CounterOp],
        reservation: ReservationId,
        deadline: Millis,
    ) -> Result<Admission, StoreError> {
        self.admit_sync(now, ops, reservation, deadline)
    }

    async fn settle(&self, now: Millis, settlements: &[Settlement]) -> Result<(), StoreError> {
        self.settle_sync(now, settlements);
        Ok(())
    }

    async fn inspect(
        &self,
        now: Millis,
        filter: &InspectFilter,
    ) -> Result<Vec<CounterView>, StoreError> {
        Ok(self.inspect_sync(now, filter))
    }

    async fn reset(&self, id: &CounterId) -> Result<u64, StoreError> {
        Ok(self.reset_sync(id))
    }

    async fn sweep(&self, now: Millis) -> Result<SweepStats, StoreError> {
        Ok(self.sweep_sync(now))
    }

    async fn roll_back(
        &self,
        now: Millis,
        ops: &[CounterOp],
        reservation: ReservationId,
    ) -> Result<(), StoreError> {
        self.roll_back_sync(now, ops, reservation);
        Ok(())
    }

    fn outstanding_reservations(&self) -> u64 {
        self.tallies.outstanding.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------------
// One counter.

/// One counter: how it refills, and the reservations it holds.
#[derive(Debug)]
struct Entry {
    kind: CounterKind,
    meter: Meter,
    /// Usually 0–2 (one per request in flight on this counter). Linear scans are cheaper
    /// than a map at that size and cost nothing when empty; a shared counter with
    /// thousands in flight pays O(n) per settlement under its shard lock.
    holds: Vec<Hold>,
    /// Earliest deadline among `holds` (`Millis::MAX` when none), so admissions skip the
    /// expiry scan until something is actually due.
    next_deadline: Millis,
}

#[derive(Debug, Clone, Copy)]
struct Hold {
    id: ReservationId,
    /// The fixed window the hold counts against (0 for buckets and concurrency).
    window_start: Millis,
    amount: u64,
    deadline: Millis,
}

#[derive(Debug)]
enum Meter {
    Fixed {
        limit: u64,
        len_ms: u64,
        /// Sorted by start; the current window and those still in their grace.
        windows: Vec<Slot>,
    },
    Bucket(Bucket),
    /// In-flight calls: nothing is spent, only held.
    Concurrency {
        limit: u64,
        reserved: u64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    start: Millis,
    end: Millis,
    value: u64,
    reserved: u64,
}

/// Token bucket kept as a deficit: `deficit / per_ms` tokens are missing from a full
/// bucket, and `limit` scaled units come back per elapsed millisecond. A token is
/// available only once entirely refilled (`value = ceil(deficit / per_ms)`).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    limit: u64,
    per_ms: u64,
    burst: u64,
    deficit: u64,
    /// When `deficit` was last refilled. Never moves backwards, so an admission that
    /// read the clock a little earlier than the previous one refills nothing.
    at: Millis,
    reserved: u64,
}

impl Bucket {
    fn capacity(&self) -> u64 {
        self.limit.saturating_add(self.burst)
    }

    fn refill(&mut self, now: Millis) {
        if now > self.at {
            let back = (now - self.at).saturating_mul(self.limit);
            self.deficit = self.deficit.saturating_sub(back);
            self.at = now;
        }
    }

    /// Tokens missing from a full bucket, rounded up.
    fn spent(&self) -> u64 {
        self.deficit.div_ceil(self.per_ms)
    }

    fn consume(&mut self, tokens: u64) {
        self.deficit = self
            .deficit
            .saturating_add(tokens.saturating_mul(self.per_ms));
    }

    /// Give back what `consume` took (a rolled-back admission).
    fn refund(&mut self, tokens: u64) {
        self.deficit = self
            .deficit
            .saturating_sub(tokens.saturating_mul(self.per_ms));
    }

    /// Milliseconds until at most `tokens` are missing (`None`: it never refills).
    fn wait_until_spent_at_most(&self, tokens: u64) -> Option<u64> {
        let target = tokens.saturating_mul(self.per_ms);
        if self.deficit <= target {
            return Some(0);
        }
        if self.limit == 0 {
            return None;
        }
        Some((self.deficit - target).div_ceil(self.limit))
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Advanced {
    windows_reclaimed: u64,
    holds_expired: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Refuse { retry_after_ms: Option<u64> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Charged {
    Yes,
    WindowGone,
}

impl Meter {
    fn new(rate: &Rate, now: Millis) -> Self {
        match *rate {
            Rate::Fixed { limit, window } => Meter::Fixed {
                limit,
                len_ms: window.len_ms.max(1),
                windows: Vec::new(),
            },
            Rate::Bucket {
                limit,
                per_ms,
                burst,
            } => Meter::Bucket(Bucket {
                limit,
                per_ms: per_ms.max(1),
                burst,
                deficit: 0,
                at: now,
                reserved: 0,
            }),
            Rate::Concurrency { limit } => Meter::Concurrency { limit, reserved: 0 },
        }
    }
}

impl Entry {
    fn new(op: &CounterOp) -> Self {
        Entry {
            kind: op.kind,
            // `at = 0`: a fresh bucket is full whatever the time, so refill is a no-op.
            meter: Meter::new(&op.rate, 0),
            holds: Vec::new(),
            next_deadline: Millis::MAX,
        }
    }

    /// An entry for a settlement whose counter is gone (reclaimed, reset, or another
    /// replica admitted it). `None`: the window is past its grace, drop the charge.
    /// `Some(None)`: nothing to record.
    fn for_late_charge(now: Millis, grace: u64, s: &Settlement) -> Option<Option<Entry>> {
        if s.actual == 0 {
            return Some(None);
        }
        let mut entry = Entry::new(&s.op);
        match entry.charge(now, grace, s) {
            Charged::Yes => Some(Some(entry)),
            Charged::WindowGone => None,
        }
    }

    /// Bring the counter up to `now`: release holds past their deadline, reclaim windows
    /// past their grace (with any holds still in them), refill the bucket.
    fn advance(&mut self, now: Millis, grace: u64, tallies: &Tallies) -> Advanced {
        let mut advanced = Advanced::default();
        if now >= self.next_deadline {
            let mut next = Millis::MAX;
            let mut i = 0;
            while let Some(hold) = self.holds.get(i).copied() {
                if hold.deadline <= now {
                    self.holds.swap_remove(i);
                    self.meter.unreserve(&hold);
                    tallies.outstanding.fetch_sub(1, Ordering::Relaxed);
                    tallies.expired.fetch_add(1, Ordering::Relaxed);
                    advanced.holds_expired += 1;
                } else {
                    next = next.min(hold.deadline);
                    i += 1;
                }
            }
            self.next_deadline = next;
        }
        match &mut self.meter {
            Meter::Fixed { windows, .. } => {
                let before = windows.len();
                windows.retain(|w| w.end.saturating_add(grace) > now);
                let reclaimed = before - windows.len();
                if reclaimed > 0 && !self.holds.is_empty() {
                    // A hold outliving its window's grace: the window is gone, so is it.
                    let kept = &*windows;
                    let before = self.holds.len();
                    self.holds
                        .retain(|h| kept.iter().any(|w| w.start == h.window_start));
                    let gone = (before - self.holds.len()) as u64;
                    tallies.outstanding.fetch_sub(gone, Ordering::Relaxed);
                    tallies.expired.fetch_add(gone, Ordering::Relaxed);
                    advanced.holds_expired += gone;
                    self.next_deadline = self
                        .holds
                        .iter()
                        .map(|h| h.deadline)
                        .min()
                        .unwrap_or(Millis::MAX);
                }
                advanced.windows_reclaimed = reclaimed as u64;
            }
            Meter::Bucket(b) => b.refill(now),
            Meter::Concurrency { .. } => {}
        }
        advanced
    }

    /// Apply this admission's rate: the limit is not part of identity, so a new limit
    /// applies to the existing spend. A different kind of rate for the same id (a config
    /// change from window to bucket, say) starts the counter afresh.
    fn adopt(&mut self, op: &CounterOp, tallies: &Tallies) {
        self.kind = op.kind;
        match (&mut self.meter, op.rate) {
            (Meter::Fixed { limit, len_ms, .. }, Rate::Fixed { limit: l, window }) => {
                *limit = l;
                *len_ms = window.len_ms.max(1);
            }
            (
                Meter::Bucket(b),
                Rate::Bucket {
                    limit,
                    per_ms,
                    burst,
                },
            ) => {
                let per_ms = per_ms.max(1);
                if per_ms != b.per_ms {
                    // Same tokens missing, in the new unit (rounded up: never a gift).
                    let tokens = u128::from(b.deficit) * u128::from(per_ms);
                    let rescaled = tokens.div_ceil(u128::from(b.per_ms));
                    b.deficit = u64::try_from(rescaled).unwrap_or(u64::MAX);
                    b.per_ms = per_ms;
                }
                b.limit = limit;
                b.burst = burst;
            }
            (Meter::Concurrency { limit, .. }, Rate::Concurrency { limit: l }) => *limit = l,
            (_, rate) => {
                tallies
                    .outstanding
                    .fetch_sub(self.holds.len() as u64, Ordering::Relaxed);
                self.holds.clear();
                self.next_deadline = Millis::MAX;
                self.meter = Meter::new(&rate, 0);
            }
        }
    }

    /// The counter as this op sees it at `now` (call `advance` and `adopt` first).
    fn snapshot(&self, now: Millis, rate: &Rate) -> CounterSnapshot {
        match &self.meter {
            Meter::Fixed { limit, windows, .. } => {
                let window = match *rate {
                    Rate::Fixed { window, .. } => window,
                    // Unreachable after `adopt`; a plain window keeps it total.
                    _ => Window::aligned(1),
                };
                let start = window.start(now);
                let (value, reserved) = windows
                    .iter()
                    .find(|w| w.start == start)
                    .map_or((0, 0), |w| (w.value, w.reserved));
                CounterSnapshot {
                    limit: *limit,
                    value,
                    reserved,
                    window_start: start,
                    reset_at: window.end(now),
                }
            }
            Meter::Bucket(b) => CounterSnapshot {
                limit: b.capacity(),
                value: b.spent(),
                reserved: b.reserved,
                window_start: 0,
                reset_at: b
                    .wait_until_spent_at_most(0)
                    .map_or(Millis::MAX, |wait| now.saturating_add(wait)),
            },
            Meter::Concurrency { limit, reserved } => CounterSnapshot {
                limit: *limit,
                value: 0,
                reserved: *reserved,
                window_start: 0,
                reset_at: now,
            },
        }
    }

    /// Does `op` pass, given `earlier` units taken on this counter by earlier ops of the
    /// same request? If not, how long until it could.
    fn check(&self, now: Millis, op: &CounterOp, snap: &CounterSnapshot, earlier: u64) -> Verdict {
        let limit = snap.limit;
        let used = snap
            .value
            .saturating_add(snap.reserved)
            .saturating_add(earlier);
        let need = op.commit.saturating_add(op.reserve);
        let passes = match op.need {
            Need::Room => used < limit,
            Need::Fits => used.saturating_add(need) <= limit,
        };
        if passes {
            return Verdict::Pass;
        }
        // What must be free, on an otherwise empty counter, for this op to pass.
        let alone = match op.need {
            Need::Room => 1,
            Need::Fits => need,
        };
        let retry_after_ms = if alone.saturating_add(earlier) > limit {
            None
        } else {
            match &self.meter {
                // A new window starts empty, and this window's holds stay in it.
                Meter::Fixed { .. } => Some(snap.reset_at.saturating_sub(now)),
                Meter::Bucket(b) => {
                    let free_needed = snap.reserved.saturating_add(earlier).saturating_add(alone);
                    match limit.checked_sub(free_needed) {
                        // Refill alone gets there.
                        Some(spent_allowed) => b.wait_until_spent_at_most(spent_allowed),
                        // Reservations must go first: the soonest deadline is a bound.
                        None => self.soonest_release(now),
                    }
                }
                Meter::Concurrency { .. } => self.soonest_release(now),
            }
        };
        Verdict::Refuse {
            retry_after_ms: retry_after_ms.map(|ms| ms.max(1)),
        }
    }

    fn soonest_release(&self, now: Millis) -> Option<u64> {
        (self.next_deadline != Millis::MAX).then(|| self.next_deadline.saturating_sub(now))
    }

    /// Take `op` (it passed `check` under the same lock).
    fn take(
        &mut self,
        now: Millis,
        op: &CounterOp,
        reservation: ReservationId,
        deadline: Millis,
        tallies: &Tallies,
    ) {
        let (window_start, hold) = match (&mut self.meter, op.rate) {
            (Meter::Fixed { windows, .. }, Rate::Fixed { window, .. }) => {
                let start = window.start(now);
                with_slot(windows, start, window.end(now), |slot| {
                    slot.value = slot.value.saturating_add(op.commit);
                    if op.reserve > 0 && deadline > now {
                        slot.reserved = slot.reserved.saturating_add(op.reserve);
                    }
                });
                (start, op.reserve)
            }
            (Meter::Bucket(b), _) => {
                // A fresh bucket starts at time 0 and full: this only moves its clock.
                b.refill(now);
                b.consume(op.commit);
                if op.reserve > 0 && deadline > now {
                    b.reserved = b.reserved.saturating_add(op.reserve);
                }
                (0, op.reserve)
            }
            (Meter::Concurrency { reserved, .. }, _) => {
                // No window to spend in: a commit is held like the reservation.
                let amount = op.commit.saturating_add(op.reserve);
                if amount > 0 && deadline > now {
                    *reserved = reserved.saturating_add(amount);
                }
                (0, amount)
            }
            // `adopt` made the meter match the rate; nothing sensible to take otherwise.
            (Meter::Fixed { .. }, _) => return,
        };
        if hold == 0 || deadline <= now {
            return;
        }
        if let Some(h) = self
            .holds
            .iter_mut()
            .find(|h| h.id == reservation && h.window_start == window_start)
        {
            // The same request named this counter twice: one hold, settled once.
            h.amount = h.amount.saturating_add(hold);
            h.deadline = h.deadline.max(deadline);
        } else {
            self.holds.push(Hold {
                id: reservation,
                window_start,
                amount: hold,
                deadline,
            });
            tallies.outstanding.fetch_add(1, Ordering::Relaxed);
        }
        self.next_deadline = self.next_deadline.min(deadline);
    }

    /// Take back what `take` added to the value at `now` (the commit): the hold is
    /// released separately. A concurrency counter's commit was held, not spent.
    fn untake(&mut self, now: Millis, op: &CounterOp) {
        if op.commit == 0 {
            return;
        }
        match (&mut self.meter, op.rate) {
            (Meter::Fixed { windows, .. }, Rate::Fixed { window, .. }) => {
                let start = window.start(now);
                if let Some(w) = windows.iter_mut().find(|w| w.start == start) {
                    w.value = w.value.saturating_sub(op.commit);
                }
            }
            (Meter::Bucket(b), _) => b.refund(op.commit),
            _ => {}
        }
    }

    /// Release this request's hold, if it is still there.
    fn release(&mut self, reservation: ReservationId, tallies: &Tallies) {
        if let Some(i) = self.holds.iter().position(|h| h.id == reservation) {
            let hold = self.holds.swap_remove(i);
            self.meter.unreserve(&hold);
            tallies.outstanding.fetch_sub(1, Ordering::Relaxed);
            if hold.deadline == self.next_deadline {
                self.next_deadline = self
                    .holds
                    .iter()
                    .map(|h| h.deadline)
                    .min()
                    .unwrap_or(Millis::MAX);
            }
        }
    }

    /// Add the real cost to the window the request was admitted in.
    fn charge(&mut self, now: Millis, grace: u64, s: &Settlement) -> Charged {
        if s.actual == 0 {
            return Charged::Yes;
        }
        match &mut self.meter {
            Meter::Fixed {
                len_ms, windows, ..
            } => {
                if let Some(w) = windows.iter_mut().find(|w| w.start == s.window_start) {
                    w.value = w.value.saturating_add(s.actual);
                    return Charged::Yes;
                }
                let end = match s.op.rate {
                    Rate::Fixed { window, .. } => window.end(s.window_start),
                    _ => s.window_start.saturating_add(*len_ms),
                };
                if end.saturating_add(grace) <= now {
                    return Charged::WindowGone;
                }
                with_slot(windows, s.window_start, end, |slot| {
                    slot.value = slot.value.saturating_add(s.actual);
                });
                Charged::Yes
            }
            Meter::Bucket(b) => {
                b.refill(now);
                b.consume(s.actual);
                Charged::Yes
            }
            // Nothing is spent on an in-flight counter; releasing the hold was all.
            Meter::Concurrency { .. } => Charged::Yes,
        }
    }

    /// Nothing held and nothing that a fresh counter would not have.
    fn is_idle(&self) -> bool {
        self.holds.is_empty()
            && match &self.meter {
                Meter::Fixed { windows, .. } => windows.is_empty(),
                Meter::Bucket(b) => b.deficit == 0,
                Meter::Concurrency { .. } => true,
            }
    }

    fn views(&self, now: Millis, id: &CounterId, out: &mut Vec<CounterView>) {
        let view =
            |limit: u64, value: u64, reserved: u64, window_start: Millis, reset_at: Millis| {
                CounterView {
                    id: id.as_str().to_owned(),
                    kind: self.kind,
                    limit,
                    value,
                    reserved,
                    remaining: limit.saturating_sub(value.saturating_add(reserved)),
                    window_start,
                    reset_at,
                }
            };
        match &self.meter {
            Meter::Fixed { limit, windows, .. } => {
                for w in windows {
                    out.push(view(*limit, w.value, w.reserved, w.start, w.end));
                }
            }
            Meter::Bucket(b) => {
                let reset_at = b
                    .wait_until_spent_at_most(0)
                    .map_or(Millis::MAX, |wait| now.saturating_add(wait));
                out.push(view(b.capacity(), b.spent(), b.reserved, 0, reset_at));
            }
            Meter::Concurrency { limit, reserved } => {
                out.push(view(*limit, 0, *reserved, 0, now));
            }
        }
    }

    fn heap_bytes(&self) -> u64 {
        let windows = match &self.meter {
            Meter::Fixed { windows, .. } => windows.capacity() * std::mem::size_of::<Slot>(),
            Meter::Bucket(_) | Meter::Concurrency { .. } => 0,
        };
        (windows + self.holds.capacity() * std::mem::size_of::<Hold>()) as u64
    }
}

impl Meter {
    fn unreserve(&mut self, hold: &Hold) {
        match self {
            Meter::Fixed { windows, .. } => {
                if let Some(w) = windows.iter_mut().find(|w| w.start == hold.window_start) {
                    w.reserved = w.reserved.saturating_sub(hold.amount);
                }
            }
            Meter::Bucket(b) => b.reserved = b.reserved.saturating_sub(hold.amount),
            Meter::Concurrency { reserved, .. } => {
                *reserved = reserved.saturating_sub(hold.amount);
            }
        }
    }
}

/// Run `f` on the slot for `start`, inserting it in order if missing.
fn with_slot(windows: &mut Vec<Slot>, start: Millis, end: Millis, f: impl FnOnce(&mut Slot)) {
    match windows.binary_search_by_key(&start, |w| w.start) {
        Ok(i) => {
            if let Some(slot) = windows.get_mut(i) {
                f(slot);
            }
        }
        Err(i) => {
            let mut slot = Slot {
                start,
                end,
                value: 0,
                reserved: 0,
            };
            f(&mut slot);
            // Most counters only ever hold one window: don't let `Vec` round up to 4.
            windows.reserve_exact(1);
            // `i <= len` by `binary_search`'s contract, so `insert` cannot panic.
            windows.insert(i, slot);
        }
    }
}
