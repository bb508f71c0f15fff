//! `tollgate-floor`: the cost floor of tollgate's HTTP stack, for the load benchmark.
//!
//! A reverse proxy built from exactly the parts tollgate proxies with — hyper's HTTP/1
//! server, hyper's HTTP/1 client connections kept in a pool per proxy thread that takes a
//! connection back as soon as its response body ends (as tollgate's pool for plain-HTTP
//! upstreams, `proxy/pool.rs`, does), one single-threaded tokio runtime per proxy thread
//! fed by one accept loop, TCP_NODELAY both ways — and nothing else: no routing, auth,
//! CEL, limits, body inspection or metering. It forwards every request to one upstream
//! and drops the `Authorization` header. `bench/load.sh --floors` puts it in the table, so
//! a run shows how much of tollgate's cost is the HTTP stack itself and how much is the
//! gateway's own work. Not a product: it has no limits, timeouts or TLS.
//!
//! With `--redis URL` it first makes one Redis round trip per request (an `HMGET` of one
//! key, on a multiplexed connection per proxy thread, as tollgate's after-mode admission
//! reads its counters): the floor of what a Redis-backed check adds on this machine.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::task::{Context, Poll};

use bytes::Bytes;
use clap::Parser;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

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
        let upstream = target.upstream.clone();
        let redis = redis.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                forward(upstream.clone(), redis.clone(), req)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type RedisRead = Option<(redis::aio::MultiplexedConnection, String)>;

type Error = Box<dyn std::error::Error + Send + Sync>;

thread_local! {
    /// This proxy thread's idle upstream connections.
    static IDLE: RefCell<Vec<SendRequest<Incoming>>> = const { RefCell::new(Vec::new()) };
}

async fn forward(
    upstream: http::uri::Authority,
    redis: RedisRead,
    mut req: http::Request<Incoming>,
) -> Result<http::Response<Pooled>, Error> {
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
    req.headers_mut().remove(http::header::AUTHORIZATION);
    let mut sender = loop {
        match IDLE.with(|idle| idle.borrow_mut().pop()) {
            Some(mut sender) => {
                if sender.ready().await.is_ok() {
                    break sender;
                }
            }
            None => {
                let tcp = tokio::net::TcpStream::connect(upstream.as_str()).await?;
                tcp.set_nodelay(true)?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(conn);
                break sender;
            }
        }
    };
    let resp = sender.send_request(req).await?;
    Ok(resp.map(|body| Pooled {
        body,
        sender: Some(sender),
    }))
}

/// A response body that shelves its connection once read to the end.
struct Pooled {
    body: Incoming,
    sender: Option<SendRequest<Incoming>>,
}

impl Pooled {
    fn give_back(&mut self) {
        if let Some(sender) = self.sender.take() {
            IDLE.with(|idle| idle.borrow_mut().push(sender));
        }
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.body.is_end_stream() {
            self.give_back();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
