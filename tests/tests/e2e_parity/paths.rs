//! The slow path gives the fast path's verdicts: the same frames (same addresses, ports and
//! identifiers, in the same order) are sent through a fresh router twice, once with natd's XDP
//! program attached and once with only natd's nftables table (natd killed, its XDP links
//! unpinned, so the kernel forwards everything), and each receiver must see the same thing:
//! delivered or not, from and to the same addresses, the same answers back.
use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, HOST_IF, Natd, NatdOptions, PUBLIC_ADDR, ROUTER_GUEST_IF,
    ROUTER_PUBLIC_ADDR, ROUTER_PUBLIC_IF, Topology,
    attempt::{
        TcpAttempt, accept, assert_no_connection, assert_no_datagram, expect_bytes, tcp_listen,
        udp_receive,
    },
    fastpath::passes_grown,
    icmp_error::{ICMP_TIME_EXCEEDED, next_error, record_errors, set_ttl, wait_error},
    observe::{ARRIVAL, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IcmpSniffer, udp_bind},
};

use super::at;

/// A second guest address, mapped to a public IP without rules.
const V2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);
const P2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);

/// P opens TCP 8080, UDP 7000-7001 and echo requests; P2 is closed; the egress policy allows
/// everything but UDP to port 6001.
const CONFIG: &str = "\
    [[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n\
    [[mapping]]\npublic = \"203.0.113.20\"\nprivate = \"10.0.0.20\"\n\
    [[rule]]\npublic = \"203.0.113.10\"\nproto = \"tcp\"\nports = \"8080\"\n\
    [[rule]]\npublic = \"203.0.113.10\"\nproto = \"udp\"\nports = \"7000-7001\"\n\
    [[rule]]\npublic = \"203.0.113.10\"\nproto = \"icmp\"\nicmp_type = 8\n\
    [egress]\ndefault = \"allow\"\n\
    [[egress.rule]]\nproto = \"udp\"\nports = \"6001\"\n";

/// What the receivers saw of one case.
type Outcome = String;

const NOTHING: &str = "nothing arrived";

/// The cases, in the order they are sent, with what CloudStack's router gives for each.
const EXPECTED: &[(&str, &str)] = &[
    (
        "inbound TCP, allowed",
        "the guest accepted 198.51.100.2:41001 at 10.0.0.10:8080; the client is connected to \
         203.0.113.10:8080; data both ways",
    ),
    ("inbound TCP, denied", NOTHING),
    (
        "inbound UDP, allowed, and its answer",
        "the guest got it from 198.51.100.2:41003; the client got the answer from \
         203.0.113.10:7001",
    ),
    ("inbound UDP, denied", NOTHING),
    (
        "inbound echo request, allowed, and its reply",
        "the guest got 198.51.100.2 -> 10.0.0.10; the client got the reply 203.0.113.10 -> \
         198.51.100.2",
    ),
    ("inbound echo request to a closed public IP", NOTHING),
    (
        "outbound UDP, allowed, and its answer",
        "the client got it from 203.0.113.10:5000; the guest got the answer from \
         198.51.100.2:6000",
    ),
    ("UDP to the guest's flow from another remote port", NOTHING),
    (
        "outbound TCP, allowed",
        "the client accepted 203.0.113.10:42009; data both ways",
    ),
    ("outbound UDP, denied by the egress policy", NOTHING),
    (
        "from the public side straight to the private address",
        NOTHING,
    ),
    ("inbound TTL 1, denied: an answer to the sender?", NOTHING),
    (
        "inbound TTL 1, allowed: an answer to the sender?",
        "time exceeded from 203.0.113.10",
    ),
    (
        "hairpin UDP from the second guest address, and its answer",
        "the guest got it from 10.0.0.1:43001; the sender got the answer from 203.0.113.10:7001",
    ),
];

/// The sockets of one run that mark the moment to check that a dropped packet did not arrive:
/// a datagram on an allowed flow sent after it on the same path, which must arrive.
struct Markers {
    inbound: (UdpSocket, UdpSocket),
    outbound: (UdpSocket, UdpSocket),
    sent: u32,
}

impl Markers {
    fn new(topo: &Topology) -> anyhow::Result<Self> {
        Ok(Self {
            inbound: (
                udp_bind(&topo.client, at(CLIENT_ADDR, 41100))?,
                udp_bind(&topo.guest, at(GUEST_ADDR, 7000))?,
            ),
            outbound: (
                udp_bind(&topo.guest, at(GUEST_ADDR, 42100))?,
                udp_bind(&topo.client, at(CLIENT_ADDR, 6002))?,
            ),
            sent: 0,
        })
    }

