//! `tollgate validate`: exit 0 on a good file; every problem (path, line, column, what
//! was expected) and exit 1 on a bad one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

fn validate(src: &str) -> (i32, String) {
    let dir =
        std::env::temp_dir().join(format!("tg-validate-{}-{}", std::process::id(), rand_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("c.yaml");
    std::fs::write(&p, src).unwrap();
    let out = Command::new(common::bin())
        .args(["validate", "-c"])
        .arg(&p)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn rand_id() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

const GOOD_HEAD: &str = "backends:\n  - name: sim\n    simulator: {}\nroutes:\n  - name: llm\n    match: { path_prefix: /v1 }\n    backend: sim\n";

#[test]
fn the_examples_are_valid() {
    for f in ["quickstart.yaml", "full.yaml"] {
        let src =
            std::fs::read_to_string(format!("{}/../../examples/{f}", env!("CARGO_MANIFEST_DIR")))
                .unwrap();
        let (code, out) = validate(&src);
        assert_eq!(code, 0, "{f}: {out}");
        assert!(out.contains("ok"), "{out}");
    }
}

#[test]
fn unknown_key_names_field_line_and_column() {
    let (code, out) = validate(&format!(
        "{GOOD_HEAD}policies:\n  - name: p\n    kind: TokenRateLimitPolicy\n    limitz: {{}}\n"
    ));
    assert_eq!(code, 1);
    assert!(out.contains("unknown field `limitz`"), "{out}");
    assert!(out.contains("policies[0]"), "{out}");
    assert!(out.contains(":11:5:"), "line missing: {out}");
}

#[test]
fn cel_compile_error_has_its_position() {
    let (code, out) = validate(&format!(
        "{GOOD_HEAD}policies:\n  - name: p\n    kind: TokenRateLimitPolicy\n    limits:\n      free:\n        rates: [{{ limit: 5, window: 1m }}]\n        when:\n          - request.path == \n"
    ));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("policies[0].limits.free.when[0]"), "{out}");
    assert!(out.contains("CEL does not compile at 1:"), "{out}");
    assert!(out.contains(":15:13:"), "line missing: {out}");
}

#[test]
fn bad_window_and_dangling_backend_are_both_reported() {
    let src = "backends:\n  - name: sim\n    simulator: {}\nroutes:\n  - name: llm\n    backend: nope\npolicies:\n  - name: p\n    kind: RateLimitPolicy\n    limits:\n      a:\n        rates: [{ limit: 5, window: 1x }]\n";
    let (code, out) = validate(src);
    assert_eq!(code, 1);
    assert!(out.contains("unknown unit `x`"), "{out}");
    let src2 = src.replace("1x", "1m");
    let (code, out) = validate(&src2);
    assert_eq!(code, 1);
    assert!(out.contains("routes[0].backend"), "{out}");
    assert!(out.contains("no backend named `nope`"), "{out}");
    assert!(out.contains(":6:"), "{out}");
}

#[test]
fn wrong_types_and_enum_values() {
    let (code, out) = validate(&format!(
        "{GOOD_HEAD}policies:\n  - name: p\n    kind: TokenLimit\n    limits: {{}}\n  - name: q\n    kind: RateLimitPolicy\n    limits:\n      a:\n        rates: [{{ limit: many, window: 1m }}]\n"
    ));
    assert_eq!(code, 1);
    assert!(out.contains("policies[0].kind"), "{out}");
    assert!(
        out.contains("TokenRateLimitPolicy"),
        "expected variants listed: {out}"
    );
    assert!(out.contains("policies[1].limits.a.rates[0].limit"), "{out}");
    let errors = out.lines().filter(|l| l.contains("error:")).count();
    assert!(errors >= 2, "{out}");
}

#[test]
fn secrets_and_addresses() {
    let (code, out) = validate(&format!(
        "listen: nowhere\n{GOOD_HEAD}auth:\n  api_keys:\n    keys:\n      - key: a\n        key_env: B\n      - sha256: abc\n"
    ));
    assert_eq!(code, 1);
    assert!(out.contains("`nowhere` is not an address"), "{out}");
    assert!(
        out.contains("give exactly one of `key`, `key_env`, `key_file`, `sha256`"),
        "{out}"
    );
    assert!(out.contains("64 hex characters"), "{out}");
}

#[test]
fn warns_about_identity_fields_nobody_produces() {
    let (code, out) = validate(&format!(
        "{GOOD_HEAD}auth:\n  api_keys:\n    keys:\n      - key: k\n        identity: {{ userid: u }}\npolicies:\n  - name: p\n    kind: TokenRateLimitPolicy\n    limits:\n      a:\n        rates: [{{ limit: 5, window: 1m }}]\n        when: [auth.identity.tier == \"gold\"]\n        counters: [auth.identity.userid]\n"
    ));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("warning"), "{out}");
    assert!(out.contains("auth.identity.tier"), "{out}");
}

#[test]
fn not_yaml_at_all() {
    let (code, out) = validate("listen: [unclosed\n");
    assert_eq!(code, 1);
    assert!(out.contains("not valid YAML"), "{out}");
}

#[test]
fn redis_tls_files_must_be_readable_and_paired() {
    let (code, out) = validate(&format!(
        "storage:\n  kind: redis\n  redis:\n    url: rediss://127.0.0.1:6380\n    tls:\n      ca_file: /nonexistent/ca.pem\n      cert_file: /nonexistent/client.pem\n{GOOD_HEAD}"
    ));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("storage.redis.tls.ca_file"), "{out}");
    assert!(out.contains("cannot read `/nonexistent/ca.pem`"), "{out}");
    assert!(
        out.contains("`cert_file` and `key_file` go together"),
        "{out}"
    );
}

