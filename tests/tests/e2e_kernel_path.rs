//! End to end, the kernel path: what the XDP program passes to the kernel of a flow the fast
//! path admitted (a fragmented answer, IP options, an answer whose next hop has no neighbour
//! entry, one larger than the guest link's MTU) gets the fast path's verdict there, while what
//! no flow and no rule admits stays dropped; what the public side addresses to a mapped private
//! address is dropped on both paths; `natctl conntrack flush PUBLIC` ends the flows of one
//! public IP, revoked or not. Same topology and ground rules as `e2e.rs`.
//!
//! That a packet took the kernel path is observed, not assumed: the router's IP counters show
//! the kernel reassembled it (`ReasmOKs`), or natd counted the reason the XDP program passed it
//! for. A packet the kernel drops leaves no counter, so an admitted packet sent after it on
//! the same path marks the moment to check that it did not arrive.
use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd as _,
};

use anyhow::{Context as _, ensure};
use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, HOST_IF, Natctl, Netns, PUBLIC_ADDR, ROUTER_GUEST_IF,
    ROUTER_PUBLIC_ADDR, Topology,
    attempt::{assert_no_datagram, udp_receive, udp_send},
    observe::{payload, udp_bind},
    policy::{Way, reason},
};

/// P 203.0.113.10 <-> V 10.0.0.10 and no rules: P is closed.
const ONE_MAPPING: &str = "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n";
/// A second guest address and its public IP.
const V2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);
const P2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const TWO_MAPPINGS: &str = "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n\
                            [[mapping]]\npublic = \"203.0.113.20\"\nprivate = \"10.0.0.20\"\n";
/// The size of a DNS answer with EDNS that does not fit one frame.
const BIG: usize = 3000;

fn at(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

/// The guest opens a UDP flow to the client's port `port` with a small datagram (the fast
/// path translates it and tracks the flow); returns the guest's socket and the client's, and
/// where the client saw the guest (P and the guest's port).
fn guest_flow(topo: &Topology, port: u16) -> anyhow::Result<(UdpSocket, UdpSocket, SocketAddrV4)> {
    let server = udp_bind(&topo.client, at(CLIENT_ADDR, port))?;
    let guest = udp_send(&topo.guest, None, at(CLIENT_ADDR, port), b"query")?;
    let (_, from) = udp_receive(&server)?;
    let std::net::SocketAddr::V4(from) = from else {
        anyhow::bail!("the client saw {from}");
    };
    ensure!(
        *from.ip() == PUBLIC_ADDR,
        "the client saw the guest as {from}"
    );
    Ok((guest, server, from))
}

/// Receives one datagram on `socket`; it must be `want` from `from`.
fn receive_exactly(socket: &UdpSocket, want: &[u8], from: SocketAddrV4) -> anyhow::Result<()> {
    let (got, source) = udp_receive(socket)?;
    ensure!(
        source == std::net::SocketAddr::V4(from),
        "a datagram from {source}, expected from {from}"
    );
    ensure!(
        got == want,
        "{} bytes arrived changed or cut ({} sent)",
        got.len(),
        want.len()
    );
    Ok(())
}

/// The count of verdict reason `name` in natd's counters now.
fn reason_now(natctl: &Natctl, name: &str) -> anyhow::Result<u64> {
    reason(&natctl.stats()?, name)
}

/// `setsockopt(fd, IPPROTO_IP, opt, value)`.
fn set_ip_option(socket: &UdpSocket, opt: libc::c_int, value: &[u8]) -> anyhow::Result<()> {
    // SAFETY: a valid socket fd and a buffer of the given length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            opt,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "setsockopt({opt}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// A 3,000-byte answer (as DNS with EDNS sends) to a flow the guest opened through the fast
/// path arrives whole: it comes fragmented, the XDP program passes fragments to the kernel,
/// which reassembles and must count it as part of the flow. The same datagram from a port the
/// guest never spoke to is dropped (P has no rule).
#[test]
fn a_fragmented_answer_of_3000_bytes_to_a_guest_flow_arrives() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = nat_tests::topology::Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let (guest, server, guest_at) = guest_flow(&topo, 53)?;
    let flows = natctl.flows()?.flows;
    ensure!(
        flows.len() == 1 && flows[0].origin == "guest" && flows[0].state == "udp_unreplied",
        "the fast path's flows: {flows:?}"
    );
    let (router0, guest0) = (
        topo.router.ip_counter("ReasmOKs")?,
        topo.guest.ip_counter("ReasmOKs")?,
    );
    // Unasked first, from another port: no flow, no rule.
    let stranger = udp_bind(&topo.client, at(CLIENT_ADDR, 54))?;
    stranger.send_to(&payload(BIG), guest_at)?;
    let answer = payload(BIG);
    server.send_to(&answer, guest_at)?;
    receive_exactly(&guest, &answer, at(CLIENT_ADDR, 53))?;
    assert_no_datagram(&guest).context("the unasked datagram")?;
    // Both were reassembled by the router (the kernel path), only the answer by the guest.
    assert_eq!(topo.router.ip_counter("ReasmOKs")? - router0, 2);
    assert_eq!(topo.guest.ip_counter("ReasmOKs")? - guest0, 1);
    Ok(())
}

/// A flow a rule admitted outlives the rule in the fast path (as in netfilter); its
/// fragmented datagrams, which the kernel handles, outlive it too. A new flow from another
/// port is dropped there, as XDP drops its unfragmented packets.
#[test]
fn an_established_flow_outlives_its_rule_on_the_kernel_path_too() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = nat_tests::topology::Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let id = natctl.firewall_add(PUBLIC_ADDR, &["--proto", "udp", "--ports", "7000"])?;
    let service = udp_bind(&topo.guest, at(GUEST_ADDR, 7000))?;
    let client = udp_send(&topo.client, None, at(PUBLIC_ADDR, 7000), b"hello")?;
    let (_, remote) = udp_receive(&service)?;
    service.send_to(b"hello back", remote)?;
    udp_receive(&client)?;
    natctl.ok(&["firewall", "del", &id.to_string()])?;

    let router0 = topo.router.ip_counter("ReasmOKs")?;
    let stranger = udp_send(&topo.client, None, at(PUBLIC_ADDR, 7000), &payload(BIG))?;
    let data = payload(BIG);
    client.send_to(&data, at(PUBLIC_ADDR, 7000))?;
    let std::net::SocketAddr::V4(remote) = remote else {
        anyhow::bail!("the guest saw {remote}");
    };
    receive_exactly(&service, &data, remote)
        .context("the established flow's fragmented datagram")?;
    assert_no_datagram(&service)
        .with_context(|| format!("the new flow from {:?}", stranger.local_addr()))?;
    assert_eq!(topo.router.ip_counter("ReasmOKs")? - router0, 2);
    Ok(())
}

