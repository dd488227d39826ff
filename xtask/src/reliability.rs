//! `RELIABILITY.md`: the figures one `cargo xtask test` run produced, rendered at the repo
//! root. The tests append their figures (one JSON object per line: area, figure, value,
//! source, complete) to the file [`figures_path`] names, which xtask hands them as
//! `NAT_RELIABILITY_OUT` (see `nat_tests::reliability`); the fuzz runs add theirs. Lines with
//! the same area and figure are added up. A test writes what it observed whether or not it
//! then passes; a figure from a test that failed (or stopped before its end) is marked so.
//! What ran (commit, local changes, `NAT_PROPTEST_CASES`) is captured when the run starts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::fuzz;
use crate::testlog::{Suite, TestLog};
use crate::util::{self, command};

/// The variable the tests read (`nat_tests::reliability::ENV`).
pub const ENV: &str = "NAT_RELIABILITY_OUT";
/// The variable that sizes the differential tests.
pub const CASES_ENV: &str = "NAT_PROPTEST_CASES";
/// Its value when unset: 200,000 gives about 520,000 random frames and scenario steps through
/// program and model (a few minutes).
pub const DEFAULT_CASES: &str = "200000";

/// Where this run's figures are collected (emptied at the start of a run).
pub fn figures_path() -> Result<PathBuf> {
    Ok(util::target_dir()?
        .join("reliability")
        .join("figures.jsonl"))
}

/// Empties the figures file (creating its directory).
pub fn reset() -> Result<PathBuf> {
    let path = figures_path()?;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::write(&path, "").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

fn stdout_of(program: &str, args: &[&str]) -> String {
    util::output(command(program).args(args))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// What is about to run, captured before anything runs.
pub struct StartInfo {
    pub date: String,
    pub commit: String,
    /// `git status --porcelain` lines (tracked and untracked files), empty for a clean tree.
    pub changes: Vec<String>,
    /// `NAT_PROPTEST_CASES` as the tests will see it, and whether the caller set it.
    pub cases: String,
    pub cases_set: bool,
    pub kernel: String,
    pub cpus: String,
}

impl StartInfo {
    pub fn capture() -> Self {
        let set = std::env::var(CASES_ENV).ok();
        let status = stdout_of("git", &["status", "--porcelain"]);
        Self {
            date: stdout_of("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            commit: stdout_of("git", &["rev-parse", "--short", "HEAD"]),
            changes: status
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string)
                .collect(),
            cases: set.clone().unwrap_or_else(|| DEFAULT_CASES.into()),
            cases_set: set.is_some(),
            kernel: stdout_of("uname", &["-r"]),
            cpus: stdout_of("nproc", &[]),
        }
    }

    /// "commit abc1234" or "commit abc1234 **with uncommitted changes** (N files: ...)".
    fn code(&self) -> String {
        if self.changes.is_empty() {
            return format!("commit {} (clean tree)", self.commit);
        }
        let shown: Vec<_> = self
            .changes
            .iter()
            .take(8)
            .map(|l| format!("`{}`", l.trim()))
            .collect();
        format!(
            "commit {} **with uncommitted changes** ({} files: {}{})",
            self.commit,
            self.changes.len(),
            shown.join(", "),
            if self.changes.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        )
    }
}

/// One test's contribution to a figure.
#[derive(Debug, Default, PartialEq)]
struct Source {
    name: String,
    /// Every line it wrote says it reached its end.
    complete: bool,
}

/// A figure summed over the tests that reported it.
#[derive(Debug, Default)]
struct Figure {
    value: u64,
    sources: Vec<Source>,
}

/// area -> figure -> value and sources.
type Figures = BTreeMap<String, BTreeMap<String, Figure>>;

/// Parses the figure lines; returns them and the number of malformed lines.
fn parse_figures(text: &str) -> (Figures, usize) {
    let mut figures = Figures::new();
    let mut bad = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            bad += 1;
            continue;
        };
        let (Some(area), Some(figure), Some(value)) = (
            v["area"].as_str(),
            v["figure"].as_str(),
            v["value"].as_u64(),
        ) else {
            bad += 1;
            continue;
        };
        let f = figures
            .entry(area.to_string())
            .or_default()
            .entry(figure.to_string())
            .or_default();
        f.value += value;
        let name = v["source"].as_str().unwrap_or("(unnamed)");
        // Lines written before the field existed count as complete.
        let complete = v["complete"].as_bool().unwrap_or(true);
        match f.sources.iter_mut().find(|s| s.name == name) {
            Some(s) => s.complete &= complete,
            None => f.sources.push(Source {
                name: name.to_string(),
                complete,
            }),
        }
    }
    (figures, bad)
}

