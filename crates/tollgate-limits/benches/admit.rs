//! In-memory admission: admit + settle for one counter and for three (user, team, tier),
//! single thread. Also prints the memory a million one-off counters take.
//!
//! `cargo bench -p tollgate-limits --bench admit -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, Criterion};
use tollgate_limits::store::memory::MemoryStore;
use tollgate_limits::store::{Admission, ReservationId, Settlement};
use tollgate_limits::{CounterId, CounterKind, CounterOp, Need, Rate, Window};

const T0: u64 = 1_767_225_600_000;

fn op(id: &str, need: Need, commit: u64, reserve: u64) -> CounterOp {
    CounterOp {
        id: CounterId::from_encoded(id),
        kind: CounterKind::Tokens,
        rate: Rate::Fixed {
            limit: u64::MAX / 2,
            window: Window::aligned(60_000),
        },
        need,
        commit,
        reserve,
        replica: false,
    }
}

/// One request's life on `ops`: admit (reserve), then settle every counter.
fn admit_settle(store: &MemoryStore, ops: &[CounterOp], i: u64, settlements: &mut Vec<Settlement>) {
    // A few requests per millisecond, so windows roll over now and then as in real life.
    let now = T0 + i / 4;
    let reservation = ReservationId(i);
    let Ok(Admission::Admitted { snapshots }) =
        store.admit_sync(now, ops, reservation, now + 30_000)
    else {
        panic!("refused");
    };
    settlements.clear();
    settlements.extend(ops.iter().zip(&snapshots).map(|(op, s)| Settlement {
        op: op.clone(),
        window_start: s.window_start,
        reservation,
        actual: 100,
    }));
    black_box(store.settle_sync(now, settlements));
}

fn bench_admit(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory_admit_settle");
    let cases = [
        (
            "1_counter",
            vec![op("trlp/free/60000/user-1", Need::Fits, 0, 500)],
        ),
        (
            "3_counters",
            vec![
                op("trlp/user/60000/user-1", Need::Fits, 0, 500),
                op("trlp/team/60000/team-7", Need::Room, 0, 0),
                op("rlp/tier/60000/free", Need::Fits, 1, 0),
            ],
        ),
    ];
    for (name, ops) in cases {
        let store = MemoryStore::new(60_000);
        let mut settlements = Vec::new();
        let mut i = 0u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                i += 1;
                admit_settle(&store, &ops, i, &mut settlements);
            })
        });
        // Nothing leaked: every reservation was settled.
        assert_eq!(tollgate_limits::Store::outstanding_reservations(&store), 0);
    }
    group.finish();
}

/// Resident memory, from /proc (Linux); 0 elsewhere.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn memory_per_counter() {
    const N: u64 = 1_000_000;
    let store = MemoryStore::new(60_000);
    let rss_before = rss_bytes();
    let start = std::time::Instant::now();
    for i in 0..N {
        let op = op(&format!("trlp/free/60000/user-{i}"), Need::Fits, 1, 0);
        let now = T0 + i % 60_000;
        black_box(store.admit_sync(now, &[op], ReservationId(i), now).is_ok());
    }
    let created = start.elapsed();
    let stats = store.stats();
    let rss_full = rss_bytes();
    let start = std::time::Instant::now();
    let swept = store.sweep_sync(T0 + 180_000);
    let sweep_time = start.elapsed();
    let after = store.stats();
    println!(
        "memory: {} counters, estimate {} B/counter, RSS +{} B/counter; \
         created in {:?} ({} ns each); sweep reclaimed {} windows in {:?}; {} counters left, \
         RSS after sweep +{} MB",
        stats.counters,
        stats.approx_bytes / N,
        rss_full.saturating_sub(rss_before) / N,
        created,
        created.as_nanos() / u128::from(N),
        swept.windows_reclaimed,
        sweep_time,
        after.counters,
        rss_bytes().saturating_sub(rss_before) / 1_000_000,
    );
}

criterion_group!(benches, bench_admit);

fn main() {
    memory_per_counter();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
