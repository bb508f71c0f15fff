//! Soak traffic: mixed LLM calls through the gateway for a duration or a number of
//! requests, recording every call so that [`crate::audit`] can check the books.
//!
//! Each call is drawn from a seeded generator (call `n` is the same in every run with the
//! same seed): one of the five APIs, streamed or not (chat streams with and without
//! `stream_options.include_usage`), random prompt length and output cap, a random API key,
//! an upstream fault now and then (`x-sim-fault`), and some clients that leave: streams
//! slowed down by `x-sim-ms-per-token` and dropped after their first body chunk, and
//! non-streamed calls given up before the (delayed) answer. Every call carries
//! `x-request-id: soak-<n>`, which the gateway's access log repeats.
//!
//! Each worker keeps one keep-alive connection and opens a new one after a disconnect or
//! a transport error. Nothing here panics on what the server sends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tollgate_sim::Api;

/// The simulator faults the soak injects (all of them).
pub const FAULTS: [&str; 6] = [
    "status-500",
    "status-429",
    "no-usage",
    "cut-stream",
    "malformed",
    "usage-in-error",
];

/// When a run stops.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// No new call after this long.
    After(Duration),
    /// After this many calls.
    Requests(u64),
}

/// What to send, how hard and for how long.
#[derive(Debug, Clone)]
pub struct SoakPlan {
    /// The gateway's proxy listener.
    pub proxy: SocketAddr,
    /// API keys to spread the calls over (sent as `Authorization: Bearer`).
    pub keys: Vec<String>,
    pub concurrency: usize,
    /// Calls started per second over all clients (open loop); `None`: each client sends
    /// its next call as soon as the last ended.
    pub rate: Option<f64>,
    pub stop: Stop,
    pub seed: u64,
    /// Percent of calls that ask the upstream for a fault.
    pub fault_percent: u64,
    /// Percent of calls whose client leaves early.
    pub disconnect_percent: u64,
    /// Per-call timeout (counted as a transport error).
    pub timeout: Duration,
}

/// How a call ended, seen from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallEnd {
    /// The whole response was read.
    Complete(u16),
    /// The client left on purpose (status if the head had arrived).
    Left(Option<u16>),
    /// Connect, send or read failed, or the call timed out.
    Failed(String),
}

/// One call as sent, and how it ended.
#[derive(Debug, Clone)]
pub struct Call {
    pub id: String,
    pub api: Api,
    pub path: &'static str,
    /// What the simulator reports for this call without a fault: (prompt, completion).
    pub reported: (u64, u64),
    pub stream: bool,
    pub fault: Option<&'static str>,
    pub leave: bool,
    pub end: CallEnd,
    /// Time to the end of the call (µs).
    pub micros: u64,
}

/// Everything a run produced.
#[derive(Debug)]
pub struct SoakRun {
    pub calls: Vec<Call>,
    /// Latency of calls read to the end (µs).
    pub latency: Histogram<u64>,
    pub elapsed: Duration,
}

/// SplitMix64: a tiny, good-enough generator, so call `n` is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const WORDS: [&str; 12] = [
    "token", "budget", "gateway", "stream", "limit", "window", "usage", "counter", "prompt",
    "reply", "model", "charge",
];

