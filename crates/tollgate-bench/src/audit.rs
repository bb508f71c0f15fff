//! The accounting audit: what the gateway charged against what the upstream reported.
//!
//! Inputs: the calls a soak sent ([`crate::soak::Call`]), the gateway's JSON access log
//! (one line per request, `id` = the call's `x-request-id`), the total of the counters the
//! calls were charged to, and the outstanding reservations once the gateway is idle.
//!
//! The simulator's usage is deterministic ([`tollgate_sim::prompt_tokens_for`],
//! [`tollgate_sim::completion_tokens_for`]), so every call has a known "reported" usage
//! ([`Call::reported`]).
//! The rules:
//!
//! - a call charged from usage (`estimated: false`) was charged exactly the reported
//!   prompt and completion tokens, and `charged` equals their sum (the default cost);
//! - a call that completed normally (no fault, client stayed) is charged from usage, never
//!   estimated: usage arrived, so it must be used;
//! - refused calls and upstream errors without usage are charged nothing;
//! - estimates (faults that lose the usage, clients that left) are listed apart, next to
//!   what the upstream would have reported;
//! - every call has exactly one access line (except calls whose client gave up before any
//!   answer, which the gateway may never have read); the counters hold exactly the sum of
//!   what the access log says was charged; no reservation is left outstanding.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde_json::Value;

use crate::soak::{Call, CallEnd};

/// One access-log line, as far as the audit needs it.
#[derive(Debug, Clone, Default)]
pub struct AccessLine {
    pub id: String,
    pub status: u64,
    pub decision: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub charged: u64,
    pub estimated: bool,
}

/// The access lines in a JSON log (other lines and other formats are skipped).
pub fn access_lines(log: &str) -> Vec<AccessLine> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "tollgate::access")
        .map(|v| {
            let f = &v["fields"];
            let n = |k: &str| f[k].as_u64().unwrap_or(0);
            AccessLine {
                id: f["id"].as_str().unwrap_or_default().to_owned(),
                status: n("status"),
                decision: f["decision"].as_str().unwrap_or_default().to_owned(),
                input_tokens: n("input_tokens"),
                output_tokens: n("output_tokens"),
                charged: n("charged"),
                estimated: f["estimated"].as_bool().unwrap_or(false),
            }
        })
        .collect()
}

/// The audit's figures and every rule broken.
#[derive(Debug, Default)]
pub struct Audit {
    pub calls: u64,
    /// Calls charged from the upstream's usage.
    pub exact_calls: u64,
    pub exact_charged: u64,
    pub exact_reported: u64,
    /// Calls charged an estimate.
    pub estimated_calls: u64,
    pub estimated_charged: u64,
    /// What the upstream reported (or would have) for the estimated calls.
    pub estimated_reported: u64,
    /// Estimates by cause: fault name or "client left".
    pub estimated_by_cause: HashMap<String, (u64, u64)>,
    /// Refused or failed calls, charged nothing.
    pub uncharged_calls: u64,
    /// Calls the client could not complete (transport errors).
    pub failed_calls: u64,
    /// Calls whose client gave up before any answer and that left no access line: the
    /// gateway never got to them.
    pub never_read: u64,
    pub charged_total: u64,
    pub counters_total: u64,
    pub outstanding: u64,
    pub problems: Vec<String>,
}

impl Audit {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// A few lines for people.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mark = |ok: bool| if ok { "OK" } else { "MISMATCH" };
        let _ = writeln!(s, "accounting audit over {} calls:", self.calls);
        let _ = writeln!(
            s,
            "  exact (usage arrived): {} calls, charged {} tokens, upstream reported {} [{}]",
            self.exact_calls,
            self.exact_charged,
            self.exact_reported,
            mark(self.exact_charged == self.exact_reported)
        );
        let _ = writeln!(
            s,
            "  estimated (no usage):  {} calls, charged {} tokens, upstream would have reported {}",
            self.estimated_calls, self.estimated_charged, self.estimated_reported
        );
        let mut causes: Vec<_> = self.estimated_by_cause.iter().collect();
        causes.sort();
        for (cause, (calls, charged)) in causes {
            let _ = writeln!(s, "    {cause}: {calls} calls, {charged} tokens");
        }
        let _ = writeln!(
            s,
            "  not charged (refusals, upstream errors, calls that never reached it): {}",
            self.uncharged_calls
        );
        let _ = writeln!(s, "  client transport failures: {}", self.failed_calls);
        let _ = writeln!(
            s,
            "  clients gone before the gateway read their call (no access line): {}",
            self.never_read
        );
        let _ = writeln!(
            s,
            "  counters hold {} tokens, access log charged {} [{}]",
            self.counters_total,
            self.charged_total,
            mark(self.counters_total == self.charged_total)
        );
        let _ = writeln!(
            s,
            "  reservations outstanding at the end: {} [{}]",
            self.outstanding,
            mark(self.outstanding == 0)
        );
        for p in self.problems.iter().take(20) {
            let _ = writeln!(s, "  !! {p}");
        }
        if self.problems.len() > 20 {
            let _ = writeln!(s, "  !! … {} more", self.problems.len() - 20);
        }
        s
    }
}

