//! Hostile clients and misbehaving upstreams through the real server: listener limits
//! (header caps, slowloris, load shedding, keep-alive, h2c, TLS with h2 and certificate
//! reload), upstream idle streams and connection reuse, and adversarial requests
//! (credentials, JWT tricks, admin reachability, path tricks, header injection, request
//! smuggling, budget evasion, upstream 429s). Timeouts are asserted with generous bounds
//! only.

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
    // A keep-alive connection left idle after a request is closed too.
    let idle = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let started = Instant::now();
        let mut out = Vec::new();
        let mut b = [0u8; 4096];
        while let Ok(n) = s.read(&mut b) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&b[..n]);
        }
        (
            started.elapsed(),
            String::from_utf8_lossy(&out).into_owned(),
        )
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
    let (t, resp) = idle.await.unwrap();
    assert_eq!(status_of(&resp), 200, "{resp}");
    assert!(
        t < Duration::from_secs(8),
        "idle keep-alive connection held for {t:?}"
    );
}

#[tokio::test]
async fn trickled_body_is_408_and_never_forwarded() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(up.addr, "  request_body_timeout: 300ms", 1_000_000));
    let addr = gw.proxy;
    let body = chat_json(2);
    let (t, resp) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let head = post_raw(&format!("content-length: {}\r\n", body.len()), "");
        s.write_all(&head).unwrap();
        let started = Instant::now();
        // A few bytes, then one more every 100ms: never the whole body in time.
        for b in body.as_bytes().iter().take(40) {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            s.set_nonblocking(true).unwrap();
            let mut probe = [0u8; 1];
            let answered = s.peek(&mut probe).is_ok();
            s.set_nonblocking(false).unwrap();
            if answered {
                break;
            }
        }
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        (
            started.elapsed(),
            String::from_utf8_lossy(&out).into_owned(),
        )
    })
    .await
    .unwrap();
    assert_eq!(status_of(&resp), 408, "{resp}");
    assert!(resp.contains("\"request_timeout\""), "{resp}");
    assert!(t < Duration::from_secs(8), "{t:?}");
    assert_eq!(up.served(), 0);
}

