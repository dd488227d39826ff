//! Processes the end-to-end tests start: natd in the router namespace (a
//! [`nat_testbed::Process`]: stopped on drop with SIGTERM, a bounded wait, then SIGKILL) and
//! natctl, each with a bounded run time so a hung child fails the test instead of hanging it.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use nat_testbed::{CmdOutput, Process, describe, run_bounded};
use nat_userspace::api::{MappingStatus, StatsReport};

use super::{COMMAND_TIMEOUT, ROUTER_GUEST_IF, ROUTER_PUBLIC_IF, Topology};

/// How long natd may take to create its control socket: loading (verifying) the XDP program
/// costs about a second of CPU, much more when many tests load it at once on a small machine.
pub const NATD_START: Duration = Duration::from_secs(60);
/// How long natd may take to exit after SIGTERM before it is killed.
pub const NATD_STOP: Duration = Duration::from_secs(10);
/// A whole factor the natd start and stop bounds are stretched by (default 1). `cargo xtask
/// test-kernel` sets it when its guest kernel runs under software emulation, where verifying
/// the programs alone takes about a minute.
pub const SLOWDOWN_ENV: &str = "NAT_TEST_SLOWDOWN";
const POLL: Duration = Duration::from_millis(20);

/// `d` times [`SLOWDOWN_ENV`] (1 when unset or not a whole number from 1 to 100).
pub fn stretched(d: Duration) -> Duration {
    let factor = std::env::var(SLOWDOWN_ENV)
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|f| (1..=100).contains(f))
        .unwrap_or(1);
    d * factor
}

/// natd or natctl: `$NATD_BIN` / `$NATCTL_BIN` if set (`cargo xtask test` sets them), else next
/// to the test binary's `deps/` directory (`target/debug/natd`).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    nat_testbed::binary(name, 2)
}

/// How a test starts natd ([`Natd::start_with`]).
#[derive(Debug, Clone)]
pub struct NatdOptions {
    /// `--public-iface` of each (default: pub0).
    pub public_ifaces: Vec<String>,
    /// `--guest-iface` of each (default: gst0).
    pub guest_ifaces: Vec<String>,
    /// TOML text for `--config`, written to the scratch directory.
    pub config: Option<String>,
    /// The control socket; `natd.sock` in the scratch directory by default.
    pub socket: Option<PathBuf>,
    /// Further arguments. The private ones (state directory, pins, metrics address) are added
    /// unless named here.
    pub args: Vec<String>,
    /// Leave out `--detach-on-exit`: natd leaves its fast path running when it stops (the
    /// product default), for the next natd to adopt.
    pub keep_fast_path: bool,
    /// Private flags (`--state-dir`, `--bpffs`, `--metrics-addr`, `--detach-on-exit`) to leave
    /// out, so natd uses its own default.
    pub omit: Vec<&'static str>,
    /// Log file name in the scratch directory; by default `natd.log` for the first natd of the
    /// topology, `natd.N.log` after.
    pub log: Option<String>,
    /// natd's umask, instead of the one inherited from the test.
    pub umask: Option<libc::mode_t>,
}

impl Default for NatdOptions {
    fn default() -> Self {
        Self {
            public_ifaces: vec![ROUTER_PUBLIC_IF.to_string()],
            guest_ifaces: vec![ROUTER_GUEST_IF.to_string()],
            config: None,
            socket: None,
            args: Vec::new(),
            keep_fast_path: false,
            omit: Vec::new(),
            log: None,
            umask: None,
        }
    }
}

/// A running natd in the router namespace; stopped on drop.
pub struct Natd {
    process: Process,
    socket: PathBuf,
}

