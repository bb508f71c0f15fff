//! API keys.
//!
//! Keys are stored as SHA-256 digests only. A presented key is hashed once and looked up
//! in a hash map (O(1)); the stored digest is then compared in constant time, so timing
//! says nothing about how much of a key matched. Keys never reach logs.

use std::collections::HashMap;
use std::sync::Arc;

use super::Identity;

use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tollgate_limits::cel;

#[derive(Debug)]
struct KeyEntry {
    digest: [u8; 32],
    identity: Identity,
}

/// The compiled key table.
#[derive(Debug, Default)]
pub struct ApiKeys {
    /// Lower-cased schemes accepted in `Authorization`.
    prefixes: Vec<String>,
    by_digest: HashMap<[u8; 32], KeyEntry>,
}

pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl ApiKeys {
    pub fn new(prefixes: &[String]) -> Self {
        Self {
            prefixes: prefixes.iter().map(|p| p.to_ascii_lowercase()).collect(),
            by_digest: HashMap::new(),
        }
    }

    /// Returns false when the digest is already present (duplicate key).
    pub fn insert(&mut self, digest: [u8; 32], identity_json: &serde_json::Value) -> bool {
        if self.by_digest.contains_key(&digest) {
            return false;
        }
        let label = ["userid", "user_id", "sub", "name", "id"]
            .iter()
            .find_map(|k| identity_json.get(*k).and_then(|v| v.as_str()))
            .unwrap_or("api-key");
        self.by_digest.insert(
            digest,
            KeyEntry {
                digest,
                identity: Identity::new("api_key", cel::from_json(identity_json), Arc::from(label)),
            },
        );
        true
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    fn lookup(&self, key: &str) -> Option<&Identity> {
        let d = digest(key);
        let entry = self.by_digest.get(&d)?;
        bool::from(entry.digest.ct_eq(&d)).then_some(&entry.identity)
    }
}

/// What the request presented.
#[derive(Debug, PartialEq, Eq)]
pub enum Credential<'a> {
    None,
    /// From `Authorization: <scheme> <key>` or `x-api-key`.
    Key(&'a str),
    /// Present but not in a form we accept (unknown scheme, not UTF-8, empty).
    Malformed,
}

/// `Authorization` wins over `x-api-key`; schemes compare case-insensitively; spaces
/// between scheme and key are tolerated.
pub fn extract<'a>(headers: &'a HeaderMap, keys: &ApiKeys) -> Credential<'a> {
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let Ok(s) = v.to_str() else {
            return Credential::Malformed;
        };
        let s = s.trim();
        let Some((scheme, rest)) = s.split_once([' ', '\t']) else {
            return Credential::Malformed;
        };
        let key = rest.trim();
        if key.is_empty() || !keys.prefixes.iter().any(|p| p.eq_ignore_ascii_case(scheme)) {
            return Credential::Malformed;
        }
        return Credential::Key(key);
    }
    if let Some(v) = headers.get("x-api-key") {
        return match v.to_str() {
            Ok(s) if !s.trim().is_empty() => Credential::Key(s.trim()),
            _ => Credential::Malformed,
        };
    }
    Credential::None
}

#[derive(Debug, PartialEq, Eq)]
pub enum AuthOutcome {
    Missing,
    Invalid,
}

/// Resolve the caller from the request headers.
pub fn authenticate(headers: &HeaderMap, keys: &ApiKeys) -> Result<Option<Identity>, AuthOutcome> {
    match extract(headers, keys) {
        Credential::None => Ok(None),
        Credential::Malformed => Err(AuthOutcome::Invalid),
        Credential::Key(k) => keys
            .lookup(k)
            .cloned()
            .map(Some)
            .ok_or(AuthOutcome::Invalid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ApiKeys {
        let mut t = ApiKeys::new(&["APIKEY".into(), "Bearer".into()]);
        t.insert(
            digest("iamafreeuser"),
            &serde_json::json!({"userid": "user-1", "groups": "free"}),
        );
        t
    }

    fn hdrs(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn accepts_prefixes_in_any_case() {
        let t = table();
        for v in [
            "APIKEY iamafreeuser",
            "apikey iamafreeuser",
            "Bearer  iamafreeuser",
            "bEaReR iamafreeuser",
        ] {
            let id = authenticate(&hdrs(&[("authorization", v)]), &t)
                .unwrap()
                .unwrap();
            assert_eq!(&*id.label, "user-1", "{v}");
        }
        let id = authenticate(&hdrs(&[("x-api-key", "iamafreeuser")]), &t)
            .unwrap()
            .unwrap();
        assert_eq!(id.method, "api_key");
    }

    #[test]
    fn refuses_unknown_and_malformed() {
        let t = table();
        for v in [
            "Basic iamafreeuser",
            "iamafreeuser",
            "Bearer",
            "Bearer nope",
            "APIKEY iamafreeuserx",
        ] {
            assert_eq!(
                authenticate(&hdrs(&[("authorization", v)]), &t).unwrap_err(),
                AuthOutcome::Invalid,
                "{v}"
            );
        }
        assert!(authenticate(&HeaderMap::new(), &t).unwrap().is_none());
    }

    #[test]
    fn authorization_wins_over_x_api_key() {
        let t = table();
        let h = hdrs(&[
            ("authorization", "Bearer wrong"),
            ("x-api-key", "iamafreeuser"),
        ]);
        assert_eq!(authenticate(&h, &t).unwrap_err(), AuthOutcome::Invalid);
    }
}
