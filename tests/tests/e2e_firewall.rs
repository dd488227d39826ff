//! End to end, the stateful firewall: the ingress rules of a mapped public IP P (default deny),
//! the egress policy of the guest network, and the connection table that lets replies and
//! established connections through. Same topology and ground rules as `e2e.rs`: each test has
//! its own namespaces and natd, removed when it ends.
//!
//! A packet the firewall drops leaves no trace at either end, so every "does not get through"
//! is first observed where it happens: the test waits until natd's `inbound_denied` or
//! `outbound_denied` counter counted the drop, then checks once, without waiting, that the
//! listener holds nothing. In the kernel's slow path, which has no such counter, a packet that
//! must arrive after the dropped one marks the moment to check, and the IP counters of the
//! router and the guest show the dropped one was reassembled by the router, not by the guest.
use std::{
    io::{ErrorKind, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{Context as _, ensure};
use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, Natctl, Natd, Netns, PUBLIC_ADDR, Topology,
    attempt::{
        TcpAttempt, accept, assert_no_connection, assert_no_datagram, assert_nothing_to_read,
        expect_bytes, tcp_listen, udp_receive, udp_send,
    },
    fastpath::{self, Arrived},
    observe::{
        ARRIVAL, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IcmpSniffer, payload, ping, tcp_exchange,
        udp_bind, udp_exchange,
    },
    policy::{Way, reason},
};
use nat_userspace::{
    api::{FlowInfo, StatsReport},
    ebpf::MappingCounters,
    firewall::{PortRange, Proto},
};

/// P 203.0.113.10 <-> V 10.0.0.10 and no rules: P is closed.
const ONE_MAPPING: &str = "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n";
/// A second address of the client, outside the client link's 198.51.100.0/24 (RFC 5737).
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

fn at(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

/// The counters of the mapping of P in `stats`.
fn of_p(stats: &StatsReport) -> anyhow::Result<MappingCounters> {
    stats
        .mappings
        .iter()
        .find(|m| m.public == PUBLIC_ADDR)
        .map(|m| m.counters)
        .with_context(|| format!("no mapping of {PUBLIC_ADDR} in {:?}", stats.mappings))
}

/// Runs `send`, then waits until natd counted a drop of a packet travelling `way` on P's
/// mapping; returns what `send` returned.
fn dropped<T>(
    natctl: &Natctl,
    way: Way,
    what: &str,
    send: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    natctl.dropped(PUBLIC_ADDR, way, what, send)
}

/// A TCP connection attempt from the client (from `source` if given) to P:`port` that the
/// firewall drops; the guest's listener on `port` has no connection.
fn tcp_dropped(
    topo: &Topology,
    natctl: &Natctl,
    source: Option<Ipv4Addr>,
    port: u16,
) -> anyhow::Result<TcpAttempt> {
    let listener = tcp_listen(&topo.guest, at(GUEST_ADDR, port))?;
    let what = format!("a SYN from {source:?} to {PUBLIC_ADDR}:{port}");
    let attempt = dropped(natctl, Way::In, &what, || {
        TcpAttempt::start(&topo.client, source, at(PUBLIC_ADDR, port))
    })?;
    ensure!(!attempt.is_connected()?, "{what}: connected");
    assert_no_connection(&listener).with_context(|| what.clone())?;
    Ok(attempt)
}

/// A datagram from `from_ns` to `target` that the firewall or the egress policy drops; the
/// socket bound to `listen` in `to_ns` receives nothing.
fn udp_dropped(
    natctl: &Natctl,
    way: Way,
    (from_ns, target): (&Netns, SocketAddrV4),
    (to_ns, listen): (&Netns, SocketAddrV4),
) -> anyhow::Result<()> {
    let listener = udp_bind(to_ns, listen)?;
    let what = format!("a datagram to {target}");
    dropped(natctl, way, &what, || {
        udp_send(from_ns, None, target, b"must not arrive")
    })?;
    assert_no_datagram(&listener).with_context(|| what.clone())
}

/// The one flow in `flows` matching `pred`.
fn the_flow(flows: &[FlowInfo], what: &str, pred: impl Fn(&FlowInfo) -> bool) -> FlowInfo {
    let found: Vec<_> = flows.iter().filter(|f| pred(f)).collect();
    assert_eq!(found.len(), 1, "{what} in {flows:#?}");
    found[0].clone()
}

/// With no rule, P answers nothing: a ping, a TCP connection and a datagram to it are dropped
/// in XDP and counted as `inbound_denied`, and the guest sees none of them. Allowing ICMP echo
/// and the TCP port then lets the ping, and the very connection attempt that was being dropped
/// (its next SYN), through.
#[test]
fn a_mapped_public_ip_without_rules_answers_nothing() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    assert_eq!(natctl.firewall_rules()?, []);
    let before = natctl.stats()?;

    let guest_icmp = IcmpSniffer::open_in(&topo.guest)?;
    let client_icmp = IcmpSniffer::open_in(&topo.client)?;
    dropped(&natctl, Way::In, "an echo request to P", || {
        client_icmp.send_echo(PUBLIC_ADDR, 1, 56)
    })?;
    udp_dropped(
        &natctl,
        Way::In,
        (&topo.client, at(PUBLIC_ADDR, 7000)),
        (&topo.guest, at(GUEST_ADDR, 7000)),
    )?;
    // Last: its SYN retransmissions would be counted as drops too.
    let listener = tcp_listen(&topo.guest, at(GUEST_ADDR, 8080))?;
    let attempt = dropped(&natctl, Way::In, "a SYN to P:8080", || {
        TcpAttempt::start(&topo.client, None, at(PUBLIC_ADDR, 8080))
    })?;

    assert!(!attempt.is_connected()?, "the TCP connection was made");
    assert_no_connection(&listener)?;
    let requests = guest_icmp.pending(|s| s.icmp_type == ICMP_ECHO_REQUEST);
    assert_eq!(requests, [], "echo requests reached the guest");
    let replies = client_icmp.pending(|s| s.icmp_type == ICMP_ECHO_REPLY);
    assert_eq!(replies, [], "echo replies reached the client");
    let after = natctl.stats()?;
    let (m0, m) = (of_p(&before)?, of_p(&after)?);
    assert!(
        m.inbound_denied >= m0.inbound_denied + 3,
        "before {m0:?}, after {m:?}"
    );
    assert_eq!(m.inbound_packets, m0.inbound_packets, "forwarded inbound");
    assert_eq!(
        reason(&after, "inbound_forwarded")?,
        reason(&before, "inbound_forwarded")?
    );

    // The drops were the firewall's: allowing them lets the same traffic through.
    natctl.firewall_add(PUBLIC_ADDR, &["--proto", "icmp", "--icmp-type", "8"])?;
    let p = ping(&topo.client, PUBLIC_ADDR, 1, 56)?;
    assert_eq!((p.transmitted, p.received), (1, 1), "{}", p.output);
    natctl.firewall_add(PUBLIC_ADDR, &["--proto", "tcp", "--ports", "8080"])?;
    // A fresh connection: the dropped one's next SYN retransmission may be seconds away.
    drop(attempt);
    let _conn = TcpAttempt::start(&topo.client, None, at(PUBLIC_ADDR, 8080))?.connected()?;
    let (_, peer) = accept(&listener)?;
    assert_eq!(peer.ip(), CLIENT_ADDR);
    Ok(())
}

/// `--proto tcp --ports 8000-8010 --cidr 198.51.100.0/24` opens TCP to 8000 and 8010 from the
/// client, and nothing else: not 7999 or 8011, not UDP to 8005, not ping, not TCP to 8005 from
/// an address outside the CIDR (until a rule allows that one too).
#[test]
fn one_rule_opens_exactly_its_protocol_ports_and_sources() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    topo.add_client_address(OTHER_CLIENT)?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let id = natctl.firewall_add(
        PUBLIC_ADDR,
        &[
            "--proto",
            "tcp",
            "--ports",
            "8000-8010",
            "--cidr",
            "198.51.100.0/24",
        ],
    )?;
    let rules = natctl.firewall_rules()?;
    assert_eq!(rules.len(), 1, "{rules:?}");
    let r = &rules[0];
    assert_eq!(
        (r.id, r.public, r.service.proto),
        (id, PUBLIC_ADDR, Proto::Tcp)
    );
    assert_eq!(
        r.service.ports,
        Some(PortRange {
            first: 8000,
            last: 8010
        })
    );
    assert_eq!(r.cidrs, ["198.51.100.0/24".parse()?]);

    for port in [8000, 8010] {
        let tcp = tcp_exchange(
            &topo.guest,
            at(GUEST_ADDR, port),
            &topo.client,
            at(PUBLIC_ADDR, port),
            4096,
        )?;
        assert_eq!(tcp.server_peer.ip(), CLIENT_ADDR, "{tcp:?}");
        assert_eq!((tcp.server_received, tcp.client_confirmed), (4096, 4096));
    }
    for port in [7999, 8011] {
        // Dropped right away: a closed socket sends no retransmissions to confuse the counts.
        drop(tcp_dropped(&topo, &natctl, None, port)?);
    }
    udp_dropped(
        &natctl,
        Way::In,
        (&topo.client, at(PUBLIC_ADDR, 8005)),
        (&topo.guest, at(GUEST_ADDR, 8005)),
    )?;
    let guest_icmp = IcmpSniffer::open_in(&topo.guest)?;
    let client_icmp = IcmpSniffer::open_in(&topo.client)?;
    dropped(&natctl, Way::In, "an echo request to P", || {
        client_icmp.send_echo(PUBLIC_ADDR, 1, 56)
    })?;
    assert_eq!(guest_icmp.pending(|s| s.icmp_type == ICMP_ECHO_REQUEST), []);

    let listener = tcp_listen(&topo.guest, at(GUEST_ADDR, 8005))?;
    let what = "a SYN from 192.0.2.2 to P:8005";
    let outsider = dropped(&natctl, Way::In, what, || {
        TcpAttempt::start(&topo.client, Some(OTHER_CLIENT), at(PUBLIC_ADDR, 8005))
    })?;
    assert!(!outsider.is_connected()?, "{what}: connected");
    assert_no_connection(&listener)?;
    // From the client's own address, the same port is open.
    let _inside = TcpAttempt::start(&topo.client, None, at(PUBLIC_ADDR, 8005))?.connected()?;
    let (_, peer) = accept(&listener)?;
    assert_eq!(peer.ip(), CLIENT_ADDR);

    // The outsider was refused by source only: a rule for its CIDR lets it in (a fresh
    // connection: the dropped one's next SYN retransmission may be seconds away).
    natctl.firewall_add(
        PUBLIC_ADDR,
        &[
            "--proto",
            "tcp",
            "--ports",
            "8005",
            "--cidr",
            "192.0.2.0/24",
        ],
    )?;
    drop(outsider);
    let _conn =
        TcpAttempt::start(&topo.client, Some(OTHER_CLIENT), at(PUBLIC_ADDR, 8005))?.connected()?;
    let (_, peer) = accept(&listener)?;
    assert_eq!(peer.ip(), OTHER_CLIENT);
    Ok(())
}

