//! `cargo xtask bench [-- --quick]`: setup, a release build of natd, natctl and the bench,
//! then `nat-bench --bpf-stats`, which writes bench/RESULTS.md and the charts. Needs root.
//! Not part of `cargo xtask test`: it takes about twenty minutes (`--quick`: a few).
//! nat-bench refuses a tree with uncommitted changes unless given `--allow-dirty`.
use anyhow::{Result, bail};

use crate::util::{self, cargo, command};

pub fn run(args: &[String]) -> Result<()> {
    crate::setup::run()?;
    util::require_root("the benchmarks create network namespaces, load XDP programs and run natd")?;
    util::install_interrupt_handler()?;
    util::run(cargo().args([
        "build",
        "--release",
        "-p",
        "nat-bench",
        "-p",
        "nat-userspace",
        "-p",
        "natctl",
        "--bins",
    ]))?;
    let release = util::target_dir()?.join("release");
    let bench = release.join("nat-bench");
    if !bench.is_file() {
        bail!("{} was not built", bench.display());
    }
    // natd's XDP program timed alone in section 2 (the kernel's BPF statistics, on only
    // during runs of their own).
    let stats = (!args.iter().any(|a| a == "--bpf-stats")).then_some("--bpf-stats");
    util::run(
        command(&bench)
            .env("NATD_BIN", release.join("natd"))
            .env("NATCTL_BIN", release.join("natctl"))
            .arg("--out")
            .arg(util::repo_root().join("bench"))
            .args(stats)
            .args(args),
    )
}
