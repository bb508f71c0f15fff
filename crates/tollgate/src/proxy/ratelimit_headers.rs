//! Where the caller stands, computed at admission (before this call's own charge), on
//! 2xx and 429 alike, remaining clamped at 0:
//! - OpenAI's `x-ratelimit-{limit,remaining,reset}-{tokens,requests}` from the counter of
//!   each kind with the least remaining (reset as a duration like `6m0s`);
//! - agentgateway's `x-ratelimit-{limit,remaining,reset}` (reset in seconds) from the
//!   token counter with the least remaining, or the request counter when no token limit
//!   applies.

use http::{HeaderName, HeaderValue};
use tollgate_limits::{CounterKind, CounterSnapshot};

use crate::config::duration::format_reset;

/// The most constraining snapshot of a kind (least remaining; earliest reset on ties).
fn tightest<'a>(
    snaps: impl Iterator<Item = (&'a CounterSnapshot, CounterKind)>,
    kind: CounterKind,
) -> Option<&'a CounterSnapshot> {
    snaps
        .filter(|(_, k)| *k == kind)
        .map(|(s, _)| s)
        .min_by_key(|s| (s.remaining(), s.reset_at))
}

/// OpenAI's per-kind header names: limit, remaining, reset.
const TOKEN_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];
const REQUEST_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];
/// agentgateway's: limit, remaining, reset (seconds).
const PLAIN_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit"),
    HeaderName::from_static("x-ratelimit-remaining"),
    HeaderName::from_static("x-ratelimit-reset"),
];

pub fn compute(
    snapshots: &[CounterSnapshot],
    kinds: &[CounterKind],
    now_ms: u64,
) -> Vec<(HeaderName, HeaderValue)> {
    let pairs = || snapshots.iter().zip(kinds.iter().copied());
    let mut out = Vec::with_capacity(9);
    let tokens = tightest(pairs(), CounterKind::Tokens);
    let requests = tightest(pairs(), CounterKind::Requests);
    // The plain headers repeat the limit and remaining of the token counter (else the
    // request counter): the same values, shared rather than formatted twice.
    let mut plain = None;
    for (snap, [limit, remaining, reset]) in [(tokens, TOKEN_HEADERS), (requests, REQUEST_HEADERS)]
    {
        if let Some(s) = snap {
            let reset_ms = s.reset_at.saturating_sub(now_ms);
            let (l, r) = (HeaderValue::from(s.limit), HeaderValue::from(s.remaining()));
            if plain.is_none() {
                plain = Some((s, l.clone(), r.clone()));
            }
            out.push((limit, l));
            out.push((remaining, r));
            // A duration such as `6m0s` is always a valid header value.
            if let Ok(v) = HeaderValue::try_from(format_reset(reset_ms)) {
                out.push((reset, v));
            }
        }
    }
    if let Some((s, l, r)) = plain {
        let reset_s = s.reset_at.saturating_sub(now_ms).div_ceil(1000);
        let [limit, remaining, reset] = PLAIN_HEADERS;
        out.push((limit, l));
        out.push((remaining, r));
        out.push((reset, HeaderValue::from(reset_s)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(limit: u64, value: u64, reset_at: u64) -> CounterSnapshot {
        CounterSnapshot {
            limit,
            value,
            reserved: 0,
            window_start: 0,
            reset_at,
        }
    }

    #[test]
    fn picks_least_remaining_per_kind() {
        let snaps = [
            snap(100, 10, 60_000),
            snap(1000, 950, 3_600_000),
            snap(10, 3, 30_000),
        ];
        let kinds = [
            CounterKind::Tokens,
            CounterKind::Tokens,
            CounterKind::Requests,
        ];
        let h = compute(&snaps, &kinds, 0);
        let get = |n: &str| {
            h.iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.to_str().unwrap().to_owned())
        };
        assert_eq!(get("x-ratelimit-limit-tokens").as_deref(), Some("1000"));
        assert_eq!(get("x-ratelimit-remaining-tokens").as_deref(), Some("50"));
        assert_eq!(get("x-ratelimit-reset-tokens").as_deref(), Some("1h0m0s"));
        assert_eq!(get("x-ratelimit-remaining-requests").as_deref(), Some("7"));
        assert_eq!(get("x-ratelimit-reset-requests").as_deref(), Some("30s"));
        assert_eq!(get("x-ratelimit-limit").as_deref(), Some("1000"));
        assert_eq!(get("x-ratelimit-reset").as_deref(), Some("3600"));
    }

    /// `h` is exactly `want`, names and values, in order.
    fn assert_listed(h: &[(HeaderName, HeaderValue)], want: &[(&str, &str)]) {
        let got: Vec<(&str, &str)> = h
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn every_header_in_order() {
        let h = compute(
            &[snap(1000, 250, 90_500), snap(60, 59, 1_000)],
            &[CounterKind::Tokens, CounterKind::Requests],
            0,
        );
        assert_listed(
            &h,
            &[
                ("x-ratelimit-limit-tokens", "1000"),
                ("x-ratelimit-remaining-tokens", "750"),
                ("x-ratelimit-reset-tokens", "1m30.5s"),
                ("x-ratelimit-limit-requests", "60"),
                ("x-ratelimit-remaining-requests", "1"),
                ("x-ratelimit-reset-requests", "1s"),
                ("x-ratelimit-limit", "1000"),
                ("x-ratelimit-remaining", "750"),
                ("x-ratelimit-reset", "91"),
            ],
        );
    }

    #[test]
    fn plain_headers_follow_the_request_counter_without_a_token_one() {
        let h = compute(&[snap(10, 4, 2_000)], &[CounterKind::Requests], 500);
        assert_listed(
            &h,
            &[
                ("x-ratelimit-limit-requests", "10"),
                ("x-ratelimit-remaining-requests", "6"),
                ("x-ratelimit-reset-requests", "1.5s"),
                ("x-ratelimit-limit", "10"),
                ("x-ratelimit-remaining", "6"),
                ("x-ratelimit-reset", "2"),
            ],
        );
        assert!(compute(&[], &[], 0).is_empty());
    }

    #[test]
    fn remaining_clamps_at_zero() {
        let h = compute(&[snap(50, 80, 1_500)], &[CounterKind::Tokens], 0);
        let rem = h
            .iter()
            .find(|(k, _)| k == "x-ratelimit-remaining")
            .unwrap();
        assert_eq!(rem.1, "0");
        let reset = h.iter().find(|(k, _)| k == "x-ratelimit-reset").unwrap();
        assert_eq!(reset.1, "2");
    }
}
