//! Two public networks, each with its own gateway, and CloudStack's policy routing by source:
//! a per-network routing table with a default route via that network's gateway and an
//! `ip rule from P table N` for each public IP P the network owns. The main table's default
//! points at network 1's gateway. The same "internet" address is behind both gateways, so only
//! the router's routing decides which one a packet reaches. The topology is
//! `nat_tests::topology::two_networks`:
//!
//! ```text
//! upstream1 (the client) 198.51.100.2 ── pub0 198.51.100.1         gst0 ── guest 10.0.0.10
//!                                               router                          10.0.0.20
//! upstream2              192.0.2.2    ── pub1 192.0.2.1
//! both upstreams: 203.0.113.200/32 on lo
//! P1 203.0.113.10 -> 10.0.0.10, table 101: default via 198.51.100.2
//! P2 203.0.113.20 -> 10.0.0.20, table 102: default via 192.0.2.2
//! ```
use std::net::Ipv4Addr;

use anyhow::{Context as _, ensure};
use nat_tests::packet::{PROTO_UDPLITE, udplite};
use nat_tests::topology::{
    COMMAND_TIMEOUT, Netns,
    attempt::{
        TcpAttempt, accept, assert_no_connection, assert_no_datagram, tcp_listen, udp_receive,
        udp_send,
    },
    fastpath::{self, Arrived},
    links::ROUTER_PUBLIC2_IF,
    observe::{ICMP_ECHO_REQUEST, IcmpSniffer, segs_in, udp_bind},
    run_bounded,
    sniff::{Seen, Sniffer},
    two_networks::{P1, P2, REMOTE, TwoNetworks, V1, V2},
};

use super::at;

/// `ping -c 3 -I SOURCE DST` in `ns`; fails unless all 3 were answered.
fn ping_from(ns: &Netns, source: Ipv4Addr, dst: Ipv4Addr) -> anyhow::Result<()> {
    let (src, dst) = (source.to_string(), dst.to_string());
    let out = run_bounded(
        ns.command("ping")
            .args(["-n", "-c", "3", "-i", "0.2", "-w", "10", "-I", &src, &dst]),
        COMMAND_TIMEOUT,
    )?;
    ensure!(
        out.status.success() && out.stdout.contains("3 received"),
        "`{}`: {}{}",
        out.command,
        out.stdout,
        out.stderr
    );
    Ok(())
}

/// The guest sends from `v` to the remote address by ICMP, UDP and TCP: everything reaches
/// `right` from `p` (and the answers come back), nothing reaches `wrong`. Returns the packets
/// that arrived at `right` and, back, at the guest (echo requests or replies, datagrams, TCP
/// segments), as the receivers counted them.
fn leaves_through(
    guest: &Netns,
    (v, p): (Ipv4Addr, Ipv4Addr),
    right: &Netns,
    wrong: &Netns,
) -> anyhow::Result<(u64, u64)> {
    let what = format!("from {v} (P {p})");
    let (right_icmp, wrong_icmp) = (IcmpSniffer::open_in(right)?, IcmpSniffer::open_in(wrong)?);
    ping_from(guest, v, REMOTE)?;
    let requests = right_icmp.collect(3, |s| s.icmp_type == ICMP_ECHO_REQUEST);
    let sources: Vec<_> = requests.iter().map(|s| (s.src, s.dst)).collect();
    assert_eq!(
        sources,
        [(p, REMOTE); 3],
        "{what}: echo requests at {}",
        right.name()
    );

    let (right_udp, wrong_udp) = (
        udp_bind(right, at(REMOTE, 7000))?,
        udp_bind(wrong, at(REMOTE, 7000))?,
    );
    let sender = udp_send(guest, Some(v), at(REMOTE, 7000), b"which way?")?;
    let (data, from) = udp_receive(&right_udp)?;
    assert_eq!(
        (data.as_slice(), from.ip()),
        (&b"which way?"[..], p.into()),
        "{what}"
    );
    right_udp.send_to(b"this way", from)?;
    let (answer, from) = udp_receive(&sender)?;
    assert_eq!(
        (answer.as_slice(), from),
        (&b"this way"[..], at(REMOTE, 7000).into()),
        "{what}"
    );

    let (right_tcp, wrong_tcp) = (
        tcp_listen(right, at(REMOTE, 8080))?,
        tcp_listen(wrong, at(REMOTE, 8080))?,
    );
    let conn = TcpAttempt::start(guest, Some(v), at(REMOTE, 8080))?.connected()?;
    let (accepted, peer) = accept(&right_tcp)?;
    assert_eq!(peer.ip(), p, "{what}: TCP at {}", right.name());
    // ping_from saw 3 replies: 3 requests arrived at `right`, 3 replies at the guest.
    let at_right = requests.len() as u64 + 1 + segs_in(&accepted)?;
    let at_guest = 3 + 1 + segs_in(&conn)?;

    // Everything arrived where it should, so nothing is still on its way to the wrong place.
    let stray = wrong_icmp.pending(|s| s.icmp_type == ICMP_ECHO_REQUEST);
    assert_eq!(stray, [], "{what}: echo requests at {}", wrong.name());
    assert_no_datagram(&wrong_udp)?;
    assert_no_connection(&wrong_tcp)?;
    Ok((at_right, at_guest))
}

