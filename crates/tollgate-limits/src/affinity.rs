//! Which proxy thread the current thread is. tollgate serves each connection start to
//! finish on one proxy thread (a single-threaded runtime); a client that keeps a
//! connection per thread (the Redis store here, the upstream pool in the proxy) picks it
//! with [`slot`], so a request never waits on a connection driven by another thread.

use std::cell::Cell;

/// Slots per client: one for each proxy thread (1..), and slot 0 for every other thread.
pub const SLOTS: usize = 65;

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(0) };
}

/// Mark the current thread as proxy thread `i` (1-based; wraps past [`SLOTS`]).
pub fn set_proxy_thread(i: usize) {
    SLOT.with(|s| s.set(i % SLOTS));
}

/// The current thread's slot, below [`SLOTS`]: 0 unless it is a proxy thread.
pub fn slot() -> usize {
    SLOT.with(Cell::get)
}