#[tokio::test]
async fn bad_listener_settings_are_config_errors_with_their_path() {
    let up = Upstream::start().await;
    let dir = std::env::temp_dir().join(format!("tollgate-badtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = self_signed();
    std::fs::write(dir.join("cert.pem"), &cert.cert_pem).unwrap();
    std::fs::write(
        dir.join("key.pem"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    for (server, expect) in [
        (
            format!(
                "  tls:\n    cert_file: {0}/missing.pem\n    key_file: {0}/key.pem",
                dir.display()
            ),
            "server.tls.cert_file",
        ),
        (
            format!(
                "  tls:\n    cert_file: {0}/cert.pem\n    key_file: {0}/key.pem",
                dir.display()
            ),
            "server.tls.key_file",
        ),
        (
            "  max_concurrent_requests: 0".to_owned(),
            "server.max_concurrent_requests",
        ),
        (
            "  header_read_timeout: 0s".to_owned(),
            "server.header_read_timeout",
        ),
    ] {
        let cfg = dir.join("c.yaml");
        std::fs::write(&cfg, config(up.addr, &server, 10)).unwrap();
        let out = std::process::Command::new(bin())
            .args(["validate", "-c"])
            .arg(&cfg)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{server}: {text}");
        assert!(text.contains(expect), "{server}: {text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
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

/// Upstream connections are kept and reused across requests; a stream the client gives up
/// half-way takes its upstream connection with it (its unread rest must never be taken
/// for the next call's response), and the calls after it are served on a fresh one.
#[tokio::test]
async fn upstream_connections_are_reused_and_an_abandoned_stream_closes_its_own() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    // The simulator, slow enough per token that a stream is still running when the
    // client leaves, behind a TCP relay that counts the connections made to it.
    let sim_addr = Upstream::start_paced(20).await.addr;
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = relay.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(sim_addr).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });

    let gw = Gateway::start(&config(relay_addr, "  workers: 1", 1_000_000_000));
    let http = client();
    let chat = |max_tokens: u64| {
        http.post(gw.url("/v1/chat/completions"))
            .header("authorization", "Bearer k1")
            .json(&chat_body(max_tokens))
            .send()
    };
    for n in 1..=5u64 {
        let resp = chat(n).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["usage"]["completion_tokens"], n, "{body}");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "one connection, kept"
    );

    // A 200-token stream (4 s at 20 ms a token), abandoned after its first bytes.
    let mut stream = http
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer k1")
        .json(
            &json!({"model": "sim-model", "stream": true, "max_tokens": 200,
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert!(stream.chunk().await.unwrap().is_some());
    drop(stream);

    for n in 6..=8u64 {
        let resp = chat(n).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["usage"]["completion_tokens"], n, "{body}");
        assert_eq!(body["object"], "chat.completion", "{body}");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        2,
        "the abandoned stream's connection was dropped, one new connection took the rest"
    );
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

    // No response headers within upstream_response_timeout: 504, nothing charged, the
    // reservation released.
    drop(gw);
    let gw = Gateway::start(&config(
        up.addr,
        "  upstream_response_timeout: 300ms\n  upstream_idle_timeout: 500ms",
        1_000_000,
    ));
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer k1")
        .header("x-sim-latency-ms", "3000")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_timeout");
    assert_eq!(counter(&gw, "u1").await, (0, 0));

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
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(
        sample(&metrics(&gw).await, "tollgate_upstream_idle_timeouts_total"),
        0.0
    );
    assert_eq!(counter(&gw, "u1").await.1, 0);
}

// ---------------------------------------------------------------- credentials

#[tokio::test]
async fn api_key_attacks_are_401_and_never_forwarded() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(up.addr, "  max_header_bytes: 65536", 1_000_000));
    let c = client();
    let long = format!("Bearer {}", "k".repeat(20_000));
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("missing", vec![]),
        ("empty", vec![("authorization", String::new())]),
        ("scheme only", vec![("authorization", "Bearer".into())]),
        ("no space", vec![("authorization", "Bearerk1".into())]),
        ("unknown scheme", vec![("authorization", "Basic k1".into())]),
        ("key case", vec![("authorization", "Bearer K1".into())]),
        (
            "trailing junk",
            vec![("authorization", "Bearer k1 k1".into())],
        ),
        (
            "prefix of a key",
            vec![("authorization", "Bearer k".into())],
        ),
        (
            "key plus byte",
            vec![("authorization", "Bearer k1x".into())],
        ),
        ("garbage", vec![("authorization", "\u{7f}\u{1}zz".into())]),
        ("long", vec![("authorization", long.clone())]),
        ("x-api-key wrong", vec![("x-api-key", "nope".into())]),
        (
            // Authorization wins; a good x-api-key does not rescue a bad one.
            "bad authorization, good x-api-key",
            vec![
                ("authorization", "Bearer nope".into()),
                ("x-api-key", "k1".into()),
            ],
        ),
    ];
    for (what, headers) in cases {
        let mut req = c.post(gw.url("/v1/chat/completions"));
        for (k, v) in &headers {
            req = req.header(*k, v.as_bytes());
        }
        let r = match req.json(&chat_body(2)).send().await {
            Ok(r) => r,
            // reqwest refuses some bytes itself (never sent): nothing to check.
            Err(_) if what == "garbage" => continue,
            Err(e) => panic!("{what}: {e}"),
        };
        assert_eq!(r.status(), 401, "{what}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer", "{what}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key", "{what}");
        assert!(
            !v.to_string().contains("kkkkkkkk"),
            "{what}: credential echoed"
        );
    }
    assert_eq!(up.served(), 0);
    // Odd case and spacing in the scheme are fine; the key itself is exact.
    for auth in [
        "bearer k1",
        "BEARER k1",
        "Bearer    k1",
        "Bearer\tk1",
        "apikey k1",
        "  Bearer k1  ",
    ] {
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .header("authorization", auth)
            .json(&chat_body(2))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{auth:?}");
    }
    // Past the header cap: 431, also never forwarded.
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {}", "k".repeat(70_000)))
        .json(&chat_body(2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(up.served(), 6);
    assert!(!gw.logs().contains("kkkkkkkk"), "credential in logs");
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/jwt/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn jwt_config(up: SocketAddr) -> String {
    let pem = fixture("rsa_a.pub.pem")
        .trim()
        .replace('\n', "\n          ");
    format!(
        r#"
backends:
  - name: up
    url: http://{up}
routes:
  - name: llm
    match: {{ path_prefix: /v1 }}
    backend: up
auth:
  jwt:
    providers:
      - name: test
        issuer: https://issuer.test
        audiences: [tollgate]
        leeway: 0s
        public_key_pem: |
          {pem}
        identity:
          userid: claims.sub
policies:
  - name: tok
    kind: TokenRateLimitPolicy
    accounting: reserve
    limits:
      user:
        rates: [{{ limit: 100000, window: 1m }}]
        counters: [auth.identity.userid]
"#
    )
}

fn mint(alg: jsonwebtoken::Algorithm, key: &jsonwebtoken::EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), claims, key).unwrap()
}

#[tokio::test]
async fn jwt_alg_confusion_expiry_and_foreign_keys_are_401() {
    use jsonwebtoken::{Algorithm, EncodingKey};
    let up = Upstream::start().await;
    let gw = Gateway::start(&jwt_config(up.addr));
    let now = T0 / 1000;
    let rsa_a = EncodingKey::from_rsa_pem(fixture("rsa_a.key.pem").as_bytes()).unwrap();
    let rsa_b = EncodingKey::from_rsa_pem(fixture("rsa_b.key.pem").as_bytes()).unwrap();
    let claims = |exp: u64| json!({"iss": "https://issuer.test", "aud": "tollgate", "sub": "mallory", "exp": exp});
    let good = mint(Algorithm::RS256, &rsa_a, &claims(now + 3600));
    let c = client();
    let call = |token: String| {
        c.post(gw.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {token}"))
            .json(&chat_body(2))
            .send()
    };
    assert_eq!(call(good.clone()).await.unwrap().status(), 200);

    // HS256 "signed" with the provider's RSA public key as the HMAC secret.
    let confused = mint(
        Algorithm::HS256,
        &EncodingKey::from_secret(fixture("rsa_a.pub.pem").as_bytes()),
        &claims(now + 3600),
    );
    let confused_trimmed = mint(
        Algorithm::HS256,
        &EncodingKey::from_secret(fixture("rsa_a.pub.pem").trim().as_bytes()),
        &claims(now + 3600),
    );
    let expired = mint(Algorithm::RS256, &rsa_a, &claims(now - 1));
    let not_yet = {
        let mut cl = claims(now + 3600);
        cl["nbf"] = json!(now + 600);
        mint(Algorithm::RS256, &rsa_a, &cl)
    };
    let other_key = mint(Algorithm::RS256, &rsa_b, &claims(now + 3600));
    let wrong_aud = {
        let mut cl = claims(now + 3600);
        cl["aud"] = json!("someone-else");
        mint(Algorithm::RS256, &rsa_a, &cl)
    };
    let wrong_iss = {
        let mut cl = claims(now + 3600);
        cl["iss"] = json!("https://evil.test");
        mint(Algorithm::RS256, &rsa_a, &cl)
    };
    // PS256 header over an RS256 signature: same key, different algorithm.
    let alg_swapped = {
        use base64::Engine as _;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        parts[0] = e.encode(r#"{"alg":"PS256","typ":"JWT"}"#);
        parts.join(".")
    };
    let none_alg = {
        use base64::Engine as _;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = good.split('.').nth(1).unwrap();
        format!("{}.{payload}.", e.encode(r#"{"alg":"none","typ":"JWT"}"#))
    };
    let tampered = {
        use base64::Engine as _;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        let mut cl: Value = serde_json::from_slice(&e.decode(&parts[1]).unwrap()).unwrap();
        cl["exp"] = json!(now + 999_999);
        parts[1] = e.encode(cl.to_string());
        parts.join(".")
    };
    for (what, token) in [
        ("alg confusion", confused),
        ("alg confusion (trimmed pem)", confused_trimmed),
        ("expired", expired),
        ("not yet valid", not_yet),
        ("foreign key", other_key),
        ("wrong audience", wrong_aud),
        ("wrong issuer", wrong_iss),
        ("alg swapped", alg_swapped),
        ("alg none", none_alg),
        ("tampered", tampered),
    ] {
        let r = call(token).await.unwrap();
        assert_eq!(r.status(), 401, "{what}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key", "{what}");
    }
    assert_eq!(up.served(), 1);
    // The good token expires with the (test) clock.
    gw.advance(3_601_000).await;
    assert_eq!(call(good).await.unwrap().status(), 401);
    assert_eq!(up.served(), 1);
}

// ---------------------------------------------------------------- reaching what is not routed

#[tokio::test]
async fn admin_api_is_unreachable_through_the_proxy_listener() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(up.addr, "  keep_alive: true", 1_000_000));
    let c = client();
    for path in [
        "/admin/status",
        "/admin/config",
        "/admin/counters",
        "/metrics",
        "/healthz",
        "/dashboard",
        "/v1/../admin/status",
        "/v1/%2e%2e/admin/config",
        "/v1/%2E%2E/metrics",
        "//admin/status",
        "/./admin/counters",
        "/v1/chat/../../admin/status",
        "/%61dmin/status",
        "/ADMIN/status",
        "/admin/status?x=/v1/chat/completions",
    ] {
        for auth in [None, Some("Bearer k1")] {
            let mut req = c.get(gw.url(path));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            assert!(matches!(status, 400 | 404), "{path}: {status} {text}");
            for leak in [
                "uptime_s",
                "tollgate_requests_total",
                "last_reload",
                "\"counters\"",
            ] {
                assert!(!text.contains(leak), "{path}: admin content leaked: {text}");
            }
        }
    }
    // Absolute-form request naming the admin listener: still this listener's routes.
    let raw_req = format!(
        "GET http://{}/admin/status HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
        gw.admin, gw.admin
    );
    let addr = gw.proxy;
    let resp =
        tokio::task::spawn_blocking(move || raw(addr, raw_req.as_bytes(), Duration::from_secs(10)))
            .await
            .unwrap();
    assert_eq!(status_of(&resp), 404, "{resp}");
    assert!(!resp.contains("uptime_s"));
    assert_eq!(up.served(), 0);
}

/// The quickstart shape: the budget applies only `when` the path is chat completions.
fn when_config(up: SocketAddr) -> String {
    format!(
        r#"
backends:
  - name: up
    url: http://{up}
routes:
  - name: llm
    match: {{ path_prefix: /v1 }}
    backend: up
auth:
  api_keys:
    keys:
      - key: k1
        identity: {{ userid: u1 }}
policies:
  - name: tok
    kind: TokenRateLimitPolicy
    accounting: reserve
    limits:
      user:
        rates: [{{ limit: 1000000, window: 1m }}]
        when:
          - request.path == "/v1/chat/completions"
        counters: [auth.identity.userid]
"#
    )
}

#[tokio::test]
async fn path_tricks_never_slip_past_a_when_predicate() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&when_config(up.addr));
    let c = client();
    // What each spelling must come to: charged like the canonical path, refused by
    // tollgate (never forwarded), or forwarded to an endpoint the upstream does not have.
    #[derive(Debug, PartialEq)]
    enum Fate {
        Charged,
        Refused(u16),
        UpstreamHasNone,
    }
    use Fate::*;
    for (path, fate) in [
        ("/v1/chat/completions", Charged),
        ("/v1/chat/completions?stream=false", Charged),
        ("/v1/chat/completions?", Charged),
        ("//v1/chat/completions", Charged),
        ("/v1//chat/completions", Charged),
        ("/v1/./chat/completions", Charged),
        ("/v1/x/../chat/completions", Charged),
        ("/v1/%63hat/completions", Charged),
        ("/v1/chat/%2e/completions", Charged),
        ("/v1/chat/completions#frag", Charged),
        ("/v1/chat/completions/", Refused(404)),
        ("/v1/chat/completions/.", Refused(404)),
        ("/v1/chat/completions//", Refused(404)),
        ("/V1/chat/completions", Refused(404)),
        ("/v1/Chat/Completions", Refused(404)),
        ("/v1/CHAT/completions", Refused(404)),
        ("/v1/chat/completions%2F", Refused(400)),
        ("/v1/chat%2Fcompletions", Refused(400)),
        ("/v1/chat%5Ccompletions", Refused(400)),
        ("/v1/chat/completions%00", UpstreamHasNone),
        ("/v1/chat/completions;x=1", UpstreamHasNone),
        ("/v1/chat/completions%3B", UpstreamHasNone),
    ] {
        let (before, _) = counter(&gw, "u1").await;
        let served_before = up.served();
        let r = c
            .post(format!("http://{}{}", gw.proxy, path))
            .header("authorization", "Bearer k1")
            .json(&chat_body(3))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let _ = r.bytes().await;
        let (after, reserved) = counter(&gw, "u1").await;
        assert_eq!(reserved, 0, "{path}");
        let forwarded = up.served() - served_before;
        let got = match (status, forwarded) {
            (200, 1) if after > before => Charged,
            (404, 1) if after == before => UpstreamHasNone,
            (s, 0) if after == before => Refused(s),
            _ => {
                panic!("{path}: status {status}, forwarded {forwarded}, charged {before}->{after}")
            }
        };
        assert_eq!(got, fate, "{path}");
    }
}

// ---------------------------------------------------------------- raw HTTP/1.1 abuse

fn post_raw(extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer k1\r\ncontent-type: application/json\r\n{extra_headers}\r\n{body}"
    )
    .into_bytes()
}

#[tokio::test]
async fn header_injection_is_refused_before_anything_is_forwarded() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(up.addr, "  keep_alive: true", 1_000_000));
    let body = chat_json(2);
    let len = body.len();
    for (what, header) in [
        (
            "bare CR in a value",
            "x-inject: a\rx-evil: 1\r\n".to_owned(),
        ),
        (
            "obs-fold continuation",
            "x-inject: a\r\n x-evil: 1\r\n".to_owned(),
        ),
        ("NUL in a value", "x-inject: a\0b\r\n".to_owned()),
        ("space before colon", "x-inject : a\r\n".to_owned()),
        ("CR in a header name", "x-in\rject: a\r\n".to_owned()),
        ("request id with CR", "x-request-id: a\rb\r\n".to_owned()),
    ] {
        let req = post_raw(&format!("{header}content-length: {len}\r\n"), &body);
        let addr = gw.proxy;
        let resp = tokio::task::spawn_blocking(move || raw(addr, &req, Duration::from_secs(10)))
            .await
            .unwrap();
        assert_eq!(status_of(&resp), 400, "{what}: {resp}");
    }
    assert_eq!(up.served(), 0);
    // Values tollgate passes on are the client's own bytes, echoed intact, never split.
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer k1")
        .header("x-sim-echo-headers", "1")
        .header("x-custom", "a%0d%0ax-evil: 1")
        .json(&chat_body(2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = r.headers()["x-sim-seen-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(!seen.contains("x-evil"), "{seen}");
}

#[tokio::test]
async fn request_smuggling_is_refused_or_framed_one_way_only() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(up.addr, "  keep_alive: true", 1_000_000));
    let body = chat_json(2);
    let smuggled = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer k2\r\ncontent-length: {}\r\n\r\n{}",
        body.len(),
        body
    );
    let chunked = format!("{:x}\r\n{}\r\n0\r\n\r\n", body.len(), body);
    let addr = gw.proxy;
    let send = move |req: Vec<u8>| {
        tokio::task::spawn_blocking(move || raw(addr, &req, Duration::from_secs(5)))
    };
    // Refused outright: two different lengths, a transfer coding other than chunked last,
    // obfuscated codings, a bad length.
    for (what, headers) in [
        (
            "two content-lengths",
            format!("content-length: {}\r\ncontent-length: 5\r\n", body.len()),
        ),
        (
            "list content-length",
            format!("content-length: {0}, 5\r\n", body.len()),
        ),
        (
            "negative content-length",
            "content-length: -1\r\n".to_owned(),
        ),
        (
            "plus content-length",
            format!("content-length: +{}\r\n", body.len()),
        ),
        ("te not chunked", "transfer-encoding: gzip\r\n".to_owned()),
        (
            "te chunked then identity",
            "transfer-encoding: chunked, identity\r\n".to_owned(),
        ),
        ("te xchunked", "transfer-encoding: xchunked\r\n".to_owned()),
        (
            "te chunked twice headers, last not chunked",
            "transfer-encoding: chunked\r\ntransfer-encoding: x\r\n".to_owned(),
        ),
        (
            "te with vertical tab",
            "transfer-encoding:\x0bchunked\r\n".to_owned(),
        ),
        (
            "te name with space",
            "transfer-encoding : chunked\r\n".to_owned(),
        ),
    ] {
        let mut req = post_raw(&headers, &chunked);
        req.extend_from_slice(smuggled.as_bytes());
        let resp = send(req).await.unwrap();
        assert_eq!(status_of(&resp), 400, "{what}: {resp}");
        assert_eq!(
            resp.matches("HTTP/1.1").count(),
            1,
            "{what}: a second response: {resp}"
        );
    }
    assert_eq!(up.served(), 0, "a refused request reached the upstream");
    assert_eq!(counter(&gw, "u2").await, (0, 0));

    // Content-Length and chunked together: hyper frames by chunked (RFC 9112 §6.3),
    // drops the length and closes the connection after the response, so the bytes after
    // the chunked body are never read as a request. Only the framed request is served.
    for order in ["cl-first", "te-first"] {
        let headers = if order == "cl-first" {
            format!(
                "content-length: {}\r\ntransfer-encoding: chunked\r\n",
                chunked.len()
            )
        } else {
            "transfer-encoding: chunked\r\ncontent-length: 4\r\n".to_owned()
        };
        let mut req = post_raw(&headers, &chunked);
        req.extend_from_slice(smuggled.as_bytes());
        let served_before = up.served();
        let started = Instant::now();
        let resp = send(req).await.unwrap();
        // Closed by the server, not by our 5s read timeout.
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{order}: connection kept open"
        );
        assert_eq!(resp.matches("HTTP/1.1").count(), 1, "{order}: {resp}");
        assert_eq!(status_of(&resp), 200, "{order}: {resp}");
        assert_eq!(up.served(), served_before + 1, "{order}");
    }
    // The smuggled request (as k2) never ran.
    assert_eq!(counter(&gw, "u2").await, (0, 0));
}