/// What the run was, for the header.
pub struct RunInfo<'a> {
    pub start: &'a StartInfo,
    /// What the caller passed on to `cargo test` (a filter makes a partial run).
    pub test_args: &'a [String],
    /// One line per step: name, outcome.
    pub steps: &'a [(String, String)],
    /// What `cargo test` printed, if the tests ran.
    pub tests: Option<&'a TestLog>,
    /// The fuzz runs, if any.
    pub fuzz: &'a [fuzz::Outcome],
    pub fuzz_seconds: u64,
}

/// `source` as the table shows it: FAILED if its test failed, "stopped early" if it did not
/// say it reached its end.
fn show_source(s: &Source, failed: &[String]) -> String {
    if failed.contains(&s.name) {
        format!("{} (**FAILED**)", s.name)
    } else if !s.complete {
        format!("{} (**stopped before its end**)", s.name)
    } else {
        s.name.clone()
    }
}

fn figure_table(md: &mut String, rows: &BTreeMap<String, Figure>, failed: &[String]) {
    let _ = writeln!(md, "| figure | value | reported by |\n| --- | ---: | --- |");
    for (figure, f) in rows {
        let sources: Vec<_> = f.sources.iter().map(|s| show_source(s, failed)).collect();
        let _ = writeln!(md, "| {figure} | {} | {} |", f.value, sources.join(", "));
    }
}