/// Deleting the rule that admitted a TCP connection leaves the connection working both ways;
/// a new connection to the same port is dropped.
#[test]
fn a_connection_outlives_the_rule_that_admitted_it() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let id = natctl.firewall_add(PUBLIC_ADDR, &["--proto", "tcp", "--ports", "9000"])?;
    let listener = tcp_listen(&topo.guest, at(GUEST_ADDR, 9000))?;
    let mut client = TcpAttempt::start(&topo.client, None, at(PUBLIC_ADDR, 9000))?.connected()?;
    let (mut server, peer) = accept(&listener)?;
    assert_eq!(peer.ip(), CLIENT_ADDR);
    client.write_all(b"before del")?;
    expect_bytes(&mut server, b"before del")?;

    let out = natctl.ok(&["firewall", "del", &id.to_string()])?;
    assert!(out.contains(&format!("ingress rule {id} removed")), "{out}");
    assert_eq!(natctl.firewall_rules()?, []);

    client.write_all(b"after del")?;
    expect_bytes(&mut server, b"after del")?;
    server.write_all(b"answer after del")?;
    expect_bytes(&mut client, b"answer after del")?;

    let what = "a new SYN to P:9000";
    let second = dropped(&natctl, Way::In, what, || {
        TcpAttempt::start(&topo.client, None, at(PUBLIC_ADDR, 9000))
    })?;
    assert!(!second.is_connected()?, "{what}: connected");
    assert_no_connection(&listener)?;
    drop(second);

    client.write_all(b"still there")?;
    expect_bytes(&mut server, b"still there")?;
    Ok(())
}

