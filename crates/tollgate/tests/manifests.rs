//! The seeds' own manifests as configuration (`serve --manifests`), through the real
//! server on the test clock: the Kuadrant tutorial (keys, 401/403 with its Rego, free
//! 50/min vs gold 200/min, 429), the Kuadrant blog's daily tiers, Gloo's tiers with the
//! seed's JWT and public key, agentgateway's local token budget (streaming included),
//! combined request+token limits and gateway-level ceiling; Kuadrant composition;
//! problems named by document and line; and `convert` output deciding exactly as the
//! manifests do. Fixtures: tests/fixtures/manifests/ (what each test supplies "before
//! you begin" is in a file of that name, and said so in it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use common::*;
use serde_json::{json, Value};

const SIM_MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

fn fixture(sub: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/manifests")
        .join(sub)
}

/// A scratch manifest written by the test (removed with the process's temp files).
fn scratch(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn args(manifests: &[PathBuf], backends: &[(&str, SocketAddr)]) -> Vec<OsString> {
    let mut a = Vec::new();
    for m in manifests {
        a.push("--manifests".into());
        a.push(m.clone().into_os_string());
    }
    for (name, addr) in backends {
        a.push("--backend".into());
        a.push(format!("{name}=http://{addr}").into());
    }
    a
}

fn start(manifests: &[PathBuf], backends: &[(&str, SocketAddr)]) -> Gateway {
    Gateway::start_args(&args(manifests, backends), &[], T0)
}

/// `tollgate convert`: (exit ok, stdout, stderr).
fn convert(manifests: &[PathBuf], backends: &[(&str, SocketAddr)]) -> (bool, String, String) {
    let out = Command::new(bin())
        .arg("convert")
        .args(args(manifests, backends))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct Call<'a> {
    host: Option<&'a str>,
    auth: Option<String>,
    path: &'a str,
    model: &'a str,
    max_tokens: Option<u64>,
    stream: bool,
}

impl<'a> Call<'a> {
    fn chat(host: Option<&'a str>, auth: Option<String>, model: &'a str, max_tokens: u64) -> Self {
        Call {
            host,
            auth,
            path: "/v1/chat/completions",
            model,
            max_tokens: Some(max_tokens),
            stream: false,
        }
    }

    async fn send(&self, gw: &Gateway) -> reqwest::Response {
        let mut body = json!({
            "model": self.model,
            "messages": [{"role": "user", "content": "What is Kubernetes?"}],
            "stream": self.stream,
        });
        if let Some(m) = self.max_tokens {
            body["max_tokens"] = m.into();
        }
        let mut r = client().post(gw.url(self.path)).json(&body);
        if let Some(h) = self.host {
            r = r.header("host", h);
        }
        if let Some(a) = &self.auth {
            r = r.header("authorization", a);
        }
        r.send().await.unwrap()
    }
}

async fn tokens(r: reqwest::Response) -> u64 {
    let v: Value = r.json().await.unwrap();
    v["usage"]["total_tokens"].as_u64().unwrap()
}

/// Send `call` until refused; returns (tokens spent, the refusal).
async fn drain(gw: &Gateway, call: &Call<'_>, bound: usize) -> (u64, u64, reqwest::Response) {
    let mut spent = 0;
    let mut last = 0;
    for _ in 0..bound {
        let r = call.send(gw).await;
        if r.status() == 429 {
            return (spent, last, r);
        }
        assert_eq!(r.status(), 200);
        last = tokens(r).await;
        spent += last;
    }
    panic!("never refused after {bound} calls ({spent} tokens)");
}

const TUTORIAL_HOST: &str = "trlp-tutorial.example.com";

/// Supplied by the test: a third user, in a group the tutorial's Rego does not allow.
const BRONZE_SECRET: &str = r#"
apiVersion: v1
kind: Secret
metadata:
  name: trlp-tutorial-api-key-bronze-user-1
  namespace: kuadrant-system
  labels:
    authorino.kuadrant.io/managed-by: authorino
    app: my-llm
  annotations:
    kuadrant.io/groups: bronze
    secret.kuadrant.io/user-id: user-3
stringData:
  api_key: iamabronzeuser
type: Opaque
"#;

fn tutorial_manifests() -> Vec<PathBuf> {
    vec![
        fixture("kuadrant-tutorial"),
        scratch("bronze.yaml", BRONZE_SECRET),
    ]
}

fn apikey(k: &str) -> Option<String> {
    Some(format!("APIKEY {k}"))
}

#[tokio::test]
async fn kuadrant_tutorial_keys_rego_and_token_tiers() {
    // The Deployment is the tutorial's llm-d simulator: the built-in one serves it.
    let gw = start(&tutorial_manifests(), &[]);
    let host = Some(TUTORIAL_HOST);
    // Step 3's connectivity check, now behind the AuthPolicy: no key is 401.
    let r = client()
        .get(gw.url("/v1/models"))
        .header("host", TUTORIAL_HOST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(gw.url("/v1/models"))
        .header("host", TUTORIAL_HOST)
        .header("authorization", "APIKEY iamafreeuser")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Another host is not this route.
    let r = Call::chat(
        Some("other.example.com"),
        apikey("iamafreeuser"),
        SIM_MODEL,
        1,
    )
    .send(&gw)
    .await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        Call::chat(host, apikey("nope"), SIM_MODEL, 1)
            .send(&gw)
            .await
            .status(),
        401
    );
    // A valid key whose group the Rego does not allow.
    let r = Call::chat(host, apikey("iamabronzeuser"), SIM_MODEL, 1)
        .send(&gw)
        .await;
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "permission_denied");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("allow-groups"));

    // Step 7, as the tutorial sends it: the free user's 100-token call is admitted
    // (the budget had room) and spends the minute's 50; the next is refused.
    let free = Call::chat(host, apikey("iamafreeuser"), SIM_MODEL, 100);
    let r = free.send(&gw).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "50");
    assert!(tokens(r).await >= 100);
    let r = free.send(&gw).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "50");
    assert!(r.headers().contains_key("retry-after"));
    // The gold user has a budget of their own, of 200.
    let gold = Call::chat(host, apikey("iamagolduser"), SIM_MODEL, 20);
    let (spent, last, refused) = drain(&gw, &gold, 30).await;
    assert!(spent >= 200 && spent - last < 200, "{spent}");
    assert_eq!(refused.headers()["x-ratelimit-limit-tokens"], "200");
    // The limits apply to /v1/chat/completions only (their `when`).
    let r = client()
        .post(gw.url("/v1/completions"))
        .header("host", TUTORIAL_HOST)
        .header("authorization", "APIKEY iamafreeuser")
        .json(&json!({"model": SIM_MODEL, "prompt": "Kubernetes is", "max_tokens": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Next minute: small calls until the free budget of 50 is spent.
    gw.advance(60_000).await;
    let (spent, last, _) = drain(
        &gw,
        &Call::chat(host, apikey("iamafreeuser"), SIM_MODEL, 10),
        30,
    )
    .await;
    assert!(spent >= 50 && spent - last < 50, "{spent}");
    let ids: Vec<String> = gw
        .counters("trlp-tutorial-token-limits/")
        .await
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        ids.iter()
            .any(|i| i == "trlp-tutorial-token-limits/free/60000/user-1"),
        "{ids:?}"
    );
    assert!(!gw.logs().contains("iamafreeuser"), "key in logs");
}

#[tokio::test]
async fn kuadrant_blog_daily_tiers() {
    let up = Upstream::start().await;
    // The Service's URL from a mapping file this time.
    let map = scratch("blog-backends.yaml", &format!("llm: http://{}\n", up.addr));
    let mut a = args(&[fixture("kuadrant-blog")], &[]);
    a.extend([OsString::from("--backends-file"), map.into_os_string()]);
    let gw = Gateway::start_args(&a, &[], T0);
    let free = Call::chat(None, apikey("iamafreeuser"), "sim-model", 4000);
    let (spent, last, refused) = drain(&gw, &free, 10).await;
    assert!(spent >= 20_000 && spent - last < 20_000, "{spent}");
    assert_eq!(refused.headers()["x-ratelimit-limit-tokens"], "20000");
    // A day's window: an hour later, still refused; gold (data.api_key) is not.
    gw.advance(3_600_000).await;
    assert_eq!(free.send(&gw).await.status(), 429);
    let gold = Call::chat(None, apikey("iamagolduser"), "sim-model", 4000);
    let r = gold.send(&gw).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "200000");
    // The next day (T0 is 08:00; now 09:00): the free budget is back.
    gw.advance(15 * 3_600_000).await;
    assert_eq!(free.send(&gw).await.status(), 200);
}

