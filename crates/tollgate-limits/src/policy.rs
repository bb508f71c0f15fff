//! Compiled policies and the one function that turns a request into counter operations.
//!
//! A policy (token or request) targets the gateway or named routes and holds named
//! limits. For one request, every policy covering the route applies; within it, every
//! limit whose `when` predicates all hold; each of the limit's rates is its own counter,
//! keyed by (policy, limit, window length, counter values). [`plan`] produces the
//! [`CounterOp`]s for the store's atomic admission, and [`cost`] the real charge later.

use std::sync::Arc;

use crate::cel::{self, Attrs, Expr};
use crate::counter::{CounterId, CounterKind, CounterOp, Need, Rate};
use crate::window::Window;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// TokenRateLimitPolicy: counts tokens, applies to LLM calls only.
    Tokens,
    /// RateLimitPolicy: counts requests, applies to every request it matches.
    Requests,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Gateway,
    Routes(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    /// Evaluated and counted; a would-be refusal is logged and measured, not enforced.
    Shadow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accounting {
    /// Charge after the call; admit while the budget has anything left.
    After,
    /// Reserve an estimate at admission; settle to the real cost.
    Reserve,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// The limit does not apply to this request.
    Skip,
    /// The request is refused (429).
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    Epoch,
    Staggered,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSpec {
    pub limit: u64,
    pub window_ms: u64,
    /// Request rates only: token bucket of `limit + burst`, refilled at `limit`/window.
    pub burst: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct CompiledLimit {
    pub name: Arc<str>,
    pub rates: Vec<RateSpec>,
    pub when: Vec<Expr>,
    pub counters: Vec<Expr>,
    pub on_error: OnError,
    pub anchor: Anchor,
    pub max_in_flight: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub name: Arc<str>,
    pub kind: PolicyKind,
    pub target: Target,
    pub mode: Mode,
    pub accounting: Accounting,
    /// Cost of a call in tokens; `None` = `usage.total_tokens`.
    pub cost: Option<Expr>,
    /// Output tokens assumed for a reservation when the request sets no cap.
    pub default_output_tokens: u64,
    /// End a stream cleanly when its cost would pass what its counters have left.
    pub stream_cutoff: bool,
    /// Count prompt tokens with the exact BPE tokenizer instead of the fast estimate.
    pub exact_prompt: bool,
    /// Admitted before authentication (request policies only).
    pub pre_auth: bool,
    /// `scope: replica`: counters live in this process even when the store is shared.
    pub replica: bool,
    pub limits: Vec<CompiledLimit>,
}

impl CompiledPolicy {
    pub fn covers_route(&self, route: &str) -> bool {
        match &self.target {
            Target::Gateway => true,
            Target::Routes(routes) => routes.iter().any(|r| r == route),
        }
    }
}

/// Whether a composed policy's limits are defaults (a more specific policy replaces
/// them) or overrides (they win over more specific policies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Defaults,
    Overrides,
}

/// How a composed policy's limits meet those of others of the same kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Taken whole: the winning policy's set replaces the others'.
    Atomic,
    /// Merged by limit name; on a clash the winning policy's limit is kept.
    Merge,
}

/// A policy that takes part in Kuadrant-style composition.
#[derive(Debug, Clone)]
pub struct ComposedPolicy {
    pub policy: CompiledPolicy,
    pub role: Role,
    pub strategy: Strategy,
}

/// Resolve composition into plain policies, per route and per kind (token and request
/// policies never compose with each other), as Kuadrant does:
///
/// - policies covering a route are ordered least specific first: gateway-wide ones, then
///   route ones, each in config order (a later policy is the more specific);
/// - `defaults` apply from least to most specific, so the most specific wins;
/// - `overrides` then apply from most to least specific, so the least specific wins;
/// - `atomic` replaces the whole set, `merge` replaces limits of the same name and adds
///   the others.
///
/// Each resulting policy keeps its origin's name and limit names, so a limit in effect
/// on several routes keeps one set of counters. The output targets the routes where
/// exactly that subset of the origin's limits is in effect.
pub fn compose(composed: &[ComposedPolicy], routes: &[String]) -> Vec<CompiledPolicy> {
    let limit_name = |(pi, li): (usize, usize)| {
        composed
            .get(pi)
            .and_then(|c| c.policy.limits.get(li))
            .map(|l| l.name.clone())
    };
    // (origin policy, its limits in effect) → the routes where exactly those apply.
    type Selection = (usize, Vec<usize>);
    let mut groups: Vec<(Selection, Vec<String>)> = Vec::new();
    for route in routes {
        for kind in [PolicyKind::Tokens, PolicyKind::Requests] {
            let mut applicable: Vec<(usize, &ComposedPolicy)> = composed
                .iter()
                .enumerate()
                .filter(|(_, c)| c.policy.kind == kind && c.policy.covers_route(route))
                .collect();
            applicable.sort_by_key(|(_, c)| matches!(c.policy.target, Target::Routes(_)));
            let mut effective: Vec<(usize, usize)> = Vec::new();
            let mut apply = |pi: usize, c: &ComposedPolicy| {
                let mine = (0..c.policy.limits.len()).map(|li| (pi, li));
                match c.strategy {
                    Strategy::Atomic => effective = mine.collect(),
                    Strategy::Merge => {
                        for id in mine {
                            let name = limit_name(id);
                            match effective.iter_mut().find(|e| limit_name(**e) == name) {
                                Some(slot) => *slot = id,
                                None => effective.push(id),
                            }
                        }
                    }
                }
            };
            for (pi, c) in &applicable {
                if c.role == Role::Defaults {
                    apply(*pi, c);
                }
            }
            for (pi, c) in applicable.iter().rev() {
                if c.role == Role::Overrides {
                    apply(*pi, c);
                }
            }
            let mut by_policy: Vec<(usize, Vec<usize>)> = Vec::new();
            for (pi, li) in effective {
                match by_policy.iter_mut().find(|(p, _)| *p == pi) {
                    Some((_, ls)) => ls.push(li),
                    None => by_policy.push((pi, vec![li])),
                }
            }
            for (pi, mut ls) in by_policy {
                ls.sort_unstable();
                let key = (pi, ls);
                match groups.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, rs)) => rs.push(route.clone()),
                    None => groups.push((key, vec![route.clone()])),
                }
            }
        }
    }
    groups
        .into_iter()
        .filter_map(|((pi, ls), routes)| {
            let mut p = composed.get(pi)?.policy.clone();
            p.limits = ls
                .iter()
                .filter_map(|&li| p.limits.get(li).cloned())
                .collect();
            p.target = Target::Routes(routes);
            Some(p)
        })
        .collect()
}

