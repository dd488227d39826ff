//! `cargo xtask demo`: runs natd on the client/router/guest topology of the end-to-end tests
//! (`nat_testbed::topology`, namespaces `xsn-demo-<pid>-<role>`) and shows inbound DNAT (ping,
//! TCP), outbound SNAT (ping) and natctl's view. Namespaces and processes are
//! `nat_testbed` guards, removed on success, error and Ctrl-C alike (dropped in reverse order).

use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use nat_testbed::{
    Process,
    topology::{
        CLIENT_ADDR, GUEST_ADDR, PUBLIC_ADDR as MAPPED_PUBLIC_ADDR, ROUTER_GUEST_IF,
        ROUTER_PUBLIC_IF, ThreeNamespaces as Topology,
    },
};

use crate::util::{self, command};

/// The default mapping, and the ingress rules that open it to ping and the TCP transfer (a
/// mapped public IP is closed until a rule opens it, as on CloudStack's router).
const NATD_CONFIG: &str = r#"[[mapping]]
public = "203.0.113.10"
private = "10.0.0.10"

[[rule]]
public = "203.0.113.10"
proto = "icmp"
icmp_type = 8

[[rule]]
public = "203.0.113.10"
proto = "tcp"
ports = "8080"
cidrs = ["198.51.100.0/24"]
"#;
const TCP_PORT: &str = "8080";
const TCP_BYTES: usize = 300 * 1024;
const SOCKET_WAIT: Duration = Duration::from_secs(10);
/// How long natd and the helpers may take to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

pub fn run() -> Result<()> {
    util::require_root("the demo creates network namespaces and attaches XDP programs")?;
    util::install_interrupt_handler()?;
    crate::build(false)?;
    let (natd, natctl) = util::debug_bins()?;
    for bin in [&natd, &natctl] {
        if !bin.is_file() {
            bail!("{} was not built", bin.display());
        }
    }

    let tmp = std::env::temp_dir().join(format!("xsn-demo-{}", std::process::id()));
    fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let log = tmp.join("natd.log");
    println!("demo: natd log: {}", log.display());

    let result = run_demo(&natd, &natctl, &tmp, &log);
    print_log_tail(&log);
    if result.is_ok() {
        println!("demo: done");
    }
    result
}

fn run_demo(natd: &Path, natctl: &Path, tmp: &Path, log: &Path) -> Result<()> {
    let config = tmp.join("natd.toml");
    let socket = tmp.join("natd.sock");
    fs::write(&config, NATD_CONFIG)
        .with_context(|| format!("cannot write {}", config.display()))?;

    println!("demo: creating namespaces and veth pairs");
    let topo = Topology::create(&format!("xsn-demo-{}-", std::process::id()))?;
    println!(
        "demo: client {CLIENT_ADDR} ({}) -- router ({}) -- guest {GUEST_ADDR} ({}); \
         mapping {MAPPED_PUBLIC_ADDR} <-> {GUEST_ADDR}",
        topo.client.name(),
        topo.router.name(),
        topo.guest.name()
    );
    util::check_interrupted()?;

    let mut daemon = start_natd(natd, &topo, &config, &socket, log)?;

    step("client pings the guest's public address (DNAT in, SNAT back)")?;
    util::run(topo.client.command("ping").args([
        "-c",
        "3",
        "-W",
        "2",
        &MAPPED_PUBLIC_ADDR.to_string(),
    ]))?;

    step(&format!(
        "client sends {TCP_BYTES} bytes over TCP to {MAPPED_PUBLIC_ADDR}:{TCP_PORT}"
    ))?;
    tcp_transfer(&topo)?;

    step("guest pings the client (SNAT out)")?;
    util::run(
        topo.guest
            .command("ping")
            .args(["-c", "3", "-W", "2", &CLIENT_ADDR.to_string()]),
    )?;

    for args in [
        &["mapping", "list"][..],
        &["firewall", "list"][..],
        &["conntrack", "list"][..],
        &["status"][..],
        &["stats"][..],
    ] {
        step(&format!("natctl {}", args.join(" ")))?;
        let out = util::output(command(natctl).arg("--socket").arg(&socket).args(args))?;
        print!("{out}");
    }

    step("stopping natd (SIGTERM)")?;
    let stopped = daemon.terminate(Duration::from_secs(10))?;
    let status = stopped.status;
    if stopped.killed {
        bail!("natd did not exit within 10 s of SIGTERM; killed it");
    }
    if !status.success() {
        bail!("natd exited with {status} after SIGTERM");
    }
    println!("demo: natd exited cleanly");
    drop(daemon);
    step("deleting namespaces")?;
    drop(topo);
    Ok(())
}

