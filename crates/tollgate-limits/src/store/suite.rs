//! The one test suite every [`Store`] must pass (the memory store here, Redis later).
//!
//! Each test is a `pub async fn(store, prefix)` that only uses the [`Store`] trait, so a
//! store in any crate runs the very same tests through [`store_suite!`](crate::store_suite):
//!
//! ```ignore
//! tollgate_limits::store_suite!(memory, || async {
//!     MemoryStore::new(tollgate_limits::store::suite::SUITE_SETTLE_GRACE_MS)
//! });
//! // A shared server: give every run its own prefix.
//! tollgate_limits::store_suite!(redis, prefix = format!("t{}/", std::process::id()), || async {
//!     RedisStore::connect(URL).await.unwrap()
//! });
//! ```
//!
//! Rules the tests keep so they can share one real server:
//! - every id starts with `prefix` (the macro adds the test's name), and names end in a
//!   `.` so that no id is a prefix of another;
//! - time is only the `now` argument, never a sleep. It starts at [`epoch`], the next UTC
//!   midnight after the real clock: windows line up the same on every run, and a store
//!   whose keys expire on real time (Redis `PEXPIREAT`) keeps them for the whole test;
//! - the store must keep ended windows for at least [`SUITE_SETTLE_GRACE_MS`];
//! - the outstanding-reservations gauge is compared before/after, never to 0, since
//!   other tests may share it.
//!
//! The tests read a counter with a *probe*: an admission asking `Need::Room` with
//! nothing to commit or reserve, whose snapshot is returned admitted or refused and which
//! changes nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{
    Admission, CounterSnapshot, InspectFilter, Refusal, ReservationId, Settlement, Store,
    StoreError,
};
use crate::counter::{CounterId, CounterKind, CounterOp, Need, Rate};
use crate::time::{Clock, Millis, SystemClock};
use crate::window::Window;

/// The settlement grace the store under test must give (at least).
pub const SUITE_SETTLE_GRACE_MS: u64 = 120_000;

const MINUTE: u64 = 60_000;
const HOUR: u64 = 3_600_000;
const DAY: u64 = 86_400_000;

type Outcome = Result<(), StoreError>;

/// Expands to one `#[tokio::test]` per suite test, inside `mod $name`.
///
/// `$make` is a closure returning a future of the store (a fresh one per test, or a
/// shared one; tests never assume an empty store). `prefix = expr` prepends a
/// run-specific prefix for stores that outlive the process.
///
/// The calling crate needs `tokio` (features `macros`, `rt-multi-thread`) as a
/// dev-dependency, and this crate with the `test-suite` feature.
#[macro_export]
macro_rules! store_suite {
    ($name:ident, $make:expr) => {
        $crate::store_suite!($name, prefix = concat!("suite/", stringify!($name), "/"), $make);
    };
    ($name:ident, prefix = $prefix:expr, $make:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::store_suite!(@tests $prefix, $make;
                admission_is_all_or_nothing,
                snapshots_come_before_own_charge,
                room_admits_while_anything_is_left,
                read_only_admission_reads_every_counter,
                fits_needs_the_whole_cost,
                commit_and_reserve_are_taken_at_admission,
                zero_reservations_are_not_held,
                settlement_lands_in_admission_window_after_rollover,
                overage_stays_in_its_window,
                refund_when_actual_below_reserve,
                extra_charge_when_actual_above_reserve,
                expired_reservation_releases_capacity,
                settling_an_expired_reservation_charges_actual,
                outstanding_gauge_returns_to_base,
                roll_back_undoes_an_admission,
                retry_after_fixed_window,
                retry_after_is_none_when_it_never_fits,
                retry_after_is_max_over_blocking_counters,
                bucket_burst_then_refill,
                bucket_refill_is_exact,
                bucket_settlement_charges_tokens,
                concurrency_counter,
                staggered_windows_roll_at_their_own_offsets,
                inspect_and_reset,
                limit_change_keeps_spend,
                same_counter_twice_in_one_request,
                concurrent_admissions_never_exceed_limits,
            );
        }
    };
    (@tests $prefix:expr, $make:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let store: ::std::sync::Arc<dyn $crate::store::Store> =
                    ::std::sync::Arc::new(($make)().await);
                let prefix = format!("{}{}/", $prefix, stringify!($test));
                if let Err(e) = $crate::store::suite::$test(store, &prefix).await {
                    panic!("{}: store error: {e}", stringify!($test));
                }
            }
        )*
    };
}

/// The next UTC midnight after the real clock (see the module doc).
pub fn epoch() -> Millis {
    (SystemClock.now_ms() / DAY + 1) * DAY
}

// ---------------------------------------------------------------------------------------
// Helpers.

fn id(prefix: &str, name: &str) -> CounterId {
    CounterId::from_encoded(&format!("{prefix}{name}."))
}

fn fixed(id: &CounterId, limit: u64, need: Need, commit: u64, reserve: u64) -> CounterOp {
    CounterOp {
        id: id.clone(),
        kind: if commit > 0 {
            CounterKind::Requests
        } else {
            CounterKind::Tokens
        },
        rate: Rate::Fixed {
            limit,
            window: Window::aligned(MINUTE),
        },
        need,
        commit,
        reserve,
        replica: false,
    }
}

fn with_window(mut op: CounterOp, window: Window) -> CounterOp {
    if let Rate::Fixed { window: w, .. } = &mut op.rate {
        *w = window;
    }
    op
}

fn bucket(
    id: &CounterId,
    limit: u64,
    per_ms: u64,
    burst: u64,
    commit: u64,
    reserve: u64,
) -> CounterOp {
    CounterOp {
        id: id.clone(),
        kind: CounterKind::Tokens,
        rate: Rate::Bucket {
            limit,
            per_ms,
            burst,
        },
        need: Need::Fits,
        commit,
        reserve,
        replica: false,
    }
}

