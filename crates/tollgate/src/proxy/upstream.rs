//! The upstream side: pooled connections (plain HTTP: our own per-thread HTTP/1.1 pool,
//! see [`super::pool`]; HTTPS: hyper-util's client, HTTP/1.1 or HTTP/2 by ALPN, rustls with
//! the webpki and system root stores; a client of its own for a backend with its own CA or
//! client certificate) and the rewriting of a client request into an upstream
//! request: hop-by-hop headers dropped, the client's gateway credential removed, the
//! backend's key and static headers injected.

use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::body::ProxyBody;
use super::pool::PlainPool;
use crate::runtime::Backend;

pub type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// A pooled HTTP client. Each proxy thread gets pools of its own (see
/// `tollgate_limits::affinity`), so an upstream connection is only ever used by the
/// thread that drives it.
#[derive(Clone)]
pub struct UpstreamClient {
    connector: HttpsConnector,
    /// HTTPS upstreams, one hyper-util client per proxy thread (built on first use).
    pools: std::sync::Arc<[std::sync::OnceLock<Client<HttpsConnector, ProxyBody>>]>,
    /// Plain-HTTP upstreams.
    plain: PlainPool,
}

/// How long an idle upstream connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream and proxy thread.
const MAX_IDLE: usize = 1024;

/// Why a request got no response from the upstream: the error and its causes, one line.
#[derive(Debug)]
pub struct UpstreamError(pub String);

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An error followed by its chain of causes.
fn describe(e: &dyn std::error::Error) -> UpstreamError {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    UpstreamError(msg)
}

/// PEM material for one backend's TLS: a private CA to trust instead of the default
/// roots, and a client certificate for upstreams that require one. Never printed.
#[derive(Clone, Default)]
pub struct UpstreamTls {
    pub ca_pem: Option<Vec<u8>>,
    pub client_cert_pem: Option<Vec<u8>>,
    pub client_key_pem: Option<Vec<u8>>,
}

/// The default trust store: the webpki roots plus the operating system's (so a corporate
/// CA installed on the host works), loaded once. Unreadable system certificates are
/// skipped; the webpki roots are always there.
fn default_roots() -> rustls::RootCertStore {
    static ROOTS: std::sync::LazyLock<rustls::RootCertStore> = std::sync::LazyLock::new(|| {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let native = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        if !native.errors.is_empty() {
            tracing::debug!(
                added,
                errors = native.errors.len(),
                "some system root certificates could not be read"
            );
        }
        roots
    });
    ROOTS.clone()
}

fn pem_certs(
    what: &str,
    pem: &[u8],
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what}: not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no certificate in the file"));
    }
    Ok(certs)
}

/// The rustls client configuration for `tls` (default roots, no client certificate when
/// `None`). Errors name what is wrong with the PEM material.
fn client_tls_config(tls: Option<&UpstreamTls>) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    let roots = match tls.and_then(|t| t.ca_pem.as_deref()) {
        None => default_roots(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in pem_certs("ca_file", pem)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("ca_file: not a usable CA certificate: {e}"))?;
            }
            roots
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots);
    match tls.map(|t| (&t.client_cert_pem, &t.client_key_pem)) {
        Some((Some(cert), Some(key))) => {
            let chain = pem_certs("cert_file", cert)?;
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| format!("key_file: not a PEM private key: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("cert_file/key_file: {e}"))
        }
        Some((None, None)) | None => Ok(builder.with_no_client_auth()),
        Some(_) => Err("cert_file and key_file go together".into()),
    }
}

/// The TCP connector under both pools: TCP_NODELAY, keep-alive probes, bounded connect
/// time.
fn tcp_connector(connect_timeout: Duration) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    http
}

fn connector(connect_timeout: Duration, tls: rustls::ClientConfig) -> HttpsConnector {
    let http = tcp_connector(connect_timeout);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}

/// An HTTP/HTTPS connector: rustls (ring) with the webpki and system root stores,
/// TCP_NODELAY and keep-alive, bounded connect time. Shared by the upstream client and
/// JWKS fetches.
pub fn https_connector(connect_timeout: Duration) -> HttpsConnector {
    match client_tls_config(None) {
        Ok(tls) => connector(connect_timeout, tls),
        // The ring provider always supports the default versions; if that ever changes,
        // fall back to the builder's own defaults rather than failing.
        Err(_) => {
            let mut http = HttpConnector::new();
            http.enforce_http(false);
            http.set_nodelay(true);
            http.set_connect_timeout(Some(connect_timeout));
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_webpki_roots()
                .https_or_http()
                .enable_http1()
                .enable_http2()
                .wrap_connector(http)
        }
    }
}

