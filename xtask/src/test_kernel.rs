//! `cargo xtask test-kernel [--kernel-version 6.1]`: the XDP and tc programs and natd on an
//! older kernel than the host's (by default Debian 12's 6.1, the kernel of CloudStack's system
//! VM template), whose verifier is weaker: a program the host loads may be refused there.
//! Boots the Debian kernel package under qemu (see `fetch`, `initramfs`, `qemu`); the guest
//! sees the host's root read-only (writes go to a tmpfs) and runs the test binaries built
//! here: every program through the verifier (`tests/tests/verifier.rs`), a subset of the
//! `BPF_PROG_TEST_RUN` differential and golden tests (`--full`: all of them), natd's ctnetlink
//! updates and deletions of the kernel's connection table and its reading of the kernel's
//! destroy events, and one end-to-end test with natd. Each step's exit code comes back on the serial console.
mod fetch;
mod initramfs;
mod qemu;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub use self::qemu::Accel;
use crate::reliability::CASES_ENV;
use crate::util::{self, cargo};

/// Debian 12's kernel (CloudStack's system VM template).
pub const DEFAULT_VERSION: &str = "6.1";
/// `NAT_PROPTEST_CASES` inside the guest.
const CASES: &str = "50";
/// `nat_tests::topology::process::SLOWDOWN_ENV`, and its value under software emulation (where natd
/// takes about a minute to verify its programs, against a second natively).
const SLOWDOWN_ENV: &str = "NAT_TEST_SLOWDOWN";
const TCG_SLOWDOWN: &str = "5";
/// Marks the guest script writes on the console.
const MARK: &str = "xtask-test-kernel:";

/// The `BPF_PROG_TEST_RUN` tests run by default: both differential property tests (random
/// frames, and random firewall and connection-tracking scenarios, against the model), and the
/// flow cache served from its slots and turned off (its atomics and both of its loads on this
/// kernel). Each test verifies the program anew, about 20 s of CPU under TCG: the other golden
/// tests are left to `--full`.
const TESTRUN_SUBSET: &[&str] = &[
    "random::program_matches_model",
    "scenarios::scenarios_match_model",
    "slots::an_established_flow_is_served_from_its_slot",
    "slots::with_the_cache_off_established_flows_are_forwarded_alike_from_flows",
];
/// Needs the clock to be past 200 s since boot (it writes flows last seen that long ago): run
/// last, and only in a full run, when the guest has been up long enough.
const NEEDS_UPTIME: &str = "conntrack::flows_expire_after_their_idle_timeout";
/// natd's ctnetlink updates and deletions of the kernel's connection table and its reading of
/// the kernel's destroy events, against this kernel's ctnetlink.
const CTNETLINK_TESTS: &[&str] = &[
    "kernel_conntrack::tests::updates_the_kernels_entries_and_finds_the_ended_ones",
    "kernel_conntrack::tests::the_kernels_destroy_events_name_the_flows_it_ended",
    "kernel_conntrack::tests::deletes_the_kernels_entries_a_selection_names",
    "kernel_conntrack::tests::flows_keyed_by_address_update_every_entry_of_their_addresses",
];
/// The end-to-end test: natd loads every program, attaches XDP and tc, and translates.
const E2E_TEST: &str = "inbound_traffic_reaches_the_guest_from_the_clients_address";

#[derive(Clone, Debug)]
pub struct Options {
    pub version: String,
    pub accel: Accel,
    /// All `BPF_PROG_TEST_RUN` tests instead of the subset.
    pub full: bool,
    pub timeout: Duration,
    /// The figures file of `cargo xtask test` (see `reliability`), where the instructions
    /// the guest's verifier verified are appended.
    pub figures: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            version: DEFAULT_VERSION.into(),
            accel: Accel::Auto,
            full: false,
            timeout: Duration::from_secs(20 * 60),
            figures: None,
        }
    }
}

/// Installs the kernel package `cargo xtask test-kernel` boots by default (`setup`).
pub fn fetch_default() -> Result<()> {
    let k = fetch::kernel(DEFAULT_VERSION)?;
    println!("setup: kernel {} ok ({})", k.release, k.vmlinuz.display());
    Ok(())
}

/// One test binary run in the guest.
struct Step {
    name: &'static str,
    exe: PathBuf,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
}

/// What a step did, from its console marks.
#[derive(Debug, Default)]
struct Seen {
    began: Option<Instant>,
    secs: Option<f64>,
    rc: Option<i32>,
}

