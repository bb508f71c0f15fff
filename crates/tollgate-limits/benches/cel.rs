//! CEL per request for the Kuadrant tutorial's policy: build the request's attributes,
//! evaluate both limits' predicates and the counter key (`plan`), as the proxy does.
//!
//! `cargo bench -p tollgate-limits --bench cel -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate_limits::cel::{self, Attrs, Expr};
use tollgate_limits::policy::{
    plan, Accounting, Anchor, CompiledLimit, CompiledPolicy, Mode, OnError, PlanRequest,
    PolicyKind, RateSpec, Target,
};

fn limit(name: &str, group: &str, n: u64) -> CompiledLimit {
    CompiledLimit {
        name: Arc::from(name),
        rates: vec![RateSpec {
            limit: n,
            window_ms: 60_000,
            burst: None,
        }],
        when: vec![
            Expr::compile(r#"request.path == "/v1/chat/completions""#)
                .unwrap_or_else(|e| panic!("{e}")),
            Expr::compile(&format!(
                r#"auth.identity.groups.split(",").exists(g, g == "{group}")"#
            ))
            .unwrap_or_else(|e| panic!("{e}")),
        ],
        counters: vec![Expr::compile("auth.identity.userid").unwrap_or_else(|e| panic!("{e}"))],
        on_error: OnError::Skip,
        anchor: Anchor::Epoch,
        max_in_flight: None,
    }
}

fn attrs() -> Attrs {
    let mut a = Attrs::new();
    a.set(
        "request",
        cel::map([
            ("method", cel::string("POST")),
            ("path", cel::string("/v1/chat/completions")),
            ("host", cel::string("trlp-tutorial.example.com")),
            ("model", cel::string("meta-llama/Llama-3.1-8B-Instruct")),
        ]),
    );
    a.set(
        "auth",
        cel::map([(
            "identity",
            cel::map([
                ("userid", cel::string("user-1")),
                ("groups", cel::string("free")),
            ]),
        )]),
    );
    a
}

fn bench(c: &mut Criterion) {
    let policies = vec![CompiledPolicy {
        name: Arc::from("trlp-tutorial-token-limits"),
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
    }];
    let split = Expr::compile(r#"auth.identity.groups.split(",").exists(g, g == "free")"#)
        .unwrap_or_else(|e| panic!("{e}"));
    c.bench_function("cel: split().exists() predicate (direct evaluator)", |b| {
        let a = attrs();
        let _ = split.eval_bool(&a);
        b.iter(|| black_box(split.eval_bool(black_box(&a))))
    });
    c.bench_function(
        "cel: split().exists() predicate (interpreter, context built)",
        |b| {
            let a = attrs();
            let _ = split.interpret(&a);
            b.iter(|| black_box(split.interpret(black_box(&a))))
        },
    );
    c.bench_function(
        "cel: tutorial plan per request (attributes + 4 predicates + key)",
        |b| {
            b.iter(|| {
                let a = attrs();
                let p = plan(
                    &policies,
                    &PlanRequest {
                        route: "llm",
                        is_llm_call: true,
                        attrs: &a,
                        estimate: None,
                        pre_auth: false,
                    },
                );
                black_box(p.ops.len())
            })
        },
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
