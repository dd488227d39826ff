//! Network namespaces the bench creates: named `xsn-b-<pid>-<n>-<role>`, deleted when their
//! guard drops (also on error and after Ctrl-C). [`sweep_stale`] removes those of earlier runs
//! whose process is gone (killed with SIGKILL); nothing else is ever touched.
use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

use crate::util;

const PREFIX: &str = "xsn-b-";
static SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh unique name stem `xsn-b-<pid>-<n>`.
pub fn unique_stem() -> String {
    format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Deletes bench namespaces (and bpffs pin directories) left by bench processes that no longer
/// exist.
pub fn sweep_stale() {
    let stale = |name: &str| {
        name.strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| {
                pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            })
    };
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if stale(&name) {
                eprintln!("bench: removing namespace {name} left by an earlier run");
                let _ = util::cmd("ip", &["netns", "del", &name]);
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if stale(&name) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// A named namespace this process created; deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: String) -> anyhow::Result<Self> {
        util::cmd("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        util::run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// `ip -n NAME -batch -` with one command per line.
    pub fn ip_batch(&self, script: &str) -> anyhow::Result<()> {
        util::run_input(
            Command::new("ip").args(["-n", &self.name, "-batch", "-"]),
            Some(script.as_bytes()),
        )
        .map(drop)
    }

    /// A command run inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        util::run(self.command(program).args(args))
    }

    pub fn exec_input(&self, program: &str, args: &[&str], input: &str) -> anyhow::Result<String> {
        util::run_input(self.command(program).args(args), Some(input.as_bytes()))
    }

    pub fn sysctl(&self, settings: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["-qw"];
        args.extend_from_slice(settings);
        self.exec("sysctl", &args).map(drop)
    }

    /// ifindex and MAC of `dev`.
    pub fn link(&self, dev: &str) -> anyhow::Result<(u32, [u8; 6])> {
        let json: serde_json::Value =
            serde_json::from_str(&self.ip(&["-j", "link", "show", "dev", dev])?)
                .with_context(|| format!("ip -j link show {dev}"))?;
        let l = &json[0];
        let ifindex = l["ifindex"].as_u64().context("ifindex")? as u32;
        let mac = parse_mac(l["address"].as_str().context("address")?)?;
        Ok((ifindex, mac))
    }

    /// Moves the calling thread into this namespace for good (the thread must be one the
    /// bench spawned for the purpose, see [`Netns::spawn`]).
    pub fn enter(&self) -> anyhow::Result<()> {
        let path = self.path();
        let f = File::open(&path).with_context(|| format!("open {}", path.display()))?;
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

    /// Runs `f` on a new thread inside this namespace and waits for it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter()?;
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = util::cmd("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: deleting namespace {}: {e:#}", self.name);
        }
    }
}

pub fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let v = s
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("MAC {s}"))?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("MAC {s}: not 6 bytes"))
}

pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