fn alice() -> String {
    let jwt = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt/alice.jwt"),
    )
    .unwrap();
    format!("Bearer {}", jwt.trim())
}

#[tokio::test]
async fn gloo_tiers_with_the_seeds_jwt() {
    let up = Upstream::start().await;
    let gw = start(&[fixture("gloo-tiers")], &[("openai", up.addr)]);
    // Without a JWT: 401, never forwarded.
    let r = Call::chat(None, None, "gpt-3.5-turbo", 1).send(&gw).await;
    assert_eq!(r.status(), 401);
    assert_eq!(up.served(), 0);
    // Alice's own token from the blog, verified with the blog's key. Three ~47-token
    // calls fit the minute (the third starts at 94 < 100); the fourth is refused.
    let call = Call::chat(None, Some(alice()), "gpt-3.5-turbo", 44);
    for _ in 0..3 {
        let r = call.send(&gw).await;
        assert_eq!(r.status(), 200);
    }
    let r = call.send(&gw).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "100");
    // Two calls a minute: the minute tier never blocks, the hour tier (1,000) does.
    let mut calls = 0;
    let refused = loop {
        gw.advance(if calls % 2 == 0 { 60_000 } else { 0 }).await;
        let r = call.send(&gw).await;
        if r.status() == 429 {
            break r;
        }
        assert_eq!(r.status(), 200);
        calls += 1;
        assert!(calls < 40, "hour tier never blocked");
    };
    assert_eq!(refused.headers()["x-ratelimit-limit-tokens"], "1000");
    let hour = gw
        .counters("per-user-counter-hour/user-id/3600000/alice")
        .await;
    assert!(
        hour.iter().any(|c| c["value"].as_u64().unwrap() >= 1000),
        "{hour:?}"
    );
    // The day tier counted the same tokens under the same user.
    let day = gw
        .counters("per-user-counter-day/user-id/86400000/alice")
        .await;
    assert!(
        day.iter().any(|c| c["value"].as_u64().unwrap() >= 1000),
        "{day:?}"
    );
}