/// Each guest address's traffic to the same remote address leaves through the public network
/// that owns its public IP, with that public IP as source, translated by the fast path.
#[test]
fn each_public_ip_leaves_through_its_own_network() -> anyhow::Result<()> {
    let t = TwoNetworks::new()?;
    let natctl = t.natd.natctl()?;
    let before = natctl.stats()?;
    let one = leaves_through(&t.topo.guest, (V1, P1), &t.topo.client, &t.upstream2)?;
    let two = leaves_through(&t.topo.guest, (V2, P2), &t.upstream2, &t.topo.client)?;
    let after = natctl.stats()?;
    fastpath::carried(
        &before,
        &after,
        &[
            Arrived::new(
                "outbound_forwarded",
                one.0 + two.0,
                "packets at the upstreams",
            ),
            Arrived::new("inbound_forwarded", one.1 + two.1, "answers at the guest"),
        ],
    )?;
    for (p, (out, back)) in [(P1, one), (P2, two)] {
        let c = natctl.counters(p)?;
        assert!(
            c.outbound_packets >= out && c.inbound_packets >= back,
            "{p} counted fewer than the {out} packets out and {back} back that arrived: {c:?}"
        );
    }
    Ok(())
}

/// A datagram from `v` to the remote address reaches `right` from `p`, and `wrong` gets none.
fn datagram_leaves_through(
    guest: &Netns,
    (v, p): (Ipv4Addr, Ipv4Addr),
    len: usize,
    right: &Netns,
    wrong: &Netns,
) -> anyhow::Result<()> {
    let (right_udp, wrong_udp) = (
        udp_bind(right, at(REMOTE, 7000))?,
        udp_bind(wrong, at(REMOTE, 7000))?,
    );
    let _sender = udp_send(guest, Some(v), at(REMOTE, 7000), &vec![7u8; len])?;
    let what = format!("a datagram of {len} bytes from {v} (P {p})");
    let arrived = udp_receive(&right_udp);
    let stray = assert_no_datagram(&wrong_udp);
    let (data, from) = arrived.with_context(|| {
        let there = match &stray {
            Ok(()) => "nothing".to_string(),
            Err(e) => format!("{e:#}"),
        };
        format!(
            "{what} did not reach {}; at {}: {there}",
            right.name(),
            wrong.name()
        )
    })?;
    assert_eq!((data.len(), from.ip()), (len, p.into()), "{what}");
    stray.with_context(|| format!("{what}: at {}", wrong.name()))
}

