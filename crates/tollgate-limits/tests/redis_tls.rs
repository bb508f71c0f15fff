#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `rediss://`: the store over TLS, against a redis-server this test starts on a port of
//! its own with certificates made here (a private CA that signs the server and a client),
//! requiring client certificates. Never the shared server. The server runs under a small
//! `sh` wrapper that kills it when our end of its stdin closes, so it goes away with the
//! test process however that ends.

use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tollgate_limits::store::{Admission, ReservationId, Settlement, Store, StoreError};
use tollgate_limits::{
    Clock, CounterId, CounterKind, CounterOp, Need, Rate, RedisConfig, RedisStore, RedisTls,
    SystemClock, Window,
};

struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "tollgate test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(vec!["tollgate".to_owned()]).unwrap();
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params.signed_by(&client_key, &issuer).unwrap();
    Pki {
        ca,
        server_cert: server.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

struct TlsRedis {
    wrapper: Child,
    stdin: Option<ChildStdin>,
    port: u16,
    dir: PathBuf,
}

impl TlsRedis {
    fn start(pki: &Pki) -> TlsRedis {
        let dir = std::env::temp_dir().join(format!(
            "tg-redis-tls-{}-{}",
            std::process::id(),
            SystemClock.now_ms()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, body: &str| {
            let p = dir.join(name);
            std::fs::File::create(&p)
                .unwrap()
                .write_all(body.as_bytes())
                .unwrap();
            p.to_string_lossy().into_owned()
        };
        let (ca, cert, key) = (
            write("ca.pem", &pki.ca),
            write("server.pem", &pki.server_cert),
            write("server.key", &pki.server_key),
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let script = r#"redis-server "$@" >/dev/null 2>&1 &
pid=$!
read _
kill -9 $pid 2>/dev/null
wait $pid 2>/dev/null"#;
        let mut wrapper = Command::new("sh")
            .args(["-c", script, "sh"])
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--tls-cert-file", &cert, "--tls-key-file", &key])
            .args(["--tls-ca-cert-file", &ca, "--tls-auth-clients", "yes"])
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .spawn()
            .expect("sh");
        let stdin = wrapper.stdin.take();
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "TLS redis-server did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        TlsRedis {
            wrapper,
            stdin,
            port,
            dir,
        }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.wrapper.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config(port: u16, tls: Option<RedisTls>) -> RedisConfig {
    RedisConfig {
        url: Some(format!("rediss://127.0.0.1:{port}")),
        key_prefix: format!("tgtls-{}", std::process::id()),
        timeout_ms: 2_000,
        connect_timeout_ms: 3_000,
        tls,
        ..RedisConfig::default()
    }
}

fn op() -> CounterOp {
    CounterOp {
        id: CounterId::from_encoded("tls/user/60000/u1"),
        kind: CounterKind::Tokens,
        rate: Rate::Fixed {
            limit: 100,
            window: Window::aligned(60_000),
        },
        need: Need::Fits,
        commit: 0,
        reserve: 10,
        replica: false,
    }
}

fn tls(pki: &Pki, client: bool) -> RedisTls {
    RedisTls {
        ca_pem: Some(pki.ca.clone().into_bytes()),
        client_cert_pem: client.then(|| pki.client_cert.clone().into_bytes()),
        client_key_pem: client.then(|| pki.client_key.clone().into_bytes()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_private_ca_and_client_certificate() {
    let pki = pki();
    let server = TlsRedis::start(&pki);

    // The CA and a client certificate: admission and settlement work as on plain TCP.
    let store = RedisStore::connect(config(server.port, Some(tls(&pki, true))))
        .await
        .expect("TLS connection with the private CA and a client certificate");
    let now = SystemClock.now_ms();
    let r = ReservationId(1);
    let a = store.admit(now, &[op()], r, now + 30_000).await.unwrap();
    let Admission::Admitted { snapshots } = a else {
        panic!("refused: {a:?}");
    };
    store
        .settle(
            now,
            &[Settlement {
                op: op(),
                window_start: snapshots[0].window_start,
                reservation: r,
                actual: 7,
            }],
        )
        .await
        .unwrap();
    let probe = CounterOp {
        need: Need::Room,
        reserve: 0,
        ..op()
    };
    match store.admit(now, &[probe], ReservationId(2), now).await {
        Ok(Admission::Admitted { snapshots }) => {
            assert_eq!((snapshots[0].value, snapshots[0].reserved), (7, 0))
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_refuses_unknown_server_and_missing_client_certificate() {
    let pki = pki();
    let server = TlsRedis::start(&pki);

    // The system trust store does not know our CA: the server is not believed.
    let quick = |tls| RedisConfig {
        connect_timeout_ms: 1_000,
        ..config(server.port, tls)
    };
    let no_ca = RedisStore::connect(quick(None)).await;
    assert!(
        matches!(no_ca, Err(StoreError::Unavailable(_))),
        "connected to a server signed by an unknown CA"
    );
    // The CA but no client certificate: this server requires one.
    let no_client = match RedisStore::connect(quick(Some(tls(&pki, false)))).await {
        Err(e) => Err(e),
        // The handshake may only fail on first use (TLS 1.3 sends the alert late).
        Ok(store) => {
            let now = SystemClock.now_ms();
            store
                .admit(now, &[op()], ReservationId(3), now + 1_000)
                .await
                .map(|_| ())
        }
    };
    assert!(no_client.is_err(), "served a client without a certificate");

    // Half a client identity is a configuration error, not a silent plain connection.
    let half = RedisTls {
        client_key_pem: None,
        ..tls(&pki, true)
    };
    assert!(matches!(
        RedisStore::new_lazy(config(server.port, Some(half))),
        Err(StoreError::Unavailable(m)) if m.contains("key")
    ));
}
