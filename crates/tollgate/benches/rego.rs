//! OPA Rego authorization as the request path runs it: the Kuadrant tutorial's rule,
//! one evaluation (engine clone + input + `allow`) per request.
//!
//! `cargo bench -p tollgate --bench rego`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate::auth::rego::RegoRule;

const TUTORIAL: &str = r#"groups := split(object.get(input.auth.identity.metadata.annotations, "kuadrant.io/groups", ""), ",")
allow { groups[_] == "free" }
allow { groups[_] == "gold" }
"#;

fn bench(c: &mut Criterion) {
    let rule = RegoRule::compile(0, "allow-groups", TUTORIAL).unwrap();
    let input = serde_json::json!({
        "auth": {"identity": {"metadata": {"annotations": {"kuadrant.io/groups": "gold"}}}},
        "request": {"method": "POST", "path": "/v1/chat/completions", "host": "h", "headers": {}},
    });
    c.bench_function("rego tutorial allow-groups", |b| {
        b.iter(|| assert!(rule.allows(&input).unwrap()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
