//! No secret leaves the gateway: the real binary runs with known API keys (inline and from
//! the environment), a known JWT and its HS256 secret, a known upstream key and admin
//! token; traffic covers good and bad credentials, 401s, 429s, upstream errors and
//! streams; then every output is searched for those secrets: stdout and stderr (JSON and
//! text logs at debug level), `/metrics`, every admin endpoint, every response's status
//! line, headers and body, and the bytes that reached the upstream (which must carry the
//! backend key and none of the client's credentials).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FREE_KEY: &str = "sk-leaktest-free-5Qm8vR2xT7";
const GOLD_KEY: &str = "sk-leaktest-gold-Zr4Kp9Wd1N";
/// A credential a client tries that is no key of ours (it may be someone's real key).
const WRONG_KEY: &str = "sk-leaktest-wrong-Hc6Yb3Ls0J";
const UPSTREAM_KEY: &str = "sk-upstream-backend-Ty7Gh2Qa8E";
const ADMIN_TOKEN: &str = "admintoken-leaktest-Wn5Ue1Xo4R";
const HS_SECRET: &str = "hs256-secret-leaktest-0123456789abcdef-XYZ";
/// Upstream failures asked of the simulator (`x-sim-fault`).
const FAULTS: [&str; 5] = [
    "status-500",
    "status-429",
    "usage-in-error",
    "cut-stream",
    "malformed",
];

/// A TCP pass-through in front of the upstream that keeps every byte sent to it.
struct Tap {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Tap {
    async fn start(target: SocketAddr) -> Tap {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = l.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut ri, mut wi) = inbound.into_split();
                    let (mut ro, mut wo) = outbound.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match ri.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            log.lock().unwrap().extend_from_slice(&buf[..n]);
                            if wo.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = wo.shutdown().await;
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut ro, &mut wi).await;
                        let _ = wi.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Tap { addr, seen }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }
}

fn config(tap: SocketAddr, format: &str) -> String {
    format!(
        r#"
backends:
  - name: up
    url: http://{tap}
    api_key_env: LEAK_UPSTREAM_KEY
routes:
  - name: llm
    match: {{ path_prefix: /v1 }}
    backend: up
admin:
  token_env: LEAK_ADMIN_TOKEN
logging:
  format: {format}
  level: debug
  access_log: true
metrics:
  counter_labels: true
auth:
  api_keys:
    prefixes: [Bearer, APIKEY]
    keys:
      - key: {FREE_KEY}
        identity: {{ userid: free-user, groups: free }}
      - key_env: LEAK_GOLD_KEY
        identity: {{ userid: gold-user, groups: gold }}
  jwt:
    providers:
      - name: leak
        issuer: leak-issuer
        hs256_secret_env: LEAK_HS_SECRET
        identity: {{ userid: claims.sub }}
policies:
  - name: tok
    kind: TokenRateLimitPolicy
    accounting: reserve
    limits:
      free:
        rates: [{{ limit: 80, window: 1m }}]
        when: ['auth.identity.userid == "free-user"']
        counters: [auth.identity.userid]
      everyone:
        rates: [{{ limit: 1000000, window: 1h }}]
        counters: [auth.identity.userid]
"#
    )
}

fn jwt(secret: &str) -> String {
    let claims = json!({"iss": "leak-issuer", "sub": "jwt-user", "exp": T0 / 1000 + 3600});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// The same token with its payload changed (signature kept).
fn tampered(token: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    let payload = json!({"iss": "leak-issuer", "sub": "mallory", "exp": T0 / 1000 + 3600});
    format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(payload.to_string()),
        parts[2]
    )
}

