//! Configuration: the YAML schema, loading with positions, and every problem at once.
//!
//! Loading is two steps. [`parse`] turns text into a [`Config`] (unknown keys are errors;
//! each top-level section and list item is deserialised on its own so one mistake does
//! not hide the next). `crate::runtime::Runtime::build` then compiles CEL, resolves
//! references and builds the immutable runtime the request path reads. Both steps report
//! [`Problem`]s with a field path, line and column.

pub mod duration;
pub mod position;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use duration::ConfigDuration;
pub use position::PositionIndex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One thing wrong (or suspicious) in a config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub severity: Severity,
    /// Field path, e.g. `policies[0].limits.free.when[1]`.
    pub path: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl Problem {
    pub fn error(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            path: path.into(),
            line: None,
            column: None,
            message: message.into(),
        }
    }
    pub fn warning(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(path, message)
        }
    }
    pub fn located(mut self, index: &PositionIndex) -> Self {
        if self.line.is_none() {
            if let Some((l, c)) = index.locate(&self.path) {
                self.line = Some(l);
                self.column = Some(c);
            }
        }
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{sev}: {}:{l}:{c}: {}", self.path, self.message),
            _ => write!(f, "{sev}: {}: {}", self.path, self.message),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9901".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
    #[serde(default)]
    pub logging: LoggingConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// `metrics`: what `/metrics` may expose beyond labels taken from config.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Opt in to one series per counter key (`tollgate_counter_value{counter=...}`):
    /// counter keys carry user ids, so this is off by default.
    #[serde(default)]
    pub counter_labels: bool,
    /// At most this many counter series, the most spent first (default 500).
    #[serde(default)]
    pub max_counter_series: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Environment variable holding a bearer token required on the admin API.
    #[serde(default)]
    pub token_env: Option<String>,
    /// File holding that token.
    #[serde(default)]
    pub token_file: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token_env: None,
            token_file: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StorageKind {
    #[default]
    Memory,
    Redis,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StoreOnError {
    /// Keep serving on local (per-replica) counters while Redis is away.
    #[default]
    FailOpen,
    /// Answer 503 with `retry-after` while Redis is away.
    FailClosed,
}

/// `storage.redis`: where the shared counters live.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisStorageConfig {
    /// A single node, e.g. `redis://127.0.0.1:6379`.
    #[serde(default)]
    pub url: Option<String>,
    /// Redis Cluster seed nodes.
    #[serde(default)]
    pub cluster: Option<Vec<String>>,
    /// First part of every key (default `tollgate`).
    #[serde(default)]
    pub key_prefix: Option<String>,
    /// Bound on every Redis call (default 50ms).
    #[serde(default)]
    pub timeout: Option<ConfigDuration>,
    /// Bound on connecting (default 1s).
    #[serde(default)]
    pub connect_timeout: Option<ConfigDuration>,
    /// For `rediss://` nodes: a private CA and/or a client certificate (mutual TLS).
    /// Without it, `rediss://` verifies against the system's trust store.
    #[serde(default)]
    pub tls: Option<TlsClientFiles>,
    /// Optional local pre-aggregation of after-mode settlements (single node only).
    #[serde(default)]
    pub batching: Option<RedisBatchingConfig>,
}

/// `storage.redis.batching`: each proxy thread holds its after-mode settlements up to
/// `flush_interval`, adds up those of one counter and writes them in one call. Counters
/// on Redis then lag by up to the interval: fewer writes, a looser `after` budget (see
/// the README). Reservations (`accounting: reserve`) are not held back.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisBatchingConfig {
    /// How long a settlement may wait to share a write (1ms to 1s; default 5ms).
    #[serde(default)]
    pub flush_interval: Option<ConfigDuration>,
    /// Write at once when this many settlements wait (default 1000).
    #[serde(default)]
    pub max_batch: Option<usize>,
    /// After-mode admissions judge a counter by what this replica learned of it less
    /// than two `flush_interval`s ago (a read, or its own write's reply) plus what it
    /// holds, instead of reading it on every request (default true). Other replicas'
    /// spend then shows up to three intervals late instead of one.
    #[serde(default)]
    pub cache_reads: Option<bool>,
}

