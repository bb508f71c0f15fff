//! JWT parsing and verification on arbitrary credentials, against one provider per key
//! kind (RS256, ES256, EdDSA, HS256, a JWKS file, Gloo's Alice key).
//!
//! Invariant: only the seed tokens minted with the real keys (`seeds/jwt/valid-*.jwt`,
//! made by `seeds/gen_jwt_seeds.py`) are ever accepted. Any other token that verifies
//! (alg none, alg confusion, a tampered header, payload or signature) is a crash.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use tollgate::auth::jwt::{JwtAuth, JwtConfig};

/// The verifier's clock (seconds): the seeds expire in 2100, `bad-expired` in 2001.
const NOW: u64 = 1_800_000_000;

macro_rules! fixture {
    ($name:literal) => {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../crates/tollgate/tests/fixtures/jwt/",
            $name
        )
    };
}

const VALID: [&str; 7] = [
    include_str!("../seeds/jwt/valid-rs256.jwt"),
    include_str!("../seeds/jwt/valid-es256.jwt"),
    include_str!("../seeds/jwt/valid-eddsa.jwt"),
    include_str!("../seeds/jwt/valid-hs256.jwt"),
    include_str!("../seeds/jwt/valid-jwks-rs256.jwt"),
    include_str!("../seeds/jwt/valid-jwks-es256.jwt"),
    include_str!("../seeds/jwt/valid-alice.jwt"),
];

struct Harness {
    runtime: tokio::runtime::Runtime,
    auth: JwtAuth,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let pem = |s: &str| json!(s);
        let cfg: JwtConfig = serde_json::from_value(json!({
            "providers": [
                {"name": "rsa", "issuer": "rsa-issuer", "audiences": ["tollgate"], "require_exp": true,
                 "public_key_pem": pem(include_str!(fixture!("rsa_a.pub.pem")))},
                {"name": "ec", "issuer": "ec-issuer", "audiences": ["tollgate"],
                 "public_key_pem": pem(include_str!(fixture!("ec_p256.pub.pem")))},
                {"name": "ed", "issuer": "ed-issuer",
                 "public_key_pem": pem(include_str!(fixture!("ed25519.pub.pem")))},
                {"name": "hs", "issuer": "hs-issuer", "hs256_secret_file": fixture!("hs256.secret")},
                {"name": "jwks", "issuer": "jwks-issuer", "jwks_file": fixture!("jwks_mixed.json")},
                {"name": "alice", "issuer": "solo.io",
                 "public_key_pem": pem(include_str!(fixture!("alice.pub.pem"))),
                 "identity": {"userid": "claims.sub", "first_llm": "claims.llms.openai[0]"}},
            ],
            // Every input is verified, never answered from the cache.
            "cache": {"max_entries": 0},
        }))
        .unwrap_or_else(|e| panic!("fuzz JWT config: {e}"));
        let auth = JwtAuth::build(&cfg, "auth.jwt")
            .unwrap_or_else(|problems| panic!("fuzz JWT providers: {problems:?}"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("tokio: {e}"));
        Harness { runtime, auth }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let h = harness();
    let _ = tollgate::auth::jwt::looks_like_jwt(token);
    if let Ok(identity) = h.runtime.block_on(h.auth.verify(token, NOW)) {
        assert!(
            VALID.contains(&token),
            "accepted a token that was not minted with the keys: {token:?} as {identity:?}"
        );
    }
});
