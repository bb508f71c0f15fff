//! The workers: connections, scheduling, timing and per-worker statistics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Highest latency the histograms track (one hour, in µs); longer values are clamped.
const MAX_TRACKABLE_US: u64 = 3_600_000_000;

/// Where to connect and what to put in the request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port` to connect to and send as `Host`.
    pub authority: String,
    /// Origin-form request target.
    pub path_and_query: String,
}

impl Target {
    /// Only plain `http://` URLs: this measures the proxy, not TLS.
    pub fn from_uri(uri: &Uri) -> Result<Target, String> {
        if uri.scheme_str() != Some("http") {
            return Err(format!("only http:// URLs are supported, got {uri}"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("URL {uri} has no host"))?;
        let authority = match authority.port_u16() {
            Some(_) => authority.as_str().to_owned(),
            None => format!("{}:80", authority.host()),
        };
        let path_and_query = uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
        Ok(Target {
            authority,
            path_and_query,
        })
    }
}

/// Everything a run needs, validated.
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: Target,
    pub method: Method,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Open loop: time between scheduled requests. `None`: closed loop.
    pub interval: Option<Duration>,
    pub timeout: Duration,
    pub stream: bool,
}

/// Kinds of transport failure, counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ErrorKind {
    Connect,
    Handshake,
    Send,
    Body,
    Timeout,
}

impl ErrorKind {
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Handshake => "handshake",
            ErrorKind::Send => "send",
            ErrorKind::Body => "body",
            ErrorKind::Timeout => "timeout",
        }
    }
}

/// What the workers measured, merged.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Total time per request, µs (from the scheduled time in open loop).
    pub latency: Histogram<u64>,
    /// Time to the first body byte, µs (only filled with `--stream`).
    pub ttfb: Histogram<u64>,
    pub statuses: BTreeMap<u16, u64>,
    pub errors: BTreeMap<ErrorKind, u64>,
    pub bytes: u64,
    /// Requests whose scheduled time fell in the measurement window but that could not be
    /// sent before the run ended (open loop only: the workers were all busy).
    pub not_sent: u64,
}

impl Stats {
    fn new() -> Result<Stats, String> {
        let histogram = || {
            Histogram::new_with_bounds(1, MAX_TRACKABLE_US, 3)
                .map_err(|e| format!("histogram: {e}"))
        };
        Ok(Stats {
            latency: histogram()?,
            ttfb: histogram()?,
            statuses: BTreeMap::new(),
            errors: BTreeMap::new(),
            bytes: 0,
            not_sent: 0,
        })
    }

    fn merge(&mut self, other: &Stats) -> Result<(), String> {
        self.latency
            .add(&other.latency)
            .map_err(|e| format!("merge: {e:?}"))?;
        self.ttfb
            .add(&other.ttfb)
            .map_err(|e| format!("merge: {e:?}"))?;
        for (status, n) in &other.statuses {
            *self.statuses.entry(*status).or_default() += n;
        }
        for (kind, n) in &other.errors {
            *self.errors.entry(*kind).or_default() += n;
        }
        self.bytes += other.bytes;
        self.not_sent += other.not_sent;
        Ok(())
    }

    /// Requests that got a response (any status) in the window.
    pub fn responses(&self) -> u64 {
        self.statuses.values().sum()
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn error(&mut self, kind: ErrorKind) {
        *self.errors.entry(kind).or_default() += 1;
    }
}

/// When requests go out.
///
/// Closed loop: a worker starts its next request as soon as the previous one ends, until
/// `end`. Open loop: a pacer thread (a plain OS thread, so slots are released with
/// `nanosleep` precision rather than the tokio timer's 1 ms granularity, which would add up
/// to a millisecond of client-side lag to every measurement) sends slot `k`'s scheduled time
/// `start + k * interval` to the workers through a queue. A worker that is free takes the
/// next slot at once; when all are busy, slots wait in the queue and their latency, measured
/// from the scheduled time, includes that wait.
struct Schedule {
    record_from: Instant,
    end: Instant,
    slots: Option<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Instant>>>,
}

impl Schedule {
    /// The next request's scheduled time, or `None` when the run is over.
    async fn next(&self, stats: &mut Stats) -> Option<Instant> {
        let Some(slots) = &self.slots else {
            return Some(Instant::now()).filter(|now| *now < self.end);
        };
        loop {
            let at = slots.lock().await.recv().await?;
            let now = Instant::now();
            // A slot due just before the end and taken a moment later is still sent.
            if now < self.end || now.saturating_duration_since(at) < END_GRACE {
                return Some(at);
            }
            // Due during the run, but no worker was free to send it before the end.
            if at >= self.record_from {
                stats.not_sent += 1;
            }
        }
    }
}

/// How late past the end of the run a queued open-loop slot may still be sent.
const END_GRACE: Duration = Duration::from_millis(100);

/// Scheduled time of open-loop slot `k`, if it falls before `end`.
fn slot_time(start: Instant, interval: Duration, k: u64, end: Instant) -> Option<Instant> {
    let offset = interval.checked_mul(u32::try_from(k).ok()?)?;
    Some(start + offset).filter(|at| *at < end)
}

/// Release open-loop slots on time until `end`, from a dedicated OS thread.
fn spawn_pacer(
    start: Instant,
    interval: Duration,
    end: Instant,
    slots: tokio::sync::mpsc::UnboundedSender<Instant>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("tollgate-load-pacer".to_owned())
        .spawn(move || {
            let mut k = 0u64;
            while let Some(at) = slot_time(start, interval, k, end) {
                let wait = at
                    .into_std()
                    .saturating_duration_since(std::time::Instant::now());
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
                if slots.send(at).is_err() {
                    return;
                }
                k += 1;
            }
        })
}

/// Run the plan to completion and return the merged statistics.
pub async fn run(plan: Plan) -> Result<Stats, String> {
    let start = Instant::now();
    let record_from = start + plan.warmup;
    let end = record_from + plan.duration;
    let (slots, pacer) = match plan.interval {
        None => (None, None),
        Some(interval) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let pacer = spawn_pacer(start, interval, end, tx)
                .map_err(|e| format!("cannot start the pacer thread: {e}"))?;
            (Some(tokio::sync::Mutex::new(rx)), Some(pacer))
        }
    };
    let schedule = Arc::new(Schedule {
        record_from,
        end,
        slots,
    });
    let plan = Arc::new(plan);
    let mut workers = Vec::with_capacity(plan.concurrency);
    for _ in 0..plan.concurrency {
        let plan = Arc::clone(&plan);
        let schedule = Arc::clone(&schedule);
        workers.push(tokio::spawn(async move { worker(&plan, &schedule).await }));
    }
    let mut total = Stats::new()?;
    for w in workers {
        let stats = w.await.map_err(|e| format!("worker failed: {e}"))??;
        total.merge(&stats)?;
    }
    if let Some(pacer) = pacer {
        pacer
            .join()
            .map_err(|_| "the pacer thread panicked".to_owned())?;
    }
    Ok(total)
}