pub fn run(opts: &Options) -> Result<()> {
    util::require_root("the guest is booted from a kernel package unpacked as root, and shares /")?;
    let kernel = fetch::kernel(&opts.version)?;
    let (accel, why) = opts.accel.resolve();
    println!(
        "test-kernel: {} (Debian package {}) with {accel:?} ({why})",
        kernel.release, kernel.package
    );
    let steps = build_steps(opts.full, accel == Accel::Tcg)?;
    let dir = qemu::work_dir()?;
    let initrd = initramfs::path(&dir, &kernel.release);
    initramfs::write(&kernel.modules, &initrd)?;
    let script = dir.join("guest.sh");
    fs::write(
        &script,
        guest_script(&kernel.modules, &kernel.release, &steps)?,
    )
    .with_context(|| format!("cannot write {}", script.display()))?;

    let names: Vec<&str> = steps.iter().map(|s| s.name).collect();
    let mut seen: Vec<Seen> = steps.iter().map(|_| Seen::default()).collect();
    let mut done = false;
    let start = Instant::now();
    let console = qemu::boot(
        &qemu::Boot {
            vmlinuz: &kernel.vmlinuz,
            initramfs: &initrd,
            script: &script,
            accel,
            cpus: 2,
            memory_mib: 2048,
            timeout: opts.timeout,
        },
        |line| note(line, &names, &mut seen, &mut done),
    )?;
    let total = start.elapsed().as_secs_f64();
    let log = dir.join("console.log");
    fs::write(&log, console.lines.join("\n") + "\n")
        .with_context(|| format!("cannot write {}", log.display()))?;

    println!("\ntest-kernel summary ({}, {accel:?}):", kernel.release);
    for line in verifier_lines(&console.lines) {
        println!("  {line}");
    }
    if let Some(path) = &opts.figures {
        append_verified(path, &kernel.release, &verifier_lines(&console.lines))?;
    }
    let mut failed = Vec::new();
    for (name, s) in names.iter().zip(&seen) {
        let secs = s.secs.map_or("   -".into(), |t| format!("{t:5.0}s"));
        let outcome = match s.rc {
            Some(0) => "ok",
            Some(_) => "FAILED",
            None => "did not finish",
        };
        if s.rc != Some(0) {
            failed.push(*name);
        }
        println!("  {outcome:<15} {name:<10} {secs}");
    }
    println!(
        "  {total:.0} s in all, boot included; console log: {}",
        log.display()
    );
    if console.timed_out {
        bail!(
            "the guest did not power off within {} s (console log: {})",
            opts.timeout.as_secs(),
            log.display()
        );
    }
    if !done {
        bail!(
            "the guest stopped before its end (console log: {})",
            log.display()
        );
    }
    if !failed.is_empty() {
        bail!(
            "on kernel {}: {} failed (console log: {})",
            kernel.release,
            failed.join(", "),
            log.display()
        );
    }
    Ok(())
}

/// Reads one console line: a step's `begin NAME` / `end NAME rc=N` or the final `done`.
fn note(line: &str, names: &[&str], seen: &mut [Seen], done: &mut bool) {
    let Some(at) = line.find(MARK) else {
        return;
    };
    let mut words = line[at + MARK.len()..].split_whitespace();
    let (Some(what), name) = (words.next(), words.next()) else {
        return;
    };
    if what == "done" {
        *done = true;
        return;
    }
    let Some(i) = name.and_then(|n| names.iter().position(|x| *x == n)) else {
        return;
    };
    match what {
        "begin" => seen[i].began = Some(Instant::now()),
        "end" => {
            seen[i].secs = seen[i].began.map(|b| b.elapsed().as_secs_f64());
            seen[i].rc = words
                .next()
                .and_then(|w| w.strip_prefix("rc="))
                .and_then(|n| n.parse().ok());
        }
        _ => {}
    }
}

