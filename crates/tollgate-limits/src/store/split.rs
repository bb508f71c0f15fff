//! `scope: replica` beside a shared store: the counters of replica-scoped policies live
//! in this process (a [`MemoryStore`]), every other counter in the shared store (Redis,
//! usually behind a [`super::resilient::ResilientStore`]). Each op says where it belongs
//! ([`CounterOp::replica`]).
//!
//! Admission stays one decision across both sides (a refused request takes nothing from
//! either):
//! 1. the shared part is admitted first (the side that can fail or be slow);
//! 2. shared refused or failed: the local part is only *checked* (its snapshots and
//!    blocking counters join the refusal), nothing local was taken;
//! 3. shared admitted: the local part is admitted; if it refuses, the shared admission
//!    is rolled back ([`Store::roll_back`]: holds released, commits taken back).
//!
//! Step 3 is compensation, as across Redis Cluster slots: between the shared take and
//! its rollback a concurrent request may see it and be refused because of it; a rollback
//! that cannot reach the shared store leaves its holds until their deadline and its
//! commits counted (erring toward refusing). The local side never needs undoing.
//!
//! A shared store that is degraded does not affect replica counters: a request with only
//! replica ops never calls it. Settlement, inspection, reset, sweep and the
//! outstanding-reservations gauge cover both sides.

use std::sync::Arc;

use async_trait::async_trait;

use super::memory::MemoryStore;
use super::{
    Admission, CounterSnapshot, CounterView, InspectFilter, Refusal, ReservationId, Settlement,
    Store, StoreError, SweepStats,
};
use crate::counter::{CounterId, CounterOp};
use crate::time::Millis;

pub struct SplitStore {
    local: MemoryStore,
    shared: Arc<dyn Store>,
}

impl SplitStore {
    pub fn new(local: MemoryStore, shared: Arc<dyn Store>) -> Self {
        Self { local, shared }
    }

    /// The replica-scoped counters.
    pub fn local(&self) -> &MemoryStore {
        &self.local
    }
}

impl std::fmt::Debug for SplitStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitStore")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// Indices of the replica ops and of the shared ops, in order.
fn partition(ops: &[CounterOp]) -> (Vec<usize>, Vec<usize>) {
    (0..ops.len()).partition(|&i| ops.get(i).is_some_and(|op| op.replica))
}

fn pick(ops: &[CounterOp], idx: &[usize]) -> Vec<CounterOp> {
    idx.iter().filter_map(|&i| ops.get(i).cloned()).collect()
}

/// One part's answer, mapped back to the request's op indices.
struct Part<'a> {
    idx: &'a [usize],
    snapshots: Vec<CounterSnapshot>,
    blocking: Vec<usize>,
    /// `None`: not refused; `Some(None)`: refused for good; `Some(Some(ms))`: wait.
    retry: Option<Option<u64>>,
}

impl<'a> Part<'a> {
    fn of(idx: &'a [usize], admission: Admission) -> Self {
        match admission {
            Admission::Admitted { snapshots } => Part {
                idx,
                snapshots,
                blocking: Vec::new(),
                retry: None,
            },
            Admission::Refused(r) => Part {
                idx,
                snapshots: r.snapshots,
                blocking: r.blocking,
                retry: Some(r.retry_after_ms),
            },
        }
    }
}

/// Put two parts' snapshots back in the request's order; refused if either refused.
fn merge(n: usize, a: Part<'_>, b: Part<'_>) -> Result<Admission, StoreError> {
    let mut snapshots: Vec<Option<CounterSnapshot>> = vec![None; n];
    let mut blocking = Vec::new();
    let mut retry: Option<Option<u64>> = None;
    for part in [a, b] {
        for (&i, s) in part.idx.iter().zip(part.snapshots) {
            if let Some(slot) = snapshots.get_mut(i) {
                *slot = Some(s);
            }
        }
        blocking.extend(part.blocking.iter().filter_map(|&k| part.idx.get(k)));
        // Admitted once every blocking counter can: the longest wait, never if any never.
        retry = match (retry, part.retry) {
            (r, None) | (None, r) => r,
            (Some(Some(x)), Some(Some(y))) => Some(Some(x.max(y))),
            (Some(_), Some(_)) => Some(None),
        };
    }
    let snapshots = snapshots
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| StoreError::Protocol("split store: an op got no snapshot".into()))?;
    Ok(match retry {
        None => Admission::Admitted { snapshots },
        Some(retry_after_ms) => {
            blocking.sort_unstable();
            Admission::Refused(Refusal {
                snapshots,
                blocking,
                retry_after_ms,
            })
        }
    })
}