/// `storage.redis.tls` and `backends[].tls`: PEM files, read at load (and at every
/// reload).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsClientFiles {
    /// CA certificate(s) to trust instead of the default roots (for backends: webpki +
    /// the system's; for Redis: the system's).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Client certificate chain, for servers that require one (mutual TLS).
    #[serde(default)]
    pub cert_file: Option<String>,
    /// The client certificate's private key.
    #[serde(default)]
    pub key_file: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default)]
    pub kind: StorageKind,
    #[serde(default)]
    pub redis: Option<RedisStorageConfig>,
    #[serde(default)]
    pub on_error: StoreOnError,
    /// Settlements kept while Redis is away, written back on reconnection (default
    /// 100000); beyond, the oldest are dropped, counted and logged.
    #[serde(default)]
    pub max_deferred_settlements: Option<usize>,
    /// How long after its window ended a counter still accepts settlements (default 5m).
    #[serde(default)]
    pub settle_grace: Option<ConfigDuration>,
}

/// Limits and timeouts of the proxy listener and upstream calls.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Peers (CIDRs) whose `X-Forwarded-For` is believed for `source.address`.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Largest request body accepted (default 8 MiB); larger → 413.
    #[serde(default)]
    pub max_request_body_bytes: Option<u64>,
    /// Largest non-streaming response body buffered for usage (default 16 MiB); larger
    /// bodies are still forwarded, and charged an estimate.
    #[serde(default)]
    pub max_response_buffer_bytes: Option<u64>,
    /// Upstream TCP/TLS connect timeout (default 5s) → 502/504.
    #[serde(default)]
    pub upstream_connect_timeout: Option<ConfigDuration>,
    /// Time to the upstream's response headers (default 300s) → 504.
    #[serde(default)]
    pub upstream_response_timeout: Option<ConfigDuration>,
    /// Longest silence from the upstream while its body streams (default 120s); the
    /// response is then ended (streams cleanly, in the client's format) and charged.
    #[serde(default)]
    pub upstream_idle_timeout: Option<ConfigDuration>,
    /// Most header fields in one request (default 100); more → 431.
    #[serde(default)]
    pub max_headers: Option<usize>,
    /// Largest total of header names and values in one request (default 64 KiB);
    /// larger → 431.
    #[serde(default)]
    pub max_header_bytes: Option<u64>,
    /// Time a client has to send a request's headers (default 10s); a connection that
    /// trickles them is closed. Also bounds an idle HTTP/1.1 keep-alive connection.
    #[serde(default)]
    pub header_read_timeout: Option<ConfigDuration>,
    /// Time a client has to send a request body tollgate reads (LLM calls; default 60s);
    /// a body trickled slower → 408.
    #[serde(default)]
    pub request_body_timeout: Option<ConfigDuration>,
    /// Requests served at once on the proxy listener (default 10000); beyond, 503 with
    /// `retry-after` (load shedding).
    #[serde(default)]
    pub max_concurrent_requests: Option<usize>,
    /// HTTP/1.1 keep-alive on the proxy listener (default true).
    #[serde(default)]
    pub keep_alive: Option<bool>,
    /// Proxy threads (default: one per CPU). Each runs a single-threaded runtime with
    /// its own upstream connection pool, and accepted connections are handed to them in
    /// turn; 0 serves connections on the shared multi-threaded runtime instead. Read at
    /// start; a reload does not change it.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Terminate TLS on the proxy listener (h2 and HTTP/1.1 by ALPN). Re-read on every
    /// reload: new connections get the new certificate.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// A reservation not settled by then is released (default 15m).
    #[serde(default)]
    pub reservation_deadline: Option<ConfigDuration>,
    /// Drain deadline on shutdown (default 30s).
    #[serde(default)]
    pub shutdown_grace: Option<ConfigDuration>,
}

