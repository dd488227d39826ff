//! A child process as a guard: stopped (SIGTERM, a bounded wait, then SIGKILL) and reaped
//! when dropped, on success, error, panic or Ctrl-C alike, its output optionally captured in a
//! log file; and where a test or the bench finds natd and natctl.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context as _, ensure};

use crate::cmd::{describe, wait_timeout};

/// How often a wait for a process checks on it.
const POLL: Duration = Duration::from_millis(10);
/// How long [`Process`]'s drop waits after SIGTERM unless told otherwise.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// How [`Process::terminate`] ended the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    pub status: ExitStatus,
    /// SIGTERM was not enough within the grace time: it was killed.
    pub killed: bool,
}

/// A child this process started; stopped and reaped on drop.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    exited: Option<ExitStatus>,
    log: Option<PathBuf>,
    grace: Duration,
}

impl Process {
    /// Spawns `cmd` as it is (its stdio as the caller set it).
    pub fn spawn(name: impl Into<String>, cmd: &mut Command) -> anyhow::Result<Self> {
        let name = name.into();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: `{}`", describe(cmd)))?;
        Ok(Self {
            name,
            child,
            exited: None,
            log: None,
            grace: DEFAULT_STOP_GRACE,
        })
    }

    /// Spawns `cmd` with stdin closed and stdout and stderr both written to `log` (created
    /// or truncated), which [`Process::log_text`] reads back.
    pub fn spawn_logged(
        name: impl Into<String>,
        cmd: &mut Command,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().context("duplicating the log handle")?)
            .stderr(file);
        let mut p = Self::spawn(name, cmd)?;
        p.log = Some(log.to_path_buf());
        Ok(p)
    }

    /// How long dropping the guard waits after SIGTERM before SIGKILL.
    pub fn with_stop_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's process id (for `nsenter`, which execs, the program's own).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child itself, e.g. to take its piped stdin or stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The log file of [`Process::spawn_logged`].
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// Everything the process wrote to its log so far (empty without one).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// The exit status, if the process has exited (reaping it then).
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.exited)
    }

    /// The exit status this guard has seen, without checking again.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.exited
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> anyhow::Result<bool> {
        Ok(self.try_wait()?.is_none())
    }

    /// Waits up to `timeout` for the process to exit by itself; `None` if it still runs.
    pub fn wait_timeout(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = wait_timeout(&mut self.child, timeout, POLL)
                .with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.exited)
    }

    /// SIGKILL, as a crash or the OOM killer would end it (no cleanup of its own); returns
    /// the exit status.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.exited {
            return Ok(status);
        }
        // Fails only if the child already exited; wait() reports that status either way.
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .with_context(|| format!("waiting for {}", self.name))?;
        self.exited = Some(status);
        Ok(status)
    }

    /// Sends SIGTERM and waits up to `grace`; then SIGKILL.
    pub fn terminate(&mut self, grace: Duration) -> anyhow::Result<Stopped> {
        if let Some(status) = self.try_wait()? {
            return Ok(Stopped {
                status,
                killed: false,
            });
        }
        let pid = libc::pid_t::try_from(self.child.id())
            .with_context(|| format!("{}'s pid", self.name))?;
        // SAFETY: plain syscall; `pid` is our own child, not yet reaped, so it is still ours.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(Stopped {
                status,
                killed: false,
            });
        }
        let status = self.kill()?;
        Ok(Stopped {
            status,
            killed: true,
        })
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        match self.terminate(self.grace) {
            Ok(Stopped { killed: true, .. }) => eprintln!(
                "cleanup: {} did not exit within {:?} of SIGTERM; killed it",
                self.name, self.grace
            ),
            Ok(_) => {}
            Err(e) => eprintln!("cleanup: {e:#}"),
        }
    }
}

/// The binary `name` (natd, natctl): `$NAME_BIN` if set (`cargo xtask test` and `bench` set
/// them), else in the directory `levels_up` levels above the running executable (1: its own
/// directory, as for the bench; 2: above `deps/`, as for a test binary).
pub fn binary(name: &str, levels_up: usize) -> anyhow::Result<PathBuf> {
    let var = format!("{}_BIN", name.to_uppercase());
    let path = match std::env::var_os(&var) {
        Some(p) => PathBuf::from(p),
        None => {
            let exe = std::env::current_exe().context("locating the running executable")?;
            exe.ancestors()
                .nth(levels_up)
                .map(|dir| dir.join(name))
                .with_context(|| format!("no directory {levels_up} above {}", exe.display()))?
        }
    };
    ensure!(
        path.is_file(),
        "{name} not found at {} (set {var}, or build it first: `cargo build --bins`)",
        path.display()
    );
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_that_ignores_sigterm_is_killed_and_reaped() {
        let mut p = Process::spawn(
            "stubborn",
            Command::new("sh")
                .args(["-c", "trap '' TERM; echo ready; sleep 30"])
                .stdout(Stdio::piped()),
        )
        .unwrap();
        // The trap is set once it said so.
        let mut line = String::new();
        let out = p.child_mut().stdout.take().unwrap();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).unwrap();
        assert_eq!(line, "ready\n");
        let stopped = p.terminate(Duration::from_millis(200)).unwrap();
        assert!(stopped.killed);
        assert_eq!(p.exited(), Some(stopped.status));
    }

    #[test]
    fn sigterm_is_enough_for_a_process_that_honours_it() {
        let mut p = Process::spawn("sleeper", Command::new("sleep").arg("30")).unwrap();
        assert!(p.is_running().unwrap());
        let stopped = p.terminate(Duration::from_secs(10)).unwrap();
        assert!(!stopped.killed);
        assert!(!stopped.status.success());
    }

    #[test]
    fn the_log_holds_stdout_and_stderr() {
        let dir = crate::ScratchDir::create(&crate::unique_stem("xsn-tb-")).unwrap();
        let log = dir.path().join("out.log");
        let mut p = Process::spawn_logged(
            "talker",
            Command::new("sh").args(["-c", "echo one; echo two >&2"]),
            &log,
        )
        .unwrap();
        let status = p.wait_timeout(Duration::from_secs(10)).unwrap();
        assert!(status.is_some_and(|s| s.success()));
        assert_eq!(p.log_text(), "one\ntwo\n");
        assert_eq!(p.log_path(), Some(log.as_path()));
    }

    #[test]
    fn dropping_the_guard_reaps_the_child() {
        let p = Process::spawn("sleeper", Command::new("sleep").arg("30")).unwrap();
        let pid = p.pid();
        drop(p);
        // Reaped: no zombie left under our pid.
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
