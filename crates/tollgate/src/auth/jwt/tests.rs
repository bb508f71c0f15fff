#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::Full;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

use super::*;

/// The engine clock in these tests (seconds).
const NOW: u64 = 1_800_000_000;

fn fixture_path(name: &str) -> String {
    format!("{}/tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(fixture_path(name)).unwrap()
}

fn alice_token() -> String {
    fixture("alice.jwt").trim().to_owned()
}

fn config(providers: serde_json::Value) -> JwtConfig {
    serde_json::from_value(json!({ "providers": providers })).unwrap()
}

fn build(providers: serde_json::Value) -> JwtAuth {
    JwtAuth::build(&config(providers), "auth.jwt").unwrap()
}

fn alice_provider() -> serde_json::Value {
    json!({
        "name": "selfminted",
        "issuer": "solo.io",
        "public_key_pem": fixture("alice.pub.pem"),
        "identity": {
            "userid": "claims.sub",
            "first_llm": "claims.llms.openai[0]",
            "tier": "claims.tier",
        },
    })
}

/// RSA key A as a static PEM provider for issuer `rsa-issuer`.
fn rsa_provider(extra: serde_json::Value) -> serde_json::Value {
    let mut p = json!({
        "name": "rsa",
        "issuer": "rsa-issuer",
        "public_key_pem": fixture("rsa_a.pub.pem"),
    });
    if let (Some(p), serde_json::Value::Object(extra)) = (p.as_object_mut(), extra) {
        p.extend(extra);
    }
    p
}

fn encoding_key(alg: Algorithm, key_file: &str) -> EncodingKey {
    let pem = fixture(key_file);
    match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(pem.as_bytes()).unwrap(),
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            EncodingKey::from_secret(pem.trim_end_matches('\n').as_bytes())
        }
        _ => EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
    }
}

fn mint(alg: Algorithm, kid: Option<&str>, key_file: &str, claims: serde_json::Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, &claims, &encoding_key(alg, key_file)).unwrap()
}

fn b64(json: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(json).unwrap())
}

/// `auth` for CEL, as the pipeline will build it.
fn eval_bool(identity: &Identity, expr: &str) -> bool {
    let mut attrs = Attrs::new();
    attrs.set("auth", identity.to_cel());
    Expr::compile(expr).unwrap().eval_bool(&attrs).unwrap()
}

#[tokio::test]
async fn alice_token_from_the_seed_verifies_with_its_public_key() {
    let auth = build(json!([alice_provider()]));
    let id = auth.verify(&alice_token(), NOW).await.unwrap();
    assert_eq!(id.method, "jwt");
    assert_eq!(&*id.label, "alice");
    assert!(eval_bool(&id, "auth.method == 'jwt'"));
    assert!(eval_bool(&id, "auth.identity.team == 'dev'"));
    assert!(eval_bool(&id, "auth.identity.org == 'solo.io'"));
    assert!(eval_bool(
        &id,
        "auth.identity.llms.openai.exists(m, m == 'gpt-3.5-turbo')"
    ));
    // Configured identity fields, evaluated over `claims`.
    assert!(eval_bool(&id, "auth.identity.userid == 'alice'"));
    assert!(eval_bool(&id, "auth.identity.first_llm == 'gpt-3.5-turbo'"));
    // `claims.tier` fails for this token: the field is left out, the token still passes.
    assert!(eval_bool(&id, "!has(auth.identity.tier)"));
    assert_eq!(auth.signature_verifications(), 1);
}

#[tokio::test]
async fn refuses_alg_none() {
    let auth = build(json!([alice_provider()]));
    let payload = alice_token().split('.').nth(1).unwrap().to_owned();
    for alg in ["none", "None", "NONE"] {
        let header = b64(&json!({"alg": alg, "typ": "JWT"}));
        for sig in ["", "e30"] {
            let token = format!("{header}.{payload}.{sig}");
            assert!(looks_like_jwt(&token));
            assert_eq!(
                auth.verify(&token, NOW).await.unwrap_err(),
                JwtError::AlgorithmNotAllowed,
                "{alg} {sig:?}"
            );
        }
    }
    assert_eq!(auth.signature_verifications(), 0);
}

