//! `nat-bench`: the benchmarks of xdp-static-nat (run through `cargo xtask bench`). Needs root.
mod bpf;
mod breakdown;
mod control;
mod flood;
mod forward;
mod frame;
mod iptables;
mod mapops;
mod natd;
mod netns;
mod report;
mod testrun;
mod topo;
mod traffic;
mod util;
mod verdict;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Benchmarks of the XDP static NAT; writes RESULTS.md and SVG charts")]
struct Args {
    /// Fewer repeats and smaller tables (about a minute or two).
    #[arg(long)]
    quick: bool,
    /// Where RESULTS.md and the charts go.
    #[arg(long, default_value = "bench")]
    out: PathBuf,
    /// Sections to run (default: all): testrun, forward, flood, control, maps.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Run even though the tree has uncommitted changes; RESULTS.md then says so at its top.
    #[arg(long)]
    allow_dirty: bool,
    /// Section 2 also times natd's XDP program alone, per packet, with the kernel's BPF
    /// run-time statistics, in runs of their own (the statistics are on for the whole machine
    /// while those runs last, so this is off by default).
    #[arg(long)]
    bpf_stats: bool,
}

fn main() {
    util::install_signal_handlers();
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("nat-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    // What is measured, before anything is: figures from uncommitted code belong to no
    // commit, so they are refused unless asked for (and then flagged in RESULTS.md).
    let machine = util::Machine::probe();
    if !machine.changes.is_empty() && !args.allow_dirty {
        anyhow::bail!(
            "the tree has uncommitted changes ({}); commit them first, or pass --allow-dirty \
             (RESULTS.md then warns that no commit holds the code measured)",
            machine
                .changes
                .iter()
                .map(|c| c.trim())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    netns::sweep_stale();
    let want = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    let mut sections = Vec::new();
    if want("testrun") {
        sections.extend(testrun::run(args.quick).context("section 1 (test run)")?);
    }
    if want("forward") {
        sections
            .push(forward::section(args.quick, args.bpf_stats).context("section 2 (forwarding)")?);
    }
    if want("flood") {
        sections.push(flood::section(args.quick).context("section 3 (flood)")?);
    }
    if want("control") {
        sections.push(control::section(args.quick).context("section 4 (control plane)")?);
    }
    if want("maps") {
        sections.push(mapops::section(args.quick).context("section 5 (map operations)")?);
    }
    std::fs::create_dir_all(&args.out)?;
    for s in &sections {
        for c in &s.charts {
            std::fs::write(args.out.join(&c.file), report::svg(c))?;
        }
    }
    let md = report::markdown(&machine, args.quick, include_str!("preamble.md"), &sections);
    std::fs::write(args.out.join("RESULTS.md"), md)?;
    eprintln!("bench: wrote {}", args.out.join("RESULTS.md").display());
    Ok(())
}
