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

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const API_KEY: HeaderName = HeaderName::from_static("api-key");

fn is_hop_by_hop(name: &HeaderName, connection_listed: &[HeaderName]) -> bool {
    HOP_BY_HOP.contains(name)
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
        || connection_listed.contains(name)
}

/// The names the `Connection` header lists (they are hop-by-hop too). Usually none: no
/// allocation then.
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
    name == header::AUTHORIZATION || name == X_API_KEY || name == API_KEY
}

/// Removes, with all their values, the headers `doomed` picks. The map is filtered where
/// it is: a message usually carries none of them or one or two, so this costs a look at
/// each name and a removal per name found, not a copy of the whole map.
fn remove_where(headers: &mut HeaderMap, doomed: impl Fn(&HeaderName) -> bool) {
    while let Some(name) = headers.keys().find(|n| doomed(n)).cloned() {
        headers.remove(&name);
    }
}

/// The client's request headers made into the upstream request's: hop-by-hop headers,
/// `Host` and `Content-Length` (set again by the caller) and, unless `forward_credentials`,
/// the client's credential headers removed; the backend's static headers and its
/// credential set (replacing what the client sent under those names).
pub fn upstream_headers(
    mut headers: HeaderMap,
    backend: &Backend,
    forward_credentials: bool,
) -> HeaderMap {
    let listed = connection_listed(&headers);
    remove_where(&mut headers, |name| {
        is_hop_by_hop(name, &listed)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || (!forward_credentials && is_client_credential(name))
    });
    for (name, value) in &backend.headers {
        headers.insert(name.clone(), value.clone());
    }
    if let Some((name, value)) = &backend.credential {
        if !forward_credentials {
            // The client's credential headers are gone already (so the upstream never
            // sees two), but a static header may have named one. A forwarded client key
            // stays, replaced only under the backend key's own name.
            remove_where(&mut headers, is_client_credential);
        }
        headers.insert(name.clone(), value.clone());
    }
    headers
}

/// The upstream's response headers made into the client's: hop-by-hop headers removed
/// and, when tollgate sets its own rate-limit headers, the upstream's `x-ratelimit-*`
/// renamed `x-upstream-ratelimit-*`.
pub fn downstream_headers(mut headers: HeaderMap, rename_ratelimit: bool) -> HeaderMap {
    let listed = connection_listed(&headers);
    remove_where(&mut headers, |name| is_hop_by_hop(name, &listed));
    if rename_ratelimit {
        while let Some((name, renamed)) = headers.keys().find_map(|n| {
            let rest = n.as_str().strip_prefix("x-ratelimit-")?;
            Some((
                n.clone(),
                HeaderName::from_bytes(format!("x-upstream-ratelimit-{rest}").as_bytes()),
            ))
        }) {
            // The old name goes with all its values, so the next search moves on.
            let values: Vec<HeaderValue> = match headers.entry(&name) {
                header::Entry::Occupied(e) => e.remove_entry_mult().1.collect(),
                header::Entry::Vacant(_) => Vec::new(),
            };
            if let Ok(renamed) = renamed {
                for v in values {
                    headers.append(renamed.clone(), v);
                }
            }
        }
    }
    headers
}

pub fn host_header(authority: &http::uri::Authority) -> Option<HeaderValue> {
    HeaderValue::from_str(authority.as_str()).ok()
}

