//! Hostile clients and misbehaving upstreams through the real server: listener limits
//! (header caps, slowloris, load shedding, keep-alive, h2c, TLS with h2 and certificate
//! reload), upstream idle streams, and adversarial requests (credentials, JWT tricks,
//! admin reachability, path tricks, header injection, request smuggling, budget evasion,
//! upstream 429s). Timeouts are asserted with generous bounds only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// One route to a real upstream, two API keys, a reserve-mode token budget per user.
fn config(up: SocketAddr, server: &str, limit: u64) -> String {
    format!(
        r#"
backends:
  - name: up
    url: http://{up}
server:
{server}
routes:
  - name: public-models
    match: {{ path: /v1/models, methods: [GET] }}
    backend: up
    auth: none
  - name: llm
    match: {{ path_prefix: /v1 }}
    backend: up
auth:
  api_keys:
    prefixes: [Bearer, APIKEY]
    keys:
      - key: k1
        identity: {{ userid: u1 }}
      - key: k2
        identity: {{ userid: u2 }}
policies:
  - name: tok
    kind: TokenRateLimitPolicy
    accounting: reserve
    limits:
      user:
        rates: [{{ limit: {limit}, window: 1m }}]
        counters: [auth.identity.userid]
"#
    )
}

async fn counter(gw: &Gateway, user: &str) -> (u64, u64) {
    let id = format!("tok/user/60000/{user}");
    gw.counters(&id)
        .await
        .iter()
        .find(|c| c["id"] == id.as_str())
        .map(|c| {
            (
                c["value"].as_u64().unwrap(),
                c["reserved"].as_u64().unwrap(),
            )
        })
        .unwrap_or((0, 0))
}

async fn metrics(gw: &Gateway) -> String {
    client()
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the first sample line starting with `prefix` (0 when absent).
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Send raw bytes, read until the server closes or `wait` passes.
fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let started = Instant::now();
    while started.elapsed() < wait {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(resp: &str) -> u16 {
    resp.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn chat_json(max_tokens: u64) -> String {
    chat_body(max_tokens).to_string()
}

// ---------------------------------------------------------------- listener limits

#[tokio::test]
async fn header_caps_are_431_json_and_never_forwarded() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(
        up.addr,
        "  max_headers: 20\n  max_header_bytes: 2048",
        1_000_000,
    ));
    let c = client();
    // Too many fields.
    let mut req = c
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer k1");
    for i in 0..25 {
        req = req.header(format!("x-filler-{i}"), "x");
    }
    let r = req.json(&chat_body(2)).send().await.unwrap();
    assert_eq!(r.status(), 431);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "request_header_fields_too_large");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at most 20"));
    // Too many bytes.
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer k1")
        .header("x-big", "a".repeat(3000))
        .json(&chat_body(2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "request_header_fields_too_large");
    // Far beyond: refused by the HTTP parser itself, still 431.
    let huge = format!(
        "GET /v1/models HTTP/1.1\r\nhost: x\r\nx-huge: {}\r\n\r\n",
        "a".repeat(600_000)
    );
    let resp = tokio::task::spawn_blocking({
        let addr = gw.proxy;
        move || raw(addr, huge.as_bytes(), Duration::from_secs(10))
    })
    .await
    .unwrap();
    assert_eq!(status_of(&resp), 431, "{resp}");
    // Within the caps: served.
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer k1")
        .json(&chat_body(2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.served(), 1);
}

#[tokio::test]
async fn slowloris_and_silent_connections_are_cut_off() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(up.addr, "  header_read_timeout: 400ms", 1_000_000));
    let addr = gw.proxy;
    // Headers trickled one line every 100ms: closed well before the trickle would end.
    let trickle = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n")
            .unwrap();
        let started = Instant::now();
        for i in 0..200 {
            std::thread::sleep(Duration::from_millis(100));
            if s.write_all(format!("x-slow-{i}: y\r\n").as_bytes())
                .is_err()
            {
                break;
            }
            // A closed socket may still accept a write or two; check for EOF too.
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 512];
            let closed = s.read(&mut b).is_ok();
            s.set_nonblocking(false).unwrap();
            if closed {
                break;
            }
        }
        started.elapsed()
    });
    // A client that connects and sends nothing at all.
    let silent = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let started = Instant::now();
        let mut b = [0u8; 64];
        let _ = s.read(&mut b);
        started.elapsed()
    });
    // Meanwhile, normal requests are served.
    let r = client().get(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let t = trickle.await.unwrap();
    assert!(
        t < Duration::from_secs(8),
        "trickling client held for {t:?}"
    );
    let t = silent.await.unwrap();
    assert!(
        t >= Duration::from_millis(200) && t < Duration::from_secs(8),
        "silent client held for {t:?}"
    );
}

