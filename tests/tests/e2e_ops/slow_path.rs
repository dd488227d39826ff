//! natd's nftables table beyond forwarded traffic: the router's own traffic to a mapped public
//! IP is translated to the guest (the output hook, as the CloudStack router's `OUTPUT -d P -j
//! DNAT`), whether P is an address of the router (`--manage-addresses`, as on the router) or
//! routed elsewhere; and a change that fails after the table was replaced (address management)
//! leaves the table as it was.
use std::net::Ipv4Addr;

use anyhow::{Context as _, ensure};
use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, Natd, NatdOptions, PUBLIC_ADDR, ROUTER_PUBLIC_ADDR, Topology,
    observe::{ICMP_ECHO_REQUEST, IcmpSniffer, ping, tcp_exchange},
};

use super::at;

/// A public IP on the client link 198.51.100.0/24, which `--manage-addresses` puts on the
/// router's public interface (as CloudStack's router holds its public IPs).
const ON_LINK: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 50);

/// The router pings `public` and opens a TCP connection to it: the guest answers both; the
/// guest saw them addressed to itself from one of the router's public addresses `sources`
/// (the kernel picks it).
fn router_reaches_guest(
    topo: &Topology,
    public: Ipv4Addr,
    sources: &[Ipv4Addr],
) -> anyhow::Result<()> {
    let sniffer = IcmpSniffer::open_in(&topo.guest)?;
    let p = ping(&topo.router, public, 1, 56)?;
    ensure!(
        (p.transmitted, p.received) == (1, 1) && p.reply_from == [public],
        "the router's ping {public}: {}",
        p.output
    );
    let requests = sniffer.collect(1, |s| s.icmp_type == ICMP_ECHO_REQUEST);
    ensure!(
        requests.len() == 1 && sources.contains(&requests[0].src) && requests[0].dst == GUEST_ADDR,
        "echo requests the guest received: {requests:?}"
    );
    let tcp = tcp_exchange(
        &topo.guest,
        at(GUEST_ADDR, 5000),
        &topo.router,
        at(public, 5000),
        3000,
    )?;
    ensure!(
        sources.iter().any(|s| tcp.server_peer.ip() == *s) && tcp.client_confirmed == 3000,
        "the router's TCP connection to {public}: {tcp:?}"
    );
    Ok(())
}

/// P routed away from the router (here to the client, which routes it back): without the
/// output hook's DNAT, the router's packets to P would loop between the two until their TTL
/// ran out.
#[test]
fn the_routers_own_traffic_to_a_public_ip_reaches_its_guest() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    topo.router.ip(&[
        "route",
        "add",
        "203.0.113.0/24",
        "via",
        &CLIENT_ADDR.to_string(),
    ])?;
    let natd = Natd::start(&topo, None)?;
    let natctl = natd.natctl()?;
    natctl.ok(&[
        "mapping",
        "add",
        &PUBLIC_ADDR.to_string(),
        &GUEST_ADDR.to_string(),
    ])?;
    // No ingress rule: the router's own traffic does not cross the forward hook's firewall,
    // as on CloudStack's router.
    router_reaches_guest(&topo, PUBLIC_ADDR, &[ROUTER_PUBLIC_ADDR])
}

/// P held by the router itself (`--manage-addresses`), as on CloudStack's router: the router's
/// traffic to P reaches the guest, and the guest's answers come back to the router (the
/// kernel's conntrack reverses the DNAT).
#[test]
fn the_routers_own_traffic_to_its_own_public_ip_reaches_the_guest() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start_with(
        &topo,
        &NatdOptions {
            args: vec!["--manage-addresses".into()],
            ..NatdOptions::default()
        },
    )?;
    let natctl = natd.natctl()?;
    natctl.ok(&[
        "mapping",
        "add",
        &ON_LINK.to_string(),
        &GUEST_ADDR.to_string(),
    ])?;
    router_reaches_guest(&topo, ON_LINK, &[ROUTER_PUBLIC_ADDR, ON_LINK])
        .with_context(|| natd.log_text())
}

/// `--manage-addresses` cannot place a public IP outside every public subnet: `nft -f` had
/// already replaced the table when address management failed, and the table is restored
/// with the maps: nothing of the failed mapping is left in the slow path, and natctl says it
/// failed (status 2: natd could not apply a valid change), not that it was refused.
#[test]
fn a_change_failing_after_the_table_was_replaced_restores_it() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start_with(
        &topo,
        &NatdOptions {
            args: vec!["--manage-addresses".into()],
            ..NatdOptions::default()
        },
    )?;
    let natctl = natd.natctl()?;
    let (on_link, guest) = (ON_LINK.to_string(), GUEST_ADDR.to_string());
    natctl.ok(&["mapping", "add", &on_link, &guest])?;
    let before = topo.nft_text()?.context("no nftables table")?;
    let out = natctl.run(&["mapping", "add", "192.0.2.99", "10.0.0.11"])?;
    ensure!(
        out.status.code() == Some(2)
            && out.stderr.contains("failed, nothing changed")
            && out.stderr.contains("192.0.2.99 is in no subnet"),
        "natctl mapping add 192.0.2.99: {out:?}"
    );
    let after = topo.nft_text()?.context("no nftables table")?;
    ensure!(
        after == before,
        "the table changed:\nbefore: {before}\nafter: {after}"
    );
    let pairs: Vec<_> = natctl
        .mappings()?
        .iter()
        .map(|m| (m.public, m.private))
        .collect();
    ensure!(pairs == [(ON_LINK, GUEST_ADDR)], "mappings: {pairs:?}");
    Ok(())
}
