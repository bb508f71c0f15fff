//! JWT bearer tokens.
//!
//! A token moves through [`JwtAuth::verify`] like this:
//!
//! 1. size cap ([`MAX_TOKEN_BYTES`]) and shape ([`looks_like_jwt`]);
//! 2. the verified-token cache, keyed by the SHA-256 of the token (never the token);
//!    a hit is served only while `now < exp`;
//! 3. header and payload are decoded *unverified*, only to route: the payload's `iss`
//!    picks the provider (exact match), the header's `alg` must be one the provider's
//!    keys allow and the header's `kid` picks the key;
//! 4. the signature is verified with `jsonwebtoken` (the algorithm list comes from the
//!    provider's key type, so `alg: none` and HS256-with-the-RSA-key confusion fail),
//!    along with issuer and audience;
//! 5. `exp` and `nbf` are checked against the engine clock (`now_secs`) with the
//!    provider's leeway (`jsonwebtoken` reads the system clock, so its own time checks
//!    are off);
//! 6. the identity is built: every claim, plus the provider's `identity` fields (CEL
//!    over `claims`; a field whose expression fails for this token is left out, it
//!    does not fail the request), and cached for min(`exp - now`, `max_ttl`).
//!
//! Keys come from a PEM public key, an HS256 secret (from an env var or a file; HS256 is
//! never accepted otherwise), or a JWKS file or URL ([`keys`]). JWKS sets refresh on a
//! timer ([`JwtAuth::spawn_refresh`]) and when a token names a `kid` we do not know
//! (one fetch at a time, at most once per 10 s of engine time per provider); a failed
//! refresh keeps the previous keys.
//!
//! Trade-off: a cached token stays accepted for up to `cache.max_ttl` after its key is
//! removed from a JWKS. Tokens and secrets are never logged.

mod keys;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tollgate_limits::cel::{self, Attrs, Expr};

use super::Identity;
use crate::config::duration;
use crate::config::Problem;
use keys::{Jwks, JwksClient, JwksLocation, KeySet, VerifyKey};

/// Longest token accepted; longer ones are refused before any decoding.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Longest `sub` kept as the log label.
const MAX_LABEL_CHARS: usize = 128;
/// At most this many keys are tried for one token (kid-less tokens try every match).
const MAX_KEYS_TRIED: usize = 8;

const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);
const DEFAULT_CACHE_MAX_TTL: Duration = Duration::from_secs(300);

fn default_max_entries() -> u64 {
    10_000
}

/// `auth.jwt` in the config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub providers: Vec<JwtProviderConfig>,
    #[serde(default)]
    pub cache: JwtCacheConfig,
}

/// One token issuer and the keys its tokens are signed with.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtProviderConfig {
    pub name: String,
    /// Tokens whose `iss` equals this go to this provider.
    pub issuer: String,
    /// When set, the token's `aud` must contain one of these (and must be present).
    #[serde(default)]
    pub audiences: Option<Vec<String>>,
    // Exactly one key source:
    /// A PEM public key (RSA, EC P-256/P-384 or Ed25519).
    #[serde(default)]
    pub public_key_pem: Option<String>,
    /// A JWKS document on disk.
    #[serde(default)]
    pub jwks_file: Option<String>,
    /// A JWKS document over HTTP(S).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Environment variable holding an HS256 secret (at least 32 bytes).
    #[serde(default)]
    pub hs256_secret_env: Option<String>,
    /// File holding an HS256 secret (trailing newline ignored).
    #[serde(default)]
    pub hs256_secret_file: Option<String>,
    /// Refuse tokens without `exp` (default: `exp` is checked when present).
    #[serde(default)]
    pub require_exp: bool,
    /// Clock skew allowed on `exp`/`nbf` (default 30s).
    #[serde(default)]
    pub leeway: Option<String>,
    /// How often a JWKS file or URL is re-read (default 5m).
    #[serde(default)]
    pub jwks_refresh: Option<String>,
    /// Extra `auth.identity` fields: CEL over `claims`, e.g. `userid: claims.sub`.
    #[serde(default)]
    pub identity: BTreeMap<String, String>,
}

