#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The store suite against Redis — the shared server on 127.0.0.1:6379 and a 3-node
//! Redis Cluster this binary starts — plus what only Redis needs: keys spread over the
//! shards, cross-slot compensation, connecting while Redis is down, scripts reloaded
//! after a restart, and the resilient store losing and regaining its primary.
//!
//! Servers this binary starts run under a small `sh` wrapper that kills them when our
//! end of its stdin closes, so they go away with the test process however it ends.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tollgate_limits::store::redis::{RedisConfig, RedisStore};
use tollgate_limits::store::resilient::{OnError, ResilientStore, StoreState};
use tollgate_limits::store::suite::SUITE_SETTLE_GRACE_MS;
use tollgate_limits::store::{
    Admission, CounterSnapshot, ReservationId, Settlement, Store, StoreError,
};
use tollgate_limits::{
    Clock, CounterId, CounterKind, CounterOp, MemoryStore, Need, Rate, SystemClock, Window,
};

const SHARED_URL: &str = "redis://127.0.0.1:6379";

/// Unique per run: keys of earlier runs on the shared server never meet ours.
fn run_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("tgtest-{}-{nanos}", std::process::id())
    })
}

fn config(url: Option<String>, cluster: Option<Vec<String>>) -> RedisConfig {
    RedisConfig {
        url,
        cluster,
        key_prefix: run_id().to_owned(),
        // Generous: the box is shared and the suite hammers the server.
        timeout_ms: 2_000,
        connect_timeout_ms: 5_000,
        settle_grace_ms: SUITE_SETTLE_GRACE_MS,
        ..RedisConfig::default()
    }
}

tollgate_limits::store_suite!(redis, prefix = format!("{}/single/", run_id()), || async {
    shared_store().await
});

// The same contract with settlements held and added up before they are written
// (`storage.redis.batching`): a settlement still returns only once it is written.
tollgate_limits::store_suite!(
    redis_batching,
    prefix = format!("{}/batching/", run_id()),
    || async {
        RedisStore::connect(RedisConfig {
            batch_interval_ms: 2,
            ..config(Some(SHARED_URL.into()), None)
        })
        .await
        .unwrap()
    }
);

tollgate_limits::store_suite!(
    redis_cluster,
    prefix = format!("{}/cluster/", run_id()),
    || async { cluster_store().await }
);

// ---------------------------------------------------------------------------------------
// Servers started by this binary.

/// A `redis-server` child on a loopback port, killed when dropped or when this process
/// ends (the wrapper shell reads its stdin until EOF, then kills the server).
struct RedisProc {
    port: u16,
    pid: u32,
    wrapper: Child,
    stdin: Option<ChildStdin>,
}

