//! End to end, `natd --policy kernel` behind the iptables of a CloudStack virtual router doing
//! static NAT (`topology::vrouter`: DNAT/SNAT, the public IP's `FIREWALL_<P>` chain, `-m state`
//! rules, default-allow egress with an exception): the kernel judges every new flow and natd
//! only accelerates what it admitted. Observed here:
//! - every probe (allowed and denied TCP, UDP, ping, both ways, and a 1 MiB TCP transfer each
//!   way, closed from both ends) meets the same fate with natd as with the ruleset alone; the
//!   XDP program saw each one and left it to the kernel, and carried the transfers;
//! - an established flow's packets are carried by XDP (`topology::fastpath`): the forwarded
//!   counters grow by what arrived, no pass reason grows, only its first packets went through
//!   the kernel;
//! - a UDP flow XDP keeps busy (the kernel sees none of its packets, `nf_conntrack_acct`)
//!   outlives the kernel's own timeout, set to 10 s: its kernel entry is still there, as the
//!   kernel's settings would have it, and an answer that only the kernel can admit
//!   (fragmented) still arrives, while an idle flow is forgotten by both;
//! - a fragmented answer to a fast-pathed flow arrives whole, through the kernel;
//! - a flow the kernel ended leaves the fast path: its next packets are the kernel's.
//!
//! A drop leaves no trace at either end, so a probe counts as dropped once the ruleset's DROP
//! counters moved and nothing arrived; nothing here asserts on how long anything took.
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, Natctl, Natd, NatdOptions, Netns, PUBLIC_ADDR, ROUTER_GUEST_ADDR,
    Topology,
    attempt::{TcpAttempt, assert_no_connection, tcp_listen, udp_receive, udp_send},
    fastpath::{self, Arrived},
    observe::{
        ARRIVAL, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IcmpSniffer, payload, segs_in, tcp_exchange,
        udp_bind,
    },
    policy::reason,
    sock,
    vrouter::{Service, VirtualRouter},
};
use nat_userspace::api::StatsReport;

/// natd's state: the one static NAT, P 203.0.113.10 <-> V 10.0.0.10 (rules are the kernel's).
const ONE_MAPPING: &str = "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n";
/// Open on P (CloudStack ingress rules).
const TCP_OPEN: u16 = 22;
const UDP_OPEN: u16 = 53;
/// Closed on P.
const TCP_CLOSED: u16 = 23;
const UDP_CLOSED: u16 = 54;
/// The egress exception: guests may not send mail.
const TCP_DENIED_OUT: u16 = 25;
/// A DNS answer with EDNS that does not fit one frame.
const BIG: usize = 3000;
const POLL: Duration = Duration::from_millis(20);

fn at(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

/// The three namespaces with the virtual router's ruleset in the router.
fn virtual_router() -> anyhow::Result<Topology> {
    let topo = Topology::new()?;
    let vr = VirtualRouter {
        ingress: vec![
            Service::Tcp(TCP_OPEN),
            Service::Udp(UDP_OPEN),
            Service::Icmp,
        ],
        egress_denied: vec![Service::Tcp(TCP_DENIED_OUT)],
    };
    topo.install_iptables(&vr.ruleset())?;
    Ok(topo)
}

/// natd on the router with `--policy kernel` and the mapping.
fn natd_kernel(topo: &Topology) -> anyhow::Result<Natd> {
    Natd::start_with(
        topo,
        &NatdOptions {
            config: Some(ONE_MAPPING.to_string()),
            args: vec!["--policy".into(), "kernel".into()],
            ..NatdOptions::default()
        },
    )
}

/// What became of a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// It arrived, its sender seen as this address, and the answer got back.
    Arrived(Ipv4Addr),
    /// The ruleset's drop counters moved and nothing arrived.
    Dropped,
}