type Sender = SendRequest<Full<Bytes>>;

async fn connect(authority: &str) -> Result<Sender, ErrorKind> {
    let stream = TcpStream::connect(authority)
        .await
        .map_err(|_| ErrorKind::Connect)?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| ErrorKind::Handshake)?;
    tokio::spawn(async move {
        // The connection's end is seen by the sender; nothing to do with its result.
        let _ = connection.await;
    });
    Ok(sender)
}

fn build_request(plan: &Plan, host: &HeaderValue) -> Result<Request<Full<Bytes>>, String> {
    let mut request = Request::builder()
        .method(plan.method.clone())
        .uri(plan.target.path_and_query.as_str())
        .body(Full::new(plan.body.clone()))
        .map_err(|e| format!("request: {e}"))?;
    let headers = request.headers_mut();
    headers.insert(http::header::HOST, host.clone());
    for (name, value) in &plan.headers {
        headers.append(name, value.clone());
    }
    Ok(request)
}

/// One exchange's measurements.
struct Exchange {
    status: u16,
    first_byte: Option<Instant>,
    bytes: u64,
}

async fn exchange(
    sender: &mut Sender,
    request: Request<Full<Bytes>>,
) -> Result<Exchange, ErrorKind> {
    sender.ready().await.map_err(|_| ErrorKind::Send)?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|_| ErrorKind::Send)?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut first_byte = None;
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ErrorKind::Body)?;
        if let Some(data) = frame.data_ref() {
            if first_byte.is_none() && !data.is_empty() {
                first_byte = Some(Instant::now());
            }
            bytes += data.len() as u64;
        }
    }
    Ok(Exchange {
        status,
        first_byte,
        bytes,
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

async fn worker(plan: &Plan, schedule: &Schedule) -> Result<Stats, String> {
    let mut stats = Stats::new()?;
    let host =
        HeaderValue::from_str(&plan.target.authority).map_err(|e| format!("host header: {e}"))?;
    let mut sender: Option<Sender> = None;
    while let Some(scheduled) = schedule.next(&mut stats).await {
        let recorded = scheduled >= schedule.record_from;
        let request = build_request(plan, &host)?;
        let result = tokio::time::timeout(plan.timeout, async {
            let conn = match sender.as_mut() {
                Some(s) if !s.is_closed() => s,
                _ => sender.insert(connect(&plan.target.authority).await?),
            };
            exchange(conn, request).await
        })
        .await
        .unwrap_or(Err(ErrorKind::Timeout));
        let done = Instant::now();
        match result {
            Ok(x) => {
                if recorded {
                    stats.latency.saturating_record(micros(done - scheduled));
                    if plan.stream {
                        let first = x.first_byte.unwrap_or(done);
                        stats.ttfb.saturating_record(micros(first - scheduled));
                    }
                    *stats.statuses.entry(x.status).or_default() += 1;
                    stats.bytes += x.bytes;
                }
            }
            Err(kind) => {
                // The connection may be in any state: start afresh.
                sender = None;
                if recorded {
                    stats.error(kind);
                }
                if kind == ErrorKind::Connect || kind == ErrorKind::Handshake {
                    // Do not spin on a refused port.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::from_uri(&"http://localhost/a?b".parse().unwrap()).unwrap();
        assert_eq!(t.authority, "localhost:80");
        assert_eq!(t.path_and_query, "/a?b");
        let t = Target::from_uri(&"http://127.0.0.1:81".parse().unwrap()).unwrap();
        assert_eq!(t.path_and_query, "/");
    }

    #[test]
    fn open_loop_slots_are_evenly_spaced_and_end() {
        let start = Instant::now();
        let end = start + Duration::from_secs(2);
        let interval = Duration::from_millis(100);
        let times: Vec<Duration> = (0..)
            .map_while(|k| slot_time(start, interval, k, end))
            .map(|t| t - start)
            .collect();
        assert_eq!(times.len(), 20);
        assert_eq!(times[3], Duration::from_millis(300));
    }
}
