//! Running external commands with clear errors, and locating the repo, cargo's bin dir and the
//! target dir. Every child process gets a PATH that contains cargo's bin dir, so tools that
//! `cargo install` puts there (bpf-linker) are found even when the caller's PATH lacks it.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

/// The workspace root: the parent of this crate's manifest dir.
pub fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.to_path_buf(), Path::to_path_buf)
}

/// `$CARGO_HOME`, or `$HOME/.cargo` when unset.
pub fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    Ok(home_dir()?.join(".cargo"))
}

pub fn home_dir() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .context("HOME is not set")
}

/// The PATH handed to every child: the caller's PATH, with cargo's bin dir prepended if absent.
pub fn child_path() -> &'static OsString {
    static PATH: OnceLock<OsString> = OnceLock::new();
    PATH.get_or_init(|| {
        let current = std::env::var_os("PATH").unwrap_or_default();
        let Ok(bin) = cargo_home().map(|h| h.join("bin")) else {
            return current;
        };
        if std::env::split_paths(&current).any(|p| p == bin) {
            return current;
        }
        let mut dirs = vec![bin];
        dirs.extend(std::env::split_paths(&current));
        std::env::join_paths(dirs).unwrap_or(current)
    })
}

/// Resolves `name` against [`child_path`], like `which`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(child_path())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A `Command` for `program` that runs in the repo root with [`child_path`] as PATH.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("PATH", child_path()).current_dir(repo_root());
    cmd
}

/// `cargo` through the rustup proxy on PATH (so `+nightly` works).
pub fn cargo() -> Command {
    command("cargo")
}

/// The command line of `cmd`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs `cmd` with inherited stdio; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = describe(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{line}`"))?;
    if !status.success() {
        check_interrupted()?;
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails (quoting stderr) unless it exits 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to start `{line}`"))?;
    if !out.status.success() {
        check_interrupted()?;
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed invalid UTF-8"))
}

/// True if `cmd` starts and exits 0; its output is discarded.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Fails unless the effective user is root.
pub fn require_root(why: &str) -> Result<()> {
    let uid = output(command("id").arg("-u"))?;
    if uid.trim() != "0" {
        bail!("must run as root: {why} (effective uid is {})", uid.trim());
    }
    Ok(())
}

/// Cargo's target directory for this workspace (honours CARGO_TARGET_DIR and config).
pub fn target_dir() -> Result<PathBuf> {
    let json = output(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let meta: serde_json::Value =
        serde_json::from_str(&json).context("cannot parse `cargo metadata` output")?;
    meta.get("target_directory")
        .and_then(serde_json::Value::as_str)
        .map(PathBuf::from)
        .context("`cargo metadata` output has no target_directory")
}

/// Absolute paths of the debug natd and natctl binaries.
pub fn debug_bins() -> Result<(PathBuf, PathBuf)> {
    let debug = target_dir()?.join("debug");
    Ok((debug.join("natd"), debug.join("natctl")))
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Makes Ctrl-C (and SIGTERM) set a flag instead of killing xtask, so guards can clean up.
/// Children in the foreground process group still get the signal and exit.
pub fn install_interrupt_handler() -> Result<()> {
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))
        .context("cannot install the Ctrl-C handler")
}

/// Fails if Ctrl-C was pressed. `run` and `output` call it when a command fails, so a child
/// that died of the same Ctrl-C is reported as "interrupted".
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}
