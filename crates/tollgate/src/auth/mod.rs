//! Authentication: who is calling.
//!
//! - [`api_keys`]: the key table (digests only, O(1) lookup, constant-time compare).
//! - `jwt`: JWT providers (local keys, JWKS files and URLs), verified-token cache.
//!
//! [`Identity`] is what every source produces: `auth.identity` and `auth.method` in CEL.

pub mod api_keys;
pub mod jwt;
pub mod rego;

use std::sync::Arc;

use tollgate_limits::cel;

pub use api_keys::{digest, extract, ApiKeys, AuthOutcome, Credential};

/// Why a request could not be identified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// No credential at all.
    Missing,
    /// A credential that is not valid; the message is safe to return.
    Invalid(&'static str),
}

/// Identify the caller from whatever the request presents. A `Bearer` credential shaped
/// like a JWT goes to the JWT providers when there are any; anything else to the key
/// table (`Authorization` wins over `x-api-key`).
pub async fn identify(
    keys: Option<&ApiKeys>,
    jwt: Option<&jwt::JwtAuth>,
    headers: &http::HeaderMap,
    now_secs: u64,
) -> Result<Option<Identity>, AuthFailure> {
    if let (Some(j), Some(v)) = (jwt, headers.get(http::header::AUTHORIZATION)) {
        let bearer = v.to_str().ok().map(str::trim).and_then(|s| {
            let (scheme, rest) = s.split_once([' ', '\t'])?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
        if let Some(token) = bearer.filter(|t| jwt::looks_like_jwt(t)) {
            return match j.verify(token, now_secs).await {
                Ok(id) => Ok(Some(id)),
                Err(e) => Err(AuthFailure::Invalid(e.message())),
            };
        }
    }
    match keys {
        Some(keys) => match api_keys::authenticate(headers, keys) {
            Ok(id) => Ok(id),
            Err(AuthOutcome::Missing) => Err(AuthFailure::Missing),
            Err(AuthOutcome::Invalid) => Err(AuthFailure::Invalid("Incorrect API key provided.")),
        },
        None if headers.contains_key(http::header::AUTHORIZATION)
            || headers.contains_key("x-api-key") =>
        {
            Err(AuthFailure::Invalid("Invalid bearer token."))
        }
        None => Ok(None),
    }
}

/// The caller, as CEL sees it in `auth`. Built once per key (API keys at load, JWTs at
/// verification, cached with it), so a request only clones reference counts.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `api_key`, `jwt` or `anonymous`.
    pub method: &'static str,
    /// The `auth.identity` map (CEL value).
    pub identity: cel::Value,
    /// A short, non-secret label for logs (`userid`/`sub` when present).
    pub label: Arc<str>,
    /// `{identity, method}`: the `auth` attribute itself, as a record built once per
    /// identity (per key at load, per verified token), so expressions find
    /// `auth.identity.userid` without hashing.
    auth: cel::Attr,
}

impl Identity {
    pub fn new(method: &'static str, identity: cel::Value, label: Arc<str>) -> Self {
        let auth = cel::Attr::Record(cel::Record::new([
            ("identity", cel::Attr::from_value(&identity)),
            ("method", cel::string(method).into()),
        ]));
        Self {
            method,
            identity,
            label,
            auth,
        }
    }

    /// The caller with no credential (one shared value, cloned per request).
    pub fn anonymous() -> Self {
        static ANONYMOUS: std::sync::LazyLock<Identity> = std::sync::LazyLock::new(|| {
            Identity::new(
                "anonymous",
                cel::map(Vec::<(String, cel::Value)>::new()),
                Arc::from("-"),
            )
        });
        ANONYMOUS.clone()
    }

    /// The `auth` attribute as a CEL value.
    pub fn to_cel(&self) -> cel::Value {
        self.auth.value().clone()
    }

    /// The `auth` attribute for an activation ([`cel::Attrs::set`]).
    pub fn to_attr(&self) -> cel::Attr {
        self.auth.clone()
    }
}
