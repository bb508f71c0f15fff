//! The one machine-readable line a run prints.

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

use crate::run::{Plan, Stats};

/// Percentiles of a histogram in µs (all zero when it is empty).
pub fn percentiles(h: &Histogram<u64>) -> Value {
    json!({
        "p50": h.value_at_quantile(0.50),
        "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
        "mean": (h.mean() * 10.0).round() / 10.0,
    })
}

/// The report: throughput over the measured window, latency percentiles (µs), statuses,
/// transport errors by kind and, with `--stream`, time-to-first-byte percentiles.
pub fn report(url: &str, plan: &Plan, threads: usize, stats: &Stats) -> Value {
    let seconds = plan.duration.as_secs_f64();
    let responses = stats.responses();
    let rps = if seconds > 0.0 {
        (responses as f64 / seconds * 10.0).round() / 10.0
    } else {
        0.0
    };
    let statuses: Map<String, Value> = stats
        .statuses
        .iter()
        .map(|(s, n)| (s.to_string(), Value::from(*n)))
        .collect();
    let errors: Map<String, Value> = stats
        .errors
        .iter()
        .map(|(k, n)| (k.name().to_owned(), Value::from(*n)))
        .collect();
    let mut out = json!({
        "url": url,
        "mode": if plan.interval.is_some() { "open" } else { "closed" },
        "concurrency": plan.concurrency,
        "threads": threads,
        "offered_rps": plan.interval.map(|i| (1.0 / i.as_secs_f64() * 10.0).round() / 10.0),
        "duration_s": seconds,
        "requests": responses,
        "rps": rps,
        "latency_us": percentiles(&stats.latency),
        "status": statuses,
        "errors": stats.error_count(),
        "error_kinds": errors,
        "not_sent": stats.not_sent,
        "bytes": stats.bytes,
    });
    if plan.stream {
        if let Some(obj) = out.as_object_mut() {
            obj.insert("ttfb_us".to_owned(), percentiles(&stats.ttfb));
        }
    }
    out
}
