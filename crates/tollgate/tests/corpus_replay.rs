//! Real captured provider responses (../shared/corpus) replayed by a test upstream that
//! splits them at random byte positions: forwarded byte for byte, and charged what the
//! wire-format parser reads from them (the parser itself is checked against the corpus's
//! published figures in tollgate-llm's own tests).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tollgate_llm::Api;

fn corpus_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/corpus"
    ))
}

/// Serves `body` with `status`, split into chunks at `cuts`.
async fn replay_upstream(
    body: Arc<Vec<u8>>,
    status: u16,
    sse: bool,
    seed: u64,
) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = seed;
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            n = n
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let body = body.clone();
            let seed = n;
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        // Random cut points (LCG), including 1-byte chunks.
                        let mut chunks = Vec::new();
                        let mut i = 0;
                        let mut x = seed;
                        while i < body.len() {
                            x = x
                                .wrapping_mul(6364136223846793005)
                                .wrapping_add(1442695040888963407);
                            let len = 1 + (x >> 33) as usize % 97;
                            let end = (i + len).min(body.len());
                            chunks.push(Ok::<_, Infallible>(Frame::data(Bytes::copy_from_slice(
                                &body[i..end],
                            ))));
                            i = end;
                        }
                        let stream = futures_util::stream::iter(chunks);
                        let mut resp = hyper::Response::new(StreamBody::new(stream));
                        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        resp.headers_mut().insert(
                            "content-type",
                            if sse {
                                "text/event-stream"
                            } else {
                                "application/json"
                            }
                            .parse()
                            .unwrap(),
                        );
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

struct Case {
    file: &'static str,
    api: Api,
    status: u16,
}

const CASES: &[Case] = &[
    Case {
        file: "openai/chat-nonstream-1.json",
        api: Api::Chat,
        status: 200,
    },
    Case {
        file: "openai/chat-nonstream-2.json",
        api: Api::Chat,
        status: 200,
    },
    Case {
        file: "openai/chat-stream-1.sse",
        api: Api::Chat,
        status: 200,
    },
    Case {
        file: "openai/chat-stream-3.sse",
        api: Api::Chat,
        status: 200,
    },
    Case {
        file: "openai/completions-nonstream-1.json",
        api: Api::Completions,
        status: 200,
    },
    Case {
        file: "openai/completions-stream-1.sse",
        api: Api::Completions,
        status: 200,
    },
    Case {
        file: "openai/completions-stream-2.sse",
        api: Api::Completions,
        status: 200,
    },
    Case {
        file: "openai/embeddings-nonstream-1.json",
        api: Api::Embeddings,
        status: 200,
    },
    Case {
        file: "openai/responses-nonstream-1.json",
        api: Api::Responses,
        status: 200,
    },
    Case {
        file: "openai/responses-nonstream-2.json",
        api: Api::Responses,
        status: 200,
    },
    Case {
        file: "openai/responses-nonstream-3.json",
        api: Api::Responses,
        status: 200,
    },
    Case {
        file: "openai/responses-stream-1.sse",
        api: Api::Responses,
        status: 200,
    },
    Case {
        file: "openai/responses-stream-2.sse",
        api: Api::Responses,
        status: 200,
    },
    Case {
        file: "openai/responses-stream-3.sse",
        api: Api::Responses,
        status: 200,
    },
    Case {
        file: "openai/error-401-nonstream-1.json",
        api: Api::Chat,
        status: 401,
    },
    Case {
        file: "openai/error-404-nonstream-1.json",
        api: Api::Chat,
        status: 404,
    },
    Case {
        file: "azure/chat-nonstream-1.json",
        api: Api::Chat,
        status: 200,
    },
    Case {
        file: "azure/chat-stream-1.sse",
        api: Api::Chat,
        status: 200,
    },
    Case {
        file: "vllm/chat-stream-1.sse",
        api: Api::Chat,
        status: 200,
    },
    Case {
        file: "vllm/completions-nonstream-1.json",
        api: Api::Completions,
        status: 200,
    },
    Case {
        file: "vllm/completions-stream-1.sse",
        api: Api::Completions,
        status: 200,
    },
    Case {
        file: "anthropic/messages-nonstream-1.json",
        api: Api::Messages,
        status: 200,
    },
    Case {
        file: "anthropic/messages-nonstream-2.json",
        api: Api::Messages,
        status: 200,
    },
    Case {
        file: "anthropic/messages-nonstream-3.json",
        api: Api::Messages,
        status: 200,
    },
    Case {
        file: "anthropic/messages-stream-1.sse",
        api: Api::Messages,
        status: 200,
    },
    Case {
        file: "anthropic/messages-stream-2.sse",
        api: Api::Messages,
        status: 200,
    },
    Case {
        file: "anthropic/error-400-nonstream-1.json",
        api: Api::Messages,
        status: 400,
    },
    Case {
        file: "anthropic/error-401-nonstream-1.json",
        api: Api::Messages,
        status: 401,
    },
];