impl RedisProc {
    fn start(port: u16, dir: &Path, extra: &[&str]) -> RedisProc {
        let script = r#"redis-server "$@" >/dev/null 2>&1 &
pid=$!
echo $pid
read _
kill -9 $pid 2>/dev/null
wait $pid 2>/dev/null"#;
        let port_s = port.to_string();
        let mut args = vec![
            "--port",
            port_s.as_str(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ];
        args.extend_from_slice(extra);
        let mut wrapper = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .args(&args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sh");
        let mut line = String::new();
        BufReader::new(wrapper.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid = line.trim().parse().expect("redis-server pid");
        let stdin = wrapper.stdin.take();
        let proc = RedisProc {
            port,
            pid,
            wrapper,
            stdin,
        };
        proc.wait_ready();
        proc
    }

    fn wait_ready(&self) {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if command(self.port, "PING").as_deref() == Some("+PONG") {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on {} did not start", self.port);
    }

    /// SIGKILL the server (no goodbye to clients).
    fn kill(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.pid.to_string()])
            .status();
        self.stdin.take();
        let _ = self.wrapper.wait();
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One inline command over a fresh connection; the first reply line.
fn command(port: u16, cmd: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).ok()?;
    let text = String::from_utf8_lossy(buf.get(..n)?).into_owned();
    Some(text.lines().next().unwrap_or_default().to_owned())
}

/// A loopback port that is free, and (for cluster nodes) whose bus port +10000 is too.
fn free_port(with_bus: bool) -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if !with_bus {
            return port;
        }
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{}-{name}", run_id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Cluster {
    nodes: Vec<RedisProc>,
}

impl Cluster {
    fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(RedisProc::url).collect()
    }
}

/// Three masters, no replicas, started once per test binary.
fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let dir = temp_dir("cluster");
        let nodes: Vec<RedisProc> = (0..3)
            .map(|i| {
                let conf = format!("nodes-{i}.conf");
                RedisProc::start(
                    free_port(true),
                    &dir,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &conf,
                        "--cluster-node-timeout",
                        "5000",
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(out.status.success(), "{out:?}");
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = nodes.iter().all(|n| {
                Command::new("redis-cli")
                    .args(["-p", &n.port.to_string(), "cluster", "info"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
                    .unwrap_or(false)
            });
            if ok {
                break;
            }
            assert!(Instant::now() < until, "cluster never became ok");
            std::thread::sleep(Duration::from_millis(50));
        }
        Cluster { nodes }
    })
}

async fn cluster_store() -> RedisStore {
    let seeds = tokio::task::spawn_blocking(|| cluster().seeds())
        .await
        .unwrap();
    RedisStore::connect(config(None, Some(seeds)))
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Helpers.

const MINUTE: u64 = 60_000;

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

/// An after-mode token counter: a fixed one-minute window `id` that takes nothing at
/// admission and needs room under `limit`.
fn after_mode(id: &str, limit: u64) -> CounterOp {
    CounterOp {
        need: Need::Room,
        ..fixed(id, limit, 0, 0)
    }
}

/// A store on the shared Redis (each test keeps to key prefixes of its own).
async fn shared_store() -> RedisStore {
    RedisStore::connect(config(Some(SHARED_URL.into()), None))
        .await
        .unwrap()
}

fn rid() -> ReservationId {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1_000_000);
    ReservationId(NEXT.fetch_add(1, Ordering::Relaxed))
}

fn snapshots(a: Admission) -> Vec<CounterSnapshot> {
    match a {
        Admission::Admitted { snapshots } => snapshots,
        Admission::Refused(r) => r.snapshots,
    }
}

async fn value_of(store: &dyn Store, now: u64, op: &CounterOp) -> (u64, u64) {
    let probe = CounterOp {
        need: Need::Room,
        commit: 0,
        reserve: 0,
        ..op.clone()
    };
    let s = snapshots(store.admit(now, &[probe], rid(), now).await.unwrap());
    (s[0].value, s[0].reserved)
}

fn settlements(ops: &[CounterOp], a: &Admission, r: ReservationId, actual: u64) -> Vec<Settlement> {
    let Admission::Admitted { snapshots } = a else {
        panic!("refused: {a:?}");
    };
    ops.iter()
        .zip(snapshots)
        .map(|(op, s)| Settlement {
            op: op.clone(),
            window_start: s.window_start,
            reservation: r,
            actual,
        })
        .collect()
}

/// A plain charge of `actual` to a one-minute fixed window of `op` at `now`, made by hand
/// (no admission before it).
fn charge_at(op: &CounterOp, now: u64, actual: u64) -> Settlement {
    Settlement {
        op: op.clone(),
        window_start: Window::aligned(MINUTE).start(now),
        reservation: rid(),
        actual,
    }
}

// ---------------------------------------------------------------------------------------
// Cluster specifics.

/// Keys each cluster node holds under `pattern`.
async fn keys_per_node(pattern: &str) -> Vec<Vec<String>> {
    let ports: Vec<u16> =
        tokio::task::spawn_blocking(|| cluster().nodes.iter().map(|n| n.port).collect::<Vec<_>>())
            .await
            .unwrap();
    let mut out = Vec::new();
    for port in ports {
        let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let mut keys = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, page): (u64, Vec<String>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .unwrap();
            keys.extend(page);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        out.push(keys);
    }
    out
}

/// A gateway-wide counter and 30 users' counters: the users spread over all three
/// shards, while every key of the gateway counter sits on exactly one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_counters_spread_over_shards() {
    let store = cluster_store().await;
    let now = SystemClock.now_ms();
    let base = format!("{}/spread/", run_id());
    let gateway = fixed(&format!("{base}gateway."), 1_000_000, 1, 5);
    for u in 0..30 {
        let user = fixed(&format!("{base}user-{u}."), 1_000, 1, 5);
        let ops = [gateway.clone(), user];
        let r = rid();
        let a = store.admit(now, &ops, r, now + MINUTE).await.unwrap();
        assert!(matches!(a, Admission::Admitted { .. }));
    }
    let prefix = run_id();
    let per_node = keys_per_node(&format!("{{{prefix}:{base}*")).await;
    let with_keys = per_node.iter().filter(|k| !k.is_empty()).count();
    assert_eq!(with_keys, 3, "{per_node:?}");
    let gateway_nodes = per_node
        .iter()
        .filter(|keys| keys.iter().any(|k| k.contains("gateway.")))
        .count();
    assert_eq!(gateway_nodes, 1);
    // State hash + holds set per counter.
    let total: usize = per_node.iter().map(Vec::len).sum();
    assert_eq!(total, 2 * 31);
    let (_, _, gw_slot) = store.keys_of(&gateway, 0);
    let (_, _, user_slot) = store.keys_of(&fixed(&format!("{base}user-0."), 1, 0, 0), 0);
    assert_ne!(gw_slot, user_slot);
}

/// Across slots, a refusal on one shard undoes what the others took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_refusal_rolls_back_other_slots() {
    let store = cluster_store().await;
    let now = SystemClock.now_ms();
    let base = format!("{}/rollback/", run_id());
    let ops: Vec<CounterOp> = (0..6)
        .map(|i| fixed(&format!("{base}c{i}."), 100, 3, 7))
        .collect();
    let slots: std::collections::HashSet<u16> =
        ops.iter().map(|op| store.keys_of(op, 0).2).collect();
    assert!(slots.len() > 1);
    let full = fixed(&format!("{base}full."), 0, 1, 0);
    let mut all = ops.clone();
    all.push(full);
    let before = store.outstanding_reservations();
    match store.admit(now, &all, rid(), now + MINUTE).await.unwrap() {
        Admission::Refused(r) => assert_eq!(r.blocking, vec![6]),
        a => panic!("{a:?}"),
    }
    for op in &ops {
        assert_eq!(value_of(&store, now, op).await, (0, 0), "{}", op.id);
    }
    assert_eq!(store.outstanding_reservations(), before);
    assert!(store.stats().rollbacks >= 1);
    // And without the full counter, everything is taken.
    let r = rid();
    let a = store.admit(now, &ops, r, now + MINUTE).await.unwrap();
    for op in &ops {
        assert_eq!(value_of(&store, now, op).await, (3, 7));
    }
    store
        .settle(now, &settlements(&ops, &a, r, 4))
        .await
        .unwrap();
    for op in &ops {
        assert_eq!(value_of(&store, now, op).await, (7, 0));
    }
}

