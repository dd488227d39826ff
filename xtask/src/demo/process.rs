//! A child process that is stopped (SIGTERM, then SIGKILL) when dropped, so nothing the demo
//! started outlives it, on success, error or Ctrl-C alike.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::util;

pub struct Process {
    name: &'static str,
    child: Child,
}

impl Process {
    pub fn spawn(name: &'static str, cmd: &mut Command) -> Result<Self> {
        let line = util::describe(cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("failed to start {name}: `{line}`"))?;
        Ok(Self { name, child })
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("cannot check on {}", self.name))
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if start.elapsed() >= timeout {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits up to `grace`; then SIGKILL. Returns the exit status and
    /// whether SIGKILL was needed.
    pub fn terminate(&mut self, grace: Duration) -> Result<(ExitStatus, bool)> {
        if let Some(status) = self.try_wait()? {
            return Ok((status, false));
        }
        // Our own child, by pid; `kill` comes from procps.
        let pid = self.child.id().to_string();
        let _ = util::succeeds(util::command("kill").args(["-TERM", &pid]));
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok((status, false));
        }
        self.child
            .kill()
            .with_context(|| format!("cannot kill {}", self.name))?;
        let status = self
            .child
            .wait()
            .with_context(|| format!("cannot wait for {}", self.name))?;
        Ok((status, true))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        match self.terminate(Duration::from_secs(5)) {
            Ok((_, true)) => eprintln!("demo: {} did not stop on SIGTERM; killed it", self.name),
            Ok(_) => {}
            Err(e) => eprintln!("demo: cleanup: {e:#}"),
        }
    }
}
