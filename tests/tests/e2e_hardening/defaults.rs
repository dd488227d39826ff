//! Safe defaults: metrics only on loopback unless told otherwise, nothing natd writes open to
//! other users, and every mapped public IP closed until a rule opens it, whatever order the
//! changes arrive in.
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::TcpStream,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, Natctl, Natd, NatdOptions, PUBLIC_ADDR, ROUTER_PUBLIC_ADDR, Topology,
    attempt::{assert_no_datagram, udp_send},
    observe::{udp_bind, udp_exchange},
    policy::Way,
};

use crate::common::*;

/// natd's metrics port when not told otherwise (`DEFAULT_METRICS_ADDR`).
const METRICS_PORT: u16 = 9477;

/// Without `--metrics-addr` natd serves metrics on 127.0.0.1:9477 and nowhere else: it is the
/// only TCP listener in the router, it answers there, and the client, on the public side,
/// reaches nothing on the router's address.
#[test]
fn metrics_listen_on_loopback_only_by_default() -> anyhow::Result<()> {
    let mut fig = Figures::new("safe defaults");
    let topo = Topology::new()?;
    let _natd = Natd::start_with(
        &topo,
        &NatdOptions {
            omit: vec!["--metrics-addr"],
            ..NatdOptions::default()
        },
    )?;
    let listening: Vec<String> = topo
        .router
        .exec("ss", &["-H", "-l", "-t", "-n"])?
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect();
    let loopback = format!("127.0.0.1:{METRICS_PORT}");
    fig.set(
        "TCP listeners of natd beyond loopback",
        listening.iter().filter(|l| **l != loopback).count() as u64,
    );
    ensure!(
        listening == [loopback],
        "TCP listeners in the router: {listening:?}"
    );
    let text = topo.router.run(|| -> anyhow::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", METRICS_PORT))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })??;
    ensure!(
        text.starts_with("HTTP/1.") && text.contains("xdp_nat_"),
        "GET /metrics: {text}"
    );
    let from_outside = topo.client.run(|| {
        TcpStream::connect_timeout(
            &at(ROUTER_PUBLIC_ADDR, METRICS_PORT).into(),
            Duration::from_secs(5),
        )
    })?;
    let refused = matches!(&from_outside, Err(e) if e.kind() == ErrorKind::ConnectionRefused);
    fig.set(
        "connections to the metrics port from the public side not refused",
        u64::from(!refused),
    );
    ensure!(
        refused,
        "the client connecting to the router's metrics port: {from_outside:?}"
    );
    fig.done();
    Ok(())
}

/// Every file and directory under `root` (itself included).
fn walk(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if std::fs::symlink_metadata(&out[i])?.is_dir() {
            for e in std::fs::read_dir(&out[i]).with_context(|| format!("{}", out[i].display()))? {
                out.push(e?.path());
            }
        }
        i += 1;
    }
    Ok(out)
}

fn mode(path: &Path) -> anyhow::Result<u32> {
    Ok(std::fs::symlink_metadata(path)
        .with_context(|| format!("{}", path.display()))?
        .mode()
        & 0o7777)
}

