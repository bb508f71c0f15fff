//! Counter identity and the operations a request asks of its counters.
//!
//! A counter's identity is (policy, limit, window length, counter values) — the limit's
//! *number* is not part of it, so raising 50 to 500 keeps everyone's spend.

use std::fmt;
use std::sync::Arc;

use crate::window::Window;

/// Stable, printable identity of one counter, e.g. `trlp/free/60000/user-1`.
/// Each part is percent-escaped (`%` and `/`), so the encoding is unambiguous.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterId(Arc<str>);

impl CounterId {
    /// `window_ms` is 0 for counters without a window (concurrency).
    pub fn new<S: AsRef<str>>(policy: &str, limit: &str, window_ms: u64, values: &[S]) -> Self {
        let mut s =
            String::with_capacity(32 + values.iter().map(|v| v.as_ref().len()).sum::<usize>());
        escape_into(&mut s, policy);
        s.push('/');
        escape_into(&mut s, limit);
        s.push('/');
        s.push_str(itoa::Buffer::new().format(window_ms));
        for v in values {
            s.push('/');
            escape_into(&mut s, v.as_ref());
        }
        CounterId(Arc::from(s))
    }

    /// Rebuild from the printed form (admin API, store keys).
    pub fn from_encoded(s: &str) -> Self {
        CounterId(Arc::from(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CounterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn escape_into(out: &mut String, part: &str) {
    // Names and counter values rarely hold either character: copied whole.
    if !part.bytes().any(|b| b == b'%' || b == b'/') {
        out.push_str(part);
        return;
    }
    for c in part.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            _ => out.push(c),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CounterKind {
    /// Token budget: charged after the call (or reserved before it).
    Tokens,
    /// Request count: taken at admission.
    Requests,
    /// Calls in flight: a reservation of 1 held until the call ends.
    InFlight,
}

/// How a counter refills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    /// `limit` per fixed window.
    Fixed { limit: u64, window: Window },
    /// Token bucket (agentgateway's burst semantics): capacity `limit + burst`, refilled
    /// continuously at `limit` per `per_ms`. The only rate that is not a fixed window.
    Bucket { limit: u64, per_ms: u64, burst: u64 },
    /// At most `limit` reservations outstanding at once; no window.
    Concurrency { limit: u64 },
}

impl Rate {
    /// The ceiling reported to clients (`limit + burst` for buckets).
    pub fn ceiling(&self) -> u64 {
        match *self {
            Rate::Fixed { limit, .. } | Rate::Concurrency { limit } => limit,
            Rate::Bucket { limit, burst, .. } => limit.saturating_add(burst),
        }
    }
}

/// What admission requires of a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Admitted while anything is left: `value + reserved < limit` (token budgets counted
    /// after the fact: the call that crosses the limit completes).
    Room,
    /// Admitted only if `value + reserved + commit + reserve <= limit` (request counts,
    /// token reservations, concurrency).
    Fits,
}

/// One counter's part in one admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterOp {
    pub id: CounterId,
    pub kind: CounterKind,
    pub rate: Rate,
    pub need: Need,
    /// Added to the counter's value at admission (request counts).
    pub commit: u64,
    /// Held at admission under the request's reservation id until settled or expired.
    pub reserve: u64,
    /// Counted in this process only (a policy's `scope: replica`), even when the
    /// configured store is shared (Redis). Only [`crate::store::split::SplitStore`]
    /// reads it; every other store counts the op itself.
    pub replica: bool,
}

#[cfg(test)]
mod tests {
    use super::CounterId;

    #[test]
    fn ids_escape_their_separator_so_parts_cannot_run_together() {
        let id = CounterId::new("p/x", "l%", 60_000, &["a/b", "plain", "100%/"]);
        assert_eq!(id.as_str(), "p%2Fx/l%25/60000/a%2Fb/plain/100%25%2F");
        assert_eq!(
            CounterId::new("tutorial", "free", 0, &["user-1"]).as_str(),
            "tutorial/free/0/user-1"
        );
        // Without escaping these two would be the same counter.
        assert_ne!(
            CounterId::new("p", "l", 1, &["a", "b/c"]),
            CounterId::new("p", "l", 1, &["a/b", "c"])
        );
    }
}