    /// Sends a marker from the client to P (`inbound`) or from the guest to the client, and
    /// waits for it.
    fn pass(&mut self, inbound: bool) -> anyhow::Result<()> {
        self.sent += 1;
        let msg = format!("marker {}", self.sent);
        let ((from, to), target) = if inbound {
            (&self.inbound, at(PUBLIC_ADDR, 7000))
        } else {
            (&self.outbound, at(CLIENT_ADDR, 6002))
        };
        from.send_to(msg.as_bytes(), target)?;
        let (got, _) = udp_receive(to).with_context(|| format!("{msg} to {target}"))?;
        ensure!(got == msg.as_bytes(), "{msg}: received {got:?}");
        Ok(())
    }
}

/// A datagram `data` from `src` in the client to `dst`; the socket at `listen` in the guest may
/// receive it. After the inbound marker: where it came from, or [`NOTHING`].
fn udp_in_dropped(
    topo: &Topology,
    markers: &mut Markers,
    (src, dst): (SocketAddrV4, SocketAddrV4),
    listen: SocketAddrV4,
) -> anyhow::Result<Outcome> {
    let service = udp_bind(&topo.guest, listen)?;
    udp_bind(&topo.client, src)?.send_to(b"may not arrive", dst)?;
    markers.pass(true)?;
    Ok(match assert_no_datagram(&service) {
        Ok(()) => NOTHING.into(),
        Err(e) => format!("{e:#}"),
    })
}

