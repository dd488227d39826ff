//! Hostile input on natd's control socket (root's only, yet fed by scripts and tools that can
//! go wrong): garbage, truncated and oversized lines, deep nesting, invalid UTF-8, idle and
//! vanishing clients. Each gets an error reply or is closed; natd never crashes nor stalls and
//! changes nothing. And natctl run by anyone but root is told "permission denied".
use std::{os::unix::fs::PermissionsExt as _, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, ensure};
use nat_tests::topology::{
    COMMAND_TIMEOUT, GUEST_ADDR, Natd, PUBLIC_ADDR, Topology, process::binary, run_bounded,
};
use nat_userspace::api::{MAX_REQUEST, Reply, Response};

use crate::common::*;

/// Idle connections held open at once.
const IDLE_CONNECTIONS: usize = 512;
/// Requests pipelined in one write.
const PIPELINED: usize = 200;

/// Malformed request lines, each with a word natd's error must contain.
fn malformed_lines() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let line = |s: &str| format!("{s}\n").into_bytes();
    let nested = |open: &str, n: usize| {
        let mut v = open.repeat(n).into_bytes();
        v.push(b'\n');
        v
    };
    let payload = format!(
        "{{\"command\":\"cloudstack_apply\",\"name\":\"deep.json\",\"payload\":\"{}\"}}\n",
        "[".repeat(100_000)
    );
    vec![
        (
            "garbage bytes",
            b"\x00\x01\x02 garbage \x7f\xff\xfe\n".to_vec(),
            "malformed request",
        ),
        ("an empty line", line(""), "malformed request"),
        (
            "truncated JSON",
            line(r#"{"command":"mapping_add","public":"203.0.113."#),
            "malformed request",
        ),
        (
            "an unknown command",
            line(r#"{"command":"rm_rf"}"#),
            "malformed request",
        ),
        (
            "an unknown field",
            line(r#"{"command":"mapping_del","public":"203.0.113.10","force":true}"#),
            "malformed request",
        ),
        (
            "a field of the wrong type",
            line(r#"{"command":"mapping_del","public":4294967296}"#),
            "malformed request",
        ),
        (
            "a number too large",
            line(r#"{"command":"firewall_del","id":1e400}"#),
            "malformed request",
        ),
        (
            "100,000 nested arrays",
            nested("[", 100_000),
            "malformed request",
        ),
        (
            "100,000 nested objects",
            nested("{\"a\":", 100_000),
            "malformed request",
        ),
        (
            "a CloudStack payload nested 100,000 deep",
            payload.into_bytes(),
            "recursion limit",
        ),
        (
            "invalid UTF-8 in a string",
            b"{\"command\":\"cloudstack_apply\",\"name\":\"\xff\xfe\xfd\",\"payload\":\"{}\"}\n"
                .to_vec(),
            "malformed request",
        ),
        (
            "a lone surrogate",
            line(r#"{"command":"cloudstack_apply","name":"\ud800","payload":"{}"}"#),
            "malformed request",
        ),
    ]
}

/// Sends one line longer than natd reads (from a thread: natd stops reading at its limit) and
/// returns natd's reply.
fn oversized(socket: &Path) -> anyhow::Result<Option<Response>> {
    let mut writer = RawClient::connect(socket)?;
    // The second connection only proves natd serves others while it reads the big line.
    writer.send(b"{\"command\":\"status\"}\n")?;
    let status = writer.reply()?;
    ensure!(
        matches!(status, Some(Response::Ok(Reply::Status(_)))),
        "{status:?}"
    );
    // Connected only now, to send at once: natd drops a client idle for a second (a tenth
    // of one while many are connected), which the round trip above may take on a busy
    // machine.
    let mut client = RawClient::connect(socket)?;
    let stream = client.try_clone_stream()?;
    let sender = std::thread::spawn(move || {
        let mut stream = stream;
        let chunk = vec![b'x'; 1 << 20];
        let mut sent = 0;
        // natd closes after MAX_REQUEST + 1 bytes: a write error after that is expected.
        while sent <= MAX_REQUEST {
            if std::io::Write::write_all(&mut stream, &chunk).is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let reply = client.reply();
    let sent = sender.join().unwrap_or_default();
    eprintln!("sent {sent} bytes without a newline");
    reply
}

/// natd answers every malformed line with an error and the connection stays usable; a line
/// longer than `MAX_REQUEST` (64 MiB) is refused naming the limit; truncated requests and
/// clients that vanish mid-request or mid-reply are shrugged off; hundreds of idle
/// connections do not keep natd from answering; pipelined requests are answered in order.
/// Afterwards natd runs, answers promptly and its state is what it was.
#[test]
fn hostile_control_requests_get_errors_and_natd_keeps_answering() -> anyhow::Result<()> {
    const SENT: &str = "hostile requests and connections sent";
    const ANSWERED: &str = "malformed lines answered with the expected error";
    let mut fig = Figures::new("control socket");
    let topo = Topology::new()?;
    let mut natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let socket = natd.socket().to_path_buf();

    // One connection for all the malformed lines: each error leaves it open for the next.
    let mut client = RawClient::connect(&socket)?;
    fig.add(ANSWERED, 0);
    for (what, bytes, expect) in malformed_lines() {
        client.send(&bytes)?;
        fig.add(SENT, 1);
        let message = error_message(client.reply()?, what)?;
        let expected = message.contains(expect);
        fig.add(ANSWERED, u64::from(expected));
        ensure!(
            expected,
            "natd's answer to {what} does not say {expect:?}: {message}"
        );
    }
    alive(&mut natd, &mut fig, "malformed lines")?;

    // The request stream ends in the middle of a request.
    let mut client = RawClient::connect(&socket)?;
    client.send(br#"{"command":"mapping_add","public":"203.0"#)?;
    client.close_write()?;
    fig.add(SENT, 1);
    let message = error_message(client.reply()?, "a request cut by end of file")?;
    ensure!(message.contains("malformed request"), "{message}");
    ensure!(client.reply()?.is_none(), "natd kept the connection open");

    // Clients that vanish: mid-request (a few MB in), and before reading a reply.
    for size in [10, 4 << 20] {
        let mut client = RawClient::connect(&socket)?;
        let mut partial = br#"{"command":"cloudstack_apply","name":"x","payload":""#.to_vec();
        partial.resize(size.max(partial.len()), b'a');
        client.send(&partial)?;
        drop(client);
        fig.add(SENT, 1);
    }
    for _ in 0..20 {
        let mut client = RawClient::connect(&socket)?;
        client.send(b"{\"command\":\"stats\"}\n")?;
        drop(client);
        fig.add(SENT, 1);
    }
    alive(&mut natd, &mut fig, "vanishing clients")?;

    let refusal = oversized(&socket);
    fig.add(SENT, 1);
    let message = error_message(refusal?, "a line over 64 MiB")?;
    ensure!(
        message.contains(&MAX_REQUEST.to_string()),
        "natd's refusal of a line over its limit does not name the limit: {message}"
    );
    alive(&mut natd, &mut fig, "an oversized line")?;

    // Hundreds of connections that send nothing, some a partial line, all at once.
    let mut idle = Vec::with_capacity(IDLE_CONNECTIONS);
    for i in 0..IDLE_CONNECTIONS {
        let mut c = RawClient::connect(&socket).with_context(|| format!("idle connection {i}"))?;
        if i % 4 == 0 {
            c.send(b"{\"command\":")?;
        }
        idle.push(c);
        fig.add(SENT, 1);
    }
    fig.set("idle connections held open at once", idle.len() as u64);
    alive(&mut natd, &mut fig, "idle connections")?;
    drop(idle);

    let mut client = RawClient::connect(&socket)?;
    client.send(&b"{\"command\":\"status\"}\n".repeat(PIPELINED))?;
    let replies = client.replies(PIPELINED)?;
    let in_order = replies
        .iter()
        .filter(|r| matches!(r, Response::Ok(Reply::Status(_))))
        .count();
    fig.set("pipelined status requests sent", PIPELINED as u64);
    fig.set(
        "pipelined status requests answered in order",
        in_order as u64,
    );
    ensure!(
        in_order == PIPELINED,
        "{} pipelined status requests got another answer",
        PIPELINED - in_order
    );

    alive(&mut natd, &mut fig, "all of it")?;
    let list = natd.natctl()?.mappings()?;
    let rules = natd.natctl()?.firewall_rules()?;
    let unchanged =
        list.len() == 1 && list[0].public == PUBLIC_ADDR && list[0].private == GUEST_ADDR;
    fig.set(
        "changes hostile input made to the state",
        u64::from(!unchanged) + rules.len() as u64,
    );
    ensure!(unchanged, "the mappings changed: {list:?}");
    ensure!(rules.is_empty(), "the firewall changed: {rules:?}");
    fig.done();
    Ok(())
}

/// Idle connections beyond what natd's file descriptor limit allows (lowered to 64 with
/// `prlimit`, as a systemd service's 1,024 would be reached by a leaking client): natd keeps
/// answering (it closes idle connections or stops accepting for a while) and its log is not
/// flooded.
#[test]
fn idle_connections_beyond_the_fd_limit_do_not_stop_natd() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let mut natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let pid = natd.pid().to_string();
    run_bounded(
        Command::new("prlimit").args(["--pid", &pid, "--nofile=64:64"]),
        COMMAND_TIMEOUT,
    )?
    .ok()?;
    let socket = natd.socket().to_path_buf();
    let idle: Vec<_> = (0..100)
        .map(|_| RawClient::connect(&socket))
        .collect::<anyhow::Result<_>>()?;
    std::thread::sleep(Duration::from_secs(1));
    let answered = answers_promptly(&mut natd, "100 idle connections over a limit of 64");
    let warnings = natd.log_text().matches("Too many open files").count();
    drop(idle);
    answered?;
    ensure!(
        warnings < 100,
        "natd logged {warnings} accept errors in a second"
    );
    Ok(())
}

/// natctl as user nobody (uid 65534), copied where nobody may run it: its exit status and
/// its output.
fn natctl_as_nobody(
    topo: &Topology,
    socket: &Path,
    args: &[&str],
) -> anyhow::Result<(Option<i32>, String)> {
    let copy = topo.dir.path().join("natctl-nobody");
    if !copy.exists() {
        std::fs::copy(binary("natctl")?, &copy)?;
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
    }
    let out = run_bounded(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&copy)
            .arg("--socket")
            .arg(socket)
            .args(args),
        COMMAND_TIMEOUT,
    )?;
    Ok((out.status.code(), format!("{}{}", out.stdout, out.stderr)))
}

/// Runs natctl as nobody with `args` and fails unless it was refused (status 1) saying
/// "permission denied" and that the socket is root's; counts the request, and its refusal, in
/// `fig`.
fn refused_as_nobody(
    topo: &Topology,
    socket: &Path,
    args: &[&str],
    when: &str,
    fig: &mut Figures,
) -> anyhow::Result<()> {
    let (status, out) = natctl_as_nobody(topo, socket, args)?;
    let ok = status == Some(0);
    fig.add("non-root requests sent", 1);
    fig.add("non-root requests refused", u64::from(!ok));
    ensure!(
        !ok,
        "natctl {} as nobody succeeded {when}: {out}",
        args.join(" ")
    );
    ensure!(
        status == Some(1),
        "natctl {} as nobody {when} exited {status:?}, not 1 (refused): {out}",
        args.join(" ")
    );
    ensure!(
        out.starts_with("natctl: ") && out.contains("permission denied") && out.contains("root"),
        "natctl {} as nobody {when} does not say permission denied (root only): {out}",
        args.join(" ")
    );
    Ok(())
}

/// Fails unless the one mapping is still the only one after non-root requests; counts the
/// mappings they changed in `fig`.
fn unchanged_by_nobody(natd: &Natd, fig: &mut Figures) -> anyhow::Result<()> {
    let list = natd.natctl()?.mappings()?;
    let unchanged = list.len() == 1 && list[0].public == PUBLIC_ADDR;
    fig.set("changes non-root requests made", u64::from(!unchanged));
    ensure!(unchanged, "the mappings changed: {list:?}");
    Ok(())
}

/// A natd for the non-root tests, with a scratch directory anyone may traverse, so the
/// socket's own mode decides who reaches it.
fn natd_for_nobody(topo: &Topology) -> anyhow::Result<Natd> {
    let natd = Natd::start(topo, Some(ONE_MAPPING))?;
    std::fs::set_permissions(topo.dir.path(), std::fs::Permissions::from_mode(0o755))?;
    Ok(natd)
}

/// natctl run by a user other than root is told "permission denied" and that the socket is
/// root's (natd's socket is 0600); nothing changes.
#[test]
fn natctl_as_non_root_is_told_permission_denied() -> anyhow::Result<()> {
    let mut fig = Figures::new("control socket");
    let topo = Topology::new()?;
    let natd = natd_for_nobody(&topo)?;
    let socket = natd.socket().to_path_buf();
    let mode = std::fs::metadata(&socket)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "natd's socket has mode {mode:o}");
    refused_as_nobody(&topo, &socket, &["status"], "", &mut fig)?;
    refused_as_nobody(
        &topo,
        &socket,
        &["mapping", "add", "203.0.113.20", "10.0.0.20"],
        "",
        &mut fig,
    )?;
    unchanged_by_nobody(&natd, &mut fig)?;
    fig.done();
    Ok(())
}

/// Where the socket's mode was loosened by mistake, natd itself refuses a peer that is not
/// root, and natctl shows natd's "permission denied" (not a broken pipe); nothing changes.
#[test]
fn natd_refuses_non_root_peers_with_a_message_natctl_shows() -> anyhow::Result<()> {
    let mut fig = Figures::new("control socket");
    let topo = Topology::new()?;
    let natd = natd_for_nobody(&topo)?;
    let socket = natd.socket().to_path_buf();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
    for _ in 0..10 {
        refused_as_nobody(
            &topo,
            &socket,
            &["status"],
            "with the socket 0666",
            &mut fig,
        )?;
        refused_as_nobody(
            &topo,
            &socket,
            &["mapping", "del", "203.0.113.10"],
            "with the socket 0666",
            &mut fig,
        )?;
    }
    unchanged_by_nobody(&natd, &mut fig)?;
    fig.done();
    Ok(())
}
