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

type Map<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// Buckets by identity, then policy, then model: a request's key is looked up by `&str`
/// at each level, so recording allocates only for a key not seen before.
#[derive(Default)]
struct Book {
    by_identity: Map<Map<Map<VecDeque<Bucket>>>>,
    /// Distinct (identity, policy, model) keys, bounded by [`MAX_KEYS`].
    keys: usize,
}

impl Book {
    fn get_mut(
        &mut self,
        identity: &str,
        policy: &str,
        model: &str,
    ) -> Option<&mut VecDeque<Bucket>> {
        self.by_identity
            .get_mut(identity)?
            .get_mut(policy)?
            .get_mut(model)
    }

    fn insert(&mut self, identity: &str, policy: &str, model: &str) {
        let policies = self.by_identity.entry(identity.to_owned()).or_default();
        let models = policies.entry(policy.to_owned()).or_default();
        if !models.contains_key(model) {
            models.insert(model.to_owned(), VecDeque::new());
            self.keys += 1;
        }
    }
}

#[derive(Default)]
pub struct UsageLedger {
    inner: Mutex<Book>,
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
        let mut book = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut identity = identity;
        if book.get_mut(identity, policy, model).is_none() {
            if book.keys >= MAX_KEYS {
                identity = "other";
            }
            if book.get_mut(identity, policy, model).is_none() {
                book.insert(identity, policy, model);
            }
        }
        let Some(q) = book.get_mut(identity, policy, model) else {
            return; // inserted just above, under the same lock
        };
        let at = now_ms - now_ms % BUCKET_MS;
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
        let book = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let keys = book.by_identity.iter().flat_map(|(identity, policies)| {
            policies.iter().flat_map(move |(policy, models)| {
                models
                    .iter()
                    .map(move |(model, q)| (identity, policy, model, q))
            })
        });
        let mut rows: Vec<UsageRow> = keys
            .filter_map(|(identity, policy, model, q)| {
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

    #[test]
    fn keys_past_the_bound_fold_into_other() {
        let l = UsageLedger::default();
        for i in 0..MAX_KEYS {
            l.record(0, &format!("u{i}"), "p", "m", 1, 0, 1, false);
        }
        l.record(0, "late-1", "p", "m", 5, 0, 5, false);
        l.record(0, "late-2", "p", "m", 7, 0, 7, false);
        // A key already kept still records under its own name.
        l.record(0, "u7", "p", "m", 2, 0, 2, false);
        let rows = l.totals(0);
        assert_eq!(rows.len(), MAX_KEYS + 1);
        assert_eq!(rows[0].identity, "other");
        assert_eq!((rows[0].total_tokens, rows[0].requests), (12, 2));
        assert!(rows.iter().all(|r| !r.identity.starts_with("late")));
        assert_eq!(rows[1].identity, "u7");
        assert_eq!(rows[1].total_tokens, 3);
    }
}