/// Runs every case of [`EXPECTED`] in `topo`, in order.
fn run_cases(topo: &Topology) -> anyhow::Result<Vec<Outcome>> {
    let (c, g) = (&topo.client, &topo.guest);
    let mut m = Markers::new(topo)?;
    let (guest_icmp, client_icmp) = (IcmpSniffer::open_in(g)?, IcmpSniffer::open_in(c)?);
    let mut out = Vec::new();

    let listener = tcp_listen(g, at(GUEST_ADDR, 8080))?;
    let mut conn =
        TcpAttempt::start_from(c, at(CLIENT_ADDR, 41001), at(PUBLIC_ADDR, 8080))?.connected()?;
    let (mut accepted, peer) = accept(&listener)?;
    conn.write_all(b"in")?;
    expect_bytes(&mut accepted, b"in")?;
    accepted.write_all(b"back")?;
    expect_bytes(&mut conn, b"back")?;
    out.push(format!(
        "the guest accepted {peer} at {}; the client is connected to {}; data both ways",
        accepted.local_addr()?,
        conn.peer_addr()?
    ));

    let listener = tcp_listen(g, at(GUEST_ADDR, 8081))?;
    let attempt = TcpAttempt::start_from(c, at(CLIENT_ADDR, 41002), at(PUBLIC_ADDR, 8081))?;
    m.pass(true)?;
    out.push(
        match (attempt.is_connected()?, assert_no_connection(&listener)) {
            (false, Ok(())) => NOTHING.into(),
            (connected, r) => format!("connected: {connected}; {r:?}"),
        },
    );

    let service = udp_bind(g, at(GUEST_ADDR, 7001))?;
    let client = udp_bind(c, at(CLIENT_ADDR, 41003))?;
    client.send_to(b"in", at(PUBLIC_ADDR, 7001))?;
    let (_, from) = udp_receive(&service)?;
    service.send_to(b"back", from)?;
    let (_, back) = udp_receive(&client)?;
    out.push(format!(
        "the guest got it from {from}; the client got the answer from {back}"
    ));
    drop(service);

    out.push(udp_in_dropped(
        topo,
        &mut m,
        (at(CLIENT_ADDR, 41004), at(PUBLIC_ADDR, 7002)),
        at(GUEST_ADDR, 7002),
    )?);

    client_icmp.send_query(PUBLIC_ADDR, ICMP_ECHO_REQUEST, (0x4201, 1), b"parity")?;
    let request = guest_icmp.collect(1, |s| s.icmp_type == ICMP_ECHO_REQUEST && s.id == 0x4201);
    let reply = client_icmp.collect(1, |s| s.icmp_type == ICMP_ECHO_REPLY && s.id == 0x4201);
    out.push(match (request.as_slice(), reply.as_slice()) {
        ([q], [r]) => format!(
            "the guest got {} -> {}; the client got the reply {} -> {}",
            q.src, q.dst, r.src, r.dst
        ),
        _ => format!("the guest got {request:?}; the client got {reply:?}"),
    });

    client_icmp.send_query(P2, ICMP_ECHO_REQUEST, (0x4202, 1), b"parity")?;
    m.pass(true)?;
    let request = guest_icmp.pending(|s| s.icmp_type == ICMP_ECHO_REQUEST && s.id == 0x4202);
    let reply = client_icmp.pending(|s| s.icmp_type == ICMP_ECHO_REPLY && s.id == 0x4202);
    out.push(if request.is_empty() && reply.is_empty() {
        NOTHING.into()
    } else {
        format!("the guest got {request:?}; the client got {reply:?}")
    });

    let server = udp_bind(c, at(CLIENT_ADDR, 6000))?;
    let guest = udp_bind(g, at(GUEST_ADDR, 5000))?;
    guest.send_to(b"out", at(CLIENT_ADDR, 6000))?;
    let (_, from) = udp_receive(&server)?;
    server.send_to(b"back", from)?;
    let (_, back) = udp_receive(&guest)?;
    out.push(format!(
        "the client got it from {from}; the guest got the answer from {back}"
    ));
    udp_bind(c, at(CLIENT_ADDR, 6009))?.send_to(b"not an answer", at(PUBLIC_ADDR, 5000))?;
    m.pass(true)?;
    out.push(match assert_no_datagram(&guest) {
        Ok(()) => NOTHING.into(),
        Err(e) => format!("{e:#}"),
    });

    let listener = tcp_listen(c, at(CLIENT_ADDR, 8088))?;
    let mut conn =
        TcpAttempt::start_from(g, at(GUEST_ADDR, 42009), at(CLIENT_ADDR, 8088))?.connected()?;
    let (mut accepted, peer) = accept(&listener)?;
    conn.write_all(b"out")?;
    expect_bytes(&mut accepted, b"out")?;
    accepted.write_all(b"back")?;
    expect_bytes(&mut conn, b"back")?;
    out.push(format!("the client accepted {peer}; data both ways"));

    let server = udp_bind(c, at(CLIENT_ADDR, 6001))?;
    udp_bind(g, at(GUEST_ADDR, 5002))?.send_to(b"denied", at(CLIENT_ADDR, 6001))?;
    m.pass(false)?;
    out.push(match assert_no_datagram(&server) {
        Ok(()) => NOTHING.into(),
        Err(e) => format!("{e:#}"),
    });

    out.push(udp_in_dropped(
        topo,
        &mut m,
        (at(CLIENT_ADDR, 41011), at(GUEST_ADDR, 7001)),
        at(GUEST_ADDR, 7001),
    )?);

    let denied = udp_bind(c, at(CLIENT_ADDR, 41012))?;
    let allowed = udp_bind(c, at(CLIENT_ADDR, 41013))?;
    for s in [&denied, &allowed] {
        record_errors(s)?;
        set_ttl(s, 1)?;
    }
    denied.send_to(b"ttl 1", at(PUBLIC_ADDR, 7002))?;
    m.pass(true)?;
    out.push(match next_error(&denied)? {
        None => NOTHING.into(),
        Some(e) => format!("{e:?}"),
    });
    allowed.send_to(b"ttl 1", at(PUBLIC_ADDR, 7001))?;
    out.push(match wait_error(&allowed, ARRIVAL) {
        Ok(e) if e.icmp_type == ICMP_TIME_EXCEEDED => format!("time exceeded from {}", e.offender),
        Ok(e) => format!("{e:?}"),
        Err(e) => format!("{e:#}"),
    });

    let service = udp_bind(g, at(GUEST_ADDR, 7001))?;
    let sender = udp_bind(g, at(V2, 43001))?;
    sender.send_to(b"hairpin", at(PUBLIC_ADDR, 7001))?;
    let (_, from) = udp_receive(&service)?;
    service.send_to(b"back", from)?;
    let (_, back) = udp_receive(&sender)?;
    out.push(format!(
        "the guest got it from {from}; the sender got the answer from {back}"
    ));
    Ok(out)
}