/// Polls `arrived` until it yields something (the probe arrived) or the router's iptables
/// dropped a packet since they counted `drops0` (then `arrived` must still yield nothing).
fn await_fate<T>(
    topo: &Topology,
    what: &str,
    drops0: u64,
    mut arrived: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<Option<T>> {
    let deadline = Instant::now() + ARRIVAL;
    loop {
        if let Some(t) = arrived()? {
            return Ok(Some(t));
        }
        if topo.iptables_drops()? > drops0 {
            ensure!(
                arrived()?.is_none(),
                "{what}: arrived although the ruleset dropped a packet of it"
            );
            return Ok(None);
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: neither arrived nor dropped within {ARRIVAL:?}\n{}",
            topo.iptables_text()
        );
        std::thread::sleep(POLL);
    }
}

/// A TCP connection from `from` to `target`, accepted on `listen` in `to`; once connected,
/// a line each way.
fn tcp_probe(
    topo: &Topology,
    (from, target): (&Netns, SocketAddrV4),
    (to, listen): (&Netns, SocketAddrV4),
) -> anyhow::Result<Fate> {
    let what = format!("TCP to {target}");
    let listener = tcp_listen(to, listen)?;
    let drops0 = topo.iptables_drops()?;
    let attempt = TcpAttempt::start(from, None, target)?;
    let accepted = await_fate(topo, &what, drops0, || match listener.accept() {
        Ok(c) => Ok(Some(c)),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e).context("accept"),
    })?;
    let Some((mut server, peer)) = accepted else {
        ensure!(!attempt.is_connected()?, "{what}: connected");
        assert_no_connection(&listener)?;
        return Ok(Fate::Dropped);
    };
    server.set_nonblocking(false)?;
    server.set_read_timeout(Some(ARRIVAL))?;
    let mut client = attempt.connected()?;
    server.write_all(b"banner\n")?;
    read_exactly(&mut client, b"banner\n").with_context(|| format!("{what}: the answer"))?;
    client.write_all(b"hello\n")?;
    read_exactly(&mut server, b"hello\n")?;
    Ok(Fate::Arrived(ip_of(peer)?))
}

/// A datagram from `from` to `target`, received on `listen` in `to`, which answers it.
fn udp_probe(
    topo: &Topology,
    (from, target): (&Netns, SocketAddrV4),
    (to, listen): (&Netns, SocketAddrV4),
) -> anyhow::Result<Fate> {
    let what = format!("UDP to {target}");
    let server = udp_bind(to, listen)?;
    server.set_nonblocking(true)?;
    let drops0 = topo.iptables_drops()?;
    let client = udp_send(from, None, target, b"probe")?;
    let mut buf = [0u8; 64];
    let got = await_fate(topo, &what, drops0, || match server.recv_from(&mut buf) {
        Ok((n, peer)) => Ok(Some((n, peer))),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e).context("recv"),
    })?;
    let Some((n, peer)) = got else {
        return Ok(Fate::Dropped);
    };
    ensure!(&buf[..n] == b"probe", "{what}: {n} other bytes arrived");
    server.send_to(b"answer", peer)?;
    let (answer, source) = udp_receive(&client).with_context(|| format!("{what}: the answer"))?;
    ensure!(
        answer == b"answer" && source == SocketAddr::V4(target),
        "{what}: the answer {answer:?} came from {source}"
    );
    Ok(Fate::Arrived(ip_of(peer)?))
}

/// An echo request from `from` to `dst`, seen in `to`; the reply must get back.
fn ping_probe(topo: &Topology, from: &Netns, dst: Ipv4Addr, to: &Netns) -> anyhow::Result<Fate> {
    let what = format!("ping {dst}");
    let (sender, receiver) = (IcmpSniffer::open_in(from)?, IcmpSniffer::open_in(to)?);
    let drops0 = topo.iptables_drops()?;
    sender.send_echo(dst, 1, 56)?;
    let seen = await_fate(topo, &what, drops0, || {
        Ok(receiver
            .pending(|p| p.icmp_type == ICMP_ECHO_REQUEST)
            .first()
            .map(|p| p.src))
    })?;
    let Some(src) = seen else {
        return Ok(Fate::Dropped);
    };
    let replies = sender.collect(1, |p| p.icmp_type == ICMP_ECHO_REPLY && p.src == dst);
    ensure!(!replies.is_empty(), "{what}: no echo reply");
    Ok(Fate::Arrived(src))
}

/// A TCP connection that carries 1 MiB and is closed from both ends (`tcp_exchange`): the
/// ends of a long transfer the kernel did not see must get through it too.
fn bulk_probe(
    topo: &Topology,
    (from, target): (&Netns, SocketAddrV4),
    (to, listen): (&Netns, SocketAddrV4),
) -> anyhow::Result<Fate> {
    let seen = tcp_exchange(to, listen, from, target, 1 << 20)
        .with_context(|| format!("1 MiB over TCP to {target}\n{}", topo.iptables_text()))?;
    ensure!(
        seen.server_received == 1 << 20 && seen.client_confirmed == 1 << 20,
        "{seen:?}"
    );
    Ok(Fate::Arrived(ip_of(seen.server_peer)?))
}

