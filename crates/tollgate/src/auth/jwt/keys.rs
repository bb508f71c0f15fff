//! Verification keys: PEM public keys, JWKS documents, and the refreshing JWKS source.
//!
//! Each key carries the algorithms its *type* allows (RSA → RS*/PS*, EC P-256 → ES256,
//! P-384 → ES384, Ed25519 → EdDSA, a configured secret → HS256), narrowed by a JWK's
//! own `alg`. The token's header only selects among those. Symmetric (`oct`) keys in a
//! JWKS, encryption keys and unsupported curves are skipped, so one odd entry does not
//! spoil the set.
//!
//! A JWKS source holds its current [`KeySet`] in an `ArcSwap` (readers never wait) and
//! serialises refreshes behind a `tokio::sync::Mutex` (one fetch at a time; a caller
//! that waited finds the new set and does not fetch again). On-demand refreshes are
//! rate-limited on the engine clock; timer refreshes are not. A failed refresh, or a
//! document with no usable key, keeps the previous set.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};

/// Engine-clock seconds between two on-demand (unknown `kid`) refreshes of one source.
pub(super) const MIN_ON_DEMAND_REFRESH_SECS: u64 = 10;
/// A JWKS fetch (connect, headers and body) gives up after this.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document read.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// One key and the algorithms it may verify.
pub(super) struct VerifyKey {
    pub kid: Option<String>,
    pub key: DecodingKey,
    pub algorithms: Vec<Algorithm>,
}

/// An immutable set of keys; `generation` grows with each successful refresh.
pub(super) struct KeySet {
    keys: Vec<VerifyKey>,
    pub generation: u64,
}

impl KeySet {
    pub fn new(keys: Vec<VerifyKey>, generation: u64) -> Self {
        Self { keys, generation }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Keys that may verify a token with this `kid` and `alg`: a key without a kid
    /// matches any token, a token without a kid matches any key.
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a VerifyKey> + 'a {
        self.keys.iter().filter(move |k| {
            k.algorithms.contains(&alg)
                && match (k.kid.as_deref(), kid) {
                    (Some(have), Some(want)) => have == want,
                    _ => true,
                }
        })
    }

    /// Every algorithm some key allows.
    pub fn algorithms(&self) -> Vec<Algorithm> {
        let mut out: Vec<Algorithm> = Vec::new();
        for alg in self.keys.iter().flat_map(|k| k.algorithms.iter()) {
            if !out.contains(alg) {
                out.push(*alg);
            }
        }
        out
    }
}

fn family_algorithms(family: AlgorithmFamily) -> Vec<Algorithm> {
    family.algorithms().to_vec()
}

/// A PEM public key (SPKI or PKCS#1 RSA; SPKI EC P-256/P-384; SPKI Ed25519).
pub(super) fn key_from_pem(pem: &str) -> Result<VerifyKey, String> {
    if pem.contains("PRIVATE KEY") {
        return Err(
            "this is a private key; give the public key (never put a private key in the config)"
                .into(),
        );
    }
    if !pem.contains("-----BEGIN") {
        return Err("not a PEM public key: no `-----BEGIN` line".into());
    }
    let bytes = pem.trim().as_bytes();
    let (key, family) = if let Ok(k) = DecodingKey::from_rsa_pem(bytes) {
        (k, AlgorithmFamily::Rsa)
    } else if let Ok(k) = DecodingKey::from_ec_pem(bytes) {
        // The curve is not exposed here; ES256 on a P-384 key (or the reverse) simply
        // fails verification.
        (k, AlgorithmFamily::Ec)
    } else if let Ok(k) = DecodingKey::from_ed_pem(bytes) {
        (k, AlgorithmFamily::Ed)
    } else {
        return Err("not a PEM public key: expected RSA, EC (P-256/P-384) or Ed25519".into());
    };
    Ok(VerifyKey {
        kid: None,
        key,
        algorithms: family_algorithms(family),
    })
}

/// Parse a JWKS document, keeping the usable signature keys. Errors when the document
/// is not a JWKS or has no usable key.
pub(super) fn parse_jwks(bytes: &[u8]) -> Result<Vec<VerifyKey>, String> {
    #[derive(serde::Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let raw: RawSet =
        serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document: {e}"))?;
    let total = raw.keys.len();
    let keys: Vec<VerifyKey> = raw.keys.into_iter().filter_map(jwk_key).collect();
    if keys.is_empty() {
        return Err(format!(
            "no usable signature key in the JWKS ({total} entries; RSA, EC P-256/P-384 and Ed25519 are supported)"
        ));
    }
    Ok(keys)
}

fn jwk_key(value: serde_json::Value) -> Option<VerifyKey> {
    // The JWK's own `alg`, read as text (`jsonwebtoken` keeps its mapping private).
    let declared_alg = match value.get("alg") {
        None => None,
        Some(serde_json::Value::String(a)) => Some(a.parse::<Algorithm>().ok()?),
        Some(_) => return None,
    };
    let jwk: Jwk = serde_json::from_value(value).ok()?;
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return None;
    }
    if let Some(ops) = &jwk.common.key_operations {
        if !ops.iter().any(|op| matches!(op, KeyOperations::Verify)) {
            return None;
        }
    }
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => family_algorithms(AlgorithmFamily::Rsa),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            vec![Algorithm::EdDSA]
        }
        // Symmetric keys are accepted only as a configured secret, never from a JWKS.
        _ => return None,
    };
    let algorithms = match declared_alg {
        None => by_type,
        Some(alg) => {
            if !by_type.contains(&alg) {
                return None;
            }
            vec![alg]
        }
    };
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    Some(VerifyKey {
        kid: jwk.common.key_id,
        key,
        algorithms,
    })
}

