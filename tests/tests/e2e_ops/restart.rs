//! Restarts: natd killed outright while traffic flows, then started again on the same state
//! directory and pins, loses no packet and no connection and comes back with the same state,
//! flows and counters; natd stopped without `--detach-on-exit` leaves a fast path that keeps
//! translating with no natd at all.
use std::{net::Ipv4Addr, time::Duration};

use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, Natd, NatdOptions, PUBLIC_ADDR, ROUTER_GUEST_IF, ROUTER_PUBLIC_IF,
    Topology,
    fastpath::{self, Arrived},
    observe::{ICMP_ECHO_REQUEST, IcmpSniffer, ping, tcp_exchange, udp_exchange},
    stream::{PingStream, TcpTransfer},
};
use nat_userspace::{api::FlowInfo, ebpf::MappingCounters};

use super::{Desired, ONE_MAPPING_OPEN, at, status};

/// A second mapping for the state to have more than one of each kind.
const OTHER_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
/// One echo request every 10 ms.
pub(super) const PING_INTERVAL: Duration = Duration::from_millis(10);
/// One 8 KiB chunk every 5 ms (about 1.6 MB/s).
pub(super) const WRITE_PACE: Duration = Duration::from_millis(5);
/// Progress each phase must show: echo replies, and bytes the guest read.
const PHASE_REPLIES: u64 = 30;
const PHASE_BYTES: u64 = 128 * 1024;

pub(super) fn assert_xdp_attached(topo: &Topology, when: &str) -> anyhow::Result<()> {
    for dev in [ROUTER_PUBLIC_IF, ROUTER_GUEST_IF] {
        let link = topo.router_link(dev)?;
        assert!(
            link.contains("prog/xdp"),
            "{when}: no XDP on {dev}:\n{link}"
        );
    }
    Ok(())
}

/// The tracked flow of the transfer: the client's connection to P:8080, in the guest's view.
pub(super) fn transfer_flow(flows: &[FlowInfo], client_port: u16) -> Option<FlowInfo> {
    flows
        .iter()
        .find(|f| {
            (f.proto, f.guest, f.guest_port, f.remote, f.remote_port)
                == (6, GUEST_ADDR, 8080, CLIENT_ADDR, client_port)
        })
        .cloned()
}

/// Waits until the stream and the transfer both made a phase's progress past where they are.
pub(super) fn progress(pings: &PingStream, transfer: &TcpTransfer) -> anyhow::Result<()> {
    pings.wait_replies(pings.replied() + PHASE_REPLIES)?;
    transfer.wait_received(transfer.received() + PHASE_BYTES)
}