/// With no ingress rule at all, what the guest opens gets its answers: ping, UDP and TCP to
/// the client, each tracked as opened by the guest, and the ICMP error about a datagram to a
/// closed port (RELATED); an unsolicited datagram to P is still dropped.
#[test]
fn guest_initiated_traffic_gets_its_replies_without_inbound_rules() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let before = natctl.stats()?;

    let p = ping(&topo.guest, CLIENT_ADDR, 3, 56)?;
    assert_eq!((p.transmitted, p.received), (3, 3), "{}", p.output);
    assert_eq!(p.reply_from, [CLIENT_ADDR; 3], "{}", p.output);
    let udp = udp_exchange(
        &topo.client,
        at(CLIENT_ADDR, 7000),
        &topo.guest,
        at(CLIENT_ADDR, 7000),
        512,
    )?;
    assert_eq!(udp.server_saw.ip(), PUBLIC_ADDR, "{udp:?}");
    assert_eq!(udp.client_saw, at(CLIENT_ADDR, 7000).into(), "{udp:?}");
    let tcp = tcp_exchange(
        &topo.client,
        at(CLIENT_ADDR, 8080),
        &topo.guest,
        at(CLIENT_ADDR, 8080),
        64 * 1024,
    )?;
    assert_eq!(tcp.server_peer.ip(), PUBLIC_ADDR, "{tcp:?}");
    assert_eq!(
        (tcp.server_received, tcp.client_confirmed),
        (64 * 1024, 64 * 1024)
    );

    let after = natctl.stats()?;
    let (m0, m) = (of_p(&before)?, of_p(&after)?);
    assert_eq!(m.inbound_denied, m0.inbound_denied, "answers were dropped");
    // Every answer the guest got (3 echo replies, the datagram, the TCP segments) came back
    // through the fast path, and so did what the client got (an echo request for each reply,
    // the datagram, the TCP segments).
    let at_guest = u64::from(p.received) + 1 + tcp.client_segs_in;
    let at_client = u64::from(p.received) + 1 + tcp.server_segs_in;
    fastpath::carried(
        &before,
        &after,
        &[
            Arrived::new("inbound_forwarded", at_guest, "answers at the guest"),
            Arrived::new("outbound_forwarded", at_client, "packets at the client"),
        ],
    )?;
    assert!(
        m.inbound_packets - m0.inbound_packets >= at_guest,
        "P's mapping counted fewer than the {at_guest} answers that arrived: before {m0:?}, \
         after {m:?}"
    );
    let flows = natctl.flows()?.flows;
    for (proto, port) in [(1, None), (17, Some(7000)), (6, Some(8080))] {
        let f = the_flow(&flows, &format!("the flow of protocol {proto}"), |f| {
            f.proto == proto && port.is_none_or(|p| f.remote_port == p)
        });
        assert_eq!((f.guest, f.remote), (GUEST_ADDR, CLIENT_ADDR), "{f:?}");
        assert_eq!(f.origin, "guest", "{f:?}");
    }

    // RELATED: the client's "port unreachable" about a guest's datagram reaches the guest.
    let refused = udp_bind(&topo.guest, at(GUEST_ADDR, 0))?;
    refused.connect(at(CLIENT_ADDR, 7009))?;
    refused.send(b"nobody listens")?;
    refused.set_read_timeout(Some(ARRIVAL))?;
    let e = refused
        .recv(&mut [0u8; 64])
        .expect_err("an answer from a port nobody listens on");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");

    udp_dropped(
        &natctl,
        Way::In,
        (&topo.client, at(PUBLIC_ADDR, 7001)),
        (&topo.guest, at(GUEST_ADDR, 7001)),
    )?;
    Ok(())
}

