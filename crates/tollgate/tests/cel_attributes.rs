//! Every `request.*`, `source.*` and `llm.*` attribute reaches CEL with its documented value, so a policy
//! written on any of them applies (the gateway builds only the fields some expression
//! reads; this is what keeps that honest).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{chat_body, client, Gateway, Upstream, T0};

#[tokio::test]
async fn policies_on_every_request_attribute() {
    let up = Upstream::start().await;
    let cfg = format!(
        r#"
backends:
  - name: up
    url: http://{}
routes:
  - name: llm
    match: {{ path_prefix: /v1 }}
    backend: up
policies:
  - name: attrs
    kind: RateLimitPolicy
    limits:
      team:
        rates: [{{ limit: 2, window: 1m }}]
        when:
          - request.method == "POST"
          - request.host.startsWith("api.")
          - request.url_path == "/v1/chat/completions" && request.path == request.url_path
          - request.query == "tier=x"
          - request.raw_path.startsWith("/v1/chat/")
          - request.model == "m"
          - request.time >= {T0}
          - size(request.id) > 0
          - source.address == "127.0.0.1" && source.port > 0
          - llm.api == "chat" && !llm.stream && llm.model == "m"
        counters: ['request.headers["x-team"]']
"#,
        up.addr
    );
    let g = Gateway::start(&cfg);
    let send = |host: &'static str, team: &'static str| {
        let url = g.url("/v1/chat/completions?tier=x");
        async move {
            let mut body = chat_body(3);
            body["model"] = serde_json::json!("m");
            client()
                .post(url)
                .header("host", host)
                .header("x-team", team)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // Every predicate holds: team a gets two calls, then 429; team b has its own count.
    assert_eq!(send("api.example.com", "a").await, 200);
    assert_eq!(send("api.example.com", "a").await, 200);
    assert_eq!(send("api.example.com", "a").await, 429);
    assert_eq!(send("api.example.com", "b").await, 200);
    // One predicate false (host): the limit does not apply.
    for _ in 0..3 {
        assert_eq!(send("other.example.com", "a").await, 200);
    }
}
