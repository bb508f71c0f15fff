//! The immutable runtime compiled from a [`Config`]: routes, backends, the key table and
//! compiled policies. Built once per (re)load and published atomically; the request path
//! only reads it — it never parses config or compiles CEL.

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use tollgate_limits::cel::Expr;
use tollgate_limits::policy::{
    Accounting, Anchor, CompiledLimit, CompiledPolicy, ComposedPolicy, Mode, OnError, PolicyKind,
    RateSpec, Role, Strategy, Target,
};

use crate::auth::{digest, ApiKeys};
use crate::config::{
    AccountingConfig, AnchorConfig, ApiKeyHeader, BackendConfig, Config, ModeConfig, OnErrorConfig,
    PolicyKindConfig, PositionIndex, Problem, RouteAuth, StrategyConfig, TargetConfig,
};

/// `server.upstream_connect_timeout` when not given.
const DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS: u64 = 5_000;

pub struct Backend {
    pub name: Arc<str>,
    pub target: BackendTarget,
    /// The injected upstream credential (header name, value marked sensitive).
    pub credential: Option<(HeaderName, HeaderValue)>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub forward_client_credentials: bool,
    /// A client of its own when the backend has its own TLS settings; else the shared one.
    pub client: Option<crate::proxy::upstream::UpstreamClient>,
}

pub enum BackendTarget {
    Url {
        scheme: http::uri::Scheme,
        authority: http::uri::Authority,
        /// The `Host` header sent upstream: the authority, made once at load.
        host: Option<HeaderValue>,
        /// Path prefix without trailing slash ("" for none).
        base_path: String,
    },
    Simulator(Arc<tollgate_sim::Simulator>),
}

#[derive(Debug, Clone)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com` → ".example.com"
    Suffix(String),
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Any,
    Prefix(String),
    Exact(String),
}

pub struct Route {
    pub name: Arc<str>,
    pub hosts: Vec<HostMatch>,
    pub path: PathMatch,
    pub methods: Option<Vec<Method>>,
    pub models: Option<Vec<String>>,
    pub backend: usize,
    pub auth: RouteAuth,
}

impl Route {
    pub fn matches(&self, host: &str, path: &str, method: &Method, model: Option<&str>) -> bool {
        if !self.hosts.is_empty()
            && !self.hosts.iter().any(|h| match h {
                HostMatch::Exact(e) => e == host,
                HostMatch::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
            })
        {
            return false;
        }
        let path_ok = match &self.path {
            PathMatch::Any => true,
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(p) => {
                path == p
                    || (path.starts_with(p.as_str()) && path.as_bytes().get(p.len()) == Some(&b'/'))
            }
        };
        if !path_ok {
            return false;
        }
        if let Some(ms) = &self.methods {
            if !ms.contains(method) {
                return false;
            }
        }
        if let Some(models) = &self.models {
            match model {
                Some(m) if models.iter().any(|x| x == m) => {}
                _ => return false,
            }
        }
        true
    }
}

pub struct Limits {
    pub max_request_body_bytes: u64,
    pub max_response_buffer_bytes: u64,
    pub upstream_connect_timeout: Duration,
    pub upstream_response_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    pub max_headers: usize,
    pub max_header_bytes: u64,
    pub header_read_timeout: Duration,
    pub request_body_timeout: Duration,
    pub max_concurrent_requests: usize,
    pub keep_alive: bool,
    /// `server.workers` (read at start only).
    pub workers: usize,
    pub reservation_deadline_ms: u64,
    pub settle_grace_ms: u64,
    pub shutdown_grace: Duration,
}

pub struct Runtime {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub routes: Vec<Route>,
    /// Some route matches on `models`: the body must be read before routing.
    pub routes_need_model: bool,
    pub backends: Vec<Backend>,
    /// Present when `auth` is configured.
    pub api_keys: Option<ApiKeys>,
    /// Present when `auth.jwt` is configured.
    pub jwt: Option<Arc<crate::auth::jwt::JwtAuth>>,
    pub policies: Vec<CompiledPolicy>,
    pub limits: Limits,
    /// `server.tls`, loaded: the proxy listener terminates TLS with it.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub access_log: bool,
    /// `auth.authorization`: all must hold, else 403.
    pub authorization: Vec<Expr>,
    /// `auth.opa`: every Rego rule must allow, else 403.
    pub opa: Vec<crate::auth::rego::RegoRule>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Some policy runs before authentication.
    pub has_pre_auth: bool,
    /// Bearer token for the admin API, if configured.
    pub admin_token: Option<Arc<str>>,
    /// `storage.redis.tls`, its files read.
    pub redis_tls: Option<tollgate_limits::RedisTls>,
    /// Some expression reads `request.headers` (else the map is not built per request).
    pub cel_reads_headers: bool,
    /// The `request.*` fields expressions read; the rest are not built per request
    /// (`None`: some expression may read any of them).
    pub cel_request_fields: Option<BTreeSet<String>>,
    /// Top-level variables besides `request` (`source`, `auth`, `llm`) some expression
    /// reads; the others are not built per request.
    pub cel_vars: BTreeSet<&'static str>,
    /// The config it was built from (secrets are never serialised from it).
    pub config: Config,
}

