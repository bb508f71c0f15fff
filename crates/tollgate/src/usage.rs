//! Usage ledger for chargeback: per-identity totals by policy and model, in one-minute
//! buckets kept for a day (bounded in keys), so `GET /admin/usage?since=…` can answer
//! without scanning logs.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;

const BUCKET_MS: u64 = 60_000;
const RETAIN_MS: u64 = 24 * 3_600_000;
/// Distinct (identity, policy, model) keys kept; beyond, new keys are folded into
/// identity `other` so memory stays bounded under many users.
const MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    at_ms: u64,
    input: u64,
    output: u64,
    total: u64,
    requests: u64,
    estimated: u64,
}

type Key = (String, String, String);

#[derive(Default)]
pub struct UsageLedger {
    inner: Mutex<HashMap<Key, VecDeque<Bucket>>>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UsageRow {
    pub identity: String,
    pub policy: String,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
    pub requests: u64,
    pub estimated_requests: u64,
}

impl UsageLedger {
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        now_ms: u64,
        identity: &str,
        policy: &str,
        model: &str,
        input: u64,
        output: u64,
        total: u64,
        estimated: bool,
    ) {
        let mut map = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut key = (identity.to_owned(), policy.to_owned(), model.to_owned());
        if !map.contains_key(&key) && map.len() >= MAX_KEYS {
            key.0 = "other".into();
        }
        let at = now_ms - now_ms % BUCKET_MS;
        let q = map.entry(key).or_default();
        if q.back().map(|b| b.at_ms) != Some(at) {
            q.push_back(Bucket {
                at_ms: at,
                ..Default::default()
            });
        }
        while q.front().is_some_and(|b| b.at_ms + RETAIN_MS < now_ms) {
            q.pop_front();
        }
        if let Some(b) = q.back_mut() {
            b.input += input;
            b.output += output;
            b.total += total;
            b.requests += 1;
            b.estimated += u64::from(estimated);
        }
    }

    /// Totals since `since_ms`, sorted by total tokens, largest first.
    pub fn totals(&self, since_ms: u64) -> Vec<UsageRow> {
        let map = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut rows: Vec<UsageRow> = map
            .iter()
            .filter_map(|((identity, policy, model), q)| {
                let mut row = UsageRow {
                    identity: identity.clone(),
                    policy: policy.clone(),
                    model: model.clone(),
                    input_tokens: 0,
                    output_tokens: 0,
                    total_tokens: 0,
                    requests: 0,
                    estimated_requests: 0,
                };
                for b in q.iter().filter(|b| b.at_ms + BUCKET_MS > since_ms) {
                    row.input_tokens += b.input;
                    row.output_tokens += b.output;
                    row.total_tokens += b.total;
                    row.requests += b.requests;
                    row.estimated_requests += b.estimated;
                }
                (row.requests > 0).then_some(row)
            })
            .collect();
        rows.sort_by(|a, b| {
            b.total_tokens
                .cmp(&a.total_tokens)
                .then(a.identity.cmp(&b.identity))
        });
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_since() {
        let l = UsageLedger::default();
        l.record(0, "u1", "p", "m", 10, 5, 15, false);
        l.record(120_000, "u1", "p", "m", 1, 1, 2, true);
        l.record(120_000, "u2", "p", "m", 3, 3, 6, false);
        let all = l.totals(0);
        assert_eq!(all[0].identity, "u1");
        assert_eq!(all[0].total_tokens, 17);
        assert_eq!(all[0].requests, 2);
        assert_eq!(all[0].estimated_requests, 1);
        let recent = l.totals(120_000);
        assert_eq!(
            recent
                .iter()
                .find(|r| r.identity == "u1")
                .unwrap()
                .total_tokens,
            2
        );
    }
}