#[tokio::test]
async fn refuses_hs256_signed_with_the_rsa_public_key() {
    let auth = build(json!([alice_provider()]));
    let claims = json!({"iss": "solo.io", "sub": "mallory", "team": "admin"});
    // The classic confusion: the RSA public key's PEM bytes used as the HMAC secret.
    let pem = fixture("alice.pub.pem");
    for secret in [pem.as_bytes(), pem.trim().as_bytes()] {
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap();
        assert_eq!(
            auth.verify(&token, NOW).await.unwrap_err(),
            JwtError::AlgorithmNotAllowed
        );
    }
    assert_eq!(auth.signature_verifications(), 0);
}

#[tokio::test]
async fn refuses_wrong_or_missing_issuer() {
    let auth = build(json!([rsa_provider(json!({}))]));
    let wrong = mint(
        Algorithm::RS256,
        None,
        "rsa_a.key.pem",
        json!({"iss": "someone-else", "sub": "x"}),
    );
    assert_eq!(
        auth.verify(&wrong, NOW).await.unwrap_err(),
        JwtError::UnknownIssuer
    );
    let none = mint(Algorithm::RS256, None, "rsa_a.key.pem", json!({"sub": "x"}));
    assert_eq!(
        auth.verify(&none, NOW).await.unwrap_err(),
        JwtError::UnknownIssuer
    );
    let not_string = mint(Algorithm::RS256, None, "rsa_a.key.pem", json!({"iss": 7}));
    assert_eq!(
        auth.verify(&not_string, NOW).await.unwrap_err(),
        JwtError::UnknownIssuer
    );
    // Alice's token, whose issuer no provider here has.
    assert_eq!(
        auth.verify(&alice_token(), NOW).await.unwrap_err(),
        JwtError::UnknownIssuer
    );
    assert_eq!(auth.signature_verifications(), 0);
}

#[tokio::test]
async fn exp_and_nbf_use_the_engine_clock_with_leeway() {
    let auth = build(json!([rsa_provider(json!({"leeway": "30s"}))]));
    let exp = NOW + 100;
    let token = mint(
        Algorithm::RS256,
        None,
        "rsa_a.key.pem",
        json!({"iss": "rsa-issuer", "sub": "u", "exp": exp}),
    );
    // Past exp, inside the leeway (served by a fresh verify, not the cache).
    assert!(auth.verify(&token, exp + 29).await.is_ok());
    assert_eq!(
        auth.verify(&token, exp + 30).await.unwrap_err(),
        JwtError::Expired
    );
    assert_eq!(
        auth.verify(&token, exp + 10_000).await.unwrap_err(),
        JwtError::Expired
    );

    let nbf = NOW + 100;
    let token = mint(
        Algorithm::RS256,
        None,
        "rsa_a.key.pem",
        json!({"iss": "rsa-issuer", "sub": "u", "nbf": nbf}),
    );
    assert_eq!(
        auth.verify(&token, NOW).await.unwrap_err(),
        JwtError::NotYetValid
    );
    assert_eq!(
        auth.verify(&token, nbf - 31).await.unwrap_err(),
        JwtError::NotYetValid
    );
    assert!(auth.verify(&token, nbf - 30).await.is_ok());

    let bad = mint(
        Algorithm::RS256,
        None,
        "rsa_a.key.pem",
        json!({"iss": "rsa-issuer", "exp": "tomorrow"}),
    );
    assert_eq!(
        auth.verify(&bad, NOW).await.unwrap_err(),
        JwtError::InvalidClaim("exp")
    );
}

#[tokio::test]
async fn require_exp_refuses_tokens_without_one() {
    let auth = build(json!([rsa_provider(json!({"require_exp": true}))]));
    let token = mint(
        Algorithm::RS256,
        None,
        "rsa_a.key.pem",
        json!({"iss": "rsa-issuer"}),
    );
    assert_eq!(
        auth.verify(&token, NOW).await.unwrap_err(),
        JwtError::MissingExp
    );
    let token = mint(
        Algorithm::RS256,
        None,
        "rsa_a.key.pem",
        json!({"iss": "rsa-issuer", "exp": NOW + 60}),
    );
    assert!(auth.verify(&token, NOW).await.is_ok());
    // The seed's token has no exp: fine by default, refused with require_exp.
    let mut p = alice_provider();
    p["require_exp"] = json!(true);
    let strict = build(json!([p]));
    assert_eq!(
        strict.verify(&alice_token(), NOW).await.unwrap_err(),
        JwtError::MissingExp
    );
}