/// The verified-token cache.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtCacheConfig {
    /// Entries kept at most (default 10000); 0 turns the cache off.
    #[serde(default = "default_max_entries")]
    pub max_entries: u64,
    /// Longest an entry lives (default 5m); never past the token's `exp`.
    #[serde(default)]
    pub max_ttl: Option<String>,
}

impl Default for JwtCacheConfig {
    fn default() -> Self {
        Self {
            max_entries: default_max_entries(),
            max_ttl: None,
        }
    }
}

/// Why a token was refused. `Display` is short and safe to send to the client; it never
/// contains the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token")]
    Malformed,
    #[error("token too large")]
    TooLarge,
    /// `alg: none`, an unknown algorithm, or one the provider's keys do not allow.
    #[error("token algorithm not allowed")]
    AlgorithmNotAllowed,
    /// No provider has the token's `iss` (or it has none).
    #[error("token issuer not accepted")]
    UnknownIssuer,
    /// The `kid` is not in the provider's keys (after a refresh, where one was allowed).
    #[error("token signing key not found")]
    UnknownKey,
    #[error("invalid token signature")]
    BadSignature,
    #[error("token audience not accepted")]
    WrongAudience,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token has no expiry")]
    MissingExp,
    /// A registered claim (`exp`, `nbf`, `iss`, …) of the wrong type.
    #[error("invalid `{0}` claim")]
    InvalidClaim(&'static str),
    /// The provider's JWKS has never been fetched successfully (server-side fault).
    #[error("token signing keys unavailable")]
    KeysUnavailable,
}

impl JwtError {
    /// The sentence for the client's 401 body (static, like the API-key messages).
    pub fn message(&self) -> &'static str {
        match self {
            Self::Malformed => "Invalid bearer token: malformed JWT.",
            Self::TooLarge => "Invalid bearer token: JWT too large.",
            Self::AlgorithmNotAllowed => "Invalid bearer token: JWT algorithm not allowed.",
            Self::UnknownIssuer => "Invalid bearer token: JWT issuer not accepted.",
            Self::UnknownKey => "Invalid bearer token: JWT signing key not found.",
            Self::BadSignature => "Invalid bearer token: invalid JWT signature.",
            Self::WrongAudience => "Invalid bearer token: JWT audience not accepted.",
            Self::Expired => "Invalid bearer token: JWT expired.",
            Self::NotYetValid => "Invalid bearer token: JWT not yet valid.",
            Self::MissingExp => "Invalid bearer token: JWT has no expiry.",
            Self::InvalidClaim(_) => "Invalid bearer token: invalid JWT claim.",
            Self::KeysUnavailable => "Bearer token could not be checked: signing keys unavailable.",
        }
    }

    /// A bounded label for metrics and access logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::TooLarge => "too_large",
            Self::AlgorithmNotAllowed => "algorithm",
            Self::UnknownIssuer => "issuer",
            Self::UnknownKey => "unknown_kid",
            Self::BadSignature => "signature",
            Self::WrongAudience => "audience",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::MissingExp => "missing_exp",
            Self::InvalidClaim(_) => "claim",
            Self::KeysUnavailable => "keys_unavailable",
        }
    }
}

