//! The soak benchmark's accounting audit, run short: a few hundred mixed calls through the
//! real gateway (every API, streamed and not, upstream faults, clients leaving mid-stream
//! and before the answer), then the books must balance exactly: every call charged from
//! usage was charged what the upstream reported, usage that arrived was never replaced by
//! an estimate, the counters hold exactly what the access log says was charged, and no
//! reservation is left outstanding. `bench/soak.sh` runs the same for minutes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use tollgate_bench::soak::{self, CallEnd, SoakPlan, Stop};
use tollgate_bench::{audit, probe};

fn config(up: std::net::SocketAddr) -> String {
    format!(
        r#"
backends:
  - name: up
    url: http://{up}
routes:
  - name: llm
    match: {{ path_prefix: /v1 }}
    backend: up
logging:
  format: json
  access_log: true
auth:
  api_keys:
    prefixes: [Bearer]
    keys:
      - key: soak-k1
        identity: {{ userid: u1 }}
      - key: soak-k2
        identity: {{ userid: u2 }}
      - key: soak-k3
        identity: {{ userid: u3 }}
policies:
  - name: soak
    kind: TokenRateLimitPolicy
    accounting: reserve
    limits:
      all:
        rates: [{{ limit: 100000000, window: 1d }}]
        counters: [auth.identity.userid]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_soak_books_balance_exactly() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(up.addr));
    let plan = SoakPlan {
        proxy: gw.proxy,
        keys: vec!["soak-k1".into(), "soak-k2".into(), "soak-k3".into()],
        concurrency: 8,
        rate: None,
        stop: Stop::Requests(300),
        seed: 8,
        fault_percent: 15,
        disconnect_percent: 15,
        timeout: Duration::from_secs(20),
    };
    let run = soak::run(&plan).await.unwrap();
    // Access lines are written as calls end; wait (bounded) until every call the gateway
    // must have read has one (a client that gave up before any answer may have gone
    // before the gateway read its call).
    let must_log = run
        .calls
        .iter()
        .filter(|c| c.end != CallEnd::Left(None))
        .count();
    for _ in 0..250 {
        let logged = audit::access_lines(&gw.logs())
            .iter()
            .filter(|l| l.id.starts_with("soak-"))
            .count();
        if logged >= must_log {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outstanding = probe::outstanding_when_idle(gw.admin, None).await.unwrap();
    let counters = probe::counters_total(gw.admin, "soak/all/", None)
        .await
        .unwrap();
    let a = audit::audit(&run.calls, &gw.logs(), counters, outstanding);
    eprintln!("{}", a.render());
    assert!(a.ok(), "{}", a.render());

    // The run covered what it claims to.
    assert_eq!(run.calls.len(), 300);
    assert!(a.exact_calls >= 150, "{}", a.render());
    assert_eq!(a.exact_charged, a.exact_reported);
    assert!(a.exact_charged > 0);
    assert!(a.estimated_calls > 0, "{}", a.render());
    assert_eq!(a.counters_total, a.charged_total);
    assert_eq!(outstanding, 0);
    let left_mid_stream = run
        .calls
        .iter()
        .filter(|c| c.stream && matches!(c.end, CallEnd::Left(Some(200))))
        .count();
    let left_before_answer = run
        .calls
        .iter()
        .filter(|c| !c.stream && matches!(c.end, CallEnd::Left(None)))
        .count();
    assert!(left_mid_stream > 0 && left_before_answer > 0);
    for fault in soak::FAULTS {
        assert!(
            run.calls.iter().any(|c| c.fault == Some(fault)),
            "no call with {fault}"
        );
    }
    assert_eq!(a.failed_calls, 0, "{}", a.render());
}

/// Found by the audit: a client that left before the response head left its reservation
/// held until the deadline and the call unlogged. It is now settled at once: charged the
/// prompt estimate (the request reached the upstream), logged with status 499.
#[tokio::test]
async fn client_leaving_before_the_answer_is_settled_at_once() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(up.addr));
    // The client leaves once the upstream holds the request (it answers after 2 s), not
    // after a wall-clock timeout: on a slow machine a timeout could fire before the
    // gateway had even read the request, and then there would be nothing to settle.
    let call = tokio::spawn(
        client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth("soak-k1")
            .header("x-sim-latency-ms", "2000")
            .header("x-request-id", "leaves-early")
            .json(&chat_body(40))
            .send(),
    );
    for _ in 0..1000 {
        if up.served() > 0 || call.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(up.served(), 1, "the request never reached the upstream");
    assert!(
        !call.is_finished(),
        "the answer came before the client left"
    );
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());

    // Settlement follows the client's going (bounded wait, no fixed sleep).
    let mut line = None;
    for _ in 0..500 {
        line = audit::access_lines(&gw.logs())
            .into_iter()
            .find(|l| l.id == "leaves-early");
        if line.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = line.expect("no access line for a client that left");
    assert_eq!(line.status, 499);
    assert!(line.estimated);
    assert!(line.charged > 0 && line.output_tokens == 0, "{line:?}");
    assert_eq!(
        probe::outstanding_when_idle(gw.admin, None).await.unwrap(),
        0
    );
    assert_eq!(
        probe::counters_total(gw.admin, "soak/all/", None)
            .await
            .unwrap(),
        line.charged
    );
    assert_eq!(up.served(), 1, "the request did reach the upstream");
}
