//! Config loading on arbitrary text: YAML → `Config` → compiled `Runtime`, or a list of
//! problems. Never a panic. Invariant: a problem that names a line names one that exists
//! (1-based; YAML's line ends; one past the end for "unexpected end of input").
//!
//! Inputs that name files (`*_file`, `jwks_file`) are parsed but not compiled, so the
//! fuzzer never reads the machine's files.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::config::{self, Problem};
use tollgate::runtime::Runtime;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    // YAML ends lines at `\r\n`, `\n` and a bare `\r`; one more for "end of input".
    let lines = src.replace("\r\n", "\n").matches(['\n', '\r']).count() + 2;
    let check = |problems: &[Problem]| {
        for p in problems {
            let _ = p.to_string();
            if let Some(line) = p.line {
                assert!(line >= 1 && line <= lines, "line {line} of {lines}: {p}");
            }
        }
    };
    let (cfg, index) = match config::parse(src) {
        Ok(parsed) => parsed,
        Err(problems) => {
            assert!(!problems.is_empty(), "refused without a problem");
            check(&problems);
            return;
        }
    };
    if src.contains("_file") {
        return;
    }
    match Runtime::build(cfg, &index) {
        Ok((_, warnings)) => check(&warnings),
        Err(problems) => {
            assert!(!problems.is_empty(), "refused without a problem");
            check(&problems);
        }
    }
});