fn ip_of(addr: SocketAddr) -> anyhow::Result<Ipv4Addr> {
    match addr {
        SocketAddr::V4(a) => Ok(*a.ip()),
        SocketAddr::V6(a) => bail!("an IPv6 peer {a}"),
    }
}

fn read_exactly(conn: &mut TcpStream, want: &[u8]) -> anyhow::Result<()> {
    let mut got = vec![0u8; want.len()];
    conn.read_exact(&mut got)?;
    ensure!(got == want, "read {got:?}, not {want:?}");
    Ok(())
}

/// Every probe across the router, in order, with its fate.
fn run_probes(topo: &Topology) -> anyhow::Result<Vec<(&'static str, Fate)>> {
    let (c, g) = (&topo.client, &topo.guest);
    let into = |port| (c, at(PUBLIC_ADDR, port));
    let served = |port| (g, at(GUEST_ADDR, port));
    let out = |port| (g, at(CLIENT_ADDR, port));
    let remote = |port| (c, at(CLIENT_ADDR, port));
    Ok(vec![
        (
            "tcp in, open port",
            tcp_probe(topo, into(TCP_OPEN), served(TCP_OPEN))?,
        ),
        (
            "tcp in, closed port",
            tcp_probe(topo, into(TCP_CLOSED), served(TCP_CLOSED))?,
        ),
        (
            "udp in, open port",
            udp_probe(topo, into(UDP_OPEN), served(UDP_OPEN))?,
        ),
        (
            "udp in, closed port",
            udp_probe(topo, into(UDP_CLOSED), served(UDP_CLOSED))?,
        ),
        ("ping in", ping_probe(topo, c, PUBLIC_ADDR, g)?),
        (
            "tcp in, 1 MiB and close",
            bulk_probe(topo, into(TCP_OPEN), served(TCP_OPEN))?,
        ),
        ("tcp out", tcp_probe(topo, out(80), remote(80))?),
        (
            "tcp out, 1 MiB and close",
            bulk_probe(topo, out(80), remote(80))?,
        ),
        (
            "tcp out, denied port",
            tcp_probe(topo, out(TCP_DENIED_OUT), remote(TCP_DENIED_OUT))?,
        ),
        ("udp out", udp_probe(topo, out(UDP_OPEN), remote(UDP_OPEN))?),
        ("ping out", ping_probe(topo, g, CLIENT_ADDR, c)?),
    ])
}

/// The guest reaching its own public IP (CloudStack's hairpin: DNAT to V, SNAT to the
/// router's guest address), with its fate.
fn hairpin_probes(topo: &Topology) -> anyhow::Result<Vec<(&'static str, Fate)>> {
    let g = &topo.guest;
    let served = |port| (g, at(GUEST_ADDR, port));
    Ok(vec![
        (
            "tcp hairpin, 1 MiB and close",
            bulk_probe(topo, (g, at(PUBLIC_ADDR, TCP_OPEN)), served(TCP_OPEN))?,
        ),
        (
            "tcp hairpin, closed port",
            tcp_probe(topo, (g, at(PUBLIC_ADDR, TCP_CLOSED)), served(TCP_CLOSED))?,
        ),
    ])
}