fn path_for(api: Api) -> &'static str {
    match api {
        Api::Chat => "/v1/chat/completions",
        Api::Completions => "/v1/completions",
        Api::Responses => "/v1/responses",
        Api::Embeddings => "/v1/embeddings",
        Api::Messages => "/v1/messages",
    }
}

fn request_for(api: Api, stream: bool) -> Value {
    let mut b = match api {
        Api::Embeddings => json!({"model": "m", "input": "x"}),
        Api::Completions => json!({"model": "m", "prompt": "x", "max_tokens": 5}),
        Api::Responses => json!({"model": "m", "input": "x"}),
        _ => json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
    };
    if stream {
        b["stream"] = json!(true);
        if matches!(api, Api::Chat | Api::Completions) {
            // Asked for by the client, so nothing is stripped and bytes must match.
            b["stream_options"] = json!({"include_usage": true});
        }
    }
    b
}

#[tokio::test]
async fn corpus_replayed_at_random_splits_is_forwarded_unchanged_and_charged() {
    for (ci, case) in CASES.iter().enumerate() {
        let bytes = std::fs::read(corpus_dir().join(case.file)).unwrap();
        let sse = case.file.ends_with(".sse");
        // The oracle: what the wire-format parser reads from the whole file.
        let expected = if sse {
            let mut m = tollgate_llm::StreamMeter::new(case.api, false);
            let _ = m.feed(&bytes);
            let _ = m.end();
            let out = m.finish();
            out.usage
                .filter(|_| out.usage_final)
                .map(|u| u.total_tokens)
        } else {
            tollgate_llm::usage_from_body(case.api, &bytes).map(|u| u.total_tokens)
        };
        for seed in [1u64, 7, 1234] {
            let addr =
                replay_upstream(Arc::new(bytes.clone()), case.status, sse, seed + ci as u64).await;
            let cfg = format!(
                "backends:\n  - name: up\n    url: http://{addr}\nroutes:\n  - name: llm\n    backend: up\npolicies:\n  - name: tok\n    kind: TokenRateLimitPolicy\n    limits:\n      all:\n        rates: [{{ limit: 100000000, window: 1h }}]\n        counters: [\"'x'\"]\n"
            );
            let gw = Gateway::start(&cfg);
            let r = client()
                .post(gw.url(path_for(case.api)))
                .json(&request_for(case.api, sse))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), case.status, "{}", case.file);
            let got = r.bytes().await.unwrap();
            assert!(
                got[..] == bytes[..],
                "{} (seed {seed}): forwarded bytes differ",
                case.file
            );
            let charged = gw
                .counter_value("tok/all/3600000/x", None)
                .await
                .unwrap_or(0);
            match expected {
                Some(total) => assert_eq!(charged, total, "{} (seed {seed})", case.file),
                None if case.status >= 400 => assert_eq!(
                    charged, 0,
                    "{}: an error without usage was charged",
                    case.file
                ),
                None => assert!(
                    charged > 0,
                    "{}: success without usage charged nothing",
                    case.file
                ),
            }
        }
    }
}
