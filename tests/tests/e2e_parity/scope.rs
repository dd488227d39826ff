//! Where each policy applies: the egress policy only to guest traffic the route sends out of a
//! public interface (CloudStack's FW_OUTBOUND is in the FORWARD chain, towards the public
//! interface), and a public IP's ingress only on its own public network (the router's FORWARD
//! rule names the IP's interface).
use anyhow::{Context as _, ensure};
use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, Natd, NatdOptions, PUBLIC_ADDR, ROUTER_GUEST_ADDR, ROUTER_GUEST_IF,
    ROUTER_PUBLIC_ADDR, ROUTER_PUBLIC_IF, Topology,
    attempt::{
        TcpAttempt, assert_no_connection, assert_no_datagram, tcp_listen, udp_receive, udp_send,
    },
    links::{GUEST2_ADDR, GUEST2_LINK, ROUTER_GUEST2_IF, ROUTER_PUBLIC2_IF, UPSTREAM2_ADDR},
    observe::{payload, ping, tcp_exchange, udp_bind, udp_exchange},
    policy::{Way, reason},
    two_networks::{P1, P2, TWO_MAPPINGS, TwoNetworks, V1, V2},
};

use super::{ONE_MAPPING, at, counted, v4};

/// With egress default-deny, the guest still reaches its router's own addresses (ping on both
/// sides, DNS to a UDP listener and a TCP connection on the guest-side address, as DHCP
/// renewals and the metadata and password services are reached) and a second guest network
/// behind the router, untranslated, while its traffic to the public side is refused.
#[test]
fn egress_deny_filters_only_what_leaves_for_the_public_side() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let guest2 = topo.add_guest("guest2", GUEST2_LINK)?;
    let natd = Natd::start_with(
        &topo,
        &NatdOptions {
            guest_ifaces: vec![ROUTER_GUEST_IF.into(), ROUTER_GUEST2_IF.into()],
            config: Some(format!("{ONE_MAPPING}[egress]\ndefault = \"deny\"\n")),
            ..NatdOptions::default()
        },
    )?;
    let natctl = natd.natctl()?;

    let client = udp_bind(&topo.client, at(CLIENT_ADDR, 53))?;
    natctl.dropped(
        PUBLIC_ADDR,
        Way::Out,
        "the guest's datagram to the public side",
        || udp_send(&topo.guest, None, at(CLIENT_ADDR, 53), b"out?"),
    )?;
    assert_no_datagram(&client).context("the public side")?;
    let denied = reason(&natctl.stats()?, "outbound_denied")?;

    for router in [ROUTER_GUEST_ADDR, ROUTER_PUBLIC_ADDR] {
        let p = ping(&topo.guest, router, 3, 56)?;
        assert_eq!((p.transmitted, p.received), (3, 3), "{}", p.output);
        assert_eq!(p.reply_from, [router; 3], "{}", p.output);
    }
    let dns = udp_exchange(
        &topo.router,
        at(ROUTER_GUEST_ADDR, 53),
        &topo.guest,
        at(ROUTER_GUEST_ADDR, 53),
        100,
    )
    .context("DNS to the router")?;
    assert_eq!(dns.server_saw.ip(), GUEST_ADDR, "{dns:?}");
    assert_eq!(dns.client_saw, at(ROUTER_GUEST_ADDR, 53).into(), "{dns:?}");
    let metadata = tcp_exchange(
        &topo.router,
        at(ROUTER_GUEST_ADDR, 80),
        &topo.guest,
        at(ROUTER_GUEST_ADDR, 80),
        4096,
    )
    .context("TCP to the router")?;
    assert_eq!(metadata.server_peer.ip(), GUEST_ADDR, "{metadata:?}");
    assert_eq!(metadata.client_confirmed, 4096);

    let p = ping(&topo.guest, GUEST2_ADDR, 3, 56)?;
    assert_eq!((p.transmitted, p.received), (3, 3), "{}", p.output);
    let udp = udp_exchange(
        &guest2,
        at(GUEST2_ADDR, 7000),
        &topo.guest,
        at(GUEST2_ADDR, 7000),
        100,
    )
    .context("UDP to the second guest network")?;
    assert_eq!(udp.server_saw.ip(), GUEST_ADDR, "{udp:?}");
    let tcp = tcp_exchange(
        &guest2,
        at(GUEST2_ADDR, 8080),
        &topo.guest,
        at(GUEST2_ADDR, 8080),
        4096,
    )
    .context("TCP to the second guest network")?;
    assert_eq!(tcp.server_peer.ip(), GUEST_ADDR, "{tcp:?}");
    assert_eq!(tcp.client_confirmed, 4096);

    assert_eq!(
        reason(&natctl.stats()?, "outbound_denied")?,
        denied,
        "outbound_denied grew while the guest talked to the router and the other network"
    );
    Ok(())
}