/// The same probes with the ruleset alone and then with natd: the same fates, those the
/// ruleset gives (open ports arrive with the client's address, what the guest sends arrives
/// as P, hairpin as the router's guest address, closed ports and the egress exception are
/// dropped); with natd, the XDP program saw the first packet of every probe and left it to
/// the kernel (`kernel_decides`), carried the 1 MiB transfers across the router, and left
/// hairpin to the kernel entirely (no flow entered for it).
#[test]
fn every_verdict_is_the_rulesets() -> anyhow::Result<()> {
    let topo = virtual_router()?;
    let mut alone = run_probes(&topo).context("the ruleset alone")?;
    alone.extend(hairpin_probes(&topo).context("the ruleset alone")?);
    let expected = [
        Fate::Arrived(CLIENT_ADDR),
        Fate::Dropped,
        Fate::Arrived(CLIENT_ADDR),
        Fate::Dropped,
        Fate::Arrived(CLIENT_ADDR),
        Fate::Arrived(CLIENT_ADDR),
        Fate::Arrived(PUBLIC_ADDR),
        Fate::Arrived(PUBLIC_ADDR),
        Fate::Dropped,
        Fate::Arrived(PUBLIC_ADDR),
        Fate::Arrived(PUBLIC_ADDR),
        Fate::Arrived(ROUTER_GUEST_ADDR),
        Fate::Dropped,
    ];
    let fates: Vec<Fate> = alone.iter().map(|(_, f)| *f).collect();
    assert_eq!(fates, expected, "the ruleset alone: {alone:?}");

    // The probes' flows start afresh.
    topo.flush_kernel_flows()?;
    let natd = natd_kernel(&topo)?;
    let natctl = natd.natctl()?;
    let before = natctl.stats()?;
    let mut with_natd = run_probes(&topo).context("with natd --policy kernel")?;
    let creates = natctl.stats()?.conntrack.creates;
    with_natd.extend(hairpin_probes(&topo).context("with natd --policy kernel")?);
    let hairpin_flows = natctl.stats()?.conntrack.creates - creates;
    ensure!(
        hairpin_flows == 0,
        "the learner entered {hairpin_flows} flows for hairpin connections, whose translation \
         (also SNAT to the router's own address) it cannot read off the packets"
    );
    for ((what, a), (_, n)) in alone.iter().zip(&with_natd) {
        assert_eq!(
            a, n,
            "{what}: the ruleset alone said {a:?}, with natd {n:?}"
        );
    }
    let after = natctl.stats()?;
    let grown =
        |name| -> anyhow::Result<u64> { Ok(reason(&after, name)? - reason(&before, name)?) };
    let decided = grown("kernel_decides")?;
    ensure!(
        decided >= with_natd.len() as u64,
        "the XDP program left {decided} packets to the kernel, fewer than the {} probes' first \
         packets",
        with_natd.len()
    );
    // Each 1 MiB went through XDP, not the kernel: at least a packet per 1,500 bytes.
    for way in ["inbound_forwarded", "outbound_forwarded"] {
        let carried = grown(way)?;
        ensure!(
            carried >= (1 << 20) / 1500,
            "the fast path forwarded {carried} packets ({way}): it did not carry the 1 MiB"
        );
    }
    Ok(())
}

/// Pass reasons (`not_ipv4` aside) grown from `before` to `after`, summed.
fn passed(before: &StatsReport, after: &StatsReport) -> anyhow::Result<u64> {
    Ok(fastpath::passes_grown(&before.reasons, &after.reasons)?
        .iter()
        .map(|(_, n)| n)
        .sum())
}

/// TCP_NODELAY, so that each write is a segment of its own.
fn nodelay(conn: &TcpStream) -> anyhow::Result<()> {
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(ARRIVAL))?;
    Ok(())
}