fn header(md: &mut String, run: &RunInfo<'_>, figures: &Figures) {
    let s = run.start;
    let _ = writeln!(md, "# Reliability\n");
    let _ = writeln!(
        md,
        "Generated by `cargo xtask test` from the figures its tests and fuzzers reported; do not \
         edit. Run started {} at {}; kernel {}, {} CPUs. `{CASES_ENV}`={}{}.\n",
        s.date,
        s.code(),
        s.kernel,
        s.cpus,
        s.cases,
        if s.cases_set {
            " (set by the caller)"
        } else {
            " (the default)"
        },
    );
    // The differential tests' size as they counted it (planned from NAT_PROPTEST_CASES at
    // their start, and run).
    let _ = match figures.get("differential") {
        Some(rows) => writeln!(
            md,
            "Differential tests: {}.\n",
            rows.iter()
                .map(|(figure, f)| format!("{} {figure}", f.value))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        None => writeln!(md, "Differential tests: **no case counts reported**.\n"),
    };
    if !run.test_args.is_empty() {
        let _ = writeln!(
            md,
            "**A partial run**: `cargo test {}`.\n",
            run.test_args.join(" ")
        );
    }
    let _ = writeln!(md, "| step | outcome |\n| --- | --- |");
    for (name, outcome) in run.steps {
        let _ = writeln!(md, "| {name} | {outcome} |");
    }
    let Some(log) = run.tests else {
        return;
    };
    let (p, f, i) = log.totals();
    let _ = writeln!(
        md,
        "\nTests: {p} passed, {f} failed, {i} ignored, in {} suites.",
        log.suites.len()
    );
    if !log.failed_tests.is_empty() {
        let _ = writeln!(md, "\n**Failed**: {}.", log.failed_tests.join(", "));
    }
    let empty: Vec<&Suite> = log.empty_suites(!run.test_args.is_empty());
    if !empty.is_empty() {
        let names: Vec<_> = empty.iter().map(|s| s.name.as_str()).collect();
        let _ = writeln!(
            md,
            "\n**Suites that ran no test or did not finish**: {}.",
            names.join(", ")
        );
    }
    if !log.ignored_tests.is_empty() {
        let _ = writeln!(
            md,
            "\n### Known gaps\n\nTests written but not run (`#[ignore]`; run them with `cargo \
             test -- --ignored`), and why:\n\n| test | why |\n| --- | --- |"
        );
        for (name, why) in &log.ignored_tests {
            let why = if why.is_empty() {
                "**no reason given** (`#[ignore]` without one)"
            } else {
                why
            };
            let _ = writeln!(md, "| `{name}` | {why} |");
        }
    }
}

fn fuzzing(md: &mut String, run: &RunInfo<'_>) {
    let _ = writeln!(md, "\n## Fuzzing\n");
    if run.fuzz.is_empty() {
        let _ = writeln!(
            md,
            "Not run (`cargo xtask test --fuzz-seconds 0`, or the build failed)."
        );
        return;
    }
    let _ = writeln!(
        md,
        "libFuzzer with AddressSanitizer, {}s per target from the seed corpus (`cargo xtask \
         fuzz`). Besides not panicking, every accepted input must give a state natd can \
         persist and restore unchanged, whose map-write plan leads to it and whose undo \
         leads back (`fuzz/src/lib.rs`); a decoded request must encode back to itself.\n",
        run.fuzz_seconds
    );
    let _ = writeln!(
        md,
        "| target | feeds | executions | seconds | corpus | crashes |\n\
         | --- | --- | ---: | ---: | ---: | ---: |"
    );
    for o in run.fuzz {
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {:.0} | {} | {} |",
            o.target.name,
            o.target.feeds,
            o.executions,
            o.seconds,
            o.corpus,
            u8::from(o.crash.is_some())
        );
    }
    let total: u64 = run.fuzz.iter().map(|o| o.executions).sum();
    let _ = writeln!(md, "\nTotal: {total} executions.");
}

/// The whole of `RELIABILITY.md` from the run and the figure lines.
fn document(run: &RunInfo<'_>, figure_lines: &str) -> String {
    let (figures, bad) = parse_figures(figure_lines);
    let failed: &[String] = run.tests.map_or(&[], |l| &l.failed_tests);
    let mut md = String::new();
    header(&mut md, run, &figures);
    fuzzing(&mut md, run);
    let _ = writeln!(
        md,
        "\n## End-to-end robustness\n\nFrom `tests/tests/e2e_hardening.rs` (and any other test \
         that reports through `nat_tests::reliability`): natd in network namespaces under \
         hostile input, faults and exhaustion. Every value is a count the test observed \
         (packets sent and received, processes found alive, files and states compared), \
         written before the test checks it, so a test that fails still reports what it saw; \
         such figures are marked FAILED. Values are summed over the tests that reported them.\n"
    );
    if figures.is_empty() {
        let _ = writeln!(md, "No figures were reported (did the tests run?).\n");
    }
    for (area, rows) in figures
        .iter()
        .filter(|(a, _)| !matches!(a.as_str(), "differential" | "verifier"))
    {
        let _ = writeln!(md, "### {area}\n");
        figure_table(&mut md, rows, failed);
        let _ = writeln!(md);
    }
    let _ = writeln!(md, "## Differential testing\n");
    let _ = writeln!(
        md,
        "The program against the reference model (`tests/tests/testrun.rs`), sized by \
         `{CASES_ENV}`={}: what the tests counted as they compared.\n",
        run.start.cases
    );
    match figures.get("differential") {
        Some(rows) => figure_table(&mut md, rows, failed),
        None => {
            let _ = writeln!(
                md,
                "**No counts were reported**: the differential tests did not run (or did not \
                 get as far as counting)."
            );
        }
    }
    let _ = writeln!(md, "\n## Verifier\n");
    let _ = writeln!(
        md,
        "Instructions each program took the kernel's verifier to load, as the kernel reported \
         them (`tests/tests/verifier.rs` on this machine's kernel, and under `test-kernel` on \
         Debian 12's): the distance to the limit is the room left for the program to grow.\n"
    );
    match figures.get("verifier") {
        Some(rows) => figure_table(&mut md, rows, failed),
        None => {
            let _ = writeln!(
                md,
                "**No counts were reported**: the verifier suite did not run."
            );
        }
    }
    if bad > 0 {
        let _ = writeln!(md, "\n({bad} malformed figure lines were skipped.)");
    }
    md
}

