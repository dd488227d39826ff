//! The router's interfaces going away under natd: link down and up (XDP stays attached, the
//! same program), and an interface deleted and created again under the same name (natd
//! notices and attaches to the new one).
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, HOST_IF, Natctl, Natd, PUBLIC_ADDR, ROUTER_GUEST_IF,
    ROUTER_PUBLIC_ADDR, ROUTER_PUBLIC_IF, Topology, observe::udp_exchange, policy::reason,
};

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
    let translated = translated_by_xdp(&topo, &natctl, 7100);
    fig.set(
        "re-created interfaces the fast path translated on",
        u64::from(translated.is_ok()),
    );
    translated?;
    fig.done();
    Ok(())
}
