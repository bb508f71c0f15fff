//! Key layout, hash tags and cluster slots.
//!
//! Every counter has a *base* that carries its hash tag:
//! - single node: `{<prefix>}:<counter id>` — one tag for everything, so one script
//!   may touch every counter of a request;
//! - cluster: `{<prefix>:<counter id>}` — one tag per counter, so counters spread over
//!   the shards (a gateway-wide counter does not drag every user's keys into its slot).
//!
//! Under the base, one state hash per counter-window and, beside it, the reservations it
//! holds (`<state>:h`, a sorted set of reservation ids scored by deadline):
//! - fixed window: `<base>:w:<window start>` and `<base>:w:<window start>:h`;
//! - token bucket: `<base>:b` and `<base>:b:h`;
//! - concurrency: `<base>:c` and `<base>:c:h`.
//!
//! The prefix is non-empty and brace-free ([`check_prefix`]), so the tag is never empty
//! and ends inside the base: both keys of one counter start with the whole base, so they
//! always share a slot, whatever braces the counter id contains.
//! Keys are never parsed back: each state hash stores its counter id in the `id` field.

use crate::counter::{CounterId, CounterOp, Rate};
use crate::time::Millis;

/// The two keys one counter-window lives in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CounterKeys {
    pub state: String,
    pub holds: String,
}

#[derive(Debug, Clone)]
pub(crate) struct KeySpace {
    prefix: String,
    cluster: bool,
}

impl KeySpace {
    pub fn new(prefix: &str, cluster: bool) -> Self {
        Self {
            prefix: prefix.to_owned(),
            cluster,
        }
    }

    pub fn base(&self, id: &CounterId) -> String {
        self.base_with_room(id, 0)
    }

    /// [`Self::base`] with room for `extra` more bytes (built on every request, so
    /// without the formatting machinery).
    fn base_with_room(&self, id: &CounterId, extra: usize) -> String {
        let id = id.as_str();
        let mut key = String::with_capacity(self.prefix.len() + id.len() + 4 + extra);
        key.push('{');
        key.push_str(&self.prefix);
        if self.cluster {
            key.push(':');
            key.push_str(id);
            key.push('}');
        } else {
            key.push_str("}:");
            key.push_str(id);
        }
        key
    }

    /// The keys `op` touches when admitted (or settled) in the window starting at
    /// `window_start` (ignored for buckets and concurrency counters).
    pub fn for_op(&self, op: &CounterOp, window_start: Millis) -> CounterKeys {
        // Room for ":w:" and 20 digits, and for the holds key's ":h".
        let mut state = self.base_with_room(&op.id, 25);
        match op.rate {
            Rate::Fixed { .. } => {
                state.push_str(":w:");
                state.push_str(itoa::Buffer::new().format(window_start));
            }
            Rate::Bucket { .. } => state.push_str(":b"),
            Rate::Concurrency { .. } => state.push_str(":c"),
        }
        let holds = holds_key(&state);
        CounterKeys { state, holds }
    }

    /// SCAN pattern for the state hashes of counters whose id starts with `id_prefix`
    /// (a superset: check the `id` field).
    pub fn scan_pattern(&self, id_prefix: &str) -> String {
        let prefix = glob_escape(&self.prefix);
        let id = glob_escape(id_prefix);
        if self.cluster {
            format!("{{{prefix}:{id}*")
        } else {
            format!("{{{prefix}}}:{id}*")
        }
    }

    /// SCAN pattern for every key of one counter (a superset: check the `id` field).
    pub fn counter_pattern(&self, id: &CounterId) -> String {
        format!("{}:*", glob_escape(&self.base(id)))
    }
}

/// The key prefix must be non-empty and free of `{` and `}` (see the module doc).
pub(crate) fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() || prefix.contains(['{', '}']) {
        return Err(format!(
            "key prefix {prefix:?} must be non-empty and contain no braces"
        ));
    }
    Ok(())
}

pub(crate) fn holds_key(state: &str) -> String {
    let mut key = String::with_capacity(state.len() + 2);
    key.push_str(state);
    key.push_str(":h");
    key
}

/// Escape Redis glob specials (`*`, `?`, `[`, `]`, `\`).
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The cluster slot of `key`: CRC16 (XMODEM) of its hash tag — the part between the
/// first `{` and the next `}`, if non-empty — else of the whole key, modulo 16384.
pub(crate) fn slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) % 16_384
}