/// Checks the books (see the module docs).
pub fn audit(calls: &[Call], log: &str, counters_total: u64, outstanding: u64) -> Audit {
    let mut a = Audit {
        calls: calls.len() as u64,
        counters_total,
        outstanding,
        ..Audit::default()
    };
    let mut lines: HashMap<String, Vec<AccessLine>> = HashMap::new();
    for l in access_lines(log) {
        lines.entry(l.id.clone()).or_default().push(l);
    }
    for call in calls {
        let Some(found) = lines.remove(&call.id) else {
            // A call that failed, or whose client gave up before any answer, may never
            // have been read by the gateway (under load the client can be gone first):
            // no line, and nothing charged, which the counters-against-log check below
            // would catch.
            match call.end {
                CallEnd::Failed(_) => {
                    a.failed_calls += 1;
                    a.uncharged_calls += 1;
                }
                CallEnd::Left(None) => {
                    a.never_read += 1;
                    a.uncharged_calls += 1;
                }
                _ => a.problems.push(format!("{}: no access line", call.id)),
            }
            continue;
        };
        if matches!(call.end, CallEnd::Failed(_)) {
            a.failed_calls += 1;
        }
        let [line] = found.as_slice() else {
            a.problems
                .push(format!("{}: {} access lines", call.id, found.len()));
            continue;
        };
        a.charged_total += line.charged;
        let (prompt, completion) = call.reported;
        let normal = call.fault.is_none() && !call.leave;
        if line.decision != "allowed" {
            if line.charged != 0 {
                a.problems.push(format!(
                    "{}: refused ({}) but charged {}",
                    call.id, line.decision, line.charged
                ));
            }
            a.uncharged_calls += 1;
        } else if line.estimated {
            a.estimated_calls += 1;
            a.estimated_charged += line.charged;
            a.estimated_reported += prompt + completion;
            let cause = match (call.leave, call.fault) {
                (true, None) => "client left".to_owned(),
                (true, Some(f)) => format!("client left ({f} asked)"),
                (false, Some(f)) => f.to_owned(),
                (false, None) => "no fault, client stayed".to_owned(),
            };
            let e = a.estimated_by_cause.entry(cause).or_default();
            e.0 += 1;
            e.1 += line.charged;
            if normal {
                a.problems.push(format!(
                    "{}: usage arrived (status {}) but an estimate was charged",
                    call.id, line.status
                ));
            }
        } else if line.charged > 0 {
            a.exact_calls += 1;
            a.exact_charged += line.charged;
            a.exact_reported += prompt + completion;
            if (line.input_tokens, line.output_tokens) != (prompt, completion)
                || line.charged != prompt + completion
            {
                a.problems.push(format!(
                    "{}: charged {} ({} in + {} out), upstream reported {} + {}",
                    call.id,
                    line.charged,
                    line.input_tokens,
                    line.output_tokens,
                    prompt,
                    completion
                ));
            }
        } else {
            a.uncharged_calls += 1;
            if normal && line.status < 400 && prompt + completion > 0 {
                a.problems.push(format!(
                    "{}: completed with status {} but charged nothing",
                    call.id, line.status
                ));
            }
        }
    }
    if a.counters_total != a.charged_total {
        a.problems.push(format!(
            "counters hold {} tokens but the access log charged {}",
            a.counters_total, a.charged_total
        ));
    }
    if a.outstanding != 0 {
        a.problems
            .push(format!("{} reservations outstanding", a.outstanding));
    }
    a
}