#[tokio::test]
async fn refuses_bad_signature_and_tampered_payload() {
    let auth = build(json!([alice_provider()]));
    let token = alice_token();
    let (signed, sig) = token.rsplit_once('.').unwrap();

    // One signature character changed (in the middle: every bit there counts).
    let mut sig_bytes = sig.as_bytes().to_vec();
    sig_bytes[40] = if sig_bytes[40] == b'A' { b'B' } else { b'A' };
    let bad_sig = format!("{signed}.{}", String::from_utf8(sig_bytes).unwrap());
    assert_eq!(
        auth.verify(&bad_sig, NOW).await.unwrap_err(),
        JwtError::BadSignature
    );

    // Alice promotes herself: same header and signature, new payload.
    let header = token.split('.').next().unwrap();
    let payload = b64(&json!({
        "iss": "solo.io", "org": "solo.io", "sub": "alice", "team": "admin",
        "llms": {"openai": ["gpt-4o"]}
    }));
    let tampered = format!("{header}.{payload}.{sig}");
    assert_eq!(
        auth.verify(&tampered, NOW).await.unwrap_err(),
        JwtError::BadSignature
    );

    // Signed by another RSA key.
    let other = mint(
        Algorithm::RS256,
        None,
        "rsa_b.key.pem",
        json!({"iss": "solo.io", "sub": "alice"}),
    );
    assert_eq!(
        auth.verify(&other, NOW).await.unwrap_err(),
        JwtError::BadSignature
    );
    assert_eq!(auth.signature_verifications(), 3);
}

#[tokio::test]
async fn refuses_garbage_and_oversized_tokens() {
    let auth = build(json!([alice_provider()]));
    let header = b64(&json!({"alg": "RS256"}));
    let payload = b64(&json!({"iss": "solo.io"}));
    for garbage in [
        "",
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        "abc.def.ghi",
        "....",
        &format!("{header}.!!!.sig"),
        &format!("{header}.{payload}.sig+/="),
        &format!("{}.{payload}.c2ln", b64(&json!(["RS256"]))),
        &format!("{}.{payload}.c2ln", b64(&json!({"typ": "JWT"}))),
        &format!("{}.{payload}.c2ln", b64(&json!({"alg": "RS256", "kid": 5}))),
        &format!("{header}.{}.c2ln", b64(&json!("just a string"))),
        &format!("{header}.{payload}.%%%"),
    ] {
        assert_eq!(
            auth.verify(garbage, NOW).await.unwrap_err(),
            JwtError::Malformed,
            "{garbage:?}"
        );
    }
    // Well-formed but not base64 of anything signed: a signature that does not decode.
    let junk_sig = format!("{header}.{payload}.AAAA");
    assert_eq!(
        auth.verify(&junk_sig, NOW).await.unwrap_err(),
        JwtError::BadSignature
    );

    let big = format!("{header}.{}.c2ln", "A".repeat(MAX_TOKEN_BYTES));
    assert_eq!(
        auth.verify(&big, NOW).await.unwrap_err(),
        JwtError::TooLarge
    );
    assert_eq!(JwtError::TooLarge.to_string(), "token too large");
}

#[tokio::test]
async fn audience_is_checked_when_configured() {
    let auth = build(json!([rsa_provider(
        json!({"audiences": ["tollgate", "gw"]})
    )]));
    let mint_aud = |aud: serde_json::Value| {
        let mut claims = json!({"iss": "rsa-issuer", "sub": "u"});
        if !aud.is_null() {
            claims["aud"] = aud;
        }
        mint(Algorithm::RS256, None, "rsa_a.key.pem", claims)
    };
    assert!(auth.verify(&mint_aud(json!("tollgate")), NOW).await.is_ok());
    assert!(auth
        .verify(&mint_aud(json!(["x", "gw"])), NOW)
        .await
        .is_ok());
    for aud in [json!("other"), json!(["x", "y"]), json!(null)] {
        assert_eq!(
            auth.verify(&mint_aud(aud.clone()), NOW).await.unwrap_err(),
            JwtError::WrongAudience,
            "{aud}"
        );
    }
    // Without `audiences`, any aud (or none) is accepted.
    let open = build(json!([rsa_provider(json!({}))]));
    assert!(open.verify(&mint_aud(json!("anything")), NOW).await.is_ok());
}

