//! What gets an answer, and whose: a denied TTL-1 packet draws no ICMP time exceeded (the
//! firewall judges before anything answers, so a scan learns nothing) while an allowed one
//! does; two guests reaching the same public IP from the same source port each get their own
//! answers.
use std::{
    io::Write as _,
    net::{Ipv4Addr, UdpSocket},
};

use anyhow::{Context as _, ensure};
use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, HOST_IF, Natd, NatdOptions, Netns, PUBLIC_ADDR, ROUTER_GUEST_ADDR,
    ROUTER_GUEST_IF, Topology,
    attempt::{TcpAttempt, accept, assert_no_datagram, expect_bytes, tcp_listen, udp_receive},
    fastpath::{self, Arrived},
    icmp_error::{ICMP_TIME_EXCEEDED, next_error, record_errors, set_ttl, wait_error},
    links::{GUEST2_ADDR, GUEST2_LINK, ROUTER_GUEST2_ADDR, ROUTER_GUEST2_IF},
    observe::{ARRIVAL, IcmpSniffer, payload, segs_in, udp_bind},
    policy::{Way, reason},
};

use super::{ONE_MAPPING, at, counted, v4};

/// A UDP socket in `ns` bound to `bind`, sending with TTL 1 and recording the ICMP errors its
/// datagrams draw.
fn ttl1_socket(ns: &Netns, bind: std::net::SocketAddrV4) -> anyhow::Result<UdpSocket> {
    let s = udp_bind(ns, bind)?;
    record_errors(&s)?;
    set_ttl(&s, 1)?;
    Ok(s)
}

/// TTL-1 datagrams to P: to a port no rule opens, dropped in XDP (`inbound_denied`), no ICMP
/// time exceeded comes back; to a port a rule opens, passed to the kernel (`ttl_expired`),
/// which answers with a time exceeded (from P: the kernel's NAT translates its own error as
/// related to the flow, as on CloudStack's router). The same from the guest under an egress
/// rule that denies one port: the denied datagram draws nothing, the allowed one a time
/// exceeded from the router's guest-side address.
#[test]
fn a_denied_ttl1_packet_draws_no_time_exceeded() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let config = format!(
        "{ONE_MAPPING}[[rule]]\npublic = \"203.0.113.10\"\nproto = \"udp\"\nports = \"7000\"\n\
         [[egress.rule]]\nproto = \"udp\"\nports = \"6001\"\n"
    );
    let natd = Natd::start(&topo, Some(&config))?;
    let natctl = natd.natctl()?;
    let client_icmp = IcmpSniffer::open_in(&topo.client)?;
    let guest_icmp = IcmpSniffer::open_in(&topo.guest)?;

    let denied = ttl1_socket(&topo.client, at(CLIENT_ADDR, 6000))?;
    natctl.dropped(PUBLIC_ADDR, Way::In, "a TTL-1 datagram to P:7001", || {
        Ok(denied.send_to(b"ttl 1", at(PUBLIC_ADDR, 7001))?)
    })?;
    let allowed = ttl1_socket(&topo.client, at(CLIENT_ADDR, 6001))?;
    counted(&natctl, "ttl_expired", "a TTL-1 datagram to P:7000", || {
        Ok(allowed.send_to(b"ttl 1", at(PUBLIC_ADDR, 7000))?)
    })?;
    let e = wait_error(&allowed, ARRIVAL).context("the allowed datagram")?;
    assert_eq!(
        (e.icmp_type, e.offender),
        (ICMP_TIME_EXCEEDED, PUBLIC_ADDR),
        "{e:?}"
    );
    // The allowed datagram's answer came back, so the denied one's would have too.
    assert_eq!(next_error(&denied)?, None, "the denied datagram");
    let exceeded = client_icmp.pending(|s| s.icmp_type == ICMP_TIME_EXCEEDED);
    assert_eq!(
        exceeded.len(),
        1,
        "time exceeded at the client: {exceeded:?}"
    );

    let denied = ttl1_socket(&topo.guest, at(GUEST_ADDR, 5000))?;
    natctl.dropped(
        PUBLIC_ADDR,
        Way::Out,
        "a TTL-1 datagram to port 6001",
        || Ok(denied.send_to(b"ttl 1", at(CLIENT_ADDR, 6001))?),
    )?;
    let allowed = ttl1_socket(&topo.guest, at(GUEST_ADDR, 5001))?;
    counted(
        &natctl,
        "ttl_expired",
        "a TTL-1 datagram to port 6000",
        || Ok(allowed.send_to(b"ttl 1", at(CLIENT_ADDR, 6000))?),
    )?;
    let e = wait_error(&allowed, ARRIVAL).context("the guest's allowed datagram")?;
    assert_eq!(
        (e.icmp_type, e.offender),
        (ICMP_TIME_EXCEEDED, ROUTER_GUEST_ADDR),
        "{e:?}"
    );
    assert_eq!(next_error(&denied)?, None, "the guest's denied datagram");
    let exceeded = guest_icmp.pending(|s| s.icmp_type == ICMP_TIME_EXCEEDED);
    assert_eq!(
        exceeded.len(),
        1,
        "time exceeded at the guest: {exceeded:?}"
    );
    Ok(())
}

