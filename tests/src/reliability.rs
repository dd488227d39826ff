//! Figures the robustness tests report for `RELIABILITY.md`: faults injected, flows flooded,
//! packets lost, fuzz executions. Each figure is one JSON object on a line of its own,
//! appended to the file `$NAT_RELIABILITY_OUT` names (`cargo xtask test` sets it, then renders
//! `RELIABILITY.md` from the lines); without the variable nothing is written. One `write` per
//! line on a file opened for appending, so tests running in parallel never mix their lines.
//!
//! ```json
//! {"area":"faults","figure":"SIGKILLs during a bulk change","value":8,"source":"e2e_hardening::..."}
//! ```
//!
//! xtask adds up the values of lines with the same `area` and `figure`.
use std::io::Write as _;

/// The variable naming the file figures are appended to.
pub const ENV: &str = "NAT_RELIABILITY_OUT";

/// Appends one figure: `value` of `figure` in `area`, reported by `source` (a test's name).
/// Never fails the test: a figure that cannot be written is reported on stderr.
pub fn record(area: &str, figure: &str, value: u64, source: &str) {
    let Some(path) = std::env::var_os(ENV) else {
        return;
    };
    let mut line = serde_json::json!({
        "area": area,
        "figure": figure,
        "value": value,
        "source": source,
    })
    .to_string();
    line.push('\n');
    let r = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = r {
        eprintln!(
            "reliability: cannot append to {}: {e}",
            std::path::Path::new(&path).display()
        );
    }
}