/// The client answers the guest's flow with IP options (four NOPs): the XDP program passes
/// such packets to the kernel (counted `ip_options`), where the answer must count as part of
/// the flow.
#[test]
fn an_answer_with_ip_options_arrives() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = nat_tests::topology::Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let (guest, server, guest_at) = guest_flow(&topo, 7000)?;
    set_ip_option(&server, libc::IP_OPTIONS, &[1, 1, 1, 1])?;
    let before = reason_now(&natctl, "ip_options")?;
    server.send_to(b"answer with options", guest_at)?;
    receive_exactly(&guest, b"answer with options", at(CLIENT_ADDR, 7000))?;
    ensure!(
        reason_now(&natctl, "ip_options")? > before,
        "the answer did not take the kernel path (no ip_options counted)"
    );
    Ok(())
}

/// The router forgets the guest's link-layer address after the guest opened its flow: the
/// answer's next hop has no neighbour entry, so the XDP program passes it to the kernel
/// (counted `no_neighbour`), which resolves it and must count the answer as part of the flow.
#[test]
fn an_answer_whose_next_hop_is_unresolved_arrives() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = nat_tests::topology::Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let (guest, server, guest_at) = guest_flow(&topo, 7000)?;
    topo.router
        .ip(&["neigh", "flush", "dev", ROUTER_GUEST_IF])?;
    let before = reason_now(&natctl, "no_neighbour")?;
    server.send_to(b"answer", guest_at)?;
    receive_exactly(&guest, b"answer", at(CLIENT_ADDR, 7000))?;
    ensure!(
        reason_now(&natctl, "no_neighbour")? > before,
        "the answer did not take the kernel path (no no_neighbour counted)"
    );
    Ok(())
}