/// The same on the kernel path: fragmented TTL-1 datagrams (the XDP program passes fragments
/// to the kernel, which reassembles them before it routes): the one to a port no rule opens
/// draws no time exceeded, the one to an open port draws one from P.
#[test]
fn a_denied_fragmented_ttl1_packet_draws_no_time_exceeded() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let config = format!(
        "{ONE_MAPPING}[[rule]]\npublic = \"203.0.113.10\"\nproto = \"udp\"\nports = \"7000\"\n"
    );
    let _natd = Natd::start(&topo, Some(&config))?;
    let router0 = topo.router.ip_counter("ReasmOKs")?;
    let denied = ttl1_socket(&topo.client, at(CLIENT_ADDR, 6000))?;
    denied.send_to(&payload(3000), at(PUBLIC_ADDR, 7001))?;
    let allowed = ttl1_socket(&topo.client, at(CLIENT_ADDR, 6001))?;
    allowed.send_to(&payload(3000), at(PUBLIC_ADDR, 7000))?;
    let e = wait_error(&allowed, ARRIVAL).context("the allowed datagram")?;
    assert_eq!(
        (e.icmp_type, e.offender),
        (ICMP_TIME_EXCEEDED, PUBLIC_ADDR),
        "{e:?}"
    );
    assert_eq!(next_error(&denied)?, None, "the denied datagram");
    assert_eq!(
        topo.router.ip_counter("ReasmOKs")? - router0,
        2,
        "the router reassembled both (the kernel path)"
    );
    Ok(())
}

/// The second guest network's public IP, the hairpin target.
const P_TARGET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
/// A second address of the first guest namespace, with a public IP of its own.
const V_OTHER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);

