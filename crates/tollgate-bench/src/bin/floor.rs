//! `tollgate-floor`: the cost floor of tollgate's HTTP stack, for the load benchmark.
//!
//! A reverse proxy built from exactly the parts tollgate proxies with — hyper's HTTP/1
//! server, hyper-util's pooled client, one single-threaded tokio runtime per proxy thread
//! fed by one accept loop, TCP_NODELAY both ways — and nothing else: no routing, auth,
//! CEL, limits, body inspection or metering. It forwards every request to one upstream
//! and drops the `Authorization` header. `bench/load.sh --floors` puts it in the table, so
//! a run shows how much of tollgate's cost is the HTTP stack itself and how much is the
//! gateway's own work. Not a product: it has no limits, timeouts or TLS.
//!
//! With `--redis URL` it first makes one Redis round trip per request (an `HMGET` of one
//! key, on a multiplexed connection per proxy thread, as tollgate's after-mode admission
//! reads its counters): the floor of what a Redis-backed check adds on this machine.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

// The allocator tollgate runs with, so the floor is measured like for like.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "tollgate-floor",
    about = "A bare hyper reverse proxy: the HTTP stack's cost floor"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Upstream `host:port` (plain HTTP).
    #[arg(long)]
    upstream: http::uri::Authority,
    /// Proxy threads (tollgate's default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Read one Redis hash per request before forwarding (e.g. redis://127.0.0.1:6379).
    #[arg(long)]
    redis: Option<String>,
    /// The hash `--redis` reads (a key of its own; it need not exist).
    #[arg(long, default_value = "tollgate-floor:counter")]
    redis_key: String,
}

/// What each proxy thread needs: where to forward, and the optional Redis read.
#[derive(Clone)]
struct Target {
    upstream: http::uri::Authority,
    redis: Option<(redis::Client, String)>,
}

type Conn = (std::net::TcpStream, SocketAddr);

fn main() -> ExitCode {
    let args = Args::parse();
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
        .max(1);
    let listener = match std::net::TcpListener::bind(args.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tollgate-floor: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let redis = match args.redis.as_deref().map(redis::Client::open).transpose() {
        Ok(c) => c.map(|c| (c, args.redis_key.clone())),
        Err(e) => {
            eprintln!("tollgate-floor: --redis: {e}");
            return ExitCode::FAILURE;
        }
    };
    let target = Target {
        upstream: args.upstream.clone(),
        redis,
    };
    let mut senders = Vec::with_capacity(workers);
    for i in 0..workers {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Conn>();
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("tollgate-floor: cannot start a runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        let target = target.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("floor-{i}"))
            .spawn(move || rt.block_on(worker(rx, target)));
        if let Err(e) = spawned {
            eprintln!("tollgate-floor: cannot start a thread: {e}");
            return ExitCode::FAILURE;
        }
        senders.push(tx);
    }
    let bound = listener.local_addr().unwrap_or(args.listen);
    eprintln!(
        "tollgate-floor: listening on {bound} -> {} on {workers} threads{}",
        args.upstream,
        if args.redis.is_some() {
            ", one Redis read per request"
        } else {
            ""
        }
    );
    for (n, accepted) in listener.incoming().enumerate() {
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                eprintln!("tollgate-floor: accept failed: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let peer = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        if senders[n % workers].send((stream, peer)).is_err() {
            eprintln!("tollgate-floor: a proxy thread is gone");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// One proxy thread: serve the connections it is handed with a connection pool (and a
/// Redis connection) of its own.
async fn worker(mut rx: tokio::sync::mpsc::UnboundedReceiver<Conn>, target: Target) {
    let redis = match &target.redis {
        None => None,
        Some((client, key)) => match client.get_multiplexed_async_connection().await {
            Ok(conn) => Some((conn, key.clone())),
            Err(e) => {
                eprintln!("tollgate-floor: cannot connect to Redis: {e}");
                std::process::exit(1);
            }
        },
    };
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(http);
    while let Some((stream, peer)) = rx.recv().await {
        let stream = match stream
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpStream::from_std(stream))
        {
            Ok(s) => s,
            Err(e) => {
                eprintln!("tollgate-floor: cannot register {peer}: {e}");
                continue;
            }
        };
        let client = client.clone();
        let upstream = target.upstream.clone();
        let redis = redis.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                forward(client.clone(), upstream.clone(), redis.clone(), req)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type RedisRead = Option<(redis::aio::MultiplexedConnection, String)>;

async fn forward(
    client: Client<HttpConnector, Incoming>,
    upstream: http::uri::Authority,
    redis: RedisRead,
    mut req: http::Request<Incoming>,
) -> Result<http::Response<Incoming>, hyper_util::client::legacy::Error> {
    if let Some((mut conn, key)) = redis {
        let read: redis::RedisResult<Vec<Option<u64>>> = redis::cmd("HMGET")
            .arg(&key)
            .arg("v")
            .arg("h")
            .query_async(&mut conn)
            .await;
        if let Err(e) = read {
            eprintln!("tollgate-floor: Redis read failed: {e}");
        }
    }
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(upstream);
    parts.path_and_query = req.uri().path_and_query().cloned();
    // Scheme, authority and an origin-form path always make a valid URI.
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    req.headers_mut().remove(http::header::AUTHORIZATION);
    client.request(req).await
}