/// An inbound TCP connection to the open port and an outbound UDP flow: after their first
/// packets (which the kernel judged and the learner saw), 50 exchanges each way are carried
/// by XDP alone: the forwarded counters of each direction grow by at least what arrived, and
/// no pass reason grows. The first packets are all the kernel got: three for the handshake,
/// three for the UDP flow until it was assured (out, back, out).
#[test]
fn established_flows_are_carried_by_xdp() -> anyhow::Result<()> {
    const ROUNDS: u64 = 50;
    let topo = virtual_router()?;
    let natd = natd_kernel(&topo)?;
    let natctl = natd.natctl()?;

    let start = natctl.stats()?;
    let listener = tcp_listen(&topo.guest, at(GUEST_ADDR, TCP_OPEN))?;
    let mut client =
        TcpAttempt::start(&topo.client, None, at(PUBLIC_ADDR, TCP_OPEN))?.connected()?;
    let (mut server, _) = nat_tests::topology::attempt::accept(&listener)?;
    let handshake = passed(&start, &natctl.stats()?)?;
    nodelay(&client)?;
    nodelay(&server)?;
    let line = payload(100);
    let round = |client: &mut TcpStream, server: &mut TcpStream| -> anyhow::Result<()> {
        client.write_all(&line)?;
        read_exactly(server, &line)?;
        server.write_all(&line)?;
        read_exactly(client, &line)
    };
    round(&mut client, &mut server).context("the first exchange")?;
    let (before, server0, client0) = (natctl.stats()?, segs_in(&server)?, segs_in(&client)?);
    for _ in 0..ROUNDS {
        round(&mut client, &mut server)?;
    }
    let (at_server, at_client) = (segs_in(&server)? - server0, segs_in(&client)? - client0);
    let after = natctl.stats()?;
    ensure!(
        at_server >= ROUNDS && at_client >= ROUNDS,
        "{at_server} segments at the guest, {at_client} at the client for {ROUNDS} exchanges"
    );
    fastpath::carried(
        &before,
        &after,
        &[
            Arrived::new("inbound_forwarded", at_server, "segments at the guest"),
            Arrived::new("outbound_forwarded", at_client, "segments at the client"),
        ],
    )
    .context("the TCP connection")?;
    ensure!(
        (1..=3).contains(&handshake) && passed(&start, &after)? == handshake,
        "the kernel got {} packets of the connection, {handshake} of them in the handshake",
        passed(&start, &after)?
    );

    // UDP, opened by the guest.
    let start = natctl.stats()?;
    let remote = udp_bind(&topo.client, at(CLIENT_ADDR, UDP_OPEN))?;
    let guest = udp_bind(&topo.guest, at(GUEST_ADDR, 0))?;
    let exchange = || -> anyhow::Result<()> {
        guest.send_to(b"query", at(CLIENT_ADDR, UDP_OPEN))?;
        let (got, from) = udp_receive(&remote)?;
        ensure!(
            got == b"query" && ip_of(from)? == PUBLIC_ADDR,
            "{got:?} from {from}"
        );
        remote.send_to(b"answer", from)?;
        let (got, _) = udp_receive(&guest)?;
        ensure!(got == b"answer", "{got:?}");
        Ok(())
    };
    for _ in 0..3 {
        exchange().context("the first exchanges")?;
    }
    let first = passed(&start, &natctl.stats()?)?;
    let before = natctl.stats()?;
    for _ in 0..ROUNDS {
        exchange()?;
    }
    let after = natctl.stats()?;
    fastpath::carried(
        &before,
        &after,
        &[
            Arrived::new("outbound_forwarded", ROUNDS, "datagrams at the client"),
            Arrived::new("inbound_forwarded", ROUNDS, "answers at the guest"),
        ],
    )
    .context("the UDP flow")?;
    ensure!(
        (1..=3).contains(&first),
        "the kernel got {first} packets of the UDP flow before XDP carried it"
    );
    Ok(())
}

/// `setsockopt(IP_MTU_DISCOVER, IP_PMTUDISC_DONT)`: DF clear, so the sender fragments.
fn allow_fragments(socket: &UdpSocket) -> anyhow::Result<()> {
    sock::set_int(
        socket,
        (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER),
        libc::IP_PMTUDISC_DONT,
        "IP_MTU_DISCOVER",
    )
}

/// A UDP flow the guest opened and that XDP carries: the guest's socket, the client's, and
/// where the client sees the guest (P and its port).
struct GuestFlow {
    guest: UdpSocket,
    remote: UdpSocket,
    seen_as: SocketAddr,
}

impl GuestFlow {
    /// Opens it to the client's `port` and exchanges until the fast path carries it both ways
    /// (a round counted as forwarded and nothing passed).
    fn open(topo: &Topology, natctl: &Natctl, port: u16) -> anyhow::Result<Self> {
        let remote = udp_bind(&topo.client, at(CLIENT_ADDR, port))?;
        allow_fragments(&remote)?;
        let guest = udp_bind(&topo.guest, at(GUEST_ADDR, 0))?;
        let mut flow = Self {
            guest,
            remote,
            seen_as: SocketAddr::V4(at(PUBLIC_ADDR, 0)),
        };
        for _ in 0..10 {
            let before = natctl.stats()?;
            flow.round(b"query")?;
            let after = natctl.stats()?;
            let carried = fastpath::carried(
                &before,
                &after,
                &[
                    Arrived::new("outbound_forwarded", 1, "the query"),
                    Arrived::new("inbound_forwarded", 1, "the answer"),
                ],
            );
            if carried.is_ok() {
                return Ok(flow);
            }
        }
        bail!("the fast path did not carry the flow after 10 exchanges");
    }