// ---------------------------------------------------------------------------------------
// Connections.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_nothing_fails_fast() {
    let port = free_port(false);
    let cfg = RedisConfig {
        url: Some(format!("redis://127.0.0.1:{port}")),
        key_prefix: run_id().to_owned(),
        timeout_ms: 50,
        connect_timeout_ms: 200,
        ..RedisConfig::default()
    };
    let started = Instant::now();
    let err = RedisStore::connect(cfg.clone()).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // A lazy store starts anyway, fails fast while nobody listens, and works once
    // a server appears on that port.
    let store = RedisStore::new_lazy(cfg).unwrap();
    let op = fixed(&format!("{}/lazy/a.", run_id()), 10, 1, 0);
    let now = SystemClock.now_ms();
    for _ in 0..3 {
        let started = Instant::now();
        assert!(store
            .admit(now, std::slice::from_ref(&op), rid(), now)
            .await
            .is_err());
        assert!(started.elapsed() < Duration::from_millis(500));
    }
    let dir = temp_dir("lazy");
    let _server = RedisProc::start(port, &dir, &[]);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if store
            .admit(now, std::slice::from_ref(&op), rid(), now)
            .await
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < until, "lazy store never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(value_of(&store, now, &op).await.0, 1);
}

/// After `SCRIPT FLUSH` (as after a restart) the scripts are loaded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_are_reloaded_after_flush() {
    let dir = temp_dir("noscript");
    let server = RedisProc::start(free_port(false), &dir, &[]);
    let store = RedisStore::connect(config(Some(server.url()), None))
        .await
        .unwrap();
    let op = fixed(&format!("{}/noscript/a.", run_id()), 10, 1, 0);
    let now = SystemClock.now_ms();
    store
        .admit(now, std::slice::from_ref(&op), rid(), now)
        .await
        .unwrap();
    assert_eq!(command(server.port, "SCRIPT FLUSH").as_deref(), Some("+OK"));
    store
        .admit(now, std::slice::from_ref(&op), rid(), now)
        .await
        .unwrap();
    assert_eq!(value_of(&store, now, &op).await.0, 2);
    store.ping().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// The resilient store against a Redis that dies and comes back.

struct Load {
    admitted: u64,
    errors: u64,
    slowest: Duration,
}