/// Three dot-separated base64url parts (the signature may be empty, so that `alg: none`
/// tokens reach [`JwtAuth::verify`] and get its specific refusal).
pub fn looks_like_jwt(credential: &str) -> bool {
    let mut parts = credential.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let b64url = |part: &str| {
        part.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    !h.is_empty() && !p.is_empty() && b64url(h) && b64url(p) && b64url(s)
}

/// Where a provider's keys come from.
enum ProviderKeys {
    /// A PEM key or an HS256 secret: fixed for the life of the config.
    Static(Arc<KeySet>),
    Jwks(Arc<Jwks>),
}

struct Provider {
    name: String,
    require_exp: bool,
    leeway_secs: u64,
    keys: ProviderKeys,
    /// One prepared validation per algorithm the provider's keys allow.
    validations: Vec<(Algorithm, Validation)>,
    identity: Vec<(String, Expr)>,
}

/// What the cache keeps for a verified token.
#[derive(Clone)]
struct Verified {
    identity: Identity,
    exp: Option<u64>,
    ttl: Duration,
}

/// Each entry lives min(`exp - now`, `max_ttl`), computed at insert.
struct EntryLifetime;

impl moka::Expiry<[u8; 32], Arc<Verified>> for EntryLifetime {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Arc<Verified>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The compiled JWT providers and the verified-token cache. `Send + Sync`; share it in
/// an `Arc`.
pub struct JwtAuth {
    providers: Vec<Provider>,
    by_issuer: HashMap<String, usize>,
    cache: Option<moka::sync::Cache<[u8; 32], Arc<Verified>>>,
    max_ttl: Duration,
    signature_verifications: AtomicU64,
    /// JWKS refresh timers, aborted when this is dropped (a reload drops the old one).
    refresh_tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtAuth")
            .field(
                "providers",
                &self.providers.iter().map(|p| &p.name).collect::<Vec<_>>(),
            )
            .field("cache", &self.cache.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for JwtAuth {
    fn drop(&mut self) {
        let tasks = match self.refresh_tasks.get_mut() {
            Ok(tasks) => tasks,
            Err(poisoned) => poisoned.into_inner(),
        };
        for task in tasks.drain(..) {
            task.abort();
        }
    }
}

impl JwtAuth {
    /// Build from config. Every problem is reported at once, with its field path under
    /// `path_prefix` (e.g. `auth.jwt.providers[0].public_key_pem`).
    pub fn build(cfg: &JwtConfig, path_prefix: &str) -> Result<JwtAuth, Vec<Problem>> {
        let mut problems = Vec::new();
        if cfg.providers.is_empty() {
            problems.push(Problem::error(
                format!("{path_prefix}.providers"),
                "at least one JWT provider is required",
            ));
        }
        let client = cfg
            .providers
            .iter()
            .any(|p| p.jwks_url.is_some())
            .then(JwksClient::new);

        let mut providers = Vec::with_capacity(cfg.providers.len());
        let mut by_issuer = HashMap::new();
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, pc) in cfg.providers.iter().enumerate() {
            let path = format!("{path_prefix}.providers[{i}]");
            if pc.name.trim().is_empty() {
                problems.push(Problem::error(format!("{path}.name"), "must not be empty"));
            } else if let Some(first) = names.insert(pc.name.as_str(), i) {
                problems.push(Problem::error(
                    format!("{path}.name"),
                    format!(
                        "duplicate provider name `{}` (also providers[{first}])",
                        pc.name
                    ),
                ));
            }
            if pc.issuer.is_empty() {
                problems.push(Problem::error(
                    format!("{path}.issuer"),
                    "must not be empty",
                ));
            } else if let Some(first) = by_issuer.insert(pc.issuer.clone(), providers.len()) {
                problems.push(Problem::error(
                    format!("{path}.issuer"),
                    format!(
                        "issuer `{}` is already used by providers[{first}]; tokens are routed by issuer, so each needs its own",
                        pc.issuer
                    ),
                ));
            }
            match build_provider(pc, &path, client.as_ref()) {
                Ok(p) => providers.push(p),
                Err(mut ps) => problems.append(&mut ps),
            }
        }

        let max_ttl = match &cfg.cache.max_ttl {
            None => DEFAULT_CACHE_MAX_TTL,
            Some(text) => match duration::parse(text) {
                Ok(d) => d,
                Err(e) => {
                    problems.push(Problem::error(format!("{path_prefix}.cache.max_ttl"), e));
                    DEFAULT_CACHE_MAX_TTL
                }
            },
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        let cache = (cfg.cache.max_entries > 0 && !max_ttl.is_zero()).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(cfg.cache.max_entries)
                .expire_after(EntryLifetime)
                .build()
        });
        Ok(JwtAuth {
            providers,
            by_issuer,
            cache,
            max_ttl,
            signature_verifications: AtomicU64::new(0),
            refresh_tasks: Mutex::new(Vec::new()),
        })
    }

    /// Start the JWKS refresh timers (files and URLs; URLs are fetched at once). Call
    /// once after build, inside a tokio runtime; a second call does nothing. The timers
    /// stop when this `JwtAuth` is dropped.
    pub fn spawn_refresh(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("JWKS refresh not started: no tokio runtime");
            return;
        };
        let Ok(mut tasks) = self.refresh_tasks.lock() else {
            return;
        };
        if !tasks.is_empty() {
            return;
        }
        for provider in &self.providers {
            if let ProviderKeys::Jwks(jwks) = &provider.keys {
                let jwks = Arc::downgrade(jwks);
                tasks.push(runtime.spawn(keys::refresh_timer(jwks)));
            }
        }
    }

    /// Signature verifications performed so far (cache hits do none). For tests and
    /// metrics.
    pub fn signature_verifications(&self) -> u64 {
        self.signature_verifications.load(Ordering::Relaxed)
    }

    /// Verify a bearer token at `now_secs` (the engine clock, seconds since the epoch).
    pub async fn verify(&self, token: &str, now_secs: u64) -> Result<Identity, JwtError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::TooLarge);
        }
        if !looks_like_jwt(token) {
            return Err(JwtError::Malformed);
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(cache) = &self.cache {
            if let Some(hit) = cache.get(&digest) {
                // The engine clock may run ahead of the cache's own (tests move it):
                // never serve an entry at or past `exp`.
                if hit.exp.is_none_or(|exp| now_secs < exp) {
                    return Ok(hit.identity.clone());
                }
                cache.invalidate(&digest);
            }
        }
        let verified = self.verify_uncached(token, now_secs).await?;
        if let Some(cache) = &self.cache {
            if !verified.ttl.is_zero() {
                cache.insert(digest, Arc::new(verified.clone()));
            }
        }
        Ok(verified.identity)
    }

    async fn verify_uncached(&self, token: &str, now_secs: u64) -> Result<Verified, JwtError> {
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64)) = (parts.next(), parts.next()) else {
            return Err(JwtError::Malformed);
        };
        let header = decode_json_object(header_b64)?;
        let alg = match header.get("alg").and_then(|a| a.as_str()) {
            Some(alg) => alg
                .parse::<Algorithm>()
                .map_err(|_| JwtError::AlgorithmNotAllowed)?,
            None => return Err(JwtError::Malformed),
        };
        let kid = match header.get("kid") {
            None => None,
            Some(serde_json::Value::String(k)) => Some(k.as_str()),
            Some(_) => return Err(JwtError::Malformed),
        };
        // Unverified: used only to pick the provider. The signature check below also
        // validates `iss` against that provider's issuer.
        let unverified = decode_json_object(payload_b64)?;
        let provider = unverified
            .get("iss")
            .and_then(|i| i.as_str())
            .and_then(|iss| self.by_issuer.get(iss))
            .and_then(|&i| self.providers.get(i))
            .ok_or(JwtError::UnknownIssuer)?;
        let validation = provider
            .validations
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, v)| v)
            .ok_or(JwtError::AlgorithmNotAllowed)?;

        let set = provider.key_set(kid, alg, now_secs).await;
        let claims = self.check_signature(token, &set, kid, alg, validation)?;
        let serde_json::Value::Object(claims) = claims else {
            return Err(JwtError::Malformed);
        };

        let exp = numeric_claim(&claims, "exp")?;
        let nbf = numeric_claim(&claims, "nbf")?;
        match exp {
            None if provider.require_exp => return Err(JwtError::MissingExp),
            Some(exp) if now_secs >= exp.saturating_add(provider.leeway_secs) => {
                return Err(JwtError::Expired)
            }
            _ => {}
        }
        if let Some(nbf) = nbf {
            if now_secs.saturating_add(provider.leeway_secs) < nbf {
                return Err(JwtError::NotYetValid);
            }
        }
        let ttl = match exp {
            Some(exp) => self
                .max_ttl
                .min(Duration::from_secs(exp.saturating_sub(now_secs))),
            None => self.max_ttl,
        };
        Ok(Verified {
            identity: provider.identity(claims),
            exp,
            ttl,
        })
    }

    fn check_signature(
        &self,
        token: &str,
        set: &KeySet,
        kid: Option<&str>,
        alg: Algorithm,
        validation: &Validation,
    ) -> Result<serde_json::Value, JwtError> {
        let mut candidates = set.candidates(kid, alg).peekable();
        if candidates.peek().is_none() {
            return Err(if set.is_empty() {
                JwtError::KeysUnavailable
            } else {
                JwtError::UnknownKey
            });
        }
        for key in candidates.take(MAX_KEYS_TRIED) {
            self.signature_verifications.fetch_add(1, Ordering::Relaxed);
            match jsonwebtoken::decode::<serde_json::Value>(token, &key.key, validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => match map_decode_error(e.kind()) {
                    // Another key with the same kid (or no kid) may still match.
                    JwtError::BadSignature => continue,
                    other => return Err(other),
                },
            }
        }
        Err(JwtError::BadSignature)
    }
}