impl Runtime {
    pub fn auth_configured(&self) -> bool {
        self.api_keys.is_some() || self.jwt.is_some()
    }

    pub fn find_route(
        &self,
        host: &str,
        path: &str,
        method: &Method,
        model: Option<&str>,
    ) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.matches(host, path, method, model))
    }

    /// Compile a config. Returns every error found (and the warnings) or the runtime.
    pub fn build(
        cfg: Config,
        index: &PositionIndex,
    ) -> Result<(Runtime, Vec<Problem>), Vec<Problem>> {
        let mut b = Builder {
            errors: Vec::new(),
            warnings: Vec::new(),
            reads_headers: false,
            any_identity: cfg.auth.as_ref().is_some_and(|a| a.jwt.is_some()),
            upstream_connect_timeout_ms: cfg
                .server
                .upstream_connect_timeout
                .map(|d| d.as_millis_u64())
                .unwrap_or(DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS),
            request_fields: Some(BTreeSet::new()),
            vars_read: BTreeSet::new(),
        };
        let listen = b.addr("listen", &cfg.listen);
        let admin_listen = b.addr("admin.listen", &cfg.admin.listen);
        let admin_token = match (&cfg.admin.token_env, &cfg.admin.token_file) {
            (Some(_), Some(_)) => {
                b.err("admin", "give at most one of `token_env` and `token_file`");
                None
            }
            (Some(var), None) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Some(Arc::from(v.as_str())),
                _ => {
                    b.err(
                        "admin.token_env",
                        format!("environment variable `{var}` is not set"),
                    );
                    None
                }
            },
            (None, Some(f)) => match std::fs::read_to_string(f) {
                Ok(v) => Some(Arc::from(v.trim_end_matches(['\n', '\r']))),
                Err(e) => {
                    b.err("admin.token_file", format!("cannot read `{f}`: {e}"));
                    None
                }
            },
            (None, None) => None,
        };
        let redis_tls = cfg
            .storage
            .redis
            .as_ref()
            .and_then(|r| r.tls.as_ref())
            .and_then(|tls| b.tls_files("storage.redis.tls", tls))
            .map(|pem| tollgate_limits::RedisTls {
                ca_pem: pem.ca,
                client_cert_pem: pem.cert,
                client_key_pem: pem.key,
            });
        if let Some((redis, batching)) = cfg
            .storage
            .redis
            .as_ref()
            .and_then(|r| r.batching.as_ref().map(|b| (r, b)))
        {
            if redis.cluster.as_ref().is_some_and(|c| !c.is_empty()) {
                b.err(
                    "storage.redis.batching",
                    "batching is for a single Redis node (url), not a cluster",
                );
            }
            if let Some(d) = &batching.flush_interval {
                let ms = d.as_millis_u64();
                if !(1..=1_000).contains(&ms) {
                    b.err(
                        "storage.redis.batching.flush_interval",
                        format!("must be between 1ms and 1s, not {ms}ms"),
                    );
                }
            }
            if batching.max_batch == Some(0) {
                b.err("storage.redis.batching.max_batch", "must be at least 1");
            }
        }
        if admin_token.is_none() && admin_listen.is_some_and(|a| !a.ip().is_loopback()) {
            b.warn(
                "admin.listen",
                "the admin API listens beyond loopback without a token (set admin.token_env)",
            );
        }

        let mut backends = Vec::new();
        let mut names = HashSet::new();
        for (i, bc) in cfg.backends.iter().enumerate() {
            let path = format!("backends[{i}]");
            if !names.insert(bc.name.clone()) {
                b.err(
                    format!("{path}.name"),
                    format!("duplicate backend name `{}`", bc.name),
                );
            }
            if let Some(be) = b.backend(&path, bc) {
                backends.push(be);
            }
        }

        let mut routes = Vec::new();
        let mut route_names = HashSet::new();
        for (i, rc) in cfg.routes.iter().enumerate() {
            let path = format!("routes[{i}]");
            if !route_names.insert(rc.name.clone()) {
                b.err(
                    format!("{path}.name"),
                    format!("duplicate route name `{}`", rc.name),
                );
            }
            let backend = cfg.backends.iter().position(|x| x.name == rc.backend);
            if backend.is_none() {
                let known: Vec<_> = cfg.backends.iter().map(|x| x.name.as_str()).collect();
                b.err(
                    format!("{path}.backend"),
                    format!(
                        "no backend named `{}` (known: {})",
                        rc.backend,
                        known.join(", ")
                    ),
                );
            }
            let m = &rc.matcher;
            let pm = match (&m.path_prefix, &m.path) {
                (Some(_), Some(_)) => {
                    b.err(
                        format!("{path}.match"),
                        "give either `path_prefix` or `path`, not both",
                    );
                    PathMatch::Any
                }
                (Some(p), None) => {
                    if !p.starts_with('/') {
                        b.err(format!("{path}.match.path_prefix"), "must start with '/'");
                    }
                    let p = p.trim_end_matches('/');
                    if p.is_empty() {
                        PathMatch::Any
                    } else {
                        PathMatch::Prefix(p.to_owned())
                    }
                }
                (None, Some(p)) => {
                    if !p.starts_with('/') {
                        b.err(format!("{path}.match.path"), "must start with '/'");
                    }
                    PathMatch::Exact(p.clone())
                }
                (None, None) => PathMatch::Any,
            };
            let methods = m.methods.as_ref().map(|ms| {
                ms.iter()
                    .enumerate()
                    .filter_map(|(j, s)| {
                        match Method::from_bytes(s.to_ascii_uppercase().as_bytes()) {
                            Ok(m) => Some(m),
                            Err(_) => {
                                b.err(
                                    format!("{path}.match.methods[{j}]"),
                                    format!("`{s}` is not an HTTP method"),
                                );
                                None
                            }
                        }
                    })
                    .collect()
            });
            let hosts = rc
                .hostnames
                .iter()
                .flatten()
                .map(|h| {
                    let h = h.to_ascii_lowercase();
                    match h.strip_prefix('*') {
                        Some(rest) if rest.starts_with('.') => HostMatch::Suffix(rest.to_owned()),
                        _ => HostMatch::Exact(h),
                    }
                })
                .collect();
            let auth = rc.auth.unwrap_or_default();
            if let Some(bi) = backend {
                if cfg.backends[bi].forward_client_credentials
                    && cfg.auth.is_some()
                    && auth != RouteAuth::None
                {
                    b.err(
                        format!("{path}.auth"),
                        format!(
                            "backend `{}` forwards client credentials, which is only allowed on routes with `auth: none`",
                            rc.backend
                        ),
                    );
                }
            }
            routes.push(Route {
                name: Arc::from(rc.name.as_str()),
                hosts,
                path: pm,
                methods,
                models: m.models.clone(),
                backend: backend.unwrap_or(0),
                auth,
            });
        }
        if cfg.routes.is_empty() {
            b.warn("routes", "no routes: every request will get 404");
        }

        let api_keys = cfg.auth.as_ref().map(|a| {
            let mut table = ApiKeys::new(
                a.api_keys
                    .as_ref()
                    .map(|k| k.prefixes.as_slice())
                    .unwrap_or(&[]),
            );
            if let Some(k) = &a.api_keys {
                for (i, kc) in k.keys.iter().enumerate() {
                    let path = format!("auth.api_keys.keys[{i}]");
                    let given = [
                        kc.key.is_some(),
                        kc.key_env.is_some(),
                        kc.key_file.is_some(),
                        kc.sha256.is_some(),
                    ]
                    .iter()
                    .filter(|x| **x)
                    .count();
                    if given != 1 {
                        b.err(
                            &path,
                            "give exactly one of `key`, `key_env`, `key_file`, `sha256`",
                        );
                        continue;
                    }
                    let d = if let Some(k) = &kc.key {
                        Some(digest(k))
                    } else if let Some(var) = &kc.key_env {
                        match std::env::var(var) {
                            Ok(v) if !v.is_empty() => Some(digest(&v)),
                            _ => {
                                b.err(
                                    format!("{path}.key_env"),
                                    format!("environment variable `{var}` is not set"),
                                );
                                None
                            }
                        }
                    } else if let Some(f) = &kc.key_file {
                        match std::fs::read_to_string(f) {
                            Ok(v) => Some(digest(v.trim_end_matches(['\n', '\r']))),
                            Err(e) => {
                                b.err(
                                    format!("{path}.key_file"),
                                    format!("cannot read `{f}`: {e}"),
                                );
                                None
                            }
                        }
                    } else if let Some(h) = &kc.sha256 {
                        match hex::decode(h.trim()) {
                            Ok(bytes) if bytes.len() == 32 => {
                                let mut d = [0u8; 32];
                                d.copy_from_slice(&bytes);
                                Some(d)
                            }
                            _ => {
                                b.err(
                                    format!("{path}.sha256"),
                                    "expected 64 hex characters (a SHA-256 digest)",
                                );
                                None
                            }
                        }
                    } else {
                        None
                    };
                    if let Some(d) = d {
                        if !table.insert(d, &serde_json::Value::Object(kc.identity.clone())) {
                            b.err(&path, "this key is listed twice");
                        }
                    }
                }
            }
            table
        });

        let jwt = match cfg.auth.as_ref().and_then(|a| a.jwt.as_ref()) {
            None => None,
            Some(j) => match crate::auth::jwt::JwtAuth::build(j, "auth.jwt") {
                Ok(a) => Some(Arc::new(a)),
                Err(problems) => {
                    b.errors.extend(problems);
                    None
                }
            },
        };
        // Identity fields some auth source produces, for warnings on predicates.
        let identity_fields: BTreeSet<String> = cfg
            .auth
            .iter()
            .flat_map(|a| a.api_keys.iter())
            .flat_map(|k| k.keys.iter())
            .flat_map(|k| k.identity.keys().cloned())
            .collect();

        let mut policies = Vec::new();
        let mut composed = Vec::new();
        let mut policy_names = HashSet::new();
        for (i, pc) in cfg.policies.iter().enumerate() {
            let path = format!("policies[{i}]");
            if !policy_names.insert(pc.name.clone()) {
                b.err(
                    format!("{path}.name"),
                    format!("duplicate policy name `{}`", pc.name),
                );
            }
            let target = match &pc.target {
                TargetConfig::Named(n) if n == "gateway" => Target::Gateway,
                TargetConfig::Named(n) => {
                    b.err(
                        format!("{path}.target"),
                        format!("expected `gateway` or {{ route: NAME }}, got `{n}`"),
                    );
                    Target::Gateway
                }
                TargetConfig::Route { route } => Target::Routes(vec![route.clone()]),
                TargetConfig::Routes { routes } => Target::Routes(routes.clone()),
            };
            if let Target::Routes(rs) = &target {
                for r in rs {
                    if !cfg.routes.iter().any(|x| &x.name == r) {
                        b.err(format!("{path}.target"), format!("no route named `{r}`"));
                    }
                }
            }
            let kind = match pc.kind {
                PolicyKindConfig::TokenRateLimitPolicy => PolicyKind::Tokens,
                PolicyKindConfig::RateLimitPolicy => PolicyKind::Requests,
            };
            let cost = pc
                .cost
                .as_ref()
                .and_then(|src| b.cel(&format!("{path}.cost"), src, &identity_fields));
            if pc.cost.is_some() && kind == PolicyKind::Requests {
                b.err(
                    format!("{path}.cost"),
                    "`cost` applies to TokenRateLimitPolicy only",
                );
            }
            if kind == PolicyKind::Requests
                && (pc.stream_cutoff
                    || pc.default_max_tokens.is_some()
                    || pc.prompt_estimate != crate::config::PromptEstimateConfig::Fast)
            {
                b.err(
                    &path,
                    "`stream_cutoff`, `default_max_tokens` and `prompt_estimate` apply to TokenRateLimitPolicy only",
                );
            }
            if pc.phase == crate::config::PhaseConfig::PreAuth && kind == PolicyKind::Tokens {
                b.err(
                    format!("{path}.phase"),
                    "`phase: pre_auth` applies to RateLimitPolicy only (tokens are known after the call)",
                );
            }
            if pc.accounting == AccountingConfig::Reserve && kind == PolicyKind::Requests {
                b.err(
                    format!("{path}.accounting"),
                    "`accounting` applies to TokenRateLimitPolicy only",
                );
            }
            // Exactly one of `limits` (independent), `defaults`, `overrides` (composed).
            let blocks = [
                (!pc.limits.is_empty()).then_some("limits"),
                pc.defaults.as_ref().map(|_| "defaults"),
                pc.overrides.as_ref().map(|_| "overrides"),
            ];
            let given: Vec<&str> = blocks.iter().flatten().copied().collect();
            if given.len() > 1 {
                b.err(
                    &path,
                    format!(
                        "give one of `limits`, `defaults` and `overrides`, not {}",
                        given.join(" and ")
                    ),
                );
            }
            let (lbase, block_limits, composition, block_when) = match (&pc.defaults, &pc.overrides)
            {
                (Some(d), _) => (
                    format!("{path}.defaults"),
                    &d.limits,
                    Some((Role::Defaults, d.strategy)),
                    Some(&d.when),
                ),
                (None, Some(o)) => (
                    format!("{path}.overrides"),
                    &o.limits,
                    Some((Role::Overrides, o.strategy)),
                    Some(&o.when),
                ),
                (None, None) => (path.clone(), &pc.limits, None, None),
            };
            if block_limits.is_empty() {
                b.warn(format!("{lbase}.limits"), "policy has no limits");
            }
            // Policy-level predicates guard every limit: compiled once, prepended.
            let mut guard: Vec<Expr> = pc
                .when
                .iter()
                .enumerate()
                .filter_map(|(wi, src)| b.cel(&format!("{path}.when[{wi}]"), src, &identity_fields))
                .collect();
            for (wi, src) in block_when.into_iter().flatten().enumerate() {
                if let Some(e) = b.cel(&format!("{lbase}.when[{wi}]"), src, &identity_fields) {
                    guard.push(e);
                }
            }
            let mut limits = Vec::new();
            for (lname, lc) in block_limits {
                let lpath = format!("{lbase}.limits.{lname}");
                if lc.rates.is_empty() && lc.max_in_flight.is_none() {
                    b.err(
                        format!("{lpath}.rates"),
                        "a limit needs at least one rate (or max_in_flight)",
                    );
                }
                let mut rates = Vec::new();
                let mut seen_windows = HashSet::new();
                for (ri, rc) in lc.rates.iter().enumerate() {
                    let rpath = format!("{lpath}.rates[{ri}]");
                    let window_ms = rc.window.as_millis_u64();
                    if window_ms == 0 {
                        b.err(format!("{rpath}.window"), "window must be longer than 0");
                    }
                    if !seen_windows.insert(window_ms) {
                        b.err(format!("{rpath}.window"), "two rates of one limit share a window length; they would share one counter");
                    }
                    if rc.burst.is_some() && kind == PolicyKind::Tokens {
                        b.err(
                            format!("{rpath}.burst"),
                            "`burst` applies to request rates (RateLimitPolicy) only",
                        );
                    }
                    rates.push(RateSpec {
                        limit: rc.limit,
                        window_ms: window_ms.max(1),
                        burst: rc.burst,
                    });
                }
                let when = guard
                    .iter()
                    .cloned()
                    .chain(lc.when.iter().enumerate().filter_map(|(wi, src)| {
                        b.cel(&format!("{lpath}.when[{wi}]"), src, &identity_fields)
                    }))
                    .collect();
                let counters = lc
                    .counters
                    .iter()
                    .enumerate()
                    .filter_map(|(ci, src)| {
                        b.cel(&format!("{lpath}.counters[{ci}]"), src, &identity_fields)
                    })
                    .collect();
                if lc.counters.is_empty() {
                    b.warn(
                        format!("{lpath}.counters"),
                        "no counters: one budget is shared by every caller this limit applies to",
                    );
                }
                limits.push(CompiledLimit {
                    name: Arc::from(lname.as_str()),
                    rates,
                    when,
                    counters,
                    on_error: match lc.on_error {
                        OnErrorConfig::Skip => OnError::Skip,
                        OnErrorConfig::Deny => OnError::Deny,
                    },
                    anchor: match lc.anchor {
                        AnchorConfig::Epoch => Anchor::Epoch,
                        AnchorConfig::Staggered => Anchor::Staggered,
                    },
                    max_in_flight: lc.max_in_flight,
                });
            }
            let compiled = CompiledPolicy {
                name: Arc::from(pc.name.as_str()),
                kind,
                target,
                mode: match pc.mode {
                    ModeConfig::Enforce => Mode::Enforce,
                    ModeConfig::Shadow => Mode::Shadow,
                },
                accounting: match pc.accounting {
                    AccountingConfig::After => Accounting::After,
                    AccountingConfig::Reserve => Accounting::Reserve,
                },
                cost,
                default_output_tokens: pc.default_max_tokens.unwrap_or(1024),
                stream_cutoff: pc.stream_cutoff,
                exact_prompt: pc.prompt_estimate == crate::config::PromptEstimateConfig::Exact,
                pre_auth: pc.phase == crate::config::PhaseConfig::PreAuth,
                replica: pc.scope == crate::config::ScopeConfig::Replica,
                limits,
            };
            match composition {
                None => policies.push(compiled),
                Some((role, strategy)) => {
                    if compiled.pre_auth {
                        b.err(
                            format!("{path}.phase"),
                            "`phase: pre_auth` applies to independent `limits` only",
                        );
                    }
                    composed.push(ComposedPolicy {
                        policy: compiled,
                        role,
                        strategy: match strategy {
                            StrategyConfig::Atomic => Strategy::Atomic,
                            StrategyConfig::Merge => Strategy::Merge,
                        },
                    });
                }
            }
        }
        // Kuadrant composition is resolved here, once: the request path sees plain
        // policies, each covering the routes where its limits are in effect.
        let route_names: Vec<String> = cfg.routes.iter().map(|r| r.name.clone()).collect();
        policies.extend(tollgate_limits::policy::compose(&composed, &route_names));

        let mut opa = Vec::new();
        for (i, rule) in cfg.auth.iter().flat_map(|a| a.opa.iter()).enumerate() {
            match crate::auth::rego::RegoRule::compile(i, &rule.name, &rule.rego) {
                Ok(r) => opa.push(r),
                Err(e) => b.err(format!("auth.opa[{i}].rego"), e),
            }
        }

        let authorization: Vec<Expr> = cfg
            .auth
            .iter()
            .flat_map(|a| a.authorization.iter().enumerate())
            .filter_map(|(i, src)| {
                b.cel(&format!("auth.authorization[{i}]"), src, &identity_fields)
            })
            .collect();
        let mut trusted_proxies = Vec::new();
        for (i, t) in cfg.server.trusted_proxies.iter().enumerate() {
            let parsed = t
                .parse::<ipnet::IpNet>()
                .or_else(|_| t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match parsed {
                Ok(n) => trusted_proxies.push(n),
                Err(_) => b.err(
                    format!("server.trusted_proxies[{i}]"),
                    format!("`{t}` is not an address or CIDR like 10.0.0.0/8"),
                ),
            }
        }
        let s = &cfg.server;
        let ms = |d: &Option<crate::config::ConfigDuration>, default: u64| {
            d.map(|d| d.as_millis_u64()).unwrap_or(default)
        };
        let limits = Limits {
            max_request_body_bytes: s.max_request_body_bytes.unwrap_or(8 << 20),
            max_response_buffer_bytes: s.max_response_buffer_bytes.unwrap_or(16 << 20),
            upstream_connect_timeout: Duration::from_millis(ms(
                &s.upstream_connect_timeout,
                DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS,
            )),
            upstream_response_timeout: Duration::from_millis(ms(
                &s.upstream_response_timeout,
                300_000,
            )),
            upstream_idle_timeout: Duration::from_millis(ms(&s.upstream_idle_timeout, 120_000)),
            max_headers: s.max_headers.unwrap_or(100),
            max_header_bytes: s.max_header_bytes.unwrap_or(64 << 10),
            header_read_timeout: Duration::from_millis(ms(&s.header_read_timeout, 10_000)),
            request_body_timeout: Duration::from_millis(ms(&s.request_body_timeout, 60_000)),
            max_concurrent_requests: s.max_concurrent_requests.unwrap_or(10_000),
            keep_alive: s.keep_alive.unwrap_or(true),
            workers: s.workers.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
            }),
            reservation_deadline_ms: ms(&s.reservation_deadline, 900_000),
            settle_grace_ms: ms(&cfg.storage.settle_grace, 300_000),
            shutdown_grace: Duration::from_millis(ms(&s.shutdown_grace, 30_000)),
        };

        for (field, zero) in [
            ("max_headers", limits.max_headers == 0),
            ("max_header_bytes", limits.max_header_bytes == 0),
            ("header_read_timeout", limits.header_read_timeout.is_zero()),
            (
                "request_body_timeout",
                limits.request_body_timeout.is_zero(),
            ),
            (
                "max_concurrent_requests",
                limits.max_concurrent_requests == 0,
            ),
            (
                "upstream_idle_timeout",
                limits.upstream_idle_timeout.is_zero(),
            ),
        ] {
            if zero {
                b.err(format!("server.{field}"), "must be greater than zero");
            }
        }
        let tls = match &s.tls {
            None => None,
            Some(t) => match crate::proxy::tls::server_config(&t.cert_file, &t.key_file) {
                Ok(c) => Some(c),
                Err((field, msg)) => {
                    b.err(format!("server.tls.{field}"), msg);
                    None
                }
            },
        };

        let errors: Vec<Problem> = b.errors.into_iter().map(|p| p.located(index)).collect();
        let warnings: Vec<Problem> = b.warnings.into_iter().map(|p| p.located(index)).collect();
        if !errors.is_empty() {
            let mut all = errors;
            all.extend(warnings);
            return Err(all);
        }
        let has_pre_auth = policies.iter().any(|p| p.pre_auth);
        let (Some(listen), Some(admin_listen)) = (listen, admin_listen) else {
            return Err(vec![Problem::error("listen", "invalid listen address")]);
        };
        Ok((
            Runtime {
                listen,
                admin_listen,
                routes_need_model: routes.iter().any(|r| r.models.is_some()),
                routes,
                backends,
                api_keys,
                jwt,
                policies,
                limits,
                tls,
                access_log: cfg.logging.access_log.unwrap_or(true),
                cel_reads_headers: b.reads_headers,
                cel_request_fields: b.request_fields.clone(),
                cel_vars: b.vars_read.clone(),
                has_pre_auth,
                authorization,
                opa,
                trusted_proxies,
                admin_token,
                redis_tls,
                config: cfg,
            },
            warnings,
        ))
    }
}