/// What the kernel translates must take the same way as what XDP does: a fragmented datagram
/// (XDP passes fragments to the kernel) and the first datagram towards a gateway whose
/// neighbour entry the router does not have yet (XDP passes it too) must leave through the
/// public network owning P2. The kernel routes them before nftables' SNAT, by the private
/// source V2, which no `ip rule from P2` matches: natd's routing mark and its `fwmark` rule
/// for table 102 send them through network 2 (before, the main table's default sent them
/// through network 1, with P2 as source).
#[test]
fn what_the_kernel_translates_leaves_through_its_own_network_too() -> anyhow::Result<()> {
    let t = TwoNetworks::new()?;
    datagram_leaves_through(&t.topo.guest, (V2, P2), 4000, &t.upstream2, &t.topo.client)
        .context("fragmented")?;
    t.topo
        .router
        .ip(&["neigh", "flush", "dev", ROUTER_PUBLIC2_IF])?;
    datagram_leaves_through(&t.topo.guest, (V2, P2), 64, &t.upstream2, &t.topo.client)
        .context("the first packet, gateway 2 not yet resolved")?;
    Ok(())
}

/// UDP-Lite that XDP hands to the kernel (the first datagram towards gateway 2, whose
/// neighbour entry the router does not have yet) is translated statelessly by natd's table
/// (the kernel deems UDP-Lite from the wire INVALID), so no connection carries its routing
/// mark: natd marks it by its private source, and it leaves through network 2, from P2, with
/// a valid checksum (before, the main table's default sent it through network 1).
#[test]
fn stateless_udplite_leaves_through_its_own_network() -> anyhow::Result<()> {
    let t = TwoNetworks::new()?;
    let guest = Sniffer::open_in(&t.topo.guest, PROTO_UDPLITE)?;
    guest.bind_source(V2)?;
    let (right, wrong) = (
        Sniffer::open_in(&t.upstream2, PROTO_UDPLITE)?,
        Sniffer::open_in(&t.topo.client, PROTO_UDPLITE)?,
    );
    t.topo
        .router
        .ip(&["neigh", "flush", "dev", ROUTER_PUBLIC2_IF])?;
    let d = udplite(V2, REMOTE, 5001, 5002, b"stateless, marked", 0);
    guest.send(&d, REMOTE)?;
    let ours = |p: &Seen| p.l4.len() == d.len() && p.l4[8..] == d[8..];
    let seen = right.until(ours);
    let stray: Vec<_> = wrong.pending().into_iter().filter(ours).collect();
    ensure!(
        seen.last()
            .is_some_and(|p| ours(p) && p.src == P2 && p.checksums.is_ok()),
        "the datagram did not reach network 2 from {P2} with valid checksums: {seen:?}; \
         network 1 got {stray:?}"
    );
    ensure!(stray.is_empty(), "network 1 got it too: {stray:?}");
    Ok(())
}

/// A remote behind network 2 sends a fragmented datagram to P2 (a rule opens it): the kernel
/// translates it, and the guest's fragmented answer, which the kernel translates too, must
/// leave through network 2, where the connection came from, not by the main table's default.
#[test]
fn the_kernels_answers_leave_through_the_network_the_connection_came_from() -> anyhow::Result<()> {
    let t = TwoNetworks::new()?;
    let natctl = t.natd.natctl()?;
    natctl.firewall_add(P2, &["--proto", "udp", "--ports", "7000"])?;
    let service = udp_bind(&t.topo.guest, at(V2, 7000))?;
    let (remote, wrong) = (
        udp_bind(&t.upstream2, at(REMOTE, 7100))?,
        udp_bind(&t.topo.client, at(REMOTE, 7100))?,
    );
    remote.send_to(&vec![1u8; 4000], at(P2, 7000))?;
    let (data, from) = udp_receive(&service)?;
    assert_eq!((data.len(), from), (4000, at(REMOTE, 7100).into()));
    service.send_to(&vec![2u8; 4000], from)?;
    let arrived = udp_receive(&remote);
    let stray = assert_no_datagram(&wrong);
    let (answer, from) =
        arrived.with_context(|| format!("at {}: {stray:?}", t.topo.client.name()))?;
    assert_eq!((answer.len(), from), (4000, at(P2, 7000).into()));
    stray
}

