//! `cargo xtask test`: the one command that runs every check and test (what CI runs).
//! fmt and clippy run even if the other fails; the tests and the fuzzers run only if the build
//! succeeds. The tests step fails if `cargo test` fails or if a suite (test binary) ran no
//! test. At the end `RELIABILITY.md` is rendered from the figures the tests and the fuzzers
//! reported (see `reliability`), also when something failed, and a full run writes its
//! timings into the README (see `timing`). After `cargo test`, `test-kernel` boots Debian 12's
//! 6.1 kernel under qemu and checks the programs and natd there (see `test_kernel`): about 2
//! minutes on 2 CPUs under software emulation (measured 125-190 s, by the load of the
//! machine), the only way on the CI machines, whose `/dev/kvm` (kvm_pvm) cannot boot a stock
//! kernel; setup downloads and unpacks the kernel package once (about half a minute).

use std::io::{BufRead, BufReader};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::testlog::TestLog;
use crate::util::{self, cargo};
use crate::{fuzz, reliability, test_kernel, timing};

struct Step {
    name: &'static str,
    outcome: Outcome,
}

enum Outcome {
    Passed(f64),
    Failed(f64, String),
    Skipped,
}

impl Outcome {
    fn secs(&self) -> Option<f64> {
        match self {
            Outcome::Passed(s) | Outcome::Failed(s, _) => Some(*s),
            Outcome::Skipped => None,
        }
    }
}

/// The step that runs the tests on Debian 12's kernel.
const TEST_KERNEL: &str = "test-kernel 6.1";

/// Seconds each fuzz target runs by default (three targets: about 1.5 minutes in all).
pub const FUZZ_SECONDS: u64 = 25;