impl Natd {
    /// The natd command for `topo` with `args` (spawned logged, see [`Process::spawn_logged`]).
    /// `nsenter`, not `ip netns exec`: natd keeps the host's mount namespace. nsenter execs
    /// natd (no fork for a network namespace), so the child's pid is natd's.
    fn command(topo: &Topology, args: &[&str], omit: &[&str]) -> anyhow::Result<Command> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", topo.router.path().display()))
            .arg(binary("natd")?)
            .args(Self::private_args(topo, args, omit))
            .args(args)
            .env("RUST_LOG", "info");
        Ok(cmd)
    }

    /// Where this topology's natd pins its maps and links.
    pub fn pin_dir(topo: &Topology) -> PathBuf {
        Path::new("/sys/fs/bpf").join(topo.router.name())
    }

    /// Arguments that keep each test's natd to itself: its own state directory, pins and
    /// metrics port, and a fast path taken down on exit (the product default leaves it
    /// running for the next natd). Left out where the test passes them itself, or names them in
    /// `omit` (natd then uses its own default). The topology removes the pin directory when it
    /// goes, whatever natd did.
    fn private_args(topo: &Topology, args: &[&str], omit: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        let mut add = |flag: &str, value: Option<String>| {
            if !args.contains(&flag) && !omit.contains(&flag) {
                out.push(flag.to_string());
                out.extend(value);
            }
        };
        add(
            "--state-dir",
            Some(topo.dir.path().join("state").display().to_string()),
        );
        add("--bpffs", Some(Self::pin_dir(topo).display().to_string()));
        add("--metrics-addr", Some("127.0.0.1:0".to_string()));
        add("--detach-on-exit", None);
        out
    }

    /// Starts natd on pub0/gst0 with `config` (TOML text, written to a file) or none, and waits
    /// until it listens on its control socket.
    pub fn start(topo: &Topology, config: Option<&str>) -> anyhow::Result<Self> {
        Self::start_with(
            topo,
            &NatdOptions {
                config: config.map(str::to_string),
                ..NatdOptions::default()
            },
        )
    }

    /// Starts natd as `opts` says and waits until it listens on its control socket. The socket is
    /// the topology's `natd.sock` (unless `opts.socket`) whichever natd runs, so a natd started
    /// again answers the same natctl; one left by a killed natd (nobody listening) is removed
    /// first, as natd itself would.
    pub fn start_with(topo: &Topology, opts: &NatdOptions) -> anyhow::Result<Self> {
        let dir = topo.dir.path();
        let socket = opts.socket.clone().unwrap_or_else(|| dir.join("natd.sock"));
        if socket.exists() && std::os::unix::net::UnixStream::connect(&socket).is_err() {
            std::fs::remove_file(&socket)
                .with_context(|| format!("removing the stale {}", socket.display()))?;
        }
        let log = match &opts.log {
            Some(name) => dir.join(name),
            None => (1..)
                .map(|n| match n {
                    1 => dir.join("natd.log"),
                    n => dir.join(format!("natd.{n}.log")),
                })
                .find(|p| !p.exists())
                .context("no free log name")?,
        };
        let mut args: Vec<String> = Vec::new();
        for i in &opts.public_ifaces {
            args.extend(["--public-iface".to_string(), i.clone()]);
        }
        for i in &opts.guest_ifaces {
            args.extend(["--guest-iface".to_string(), i.clone()]);
        }
        args.extend(["--socket".to_string(), socket.display().to_string()]);
        if let Some(text) = &opts.config {
            let config_path = dir.join("natd.toml");
            std::fs::write(&config_path, text)
                .with_context(|| format!("writing {}", config_path.display()))?;
            args.extend(["--config".to_string(), config_path.display().to_string()]);
        }
        args.extend(opts.args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut omit = opts.omit.clone();
        if opts.keep_fast_path {
            omit.push("--detach-on-exit");
        }
        let mut cmd = Self::command(topo, &args, &omit)?;
        if let Some(mask) = opts.umask {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: umask is async-signal-safe and touches only the child.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask);
                    Ok(())
                })
            };
        }
        let mut natd = Self {
            process: Process::spawn_logged("natd", &mut cmd, &log)?
                .with_stop_grace(stretched(NATD_STOP)),
            socket,
        };
        let start = stretched(NATD_START);
        let deadline = Instant::now() + start;
        // Connectable, not only present: the socket file exists a moment before natd listens.
        while std::os::unix::net::UnixStream::connect(&natd.socket).is_err() {
            if let Some(status) = natd.process.try_wait()? {
                bail!(
                    "natd exited ({status}) before serving:\n{}",
                    natd.log_text()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "natd did not listen on {} within {start:?}:\n{}",
                natd.socket.display(),
                natd.log_text()
            );
            std::thread::sleep(POLL);
        }
        Ok(natd)
    }

    /// Runs natd with `args` in the router namespace, expecting it to exit by itself within
    /// `timeout`; returns its status and output (stdout and stderr interleaved).
    pub fn run_to_exit(
        topo: &Topology,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<(ExitStatus, String)> {
        Self::run_to_exit_with(topo, args, &[], timeout)
    }

    /// [`Natd::run_to_exit`] leaving out the private flags named in `omit`.
    pub fn run_to_exit_with(
        topo: &Topology,
        args: &[&str],
        omit: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<(ExitStatus, String)> {
        let log = topo.dir.path().join("natd-run.log");
        let mut cmd = Self::command(topo, args, omit)?;
        let mut natd = Process::spawn_logged("natd", &mut cmd, &log)?;
        let Some(status) = natd.wait_timeout(timeout)? else {
            natd.kill()?;
            bail!(
                "`{}` still ran after {timeout:?}; killed it",
                describe(&cmd)
            );
        };
        Ok((status, natd.log_text()))
    }

    /// True while natd has not exited.
    pub fn is_running(&mut self) -> anyhow::Result<bool> {
        self.process.is_running()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// natd's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// SIGKILL, as a crash or the OOM killer would end natd: no cleanup of any kind (its fast
    /// path, nftables table, pins and socket stay as they are). Returns the exit status.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        self.process.kill()
    }

    /// natctl bound to this natd's socket.
    pub fn natctl(&self) -> anyhow::Result<Natctl> {
        Natctl::new(&self.socket)
    }

    /// Everything natd printed so far.
    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// Sends SIGTERM and waits up to [`NATD_STOP`]; then SIGKILL. Returns the exit status, or
    /// an error if SIGKILL was needed.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let stop = stretched(NATD_STOP);
        let stopped = self.process.terminate(stop)?;
        ensure!(
            !stopped.killed,
            "natd did not exit within {stop:?} of SIGTERM; killed it ({})",
            stopped.status
        );
        Ok(stopped.status)
    }
}

