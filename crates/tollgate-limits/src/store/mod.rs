//! The store: where counters live. Memory and Redis implement the same [`Store`] trait,
//! and one test suite (`store::suite`) runs against every implementation.
//! [`resilient::ResilientStore`] wraps Redis with a local memory fallback;
//! [`split::SplitStore`] keeps `scope: replica` counters in process beside a shared store.
//!
//! Contract:
//! - `admit` checks every op and, only if all pass, applies them all (commit added to the
//!   value, reserve held under the request's [`ReservationId`] until `deadline`). A refused
//!   admission changes nothing. Snapshots are taken *before* this call's own charge.
//! - `settle` releases the reservation (if still held) and adds the real cost to the
//!   window the request was admitted in (`window_start`), even if that window has ended.
//! - Reservations not settled by their deadline are released by `sweep` (and lazily by
//!   admissions), so they never leak.
//! - Ended windows are kept for a settlement grace, then reclaimed by `sweep`. A
//!   settlement for a window already reclaimed is dropped (the memory store counts it).
//!
//! Details every store keeps (the suite checks them):
//! - `Need::Room` passes while `value + reserved < limit`; `Need::Fits` while
//!   `value + reserved + commit + reserve <= limit`. The limit is not part of identity:
//!   the limit of the latest admission applies to the spend already there.
//! - The same counter named twice in one request is checked with the first op's charge
//!   already counted.
//! - Buckets and concurrency counters have no window: `window_start` is 0. A bucket's
//!   `value` is what is missing from a full bucket; settling charges tokens (it may go
//!   into debt). A concurrency counter spends nothing: `commit` is held like `reserve`,
//!   and `actual` is ignored on settlement.
//! - Reservations of 0, or with a deadline not after `now`, are not held. The gauge counts
//!   holds per counter: a request reserving on three counters counts three.
//! - `retry_after_ms` is at least 1; for a fixed window it is the window's end, for a
//!   bucket the refill time, for a concurrency counter (or a bucket whose reservations
//!   hold the room) the soonest reservation deadline — an upper bound.

pub mod memory;
pub mod redis;
pub mod resilient;
pub mod split;
#[cfg(any(test, feature = "test-suite"))]
pub mod suite;

use async_trait::async_trait;
use serde::Serialize;

use crate::counter::{CounterId, CounterKind, CounterOp};
use crate::time::Millis;

/// Identifies one request's reservations across all its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReservationId(pub u64);

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store timed out after {0} ms")]
    Timeout(u64),
    #[error("store protocol error: {0}")]
    Protocol(String),
}

/// A counter's state as seen at admission, before this request's own charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CounterSnapshot {
    /// The ceiling (limit, or limit + burst for buckets).
    pub limit: u64,
    /// Spent in this window (for buckets: capacity minus available tokens).
    pub value: u64,
    /// Held by outstanding reservations.
    pub reserved: u64,
    /// Start of the window this request is admitted in (0 for buckets and concurrency
    /// counters).
    pub window_start: Millis,
    /// When the counter next frees: window end; for buckets, when it is full again;
    /// for concurrency counters, `now`.
    pub reset_at: Millis,
}

impl CounterSnapshot {
    pub fn remaining(&self) -> u64 {
        self.limit
            .saturating_sub(self.value.saturating_add(self.reserved))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// One per op, in the order given.
    pub snapshots: Vec<CounterSnapshot>,
    /// Indices (into the ops) of the counters that refused.
    pub blocking: Vec<usize>,
    /// Wait until every blocking counter could admit this request; `None` when it never
    /// can (a reservation larger than the limit itself).
    pub retry_after_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Everything taken; one snapshot per op, in the order given.
    Admitted {
        snapshots: Vec<CounterSnapshot>,
    },
    Refused(Refusal),
}

/// The end of one request on one counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub op: CounterOp,
    /// `CounterSnapshot::window_start` from admission.
    pub window_start: Millis,
    pub reservation: ReservationId,
    /// The real cost, added to the value of the admission's window.
    pub actual: u64,
}

#[derive(Debug, Clone, Default)]
pub struct InspectFilter {
    /// Only counters whose id starts with this (e.g. `policy/` or `policy/limit/`).
    pub prefix: Option<String>,
}

/// One counter-window as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CounterView {
    pub id: String,
    pub kind: CounterKind,
    pub limit: u64,
    pub value: u64,
    pub reserved: u64,
    pub remaining: u64,
    pub window_start: Millis,
    pub reset_at: Millis,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepStats {
    pub reservations_expired: u64,
    pub windows_reclaimed: u64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Check all ops and apply them all, or none.
    async fn admit(
        &self,
        now: Millis,
        ops: &[CounterOp],
        reservation: ReservationId,
        deadline: Millis,
    ) -> Result<Admission, StoreError>;

    /// Release reservations and charge real costs.
    async fn settle(&self, now: Millis, settlements: &[Settlement]) -> Result<(), StoreError>;

    /// Current windows (and ended windows still in their grace), for the admin API.
    async fn inspect(
        &self,
        now: Millis,
        filter: &InspectFilter,
    ) -> Result<Vec<CounterView>, StoreError>;

    /// Forget every window of one counter. Returns how many windows were removed.
    async fn reset(&self, id: &CounterId) -> Result<u64, StoreError>;

    /// Undo an admission this store made of `ops` under `reservation` at `now` (the
    /// same `now` as the admission): release its holds and take back its commits.
    /// Compensation, for when the same request was refused or failed elsewhere (the
    /// split store's other side). Best effort on a remote store: what cannot be undone
    /// is released at the reservation's deadline (holds) or stays counted (commits).
    async fn roll_back(
        &self,
        now: Millis,
        ops: &[CounterOp],
        reservation: ReservationId,
    ) -> Result<(), StoreError>;

    /// Release expired reservations and reclaim windows past their grace.
    async fn sweep(&self, now: Millis) -> Result<SweepStats, StoreError>;

    /// Reservations currently held (for the outstanding-reservations gauge).
    fn outstanding_reservations(&self) -> u64;
}