/// Call number `n` of a run seeded with `seed` (not yet sent), its body and headers.
pub fn draw(seed: u64, n: u64, plan: &SoakPlan) -> (Call, Value, Vec<(&'static str, String)>) {
    let mut r = Rng(seed ^ n.wrapping_mul(0xA24B_AED4_963E_E407));
    let words = 1 + r.below(40);
    let text = (0..words)
        .map(|_| WORDS[r.below(WORDS.len() as u64) as usize])
        .collect::<Vec<_>>()
        .join(" ");
    let max = 1 + r.below(48);
    let (api, path) = match r.below(100) {
        0..45 => (Api::ChatCompletions, "/v1/chat/completions"),
        45..60 => (Api::Completions, "/v1/completions"),
        60..75 => (Api::Responses, "/v1/responses"),
        75..92 => (Api::Messages, "/v1/messages"),
        _ => (Api::Embeddings, "/v1/embeddings"),
    };
    let stream = api != Api::Embeddings && r.below(2) == 0;
    let mut body = match api {
        Api::ChatCompletions => {
            json!({"model": "sim-model", "messages": [{"role": "user", "content": text}], "max_tokens": max})
        }
        Api::Completions => json!({"model": "sim-model", "prompt": text, "max_tokens": max}),
        Api::Responses => json!({"model": "sim-model", "input": text, "max_output_tokens": max}),
        Api::Messages => {
            json!({"model": "sim-model", "max_tokens": max, "messages": [{"role": "user", "content": text}]})
        }
        Api::Embeddings => json!({"model": "sim-model", "input": [text, "one more"]}),
    };
    if stream {
        body["stream"] = json!(true);
        if api == Api::ChatCompletions {
            match r.below(3) {
                0 => body["stream_options"] = json!({"include_usage": true}),
                1 => body["stream_options"] = json!({"include_usage": false}),
                _ => {}
            }
        }
    }
    let fault =
        (r.below(100) < plan.fault_percent).then(|| FAULTS[r.below(FAULTS.len() as u64) as usize]);
    let leave = r.below(100) < plan.disconnect_percent;
    let key = plan
        .keys
        .get(r.below(plan.keys.len() as u64) as usize)
        .cloned()
        .unwrap_or_default();
    let id = format!("soak-{n}");
    let mut headers = vec![
        ("authorization", format!("Bearer {key}")),
        ("x-request-id", id.clone()),
    ];
    if let Some(f) = fault {
        headers.push(("x-sim-fault", f.to_owned()));
    }
    if leave {
        // Slow the answer down so that leaving happens mid-call.
        if stream {
            headers.push(("x-sim-ms-per-token", "3".to_owned()));
        } else {
            headers.push(("x-sim-latency-ms", "200".to_owned()));
        }
    }
    // Every soak call sets its output cap (embeddings generate nothing).
    let reported = (
        tollgate_sim::prompt_tokens_for(api, &body),
        tollgate_sim::completion_tokens_for(api, &body, 16).unwrap_or(0),
    );
    let call = Call {
        id,
        api,
        path,
        reported,
        stream,
        fault,
        leave,
        end: CallEnd::Failed("not sent".into()),
        micros: 0,
    };
    (call, body, headers)
}

/// Runs the plan to its end and returns every call.
pub async fn run(plan: &SoakPlan) -> Result<SoakRun, String> {
    let next = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let deadline = match plan.stop {
        Stop::After(d) => Some(started + d),
        Stop::Requests(_) => None,
    };
    let mut workers = Vec::new();
    for _ in 0..plan.concurrency.max(1) {
        let plan = plan.clone();
        let next = next.clone();
        let calls = calls.clone();
        workers.push(tokio::spawn(async move {
            let mut conn: Option<SendRequest<Full<Bytes>>> = None;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                match plan.stop {
                    Stop::Requests(max) if n >= max => break,
                    _ => {}
                }
                if let Some(rate) = plan.rate.filter(|r| *r > 0.0) {
                    let at = started + Duration::from_secs_f64(n as f64 / rate);
                    if deadline.is_some_and(|d| at >= d) {
                        break;
                    }
                    tokio::time::sleep_until(at).await;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let (mut call, body, headers) = draw(plan.seed, n, &plan);
                let t = Instant::now();
                call.end = one_call(&plan, &mut conn, &call, body, &headers).await;
                call.micros = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                if let Ok(mut c) = calls.lock() {
                    c.push(call);
                }
            }
        }));
    }
    for w in workers {
        w.await.map_err(|e| format!("worker: {e}"))?;
    }
    let elapsed = started.elapsed();
    let mut calls = std::mem::take(&mut *calls.lock().map_err(|_| "calls lock poisoned")?);
    calls.sort_by_key(|c| c.id.trim_start_matches("soak-").parse::<u64>().unwrap_or(0));
    let mut latency = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
        .map_err(|e| format!("histogram: {e}"))?;
    for c in &calls {
        if matches!(c.end, CallEnd::Complete(_)) {
            let _ = latency.record(c.micros.clamp(1, 3_600_000_000));
        }
    }
    Ok(SoakRun {
        calls,
        latency,
        elapsed,
    })
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

async fn one_call(
    plan: &SoakPlan,
    conn: &mut Option<SendRequest<Full<Bytes>>>,
    call: &Call,
    body: Value,
    headers: &[(&'static str, String)],
) -> CallEnd {
    let result = tokio::time::timeout(plan.timeout, send(plan, conn, call, body, headers)).await;
    let end = result.unwrap_or_else(|_| CallEnd::Failed("timeout".into()));
    if !matches!(end, CallEnd::Complete(_)) {
        // Dropping the sender closes the connection: the gateway sees the client leave.
        *conn = None;
    }
    end
}

async fn send(
    plan: &SoakPlan,
    conn: &mut Option<SendRequest<Full<Bytes>>>,
    call: &Call,
    body: Value,
    headers: &[(&'static str, String)],
) -> CallEnd {
    let sender = match conn {
        Some(s) if s.is_ready() => s,
        _ => match connect(plan.proxy).await {
            Ok(s) => conn.insert(s),
            Err(e) => return CallEnd::Failed(e),
        },
    };
    if let Err(e) = sender.ready().await {
        return CallEnd::Failed(format!("connection: {e}"));
    }
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(call.path)
        .header("host", plan.proxy.to_string())
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let Ok(req) = req.body(Full::new(Bytes::from(body.to_string()))) else {
        return CallEnd::Failed("request could not be built".into());
    };
    if call.leave && !call.stream {
        // Give up before the delayed answer arrives.
        return match tokio::time::timeout(Duration::from_millis(20), sender.send_request(req)).await
        {
            Ok(Ok(resp)) => CallEnd::Left(Some(resp.status().as_u16())),
            Ok(Err(e)) => CallEnd::Failed(format!("send: {e}")),
            Err(_) => CallEnd::Left(None),
        };
    }
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return CallEnd::Failed(format!("send: {e}")),
    };
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    if call.leave {
        // Read the first chunk, then leave.
        return match body.frame().await {
            Some(Err(e)) => CallEnd::Failed(format!("body: {e}")),
            _ => CallEnd::Left(Some(status)),
        };
    }
    match body.collect().await {
        Ok(_) => CallEnd::Complete(status),
        Err(e) => CallEnd::Failed(format!("body: {e}")),
    }
}
