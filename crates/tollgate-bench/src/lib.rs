//! `tollgate-load`: an HTTP/1.1 load generator for end-to-end benchmarks of tollgate.
//!
//! * [`cli`]: options (`--url`, `-H`, `--body`, `--concurrency`, `--duration`, `--rate`, ...),
//!   parsed into a [`run::Plan`].
//! * [`run`]: one task per concurrency slot, each with its own keep-alive connection (hyper 1
//!   client connection over hyper-util's tokio I/O). Two schedules:
//!   * **closed loop** (default): each worker sends its next request as soon as the last
//!     one finished, measuring saturation throughput;
//!   * **open loop** (`--rate R`): request `k` is *scheduled* at `start + k/R`; a free worker
//!     takes the next slot, sleeps until its time and sends. Latency is measured from the
//!     scheduled time, so when the server (or the workers) fall behind, the queueing delay
//!     shows up in the percentiles instead of being silently omitted (coordinated omission,
//!     as in wrk2).
//!
//!   Requests scheduled during `--warmup` are sent but not recorded. Each worker records into
//!   its own HDR histograms (no shared locks on the hot path); they are merged at the end.
//!   With `--stream`, time to the first body byte and total time are recorded separately.
//! * [`report`]: the single JSON line printed at the end.
//!
//! `tollgate-soak` (see [`soak`], [`audit`], [`probe`]): long mixed traffic with upstream
//! faults and clients leaving, then an audit of the gateway's books against the
//! simulator's deterministic usage.
//!
//! Transport failures never panic: they are counted per kind, the connection is dropped and
//! the worker reconnects.

pub mod audit;
pub mod cli;
pub mod probe;
pub mod report;
pub mod run;
pub mod soak;
