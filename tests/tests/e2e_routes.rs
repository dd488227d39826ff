//! End to end: the fast path's cached routes meet changes of the router's routes and
//! neighbours in the middle of a TCP transfer (the guest sends a byte pattern to the client
//! side; see `nat_tests::topology`). natd hears of each change (netlink) and bumps the route
//! generation, so each flow resolves its route again on its next packet:
//! - the route to the client moves to a new gateway on another link: the data arrives through
//!   the new gateway, at its MAC;
//! - the client's link-layer address changes (and the router's neighbour entry with it): the
//!   data arrives at the new MAC, none at the old one afterwards;
//! - `ip neigh flush` on the router: the flow goes to the kernel while its neighbours are
//!   resolved again, then back to the fast path.
//!
//! Each time the byte stream arrives whole on its one connection, and the fast path carried
//! every packet that arrived and the kernel none (`topology::fastpath`): from the change on
//! (the transfer paused until nothing of it was on the way, then changed), or for the flush,
//! from the neighbours' return on. Nothing waits for a time: each step waits, bounded, for
//! what proves it.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, HOST_IF, Natctl, Natd, NatdOptions, Netns, PUBLIC_ADDR,
    ROUTER_GUEST_IF, ROUTER_PUBLIC_IF, Topology,
    capture::FrameCounter,
    fastpath::{self, Arrived},
    links::Link,
    observe::ARRIVAL,
    policy,
    stream::TcpTransfer,
};
use nat_userspace::api::StatsReport;

/// One mapping, no rules: the guest opens the flows (egress is allowed by default).
const ONE_MAPPING: &str = "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n";
/// One 8 KiB chunk every 2 ms.
const WRITE_PACE: Duration = Duration::from_millis(2);
/// Bytes the client must have read before a change, and in each phase after it.
const PHASE_BYTES: u64 = 512 * 1024;
const PORT: u16 = 9000;
const POLL: Duration = Duration::from_millis(10);

/// The client's address behind a gateway: the route to it is what moves.
const FAR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 50);
/// The client's second link to the router: the new gateway's side of it is `eth1`.
const NEW_LINK: Link<'static> = Link {
    router_if: "pub1",
    router_addr: Ipv4Addr::new(192, 0, 2, 129),
    peer_addr: Ipv4Addr::new(192, 0, 2, 130),
    prefix: 25,
};
const NEW_IF: &str = "eth1";
/// The link-layer address the client's `eth0` moves to.
const MOVED_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x5e, 0x02];

struct Bench {
    // Field order is drop order: natd stops before the namespaces go.
    natd: Natd,
    topo: Topology,
}

impl Bench {
    fn start(topo: Topology, public_ifaces: &[&str]) -> anyhow::Result<Self> {
        let natd = Natd::start_with(
            &topo,
            &NatdOptions {
                public_ifaces: public_ifaces.iter().map(|s| s.to_string()).collect(),
                config: Some(ONE_MAPPING.into()),
                ..NatdOptions::default()
            },
        )?;
        Ok(Self { natd, topo })
    }

    /// The guest connects to `to`:[`PORT`] (a listener in the client namespace) and starts
    /// sending; returns once the client read a phase's worth, through P.
    fn transfer(&self, to: Ipv4Addr) -> anyhow::Result<TcpTransfer> {
        let at = SocketAddrV4::new(to, PORT);
        let t = TcpTransfer::start(&self.topo.client, at, &self.topo.guest, at, WRITE_PACE)?;
        t.wait_received(PHASE_BYTES)?;
        Ok(t)
    }
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn mac_of(ns: &Netns, dev: &str) -> anyhow::Result<[u8; 6]> {
    let text = ns.mac(dev)?;
    let bytes = text
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("MAC {text}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC {text}: not 6 bytes"))
}