fn hash_tag(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|&b| b == b'{') else {
        return key;
    };
    let rest = key.get(open + 1..).unwrap_or_default();
    match rest.iter().position(|&b| b == b'}') {
        Some(0) | None => key,
        Some(close) => rest.get(..close).unwrap_or(key),
    }
}

/// CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0, no reflection.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counter::{CounterKind, Need};
    use crate::window::Window;

    #[test]
    fn crc16_matches_the_cluster_spec() {
        // The reference value from the Redis Cluster specification.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        // Slots `redis-cli CLUSTER KEYSLOT` gives.
        assert_eq!(slot(b"foo"), 12_182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        // Empty tag: the whole key. Only the first `{` counts.
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16_384);
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
        assert_eq!(
            slot(b"no-closing{brace"),
            crc16(b"no-closing{brace") % 16_384
        );
    }

    fn op(id: &str, rate: Rate) -> CounterOp {
        CounterOp {
            id: CounterId::from_encoded(id),
            kind: CounterKind::Tokens,
            rate,
            need: Need::Fits,
            commit: 0,
            reserve: 0,
            replica: false,
        }
    }

    /// The layout is what replicas (and restarts, and upgrades) share: pinned here.
    #[test]
    fn key_layout_is_stable() {
        let fixed = op(
            "tok/user/60000/u1.",
            Rate::Fixed {
                limit: 10,
                window: Window::aligned(60_000),
            },
        );
        let single = KeySpace::new("tg", false).for_op(&fixed, 1_700_000_040_000);
        assert_eq!(single.state, "{tg}:tok/user/60000/u1.:w:1700000040000");
        assert_eq!(single.holds, "{tg}:tok/user/60000/u1.:w:1700000040000:h");
        let cluster = KeySpace::new("tg", true).for_op(&fixed, 0);
        assert_eq!(cluster.state, "{tg:tok/user/60000/u1.}:w:0");
        assert_eq!(cluster.holds, "{tg:tok/user/60000/u1.}:w:0:h");
        let max = KeySpace::new("tg", false).for_op(&fixed, u64::MAX);
        assert_eq!(
            max.state,
            format!("{{tg}}:tok/user/60000/u1.:w:{}", u64::MAX)
        );
    }

    #[test]
    fn keys_of_one_counter_share_a_slot_whatever_the_braces() {
        let fixed = Rate::Fixed {
            limit: 1,
            window: Window::aligned(60_000),
        };
        for cluster in [false, true] {
            for (prefix, id) in [
                ("tg", "p/l/60000/u"),
                ("t", "}x{"),
                ("t", "a}b"),
                ("t", "{"),
            ] {
                assert!(check_prefix(prefix).is_ok());
                let ks = KeySpace::new(prefix, cluster);
                let keys = [
                    ks.for_op(&op(id, fixed), 0),
                    ks.for_op(&op(id, fixed), 60_000),
                    ks.for_op(&op(id, Rate::Concurrency { limit: 1 }), 0),
                ];
                let first = slot(keys[0].state.as_bytes());
                for k in &keys {
                    assert_eq!(slot(k.state.as_bytes()), first, "{k:?}");
                    assert_eq!(slot(k.holds.as_bytes()), first, "{k:?}");
                }
            }
        }
    }

    #[test]
    fn cluster_counters_spread_single_node_counters_do_not() {
        let fixed = Rate::Fixed {
            limit: 1,
            window: Window::aligned(60_000),
        };
        let slots = |cluster| {
            let ks = KeySpace::new("tollgate", cluster);
            (0..100)
                .map(|i| {
                    slot(
                        ks.for_op(&op(&format!("p/l/60000/user-{i}"), fixed), 0)
                            .state
                            .as_bytes(),
                    )
                })
                .collect::<std::collections::HashSet<_>>()
        };
        assert_eq!(slots(false).len(), 1);
        assert!(slots(true).len() > 90);
    }

    #[test]
    fn prefixes_with_braces_are_refused() {
        for bad in ["", "{", "a}", "x{y}"] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn patterns_escape_globs() {
        let ks = KeySpace::new("t*", false);
        assert_eq!(ks.scan_pattern("a?/"), "{t\\*}:a\\?/*");
        let ks = KeySpace::new("t", true);
        assert_eq!(ks.scan_pattern("[x]"), "{t:\\[x\\]*");
        assert_eq!(ks.counter_pattern(&CounterId::from_encoded("a")), "{t:a}:*");
    }
}