#[tokio::test]
async fn concurrency_cap_sheds_with_503_retry_after_and_is_counted() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(up.addr, "  max_concurrent_requests: 2", 1_000_000));
    let c = client();
    let mut body = chat_body(100);
    body["stream"] = json!(true);
    let slow = || {
        c.post(gw.url("/v1/chat/completions"))
            .header("authorization", "Bearer k1")
            .header("x-sim-ms-per-token", "100")
            .json(&body)
            .send()
    };
    // Two streams in progress (headers received, bodies still flowing) hold both slots.
    let a = slow().await.unwrap();
    let b = slow().await.unwrap();
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let r = c.get(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "overloaded");
    let m = metrics(&gw).await;
    assert_eq!(sample(&m, "tollgate_requests_shed_total"), 1.0, "{m}");
    assert_eq!(sample(&m, "tollgate_requests_in_flight"), 2.0);
    // The clients leave: their slots come back.
    drop((a, b));
    let mut served = false;
    for _ in 0..100 {
        let r = c.get(gw.url("/v1/models")).send().await.unwrap();
        if r.status() == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "slots never released");
}

#[tokio::test]
async fn keep_alive_serves_several_requests_per_connection_unless_disabled() {
    let up = Upstream::start().await;
    let two = b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    let gw = Gateway::start(&config(up.addr, "  keep_alive: true", 1_000_000));
    let addr = gw.proxy;
    let resp = tokio::task::spawn_blocking(move || raw(addr, two, Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(resp.matches("HTTP/1.1 200").count(), 2, "{resp}");
    drop(gw);
    let gw = Gateway::start(&config(up.addr, "  keep_alive: false", 1_000_000));
    let addr = gw.proxy;
    let resp = tokio::task::spawn_blocking(move || raw(addr, two, Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(resp.matches("HTTP/1.1 200").count(), 1, "{resp}");
}

/// A POST of `body` over an HTTP/2 connection already handshaken.
async fn h2_chat(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
    scheme_authority: &str,
) -> (u16, Value) {
    use http_body_util::BodyExt;
    let req = http::Request::post(format!("{scheme_authority}/v1/chat/completions"))
        .header("authorization", "Bearer k1")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(chat_json(3))))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn h2c_prior_knowledge_on_the_plain_listener() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(up.addr, "  keep_alive: true", 1_000_000));
    let tcp = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let (status, v) = h2_chat(&mut sender, &format!("http://{}", gw.proxy)).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 3);
    }
    assert_eq!(up.served(), 3);
}

// ---------------------------------------------------------------- TLS