fn agentgateway(files: &[&str]) -> Vec<PathBuf> {
    let mut v = vec![fixture("agentgateway/before-you-begin.yaml")];
    v.extend(files.iter().map(|f| fixture(&format!("agentgateway/{f}"))));
    v
}

fn seed_request(host: &str, stream: bool) -> Call<'_> {
    Call {
        host: Some(host),
        auth: None,
        path: "/v1/chat/completions",
        model: "gpt-4",
        max_tokens: None,
        stream,
    }
}

#[tokio::test]
async fn agentgateway_local_token_budget_with_streaming() {
    let up = Upstream::start().await;
    let gw = start(&agentgateway(&["token-budget.yaml"]), &[("llm", up.addr)]);
    // "Send repeated requests and watch the budget drain": the call that crosses 100
    // completes; the next is refused and not forwarded.
    let call = seed_request("httpbun.example", false);
    let (spent, last, refused) = drain(&gw, &call, 10).await;
    assert!(spent >= 100 && spent - last < 100, "{spent}");
    let served = up.served();
    assert!(refused.text().await.unwrap().contains("llm-token-budget"));
    assert_eq!(up.served(), served);
    // Other routes are not under this budget.
    assert_eq!(
        seed_request("openai.example", false)
            .send(&gw)
            .await
            .status(),
        200
    );

    // Next minute, streaming: the stream arrives whole, and its tokens are counted
    // after it ends.
    gw.advance(60_000).await;
    let stream = seed_request("httpbun.example", true);
    let mut streamed = 0;
    let refused = loop {
        let r = stream.send(&gw).await;
        if r.status() == 429 {
            break r;
        }
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        streamed += 1;
        assert!(streamed < 10, "streams never counted");
    };
    assert!(streamed >= 2, "{streamed}");
    assert_eq!(refused.status(), 429);
    let cs = gw.counters("llm-token-budget/local-0/60000").await;
    assert!(
        cs.iter().any(|c| c["value"].as_u64().unwrap() >= 100),
        "{cs:?}"
    );
}

#[tokio::test]
async fn agentgateway_combined_request_and_token_limits() {
    let up = Upstream::start().await;
    let gw = start(&agentgateway(&["combined-limit.yaml"]), &[("llm", up.addr)]);
    let small = Call::chat(Some("openai.example"), None, "gpt-4", 2);
    // 10 a minute plus a burst of 5.
    for i in 1..=15 {
        let r = small.send(&gw).await;
        assert_eq!(r.status(), 200, "request {i}");
    }
    let r = small.send(&gw).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "requests");
    // A minute refills 10 requests; 1000 tokens a minute bound the big calls.
    gw.advance(60_000).await;
    let big = Call::chat(Some("openai.example"), None, "gpt-4", 600);
    assert_eq!(big.send(&gw).await.status(), 200);
    assert_eq!(big.send(&gw).await.status(), 200);
    let r = big.send(&gw).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "tokens");
}

