//! Figures the tests report for `RELIABILITY.md`: faults injected, flows flooded, packets
//! lost, frames compared with the model. Each figure is one JSON object on a line of its own,
//! appended to the file `$NAT_RELIABILITY_OUT` names (`cargo xtask test` sets it, then renders
//! `RELIABILITY.md` from the lines); without the variable nothing is written. One `write` per
//! line on a file opened for appending, so tests running in parallel never mix their lines.
//!
//! ```json
//! {"area":"faults","figure":"SIGKILLs of natd","value":8,"source":"e2e_hardening::faults::NAME","complete":true}
//! ```
//!
//! A test keeps a [`Figures`] and sets each value as soon as it has observed it, before it
//! checks it; the figures are written when the `Figures` is dropped, so also when the test
//! returns an error or panics half-way. Only a test that called [`Figures::done`] (at its end)
//! writes `"complete": true`. The source is the test's own name (`BINARY::PATH`, as `cargo
//! test` prints it), so xtask can mark the figures of a test that failed. xtask adds up the
//! values of lines with the same `area` and `figure`.
use std::io::Write as _;

/// The variable naming the file figures are appended to.
pub const ENV: &str = "NAT_RELIABILITY_OUT";

/// The running test's name as `cargo xtask test` names it: the test binary's name without
/// cargo's hash, then the test's path (libtest names each test's thread after it), e.g.
/// `e2e_hardening::faults::natd_killed_during_a_bulk_removal_...`.
pub fn current_test() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        .map(|f| match f.rsplit_once('-') {
            Some((stem, hash))
                if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                stem.to_string()
            }
            _ => f,
        })
        .unwrap_or_else(|| "unknown".into());
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("main");
    format!("{binary}::{test}")
}

/// Appends one figure line. Never fails the test: a figure that cannot be written is
/// reported on stderr.
fn append(area: &str, figure: &str, value: u64, source: &str, complete: bool) {
    let Some(path) = std::env::var_os(ENV) else {
        return;
    };
    let mut line = serde_json::json!({
        "area": area,
        "figure": figure,
        "value": value,
        "source": source,
        "complete": complete,
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

/// The figures one test observed in one area, written when dropped (see the module doc).
/// Create it on the test's own thread, so it is named after the test.
pub struct Figures {
    area: String,
    source: String,
    values: Vec<(String, u64)>,
    complete: bool,
}

impl Figures {
    pub fn new(area: &str) -> Self {
        Self {
            area: area.to_string(),
            source: current_test(),
            values: Vec::new(),
            complete: false,
        }
    }

    fn slot(&mut self, figure: &str) -> &mut u64 {
        let i = match self.values.iter().position(|(f, _)| f == figure) {
            Some(i) => i,
            None => {
                self.values.push((figure.to_string(), 0));
                self.values.len() - 1
            }
        };
        &mut self.values[i].1
    }

    /// Sets `figure` to `value` (what was observed).
    pub fn set(&mut self, figure: &str, value: u64) {
        *self.slot(figure) = value;
    }

    /// Adds `n` to `figure` (starting from 0); with `n` = 0 the figure exists with 0.
    pub fn add(&mut self, figure: &str, n: u64) {
        *self.slot(figure) += n;
    }

    /// The value of `figure` so far (0 if never set).
    pub fn get(&self, figure: &str) -> u64 {
        self.values
            .iter()
            .find(|(f, _)| f == figure)
            .map_or(0, |(_, v)| *v)
    }

    /// The test reached its end: its figures are complete.
    pub fn done(mut self) {
        self.complete = true;
    }
}

impl Drop for Figures {
    fn drop(&mut self) {
        let complete = self.complete && !std::thread::panicking();
        for (figure, value) in &self.values {
            append(&self.area, figure, *value, &self.source, complete);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_written_on_drop_complete_only_when_done() {
        let dir = std::env::temp_dir().join(format!("xsn-reliability-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("figures.jsonl");
        // SAFETY: this is the only test of this crate that touches the variable.
        unsafe { std::env::set_var(ENV, &file) };
        {
            let mut f = Figures::new("area");
            f.add("sent", 2);
            f.add("sent", 3);
            f.set("lost", 1);
            assert_eq!(f.get("sent"), 5);
        }
        let mut f = Figures::new("area");
        f.add("sent", 0);
        f.done();
        unsafe { std::env::remove_var(ENV) };
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0]["figure"], "sent");
        assert_eq!(lines[0]["value"], 5);
        assert_eq!(lines[0]["complete"], false);
        assert_eq!(lines[1]["figure"], "lost");
        assert_eq!(lines[2]["complete"], true);
        let source = lines[2]["source"].as_str().unwrap();
        assert!(
            source.ends_with(
                "::reliability::tests::figures_are_written_on_drop_complete_only_when_done"
            ),
            "{source}"
        );
    }
}