struct Cert {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

fn self_signed() -> Cert {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    Cert {
        cert_pem: ck.cert.pem(),
        key_pem: ck.signing_key.serialize_pem(),
        der: ck.cert.der().to_vec(),
    }
}

fn write_cert(dir: &std::path::Path, c: &Cert) {
    for (name, text) in [("cert.pem", &c.cert_pem), ("key.pem", &c.key_pem)] {
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

/// A TLS connection to the gateway trusting `trust`; returns the stream, the ALPN
/// protocol and the leaf certificate the server presented.
async fn tls_connect(
    addr: SocketAddr,
    trust: &[&Cert],
    alpn: &[&[u8]],
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Option<Vec<u8>>,
    Vec<u8>,
) {
    let mut roots = rustls::RootCertStore::empty();
    for c in trust {
        roots
            .add(rustls::pki_types::CertificateDer::from(c.der.clone()))
            .unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (_, session) = tls.get_ref();
    let proto = session.alpn_protocol().map(<[u8]>::to_vec);
    let leaf = session.peer_certificates().unwrap()[0].to_vec();
    (tls, proto, leaf)
}

#[tokio::test]
async fn tls_h2_by_alpn_and_certificate_reload_without_restart() {
    let up = Upstream::start().await;
    let dir = std::env::temp_dir().join(format!("tollgate-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let first = self_signed();
    write_cert(&dir, &first);
    let server = format!(
        "  tls:\n    cert_file: {}\n    key_file: {}",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    );
    let gw = Gateway::start(&config(up.addr, &server, 1_000_000));

    // h2 by ALPN.
    let (tls, proto, leaf) = tls_connect(gw.proxy, &[&first], &[b"h2", b"http/1.1"]).await;
    assert_eq!(proto.as_deref(), Some(&b"h2"[..]));
    assert_eq!(leaf, first.der);
    let (mut old_conn, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (status, v) = h2_chat(&mut old_conn, "https://localhost").await;
    assert_eq!(status, 200, "{v}");

    // HTTP/1.1 by ALPN.
    let (tls, proto, _) = tls_connect(gw.proxy, &[&first], &[b"http/1.1"]).await;
    assert_eq!(proto.as_deref(), Some(&b"http/1.1"[..]));
    let (mut h1, conn) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::Full<bytes::Bytes>,
    >(hyper_util::rt::TokioIo::new(tls))
    .await
    .unwrap();
    tokio::spawn(conn);
    let resp = h1
        .send_request(
            http::Request::get("/v1/models")
                .header("host", "localhost")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_11);

    // Plain HTTP on the TLS listener gets nowhere.
    let addr = gw.proxy;
    let resp = tokio::task::spawn_blocking(move || {
        raw(
            addr,
            b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n",
            Duration::from_secs(10),
        )
    })
    .await
    .unwrap();
    assert!(!resp.contains("200 OK"), "{resp}");

    // Rotate the certificate and reload: new connections get the new one, without a
    // restart; the connection already open keeps working.
    let second = self_signed();
    write_cert(&dir, &second);
    let reloads = gw.status().await["last_reload"]["reloads"]
        .as_u64()
        .unwrap();
    gw.signal("HUP");
    let st = gw.wait_reloads(reloads).await;
    assert_eq!(st["last_reload"]["ok"], true, "{st}");
    let (_, _, leaf) = tls_connect(gw.proxy, &[&first, &second], &[b"h2"]).await;
    assert_eq!(leaf, second.der);
    let (status, _) = h2_chat(&mut old_conn, "https://localhost").await;
    assert_eq!(status, 200);

    // A broken key on reload is refused; the current certificate keeps serving.
    std::fs::write(dir.join("key.pem"), "not a key").unwrap();
    gw.signal("HUP");
    let st = gw.wait_reloads(reloads + 1).await;
    assert_eq!(st["last_reload"]["ok"], false, "{st}");
    assert!(
        st["last_reload"]["error"]
            .as_str()
            .unwrap()
            .contains("server.tls.key_file"),
        "{st}"
    );
    let (_, _, leaf) = tls_connect(gw.proxy, &[&first, &second], &[b"h2"]).await;
    assert_eq!(leaf, second.der);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- upstream timeouts

#[tokio::test]
async fn silent_upstream_stream_is_ended_cleanly_and_charged() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(
        up.addr,
        "  upstream_idle_timeout: 500ms",
        1_000_000,
    ));
    let c = client();
    let mut body = chat_body(20);
    body["stream"] = json!(true);
    let started = Instant::now();
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer k1")
        .header("x-sim-fault", "stall-stream")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The body ends (no transport error) with a well-formed close of the stream.
    let text = r.text().await.unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    // Charged an estimate for what was streamed, nothing left reserved.
    let (value, reserved) = counter(&gw, "u1").await;
    assert!(value > 0, "nothing charged");
    assert_eq!(reserved, 0);
    let m = metrics(&gw).await;
    assert_eq!(
        sample(&m, "tollgate_upstream_idle_timeouts_total"),
        1.0,
        "{m}"
    );

    // Not streamed: a silent body is cut (the client sees an incomplete body, never a
    // short one passed off as whole), and charged.
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer k2")
        .header("x-sim-fault", "stall-stream")
        .json(&chat_body(20))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.is_err());
    let (value, reserved) = counter(&gw, "u2").await;
    assert!(value > 0, "nothing charged");
    assert_eq!(reserved, 0);
    let m = metrics(&gw).await;
    assert_eq!(sample(&m, "tollgate_upstream_idle_timeouts_total"), 2.0);

    // A slow but live stream (gaps under the timeout) is not cut.
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer k1")
        .header("x-sim-ms-per-token", "100")
        .json(&body)
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(text.contains("\"finish_reason\":\"length\"") || text.contains("\"stop\""));
    assert_eq!(
        sample(&metrics(&gw).await, "tollgate_upstream_idle_timeouts_total"),
        2.0
    );
}
