//! Authentication: who is calling.
//!
//! - [`api_keys`]: the key table (digests only, O(1) lookup, constant-time compare).
//! - `jwt`: JWT providers (local keys, JWKS files and URLs), verified-token cache.
//!
//! [`Identity`] is what every source produces: `auth.identity` and `auth.method` in CEL.

pub mod api_keys;

use std::sync::Arc;

use tollgate_limits::cel;

pub use api_keys::{authenticate, digest, extract, ApiKeys, AuthOutcome, Credential};

/// The caller, as CEL sees it in `auth`.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `api_key`, `jwt` or `anonymous`.
    pub method: &'static str,
    /// The `auth.identity` map (CEL value, built once at config load for API keys).
    pub identity: cel::Value,
    /// A short, non-secret label for logs (`userid`/`sub` when present).
    pub label: Arc<str>,
}

impl Identity {
    pub fn anonymous() -> Self {
        Self {
            method: "anonymous",
            identity: cel::map(Vec::<(String, cel::Value)>::new()),
            label: Arc::from("-"),
        }
    }

    pub fn to_cel(&self) -> cel::Value {
        cel::map([
            ("identity", self.identity.clone()),
            ("method", cel::string(self.method)),
        ])
    }
}
