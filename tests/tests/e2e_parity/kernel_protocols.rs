//! UDP-Lite and DCCP on the kernel path: what the XDP program hands to the kernel untranslated
//! (a first packet whose next hop has no neighbour entry, IP options, fragments) leaves the
//! router translated with checksums valid for the addresses it leaves with, or not at all
//! (counted); and nothing from a mapped private address ever leaves a public interface
//! untranslated, whatever the protocol. The kernel's own trackers fail both protocols (this
//! kernel deems every UDP-Lite datagram from the wire INVALID, and has no DCCP tracker), so
//! natd's table translates UDP-Lite itself and drops what of DCCP the kernel cannot translate.
//!
//! Raw sockets at both ends send the packets and see every one of the protocol that arrives,
//! with its addresses and checksums ([`Sniffer`]); that a packet took the kernel path is
//! observed (natd's pass reason, or the router's reassembly counter).
use std::net::Ipv4Addr;

use anyhow::{Context as _, ensure};
use nat_tests::{
    packet::{DCCP_REQUEST, PROTO_DCCP, PROTO_UDP, PROTO_UDPLITE, dccp, udplite},
    topology::{
        CLIENT_ADDR, GUEST_ADDR, Natd, Netns, PUBLIC_ADDR, ROUTER_PUBLIC_IF, Topology,
        observe::payload,
        sniff::{Seen, Sniffer},
    },
};

use super::{ONE_MAPPING, counted};

/// Four NOPs: IP options the XDP program passes to the kernel.
const NOPS: [u8; 4] = [1, 1, 1, 1];

/// Waits for the packet whose transport header and payload are `l4` but for the checksum
/// (bytes 6 and 7 in UDP, UDP-Lite and DCCP) at `at`; it must have come `src` -> `dst` with
/// valid checksums, and nothing that arrived before it may have leaked ([`leaked`]).
fn arrives(
    at: &Sniffer,
    what: &str,
    l4: &[u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
) -> anyhow::Result<()> {
    let same = |p: &Seen| p.l4.len() == l4.len() && p.l4[..6] == l4[..6] && p.l4[8..] == l4[8..];
    let mut seen = at.until(same);
    let Some(p) = seen.pop().filter(same) else {
        anyhow::bail!(
            "{what} did not arrive (other packets: {:?})",
            summary(&seen)
        );
    };
    ensure!(
        !seen.iter().any(leaked),
        "before {what}, leaked: {:?}",
        summary(&seen)
    );
    ensure!(
        (p.src, p.dst) == (src, dst),
        "{what} arrived {} -> {}, not {src} -> {dst}",
        p.src,
        p.dst
    );
    ensure!(
        p.checksums.is_ok(),
        "{what} arrived {src} -> {dst} with a bad checksum: {:?}",
        p.checksums
    );
    Ok(())
}

/// A packet that arrived on the public side from a private address, or whose checksum does
/// not hold for the addresses it arrived with.
fn leaked(p: &Seen) -> bool {
    p.src.is_private() || p.checksums.is_err()
}

/// Addresses and checksum verdicts of `seen`, for messages.
fn summary(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .map(|p| format!("{} -> {} {:?}", p.src, p.dst, p.checksums))
        .collect()
}

/// Nothing of the protocol that arrived at `at` in `ns` and was not looked at yet leaked.
fn nothing_leaked(at: &Sniffer, ns: &Netns) -> anyhow::Result<()> {
    let seen = at.pending();
    ensure!(
        !seen.iter().any(leaked),
        "{} received: {:?}",
        ns.name(),
        summary(&seen)
    );
    Ok(())
}

/// UDP-Lite from the guest whose first datagram meets an unresolved neighbour, an answer
/// with IP options, a fragmented answer and a fragmented datagram from the guest: each is
/// handed to the kernel, and each arrives translated with a UDP-Lite checksum valid for the
/// addresses it arrives with (natd's table translates what the kernel deems INVALID); never
/// with the guest's private address.
#[test]
fn udplite_the_kernel_gets_arrives_translated_both_ways() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let (guest, client) = (
        Sniffer::open_in(&topo.guest, PROTO_UDPLITE)?,
        Sniffer::open_in(&topo.client, PROTO_UDPLITE)?,
    );
    let (g, c) = (5001, 5002);

    topo.router
        .ip(&["neigh", "flush", "dev", ROUTER_PUBLIC_IF])?;
    let first = udplite(GUEST_ADDR, CLIENT_ADDR, g, c, b"first", 0);
    counted(
        &natctl,
        "no_neighbour",
        "the guest's first datagram",
        || guest.send(&first, CLIENT_ADDR),
    )?;
    arrives(
        &client,
        "the first datagram",
        &first,
        PUBLIC_ADDR,
        CLIENT_ADDR,
    )?;

    let answer = udplite(CLIENT_ADDR, PUBLIC_ADDR, c, g, b"with options", 0);
    counted(&natctl, "ip_options", "the answer with IP options", || {
        client.send_with_options(&answer, PUBLIC_ADDR, &NOPS)
    })?;
    arrives(
        &guest,
        "the answer with IP options",
        &answer,
        CLIENT_ADDR,
        GUEST_ADDR,
    )?;

    let reassembled = topo.router.ip_counter("ReasmOKs")?;
    let big_answer = udplite(CLIENT_ADDR, PUBLIC_ADDR, c, g, &payload(3000), 0);
    client.send(&big_answer, PUBLIC_ADDR)?;
    arrives(
        &guest,
        "the fragmented answer",
        &big_answer,
        CLIENT_ADDR,
        GUEST_ADDR,
    )?;
    // Partial coverage (RFC 3828 §3.1): the first 8 bytes of payload.
    let big = udplite(GUEST_ADDR, CLIENT_ADDR, g, c, &payload(3000), 16);
    guest.send(&big, CLIENT_ADDR)?;
    arrives(
        &client,
        "the guest's fragmented datagram",
        &big,
        PUBLIC_ADDR,
        CLIENT_ADDR,
    )?;
    ensure!(
        topo.router.ip_counter("ReasmOKs")? - reassembled >= 2,
        "the router did not reassemble both fragmented datagrams (not the kernel path)"
    );
    nothing_leaked(&client, &topo.client)?;
    ensure!(
        topo.nft_counter("udplite_stateless")? >= 4,
        "natd's table translated fewer than the 4 datagrams"
    );
    Ok(())
}

