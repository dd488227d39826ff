//! How long `cargo xtask test` takes: the sentence the README carries between its
//! [`BEGIN`] and [`END`] markers, made from the step timings a full run measured (and the
//! slowest test suites, by libtest's own times). Only a full run (no test filter, the default
//! fuzz time and `NAT_PROPTEST_CASES`) rewrites it; any run prints it.

use std::fs;

use anyhow::{Context, Result, bail};

use crate::testlog::Suite;
use crate::util;

pub const BEGIN: &str = "<!-- timing: written by a full `cargo xtask test` run -->";
pub const END: &str = "<!-- end of timing -->";
/// The budget CI holds the run to.
pub const BUDGET_SECS: f64 = 30.0 * 60.0;

/// "14.2 min" or "52 s".
fn span(secs: f64) -> String {
    if secs >= 120.0 {
        format!("{:.1} min", secs / 60.0)
    } else {
        format!("{secs:.0} s")
    }
}

/// The sentence: total, each step (longest first), the slowest suites inside `cargo test`,
/// the fuzzing itself inside `cargo fuzz` (`fuzzing`: seconds the targets ran; the rest is
/// building them), and which step dominates. `full`: the run was a full one (else the
/// sentence says not).
pub fn sentence(
    full: bool,
    when: &str,
    cpus: &str,
    steps: &[(&str, f64)],
    suites: &[Suite],
    fuzzing: Option<f64>,
) -> String {
    let total: f64 = steps.iter().map(|(_, s)| s).sum();
    let mut by_time: Vec<_> = steps.to_vec();
    by_time.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut slow: Vec<&Suite> = suites.iter().filter(|s| s.seconds >= 1.0).collect();
    slow.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    let parts: Vec<String> = by_time
        .iter()
        .map(|(name, secs)| {
            let mut p = format!("`{name}` {secs:.0} s");
            if *name == "cargo test" && !slow.is_empty() {
                let top: Vec<_> = slow
                    .iter()
                    .take(3)
                    .map(|s| format!("{} {:.0} s", s.name, s.seconds))
                    .collect();
                p.push_str(&format!(
                    " (compiling the tests included; slowest suites: {})",
                    top.join(", ")
                ));
            }
            if let (true, Some(f)) = (*name == "cargo fuzz", fuzzing) {
                p.push_str(&format!(
                    " ({f:.0} s fuzzing, {:.0} s building the targets)",
                    (secs - f).max(0.0)
                ));
            }
            p
        })
        .collect();
    let dominant = by_time.first().map_or(String::new(), |(name, secs)| {
        format!(
            "; `{name}` dominates ({:.0} % of the time)",
            100.0 * secs / total.max(1.0)
        )
    });
    format!(
        "{} took {} on {cpus} CPUs ({when}): {}{dominant}.",
        if full {
            "A full `cargo xtask test`"
        } else {
            "This `cargo xtask test` (not a full run)"
        },
        span(total),
        parts.join(", "),
    )
}

/// `text` with the part between the markers replaced by `sentence`.
pub fn replace(text: &str, sentence: &str) -> Result<String> {
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        bail!("the README has no `{BEGIN}` ... `{END}` markers");
    };
    if e < b {
        bail!("the README's timing markers are out of order");
    }
    Ok(format!("{}{BEGIN}\n{sentence}\n{}", &text[..b], &text[e..]))
}

/// Rewrites the README's timing sentence.
pub fn update_readme(sentence: &str) -> Result<()> {
    let path = util::repo_root().join("README.md");
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    fs::write(&path, replace(&text, sentence)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentence_and_replacement() {
        let suites = [
            Suite {
                name: "testrun".into(),
                seconds: 150.0,
                finished: true,
                ..Suite::default()
            },
            Suite {
                name: "e2e".into(),
                seconds: 20.0,
                finished: true,
                ..Suite::default()
            },
            Suite {
                name: "nat_common".into(),
                seconds: 0.1,
                finished: true,
                ..Suite::default()
            },
        ];
        assert!(
            sentence(false, "now", "2", &[("cargo test", 3.0)], &[], None)
                .starts_with("This `cargo xtask test` (not a full run) took 3 s on 2 CPUs (now)")
        );
        let s = sentence(
            true,
            "2026-11-26, commit abc1234",
            "2",
            &[
                ("cargo fmt --check", 1.0),
                ("cargo test", 204.0),
                ("cargo fuzz", 572.0),
            ],
            &suites,
            Some(81.0),
        );
        assert_eq!(
            s,
            "A full `cargo xtask test` took 12.9 min on 2 CPUs (2026-11-26, commit abc1234): \
             `cargo fuzz` 572 s (81 s fuzzing, 491 s building the targets), `cargo test` 204 s (compiling the tests included; slowest \
             suites: testrun 150 s, e2e 20 s), `cargo fmt --check` 1 s; `cargo fuzz` dominates \
             (74 % of the time)."
        );
        let readme = format!("a\n{BEGIN}\nold\n{END}\nb\n");
        assert_eq!(
            replace(&readme, "new").unwrap(),
            format!("a\n{BEGIN}\nnew\n{END}\nb\n")
        );
        assert!(replace("no markers", "x").is_err());
    }
}
