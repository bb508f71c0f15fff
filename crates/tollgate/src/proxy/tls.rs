//! TLS termination on the proxy listener: a rustls server config built from the PEM
//! files named in `server.tls`. It lives in the runtime, so a reload re-reads the files
//! and the next accepted connection is served the new certificate; connections already
//! open keep the one they were handed.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The server config for `cert_file` and `key_file`, offering h2 and HTTP/1.1 by ALPN.
/// `Err((field, message))` names the `server.tls` field at fault.
pub fn server_config(
    cert_file: &str,
    key_file: &str,
) -> Result<Arc<rustls::ServerConfig>, (&'static str, String)> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ("cert_file", format!("cannot read `{cert_file}`: {e}")))?;
    if certs.is_empty() {
        return Err(("cert_file", format!("`{cert_file}` holds no certificate")));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        (
            "key_file",
            format!("cannot read a private key from `{key_file}`: {e}"),
        )
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ("cert_file", e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| ("key_file", format!("certificate and key do not fit: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