/// The guest link's MTU is 1280 on the router: a 1400-byte answer without DF is larger than
/// the route's MTU, so the XDP program passes it to the kernel (counted `frag_needed`), which
/// fragments it and must count it as part of the flow.
#[test]
fn an_answer_larger_than_the_guest_links_mtu_arrives() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    topo.router
        .ip(&["link", "set", ROUTER_GUEST_IF, "mtu", "1280"])?;
    let natd = nat_tests::topology::Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let (guest, server, guest_at) = guest_flow(&topo, 7000)?;
    // No DF: the router may fragment it.
    let dont = libc::IP_PMTUDISC_DONT.to_ne_bytes();
    set_ip_option(&server, libc::IP_MTU_DISCOVER, &dont)?;
    let (before, guest0) = (
        reason_now(&natctl, "frag_needed")?,
        topo.guest.ip_counter("ReasmOKs")?,
    );
    let answer = payload(1400);
    server.send_to(&answer, guest_at)?;
    receive_exactly(&guest, &answer, at(CLIENT_ADDR, 7000))?;
    ensure!(
        reason_now(&natctl, "frag_needed")? > before,
        "the answer did not take the kernel path (no frag_needed counted)"
    );
    assert_eq!(topo.guest.ip_counter("ReasmOKs")? - guest0, 1);
    Ok(())
}

/// With a route to the guest network, the client sends straight to V on a port P is open on:
/// the XDP program drops what it sees (`direct_to_private`), and the kernel drops the
/// fragmented datagram it gets too, while the same datagram to P arrives.
#[test]
fn what_the_public_side_addresses_to_a_private_address_is_dropped_on_both_paths()
-> anyhow::Result<()> {
    let topo = Topology::new()?;
    let config = format!(
        "{ONE_MAPPING}[[rule]]\npublic = \"203.0.113.10\"\nproto = \"udp\"\nports = \"7000\"\n"
    );
    let natd = nat_tests::topology::Natd::start(&topo, Some(&config))?;
    let natctl = natd.natctl()?;
    topo.client.ip(&[
        "route",
        "add",
        "10.0.0.0/24",
        "via",
        &ROUTER_PUBLIC_ADDR.to_string(),
    ])?;
    let service = udp_bind(&topo.guest, at(GUEST_ADDR, 7000))?;
    let direct = udp_bind(&topo.client, at(CLIENT_ADDR, 6000))?;
    let before = reason_now(&natctl, "direct_to_private")?;
    direct.send_to(b"straight to V", at(GUEST_ADDR, 7000))?;
    natctl.wait_stats("direct_to_private for a datagram to V", |s| {
        Ok(reason(s, "direct_to_private")? > before)
    })?;

    let router0 = topo.router.ip_counter("ReasmOKs")?;
    direct.send_to(&payload(BIG), at(GUEST_ADDR, 7000))?;
    let through_p = udp_bind(&topo.client, at(CLIENT_ADDR, 6001))?;
    through_p.send_to(&payload(BIG), at(PUBLIC_ADDR, 7000))?;
    receive_exactly(&service, &payload(BIG), at(CLIENT_ADDR, 6001))?;
    assert_no_datagram(&service).context("the fragmented datagram to V")?;
    assert_eq!(topo.router.ip_counter("ReasmOKs")? - router0, 2);
    Ok(())
}