/// Token figures of one call, real or estimated, as CEL sees them in `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenFigures {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub reasoning_tokens: u64,
    pub total_tokens: u64,
}

impl TokenFigures {
    /// The `usage` CEL variable. Numbers are ints so that `usage.x / 2` works with plain
    /// int literals.
    pub fn to_cel(&self) -> cel::Value {
        let i = |n: u64| cel::int(n.min(i64::MAX as u64) as i64);
        cel::map([
            ("input_tokens", i(self.input_tokens)),
            ("prompt_tokens", i(self.input_tokens)),
            ("output_tokens", i(self.output_tokens)),
            ("completion_tokens", i(self.output_tokens)),
            ("cached_input_tokens", i(self.cached_input_tokens)),
            (
                "cache_creation_input_tokens",
                i(self.cache_creation_input_tokens),
            ),
            ("reasoning_tokens", i(self.reasoning_tokens)),
            ("total_tokens", i(self.total_tokens)),
        ])
    }
}

/// Where an op came from, for headers, metrics, logs and settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpOrigin {
    pub policy: usize,
    pub limit: usize,
    pub kind: CounterKind,
    pub shadow: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitEvalError {
    pub policy: Arc<str>,
    pub limit: Arc<str>,
    pub expression: String,
    pub message: String,
    pub action: OnError,
}

#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub ops: Vec<CounterOp>,
    pub origins: Vec<OpOrigin>,
    /// Limits that could not be evaluated (each followed its `on_error`).
    pub errors: Vec<LimitEvalError>,
}

impl Plan {
    /// The first evaluation error whose limit says `deny`.
    pub fn denied(&self) -> Option<&LimitEvalError> {
        self.errors.iter().find(|e| e.action == OnError::Deny)
    }
}