/// natd is killed with SIGKILL (no shutdown code runs) while pings stream to P every 10 ms and
/// a TCP connection to P keeps sending, and started again with the same state directory and
/// pins. With no natd running the fast path keeps translating; the new natd adopts it: no echo
/// request goes unanswered, the one TCP connection delivers every byte, mappings, rules,
/// egress policy, generation and the nftables table are as before, the connection's flow is
/// still tracked, and the counters went on from where they were.
#[test]
fn natd_killed_and_restarted_loses_no_packet_and_no_connection() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let mut first = Natd::start_with(
        &topo,
        &NatdOptions {
            config: Some(ONE_MAPPING_OPEN.into()),
            keep_fast_path: true,
            ..NatdOptions::default()
        },
    )?;
    let natctl = first.natctl()?;
    natctl.ok(&["mapping", "add", "203.0.113.11", "10.0.0.11"])?;
    natctl.firewall_add(
        OTHER_PUBLIC,
        &[
            "--proto",
            "tcp",
            "--ports",
            "22",
            "--cidr",
            "198.51.100.0/24",
        ],
    )?;
    natctl.egress_add(&["--proto", "tcp", "--ports", "25"])?;

    let pings = PingStream::start(&topo.client, PUBLIC_ADDR, PING_INTERVAL)?;
    let transfer = TcpTransfer::start(
        &topo.guest,
        at(GUEST_ADDR, 8080),
        &topo.client,
        at(PUBLIC_ADDR, 8080),
        WRITE_PACE,
    )?;
    let client_port = transfer.client_local().port();
    progress(&pings, &transfer)?;

    let before = Desired::of(&topo, &natctl)?;
    let status_before = status(&natctl)?;
    let flow_before = transfer_flow(&natctl.flows()?.flows, client_port);
    let flow_before = flow_before.expect("the transfer's flow is not tracked before the restart");
    assert_eq!(flow_before.state, "tcp_established", "{flow_before:?}");
    let counters_before: MappingCounters = natctl.counters(PUBLIC_ADDR)?;
    // Every echo request from here on is sent after the counters above were read.
    let sent_before = pings.sent();

    let killed = first.kill()?;
    assert!(!killed.success(), "natd exited by itself: {killed}");
    // Nothing runs natd now, and traffic still flows: the fast path stayed.
    assert_xdp_attached(&topo, "after SIGKILL")?;
    progress(&pings, &transfer)?;

    let second = Natd::start(&topo, Some(ONE_MAPPING_OPEN))?;
    let log = second.log_text();
    assert!(
        log.contains("adopted the pinned fast path"),
        "the new natd did not adopt the fast path:\n{log}"
    );
    let natctl = second.natctl()?;
    progress(&pings, &transfer)?;

    let after = Desired::of(&topo, &natctl)?;
    assert_eq!(after, before, "the state after the restart");
    let status_after = status(&natctl)?;
    for field in [
        "version",
        "mappings",
        "ingress_rules",
        "egress_rules",
        "egress_default_allow",
        "flow_capacity",
        "generation",
        "state_file",
        "bpffs",
    ] {
        assert_eq!(
            status_after[field], status_before[field],
            "status field {field}: before {status_before}, after {status_after}"
        );
    }
    let ifaces = |s: &serde_json::Value| -> Vec<(serde_json::Value, serde_json::Value)> {
        s["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| (i["name"].clone(), i["adopted"].clone()))
            .collect()
    };
    assert_eq!(
        ifaces(&status_after),
        [
            (ROUTER_PUBLIC_IF.into(), true.into()),
            (ROUTER_GUEST_IF.into(), true.into())
        ],
        "{status_after}"
    );
    let flow_after = transfer_flow(&natctl.flows()?.flows, client_port);
    let flow_after = flow_after.expect("the transfer's flow is not tracked after the restart");
    assert_eq!(
        (&flow_after.state, &flow_after.origin),
        (&flow_before.state, &flow_before.origin),
        "{flow_before:?} -> {flow_after:?}"
    );
    let tally = pings.stop()?;
    assert!(
        tally.missing.is_empty() && tally.foreign.is_empty(),
        "{} echo requests sent: {tally:?}",
        tally.sent
    );
    // The echo requests sent since the first look at the counters, and their replies, all went
    // through the fast path: counters that went on from where they were hold at least that
    // much more (reset ones, or a restart that left them to the kernel, would not).
    let later = u64::from(tally.sent) - sent_before;
    let counters_after = natctl.counters(PUBLIC_ADDR)?;
    assert!(
        counters_after.inbound_packets >= counters_before.inbound_packets + later
            && counters_after.outbound_packets >= counters_before.outbound_packets + later,
        "{later} echo requests answered since, counters {counters_before:?} -> {counters_after:?}"
    );
    assert!(counters_after.inbound_bytes > counters_before.inbound_bytes);
    let t = transfer.stop()?;
    assert_eq!(t.server_peer.ip(), CLIENT_ADDR, "{t:?}");
    assert_eq!(
        t.server_peer, t.client_local,
        "the guest saw another connection: {t:?}"
    );
    assert_eq!((t.received, t.confirmed), (t.written, t.written), "{t:?}");
    assert!(t.written >= 3 * PHASE_BYTES, "{t:?}");
    Ok(())
}