/// Rules opening UDP 7000 and TCP 8080 on both public IPs of the two-network topology.
fn two_networks_open() -> String {
    let mut config = TWO_MAPPINGS.to_string();
    for p in ["203.0.113.10", "203.0.113.20"] {
        config += &format!(
            "[[rule]]\npublic = \"{p}\"\nproto = \"udp\"\nports = \"7000\"\n\
             [[rule]]\npublic = \"{p}\"\nproto = \"tcp\"\nports = \"8080\"\n"
        );
    }
    config
}

/// The two public networks, each owning its public IP's subnet: 203.0.113.0/28 (P1) on pub0,
/// 203.0.113.16/28 (P2) on pub1, as a CloudStack router holds each public IP's network on its
/// own interface.
fn two_networks_owning() -> anyhow::Result<TwoNetworks> {
    TwoNetworks::with(&two_networks_open(), |topo, _| {
        topo.router
            .ip(&["addr", "add", "203.0.113.1/28", "dev", ROUTER_PUBLIC_IF])?;
        topo.router
            .ip(&["addr", "add", "203.0.113.17/28", "dev", ROUTER_PUBLIC2_IF])?;
        Ok(())
    })
}

/// A new inbound flow to a public IP is taken only on the public interface that owns the IP's
/// network: UDP and TCP from network 2 to P1 (and from network 1 to P2) are dropped and
/// counted as `wrong_network`, while from each IP's own network they reach its guest and get
/// their answers.
#[test]
fn a_public_ip_answers_only_on_its_own_network() -> anyhow::Result<()> {
    let t = two_networks_owning()?;
    let natctl = t.natd.natctl()?;
    let (net1, net2) = (&t.topo.client, &t.upstream2);
    for (p, v, own, own_addr) in [(P1, V1, net1, CLIENT_ADDR), (P2, V2, net2, UPSTREAM2_ADDR)] {
        let seen = udp_exchange(&t.topo.guest, at(v, 7000), own, at(p, 7000), 64)
            .with_context(|| format!("UDP to {p} from its own network"))?;
        assert_eq!(seen.server_saw.ip(), own_addr, "{seen:?}");
        assert_eq!(seen.client_saw, at(p, 7000).into(), "{seen:?}");
        let tcp = tcp_exchange(&t.topo.guest, at(v, 8080), own, at(p, 8080), 4096)
            .with_context(|| format!("TCP to {p} from its own network"))?;
        assert_eq!(tcp.server_peer.ip(), own_addr, "{tcp:?}");
    }
    for (p, v, other) in [(P1, V1, net2), (P2, V2, net1)] {
        let service = udp_bind(&t.topo.guest, at(v, 7000))?;
        let what = format!("a datagram to {p} from {}", other.name());
        counted(&natctl, "wrong_network", &what, || {
            udp_send(other, None, at(p, 7000), b"wrong way")
        })?;
        assert_no_datagram(&service).context(what)?;
        let listener = tcp_listen(&t.topo.guest, at(v, 8080))?;
        let what = format!("a SYN to {p} from {}", other.name());
        let attempt = counted(&natctl, "wrong_network", &what, || {
            TcpAttempt::start(other, None, at(p, 8080))
        })?;
        ensure!(!attempt.is_connected()?, "{what}: connected");
        assert_no_connection(&listener).context(what)?;
    }
    Ok(())
}

/// The same on the kernel path: a fragmented datagram (which the XDP program passes to the
/// kernel) from network 2 to P1 never reaches P1's guest, while the same datagram to P2, from
/// P2's own network and sent after it, does.
#[test]
fn a_public_ip_answers_only_on_its_own_network_on_the_kernel_path_too() -> anyhow::Result<()> {
    let t = two_networks_owning()?;
    let (p1_service, p2_service) = (
        udp_bind(&t.topo.guest, at(V1, 7000))?,
        udp_bind(&t.topo.guest, at(V2, 7000))?,
    );
    let router0 = t.topo.router.ip_counter("ReasmOKs")?;
    let sender = udp_bind(&t.upstream2, at(UPSTREAM2_ADDR, 6000))?;
    sender.send_to(&payload(3000), at(P1, 7000))?;
    sender.send_to(&payload(3000), at(P2, 7000))?;
    let (data, from) = udp_receive(&p2_service).context("the datagram to P2")?;
    assert_eq!(
        (data.len(), v4(from, "P2's guest saw")?),
        (3000, at(UPSTREAM2_ADDR, 6000))
    );
    assert_no_datagram(&p1_service).context("the datagram to P1 from network 2")?;
    assert_eq!(
        t.topo.router.ip_counter("ReasmOKs")? - router0,
        2,
        "the router reassembled both (the kernel path)"
    );
    Ok(())
}