#[async_trait]
impl Store for SplitStore {
    async fn admit(
        &self,
        now: Millis,
        ops: &[CounterOp],
        reservation: ReservationId,
        deadline: Millis,
    ) -> Result<Admission, StoreError> {
        if ops.iter().all(|op| op.replica) {
            return self.local.admit_sync(now, ops, reservation, deadline);
        }
        if !ops.iter().any(|op| op.replica) {
            return self.shared.admit(now, ops, reservation, deadline).await;
        }
        let (local_idx, shared_idx) = partition(ops);
        let local_ops = pick(ops, &local_idx);
        let shared_ops = pick(ops, &shared_idx);
        // Nothing local is taken before the shared side has answered.
        let shared = self
            .shared
            .admit(now, &shared_ops, reservation, deadline)
            .await?;
        if let Admission::Refused(_) = shared {
            let local = self.local.check_sync(now, &local_ops)?;
            return merge(
                ops.len(),
                Part::of(&shared_idx, shared),
                Part::of(&local_idx, local),
            );
        }
        let local = match self
            .local
            .admit_sync(now, &local_ops, reservation, deadline)
        {
            Ok(local) => local,
            Err(e) => {
                self.undo_shared(now, &shared_ops, reservation).await;
                return Err(e);
            }
        };
        if let Admission::Refused(_) = local {
            self.undo_shared(now, &shared_ops, reservation).await;
        }
        merge(
            ops.len(),
            Part::of(&shared_idx, shared),
            Part::of(&local_idx, local),
        )
    }

    async fn settle(&self, now: Millis, settlements: &[Settlement]) -> Result<(), StoreError> {
        let (local, shared): (Vec<Settlement>, Vec<Settlement>) =
            settlements.iter().cloned().partition(|s| s.op.replica);
        if !local.is_empty() {
            self.local.settle_sync(now, &local);
        }
        if shared.is_empty() {
            return Ok(());
        }
        self.shared.settle(now, &shared).await
    }

    /// Both sides, in one list sorted by id then window start.
    async fn inspect(
        &self,
        now: Millis,
        filter: &InspectFilter,
    ) -> Result<Vec<CounterView>, StoreError> {
        let mut views = self.shared.inspect(now, filter).await?;
        views.extend(self.local.inspect_sync(now, filter));
        views.sort_by(|a, b| (&a.id, a.window_start).cmp(&(&b.id, b.window_start)));
        Ok(views)
    }

    /// Both sides (a counter id lives on one side, unless its policy changed scope).
    async fn reset(&self, id: &CounterId) -> Result<u64, StoreError> {
        let local = self.local.reset_sync(id);
        Ok(local.saturating_add(self.shared.reset(id).await?))
    }

    async fn roll_back(
        &self,
        now: Millis,
        ops: &[CounterOp],
        reservation: ReservationId,
    ) -> Result<(), StoreError> {
        let (local_idx, shared_idx) = partition(ops);
        self.local
            .roll_back_sync(now, &pick(ops, &local_idx), reservation);
        if shared_idx.is_empty() {
            return Ok(());
        }
        self.shared
            .roll_back(now, &pick(ops, &shared_idx), reservation)
            .await
    }

    /// The local side always; the shared side's error is returned after.
    async fn sweep(&self, now: Millis) -> Result<SweepStats, StoreError> {
        let mut stats = self.local.sweep_sync(now);
        let shared = self.shared.sweep(now).await?;
        stats.reservations_expired += shared.reservations_expired;
        stats.windows_reclaimed += shared.windows_reclaimed;
        Ok(stats)
    }

    fn outstanding_reservations(&self) -> u64 {
        self.local
            .outstanding_reservations()
            .saturating_add(self.shared.outstanding_reservations())
    }
}

