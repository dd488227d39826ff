//! Named network namespaces this process creates, deleted when their guard drops (also while
//! unwinding from a panic): [`Netns`] for a namespace used through `ip -n`, commands and
//! threads that enter it, [`EnteredNetns`] for one the current thread moves into until the
//! guard drops. Each user names its own with [`unique_stem`] and a prefix of its own
//! (`xsn-t-`, `xsn-e2e-`, `xsn-b-`, `xsn-demo-`), so parallel tests never meet, and
//! [`sweep_stale`] removes only the names of its prefix whose process is gone.
mod inspect;

pub use inspect::{AddrInfo, LinkInfo, Neighbour};

use std::{
    fs::File,
    marker::PhantomData,
    ops::Deref,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};

use crate::cmd::{CmdOutput, run_bounded, run_bounded_input};

/// How long one command (ip, sysctl, ethtool, ping...) may take unless the namespace was
/// created with another bound ([`Netns::create_with_timeout`]).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

static SEQ: AtomicU32 = AtomicU32::new(0);

/// `<prefix><pid>-<n>`: unique on this host while this process lives (`n` counts every stem
/// this process made). [`sweep_stale`] recognises the pid in it.
pub fn unique_stem(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// The pid in a name made by [`unique_stem`] with `prefix`, or `None` for any other name.
fn stem_pid(prefix: &str, name: &str) -> Option<u32> {
    name.strip_prefix(prefix)?.split('-').next()?.parse().ok()
}

/// Deletes namespaces (`/run/netns`) and bpffs directories (`/sys/fs/bpf`) named
/// `<prefix><pid>-...` whose process no longer exists (one killed with SIGKILL cannot clean
/// up). Returns the namespaces deleted. Nothing of a living process, nor of another prefix, is
/// touched.
pub fn sweep_stale(prefix: &str) -> Vec<String> {
    let own = std::process::id();
    let stale = |name: &str| {
        stem_pid(prefix, name)
            .is_some_and(|pid| pid != own && !Path::new(&format!("/proc/{pid}")).exists())
    };
    let names = |dir: &str| -> Vec<(String, PathBuf)> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .filter(|(name, _)| stale(name))
            .collect()
    };
    let mut removed = Vec::new();
    for (name, _) in names("/run/netns") {
        let del = run_bounded(
            Command::new("ip").args(["netns", "del", &name]),
            COMMAND_TIMEOUT,
        )
        .and_then(CmdOutput::ok);
        match del {
            Ok(_) => removed.push(name),
            Err(e) => eprintln!("cleanup: deleting stale namespace {name}: {e:#}"),
        }
    }
    for (_, path) in names("/sys/fs/bpf") {
        if let Err(e) = std::fs::remove_dir_all(&path) {
            eprintln!("cleanup: removing stale {}: {e}", path.display());
        }
    }
    removed
}

/// A named network namespace this process created; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    timeout: Duration,
}

impl Netns {
    /// `ip netns add NAME`; each command in it is bounded by [`COMMAND_TIMEOUT`].
    pub fn create(name: impl Into<String>) -> anyhow::Result<Self> {
        Self::create_with_timeout(name, COMMAND_TIMEOUT)
    }

    /// [`Netns::create`] with another bound for every command this guard runs.
    pub fn create_with_timeout(name: impl Into<String>, timeout: Duration) -> anyhow::Result<Self> {
        let name = name.into();
        run_bounded(Command::new("ip").args(["netns", "add", &name]), timeout)?
            .ok()
            .with_context(|| format!("creating namespace {name}"))?;
        // From here on the namespace exists: `Drop` deletes it whatever fails next.
        Ok(Self { name, timeout })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, for `nsenter --net=` and `setns`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// The bound on each command this guard runs.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `ip -n NAME ARGS...`; returns stdout, fails unless it exits 0.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        self.bounded(Command::new("ip").args(["-n", &self.name]).args(args))?
            .ok()
    }

    /// `ip -n NAME -batch -` with `script` (one `ip` command per line); the error quotes it.
    pub fn ip_batch(&self, script: &str) -> anyhow::Result<()> {
        run_bounded_input(
            Command::new("ip").args(["-n", &self.name, "-batch", "-"]),
            Some(script.as_bytes()),
            self.timeout,
        )?
        .ok()
        .with_context(|| format!("ip -n {} -batch:\n{script}", self.name))
        .map(drop)
    }

