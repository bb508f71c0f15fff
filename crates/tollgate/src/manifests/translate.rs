//! Documents → native [`Config`]. One function per kind family; each records where its
//! output came from so later problems name the resource.
//!
//! Mapping, in short:
//! - `Gateway` → `listen` (first listener's port on 127.0.0.1; `--listen` overrides);
//!   `HTTPRoute` rule × match → a route (exact paths first, then longer prefixes);
//!   `backendRefs` → the `Service`, resolved by `--backend NAME=URL` or, for the
//!   tutorial's `llm-d-inference-sim` `Deployment`, the built-in simulator.
//! - `AuthPolicy` → `auth.api_keys` (matching `Secret`s, stored as SHA-256 digests; the
//!   identity is the Secret's metadata plus the `identity` filter's properties) and
//!   `auth.opa`; Gloo `VirtualHostOption` JWT → `auth.jwt`. Routes no auth resource
//!   covers get `auth: none`.
//! - Kuadrant `RateLimitPolicy`/`TokenRateLimitPolicy` → composed policies (`defaults`,
//!   bare `limits` being implicit atomic defaults, or `overrides`), emitted least
//!   specific first (Gateway, listener, HTTPRoute, rule) so composition orders them as
//!   Kuadrant does.
//! - `AgentgatewayPolicy` local limits and Gloo `RateLimitConfig`s (through
//!   `RouteOption`) → independent policies: they add up, as in those gateways.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use serde_json::{json, Value};

use super::kinds::*;
use super::{Document, Origins, Translation};
use crate::auth::jwt::{JwtConfig, JwtProviderConfig};
use crate::config::{
    ApiKeyConfig, ApiKeysConfig, AuthConfig, BackendConfig, ComposedLimitsConfig, ConfigDuration,
    LimitConfig, MatchConfig, OpaRuleConfig, PolicyConfig, PolicyKindConfig, Problem, RateConfig,
    RouteAuth, RouteConfig, SimulatorConfig, StrategyConfig, TargetConfig,
};

const GATEWAY_API: &str = "gateway.networking.k8s.io";

fn group(api_version: &str) -> &str {
    match api_version.split_once('/') {
        Some((g, _)) => g,
        None => "",
    }
}

/// A translated HTTPRoute: its native routes, all and per rule name/index.
struct RouteInfo<'a> {
    doc: &'a Document,
    spec: HttpRouteSpec,
    all: Vec<String>,
    by_rule: BTreeMap<String, Vec<String>>,
}

struct Cx<'a> {
    docs: &'a [Document],
    problems: Vec<Problem>,
    origins: Origins,
    cfg: crate::config::Config,
    gateways: Vec<(&'a Document, GatewaySpec)>,
    routes: Vec<RouteInfo<'a>>,
    /// Native routes an auth resource covers.
    authed: BTreeSet<String>,
}

/// Translate `docs` (on top of `base`, a native config, when given).
/// `backends` maps a Service name (`name` or `namespace/name`) to a URL.
pub fn translate(
    docs: &[Document],
    base: Option<crate::config::Config>,
    backends: &BTreeMap<String, String>,
) -> Result<Translation, Vec<Problem>> {
    let from_base = base.is_some();
    let cfg = match base {
        Some(c) => c,
        None => match crate::config::parse("") {
            Ok((c, _)) => c,
            Err(p) => return Err(p),
        },
    };
    let mut cx = Cx {
        docs,
        problems: Vec::new(),
        origins: Origins::default(),
        cfg,
        gateways: Vec::new(),
        routes: Vec::new(),
        authed: BTreeSet::new(),
    };
    cx.classify();
    cx.gateways_and_routes(backends, from_base);
    cx.auth();
    cx.kuadrant_limits();
    cx.agentgateway();
    cx.gloo_rate_limits();
    // Routes no auth resource covers are open, as in a cluster without an AuthPolicy.
    let authed = cx.authed.clone();
    let manifest_routes: BTreeSet<String> = cx
        .routes
        .iter()
        .flat_map(|r| r.all.iter().cloned())
        .collect();
    for r in cx.cfg.routes.iter_mut() {
        if manifest_routes.contains(&r.name) {
            r.auth = Some(if authed.contains(&r.name) {
                RouteAuth::Required
            } else {
                RouteAuth::None
            });
        }
    }
    let (errors, warnings): (Vec<_>, Vec<_>) = cx
        .problems
        .into_iter()
        .partition(|p| p.severity == crate::config::Severity::Error);
    if !errors.is_empty() {
        let mut all = errors;
        all.extend(warnings);
        return Err(all);
    }
    Ok(Translation {
        config: cx.cfg,
        warnings,
        origins: cx.origins,
    })
}

