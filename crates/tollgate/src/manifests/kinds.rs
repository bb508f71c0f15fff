//! The `spec`s tollgate reads, as typed structs. Unknown fields in a policy or Gateway
//! API spec are errors (so a misspelt or unsupported field is never silently dropped);
//! fields Kubernetes defaults or the API allows but tollgate does not act on are listed
//! and, where they would change behaviour, refused in translation. `status` and
//! server-set `metadata` fields are not part of these structs and are ignored.
//! Schema-valid fields tollgate accepts without acting on them stay in the structs, so
//! they are not "unknown field" errors.
#![allow(dead_code)]

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::config::ConfigDuration;

// ---------- Gateway API ----------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub gateway_class_name: Option<String>,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub addresses: Vec<Value>,
    #[serde(default)]
    pub infrastructure: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Listener {
    pub name: String,
    #[serde(default)]
    pub hostname: Option<String>,
    pub port: u16,
    pub protocol: String,
    #[serde(default)]
    pub allowed_routes: Option<Value>,
    #[serde(default)]
    pub tls: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub section_name: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default)]
    pub filters: Vec<Value>,
    #[serde(default)]
    pub timeouts: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteMatch {
    #[serde(default)]
    pub path: Option<HttpPathMatch>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub headers: Vec<Value>,
    #[serde(default)]
    pub query_params: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpPathMatch {
    /// `PathPrefix` (the default), `Exact` or `RegularExpression` (refused).
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendRef {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub filters: Vec<Value>,
}

/// `targetRef` of Kuadrant policies, one item of `targetRefs` elsewhere.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetRef {
    #[serde(default)]
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub section_name: Option<String>,
}

// ---------- Kuadrant ----------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Predicate {
    pub predicate: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CounterExpr {
    pub expression: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KuadrantRate {
    pub limit: u64,
    pub window: ConfigDuration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KuadrantLimit {
    #[serde(default)]
    pub rates: Vec<KuadrantRate>,
    #[serde(default)]
    pub when: Vec<Predicate>,
    #[serde(default)]
    pub counters: Vec<CounterExpr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KuadrantMergeable {
    #[serde(default)]
    pub strategy: Option<String>,
    #[serde(default)]
    pub when: Vec<Predicate>,
    #[serde(default)]
    pub limits: BTreeMap<String, KuadrantLimit>,
}

/// `RateLimitPolicy` (v1) and `TokenRateLimitPolicy` (v1alpha1) share this shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KuadrantRateLimitSpec {
    pub target_ref: TargetRef,
    #[serde(default)]
    pub limits: BTreeMap<String, KuadrantLimit>,
    #[serde(default)]
    pub when: Vec<Predicate>,
    #[serde(default)]
    pub defaults: Option<KuadrantMergeable>,
    #[serde(default)]
    pub overrides: Option<KuadrantMergeable>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthPolicySpec {
    pub target_ref: TargetRef,
    #[serde(default)]
    pub rules: Option<AuthRules>,
    #[serde(default)]
    pub when: Vec<Predicate>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthRules {
    #[serde(default)]
    pub authentication: BTreeMap<String, AuthenticationRule>,
    #[serde(default)]
    pub authorization: BTreeMap<String, AuthorizationRule>,
    #[serde(default)]
    pub response: Option<AuthResponse>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthenticationRule {
    pub api_key: ApiKeyAuth,
    #[serde(default)]
    pub credentials: Option<Credentials>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApiKeyAuth {
    pub selector: LabelSelector,
    #[serde(default)]
    pub all_namespaces: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Credentials {
    #[serde(default)]
    pub authorization_header: Option<AuthorizationHeader>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationHeader {
    #[serde(default)]
    pub prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationRule {
    pub opa: OpaRule,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OpaRule {
    pub rego: String,
    #[serde(default)]
    pub all_values: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthResponse {
    #[serde(default)]
    pub success: Option<AuthSuccess>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSuccess {
    #[serde(default)]
    pub filters: BTreeMap<String, SuccessFilter>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuccessFilter {
    pub json: JsonFilter,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonFilter {
    pub properties: BTreeMap<String, JsonProperty>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonProperty {
    #[serde(default)]
    pub selector: Option<String>,
    #[serde(default)]
    pub value: Option<Value>,
}

// ---------- agentgateway ----------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentgatewayPolicySpec {
    pub target_refs: Vec<TargetRef>,
    #[serde(default)]
    pub traffic: Option<AgentTraffic>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentTraffic {
    #[serde(default)]
    pub rate_limit: Option<AgentRateLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRateLimit {
    #[serde(default)]
    pub local: Vec<AgentLocalLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentLocalLimit {
    #[serde(default)]
    pub tokens: Option<u64>,
    #[serde(default)]
    pub requests: Option<u64>,
    /// `Seconds`, `Minutes` or `Hours`.
    pub unit: String,
    #[serde(default)]
    pub burst: Option<u64>,
}

// ---------- Gloo ----------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GlooOptionSpec<O> {
    pub target_refs: Vec<TargetRef>,
    pub options: O,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualHostOptions {
    #[serde(default)]
    pub jwt: Option<GlooJwt>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlooJwt {
    pub providers: BTreeMap<String, GlooJwtProvider>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlooJwtProvider {
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub audiences: Option<Vec<String>>,
    pub jwks: GlooJwks,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlooJwks {
    pub local: GlooLocalKey,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlooLocalKey {
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteOptions {
    #[serde(default)]
    pub rate_limit_configs: Option<RateLimitConfigRefs>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfigRefs {
    pub refs: Vec<ObjectRef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectRef {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfigSpec {
    pub raw: RawRateLimit,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRateLimit {
    #[serde(default)]
    pub descriptors: Vec<Descriptor>,
    #[serde(default)]
    pub rate_limits: Vec<RateLimitActions>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Descriptor {
    pub key: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub rate_limit: Option<DescriptorRate>,
    #[serde(default)]
    pub descriptors: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DescriptorRate {
    pub requests_per_unit: u64,
    /// `SECOND`, `MINUTE`, `HOUR` or `DAY`.
    pub unit: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitActions {
    pub actions: Vec<Action>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Action {
    #[serde(default)]
    pub metadata: Option<MetadataAction>,
    #[serde(default)]
    pub generic_key: Option<GenericKeyAction>,
    #[serde(default)]
    pub request_headers: Option<RequestHeadersAction>,
    #[serde(default)]
    pub remote_address: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MetadataAction {
    pub descriptor_key: String,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub default: Option<String>,
    pub metadata_key: MetadataKey,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataKey {
    pub key: String,
    #[serde(default)]
    pub path: Vec<PathSegment>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathSegment {
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GenericKeyAction {
    pub descriptor_value: String,
    #[serde(default)]
    pub descriptor_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestHeadersAction {
    pub header_name: String,
    pub descriptor_key: String,
    #[serde(default)]
    pub skip_if_absent: bool,
}