type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The HTTP(S) client JWKS URLs are fetched with (rustls, webpki roots), as the
/// upstream client is built.
#[derive(Clone)]
pub(super) struct JwksClient {
    client: Arc<Client<HttpsConnector, Empty<Bytes>>>,
}

impl JwksClient {
    pub fn new() -> Self {
        let https = crate::proxy::upstream::https_connector(FETCH_TIMEOUT);
        Self {
            client: Arc::new(Client::builder(TokioExecutor::new()).build(https)),
        }
    }

    async fn get(&self, uri: &http::Uri) -> Result<Vec<u8>, String> {
        let req = http::Request::get(uri.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("bad request: {e}"))?;
        let fetch = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            if !resp.status().is_success() {
                return Err(format!("HTTP status {}", resp.status()));
            }
            let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading the body: {e}"))?;
            Ok(body.to_bytes().to_vec())
        };
        tokio::time::timeout(FETCH_TIMEOUT, fetch)
            .await
            .map_err(|_| format!("timed out after {}s", FETCH_TIMEOUT.as_secs()))?
    }
}

pub(super) enum JwksLocation {
    File(PathBuf),
    Url { uri: http::Uri, client: JwksClient },
}

impl std::fmt::Display for JwksLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Url { uri, .. } => write!(f, "{uri}"),
        }
    }
}

struct RefreshState {
    /// Engine-clock second of the last on-demand refresh.
    last_on_demand: Option<u64>,
}

/// A JWKS file or URL with its current keys.
pub(super) struct Jwks {
    provider: String,
    location: JwksLocation,
    keys: ArcSwap<KeySet>,
    /// Held for the whole fetch: one refresh at a time per source.
    refresh: tokio::sync::Mutex<RefreshState>,
    pub refresh_every: Duration,
    /// Algorithms a token may name: every asymmetric one, since a refresh may bring keys
    /// of another type. Each key still verifies only its own type's algorithms.
    algorithms: Vec<Algorithm>,
    fetches: AtomicU64,
}

impl Jwks {
    pub fn new(
        provider: String,
        location: JwksLocation,
        initial: Vec<VerifyKey>,
        refresh_every: Duration,
    ) -> Self {
        let algorithms = [
            AlgorithmFamily::Rsa,
            AlgorithmFamily::Ec,
            AlgorithmFamily::Ed,
        ]
        .into_iter()
        .flat_map(family_algorithms)
        .collect();
        Self {
            provider,
            location,
            keys: ArcSwap::from_pointee(KeySet::new(initial, 0)),
            refresh: tokio::sync::Mutex::new(RefreshState {
                last_on_demand: None,
            }),
            refresh_every,
            algorithms,
            fetches: AtomicU64::new(0),
        }
    }

    pub fn algorithms(&self) -> Vec<Algorithm> {
        self.algorithms.clone()
    }

    pub fn current(&self) -> Arc<KeySet> {
        self.keys.load_full()
    }

    /// Fetch attempts so far (tests).
    #[cfg(test)]
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// A token needs a key the set `seen_generation` lacks. Waits for a refresh in
    /// flight; fetches unless one happened meanwhile or the last on-demand fetch was
    /// less than [`MIN_ON_DEMAND_REFRESH_SECS`] ago. Returns the set to use.
    pub async fn refresh_on_demand(&self, seen_generation: u64, now_secs: u64) -> Arc<KeySet> {
        let mut state = self.refresh.lock().await;
        let current = self.keys.load_full();
        if current.generation != seen_generation {
            return current;
        }
        if let Some(last) = state.last_on_demand {
            if now_secs >= last && now_secs < last.saturating_add(MIN_ON_DEMAND_REFRESH_SECS) {
                return current;
            }
        }
        state.last_on_demand = Some(now_secs);
        self.fetch_and_swap(&current).await
    }

    /// The timer's refresh: always fetches (one at a time).
    pub async fn refresh_scheduled(&self) {
        let _state = self.refresh.lock().await;
        let current = self.keys.load_full();
        self.fetch_and_swap(&current).await;
    }

    async fn fetch_and_swap(&self, current: &KeySet) -> Arc<KeySet> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        match self.fetch().await {
            Ok(keys) => {
                let next = Arc::new(KeySet::new(keys, current.generation.wrapping_add(1)));
                self.keys.store(next.clone());
                tracing::debug!(provider = %self.provider, jwks = %self.location, "JWKS refreshed");
                next
            }
            Err(error) => {
                tracing::warn!(provider = %self.provider, jwks = %self.location, %error,
                    "JWKS refresh failed; keeping the previous keys");
                self.keys.load_full()
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<VerifyKey>, String> {
        let bytes = match &self.location {
            JwksLocation::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || std::fs::read(&path))
                    .await
                    .map_err(|e| format!("reading the file: {e}"))?
                    .map_err(|e| format!("reading the file: {e}"))?
            }
            JwksLocation::Url { uri, client } => client.get(uri).await?,
        };
        parse_jwks(&bytes)
    }

    fn is_url(&self) -> bool {
        matches!(self.location, JwksLocation::Url { .. })
    }
}

/// Refresh one source every `refresh_every` until it is dropped. URLs are fetched at
/// once (they start empty); files were read at build.
pub(super) async fn refresh_timer(jwks: Weak<Jwks>) {
    let (period, immediate) = match jwks.upgrade() {
        Some(j) => (j.refresh_every, j.is_url()),
        None => return,
    };
    let start = if immediate {
        tokio::time::Instant::now()
    } else {
        tokio::time::Instant::now() + period
    };
    let mut ticks = tokio::time::interval_at(start, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(j) = jwks.upgrade() else {
            return;
        };
        j.refresh_scheduled().await;
    }
}
