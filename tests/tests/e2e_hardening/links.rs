//! The router's interfaces going away under natd: link down and up (XDP stays attached, the
//! same program), and an interface deleted and created again under the same name (natd
//! notices and attaches to the new one, told by a link event); the kernel events natd
//! subscribes to, one of each kind, and the neighbours there were when it subscribed.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use aya::maps::{HashMap, Map, MapData};
use nat_common::IfaceConfig;
use nat_tests::netns::NetnsGuard;
use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, HOST_IF, Natctl, Natd, PUBLIC_ADDR, ROUTER_GUEST_IF,
    ROUTER_PUBLIC_ADDR, ROUTER_PUBLIC_IF, Topology, observe::udp_exchange, policy::reason,
};
use nat_userspace::kernel_events::{KernelEvent, KernelEvents};

use crate::common::*;

/// How long natd may take to notice an interface that came back.
const REATTACH: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(250);

/// The id of the XDP program attached to `dev` in the router (`prog/xdp id N` of `ip -d link`).
fn xdp_prog(topo: &Topology, dev: &str) -> anyhow::Result<Option<u32>> {
    let text = topo.router_link(dev)?;
    Ok(text
        .split_once("prog/xdp id ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|id| id.parse().ok()))
}

/// Waits until `dev` in the router is up with a carrier.
fn wait_up(topo: &Topology, dev: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = topo.router.ip(&["link", "show", "dev", dev])?;
        if text.contains("LOWER_UP") && text.contains("state UP") {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{dev} did not come up: {text}");
        std::thread::sleep(POLL);
    }
}

/// A UDP round trip client -> P -> guest, translated both ways, counted by the fast path:
/// returns once `inbound_forwarded` grew (the first datagram after a link change may take
/// the slow path while the router resolves its neighbour again).
fn translated_by_xdp(topo: &Topology, natctl: &Natctl, port: u16) -> anyhow::Result<()> {
    let before = reason(&natctl.stats()?, "inbound_forwarded")?;
    for attempt in 0..5u16 {
        let seen = udp_exchange(
            &topo.guest,
            at(GUEST_ADDR, port + attempt),
            &topo.client,
            at(PUBLIC_ADDR, port + attempt),
            256,
        )?;
        ensure!(
            seen.server_saw.ip() == CLIENT_ADDR && seen.client_saw.ip() == PUBLIC_ADDR,
            "not translated: {seen:?}"
        );
        if reason(&natctl.stats()?, "inbound_forwarded")? > before {
            return Ok(());
        }
    }
    anyhow::bail!("5 round trips to P:{port}.. arrived, but none through the XDP fast path")
}

/// Both router interfaces go down and up, three times: the program stays attached (same id)
/// and translates in XDP again as soon as the links are up.
#[test]
fn link_down_and_up_keeps_xdp_attached_and_translating() -> anyhow::Result<()> {
    const CYCLES: &str = "link down/up cycles (both interfaces)";
    const DETACHED: &str = "cycles after which XDP was detached or replaced";
    const SLOW: &str = "cycles after which the fast path did not translate";
    let mut fig = Figures::new("interfaces");
    fig.add(DETACHED, 0);
    fig.add(SLOW, 0);
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING_OPEN))?;
    let natctl = natd.natctl()?;
    translated_by_xdp(&topo, &natctl, 7000)?;
    let progs: Vec<_> = [ROUTER_PUBLIC_IF, ROUTER_GUEST_IF]
        .iter()
        .map(|dev| xdp_prog(&topo, dev)?.with_context(|| format!("no XDP on {dev}")))
        .collect::<anyhow::Result<_>>()?;
    const FLAPS: u16 = 3;
    for round in 1..=FLAPS {
        for dev in [ROUTER_PUBLIC_IF, ROUTER_GUEST_IF] {
            topo.router.ip(&["link", "set", dev, "down"])?;
            topo.router.ip(&["link", "set", dev, "up"])?;
        }
        fig.add(CYCLES, 1);
        let mut attached = Vec::new();
        for dev in [ROUTER_PUBLIC_IF, ROUTER_GUEST_IF] {
            wait_up(&topo, dev)?;
            attached.push(xdp_prog(&topo, dev)?);
        }
        let same = attached.iter().zip(&progs).all(|(a, p)| *a == Some(*p));
        fig.add(DETACHED, u64::from(!same));
        ensure!(
            same,
            "after link down/up {round}, the interfaces run XDP programs {attached:?}, not \
             {progs:?}"
        );
        let translated = translated_by_xdp(&topo, &natctl, 7000 + 10 * round);
        fig.add(SLOW, u64::from(translated.is_err()));
        translated.with_context(|| format!("after link down/up {round}"))?;
    }
    fig.done();
    Ok(())
}

/// The router's own address on interface `ifindex` as natd's pinned interface map holds it
/// (`None`: no entry, or no address), read from bpffs without natd.
fn pinned_iface_addr(topo: &Topology, ifindex: u32) -> anyhow::Result<Option<Ipv4Addr>> {
    let path = Natd::pin_dir(topo)
        .join("maps")
        .join(nat_common::MAP_IFACES);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let m: HashMap<MapData, u32, IfaceConfig> = Map::from_map_data(data)?.try_into()?;
    Ok(m.get(&ifindex, 0)
        .ok()
        .filter(|c| c.addr != 0)
        .map(|c| Ipv4Addr::from(c.addr.to_ne_bytes())))
}

