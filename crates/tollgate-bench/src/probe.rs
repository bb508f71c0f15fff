//! Small probes the soak and storm tools share: one-shot GETs against the admin API
//! (fresh connection each, so they measure what a new admin client sees) and a process's
//! resident memory.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// `GET path` on a fresh connection: status, body and how long it took.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(u16, Bytes, Duration), String> {
    let started = Instant::now();
    let fut = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::get(path).header("host", addr.to_string());
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("GET {path} body: {e}"))?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    let (status, body) = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("GET {path}: no answer within {timeout:?}"))??;
    Ok((status, body, started.elapsed()))
}

/// `GET path` as JSON (any non-2xx status is an error).
pub async fn get_json(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<Value, String> {
    let (status, body, _) = get(addr, path, token, Duration::from_secs(10)).await?;
    if !(200..300).contains(&status) {
        return Err(format!(
            "GET {path}: {status} {}",
            String::from_utf8_lossy(&body)
        ));
    }
    serde_json::from_slice(&body).map_err(|e| format!("GET {path}: not JSON: {e}"))
}

/// Sum of `value` over the counters whose id starts with `prefix`, every window.
pub async fn counters_total(
    admin: SocketAddr,
    prefix: &str,
    token: Option<&str>,
) -> Result<u64, String> {
    let v = get_json(admin, &format!("/admin/counters?prefix={prefix}"), token).await?;
    Ok(v["counters"]
        .as_array()
        .map(|cs| cs.iter().filter_map(|c| c["value"].as_u64()).sum())
        .unwrap_or(0))
}

/// Reservations the gateway still holds, waiting (bounded) for in-flight settlements.
pub async fn outstanding_when_idle(admin: SocketAddr, token: Option<&str>) -> Result<u64, String> {
    let mut last = u64::MAX;
    for _ in 0..100 {
        let v = get_json(admin, "/admin/status", token).await?;
        last = v["reservations_outstanding"].as_u64().unwrap_or(u64::MAX);
        if last == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(last)
}

/// Resident set size of process `pid` in KiB (Linux `/proc`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}
