//! Connection tracking as netfilter keeps it: a SYN on a flow an RST closed is new and judged
//! again; ICMP timestamp, information and address-mask queries are tracked like echo; a
//! remote's echo request that reuses a guest ping's identifier is a flow of its own; a flood of
//! new flows does not evict an assured one.
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, HOST_IF, Natd, PUBLIC_ADDR, Topology,
    attempt::{
        TcpAttempt, accept, assert_no_connection, assert_no_datagram, expect_bytes, tcp_listen,
        udp_receive,
    },
    fastpath::{self, Arrived},
    flood,
    observe::{ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IcmpSniffer, udp_bind},
    policy::Way,
    stream::PingStream,
};

use super::{ONE_MAPPING, at, v4};

/// Closes `conn` with an RST (`SO_LINGER` 0), as a remote aborting its connection does.
fn abort(conn: std::net::TcpStream) -> anyhow::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and a correctly sized `linger`.
    let rc = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    ensure!(rc == 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    drop(conn);
    Ok(())
}

/// A rule admits two connections from the client to P:8080 (from ports 40000 and 40001), then
/// is deleted. The first is aborted with an RST, which reaches the guest; a new connection
/// from the same source port is then judged as new, and denied (`inbound_denied`), though its
/// SYN matches the closed flow's tuple. The second connection runs on both ways.
#[test]
fn a_syn_on_a_flow_closed_by_rst_is_judged_again() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let id = natctl.firewall_add(PUBLIC_ADDR, &["--proto", "tcp", "--ports", "8080"])?;
    let listener = tcp_listen(&topo.guest, at(GUEST_ADDR, 8080))?;
    let (closing, staying) = (at(CLIENT_ADDR, 40000), at(CLIENT_ADDR, 40001));
    let first =
        TcpAttempt::start_from(&topo.client, closing, at(PUBLIC_ADDR, 8080))?.connected()?;
    let (mut first_guest, peer) = accept(&listener)?;
    assert_eq!(peer, closing.into());
    let mut second =
        TcpAttempt::start_from(&topo.client, staying, at(PUBLIC_ADDR, 8080))?.connected()?;
    let (mut second_guest, peer) = accept(&listener)?;
    assert_eq!(peer, staying.into());
    natctl.ok(&["firewall", "del", &id.to_string()])?;

    abort(first)?;
    let mut buf = [0u8; 16];
    match first_guest.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => anyhow::bail!("the guest's end of the aborted connection read {other:?}"),
    }
    let again = natctl.dropped(
        PUBLIC_ADDR,
        Way::In,
        "a SYN from the aborted connection's port",
        || TcpAttempt::start_from(&topo.client, closing, at(PUBLIC_ADDR, 8080)),
    )?;
    ensure!(!again.is_connected()?, "the new connection was let in");
    assert_no_connection(&listener)?;

    second.write_all(b"still here")?;
    expect_bytes(&mut second_guest, b"still here")?;
    second_guest.write_all(b"so am I")?;
    expect_bytes(&mut second, b"so am I")?;
    Ok(())
}

/// ICMP timestamp (13, answered by the client's kernel with 14), information (15) and
/// address-mask (17) requests from the guest reach the client from P, and their replies (16
/// and 18, which Linux does not send, sent by the test as the client) come back to the guest,
/// though P has no rule: the fast path tracks these queries as netfilter does, and carries
/// them both ways.
#[test]
fn icmp_timestamp_information_and_address_mask_replies_come_back() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let (guest, client) = (
        IcmpSniffer::open_in(&topo.guest)?,
        IcmpSniffer::open_in(&topo.client)?,
    );
    let before = natctl.stats()?;
    for (request, reply, data) in [
        (13u8, 14u8, vec![0u8; 12]),
        (15, 16, Vec::new()),
        (17, 18, vec![0u8; 4]),
    ] {
        let id = 0x1300 + u16::from(request);
        guest.send_query(CLIENT_ADDR, request, (id, 1), &data)?;
        let seen = client.collect(1, |s| s.icmp_type == request && s.id == id);
        ensure!(
            seen.len() == 1 && (seen[0].src, seen[0].dst) == (PUBLIC_ADDR, CLIENT_ADDR),
            "ICMP {request} at the client: {seen:?}"
        );
        if request != 13 {
            let answer = if request == 17 {
                vec![255, 255, 255, 0]
            } else {
                Vec::new()
            };
            client.send_query(PUBLIC_ADDR, reply, (id, 1), &answer)?;
        }
        let back = guest.collect(1, |s| s.icmp_type == reply && s.id == id);
        ensure!(
            back.len() == 1 && (back[0].src, back[0].dst) == (CLIENT_ADDR, GUEST_ADDR),
            "ICMP {reply} at the guest: {back:?}"
        );
    }
    fastpath::carried(
        &before,
        &natctl.stats()?,
        &[
            Arrived::new("outbound_forwarded", 3, "requests at the client"),
            Arrived::new("inbound_forwarded", 3, "replies at the guest"),
        ],
    )
}

