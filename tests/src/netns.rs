//! Hermetic network namespaces for tests: a uniquely named namespace (`xsn-t-<pid>-<n>`),
//! entered on the current thread only and left and deleted when the guard drops (also while
//! unwinding from a panic). Nothing outside the namespace this guard created is touched.
//!
//! `BPF_PROG_TEST_RUN` resolves `ingress_ifindex` in the calling thread's namespace, so the
//! guard is `!Send`: it must be used, and dropped, on the thread that entered.
use std::{
    fs::File,
    io::Write as _,
    marker::PhantomData,
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail, ensure};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A namespace this process created, entered on the current thread.
pub struct NetnsGuard {
    name: String,
    /// The thread's namespace before entering, restored on drop.
    orig: File,
    /// Pins the guard to the thread whose namespace it changed.
    _not_send: PhantomData<*const ()>,
}

impl NetnsGuard {
    /// Creates a fresh namespace and moves the current thread into it.
    pub fn new() -> anyhow::Result<Self> {
        let name = format!(
            "xsn-t-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let orig = File::open("/proc/thread-self/ns/net").context("open own netns")?;
        run_cmd(Command::new("ip").args(["netns", "add", &name]))?;
        // From here on the namespace exists: `Drop` deletes it whatever fails next.
        let guard = Self {
            name,
            orig,
            _not_send: PhantomData,
        };
        let path = format!("/run/netns/{}", guard.name);
        let ns = File::open(&path).with_context(|| format!("open {path}"))?;
        // SAFETY: plain syscall on a valid namespace fd; affects only this thread.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        ensure!(
            rc == 0,
            "setns({path}): {}",
            std::io::Error::last_os_error()
        );
        Ok(guard)
    }

    /// The namespace's name, for `ip -n NAME`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME -batch -` with `script` (one `ip` command per line).
    pub fn ip_batch(&self, script: &str) -> anyhow::Result<()> {
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn ip -batch")?;
        child
            .stdin
            .take()
            .context("ip stdin")?
            .write_all(script.as_bytes())
            .context("write ip batch")?;
        let out = child.wait_with_output().context("wait for ip -batch")?;
        ensure!(
            out.status.success(),
            "ip -n {} -batch failed: {}\n{script}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Runs `ip -n NAME ARGS...` and returns its standard output.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        run_cmd(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Runs `ip netns exec NAME ARGS...` (for `sysctl`).
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        run_cmd(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(args),
        )
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // SAFETY: `orig` is the namespace fd this thread had before `new`.
        let rc = unsafe { libc::setns(self.orig.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            eprintln!(
                "netns {}: restoring the original namespace failed: {}",
                self.name,
                std::io::Error::last_os_error()
            );
        }
        if let Err(e) = run_cmd(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("netns {}: {e:#}", self.name);
        }
    }
}

fn run_cmd(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{cmd:?}: output not UTF-8"))
}