#[tokio::test]
async fn agentgateway_gateway_level_ceiling_across_routes() {
    let up = Upstream::start().await;
    let gw = start(
        &agentgateway(&[
            "token-budget.yaml",
            "combined-limit.yaml",
            "gateway-token-limit.yaml",
        ]),
        &[("llm", up.addr)],
    );
    // One ~950-token call a minute on `openai` (under its 1000/min): the hourly
    // 10,000 ceiling is reached in about eleven minutes.
    let big = Call::chat(Some("openai.example"), None, "gpt-4", 940);
    let mut calls = 0;
    let refused = loop {
        let r = big.send(&gw).await;
        if r.status() == 429 {
            break r;
        }
        assert_eq!(r.status(), 200);
        calls += 1;
        gw.advance(60_000).await;
        assert!(calls < 20, "ceiling never reached");
    };
    assert!((10..=11).contains(&calls), "{calls}");
    assert!(refused
        .text()
        .await
        .unwrap()
        .contains("gateway-token-limit"));
    // The ceiling is the whole gateway's: the other route is refused too, though its
    // own per-minute budget is untouched.
    let r = seed_request("httpbun.example", false).send(&gw).await;
    assert_eq!(r.status(), 429);
    assert!(r.text().await.unwrap().contains("gateway-token-limit"));
}

/// Supplied by the test: two routes under one Gateway, for composition.
const COMPOSITION_BASE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: { name: gw }
spec:
  gatewayClassName: x
  listeners: [{ name: http, protocol: HTTP, port: 8080 }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: route-a }
spec:
  parentRefs: [{ name: gw }]
  rules: [{ matches: [{ path: { value: /a } }], backendRefs: [{ name: up }] }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: route-b }
spec:
  parentRefs: [{ name: gw }]
  rules: [{ matches: [{ path: { value: /b } }], backendRefs: [{ name: up }] }]
"#;

fn rlp(name: &str, kind: &str, target: &str, body: &str) -> String {
    format!(
        "---\napiVersion: kuadrant.io/v1\nkind: RateLimitPolicy\nmetadata: {{ name: {name} }}\nspec:\n  targetRef: {{ group: gateway.networking.k8s.io, kind: {kind}, name: {target} }}\n{body}"
    )
}

/// How many GETs on `path` are admitted in a minute (upstream 404s count as admitted).
async fn admitted(gw: &Gateway, path: &str) -> usize {
    let mut n = 0;
    loop {
        let r = client().get(gw.url(path)).send().await.unwrap();
        if r.status() == 429 {
            return n;
        }
        n += 1;
        assert!(n < 20, "never refused on {path}");
    }
}

#[tokio::test]
async fn kuadrant_composition_defaults_overrides_and_when() {
    let up = Upstream::start().await;
    let gw_defaults = rlp(
        "gw-defaults",
        "Gateway",
        "gw",
        "  limits:\n    gw: { rates: [{ limit: 2, window: 1m }] }\n",
    );
    let route_a = rlp(
        "route-a-limits",
        "HTTPRoute",
        "route-a",
        "  limits:\n    ra: { rates: [{ limit: 4, window: 1m }] }\n",
    );
    // Top-level `when` that never holds for GET: route b's policy still replaces the
    // gateway defaults there, and limits nothing.
    let route_b = rlp(
        "route-b-limits",
        "HTTPRoute",
        "route-b",
        "  when: [{ predicate: request.method == \"POST\" }]\n  limits:\n    rb: { rates: [{ limit: 1, window: 1m }] }\n",
    );
    let run = |policies: Vec<String>| {
        let text = format!("{COMPOSITION_BASE}{}", policies.concat());
        let path = scratch(&format!("composition-{}.yaml", rand_name(&text)), &text);
        start(&[path], &[("up", up.addr)])
    };
    // Bare limits on the Gateway are defaults the route's policy replaces.
    let gw = run(vec![gw_defaults.clone(), route_a.clone()]);
    assert_eq!(admitted(&gw, "/a/x").await, 4);
    assert_eq!(admitted(&gw, "/b/x").await, 2);
    drop(gw);
    let gw = run(vec![gw_defaults.clone(), route_a.clone(), route_b.clone()]);
    assert_eq!(admitted(&gw, "/a/x").await, 4);
    for _ in 0..5 {
        let r = client().get(gw.url("/b/x")).send().await.unwrap();
        assert_eq!(r.status(), 404, "GET on b is not limited");
    }
    drop(gw);
    // Overrides win: atomic takes the gateway's set alone; merge keeps the route's
    // differently named limit beside it.
    let overrides = |strategy: &str| {
        rlp(
            "gw-overrides",
            "Gateway",
            "gw",
            &format!("  overrides:\n    strategy: {strategy}\n    limits:\n      gw: {{ rates: [{{ limit: 3, window: 1m }}] }}\n"),
        )
    };
    let gw = run(vec![overrides("atomic"), route_a.clone()]);
    assert_eq!(admitted(&gw, "/a/x").await, 3);
    drop(gw);
    let route_a_small = rlp(
        "route-a-limits",
        "HTTPRoute",
        "route-a",
        "  limits:\n    ra: { rates: [{ limit: 2, window: 1m }] }\n",
    );
    let gw = run(vec![overrides("merge"), route_a_small]);
    assert_eq!(admitted(&gw, "/a/x").await, 2);
    // The gateway override's one counter is shared by both routes: a spent 2 of 3.
    assert_eq!(admitted(&gw, "/b/x").await, 1);
}

