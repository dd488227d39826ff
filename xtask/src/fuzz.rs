//! `cargo xtask fuzz`: builds the fuzz targets in `fuzz/` (cargo-fuzz, libFuzzer, nightly,
//! AddressSanitizer) and runs each for a bounded time from its seed corpus. Any crash (a panic,
//! a failed oracle, a sanitizer report, a timeout) fails the run and leaves the input in
//! `fuzz/artifacts/TARGET/`. `cargo xtask test` runs it too.
//!
//! The working corpus grows in `fuzz/corpus/TARGET/` (ignored by git); the seeds stay where
//! they are: the CloudStack example payloads of nat-userspace's tests, and `fuzz/seeds/`.

use std::fs;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::util::{self, cargo};

/// The targets build in the dev profile, which fuzz/Cargo.toml sets to `opt-level = 1` (debug
/// assertions and overflow checks on, as in cargo-fuzz's default): on our 2-core machines that
/// took about 6 minutes where cargo-fuzz's release build (one codegen unit per crate, the whole
/// of natd's dependency tree) took about 12, and the targets ran as many executions per second
/// (unoptimised, a tenth as many). `run` must use the same profile, or it rebuilds.
const PROFILE: &str = "--dev";

/// One fuzz target: its name (`fuzz/fuzz_targets/NAME.rs`), its seed directories (relative to
/// the repo root) and its dictionary.
pub struct Target {
    pub name: &'static str,
    /// What it feeds, for RELIABILITY.md.
    pub feeds: &'static str,
    seeds: &'static [&'static str],
    dict: &'static str,
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "cloudstack",
        feeds: "CloudStack payload parser, then apply on a state with mappings",
        seeds: &[
            "nat-userspace/tests/data/cloudstack",
            "fuzz/seeds/cloudstack",
        ],
        dict: "fuzz/dicts/json.dict",
    },
    Target {
        name: "config",
        feeds: "config file parser, desired state and conntrack settings",
        seeds: &["fuzz/seeds/config"],
        dict: "fuzz/dicts/toml.dict",
    },
    Target {
        name: "api_request",
        feeds: "control API request decoder (and RuleSpec::service, CloudStack payloads)",
        seeds: &["fuzz/seeds/api"],
        dict: "fuzz/dicts/json.dict",
    },
];

/// What one target's run did.
pub struct Outcome {
    pub target: &'static Target,
    pub executions: u64,
    pub seconds: f64,
    pub corpus: usize,
    /// The crash report, if it crashed.
    pub crash: Option<String>,
}

/// Builds the targets, then runs each of `only` (all if empty) for `seconds`. Fails if the
/// build fails; a crash is reported in its `Outcome` (and fails [`check`]).
pub fn run(seconds: u64, only: &[String]) -> Result<Vec<Outcome>> {
    for name in only {
        if !TARGETS.iter().any(|t| t.name == name) {
            let names: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
            bail!("no fuzz target {name} (targets: {})", names.join(", "));
        }
    }
    util::run(cargo().args(["+nightly", "fuzz", "build", PROFILE]))
        .context("building the fuzz targets (cargo +nightly fuzz build --dev)")?;
    let logs = util::repo_root().join("fuzz").join("target").join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    TARGETS
        .iter()
        .filter(|t| only.is_empty() || only.iter().any(|n| n == t.name))
        .map(|t| run_one(t, seconds, &logs))
        .collect()
}

/// Fails unless every outcome ran without a crash.
pub fn check(outcomes: &[Outcome]) -> Result<()> {
    let crashed: Vec<_> = outcomes
        .iter()
        .filter(|o| o.crash.is_some())
        .map(|o| o.target.name)
        .collect();
    if !crashed.is_empty() {
        bail!("fuzz targets crashed: {}", crashed.join(", "));
    }
    Ok(())
}

fn run_one(t: &'static Target, seconds: u64, logs: &Path) -> Result<Outcome> {
    let root = util::repo_root();
    let corpus = root.join("fuzz").join("corpus").join(t.name);
    let artifacts = root.join("fuzz").join("artifacts").join(t.name);
    for dir in [&corpus, &artifacts] {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let log_path = logs.join(format!("{}.log", t.name));
    let log = fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut cmd = cargo();
    cmd.args(["+nightly", "fuzz", "run", PROFILE, t.name])
        .arg(&corpus)
        .args(t.seeds.iter().map(|s| root.join(s)))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-dict={}", root.join(t.dict).display()))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .args(["-print_final_stats=1", "-timeout=10", "-rss_limit_mb=4096"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    println!("fuzz: {} for {seconds}s ({})", t.name, t.feeds);
    let line = util::describe(&cmd);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start `{line}`"))?;
    let mut text = String::new();
    if let Some(stderr) = child.stderr.take() {
        use std::io::Write as _;
        let mut log = log;
        for l in BufReader::new(stderr).lines() {
            let l = l.with_context(|| format!("cannot read the output of `{line}`"))?;
            writeln!(log, "{l}").ok();
            text.push_str(&l);
            text.push('\n');
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("failed to wait for `{line}`"))?;
    util::check_interrupted()?;
    let outcome = Outcome {
        target: t,
        executions: executions(&text),
        seconds: start.elapsed().as_secs_f64(),
        corpus: fs::read_dir(&corpus).map_or(0, Iterator::count),
        crash: (!status.success()).then(|| crash_report(&text, &log_path, &artifacts)),
    };
    match &outcome.crash {
        None => println!(
            "fuzz: {} ok: {} executions, corpus {} inputs",
            t.name, outcome.executions, outcome.corpus
        ),
        Some(report) => println!("fuzz: {} CRASHED ({status})\n{report}", t.name),
    }
    Ok(outcome)
}

/// libFuzzer's count of executions: `stat::number_of_executed_units: N`, else the last
/// `#N` status line.
fn executions(text: &str) -> u64 {
    let stat = text.lines().find_map(|l| {
        l.strip_prefix("stat::number_of_executed_units:")
            .and_then(|n| n.trim().parse().ok())
    });
    stat.or_else(|| {
        text.lines().rev().find_map(|l| {
            l.strip_prefix('#')
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
    })
    .unwrap_or(0)
}

/// The end of the log (the panic or sanitizer report) and where the input was saved.
fn crash_report(text: &str, log: &Path, artifacts: &Path) -> String {
    let lines: Vec<_> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(40)..].join("\n");
    format!(
        "{tail}\n(full log: {}; crashing input saved under {})",
        log.display(),
        artifacts.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_counts() {
        let text = "#2\tINITED cov: 10\n#65536\tpulse  cov: 12\nDone 70000 runs in 5 second(s)\n\
                    stat::number_of_executed_units: 70001\nstat::average_exec_per_sec:     14000\n";
        assert_eq!(executions(text), 70001);
        assert_eq!(executions("#1024\tNEW cov: 3\n#2048\tpulse cov: 4\n"), 2048);
        assert_eq!(executions(""), 0);
    }
}