impl Drop for Natd {
    fn drop(&mut self) {
        // natd that exited by itself (not stopped or killed by the test) shows why, also when
        // the test ends with an error rather than a panic.
        let died =
            self.process.exited().is_none() && matches!(self.process.try_wait(), Ok(Some(_)));
        if let Err(e) = self.terminate() {
            eprintln!("cleanup: {e:#}");
        }
        if died {
            eprintln!(
                "cleanup: natd had exited by itself ({:?})",
                self.process.exited()
            );
        }
        if std::thread::panicking() || died {
            eprintln!(
                "---- natd log ----\n{}---- end of natd log ----",
                self.log_text()
            );
        }
    }
}

/// natctl talking to one socket.
pub struct Natctl {
    bin: PathBuf,
    socket: PathBuf,
}

impl Natctl {
    pub fn new(socket: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            bin: binary("natctl")?,
            socket: socket.into(),
        })
    }

    /// Runs `natctl --socket S ARGS...` whatever its exit status.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<CmdOutput> {
        run_bounded(
            Command::new(&self.bin)
                .arg("--socket")
                .arg(&self.socket)
                .args(args),
            COMMAND_TIMEOUT,
        )
    }

    /// Runs natctl; its stdout, or an error unless it exited 0.
    pub fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        self.run(args)?.ok()
    }

    /// `natctl stats --json`, parsed.
    pub fn stats(&self) -> anyhow::Result<StatsReport> {
        let out = self.ok(&["stats", "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("parsing `natctl stats --json`: {out}"))
    }

    /// `natctl mapping list --json`, parsed.
    pub fn mappings(&self) -> anyhow::Result<Vec<MappingStatus>> {
        let out = self.ok(&["mapping", "list", "--json"])?;
        serde_json::from_str(&out)
            .with_context(|| format!("parsing `natctl mapping list --json`: {out}"))
    }
}