#[tokio::test]
async fn hs256_only_with_a_configured_secret() {
    let auth = build(json!([{
        "name": "shared",
        "issuer": "hs-issuer",
        "hs256_secret_file": fixture_path("hs256.secret"),
    }]));
    let claims = json!({"iss": "hs-issuer", "sub": "svc", "exp": NOW + 60});
    let token = mint(Algorithm::HS256, None, "hs256.secret", claims.clone());
    let id = auth.verify(&token, NOW).await.unwrap();
    assert_eq!(&*id.label, "svc");

    let wrong = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(b"another secret that is long enough to pass"),
    )
    .unwrap();
    assert_eq!(
        auth.verify(&wrong, NOW).await.unwrap_err(),
        JwtError::BadSignature
    );
    // Other HMAC sizes and asymmetric algorithms are not this provider's.
    let hs384 = mint(Algorithm::HS384, None, "hs256.secret", claims.clone());
    assert_eq!(
        auth.verify(&hs384, NOW).await.unwrap_err(),
        JwtError::AlgorithmNotAllowed
    );
    let rs = mint(Algorithm::RS256, None, "rsa_a.key.pem", claims);
    assert_eq!(
        auth.verify(&rs, NOW).await.unwrap_err(),
        JwtError::AlgorithmNotAllowed
    );
}

#[tokio::test]
async fn es256_eddsa_and_ps256_verify() {
    let auth = build(json!([
        {"name": "ec", "issuer": "ec-issuer", "public_key_pem": fixture("ec_p256.pub.pem")},
        {"name": "ed", "issuer": "ed-issuer", "public_key_pem": fixture("ed25519.pub.pem")},
        rsa_provider(json!({})),
    ]));
    for (alg, key, iss) in [
        (Algorithm::ES256, "ec_p256.key.pem", "ec-issuer"),
        (Algorithm::EdDSA, "ed25519.key.pem", "ed-issuer"),
        (Algorithm::PS256, "rsa_a.key.pem", "rsa-issuer"),
        (Algorithm::PS384, "rsa_a.key.pem", "rsa-issuer"),
        (Algorithm::PS512, "rsa_a.key.pem", "rsa-issuer"),
        (Algorithm::RS384, "rsa_a.key.pem", "rsa-issuer"),
        (Algorithm::RS512, "rsa_a.key.pem", "rsa-issuer"),
    ] {
        let token = mint(
            alg,
            None,
            key,
            json!({"iss": iss, "sub": format!("{alg:?}")}),
        );
        let id = auth
            .verify(&token, NOW)
            .await
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(&*id.label, format!("{alg:?}"));
    }
    // An EC token at the Ed25519 provider, an Ed token at the EC provider.
    let cross = mint(
        Algorithm::ES256,
        None,
        "ec_p256.key.pem",
        json!({"iss": "ed-issuer"}),
    );
    assert_eq!(
        auth.verify(&cross, NOW).await.unwrap_err(),
        JwtError::AlgorithmNotAllowed
    );
    let cross = mint(
        Algorithm::EdDSA,
        None,
        "ed25519.key.pem",
        json!({"iss": "ec-issuer"}),
    );
    assert_eq!(
        auth.verify(&cross, NOW).await.unwrap_err(),
        JwtError::AlgorithmNotAllowed
    );
}