/// natd stopped with SIGTERM but without `--detach-on-exit` exits 0 and leaves XDP attached,
/// its pins and its nftables table: with no natd running, ping, UDP and TCP still go through
/// P both ways, translated by the fast path (a natd started afterwards finds them counted).
#[test]
fn natd_stopped_without_detach_leaves_the_fast_path_translating() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let mut natd = Natd::start_with(
        &topo,
        &NatdOptions {
            config: Some(ONE_MAPPING_OPEN.into()),
            keep_fast_path: true,
            ..NatdOptions::default()
        },
    )?;
    let natctl = natd.natctl()?;
    let counters_before = natctl.counters(PUBLIC_ADDR)?;
    let stats_before = natctl.stats()?;
    let status = natd.terminate()?;
    assert!(
        status.success(),
        "natd exited with {status}:\n{}",
        natd.log_text()
    );
    assert!(
        natd.log_text().contains("leaving the fast path attached"),
        "{}",
        natd.log_text()
    );
    let out = natctl.run(&["stats"])?;
    assert!(
        !out.status.success() && out.stderr.contains("natd is not running"),
        "{out:?}"
    );
    assert_xdp_attached(&topo, "after SIGTERM")?;
    assert!(
        Natd::pin_dir(&topo).is_dir(),
        "the pins under {} are gone",
        Natd::pin_dir(&topo).display()
    );
    assert!(topo.nft_table()?.is_some(), "the nftables table is gone");

    let sniffer = IcmpSniffer::open_in(&topo.guest)?;
    let p = ping(&topo.client, PUBLIC_ADDR, 3, 56)?;
    assert_eq!((p.transmitted, p.received), (3, 3), "{}", p.output);
    assert_eq!(p.reply_from, [PUBLIC_ADDR; 3], "{}", p.output);
    let requests = sniffer.collect(3, |s| s.icmp_type == ICMP_ECHO_REQUEST);
    assert_eq!(requests.len(), 3, "{requests:?}");
    for r in &requests {
        assert_eq!((r.src, r.dst), (CLIENT_ADDR, GUEST_ADDR), "{r:?}");
    }
    let tcp = tcp_exchange(
        &topo.guest,
        at(GUEST_ADDR, 8080),
        &topo.client,
        at(PUBLIC_ADDR, 8080),
        64 * 1024,
    )?;
    assert_eq!(tcp.server_peer.ip(), CLIENT_ADDR, "{tcp:?}");
    assert_eq!(tcp.client_confirmed, 64 * 1024);
    let udp = udp_exchange(
        &topo.client,
        at(CLIENT_ADDR, 7000),
        &topo.guest,
        at(CLIENT_ADDR, 7000),
        256,
    )?;
    assert_eq!(udp.server_saw.ip(), PUBLIC_ADDR, "{udp:?}");

    // The fast path, not the kernel's nftables, translated it all: the pinned counters grew by
    // at least what arrived, at the guest (echo requests, TCP segments, the datagram's answer)
    // and at the client (echo replies, TCP segments, the datagram), and no pass reason grew.
    let at_guest = requests.len() as u64 + tcp.server_segs_in + 1;
    let at_client = u64::from(p.received) + tcp.client_segs_in + 1;
    let natd = Natd::start(&topo, None)?;
    let stats_after = natd.natctl()?.stats()?;
    fastpath::carried(
        &stats_before,
        &stats_after,
        &[
            Arrived::new("inbound_forwarded", at_guest, "packets at the guest"),
            Arrived::new("outbound_forwarded", at_client, "packets at the client"),
        ],
    )?;
    let counters_after = natd.natctl()?.counters(PUBLIC_ADDR)?;
    assert!(
        counters_after.inbound_packets - counters_before.inbound_packets >= at_guest
            && counters_after.outbound_packets - counters_before.outbound_packets >= at_client,
        "P's counters grew by less than the {at_guest} packets in and {at_client} out that \
         arrived: {counters_before:?} -> {counters_after:?}"
    );
    Ok(())
}
