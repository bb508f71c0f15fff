//! Time is injected: every engine call takes `now` (epoch milliseconds) from a [`Clock`].
//! Production uses [`SystemClock`]; tests and `--test-clock` use [`ManualClock`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> Millis;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as Millis)
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to. Relaxed ordering is enough: readers only need
/// some recent value, and tests set time before sending the requests that read it.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    pub fn new(start_ms: Millis) -> Self {
        Self {
            now: AtomicU64::new(start_ms),
        }
    }
    pub fn set(&self, ms: Millis) {
        self.now.store(ms, Ordering::Relaxed);
    }
    pub fn advance(&self, ms: Millis) -> Millis {
        self.now.fetch_add(ms, Ordering::Relaxed) + ms
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.now.load(Ordering::Relaxed)
    }
}
