//! `cargo xtask test`: the one command that runs every check and test (what CI runs).
//! fmt and clippy run even if the other fails; the tests run only if the build succeeds.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::util::{self, cargo};

struct Step {
    name: &'static str,
    outcome: Outcome,
}

enum Outcome {
    Passed(f64),
    Failed(f64, String),
    Skipped,
}

/// Test counts summed over every `test result:` line cargo test printed.
#[derive(Default)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

pub fn run(extra_args: &[String]) -> Result<()> {
    crate::setup::run()?;
    util::require_root("the tests need CAP_NET_ADMIN, CAP_BPF and network namespaces")?;

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
    if built {
        timed("cargo test", &mut || cargo_test(extra_args, &mut counts));
    } else {
        steps.push(Step {
            name: "cargo test",
            outcome: Outcome::Skipped,
        });
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
    if failures > 0 {
        bail!("{failures} of {} steps failed", steps.len());
    }
    Ok(())
}

/// Runs `cargo test` (the default members: every crate but nat-ebpf, which only builds for the
/// BPF target and is compiled by nat-userspace's build.rs), echoing its stdout and summing its `test result:` lines.
fn cargo_test(extra_args: &[String], counts: &mut Counts) -> Result<()> {
    let (natd, natctl) = util::debug_bins()?;
    for bin in [&natd, &natctl] {
        if !bin.is_file() {
            bail!("{} was not built", bin.display());
        }
    }
    let mut cmd = cargo();
    cmd.args(["test", "--no-fail-fast"])
        .args(extra_args)
        .env("NATD_BIN", &natd)
        .env("NATCTL_BIN", &natctl)
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

/// Parses `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; ...`.
fn count_result_line(line: &str, counts: &mut Counts) {
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
        assert_eq!((c.passed, c.failed, c.ignored), (4, 2, 1));
    }
}