fn in_flight(id: &CounterId, limit: u64) -> CounterOp {
    CounterOp {
        id: id.clone(),
        kind: CounterKind::InFlight,
        rate: Rate::Concurrency { limit },
        need: Need::Fits,
        commit: 0,
        reserve: 1,
        replica: false,
    }
}

/// The same counter asking for nothing: reads it without changing it.
fn probe_op(op: &CounterOp) -> CounterOp {
    CounterOp {
        need: Need::Room,
        commit: 0,
        reserve: 0,
        ..op.clone()
    }
}

/// Distinct reservation ids per call site, unique within a process.
fn rid() -> ReservationId {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    ReservationId(NEXT.fetch_add(1, Ordering::Relaxed))
}

const FAR: Millis = Millis::MAX / 2;

async fn admit(
    store: &dyn Store,
    now: Millis,
    ops: &[CounterOp],
    reservation: ReservationId,
    deadline: Millis,
) -> Result<Admission, StoreError> {
    store.admit(now, ops, reservation, deadline).await
}

async fn admit_one(
    store: &dyn Store,
    now: Millis,
    op: &CounterOp,
    reservation: ReservationId,
    deadline: Millis,
) -> Result<Admission, StoreError> {
    store
        .admit(now, std::slice::from_ref(op), reservation, deadline)
        .await
}

#[track_caller]
fn admitted(a: Admission) -> Vec<CounterSnapshot> {
    match a {
        Admission::Admitted { snapshots } => snapshots,
        Admission::Refused(r) => panic!("expected admission, got {r:?}"),
    }
}

#[track_caller]
fn refused(a: Admission) -> Refusal {
    match a {
        Admission::Refused(r) => r,
        Admission::Admitted { snapshots } => panic!("expected refusal, got {snapshots:?}"),
    }
}

#[track_caller]
fn single(snapshots: Vec<CounterSnapshot>) -> CounterSnapshot {
    match snapshots.as_slice() {
        [s] => *s,
        other => panic!("expected one snapshot, got {other:?}"),
    }
}

/// The counter's state at `now`, changing nothing.
async fn probe(
    store: &dyn Store,
    now: Millis,
    op: &CounterOp,
) -> Result<CounterSnapshot, StoreError> {
    let snapshots = match admit(store, now, &[probe_op(op)], rid(), now).await? {
        Admission::Admitted { snapshots } => snapshots,
        Admission::Refused(r) => r.snapshots,
    };
    Ok(single(snapshots))
}

/// Admit one op, expecting success, and return the settlement to make later.
async fn take(
    store: &dyn Store,
    now: Millis,
    op: &CounterOp,
    deadline: Millis,
) -> Result<Settlement, StoreError> {
    let reservation = rid();
    let snap = single(admitted(
        admit_one(store, now, op, reservation, deadline).await?,
    ));
    Ok(Settlement {
        op: op.clone(),
        window_start: snap.window_start,
        reservation,
        actual: 0,
    })
}

async fn settle(store: &dyn Store, now: Millis, s: &Settlement, actual: u64) -> Outcome {
    store
        .settle(
            now,
            &[Settlement {
                actual,
                ..s.clone()
            }],
        )
        .await
}

// ---------------------------------------------------------------------------------------
// Admission.

pub async fn admission_is_all_or_nothing(store: Arc<dyn Store>, prefix: &str) -> Outcome {
    let store = &*store;
    let t = epoch() + 1_000;
    let (a, b, c) = (id(prefix, "a"), id(prefix, "b"), id(prefix, "c"));
    let op_a = fixed(&a, 10, Need::Fits, 1, 0);
    let op_b = fixed(&b, 1, Need::Fits, 1, 0);
    let op_c = fixed(&c, 10, Need::Fits, 0, 5);
    take(store, t, &op_b, FAR).await?;
    let before = store.outstanding_reservations();

    let r = refused(
        admit(
            store,
            t,
            &[op_a.clone(), op_b.clone(), op_c.clone()],
            rid(),
            FAR,
        )
        .await?,
    );
    assert_eq!(r.blocking, vec![1]);
    assert_eq!(r.snapshots.len(), 3);
    assert_eq!(r.snapshots.get(1).map(|s| s.value), Some(1));
    // Nothing was taken from the counters that would have passed.
    assert_eq!(probe(store, t, &op_a).await?.value, 0);
    let c_now = probe(store, t, &op_c).await?;
    assert_eq!((c_now.value, c_now.reserved), (0, 0));
    assert_eq!(store.outstanding_reservations(), before);

    // Without the full counter, both are taken together.
    admitted(admit(store, t, &[op_a.clone(), op_c.clone()], rid(), FAR).await?);
    assert_eq!(probe(store, t, &op_a).await?.value, 1);
    assert_eq!(probe(store, t, &op_c).await?.reserved, 5);
    assert_eq!(store.outstanding_reservations(), before + 1);
    Ok(())
}

pub async fn snapshots_come_before_own_charge(store: Arc<dyn Store>, prefix: &str) -> Outcome {
    let store = &*store;
    let t0 = epoch();
    let t = t0 + 15_000;
    let (a, b) = (id(prefix, "a"), id(prefix, "b"));
    let op_a = fixed(&a, 10, Need::Fits, 2, 0);
    let op_b = fixed(&b, 100, Need::Fits, 0, 30);
    let first = admitted(admit(store, t, &[op_a.clone(), op_b.clone()], rid(), FAR).await?);
    let expect = |limit, value, reserved| CounterSnapshot {
        limit,
        value,
        reserved,
        window_start: t0,
        reset_at: t0 + MINUTE,
    };
    assert_eq!(first, vec![expect(10, 0, 0), expect(100, 0, 0)]);
    // Order follows the ops, not the ids.
    let second = admitted(admit(store, t, &[op_b, op_a], rid(), FAR).await?);
    assert_eq!(second, vec![expect(100, 0, 30), expect(10, 2, 0)]);
    assert_eq!(second.first().map(CounterSnapshot::remaining), Some(70));
    Ok(())
}