#[test]
fn backend_tls_needs_https_readable_files_and_pairs() {
    let (code, out) = validate(
        "backends:\n  - name: a\n    url: http://127.0.0.1:1\n    tls: { ca_file: /nonexistent/ca.pem }\n  - name: b\n    url: https://127.0.0.1:1\n    tls: { ca_file: /nonexistent/ca.pem }\n  - name: c\n    url: https://127.0.0.1:1\n    tls: { key_file: /nonexistent/k.pem }\nroutes:\n  - name: llm\n    match: { path_prefix: /v1 }\n    backend: a\n",
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("backends[0].tls"), "{out}");
    assert!(out.contains("need an https:// url"), "{out}");
    assert!(out.contains("backends[1].tls.ca_file"), "{out}");
    assert!(out.contains("cannot read `/nonexistent/ca.pem`"), "{out}");
    assert!(out.contains("backends[2].tls"), "{out}");
    assert!(
        out.contains("`cert_file` and `key_file` go together"),
        "{out}"
    );
}

#[test]
fn redis_batching_is_bounded_and_single_node() {
    let (code, out) = validate(&format!(
        "storage:\n  kind: redis\n  redis:\n    cluster: [redis://127.0.0.1:7000]\n    batching:\n      flush_interval: 2s\n      max_batch: 0\n{GOOD_HEAD}"
    ));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("storage.redis.batching"), "{out}");
    assert!(out.contains("not a cluster"), "{out}");
    assert!(
        out.contains("storage.redis.batching.flush_interval") && out.contains("between 1ms and 1s"),
        "{out}"
    );
    assert!(out.contains("storage.redis.batching.max_batch"), "{out}");
    // A typo in the section is named, not ignored.
    let (code, out) = validate(&format!(
        "storage:\n  kind: redis\n  redis:\n    batching: {{ flush_intervall: 5ms }}\n{GOOD_HEAD}"
    ));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("flush_intervall"), "{out}");
    let (code, out) = validate(&format!(
        "storage:\n  kind: redis\n  redis:\n    url: redis://127.0.0.1:6379\n    batching: {{ flush_interval: 5ms }}\n{GOOD_HEAD}"
    ));
    assert_eq!(code, 0, "{out}");
}