/// The contents of a [`crate::config::TlsClientFiles`].
struct TlsPem {
    ca: Option<Vec<u8>>,
    cert: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
}

struct Builder {
    errors: Vec<Problem>,
    warnings: Vec<Problem>,
    reads_headers: bool,
    /// JWT claims can carry any field: no "nobody produces this" warnings.
    any_identity: bool,
    /// `server.upstream_connect_timeout`, for backends with a client of their own.
    upstream_connect_timeout_ms: u64,
    /// `request.*` fields some expression reads (`None`: all of them).
    request_fields: Option<BTreeSet<String>>,
    /// Top-level variables besides `request` that some expression reads.
    vars_read: BTreeSet<&'static str>,
}

impl Builder {
    fn err(&mut self, path: impl Into<String>, msg: impl Into<String>) {
        self.errors.push(Problem::error(path, msg));
    }
    fn warn(&mut self, path: impl Into<String>, msg: impl Into<String>) {
        self.warnings.push(Problem::warning(path, msg));
    }

    fn addr(&mut self, path: &str, s: &str) -> Option<SocketAddr> {
        match s.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(path, format!("`{s}` is not an address like 127.0.0.1:8080"));
                None
            }
        }
    }

    fn cel(&mut self, path: &str, src: &str, identity_fields: &BTreeSet<String>) -> Option<Expr> {
        match Expr::compile(src) {
            Ok(e) => {
                for var in ["source", "auth", "llm"] {
                    if e.references_variable(var) {
                        self.vars_read.insert(var);
                    }
                }
                match (e.fields_read("request"), self.request_fields.as_mut()) {
                    (Some(fields), Some(all)) => all.extend(fields),
                    (None, _) => self.request_fields = None,
                    (_, None) => {}
                }
                // `request.headers`, or `request` used whole (e.g. passed to a macro).
                if src.contains("headers")
                    || e.member_paths().iter().all(|p| !p.starts_with("request."))
                        && e.references_variable("request")
                {
                    self.reads_headers = true;
                }
                for p in e.member_paths() {
                    let root = p.split('.').next().unwrap_or("");
                    if !matches!(
                        root,
                        "request" | "source" | "auth" | "llm" | "usage" | "destination"
                    ) {
                        continue;
                    }
                    if let Some(rest) = p.strip_prefix("auth.identity.") {
                        let field = rest.split('.').next().unwrap_or("");
                        if !self.any_identity
                            && !identity_fields.is_empty()
                            && !identity_fields.contains(field)
                        {
                            self.warn(
                                path,
                                format!("`auth.identity.{field}` is produced by no configured API key identity"),
                            );
                        }
                    }
                }
                Some(e)
            }
            Err(e) => {
                self.err(
                    path,
                    format!(
                        "CEL does not compile at {}:{}: {} in `{src}`",
                        e.line, e.column, e.message
                    ),
                );
                None
            }
        }
    }

    fn backend(&mut self, path: &str, bc: &BackendConfig) -> Option<Backend> {
        let target = match (&bc.url, &bc.simulator) {
            (Some(_), Some(_)) | (None, None) => {
                self.err(path, "give exactly one of `url` and `simulator`");
                return None;
            }
            (Some(url), None) => {
                let uri: http::Uri = match url.parse() {
                    Ok(u) => u,
                    Err(e) => {
                        self.err(format!("{path}.url"), format!("`{url}` is not a URL: {e}"));
                        return None;
                    }
                };
                let (Some(scheme), Some(authority)) =
                    (uri.scheme().cloned(), uri.authority().cloned())
                else {
                    self.err(
                        format!("{path}.url"),
                        format!("`{url}` needs a scheme and host, like http://127.0.0.1:8000"),
                    );
                    return None;
                };
                if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
                    self.err(format!("{path}.url"), "scheme must be http or https");
                }
                if uri.query().is_some() {
                    self.err(format!("{path}.url"), "a backend URL cannot carry a query");
                }
                BackendTarget::Url {
                    scheme,
                    host: crate::proxy::upstream::host_header(&authority),
                    authority,
                    base_path: uri.path().trim_end_matches('/').to_owned(),
                }
            }
            (None, Some(sim)) => BackendTarget::Simulator(Arc::new(tollgate_sim::Simulator::new(
                tollgate_sim::SimConfig {
                    model: sim.model.clone(),
                    latency_ms: sim.latency_ms,
                    ms_per_token: sim.ms_per_token,
                    default_max_tokens: 16,
                },
            ))),
        };
        let key = match (&bc.api_key_env, &bc.api_key_file) {
            (Some(_), Some(_)) => {
                self.err(path, "give at most one of `api_key_env` and `api_key_file`");
                None
            }
            (Some(var), None) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Some(v),
                _ => {
                    // Not fatal: a backend may be unused in this deployment. Calls to it
                    // go out without a key and the provider answers 401.
                    self.warn(
                        format!("{path}.api_key_env"),
                        format!("environment variable `{var}` is not set; requests to `{}` carry no API key", bc.name),
                    );
                    None
                }
            },
            (None, Some(f)) => match std::fs::read_to_string(f) {
                Ok(v) => Some(v.trim_end_matches(['\n', '\r']).to_owned()),
                Err(e) => {
                    self.err(
                        format!("{path}.api_key_file"),
                        format!("cannot read `{f}`: {e}"),
                    );
                    None
                }
            },
            (None, None) => None,
        };
        let credential = match key {
            None => None,
            Some(k) => {
                let (name, value) = match bc.api_key_header.unwrap_or_default() {
                    ApiKeyHeader::Authorization => {
                        (http::header::AUTHORIZATION, format!("Bearer {k}"))
                    }
                    ApiKeyHeader::XApiKey => (HeaderName::from_static("x-api-key"), k),
                    ApiKeyHeader::ApiKey => (HeaderName::from_static("api-key"), k),
                };
                match HeaderValue::from_str(&value) {
                    Ok(mut v) => {
                        v.set_sensitive(true);
                        Some((name, v))
                    }
                    Err(_) => {
                        self.err(
                            format!("{path}.api_key_env"),
                            "the API key contains characters not allowed in a header",
                        );
                        None
                    }
                }
            }
        };
        let mut headers = Vec::new();
        for (k, v) in &bc.headers {
            match (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                (Ok(n), Ok(v)) => headers.push((n, v)),
                _ => self.err(
                    format!("{path}.headers.{k}"),
                    "not a valid header name/value",
                ),
            }
        }
        let client = bc
            .tls
            .as_ref()
            .and_then(|tls| self.backend_tls(path, bc, tls));
        Some(Backend {
            name: Arc::from(bc.name.as_str()),
            target,
            credential,
            headers,
            forward_client_credentials: bc.forward_client_credentials,
            client,
        })
    }

    /// The PEM files of a `tls:` block (at `path`), read now: an unreadable one, or a
    /// certificate without its key (or the reverse), is a config error (all of them are
    /// reported) and gives `None`.
    fn tls_files(&mut self, path: &str, tls: &crate::config::TlsClientFiles) -> Option<TlsPem> {
        let mut ok = tls.cert_file.is_some() == tls.key_file.is_some();
        if !ok {
            self.err(
                path,
                "`cert_file` and `key_file` go together (mutual TLS needs both)",
            );
        }
        let mut read = |field: &str, file: &Option<String>| {
            let f = file.as_deref()?;
            std::fs::read(f)
                .map_err(|e| {
                    ok = false;
                    self.err(format!("{path}.{field}"), format!("cannot read `{f}`: {e}"))
                })
                .ok()
        };
        let pem = TlsPem {
            ca: read("ca_file", &tls.ca_file),
            cert: read("cert_file", &tls.cert_file),
            key: read("key_file", &tls.key_file),
        };
        ok.then_some(pem)
    }

    /// `backends[i].tls`: files read and checked now, so a bad one is a config error.
    fn backend_tls(
        &mut self,
        path: &str,
        bc: &BackendConfig,
        tls: &crate::config::TlsClientFiles,
    ) -> Option<crate::proxy::upstream::UpstreamClient> {
        if bc
            .url
            .as_deref()
            .is_some_and(|u| !u.starts_with("https://"))
        {
            self.err(format!("{path}.tls"), "TLS settings need an https:// url");
            return None;
        }
        let pem = self.tls_files(&format!("{path}.tls"), tls)?;
        let material = crate::proxy::upstream::UpstreamTls {
            ca_pem: pem.ca,
            client_cert_pem: pem.cert,
            client_key_pem: pem.key,
        };
        // The connect timeout is the gateway-wide one (`server.upstream_connect_timeout`).
        let connect = Duration::from_millis(self.upstream_connect_timeout_ms);
        match crate::proxy::upstream::UpstreamClient::with_tls(connect, &material) {
            Ok(c) => Some(c),
            Err(e) => {
                self.err(format!("{path}.tls"), e);
                None
            }
        }
    }
}
