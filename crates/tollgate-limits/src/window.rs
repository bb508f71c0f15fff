//! Fixed windows: epoch-aligned (a 24h window resets at 00:00 UTC, so replicas agree
//! without talking) or staggered (shifted by a stable hash of the counter's identity, so
//! all users do not reset — and retry — at the same second).
//!
//! Boundaries fall at `offset + k * len` for `k >= 0`. Times before the first boundary
//! (`now < offset`, only within `len` of the Unix epoch) belong to a shortened first
//! window `[0, offset)`, so the arithmetic never goes below zero. Ends saturate at
//! `u64::MAX` instead of wrapping.

use crate::time::Millis;

/// A fixed window of `len_ms`, whose boundaries fall at `offset_ms + k * len_ms`.
/// Invariant: `len_ms > 0` and `offset_ms < len_ms` (the constructors guarantee it; the
/// arithmetic also tolerates literals that break it, reading `len 0` as 1 and the offset
/// modulo the length).
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
        let (len, off) = self.normalized();
        if now < off {
            return 0;
        }
        // `now - off >= 0`, and the remainder is at most `now - off`: no underflow.
        now - (now - off) % len
    }

    /// End (exclusive) of the window containing `now`; the next window starts here.
    pub fn end(&self, now: Millis) -> Millis {
        let (len, off) = self.normalized();
        if now < off {
            return off;
        }
        self.start(now).saturating_add(len)
    }

    fn normalized(&self) -> (u64, u64) {
        let len = self.len_ms.max(1);
        (len, self.offset_ms % len)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DAY: u64 = 86_400_000;

    /// Lengths from 1 ms to a week; times up to year ~2500 (far from `u64::MAX`).
    fn window() -> impl Strategy<Value = Window> {
        (1u64..=7 * DAY, any::<u64>()).prop_map(|(len, off)| Window {
            len_ms: len,
            offset_ms: off % len,
        })
    }
    const MAX_NOW: u64 = 16_725_225_600_000;

    proptest! {
        #[test]
        fn now_lies_inside_its_window(w in window(), now in 0..MAX_NOW) {
            prop_assert!(w.start(now) <= now);
            prop_assert!(now < w.end(now));
        }

        #[test]
        fn starts_are_offset_plus_multiples_of_len(w in window(), now in 0..MAX_NOW) {
            let start = w.start(now);
            if now >= w.offset_ms {
                prop_assert!(start >= w.offset_ms);
                prop_assert_eq!((start - w.offset_ms) % w.len_ms, 0);
                prop_assert_eq!(w.end(now) - start, w.len_ms);
            } else {
                // The shortened first window before the first boundary.
                prop_assert_eq!(start, 0);
                prop_assert_eq!(w.end(now), w.offset_ms);
            }
        }

        #[test]
        fn consecutive_windows_tile(w in window(), now in 0..MAX_NOW) {
            let end = w.end(now);
            // The next window starts exactly where this one ends ...
            prop_assert_eq!(w.start(end), end);
            // ... and the last millisecond of this window is still inside it.
            prop_assert_eq!(w.start(end - 1), w.start(now));
            prop_assert_eq!(w.end(end - 1), end);
        }

        #[test]
        fn every_instant_of_a_window_maps_to_it(w in window(), now in 0..MAX_NOW, pick in any::<u64>()) {
            let (start, end) = (w.start(now), w.end(now));
            let inside = start + pick % (end - start);
            prop_assert_eq!(w.start(inside), start);
            prop_assert_eq!(w.end(inside), end);
        }

        #[test]
        fn aligned_day_starts_at_utc_midnight(now in 0..MAX_NOW) {
            let w = Window::aligned(DAY);
            prop_assert_eq!(w.start(now) % DAY, 0);
            prop_assert_eq!(w.start(now), now / DAY * DAY);
        }

        #[test]
        fn staggered_offset_is_below_len(len in 1u64..=7 * DAY, id in ".{0,40}") {
            let w = Window::staggered(len, &id);
            prop_assert!(w.offset_ms < w.len_ms);
            prop_assert_eq!(w, Window::staggered(len, &id));
        }
    }

    #[test]
    fn aligned_day_at_a_known_instant() {
        // 2026-03-14T15:09:26.535Z -> 2026-03-14T00:00:00Z .. 2026-03-15T00:00:00Z
        let w = Window::aligned(DAY);
        assert_eq!(w.start(1_773_500_966_535), 1_773_446_400_000);
        assert_eq!(w.end(1_773_500_966_535), 1_773_532_800_000);
    }

    #[test]
    fn zero_length_is_one_millisecond() {
        let w = Window::aligned(0);
        assert_eq!(w.len_ms, 1);
        assert_eq!(w.start(42), 42);
        assert_eq!(w.end(42), 43);
        // A hand-built literal that breaks the invariant still cannot divide by zero.
        let raw = Window {
            len_ms: 0,
            offset_ms: 5,
        };
        assert_eq!(raw.start(42), 42);
    }

    #[test]
    fn stable_hash_is_fnv1a() {
        // Published FNV-1a 64 test vectors: these values must never change, or every
        // staggered window in every deployment moves on upgrade.
        assert_eq!(stable_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(stable_hash(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn staggered_offset_is_fixed_for_a_known_id() {
        let w = Window::staggered(60_000, "trlp/free/60000/user-1");
        assert_eq!(w.offset_ms, stable_hash(b"trlp/free/60000/user-1") % 60_000);
        assert_eq!(w.offset_ms, EXPECTED_USER_1_OFFSET);
        // 60_000 ms windows of that id start at ...:SS.mmm where SS.mmm is the offset.
        assert_eq!(w.start(1_773_446_400_000 + 60_000) % 60_000, w.offset_ms);
    }
    const EXPECTED_USER_1_OFFSET: u64 = 25_257;

    #[test]
    fn staggered_offsets_spread_over_the_window() {
        let len = 60_000;
        let mut deciles = [0u32; 10];
        let mut distinct = std::collections::HashSet::new();
        for i in 0..10_000 {
            let w = Window::staggered(len, &format!("trlp/free/60000/user-{i}"));
            deciles[(w.offset_ms * 10 / len) as usize] += 1;
            distinct.insert(w.offset_ms);
        }
        // 1000 expected per decile; FNV-1a on near-identical ids must still spread.
        for (i, n) in deciles.iter().enumerate() {
            assert!((850..=1150).contains(n), "decile {i} has {n}");
        }
        // Birthday bound: ~10_000 - 10_000^2 / (2 * 60_000) ≈ 9_170 distinct offsets.
        assert!(distinct.len() > 8_800, "{} distinct", distinct.len());
    }
}