impl Provider {
    /// The keys to try: for a JWKS, refreshed first when the token names a `kid` we do
    /// not have (or we have no keys at all).
    async fn key_set(&self, kid: Option<&str>, alg: Algorithm, now_secs: u64) -> Arc<KeySet> {
        match &self.keys {
            ProviderKeys::Static(set) => set.clone(),
            ProviderKeys::Jwks(jwks) => {
                let set = jwks.current();
                let unknown =
                    set.is_empty() || (kid.is_some() && set.candidates(kid, alg).next().is_none());
                if unknown {
                    jwks.refresh_on_demand(set.generation, now_secs).await
                } else {
                    set
                }
            }
        }
    }

    fn identity(&self, claims: serde_json::Map<String, serde_json::Value>) -> Identity {
        let label = match claims.get("sub") {
            Some(serde_json::Value::String(s)) if !s.is_empty() => {
                // Bounded and free of control characters: it goes into log lines.
                Arc::from(
                    s.chars()
                        .filter(|c| !c.is_control())
                        .take(MAX_LABEL_CHARS)
                        .collect::<String>(),
                )
            }
            _ => Arc::from("-"),
        };
        let all_claims = cel::map(claims.iter().map(|(k, v)| (k.clone(), cel::from_json(v))));
        let identity = if self.identity.is_empty() {
            all_claims
        } else {
            let mut attrs = Attrs::new();
            attrs.set("claims", all_claims);
            let extra: Vec<(String, cel::Value)> = self
                .identity
                .iter()
                .filter_map(|(field, expr)| match expr.eval(&attrs) {
                    Ok(v) => Some((field.clone(), v)),
                    Err(e) => {
                        tracing::debug!(provider = %self.name, field = %field, error = %e,
                            "JWT identity field left out");
                        None
                    }
                })
                .collect();
            // Configured fields win over a claim of the same name.
            cel::map(
                claims
                    .iter()
                    .map(|(k, v)| (k.clone(), cel::from_json(v)))
                    .chain(extra),
            )
        };
        Identity::new("jwt", identity, label)
    }
}