/// What is known about an LLM call before it is made, for reservations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallEstimate {
    /// Prompt tokens (fast estimate, or exact when a policy asked for it).
    pub input_tokens: u64,
    /// The client's output cap, if it set one.
    pub max_output_tokens: Option<u64>,
    /// Completions asked for (`n`, `best_of`), at least 1.
    pub n: u64,
    /// Embeddings generate nothing.
    pub generates_output: bool,
}

impl CallEstimate {
    /// The figures a policy reserves: prompt plus output cap (or the policy's default) × n.
    pub fn figures(&self, default_output_tokens: u64) -> TokenFigures {
        let output = if self.generates_output {
            self.max_output_tokens
                .unwrap_or(default_output_tokens)
                .saturating_mul(self.n.max(1))
        } else {
            0
        };
        TokenFigures {
            input_tokens: self.input_tokens,
            output_tokens: output,
            total_tokens: self.input_tokens.saturating_add(output),
            ..Default::default()
        }
    }
}

/// What [`plan`] needs to know about the request besides its attributes.
pub struct PlanRequest<'a> {
    pub route: &'a str,
    /// Token policies apply only to LLM calls.
    pub is_llm_call: bool,
    pub attrs: &'a Attrs,
    /// What the call may cost, for `accounting: reserve` policies (None: reserve nothing).
    pub estimate: Option<&'a CallEstimate>,
    /// Plan the pre-authentication policies (true) or all the others (false).
    pub pre_auth: bool,
}

/// Evaluate every applicable policy and limit for one request.
pub fn plan(policies: &[CompiledPolicy], req: &PlanRequest<'_>) -> Plan {
    let mut out = Plan::default();
    for (pi, policy) in policies.iter().enumerate() {
        if !policy.covers_route(req.route) {
            continue;
        }
        if policy.kind == PolicyKind::Tokens && !req.is_llm_call {
            continue;
        }
        if policy.pre_auth != req.pre_auth {
            continue;
        }
        let reserve_estimate = match (policy.accounting, req.estimate) {
            (Accounting::Reserve, Some(call)) if policy.kind == PolicyKind::Tokens => {
                let est = call.figures(policy.default_output_tokens);
                match cost(policy, &est, req.attrs) {
                    Ok(c) => c,
                    Err(message) => {
                        // A cost expression that cannot price the estimate still reserves
                        // the plain total: never less than nothing.
                        out.errors.push(LimitEvalError {
                            policy: policy.name.clone(),
                            limit: Arc::from(""),
                            expression: policy
                                .cost
                                .as_ref()
                                .map(|e| e.source().to_owned())
                                .unwrap_or_default(),
                            message,
                            action: OnError::Skip,
                        });
                        est.total_tokens
                    }
                }
            }
            _ => 0,
        };
        for (li, limit) in policy.limits.iter().enumerate() {
            match limit_applies(limit, req.attrs) {
                Ok(Some(values)) => {
                    push_ops(&mut out, pi, li, policy, limit, &values, reserve_estimate);
                }
                Ok(None) => {}
                Err((expression, message)) => out.errors.push(LimitEvalError {
                    policy: policy.name.clone(),
                    limit: limit.name.clone(),
                    expression,
                    message,
                    action: limit.on_error,
                }),
            }
        }
    }
    out
}

/// `Ok(Some(counter values))` when every predicate holds.
fn limit_applies(
    limit: &CompiledLimit,
    attrs: &Attrs,
) -> Result<Option<Vec<String>>, (String, String)> {
    for pred in &limit.when {
        match pred.eval_bool(attrs) {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(e) => return Err((pred.source().to_owned(), e.to_string())),
        }
    }
    let mut values = Vec::with_capacity(limit.counters.len());
    for c in &limit.counters {
        match c.eval_key(attrs) {
            Ok(v) => values.push(v),
            Err(e) => return Err((c.source().to_owned(), e.to_string())),
        }
    }
    Ok(Some(values))
}

