//! End to end, hairpin NAT: a guest sending to a mapped public IP P reaches P's guest through
//! the router, CloudStack-style, with the source rewritten to the router's own address on the
//! guest side (so the answer comes back through the router, which turns it into an answer from
//! P). The ingress firewall of P applies as it does to traffic from the internet.
//!
//! ```text
//! client ── pub0  router  gst0 10.0.0.1 ── guest  10.0.0.10 (P 203.0.113.10)
//!                         gst1 10.0.1.1 ── guest2 10.0.1.10 (P2 203.0.113.11)
//! ```
//!
//! Same ground rules as `e2e.rs`: each test has its own namespaces and natd, removed when it
//! ends; every check is on something observed (the peer address a socket saw, ICMP packets a
//! namespace received, natd's counters).
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Context as _;
use nat_tests::topology::{
    GUEST_ADDR, Natd, NatdOptions, Netns, PUBLIC_ADDR, ROUTER_GUEST_ADDR, ROUTER_GUEST_IF,
    ROUTER_PUBLIC_IF, Topology,
    attempt::{TcpAttempt, assert_no_connection, assert_no_datagram, tcp_listen, udp_send},
    fastpath::{self, Arrived},
    links::{GUEST2_ADDR, GUEST2_LINK, ROUTER_GUEST2_IF},
    observe::{
        ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IcmpSniffer, ping, tcp_exchange, udp_bind, udp_exchange,
    },
    policy::{Way, reason},
};
use nat_userspace::api::StatsReport;

/// The second guest's own public address.
const PUBLIC2_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);

/// P -> V and P2 -> V2; P open to TCP, UDP and ICMP from anywhere.
const TWO_MAPPINGS_P_OPEN: &str = "\
    [[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n\
    [[mapping]]\npublic = \"203.0.113.11\"\nprivate = \"10.0.1.10\"\n\
    [[rule]]\npublic = \"203.0.113.10\"\nproto = \"tcp\"\n\
    [[rule]]\npublic = \"203.0.113.10\"\nproto = \"udp\"\n\
    [[rule]]\npublic = \"203.0.113.10\"\nproto = \"icmp\"\n";
/// P -> V only, open to TCP, UDP and ICMP from anywhere.
const ONE_MAPPING_OPEN: &str = "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n\
                                [[rule]]\npublic = \"203.0.113.10\"\nproto = \"tcp\"\n\
                                [[rule]]\npublic = \"203.0.113.10\"\nproto = \"udp\"\n\
                                [[rule]]\npublic = \"203.0.113.10\"\nproto = \"icmp\"\n";
/// P -> V and no rules: P is closed.
const ONE_MAPPING: &str = "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n";