    /// The guest sends `data`, the client answers with it.
    fn round(&mut self, data: &[u8]) -> anyhow::Result<()> {
        self.guest
            .send_to(data, at(CLIENT_ADDR, port_of(&self.remote)?))?;
        let (got, from) = udp_receive(&self.remote)?;
        ensure!(got == data, "the client got {} bytes", got.len());
        ensure!(
            ip_of(from)? == PUBLIC_ADDR,
            "the client saw the guest as {from}"
        );
        self.seen_as = from;
        self.remote.send_to(data, from)?;
        let (got, _) = udp_receive(&self.guest)?;
        ensure!(got == data, "the guest got {} bytes back", got.len());
        Ok(())
    }

    /// The client answers with `data` unasked; the guest must receive exactly it.
    fn answer(&self, data: &[u8]) -> anyhow::Result<()> {
        self.remote.send_to(data, self.seen_as)?;
        let (got, from) = udp_receive(&self.guest)?;
        ensure!(
            got == data && from == SocketAddr::V4(at(CLIENT_ADDR, port_of(&self.remote)?)),
            "the guest got {} bytes from {from}, not the {} sent",
            got.len(),
            data.len()
        );
        Ok(())
    }
}

fn port_of(socket: &UdpSocket) -> anyhow::Result<u16> {
    Ok(socket.local_addr()?.port())
}

/// The router's kernel forgets idle UDP flows after 10 s. Of two flows the guest opened and
/// XDP carries, one is kept busy through XDP for 25 s (an exchange every half second), the
/// other left idle. The kernel counts none of the busy flow's packets (it was idle in the
/// kernel's eyes), yet its entry is still there at the end, kept by natd with no more time
/// left than the kernel's own setting gives and assured, as the kernel would have made it
/// had it seen the packets (`conntrack -L` stays true), and an answer only
/// the kernel can admit (3,000 bytes, fragmented: the public IP's firewall drops a new flow to
/// the guest's port) still arrives, as does a small one through XDP. The idle flow is gone
/// from the kernel and from the fast path: natd keeps alive only what the fast path carries.
#[test]
fn a_flow_busy_in_xdp_outlives_the_kernels_timeout() -> anyhow::Result<()> {
    const BUSY: u32 = 50;
    let topo = virtual_router()?;
    topo.router.exec(
        "sysctl",
        &[
            "-qw",
            "net.netfilter.nf_conntrack_udp_timeout=10",
            "net.netfilter.nf_conntrack_udp_timeout_stream=10",
            "net.netfilter.nf_conntrack_acct=1",
        ],
    )?;
    let natd = natd_kernel(&topo)?;
    let natctl = natd.natctl()?;
    let mut flow = GuestFlow::open(&topo, &natctl, 7000)?;
    let idle = GuestFlow::open(&topo, &natctl, 7001)?;
    // The entry natd kept (after its rounds, assured).
    let kernel = |what: &str, kept: bool| -> anyhow::Result<(u64, u64)> {
        let flows = topo.kernel_flows("udp", GUEST_ADDR, 7000)?;
        match &flows[..] {
            [f] if f.timeout <= 10 && (!kept || f.line.contains("[ASSURED]")) => f
                .packets
                .with_context(|| format!("{what}: no packet counts in {}", f.line)),
            _ => bail!(
                "{what}: the kernel's flows of the guest to port 7000 (one, with at most the \
                 kernel's 10 s left, assured once natd kept it): {flows:?}"
            ),
        }
    };
    let seen0 = kernel("before the busy period", false)?;
    let before = natctl.stats()?;
    for _ in 0..BUSY {
        flow.round(b"keepalive")?;
        std::thread::sleep(Duration::from_millis(500));
    }
    let after = natctl.stats()?;
    fastpath::carried(
        &before,
        &after,
        &[
            Arrived::new(
                "outbound_forwarded",
                u64::from(BUSY),
                "datagrams at the client",
            ),
            Arrived::new("inbound_forwarded", u64::from(BUSY), "answers at the guest"),
        ],
    )?;
    let seen = kernel("after the busy period", true)?;
    assert_eq!(
        seen, seen0,
        "the kernel counted packets of the flow while XDP was to carry them all"
    );
    let idle_port = port_of(&idle.remote)?;
    let left = topo.kernel_flows("udp", GUEST_ADDR, idle_port)?;
    ensure!(left.is_empty(), "the idle flow in the kernel: {left:?}");
    let cached: Vec<_> = natctl
        .flows()?
        .flows
        .into_iter()
        .filter(|f| f.remote_port == idle_port)
        .collect();
    ensure!(
        cached.is_empty(),
        "the idle flow in the fast path: {cached:?}"
    );
    flow.answer(b"small answer").context("a small answer")?;
    flow.answer(&payload(BIG)).context("a fragmented answer")?;
    let (orig, reply) = kernel("after the answers", true)?;
    ensure!(
        orig == seen.0 && reply > seen.1,
        "the kernel did not count the fragmented answer as the flow's: {seen:?} -> {:?}",
        (orig, reply)
    );
    Ok(())
}