/// A 4000-byte datagram crosses the router in three fragments, which XDP passes to the kernel
/// (reason `fragment`); there nftables' forward chain applies the same rules after reassembly:
/// to a port no rule opens it is reassembled but not forwarded, to an open one it arrives whole,
/// and so does the fragmented answer.
#[test]
fn fragmented_datagrams_meet_the_same_rules_in_the_slow_path() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    natctl.firewall_add(PUBLIC_ADDR, &["--proto", "udp", "--ports", "7000"])?;
    let open = udp_bind(&topo.guest, at(GUEST_ADDR, 7000))?;
    let closed = udp_bind(&topo.guest, at(GUEST_ADDR, 7001))?;
    let before = natctl.stats()?;
    let router0 = topo.router.ip_counter("ReasmOKs")?;
    let guest0 = topo.guest.ip_counter("ReasmOKs")?;

    let data = payload(4000);
    udp_send(&topo.client, None, at(PUBLIC_ADDR, 7001), &data)?;
    // Sent after the first on the same link: once it arrived, the first was handled.
    let sender = udp_send(&topo.client, None, at(PUBLIC_ADDR, 7000), &data)?;
    let (got, from) = udp_receive(&open)?;
    assert_eq!((got.len(), from.ip()), (4000, CLIENT_ADDR.into()));
    assert!(got == data, "the datagram arrived changed");
    assert_no_datagram(&closed)?;
    // The router reassembled both (and forwarded the open one in fragments again); the guest
    // reassembled only that one.
    let router = topo.router.ip_counter("ReasmOKs")? - router0;
    let guest = topo.guest.ip_counter("ReasmOKs")? - guest0;
    assert_eq!(
        (router, guest),
        (2, 1),
        "datagrams reassembled by the router and by the guest"
    );

    open.send_to(&got, from)?;
    let (answer, answer_from) = udp_receive(&sender)?;
    assert_eq!(answer_from, at(PUBLIC_ADDR, 7000).into());
    assert!(answer == data, "the answer arrived changed");

    let after = natctl.stats()?;
    // Three fragments per datagram: two datagrams in, one answer out.
    let fragments = reason(&after, "fragment")? - reason(&before, "fragment")?;
    assert!(fragments >= 9, "fragment grew by {fragments}");
    // Not a packet of them was the fast path's to drop or forward.
    for name in ["inbound_denied", "inbound_forwarded", "outbound_forwarded"] {
        assert_eq!(reason(&after, name)?, reason(&before, name)?, "{name}");
    }
    Ok(())
}

