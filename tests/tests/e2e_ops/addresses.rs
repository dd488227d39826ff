//! `natd --manage-addresses`: a mapped public IP in the subnet of a public interface is added
//! to that interface (labelled as natd's) and announced with a gratuitous ARP, so hosts on the
//! link reach it directly, without a route via the router; deleting the mapping removes it.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::ensure;
use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, HOST_IF, Natd, NatdOptions, ROUTER_PUBLIC_ADDR, ROUTER_PUBLIC_IF,
    Topology,
    links::AddrInfo,
    observe::{ARRIVAL, ICMP_ECHO_REQUEST, IcmpSniffer, ping},
};

/// A public IP on the client link 198.51.100.0/24 itself.
const ON_LINK: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 50);

#[test]
fn managed_public_ip_is_added_announced_reachable_and_removed() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    // The client learns addresses from gratuitous ARP (the default only updates known ones).
    topo.client.exec(
        "sysctl",
        &["-qw", &format!("net.ipv4.conf.{HOST_IF}.arp_accept=1")],
    )?;
    let natd = Natd::start_with(
        &topo,
        &NatdOptions {
            args: vec!["--manage-addresses".into()],
            ..NatdOptions::default()
        },
    )?;
    let natctl = natd.natctl()?;
    let own = AddrInfo {
        addr: ROUTER_PUBLIC_ADDR,
        prefix: 24,
        label: Some(ROUTER_PUBLIC_IF.into()),
    };
    assert_eq!(
        topo.router.ipv4_addrs(ROUTER_PUBLIC_IF)?,
        std::slice::from_ref(&own)
    );
    assert_eq!(topo.client.neighbour(ON_LINK, HOST_IF)?, None);

    natctl.ok(&[
        "mapping",
        "add",
        &ON_LINK.to_string(),
        &GUEST_ADDR.to_string(),
    ])?;
    let managed = AddrInfo {
        addr: ON_LINK,
        prefix: 24,
        label: Some(format!("{ROUTER_PUBLIC_IF}:xnat")),
    };
    assert_eq!(
        topo.router.ipv4_addrs(ROUTER_PUBLIC_IF)?,
        [own.clone(), managed],
        "{}",
        natd.log_text()
    );
    // Before the client sent anything to it, the announcement taught it where ON_LINK is.
    let router_mac = topo.router.mac(ROUTER_PUBLIC_IF)?;
    let deadline = Instant::now() + ARRIVAL;
    loop {
        let n = topo.client.neighbour(ON_LINK, HOST_IF)?;
        if n.as_ref().and_then(|n| n.lladdr.as_deref()) == Some(router_mac.as_str()) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no neighbour entry {ON_LINK} -> {router_mac} at the client within {ARRIVAL:?} \
             (gratuitous ARP): {n:?}\n{}",
            natd.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // On the link: no route via the router.
    let route = topo.client.ip(&["route", "get", &ON_LINK.to_string()])?;
    assert!(!route.contains(" via "), "{route}");

    natctl.firewall_add(ON_LINK, &["--proto", "icmp"])?;
    let sniffer = IcmpSniffer::open_in(&topo.guest)?;
    let p = ping(&topo.client, ON_LINK, 3, 56)?;
    assert_eq!((p.transmitted, p.received), (3, 3), "{}", p.output);
    assert_eq!(p.reply_from, [ON_LINK; 3], "{}", p.output);
    let requests = sniffer.collect(3, |s| s.icmp_type == ICMP_ECHO_REQUEST);
    let seen: Vec<_> = requests.iter().map(|r| (r.src, r.dst)).collect();
    assert_eq!(seen, [(CLIENT_ADDR, GUEST_ADDR); 3], "at the guest");
    let n = topo.client.neighbour(ON_LINK, HOST_IF)?;
    assert_eq!(n.and_then(|n| n.lladdr), Some(router_mac), "after the ping");

    natctl.ok(&["mapping", "del", &ON_LINK.to_string()])?;
    assert_eq!(
        topo.router.ipv4_addrs(ROUTER_PUBLIC_IF)?,
        [own],
        "{}",
        natd.log_text()
    );
    Ok(())
}