/// Runs natd with `umask` (or the test's own) so that it writes everything it writes: its
/// state directory and file, its control socket in a directory it creates, the record of the
/// CloudStack files it applied, and its pins in bpffs. None of it may be writable by other
/// users, and what is private is private (0700 directories, 0600 files and socket).
fn check_files(umask: Option<libc::mode_t>) -> anyhow::Result<()> {
    let mut fig = Figures::new("safe defaults");
    let topo = Topology::new()?;
    let dir = topo.dir.path();
    let cloudstack = dir.join("cloudstack");
    std::fs::create_dir(&cloudstack)?;
    std::fs::write(
        cloudstack.join("0001-staticnat.json"),
        static_nat_payload(&[(PUBLIC_ADDR, GUEST_ADDR)], false),
    )?;
    let socket = dir.join("run").join("natd").join("natd.sock");
    let natd = Natd::start_with(
        &topo,
        &NatdOptions {
            socket: Some(socket.clone()),
            args: vec!["--cloudstack-dir".into(), cloudstack.display().to_string()],
            umask,
            ..NatdOptions::default()
        },
    )?;
    let state = dir.join("state");
    let record = state.join("cloudstack-processed.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !record.exists() {
        ensure!(
            Instant::now() < deadline,
            "natd did not record the CloudStack file:\n{}",
            natd.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(
        natd.natctl()?.mappings()?.len() == 1,
        "the payload was not applied"
    );

    let exact = [
        (state.clone(), 0o700),
        (state.join("state.json"), 0o600),
        (record, 0o600),
        (socket.parent().context("socket dir")?.to_path_buf(), 0o700),
        (socket.clone(), 0o600),
    ];
    let mut problems = Vec::new();
    for (path, want) in &exact {
        let m = mode(path)?;
        fig.add("files natd wrote checked for their modes", 1);
        fig.add("private files and directories with another mode", 0);
        if m != *want {
            fig.add("private files and directories with another mode", 1);
            problems.push(format!("{} is {m:o}, not {want:o}", path.display()));
        }
    }
    for path in walk(&state)?
        .into_iter()
        .chain(walk(&Natd::pin_dir(&topo))?)
    {
        let m = mode(&path)?;
        fig.add("files natd wrote checked for their modes", 1);
        fig.add("world-writable files natd wrote", u64::from(m & 0o002 != 0));
        if m & 0o002 != 0 {
            problems.push(format!("{} is world-writable ({m:o})", path.display()));
        }
    }
    ensure!(
        problems.is_empty(),
        "with umask {}: {}",
        umask.map_or("inherited".into(), |u| format!("{u:03o}")),
        problems.join("; ")
    );
    fig.done();
    Ok(())
}

/// With the usual umask, nothing natd writes is open to others.
#[test]
fn files_natd_writes_are_private() -> anyhow::Result<()> {
    check_files(None)
}

/// Nor with umask 000, as a careless init script or container runtime may leave it: natd
/// sets the modes it needs instead of trusting the umask.
#[test]
fn files_natd_writes_are_private_even_with_umask_000() -> anyhow::Result<()> {
    check_files(Some(0))
}

/// A datagram from the client to P:7000 reaches the guest (from the client's address).
fn open(topo: &Topology, port: u16) -> anyhow::Result<()> {
    let seen = udp_exchange(
        &topo.guest,
        at(GUEST_ADDR, port),
        &topo.client,
        at(PUBLIC_ADDR, port),
        64,
    )?;
    ensure!(seen.server_saw.ip() == CLIENT_ADDR, "{seen:?}");
    Ok(())
}

/// A datagram from the client to P:`port` is dropped by the firewall (counted) and the guest
/// receives nothing; P has no rules. Counts in `fig` the datagram sent, and whether it
/// reached the guest or went uncounted as denied, before failing on either.
fn closed(
    topo: &Topology,
    natctl: &Natctl,
    port: u16,
    when: &str,
    fig: &mut Figures,
) -> anyhow::Result<()> {
    const REACHED: &str = "datagrams to a mapped IP without rules that reached the guest";
    const UNCOUNTED: &str = "datagrams to a mapped IP without rules not counted as denied";
    let rules = natctl.firewall_rules()?;
    ensure!(rules.is_empty(), "{when}: P has rules {rules:?}");
    let listener = udp_bind(&topo.guest, at(GUEST_ADDR, port))?;
    fig.add("datagrams sent to a mapped IP without rules", 1);
    let denied = natctl.dropped(PUBLIC_ADDR, Way::In, &format!("a datagram {when}"), || {
        udp_send(&topo.client, None, at(PUBLIC_ADDR, port), b"closed?")
    });
    let nothing = assert_no_datagram(&listener);
    fig.add(UNCOUNTED, u64::from(denied.is_err()));
    fig.add(REACHED, u64::from(nothing.is_err()));
    denied.with_context(|| when.to_string())?;
    nothing.with_context(|| when.to_string())
}

/// A CloudStack ingress rule opening UDP 7000 of P to everyone.
fn open_udp_7000() -> String {
    firewall_payload(vec![ingress_rule(
        11,
        PUBLIC_ADDR,
        "udp",
        Some((7000, 7000)),
        &["0.0.0.0/0".to_string()],
    )])
}

/// P is closed whenever it has no rule, whatever the order changes arrive in, and open to its
/// rules only: a rule outlives its mapping deleted and added again (kept, inactive meanwhile,
/// as on CloudStack's router) and P is closed once the rule is deleted; a CloudStack firewall
/// payload for P before its static NAT payload takes effect with the static NAT, and P is closed
/// once the payload's revoke arrives; the mapping revoked and granted again by CloudStack
/// without rules; and natd restarted.
#[test]
fn mapped_addresses_stay_closed_whatever_order_changes_arrive_in() -> anyhow::Result<()> {
    const ORDERS: &str = "orders of changes after which the mapped IP was checked";
    let mut fig = Figures::new("safe defaults");
    let topo = Topology::new()?;
    let mut natd = Natd::start(&topo, None)?;
    let natctl = natd.natctl()?;
    let (p, v) = (PUBLIC_ADDR.to_string(), GUEST_ADDR.to_string());

    natctl.ok(&["mapping", "add", &p, &v])?;
    closed(&topo, &natctl, 7000, "after mapping add", &mut fig)?;
    let id = natctl.firewall_add(PUBLIC_ADDR, &["--proto", "udp", "--ports", "7000"])?;
    open(&topo, 7000)?;
    natctl.ok(&["mapping", "del", &p])?;
    ensure!(
        natctl.firewall_states()? == (vec![], vec![id]),
        "rule {id} is not listed inactive without its mapping"
    );
    natctl.ok(&["mapping", "add", &p, &v])?;
    open(&topo, 7000)?;
    natctl.ok(&["firewall", "del", &id.to_string()])?;
    closed(
        &topo,
        &natctl,
        7000,
        "after the mapping was deleted and added again, and its rule deleted",
        &mut fig,
    )?;
    fig.add(ORDERS, 1);

    natctl.ok(&["mapping", "del", &p])?;
    let fw = payload_file(&topo, "fw.json", &open_udp_7000())?;
    let out = natctl.ok(&["apply", &fw])?;
    ensure!(out.contains("inactive"), "a rule for an unmapped P: {out}");
    let nat = payload_file(
        &topo,
        "nat.json",
        &static_nat_payload(&[(PUBLIC_ADDR, GUEST_ADDR)], false),
    )?;
    natctl.ok(&["apply", &nat])?;
    open(&topo, 7000)?;
    let fw_revoke = payload_file(
        &topo,
        "fw_revoke.json",
        &open_udp_7000().replace(r#""revoked":false"#, r#""revoked":true"#),
    )?;
    natctl.ok(&["apply", &fw_revoke])?;
    closed(
        &topo,
        &natctl,
        7000,
        "after firewall then static NAT payloads, and the firewall revoke",
        &mut fig,
    )?;
    fig.add(ORDERS, 1);

    let revoke = payload_file(
        &topo,
        "revoke.json",
        &static_nat_payload(&[(PUBLIC_ADDR, GUEST_ADDR)], true),
    )?;
    natctl.ok(&["apply", &revoke])?;
    natctl.ok(&["apply", &nat])?;
    closed(
        &topo,
        &natctl,
        7000,
        "after static NAT revoked and granted again",
        &mut fig,
    )?;
    fig.add(ORDERS, 1);

    natd.terminate()?;
    let natd = Natd::start(&topo, None)?;
    let natctl = natd.natctl()?;
    closed(&topo, &natctl, 7000, "after natd restarted", &mut fig)?;
    fig.add(ORDERS, 1);
    fig.done();
    Ok(())
}
