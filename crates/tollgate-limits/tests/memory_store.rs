//! The store suite against [`MemoryStore`], plus what only the memory store promises:
//! the settlement grace, reclaiming memory, and its stats.

use tollgate_limits::store::memory::MemoryStore;
use tollgate_limits::store::suite::SUITE_SETTLE_GRACE_MS;

tollgate_limits::store_suite!(memory, || async { MemoryStore::new(SUITE_SETTLE_GRACE_MS) });

use tollgate_limits::store::memory::MemoryStats;
use tollgate_limits::store::{Admission, ReservationId, Settlement, Store};
use tollgate_limits::{CounterId, CounterKind, CounterOp, Need, Rate, Window};

const MINUTE: u64 = 60_000;
/// 2026-01-01T00:00:00Z: a fixed, minute-aligned start.
const T0: u64 = 1_767_225_600_000;

fn fixed(id: &str, limit: u64, commit: u64, reserve: u64) -> CounterOp {
    CounterOp {
        id: CounterId::from_encoded(id),
        kind: CounterKind::Tokens,
        rate: Rate::Fixed {
            limit,
            window: Window::aligned(MINUTE),
        },
        need: Need::Fits,
        commit,
        reserve,
        replica: false,
    }
}

fn bucket(id: &str, limit: u64, per_ms: u64, commit: u64) -> CounterOp {
    CounterOp {
        rate: Rate::Bucket {
            limit,
            per_ms,
            burst: 0,
        },
        ..fixed(id, 0, commit, 0)
    }
}

fn one(op: &CounterOp) -> &[CounterOp] {
    std::slice::from_ref(op)
}

fn settlement(op: &CounterOp, admitted: &Admission, r: u64, actual: u64) -> Settlement {
    let Admission::Admitted { snapshots } = admitted else {
        panic!("refused: {admitted:?}");
    };
    Settlement {
        op: op.clone(),
        window_start: snapshots[0].window_start,
        reservation: ReservationId(r),
        actual,
    }
}

fn value_at(store: &MemoryStore, now: u64, op: &CounterOp) -> (u64, u64) {
    let probe = CounterOp {
        need: Need::Room,
        commit: 0,
        reserve: 0,
        ..op.clone()
    };
    let snap = match store.admit_sync(now, one(&probe), ReservationId(0), now) {
        Ok(Admission::Admitted { snapshots }) => snapshots[0],
        Ok(Admission::Refused(r)) => r.snapshots[0],
        Err(e) => panic!("{e}"),
    };
    (snap.value, snap.reserved)
}

#[test]
fn settlement_within_grace_lands_after_it_is_dropped_and_counted() {
    let store = MemoryStore::new(10_000);
    let op = fixed("grace/a", 100, 0, 10);
    let a = store
        .admit_sync(T0 + 1_000, one(&op), ReservationId(1), T0 + 5 * MINUTE)
        .unwrap();
    let b = store
        .admit_sync(T0 + 2_000, one(&op), ReservationId(2), T0 + 5 * MINUTE)
        .unwrap();
    // Window [T0, T0+60s) is kept until T0+70s.
    store.sweep_sync(T0 + MINUTE + 9_999);
    assert_eq!(
        store.settle_sync(T0 + MINUTE + 9_999, &[settlement(&op, &a, 1, 7)]),
        0
    );
    let stats = store.sweep_sync(T0 + MINUTE + 10_000);
    assert_eq!(stats.windows_reclaimed, 1);
    // The hold went with its window.
    assert_eq!(store.outstanding_reservations(), 0);
    assert_eq!(
        store.settle_sync(T0 + MINUTE + 10_000, &[settlement(&op, &b, 2, 9)]),
        1
    );
    let s = store.stats();
    assert_eq!(
        (s.settlements_dropped, s.units_dropped, s.counters),
        (1, 9, 0)
    );
}

#[test]
fn late_settlement_recreates_a_reset_window_within_grace() {
    let store = MemoryStore::new(MINUTE);
    let op = fixed("late/a", 100, 0, 10);
    let a = store
        .admit_sync(T0 + 1_000, one(&op), ReservationId(1), T0 + MINUTE)
        .unwrap();
    assert_eq!(store.reset_sync(&op.id), 1);
    assert_eq!(store.outstanding_reservations(), 0);
    store.settle_sync(T0 + MINUTE + 1_000, &[settlement(&op, &a, 1, 42)]);
    let views = store.inspect_sync(T0 + MINUTE + 1_000, &Default::default());
    assert_eq!(views.len(), 1);
    assert_eq!((views[0].window_start, views[0].value), (T0, 42));
    assert_eq!(store.stats().settlements_dropped, 0);
}