    /// `ip netns exec NAME PROGRAM`: a command run inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `PROGRAM ARGS...` in this namespace; returns stdout, fails unless it exits 0.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        self.bounded(self.command(program).args(args))?.ok()
    }

    /// [`Netns::exec`] with `input` on the program's stdin.
    pub fn exec_input(&self, program: &str, args: &[&str], input: &str) -> anyhow::Result<String> {
        run_bounded_input(
            self.command(program).args(args),
            Some(input.as_bytes()),
            self.timeout,
        )?
        .ok()
    }

    /// Runs `cmd` bounded by this namespace's command timeout, whatever its exit status.
    pub fn bounded(&self, cmd: &mut Command) -> anyhow::Result<CmdOutput> {
        run_bounded(cmd, self.timeout)
    }

    /// `sysctl -qw SETTING...` in this namespace.
    pub fn sysctl(&self, settings: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["-qw"];
        args.extend_from_slice(settings);
        self.exec("sysctl", &args).map(drop)
    }

    /// Moves the calling thread into this namespace for good: only for a thread spawned for
    /// the purpose (see [`Netns::run`]).
    pub fn enter(&self) -> anyhow::Result<()> {
        setns(&self.path())
    }

    /// Runs `f` on a fresh thread that entered this namespace, and returns its result. Sockets
    /// `f` creates stay in this namespace wherever they are used afterwards. A panic in `f`
    /// is resumed on the calling thread.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter()?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let r = run_bounded(
            Command::new("ip").args(["netns", "del", &self.name]),
            self.timeout,
        )
        .and_then(CmdOutput::ok);
        if let Err(e) = r {
            eprintln!("cleanup: deleting namespace {}: {e:#}", self.name);
        }
    }
}

/// `setns(CLONE_NEWNET)` of the calling thread into the namespace at `path`.
fn setns(path: &Path) -> anyhow::Result<()> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: plain syscall on a valid namespace fd; affects only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "setns({}): {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A namespace this process created, entered by the current thread; on drop the thread
/// returns to the namespace it had before and the namespace is deleted.
///
/// `BPF_PROG_TEST_RUN` resolves `ingress_ifindex` in the calling thread's namespace, which is
/// what this is for. The guard is `!Send`: it must be used, and dropped, on the thread that
/// entered. It dereferences to the [`Netns`] for `ip -n` and commands.
pub struct EnteredNetns {
    /// The thread's namespace before entering, restored on drop.
    orig: File,
    /// Dropped after `Drop::drop` restored `orig`: deletes the namespace.
    ns: Netns,
    /// Pins the guard to the thread whose namespace it changed.
    _not_send: PhantomData<*const ()>,
}

impl EnteredNetns {
    /// Creates namespace `name` and moves the current thread into it.
    pub fn create(name: impl Into<String>) -> anyhow::Result<Self> {
        let orig = File::open("/proc/thread-self/ns/net").context("open own netns")?;
        let guard = Self {
            orig,
            ns: Netns::create(name)?,
            _not_send: PhantomData,
        };
        let path = guard.ns.path();
        let ns = File::open(&path).with_context(|| format!("open {}", path.display()))?;
        // SAFETY: plain syscall on a valid namespace fd; affects only this thread.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        ensure!(
            rc == 0,
            "setns({}): {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        Ok(guard)
    }
}

impl Deref for EnteredNetns {
    type Target = Netns;

    fn deref(&self) -> &Netns {
        &self.ns
    }
}

impl Drop for EnteredNetns {
    fn drop(&mut self) {
        // SAFETY: `orig` is the namespace fd this thread had before `create`.
        let rc = unsafe { libc::setns(self.orig.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            eprintln!(
                "netns {}: restoring the original namespace failed: {}",
                self.ns.name(),
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_are_unique_and_carry_the_pid() {
        let (a, b) = (unique_stem("xsn-x-"), unique_stem("xsn-x-"));
        assert_ne!(a, b);
        assert_eq!(stem_pid("xsn-x-", &a), Some(std::process::id()));
        assert_eq!(
            stem_pid("xsn-x-", &format!("{a}-router")),
            Some(std::process::id())
        );
    }

    #[test]
    fn only_names_of_the_prefix_are_recognised() {
        assert_eq!(stem_pid("xsn-b-", "xsn-b-42-0-client"), Some(42));
        assert_eq!(stem_pid("xsn-b-", "xsn-e2e-42-0-client"), None);
        assert_eq!(stem_pid("xsn-b-", "xsn-b-x-0"), None);
        assert_eq!(stem_pid("xsn-b-", "mynet"), None);
    }
}