/// `tasks` tasks admit and settle on shared counters until `stop`.
async fn load(
    store: Arc<ResilientStore>,
    tasks: u64,
    base: String,
    stop: Arc<tokio::sync::Notify>,
) -> Load {
    let mut handles = Vec::new();
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stopped = stopped.clone();
        tokio::spawn(async move {
            stop.notified().await;
            stopped.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    }
    for t in 0..tasks {
        let (store, base, stopped) = (store.clone(), base.clone(), stopped.clone());
        handles.push(tokio::spawn(async move {
            let mut out = Load {
                admitted: 0,
                errors: 0,
                slowest: Duration::ZERO,
            };
            let ops = [
                fixed(&format!("{base}tier."), u64::MAX / 4, 0, 10),
                fixed(&format!("{base}user-{}.", t % 4), u64::MAX / 4, 1, 0),
            ];
            while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
                // The local fallback never waits: give the other tasks their turn.
                tokio::task::yield_now().await;
                let now = SystemClock.now_ms();
                let r = rid();
                let started = Instant::now();
                let admitted = store.admit(now, &ops, r, now + MINUTE).await;
                out.slowest = out.slowest.max(started.elapsed());
                match admitted {
                    Ok(a @ Admission::Admitted { .. }) => {
                        out.admitted += 1;
                        let started = Instant::now();
                        store
                            .settle(now, &settlements(&ops, &a, r, 3))
                            .await
                            .unwrap();
                        out.slowest = out.slowest.max(started.elapsed());
                    }
                    Ok(Admission::Refused(r)) => panic!("refused: {r:?}"),
                    Err(_) => {
                        out.errors += 1;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            out
        }));
    }
    let mut total = Load {
        admitted: 0,
        errors: 0,
        slowest: Duration::ZERO,
    };
    for h in handles {
        let l = h.await.unwrap();
        total.admitted += l.admitted;
        total.errors += l.errors;
        total.slowest = total.slowest.max(l.slowest);
    }
    total
}

const TIMEOUT_MS: u64 = 50;

async fn resilient_over(
    server: &RedisProc,
    mode: OnError,
    max_deferred: usize,
) -> (Arc<RedisStore>, Arc<ResilientStore>) {
    let redis = Arc::new(
        RedisStore::connect(RedisConfig {
            url: Some(server.url()),
            key_prefix: run_id().to_owned(),
            timeout_ms: TIMEOUT_MS,
            settle_grace_ms: SUITE_SETTLE_GRACE_MS,
            ..RedisConfig::default()
        })
        .await
        .unwrap(),
    );
    let store = Arc::new(
        ResilientStore::new(
            redis.clone(),
            MemoryStore::new(SUITE_SETTLE_GRACE_MS),
            mode,
            max_deferred,
        )
        .with_probe_interval(Duration::from_millis(100)),
    );
    (redis, store)
}

async fn wait_healthy(store: &ResilientStore, op: &CounterOp) {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let now = SystemClock.now_ms();
        let _ = store.admit(now, &[probe(op)], rid(), now).await;
        if store.state() == StoreState::Healthy {
            return;
        }
        assert!(
            Instant::now() < until,
            "never recovered: {:?}",
            store.state()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn probe(op: &CounterOp) -> CounterOp {
    CounterOp {
        need: Need::Room,
        commit: 0,
        reserve: 0,
        ..op.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_survives_redis_dying_and_writes_deferred_settlements_back() {
    let dir = temp_dir("fail-open");
    let mut server = RedisProc::start(free_port(false), &dir, &[]);
    let port = server.port;
    let (redis, store) = resilient_over(&server, OnError::FailOpen, 10_000).await;
    let base = format!("{}/fail-open/", run_id());

    // Requests admitted by Redis, to be settled while it is gone.
    let pending_op = fixed(&format!("{base}pending."), 1_000_000, 0, 10);
    let mut pending = Vec::new();
    for _ in 0..20 {
        let now = SystemClock.now_ms();
        let r = rid();
        let a = store
            .admit(now, std::slice::from_ref(&pending_op), r, now + 10 * MINUTE)
            .await
            .unwrap();
        pending.push(settlements(std::slice::from_ref(&pending_op), &a, r, 7));
    }
    let window_start = pending[0][0].window_start;
    assert!(pending.iter().all(|s| s[0].window_start == window_start));

    let stop = Arc::new(tokio::sync::Notify::new());
    let running = tokio::spawn(load(store.clone(), 8, base.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        matches!(store.state(), StoreState::Degraded { .. }),
        "{:?}",
        store.state()
    );
    for s in &pending {
        store.settle(SystemClock.now_ms(), s).await.unwrap();
    }
    // Ours, and those of load requests Redis admitted just before it died.
    assert!(store.deferred_settlements() >= 20);
    stop.notify_one();
    let result = running.await.unwrap();
    eprintln!(
        "fail-open under load: {} admitted ({} locally), slowest call {:?}",
        result.admitted,
        store.stats().local_admissions,
        result.slowest
    );
    assert_eq!(result.errors, 0);
    assert!(result.admitted > 0);
    assert!(store.stats().local_admissions > 0);
    // No call waited much past the store's timeout (generous bound for a shared box).
    assert!(
        result.slowest < Duration::from_millis(10 * TIMEOUT_MS),
        "slowest call {:?}",
        result.slowest
    );

    // Back on the same port (empty: nothing was saved). The same store recovers and
    // writes the deferred settlements into the admission window.
    let server = RedisProc::start(port, &dir, &[]);
    wait_healthy(&store, &pending_op).await;
    let now = SystemClock.now_ms();
    store.sweep(now).await.unwrap();
    assert_eq!(store.deferred_settlements(), 0);
    assert_eq!(store.dropped_settlements(), 0);
    let at = if Window::aligned(MINUTE).start(now) == window_start {
        now
    } else {
        window_start
    };
    assert_eq!(value_of(&*redis, at, &pending_op).await, (20 * 7, 0));
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_returns_errors_quickly_and_recovers() {
    let dir = temp_dir("fail-closed");
    let mut server = RedisProc::start(free_port(false), &dir, &[]);
    let port = server.port;
    let (_redis, store) = resilient_over(&server, OnError::FailClosed, 2).await;
    let op = fixed(&format!("{}/fail-closed/a.", run_id()), 1_000, 1, 0);
    let now = SystemClock.now_ms();
    let r = rid();
    let a = store
        .admit(now, std::slice::from_ref(&op), r, now + MINUTE)
        .await
        .unwrap();
    let owed = settlements(std::slice::from_ref(&op), &a, r, 5);

    server.kill();
    for i in 0..20 {
        let started = Instant::now();
        let now = SystemClock.now_ms();
        let result = store
            .admit(now, std::slice::from_ref(&op), rid(), now + MINUTE)
            .await;
        assert!(result.is_err(), "call {i} admitted with Redis down");
        assert!(
            started.elapsed() < Duration::from_millis(10 * TIMEOUT_MS),
            "call {i} took {:?}",
            started.elapsed()
        );
    }
    assert!(matches!(store.state(), StoreState::Degraded { .. }));
    // Settlements are kept, within the bound; beyond it the oldest are dropped, counted.
    for _ in 0..3 {
        store.settle(now, &owed).await.unwrap();
    }
    assert_eq!(
        (store.deferred_settlements(), store.dropped_settlements()),
        (2, 1)
    );

    let _server = RedisProc::start(port, &dir, &[]);
    wait_healthy(&store, &op).await;
    let now = SystemClock.now_ms();
    assert_eq!(store.flush_deferred(now).await.unwrap(), 2);
    store
        .admit(now, std::slice::from_ref(&op), rid(), now + MINUTE)
        .await
        .unwrap();
}

/// A primary that always fails: the fallback's bookkeeping, without a network.
struct Broken;

#[async_trait::async_trait]
impl Store for Broken {
    async fn admit(
        &self,
        _: u64,
        _: &[CounterOp],
        _: ReservationId,
        _: u64,
    ) -> Result<Admission, StoreError> {
        Err(StoreError::Unavailable("broken".into()))
    }
    async fn settle(&self, _: u64, _: &[Settlement]) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("broken".into()))
    }
    async fn inspect(
        &self,
        _: u64,
        _: &tollgate_limits::InspectFilter,
    ) -> Result<Vec<tollgate_limits::CounterView>, StoreError> {
        Err(StoreError::Unavailable("broken".into()))
    }
    async fn reset(&self, _: &CounterId) -> Result<u64, StoreError> {
        Err(StoreError::Unavailable("broken".into()))
    }
    async fn sweep(&self, _: u64) -> Result<tollgate_limits::SweepStats, StoreError> {
        Err(StoreError::Unavailable("broken".into()))
    }
    async fn roll_back(&self, _: u64, _: &[CounterOp], _: ReservationId) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("broken".into()))
    }
    fn outstanding_reservations(&self) -> u64 {
        0
    }
}

#[tokio::test]
async fn local_admissions_settle_locally() {
    let store = ResilientStore::new(
        Arc::new(Broken),
        MemoryStore::new(MINUTE),
        OnError::FailOpen,
        10,
    );
    let op = fixed("local/a.", 100, 0, 40);
    let t = 1_767_225_600_000;
    let r = rid();
    let a = store
        .admit(t, std::slice::from_ref(&op), r, t + MINUTE)
        .await
        .unwrap();
    assert_eq!(store.outstanding_reservations(), 1);
    assert!(matches!(store.state(), StoreState::Degraded { since_ms, .. } if since_ms == t));
    store
        .settle(t, &settlements(std::slice::from_ref(&op), &a, r, 25))
        .await
        .unwrap();
    // Released and charged on the local store; nothing owed to the primary.
    assert_eq!(store.outstanding_reservations(), 0);
    assert_eq!(store.deferred_settlements(), 0);
    assert_eq!(value_of(store.local(), t, &op).await, (25, 0));
    // Inspect falls back too.
    let views = store.inspect(t, &Default::default()).await.unwrap();
    assert_eq!(views.len(), 1);

    let closed = ResilientStore::new(
        Arc::new(Broken),
        MemoryStore::new(MINUTE),
        OnError::FailClosed,
        10,
    );
    assert!(closed
        .admit(t, std::slice::from_ref(&op), rid(), t)
        .await
        .is_err());
    assert!(closed.inspect(t, &Default::default()).await.is_err());
}

/// Every key the scripts leave behind carries an expiry, whatever path wrote it: pure
/// checks (after mode), reservations settled below and above the estimate, request
/// counts, a settlement landing in an ended window, refusals, buckets, concurrency
/// counters. (The scripts skip writes and expiry refreshes where nothing changes; this
/// is what keeps those shortcuts honest.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_has_an_expiry() {
    let store = shared_store().await;
    let now = SystemClock.now_ms();
    let base = format!("{}/ttl/", run_id());
    let after = after_mode(&format!("{base}after"), 100);
    let reserve = fixed(&format!("{base}reserve"), 100, 0, 10);
    let requests = CounterOp {
        kind: CounterKind::Requests,
        ..fixed(&format!("{base}requests"), 100, 1, 0)
    };
    let bucket = CounterOp {
        rate: Rate::Bucket {
            limit: 1_000,
            per_ms: MINUTE,
            burst: 0,
        },
        ..fixed(&format!("{base}bucket"), 0, 0, 5)
    };
    let conc = CounterOp {
        kind: CounterKind::InFlight,
        rate: Rate::Concurrency { limit: 4 },
        ..fixed(&format!("{base}conc"), 0, 1, 0)
    };
    let all = [after, reserve, requests, bucket, conc];
    for (i, actual) in [(0u64, 3u64), (1, 30), (2, 0)] {
        let at = now + i * 1_000;
        let r = rid();
        let a = store.admit(at, &all, r, at + 30_000).await.unwrap();
        store
            .settle(at, &settlements(&all, &a, r, actual))
            .await
            .unwrap();
    }
    // Admitted in this window, settled after it ended (within grace).
    let r = rid();
    let a = store.admit(now, &all, r, now + 30_000).await.unwrap();
    store
        .settle(now + MINUTE, &settlements(&all, &a, r, 7))
        .await
        .unwrap();
    // A refusal: the reserve counter cannot fit 1000.
    let greedy = fixed(&format!("{base}reserve"), 100, 0, 1_000);
    assert!(matches!(
        store
            .admit(now, &[greedy], rid(), now + 30_000)
            .await
            .unwrap(),
        Admission::Refused(_)
    ));
    // A hold left unsettled.
    store
        .admit(now, &all[1..2], rid(), now + 30_000)
        .await
        .unwrap();

    let client = ::redis::Client::open(SHARED_URL).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pattern = format!("*{base}*");
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, page): (u64, Vec<String>) = ::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.extend(page);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    // State hashes of all five counters, and the holds of the unsettled reservation.
    for part in [
        "after:w:",
        "reserve:w:",
        "requests:w:",
        "bucket:b",
        "conc:c",
    ] {
        assert!(keys.iter().any(|k| k.contains(part)), "{part}: {keys:?}");
    }
    assert!(keys.iter().any(|k| k.ends_with(":h")), "holds: {keys:?}");
    for k in &keys {
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0, "{k} has no expiry (PTTL {ttl})");
    }
}

/// Read-only admissions of one counter that arrive together share one `HMGET`; once a
/// write of the store has landed, the next ones read again and see it.
#[tokio::test]
async fn concurrent_reads_of_one_counter_share_one_round_trip() {
    let store = shared_store().await;
    let now = SystemClock.now_ms();
    let tokens = after_mode(&format!("{}/shared-reads/tokens", run_id()), 1_000);
    let one = std::slice::from_ref(&tokens);
    let mut spent = 0;
    for charge in [40, 5] {
        let r = rid();
        let a = store.admit(now, one, r, 0).await.unwrap();
        store
            .settle(now, &settlements(one, &a, r, charge))
            .await
            .unwrap();
        spent += charge;
        let (sent, joined) = store.shared_read_counts();
        // All first polled before the leader's answer can arrive (one thread).
        let together = (0..20).map(|_| store.admit(now, one, rid(), 0));
        for a in futures_util::future::join_all(together).await {
            assert_eq!(snapshots(a.unwrap())[0].value, spent);
        }
        let (sent_after, joined_after) = store.shared_read_counts();
        assert_eq!((sent_after - sent, joined_after - joined), (1, 19));
    }
    // A read out while a charge lands is not joined after it: the next request reads
    // again and sees the charge.
    let (sent, joined) = store.shared_read_counts();
    let mut early = Box::pin(store.admit(now, one, rid(), 0));
    assert!(futures_util::future::poll_immediate(&mut early)
        .await
        .is_none());
    // (A settlement made by hand: an admission now would join the early read, whose
    // leader this test holds unpolled.)
    store
        .settle(now, &[charge_at(&tokens, now, 7)])
        .await
        .unwrap();
    let late = store.admit(now, one, rid(), 0).await.unwrap();
    assert_eq!(snapshots(late)[0].value, spent + 7);
    assert_eq!(snapshots(early.await.unwrap())[0].value, spent);
    assert_eq!(store.shared_read_counts(), (sent + 2, joined));
    spent += 7;
    // Reads of different counters are not shared.
    let other = after_mode(&format!("{}/shared-reads/other", run_id()), 1_000);
    let (sent, joined) = store.shared_read_counts();
    let (a, b) = tokio::join!(
        store.admit(now, one, rid(), 0),
        store.admit(now, std::slice::from_ref(&other), rid(), 0)
    );
    assert_eq!(
        (
            snapshots(a.unwrap())[0].value,
            snapshots(b.unwrap())[0].value
        ),
        (spent, 0)
    );
    assert_eq!(store.shared_read_counts(), (sent + 2, joined));
}

/// A batch of charges is a read too: admissions of its counter that arrive while it is out
/// take its reply (the counter's value after the charge) instead of sending an `HMGET`.
#[tokio::test]
async fn admissions_join_a_charge_that_is_out() {
    let store = shared_store().await;
    let now = SystemClock.now_ms();
    let tokens = after_mode(&format!("{}/charge-reads/tokens", run_id()), 1_000);
    let one = std::slice::from_ref(&tokens);
    store
        .settle(now, &[charge_at(&tokens, now, 30)])
        .await
        .unwrap();
    let (sent, joined) = store.shared_read_counts();
    let second = [charge_at(&tokens, now, 12)];
    let mut settle = Box::pin(store.settle(now, &second));
    // One pass of the scheduler, then the call goes out.
    for _ in 0..2 {
        assert!(futures_util::future::poll_immediate(&mut settle)
            .await
            .is_none());
    }
    let admissions =
        futures_util::future::join_all((0..5).map(|_| store.admit(now, one, rid(), 0)));
    let (settled, admitted) = tokio::join!(settle, admissions);
    settled.unwrap();
    for a in admitted {
        assert_eq!(snapshots(a.unwrap())[0].value, 42);
    }
    assert_eq!(store.shared_read_counts(), (sent, joined + 5));
    // Once it is answered, the next admission reads for itself.
    let late = store.admit(now, one, rid(), 0).await.unwrap();
    assert_eq!(snapshots(late)[0].value, 42);
    assert_eq!(store.shared_read_counts(), (sent + 1, joined + 5));
}

/// After-mode requests (every op a fixed window that takes nothing) skip the scripts on a
/// single node: the admission reads with `HMGET`, the settlement charges with
/// `MULTI`/`EXEC`. They keep what the scripts keep: the window's description (as the
/// admin API shows it), its expiry, refusal at the limit with the window's reset as
/// retry-after, sums saturating at 2^53 - 1, and a counter with holds still going
/// through the script (due holds released first).
#[tokio::test]
async fn reads_and_plain_charges_keep_the_script_invariants() {
    let store = shared_store().await;
    let now = SystemClock.now_ms();
    let base = format!("{}/plain/", run_id());
    let tokens = after_mode(&format!("{base}tokens"), 100);
    let r = rid();
    let a = store
        .admit(now, std::slice::from_ref(&tokens), r, 0)
        .await
        .unwrap();
    store
        .settle(now, &settlements(std::slice::from_ref(&tokens), &a, r, 60))
        .await
        .unwrap();
    let r = rid();
    let a = store
        .admit(now, std::slice::from_ref(&tokens), r, 0)
        .await
        .unwrap();
    assert_eq!(snapshots(a.clone())[0].value, 60);
    store
        .settle(now, &settlements(std::slice::from_ref(&tokens), &a, r, 45))
        .await
        .unwrap();
    // 105 >= 100: refused until the window ends.
    let window_end = Window::aligned(MINUTE).end(now);
    match store
        .admit(now, std::slice::from_ref(&tokens), rid(), 0)
        .await
        .unwrap()
    {
        Admission::Refused(refusal) => {
            assert_eq!(refusal.snapshots[0].value, 105);
            assert_eq!(refusal.snapshots[0].reset_at, window_end);
            assert_eq!(refusal.retry_after_ms, Some(window_end - now));
        }
        other => panic!("admitted past the limit: {other:?}"),
    }
    let views = store
        .inspect(
            now,
            &tollgate_limits::InspectFilter {
                prefix: Some(format!("{base}tokens")),
            },
        )
        .await
        .unwrap();
    assert_eq!(views.len(), 1, "{views:?}");
    assert_eq!(views[0].kind, CounterKind::Tokens);
    assert_eq!(views[0].limit, 100);
    assert_eq!(views[0].value, 105);
    assert_eq!(views[0].reset_at, window_end);

    // Saturation, as the scripts do it.
    let big = after_mode(&format!("{base}big"), u64::MAX);
    let r = rid();
    let a = store
        .admit(now, std::slice::from_ref(&big), r, 0)
        .await
        .unwrap();
    for _ in 0..2 {
        store
            .settle(
                now,
                &settlements(std::slice::from_ref(&big), &a, r, (1 << 52) + 1),
            )
            .await
            .unwrap();
    }
    let a = store
        .admit(now, std::slice::from_ref(&big), rid(), 0)
        .await
        .unwrap();
    assert_eq!(snapshots(a)[0].value, (1 << 53) - 1);

    // A reservation on the same counter, due already: the read-only path must not
    // count it; the script releases it first.
    let held = fixed(&format!("{base}tokens2"), 100, 0, 90);
    let r = rid();
    store.admit(now, &[held], r, now + 10).await.unwrap();
    let check = after_mode(&format!("{base}tokens2"), 100);
    let a = store
        .admit(now + 20, std::slice::from_ref(&check), rid(), 0)
        .await
        .unwrap();
    let s = snapshots(a);
    assert_eq!((s[0].value, s[0].reserved), (0, 0));

    // Every key written has an expiry.
    let client = ::redis::Client::open(SHARED_URL).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("*{base}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.len() >= 2, "{keys:?}");
    for k in &keys {
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0, "{k} has no expiry (PTTL {ttl})");
    }
}

/// `calls` concurrent requests, the n-th (from 0) admitted on `ops[n % ops.len()]` and
/// settled at n + 1.
async fn charge_each_once(
    store: &std::sync::Arc<RedisStore>,
    now: u64,
    ops: &[CounterOp],
    calls: u64,
) {
    let calls = (0..calls).map(|n| {
        let store = store.clone();
        let op = ops[(n % ops.len() as u64) as usize].clone();
        async move {
            let r = rid();
            let a = store
                .admit(now, std::slice::from_ref(&op), r, 0)
                .await
                .unwrap();
            store
                .settle(now, &settlements(&[op], &a, r, n + 1))
                .await
                .unwrap();
        }
    });
    futures_util::future::join_all(calls).await;
}

/// Plain charges from many requests at once share script calls (batched per thread);
/// every one lands exactly once, spread over several counters.
#[tokio::test]
async fn concurrent_plain_charges_land_exactly_once() {
    let store = shared_store().await;
    charges_land_exactly_once(store, "batch", 4).await;
}

/// With batching, many requests' charges to a few counters are added up locally and
/// still land exactly once each.
#[tokio::test]
async fn batched_plain_charges_add_up_exactly() {
    let store = RedisStore::connect(RedisConfig {
        batch_interval_ms: 20,
        ..config(Some(SHARED_URL.into()), None)
    })
    .await
    .unwrap();
    charges_land_exactly_once(store, "batched", 3).await;
}

/// 300 concurrent charges of 1..=300 spread round-robin over `counters` counters; each
/// counter ends with exactly the sum of its own.
async fn charges_land_exactly_once(store: RedisStore, tag: &str, counters: u64) {
    let store = std::sync::Arc::new(store);
    let now = SystemClock.now_ms();
    let base = format!("{}/{tag}/", run_id());
    let ops: Vec<CounterOp> = (0..counters)
        .map(|i| after_mode(&format!("{base}c{i}"), 1_000_000))
        .collect();
    charge_each_once(&store, now, &ops, 300).await;
    for (i, op) in (0..counters).zip(&ops) {
        let want: u64 = (0..300u64)
            .filter(|n| n % counters == i)
            .map(|n| n + 1)
            .sum();
        assert_eq!(
            value_of(store.as_ref(), now, op).await.0,
            want,
            "counter {i}"
        );
    }
}

/// A full batch is written at once, not at the end of its interval: with a 60 s interval
/// and room for 8, eight concurrent charges are written (and their settle calls return)
/// long before the interval could end.
#[tokio::test]
async fn a_full_batch_does_not_wait_for_its_interval() {
    let store = std::sync::Arc::new(
        RedisStore::connect(RedisConfig {
            batch_interval_ms: 60_000,
            batch_max: 8,
            // The waiters' bound is 2 x timeout + interval; keep it above the test's.
            timeout_ms: 2_000,
            ..config(Some(SHARED_URL.into()), None)
        })
        .await
        .unwrap(),
    );
    let now = SystemClock.now_ms();
    let op = after_mode(&format!("{}/full-batch/c", run_id()), 1_000_000);
    let calls = (1..=8u64).map(|n| {
        let store = store.clone();
        let op = op.clone();
        async move {
            let r = rid();
            let a = store
                .admit(now, std::slice::from_ref(&op), r, 0)
                .await
                .unwrap();
            store.settle(now, &settlements(&[op], &a, r, n)).await
        }
    });
    let results = tokio::time::timeout(
        Duration::from_secs(20),
        futures_util::future::join_all(calls),
    )
    .await
    .expect("a full batch waited for its 60 s interval");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(value_of(store.as_ref(), now, &op).await.0, 36);
}

/// Batching is refused on a cluster (charges there go through per-slot scripts), before
/// anything connects.
#[test]
fn batching_is_refused_on_a_cluster() {
    let cfg = RedisConfig {
        batch_interval_ms: 5,
        ..config(None, Some(vec!["redis://127.0.0.1:1".into()]))
    };
    match RedisStore::new_lazy(cfg) {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("cluster"), "{msg}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("batching accepted on a cluster"),
    }
}

/// The start of the next real minute plus one second: a window every engine time a test
/// uses stays inside, whose keys outlive the test.
fn next_minute() -> u64 {
    (SystemClock.now_ms() / MINUTE + 1) * MINUTE + 1_000
}

/// A read-only (after-mode) check of `op` at `at`.
async fn check(store: &dyn Store, at: u64, op: &CounterOp) -> Admission {
    store
        .admit(at, std::slice::from_ref(op), rid(), 0)
        .await
        .unwrap()
}

/// With batching's read cache, a replica judges after-mode checks by what it learned of
/// a counter less than two intervals (engine time) ago: another replica's spend is not
/// seen until then, and is once they are over. A reset through this replica is seen at
/// once.
#[tokio::test]
async fn cached_reads_stand_two_intervals_then_are_read_again() {
    let cached = RedisStore::connect(RedisConfig {
        batch_interval_ms: 1_000,
        ..config(Some(SHARED_URL.into()), None)
    })
    .await
    .unwrap();
    let other = shared_store().await;
    let t = next_minute();
    let op = after_mode(&format!("{}/cached/c", run_id()), 10);
    // Learned: 0.
    assert!(matches!(
        check(&cached, t, &op).await,
        Admission::Admitted { .. }
    ));
    let r = rid();
    let a = other
        .admit(t, std::slice::from_ref(&op), r, 0)
        .await
        .unwrap();
    other
        .settle(t, &settlements(std::slice::from_ref(&op), &a, r, 10))
        .await
        .unwrap();
    assert_eq!(value_of(&other, t, &op).await.0, 10);
    // Within two intervals the other replica's 10 is not seen...
    let a = check(&cached, t + 1_999, &op).await;
    assert!(matches!(a, Admission::Admitted { .. }), "{a:?}");
    assert_eq!(snapshots(a)[0].value, 0);
    // ...and once it is over, the counter is read again.
    let a = check(&cached, t + 2_000, &op).await;
    assert!(matches!(a, Admission::Refused(_)), "{a:?}");
    assert_eq!(snapshots(a)[0].value, 10);
    // A reset through this replica drops what it learned of the counter.
    assert_eq!(cached.reset(&op.id).await.unwrap(), 1);
    let a = check(&cached, t + 2_001, &op).await;
    assert!(matches!(a, Admission::Admitted { .. }), "{a:?}");
    assert_eq!(snapshots(a)[0].value, 0);
}

/// How many `HMGET` calls a Redis server has answered since it started.
fn hmget_calls(url: &str) -> u64 {
    let client = ::redis::Client::open(url).unwrap();
    let mut conn = client.get_connection().unwrap();
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut conn)
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_hmget:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// A counter this replica keeps writing stays fresh from its writes' replies: with the
/// engine clock moving half an interval per request, only the first check reads it
/// (counted on a Redis server of the test's own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_this_replica_writes_is_not_read_again() {
    let dir = temp_dir("fresh");
    let server = RedisProc::start(free_port(false), &dir, &[]);
    let store = RedisStore::connect(RedisConfig {
        batch_interval_ms: 10,
        ..config(Some(server.url()), None)
    })
    .await
    .unwrap();
    let t = next_minute();
    let op = after_mode(&format!("{}/fresh/c", run_id()), 1_000_000);
    for k in 0..20u64 {
        let now = t + 5 * k;
        let r = rid();
        let a = store
            .admit(now, std::slice::from_ref(&op), r, 0)
            .await
            .unwrap();
        store
            .settle(now, &settlements(std::slice::from_ref(&op), &a, r, 1))
            .await
            .unwrap();
    }
    assert_eq!(hmget_calls(&server.url()), 1, "reads after the first");
    assert_eq!(value_of(&store, t + 100, &op).await.0, 20);
}

/// A batching replica learns a counter's value from the replies to its own writes: once
/// its charge is written, what it checks against includes both that charge and whatever
/// other replicas had written before it, without reading the counter again.
#[tokio::test]
async fn cached_reads_learn_from_this_replicas_writes() {
    let cached = RedisStore::connect(RedisConfig {
        batch_interval_ms: 50,
        ..config(Some(SHARED_URL.into()), None)
    })
    .await
    .unwrap();
    let other = shared_store().await;
    let t = next_minute();
    let op = after_mode(&format!("{}/learned/c", run_id()), 7);
    // Learned: 0 (stands 100 ms of engine time, which stays at t here).
    let r = rid();
    let a = cached
        .admit(t, std::slice::from_ref(&op), r, 0)
        .await
        .unwrap();
    assert_eq!(snapshots(a.clone())[0].value, 0);
    // Another replica writes 5, unseen by the cache...
    let r2 = rid();
    let a2 = other
        .admit(t, std::slice::from_ref(&op), r2, 0)
        .await
        .unwrap();
    other
        .settle(t, &settlements(std::slice::from_ref(&op), &a2, r2, 5))
        .await
        .unwrap();
    // ...until this replica's own charge of 2 is written: its reply says 7.
    cached
        .settle(t, &settlements(std::slice::from_ref(&op), &a, r, 2))
        .await
        .unwrap();
    let a = cached
        .admit(t, std::slice::from_ref(&op), rid(), 0)
        .await
        .unwrap();
    assert!(matches!(a, Admission::Refused(_)), "{a:?}");
    assert_eq!(snapshots(a)[0].value, 7);
}

/// A replica's own held charges count in its own after-mode checks at once; Redis (and
/// so another replica) sees them only when they are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_charges_count_in_this_replicas_checks() {
    let batched = std::sync::Arc::new(
        RedisStore::connect(RedisConfig {
            batch_interval_ms: 60_000,
            ..config(Some(SHARED_URL.into()), None)
        })
        .await
        .unwrap(),
    );
    let other = shared_store().await;
    let now = SystemClock.now_ms();
    let op = after_mode(&format!("{}/held/c", run_id()), 10);
    let r = rid();
    let a = batched
        .admit(now, std::slice::from_ref(&op), r, 0)
        .await
        .unwrap();
    assert!(matches!(a, Admission::Admitted { .. }));
    // Held for a minute: the settle call itself waits for the write.
    let settling = {
        let store = batched.clone();
        let s = settlements(std::slice::from_ref(&op), &a, r, 10);
        tokio::spawn(async move { store.settle(now, &s).await })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let a = batched
            .admit(now, std::slice::from_ref(&op), rid(), 0)
            .await
            .unwrap();
        if matches!(a, Admission::Refused(_)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the held charge of 10 never counted against the limit of 10"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Not written yet: the other replica still sees room.
    let seen = other
        .admit(now, std::slice::from_ref(&op), rid(), 0)
        .await
        .unwrap();
    assert!(matches!(seen, Admission::Admitted { .. }), "{seen:?}");
    assert!(!settling.is_finished());
    settling.abort();
}
