//! External commands with a time bound: a hung child (ip, nft, ping, natctl...) is killed and
//! reported instead of hanging the caller. Output is read on threads while the child runs, so
//! a child writing much never blocks on a full pipe.
use std::{
    io::{Read as _, Write as _},
    process::{Child, Command, ExitStatus, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

/// How often a bounded wait checks on its child. Short: the bench times commands this way.
const POLL: Duration = Duration::from_millis(2);

/// A finished command's exit status and output.
#[derive(Debug)]
pub struct CmdOutput {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    /// Stdout if the command exited 0, else an error quoting the command and its stderr.
    pub fn ok(self) -> anyhow::Result<String> {
        ensure!(
            self.status.success(),
            "`{}` failed ({}): {}",
            self.command,
            self.status,
            self.stderr.trim()
        );
        Ok(self.stdout)
    }
}

/// The command line of `cmd`, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits up to `timeout` for `child` to exit; `None` if it is still running.
pub(crate) fn wait_timeout(
    child: &mut Child,
    timeout: Duration,
    poll: Duration,
) -> anyhow::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for a child")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(poll);
    }
}

/// Runs `cmd` (stdin closed) to completion, killing it if it takes longer than `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> anyhow::Result<CmdOutput> {
    run_bounded_input(cmd, None, timeout)
}

/// [`run_bounded`] feeding `input` to the command's stdin (then closing it).
pub fn run_bounded_input(
    cmd: &mut Command,
    input: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<CmdOutput> {
    let command = describe(cmd);
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{command}`"))?;
    let writer = match (input, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            Some(std::thread::spawn(move || pipe.write_all(&data)))
        }
        _ => None,
    };
    let out = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let err = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let Some(status) = wait_timeout(&mut child, timeout, POLL)? else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("`{command}` did not finish within {timeout:?}; killed it");
    };
    let join = |h: JoinHandle<String>| h.join().unwrap_or_default();
    let (stdout, stderr) = (join(out), join(err));
    if let Some(w) = writer {
        // A child that exits 0 without reading all its input is not an error; one that
        // failed is reported by its status below.
        let written = w.join().unwrap_or(Ok(()));
        if status.success() {
            written.with_context(|| format!("writing to `{command}`"))?;
        }
    }
    Ok(CmdOutput {
        command,
        status,
        stdout,
        stderr,
    })
}

fn reader(pipe: Option<Box<dyn std::io::Read + Send>>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn returns_what_the_command_printed() {
        let out =
            run_bounded(Command::new("sh").args(["-c", "echo out; echo err >&2"]), T).unwrap();
        assert!(out.status.success());
        assert_eq!(
            (out.stdout.as_str(), out.stderr.as_str()),
            ("out\n", "err\n")
        );
        assert_eq!(out.ok().unwrap(), "out\n");
    }

    #[test]
    fn a_failure_quotes_the_command_and_its_stderr() {
        let out = run_bounded(Command::new("sh").args(["-c", "echo bad >&2; exit 3"]), T).unwrap();
        let e = format!("{:#}", out.ok().unwrap_err());
        assert!(e.contains("`sh -c echo bad >&2; exit 3` failed"), "{e}");
        assert!(e.ends_with(": bad"), "{e}");
    }

    #[test]
    fn feeds_stdin() {
        let out = run_bounded_input(&mut Command::new("cat"), Some(b"through"), T).unwrap();
        assert_eq!(out.ok().unwrap(), "through");
    }

    #[test]
    fn kills_a_command_that_outlives_its_bound() {
        let e =
            run_bounded(Command::new("sleep").arg("30"), Duration::from_millis(200)).unwrap_err();
        assert!(format!("{e}").contains("did not finish within"), "{e}");
    }
}
