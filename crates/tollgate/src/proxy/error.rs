//! Every way a request can end early, and the one function that turns it into a
//! response: status, headers and an OpenAI-style JSON body
//! (`{"error":{"message","type","param","code"}}`), which the official SDKs parse.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};

use super::body::{full, ProxyBody};

/// Who is at fault, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    Store,
    Gateway,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    BadRequest(String),
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("{0}")]
    HeadersTooLarge(String),
    #[error("request body not received within {0} ms")]
    BodyTimeout(u64),
    #[error("no route matches {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("{message}")]
    RateLimited {
        message: String,
        /// `tokens` or `requests`.
        kind: &'static str,
        /// None: the request can never be admitted as it is.
        retry_after_ms: Option<u64>,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    #[error("upstream connection failed: {0}")]
    UpstreamConnect(String),
    #[error("upstream did not answer within {0} ms")]
    UpstreamTimeout(u64),
    #[error("Too many requests in progress (at most {limit} at once). Please retry shortly.")]
    Overloaded { limit: usize },
    #[error("rate-limit store unavailable: {0}")]
    StoreUnavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl GatewayError {
    pub fn fault(&self) -> Fault {
        match self {
            Self::BadRequest(_)
            | Self::BodyTooLarge { .. }
            | Self::HeadersTooLarge(_)
            | Self::BodyTimeout(_)
            | Self::NoRoute { .. }
            | Self::Unauthenticated(_)
            | Self::Forbidden(_)
            | Self::RateLimited { .. } => Fault::Client,
            Self::UpstreamConnect(_) | Self::UpstreamTimeout(_) => Fault::Upstream,
            Self::StoreUnavailable(_) => Fault::Store,
            Self::Internal(_) | Self::Overloaded { .. } => Fault::Gateway,
        }
    }

    /// The decision label for logs and metrics.
    pub fn decision(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "unauth",
            Self::Forbidden(_) => "forbidden",
            Self::RateLimited { .. } => "limited",
            Self::Overloaded { .. } => "shed",
            _ => "error",
        }
    }

    pub fn status(&self) -> StatusCode {
        self.classify().0
    }

    /// Status, OpenAI error `type` and `code`.
    fn classify(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::BadRequest(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "bad_request",
            ),
            Self::BodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
            ),
            Self::HeadersTooLarge(_) => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "invalid_request_error",
                "request_header_fields_too_large",
            ),
            Self::BodyTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "request_timeout",
            ),
            Self::NoRoute { .. } => (StatusCode::NOT_FOUND, "invalid_request_error", "not_found"),
            Self::Unauthenticated(_) => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
            ),
            Self::Forbidden(_) => (
                StatusCode::FORBIDDEN,
                "permission_denied",
                "permission_denied",
            ),
            Self::RateLimited { kind, .. } => {
                (StatusCode::TOO_MANY_REQUESTS, *kind, "rate_limit_exceeded")
            }
            Self::UpstreamConnect(_) => {
                (StatusCode::BAD_GATEWAY, "api_error", "upstream_unavailable")
            }
            Self::UpstreamTimeout(_) => {
                (StatusCode::GATEWAY_TIMEOUT, "api_error", "upstream_timeout")
            }
            Self::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "api_error", "overloaded"),
            Self::StoreUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "rate_limit_store_unavailable",
            ),
            Self::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "internal_error",
            ),
        }
    }

    /// The one mapping from error to response.
    pub fn into_response(self) -> Response<ProxyBody> {
        let (status, etype, code) = self.classify();
        let body = serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": etype,
                "param": null,
                "code": code,
            }
        });
        let mut resp = Response::new(full(Bytes::from(body.to_string())));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match self {
            Self::Unauthenticated(_) => {
                h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::RateLimited {
                retry_after_ms,
                headers,
                ..
            } => {
                for (k, v) in headers {
                    h.insert(k, v);
                }
                match retry_after_ms {
                    Some(ms) => {
                        let secs = ms.div_ceil(1000).max(1);
                        h.insert(RETRY_AFTER, HeaderValue::from(secs));
                        h.insert(
                            HeaderName::from_static("retry-after-ms"),
                            HeaderValue::from(ms.max(1)),
                        );
                    }
                    None => {
                        h.insert(
                            HeaderName::from_static("x-should-retry"),
                            HeaderValue::from_static("false"),
                        );
                    }
                }
            }
            Self::StoreUnavailable(_) | Self::Overloaded { .. } => {
                h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}