/// Appends to the figures file one figure per program the guest's verifier loaded:
/// ``program `NAME`: loaded; N instructions verified, ...`` (as the verifier suite prints it).
fn append_verified(path: &Path, release: &str, lines: &[&str]) -> Result<()> {
    let mut out = String::new();
    for line in lines {
        let Some((name, rest)) = line
            .strip_prefix("program `")
            .and_then(|l| l.split_once("`: loaded; "))
        else {
            continue;
        };
        let Some(n) = rest
            .split_once(" instructions verified")
            .and_then(|(n, _)| n.parse::<u64>().ok())
        else {
            continue;
        };
        let figure = serde_json::json!({
            "area": "verifier",
            "figure": format!("instructions verified of `{name}` on kernel {release} (limit 1000000)"),
            "value": n,
            "source": "test-kernel",
            "complete": true,
        });
        out.push_str(&figure.to_string());
        out.push('\n');
    }
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    std::io::Write::write_all(&mut f, out.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The verifier suite's per-program lines (instructions verified on this kernel).
fn verifier_lines(lines: &[String]) -> Vec<&str> {
    lines
        .iter()
        .filter(|l| l.starts_with("program `") || l.contains("the verifier refused"))
        .map(String::as_str)
        .collect()
}

/// Builds natd, natctl and the three test binaries; the steps that run them. Under TCG the
/// end-to-end test gives natd [`TCG_SLOWDOWN`] times longer to start and stop.
fn build_steps(full: bool, tcg: bool) -> Result<Vec<Step>> {
    util::run(cargo().args(["build", "-p", "nat-userspace", "--bins"]))?;
    let (natd, natctl) = util::debug_bins()?;
    let exes = test_executables(&["verifier", "testrun", "e2e"])?;
    let exe = |name: &str| -> Result<PathBuf> {
        exes.iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .with_context(|| format!("cargo built no test binary {name}"))
    };
    let common = ["--color", "never"].map(String::from);
    let mut testrun: Vec<String> = common.to_vec();
    testrun.extend(["--test-threads", "2"].map(String::from));
    if full {
        testrun.extend(["--skip".into(), NEEDS_UPTIME.into()]);
    } else {
        testrun.push("--exact".into());
        testrun.extend(TESTRUN_SUBSET.iter().map(|t| t.to_string()));
    }
    let cases = vec![(CASES_ENV, CASES.to_string())];
    let mut steps = vec![
        Step {
            name: "verifier",
            exe: exe("verifier")?,
            // Its per-program lines (instructions verified) go into the summary.
            args: [&common[..], &["--nocapture".to_string()]].concat(),
            env: Vec::new(),
        },
        Step {
            name: "testrun",
            exe: exe("testrun")?,
            args: testrun,
            env: cases.clone(),
        },
    ];
    if full {
        let mut args = common.to_vec();
        args.extend(["--exact".into(), NEEDS_UPTIME.into()]);
        steps.push(Step {
            name: "uptime",
            exe: exe("testrun")?,
            args,
            env: cases,
        });
    }
    let mut ctnetlink = common.to_vec();
    ctnetlink.push("--exact".into());
    ctnetlink.extend(CTNETLINK_TESTS.iter().map(|t| t.to_string()));
    steps.push(Step {
        name: "ctnetlink",
        exe: natd_lib_tests()?,
        args: ctnetlink,
        env: Vec::new(),
    });
    let mut e2e = common.to_vec();
    e2e.extend(["--exact".into(), E2E_TEST.into()]);
    steps.push(Step {
        name: "e2e",
        exe: exe("e2e")?,
        args: e2e,
        env: vec![
            ("NATD_BIN", natd.display().to_string()),
            ("NATCTL_BIN", natctl.display().to_string()),
            (SLOWDOWN_ENV, if tcg { TCG_SLOWDOWN } else { "1" }.into()),
        ],
    });
    Ok(steps)
}

/// `cargo test -p nat-tests --no-run --test NAME...`: each suite's executable.
fn test_executables(suites: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let mut cmd = cargo();
    cmd.args(["test", "-p", "nat-tests", "--no-run"]);
    for s in suites {
        cmd.args(["--test", s]);
    }
    executables(&mut cmd)
}

/// The executable of natd's library's unit tests (`cargo test -p nat-userspace --lib`).
fn natd_lib_tests() -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["test", "-p", "nat-userspace", "--lib", "--no-run"]);
    executables(&mut cmd)?
        .pop()
        .map(|(_, exe)| exe)
        .context("cargo built no unit-test binary of nat-userspace")
}

