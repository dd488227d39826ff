//! `cargo xtask`: setup, build, test, demo and bench for xdp-static-nat, one command each.

mod bench;
mod demo;
mod fuzz;
mod reliability;
mod setup;
mod test;
mod test_kernel;
mod testlog;
mod timing;
mod util;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for xdp-static-nat"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (Debian packages, nightly rust-src, bpf-linker,
    /// cargo-fuzz, Debian 12's kernel package for test-kernel, unpacked into /var/cache).
    /// Idempotent.
    Setup,
    /// Setup, then build the workspace (the eBPF object is built by nat-userspace's build.rs).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every check and test: fmt, clippy, build, cargo test, the fuzzers (bounded), then
    /// render RELIABILITY.md. Needs root. What CI runs.
    Test {
        /// Seconds each fuzz target runs (0: no fuzzing).
        #[arg(long, default_value_t = test::FUZZ_SECONDS)]
        fuzz_seconds: u64,
        /// Extra arguments for `cargo test`, after `--`.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Setup, then build the fuzz targets (fuzz/, nightly) and run each for a bounded time from
    /// its seed corpus; fails on any crash.
    Fuzz {
        /// Seconds each target runs.
        #[arg(long, default_value_t = test::FUZZ_SECONDS)]
        seconds: u64,
        /// Targets to run (all if none): cloudstack, config, api_request.
        targets: Vec<String>,
    },
    /// Boot an older kernel (Debian 12's 6.1 by default) under qemu and run there: every
    /// program through its verifier, a subset of the BPF_PROG_TEST_RUN tests and one
    /// end-to-end test. Needs root; a few minutes (KVM) or several (software emulation).
    TestKernel {
        /// The kernel: the newest Debian package `linux-image-VERSION.N-M-amd64` apt knows.
        #[arg(long, default_value = test_kernel::DEFAULT_VERSION)]
        kernel_version: String,
        /// How qemu runs the guest (auto: KVM with hardware virtualisation, else TCG).
        #[arg(long, value_enum, default_value_t = test_kernel::Accel::Auto)]
        accel: test_kernel::Accel,
        /// Run every BPF_PROG_TEST_RUN test, not the subset (about 8 minutes under TCG).
        #[arg(long)]
        full: bool,
        /// Seconds before the guest is killed.
        #[arg(long, default_value_t = 1200)]
        timeout_secs: u64,
    },
    /// Run natd on a three-namespace demo topology and show NAT at work. Needs root.
    Demo,
    /// Run the benchmarks and write bench/RESULTS.md and its charts. Needs root; about a
    /// quarter of an hour (`cargo xtask bench -- --quick`: a few minutes). Refuses a tree with
    /// uncommitted changes (`-- --allow-dirty`: runs, and RESULTS.md opens with a warning).
    Bench {
        /// Arguments for nat-bench, after `--` (`--quick`, `--only testrun,forward,...`,
        /// `--allow-dirty`).
        #[arg(last = true)]
        bench_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup::run(),
        Task::Build { release } => build(release),
        Task::Test {
            fuzz_seconds,
            cargo_test_args,
        } => test::run(&cargo_test_args, fuzz_seconds),
        Task::Fuzz { seconds, targets } => {
            setup::run().and_then(|()| fuzz::check(&fuzz::run(seconds, &targets)?))
        }
        Task::TestKernel {
            kernel_version,
            accel,
            full,
            timeout_secs,
        } => setup::run().and_then(|()| {
            test_kernel::run(&test_kernel::Options {
                version: kernel_version,
                accel,
                full,
                timeout: std::time::Duration::from_secs(timeout_secs),
                figures: None,
            })
        }),
        Task::Demo => demo::run(),
        Task::Bench { bench_args } => bench::run(&bench_args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Setup, then `cargo build [--release]`.
fn build(release: bool) -> Result<()> {
    setup::run()?;
    let mut cmd = util::cargo();
    // Default members: nat-ebpf only builds for the BPF target (nat-userspace's build.rs does it).
    cmd.arg("build");
    if release {
        cmd.arg("--release");
    }
    util::run(&mut cmd)
}