pub fn bytes_len_header(len: usize) -> HeaderValue {
    HeaderValue::from(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::BackendTarget;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    /// Name and values, sorted by name (values in their order): what a peer sees, order
    /// of distinct names aside.
    fn seen(m: &HeaderMap) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = m
            .keys()
            .map(|k| {
                let values = m
                    .get_all(k)
                    .iter()
                    .map(|v| v.to_str().unwrap().to_owned())
                    .collect();
                (k.as_str().to_owned(), values)
            })
            .collect();
        out.sort();
        out
    }

    fn expect(pairs: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = pairs
            .iter()
            .map(|(k, vs)| {
                (
                    (*k).to_owned(),
                    vs.iter().map(|v| (*v).to_owned()).collect(),
                )
            })
            .collect();
        out.sort();
        out
    }

    fn backend(headers: &[(&str, &str)], credential: Option<(&str, &str)>) -> Backend {
        let pair = |k: &str, v: &str| {
            (
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            )
        };
        Backend {
            name: "b".into(),
            target: BackendTarget::Url {
                scheme: http::uri::Scheme::HTTP,
                authority: "127.0.0.1:1".parse().unwrap(),
                host: None,
                base_path: String::new(),
            },
            credential: credential.map(|(k, v)| pair(k, v)),
            headers: headers.iter().map(|(k, v)| pair(k, v)).collect(),
            forward_client_credentials: false,
            client: None,
        }
    }

    fn client_request() -> HeaderMap {
        map(&[
            ("host", "gw.example.com"),
            ("content-type", "application/json"),
            ("content-length", "42"),
            ("authorization", "Bearer client-gateway-key"),
            ("x-api-key", "client-gateway-key"),
            ("api-key", "client-azure-key"),
            ("connection", "keep-alive, x-trace-hop"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic abc"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("x-trace-hop", "1"),
            ("accept", "text/event-stream"),
            ("accept", "application/json"),
            ("anthropic-version", "2023-01-01"),
        ])
    }

    #[test]
    fn upstream_request_loses_hop_by_hop_and_client_credentials_and_gains_the_backends() {
        let b = backend(
            &[("anthropic-version", "2023-06-01"), ("x-static", "s")],
            Some(("x-api-key", "backend-key")),
        );
        let out = upstream_headers(client_request(), &b, false);
        assert_eq!(
            seen(&out),
            expect(&[
                ("content-type", &["application/json"]),
                ("accept", &["text/event-stream", "application/json"]),
                ("anthropic-version", &["2023-06-01"]),
                ("x-static", &["s"]),
                ("x-api-key", &["backend-key"]),
            ])
        );
    }

    #[test]
    fn a_static_header_cannot_smuggle_a_second_credential() {
        let b = backend(
            &[("authorization", "Bearer static")],
            Some(("api-key", "backend-key")),
        );
        let out = upstream_headers(client_request(), &b, false);
        assert_eq!(out.get(header::AUTHORIZATION), None);
        assert_eq!(out.get_all("api-key").iter().count(), 1);
        assert_eq!(out.get("api-key").unwrap(), "backend-key");
    }

    #[test]
    fn forwarded_client_credentials_stay_unless_the_backend_sets_the_same_name() {
        let out = upstream_headers(client_request(), &backend(&[], None), true);
        assert_eq!(
            out.get(header::AUTHORIZATION).unwrap(),
            "Bearer client-gateway-key"
        );
        assert_eq!(out.get("x-api-key").unwrap(), "client-gateway-key");
        assert_eq!(out.get("api-key").unwrap(), "client-azure-key");
        assert_eq!(out.get("x-trace-hop"), None);
        let b = backend(&[], Some(("authorization", "Bearer backend")));
        let out = upstream_headers(client_request(), &b, true);
        assert_eq!(out.get(header::AUTHORIZATION).unwrap(), "Bearer backend");
        assert_eq!(out.get("x-api-key").unwrap(), "client-gateway-key");
    }

    #[test]
    fn upstream_request_without_anything_to_remove_is_unchanged() {
        let plain = map(&[("content-type", "application/json"), ("accept", "*/*")]);
        let out = upstream_headers(plain.clone(), &backend(&[], None), false);
        assert_eq!(seen(&out), seen(&plain));
    }

    #[test]
    fn downstream_response_loses_hop_by_hop_and_renames_the_upstreams_rate_limits() {
        let upstream = || {
            map(&[
                ("content-type", "application/json"),
                ("transfer-encoding", "chunked"),
                ("connection", "close, x-hop"),
                ("x-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("x-ratelimit-limit-tokens", "1000"),
                ("x-ratelimit-remaining-tokens", "900"),
                ("x-ratelimit-remaining-tokens", "901"),
                ("x-request-id", "r1"),
            ])
        };
        assert_eq!(
            seen(&downstream_headers(upstream(), true)),
            expect(&[
                ("content-type", &["application/json"]),
                ("x-upstream-ratelimit-limit-tokens", &["1000"]),
                ("x-upstream-ratelimit-remaining-tokens", &["900", "901"]),
                ("x-request-id", &["r1"]),
            ])
        );
        assert_eq!(
            seen(&downstream_headers(upstream(), false)),
            expect(&[
                ("content-type", &["application/json"]),
                ("x-ratelimit-limit-tokens", &["1000"]),
                ("x-ratelimit-remaining-tokens", &["900", "901"]),
                ("x-request-id", &["r1"]),
            ])
        );
    }
}