// ---------------------------------------------------------------- budget evasion

fn expected_total(up: &Upstream, body: &Value) -> u64 {
    let (p, c) = up
        .sim
        .expected_usage(tollgate_sim::Api::ChatCompletions, body)
        .unwrap();
    p + c
}

#[tokio::test]
async fn budget_evasion_in_reserve_mode_is_charged_or_refused() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(up.addr, "  keep_alive: true", 1000));
    let c = client();
    let send = |key: &'static str, body: String| {
        c.post(gw.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let mut spent = 0;
    // Streams that did not ask for usage, or asked not to get it: charged the upstream's
    // exact usage, and the client still gets the stream it asked for (no usage chunk).
    for (what, mut body) in [
        ("stream without stream_options", chat_body(6)),
        ("include_usage false", chat_body(6)),
        ("stream_options null", chat_body(6)),
    ] {
        body["stream"] = json!(true);
        match what {
            "include_usage false" => body["stream_options"] = json!({"include_usage": false}),
            "stream_options null" => body["stream_options"] = Value::Null,
            _ => {}
        }
        let r = send("k1", body.to_string()).await.unwrap();
        assert_eq!(r.status(), 200, "{what}");
        let text = r.text().await.unwrap();
        assert!(
            !text.contains("\"usage\":{"),
            "{what}: usage chunk shown: {text}"
        );
        spent += expected_total(&up, &body);
        assert_eq!(counter(&gw, "u1").await, (spent, 0), "{what}");
    }
    // max_tokens 0, n: 8: whatever the upstream reports is what is charged.
    for (what, body) in [
        (
            "max_tokens 0",
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
        ),
        (
            "n 8",
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 8}),
        ),
        (
            "n 8 streamed",
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 8, "stream": true}),
        ),
    ] {
        let r = send("k1", body.to_string()).await.unwrap();
        let status = r.status().as_u16();
        let _ = r.bytes().await;
        if status == 200 {
            spent += expected_total(&up, &body);
        }
        assert!(status == 200 || status == 400, "{what}: {status}");
        assert_eq!(counter(&gw, "u1").await, (spent, 0), "{what}");
    }
    // Refused before the upstream: a reservation that can never fit, bodies the gateway
    // and the upstream could read differently.
    let served = up.served();
    let huge = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1_000_000_000_000u64});
    let r = send("k1", huge.to_string()).await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-should-retry"], "false");
    let huge_n = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "n": 8});
    assert_eq!(send("k1", huge_n.to_string()).await.unwrap().status(), 429);
    for (what, body) in [
        ("not json", "max_tokens=1".to_owned()),
        ("truncated json", r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":1"#.to_owned()),
        ("duplicate max_tokens", r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":1,"max_tokens":100000}"#.to_owned()),
        ("duplicate stream", r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":1,"stream":false,"stream":true}"#.to_owned()),
        ("duplicate nested include_usage", r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":1,"stream":true,"stream_options":{"include_usage":true,"include_usage":false}}"#.to_owned()),
        ("duplicate n", r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":1,"n":1,"n":64}"#.to_owned()),
        ("escaped duplicate key", r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":1,"max_\u0074okens":100000}"#.to_owned()),
        ("max_tokens as string", r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":"100000"}"#.to_owned()),
        ("negative max_tokens", r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":-1}"#.to_owned()),
        ("array body", "[]".to_owned()),
        ("trailing garbage", r#"{"model":"m","messages":[],"max_tokens":1} {"max_tokens":9}"#.to_owned()),
    ] {
        let r = send("k1", body).await.unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, 400, "{what}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{what}");
    }
    assert_eq!(
        up.served(),
        served,
        "an unreadable or unfit body reached the upstream"
    );
    assert_eq!(counter(&gw, "u1").await, (spent, 0));
    // `n: 0` is reserved as one choice; the upstream refuses it and nothing is charged.
    let r = send(
        "k1",
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":1,"n":0}"#.into(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let _ = r.bytes().await;
    assert_eq!(counter(&gw, "u1").await, (spent, 0));

    // Many streams at once, each asking for more than its share: the admitted ones
    // never add up past the limit, and each is charged exactly its usage.
    let body = json!({
        "model": "m", "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 20, "n": 2, "stream": true, "stream_options": {"include_usage": false},
    });
    let per_call = expected_total(&up, &body);
    let futs = (0..40).map(|_| {
        let req = c
            .post(gw.url("/v1/chat/completions"))
            .header("authorization", "Bearer k2")
            .header("x-sim-ms-per-token", "2")
            .json(&body);
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let _ = r.bytes().await;
            status
        }
    });
    let statuses = futures_util::future::join_all(futs).await;
    let admitted = statuses.iter().filter(|s| **s == 200).count() as u64;
    let refused = statuses.iter().filter(|s| **s == 429).count() as u64;
    assert_eq!(admitted + refused, 40, "{statuses:?}");
    assert!(admitted > 0 && refused > 0, "{statuses:?}");
    let (value, reserved) = counter(&gw, "u2").await;
    assert_eq!(reserved, 0);
    assert_eq!(value, admitted * per_call);
    assert!(value <= 1000, "charged {value} past a limit of 1000");
}

#[tokio::test]
async fn upstream_429_is_passed_on_settled_and_counted_apart() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(up.addr, "  keep_alive: true", 60));
    let c = client();
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer k1")
        .header("x-sim-fault", "status-429")
        .json(&chat_body(50))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
    // The upstream's own rate-limit headers are not mistaken for tollgate's.
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("x-sim-fault"),
        "{v}"
    );
    // Its reservation (50 + prompt of a 60 budget) was released at once: the whole
    // budget is there for the next call.
    assert_eq!(counter(&gw, "u1").await, (0, 0));
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer k1")
        .json(&chat_body(50))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    // Now tollgate itself refuses.
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer k1")
        .json(&chat_body(50))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after-ms").is_some());
    let m = metrics(&gw).await;
    let line = |decision: &str| {
        format!(
            "tollgate_requests_total{{route=\"llm\",backend=\"up\",status_class=\"4xx\",decision=\"{decision}\"}}"
        )
    };
    assert_eq!(sample(&m, &line("upstream_limited")), 1.0, "{m}");
    assert_eq!(sample(&m, &line("limited")), 1.0, "{m}");
}