/// Deletes the router's public interface (and with it the client's end of the link) and
/// creates it again with the same name and addresses.
fn recreate_public_link(topo: &Topology) -> anyhow::Result<()> {
    topo.router.ip(&["link", "del", ROUTER_PUBLIC_IF])?;
    topo.router.ip(&[
        "link",
        "add",
        ROUTER_PUBLIC_IF,
        "type",
        "veth",
        "peer",
        "name",
        HOST_IF,
        "netns",
        topo.client.name(),
    ])?;
    let (router, client) = (
        format!("{ROUTER_PUBLIC_ADDR}/24"),
        format!("{CLIENT_ADDR}/24"),
    );
    topo.router
        .ip(&["addr", "add", &router, "dev", ROUTER_PUBLIC_IF])?;
    topo.router.ip(&["link", "set", ROUTER_PUBLIC_IF, "up"])?;
    topo.client.ip(&["addr", "add", &client, "dev", HOST_IF])?;
    topo.client.ip(&["link", "set", HOST_IF, "up"])?;
    let via = ROUTER_PUBLIC_ADDR.to_string();
    topo.client
        .ip(&["route", "add", "203.0.113.0/24", "via", &via])?;
    topo.client
        .exec("ethtool", &["-K", HOST_IF, "gro", "on", "tx", "off"])?;
    wait_up(topo, ROUTER_PUBLIC_IF)
}

/// The public interface is deleted and created again with the same name: within a few
/// seconds natd attaches to the new interface (its status shows the new ifindex, its log
/// says so) and translation continues in XDP.
#[test]
fn a_deleted_and_recreated_interface_is_attached_again() -> anyhow::Result<()> {
    let mut fig = Figures::new("interfaces");
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING_OPEN))?;
    let natctl = natd.natctl()?;
    translated_by_xdp(&topo, &natctl, 7000)?;
    let log_before = natd.log_text().len();
    let ifindex = |natctl: &Natctl| -> anyhow::Result<Option<u32>> {
        let status: nat_userspace::api::StatusReport =
            serde_json::from_str(&natctl.ok(&["status", "--json"])?)?;
        Ok(status
            .interfaces
            .iter()
            .find(|a| a.name == ROUTER_PUBLIC_IF)
            .map(|a| a.ifindex))
    };
    let old = ifindex(&natctl)?.context("natd lists no pub0")?;

    recreate_public_link(&topo)?;
    fig.add("interfaces deleted and re-created", 1);
    fig.add("re-created interfaces natd attached to within 10 s", 0);
    let deadline = Instant::now() + REATTACH;
    loop {
        let listed = ifindex(&natctl)?;
        if xdp_prog(&topo, ROUTER_PUBLIC_IF)?.is_some() && listed.is_some_and(|i| i != old) {
            fig.add("re-created interfaces natd attached to within 10 s", 1);
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "natd did not attach to the new {ROUTER_PUBLIC_IF} within {REATTACH:?} (natd lists \
             ifindex {listed:?}, was {old}; XDP {:?}):\n{}",
            xdp_prog(&topo, ROUTER_PUBLIC_IF)?,
            natd.log_text()
        );
        std::thread::sleep(POLL);
    }
    let log = natd.log_text();
    let after = &log[log_before.min(log.len())..];
    ensure!(
        after
            .lines()
            .any(|l| l.contains(ROUTER_PUBLIC_IF) && l.to_lowercase().contains("attach")),
        "natd's log does not say it attached to the new {ROUTER_PUBLIC_IF}:\n{after}"
    );
    // The fast path knows the new interface's own address, added after it was created.
    let new = ifindex(&natctl)?.context("natd lists no pub0")?;
    let deadline = Instant::now() + REATTACH;
    loop {
        let addr = pinned_iface_addr(&topo, new)?;
        if addr == Some(ROUTER_PUBLIC_ADDR) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the fast path's entry of the new {ROUTER_PUBLIC_IF} (ifindex {new}) has address \
             {addr:?}, not {ROUTER_PUBLIC_ADDR}:\n{}",
            natd.log_text()
        );
        std::thread::sleep(POLL);
    }
    let translated = translated_by_xdp(&topo, &natctl, 7100);
    fig.set(
        "re-created interfaces the fast path translated on",
        u64::from(translated.is_ok()),
    );
    translated?;
    fig.done();
    Ok(())
}

/// How long a kernel event may take to arrive.
const EVENT: Duration = Duration::from_secs(5);

/// The first event `pick` accepts within [`EVENT`], or an error listing what came instead.
async fn next_event<T>(
    events: &mut KernelEvents,
    what: &str,
    mut pick: impl FnMut(&KernelEvent) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + EVENT;
    let mut other = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(ev)) => match pick(&ev) {
                Some(t) => return Ok(t),
                None => other.push(ev),
            },
            Ok(None) => anyhow::bail!("the event stream ended waiting for {what}; saw {other:?}"),
            Err(_) => anyhow::bail!("no {what} within {EVENT:?}; saw {other:?}"),
        }
    }
}