fn at(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

/// The standard topology plus a second guest on gst1, and natd serving both guest interfaces.
struct TwoGuests {
    // Field order is drop order: natd stops before the namespaces go.
    natd: Natd,
    guest2: Netns,
    topo: Topology,
}

impl TwoGuests {
    fn new(config: &str) -> anyhow::Result<Self> {
        let topo = Topology::new()?;
        let guest2 = topo.add_guest("guest2", GUEST2_LINK)?;
        let natd = Natd::start_with(
            &topo,
            &NatdOptions {
                public_ifaces: vec![ROUTER_PUBLIC_IF.into()],
                guest_ifaces: vec![ROUTER_GUEST_IF.into(), ROUTER_GUEST2_IF.into()],
                config: Some(config.into()),
                ..NatdOptions::default()
            },
        )?;
        Ok(Self { natd, guest2, topo })
    }
}

/// Packets counted under verdict reason `name`.
fn count(stats: &StatsReport, name: &str) -> u64 {
    reason(stats, name).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Ping, UDP and TCP from `from` to P all reach the guest from the router's guest-side address
/// 10.0.0.1, never from the sender's own address, and every answer comes back from P.
fn hairpin_reaches_the_guest(topo: &Topology, natd: &Natd, from: &Netns) -> anyhow::Result<()> {
    let natctl = natd.natctl()?;
    let before = natctl.stats()?;

    let guest_icmp = IcmpSniffer::open_in(&topo.guest)?;
    let p = ping(from, PUBLIC_ADDR, 3, 56)?;
    assert_eq!((p.transmitted, p.received), (3, 3), "{}", p.output);
    assert_eq!(p.reply_from, [PUBLIC_ADDR; 3], "{}", p.output);
    let requests = guest_icmp.collect(3, |s| s.icmp_type == ICMP_ECHO_REQUEST);
    assert_eq!(
        requests.len(),
        3,
        "echo requests the guest received: {requests:?}"
    );
    for r in &requests {
        assert_eq!((r.src, r.dst), (ROUTER_GUEST_ADDR, GUEST_ADDR), "{r:?}");
    }

    let udp = udp_exchange(
        &topo.guest,
        at(GUEST_ADDR, 7000),
        from,
        at(PUBLIC_ADDR, 7000),
        512,
    )?;
    assert_eq!(udp.server_saw.ip(), ROUTER_GUEST_ADDR, "{udp:?}");
    assert_eq!(udp.server_len, 512);
    assert_eq!(udp.client_saw, at(PUBLIC_ADDR, 7000).into(), "{udp:?}");

    let tcp = tcp_exchange(
        &topo.guest,
        at(GUEST_ADDR, 8080),
        from,
        at(PUBLIC_ADDR, 8080),
        256 * 1024,
    )?;
    assert_eq!(tcp.server_peer.ip(), ROUTER_GUEST_ADDR, "{tcp:?}");
    assert_eq!(tcp.server_local, at(GUEST_ADDR, 8080).into(), "{tcp:?}");
    assert_eq!(
        (tcp.server_received, tcp.client_confirmed),
        (256 * 1024, 256 * 1024)
    );

    // Everything that arrived, both ways, came through the fast path: what the guest got
    // (echo requests, the datagram, the TCP segments) on the way to P's guest, what the sender
    // got (echo replies, the answer, TCP segments) on the way back.
    let after = natctl.stats()?;
    let to_guest = requests.len() as u64 + 1 + tcp.server_segs_in;
    let to_sender = u64::from(p.received) + 1 + tcp.client_segs_in;
    fastpath::carried(
        &before,
        &after,
        &[
            Arrived::new("hairpin_forwarded", to_guest, "packets at the guest"),
            Arrived::new("hairpin_forwarded", to_sender, "answers at the sender"),
        ],
    )?;
    let (m0, m) = (
        natctl_counters(&before, PUBLIC_ADDR)?,
        natctl_counters(&after, PUBLIC_ADDR)?,
    );
    assert!(
        m.inbound_packets - m0.inbound_packets >= to_guest
            && m.outbound_packets - m0.outbound_packets >= to_sender,
        "the mapping of P counted fewer than the {to_guest} packets to the guest and \
         {to_sender} back that arrived: before {m0:?}, after {m:?}"
    );
    Ok(())
}

fn natctl_counters(
    stats: &StatsReport,
    public: Ipv4Addr,
) -> anyhow::Result<nat_userspace::ebpf::MappingCounters> {
    stats
        .mappings
        .iter()
        .find(|m| m.public == public)
        .map(|m| m.counters)
        .with_context(|| format!("no mapping of {public} in {:?}", stats.mappings))
}

/// A second guest, with a public IP of its own, sends to the first guest's P: the first guest
/// sees the router's guest-side address as the source (not V2, not P2), and the second guest
/// gets every answer from P, never from V.
#[test]
fn a_second_guest_reaches_the_first_through_its_public_ip() -> anyhow::Result<()> {
    let t = TwoGuests::new(TWO_MAPPINGS_P_OPEN)?;
    let guest2_icmp = IcmpSniffer::open_in(&t.guest2)?;
    hairpin_reaches_the_guest(&t.topo, &t.natd, &t.guest2)?;
    // What came back to the second guest came from P (V and R stay hidden).
    let replies = guest2_icmp.pending(|s| s.icmp_type == ICMP_ECHO_REPLY);
    assert_eq!(replies.len(), 3, "{replies:?}");
    for r in &replies {
        assert_eq!((r.src, r.dst), (PUBLIC_ADDR, GUEST2_ADDR), "{r:?}");
    }
    // The second guest's own mapping translated none of it: hairpin is not outbound NAT.
    let stats = t.natd.natctl()?.stats()?;
    let m2 = natctl_counters(&stats, PUBLIC2_ADDR)?;
    assert_eq!(
        (m2.inbound_packets, m2.outbound_packets),
        (0, 0),
        "P2's counters: {m2:?}"
    );
    Ok(())
}

/// A guest sending to its own public IP reaches itself, from the router's guest-side address,
/// and gets the answers from P.
#[test]
fn a_guest_reaches_itself_through_its_own_public_ip() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING_OPEN))?;
    hairpin_reaches_the_guest(&topo, &natd, &topo.guest)
}

