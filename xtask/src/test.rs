//! `cargo xtask test`: the one command that runs every check and test (what CI runs).
//! fmt and clippy run even if the other fails; the tests and the fuzzers run only if the build
//! succeeds. At the end `RELIABILITY.md` is rendered from the figures the tests and the
//! fuzzers reported (see `reliability`).

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::util::{self, cargo};
use crate::{fuzz, reliability};

struct Step {
    name: &'static str,
    outcome: Outcome,
}

enum Outcome {
    Passed(f64),
    Failed(f64, String),
    Skipped,
}

/// Test counts summed over every `test result:` line cargo test printed, and the tests that
/// failed or were ignored (with the reason given in `#[ignore = "..."]`).
#[derive(Default)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
    failed_tests: Vec<String>,
    ignored_tests: Vec<(String, String)>,
}

/// Seconds each fuzz target runs by default (three targets: about 1.5 minutes in all).
pub const FUZZ_SECONDS: u64 = 25;

pub fn run(extra_args: &[String], fuzz_seconds: u64) -> Result<()> {
    crate::setup::run()?;
    util::require_root("the tests need CAP_NET_ADMIN, CAP_BPF and network namespaces")?;
    let figures = reliability::reset()?;

    let mut steps = Vec::new();
    let mut timed = |name: &'static str, f: &mut dyn FnMut() -> Result<()>| {
        println!("test: {name}");
        let start = Instant::now();
        let result = f();
        let secs = start.elapsed().as_secs_f64();
        let ok = result.is_ok();
        let outcome = match result {
            Ok(()) => Outcome::Passed(secs),
            Err(e) => Outcome::Failed(secs, format!("{e:#}")),
        };
        steps.push(Step { name, outcome });
        ok
    };

    timed("cargo fmt --check", &mut || {
        util::run(cargo().args(["fmt", "--all", "--", "--check"]))
    });
    timed("cargo clippy", &mut || {
        util::run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))
    });
    let built = timed("cargo build", &mut || {
        util::run(cargo().args(["build", "--bins"]))
    });
    let mut counts = Counts::default();
    let mut fuzzed = Vec::new();
    if built {
        timed("cargo test", &mut || {
            cargo_test(extra_args, &figures, &mut counts)
        });
        if fuzz_seconds > 0 {
            timed("cargo fuzz", &mut || {
                fuzzed = fuzz::run(fuzz_seconds, &[])?;
                fuzz::check(&fuzzed)
            });
        }
    } else {
        for name in ["cargo test", "cargo fuzz"] {
            steps.push(Step {
                name,
                outcome: Outcome::Skipped,
            });
        }
    }

    println!("\nxtask test summary:");
    let mut failures = 0;
    for step in &steps {
        match &step.outcome {
            Outcome::Passed(secs) => println!("  ok      {:<20} {secs:6.1}s", step.name),
            Outcome::Failed(secs, why) => {
                failures += 1;
                println!("  FAILED  {:<20} {secs:6.1}s  {why}", step.name);
            }
            Outcome::Skipped => println!("  skipped {:<20} (build failed)", step.name),
        }
    }
    if built {
        if counts.passed + counts.failed + counts.ignored == 0 {
            println!("  warning: cargo test reported no tests");
        }
        println!(
            "tests: {} passed, {} failed, {} skipped",
            counts.passed, counts.failed, counts.ignored
        );
    }
    let tests = built.then(|| {
        format!(
            "{} passed, {} failed, {} skipped",
            counts.passed, counts.failed, counts.ignored
        )
    });
    let step_lines: Vec<(String, String)> = steps
        .iter()
        .map(|s| {
            let outcome = match &s.outcome {
                Outcome::Passed(secs) => format!("passed ({secs:.0} s)"),
                Outcome::Failed(secs, _) => format!("FAILED ({secs:.0} s)"),
                Outcome::Skipped => "skipped".to_string(),
            };
            (s.name.to_string(), outcome)
        })
        .collect();
    let path = reliability::render(&reliability::RunInfo {
        steps: &step_lines,
        tests,
        failed_tests: &counts.failed_tests,
        ignored_tests: &counts.ignored_tests,
        fuzz: &fuzzed,
        fuzz_seconds,
    })?;
    println!("wrote {}", path.display());
    if failures > 0 {
        bail!("{failures} of {} steps failed", steps.len());
    }
    Ok(())
}

/// Runs `cargo test` (the default members: every crate but nat-ebpf, which only builds for the
/// BPF target and is compiled by nat-userspace's build.rs), echoing its stdout and summing its
/// `test result:` lines. The tests append their figures to `figures`.
fn cargo_test(extra_args: &[String], figures: &std::path::Path, counts: &mut Counts) -> Result<()> {
    let (natd, natctl) = util::debug_bins()?;
    const DIFFERENTIAL_CASES: &str = "200000";
    for bin in [&natd, &natctl] {
        if !bin.is_file() {
            bail!("{} was not built", bin.display());
        }
    }
    // The differential tests' size: 200,000 gives about 520,000 random frames and scenario
    // steps through program and model (a few minutes); set it to override.
    let cases = std::env::var("NAT_PROPTEST_CASES").unwrap_or_else(|_| DIFFERENTIAL_CASES.into());
    let mut cmd = cargo();
    cmd.args(["test", "--no-fail-fast"])
        .args(extra_args)
        .env("NAT_PROPTEST_CASES", cases)
        .env("NATD_BIN", &natd)
        .env("NATCTL_BIN", &natctl)
        .env(reliability::ENV, figures)
        .stdout(Stdio::piped());
    let line = util::describe(&cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start `{line}`"))?;
    if let Some(stdout) = child.stdout.take() {
        for text in BufReader::new(stdout).lines() {
            let text = text.with_context(|| format!("cannot read the output of `{line}`"))?;
            println!("{text}");
            count_result_line(&text, counts);
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("failed to wait for `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Parses `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; ...`,
/// and notes `test NAME ... FAILED` and `test NAME ... ignored, REASON`.
fn count_result_line(line: &str, counts: &mut Counts) {
    if let Some((name, outcome)) = line
        .trim()
        .strip_prefix("test ")
        .and_then(|l| l.split_once(" ... "))
    {
        if outcome == "FAILED" {
            counts.failed_tests.push(name.to_string());
        } else if let Some(why) = outcome.strip_prefix("ignored") {
            let why = why.trim_start_matches(", ").trim();
            counts
                .ignored_tests
                .push((name.to_string(), why.to_string()));
        }
        return;
    }
    let Some(rest) = line.trim().strip_prefix("test result: ") else {
        return;
    };
    let fields = rest.split_once(". ").map_or(rest, |(_, f)| f);
    for field in fields.split(';') {
        let mut words = field.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => counts.passed += n,
            "failed" => counts.failed += n,
            "ignored" => counts.ignored += n,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_result_lines() {
        let mut c = Counts::default();
        count_result_line(
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            &mut c,
        );
        count_result_line(
            "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
            &mut c,
        );
        count_result_line("running 3 tests", &mut c);
        count_result_line("test a::b ... FAILED", &mut c);
        count_result_line("test a::c ... ok", &mut c);
        count_result_line("test a::d ... ignored, product bug: x", &mut c);
        count_result_line("test a::e ... ignored", &mut c);
        assert_eq!((c.passed, c.failed, c.ignored), (4, 2, 1));
        assert_eq!(c.failed_tests, ["a::b"]);
        assert_eq!(
            c.ignored_tests,
            [
                ("a::d".to_string(), "product bug: x".to_string()),
                ("a::e".to_string(), String::new())
            ]
        );
    }
}