fn rand_name(text: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    format!("{:x}", h.finish())
}

#[test]
fn problems_name_document_field_and_line() {
    // An unknown field in a known kind's spec.
    let bad = scratch(
        "bad-field.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata: { name: s }\nstringData: { api_key: k }\n---\napiVersion: kuadrant.io/v1alpha1\nkind: TokenRateLimitPolicy\nmetadata:\n  name: p\nspec:\n  targetRef: { group: gateway.networking.k8s.io, kind: Gateway, name: g }\n  limits:\n    free:\n      ratez: []\n",
    );
    let (ok, _, err) = convert(&[bad], &[]);
    assert!(!ok);
    assert!(
        err.contains("document 2 (TokenRateLimitPolicy p) spec.limits.free"),
        "{err}"
    );
    assert!(err.contains(":14:"), "line of `ratez`: {err}");
    assert!(err.contains("unknown field `ratez`"), "{err}");
    // A misspelt top-level field is not a missing spec.
    let typo = scratch(
        "typo.yaml",
        "apiVersion: kuadrant.io/v1\nkind: RateLimitPolicy\nmetadata: { name: p }\nsepc: {}\n",
    );
    let (ok, _, err) = convert(&[typo], &[]);
    assert!(!ok);
    assert!(
        err.contains("(RateLimitPolicy p) sepc:4:1: unknown field `sepc`"),
        "{err}"
    );
    // A kind tollgate does not implement is refused by name.
    let ingress = scratch(
        "ingress.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: { name: web, namespace: shop }\nspec: {}\n",
    );
    let (ok, _, err) = convert(&[ingress], &[]);
    assert!(!ok);
    assert!(err.contains("Ingress shop/web"), "{err}");
    assert!(err.contains("does not implement"), "{err}");
    // CEL that does not compile: named at the predicate's line in the manifest.
    let cel = scratch(
        "bad-cel.yaml",
        &format!(
            "{COMPOSITION_BASE}{}",
            rlp(
                "p",
                "Gateway",
                "gw",
                "  limits:\n    l:\n      rates: [{ limit: 1, window: 1m }]\n      when:\n        - predicate: request.path ==\n",
            )
        ),
    );
    let (ok, _, err) = convert(&[cel], &[("up", "127.0.0.1:9".parse().unwrap())]);
    assert!(!ok);
    assert!(
        err.contains("RateLimitPolicy p) spec.limits.l.when[0].predicate"),
        "{err}"
    );
    assert!(err.contains("CEL does not compile"), "{err}");
}

#[test]
fn server_set_fields_are_ignored() {
    // As `kubectl get -o yaml` prints a resource.
    let text = format!(
        "{COMPOSITION_BASE}---\napiVersion: kuadrant.io/v1\nkind: RateLimitPolicy\nmetadata:\n  name: p\n  namespace: default\n  uid: 0b0e4c2a-1111-2222-3333-444455556666\n  resourceVersion: \"12345\"\n  generation: 2\n  creationTimestamp: \"2025-07-10T10:00:00Z\"\n  managedFields:\n  - manager: kubectl\n    operation: Update\n    fieldsV1: {{ f:spec: {{}} }}\nspec:\n  targetRef: {{ group: gateway.networking.k8s.io, kind: Gateway, name: gw }}\n  limits:\n    l: {{ rates: [{{ limit: 1, window: 1m }}] }}\nstatus:\n  conditions:\n  - type: Accepted\n    status: \"True\"\n    message: RateLimitPolicy has been accepted\n"
    );
    let (ok, out, err) = convert(
        &[scratch("kubectl-get.yaml", &text)],
        &[("up", "127.0.0.1:9".parse().unwrap())],
    );
    assert!(ok, "{err}");
    assert!(out.contains("name: p"), "{out}");
}

/// One step of a fixed sequence, for comparing two gateways.
enum Step<'a> {
    Send(Call<'a>),
    Advance(u64),
}