fn push_ops(
    out: &mut Plan,
    pi: usize,
    li: usize,
    policy: &CompiledPolicy,
    limit: &CompiledLimit,
    values: &[String],
    reserve_estimate: u64,
) {
    let shadow = policy.mode == Mode::Shadow;
    for rate in &limit.rates {
        let id = CounterId::new(&policy.name, &limit.name, rate.window_ms, values);
        let window = match limit.anchor {
            Anchor::Epoch => Window::aligned(rate.window_ms),
            Anchor::Staggered => Window::staggered(rate.window_ms, id.as_str()),
        };
        let (kind, rate_kind, need, commit, reserve) = match policy.kind {
            PolicyKind::Tokens => match policy.accounting {
                Accounting::After => (
                    CounterKind::Tokens,
                    Rate::Fixed {
                        limit: rate.limit,
                        window,
                    },
                    Need::Room,
                    0,
                    0,
                ),
                Accounting::Reserve => (
                    CounterKind::Tokens,
                    Rate::Fixed {
                        limit: rate.limit,
                        window,
                    },
                    Need::Fits,
                    0,
                    reserve_estimate,
                ),
            },
            PolicyKind::Requests => {
                let rate_kind = match rate.burst {
                    Some(burst) => Rate::Bucket {
                        limit: rate.limit,
                        per_ms: rate.window_ms.max(1),
                        burst,
                    },
                    None => Rate::Fixed {
                        limit: rate.limit,
                        window,
                    },
                };
                (CounterKind::Requests, rate_kind, Need::Fits, 1, 0)
            }
        };
        out.ops.push(CounterOp {
            id,
            kind,
            rate: rate_kind,
            need,
            commit,
            reserve,
            replica: policy.replica,
        });
        out.origins.push(OpOrigin {
            policy: pi,
            limit: li,
            kind,
            shadow,
        });
    }
    if let Some(max) = limit.max_in_flight {
        out.ops.push(CounterOp {
            id: CounterId::new(&policy.name, &limit.name, 0, values),
            kind: CounterKind::InFlight,
            rate: Rate::Concurrency { limit: max },
            need: Need::Fits,
            commit: 0,
            reserve: 1,
            replica: policy.replica,
        });
        out.origins.push(OpOrigin {
            policy: pi,
            limit: li,
            kind: CounterKind::InFlight,
            shadow,
        });
    }
}

