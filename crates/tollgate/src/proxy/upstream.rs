//! The upstream side: one pooled HTTP client (HTTP/1.1 and HTTP/2, rustls with the
//! webpki root store for HTTPS) and the rewriting of a client request into an upstream
//! request: hop-by-hop headers dropped, the client's gateway credential removed, the
//! backend's key and static headers injected.

use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::body::ProxyBody;
use crate::runtime::Backend;

pub type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<HttpsConnector, ProxyBody>,
}

/// An HTTP/HTTPS connector: rustls (ring) with the webpki root store, TCP_NODELAY and
/// keep-alive, bounded connect time. Shared by the upstream client and JWKS fetches.
pub fn https_connector(connect_timeout: Duration) -> HttpsConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|b| {
        b.with_root_certificates(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
        .with_no_client_auth()
    });
    match tls {
        Ok(tls) => hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http),
        // The ring provider always supports the default versions; if that ever changes,
        // fall back to the builder's own defaults rather than failing.
        Err(_) => hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http),
    }
}

impl UpstreamClient {
    pub fn new(connect_timeout: Duration) -> Self {
        let https = https_connector(connect_timeout);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(https);
        Self { client }
    }

    pub async fn send(
        &self,
        req: http::Request<ProxyBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        self.client.request(req).await
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