async fn decisions(gw: &Gateway, steps: &[Step<'_>]) -> Vec<String> {
    let mut out = Vec::new();
    for s in steps {
        match s {
            Step::Advance(ms) => gw.advance(*ms).await,
            Step::Send(c) => {
                let r = c.send(gw).await;
                let status = r.status().as_u16();
                let limit = r
                    .headers()
                    .get("x-ratelimit-limit-tokens")
                    .map(|v| v.to_str().unwrap().to_owned());
                let text = r.text().await.unwrap();
                let detail = serde_json::from_str::<Value>(&text)
                    .ok()
                    .map(|v| {
                        if status == 200 {
                            v["usage"]["total_tokens"].to_string()
                        } else {
                            format!("{} {}", v["error"]["code"], v["error"]["type"])
                        }
                    })
                    .unwrap_or_else(|| format!("{} bytes", text.len()));
                out.push(format!("{status} {limit:?} {detail}"));
            }
        }
    }
    out
}

async fn same_decisions(
    manifests: &[PathBuf],
    backends: &[(&str, SocketAddr)],
    steps: &[Step<'_>],
) -> Vec<String> {
    let (ok, yaml, err) = convert(manifests, backends);
    assert!(ok, "{err}");
    assert!(!yaml.contains("iamafreeuser"), "convert printed a key");
    let from_manifests = start(manifests, backends);
    let a = decisions(&from_manifests, steps).await;
    drop(from_manifests);
    let converted = Gateway::start(&yaml);
    let b = decisions(&converted, steps).await;
    assert_eq!(a, b, "converted config decides differently\n{yaml}");
    a
}

#[tokio::test]
async fn convert_output_decides_the_same() {
    use Step::*;
    // The Kuadrant tutorial: 401, 403, tiers, 429, the next minute.
    let host = Some(TUTORIAL_HOST);
    let chat = |key: &str, n| Send(Call::chat(host, apikey(key), SIM_MODEL, n));
    let steps = vec![
        Send(Call::chat(host, None, SIM_MODEL, 1)),
        chat("iamabronzeuser", 1),
        chat("iamafreeuser", 30),
        chat("iamafreeuser", 30),
        chat("iamafreeuser", 30),
        chat("iamagolduser", 150),
        chat("iamagolduser", 150),
        Advance(60_000),
        chat("iamafreeuser", 30),
    ];
    let d = same_decisions(&tutorial_manifests(), &[], &steps).await;
    assert!(d.iter().any(|x| x.starts_with("429")), "{d:?}");
    assert!(d.iter().any(|x| x.starts_with("403")), "{d:?}");

    // Gloo: the seed's JWT across the minute tier.
    let up = Upstream::start().await;
    let call = || Send(Call::chat(None, Some(alice()), "gpt-3.5-turbo", 44));
    let steps = vec![call(), call(), call(), call(), Advance(60_000), call()];
    let d = same_decisions(&[fixture("gloo-tiers")], &[("openai", up.addr)], &steps).await;
    assert!(d[3].starts_with("429"), "{d:?}");

    // agentgateway: all three policies, both routes.
    let a = |host, n| Send(Call::chat(Some(host), None, "gpt-4", n));
    let mut steps = Vec::new();
    for _ in 0..4 {
        steps.push(a("httpbun.example", 30));
    }
    for _ in 0..4 {
        steps.push(a("openai.example", 400));
    }
    steps.push(Advance(60_000));
    steps.push(a("httpbun.example", 30));
    let d = same_decisions(
        &agentgateway(&[
            "token-budget.yaml",
            "combined-limit.yaml",
            "gateway-token-limit.yaml",
        ]),
        &[("llm", up.addr)],
        &steps,
    )
    .await;
    assert!(
        d.iter().filter(|x| x.starts_with("429")).count() >= 2,
        "{d:?}"
    );
}

#[tokio::test]
async fn auth_policy_on_one_route_and_rule_section_names() {
    let up = Upstream::start().await;
    let text = format!(
        "{COMPOSITION_BASE}{}{}{}",
        r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: route-c }
spec:
  parentRefs: [{ name: gw }]
  rules:
  - name: slow
    matches: [{ path: { type: Exact, value: /c/slow } }]
    backendRefs: [{ name: up }]
  - name: fast
    matches: [{ path: { value: /c } }]
    backendRefs: [{ name: up }]
---
apiVersion: v1
kind: Secret
metadata: { name: k, labels: { app: a } }
stringData: { api_key: secret-a }
---
apiVersion: kuadrant.io/v1
kind: AuthPolicy
metadata: { name: only-a }
spec:
  targetRef: { group: gateway.networking.k8s.io, kind: HTTPRoute, name: route-a }
  rules:
    authentication:
      keys: { apiKey: { selector: { matchLabels: { app: a } } } }
"#,
        rlp(
            "slow-rule",
            "HTTPRoute",
            "route-c",
            "  limits:\n    one: { rates: [{ limit: 1, window: 1m }] }\n",
        )
        .replace("name: route-c }", "name: route-c, sectionName: slow }"),
        "\n"
    );
    let gw = start(&[scratch("auth-one-route.yaml", &text)], &[("up", up.addr)]);
    let get = |path: &'static str, key: Option<&'static str>| {
        let mut r = client().get(gw.url(path));
        if let Some(k) = key {
            r = r.header("authorization", format!("Bearer {k}"));
        }
        r.send()
    };
    // The AuthPolicy covers route-a only (the default prefix is Bearer).
    assert_eq!(get("/a/x", None).await.unwrap().status(), 401);
    assert_eq!(get("/a/x", Some("secret-a")).await.unwrap().status(), 404);
    assert_eq!(get("/b/x", None).await.unwrap().status(), 404);
    // The policy on rule `slow` limits that rule only.
    assert_eq!(get("/c/slow", None).await.unwrap().status(), 404);
    assert_eq!(get("/c/slow", None).await.unwrap().status(), 429);
    for _ in 0..3 {
        assert_eq!(get("/c/x", None).await.unwrap().status(), 404);
    }
}

#[tokio::test]
async fn manifests_on_top_of_a_native_config() {
    let up = Upstream::start().await;
    let native = format!(
        "backends:\n  - name: native-up\n    url: http://{}\nroutes:\n  - name: native\n    match: {{ path_prefix: /n }}\n    backend: native-up\npolicies:\n  - name: native-cap\n    kind: RateLimitPolicy\n    target: {{ route: native }}\n    limits:\n      all:\n        rates: [{{ limit: 1, window: 1m }}]\n",
        up.addr
    );
    let cfg = scratch("native.yaml", &native);
    let manifests = scratch(
        "with-native.yaml",
        &format!(
            "{COMPOSITION_BASE}{}",
            rlp(
                "gw-defaults",
                "Gateway",
                "gw",
                "  limits:\n    gw: { rates: [{ limit: 2, window: 1m }] }\n"
            )
        ),
    );
    let mut a = vec![OsString::from("-c"), cfg.into_os_string()];
    a.extend(args(&[manifests], &[("up", up.addr)]));
    let gw = Gateway::start_args(&a, &[], T0);
    assert_eq!(admitted(&gw, "/n/x").await, 1);
    assert_eq!(admitted(&gw, "/a/x").await, 2);
}

/// The same expressiveness in the native config, written by hand.
#[tokio::test]
async fn native_config_composition_when_and_opa() {
    let up = Upstream::start().await;
    let cfg = format!(
        r#"
backends:
  - name: up
    url: http://{}
routes:
  - name: a
    match: {{ path_prefix: /a }}
    backend: up
  - name: b
    match: {{ path_prefix: /b }}
    backend: up
auth:
  api_keys:
    keys:
      - key: k-team
        identity: {{ userid: u1, team: red }}
      - key: k-other
        identity: {{ userid: u2, team: blue }}
  opa:
    - name: red-team-only
      rego: |
        allow if {{ input.auth.identity.team == "red" }}
policies:
  - name: everywhere
    kind: RateLimitPolicy
    target: gateway
    when: [request.method == "GET"]
    defaults:
      limits:
        g: {{ rates: [{{ limit: 2, window: 1m }}] }}
  - name: on-a
    kind: RateLimitPolicy
    target: {{ route: a }}
    defaults:
      strategy: merge
      limits:
        ra: {{ rates: [{{ limit: 3, window: 1m }}] }}
"#,
        up.addr
    );
    let gw = Gateway::start(&cfg);
    let get = |path: &'static str, key: &'static str| {
        client()
            .get(gw.url(path))
            .header("authorization", format!("Bearer {key}"))
            .send()
    };
    assert_eq!(get("/a/x", "k-other").await.unwrap().status(), 403);
    // Merge on a: the gateway's `g` (2) and a's `ra` (3) both apply; b has `g` only.
    assert_eq!(get("/a/x", "k-team").await.unwrap().status(), 404);
    assert_eq!(get("/a/x", "k-team").await.unwrap().status(), 404);
    assert_eq!(get("/a/x", "k-team").await.unwrap().status(), 429);
    // The policy-level `when`: POSTs are not counted by `everywhere`.
    let r = client()
        .post(gw.url("/b/x"))
        .header("authorization", "Bearer k-team")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // `g` is one counter for both routes: a spent it.
    assert_eq!(get("/b/x", "k-team").await.unwrap().status(), 429);

    // One of limits / defaults / overrides per policy.
    let bad = cfg.replace(
        "    defaults:\n      strategy: merge",
        "    limits:\n      x: { rates: [{ limit: 1, window: 1m }] }\n    defaults:\n      strategy: merge",
    );
    let out = Command::new(bin())
        .args(["validate", "-c"])
        .arg(scratch("native-bad.yaml", &bad))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("give one of `limits`, `defaults` and `overrides`, not limits and defaults"),
        "{err}"
    );
}