/// The test executables `cmd` (a `cargo test --no-run`) built, by target name.
fn executables(cmd: &mut std::process::Command) -> Result<Vec<(String, PathBuf)>> {
    cmd.args(["--message-format", "json-render-diagnostics"]);
    let out = util::output(cmd)?;
    let mut exes = Vec::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = msg.pointer("/target/name").and_then(|v| v.as_str());
        let exe = msg.get("executable").and_then(|v| v.as_str());
        if let (Some(name), Some(exe)) = (name, exe) {
            exes.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    Ok(exes)
}

/// `s` as one shell word.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script the guest runs after `switch_root` (as PID 1): mounts what the tests need, the
/// kernel's modules where modprobe looks, runs each step between console marks, powers off.
fn guest_script(modules: &Path, release: &str, steps: &[Step]) -> Result<String> {
    let repo = util::repo_root();
    // A clean tmpfs on /tmp, /run and /dev/shm, but not over the checkout or the test
    // binaries (a checkout under /tmp would vanish; the overlay root is writable anyway).
    let needed: Vec<&Path> = std::iter::once(repo.as_path())
        .chain(steps.iter().map(|s| s.exe.as_path()))
        .collect();
    let scratch: Vec<&str> = ["/dev/shm", "/tmp", "/run"]
        .into_iter()
        .filter(|d| !needed.iter().any(|p| p.starts_with(d)))
        .collect();
    let mut s = format!(
        "# Generated by `cargo xtask test-kernel`: runs as the guest's init.\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         export HOME=/root RUST_BACKTRACE=1\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mkdir -p /dev/pts /dev/shm\n\
         mount -t devpts devpts /dev/pts\n\
         for d in {scratch}; do mount -t tmpfs tmpfs \"$d\"; done\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
         mkdir -p /lib/modules/{release}\n\
         mount --bind {} /lib/modules/{release}\n\
         ip link set lo up\n\
         echo \"{MARK} up on $(uname -r) after $(cut -d' ' -f1 /proc/uptime) s\"\n\
         cd {}\n",
        quote(&modules.display().to_string()),
        quote(&repo.display().to_string()),
        scratch = scratch.join(" "),
    );
    for step in steps {
        let env: Vec<String> = step
            .env
            .iter()
            .map(|(k, v)| format!("{k}={}", quote(v)))
            .collect();
        let args: Vec<String> = step.args.iter().map(|a| quote(a)).collect();
        writeln!(
            s,
            "echo '{MARK} begin {name}'\n\
             env {} {} {}\n\
             echo \"{MARK} end {name} rc=$?\"",
            env.join(" "),
            quote(&step.exe.display().to_string()),
            args.join(" "),
            name = step.name,
        )?;
    }
    writeln!(
        s,
        // The serial console drains what the steps wrote after `echo` returns (slowly, under
        // TCG); the power-off's kernel message would otherwise cut into the last marks.
        "echo '{MARK} done'\nsleep 2\necho o > /proc/sysrq-trigger\nsleep 60 2>/dev/null"
    )?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_marks_give_each_step_its_exit_code() {
        let names = ["verifier", "testrun"];
        let mut seen: Vec<Seen> = names.iter().map(|_| Seen::default()).collect();
        let mut done = false;
        for l in [
            "xtask-test-kernel: begin verifier",
            "program `nat`: loaded; 1 instructions verified",
            "xtask-test-kernel: end verifier rc=0",
            "[   52.0] random kernel line xtask-test-kernel: begin testrun",
            "xtask-test-kernel: end testrun rc=101",
            "xtask-test-kernel: end unknown rc=0",
        ] {
            note(l, &names, &mut seen, &mut done);
        }
        assert!(!done);
        assert_eq!(seen[0].rc, Some(0));
        assert!(seen[0].secs.is_some());
        assert_eq!(seen[1].rc, Some(101));
        note("xtask-test-kernel: done", &names, &mut seen, &mut done);
        assert!(done);
    }

    #[test]
    fn no_tmpfs_hides_the_test_binaries() {
        let step = |exe: &str| Step {
            name: "verifier",
            exe: PathBuf::from(exe),
            args: Vec::new(),
            env: Vec::new(),
        };
        let script = |exe: &str| {
            guest_script(Path::new("/m"), "6.1.0-57-amd64", &[step(exe)]).unwrap_or_default()
        };
        let under_tmp = script("/tmp/ci/target/debug/deps/verifier-1");
        assert!(under_tmp.contains("for d in /dev/shm /run; do mount -t tmpfs"));
        let elsewhere = script("/srv/ci/target/debug/deps/verifier-1");
        let repo_under_tmp = util::repo_root().starts_with("/tmp");
        assert_eq!(
            elsewhere.contains("for d in /dev/shm /tmp /run; do mount -t tmpfs"),
            !repo_under_tmp
        );
    }

    #[test]
    fn shell_words_survive_quotes() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