/// Two guests (10.0.0.10 and 10.0.0.20) reach the second network's guest through its public IP
/// from the same source port at the same time, by UDP and by TCP: the target sees both from
/// the router's address on its side, from two different ports, and each guest gets its own
/// answers and nothing else, all through the fast path.
#[test]
fn hairpin_flows_from_the_same_source_port_each_get_their_own_answers() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let target = topo.add_guest("guest2", GUEST2_LINK)?;
    topo.guest
        .ip(&["addr", "add", &format!("{V_OTHER}/24"), "dev", HOST_IF])?;
    topo.router.exec(
        "ping",
        &["-n", "-q", "-c", "1", "-W", "5", &V_OTHER.to_string()],
    )?;
    let config = format!(
        "{ONE_MAPPING}[[mapping]]\npublic = \"{V_OTHER_P}\"\nprivate = \"{V_OTHER}\"\n\
         [[mapping]]\npublic = \"{P_TARGET}\"\nprivate = \"{GUEST2_ADDR}\"\n\
         [[rule]]\npublic = \"{P_TARGET}\"\nproto = \"udp\"\nports = \"7000\"\n\
         [[rule]]\npublic = \"{P_TARGET}\"\nproto = \"tcp\"\nports = \"8080\"\n",
        V_OTHER_P = "203.0.113.20"
    );
    let natd = Natd::start_with(
        &topo,
        &NatdOptions {
            guest_ifaces: vec![ROUTER_GUEST_IF.into(), ROUTER_GUEST2_IF.into()],
            config: Some(config),
            ..NatdOptions::default()
        },
    )?;
    let natctl = natd.natctl()?;
    let before = natctl.stats()?;

    let service = udp_bind(&target, at(GUEST2_ADDR, 7000))?;
    let mut senders = Vec::new();
    let mut ports = Vec::new();
    for (i, v) in [GUEST_ADDR, V_OTHER].into_iter().enumerate() {
        let s = udp_bind(&topo.guest, at(v, 5000))?;
        s.send_to(format!("from guest {i}").as_bytes(), at(P_TARGET, 7000))?;
        let (data, from) = udp_receive(&service)?;
        let from = v4(from, "the target saw")?;
        assert_eq!(data, format!("from guest {i}").as_bytes());
        assert_eq!(*from.ip(), ROUTER_GUEST2_ADDR, "guest {i}");
        senders.push(s);
        ports.push(from);
    }
    ensure!(
        ports[0].port() != ports[1].port(),
        "the target saw both flows from {}",
        ports[0]
    );
    for (i, p) in ports.iter().enumerate() {
        service.send_to(format!("to guest {i}").as_bytes(), p)?;
    }
    for (i, s) in senders.iter().enumerate() {
        let (data, from) = udp_receive(s).with_context(|| format!("guest {i}'s answer"))?;
        assert_eq!(
            (data, v4(from, "the guest saw")?),
            (format!("to guest {i}").into_bytes(), at(P_TARGET, 7000)),
            "guest {i}"
        );
        assert_no_datagram(s).with_context(|| format!("guest {i}"))?;
    }

    let listener = tcp_listen(&target, at(GUEST2_ADDR, 8080))?;
    let mut conns = Vec::new();
    for v in [GUEST_ADDR, V_OTHER] {
        let c =
            TcpAttempt::start_from(&topo.guest, at(v, 5001), at(P_TARGET, 8080))?.connected()?;
        let (accepted, peer) = accept(&listener)?;
        conns.push((c, accepted, v4(peer, "the target saw")?));
    }
    ensure!(
        conns[0].2 != conns[1].2 && conns.iter().all(|c| *c.2.ip() == ROUTER_GUEST2_ADDR),
        "the target saw the connections from {} and {}",
        conns[0].2,
        conns[1].2
    );
    for (i, (c, accepted, _)) in conns.iter_mut().enumerate() {
        accepted.write_all(format!("hello {i}").as_bytes())?;
        expect_bytes(c, format!("hello {i}").as_bytes())?;
        c.write_all(format!("bye {i}").as_bytes())?;
        expect_bytes(accepted, format!("bye {i}").as_bytes())?;
    }
    let after = natctl.stats()?;
    ensure!(
        reason(&after, "hairpin_collision")? == reason(&before, "hairpin_collision")?,
        "a collision was passed to the kernel"
    );
    let mut segments = 0;
    for (c, accepted, _) in &conns {
        segments += segs_in(c)? + segs_in(accepted)?;
    }
    fastpath::carried(
        &before,
        &after,
        &[
            Arrived::new("hairpin_forwarded", 4, "datagrams and answers"),
            Arrived::new("hairpin_forwarded", segments, "TCP segments, both ends"),
        ],
    )
}