/// natd's kernel-event subscription (`nat_userspace::kernel_events`) in a namespace of its own:
/// a link created, brought up, given an address (and with it a route), a route, a neighbour and
/// a policy rule entered, and the link deleted each arrive as their typed event.
#[test]
fn kernel_events_report_links_addresses_routes_neighbours_and_rules() -> anyhow::Result<()> {
    let ns = NetnsGuard::new()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut events = KernelEvents::subscribe().await?;
        ns.ip(&["link", "add", "xk0", "type", "veth", "peer", "name", "xk1"])?;
        let ifindex = next_event(&mut events, "xk0 added", |e| match e {
            KernelEvent::LinkAdded { ifindex, name } if name == "xk0" => Some(*ifindex),
            _ => None,
        })
        .await?;
        ns.ip(&["link", "set", "xk1", "up"])?;
        ns.ip(&["link", "set", "xk0", "up"])?;
        next_event(&mut events, "xk0 changed", |e| {
            matches!(e, KernelEvent::LinkChanged { ifindex: i, name } if *i == ifindex && name == "xk0")
                .then_some(())
        })
        .await?;
        let here = Ipv4Addr::new(192, 0, 2, 1);
        ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "xk0"])?;
        next_event(&mut events, "192.0.2.1/24 on xk0", |e| {
            (*e == KernelEvent::AddressChanged {
                ifindex,
                addr: here,
                prefix: 24,
                label: Some("xk0".into()),
                removed: false,
            })
            .then_some(())
        })
        .await?;
        let net = Ipv4Addr::new(198, 51, 100, 0);
        let gw = Ipv4Addr::new(192, 0, 2, 2);
        ns.ip(&["route", "add", "198.51.100.0/24", "via", "192.0.2.2"])?;
        next_event(&mut events, "the route to 198.51.100.0/24", |e| match e {
            KernelEvent::RouteChanged {
                dst,
                prefix: 24,
                oif,
                gateway,
                removed: false,
                ..
            } if *dst == net => Some((*oif, *gateway)),
            _ => None,
        })
        .await
        .and_then(|(oif, gateway)| {
            ensure!(
                (oif, gateway) == (Some(ifindex), Some(gw)),
                "route via {gateway:?} dev {oif:?}"
            );
            Ok(())
        })?;
        ns.ip(&[
            "neigh", "add", "192.0.2.2", "lladdr", "02:00:00:00:00:02", "dev", "xk0",
        ])?;
        next_event(&mut events, "the neighbour 192.0.2.2", |e| match e {
            KernelEvent::NeighbourChanged {
                ifindex: i,
                addr,
                lladdr,
                removed: false,
                ..
            } if *i == ifindex && *addr == gw => Some(*lladdr),
            _ => None,
        })
        .await
        .and_then(|l| {
            ensure!(l == Some([2, 0, 0, 0, 0, 2]), "lladdr {l:?}");
            Ok(())
        })?;
        ns.ip(&[
            "rule", "add", "from", "192.0.2.1", "table", "100", "priority", "1000",
        ])?;
        next_event(&mut events, "the rule from 192.0.2.1", |e| {
            matches!(
                e,
                KernelEvent::RuleChanged {
                    priority: 1000,
                    table: 100,
                    removed: false,
                    ..
                }
            )
            .then_some(())
        })
        .await?;
        ns.ip(&["link", "del", "xk0"])?;
        next_event(&mut events, "xk0 removed", |e| {
            (*e == KernelEvent::LinkRemoved {
                ifindex,
                name: "xk0".into(),
            })
            .then_some(())
        })
        .await?;
        anyhow::Ok(())
    })
}

/// Neighbours the kernel had before natd subscribed are reported first, with their link-layer
/// addresses: natd knows what a flow's cached route was resolved to even if the neighbour
/// never changed since (and so notices when it moves or goes).
#[test]
fn kernel_events_report_the_neighbours_there_were_first() -> anyhow::Result<()> {
    let ns = NetnsGuard::new()?;
    ns.ip(&["link", "add", "xk0", "type", "veth", "peer", "name", "xk1"])?;
    ns.ip(&["link", "set", "xk0", "up"])?;
    ns.ip(&[
        "neigh",
        "add",
        "192.0.2.7",
        "lladdr",
        "02:00:00:00:00:07",
        "dev",
        "xk0",
        "nud",
        "permanent",
    ])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut events = KernelEvents::subscribe().await?;
        let lladdr = next_event(&mut events, "the neighbour 192.0.2.7", |e| match e {
            KernelEvent::NeighbourChanged {
                addr,
                lladdr,
                removed: false,
                ..
            } if *addr == Ipv4Addr::new(192, 0, 2, 7) => Some(*lladdr),
            _ => None,
        })
        .await?;
        ensure!(lladdr == Some([2, 0, 0, 0, 0, 7]), "lladdr {lladdr:?}");
        anyhow::Ok(())
    })
}
