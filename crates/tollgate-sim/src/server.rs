//! The simulator on a socket: hyper 1 with hyper-util's auto (HTTP/1.1 keep-alive or h2c)
//! connection builder. Request bodies are read whole (bounded by [`MAX_BODY`]) and handed
//! to [`Simulator::handle`].
//!
//! Connections live in a `JoinSet` owned by the serve future: dropping the future closes
//! the listener and aborts every connection, which is what tests that stop a fake upstream
//! mid-stream want.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::body::{full, SimBody};
use crate::Simulator;

/// Largest request body accepted (bigger ones get a 413).
pub const MAX_BODY: usize = 32 * 1024 * 1024;

/// Serve on a listener until the future is dropped. Accept errors (e.g. out of file
/// descriptors) are logged and retried after a short pause, so this only returns if the
/// runtime is shutting down.
pub async fn serve(listener: TcpListener, sim: Arc<Simulator>) -> std::io::Result<()> {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    // Small SSE events must leave at once, not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    let sim = Arc::clone(&sim);
                    connections.spawn(serve_connection(stream, sim));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "sim: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, sim: Arc<Simulator>) {
    let service = service_fn(move |req: Request<Incoming>| {
        let sim = Arc::clone(&sim);
        async move { Ok::<_, Infallible>(respond(&sim, req).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(error = %e, "sim: connection ended with an error");
    }
}

async fn respond(sim: &Simulator, req: Request<Incoming>) -> Response<SimBody> {
    let (parts, body) = req.into_parts();
    let bytes: Bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let too_large = e.is::<http_body_util::LengthLimitError>();
            let (status, message) = if too_large {
                (StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
            } else {
                (StatusCode::BAD_REQUEST, "could not read the request body")
            };
            let body = crate::render::error_body(
                false,
                "invalid_request_error",
                message,
                None,
                None,
                None,
            );
            let mut response = Response::new(full(body));
            *response.status_mut() = status;
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            return response;
        }
    };
    sim.handle(&parts.method, parts.uri.path(), &parts.headers, bytes)
        .await
}
