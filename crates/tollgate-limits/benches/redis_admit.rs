//! Redis admission: one request's admit + settle round trip against the local Redis
//! (127.0.0.1:6379, keys under a per-run prefix), for one counter and for three (user,
//! team, tier); one request at a time (latency) and 32 concurrent tasks sharing the one
//! multiplexed connection (throughput: time per request = 1 / requests per second).
//!
//! `cargo bench -p tollgate-limits --bench redis_admit -- --warm-up-time 1 --measurement-time 3`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use tollgate_limits::store::redis::{RedisConfig, RedisStore};
use tollgate_limits::store::{Admission, ReservationId, Settlement, Store};
use tollgate_limits::{Clock, CounterId, CounterKind, CounterOp, Need, Rate, SystemClock, Window};

const TASKS: u64 = 32;

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

static NEXT: AtomicU64 = AtomicU64::new(1);

/// One request's life on `ops`: admit (reserve), then settle every counter.
async fn admit_settle(store: &RedisStore, ops: &[CounterOp]) {
    let now = SystemClock.now_ms();
    let reservation = ReservationId(NEXT.fetch_add(1, Ordering::Relaxed));
    let Ok(Admission::Admitted { snapshots }) =
        store.admit(now, ops, reservation, now + 30_000).await
    else {
        panic!("refused or failed");
    };
    let settlements: Vec<Settlement> = ops
        .iter()
        .zip(&snapshots)
        .map(|(op, s)| Settlement {
            op: op.clone(),
            window_start: s.window_start,
            reservation,
            actual: 100,
        })
        .collect();
    if let Err(e) = store.settle(now, &settlements).await {
        panic!("settle: {e}");
    }
}

fn bench_redis(c: &mut Criterion) {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    let prefix = format!("tgbench-{}", std::process::id());
    let store = match rt.block_on(RedisStore::connect(RedisConfig {
        url: Some("redis://127.0.0.1:6379".into()),
        key_prefix: prefix,
        timeout_ms: 1_000,
        ..RedisConfig::default()
    })) {
        Ok(store) => Arc::new(store),
        Err(e) => {
            eprintln!("redis_admit: no Redis on 127.0.0.1:6379 ({e}); skipped");
            return;
        }
    };
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
    let mut group = c.benchmark_group("redis_admit_settle");
    group.throughput(Throughput::Elements(1));
    for (name, ops) in &cases {
        group.bench_function(format!("{name}/sequential"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        admit_settle(&store, ops).await;
                    }
                    started.elapsed()
                })
            });
        });
        group.bench_function(format!("{name}/32_tasks"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let started = Instant::now();
                    let per_task = iters.div_ceil(TASKS);
                    let tasks: Vec<_> = (0..TASKS)
                        .map(|_| {
                            let (store, ops) = (store.clone(), ops.clone());
                            tokio::spawn(async move {
                                for _ in 0..per_task {
                                    admit_settle(&store, &ops).await;
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        if let Err(e) = t.await {
                            panic!("task: {e}");
                        }
                    }
                    // Time per request: total time over the requests actually made.
                    let done = per_task * TASKS;
                    Duration::from_secs_f64(
                        started.elapsed().as_secs_f64() * iters as f64 / done.max(1) as f64,
                    )
                })
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench_redis);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