/// Announces the next step; fails if Ctrl-C was pressed (some children, like ping, exit 0 on it).
fn step(what: &str) -> Result<()> {
    util::check_interrupted()?;
    println!("\n==> {what}");
    Ok(())
}

fn start_natd(
    natd: &Path,
    topo: &Topology,
    config: &Path,
    socket: &Path,
    log: &Path,
) -> Result<Process> {
    let log_file =
        fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let log_err = log_file
        .try_clone()
        .context("cannot duplicate the log file handle")?;
    let mut cmd = command("nsenter");
    // nsenter, not `ip netns exec`: natd keeps the host's mount namespace (and bpffs).
    cmd.arg(format!("--net={}", topo.router.path().display()))
        .arg(natd)
        .args([
            "--public-iface",
            ROUTER_PUBLIC_IF,
            "--guest-iface",
            ROUTER_GUEST_IF,
        ])
        .arg("--socket")
        .arg(socket)
        .arg("--config")
        .arg(config)
        // The demo's own state and pins, taken down when it ends (natd's default is to leave
        // the fast path running for the next natd).
        .arg("--state-dir")
        .arg(socket.with_file_name("state"))
        .arg("--bpffs")
        .arg(format!("/sys/fs/bpf/{}", topo.router.name()))
        .arg("--detach-on-exit")
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    step(&format!("starting natd in {}", topo.router.name()))?;
    println!("{}", util::describe(&cmd));
    let mut daemon = Process::spawn("natd", &mut cmd)?.with_stop_grace(STOP_GRACE);

    let start = Instant::now();
    while !socket.exists() {
        if let Some(status) = daemon.try_wait()? {
            bail!(
                "natd exited ({status}) before creating {}",
                socket.display()
            );
        }
        util::check_interrupted()?;
        if start.elapsed() > SOCKET_WAIT {
            bail!(
                "natd did not create {} within {SOCKET_WAIT:?}",
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("demo: natd is up (socket {})", socket.display());
    Ok(daemon)
}

/// A listener in the guest receives what the client sends to the mapped public address; the
/// byte count must match.
fn tcp_transfer(topo: &Topology) -> Result<()> {
    let mut listen = topo.guest.command("nc");
    listen
        .args(["-l", "-p", TCP_PORT])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut listener = Process::spawn("nc listener", &mut listen)?.with_stop_grace(STOP_GRACE);
    let mut received = listener
        .child_mut()
        .stdout
        .take()
        .context("nc listener has no stdout")?;
    let counter = std::thread::spawn(move || {
        let mut sink = Vec::new();
        received.read_to_end(&mut sink).map(|_| sink.len())
    });

    let payload: Vec<u8> = (0..TCP_BYTES).map(|i| (i % 251) as u8).collect();
    let mut sent = false;
    for attempt in 1..=5 {
        util::check_interrupted()?;
        let mut send = topo.client.command("nc");
        send.args(["-N", "-w", "5", &MAPPED_PUBLIC_ADDR.to_string(), TCP_PORT]);
        if send_once(&mut send, &payload)? {
            sent = true;
            break;
        }
        println!("demo: nc client attempt {attempt} failed; retrying");
        std::thread::sleep(Duration::from_millis(300));
    }
    if !sent {
        bail!("nc could not send to {MAPPED_PUBLIC_ADDR}:{TCP_PORT}");
    }
    let Some(status) = listener.wait_timeout(Duration::from_secs(10))? else {
        bail!("nc listener in the guest did not finish within 10 s");
    };
    let count = counter
        .join()
        .map_err(|_| anyhow::anyhow!("byte counter thread panicked"))?
        .context("cannot read from the nc listener")?;
    if !status.success() || count != TCP_BYTES {
        bail!("guest received {count} of {TCP_BYTES} bytes (nc listener: {status})");
    }
    println!("demo: guest received all {count} bytes");
    Ok(())
}

/// Runs the nc client with `payload` on stdin; true if it exited 0.
fn send_once(cmd: &mut Command, payload: &[u8]) -> Result<bool> {
    cmd.stdin(Stdio::piped());
    let mut client = Process::spawn("nc client", cmd)?.with_stop_grace(STOP_GRACE);
    if let Some(mut stdin) = client.child_mut().stdin.take() {
        // A refused connection closes the pipe early; the exit status tells.
        let _ = stdin.write_all(payload);
    }
    let status = client.wait_timeout(Duration::from_secs(15))?;
    Ok(status.is_some_and(|s| s.success()))
}

fn print_log_tail(log: &Path) {
    let Ok(text) = fs::read_to_string(log) else {
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(20)..];
    println!(
        "\n==> natd log ({}), last {} lines:",
        log.display(),
        tail.len()
    );
    for line in tail {
        println!("{line}");
    }
}
