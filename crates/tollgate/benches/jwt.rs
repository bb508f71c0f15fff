//! JWT verification through `JwtAuth::verify`: RS256 uncached (cache off, so every call
//! verifies the signature) vs cached (hash lookup + exp check).
//!
//! `cargo bench -p tollgate --bench jwt`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use tollgate::auth::jwt::{JwtAuth, JwtConfig};

const NOW: u64 = 1_800_000_000;

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/jwt/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn auth(max_entries: u64) -> JwtAuth {
    let cfg: JwtConfig = serde_json::from_value(serde_json::json!({
        "providers": [{
            "name": "bench",
            "issuer": "bench-issuer",
            "public_key_pem": fixture("rsa_a.pub.pem"),
            "identity": {"userid": "claims.sub"},
        }],
        "cache": {"max_entries": max_entries},
    }))
    .unwrap();
    JwtAuth::build(&cfg, "auth.jwt").unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let token = encode(
        &Header::new(Algorithm::RS256),
        &serde_json::json!({
            "iss": "bench-issuer", "sub": "user-1", "exp": NOW + 3600,
            "team": "dev", "llms": {"openai": ["gpt-4o-mini"]},
        }),
        &EncodingKey::from_rsa_pem(fixture("rsa_a.key.pem").as_bytes()).unwrap(),
    )
    .unwrap();

    let uncached = auth(0);
    let cached = auth(10_000);
    rt.block_on(cached.verify(&token, NOW)).unwrap();

    let mut g = c.benchmark_group("jwt_verify_rs256");
    g.bench_function("uncached", |b| {
        b.iter(|| rt.block_on(uncached.verify(&token, NOW)).unwrap())
    });
    g.bench_function("cached", |b| {
        b.iter(|| rt.block_on(cached.verify(&token, NOW)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