/// The cost of a call under a policy: its cost expression over `usage`, or the total.
pub fn cost(policy: &CompiledPolicy, usage: &TokenFigures, attrs: &Attrs) -> Result<u64, String> {
    match &policy.cost {
        None => Ok(usage.total_tokens),
        Some(expr) => {
            let mut a = attrs.clone();
            a.set("usage", usage.to_cel());
            expr.eval_cost(&a).map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(name: &str, group: &str, n: u64) -> CompiledLimit {
        CompiledLimit {
            name: Arc::from(name),
            rates: vec![RateSpec {
                limit: n,
                window_ms: 60_000,
                burst: None,
            }],
            when: vec![
                Expr::compile(r#"request.path == "/v1/chat/completions""#).unwrap(),
                Expr::compile(&format!(
                    r#"auth.identity.groups.split(",").exists(g, g == "{group}")"#
                ))
                .unwrap(),
            ],
            counters: vec![Expr::compile("auth.identity.userid").unwrap()],
            on_error: OnError::Skip,
            anchor: Anchor::Epoch,
            max_in_flight: None,
        }
    }

    fn tutorial() -> Vec<CompiledPolicy> {
        vec![CompiledPolicy {
            name: Arc::from("trlp"),
            kind: PolicyKind::Tokens,
            target: Target::Gateway,
            mode: Mode::Enforce,
            accounting: Accounting::After,
            cost: None,
            default_output_tokens: 1024,
            stream_cutoff: false,
            exact_prompt: false,
            pre_auth: false,
            replica: false,
            limits: vec![limit("free", "free", 50), limit("gold", "gold", 200)],
        }]
    }

    fn attrs(groups: &str, path: &str) -> Attrs {
        let mut a = Attrs::new();
        a.set(
            "auth",
            cel::map([(
                "identity",
                cel::map([
                    ("groups", cel::string(groups)),
                    ("userid", cel::string("u1")),
                ]),
            )]),
        );
        a.set("request", cel::map([("path", cel::string(path))]));
        a
    }

    #[test]
    fn only_matching_limit_applies() {
        let a = attrs("free", "/v1/chat/completions");
        let p = plan(
            &tutorial(),
            &PlanRequest {
                route: "llm",
                is_llm_call: true,
                attrs: &a,
                estimate: None,
                pre_auth: false,
            },
        );
        assert_eq!(p.ops.len(), 1);
        assert_eq!(p.ops[0].id.as_str(), "trlp/free/60000/u1");
        assert_eq!(p.ops[0].need, Need::Room);
    }

    #[test]
    fn token_policies_skip_non_llm_calls() {
        let a = attrs("free", "/v1/chat/completions");
        let p = plan(
            &tutorial(),
            &PlanRequest {
                route: "llm",
                is_llm_call: false,
                attrs: &a,
                estimate: None,
                pre_auth: false,
            },
        );
        assert!(p.ops.is_empty());
    }

    #[test]
    fn evaluation_error_follows_on_error() {
        let mut pols = tutorial();
        pols[0].limits[0].on_error = OnError::Deny;
        let mut a = Attrs::new();
        a.set(
            "request",
            cel::map([("path", cel::string("/v1/chat/completions"))]),
        );
        let p = plan(
            &pols,
            &PlanRequest {
                route: "llm",
                is_llm_call: true,
                attrs: &a,
                estimate: None,
                pre_auth: false,
            },
        );
        assert!(p.ops.is_empty());
        assert_eq!(p.errors.len(), 2);
        assert_eq!(p.denied().map(|e| &*e.limit), Some("free"));
    }

    fn composed(
        name: &str,
        target: Target,
        role: Role,
        strategy: Strategy,
        limits: &[&str],
    ) -> ComposedPolicy {
        let mut p = tutorial().remove(0);
        p.name = Arc::from(name);
        p.target = target;
        p.limits = limits.iter().map(|l| limit(l, "free", 1)).collect();
        ComposedPolicy {
            policy: p,
            role,
            strategy,
        }
    }

    fn effective(out: &[CompiledPolicy], route: &str) -> Vec<String> {
        let mut v: Vec<String> = out
            .iter()
            .filter(|p| p.covers_route(route))
            .flat_map(|p| {
                p.limits
                    .iter()
                    .map(move |l| format!("{}/{}", p.name, l.name))
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn composition_defaults_overrides_atomic_merge() {
        let routes = vec!["a".to_owned(), "b".to_owned()];
        let gw = |role, strategy| composed("gw", Target::Gateway, role, strategy, &["x", "y"]);
        let ra = |role, strategy| {
            composed(
                "ra",
                Target::Routes(vec!["a".into()]),
                role,
                strategy,
                &["y", "z"],
            )
        };
        use Role::*;
        use Strategy::*;
        // Gateway defaults, replaced whole on route a by its own policy.
        let out = compose(&[gw(Defaults, Atomic), ra(Defaults, Atomic)], &routes);
        assert_eq!(effective(&out, "a"), ["ra/y", "ra/z"]);
        assert_eq!(effective(&out, "b"), ["gw/x", "gw/y"]);
        // Merge: the route's `y` replaces the gateway's, `x` stays.
        let out = compose(&[ra(Defaults, Merge), gw(Defaults, Merge)], &routes);
        assert_eq!(effective(&out, "a"), ["gw/x", "ra/y", "ra/z"]);
        // Overrides win over the route: whole, or by name.
        let out = compose(&[gw(Overrides, Atomic), ra(Defaults, Atomic)], &routes);
        assert_eq!(effective(&out, "a"), ["gw/x", "gw/y"]);
        let out = compose(&[gw(Overrides, Merge), ra(Defaults, Atomic)], &routes);
        assert_eq!(effective(&out, "a"), ["gw/x", "gw/y", "ra/z"]);
        // One policy in effect on both routes stays one policy (one set of counters).
        let out = compose(&[gw(Defaults, Atomic)], &routes);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].target, Target::Routes(routes.clone()));
    }

    #[test]
    fn reserve_uses_cost_expression() {
        let mut pols = tutorial();
        pols[0].accounting = Accounting::Reserve;
        pols[0].cost = Some(Expr::compile("usage.input_tokens + 2 * usage.output_tokens").unwrap());
        let a = attrs("gold", "/v1/chat/completions");
        let est = CallEstimate {
            input_tokens: 10,
            max_output_tokens: Some(5),
            n: 1,
            generates_output: true,
        };
        let p = plan(
            &pols,
            &PlanRequest {
                route: "llm",
                is_llm_call: true,
                attrs: &a,
                estimate: Some(&est),
                pre_auth: false,
            },
        );
        assert_eq!(p.ops.len(), 1);
        assert_eq!(p.ops[0].reserve, 20);
        assert_eq!(p.ops[0].need, Need::Fits);
    }
}