/// Writes `RELIABILITY.md` at the repo root; returns its path.
pub fn render(run: &RunInfo<'_>) -> Result<PathBuf> {
    let text = fs::read_to_string(figures_path()?).unwrap_or_default();
    let path = util::repo_root().join("RELIABILITY.md");
    fs::write(&path, document(run, &text))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(changes: &[&str]) -> StartInfo {
        StartInfo {
            date: "D".into(),
            commit: "abc1234".into(),
            changes: changes.iter().map(|s| s.to_string()).collect(),
            cases: "200".into(),
            cases_set: true,
            kernel: "K".into(),
            cpus: "2".into(),
        }
    }

    #[test]
    fn figures_are_summed_and_failures_marked() {
        let lines = concat!(
            r#"{"area":"faults","figure":"kills","value":3,"source":"e2e_hardening::a","complete":true}"#,
            "\n",
            r#"{"area":"faults","figure":"kills","value":4,"source":"e2e_hardening::b","complete":false}"#,
            "\n",
            r#"{"area":"faults","figure":"lost","value":2,"source":"e2e_hardening::c","complete":false}"#,
            "\n",
            "not json\n",
            r#"{"area":"differential","figure":"frames compared","value":250,"source":"testrun::random::x","complete":true}"#,
            "\n"
        );
        let mut log = TestLog::default();
        for l in [
            "Running tests/e2e_hardening.rs (target/debug/deps/e2e_hardening-0123456789abcdef)",
            "test b ... FAILED",
            "test z ... ignored",
            "test result: FAILED. 2 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 9.00s",
        ] {
            log.line(l);
        }
        let s = start(&[" M README.md"]);
        let args = ["-p".to_string(), "nat-tests".to_string()];
        let run = RunInfo {
            start: &s,
            test_args: &args,
            steps: &[("cargo test".into(), "FAILED (9 s)".into())],
            tests: Some(&log),
            fuzz: &[],
            fuzz_seconds: 0,
        };
        let md = document(&run, lines);
        assert!(
            md.contains("commit abc1234 **with uncommitted changes** (1 files: `M README.md`)")
        );
        assert!(md.contains("`NAT_PROPTEST_CASES`=200 (set by the caller)"));
        assert!(md.contains("| kills | 7 | e2e_hardening::a, e2e_hardening::b (**FAILED**) |"));
        assert!(md.contains("| lost | 2 | e2e_hardening::c (**stopped before its end**) |"));
        assert!(md.contains("| frames compared | 250 | testrun::random::x |"));
        assert!(md.contains("Differential tests: 250 frames compared.\n"));
        assert!(md.contains("**Failed**: e2e_hardening::b."));
        assert!(md.contains("**A partial run**: `cargo test -p nat-tests`."));
        assert!(md.contains("| `e2e_hardening::z` | **no reason given**"));
        assert!(md.contains("(1 malformed figure lines were skipped.)"));
    }

    #[test]
    fn a_clean_tree_and_no_differential_counts_say_so() {
        let s = start(&[]);
        let run = RunInfo {
            start: &s,
            test_args: &[],
            steps: &[],
            tests: None,
            fuzz: &[],
            fuzz_seconds: 0,
        };
        let md = document(&run, "");
        assert!(md.contains("commit abc1234 (clean tree)"));
        assert!(md.contains("No figures were reported"));
        assert!(md.contains("**No counts were reported**"));
        assert!(md.contains("Differential tests: **no case counts reported**."));
    }
}
