//! tollgate's rate-limit engine. Knows nothing of sockets or HTTP.
//!
//! - [`time`]: the injected clock (`now` in epoch milliseconds).
//! - [`window`]: fixed windows (epoch-aligned or staggered) and their arithmetic.
//! - [`counter`]: counter identity ([`CounterId`]), rates, and the operations a request
//!   asks of its counters ([`CounterOp`]).
//! - [`store`]: the [`Store`] trait — atomic admission across many counters, settlement
//!   into a named window, reservations with deadlines, inspection — and its
//!   implementations (`memory`; `redis`, single node or cluster; `resilient`, Redis with
//!   a local fallback), all run through one test suite.
//!
//! A request moves through the engine in two calls: `admit` (all counters checked and
//! taken atomically, or nothing taken) and, when the call ends, `settle` (reservations
//! replaced by the real cost in the window they were made in).

pub mod affinity;
pub mod cel;
pub mod counter;
pub mod policy;
pub mod store;
pub mod time;
pub mod window;

pub use counter::{CounterId, CounterKind, CounterOp, Need, Rate};
pub use store::memory::MemoryStore;
pub use store::redis::{RedisConfig, RedisStore, RedisTls};
pub use store::resilient::{ResilientStore, StoreState};
pub use store::{
    Admission, CounterSnapshot, CounterView, InspectFilter, Refusal, Settlement, Store, StoreError,
};
pub use store::{ReservationId, SweepStats};
pub use time::{Clock, ManualClock, SystemClock};
pub use window::Window;