/// natd's own policy rules (`ip -j rule`): (priority, table) of each, sorted.
fn natd_rules(router: &Netns) -> anyhow::Result<Vec<(u64, String)>> {
    let text = router.ip(&["-j", "rule", "show"])?;
    let rules: serde_json::Value = serde_json::from_str(&text).context("ip -j rule")?;
    let mut out = Vec::new();
    for r in rules.as_array().context("ip -j rule: not an array")? {
        if r["protocol"] != "167" {
            continue;
        }
        ensure!(
            r["fwmask"] == "0x3f000000" && r["src"] == "all",
            "natd's rule {r}"
        );
        let priority = r["priority"].as_u64().context("a rule without priority")?;
        out.push((
            priority,
            r["table"].as_str().unwrap_or_default().to_string(),
        ));
    }
    out.sort();
    Ok(out)
}

/// Polls natd's rules until they are `want` (bounded).
fn wait_rules(router: &Netns, want: &[(u64, &str)], what: &str) -> anyhow::Result<()> {
    let mut want: Vec<(u64, String)> = want.iter().map(|(p, t)| (*p, t.to_string())).collect();
    want.sort();
    let deadline = std::time::Instant::now() + nat_tests::topology::observe::ARRIVAL;
    loop {
        let now = natd_rules(router)?;
        if now == want {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{what}: natd's rules are {now:?}, not {want:?}; all rules: {}",
            router.ip(&["rule", "show"])?
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// natd mirrors each `from P lookup T` rule of the operator with a `fwmark` rule of its own
/// (protocol 167) at the same priority, follows the operator's changes, drops the rule of a
/// table no mapping needs any more, and removes its rules when it exits with
/// `--detach-on-exit`; the operator's rules stay as they were.
#[test]
fn natd_keeps_its_policy_rules_in_step_with_the_operators_and_the_mappings() -> anyhow::Result<()> {
    let mut t = TwoNetworks::new()?;
    let r = &t.topo.router;
    let operator = |r: &Netns| -> anyhow::Result<String> {
        let all = r.ip(&["rule", "show"])?;
        Ok(all
            .lines()
            .filter(|l| !l.contains("proto 167"))
            .collect::<Vec<_>>()
            .join("\n"))
    };
    let priority = |from: Ipv4Addr| -> anyhow::Result<u64> {
        let text = r.ip(&["-j", "rule", "show", "from", &from.to_string()])?;
        let rules: serde_json::Value = serde_json::from_str(&text)?;
        rules[0]["priority"]
            .as_u64()
            .with_context(|| format!("no rule from {from}: {text}"))
    };
    let (p1, p2) = (priority(P1)?, priority(P2)?);
    wait_rules(r, &[(p2, "102"), (p1, "101")], "at start")?;

    t.natd.natctl()?.ok(&["mapping", "del", "203.0.113.20"])?;
    wait_rules(r, &[(p1, "101")], "after P2's mapping went")?;

    r.ip(&["rule", "del", "from", &P1.to_string(), "table", "101"])?;
    wait_rules(r, &[], "after the operator's rule for P1 went")?;
    r.ip(&[
        "rule",
        "add",
        "from",
        &P1.to_string(),
        "table",
        "102",
        "priority",
        "100",
    ])?;
    wait_rules(
        r,
        &[(100, "102")],
        "after the operator moved P1 to table 102",
    )?;
    let before = operator(r)?;

    t.natd.terminate()?;
    assert_eq!(natd_rules(r)?, [], "natd's rules after it exited");
    assert_eq!(operator(r)?, before, "the operator's rules");
    Ok(())
}