#[tokio::test]
async fn jwks_file_with_every_key_type() {
    let auth = build(json!([{
        "name": "mixed",
        "issuer": "mixed-issuer",
        "jwks_file": fixture_path("jwks_mixed.json"),
    }]));
    for (alg, kid, key) in [
        (Algorithm::RS256, "rsa-a", "rsa_a.key.pem"),
        (Algorithm::PS256, "rsa-a", "rsa_a.key.pem"),
        (Algorithm::ES256, "ec-p256", "ec_p256.key.pem"),
        (Algorithm::EdDSA, "ed-1", "ed25519.key.pem"),
    ] {
        let token = mint(
            alg,
            Some(kid),
            key,
            json!({"iss": "mixed-issuer", "sub": kid}),
        );
        auth.verify(&token, NOW)
            .await
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
    }
    // The `use: enc` entry is skipped, so its kid is unknown.
    let enc = mint(
        Algorithm::RS256,
        Some("rsa-b-enc"),
        "rsa_b.key.pem",
        json!({"iss": "mixed-issuer"}),
    );
    assert_eq!(
        auth.verify(&enc, NOW).await.unwrap_err(),
        JwtError::UnknownKey
    );
    // A kid naming an EC key, with an RSA algorithm: no key matches both.
    let wrong_alg = mint(
        Algorithm::RS256,
        Some("ec-p256"),
        "rsa_a.key.pem",
        json!({"iss": "mixed-issuer"}),
    );
    assert_eq!(
        auth.verify(&wrong_alg, NOW).await.unwrap_err(),
        JwtError::UnknownKey
    );
    // No kid: every key of the right type is tried.
    let no_kid = mint(
        Algorithm::EdDSA,
        None,
        "ed25519.key.pem",
        json!({"iss": "mixed-issuer"}),
    );
    assert!(auth.verify(&no_kid, NOW).await.is_ok());
}

#[tokio::test]
async fn cache_skips_verification_and_never_outlives_exp() {
    let auth = build(json!([rsa_provider(json!({}))]));
    let exp = NOW + 600;
    let token = mint(
        Algorithm::RS256,
        None,
        "rsa_a.key.pem",
        json!({"iss": "rsa-issuer", "sub": "cached", "exp": exp}),
    );
    let first = auth.verify(&token, NOW).await.unwrap();
    assert_eq!(auth.signature_verifications(), 1);
    let second = auth.verify(&token, NOW + 1).await.unwrap();
    assert_eq!(
        auth.signature_verifications(),
        1,
        "second verify was not cached"
    );
    assert_eq!(first.label, second.label);
    assert!(eval_bool(&second, "auth.identity.sub == 'cached'"));

    // At exp the entry is not served; the full verify still allows the leeway...
    assert!(auth.verify(&token, exp).await.is_ok());
    assert_eq!(auth.signature_verifications(), 2);
    // ...and past exp + leeway the token is refused, cached or not.
    assert_eq!(
        auth.verify(&token, exp + 30).await.unwrap_err(),
        JwtError::Expired
    );
    assert_eq!(auth.signature_verifications(), 3);

    // Refusals are not cached.
    let untrusted = mint(
        Algorithm::RS256,
        None,
        "rsa_b.key.pem",
        json!({"iss": "rsa-issuer"}),
    );
    for _ in 0..2 {
        assert_eq!(
            auth.verify(&untrusted, NOW).await.unwrap_err(),
            JwtError::BadSignature
        );
    }
    assert_eq!(auth.signature_verifications(), 5);

    // The cache can be turned off.
    let mut cfg = config(json!([rsa_provider(json!({}))]));
    cfg.cache.max_entries = 0;
    let uncached = JwtAuth::build(&cfg, "auth.jwt").unwrap();
    for _ in 0..3 {
        uncached.verify(&token, NOW).await.unwrap();
    }
    assert_eq!(uncached.signature_verifications(), 3);
}