/// The guest pings the client with identifier I while the client sends echo requests to P with
/// the same identifier: denied while P has no ICMP rule, then, once a rule allows them,
/// answered by the guest from P. The remote's admitted request is a flow of its own (natd lists
/// two flows of that identifier, one opened by each side) and the guest's own ping gets every
/// reply throughout: the remote never takes the guest's flow over.
#[test]
fn a_remote_echo_request_reusing_a_guest_pings_identifier_is_a_flow_of_its_own()
-> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let (guest, client) = (
        IcmpSniffer::open_in(&topo.guest)?,
        IcmpSniffer::open_in(&topo.client)?,
    );
    let stream = PingStream::start(&topo.guest, CLIENT_ADDR, Duration::from_millis(50))?;
    let id = stream.id();
    stream.wait_replies(3)?;
    natctl.dropped(
        PUBLIC_ADDR,
        Way::In,
        "the client's echo request to P",
        || client.send_query(PUBLIC_ADDR, ICMP_ECHO_REQUEST, (id, 1000), b"remote"),
    )?;
    let replied = stream.replied();
    stream.wait_replies(replied + 3)?;

    natctl.firewall_add(PUBLIC_ADDR, &["--proto", "icmp", "--icmp-type", "8"])?;
    client.send_query(PUBLIC_ADDR, ICMP_ECHO_REQUEST, (id, 1001), b"remote")?;
    let at_guest = guest.collect(1, |s| {
        s.icmp_type == ICMP_ECHO_REQUEST && s.id == id && s.seq == 1001
    });
    ensure!(
        at_guest.len() == 1 && (at_guest[0].src, at_guest[0].dst) == (CLIENT_ADDR, GUEST_ADDR),
        "the remote's request at the guest: {at_guest:?}"
    );
    let answer = client.collect(1, |s| {
        s.icmp_type == ICMP_ECHO_REPLY && s.id == id && s.seq == 1001
    });
    ensure!(
        answer.len() == 1 && (answer[0].src, answer[0].dst) == (PUBLIC_ADDR, CLIENT_ADDR),
        "the guest's answer at the client: {answer:?}"
    );
    let flows = natctl.flows()?.flows;
    let mut origins: Vec<&str> = flows
        .iter()
        .filter(|f| f.proto == 1 && f.guest_port == id && f.remote == CLIENT_ADDR)
        .map(|f| f.origin.as_str())
        .collect();
    origins.sort_unstable();
    assert_eq!(
        origins,
        ["guest", "public"],
        "the ICMP flows of identifier {id}: {flows:#?}"
    );
    let replied = stream.replied();
    stream.wait_replies(replied + 3)?;
    let tally = stream.stop()?;
    ensure!(
        tally.missing.is_empty() && tally.foreign.is_empty(),
        "the guest's ping: {tally:?}"
    );
    let stray = guest.pending(|s| s.icmp_type == ICMP_ECHO_REQUEST && s.seq == 1000);
    assert_eq!(stray, [], "the denied request reached the guest");
    Ok(())
}