#[test]
fn validate_reads_manifests() {
    let run = |extra: &[&str]| {
        Command::new(bin())
            .arg("validate")
            .args(args(&[fixture("gloo-tiers")], &[]))
            .args(extra)
            .output()
            .unwrap()
    };
    // The Service has no URL until one is given.
    let out = run(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("give --backend openai=URL"), "{err}");
    let out = run(&["--backend", "openai=http://127.0.0.1:9"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Hot reload of manifests: a manifest folder is watched; editing a limit in one of its
/// files re-translates and swaps the runtime (no restart, spend kept); a broken
/// manifest is refused and the old config keeps serving; SIGHUP reloads too.
#[tokio::test]
async fn manifests_reload_on_change_and_sighup() {
    let up = Upstream::start().await;
    let dir =
        std::env::temp_dir().join(format!("tollgate-manifests-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["before-you-begin.yaml", "combined-limit.yaml"] {
        std::fs::copy(fixture(&format!("agentgateway/{f}")), dir.join(f)).unwrap();
    }
    let limits = dir.join("combined-limit.yaml");
    let original = std::fs::read_to_string(&limits).unwrap();
    assert!(original.contains("tokens: 1000"));
    // As editors and ConfigMaps do: write aside (not a manifest name), rename.
    let rewrite = |text: &str| {
        let tmp = dir.join("combined-limit.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &limits).unwrap();
    };
    let gw = start(std::slice::from_ref(&dir), &[("llm", up.addr)]);
    let call = Call::chat(Some("openai.example"), None, "gpt-4", 2);
    let limit_tokens = |r: &reqwest::Response| {
        r.headers()["x-ratelimit-limit-tokens"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    let r = call.send(&gw).await;
    assert_eq!(r.status(), 200);
    assert_eq!(limit_tokens(&r), "1000");
    // Other files in the folder do not wake the reloader.
    std::fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    assert_eq!(gw.status().await["last_reload"]["checks"], 0);

    rewrite(&original.replace("tokens: 1000", "tokens: 400"));
    let st = gw.wait_reloads(0).await;
    assert_eq!(st["last_reload"]["ok"], true, "{st}");
    // Reading every manifest to reload is no change: it stays quiet afterwards.
    let checks = st["last_reload"]["checks"].as_u64().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    assert_eq!(
        gw.status().await["last_reload"]["checks"].as_u64().unwrap(),
        checks
    );
    let r = call.send(&gw).await;
    assert_eq!(r.status(), 200);
    assert_eq!(limit_tokens(&r), "400");
    let remaining: u64 = r.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        remaining < 400,
        "the spend before the reload was kept: {remaining}"
    );

    // A broken manifest is refused, named; the old config keeps serving.
    rewrite(&original.replace("tokens: 1000", "tokens: lots"));
    let st = gw.wait_reloads(1).await;
    assert_eq!(st["last_reload"]["ok"], false, "{st}");
    let error = st["last_reload"]["error"].as_str().unwrap();
    assert!(error.contains("combined-limit.yaml"), "{error}");
    let r = call.send(&gw).await;
    assert_eq!(r.status(), 200);
    assert_eq!(limit_tokens(&r), "400");

    // Fixed in place, and SIGHUP.
    std::fs::write(&limits, original.replace("tokens: 1000", "tokens: 500")).unwrap();
    gw.signal("HUP");
    let st = gw.wait_reloads(2).await;
    assert_eq!(st["last_reload"]["ok"], true, "{st}");
    let r = call.send(&gw).await;
    assert_eq!(limit_tokens(&r), "500");
    let _ = std::fs::remove_dir_all(&dir);
}

/// agentgateway `local` limits convert to `scope: shared` (one budget for all replicas
/// on Redis), printed so an operator can switch to `replica`, agentgateway's own
/// per-replica meaning; the edited config loads, and in memory decides the same.
#[tokio::test]
async fn convert_prints_the_scope_of_agentgateway_limits() {
    let up = Upstream::start().await;
    let (ok, yaml, err) = convert(&agentgateway(&["token-budget.yaml"]), &[("llm", up.addr)]);
    assert!(ok, "{err}");
    assert!(yaml.contains("scope: shared"), "{yaml}");
    let replica = yaml.replace("scope: shared", "scope: replica");
    let gw = Gateway::start(&replica);
    let cfg: Value = client()
        .get(gw.admin_url("/admin/config"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(cfg.to_string().contains(r#""scope":"replica""#), "{cfg}");
    let (spent, last, _) = drain(&gw, &seed_request("httpbun.example", false), 10).await;
    assert!(spent >= 100 && spent - last < 100, "{spent}");
}