/// A JWKS server on 127.0.0.1:0 whose answer the test changes, counting requests.
struct JwksServer {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    answer: Arc<Mutex<(u16, String)>>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(body: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let answer = Arc::new(Mutex::new((200u16, body)));
        let (h, a) = (hits.clone(), answer.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (h, a) = (h.clone(), a.clone());
                let svc = hyper::service::service_fn(move |_req| {
                    h.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = a.lock().unwrap().clone();
                    async move {
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
                );
            }
        });
        Self {
            addr,
            hits,
            answer,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    fn serve(&self, status: u16, body: String) {
        *self.answer.lock().unwrap() = (status, body);
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn url_provider(url: &str) -> serde_json::Value {
    json!([{"name": "idp", "issuer": "https://idp.example", "jwks_url": url}])
}

fn idp_token(kid: &str, key: &str, sub: &str) -> String {
    mint(
        Algorithm::RS256,
        Some(kid),
        key,
        json!({"iss": "https://idp.example", "sub": sub, "exp": NOW + 3600}),
    )
}

#[tokio::test]
async fn jwks_url_rotation_refreshes_on_unknown_kid_rate_limited() {
    let server = JwksServer::start(fixture("jwks_a.json")).await;
    let auth = build(url_provider(&server.url()));

    // No keys yet: the first token fetches set A.
    let a = idp_token("rsa-a", "rsa_a.key.pem", "a1");
    auth.verify(&a, NOW).await.unwrap();
    assert_eq!(server.hits(), 1);

    // The issuer rotates to set B. A token with the new kid inside the rate-limit window
    // does not fetch and is refused...
    server.serve(200, fixture("jwks_b.json"));
    let b = idp_token("rsa-b", "rsa_b.key.pem", "b1");
    assert_eq!(
        auth.verify(&b, NOW + 5).await.unwrap_err(),
        JwtError::UnknownKey
    );
    assert_eq!(server.hits(), 1);
    // ...while known kids keep working without fetching.
    auth.verify(&idp_token("rsa-a", "rsa_a.key.pem", "a2"), NOW + 6)
        .await
        .unwrap();
    assert_eq!(server.hits(), 1);

    // 10 s later the unknown kid triggers one fetch and verifies.
    let id = auth.verify(&b, NOW + MIN_REFRESH).await.unwrap();
    assert_eq!(&*id.label, "b1");
    assert_eq!(server.hits(), 2);

    // Made-up kids cannot make us hammer the issuer: one fetch per 10 s at most.
    for i in 0..15 {
        let forged = idp_token(&format!("forged-{i}"), "rsa_b.key.pem", "x");
        assert_eq!(
            auth.verify(&forged, NOW + MIN_REFRESH + 1 + i)
                .await
                .unwrap_err(),
            JwtError::UnknownKey
        );
    }
    assert_eq!(server.hits(), 3, "one fetch at +20 s, none before or after");
}

const MIN_REFRESH: u64 = keys::MIN_ON_DEMAND_REFRESH_SECS;

#[tokio::test]
async fn concurrent_unknown_kids_share_one_fetch() {
    let server = JwksServer::start(fixture("jwks_b.json")).await;
    let auth = Arc::new(build(url_provider(&server.url())));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let auth = auth.clone();
        let token = idp_token("rsa-b", "rsa_b.key.pem", &format!("u{i}"));
        tasks.push(tokio::spawn(async move { auth.verify(&token, NOW).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn failed_jwks_refresh_keeps_the_old_keys() {
    let server = JwksServer::start(fixture("jwks_a.json")).await;
    let auth = build(url_provider(&server.url()));
    auth.verify(&idp_token("rsa-a", "rsa_a.key.pem", "a1"), NOW)
        .await
        .unwrap();
    assert_eq!(server.hits(), 1);

    let b = idp_token("rsa-b", "rsa_b.key.pem", "b1");
    let mut t = NOW;
    for (status, body) in [
        (500, "oops".to_owned()),
        (200, "not json".to_owned()),
        (200, r#"{"keys": []}"#.to_owned()),
        (
            200,
            r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#.to_owned(),
        ),
    ] {
        server.serve(status, body);
        t += MIN_REFRESH;
        let hits = server.hits();
        assert_eq!(auth.verify(&b, t).await.unwrap_err(), JwtError::UnknownKey);
        assert_eq!(server.hits(), hits + 1, "a refresh was attempted");
        // Set A still works (a new token, so not from the cache).
        let a = idp_token("rsa-a", "rsa_a.key.pem", &format!("a-{t}"));
        auth.verify(&a, t).await.unwrap();
    }

    // The server recovers with set B.
    server.serve(200, fixture("jwks_b.json"));
    t += MIN_REFRESH;
    auth.verify(&b, t).await.unwrap();
}

#[tokio::test]
async fn unreachable_jwks_url_means_keys_unavailable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let auth = build(url_provider(&format!("http://{addr}/jwks")));
    let token = idp_token("rsa-a", "rsa_a.key.pem", "a");
    let err = auth.verify(&token, NOW).await.unwrap_err();
    assert_eq!(err, JwtError::KeysUnavailable);
    assert_eq!(err.reason(), "keys_unavailable");
}

#[tokio::test]
async fn spawn_refresh_fetches_urls_and_stops_on_drop() {
    let server = JwksServer::start(fixture("jwks_a.json")).await;
    let auth = Arc::new(build(url_provider(&server.url())));
    auth.spawn_refresh();
    auth.spawn_refresh(); // a second call starts nothing more
    for _ in 0..200 {
        if server.hits() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.hits(), 1);
    let ProviderKeys::Jwks(jwks) = &auth.providers[0].keys else {
        panic!("a JWKS provider");
    };
    let jwks = Arc::downgrade(jwks);
    // The timer's fetch is there: verifying needs no fetch of its own.
    auth.verify(&idp_token("rsa-a", "rsa_a.key.pem", "a"), NOW)
        .await
        .unwrap();
    assert_eq!(jwks.upgrade().unwrap().fetches(), 1);
    drop(auth);
    tokio::task::yield_now().await;
    assert!(
        jwks.upgrade().is_none(),
        "the timer holds no strong reference"
    );
}

#[test]
fn build_reports_problems_with_paths() {
    let cfg = config(json!([
        {"name": "a", "issuer": "i1", "public_key_pem": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"},
        {"name": "a", "issuer": "i1", "public_key_pem": fixture("rsa_a.key.pem")},
        {"name": "b", "issuer": "i2"},
        {"name": "c", "issuer": "i3", "public_key_pem": fixture("rsa_a.pub.pem"), "jwks_url": "http://x/"},
        {"name": "d", "issuer": "i4", "jwks_url": "ftp://x/jwks", "leeway": "30 parsecs", "jwks_refresh": "0s"},
        {"name": "e", "issuer": "i5", "public_key_pem": fixture("rsa_a.pub.pem"),
         "identity": {"userid": "claims.sub", "broken": "claims.sub ==", "team": "claims.team"}},
        {"name": "f", "issuer": "i6", "hs256_secret_env": "TOLLGATE_TEST_UNSET_VAR_6C1F"},
        {"name": "g", "issuer": "i7", "jwks_file": fixture_path("does-not-exist.json")},
        {"name": "h", "issuer": "i8", "jwks_file": fixture_path("alice.pub.pem")},
        {"name": "i", "issuer": "i9", "public_key_pem": fixture("rsa_a.pub.pem"), "audiences": []},
    ]));
    let mut cfg = cfg;
    cfg.cache.max_ttl = Some("forever".into());
    let problems = JwtAuth::build(&cfg, "auth.jwt").unwrap_err();
    let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
    for expected in [
        "auth.jwt.providers[0].public_key_pem",
        "auth.jwt.providers[1].name",
        "auth.jwt.providers[1].issuer",
        "auth.jwt.providers[1].public_key_pem",
        "auth.jwt.providers[2]",
        "auth.jwt.providers[3]",
        "auth.jwt.providers[4].jwks_url",
        "auth.jwt.providers[4].leeway",
        "auth.jwt.providers[4].jwks_refresh",
        "auth.jwt.providers[5].identity.broken",
        "auth.jwt.providers[6].hs256_secret_env",
        "auth.jwt.providers[7].jwks_file",
        "auth.jwt.providers[8].jwks_file",
        "auth.jwt.providers[9].audiences",
        "auth.jwt.cache.max_ttl",
    ] {
        assert!(
            paths.contains(&expected),
            "missing {expected} in {problems:#?}"
        );
    }
    let msg = |path: &str| {
        problems
            .iter()
            .find(|p| p.path == path)
            .map(|p| p.message.clone())
            .unwrap()
    };
    assert!(msg("auth.jwt.providers[0].public_key_pem").starts_with("not a PEM public key"));
    assert!(msg("auth.jwt.providers[1].public_key_pem").contains("private key"));
    assert!(msg("auth.jwt.providers[3]").contains("public_key_pem, jwks_url"));
    assert!(!paths.contains(&"auth.jwt.providers[5].identity.userid"));

    let short = std::env::temp_dir().join(format!("tollgate-jwt-short-{}", std::process::id()));
    std::fs::write(&short, "tooshort\n").unwrap();
    let problems = JwtAuth::build(
        &config(
            json!([{"name": "s", "issuer": "s", "hs256_secret_file": short.display().to_string()}]),
        ),
        "auth.jwt",
    )
    .unwrap_err();
    let _ = std::fs::remove_file(&short);
    assert!(
        problems[0].message.contains("at least 32 bytes"),
        "{problems:?}"
    );

    let empty = JwtAuth::build(&config(json!([])), "x").unwrap_err();
    assert_eq!(empty[0].path, "x.providers");
}

#[test]
fn config_parses_from_yaml_and_refuses_unknown_fields() {
    let yaml = r#"
providers:
  - name: selfminted
    issuer: solo.io
    public_key_pem: |
      -----BEGIN PUBLIC KEY-----
      MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAskFAGESgB22iOsGk/UgX
      -----END PUBLIC KEY-----
    identity:
      userid: claims.sub
  - name: corp
    issuer: https://idp.example.com
    audiences: [tollgate]
    jwks_url: https://idp.example.com/.well-known/jwks.json
    jwks_refresh: 10m
    require_exp: true
    leeway: 10s
cache:
  max_entries: 5000
  max_ttl: 2m
"#;
    let cfg: JwtConfig = yaml_serde::from_str(yaml).unwrap();
    assert_eq!(cfg.providers.len(), 2);
    assert_eq!(cfg.cache.max_entries, 5000);
    assert_eq!(
        cfg.providers[1].audiences.as_deref(),
        Some(&["tollgate".to_owned()][..])
    );
    let bad = yaml_serde::from_str::<JwtConfig>("providers: []\nkeys: 1\n");
    assert!(bad.is_err());
    let bad = yaml_serde::from_str::<JwtConfig>(
        "providers:\n  - name: a\n    issuer: b\n    algorithms: [none]\n",
    );
    assert!(bad.is_err());
    let defaults: JwtConfig = yaml_serde::from_str("providers: []").unwrap();
    assert_eq!(defaults.cache.max_entries, 10_000);
}

#[test]
fn looks_like_jwt_shape() {
    assert!(looks_like_jwt(&alice_token()));
    assert!(looks_like_jwt("eyJh.eyJp."));
    for s in [
        "",
        "sk-abc123",
        "a.b",
        "a..c",
        ".b.c",
        "a.b.c.d",
        "a.b+.c",
        "a.b.c=",
        "a b.c.d",
    ] {
        assert!(!looks_like_jwt(s), "{s:?}");
    }
}

#[test]
fn errors_say_nothing_about_the_token() {
    for e in [
        JwtError::Malformed,
        JwtError::TooLarge,
        JwtError::AlgorithmNotAllowed,
        JwtError::UnknownIssuer,
        JwtError::UnknownKey,
        JwtError::BadSignature,
        JwtError::WrongAudience,
        JwtError::Expired,
        JwtError::NotYetValid,
        JwtError::MissingExp,
        JwtError::InvalidClaim("exp"),
        JwtError::KeysUnavailable,
    ] {
        let text = e.to_string();
        assert!(text.len() < 40 && !text.contains("eyJ"), "{text}");
        assert!(!e.reason().is_empty());
        assert!(e.message().len() < 80 && !e.message().contains("eyJ"));
    }
}

#[tokio::test]
async fn label_is_sub_bounded_and_printable() {
    let auth = build(json!([rsa_provider(json!({}))]));
    let long = format!("evil\n{}", "x".repeat(500));
    let token = mint(
        Algorithm::RS256,
        None,
        "rsa_a.key.pem",
        json!({"iss": "rsa-issuer", "sub": long}),
    );
    let id = auth.verify(&token, NOW).await.unwrap();
    assert!(id.label.starts_with("evilxxx"));
    assert_eq!(id.label.chars().count(), MAX_LABEL_CHARS);
    let token = mint(
        Algorithm::RS256,
        None,
        "rsa_a.key.pem",
        json!({"iss": "rsa-issuer", "sub": 42}),
    );
    assert_eq!(&*auth.verify(&token, NOW).await.unwrap().label, "-");
}

#[test]
fn jwt_auth_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<JwtAuth>();
}
