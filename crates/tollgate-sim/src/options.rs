//! Per-request knobs read from `x-sim-*` headers: fault injection, timing overrides and
//! header echo. The gateway forwards these headers unchanged, so its tests can steer the
//! upstream from the client side.

use std::time::Duration;

use http::HeaderMap;

/// Header naming a fault to inject (see [`Fault`]).
pub const FAULT_HEADER: &str = "x-sim-fault";
/// Header overriding the latency before the first byte, in milliseconds.
pub const LATENCY_HEADER: &str = "x-sim-latency-ms";
/// Header overriding the delay per generated token, in milliseconds.
pub const MS_PER_TOKEN_HEADER: &str = "x-sim-ms-per-token";
/// Header asking the simulator to report what it received (value `1` or `true`).
pub const ECHO_HEADER: &str = "x-sim-echo-headers";
/// Response header listing the names of the received request headers, comma-separated,
/// lower case, in arrival order.
pub const SEEN_HEADERS: &str = "x-sim-seen-headers";
/// Credential headers echoed back as `x-sim-auth-<name>` when echo is on.
pub const ECHOED_CREDENTIALS: [&str; 3] = ["authorization", "x-api-key", "api-key"];

/// A failure the simulator can be asked to produce (`x-sim-fault: <name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `status-500`: 500 with an error body and no usage.
    Status500,
    /// `status-429`: 429 with `retry-after: 7` and a rate-limit error body.
    Status429,
    /// `no-usage`: a normal 200 whose body (or stream) carries no usage at all.
    NoUsage,
    /// `cut-stream`: a stream ends cleanly at the HTTP level after half the tokens, with no
    /// finish event, no usage and no `[DONE]`; a non-streaming body is cut to half its bytes.
    CutStream,
    /// `malformed`: a 200 whose body is not JSON (for streams: `data:` lines that are not JSON).
    Malformed,
    /// `usage-in-error`: 400 with an error body that also carries a usage object.
    UsageInError,
    /// `stall-stream`: like `cut-stream` (half the tokens, or half the body's bytes), but
    /// then the connection stays open and silent instead of ending.
    StallStream,
}

impl Fault {
    /// Every fault name, for error messages and docs.
    pub const NAMES: [&'static str; 7] = [
        "status-500",
        "status-429",
        "no-usage",
        "cut-stream",
        "malformed",
        "usage-in-error",
        "stall-stream",
    ];

    /// The fault named `name`, if it is one.
    pub fn from_name(name: &str) -> Option<Fault> {
        match name {
            "status-500" => Some(Fault::Status500),
            "status-429" => Some(Fault::Status429),
            "no-usage" => Some(Fault::NoUsage),
            "cut-stream" => Some(Fault::CutStream),
            "malformed" => Some(Fault::Malformed),
            "usage-in-error" => Some(Fault::UsageInError),
            "stall-stream" => Some(Fault::StallStream),
            _ => None,
        }
    }
}

/// The knobs of one request after reading its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestOptions {
    pub fault: Option<Fault>,
    pub latency: Duration,
    pub per_token: Duration,
    pub echo: bool,
}

impl RequestOptions {
    /// Read the `x-sim-*` headers; `Err` carries a message for a 400.
    pub(crate) fn from_headers(
        headers: &HeaderMap,
        latency_ms: u64,
        ms_per_token: u64,
    ) -> Result<RequestOptions, String> {
        let fault = match header_str(headers, FAULT_HEADER)? {
            None => None,
            Some(name) => Some(Fault::from_name(name.trim()).ok_or_else(|| {
                format!(
                    "unknown {FAULT_HEADER} {name:?}; expected one of {}",
                    Fault::NAMES.join(", ")
                )
            })?),
        };
        let latency = millis(headers, LATENCY_HEADER)?.unwrap_or(latency_ms);
        let per_token = millis(headers, MS_PER_TOKEN_HEADER)?.unwrap_or(ms_per_token);
        let echo = matches!(
            header_str(headers, ECHO_HEADER)?.map(str::trim),
            Some("1" | "true")
        );
        Ok(RequestOptions {
            fault,
            latency: Duration::from_millis(latency),
            per_token: Duration::from_millis(per_token),
            echo,
        })
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, String> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| format!("{name} is not visible ASCII")),
    }
}

fn millis(headers: &HeaderMap, name: &str) -> Result<Option<u64>, String> {
    match header_str(headers, name)? {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| format!("{name} must be a whole number of milliseconds")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn defaults_and_overrides() {
        let mut h = HeaderMap::new();
        let o = RequestOptions::from_headers(&h, 5, 2).unwrap();
        assert_eq!(o.fault, None);
        assert_eq!(o.latency, Duration::from_millis(5));
        assert!(!o.echo);
        h.insert(FAULT_HEADER, HeaderValue::from_static("cut-stream"));
        h.insert(LATENCY_HEADER, HeaderValue::from_static("40"));
        h.insert(MS_PER_TOKEN_HEADER, HeaderValue::from_static("3"));
        h.insert(ECHO_HEADER, HeaderValue::from_static("1"));
        let o = RequestOptions::from_headers(&h, 5, 2).unwrap();
        assert_eq!(o.fault, Some(Fault::CutStream));
        assert_eq!(o.latency, Duration::from_millis(40));
        assert_eq!(o.per_token, Duration::from_millis(3));
        assert!(o.echo);
    }

    #[test]
    fn bad_values_are_errors() {
        let mut h = HeaderMap::new();
        h.insert(FAULT_HEADER, HeaderValue::from_static("explode"));
        assert!(RequestOptions::from_headers(&h, 0, 0).is_err());
        let mut h = HeaderMap::new();
        h.insert(LATENCY_HEADER, HeaderValue::from_static("-1"));
        assert!(RequestOptions::from_headers(&h, 0, 0).is_err());
    }

    #[test]
    fn every_name_round_trips() {
        for name in Fault::NAMES {
            assert!(Fault::from_name(name).is_some(), "{name}");
        }
    }
}