/// An egress exception under default allow blocks exactly its destination and port; under
/// default deny the guest reaches nothing until an allow exception opens exactly that.
#[test]
fn egress_rules_are_exceptions_to_the_default() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let dns = natctl.egress_add(&[
        "--proto",
        "udp",
        "--ports",
        "53",
        "--cidr",
        "198.51.100.2/32",
    ])?;
    let policy = natctl.egress()?;
    assert!(policy.default_allow, "{policy:?}");
    assert_eq!(policy.rules.len(), 1, "{policy:?}");
    let r = &policy.rules[0];
    assert_eq!((r.id, r.service.proto), (dns, Proto::Udp), "{r:?}");
    assert_eq!(
        r.service.ports,
        Some(PortRange {
            first: 53,
            last: 53
        })
    );
    assert_eq!(r.cidrs, ["198.51.100.2/32".parse()?]);

    udp_dropped(
        &natctl,
        Way::Out,
        (&topo.guest, at(CLIENT_ADDR, 53)),
        (&topo.client, at(CLIENT_ADDR, 53)),
    )?;
    let udp = udp_exchange(
        &topo.client,
        at(CLIENT_ADDR, 54),
        &topo.guest,
        at(CLIENT_ADDR, 54),
        64,
    )?;
    assert_eq!(udp.server_saw.ip(), PUBLIC_ADDR, "{udp:?}");

    // Default deny: the exception would now allow DNS, so it goes first.
    natctl.ok(&["egress", "del", &dns.to_string()])?;
    let out = natctl.ok(&["egress", "policy", "deny"])?;
    assert!(out.contains("egress default policy: deny"), "{out}");
    let client_icmp = IcmpSniffer::open_in(&topo.client)?;
    let guest_icmp = IcmpSniffer::open_in(&topo.guest)?;
    dropped(&natctl, Way::Out, "the guest's echo request", || {
        guest_icmp.send_echo(CLIENT_ADDR, 1, 56)
    })?;
    assert_eq!(
        client_icmp.pending(|s| s.icmp_type == ICMP_ECHO_REQUEST),
        []
    );

    let icmp = natctl.egress_add(&["--proto", "icmp", "--cidr", "198.51.100.2/32"])?;
    let p = ping(&topo.guest, CLIENT_ADDR, 2, 56)?;
    assert_eq!((p.transmitted, p.received), (2, 2), "{}", p.output);
    let requests = client_icmp.collect(2, |s| s.icmp_type == ICMP_ECHO_REQUEST);
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert!(
        requests.iter().all(|r| r.src == PUBLIC_ADDR),
        "{requests:?}"
    );
    // Exactly it: UDP, even to the port that worked before, stays denied.
    udp_dropped(
        &natctl,
        Way::Out,
        (&topo.guest, at(CLIENT_ADDR, 54)),
        (&topo.client, at(CLIENT_ADDR, 54)),
    )?;
    let policy = natctl.egress()?;
    assert!(!policy.default_allow, "{policy:?}");
    let ids: Vec<u64> = policy.rules.iter().map(|r| r.id).collect();
    assert_eq!(ids, [icmp]);
    Ok(())
}