#[test]
fn sweep_keeps_buckets_in_debt_and_drops_full_ones() {
    let store = MemoryStore::new(0);
    let op = bucket("sweep/bucket", 10, 1_000, 5);
    store
        .admit_sync(T0, one(&op), ReservationId(1), T0)
        .unwrap();
    store.sweep_sync(T0 + 499);
    assert_eq!(store.stats().counters, 1);
    assert_eq!(value_at(&store, T0 + 499, &op), (1, 0));
    store.sweep_sync(T0 + 500);
    assert_eq!(store.stats().counters, 0);
}

#[test]
fn bucket_keeps_its_spend_when_the_period_changes() {
    let store = MemoryStore::new(0);
    let op = bucket("rescale/b", 10, MINUTE, 10);
    store
        .admit_sync(T0, one(&op), ReservationId(1), T0)
        .unwrap();
    // Same tokens missing, now refilling twice as fast.
    let faster = bucket("rescale/b", 10, MINUTE / 2, 0);
    assert_eq!(value_at(&store, T0, &faster), (10, 0));
    assert_eq!(value_at(&store, T0 + 3_000, &faster), (9, 0));
}

#[test]
fn a_different_kind_of_rate_starts_the_counter_afresh() {
    let store = MemoryStore::new(MINUTE);
    let op = fixed("kind/a", 100, 5, 10);
    store
        .admit_sync(T0, one(&op), ReservationId(1), T0 + MINUTE)
        .unwrap();
    assert_eq!(store.outstanding_reservations(), 1);
    let as_bucket = bucket("kind/a", 100, MINUTE, 0);
    assert_eq!(value_at(&store, T0, &as_bucket), (0, 0));
    assert_eq!(store.outstanding_reservations(), 0);
}

#[test]
fn time_going_backwards_is_harmless() {
    let store = MemoryStore::new(MINUTE);
    let op = bucket("back/b", 10, 1_000, 10);
    store
        .admit_sync(T0 + 5_000, one(&op), ReservationId(1), T0)
        .unwrap();
    // An admission that read the clock earlier refills nothing and panics nowhere.
    assert_eq!(value_at(&store, T0 + 4_000, &op), (10, 0));
    assert_eq!(value_at(&store, T0 + 5_100, &op), (9, 0));
    let f = fixed("back/f", 10, 1, 0);
    store
        .admit_sync(T0 + 2 * MINUTE, one(&f), ReservationId(2), T0)
        .unwrap();
    store.admit_sync(T0, one(&f), ReservationId(3), T0).unwrap();
    store.sweep_sync(0);
    assert_eq!(store.stats().windows, 2);
}

/// A million one-off users come and go: every counter is reclaimed, and the shards give
/// their memory back.
#[test]
fn a_million_counters_are_reclaimed() {
    const N: u64 = 1_000_000;
    let store = MemoryStore::new(MINUTE);
    let empty = store.stats().approx_bytes;
    for i in 0..N {
        let op = fixed(&format!("trlp/free/60000/user-{i}"), 100, 1, 0);
        let now = T0 + i % MINUTE;
        assert!(matches!(
            store.admit_sync(now, &[op], ReservationId(i), now).unwrap(),
            Admission::Admitted { .. }
        ));
    }
    let full: MemoryStats = store.stats();
    assert_eq!((full.counters, full.windows), (N, N));
    println!(
        "{} counters: ~{} bytes each (estimate)",
        full.counters,
        (full.approx_bytes - empty) / N
    );
    // Still in grace: kept.
    assert_eq!(store.sweep_sync(T0 + 2 * MINUTE - 1).windows_reclaimed, 0);
    let stats = store.sweep_sync(T0 + 2 * MINUTE);
    assert_eq!(stats.windows_reclaimed, N);
    let after = store.stats();
    assert_eq!((after.counters, after.windows), (0, 0));
    assert!(after.approx_bytes < full.approx_bytes / 100, "{after:?}");
}