/// Whether the router's kernel tracks DCCP itself (6.1 does, 6.18 does not).
fn kernel_tracks_dccp(topo: &Topology) -> anyhow::Result<bool> {
    let out = topo.router.bounded(
        topo.router
            .command("sysctl")
            .args(["-n", "net.netfilter.nf_conntrack_dccp_timeout_request"]),
    )?;
    Ok(out.status.success())
}

/// A DCCP-Request from the guest meets an unresolved neighbour and goes to the kernel: where
/// the kernel tracks DCCP it translates it (checksum included) and it arrives from P with a
/// valid checksum; where it does not (6.18), its NAT would leave the checksum stale, so natd's
/// table drops it and counts it `untranslatable`. Either way nothing arrives from the private
/// address or with a stale checksum; the next Request, through the fast path once the
/// neighbour is resolved, arrives.
#[test]
fn dccp_the_kernel_cannot_translate_is_dropped_never_corrupted() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let tracked = kernel_tracks_dccp(&topo)?;
    let (guest, client) = (
        Sniffer::open_in(&topo.guest, PROTO_DCCP)?,
        Sniffer::open_in(&topo.client, PROTO_DCCP)?,
    );
    topo.router
        .ip(&["neigh", "flush", "dev", ROUTER_PUBLIC_IF])?;
    let request = dccp(GUEST_ADDR, CLIENT_ADDR, 5001, 5002, DCCP_REQUEST, 0, &[]);
    counted(&natctl, "no_neighbour", "the guest's DCCP-Request", || {
        guest.send(&request, CLIENT_ADDR)
    })?;
    if tracked {
        arrives(
            &client,
            "the DCCP-Request",
            &request,
            PUBLIC_ADDR,
            CLIENT_ADDR,
        )?;
    }
    // Where natd dropped it, before the kernel sent it, the kernel did not resolve the
    // neighbour: other traffic does (here the router's ping), and the next Request takes the
    // fast path.
    topo.router.exec(
        "ping",
        &["-n", "-q", "-c", "1", "-W", "5", &CLIENT_ADDR.to_string()],
    )?;
    let again = dccp(GUEST_ADDR, CLIENT_ADDR, 5003, 5002, DCCP_REQUEST, 0, &[]);
    counted(
        &natctl,
        "outbound_forwarded",
        "the next DCCP-Request",
        || guest.send(&again, CLIENT_ADDR),
    )?;
    arrives(
        &client,
        "the next DCCP-Request",
        &again,
        PUBLIC_ADDR,
        CLIENT_ADDR,
    )
    .context("the fast path's")?;
    nothing_leaked(&client, &topo.client)?;
    let dropped = topo.nft_counter("untranslatable")?;
    ensure!(
        dropped == u64::from(!tracked),
        "{dropped} DCCP packets counted untranslatable"
    );
    Ok(())
}

/// Makes the UDP checksum of datagram `d` wrong.
fn spoil_checksum(d: &mut [u8]) {
    d[6] ^= 0x5a;
}

/// The safety net, for any protocol: a UDP datagram from the guest with a bad checksum meets
/// an unresolved neighbour, goes to the kernel, whose connection tracking deems it INVALID so
/// its NAT never translates it; it is dropped at the public interface (counted
/// `untranslated`) instead of leaving with the guest's private address. A good datagram after
/// it arrives from P.
#[test]
fn nothing_leaves_a_public_interface_from_a_mapped_private_address() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let (guest, client) = (
        Sniffer::open_in(&topo.guest, PROTO_UDP)?,
        Sniffer::open_in(&topo.client, PROTO_UDP)?,
    );
    topo.router
        .ip(&["neigh", "flush", "dev", ROUTER_PUBLIC_IF])?;
    let mut bad = nat_tests::packet::udp(GUEST_ADDR, CLIENT_ADDR, 6001, 6002, b"bad", true);
    spoil_checksum(&mut bad);
    counted(
        &natctl,
        "no_neighbour",
        "the datagram with a bad checksum",
        || guest.send(&bad, CLIENT_ADDR),
    )?;
    let good = nat_tests::packet::udp(GUEST_ADDR, CLIENT_ADDR, 6001, 6002, b"good", true);
    guest.send(&good, CLIENT_ADDR)?;
    arrives(
        &client,
        "the good datagram",
        &good,
        PUBLIC_ADDR,
        CLIENT_ADDR,
    )?;
    nothing_leaked(&client, &topo.client)?;
    let dropped = topo.nft_counter("untranslated")?;
    ensure!(dropped == 1, "{dropped} datagrams counted untranslated");
    // natd reports its table's counters (natctl stats, and the metrics from the same report).
    let reported = natctl.stats()?.slow_path;
    let untranslated = reported.iter().find(|c| c.name == "untranslated");
    ensure!(
        untranslated.is_some_and(|c| c.packets == dropped && c.bytes > 0),
        "natd reports {reported:?}, nft counted {dropped} untranslated"
    );
    Ok(())
}