/// Flows opened in the flood: every source port from 1024 up, times this many destination
/// ports, about 190,000 (the table holds 4,096 assured flows and 2,048 pending ones).
const FLOOD_DPORTS: u16 = 3;
/// Datagrams each flood flow sends (in a row, all from the remote's side): a flow seen more
/// than once is as recently used as the idle one, so an LRU table alone would not spare it.
const FLOOD_PER_FLOW: usize = 2;
/// The flood's target: a second guest address, its public IP open to UDP.
const FLOOD_GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);
const FLOOD_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const TABLE: u32 = 4096;

/// The guest's UDP flow to the client has seen traffic both ways (assured); then the client
/// opens about 190,000 new flows (two datagrams each, no answer) to an open port of another
/// public IP, many times the table, on the CPU where the guest's flow was opened.
/// The idle flow's next answer still reaches the guest, though its public IP has no rule, so
/// only the flow can admit it: the flood evicted only flows that one side had spoken in.
#[test]
fn a_flood_of_new_flows_does_not_evict_an_assured_flow() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let (v2, p2) = (FLOOD_GUEST, FLOOD_PUBLIC);
    topo.guest
        .ip(&["addr", "add", &format!("{v2}/24"), "dev", HOST_IF])?;
    topo.router
        .exec("ping", &["-n", "-q", "-c", "1", "-W", "5", &v2.to_string()])?;
    let config = format!(
        "{ONE_MAPPING}[[mapping]]\npublic = \"{p2}\"\nprivate = \"{v2}\"\n\
         [[rule]]\npublic = \"{p2}\"\nproto = \"udp\"\n[conntrack]\nsize = {TABLE}\n"
    );
    let natd = Natd::start(&topo, Some(&config))?;
    let natctl = natd.natctl()?;
    // The flow and the flood on one CPU, so they meet in the same per-CPU lists of the table.
    let _one_cpu = flood::OneCpu::pin()?;

    let server = udp_bind(&topo.client, at(CLIENT_ADDR, 5353))?;
    let guest = udp_bind(&topo.guest, at(GUEST_ADDR, 5353))?;
    guest.send_to(b"query", at(CLIENT_ADDR, 5353))?;
    let (_, from) = udp_receive(&server)?;
    let guest_at = v4(from, "the client saw the guest")?;
    ensure!(*guest_at.ip() == PUBLIC_ADDR, "the client saw {guest_at}");
    server.send_to(b"answer", guest_at)?;
    udp_receive(&guest)?;
    guest.send_to(b"thanks", at(CLIENT_ADDR, 5353))?;
    udp_receive(&server)?;

    // The flood's flows arrive at sockets that never read them (no ICMP errors back).
    let _sinks = (0..FLOOD_DPORTS)
        .map(|i| udp_bind(&topo.guest, at(v2, 7000 + i)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let before = natctl.counters(p2)?;
    let sent = flood::udp_flows(
        &topo.client,
        CLIENT_ADDR,
        p2,
        (1024..=u16::MAX, 7000..=7000 + FLOOD_DPORTS - 1),
        FLOOD_PER_FLOW,
    )?;
    let forwarded = natctl.counters(p2)?.inbound_packets - before.inbound_packets;
    if forwarded < 40 * FLOOD_PER_FLOW as u64 * u64::from(TABLE) {
        let dropped = flood::tx_dropped(&topo.client, HOST_IF)?;
        let reasons: Vec<_> = (natctl.stats()?.reasons.into_iter())
            .filter(|r| r.packets > 0)
            .collect();
        bail!(
            "only {forwarded} of the {sent} flood datagrams were forwarded to {v2} \
             (the client's veth dropped {dropped}; natd's reasons: {reasons:?})"
        );
    }
    let stats = natctl.stats()?;
    ensure!(
        stats.conntrack.evictions > 0,
        "the flood evicted nothing: {:?}",
        stats.conntrack
    );

    server.send_to(b"late answer", guest_at)?;
    let (data, from) = udp_receive(&guest).context("the idle flow's answer after the flood")?;
    assert_eq!(
        (data.as_slice(), v4(from, "the guest saw")?),
        (&b"late answer"[..], at(CLIENT_ADDR, 5353))
    );
    assert_no_datagram(&guest)?;
    Ok(())
}