/// `server.tls`: PEM files for the proxy listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, leaf first.
    pub cert_file: String,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// `tracing` filter, e.g. `info` or `tollgate=debug` (RUST_LOG wins when set).
    #[serde(default)]
    pub level: Option<String>,
    /// One line per request (default true).
    #[serde(default)]
    pub access_log: Option<bool>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ApiKeyHeader {
    /// `Authorization: Bearer <key>` (OpenAI and compatible servers).
    #[default]
    Authorization,
    /// `x-api-key: <key>` (Anthropic).
    XApiKey,
    /// `api-key: <key>` (Azure OpenAI).
    ApiKey,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatorConfig {
    #[serde(default = "default_sim_model")]
    pub model: String,
    #[serde(default)]
    pub latency_ms: u64,
    #[serde(default)]
    pub ms_per_token: u64,
}

fn default_sim_model() -> String {
    "meta-llama/Llama-3.1-8B-Instruct".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub name: String,
    /// Base URL of an OpenAI- or Anthropic-compatible server (scheme, host, port,
    /// optional path prefix). Exactly one of `url` and `simulator`.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub simulator: Option<SimulatorConfig>,
    /// Environment variable holding the upstream API key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// File holding the upstream API key (trailing newline ignored).
    #[serde(default)]
    pub api_key_file: Option<String>,
    #[serde(default)]
    pub api_key_header: Option<ApiKeyHeader>,
    /// Static headers added to every upstream request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Forward the client's own `Authorization`/`x-api-key` upstream. Only allowed on
    /// routes where tollgate does not authenticate (`auth: none`).
    #[serde(default)]
    pub forward_client_credentials: bool,
    /// For `https://` backends with a private CA or that require a client certificate.
    #[serde(default)]
    pub tls: Option<TlsClientFiles>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RouteAuth {
    /// Credentials required (the default when `auth` is configured).
    #[default]
    Required,
    /// Anonymous when no credential is presented; a bad credential is still 401.
    Optional,
    /// No authentication; client credentials are ignored and stripped (unless the
    /// backend forwards them).
    None,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// Prefix on whole path segments: `/v1` matches `/v1` and `/v1/x`, not `/v1x`.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Exact path.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// Models (from the JSON body's `model`) this route serves.
    #[serde(default)]
    pub models: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// Exact host names or `*.example.com`; port ignored; absent = any host.
    #[serde(default)]
    pub hostnames: Option<Vec<String>>,
    #[serde(default, rename = "match")]
    pub matcher: MatchConfig,
    pub backend: String,
    #[serde(default)]
    pub auth: Option<RouteAuth>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub api_keys: Option<ApiKeysConfig>,
    #[serde(default)]
    pub jwt: Option<crate::auth::jwt::JwtConfig>,
    /// CEL predicates that must all hold for an authenticated call, else 403
    /// (`permission_denied`), e.g. `request.model in auth.identity.llms.openai`.
    #[serde(default)]
    pub authorization: Vec<String>,
    /// OPA Rego rules (as Kuadrant's AuthPolicy `opa.rego`): each must make `allow`
    /// true, else 403. Input: `auth.identity`, `request` and `context.request.http`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub opa: Vec<OpaRuleConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OpaRuleConfig {
    pub name: String,
    /// Rego rules without a `package` line (one is added); v0 syntax (`allow { … }`)
    /// and v1 syntax (`allow if { … }`) are both accepted.
    pub rego: String,
}

fn default_prefixes() -> Vec<String> {
    vec!["Bearer".into()]
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeysConfig {
    /// Schemes accepted in `Authorization: <prefix> <key>` (case-insensitive).
    /// `x-api-key: <key>` is always accepted too.
    #[serde(default = "default_prefixes")]
    pub prefixes: Vec<String>,
    #[serde(default)]
    pub keys: Vec<ApiKeyConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The key in plain text (fine for tutorials; prefer the others).
    #[serde(default, skip_serializing)]
    pub key: Option<String>,
    /// Environment variable holding the key.
    #[serde(default)]
    pub key_env: Option<String>,
    /// File holding the key.
    #[serde(default)]
    pub key_file: Option<String>,
    /// Hex SHA-256 of the key, so the key itself need not be stored anywhere.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Becomes `auth.identity` for CEL.
    #[serde(default)]
    pub identity: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
pub enum PolicyKindConfig {
    TokenRateLimitPolicy,
    RateLimitPolicy,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum TargetConfig {
    /// `gateway`: every route.
    Named(String),
    Route {
        route: String,
    },
    Routes {
        routes: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModeConfig {
    #[default]
    Enforce,
    Shadow,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AccountingConfig {
    #[default]
    After,
    Reserve,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnErrorConfig {
    #[default]
    Skip,
    Deny,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AnchorConfig {
    #[default]
    Epoch,
    Staggered,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    pub kind: PolicyKindConfig,
    #[serde(default = "default_target")]
    pub target: TargetConfig,
    #[serde(default)]
    pub mode: ModeConfig,
    #[serde(default)]
    pub accounting: AccountingConfig,
    /// CEL over `usage` (and request attributes): the tokens a call costs.
    #[serde(default)]
    pub cost: Option<String>,
    /// Output tokens a reservation assumes when the request sets no cap (default 1024).
    #[serde(default)]
    pub default_max_tokens: Option<u64>,
    /// End a stream cleanly once its cost would pass what its counters have left.
    #[serde(default)]
    pub stream_cutoff: bool,
    /// `fast` (byte heuristic, default) or `exact` (BPE, off the async workers).
    #[serde(default)]
    pub prompt_estimate: PromptEstimateConfig,
    /// `pre_auth`: a RateLimitPolicy counted before authentication (by
    /// `source.address`), so floods of bad credentials never reach key or JWT checks.
    #[serde(default)]
    pub phase: PhaseConfig,
    /// Where this policy's counters live: `shared` (the configured store, default) or
    /// `replica` (this process only, even when the store is Redis).
    #[serde(default)]
    pub scope: ScopeConfig,
    /// Predicates that must all hold for any limit of this policy to apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<String>,
    /// Independent limits: they apply on top of every other policy's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, LimitConfig>,
    /// Composed limits (Kuadrant's `defaults`): a more specific policy of the same kind
    /// replaces (`atomic`) or merges into (`merge`) them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defaults: Option<ComposedLimitsConfig>,
    /// Composed limits (Kuadrant's `overrides`): they win over more specific policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<ComposedLimitsConfig>,
}

/// How composed limits combine with those of other policies of the same kind.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StrategyConfig {
    /// The winning policy's limits are taken whole.
    #[default]
    Atomic,
    /// Limits are merged by name; on a clash the winning policy's limit is kept.
    Merge,
}

/// `defaults` / `overrides` of a policy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ComposedLimitsConfig {
    #[serde(default)]
    pub strategy: StrategyConfig,
    /// Predicates that must all hold for these limits to apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<String>,
    pub limits: BTreeMap<String, LimitConfig>,
}

/// Where a policy's counters live.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ScopeConfig {
    /// The configured store: with Redis, one count for every replica.
    #[default]
    Shared,
    /// This process only (agentgateway's `local` meaning), whatever the store.
    Replica,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PhaseConfig {
    PreAuth,
    #[default]
    Default,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PromptEstimateConfig {
    #[default]
    Fast,
    Exact,
}

fn default_target() -> TargetConfig {
    TargetConfig::Named("gateway".into())
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    pub limit: u64,
    pub window: ConfigDuration,
    #[serde(default)]
    pub burst: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    #[serde(default)]
    pub rates: Vec<RateConfig>,
    #[serde(default)]
    pub when: Vec<String>,
    #[serde(default)]
    pub counters: Vec<String>,
    #[serde(default)]
    pub on_error: OnErrorConfig,
    #[serde(default)]
    pub anchor: AnchorConfig,
    #[serde(default)]
    pub max_in_flight: Option<u64>,
}

/// Parse YAML text into a [`Config`], collecting every structural problem: each
/// top-level section and each list item is deserialised separately.
pub fn parse(src: &str) -> Result<(Config, PositionIndex), Vec<Problem>> {
    let index = PositionIndex::build(src);
    let root: yaml_serde::Value = match yaml_serde::from_str(src) {
        Ok(v) => v,
        Err(e) => {
            let (line, column) = e
                .location()
                .map(|l| (Some(l.line()), Some(l.column())))
                .unwrap_or((None, None));
            return Err(vec![Problem {
                severity: Severity::Error,
                path: String::new(),
                line,
                column,
                message: format!("not valid YAML: {e}"),
            }]);
        }
    };
    let root = match root {
        yaml_serde::Value::Mapping(m) => m,
        yaml_serde::Value::Null => yaml_serde::Mapping::new(),
        _ => {
            return Err(vec![Problem::error(
                "",
                "the config must be a mapping (listen, backends, routes, …)",
            )
            .located(&index)])
        }
    };

    let mut problems = Vec::new();
    // Check each list item on its own first, so several bad items are all reported.
    for (section, value) in root.iter() {
        let Some(section) = section.as_str() else {
            continue;
        };
        if let yaml_serde::Value::Sequence(items) = value {
            for (i, item) in items.iter().enumerate() {
                let path = format!("{section}[{i}]");
                let r = match section {
                    "backends" => check::<BackendConfig>(item),
                    "routes" => check::<RouteConfig>(item),
                    "policies" => check::<PolicyConfig>(item),
                    _ => Ok(()),
                };
                if let Err((sub, msg)) = r {
                    problems.push(Problem::error(join_path(&path, &sub), msg).located(&index));
                }
            }
        } else if matches!(section, "admin" | "storage" | "server" | "auth" | "logging") {
            let r = match section {
                "admin" => check::<AdminConfig>(value),
                "storage" => check::<StorageConfig>(value),
                "server" => check::<ServerConfig>(value),
                "auth" => check::<AuthConfig>(value),
                _ => check::<LoggingConfig>(value),
            };
            if let Err((sub, msg)) = r {
                problems.push(Problem::error(join_path(section, &sub), msg).located(&index));
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    match check_value::<Config>(yaml_serde::Value::Mapping(root)) {
        Ok(cfg) => Ok((cfg, index)),
        Err((path, msg)) => Err(vec![Problem::error(path, msg).located(&index)]),
    }
}

fn join_path(base: &str, sub: &str) -> String {
    if sub.is_empty() || sub == "." {
        base.to_owned()
    } else if sub.starts_with('[') {
        format!("{base}{sub}")
    } else {
        format!("{base}.{sub}")
    }
}

fn check<T: serde::de::DeserializeOwned>(v: &yaml_serde::Value) -> Result<(), (String, String)> {
    check_value::<T>(v.clone()).map(|_| ())
}

fn check_value<T: serde::de::DeserializeOwned>(
    v: yaml_serde::Value,
) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        (path, e.into_inner().to_string())
    })
}

/// Read and parse a file.
pub fn read(path: &Path) -> Result<(String, Config, PositionIndex), Vec<Problem>> {
    let src = std::fs::read_to_string(path).map_err(|e| {
        vec![Problem::error(
            "",
            format!("cannot read {}: {e}", path.display()),
        )]
    })?;
    let (cfg, idx) = parse(&src)?;
    Ok((src, cfg, idx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_an_error_with_position() {
        let src = "listen: 127.0.0.1:1\nroutes:\n  - name: a\n    backend: b\n    bakend: c\n";
        let errs = parse(src).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].message.contains("unknown field `bakend`"),
            "{errs:?}"
        );
        assert_eq!(errs[0].line, Some(5), "{errs:?}");
    }

    #[test]
    fn several_bad_items_all_reported() {
        let src = "routes:\n  - name: a\n  - backend: b\npolicies:\n  - name: p\n    kind: Nope\n    limits: {}\n";
        let errs = parse(src).unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
    }

    #[test]
    fn bad_duration_names_field() {
        let src = "policies:\n  - name: p\n    kind: RateLimitPolicy\n    limits:\n      a:\n        rates: [{limit: 1, window: 5x}]\n";
        let errs = parse(src).unwrap_err();
        assert!(
            errs[0].path.starts_with("policies[0].limits.a.rates[0]"),
            "{errs:?}"
        );
        assert!(errs[0].message.contains("unknown unit"), "{errs:?}");
        assert_eq!(errs[0].line, Some(6));
    }
}