/// The kernel ends a flow XDP carries (`conntrack -D`, as an operator severs a session): natd
/// forgets it (counted as ended by the kernel, gone from its flows), and the flow's next
/// exchange is the kernel's again: a new entry in the kernel's table counted both of its
/// datagrams, and both arrived, admitted by the ruleset.
#[test]
fn a_flow_the_kernel_ended_leaves_the_fast_path() -> anyhow::Result<()> {
    let topo = virtual_router()?;
    topo.router
        .exec("sysctl", &["-qw", "net.netfilter.nf_conntrack_acct=1"])?;
    let natd = natd_kernel(&topo)?;
    let natctl = natd.natctl()?;
    let mut flow = GuestFlow::open(&topo, &natctl, 7002)?;
    let port = port_of(&flow.remote)?;
    let before = natctl.stats()?;
    let log = natd.log_text();
    ensure!(
        log.contains("flows the kernel ends leave the fast path as its destroy events come"),
        "natd did not subscribe to the kernel's destroy events:\n{log}"
    );
    topo.router.exec(
        "conntrack",
        &[
            "-D",
            "-p",
            "udp",
            "-s",
            &GUEST_ADDR.to_string(),
            "--dport",
            &port.to_string(),
        ],
    )?;
    let deadline = Instant::now() + ARRIVAL;
    loop {
        let ended = natctl.stats()?.conntrack.ended - before.conntrack.ended;
        let cached = natctl
            .flows()?
            .flows
            .into_iter()
            .filter(|f| f.remote_port == port)
            .count();
        if ended == 1 && cached == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "natd still has the flow the kernel ended ({cached} cached, {ended} counted ended)"
        );
        std::thread::sleep(POLL);
    }
    flow.round(b"after the kernel ended it")?;
    let entries = topo.kernel_flows("udp", GUEST_ADDR, port)?;
    match &entries[..] {
        [e] if e.packets == Some((1, 1)) => Ok(()),
        _ => bail!(
            "the kernel's entries of the flow after the exchange (one, that counted its two \
             datagrams): {entries:?}"
        ),
    }
}

/// A 3,000-byte answer (DF clear, so it comes in fragments) to a UDP flow the fast path
/// carries arrives whole: the XDP program passes the fragments (`fragment`), the router's
/// kernel reassembles and translates it as part of the flow, and the guest reassembles it.
/// The same datagram from a port the guest never wrote to is dropped by the ruleset.
#[test]
fn a_fragmented_answer_to_a_fast_pathed_flow_arrives() -> anyhow::Result<()> {
    let topo = virtual_router()?;
    let natd = natd_kernel(&topo)?;
    let natctl = natd.natctl()?;
    let flow = GuestFlow::open(&topo, &natctl, UDP_OPEN)?;
    let (router0, guest0) = (
        topo.router.ip_counter("ReasmOKs")?,
        topo.guest.ip_counter("ReasmOKs")?,
    );
    let before = natctl.stats()?;
    let drops0 = topo.iptables_drops()?;
    let stranger = udp_bind(&topo.client, at(CLIENT_ADDR, UDP_OPEN + 100))?;
    allow_fragments(&stranger)?;
    stranger.send_to(&payload(BIG), flow.seen_as)?;
    let answer = payload(BIG);
    flow.answer(&answer)?;
    ensure!(
        topo.iptables_drops()? > drops0,
        "the ruleset did not drop the unasked datagram"
    );
    nat_tests::topology::attempt::assert_no_datagram(&flow.guest)
        .context("the unasked datagram")?;
    let after = natctl.stats()?;
    ensure!(
        reason(&after, "fragment")? - reason(&before, "fragment")? >= 4,
        "the XDP program did not pass the fragments of both datagrams"
    );
    assert_eq!(topo.router.ip_counter("ReasmOKs")? - router0, 2);
    assert_eq!(topo.guest.ip_counter("ReasmOKs")? - guest0, 1);
    Ok(())
}