impl<'a> Cx<'a> {
    fn docs_of(&self, g: &'static str, kind: &'static str) -> impl Iterator<Item = &'a Document> {
        self.docs
            .iter()
            .filter(move |d| d.kind == kind && group(&d.api_version) == g)
    }

    /// Every document is either used, ignored with a warning, or refused.
    fn classify(&mut self) {
        for d in self.docs {
            let g = group(&d.api_version);
            let known = matches!(
                (g, d.kind.as_str()),
                (GATEWAY_API, "Gateway" | "HTTPRoute")
                    | ("", "Secret" | "Service")
                    | ("apps", "Deployment")
                    | (
                        "kuadrant.io",
                        "AuthPolicy" | "TokenRateLimitPolicy" | "RateLimitPolicy"
                    )
                    | ("agentgateway.dev", "AgentgatewayPolicy")
                    | ("gateway.solo.io", "VirtualHostOption" | "RouteOption")
                    | ("ratelimit.solo.io", "RateLimitConfig")
            );
            if known {
                continue;
            }
            let why = match (g, d.kind.as_str()) {
                ("kuadrant.io", "Kuadrant") => {
                    Some("the Kuadrant operator instance: tollgate needs none")
                }
                ("", "Namespace") => Some("namespaces only group resources here"),
                (GATEWAY_API, "GatewayClass") => Some("tollgate is the only gateway class"),
                _ => None,
            };
            match why {
                Some(why) => self
                    .problems
                    .push(d.warning("", format!("ignored: {why}"))),
                None => self.problems.push(d.error(
                    "",
                    format!(
                        "tollgate does not implement `{}` `{}`; remove it, or see the README for the kinds it reads",
                        d.api_version, d.kind
                    ),
                )),
            }
        }
    }

    fn gateways_and_routes(&mut self, backends: &BTreeMap<String, String>, from_base: bool) {
        for d in self.docs_of(GATEWAY_API, "Gateway") {
            match d.field::<GatewaySpec>("spec") {
                Ok(spec) => {
                    for (i, l) in spec.listeners.iter().enumerate() {
                        if !l.protocol.eq_ignore_ascii_case("HTTP") {
                            self.problems.push(d.error(
                                &format!("spec.listeners[{i}].protocol"),
                                format!("`{}` listeners are not supported (HTTP only; put TLS in front)", l.protocol),
                            ));
                        }
                    }
                    self.gateways.push((d, spec));
                }
                Err(p) => self.problems.push(p),
            }
        }
        if !from_base {
            if let Some(port) = self
                .gateways
                .first()
                .and_then(|(_, s)| s.listeners.first())
                .map(|l| l.port)
            {
                self.cfg.listen = format!("127.0.0.1:{port}");
            }
        }
        let mut routes: Vec<(RouteConfig, usize, &'a Document, String)> = Vec::new();
        let mut services_used: BTreeMap<String, (&'a Document, String)> = BTreeMap::new();
        for d in self.docs_of(GATEWAY_API, "HTTPRoute") {
            let spec = match d.field::<HttpRouteSpec>("spec") {
                Ok(s) => s,
                Err(p) => {
                    self.problems.push(p);
                    continue;
                }
            };
            let mut hosts: Vec<String> = spec.hostnames.clone();
            for (pi, pr) in spec.parent_refs.iter().enumerate() {
                let field = format!("spec.parentRefs[{pi}]");
                if pr.kind.as_deref().is_some_and(|k| k != "Gateway") {
                    self.problems
                        .push(d.error(&field, "only Gateway parents are supported"));
                    continue;
                }
                match self.gateways.iter().find(|(g, _)| g.name == pr.name) {
                    None => self.problems.push(d.error(
                        &format!("{field}.name"),
                        format!("no Gateway named `{}` among the manifests", pr.name),
                    )),
                    Some((_, g)) if spec.hostnames.is_empty() => {
                        for l in &g.listeners {
                            if pr.section_name.as_ref().is_none_or(|s| *s == l.name) {
                                if let Some(h) = &l.hostname {
                                    hosts.push(h.clone());
                                }
                            }
                        }
                    }
                    Some(_) => {}
                }
            }
            let multi_rule = spec.rules.len() > 1;
            let mut info = RouteInfo {
                doc: d,
                all: Vec::new(),
                by_rule: BTreeMap::new(),
                spec: HttpRouteSpec {
                    parent_refs: Vec::new(),
                    hostnames: Vec::new(),
                    rules: Vec::new(),
                },
            };
            for (ri, rule) in spec.rules.iter().enumerate() {
                let rfield = format!("spec.rules[{ri}]");
                let rule_key = rule.name.clone().unwrap_or_else(|| ri.to_string());
                if !rule.filters.is_empty() {
                    self.problems.push(d.error(
                        &format!("{rfield}.filters"),
                        "HTTPRoute filters are not supported",
                    ));
                }
                let backend = match rule.backend_refs.as_slice() {
                    [b] => b,
                    [] => {
                        self.problems
                            .push(d.error(&rfield, "a rule needs one backendRef"));
                        continue;
                    }
                    _ => {
                        self.problems.push(d.error(
                            &format!("{rfield}.backendRefs"),
                            "weighted backends are not supported: give one backendRef",
                        ));
                        continue;
                    }
                };
                if backend.kind.as_deref().is_some_and(|k| k != "Service") {
                    self.problems.push(d.error(
                        &format!("{rfield}.backendRefs[0].kind"),
                        "only Service backends are supported",
                    ));
                }
                services_used
                    .entry(backend.name.clone())
                    .or_insert((d, format!("{rfield}.backendRefs[0]")));
                let matches: Vec<Option<&HttpRouteMatch>> = if rule.matches.is_empty() {
                    vec![None]
                } else {
                    rule.matches.iter().map(Some).collect()
                };
                let multi_match = matches.len() > 1;
                for (mi, m) in matches.into_iter().enumerate() {
                    let mfield = format!("{rfield}.matches[{mi}]");
                    let mut name = d.name.clone();
                    if multi_rule {
                        name = format!("{name}.{rule_key}");
                    }
                    if multi_match {
                        name = format!("{name}.m{mi}");
                    }
                    let mut matcher = MatchConfig::default();
                    let mut rank = (2usize, 0usize);
                    if let Some(m) = m {
                        if !m.headers.is_empty() || !m.query_params.is_empty() {
                            self.problems.push(d.error(
                                &mfield,
                                "header and query parameter matches are not supported",
                            ));
                        }
                        matcher.methods = m.method.clone().map(|x| vec![x]);
                        if let Some(p) = &m.path {
                            let value = p.value.clone().unwrap_or_else(|| "/".into());
                            match p.kind.as_deref().unwrap_or("PathPrefix") {
                                "PathPrefix" => {
                                    rank = (1, usize::MAX - value.len());
                                    matcher.path_prefix = Some(value);
                                }
                                "Exact" => {
                                    rank = (0, 0);
                                    matcher.path = Some(value);
                                }
                                other => self.problems.push(d.error(
                                    &format!("{mfield}.path.type"),
                                    format!("`{other}` path matches are not supported (PathPrefix, Exact)"),
                                )),
                            }
                        }
                    }
                    info.all.push(name.clone());
                    info.by_rule
                        .entry(rule_key.clone())
                        .or_default()
                        .push(name.clone());
                    routes.push((
                        RouteConfig {
                            name,
                            hostnames: (!hosts.is_empty()).then(|| hosts.clone()),
                            matcher,
                            backend: backend.name.clone(),
                            auth: None,
                        },
                        rank.0 * 1000 + rank.1.min(999),
                        d,
                        mfield,
                    ));
                }
            }
            info.spec = spec;
            self.routes.push(info);
        }
        // Gateway API precedence: exact paths, then the longest prefix.
        routes.sort_by_key(|(_, rank, _, _)| *rank);
        let mut seen = BTreeSet::new();
        for (rc, _, d, field) in routes {
            if !seen.insert(rc.name.clone()) || self.cfg.routes.iter().any(|r| r.name == rc.name) {
                self.problems.push(d.error(
                    &field,
                    format!(
                        "two routes would be named `{}`; rename one HTTPRoute",
                        rc.name
                    ),
                ));
                continue;
            }
            self.origins.record(
                format!("routes[{}]", self.cfg.routes.len()),
                d.error(&field, ""),
            );
            self.cfg.routes.push(rc);
        }
        for (svc, (d, field)) in services_used {
            if self.cfg.backends.iter().any(|b| b.name == svc) {
                continue;
            }
            match self.backend(&svc, backends) {
                Ok(b) => {
                    self.origins.record(
                        format!("backends[{}]", self.cfg.backends.len()),
                        d.error(&field, ""),
                    );
                    self.cfg.backends.push(b);
                }
                Err(msg) => self.problems.push(d.error(&field, msg)),
            }
        }
    }

    /// A Service as a backend: a URL from the command line, or the tutorial's simulator.
    fn backend(&self, svc: &str, urls: &BTreeMap<String, String>) -> Result<BackendConfig, String> {
        let service = self.docs_of("", "Service").find(|d| d.name == svc);
        let url = urls.get(svc).or_else(|| {
            service.and_then(|s| urls.get(&format!("{}/{svc}", s.namespace_or_default())))
        });
        let mut b = BackendConfig {
            name: svc.to_owned(),
            url: url.cloned(),
            simulator: None,
            api_key_env: None,
            api_key_file: None,
            api_key_header: None,
            headers: BTreeMap::new(),
            forward_client_credentials: false,
            tls: None,
        };
        if b.url.is_some() {
            return Ok(b);
        }
        let Some(service) = service else {
            return Err(format!(
                "no Service named `{svc}` among the manifests; give --backend {svc}=URL"
            ));
        };
        let selector: BTreeMap<String, String> = service
            .value
            .get("spec")
            .and_then(|s| s.get("selector"))
            .and_then(|s| yaml_serde::from_value(s.clone()).ok())
            .unwrap_or_default();
        let sim_model = self.docs_of("apps", "Deployment").find_map(|dep| {
            let tmpl = dep.value.get("spec")?.get("template")?;
            let labels: BTreeMap<String, String> =
                yaml_serde::from_value(tmpl.get("metadata")?.get("labels")?.clone()).ok()?;
            if selector.is_empty() || !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
                return None;
            }
            let containers = tmpl.get("spec")?.get("containers")?.as_sequence()?;
            containers.iter().find_map(|c| {
                let image = c.get("image")?.as_str()?;
                if !image.contains("inference-sim") {
                    return None;
                }
                let args: Vec<&str> = c
                    .get("args")
                    .and_then(|a| a.as_sequence())
                    .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
                    .unwrap_or_default();
                let model = args
                    .iter()
                    .position(|a| *a == "--model")
                    .and_then(|i| args.get(i + 1))
                    .map(|m| (*m).to_owned())
                    .unwrap_or_else(|| "meta-llama/Llama-3.1-8B-Instruct".into());
                Some(model)
            })
        });
        match sim_model {
            Some(model) => {
                b.simulator = Some(SimulatorConfig {
                    model,
                    latency_ms: 0,
                    ms_per_token: 0,
                });
                Ok(b)
            }
            None => Err(format!(
                "Service `{svc}` has no URL here: give --backend {svc}=URL"
            )),
        }
    }

    /// Native routes a target reference covers, or None for the whole gateway; with the
    /// Kuadrant specificity level (Gateway 0, listener 1, HTTPRoute 2, rule 3).
    fn target(&mut self, d: &Document, field: &str, t: &TargetRef) -> Option<(TargetConfig, u8)> {
        if t.group.as_deref().is_some_and(|g| g != GATEWAY_API) {
            self.problems.push(d.error(
                &format!("{field}.group"),
                "targets are Gateway API resources",
            ));
            return None;
        }
        match t.kind.as_str() {
            "Gateway" => {
                let Some((_, g)) = self.gateways.iter().find(|(g, _)| g.name == t.name) else {
                    self.problems.push(d.error(
                        &format!("{field}.name"),
                        format!("no Gateway named `{}` among the manifests", t.name),
                    ));
                    return None;
                };
                if let Some(s) = &t.section_name {
                    if !g.listeners.iter().any(|l| l.name == *s) {
                        self.problems.push(d.error(
                            &format!("{field}.sectionName"),
                            format!("Gateway `{}` has no listener `{s}`", t.name),
                        ));
                        return None;
                    }
                }
                // The routes attached to this Gateway (and listener): not `gateway`, which
                // would also cover native routes and other Gateways' routes.
                let routes: Vec<String> = self
                    .routes
                    .iter()
                    .filter(|r| {
                        r.spec.parent_refs.iter().any(|p| {
                            p.name == t.name
                                && match (&t.section_name, &p.section_name) {
                                    (Some(s), Some(x)) => s == x,
                                    _ => true,
                                }
                        })
                    })
                    .flat_map(|r| r.all.iter().cloned())
                    .collect();
                let level = if t.section_name.is_some() { 1 } else { 0 };
                Some((TargetConfig::Routes { routes }, level))
            }
            "HTTPRoute" => {
                let Some(r) = self.routes.iter().find(|r| r.doc.name == t.name) else {
                    self.problems.push(d.error(
                        &format!("{field}.name"),
                        format!("no HTTPRoute named `{}` among the manifests", t.name),
                    ));
                    return None;
                };
                match &t.section_name {
                    None => Some((
                        TargetConfig::Routes {
                            routes: r.all.clone(),
                        },
                        2,
                    )),
                    Some(s) => match r.by_rule.get(s) {
                        Some(routes) => Some((
                            TargetConfig::Routes {
                                routes: routes.clone(),
                            },
                            3,
                        )),
                        None => {
                            self.problems.push(d.error(
                                &format!("{field}.sectionName"),
                                format!("HTTPRoute `{}` has no rule named `{s}`", t.name),
                            ));
                            None
                        }
                    },
                }
            }
            other => {
                self.problems.push(d.error(
                    &format!("{field}.kind"),
                    format!("cannot target `{other}`: Gateway or HTTPRoute"),
                ));
                None
            }
        }
    }

    fn all_routes(&self) -> Vec<String> {
        self.routes
            .iter()
            .flat_map(|r| r.all.iter().cloned())
            .collect()
    }

    fn cover(&mut self, t: &TargetConfig) {
        let routes = match t {
            TargetConfig::Named(_) => self.all_routes(),
            TargetConfig::Route { route } => vec![route.clone()],
            TargetConfig::Routes { routes } => routes.clone(),
        };
        self.authed.extend(routes);
    }

    fn auth(&mut self) {
        let policies: Vec<&Document> = self.docs_of("kuadrant.io", "AuthPolicy").collect();
        if policies.len() > 1 {
            for d in &policies[1..] {
                self.problems.push(d.error(
                    "",
                    "one AuthPolicy per tollgate: its keys and rules apply to every route it covers",
                ));
            }
        }
        if let Some(d) = policies.first() {
            self.auth_policy(d);
        }
        for d in self
            .docs_of("gateway.solo.io", "VirtualHostOption")
            .collect::<Vec<_>>()
        {
            let spec = match d.field::<GlooOptionSpec<VirtualHostOptions>>("spec") {
                Ok(s) => s,
                Err(p) => {
                    self.problems.push(p);
                    continue;
                }
            };
            for (i, t) in spec.target_refs.iter().enumerate() {
                if let Some((t, _)) = self.target(d, &format!("spec.targetRefs[{i}]"), t) {
                    self.cover(&t);
                }
            }
            let Some(jwt) = spec.options.jwt else {
                continue;
            };
            let auth = self.cfg.auth.get_or_insert_with(empty_auth);
            let j = auth.jwt.get_or_insert_with(|| JwtConfig {
                providers: Vec::new(),
                cache: Default::default(),
            });
            for (name, p) in jwt.providers {
                let field = format!("spec.options.jwt.providers.{name}");
                let Some(issuer) = p.issuer else {
                    self.problems.push(d.error(
                        &field,
                        "tollgate needs the provider's `issuer` to pick it for a token",
                    ));
                    continue;
                };
                self.origins.record(
                    format!("auth.jwt.providers[{}]", j.providers.len()),
                    d.error(&field, ""),
                );
                j.providers.push(JwtProviderConfig {
                    name,
                    issuer,
                    audiences: p.audiences,
                    public_key_pem: Some(p.jwks.local.key),
                    jwks_file: None,
                    jwks_url: None,
                    hs256_secret_env: None,
                    hs256_secret_file: None,
                    require_exp: false,
                    leeway: None,
                    jwks_refresh: None,
                    identity: BTreeMap::new(),
                });
            }
        }
    }

    fn auth_policy(&mut self, d: &Document) {
        let spec = match d.field::<AuthPolicySpec>("spec") {
            Ok(s) => s,
            Err(p) => {
                self.problems.push(p);
                return;
            }
        };
        if !spec.when.is_empty() {
            self.problems
                .push(d.error("spec.when", "AuthPolicy `when` is not supported"));
        }
        if let Some((t, _)) = self.target(d, "spec.targetRef", &spec.target_ref) {
            self.cover(&t);
        }
        let rules = spec.rules.unwrap_or_default();
        let filters = rules
            .response
            .and_then(|r| r.success)
            .map(|s| s.filters)
            .unwrap_or_default();
        let mut identity_props = BTreeMap::new();
        for (fname, f) in filters {
            if fname != "identity" {
                self.problems.push(d.error(
                    &format!("spec.rules.response.success.filters.{fname}"),
                    "only the `identity` filter is supported (it extends `auth.identity`)",
                ));
                continue;
            }
            identity_props = f.json.properties;
        }
        let secrets: Vec<&Document> = self.docs_of("", "Secret").collect();
        let mut prefixes: Vec<String> = Vec::new();
        let mut keys: Vec<ApiKeyConfig> = Vec::new();
        let mut seen = BTreeSet::new();
        for (rname, rule) in &rules.authentication {
            let field = format!("spec.rules.authentication.{rname}");
            let prefix = rule
                .credentials
                .as_ref()
                .and_then(|c| c.authorization_header.as_ref())
                .and_then(|h| h.prefix.clone())
                .unwrap_or_else(|| "Bearer".into());
            if !prefixes.contains(&prefix) {
                prefixes.push(prefix);
            }
            let sel = &rule.api_key.selector.match_labels;
            let mut matched = 0;
            for s in &secrets {
                if !sel.iter().all(|(k, v)| s.labels.get(k) == Some(v)) {
                    continue;
                }
                let Some(key) = secret_key(s) else {
                    self.problems.push(s.warning(
                        "stringData",
                        "matches an AuthPolicy selector but holds no `api_key`",
                    ));
                    continue;
                };
                matched += 1;
                let digest = hex::encode(crate::auth::digest(&key));
                if !seen.insert(digest.clone()) {
                    continue;
                }
                let mut identity = json!({
                    "metadata": {
                        "name": s.name,
                        "namespace": s.namespace_or_default(),
                        "labels": s.labels,
                        "annotations": s.annotations,
                    }
                });
                let root = json!({ "auth": { "identity": identity.clone() } });
                if let Value::Object(id) = &mut identity {
                    for (pname, prop) in &identity_props {
                        let v = match (&prop.selector, &prop.value) {
                            (Some(sel), _) => select(&root, sel),
                            (None, Some(v)) => v.clone(),
                            (None, None) => Value::Null,
                        };
                        id.insert(pname.clone(), v);
                    }
                }
                keys.push(ApiKeyConfig {
                    key: None,
                    key_env: None,
                    key_file: None,
                    sha256: Some(digest),
                    identity: match identity {
                        Value::Object(m) => m,
                        _ => serde_json::Map::new(),
                    },
                });
            }
            if matched == 0 {
                self.problems.push(d.warning(
                    &format!("{field}.apiKey.selector"),
                    "no Secret among the manifests matches this selector: no key will be accepted",
                ));
            }
        }
        let auth = self.cfg.auth.get_or_insert_with(empty_auth);
        let ak = auth.api_keys.get_or_insert_with(|| ApiKeysConfig {
            prefixes: Vec::new(),
            keys: Vec::new(),
        });
        for p in prefixes {
            if !ak.prefixes.iter().any(|x| x.eq_ignore_ascii_case(&p)) {
                ak.prefixes.push(p);
            }
        }
        ak.keys.extend(keys);
        for (name, rule) in rules.authorization {
            self.origins.record(
                format!("auth.opa[{}]", auth.opa.len()),
                d.error(&format!("spec.rules.authorization.{name}.opa.rego"), ""),
            );
            if rule.opa.all_values {
                self.problems.push(d.warning(
                    &format!("spec.rules.authorization.{name}.opa.allValues"),
                    "allValues only changes what Authorino exports; ignored",
                ));
            }
            auth.opa.push(OpaRuleConfig {
                name,
                rego: rule.opa.rego,
            });
        }
    }

    fn push_policy(&mut self, p: PolicyConfig, d: &Document, field: &str) -> bool {
        if self.cfg.policies.iter().any(|x| x.name == p.name) {
            self.problems.push(d.error(
                "metadata.name",
                format!("two policies would be named `{}`; rename one", p.name),
            ));
            return false;
        }
        self.origins.record(
            format!("policies[{}]", self.cfg.policies.len()),
            d.error(field, ""),
        );
        self.cfg.policies.push(p);
        true
    }

    fn kuadrant_limits(&mut self) {
        // (specificity level, policy, its document, native path → manifest path)
        type Pending<'d> = (u8, PolicyConfig, &'d Document, Vec<(String, String)>);
        let mut out: Vec<Pending> = Vec::new();
        let docs: Vec<&Document> = self
            .docs_of("kuadrant.io", "TokenRateLimitPolicy")
            .chain(self.docs_of("kuadrant.io", "RateLimitPolicy"))
            .collect();
        for d in docs {
            let spec = match d.field::<KuadrantRateLimitSpec>("spec") {
                Ok(s) => s,
                Err(p) => {
                    self.problems.push(p);
                    continue;
                }
            };
            let Some((target, level)) = self.target(d, "spec.targetRef", &spec.target_ref) else {
                continue;
            };
            let kind = if d.kind == "TokenRateLimitPolicy" {
                PolicyKindConfig::TokenRateLimitPolicy
            } else {
                PolicyKindConfig::RateLimitPolicy
            };
            let bare = !spec.limits.is_empty();
            let given = [bare, spec.defaults.is_some(), spec.overrides.is_some()]
                .iter()
                .filter(|x| **x)
                .count();
            if given > 1 {
                self.problems.push(d.error(
                    "spec",
                    "give one of `limits`, `defaults` and `overrides` (Kuadrant refuses mixing them)",
                ));
                continue;
            }
            // Native path → manifest path, for relocating CEL problems.
            let mut paths = Vec::new();
            let blocks = match (spec.defaults, spec.overrides) {
                (_, Some(o)) => composed_block(d, o, "spec.overrides", "overrides", &mut paths)
                    .map(|o| (None, Some(o))),
                (Some(df), None) => composed_block(d, df, "spec.defaults", "defaults", &mut paths)
                    .map(|df| (Some(df), None)),
                // Bare limits are Kuadrant's implicit, atomic defaults.
                (None, None) => {
                    let bare = KuadrantMergeable {
                        strategy: None,
                        when: Vec::new(),
                        limits: spec.limits,
                    };
                    composed_block(d, bare, "spec", "defaults", &mut paths)
                        .map(|df| (Some(df), None))
                }
            };
            let (defaults, overrides) = match blocks {
                Ok(b) => b,
                Err(p) => {
                    self.problems.push(p);
                    continue;
                }
            };
            for i in 0..spec.when.len() {
                paths.push((format!("when[{i}]"), format!("spec.when[{i}].predicate")));
            }
            let p = PolicyConfig {
                name: d.name.clone(),
                kind,
                target,
                mode: Default::default(),
                accounting: Default::default(),
                cost: None,
                default_max_tokens: None,
                stream_cutoff: false,
                prompt_estimate: Default::default(),
                phase: Default::default(),
                scope: Default::default(),
                when: spec.when.into_iter().map(|p| p.predicate).collect(),
                limits: BTreeMap::new(),
                defaults,
                overrides,
            };
            out.push((level, p, d, paths));
        }
        // Least specific first: that order is the composition order.
        out.sort_by_key(|(level, _, _, _)| *level);
        for (_, p, d, paths) in out {
            let at = self.cfg.policies.len();
            if self.push_policy(p, d, "spec") {
                for (n, m) in paths {
                    self.origins
                        .record(format!("policies[{at}].{n}"), d.error(&m, ""));
                }
            }
        }
    }

    /// agentgateway `local` limits are per replica there; here they get the default
    /// `scope: shared` (one budget across replicas on Redis), printed by `convert` so an
    /// operator can choose `replica` (the README's differences list says why).
    fn agentgateway(&mut self) {
        for d in self
            .docs_of("agentgateway.dev", "AgentgatewayPolicy")
            .collect::<Vec<_>>()
        {
            let spec = match d.field::<AgentgatewayPolicySpec>("spec") {
                Ok(s) => s,
                Err(p) => {
                    self.problems.push(p);
                    continue;
                }
            };
            let Some(target) = self.targets(d, &spec.target_refs) else {
                continue;
            };
            let local = spec
                .traffic
                .and_then(|t| t.rate_limit)
                .map(|r| r.local)
                .unwrap_or_default();
            let mut tokens = BTreeMap::new();
            let mut requests = BTreeMap::new();
            for (i, l) in local.into_iter().enumerate() {
                let field = format!("spec.traffic.rateLimit.local[{i}]");
                let window = match l.unit.as_str() {
                    "Seconds" => "1s",
                    "Minutes" => "1m",
                    "Hours" => "1h",
                    other => {
                        self.problems.push(d.error(
                            &format!("{field}.unit"),
                            format!("unknown unit `{other}` (Seconds, Minutes, Hours)"),
                        ));
                        continue;
                    }
                };
                let window = match crate::config::duration::parse(window) {
                    Ok(w) => ConfigDuration(w),
                    Err(_) => continue,
                };
                let (limit, burst, into) = match (l.tokens, l.requests) {
                    (Some(t), None) => {
                        if l.burst.is_some() {
                            self.problems.push(d.error(
                                &format!("{field}.burst"),
                                "burst on token limits is not supported",
                            ));
                        }
                        (t, None, &mut tokens)
                    }
                    (None, Some(r)) => (r, l.burst, &mut requests),
                    _ => {
                        self.problems
                            .push(d.error(&field, "give exactly one of `tokens` and `requests`"));
                        continue;
                    }
                };
                into.insert(
                    format!("local-{i}"),
                    LimitConfig {
                        rates: vec![RateConfig {
                            limit,
                            window,
                            burst,
                        }],
                        when: Vec::new(),
                        counters: Vec::new(),
                        on_error: Default::default(),
                        anchor: Default::default(),
                        max_in_flight: None,
                    },
                );
            }
            let both = !tokens.is_empty() && !requests.is_empty();
            for (kind, limits, suffix) in [
                (PolicyKindConfig::TokenRateLimitPolicy, tokens, ".tokens"),
                (PolicyKindConfig::RateLimitPolicy, requests, ".requests"),
            ] {
                if limits.is_empty() {
                    continue;
                }
                let name = if both {
                    format!("{}{suffix}", d.name)
                } else {
                    d.name.clone()
                };
                let p = independent(name, kind, target.clone(), limits);
                let at = format!("policies[{}]", self.cfg.policies.len());
                if self.push_policy(p, d, "spec.traffic.rateLimit.local") {
                    self.origins.shared_budget(at);
                }
            }
        }
    }

    /// Several `targetRefs` as one native target (the gateway if any names it).
    fn targets(&mut self, d: &Document, refs: &[TargetRef]) -> Option<TargetConfig> {
        let mut routes = Vec::new();
        for (i, t) in refs.iter().enumerate() {
            match self.target(d, &format!("spec.targetRefs[{i}]"), t)? {
                (TargetConfig::Named(n), _) => return Some(TargetConfig::Named(n)),
                (TargetConfig::Routes { routes: rs }, _) => routes.extend(rs),
                (TargetConfig::Route { route }, _) => routes.push(route),
            }
        }
        Some(TargetConfig::Routes { routes })
    }

    fn gloo_rate_limits(&mut self) {
        // RateLimitConfig name → routes its RouteOptions attach it to.
        let mut attached: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for d in self
            .docs_of("gateway.solo.io", "RouteOption")
            .collect::<Vec<_>>()
        {
            let spec = match d.field::<GlooOptionSpec<RouteOptions>>("spec") {
                Ok(s) => s,
                Err(p) => {
                    self.problems.push(p);
                    continue;
                }
            };
            let routes = match self.targets(d, &spec.target_refs) {
                Some(TargetConfig::Routes { routes }) => routes,
                Some(_) => self.all_routes(),
                None => continue,
            };
            for (i, r) in spec
                .options
                .rate_limit_configs
                .map(|c| c.refs)
                .unwrap_or_default()
                .into_iter()
                .enumerate()
            {
                if !self
                    .docs_of("ratelimit.solo.io", "RateLimitConfig")
                    .any(|x| x.name == r.name)
                {
                    self.problems.push(d.error(
                        &format!("spec.options.rateLimitConfigs.refs[{i}]"),
                        format!("no RateLimitConfig named `{}` among the manifests", r.name),
                    ));
                }
                let e = attached.entry(r.name).or_default();
                for rt in &routes {
                    if !e.contains(rt) {
                        e.push(rt.clone());
                    }
                }
            }
        }
        for d in self
            .docs_of("ratelimit.solo.io", "RateLimitConfig")
            .collect::<Vec<_>>()
        {
            let spec = match d.field::<RateLimitConfigSpec>("spec") {
                Ok(s) => s,
                Err(p) => {
                    self.problems.push(p);
                    continue;
                }
            };
            let Some(routes) = attached.get(&d.name).cloned() else {
                self.problems
                    .push(d.warning("", "ignored: no RouteOption attaches this RateLimitConfig"));
                continue;
            };
            let mut limits = BTreeMap::new();
            for (ai, rl) in spec.raw.rate_limits.iter().enumerate() {
                let field = format!("spec.raw.rateLimits[{ai}]");
                match self.descriptor_limit(d, &field, &spec.raw.descriptors, &rl.actions) {
                    Some((name, lc)) => {
                        let name = if limits.contains_key(&name) {
                            format!("{name}.{ai}")
                        } else {
                            name
                        };
                        limits.insert(name, lc);
                    }
                    None => continue,
                }
            }
            // On AI routes Gloo counts these limits in tokens; every tollgate route is one.
            let p = independent(
                d.name.clone(),
                PolicyKindConfig::TokenRateLimitPolicy,
                TargetConfig::Routes { routes },
                limits,
            );
            self.push_policy(p, d, "spec.raw");
        }
    }

    /// The limit one `actions` list selects: its descriptor chain matched against the
    /// descriptor tree; dynamic values become counters.
    fn descriptor_limit(
        &mut self,
        d: &Document,
        field: &str,
        tree: &[Descriptor],
        actions: &[Action],
    ) -> Option<(String, LimitConfig)> {
        let mut level = tree;
        let mut names = Vec::new();
        let mut counters = Vec::new();
        let mut when = Vec::new();
        let mut rate = None;
        for (i, a) in actions.iter().enumerate() {
            let afield = format!("{field}.actions[{i}]");
            let (key, value) = self.action(d, &afield, a)?;
            let found = match &value {
                ActionValue::Const(v) => level
                    .iter()
                    .find(|x| x.key == key && x.value.as_deref() == Some(v.as_str()))
                    .or_else(|| level.iter().find(|x| x.key == key && x.value.is_none())),
                ActionValue::Dynamic(_, _) => {
                    if level.iter().any(|x| x.key == key && x.value.is_some()) {
                        self.problems.push(d.error(
                            &afield,
                            format!("descriptors with a `value` for the dynamic key `{key}` are not supported"),
                        ));
                        return None;
                    }
                    level.iter().find(|x| x.key == key)
                }
            };
            let Some(desc) = found else {
                self.problems.push(d.warning(
                    &afield,
                    format!("no descriptor `{key}` at this depth: these actions limit nothing"),
                ));
                return None;
            };
            names.push(key.clone());
            if let ActionValue::Dynamic(expr, guard) = value {
                counters.push(expr);
                when.extend(guard);
            }
            rate = desc.rate_limit.as_ref();
            level = &desc.descriptors;
        }
        let Some(rate) = rate else {
            self.problems.push(d.warning(
                field,
                "the descriptor these actions reach has no rateLimit: they limit nothing",
            ));
            return None;
        };
        let window = match rate.unit.as_str() {
            "SECOND" => "1s",
            "MINUTE" => "1m",
            "HOUR" => "1h",
            "DAY" => "1d",
            other => {
                self.problems.push(d.error(
                    field,
                    format!("unknown unit `{other}` (SECOND, MINUTE, HOUR, DAY)"),
                ));
                return None;
            }
        };
        let window = ConfigDuration(crate::config::duration::parse(window).ok()?);
        Some((
            names.join("."),
            LimitConfig {
                rates: vec![RateConfig {
                    limit: rate.requests_per_unit,
                    window,
                    burst: None,
                }],
                when,
                counters,
                on_error: Default::default(),
                anchor: Default::default(),
                max_in_flight: None,
            },
        ))
    }

    fn action(&mut self, d: &Document, field: &str, a: &Action) -> Option<(String, ActionValue)> {
        if let Some(m) = &a.metadata {
            if m.source.as_deref().is_some_and(|s| s != "DYNAMIC") {
                self.problems.push(d.error(
                    &format!("{field}.metadata.source"),
                    "only DYNAMIC metadata is supported",
                ));
                return None;
            }
            let path: Vec<&str> = m.metadata_key.path.iter().map(|p| p.key.as_str()).collect();
            let claims = match (m.metadata_key.key.as_str(), path.split_first()) {
                ("envoy.filters.http.jwt_authn", Some((_, rest))) if !rest.is_empty() => rest,
                _ => {
                    self.problems.push(d.error(
                        &format!("{field}.metadata.metadataKey"),
                        "only JWT claims (key envoy.filters.http.jwt_authn, path <provider payload>, <claim>…) are supported",
                    ));
                    return None;
                }
            };
            let attr = format!("auth.identity.{}", claims.join("."));
            let expr = match &m.default {
                Some(dflt) => format!(
                    "has({attr}) ? string({attr}) : {}",
                    serde_json::to_string(dflt).unwrap_or_else(|_| "\"\"".into())
                ),
                None => format!("string({attr})"),
            };
            return Some((m.descriptor_key.clone(), ActionValue::Dynamic(expr, None)));
        }
        if let Some(g) = &a.generic_key {
            return Some((
                g.descriptor_key
                    .clone()
                    .unwrap_or_else(|| "generic_key".into()),
                ActionValue::Const(g.descriptor_value.clone()),
            ));
        }
        if let Some(h) = &a.request_headers {
            let name = serde_json::to_string(&h.header_name.to_ascii_lowercase())
                .unwrap_or_else(|_| "\"\"".into());
            let guard = h
                .skip_if_absent
                .then(|| format!("{name} in request.headers"));
            return Some((
                h.descriptor_key.clone(),
                ActionValue::Dynamic(format!("request.headers[{name}]"), guard),
            ));
        }
        if a.remote_address.is_some() {
            return Some((
                "remote_address".into(),
                ActionValue::Dynamic("source.address".into(), None),
            ));
        }
        self.problems.push(d.error(
            field,
            "give one action: metadata, genericKey, requestHeaders or remoteAddress",
        ));
        None
    }
}