impl SplitStore {
    async fn undo_shared(&self, now: Millis, shared_ops: &[CounterOp], reservation: ReservationId) {
        if let Err(e) = self.shared.roll_back(now, shared_ops, reservation).await {
            tracing::warn!(error = %e, "split store: shared admission not rolled back; its holds expire at their deadline, its commits stay counted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counter::{CounterKind, Need, Rate};
    use crate::window::Window;

    const T: Millis = 1_000_000_020_000;
    const FAR: Millis = Millis::MAX / 2;

    fn op(name: &str, replica: bool, limit: u64, commit: u64, reserve: u64) -> CounterOp {
        CounterOp {
            id: CounterId::from_encoded(name),
            kind: if commit > 0 {
                CounterKind::Requests
            } else {
                CounterKind::Tokens
            },
            rate: Rate::Fixed {
                limit,
                window: Window::aligned(60_000),
            },
            need: Need::Fits,
            commit,
            reserve,
            replica,
        }
    }

    /// A split store whose shared side is a second memory store the test can read.
    fn split() -> (SplitStore, Arc<MemoryStore>) {
        let shared = Arc::new(MemoryStore::new(60_000));
        (
            SplitStore::new(MemoryStore::new(60_000), shared.clone()),
            shared,
        )
    }

    fn value(store: &MemoryStore, name: &str) -> (u64, u64) {
        store
            .inspect_sync(T, &InspectFilter::default())
            .iter()
            .find(|v| v.id == name)
            .map_or((0, 0), |v| (v.value, v.reserved))
    }

    #[tokio::test]
    async fn each_counter_lives_on_its_side() {
        let (store, shared) = split();
        let ops = [op("s", false, 10, 1, 0), op("r", true, 100, 1, 30)];
        let a = store.admit(T, &ops, ReservationId(1), FAR).await.unwrap();
        assert!(matches!(a, Admission::Admitted { ref snapshots } if snapshots.len() == 2));
        assert_eq!(value(&shared, "s"), (1, 0));
        assert_eq!(value(&shared, "r"), (0, 0));
        assert_eq!(value(store.local(), "r"), (1, 30));
        assert_eq!(value(store.local(), "s"), (0, 0));
        assert_eq!(store.outstanding_reservations(), 1);
        // Inspection sees both sides, in id order.
        let ids: Vec<String> = store
            .inspect(T, &InspectFilter::default())
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.id)
            .collect();
        assert_eq!(ids, ["r", "s"]);
        // Settlement goes where the counter lives.
        let settlements: Vec<Settlement> = ops
            .iter()
            .map(|o| Settlement {
                op: o.clone(),
                window_start: Window::aligned(60_000).start(T),
                reservation: ReservationId(1),
                actual: 7,
            })
            .collect();
        store.settle(T + 1, &settlements).await.unwrap();
        assert_eq!(value(store.local(), "r"), (8, 0));
        assert_eq!(value(&shared, "s"), (8, 0));
        assert_eq!(store.outstanding_reservations(), 0);
        assert_eq!(store.reset(&CounterId::from_encoded("r")).await.unwrap(), 1);
        assert_eq!(value(store.local(), "r"), (0, 0));
    }

    #[tokio::test]
    async fn a_local_refusal_rolls_the_shared_side_back() {
        let (store, shared) = split();
        // The replica counter is spent; the shared one has room.
        let full = op("r", true, 1, 1, 0);
        store
            .admit(T, &[full], ReservationId(1), FAR)
            .await
            .unwrap();
        let ops = [
            op("s", false, 10, 1, 0),
            op("t", false, 100, 0, 40),
            op("r", true, 1, 1, 0),
        ];
        let Admission::Refused(r) = store.admit(T, &ops, ReservationId(2), FAR).await.unwrap()
        else {
            panic!("a spent replica counter must refuse");
        };
        assert_eq!(r.blocking, [2]);
        assert_eq!(r.snapshots.len(), 3);
        assert!(r.retry_after_ms.is_some());
        // Nothing taken from any counter.
        assert_eq!(value(&shared, "s"), (0, 0));
        assert_eq!(value(&shared, "t"), (0, 0));
        assert_eq!(value(store.local(), "r"), (1, 0));
        assert_eq!(store.outstanding_reservations(), 0);
    }

    #[tokio::test]
    async fn a_shared_refusal_takes_nothing_locally() {
        let (store, shared) = split();
        store
            .admit(T, &[op("s", false, 1, 1, 0)], ReservationId(1), FAR)
            .await
            .unwrap();
        let ops = [op("r", true, 10, 1, 0), op("s", false, 1, 1, 0)];
        let Admission::Refused(r) = store.admit(T, &ops, ReservationId(2), FAR).await.unwrap()
        else {
            panic!("a spent shared counter must refuse");
        };
        assert_eq!(r.blocking, [1]);
        assert_eq!(r.snapshots[0].limit, 10);
        assert_eq!(value(store.local(), "r"), (0, 0));
        assert_eq!(value(&shared, "s"), (1, 0));
        // Both refusing: both are blocking, the wait is the longest.
        let both = [op("r", true, 0, 1, 0), op("s", false, 1, 1, 0)];
        let Admission::Refused(r) = store.admit(T, &both, ReservationId(3), FAR).await.unwrap()
        else {
            panic!("must refuse");
        };
        assert_eq!(r.blocking, [0, 1]);
        // A limit of 0 can never admit one request.
        assert_eq!(r.retry_after_ms, None);
    }

    /// A shared store that is away: replica counters keep working, a request that also
    /// needs the shared store gets its error and takes nothing locally.
    #[tokio::test]
    async fn replica_counters_work_while_the_shared_store_fails() {
        struct Away;
        #[async_trait]
        impl Store for Away {
            async fn admit(
                &self,
                _: Millis,
                _: &[CounterOp],
                _: ReservationId,
                _: Millis,
            ) -> Result<Admission, StoreError> {
                Err(StoreError::Unavailable("away".into()))
            }
            async fn settle(&self, _: Millis, _: &[Settlement]) -> Result<(), StoreError> {
                Err(StoreError::Unavailable("away".into()))
            }
            async fn inspect(
                &self,
                _: Millis,
                _: &InspectFilter,
            ) -> Result<Vec<CounterView>, StoreError> {
                Err(StoreError::Unavailable("away".into()))
            }
            async fn reset(&self, _: &CounterId) -> Result<u64, StoreError> {
                Err(StoreError::Unavailable("away".into()))
            }
            async fn roll_back(
                &self,
                _: Millis,
                _: &[CounterOp],
                _: ReservationId,
            ) -> Result<(), StoreError> {
                Err(StoreError::Unavailable("away".into()))
            }
            async fn sweep(&self, _: Millis) -> Result<SweepStats, StoreError> {
                Err(StoreError::Unavailable("away".into()))
            }
            fn outstanding_reservations(&self) -> u64 {
                0
            }
        }
        // Behind the resilient store, as the gateway runs it: fail_open admits the shared
        // part on its fallback, the replica part stays in the split store's own counters.
        let open = SplitStore::new(
            MemoryStore::new(60_000),
            Arc::new(super::super::resilient::ResilientStore::new(
                Arc::new(Away),
                MemoryStore::new(60_000),
                super::super::resilient::OnError::FailOpen,
                10,
            )),
        );
        let mixed = [op("r", true, 1, 1, 0), op("s", false, 5, 1, 0)];
        let a = open.admit(T, &mixed, ReservationId(1), FAR).await.unwrap();
        assert!(matches!(a, Admission::Admitted { .. }));
        assert_eq!(value(open.local(), "r"), (1, 0));
        // The replica counter refuses the next one; the fallback's take is rolled back.
        let a = open.admit(T, &mixed, ReservationId(2), FAR).await.unwrap();
        assert!(matches!(a, Admission::Refused(ref r) if r.blocking == [0]));
        let views = open.inspect(T, &InspectFilter::default()).await.unwrap();
        let s = views.iter().find(|v| v.id == "s").map(|v| v.value);
        assert_eq!(s, Some(1), "{views:?}");

        let store = SplitStore::new(MemoryStore::new(60_000), Arc::new(Away));
        let replica = [op("r", true, 2, 1, 0)];
        for i in 0..2 {
            let a = store.admit(T, &replica, ReservationId(i), FAR).await;
            assert!(matches!(a.unwrap(), Admission::Admitted { .. }));
        }
        let a = store.admit(T, &replica, ReservationId(9), FAR).await;
        assert!(matches!(a.unwrap(), Admission::Refused(_)));
        let mixed = [op("r2", true, 2, 1, 0), op("s", false, 2, 1, 0)];
        assert!(store
            .admit(T, &mixed, ReservationId(10), FAR)
            .await
            .is_err());
        assert_eq!(value(store.local(), "r2"), (0, 0));
    }
}