fn build_provider(
    pc: &JwtProviderConfig,
    path: &str,
    client: Option<&JwksClient>,
) -> Result<Provider, Vec<Problem>> {
    let mut problems = Vec::new();
    let sources: Vec<&str> = [
        ("public_key_pem", pc.public_key_pem.is_some()),
        ("jwks_file", pc.jwks_file.is_some()),
        ("jwks_url", pc.jwks_url.is_some()),
        ("hs256_secret_env", pc.hs256_secret_env.is_some()),
        ("hs256_secret_file", pc.hs256_secret_file.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    if sources.len() != 1 {
        problems.push(Problem::error(
            path.to_owned(),
            format!(
                "exactly one of public_key_pem, jwks_file, jwks_url, hs256_secret_env, hs256_secret_file is required (found {})",
                if sources.is_empty() {
                    "none".to_owned()
                } else {
                    sources.join(", ")
                }
            ),
        ));
    }

    let leeway = parse_duration(
        pc.leeway.as_deref(),
        DEFAULT_LEEWAY,
        &format!("{path}.leeway"),
        &mut problems,
    );
    let refresh = parse_duration(
        pc.jwks_refresh.as_deref(),
        DEFAULT_JWKS_REFRESH,
        &format!("{path}.jwks_refresh"),
        &mut problems,
    );
    if refresh < Duration::from_secs(1) {
        problems.push(Problem::error(
            format!("{path}.jwks_refresh"),
            "must be at least 1s",
        ));
    }
    if pc.jwks_refresh.is_some() && pc.jwks_file.is_none() && pc.jwks_url.is_none() {
        problems.push(Problem::error(
            format!("{path}.jwks_refresh"),
            "only applies to jwks_file and jwks_url",
        ));
    }
    if let Some(auds) = &pc.audiences {
        if auds.is_empty() {
            problems.push(Problem::error(
                format!("{path}.audiences"),
                "must list at least one audience (omit it to accept any)",
            ));
        }
    }

    let mut identity = Vec::with_capacity(pc.identity.len());
    for (field, source) in &pc.identity {
        match Expr::compile(source) {
            Ok(expr) => identity.push((field.clone(), expr)),
            Err(e) => problems.push(Problem::error(
                format!("{path}.identity.{field}"),
                e.to_string(),
            )),
        }
    }

    let keys = if sources.len() == 1 {
        match key_source(pc, path, client, refresh) {
            Ok(keys) => Some(keys),
            Err(p) => {
                problems.push(p);
                None
            }
        }
    } else {
        None
    };

    match keys {
        Some(keys) if problems.is_empty() => {
            let algorithms = match &keys {
                ProviderKeys::Static(set) => set.algorithms(),
                ProviderKeys::Jwks(jwks) => jwks.algorithms(),
            };
            let validations = algorithms
                .into_iter()
                .map(|alg| (alg, validation(alg, &pc.issuer, pc.audiences.as_deref())))
                .collect();
            Ok(Provider {
                name: pc.name.clone(),
                require_exp: pc.require_exp,
                leeway_secs: leeway.as_secs(),
                keys,
                validations,
                identity,
            })
        }
        _ => Err(problems),
    }
}

/// The one key source of a provider (the caller checked there is exactly one).
fn key_source(
    pc: &JwtProviderConfig,
    path: &str,
    client: Option<&JwksClient>,
    refresh: Duration,
) -> Result<ProviderKeys, Problem> {
    if let Some(pem) = &pc.public_key_pem {
        let key = keys::key_from_pem(pem)
            .map_err(|e| Problem::error(format!("{path}.public_key_pem"), e))?;
        return Ok(ProviderKeys::Static(Arc::new(KeySet::new(vec![key], 0))));
    }
    if let Some(var) = &pc.hs256_secret_env {
        let field = format!("{path}.hs256_secret_env");
        let secret = std::env::var(var).map_err(|_| {
            Problem::error(
                field.clone(),
                format!("environment variable `{var}` is not set (or not UTF-8)"),
            )
        })?;
        return hs256_keys(secret.as_bytes()).map_err(|e| Problem::error(field, e));
    }
    if let Some(file) = &pc.hs256_secret_file {
        let field = format!("{path}.hs256_secret_file");
        let bytes = std::fs::read(file)
            .map_err(|e| Problem::error(field.clone(), format!("cannot read `{file}`: {e}")))?;
        let secret = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
        let secret = secret.strip_suffix(b"\r").unwrap_or(secret);
        return hs256_keys(secret).map_err(|e| Problem::error(field, e));
    }
    let location = if let Some(file) = &pc.jwks_file {
        JwksLocation::File(file.into())
    } else if let Some(url) = &pc.jwks_url {
        let field = format!("{path}.jwks_url");
        let uri: http::Uri = url
            .parse()
            .map_err(|e| Problem::error(field.clone(), format!("not a URL: {e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(Problem::error(
                field,
                "must be an http:// or https:// URL with a host",
            ));
        }
        let Some(client) = client else {
            return Err(Problem::error(field, "no HTTP client (internal error)"));
        };
        JwksLocation::Url {
            uri,
            client: client.clone(),
        }
    } else {
        return Err(Problem::error(path.to_owned(), "no key source"));
    };
    // A file is read now, so a bad one fails the config; a URL is fetched by the
    // refresh timer or the first token.
    let initial = match &location {
        JwksLocation::File(file) => {
            let field = format!("{path}.jwks_file");
            let bytes = std::fs::read(file).map_err(|e| {
                Problem::error(
                    field.clone(),
                    format!("cannot read `{}`: {e}", file.display()),
                )
            })?;
            keys::parse_jwks(&bytes).map_err(|e| Problem::error(field, e))?
        }
        JwksLocation::Url { .. } => Vec::new(),
    };
    Ok(ProviderKeys::Jwks(Arc::new(Jwks::new(
        pc.name.clone(),
        location,
        initial,
        refresh,
    ))))
}

fn hs256_keys(secret: &[u8]) -> Result<ProviderKeys, String> {
    // RFC 7518 §3.2: an HS256 key must be at least as long as the hash (256 bits).
    if secret.len() < 32 {
        return Err(format!(
            "the HS256 secret must be at least 32 bytes (it has {})",
            secret.len()
        ));
    }
    let key = VerifyKey {
        kid: None,
        key: jsonwebtoken::DecodingKey::from_secret(secret),
        algorithms: vec![Algorithm::HS256],
    };
    Ok(ProviderKeys::Static(Arc::new(KeySet::new(vec![key], 0))))
}

/// `jsonwebtoken`'s checks: the algorithm, the signature, `iss` and `aud`. Its time
/// checks are off (they read the system clock; ours use the engine's).
fn validation(alg: Algorithm, issuer: &str, audiences: Option<&[String]>) -> Validation {
    let mut v = Validation::new(alg);
    v.validate_exp = false;
    v.validate_nbf = false;
    v.required_spec_claims.clear();
    v.required_spec_claims.insert("iss".to_owned());
    v.set_issuer(&[issuer]);
    match audiences {
        Some(auds) => {
            v.set_audience(auds);
            v.required_spec_claims.insert("aud".to_owned());
            v.validate_aud = true;
        }
        None => v.validate_aud = false,
    }
    v
}

fn map_decode_error(kind: &ErrorKind) -> JwtError {
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::Provider(_) => JwtError::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName => JwtError::AlgorithmNotAllowed,
        ErrorKind::InvalidIssuer => JwtError::UnknownIssuer,
        ErrorKind::InvalidAudience => JwtError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => JwtError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => JwtError::UnknownIssuer,
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidClaimFormat(c) => JwtError::InvalidClaim(registered_claim(c)),
        _ => JwtError::Malformed,
    }
}

fn registered_claim(name: &str) -> &'static str {
    match name {
        "exp" => "exp",
        "nbf" => "nbf",
        "iss" => "iss",
        "aud" => "aud",
        "sub" => "sub",
        _ => "claim",
    }
}

fn decode_json_object(part: &str) -> Result<serde_json::Map<String, serde_json::Value>, JwtError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed)?;
    match serde_json::from_slice(&bytes) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        _ => Err(JwtError::Malformed),
    }
}

/// A NumericDate claim: absent → None; a non-negative number (fraction dropped) →
/// seconds; anything else → refused.
fn numeric_claim(
    claims: &serde_json::Map<String, serde_json::Value>,
    name: &'static str,
) -> Result<Option<u64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(serde_json::Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                Ok(Some(u))
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() && f >= 0.0 => Ok(Some(f as u64)),
                    _ => Err(JwtError::InvalidClaim(name)),
                }
            }
        }
        Some(_) => Err(JwtError::InvalidClaim(name)),
    }
}

fn parse_duration(
    text: Option<&str>,
    default: Duration,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Duration {
    match text {
        None => default,
        Some(t) => duration::parse(t).unwrap_or_else(|e| {
            problems.push(Problem::error(path.to_owned(), e));
            default
        }),
    }
}