/// A Kuadrant `defaults`/`overrides` block (or bare `limits`) as native composed limits,
/// recording where each predicate and counter came from.
fn composed_block(
    d: &Document,
    block: KuadrantMergeable,
    mfield: &str,
    nfield: &str,
    paths: &mut Vec<(String, String)>,
) -> Result<ComposedLimitsConfig, Problem> {
    let strategy = match block.strategy.as_deref() {
        None | Some("atomic") => StrategyConfig::Atomic,
        Some("merge") => StrategyConfig::Merge,
        Some(other) => {
            return Err(d.error(
                &format!("{mfield}.strategy"),
                format!("unknown strategy `{other}` (atomic, merge)"),
            ))
        }
    };
    for i in 0..block.when.len() {
        paths.push((
            format!("{nfield}.when[{i}]"),
            format!("{mfield}.when[{i}].predicate"),
        ));
    }
    let mut limits = BTreeMap::new();
    for (name, l) in block.limits {
        let lf = format!("{mfield}.limits.{name}");
        let nf = format!("{nfield}.limits.{name}");
        paths.push((nf.clone(), lf.clone()));
        for i in 0..l.when.len() {
            paths.push((
                format!("{nf}.when[{i}]"),
                format!("{lf}.when[{i}].predicate"),
            ));
        }
        for i in 0..l.counters.len() {
            paths.push((
                format!("{nf}.counters[{i}]"),
                format!("{lf}.counters[{i}].expression"),
            ));
        }
        let rates = l
            .rates
            .into_iter()
            .map(|r| RateConfig {
                limit: r.limit,
                window: r.window,
                burst: None,
            })
            .collect();
        limits.insert(
            name,
            LimitConfig {
                rates,
                when: l.when.into_iter().map(|p| p.predicate).collect(),
                counters: l.counters.into_iter().map(|c| c.expression).collect(),
                on_error: Default::default(),
                anchor: Default::default(),
                max_in_flight: None,
            },
        );
    }
    Ok(ComposedLimitsConfig {
        strategy,
        when: block.when.into_iter().map(|p| p.predicate).collect(),
        limits,
    })
}