/// A fresh topology for one run: the guest's second address, and a client route to the guest
/// network (for the frame addressed straight to a private address).
fn topology() -> anyhow::Result<Topology> {
    let topo = Topology::new()?;
    topo.guest
        .ip(&["addr", "add", &format!("{V2}/24"), "dev", HOST_IF])?;
    topo.router
        .exec("ping", &["-n", "-q", "-c", "1", "-W", "5", &V2.to_string()])?;
    let via = ROUTER_PUBLIC_ADDR.to_string();
    topo.client
        .ip(&["route", "add", "10.0.0.0/24", "via", &via])?;
    Ok(topo)
}

/// How `ip -d link` shows an attached XDP program.
const XDP: &str = "prog/xdp";

/// Kills natd (nothing cleaned up: its nftables table and policy rules stay) and removes its
/// XDP links' pins, which detaches the program; waits until no router interface has XDP and
/// checks no tc program of natd's is left.
fn leave_only_the_kernel(topo: &Topology, natd: &mut Natd) -> anyhow::Result<()> {
    for dev in [ROUTER_PUBLIC_IF, ROUTER_GUEST_IF] {
        let link = topo.router_link(dev)?;
        ensure!(
            link.contains(XDP),
            "natd's XDP program is not on {dev}: {link}"
        );
    }
    natd.kill()?;
    let links = Natd::pin_dir(topo).join("links");
    for entry in std::fs::read_dir(&links).with_context(|| format!("{}", links.display()))? {
        let path = entry?.path();
        std::fs::remove_file(&path).with_context(|| format!("{}", path.display()))?;
    }
    let deadline = Instant::now() + ARRIVAL;
    for dev in [ROUTER_PUBLIC_IF, ROUTER_GUEST_IF] {
        while topo.router_link(dev)?.contains(XDP) {
            ensure!(
                Instant::now() < deadline,
                "XDP still attached to {dev} after its pin went: {}",
                topo.router_link(dev)?
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        for kind in [
            aya::programs::tc::TcAttachType::Ingress,
            aya::programs::tc::TcAttachType::Egress,
        ] {
            let (_, progs) = topo
                .router
                .run(|| aya::programs::SchedClassifier::query_tcx(dev, kind))?
                .with_context(|| format!("tcx programs on {dev}"))?;
            ensure!(
                progs.is_empty(),
                "{} tc program(s) left on {dev}",
                progs.len()
            );
        }
    }
    ensure!(
        topo.nft_table()?.is_some(),
        "natd's nftables table went with natd"
    );
    Ok(())
}

/// Every case of [`EXPECTED`], sent once through the XDP program (which decides them all: no
/// pass reason grows but `ttl_expired`, once, for the allowed TTL-1 datagram) and once, in a fresh router, through the kernel alone with natd's
/// nftables table: each run gives the router's verdicts, the same delivery and the same
/// addresses at every receiver.
#[test]
fn the_kernel_alone_gives_the_fast_paths_verdicts() -> anyhow::Result<()> {
    let fast = {
        let topo = topology()?;
        let natd = Natd::start(&topo, Some(CONFIG))?;
        let natctl = natd.natctl()?;
        let before = natctl.stats()?;
        let seen = run_cases(&topo).context("with XDP")?;
        let passed = passes_grown(&before.reasons, &natctl.stats()?.reasons)?;
        // The allowed TTL-1 datagram is the kernel's to answer; XDP decided all the rest.
        ensure!(
            passed == [("ttl_expired".to_string(), 1)],
            "XDP passed to the kernel: {passed:?}"
        );
        seen
    };
    let slow = {
        let topo = topology()?;
        let mut natd = Natd::start_with(
            &topo,
            &NatdOptions {
                config: Some(CONFIG.into()),
                keep_fast_path: true,
                ..NatdOptions::default()
            },
        )?;
        leave_only_the_kernel(&topo, &mut natd)?;
        run_cases(&topo).context("with the kernel alone")?
    };
    let mut differences = Vec::new();
    for (((case, want), fast), slow) in EXPECTED.iter().zip(&fast).zip(&slow) {
        if fast != want || slow != want {
            differences.push(format!(
                "{case}:\n  expected: {want}\n  with XDP: {fast}\n  kernel:   {slow}"
            ));
        }
    }
    ensure!(
        differences.is_empty() && fast.len() == EXPECTED.len() && slow.len() == EXPECTED.len(),
        "{} case(s) differ:\n{}",
        differences.len(),
        differences.join("\n")
    );
    Ok(())
}