/// `natctl conntrack list --json` shows each flow with its state and who opened it; `conntrack
/// flush` empties the table, after which an established connection whose rule is gone is cut.
#[test]
fn conntrack_lists_flows_and_flush_cuts_connections_without_a_rule() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let id = natctl.firewall_add(PUBLIC_ADDR, &["--proto", "tcp", "--ports", "9100"])?;
    let listener = tcp_listen(&topo.guest, at(GUEST_ADDR, 9100))?;
    let mut client = TcpAttempt::start(&topo.client, None, at(PUBLIC_ADDR, 9100))?.connected()?;
    let (mut server, peer) = accept(&listener)?;
    client.write_all(b"ping")?;
    expect_bytes(&mut server, b"ping")?;
    server.write_all(b"pong")?;
    expect_bytes(&mut client, b"pong")?;
    natctl.ok(&["firewall", "del", &id.to_string()])?;
    let p = ping(&topo.guest, CLIENT_ADDR, 1, 56)?;
    assert_eq!(p.received, 1, "{}", p.output);
    udp_exchange(
        &topo.client,
        at(CLIENT_ADDR, 7000),
        &topo.guest,
        at(CLIENT_ADDR, 7000),
        64,
    )?;

    let table = natctl.flows()?;
    assert!(table.capacity > 0, "{table:?}");
    let flows = table.flows;
    assert_eq!(flows.len(), 3, "{flows:#?}");
    let tcp = the_flow(&flows, "the TCP flow", |f| f.proto == 6);
    assert_eq!(
        (tcp.guest, tcp.guest_port, tcp.remote, tcp.remote_port),
        (GUEST_ADDR, 9100, CLIENT_ADDR, peer.port()),
        "{tcp:?}"
    );
    assert_eq!(
        (tcp.state.as_str(), tcp.origin.as_str()),
        ("tcp_established", "public")
    );
    assert!(tcp.expires_in_secs > 3600, "{tcp:?}");
    let udp = the_flow(&flows, "the UDP flow", |f| f.proto == 17);
    assert_eq!(
        (udp.remote, udp.remote_port),
        (CLIENT_ADDR, 7000),
        "{udp:?}"
    );
    assert_eq!(
        (udp.state.as_str(), udp.origin.as_str()),
        ("udp_replied", "guest")
    );
    let icmp = the_flow(&flows, "the ICMP flow", |f| f.proto == 1);
    assert_eq!(
        (icmp.state.as_str(), icmp.origin.as_str()),
        ("icmp", "guest")
    );
    let stats = natctl.stats()?;
    assert_eq!(stats.conntrack.entries, 3, "{:?}", stats.conntrack);

    let out = natctl.ok(&["conntrack", "flush"])?;
    assert!(out.contains("3 flows flushed"), "{out}");
    assert_eq!(natctl.flows()?.flows, []);
    let stats = natctl.stats()?;
    assert_eq!(stats.conntrack.entries, 0, "{:?}", stats.conntrack);
    assert!(stats.conntrack.flushed >= 3, "{:?}", stats.conntrack);

    // The connection's next segment finds neither a flow nor a rule.
    dropped(
        &natctl,
        Way::In,
        "a segment of the flushed connection",
        || Ok(client.write_all(b"after flush")?),
    )?;
    assert_nothing_to_read(&mut server)?;
    assert_eq!(natctl.flows()?.flows, [], "the drop created a flow");
    Ok(())
}

/// Each refused rule command exits 1 naming the problem and changes nothing: not the
/// rule lists, not nftables, not the generation.
#[test]
fn refused_rule_commands_change_nothing() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let existing = natctl.firewall_add(PUBLIC_ADDR, &["--proto", "tcp", "--ports", "22"])?;
    let state = || -> anyhow::Result<_> {
        Ok((
            natctl.firewall_rules()?,
            natctl.egress()?,
            topo.nft_table()?
                .context("natd's nftables table is missing")?,
            natctl.stats()?.generation,
        ))
    };
    let before = state()?;
    assert_eq!(before.0.len(), 1);

    let p = "203.0.113.10";
    let add = |rest: &[&'static str]| -> Vec<&'static str> {
        ["firewall", "add", p].iter().chain(rest).copied().collect()
    };
    let duplicate = format!("rule {existing} already allows tcp ports 22 to {p} from 0.0.0.0/0");
    let unknown_egress = format!("no egress rule has id {existing}");
    let existing_arg = existing.to_string();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            add(&["--proto", "tcp", "--ports", "0"]),
            vec!["port 0 is outside 1-65535"],
        ),
        (
            add(&["--proto", "udp", "--ports", "70000"]),
            vec!["port 70000 is outside 1-65535"],
        ),
        (
            add(&["--proto", "tcp", "--ports", "20-10"]),
            vec!["port range 20-10 starts after it ends"],
        ),
        (
            add(&["--proto", "icmp", "--ports", "22"]),
            vec!["ports apply to tcp and udp only, not icmp"],
        ),
        (
            add(&["--proto", "tcp", "--icmp-type", "8"]),
            vec!["icmp type and code apply to icmp only, not tcp"],
        ),
        (
            add(&["--proto", "icmp", "--icmp-type", "256"]),
            vec!["icmp type 256 is outside 0-255"],
        ),
        (
            add(&["--proto", "icmp", "--icmp-code", "0"]),
            vec!["an icmp code needs an icmp type"],
        ),
        (
            add(&["--proto", "all"]),
            vec!["protocol all is for egress rules only"],
        ),
        (
            add(&["--proto", "tcp", "--cidr", "198.51.100.0/33"]),
            vec!["\"198.51.100.0/33\" is not an IPv4 CIDR"],
        ),
        (
            add(&["--proto", "tcp", "--cidr", "198.51.100/24"]),
            vec!["\"198.51.100/24\" is not an IPv4 CIDR"],
        ),
        (
            vec!["firewall", "add", "224.0.0.99", "--proto", "tcp"],
            vec!["public IP 224.0.0.99 is not a unicast IPv4 address (multicast)"],
        ),
        (add(&["--proto", "tcp", "--ports", "22"]), vec![&duplicate]),
        (
            add(&["--proto", "tcp", "--ports", "22", "--cidr", "0.0.0.0/0"]),
            vec![&duplicate],
        ),
        (
            vec!["firewall", "del", "999"],
            vec!["no ingress rule has id 999"],
        ),
        (vec!["egress", "del", &existing_arg], vec![&unknown_egress]),
        (
            vec!["egress", "add", "--proto", "icmp", "--ports", "1"],
            vec!["ports apply to tcp and udp only, not icmp"],
        ),
    ];
    for (args, expected) in &cases {
        let out = natctl.run(args)?;
        let what = format!("natctl {}", args.join(" "));
        assert!(!out.status.success(), "`{what}` succeeded: {}", out.stdout);
        // Refused (bad input or a conflict, by natd or by natctl's own parsing): status 1.
        assert_eq!(out.status.code(), Some(1), "`{what}`: {}", out.stderr);
        for text in expected {
            assert!(
                out.stderr.contains(text),
                "`{what}`: stderr lacks {text:?}: {}",
                out.stderr
            );
        }
        assert_eq!(state()?, before, "after `{what}`");
    }

    // And the rule still opens its port, and only it.
    let tcp = tcp_exchange(
        &topo.guest,
        at(GUEST_ADDR, 22),
        &topo.client,
        at(PUBLIC_ADDR, 22),
        64,
    )?;
    assert_eq!(tcp.server_peer.ip(), CLIENT_ADDR);
    drop(tcp_dropped(&topo, &natctl, None, 23)?);
    Ok(())
}