pub fn run(extra_args: &[String], fuzz_seconds: u64) -> Result<()> {
    crate::setup::run()?;
    util::require_root("the tests need CAP_NET_ADMIN, CAP_BPF and network namespaces")?;
    // What is about to run, before anything can change it.
    let start = reliability::StartInfo::capture();
    let figures = reliability::reset()?;
    let full = extra_args.is_empty() && fuzz_seconds == FUZZ_SECONDS && !start.cases_set;

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
    let mut log = TestLog::default();
    let mut fuzzed = Vec::new();
    if built {
        timed("cargo test", &mut || {
            let ran = cargo_test(extra_args, &start.cases, &figures, &mut log);
            match (ran, check_suites(&log, !extra_args.is_empty())) {
                (Ok(()), suites) => suites,
                (Err(e), Ok(())) => Err(e),
                (Err(e), Err(empty)) => Err(e.context(format!("{empty:#}"))),
            }
        });
        timed(TEST_KERNEL, &mut || {
            test_kernel::run(&test_kernel::Options {
                figures: Some(figures.clone()),
                ..test_kernel::Options::default()
            })
        });
        if fuzz_seconds > 0 {
            timed("cargo fuzz", &mut || {
                fuzzed = fuzz::run(fuzz_seconds, &[])?;
                fuzz::check(&fuzzed)
            });
        }
    } else {
        for name in ["cargo test", TEST_KERNEL, "cargo fuzz"] {
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
        let (p, f, i) = log.totals();
        println!(
            "tests: {p} passed, {f} failed, {i} ignored, in {} suites",
            log.suites.len()
        );
    }
    let timings: Vec<(&str, f64)> = steps
        .iter()
        .filter_map(|s| s.outcome.secs().map(|secs| (s.name, secs)))
        .collect();
    let total: f64 = timings.iter().map(|(_, s)| s).sum();
    let sentence = timing::sentence(
        full,
        &format!("{}, commit {}", start.date, start.commit),
        &start.cpus,
        &timings,
        &log.suites,
        (!fuzzed.is_empty()).then(|| fuzzed.iter().map(|o| o.seconds).sum()),
    );
    println!("{sentence}");
    if total > timing::BUDGET_SECS {
        println!(
            "  warning: over the {:.0}-minute budget",
            timing::BUDGET_SECS / 60.0
        );
    }
    let step_lines: Vec<(String, String)> = steps
        .iter()
        .map(|s| {
            let outcome = match &s.outcome {
                Outcome::Passed(secs) => format!("passed ({secs:.0} s)"),
                Outcome::Failed(secs, _) => format!("**FAILED** ({secs:.0} s)"),
                Outcome::Skipped => "skipped".to_string(),
            };
            (s.name.to_string(), outcome)
        })
        .collect();
    let path = reliability::render(&reliability::RunInfo {
        start: &start,
        test_args: extra_args,
        steps: &step_lines,
        tests: built.then_some(&log),
        fuzz: &fuzzed,
        fuzz_seconds,
    })?;
    println!("wrote {}", path.display());
    if full && failures == 0 {
        timing::update_readme(&sentence)?;
        println!("wrote the timing sentence into README.md");
    }
    if failures > 0 {
        bail!("{failures} of {} steps failed", steps.len());
    }
    Ok(())
}

/// Fails naming every suite that ran no test (with `filtered`, one whose tests were all
/// filtered out by the caller's filter is fine) or whose binary did not finish.
fn check_suites(log: &TestLog, filtered: bool) -> Result<()> {
    if log.suites.is_empty() {
        bail!("cargo test ran no test suite");
    }
    let empty: Vec<String> = log
        .empty_suites(filtered)
        .iter()
        .map(|s| {
            if s.finished {
                format!("{} (ran 0 tests, {} ignored)", s.name, s.ignored)
            } else {
                format!("{} (did not finish)", s.name)
            }
        })
        .collect();
    if !empty.is_empty() {
        bail!(
            "{} test suites ran no test: {}",
            empty.len(),
            empty.join(", ")
        );
    }
    Ok(())
}

/// Runs `cargo test` (the default members: every crate but nat-ebpf, which only builds for the
/// BPF target and is compiled by nat-userspace's build.rs), echoing its output (stdout and
/// stderr merged, so cargo's `Running` lines name the suite of the lines after them) and
/// reading it into `log`. The tests append their figures to `figures`.
fn cargo_test(
    extra_args: &[String],
    cases: &str,
    figures: &std::path::Path,
    log: &mut TestLog,
) -> Result<()> {
    let (natd, natctl) = util::debug_bins()?;
    for bin in [&natd, &natctl] {
        if !bin.is_file() {
            bail!("{} was not built", bin.display());
        }
    }
    let (reader, writer) = std::io::pipe().context("cannot create a pipe")?;
    let mut cmd = cargo();
    cmd.args(["test", "--no-fail-fast"])
        .args(extra_args)
        .env(reliability::CASES_ENV, cases)
        .env("NATD_BIN", &natd)
        .env("NATCTL_BIN", &natctl)
        .env(reliability::ENV, figures)
        .stdout(writer.try_clone().context("cannot clone a pipe")?)
        .stderr(writer);
    let line = util::describe(&cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start `{line}`"))?;
    // The command holds the pipe's write ends: drop it, or the reader never sees the end.
    drop(cmd);
    for text in BufReader::new(reader).lines() {
        let text = text.with_context(|| format!("cannot read the output of `{line}`"))?;
        println!("{text}");
        log.line(&text);
    }
    let status = child
        .wait()
        .with_context(|| format!("failed to wait for `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suite_that_ran_no_test_fails_the_step() {
        let mut log = TestLog::default();
        assert!(check_suites(&log, false).is_err(), "no suite at all");
        for l in [
            "Running unittests src/lib.rs (target/debug/deps/nat_common-0123456789abcdef)",
            "test result: ok. 9 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.10s",
        ] {
            log.line(l);
        }
        check_suites(&log, false).unwrap();
        for l in [
            "Running unittests src/main.rs (target/debug/deps/natd-0123456789abcdef)",
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s",
        ] {
            log.line(l);
        }
        let e = check_suites(&log, false).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "1 test suites ran no test: natd (ran 0 tests, 0 ignored)"
        );
    }
}
