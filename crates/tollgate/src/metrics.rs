//! Prometheus metrics (text format on the admin listener's `/metrics`).
//!
//! Labels come from config — route, backend, policy, limit — plus decision, status class
//! and token type. `model` comes from requests, so it is capped: the first
//! [`MAX_MODELS`] distinct names are kept, later ones are reported as `other`. No user ids
//! or keys ever become labels.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::LocalKey;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub const MAX_MODELS: usize = 64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub backend: String,
    pub status_class: String,
    pub decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub route: String,
    pub model: String,
    pub policy: String,
    pub limit: String,
    /// prompt, completion, cached, estimated
    pub r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub route: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub policy: String,
    pub limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: String,
}

fn latency_histogram() -> Histogram {
    // 100 µs … ~100 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

fn store_histogram() -> Histogram {
    // 10 µs … ~1 s
    Histogram::new(exponential_buckets(0.00001, 2.0, 18))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub tokens: Family<TokenLabels, Counter>,
    pub upstream_latency: Family<UpstreamLabels, Histogram, fn() -> Histogram>,
    pub time_to_first_token: Family<UpstreamLabels, Histogram, fn() -> Histogram>,
    pub store_latency: Family<OpLabels, Histogram, fn() -> Histogram>,
    pub store_errors: Family<OpLabels, Counter>,
    pub reservations_outstanding: Gauge,
    pub counters_live: Gauge,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub limit_eval_errors: Family<LimitLabels, Counter>,
    pub shadow_refusals: Family<LimitLabels, Counter>,
    pub stream_cutoffs: Counter,
    pub upstream_idle_timeouts: Counter,
    pub requests_shed: Counter,
    pub requests_in_flight: Gauge,
    pub estimated_calls: Counter,
    pub reservation_overshoot_tokens: Counter,
    pub settle_failures: Counter,
    pub store_degraded: Gauge,
    models: Mutex<HashSet<String>>,
    /// Tells this instance's families apart in the per-thread handle cache.
    id: u64,
}

/// Label sets a thread has seen, per (family, hash of the labels), with their metric:
/// counting a request looks its labels up here, borrowed, instead of building owned
/// label strings, hashing them with SipHash and taking the family's lock. Bounded (cleared
/// past [`HANDLES_MAX`]; the metrics live on in their families). foldhash, not SipHash:
/// every label is a config name or from a capped set (`model`), so no client can make
/// the keys collide at will.
type Handles<M> = HashMap<(u64, u64), Vec<(Box<[String]>, M)>, foldhash::fast::FixedState>;

const HANDLES_MAX: usize = 4096;

thread_local! {
    static COUNTERS: RefCell<Handles<Counter>> = RefCell::new(HashMap::default());
    static HISTOGRAMS: RefCell<Handles<Histogram>> = RefCell::new(HashMap::default());
}

/// The families the cache serves; a [`Metrics`] instance's id tells instances apart.
#[derive(Clone, Copy)]
enum Fam {
    Requests,
    Tokens,
    UpstreamLatency,
    FirstToken,
    StoreLatency,
}

/// The metric of `family` for `labels` in this thread's `cache`, made by `make` the first
/// time this thread sees them.
fn cached<M: Clone + 'static>(
    cache: &'static LocalKey<RefCell<Handles<M>>>,
    family: u64,
    labels: &[&str],
    make: impl FnOnce() -> M,
) -> M {
    let key = (
        family,
        foldhash::fast::FixedState::default().hash_one(labels),
    );
    cache.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(bucket) = cache.get(&key) {
            for (seen, metric) in bucket {
                if seen.iter().map(String::as_str).eq(labels.iter().copied()) {
                    return metric.clone();
                }
            }
        }
        let metric = make();
        if cache.len() >= HANDLES_MAX {
            cache.clear();
        }
        cache.entry(key).or_default().push((
            labels.iter().map(|l| (*l).to_owned()).collect(),
            metric.clone(),
        ));
        metric
    })
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tollgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by route, backend, status class and decision",
            requests.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens charged by route, model, policy, limit and type (prompt, completion, cached, estimated)",
            tokens.clone(),
        );
        let upstream_latency =
            Family::<UpstreamLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "upstream_latency_seconds",
            "Time from sending upstream to the response headers",
            upstream_latency.clone(),
        );
        let time_to_first_token =
            Family::<UpstreamLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "time_to_first_token_seconds",
            "Time from admission to the first streamed body byte",
            time_to_first_token.clone(),
        );
        let store_latency =
            Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(store_histogram);
        registry.register(
            "store_latency_seconds",
            "Counter store call latency by operation",
            store_latency.clone(),
        );
        let store_errors = Family::<OpLabels, Counter>::default();
        registry.register(
            "store_errors",
            "Counter store errors by operation",
            store_errors.clone(),
        );
        let reservations_outstanding = Gauge::default();
        registry.register(
            "reservations_outstanding",
            "Token reservations and in-flight slots currently held",
            reservations_outstanding.clone(),
        );
        let counters_live = Gauge::default();
        registry.register(
            "counters_live",
            "Counter windows currently held by the store",
            counters_live.clone(),
        );
        let config_reloads = Family::<ResultLabels, Counter>::default();
        for result in ["success", "failure"] {
            // Present from the start, at 0, so alerts can use rate() right away.
            let _ = config_reloads.get_or_create(&ResultLabels {
                result: result.into(),
            });
        }
        registry.register(
            "config_reloads",
            "Configuration reloads by result (success, failure)",
            config_reloads.clone(),
        );
        let limit_eval_errors = Family::<LimitLabels, Counter>::default();
        registry.register(
            "limit_evaluation_errors",
            "Limits whose predicates or counters could not be evaluated",
            limit_eval_errors.clone(),
        );
        let shadow_refusals = Family::<LimitLabels, Counter>::default();
        registry.register(
            "shadow_refusals",
            "Requests a shadow-mode policy would have refused",
            shadow_refusals.clone(),
        );
        let stream_cutoffs = Counter::default();
        registry.register(
            "stream_cutoffs",
            "Streams ended by tollgate because their budget was reached",
            stream_cutoffs.clone(),
        );
        let upstream_idle_timeouts = Counter::default();
        registry.register(
            "upstream_idle_timeouts",
            "Responses ended by tollgate because the upstream sent nothing for server.upstream_idle_timeout",
            upstream_idle_timeouts.clone(),
        );
        let requests_shed = Counter::default();
        registry.register(
            "requests_shed",
            "Requests refused with 503 because server.max_concurrent_requests were in progress",
            requests_shed.clone(),
        );
        let requests_in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Requests in progress on the proxy listener (response bodies included)",
            requests_in_flight.clone(),
        );
        let estimated_calls = Counter::default();
        registry.register(
            "estimated_calls",
            "Calls charged an estimate because no usage came",
            estimated_calls.clone(),
        );
        let reservation_overshoot_tokens = Counter::default();
        registry.register(
            "reservation_overshoot_tokens",
            "Tokens used beyond a reservation that had to assume a default output cap",
            reservation_overshoot_tokens.clone(),
        );
        let settle_failures = Counter::default();
        registry.register(
            "settle_failures",
            "Settlements the store could not record",
            settle_failures.clone(),
        );
        let store_degraded = Gauge::default();
        registry.register(
            "store_degraded",
            "1 while the shared counter store is away (fail_open: local counters; fail_closed: 503)",
            store_degraded.clone(),
        );
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            registry,
            requests,
            tokens,
            upstream_latency,
            time_to_first_token,
            store_latency,
            store_errors,
            reservations_outstanding,
            counters_live,
            config_reloads,
            limit_eval_errors,
            shadow_refusals,
            stream_cutoffs,
            upstream_idle_timeouts,
            requests_shed,
            requests_in_flight,
            estimated_calls,
            reservation_overshoot_tokens,
            settle_failures,
            store_degraded,
            models: Mutex::new(HashSet::new()),
        }
    }

    /// The model label: the name while fewer than [`MAX_MODELS`] were seen, else `other`.
    pub fn model_label<'a>(&self, model: Option<&'a str>) -> &'a str {
        let Some(m) = model else {
            return "-";
        };
        let mut seen = match self.models.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if seen.contains(m) {
            return m;
        }
        if seen.len() < MAX_MODELS {
            seen.insert(m.to_owned());
            return m;
        }
        "other"
    }

    pub fn request(&self, route: &str, backend: &str, status: u16, decision: &str) {
        let other;
        let class = match status / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            5 => "5xx",
            n => {
                other = format!("{n}xx");
                other.as_str()
            }
        };
        self.counter(Fam::Requests, &[route, backend, class, decision], || {
            self.requests
                .get_or_create(&RequestLabels {
                    route: route.to_owned(),
                    backend: backend.to_owned(),
                    status_class: class.to_owned(),
                    decision: decision.to_owned(),
                })
                .clone()
        })
        .inc();
    }

    /// Add `n` to `tollgate_tokens_total` for these labels.
    pub fn add_tokens(
        &self,
        route: &str,
        model: &str,
        policy: &str,
        limit: &str,
        ty: &str,
        n: u64,
    ) {
        self.counter(Fam::Tokens, &[route, model, policy, limit, ty], || {
            self.tokens
                .get_or_create(&TokenLabels {
                    route: route.to_owned(),
                    model: model.to_owned(),
                    policy: policy.to_owned(),
                    limit: limit.to_owned(),
                    r#type: ty.to_owned(),
                })
                .clone()
        })
        .inc_by(n);
    }

    pub fn observe_store(&self, op: &str, d: Duration, ok: bool) {
        self.histogram(Fam::StoreLatency, &[op], || {
            self.store_latency
                .get_or_create(&OpLabels { op: op.to_owned() })
                .clone()
        })
        .observe(d.as_secs_f64());
        if !ok {
            self.store_errors
                .get_or_create(&OpLabels { op: op.to_owned() })
                .inc();
        }
    }

    /// Time from sending the request upstream to the response head.
    pub fn observe_upstream_latency(&self, route: &str, backend: &str, d: Duration) {
        self.observe_upstream(
            Fam::UpstreamLatency,
            &self.upstream_latency,
            route,
            backend,
            d,
        );
    }

    /// Time from sending the request upstream to the first streamed token.
    pub fn observe_first_token(&self, route: &str, backend: &str, d: Duration) {
        self.observe_upstream(
            Fam::FirstToken,
            &self.time_to_first_token,
            route,
            backend,
            d,
        );
    }

    fn observe_upstream(
        &self,
        fam: Fam,
        family: &Family<UpstreamLabels, Histogram, fn() -> Histogram>,
        route: &str,
        backend: &str,
        d: Duration,
    ) {
        self.histogram(fam, &[route, backend], || {
            family
                .get_or_create(&UpstreamLabels {
                    route: route.to_owned(),
                    backend: backend.to_owned(),
                })
                .clone()
        })
        .observe(d.as_secs_f64());
    }

    /// This instance's `family` in the per-thread handle caches.
    fn cache_key(&self, family: Fam) -> u64 {
        self.id * 8 + family as u64
    }

    fn counter(&self, family: Fam, labels: &[&str], make: impl FnOnce() -> Counter) -> Counter {
        cached(&COUNTERS, self.cache_key(family), labels, make)
    }

    fn histogram(
        &self,
        family: Fam,
        labels: &[&str],
        make: impl FnOnce() -> Histogram,
    ) -> Histogram {
        cached(&HISTOGRAMS, self.cache_key(family), labels, make)
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_label_is_capped() {
        let m = Metrics::new();
        for i in 0..MAX_MODELS {
            assert_eq!(m.model_label(Some(&format!("m{i}"))), format!("m{i}"));
        }
        assert_eq!(m.model_label(Some("one-too-many")), "other");
        assert_eq!(m.model_label(Some("m3")), "m3");
        assert_eq!(m.model_label(None), "-");
    }

    #[test]
    fn cached_handles_count_into_their_own_family() {
        let a = Metrics::new();
        let b = Metrics::new();
        for _ in 0..3 {
            a.request("llm", "sim", 200, "allowed");
            a.add_tokens("llm", "m", "p", "free", "prompt", 5);
        }
        b.request("llm", "sim", 200, "allowed");
        b.request("llm", "sim", 503, "overloaded");
        b.add_tokens("llm", "m", "p", "free", "completion", 7);
        // Past the cache's bound: cleared, and the families keep counting.
        for i in 0..HANDLES_MAX + 1 {
            a.add_tokens("llm", &format!("m{i}"), "p", "free", "prompt", 1);
        }
        a.add_tokens("llm", "m", "p", "free", "prompt", 5);
        let (ta, tb) = (a.encode(), b.encode());
        assert!(ta.contains("tollgate_requests_total{route=\"llm\",backend=\"sim\",status_class=\"2xx\",decision=\"allowed\"} 3"), "{ta}");
        assert!(ta.contains("tollgate_tokens_total{route=\"llm\",model=\"m\",policy=\"p\",limit=\"free\",type=\"prompt\"} 20"), "{ta}");
        assert!(!ta.contains("type=\"completion\""), "{ta}");
        assert!(tb.contains("tollgate_requests_total{route=\"llm\",backend=\"sim\",status_class=\"2xx\",decision=\"allowed\"} 1"), "{tb}");
        assert!(
            tb.contains("status_class=\"5xx\",decision=\"overloaded\"} 1"),
            "{tb}"
        );
        assert!(tb.contains("type=\"completion\"} 7"), "{tb}");
        assert!(!tb.contains("type=\"prompt\""), "{tb}");
    }

    #[test]
    fn cached_histograms_observe_into_their_own_family_and_labels() {
        let a = Metrics::new();
        let b = Metrics::new();
        let ms = Duration::from_millis(1);
        for _ in 0..3 {
            a.observe_store("admit", ms, true);
            a.observe_upstream_latency("llm", "sim", ms);
        }
        a.observe_store("settle", ms, false);
        a.observe_first_token("llm", "sim", ms);
        b.observe_upstream_latency("llm", "other", ms);
        b.observe_upstream_latency("llm", "other", ms);
        let (ta, tb) = (a.encode(), b.encode());
        let has = |t: &str, line: &str| t.lines().any(|l| l == line);
        assert!(
            has(&ta, "tollgate_store_latency_seconds_count{op=\"admit\"} 3"),
            "{ta}"
        );
        assert!(
            has(&ta, "tollgate_store_latency_seconds_count{op=\"settle\"} 1"),
            "{ta}"
        );
        assert!(
            has(&ta, "tollgate_store_errors_total{op=\"settle\"} 1"),
            "{ta}"
        );
        assert!(
            !ta.contains("tollgate_store_errors_total{op=\"admit\"}"),
            "{ta}"
        );
        assert!(
            has(
                &ta,
                "tollgate_upstream_latency_seconds_count{route=\"llm\",backend=\"sim\"} 3"
            ),
            "{ta}"
        );
        assert!(
            has(
                &ta,
                "tollgate_time_to_first_token_seconds_count{route=\"llm\",backend=\"sim\"} 1"
            ),
            "{ta}"
        );
        assert!(!ta.contains("backend=\"other\""), "{ta}");
        assert!(
            has(
                &tb,
                "tollgate_upstream_latency_seconds_count{route=\"llm\",backend=\"other\"} 2"
            ),
            "{tb}"
        );
        assert!(!tb.contains("op=\""), "{tb}");
    }

    #[test]
    fn encodes_text_format() {
        let m = Metrics::new();
        m.request("llm", "sim", 200, "allowed");
        let text = m.encode();
        assert!(text.contains("tollgate_requests_total{route=\"llm\",backend=\"sim\",status_class=\"2xx\",decision=\"allowed\"} 1"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