/// Deleting a mapping leaves its rules (those from the config file too), inactive: listed as
/// such, out of nftables and the fast path; mapped again, its public IP is open to exactly
/// them again. (As CloudStack's router, whose firewall databag does not follow its static NAT
/// one; the rules used to be deleted with the mapping, and CloudStack does not send them again
/// when it grants the static NAT again.)
#[test]
fn deleting_a_mapping_keeps_its_rules_inactive() -> anyhow::Result<()> {
    let config = format!(
        "{ONE_MAPPING}\
         [[mapping]]\npublic = \"203.0.113.11\"\nprivate = \"10.0.0.11\"\n\
         [[rule]]\npublic = \"203.0.113.10\"\nproto = \"tcp\"\nports = \"22\"\n\
         [[rule]]\npublic = \"203.0.113.11\"\nproto = \"icmp\"\n"
    );
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(&config))?;
    let natctl = natd.natctl()?;
    let udp = natctl.firewall_add(PUBLIC_ADDR, &["--proto", "udp"])?;
    let rules = natctl.firewall_rules()?;
    assert_eq!(rules.len(), 3, "{rules:?}");
    let (of_p, others): (Vec<_>, Vec<_>) = rules.into_iter().partition(|r| r.public == PUBLIC_ADDR);
    assert_eq!(of_p.len(), 2, "{of_p:?}");
    assert!(of_p.iter().any(|r| r.id == udp), "{of_p:?}");
    let nft = topo.nft_table()?.context("no nftables table")?;
    for r in of_p.iter().chain(&others) {
        assert!(
            nft.contains(&format!("rule {}\"", r.id)),
            "rule {} not in {nft}",
            r.id
        );
    }

    natctl.ok(&["mapping", "del", "203.0.113.10"])?;
    let all: Vec<_> = of_p.iter().chain(&others).cloned().collect();
    let mut listed = natctl.firewall_rules()?;
    listed.sort_by_key(|r| (r.public, r.id));
    assert_eq!(listed, all);
    let (active, mut inactive) = natctl.firewall_states()?;
    inactive.sort();
    assert_eq!(active, others.iter().map(|r| r.id).collect::<Vec<_>>());
    assert_eq!(inactive, of_p.iter().map(|r| r.id).collect::<Vec<_>>());
    let nft = topo.nft_table()?.context("no nftables table")?;
    for r in &of_p {
        assert!(
            !nft.contains(&format!("rule {}\"", r.id)),
            "rule {} left in {nft}",
            r.id
        );
    }
    for r in &others {
        assert!(
            nft.contains(&format!("rule {}\"", r.id)),
            "rule {} gone from {nft}",
            r.id
        );
    }

    natctl.ok(&["mapping", "add", "203.0.113.10", "10.0.0.10"])?;
    let (_, inactive) = natctl.firewall_states()?;
    assert!(inactive.is_empty(), "still inactive: {inactive:?}");
    let nft = topo.nft_table()?.context("no nftables table")?;
    for r in of_p.iter().chain(&others) {
        assert!(
            nft.contains(&format!("rule {}\"", r.id)),
            "rule {} not back in {nft}",
            r.id
        );
    }
    let tcp = tcp_exchange(
        &topo.guest,
        at(GUEST_ADDR, 22),
        &topo.client,
        at(PUBLIC_ADDR, 22),
        64,
    )?;
    assert_eq!(tcp.server_peer.ip(), CLIENT_ADDR);
    let udp = udp_exchange(
        &topo.guest,
        at(GUEST_ADDR, 7000),
        &topo.client,
        at(PUBLIC_ADDR, 7000),
        64,
    )?;
    assert_eq!(udp.client_saw.ip(), PUBLIC_ADDR);
    // Still closed to what no rule allows.
    drop(tcp_dropped(&topo, &natctl, None, 23)?);
    Ok(())
}

