//! Boots a kernel under qemu with the host's root shared read-only over 9p and the guest's
//! serial console on qemu's stdout, which is echoed line by line and handed to a callback.
//! The guest runs `xtask_run=` (see `initramfs`) and powers off; a guest still running at the
//! deadline is killed.
//!
//! Acceleration: KVM where the host has hardware virtualisation (the kvm_intel or kvm_amd
//! module), else TCG (software emulation, several times slower). A `/dev/kvm` served by
//! `kvm_pvm` (pagetable-based virtualisation, as on this project's CI machines) runs only
//! guest kernels built for PVM: Debian's kernel hangs in its decompressor there, so it counts
//! as no KVM.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::initramfs::ROOT_TAG;
use crate::util::{self, command};

/// How qemu runs the guest's CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM if the host has hardware virtualisation, else TCG.
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    /// The acceleration `Auto` stands for here, and why.
    pub fn resolve(self) -> (Accel, String) {
        match self {
            Accel::Kvm | Accel::Tcg => (self, "as asked".into()),
            Accel::Auto => {
                if !Path::new("/dev/kvm").exists() {
                    return (Accel::Tcg, "no /dev/kvm".into());
                }
                let hw = ["kvm_intel", "kvm_amd"]
                    .iter()
                    .find(|m| Path::new("/sys/module").join(m).exists());
                match hw {
                    Some(m) => (Accel::Kvm, format!("/dev/kvm by {m}")),
                    None if Path::new("/sys/module/kvm_pvm").exists() => (
                        Accel::Tcg,
                        "/dev/kvm is kvm_pvm, which boots only PVM guest kernels".into(),
                    ),
                    None => (Accel::Tcg, "/dev/kvm without kvm_intel or kvm_amd".into()),
                }
            }
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg | Accel::Auto => &["-accel", "tcg,thread=multi", "-cpu", "max"],
        }
    }
}

/// What to boot.
pub struct Boot<'a> {
    pub vmlinuz: &'a Path,
    pub initramfs: &'a Path,
    /// The script the guest runs (a path on the host, which the guest sees at the same place).
    pub script: &'a Path,
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mib: u32,
    pub timeout: Duration,
}

/// The console's lines, and whether the guest was killed at the deadline.
pub struct Console {
    pub lines: Vec<String>,
    pub timed_out: bool,
}

/// Boots, echoing every console line (and handing it to `on_line`) until qemu exits or the
/// deadline passes.
pub fn boot(b: &Boot, mut on_line: impl FnMut(&str)) -> Result<Console> {
    let append = format!(
        "console=ttyS0 panic=-1 loglevel=4 xtask_run={}",
        b.script.display()
    );
    let virtfs = format!(
        "local,path=/,mount_tag={ROOT_TAG},security_model=passthrough,readonly=on,multidevs=remap"
    );
    let mut cmd = command("qemu-system-x86_64");
    cmd.args(b.accel.args())
        .args(["-smp", &b.cpus.to_string(), "-m", &b.memory_mib.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(b.vmlinuz)
        .arg("-initrd")
        .arg(b.initramfs)
        .args(["-append", &append, "-virtfs", &virtfs])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let line = util::describe(&cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start `{line}` (Debian package qemu-system-x86)"))?;
    let (tx, rx) = mpsc::channel::<String>();
    let readers = [
        spawn_reader(child.stdout.take(), tx.clone()),
        spawn_reader(child.stderr.take(), tx),
    ];
    let deadline = Instant::now() + b.timeout;
    let mut lines = Vec::new();
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(l) => {
                println!("{l}");
                on_line(&l);
                lines.push(l);
            }
            // Both pipes closed: qemu exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() >= deadline {
                    timed_out = true;
                    kill(&mut child);
                    break;
                }
            }
        }
        if util::check_interrupted().is_err() {
            kill(&mut child);
            bail!("interrupted");
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("failed to wait for `{line}`"))?;
    for r in readers.into_iter().flatten() {
        let _ = r.join();
    }
    if !timed_out && !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(Console { lines, timed_out })
}

fn kill(child: &mut Child) {
    let _ = child.kill();
}

/// Reads `pipe` line by line into `tx` (console lines end in CR LF: the CR goes).
fn spawn_reader<R: std::io::Read + Send + 'static>(
    pipe: Option<R>,
    tx: mpsc::Sender<String>,
) -> Option<std::thread::JoinHandle<()>> {
    let pipe = pipe?;
    Some(std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf);
                    let text = text.trim_end_matches(['\n', '\r']).to_string();
                    if tx.send(text).is_err() {
                        break;
                    }
                }
            }
        }
    }))
}

/// The scratch directory of test-kernel runs (initramfs, guest script, console log).
pub fn work_dir() -> Result<PathBuf> {
    let dir = util::target_dir()?.join("test-kernel");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}