/// Waits up to [`ARRIVAL`] until `done` holds.
fn wait_until(what: &str, done: impl Fn() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + ARRIVAL;
    while !done()? {
        ensure!(Instant::now() < deadline, "{what}: not within {ARRIVAL:?}");
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// natd's counters and the segments each end of `transfer` received, at a point where nothing
/// of it is on the way (the transfer is left paused).
struct Settled {
    stats: StatsReport,
    /// (guest, client)
    segs: (u64, u64),
}

fn settle(natctl: &Natctl, transfer: &TcpTransfer) -> anyhow::Result<Settled> {
    transfer.pause()?;
    let segs = transfer.segs_in()?;
    Ok(Settled {
        stats: natctl.stats()?,
        segs,
    })
}

/// Resumes `transfer` for a phase's worth more, then ends it: every packet of it that arrived
/// from `from` on (segments at the client, and at the guest) was forwarded by the fast path
/// and none passed to the kernel; the byte stream arrived whole on its one connection, from P.
fn finish(natctl: &Natctl, transfer: TcpTransfer, from: &Settled) -> anyhow::Result<()> {
    transfer.resume();
    transfer.wait_received(transfer.received() + PHASE_BYTES)?;
    let end = settle(natctl, &transfer)?;
    let ((guest0, client0), (guest1, client1)) = (from.segs, end.segs);
    fastpath::carried(
        &from.stats,
        &end.stats,
        &[
            Arrived::new(
                "outbound_forwarded",
                client1 - client0,
                "segments at the client",
            ),
            Arrived::new(
                "inbound_forwarded",
                guest1 - guest0,
                "segments at the guest",
            ),
        ],
    )?;
    let tally = transfer.stop()?;
    ensure!(
        tally.received == tally.written && tally.confirmed == tally.written,
        "the byte stream did not arrive whole: {tally:?}"
    );
    ensure!(
        tally.server_peer.ip() == PUBLIC_ADDR,
        "the client saw the connection come from {}, not P: {tally:?}",
        tally.server_peer
    );
    Ok(())
}

/// The route to the client's address moves from the gateway on pub0 to a new one on a second
/// link (pub1) while the guest sends: its data goes on through the new gateway (frames at its
/// MAC) and, once there, none through the old one; the fast path carried every packet from
/// the change on.
#[test]
fn a_route_moved_to_a_new_gateway_mid_transfer_loses_nothing() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    topo.add_client_address(FAR)?;
    topo.add_link(&topo.client, NEW_IF, NEW_LINK)?;
    // The data comes in on eth1 from P, whose route leaves through eth0: no reverse-path
    // filter in the client, whatever the host's default.
    let no_rp_filter = format!("net.ipv4.conf.{NEW_IF}.rp_filter=0");
    topo.client.exec(
        "sysctl",
        &["-qw", "net.ipv4.conf.all.rp_filter=0", &no_rp_filter],
    )?;
    let b = Bench::start(topo, &[ROUTER_PUBLIC_IF, NEW_LINK.router_if])?;
    let natctl = b.natd.natctl()?;
    let (old_mac, new_mac) = (
        mac_of(&b.topo.client, HOST_IF)?,
        mac_of(&b.topo.client, NEW_IF)?,
    );
    let (old_path, new_path) = (
        FrameCounter::start(&b.topo.client, HOST_IF, FAR)?,
        FrameCounter::start(&b.topo.client, NEW_IF, FAR)?,
    );
    let transfer = b.transfer(FAR)?;
    let start = settle(&natctl, &transfer)?;
    ensure!(
        old_path.to(old_mac) > 0 && new_path.to(new_mac) == 0,
        "before the change the data must come through the old gateway: {:?} / {:?}",
        old_path.counts(),
        new_path.counts()
    );

    let (far, gw) = (format!("{FAR}/32"), NEW_LINK.peer_addr.to_string());
    b.topo.router.ip(&[
        "route",
        "replace",
        &far,
        "via",
        &gw,
        "dev",
        NEW_LINK.router_if,
    ])?;
    transfer.resume();
    wait_until("data frames at the new gateway's MAC", || {
        Ok(new_path.to(new_mac) > 0)
    })?;
    transfer.wait_received(transfer.received() + PHASE_BYTES)?;
    settle(&natctl, &transfer)?;
    let (old0, new0) = (old_path.to(old_mac), new_path.to(new_mac));
    finish(&natctl, transfer, &start)?;
    let (old1, new1) = (old_path.to(old_mac), new_path.to(new_mac));
    ensure!(
        new1 > new0 && old1 == old0,
        "once at the new gateway every frame must go there ({new0} -> {new1} frames at {}), \
         none to the old one ({old0} -> {old1} at {})",
        mac_text(new_mac),
        mac_text(old_mac)
    );
    Ok(())
}

/// The client's `eth0` takes another link-layer address and the router's neighbour entry
/// follows (as a gratuitous ARP would make it) while the guest sends: frames to the old
/// address, which the client drops, stop; the data arrives at the new one; the fast path
/// carried every packet from the change on.
#[test]
fn a_gateway_mac_change_mid_transfer_loses_nothing() -> anyhow::Result<()> {
    let b = Bench::start(Topology::new()?, &[ROUTER_PUBLIC_IF])?;
    let natctl = b.natd.natctl()?;
    let old_mac = mac_of(&b.topo.client, HOST_IF)?;
    let capture = FrameCounter::start(&b.topo.client, HOST_IF, CLIENT_ADDR)?;
    let transfer = b.transfer(CLIENT_ADDR)?;
    let start = settle(&natctl, &transfer)?;

    let (new, client) = (mac_text(MOVED_MAC), CLIENT_ADDR.to_string());
    b.topo
        .client
        .ip(&["link", "set", "dev", HOST_IF, "address", &new])?;
    b.topo.router.ip(&[
        "neigh",
        "replace",
        &client,
        "lladdr",
        &new,
        "dev",
        ROUTER_PUBLIC_IF,
        "nud",
        "reachable",
    ])?;
    transfer.resume();
    wait_until("data frames at the client's new MAC", || {
        Ok(capture.to(MOVED_MAC) > 0)
    })?;
    transfer.wait_received(transfer.received() + PHASE_BYTES)?;
    settle(&natctl, &transfer)?;
    let (old0, new0) = (capture.to(old_mac), capture.to(MOVED_MAC));
    finish(&natctl, transfer, &start)?;
    let (old1, new1) = (capture.to(old_mac), capture.to(MOVED_MAC));
    ensure!(
        new1 > new0 && old1 == old0,
        "once at the new MAC every frame must go there ({new0} -> {new1} frames to {}), none \
         to the old one ({old0} -> {old1} to {})",
        mac_text(MOVED_MAC),
        mac_text(old_mac)
    );
    Ok(())
}

/// `ip neigh flush all` on the router while the guest sends: natd bumps the generation, the
/// flow's packets find no neighbour and go to the kernel (which translates them by natd's
/// nftables table and resolves both neighbours again), then come back to the fast path,
/// which carries every packet from then on.
#[test]
fn a_neighbour_flush_mid_transfer_loses_nothing() -> anyhow::Result<()> {
    let b = Bench::start(Topology::new()?, &[ROUTER_PUBLIC_IF])?;
    let natctl = b.natd.natctl()?;
    let transfer = b.transfer(CLIENT_ADDR)?;
    let no_neighbour = |s: &_| policy::reason(s, "no_neighbour");
    let before = no_neighbour(&natctl.stats()?)?;

    b.topo.router.ip(&["neigh", "flush", "all"])?;
    natctl.wait_stats("packets passed for want of a neighbour", |s| {
        Ok(no_neighbour(s)? > before)
    })?;
    let resolved = |addr: Ipv4Addr, dev: &str| -> anyhow::Result<bool> {
        Ok(b.topo.router.neighbour(addr, dev)?.is_some_and(|n| {
            n.lladdr.is_some() && !n.state.iter().any(|s| s == "INCOMPLETE" || s == "FAILED")
        }))
    };
    wait_until("both neighbours resolved again", || {
        Ok(resolved(CLIENT_ADDR, ROUTER_PUBLIC_IF)? && resolved(GUEST_ADDR, ROUTER_GUEST_IF)?)
    })?;
    transfer.wait_received(transfer.received() + PHASE_BYTES)?;
    let back = settle(&natctl, &transfer)?;
    finish(&natctl, transfer, &back)
}