/// Without a rule, P is closed to guests as to the internet: a ping, a datagram and a TCP
/// connection from the second guest to P are dropped in XDP, counted as `inbound_denied` on
/// P's mapping, and the first guest sees none of them. A rule for UDP then lets the datagram
/// through (from the router's address), and a TCP rule a connection.
#[test]
fn hairpin_obeys_the_ingress_firewall_of_the_public_ip() -> anyhow::Result<()> {
    let t = TwoGuests::new(ONE_MAPPING)?;
    let natctl = t.natd.natctl()?;
    let before = natctl.stats()?;
    let guest_icmp = IcmpSniffer::open_in(&t.topo.guest)?;
    let guest2_icmp = IcmpSniffer::open_in(&t.guest2)?;

    natctl.dropped(
        PUBLIC_ADDR,
        Way::In,
        "an echo request from guest2 to P",
        || guest2_icmp.send_echo(PUBLIC_ADDR, 1, 56),
    )?;
    let listener = udp_bind(&t.topo.guest, at(GUEST_ADDR, 7000))?;
    natctl.dropped(PUBLIC_ADDR, Way::In, "a datagram from guest2 to P", || {
        udp_send(&t.guest2, None, at(PUBLIC_ADDR, 7000), b"must not arrive")
    })?;
    assert_no_datagram(&listener)?;
    // Last: its SYN retransmissions would be counted as drops too.
    let tcp_listener = tcp_listen(&t.topo.guest, at(GUEST_ADDR, 8080))?;
    let attempt = natctl.dropped(PUBLIC_ADDR, Way::In, "a SYN from guest2 to P", || {
        TcpAttempt::start(&t.guest2, None, at(PUBLIC_ADDR, 8080))
    })?;
    assert!(!attempt.is_connected()?, "the TCP connection was made");
    assert_no_connection(&tcp_listener)?;
    let requests = guest_icmp.pending(|s| s.icmp_type == ICMP_ECHO_REQUEST);
    assert_eq!(requests, [], "echo requests reached the guest");
    let replies = guest2_icmp.pending(|s| s.icmp_type == ICMP_ECHO_REPLY);
    assert_eq!(replies, [], "echo replies reached guest2");

    let after = natctl.stats()?;
    let (m0, m) = (
        natctl_counters(&before, PUBLIC_ADDR)?,
        natctl_counters(&after, PUBLIC_ADDR)?,
    );
    assert!(m.inbound_denied >= m0.inbound_denied + 3, "{m0:?} -> {m:?}");
    assert_eq!(
        m.inbound_packets, m0.inbound_packets,
        "forwarded to the guest"
    );
    assert_eq!(
        count(&after, "hairpin_forwarded"),
        count(&before, "hairpin_forwarded")
    );

    // The drops were the firewall's: a UDP rule lets the datagram through, hairpinned.
    natctl.firewall_add(PUBLIC_ADDR, &["--proto", "udp", "--ports", "7000"])?;
    drop(listener);
    let udp = udp_exchange(
        &t.topo.guest,
        at(GUEST_ADDR, 7000),
        &t.guest2,
        at(PUBLIC_ADDR, 7000),
        64,
    )?;
    assert_eq!(udp.server_saw.ip(), ROUTER_GUEST_ADDR, "{udp:?}");
    assert_eq!(udp.client_saw, at(PUBLIC_ADDR, 7000).into(), "{udp:?}");
    // A TCP rule lets a connection through (a fresh one: the dropped attempt's next SYN may
    // be seconds away).
    drop((attempt, tcp_listener));
    natctl.firewall_add(PUBLIC_ADDR, &["--proto", "tcp", "--ports", "8080"])?;
    let tcp = tcp_exchange(
        &t.topo.guest,
        at(GUEST_ADDR, 8080),
        &t.guest2,
        at(PUBLIC_ADDR, 8080),
        1024,
    )?;
    assert_eq!(tcp.server_peer.ip(), ROUTER_GUEST_ADDR, "{tcp:?}");
    assert_eq!(tcp.client_confirmed, 1024, "{tcp:?}");
    Ok(())
}
