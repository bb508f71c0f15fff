//! tollgate: a token-aware gateway for LLM APIs.
//!
//! How a request moves: `proxy::serve` accepts it → `proxy::pipeline` runs the phases
//! (locate → route → authenticate → read body → admit → forward → meter/settle) against
//! the current `runtime::Runtime` (compiled from `config`) → the engine in
//! `tollgate_limits` decides and counts → `proxy::metering` settles the real cost.
//!
//! - [`config`]: YAML schema, loading with positions, every problem at once.
//! - [`manifests`]: Kubernetes resources (Gateway API, Kuadrant, agentgateway, Gloo) →
//!   a native config, for `serve --manifests` and `convert`.
//! - [`runtime`]: the immutable compiled config (routes, backends, keys, policies).
//! - [`auth`]: API keys (digests, constant-time compare), JWT, OPA Rego.
//! - [`proxy`]: listener, pipeline, upstream client, metering, the one error mapping.
//! - [`admin`]: health, readiness, counters, test clock.
//! - [`cli`]: `serve`, `convert`, `validate`, `sim`.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod manifests;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod runtime;
pub mod usage;