impl UpstreamClient {
    pub fn new(connect_timeout: Duration) -> Self {
        Self::over(https_connector(connect_timeout), connect_timeout)
    }

    /// A client of its own for a backend with its own TLS settings (`backends[].tls`).
    pub fn with_tls(connect_timeout: Duration, tls: &UpstreamTls) -> Result<Self, String> {
        Ok(Self::over(
            connector(connect_timeout, client_tls_config(Some(tls))?),
            connect_timeout,
        ))
    }

    fn over(connector: HttpsConnector, connect_timeout: Duration) -> Self {
        Self {
            connector,
            pools: (0..tollgate_limits::affinity::SLOTS)
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            plain: PlainPool::new(tcp_connector(connect_timeout), IDLE_TIMEOUT, MAX_IDLE),
        }
    }

    fn pool(&self) -> &Client<HttpsConnector, ProxyBody> {
        self.pools[tollgate_limits::affinity::slot()].get_or_init(|| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(IDLE_TIMEOUT)
                .pool_max_idle_per_host(MAX_IDLE)
                .build(self.connector.clone())
        })
    }

    /// Sends `req` (an absolute URI) upstream: `http://` on the plain pool, anything else
    /// on hyper-util's client.
    pub async fn send(
        &self,
        req: http::Request<ProxyBody>,
    ) -> Result<http::Response<ProxyBody>, UpstreamError> {
        if req.uri().scheme() == Some(&http::uri::Scheme::HTTP) {
            return self.plain.send(req).await.map_err(|e| describe(&e));
        }
        match self.pool().request(req).await {
            Ok(resp) => Ok(resp.map(|b| b.map_err(Into::into).boxed_unsync())),
            Err(e) => Err(describe(&e)),
        }
    }
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn is_hop_by_hop(name: &HeaderName, connection_listed: &[HeaderName]) -> bool {
    HOP_BY_HOP.contains(name)
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
        || connection_listed.contains(name)
}

fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

/// Client credential headers tollgate consumes.
pub fn is_client_credential(name: &HeaderName) -> bool {
    name == header::AUTHORIZATION || name.as_str() == "x-api-key" || name.as_str() == "api-key"
}

/// The request headers to send upstream.
pub fn upstream_headers(
    client: &HeaderMap,
    backend: &Backend,
    forward_credentials: bool,
) -> HeaderMap {
    let listed = connection_listed(client);
    let mut out = HeaderMap::with_capacity(client.len() + backend.headers.len() + 2);
    for (name, value) in client {
        if is_hop_by_hop(name, &listed) || name == header::HOST || name == header::CONTENT_LENGTH {
            continue;
        }
        if !forward_credentials && is_client_credential(name) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    for (name, value) in &backend.headers {
        out.insert(name.clone(), value.clone());
    }
    if let Some((name, value)) = &backend.credential {
        if !forward_credentials {
            // Remove every credential header before injecting ours, so the upstream
            // never sees two.
            out.remove(header::AUTHORIZATION);
            out.remove("x-api-key");
            out.remove("api-key");
        }
        out.insert(name.clone(), value.clone());
    }
    out
}

/// The response headers to send to the client. When tollgate sets its own rate-limit
/// headers, the upstream's `x-ratelimit-*` are renamed `x-upstream-ratelimit-*`.
pub fn downstream_headers(upstream: &HeaderMap, rename_ratelimit: bool) -> HeaderMap {
    let listed = connection_listed(upstream);
    let mut out = HeaderMap::with_capacity(upstream.len() + 8);
    for (name, value) in upstream {
        if is_hop_by_hop(name, &listed) {
            continue;
        }
        if rename_ratelimit {
            if let Some(rest) = name.as_str().strip_prefix("x-ratelimit-") {
                if let Ok(n) =
                    HeaderName::from_bytes(format!("x-upstream-ratelimit-{rest}").as_bytes())
                {
                    out.append(n, value.clone());
                }
                continue;
            }
        }
        out.append(name.clone(), value.clone());
    }
    out
}

pub fn host_header(authority: &http::uri::Authority) -> Option<HeaderValue> {
    HeaderValue::from_str(authority.as_str()).ok()
}

pub fn bytes_len_header(len: usize) -> HeaderValue {
    HeaderValue::from(len)
}