/// A guest's UDP flow whose answer comes back fragmented: the small request took the fast
/// path (XDP tracks the flow), the 4000-byte answer takes the slow path, where it must count as
/// a reply of that flow, not as a new inbound flow no rule allows (the tc marker marks it as
/// the fast path's, and natd's table accepts what is marked).
#[test]
fn a_fragmented_answer_to_a_fast_path_flow_arrives() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let server = udp_bind(&topo.client, at(CLIENT_ADDR, 7000))?;
    let guest = udp_send(&topo.guest, None, at(CLIENT_ADDR, 7000), b"small request")?;
    let (_, from) = udp_receive(&server)?;
    assert_eq!(from.ip(), PUBLIC_ADDR);
    let flows = natctl.flows()?.flows;
    let f = the_flow(&flows, "the guest's UDP flow", |f| f.proto == 17);
    assert_eq!(
        (f.state.as_str(), f.origin.as_str()),
        ("udp_unreplied", "guest")
    );

    server.send_to(&payload(4000), from)?;
    let (answer, answer_from) = udp_receive(&guest)?;
    assert_eq!(answer_from, at(CLIENT_ADDR, 7000).into());
    assert!(answer == payload(4000), "the answer arrived changed");
    Ok(())
}

/// The other way round: the guest's first datagram is fragmented (the kernel tracks the flow),
/// the small answer takes the fast path, where it must count as a reply of that flow.
#[test]
fn a_fast_path_answer_to_a_slow_path_flow_arrives() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let server = udp_bind(&topo.client, at(CLIENT_ADDR, 7000))?;
    let guest = udp_send(&topo.guest, None, at(CLIENT_ADDR, 7000), &payload(4000))?;
    let (got, from) = udp_receive(&server)?;
    assert_eq!((got.len(), from.ip()), (4000, PUBLIC_ADDR.into()));

    let before = of_p(&natctl.stats()?)?;
    server.send_to(b"small answer", from)?;
    let received = udp_receive(&guest);
    let after = of_p(&natctl.stats()?)?;
    assert_eq!(
        after.inbound_denied, before.inbound_denied,
        "XDP dropped the answer"
    );
    let (answer, answer_from) = received?;
    assert_eq!(answer_from, at(CLIENT_ADDR, 7000).into());
    assert_eq!(answer, b"small answer");
    Ok(())
}

/// `conntrack flush` forgets the flows the slow path tracks too: after the rule that admitted
/// a fragmented flow is gone and the table is flushed, the flow's next fragmented datagram is
/// dropped like any packet no rule allows.
#[test]
fn conntrack_flush_forgets_the_flows_of_the_slow_path() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let id = natctl.firewall_add(PUBLIC_ADDR, &["--proto", "udp", "--ports", "7000"])?;
    natctl.firewall_add(PUBLIC_ADDR, &["--proto", "udp", "--ports", "7001"])?;
    let flushed = udp_bind(&topo.guest, at(GUEST_ADDR, 7000))?;
    let marked = udp_bind(&topo.guest, at(GUEST_ADDR, 7001))?;
    let data = payload(4000);
    let client = udp_send(&topo.client, None, at(PUBLIC_ADDR, 7000), &data)?;
    let (_, from) = udp_receive(&flushed)?;
    flushed.send_to(&data, from)?;
    udp_receive(&client)?;

    natctl.ok(&["firewall", "del", &id.to_string()])?;
    natctl.ok(&["conntrack", "flush"])?;
    let guest0 = topo.guest.ip_counter("ReasmOKs")?;
    client.send_to(&data, at(PUBLIC_ADDR, 7000))?;
    // A fragmented datagram the rule of 7001 admits, sent after it on the same path.
    udp_send(&topo.client, None, at(PUBLIC_ADDR, 7001), &data)?;
    udp_receive(&marked)?;
    let kernel = topo.router.exec("conntrack", &["-L", "-p", "udp"])?;
    assert_no_datagram(&flushed).with_context(|| format!("the router's conntrack: {kernel}"))?;
    assert_eq!(topo.guest.ip_counter("ReasmOKs")? - guest0, 1);
    Ok(())
}