pub async fn room_admits_while_anything_is_left(store: Arc<dyn Store>, prefix: &str) -> Outcome {
    let store = &*store;
    let t0 = epoch();
    let op = fixed(&id(prefix, "tokens"), 10, Need::Room, 0, 0);
    let s = take(store, t0 + 1_000, &op, FAR).await?;
    settle(store, t0 + 2_000, &s, 9).await?;
    // 9 of 10: one left, so the call that will cross the limit is admitted.
    let s = take(store, t0 + 3_000, &op, FAR).await?;
    settle(store, t0 + 4_000, &s, 5).await?;
    let r = refused(admit_one(store, t0 + 5_000, &op, rid(), FAR).await?);
    assert_eq!(r.blocking, vec![0]);
    assert_eq!(single(r.snapshots).value, 14);
    assert_eq!(r.retry_after_ms, Some(MINUTE - 5_000));
    Ok(())
}

/// An admission that only reads (after-mode tokens: nothing committed or reserved) over
/// several counters sees each counter's own spend, and is refused by the one that is
/// spent, whichever position it has.
pub async fn read_only_admission_reads_every_counter(
    store: Arc<dyn Store>,
    prefix: &str,
) -> Outcome {
    let store = &*store;
    let t0 = epoch();
    let minute = fixed(&id(prefix, "minute"), 100, Need::Room, 0, 0);
    let hour = with_window(
        fixed(&id(prefix, "hour"), 30, Need::Room, 0, 0),
        Window::aligned(60 * MINUTE),
    );
    let other = fixed(&id(prefix, "other"), 1_000, Need::Room, 0, 0);
    for (op, spent) in [(&minute, 7), (&hour, 30), (&other, 11)] {
        let s = take(store, t0 + 1_000, op, FAR).await?;
        settle(store, t0 + 2_000, &s, spent).await?;
    }
    let values =
        |snapshots: &[CounterSnapshot]| snapshots.iter().map(|s| s.value).collect::<Vec<_>>();
    // Alone, each reads its own figure.
    for (op, spent) in [(&minute, 7), (&other, 11)] {
        assert_eq!(
            single(admitted(
                admit_one(store, t0 + 3_000, op, rid(), FAR).await?
            ))
            .value,
            spent
        );
    }
    // Together: the spent hour refuses, first, in the middle or last.
    for ops in [
        vec![hour.clone(), minute.clone(), other.clone()],
        vec![minute.clone(), hour.clone(), other.clone()],
        vec![minute.clone(), other.clone(), hour.clone()],
    ] {
        let r = refused(admit(store, t0 + 3_000, &ops, rid(), FAR).await?);
        let at = ops
            .iter()
            .position(|o| o.id == hour.id)
            .unwrap_or(usize::MAX);
        assert_eq!(r.blocking, vec![at]);
        let expected: Vec<u64> = ops
            .iter()
            .map(|o| {
                if o.id == hour.id {
                    30
                } else if o.id == minute.id {
                    7
                } else {
                    11
                }
            })
            .collect();
        assert_eq!(values(&r.snapshots), expected);
    }
    // Without the hour, the other two admit and report their figures in order.
    let snapshots = admitted(
        admit(
            store,
            t0 + 3_000,
            &[other.clone(), minute.clone()],
            rid(),
            FAR,
        )
        .await?,
    );
    assert_eq!(values(&snapshots), vec![11, 7]);
    // The next minute the minute counter starts again; the hour still refuses.
    let r = refused(
        admit(
            store,
            t0 + MINUTE + 1_000,
            &[minute.clone(), hour.clone()],
            rid(),
            FAR,
        )
        .await?,
    );
    assert_eq!(
        (r.blocking.clone(), values(&r.snapshots)),
        (vec![1], vec![0, 30])
    );
    Ok(())
}

pub async fn fits_needs_the_whole_cost(store: Arc<dyn Store>, prefix: &str) -> Outcome {
    let store = &*store;
    let t = epoch() + 1_000;
    let requests = id(prefix, "requests");
    take(store, t, &fixed(&requests, 10, Need::Fits, 4, 0), FAR).await?;
    take(store, t, &fixed(&requests, 10, Need::Fits, 6, 0), FAR).await?;
    refused(
        admit(
            store,
            t,
            &[fixed(&requests, 10, Need::Fits, 1, 0)],
            rid(),
            FAR,
        )
        .await?,
    );
    assert_eq!(
        probe(store, t, &fixed(&requests, 10, Need::Fits, 0, 0))
            .await?
            .value,
        10
    );

    let tokens = id(prefix, "tokens");
    take(store, t, &fixed(&tokens, 10, Need::Fits, 0, 7), FAR).await?;
    let r = refused(
        admit(
            store,
            t,
            &[fixed(&tokens, 10, Need::Fits, 0, 4)],
            rid(),
            FAR,
        )
        .await?,
    );
    assert_eq!(single(r.snapshots).reserved, 7);
    take(store, t, &fixed(&tokens, 10, Need::Fits, 0, 3), FAR).await?;
    let now = probe(store, t, &fixed(&tokens, 10, Need::Fits, 0, 0)).await?;
    assert_eq!((now.value, now.reserved, now.remaining()), (0, 10, 0));
    Ok(())
}