/// Two mapped guests, each with a flow a rule admitted (also in the kernel: a fragmented
/// datagram each), the rules then deleted: `conntrack flush 203.0.113.10` ends the flows of
/// that public IP only, in the fast path (its next packet is judged again and denied) and in
/// the kernel's conntrack, and the other's flow runs on.
#[test]
fn conntrack_flush_of_one_public_ip_ends_only_its_flows() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    topo.guest
        .ip(&["addr", "add", &format!("{V2}/24"), "dev", HOST_IF])?;
    topo.router
        .exec("ping", &["-n", "-q", "-c", "1", "-W", "5", &V2.to_string()])?;
    let natd = nat_tests::topology::Natd::start(&topo, Some(TWO_MAPPINGS))?;
    let natctl = natd.natctl()?;
    let mut flows = Vec::new();
    for (p, v) in [(PUBLIC_ADDR, GUEST_ADDR), (P2, V2)] {
        let id = natctl.firewall_add(p, &["--proto", "udp", "--ports", "7000"])?;
        let service = udp_bind(&topo.guest, at(v, 7000))?;
        let client = udp_send(&topo.client, None, at(p, 7000), b"hello")?;
        let (_, remote) = udp_receive(&service)?;
        service.send_to(b"hello back", remote)?;
        udp_receive(&client)?;
        client.send_to(&payload(BIG), at(p, 7000))?;
        udp_receive(&service)?;
        natctl.ok(&["firewall", "del", &id.to_string()])?;
        flows.push((p, v, service, client));
    }
    let kernel = |p: Ipv4Addr| -> anyhow::Result<usize> {
        let out = run_conntrack(&topo.router, p)?;
        Ok(out.lines().filter(|l| l.contains("udp")).count())
    };
    ensure!(
        kernel(PUBLIC_ADDR)? == 1 && kernel(P2)? == 1,
        "the kernel's flows: {}",
        topo.router.exec("conntrack", &["-L", "-p", "udp"])?
    );

    let out = natctl.ok(&["conntrack", "flush", "203.0.113.10"])?;
    ensure!(
        out.contains("1 flows of 203.0.113.10 flushed"),
        "natctl said {out:?}"
    );
    let left = natctl.flows()?.flows;
    ensure!(
        left.len() == 1 && left[0].guest == V2,
        "flows left after the flush: {left:?}"
    );
    assert_eq!(kernel(PUBLIC_ADDR)?, 0, "P's flows in the kernel");
    assert_eq!(kernel(P2)?, 1, "P2's flows in the kernel");

    let (_, _, service1, client1) = &flows[0];
    natctl.dropped(
        PUBLIC_ADDR,
        Way::In,
        "the flushed flow's next datagram",
        || Ok(client1.send_to(b"again", at(PUBLIC_ADDR, 7000))?),
    )?;
    assert_no_datagram(service1)?;
    let (_, _, service2, client2) = &flows[1];
    client2.send_to(b"again", at(P2, 7000))?;
    let (got, _) = udp_receive(service2)?;
    assert_eq!(got, b"again");
    Ok(())
}

/// A revoked mapping's established flow runs on (as on CloudStack's router) until
/// `conntrack flush PUBLIC` ends it; the public IP is no longer mapped, so the flow's next
/// datagram is passed to the kernel untranslated (`unmapped`) and never reaches the guest.
#[test]
fn conntrack_flush_ends_the_flows_of_a_revoked_mapping() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let config = format!("{ONE_MAPPING}[[rule]]\npublic = \"203.0.113.10\"\nproto = \"udp\"\n");
    let natd = nat_tests::topology::Natd::start(&topo, Some(&config))?;
    let natctl = natd.natctl()?;
    let service = udp_bind(&topo.guest, at(GUEST_ADDR, 7000))?;
    let client = udp_send(&topo.client, None, at(PUBLIC_ADDR, 7000), b"hello")?;
    let (_, remote) = udp_receive(&service)?;
    service.send_to(b"hello back", remote)?;
    udp_receive(&client)?;

    natctl.ok(&["mapping", "del", "203.0.113.10"])?;
    client.send_to(b"still there", at(PUBLIC_ADDR, 7000))?;
    let (got, _) = udp_receive(&service).context("the revoked mapping's established flow")?;
    assert_eq!(got, b"still there");

    natctl.ok(&["conntrack", "flush", "203.0.113.10"])?;
    ensure!(
        natctl.flows()?.flows.is_empty(),
        "flows left: {:?}",
        natctl.flows()?.flows
    );
    let before = reason_now(&natctl, "unmapped")?;
    client.send_to(b"after the flush", at(PUBLIC_ADDR, 7000))?;
    natctl.wait_stats("unmapped for the flushed flow's datagram", |s| {
        Ok(reason(s, "unmapped")? > before)
    })?;
    assert_no_datagram(&service)?;
    Ok(())
}

/// `conntrack -L -d P` in `ns` (the kernel's flows whose original destination is P, as a
/// flow DNATed from P has).
fn run_conntrack(ns: &Netns, p: Ipv4Addr) -> anyhow::Result<String> {
    let out = nat_tests::topology::run_bounded(
        ns.command("conntrack")
            .args(["-L", "-p", "udp", "-d", &p.to_string()]),
        nat_tests::topology::COMMAND_TIMEOUT,
    )?;
    // conntrack -L exits 0 with or without entries; its summary goes to stderr.
    ensure!(out.status.success(), "conntrack -L: {}", out.stderr);
    Ok(out.stdout)
}
