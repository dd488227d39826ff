//! Shared helpers: external commands bounded by the bench's time limit, the Ctrl-C flag every long loop checks, summary
//! statistics over repeats, and what the machine is.
use std::{
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};

/// How long one helper command (ip, sysctl, iptables-restore, natctl...) may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set a flag that [`check_interrupted`] turns into an error, so every
/// guard (namespaces, natd, XDP links) is dropped on the way out instead of being leaked.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

pub fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails unless it exits 0 within [`COMMAND_TIMEOUT`]
/// (then it is killed).
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    nat_testbed::run_bounded(cmd, COMMAND_TIMEOUT)?.ok()
}

pub fn cmd(program: &str, args: &[&str]) -> anyhow::Result<String> {
    run(Command::new(program).args(args))
}

/// Median, minimum and maximum of repeated measurements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    /// `None` for no samples. The median of an even count is the mean of the middle two.
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    /// `median (min-max)` with `prec` decimals.
    pub fn show(&self, prec: usize) -> String {
        format!(
            "{:.prec$} ({:.prec$}–{:.prec$})",
            self.median, self.min, self.max
        )
    }
}

/// `median (min-max)` or `n/a`.
pub fn show(s: Option<Summary>, prec: usize) -> String {
    s.map_or_else(|| "n/a".to_string(), |s| s.show(prec))
}

/// Element-wise ratios `a[i] / b[i]` of paired samples (same repeat).
pub fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .filter(|(_, b)| **b != 0.0)
        .map(|(a, b)| a / b)
        .collect()
}

/// What the numbers were measured on, captured before the first measurement.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub commit: String,
    /// `git status --porcelain` lines of files other than the bench's own outputs: empty
    /// when the commit holds the code measured.
    pub changes: Vec<String>,
    pub date: String,
}

/// Files the bench writes itself (its results), which do not make a tree dirty.
fn is_output(status_line: &str) -> bool {
    let path = status_line.get(3..).unwrap_or_default().trim();
    path == "bench/RESULTS.md" || (path.starts_with("bench/") && path.ends_with(".svg"))
}

impl Machine {
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".into(), |(_, v)| v.trim().to_string());
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        let kernel = cmd("uname", &["-r"]).unwrap_or_default().trim().to_string();
        let commit = cmd("git", &["rev-parse", "HEAD"])
            .unwrap_or_default()
            .trim()
            .to_string();
        let changes = match cmd("git", &["status", "--porcelain"]) {
            Ok(text) => text
                .lines()
                .filter(|l| !l.trim().is_empty() && !is_output(l))
                .map(str::to_string)
                .collect(),
            Err(e) => vec![format!("(git status failed: {e:#})")],
        };
        let date = cmd("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
            .unwrap_or_default()
            .trim()
            .to_string();
        Self {
            cpu,
            cores,
            kernel,
            commit,
            changes,
            date,
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds (the clock every namespace shares).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and pointer to a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time by kind, summed over all CPUs, from `/proc/stat` (USER_HZ ticks).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTimes {
    pub softirq: u64,
}

impl CpuTimes {
    pub fn read() -> anyhow::Result<Self> {
        let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = text
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("/proc/stat has no cpu line")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...
        if v.len() < 7 {
            bail!("/proc/stat: short cpu line: {line}");
        }
        Ok(Self { softirq: v[6] })
    }

    /// Softirq seconds since `earlier`.
    pub fn softirq_secs_since(&self, earlier: &Self) -> f64 {
        self.softirq.saturating_sub(earlier.softirq) as f64 / user_hz()
    }
}

fn user_hz() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_median_min_max() {
        let s = Summary::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (3.0, 1.0, 5.0, 3));
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(Summary::of(&[]).is_none());
        assert!(Summary::of(&[f64::NAN]).is_none());
        assert_eq!(s.show(1), "2.5 (1.0–4.0)");
        assert_eq!(ratios(&[2.0, 3.0], &[1.0, 0.0]), vec![2.0]);
    }

    #[test]
    fn the_bench_outputs_do_not_make_the_tree_dirty() {
        assert!(is_output(" M bench/RESULTS.md"));
        assert!(is_output(" M bench/testrun.svg"));
        assert!(is_output("?? bench/new.svg"));
        assert!(!is_output(" M bench/src/main.rs"));
        assert!(!is_output("?? notes.txt"));
    }
}
