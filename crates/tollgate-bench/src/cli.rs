//! Command-line options and their translation into a [`Plan`].

use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

use crate::run::{Plan, Target};

/// HTTP/1.1 load generator: one keep-alive connection per concurrent worker; prints one JSON
/// line with throughput, latency percentiles (µs) and counts per status.
#[derive(Debug, Parser)]
#[command(name = "tollgate-load", version)]
pub struct Args {
    /// Target URL (http only), e.g. http://127.0.0.1:8080/v1/chat/completions
    #[arg(long)]
    pub url: String,
    /// HTTP method.
    #[arg(long, default_value = "POST")]
    pub method: String,
    /// Request body (sent as is; content-type defaults to application/json).
    #[arg(long, conflicts_with = "body_file")]
    pub body: Option<String>,
    /// Read the request body from a file.
    #[arg(long)]
    pub body_file: Option<std::path::PathBuf>,
    /// Extra request header, `Name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
    /// Concurrent workers, each with its own connection.
    #[arg(short = 'c', long, default_value_t = 1)]
    pub concurrency: usize,
    /// Measured duration (e.g. 10s, 500ms, 1m).
    #[arg(short = 'd', long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unrecorded warm-up before the measurement.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Fixed offered load in requests/s (open loop); omit for closed-loop saturation.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Per-request timeout (counted as an error).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Tokio worker threads (keep it low to leave cores for the server).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Streaming responses: also record time to the first body byte.
    #[arg(long)]
    pub stream: bool,
}

impl Args {
    /// Validate the options and build the plan.
    pub fn plan(&self) -> Result<Plan, String> {
        let uri: Uri = self
            .url
            .parse()
            .map_err(|e| format!("--url {:?}: {e}", self.url))?;
        let target = Target::from_uri(&uri)?;
        let method =
            Method::from_bytes(self.method.as_bytes()).map_err(|e| format!("--method: {e}"))?;
        let body = match (&self.body, &self.body_file) {
            (Some(b), _) => Bytes::from(b.clone()),
            (None, Some(path)) => Bytes::from(
                std::fs::read(path).map_err(|e| format!("--body-file {}: {e}", path.display()))?,
            ),
            (None, None) => Bytes::new(),
        };
        let mut headers = HeaderMap::new();
        for raw in &self.headers {
            let (name, value) = parse_header(raw)?;
            headers.append(name, value);
        }
        if !body.is_empty() && !headers.contains_key(http::header::CONTENT_TYPE) {
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        if self.concurrency == 0 {
            return Err("--concurrency must be at least 1".to_owned());
        }
        if self.duration.is_zero() {
            return Err("--duration must be positive".to_owned());
        }
        let interval = match self.rate {
            None => None,
            Some(r) if r.is_finite() && r > 0.0 => Some(Duration::from_secs_f64(1.0 / r)),
            Some(r) => return Err(format!("--rate must be a positive number, got {r}")),
        };
        Ok(Plan {
            target,
            method,
            headers,
            body,
            concurrency: self.concurrency,
            duration: self.duration,
            warmup: self.warmup,
            interval,
            timeout: self.timeout,
            stream: self.stream,
        })
    }
}

/// `Name: value` → a header pair.
pub fn parse_header(raw: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = raw
        .split_once(':')
        .ok_or_else(|| format!("-H {raw:?}: expected `Name: value`"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|e| format!("-H {raw:?}: bad name: {e}"))?;
    let value =
        HeaderValue::from_str(value.trim()).map_err(|e| format!("-H {raw:?}: bad value: {e}"))?;
    Ok((name, value))
}

/// `10s`, `250ms`, `2m`, `1.5s`, `500us`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("bad duration {s:?} (try 10s, 500ms, 2m)"))?;
    let seconds = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("bad duration unit {other:?} in {s:?}")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("bad duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn headers() {
        let (n, v) = parse_header("Authorization: APIKEY abc:def").unwrap();
        assert_eq!(n, "authorization");
        assert_eq!(v, "APIKEY abc:def");
        assert!(parse_header("novalue").is_err());
    }

    #[test]
    fn plan_defaults_content_type() {
        let args = Args::parse_from([
            "tollgate-load",
            "--url",
            "http://127.0.0.1:9/v1/x?y=1",
            "--body",
            "{}",
            "--rate",
            "100",
        ]);
        let plan = args.plan().unwrap();
        assert_eq!(plan.headers["content-type"], "application/json");
        assert_eq!(plan.interval, Some(Duration::from_millis(10)));
        assert_eq!(plan.target.path_and_query, "/v1/x?y=1");
        assert_eq!(plan.target.authority, "127.0.0.1:9");
        let bad = Args::parse_from(["tollgate-load", "--url", "https://example.com/"]);
        assert!(bad.plan().is_err());
    }
}
