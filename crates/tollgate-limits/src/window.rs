//! Fixed windows: epoch-aligned (a 24h window resets at 00:00 UTC, so replicas agree
//! without talking) or staggered (shifted by a stable hash of the counter's identity, so
//! all users do not reset — and retry — at the same second).

use crate::time::Millis;

/// A fixed window of `len_ms`, whose boundaries fall at `offset_ms + k * len_ms`.
/// Invariant: `len_ms > 0` and `offset_ms < len_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    pub len_ms: u64,
    pub offset_ms: u64,
}

impl Window {
    /// Epoch-aligned window. A zero length is treated as 1 ms (config validation refuses it).
    pub fn aligned(len_ms: u64) -> Self {
        Self {
            len_ms: len_ms.max(1),
            offset_ms: 0,
        }
    }

    /// Window shifted by a stable hash of `identity` (same on every replica and version).
    pub fn staggered(len_ms: u64, identity: &str) -> Self {
        let len_ms = len_ms.max(1);
        Self {
            len_ms,
            offset_ms: stable_hash(identity.as_bytes()) % len_ms,
        }
    }

    /// Start of the window containing `now`.
    pub fn start(&self, now: Millis) -> Millis {
        window_start_of(self, now)
    }

    /// End (exclusive) of the window containing `now`.
    pub fn end(&self, now: Millis) -> Millis {
        self.start(now).saturating_add(self.len_ms)
    }
}

fn window_start_of(w: &Window, now: Millis) -> Millis {
    // Boundaries are offset + k*len. Work in u128 so nothing overflows near u64::MAX.
    let len = w.len_ms.max(1) as u128;
    let off = (w.offset_ms as u128) % len;
    let now = now as u128;
    let shifted = (now + len - off) % len; // position of `now` inside its window
    (now - shifted) as Millis
}

/// FNV-1a, 64 bit: stable across processes, platforms and releases (unlike `DefaultHasher`).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