pub async fn commit_and_reserve_are_taken_at_admission(
    store: Arc<dyn Store>,
    prefix: &str,
) -> Outcome {
    let store = &*store;
    let t = epoch() + 1_000;
    let before = store.outstanding_reservations();
    let op = fixed(&id(prefix, "c"), 100, Need::Fits, 1, 5);
    take(store, t, &op, FAR).await?;
    let now = probe(store, t, &op).await?;
    assert_eq!((now.value, now.reserved), (1, 5));
    assert_eq!(store.outstanding_reservations(), before + 1);
    Ok(())
}

pub async fn zero_reservations_are_not_held(store: Arc<dyn Store>, prefix: &str) -> Outcome {
    let store = &*store;
    let t = epoch() + 1_000;
    let before = store.outstanding_reservations();
    let op = fixed(&id(prefix, "c"), 100, Need::Fits, 1, 0);
    let s = take(store, t, &op, FAR).await?;
    assert_eq!(store.outstanding_reservations(), before);
    settle(store, t, &s, 0).await?;
    assert_eq!(store.outstanding_reservations(), before);
    assert_eq!(probe(store, t, &op).await?.value, 1);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Settlement.

pub async fn settlement_lands_in_admission_window_after_rollover(
    store: Arc<dyn Store>,
    prefix: &str,
) -> Outcome {
    let store = &*store;
    let t0 = epoch();
    let op = fixed(&id(prefix, "tokens"), 1_000, Need::Fits, 0, 100);
    let s = take(store, t0 + 10_000, &op, FAR).await?;
    assert_eq!(s.window_start, t0);
    // The call ends a full window later, in W2, where another call is already running.
    let later = t0 + 10_000 + MINUTE;
    let other = take(store, later - 1, &op, FAR).await?;
    assert_eq!(other.window_start, t0 + MINUTE);
    settle(store, later, &s, 300).await?;

    let w2 = probe(store, later, &op).await?;
    assert_eq!(
        (w2.window_start, w2.value, w2.reserved),
        (t0 + MINUTE, 0, 100)
    );
    let views = store
        .inspect(
            later,
            &InspectFilter {
                prefix: Some(prefix.to_owned()),
            },
        )
        .await?;
    let w1 = views
        .iter()
        .find(|v| v.window_start == t0)
        .map(|v| (v.value, v.reserved, v.reset_at));
    assert_eq!(w1, Some((300, 0, t0 + MINUTE)), "{views:?}");
    Ok(())
}

pub async fn overage_stays_in_its_window(store: Arc<dyn Store>, prefix: &str) -> Outcome {
    let store = &*store;
    let t0 = epoch();
    let op = fixed(&id(prefix, "tokens"), 100, Need::Room, 0, 0);
    let s = take(store, t0 + 1_000, &op, FAR).await?;
    settle(store, t0 + 1_500, &s, 250).await?;
    let r = refused(admit_one(store, t0 + 2_000, &op, rid(), FAR).await?);
    assert_eq!(single(r.snapshots).value, 250);
    assert_eq!(r.retry_after_ms, Some(MINUTE - 2_000));
    // The next window starts clean: no debt carried over.
    let fresh = single(admitted(
        admit(store, t0 + MINUTE, &[op], rid(), FAR).await?,
    ));
    assert_eq!((fresh.window_start, fresh.value), (t0 + MINUTE, 0));
    Ok(())
}

pub async fn refund_when_actual_below_reserve(store: Arc<dyn Store>, prefix: &str) -> Outcome {
    let store = &*store;
    let t = epoch() + 1_000;
    let c = id(prefix, "tokens");
    let s = take(store, t, &fixed(&c, 100, Need::Fits, 0, 80), FAR).await?;
    refused(admit(store, t, &[fixed(&c, 100, Need::Fits, 0, 30)], rid(), FAR).await?);
    settle(store, t + 1, &s, 20).await?;
    let now = probe(store, t + 1, &fixed(&c, 100, Need::Fits, 0, 0)).await?;
    assert_eq!((now.value, now.reserved), (20, 0));
    take(store, t + 2, &fixed(&c, 100, Need::Fits, 0, 80), FAR).await?;
    Ok(())
}

pub async fn extra_charge_when_actual_above_reserve(
    store: Arc<dyn Store>,
    prefix: &str,
) -> Outcome {
    let store = &*store;
    let t = epoch() + 1_000;
    let c = id(prefix, "tokens");
    let s = take(store, t, &fixed(&c, 100, Need::Fits, 0, 10), FAR).await?;
    settle(store, t + 1, &s, 70).await?;
    let now = probe(store, t + 1, &fixed(&c, 100, Need::Fits, 0, 0)).await?;
    assert_eq!((now.value, now.reserved), (70, 0));
    refused(
        admit(
            store,
            t + 2,
            &[fixed(&c, 100, Need::Fits, 0, 40)],
            rid(),
            FAR,
        )
        .await?,
    );
    take(store, t + 2, &fixed(&c, 100, Need::Fits, 0, 30), FAR).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Reservations.

pub async fn expired_reservation_releases_capacity(store: Arc<dyn Store>, prefix: &str) -> Outcome {
    let store = &*store;
    let t0 = epoch();
    let before = store.outstanding_reservations();
    let op = fixed(&id(prefix, "tokens"), 100, Need::Fits, 0, 60);
    take(store, t0 + 1_000, &op, t0 + 5_000).await?;
    assert_eq!(store.outstanding_reservations(), before + 1);
    refused(admit_one(store, t0 + 4_999, &op, rid(), FAR).await?);
    // At the deadline the first hold is gone; the admission itself releases it.
    take(store, t0 + 5_000, &op, t0 + 15_000).await?;
    assert_eq!(store.outstanding_reservations(), before + 1);
    let stats = store.sweep(t0 + 15_000).await?;
    assert!(stats.reservations_expired >= 1, "{stats:?}");
    assert_eq!(store.outstanding_reservations(), before);
    assert_eq!(probe(store, t0 + 15_000, &op).await?.reserved, 0);
    Ok(())
}

pub async fn settling_an_expired_reservation_charges_actual(
    store: Arc<dyn Store>,
    prefix: &str,
) -> Outcome {
    let store = &*store;
    let t0 = epoch();
    let before = store.outstanding_reservations();
    let op = fixed(&id(prefix, "tokens"), 100, Need::Fits, 0, 60);
    let s = take(store, t0 + 1_000, &op, t0 + 2_000).await?;
    store.sweep(t0 + 3_000).await?;
    assert_eq!(store.outstanding_reservations(), before);
    settle(store, t0 + 4_000, &s, 50).await?;
    assert_eq!(store.outstanding_reservations(), before);
    let now = probe(store, t0 + 4_000, &op).await?;
    assert_eq!((now.value, now.reserved), (50, 0));
    Ok(())
}

pub async fn outstanding_gauge_returns_to_base(store: Arc<dyn Store>, prefix: &str) -> Outcome {
    let store = &*store;
    let t = epoch() + 1_000;
    let before = store.outstanding_reservations();
    let user = fixed(&id(prefix, "user"), 1_000, Need::Fits, 0, 50);
    let ops = [
        user.clone(),
        fixed(&id(prefix, "tier"), 10_000, Need::Fits, 0, 50),
        in_flight(&id(prefix, "inflight"), 10),
    ];
    let mut pending = Vec::new();
    for i in 0..5 {
        let reservation = rid();
        let snaps = admitted(admit(store, t + i, &ops, reservation, FAR).await?);
        for (op, snap) in ops.iter().zip(snaps) {
            pending.push(Settlement {
                op: op.clone(),
                window_start: snap.window_start,
                reservation,
                actual: 40,
            });
        }
    }
    assert_eq!(store.outstanding_reservations(), before + 15);
    store.settle(t + 10, &pending).await?;
    assert_eq!(store.outstanding_reservations(), before);
    let user = probe(store, t + 10, &user).await?;
    assert_eq!((user.value, user.reserved), (200, 0));
    Ok(())
}

/// Compensation: an admission rolled back leaves every counter as it was (commits taken
/// back, holds released, the gauge at its base), and other requests' spend is kept.
pub async fn roll_back_undoes_an_admission(store: Arc<dyn Store>, prefix: &str) -> Outcome {
    let store = &*store;
    let t = epoch() + 2_000;
    let before = store.outstanding_reservations();
    let requests = fixed(&id(prefix, "requests"), 2, Need::Fits, 1, 0);
    let tokens = fixed(&id(prefix, "tokens"), 100, Need::Fits, 0, 60);
    let burst = bucket(&id(prefix, "bucket"), 1, MINUTE, 1, 2, 0);
    let conc = in_flight(&id(prefix, "inflight"), 1);
    let ops = [
        requests.clone(),
        tokens.clone(),
        burst.clone(),
        conc.clone(),
    ];
    // Someone else's spend, which must survive the rollback.
    take(store, t, &requests, FAR).await?;
    let reservation = rid();
    admitted(admit(store, t, &ops, reservation, FAR).await?);
    assert_eq!(store.outstanding_reservations(), before + 2);
    store.roll_back(t, &ops, reservation).await?;
    assert_eq!(store.outstanding_reservations(), before);
    let r = probe(store, t, &requests).await?;
    assert_eq!((r.value, r.reserved), (1, 0));
    let k = probe(store, t, &tokens).await?;
    assert_eq!((k.value, k.reserved), (0, 0));
    assert_eq!(probe(store, t, &burst).await?.value, 0);
    assert_eq!(probe(store, t, &conc).await?.reserved, 0);
    // Everything it took is free again: the same request fits.
    admitted(admit(store, t, &ops, rid(), FAR).await?);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Retry-after.

pub async fn retry_after_fixed_window(store: Arc<dyn Store>, prefix: &str) -> Outcome {
    let store = &*store;
    let t0 = epoch();
    let op = fixed(&id(prefix, "requests"), 5, Need::Fits, 1, 0);
    for _ in 0..5 {
        take(store, t0 + 15_000, &op, FAR).await?;
    }
    let r = refused(admit_one(store, t0 + 15_000, &op, rid(), FAR).await?);
    assert_eq!(r.retry_after_ms, Some(45_000));
    // One millisecond before the boundary: still at least 1 ms, never 0.
    let r = refused(admit_one(store, t0 + MINUTE - 1, &op, rid(), FAR).await?);
    assert_eq!(r.retry_after_ms, Some(1));
    take(store, t0 + MINUTE, &op, FAR).await?;
    Ok(())
}

pub async fn retry_after_is_none_when_it_never_fits(
    store: Arc<dyn Store>,
    prefix: &str,
) -> Outcome {
    let store = &*store;
    let t = epoch() + 1_000;
    let too_big = fixed(&id(prefix, "tokens"), 5, Need::Fits, 0, 6);
    let r = refused(admit(store, t, &[too_big], rid(), FAR).await?);
    assert_eq!(r.retry_after_ms, None);
    let zero = fixed(&id(prefix, "zero"), 0, Need::Room, 0, 0);
    assert_eq!(
        refused(admit(store, t, &[zero], rid(), FAR).await?).retry_after_ms,
        None
    );
    let bucket_too_big = bucket(&id(prefix, "bucket"), 10, MINUTE, 5, 16, 0);
    let r = refused(admit(store, t, &[bucket_too_big], rid(), FAR).await?);
    assert_eq!(r.retry_after_ms, None);
    let inflight_zero = in_flight(&id(prefix, "inflight"), 0);
    let r = refused(admit(store, t, &[inflight_zero], rid(), FAR).await?);
    assert_eq!(r.retry_after_ms, None);
    Ok(())
}

pub async fn retry_after_is_max_over_blocking_counters(
    store: Arc<dyn Store>,
    prefix: &str,
) -> Outcome {
    let store = &*store;
    let t0 = epoch();
    let t = t0 + 15_000;
    let minute = fixed(&id(prefix, "minute"), 1, Need::Fits, 1, 0);
    let hour = with_window(
        fixed(&id(prefix, "hour"), 1, Need::Fits, 1, 0),
        Window::aligned(HOUR),
    );
    let open = fixed(&id(prefix, "open"), 100, Need::Fits, 1, 0);
    take(store, t, &minute, FAR).await?;
    take(store, t, &hour, FAR).await?;
    let r = refused(
        admit(
            store,
            t,
            &[minute.clone(), open.clone(), hour.clone()],
            rid(),
            FAR,
        )
        .await?,
    );
    assert_eq!(r.blocking, vec![0, 2]);
    assert_eq!(r.retry_after_ms, Some(HOUR - 15_000));
    // One counter that never passes makes the whole request never pass.
    let never = fixed(&id(prefix, "never"), 0, Need::Fits, 1, 0);
    let r = refused(admit(store, t, &[minute, never], rid(), FAR).await?);
    assert_eq!((r.blocking, r.retry_after_ms), (vec![0, 1], None));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Token buckets.

/// agentgateway's example: 10 per minute with a burst of 5.
pub async fn bucket_burst_then_refill(store: Arc<dyn Store>, prefix: &str) -> Outcome {
    let store = &*store;
    let t0 = epoch();
    let op = bucket(&id(prefix, "bucket"), 10, MINUTE, 5, 1, 0);
    for i in 0..15 {
        let snap = single(admitted(admit_one(store, t0, &op, rid(), FAR).await?));
        assert_eq!((snap.limit, snap.value, snap.window_start), (15, i, 0));
    }
    let r = refused(admit_one(store, t0, &op, rid(), FAR).await?);
    let snap = single(r.snapshots);
    assert_eq!((snap.value, snap.reset_at), (15, t0 + 15 * 6_000));
    assert_eq!(r.retry_after_ms, Some(6_000));
    let r = refused(admit_one(store, t0 + 5_999, &op, rid(), FAR).await?);
    assert_eq!(r.retry_after_ms, Some(1));
    take(store, t0 + 6_000, &op, FAR).await?;
    let r = refused(admit_one(store, t0 + 6_000, &op, rid(), FAR).await?);
    assert_eq!(r.retry_after_ms, Some(6_000));
    // Refilled completely after 90 s idle, and never beyond the capacity.
    let full = probe(store, t0 + 6_000 + 10 * HOUR, &op).await?;
    assert_eq!((full.value, full.remaining()), (0, 15));
    Ok(())
}

/// 3 per second is 333.3… ms a token: no drift over many periods, and a token becomes
/// available exactly when it is whole.
pub async fn bucket_refill_is_exact(store: Arc<dyn Store>, prefix: &str) -> Outcome {
    let store = &*store;
    let t0 = epoch();
    let op = bucket(&id(prefix, "bucket"), 3, 1_000, 0, 1, 0);
    for second in 0..100 {
        let t = t0 + second * 1_000;
        for _ in 0..3 {
            take(store, t, &op, FAR).await?;
        }
        let r = refused(admit_one(store, t, &op, rid(), FAR).await?);
        assert_eq!(r.retry_after_ms, Some(334), "second {second}");
    }
    let t = t0 + 99_000;
    // 333 ms refill 0.999 of a token; 334 ms refill 1.002.
    refused(admit_one(store, t + 333, &op, rid(), FAR).await?);
    take(store, t + 334, &op, FAR).await?;
    refused(admit_one(store, t + 666, &op, rid(), FAR).await?);
    take(store, t + 667, &op, FAR).await?;
    take(store, t + 1_000, &op, FAR).await?;
    refused(admit_one(store, t + 1_000, &op, rid(), FAR).await?);
    Ok(())
}

pub async fn bucket_settlement_charges_tokens(store: Arc<dyn Store>, prefix: &str) -> Outcome {
    let store = &*store;
    let t0 = epoch();
    let b = id(prefix, "bucket");
    // 60 per minute: one token a second.
    let s = take(store, t0, &bucket(&b, 60, MINUTE, 0, 0, 50), FAR).await?;
    let held = probe(store, t0, &bucket(&b, 60, MINUTE, 0, 0, 0)).await?;
    assert_eq!((held.value, held.reserved), (0, 50));
    let r = refused(admit(store, t0, &[bucket(&b, 60, MINUTE, 0, 0, 11)], rid(), FAR).await?);
    // Reservations do not refill: waiting for them is bounded by their deadline.
    assert!(r.retry_after_ms.is_some());
    settle(store, t0, &s, 70).await?;
    let spent = probe(store, t0, &bucket(&b, 60, MINUTE, 0, 0, 0)).await?;
    assert_eq!((spent.value, spent.reserved), (70, 0));
    // 70 spent of 60: the bucket is in debt; back to 59 spent takes 11 s of refill.
    let r = refused(admit(store, t0, &[bucket(&b, 60, MINUTE, 0, 1, 0)], rid(), FAR).await?);
    assert_eq!(r.retry_after_ms, Some(11_000));
    take(store, t0 + 11_000, &bucket(&b, 60, MINUTE, 0, 1, 0), FAR).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Concurrency.

pub async fn concurrency_counter(store: Arc<dyn Store>, prefix: &str) -> Outcome {
    let store = &*store;
    let t0 = epoch();
    let before = store.outstanding_reservations();
    let op = in_flight(&id(prefix, "inflight"), 2);
    let first = take(store, t0, &op, t0 + 30_000).await?;
    let second = take(store, t0 + 1, &op, t0 + 20_000).await?;
    assert_eq!(second.window_start, 0);
    let r = refused(admit_one(store, t0 + 1_000, &op, rid(), FAR).await?);
    let snap = single(r.snapshots);
    assert_eq!(
        (
            snap.limit,
            snap.value,
            snap.reserved,
            snap.window_start,
            snap.reset_at
        ),
        (2, 0, 2, 0, t0 + 1_000)
    );
    // The soonest deadline bounds the wait.
    assert_eq!(r.retry_after_ms, Some(19_000));
    // Spending is meaningless here: settling only frees the slot.
    settle(store, t0 + 2_000, &first, 1_000).await?;
    let third = take(store, t0 + 2_000, &op, t0 + 60_000).await?;
    refused(admit_one(store, t0 + 2_000, &op, rid(), FAR).await?);
    // The second call never ends: its slot comes back at its deadline.
    take(store, t0 + 20_000, &op, FAR).await?;
    settle(store, t0 + 21_000, &third, 0).await?;
    settle(store, t0 + 21_000, &second, 0).await?;
    assert_eq!(store.outstanding_reservations(), before + 1);
    let now = probe(store, t0 + 21_000, &op).await?;
    assert_eq!((now.value, now.reserved), (0, 1));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Windows, inspection, configuration changes.

pub async fn staggered_windows_roll_at_their_own_offsets(
    store: Arc<dyn Store>,
    prefix: &str,
) -> Outcome {
    let store = &*store;
    let t0 = epoch();
    let (a, b) = (id(prefix, "a"), id(prefix, "b"));
    let wa = Window::staggered(MINUTE, a.as_str());
    let wb = Window::staggered(MINUTE, b.as_str());
    let op_a = with_window(fixed(&a, 1, Need::Fits, 1, 0), wa);
    let op_b = with_window(fixed(&b, 1, Need::Fits, 1, 0), wb);
    let t = t0 + 5 * MINUTE;
    let sa = single(admitted(admit_one(store, t, &op_a, rid(), FAR).await?));
    let sb = single(admitted(admit_one(store, t, &op_b, rid(), FAR).await?));
    assert_eq!((sa.window_start, sa.reset_at), (wa.start(t), wa.end(t)));
    assert_eq!((sb.window_start, sb.reset_at), (wb.start(t), wb.end(t)));
    assert_eq!(sa.window_start % MINUTE, wa.offset_ms);

    let (first, later, first_end, later_end) = if wa.end(t) <= wb.end(t) {
        (&op_a, &op_b, wa.end(t), wb.end(t))
    } else {
        (&op_b, &op_a, wb.end(t), wa.end(t))
    };
    let r = refused(admit_one(store, first_end - 1, first, rid(), FAR).await?);
    assert_eq!(r.retry_after_ms, Some(1));
    take(store, first_end, first, FAR).await?;
    if later_end > first_end {
        let r = refused(admit_one(store, first_end, later, rid(), FAR).await?);
        assert_eq!(r.retry_after_ms, Some(later_end - first_end));
    }
    take(store, later_end, later, FAR).await?;
    Ok(())
}

pub async fn inspect_and_reset(store: Arc<dyn Store>, prefix: &str) -> Outcome {
    let store = &*store;
    let t0 = epoch();
    let t = t0 + 1_000;
    let (a, b) = (id(prefix, "inspect/a"), id(prefix, "inspect/b"));
    let other = id(prefix, "other");
    take(store, t, &fixed(&a, 10, Need::Fits, 3, 0), FAR).await?;
    take(store, t, &fixed(&b, 20, Need::Fits, 1, 4), FAR).await?;
    take(store, t, &fixed(&other, 10, Need::Fits, 1, 0), FAR).await?;

    let filter = InspectFilter {
        prefix: Some(format!("{prefix}inspect/")),
    };
    let mut views = store.inspect(t, &filter).await?;
    views.sort_by(|x, y| x.id.cmp(&y.id));
    let summary: Vec<_> = views
        .iter()
        .map(|v| {
            (
                v.id.as_str(),
                v.limit,
                v.value,
                v.reserved,
                v.remaining,
                v.window_start,
                v.reset_at,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (a.as_str(), 10, 3, 0, 7, t0, t0 + MINUTE),
            (b.as_str(), 20, 1, 4, 15, t0, t0 + MINUTE),
        ]
    );
    assert!(views.iter().all(|v| v.kind == CounterKind::Requests));

    assert_eq!(store.reset(&a).await?, 1);
    assert_eq!(store.reset(&a).await?, 0);
    let views = store.inspect(t, &filter).await?;
    assert_eq!(
        views.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
        vec![b.as_str()]
    );
    assert_eq!(
        probe(store, t, &fixed(&a, 10, Need::Fits, 0, 0))
            .await?
            .value,
        0
    );
    Ok(())
}

pub async fn limit_change_keeps_spend(store: Arc<dyn Store>, prefix: &str) -> Outcome {
    let store = &*store;
    let t = epoch() + 1_000;
    let c = id(prefix, "requests");
    for _ in 0..8 {
        take(store, t, &fixed(&c, 10, Need::Fits, 1, 0), FAR).await?;
    }
    let r = refused(admit(store, t, &[fixed(&c, 5, Need::Fits, 1, 0)], rid(), FAR).await?);
    let snap = single(r.snapshots);
    assert_eq!((snap.limit, snap.value), (5, 8));
    let snap = single(admitted(
        admit(store, t, &[fixed(&c, 20, Need::Fits, 1, 0)], rid(), FAR).await?,
    ));
    assert_eq!((snap.limit, snap.value), (20, 8));

    let b = id(prefix, "bucket");
    for _ in 0..10 {
        take(store, t, &bucket(&b, 10, MINUTE, 0, 1, 0), FAR).await?;
    }
    // A larger bucket: the 10 spent stay spent.
    let snap = probe(store, t, &bucket(&b, 20, MINUTE, 5, 0, 0)).await?;
    assert_eq!((snap.limit, snap.value), (25, 10));
    Ok(())
}

pub async fn same_counter_twice_in_one_request(store: Arc<dyn Store>, prefix: &str) -> Outcome {
    let store = &*store;
    let t = epoch() + 1_000;
    let c = id(prefix, "tokens");
    let twice = |limit| {
        [
            fixed(&c, limit, Need::Fits, 3, 0),
            fixed(&c, limit, Need::Fits, 3, 0),
        ]
    };
    // Each op alone fits 5; together they do not.
    let r = refused(admit(store, t, &twice(5), rid(), FAR).await?);
    assert_eq!(r.blocking, vec![1]);
    assert_eq!(
        probe(store, t, &fixed(&c, 5, Need::Fits, 0, 0))
            .await?
            .value,
        0
    );
    admitted(admit(store, t, &twice(6), rid(), FAR).await?);
    assert_eq!(
        probe(store, t, &fixed(&c, 6, Need::Fits, 0, 0))
            .await?
            .value,
        6
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Concurrency of callers.

/// Many tasks admit and settle on overlapping counters (per-user, a shared tier, and an
/// in-flight limit) at once: no limit is ever exceeded, every settled unit is counted
/// exactly once, and the gauge comes back.
pub async fn concurrent_admissions_never_exceed_limits(
    store: Arc<dyn Store>,
    prefix: &str,
) -> Outcome {
    const TASKS: u64 = 8;
    const ROUNDS: u64 = 300;
    const USERS: u64 = 4;
    const USER_LIMIT: u64 = 500;
    const TIER_LIMIT: u64 = 1_500;
    const IN_FLIGHT: u64 = 3;

    let t0 = epoch() + 1_000;
    let before = store.outstanding_reservations();
    let tier = fixed(&id(prefix, "tier"), TIER_LIMIT, Need::Fits, 0, 0);
    let inflight = in_flight(&id(prefix, "inflight"), IN_FLIGHT);
    let users: Vec<CounterOp> = (0..USERS)
        .map(|u| {
            fixed(
                &id(prefix, &format!("user-{u}")),
                USER_LIMIT,
                Need::Fits,
                0,
                0,
            )
        })
        .collect();
    let spent: Arc<Vec<AtomicU64>> = Arc::new((0..USERS).map(|_| AtomicU64::new(0)).collect());
    let holding = Arc::new(AtomicU64::new(0));

    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (store, tier, inflight, spent, holding) = (
            Arc::clone(&store),
            tier.clone(),
            inflight.clone(),
            Arc::clone(&spent),
            Arc::clone(&holding),
        );
        let user = users.get((task % USERS) as usize).cloned();
        tasks.push(tokio::spawn(async move {
            let Some(user) = user else { return Ok(0) };
            let mut admitted_count = 0u64;
            for round in 0..ROUNDS {
                let now = t0 + round;
                let want = 1 + (task * 7 + round * 13) % 16;
                let ops = [
                    CounterOp {
                        reserve: want,
                        ..user.clone()
                    },
                    CounterOp {
                        reserve: want,
                        ..tier.clone()
                    },
                    inflight.clone(),
                ];
                let reservation = rid();
                let Admission::Admitted { snapshots } =
                    store.admit(now, &ops, reservation, FAR).await?
                else {
                    tokio::task::yield_now().await;
                    continue;
                };
                admitted_count += 1;
                let in_flight_now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                assert!(in_flight_now <= IN_FLIGHT, "{in_flight_now} in flight");
                tokio::task::yield_now().await;
                holding.fetch_sub(1, Ordering::SeqCst);
                let actual = if round % 4 == 0 { want / 2 } else { want };
                let settlements: Vec<Settlement> = ops
                    .iter()
                    .zip(snapshots)
                    .map(|(op, snap)| Settlement {
                        op: op.clone(),
                        window_start: snap.window_start,
                        reservation,
                        actual,
                    })
                    .collect();
                if let Some(s) = spent.get((task % USERS) as usize) {
                    s.fetch_add(actual, Ordering::SeqCst);
                }
                store.settle(now, &settlements).await?;
            }
            Ok::<u64, StoreError>(admitted_count)
        }));
    }
    let mut total_admitted = 0;
    for task in tasks {
        match task.await {
            Ok(result) => total_admitted += result?,
            Err(e) => panic!("task failed: {e}"),
        }
    }
    assert!(total_admitted > 0);

    let end = t0 + ROUNDS;
    let mut total = 0;
    for (user, spent) in users.iter().zip(spent.iter()) {
        let snap = probe(&*store, end, user).await?;
        let spent = spent.load(Ordering::SeqCst);
        assert_eq!((snap.value, snap.reserved), (spent, 0), "{}", user.id);
        assert!(snap.value <= USER_LIMIT);
        total += spent;
    }
    let tier_now = probe(&*store, end, &tier).await?;
    assert_eq!((tier_now.value, tier_now.reserved), (total, 0));
    assert!(tier_now.value <= TIER_LIMIT);
    // The tier did fill up: the limit was actually contended.
    assert!(
        tier_now.value > TIER_LIMIT - 16,
        "tier only reached {}",
        tier_now.value
    );
    assert_eq!(probe(&*store, end, &inflight).await?.reserved, 0);
    assert_eq!(store.outstanding_reservations(), before);
    Ok(())
}
