//! HTTPS upstreams with a private CA and mutual TLS (`backends[].tls`): a real TLS
//! terminator (rustls, certificates made here) in front of the simulator; the gateway
//! trusts only what it is told to, presents its client certificate where required, and
//! answers 502 (never forwards in the clear) when the upstream cannot be verified.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::{client, Gateway, Upstream};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};

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
        .push(DnType::CommonName, "tollgate upstream test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut cp = CertificateParams::new(vec!["tollgate".to_owned()]).unwrap();
    cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = cp.signed_by(&client_key, &issuer).unwrap();
    Pki {
        ca,
        server_cert: server.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client_cert.pem(),
        client_key: client_key.serialize_pem(),
    }
}

/// TLS in front of `plain`: every accepted connection is handshaken, then piped to the
/// simulator. With `require_client_cert`, only clients with a certificate of our CA pass.
async fn tls_terminator(pki: &Pki, plain: SocketAddr, require_client_cert: bool) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pki.server_cert.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_slice(pki.server_key.as_bytes()).unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let cfg = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(pki.ca.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        builder
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .unwrap()
    } else {
        builder
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap()
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(plain).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    addr
}

fn write(dir: &std::path::Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.to_string_lossy().into_owned()
}

fn config(upstream: SocketAddr, tls_yaml: &str) -> String {
    format!(
        r#"
backends:
  - name: up
    url: https://{upstream}
{tls_yaml}routes:
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
    limits:
      user:
        rates: [{{ limit: 100000, window: 1h }}]
        counters: [auth.identity.userid]
logging:
  access_log: false
"#
    )
}

async fn call(g: &Gateway) -> (u16, Value) {
    let r = client()
        .post(g.url("/v1/chat/completions"))
        .header("authorization", "Bearer k1")
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 5}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_ca_and_client_certificate_to_the_upstream() {
    let pki = pki();
    let up = Upstream::start().await;
    let dir = std::env::temp_dir().join(format!(
        "tg-upstream-tls-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = write(&dir, "ca.pem", &pki.ca);
    let cert = write(&dir, "client.pem", &pki.client_cert);
    let key = write(&dir, "client.key", &pki.client_key);

    // Server-only TLS, private CA: trusted through `ca_file`, and the call is charged.
    let tls_only = tls_terminator(&pki, up.addr, false).await;
    let g = Gateway::start(&config(
        tls_only,
        &format!("    tls: {{ ca_file: {ca} }}\n"),
    ));
    let (status, body) = call(&g).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        g.counter_value("tok/user/3600000/u1", None).await.unwrap(),
        body["usage"]["total_tokens"].as_u64().unwrap()
    );
    // Without it, the default roots do not know the CA: 502, nothing reaches the upstream.
    let before = up.served();
    let g = Gateway::start(&config(tls_only, ""));
    let (status, body) = call(&g).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(up.served(), before);

    // An upstream that requires a client certificate: served with one, 502 without.
    let mtls = tls_terminator(&pki, up.addr, true).await;
    let g = Gateway::start(&config(
        mtls,
        &format!("    tls: {{ ca_file: {ca}, cert_file: {cert}, key_file: {key} }}\n"),
    ));
    let (status, body) = call(&g).await;
    assert_eq!(status, 200, "{body}");
    let before = up.served();
    let g = Gateway::start(&config(mtls, &format!("    tls: {{ ca_file: {ca} }}\n")));
    let (status, body) = call(&g).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(up.served(), before);
    let _ = std::fs::remove_dir_all(&dir);
}
