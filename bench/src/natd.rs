//! natd in a router namespace (stopped on drop: SIGTERM, a bounded wait, then SIGKILL) and
//! natctl against it. Each natd gets its own state directory, socket, bpffs directory and a
//! metrics port of its own, and takes the fast path down when it exits (`--detach-on-exit`).
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use nat_testbed::{Process, ScratchDir};

use crate::{netns::Netns, util};

const START: Duration = Duration::from_secs(120);
const STOP: Duration = Duration::from_secs(20);

/// `$NAME_BIN`, else the binary next to this one (`cargo xtask bench` builds them together).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    nat_testbed::binary(name, 1)
}

pub struct Natd {
    /// Declared first: stopped before the directory holding its log goes.
    process: Process,
    /// Its socket, state, config and log; removed when natd is gone.
    _dir: ScratchDir,
    pins: PathBuf,
    pub socket: PathBuf,
    natctl: PathBuf,
}

impl Natd {
    /// Starts natd on eth2 (public) and eth0 (guest) of `router` and waits for its socket.
    pub fn start(router: &Netns, config: Option<&str>) -> anyhow::Result<Self> {
        Self::start_with(router, config, &[])
    }

    /// [`Natd::start`] with `args` added to natd's command line.
    pub fn start_with(router: &Netns, config: Option<&str>, args: &[&str]) -> anyhow::Result<Self> {
        let stem = crate::netns::unique_stem();
        let dir = ScratchDir::create(&stem)?;
        let pins = Path::new("/sys/fs/bpf").join(&stem);
        let socket = dir.path().join("natd.sock");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", router.path().display()))
            .arg(binary("natd")?)
            .args(["--public-iface", "eth2", "--guest-iface", "eth0"])
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--bpffs")
            .arg(&pins)
            .args(["--metrics-addr", "127.0.0.1:0", "--detach-on-exit"])
            .args(args)
            .env("RUST_LOG", "warn");
        if let Some(text) = config {
            let path = dir.path().join("natd.toml");
            std::fs::write(&path, text)?;
            cmd.arg("--config").arg(path);
        }
        let process = Process::spawn_logged("natd", &mut cmd, &dir.path().join("natd.log"))?
            .with_stop_grace(STOP);
        let mut natd = Self {
            process,
            _dir: dir,
            pins,
            socket,
            natctl: binary("natctl")?,
        };
        let end = Instant::now() + START;
        while !natd.socket.exists() {
            if let Some(s) = natd.process.try_wait()? {
                bail!("natd exited ({s}) before serving:\n{}", natd.log());
            }
            ensure!(
                Instant::now() < end,
                "natd did not serve within {START:?}:\n{}",
                natd.log()
            );
            util::check_interrupted()?;
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(natd)
    }

    /// CPU time natd and its waited-for children have used so far (user + system), seconds.
    pub fn cpu_secs(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.process.pid()))?;
        // Fields after the command name (which may hold spaces): state is field 3, utime,
        // stime, cutime and cstime are fields 14 to 17.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .context("unexpected /proc/PID/stat")?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f
            .get(11..15)
            .context("short /proc/PID/stat")?
            .iter()
            .map(|v| v.parse::<u64>())
            .sum::<Result<u64, _>>()?;
        // SAFETY: plain libc call without arguments.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Ok(ticks as f64 / hz.max(1) as f64)
    }

    /// Where natd pinned the XDP link of interface `iface` (`DIR/links/IFNAME`).
    pub fn pinned_link(&self, iface: &str) -> PathBuf {
        self.pins.join("links").join(iface)
    }

    /// Where natd pinned map `name` (its `--bpffs` layout: `DIR/maps/NAME`).
    pub fn pinned_map(&self, name: &str) -> PathBuf {
        self.pins.join("maps").join(name)
    }

    pub fn log(&self) -> String {
        self.process.log_text()
    }

    /// `natctl --socket S ARGS...`; stdout, or an error unless it exited 0.
    pub fn natctl(&self, args: &[&str]) -> anyhow::Result<String> {
        util::run(
            Command::new(&self.natctl)
                .arg("--socket")
                .arg(&self.socket)
                .args(args),
        )
    }

    /// natctl's stats (`natctl stats --json`).
    pub fn stats(&self) -> anyhow::Result<nat_userspace::api::StatsReport> {
        let out = self.natctl(&["stats", "--json"])?;
        serde_json::from_str(&out).context("parsing natctl stats --json")
    }

    /// SIGTERM, then waits up to `limit` (SIGKILL after that); returns how long natd took.
    pub fn terminate(&mut self, limit: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        if self.process.try_wait()?.is_some() {
            return Ok(Duration::ZERO);
        }
        if self.process.terminate(limit)?.killed {
            bail!("natd did not exit within {limit:?} of SIGTERM; killed it");
        }
        Ok(start.elapsed())
    }

    /// SIGKILL: for restarts between runs, where natd's own shutdown (which takes time in
    /// proportion to its mappings, see RESULTS.md) is not what is measured. Dropping `self`
    /// then removes its pins (detaching XDP); its nftables table stays until the namespace
    /// goes or the next natd replaces it.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.process.kill().map(drop)
    }
}

impl Drop for Natd {
    fn drop(&mut self) {
        if let Err(e) = self.terminate(STOP) {
            eprintln!("cleanup: {e:#}\n{}", self.log());
        }
        // The scratch directory goes with the field.
        if self.pins.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.pins)
        {
            eprintln!("cleanup: removing {}: {e}", self.pins.display());
        }
    }
}