enum ActionValue {
    Const(String),
    /// CEL for the value, and a predicate that must hold for the descriptor to exist.
    Dynamic(String, Option<String>),
}

fn independent(
    name: String,
    kind: PolicyKindConfig,
    target: TargetConfig,
    limits: BTreeMap<String, LimitConfig>,
) -> PolicyConfig {
    PolicyConfig {
        name,
        kind,
        target,
        mode: Default::default(),
        accounting: Default::default(),
        cost: None,
        default_max_tokens: None,
        stream_cutoff: false,
        prompt_estimate: Default::default(),
        phase: Default::default(),
        scope: Default::default(),
        when: Vec::new(),
        limits,
        defaults: None,
        overrides: None,
    }
}

fn empty_auth() -> AuthConfig {
    AuthConfig {
        api_keys: None,
        jwt: None,
        authorization: Vec::new(),
        opa: Vec::new(),
    }
}

/// `stringData.api_key`, or `data.api_key` (base64).
fn secret_key(s: &Document) -> Option<String> {
    if let Some(k) = s
        .value
        .get("stringData")
        .and_then(|d| d.get("api_key"))
        .and_then(|v| v.as_str())
    {
        return Some(k.to_owned());
    }
    let b64 = s.value.get("data")?.get("api_key")?.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// Authorino's selector: a dotted path where `\.` is a literal dot.
fn select(root: &Value, selector: &str) -> Value {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = selector.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'.') => {
                cur.push('.');
                chars.next();
            }
            '.' => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    parts.push(cur);
    let mut v = root;
    for p in parts {
        match v.get(p.as_str()) {
            Some(x) => v = x,
            None => return Value::Null,
        }
    }
    v.clone()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn translate_text(text: &str) -> Result<Translation, Vec<Problem>> {
        let mut docs = Vec::new();
        let mut problems = Vec::new();
        super::super::parse_file(
            std::path::Path::new("t.yaml"),
            text,
            &mut docs,
            &mut problems,
        );
        assert!(problems.is_empty(), "{problems:?}");
        let backends = BTreeMap::from([("up".to_owned(), "http://127.0.0.1:9".to_owned())]);
        translate(&docs, None, &backends)
    }

    const BASE: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: { name: gw }\nspec: { gatewayClassName: x, listeners: [{ name: http, protocol: HTTP, port: 8080 }] }\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: { name: r }\nspec: { parentRefs: [{ name: gw }], rules: [{ backendRefs: [{ name: up }] }] }\n---\napiVersion: gateway.solo.io/v1\nkind: RouteOption\nmetadata: { name: ro }\nspec: { targetRefs: [{ group: gateway.networking.k8s.io, kind: HTTPRoute, name: r }], options: { rateLimitConfigs: { refs: [{ name: rlc }] } } }\n---\n";

    #[test]
    fn gloo_descriptors_nested_generic_and_headers() {
        let rlc = r#"apiVersion: ratelimit.solo.io/v1alpha1
kind: RateLimitConfig
metadata: { name: rlc }
spec:
  raw:
    descriptors:
    - key: generic_key
      value: llm
      descriptors:
      - key: org
        rateLimit: { requestsPerUnit: 7, unit: HOUR }
    - key: generic_key
      value: other
      rateLimit: { requestsPerUnit: 1, unit: SECOND }
    rateLimits:
    - actions:
      - genericKey: { descriptorValue: llm }
      - requestHeaders: { headerName: X-Org, descriptorKey: org, skipIfAbsent: true }
"#;
        let t = translate_text(&format!("{BASE}{rlc}")).unwrap();
        let p = &t.config.policies[0];
        assert_eq!(p.kind, PolicyKindConfig::TokenRateLimitPolicy);
        assert_eq!(
            p.target,
            TargetConfig::Routes {
                routes: vec!["r".into()]
            }
        );
        let l = &p.limits["generic_key.org"];
        assert_eq!(l.rates[0].limit, 7);
        assert_eq!(l.rates[0].window.as_millis_u64(), 3_600_000);
        assert_eq!(l.counters, vec![r#"request.headers["x-org"]"#.to_owned()]);
        assert_eq!(l.when, vec![r#""x-org" in request.headers"#.to_owned()]);
    }

    #[test]
    fn gloo_unsupported_metadata_is_refused_with_its_field() {
        let rlc = "apiVersion: ratelimit.solo.io/v1alpha1\nkind: RateLimitConfig\nmetadata: { name: rlc }\nspec:\n  raw:\n    descriptors: [{ key: k, rateLimit: { requestsPerUnit: 1, unit: MINUTE } }]\n    rateLimits:\n    - actions:\n      - metadata: { descriptorKey: k, metadataKey: { key: envoy.lb, path: [{ key: x }] } }\n";
        let errs = translate_text(&format!("{BASE}{rlc}")).err().unwrap();
        assert!(
            errs[0]
                .path
                .ends_with("spec.raw.rateLimits[0].actions[0].metadata.metadataKey"),
            "{errs:?}"
        );
    }

    #[test]
    fn listener_section_name_targets_that_listeners_routes() {
        let text = r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: { name: gw }
spec:
  listeners:
  - { name: public, protocol: HTTP, port: 8080, hostname: a.example }
  - { name: internal, protocol: HTTP, port: 8080, hostname: b.example }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: r1 }
spec: { parentRefs: [{ name: gw, sectionName: public }], rules: [{ backendRefs: [{ name: up }] }] }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: r2 }
spec: { parentRefs: [{ name: gw, sectionName: internal }], rules: [{ backendRefs: [{ name: up }] }] }
---
apiVersion: kuadrant.io/v1
kind: RateLimitPolicy
metadata: { name: on-route }
spec:
  targetRef: { group: gateway.networking.k8s.io, kind: HTTPRoute, name: r1 }
  limits: { l: { rates: [{ limit: 1, window: 1m }] } }
---
apiVersion: kuadrant.io/v1
kind: RateLimitPolicy
metadata: { name: on-listener }
spec:
  targetRef: { group: gateway.networking.k8s.io, kind: Gateway, name: gw, sectionName: public }
  limits: { l: { rates: [{ limit: 1, window: 1m }] } }
"#;
        let t = translate_text(text).unwrap();
        // Hostnames come from each route's listener.
        let host = |r: &str| {
            t.config
                .routes
                .iter()
                .find(|x| x.name == r)
                .and_then(|x| x.hostnames.clone())
        };
        assert_eq!(host("r1"), Some(vec!["a.example".to_owned()]));
        assert_eq!(host("r2"), Some(vec!["b.example".to_owned()]));
        // The listener's policy covers r1 only and comes first: less specific than the
        // route's, whatever the document order.
        let names: Vec<&str> = t.config.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["on-listener", "on-route"]);
        assert_eq!(
            t.config.policies[0].target,
            TargetConfig::Routes {
                routes: vec!["r1".into()]
            }
        );
        assert!(t.config.policies[0].defaults.is_some());
    }

    #[test]
    fn selectors_read_escaped_dots() {
        let root = json!({"auth": {"identity": {"metadata": {"annotations": {"kuadrant.io/groups": "free"}}}}});
        assert_eq!(
            select(
                &root,
                r"auth.identity.metadata.annotations.kuadrant\.io/groups"
            ),
            json!("free")
        );
        assert_eq!(select(&root, "auth.identity.nope"), Value::Null);
    }
}