/// Everything one response showed the client, as text.
async fn record(out: &mut String, r: reqwest::Response) -> u16 {
    let status = r.status().as_u16();
    out.push_str(&format!("{status}\n"));
    for (k, v) in r.headers() {
        out.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    let body = r.bytes().await.unwrap_or_default();
    out.push_str(&String::from_utf8_lossy(&body));
    out.push('\n');
    status
}

fn chat(stream: bool, include_usage: Option<bool>) -> serde_json::Value {
    let mut b = json!({
        "model": "sim-model",
        "messages": [{"role": "user", "content": "tell me a secret"}],
        "max_tokens": 12,
    });
    if stream {
        b["stream"] = json!(true);
    }
    if let Some(u) = include_usage {
        b["stream_options"] = json!({"include_usage": u});
    }
    b
}

async fn run(format: &str) {
    let up = Upstream::start().await;
    let tap = Tap::start(up.addr).await;
    let token = jwt(HS_SECRET);
    let signature = token.rsplit('.').next().unwrap().to_owned();
    let forged = jwt("not-the-secret-but-32-bytes-long-0000");
    let tampered = tampered(&token);
    let gw = Gateway::start_with_env(
        &config(tap.addr, format),
        &[
            ("LEAK_UPSTREAM_KEY", UPSTREAM_KEY),
            ("LEAK_ADMIN_TOKEN", ADMIN_TOKEN),
            ("LEAK_GOLD_KEY", GOLD_KEY),
            ("LEAK_HS_SECRET", HS_SECRET),
            ("RUST_LOG", "debug"),
        ],
    );
    let c = client();
    let url = gw.url("/v1/chat/completions");
    let mut seen = String::new();
    let mut statuses = Vec::new();

    // Good keys, every way they can be sent, streamed and not; the free user runs into 429s.
    for _ in 0..6 {
        let r = c
            .post(&url)
            .header("authorization", format!("Bearer {FREE_KEY}"))
            .json(&chat(false, None))
            .send()
            .await
            .unwrap();
        statuses.push(record(&mut seen, r).await);
    }
    for (header, value) in [
        ("authorization", format!("APIKEY {GOLD_KEY}")),
        ("authorization", format!("bearer {GOLD_KEY}")),
        ("x-api-key", GOLD_KEY.to_owned()),
    ] {
        for body in [chat(false, None), chat(true, None), chat(true, Some(true))] {
            let r = c
                .post(&url)
                .header(header, &value)
                .json(&body)
                .send()
                .await
                .unwrap();
            statuses.push(record(&mut seen, r).await);
        }
    }
    let r = c
        .post(gw.url("/v1/messages"))
        .header("x-api-key", GOLD_KEY)
        .json(
            &json!({"model": "sim-model", "max_tokens": 8, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    statuses.push(record(&mut seen, r).await);

    // Bad credentials: wrong key, odd spacing, a key used as a JWT, forged and tampered JWTs.
    for (header, value) in [
        ("authorization", format!("Bearer {WRONG_KEY}")),
        ("authorization", format!("Bearer  {WRONG_KEY} ")),
        ("authorization", format!("Basic {WRONG_KEY}")),
        ("authorization", WRONG_KEY.to_owned()),
        ("x-api-key", WRONG_KEY.to_owned()),
        ("api-key", WRONG_KEY.to_owned()),
        ("authorization", format!("Bearer {forged}")),
        ("authorization", format!("Bearer {tampered}")),
        ("authorization", format!("Bearer {}x", token)),
    ] {
        let r = c
            .post(&url)
            .header(header, value)
            .json(&chat(false, None))
            .send()
            .await
            .unwrap();
        statuses.push(record(&mut seen, r).await);
    }

    // A good JWT, streamed and not; where it stands.
    for body in [chat(false, None), chat(true, None)] {
        let r = c
            .post(&url)
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .unwrap();
        statuses.push(record(&mut seen, r).await);
    }
    // Where the caller stands (answered, not proxied: no access line when it succeeds).
    for (cred, expected) in [(GOLD_KEY, 200), (token.as_str(), 200), (WRONG_KEY, 401)] {
        let r = c
            .get(gw.url("/v1/tollgate/usage"))
            .bearer_auth(cred)
            .send()
            .await
            .unwrap();
        assert_eq!(record(&mut seen, r).await, expected);
    }

    // Upstream errors, streamed and not.
    for fault in FAULTS {
        for stream in [false, true] {
            let r = c
                .post(&url)
                .header("x-api-key", GOLD_KEY)
                .header("x-sim-fault", fault)
                .json(&chat(stream, None))
                .send()
                .await
                .unwrap();
            statuses.push(record(&mut seen, r).await);
        }
    }
    // Unknown route and the admin API through the proxy listener.
    for path in ["/admin/config", "/metrics", "/nope"] {
        let r = c
            .get(gw.url(path))
            .bearer_auth(GOLD_KEY)
            .send()
            .await
            .unwrap();
        statuses.push(record(&mut seen, r).await);
    }

    let proxied = statuses.len();
    for expected in [200, 401, 429, 500] {
        assert!(
            statuses.contains(&expected),
            "traffic did not produce a {expected}: {statuses:?}"
        );
    }

    // Every admin endpoint, with the token (and a few without or with a wrong one).
    let admin_paths = [
        "/metrics",
        "/admin/counters",
        "/admin/config",
        "/admin/status",
        "/admin/usage?since=1h",
        "/admin/test-clock",
        "/healthz",
        "/readyz",
        "/",
        "/dashboard",
    ];
    for path in admin_paths {
        let r = c
            .get(gw.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let status = record(&mut seen, r).await;
        assert!(status < 400, "admin {path} answered {status}");
    }
    for path in ["/admin/config", "/metrics"] {
        for auth in [None, Some(WRONG_KEY)] {
            let mut req = c.get(gw.admin_url(path));
            if let Some(a) = auth {
                req = req.bearer_auth(a);
            }
            let status = record(&mut seen, req.send().await.unwrap()).await;
            assert_eq!(status, 401, "admin {path} without the token");
        }
    }

    // Settlement and logging are asynchronous: wait (bounded) for one access line per
    // proxied request.
    for _ in 0..250 {
        if gw.logs().matches("tollgate::access").count() >= proxied {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let logs = gw.logs();
    let stdout = gw.stdout();
    let upstream = tap.text();

    // The searches below must be able to fail: the outputs are really there.
    let debug_marker = if format == "json" {
        "\"level\":\"DEBUG\""
    } else {
        "DEBUG"
    };
    assert!(logs.contains(debug_marker), "no debug lines in:\n{logs}");
    assert!(
        logs.matches("tollgate::access").count() >= proxied,
        "access log missing:\n{logs}"
    );
    assert!(stdout.contains("tollgate listening"), "stdout: {stdout}");
    assert!(seen.contains("tollgate_requests_total"));
    assert!(seen.contains("tok/everyone"), "counters missing:\n{seen}");

    let client_secrets = [
        ("free key", FREE_KEY.to_owned()),
        ("gold key", GOLD_KEY.to_owned()),
        ("wrong key", WRONG_KEY.to_owned()),
        ("jwt", token.clone()),
        ("jwt signature", signature),
        ("forged jwt", forged.clone()),
        ("tampered jwt", tampered.clone()),
        ("hs256 secret", HS_SECRET.to_owned()),
        ("admin token", ADMIN_TOKEN.to_owned()),
    ];
    let outputs = [
        ("stderr logs", logs.as_str()),
        ("stdout", stdout.as_str()),
        ("responses and admin output", seen.as_str()),
    ];
    for (what, text) in outputs {
        for (name, secret) in client_secrets
            .iter()
            .chain([("upstream key", UPSTREAM_KEY.to_owned())].iter())
        {
            assert!(
                !text.contains(secret.as_str()),
                "{name} appears in {what} ({format} logs)"
            );
        }
    }
    // The upstream got the backend key, and never a client credential.
    assert!(
        upstream.to_ascii_lowercase().contains(&format!(
            "authorization: bearer {}",
            UPSTREAM_KEY.to_ascii_lowercase()
        )),
        "backend key not sent upstream"
    );
    for (name, secret) in &client_secrets {
        assert!(
            !upstream.contains(secret.as_str()),
            "{name} was forwarded upstream"
        );
    }
}

#[tokio::test]
async fn no_secret_in_any_output_with_json_logs() {
    run("json").await;
}

#[tokio::test]
async fn no_secret_in_any_output_with_text_logs() {
    run("text").await;
}
