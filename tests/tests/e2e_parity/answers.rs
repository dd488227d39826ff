//! What gets an answer, and whose: a denied TTL-1 packet draws no ICMP time exceeded (the
//! firewall judges before anything answers, so a scan learns nothing) while an allowed one
//! does; two guests reaching the same public IP from the same source port each get their own
//! answers; UDP-Lite and DCCP, left to the kernel, arrive with valid checksums.
use std::{
    io::Write as _,
    net::{Ipv4Addr, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, ensure};
use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, HOST_IF, Natd, NatdOptions, Netns, PUBLIC_ADDR, ROUTER_GUEST_ADDR,
    ROUTER_GUEST_IF, Topology,
    attempt::{TcpAttempt, accept, assert_no_datagram, expect_bytes, tcp_listen, udp_receive},
    fastpath::{self, Arrived},
    icmp_error::{ICMP_TIME_EXCEEDED, next_error, record_errors, set_ttl, wait_error},
    links::{GUEST2_ADDR, GUEST2_LINK, ROUTER_GUEST2_ADDR, ROUTER_GUEST2_IF},
    observe::{ARRIVAL, IcmpSniffer, payload, segs_in, udp_bind},
    policy::{Way, reason},
};

use super::{ONE_MAPPING, at, counted, v4};

/// A UDP socket in `ns` bound to `bind`, sending with TTL 1 and recording the ICMP errors its
/// datagrams draw.
fn ttl1_socket(ns: &Netns, bind: std::net::SocketAddrV4) -> anyhow::Result<UdpSocket> {
    let s = udp_bind(ns, bind)?;
    record_errors(&s)?;
    set_ttl(&s, 1)?;
    Ok(s)
}

/// TTL-1 datagrams to P: to a port no rule opens, dropped in XDP (`inbound_denied`), no ICMP
/// time exceeded comes back; to a port a rule opens, passed to the kernel (`ttl_expired`),
/// which answers with a time exceeded (from P: the kernel's NAT translates its own error as
/// related to the flow, as on CloudStack's router). The same from the guest under an egress
/// rule that denies one port: the denied datagram draws nothing, the allowed one a time
/// exceeded from the router's guest-side address.
#[test]
fn a_denied_ttl1_packet_draws_no_time_exceeded() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let config = format!(
        "{ONE_MAPPING}[[rule]]\npublic = \"203.0.113.10\"\nproto = \"udp\"\nports = \"7000\"\n\
         [[egress.rule]]\nproto = \"udp\"\nports = \"6001\"\n"
    );
    let natd = Natd::start(&topo, Some(&config))?;
    let natctl = natd.natctl()?;
    let client_icmp = IcmpSniffer::open_in(&topo.client)?;
    let guest_icmp = IcmpSniffer::open_in(&topo.guest)?;

    let denied = ttl1_socket(&topo.client, at(CLIENT_ADDR, 6000))?;
    natctl.dropped(PUBLIC_ADDR, Way::In, "a TTL-1 datagram to P:7001", || {
        Ok(denied.send_to(b"ttl 1", at(PUBLIC_ADDR, 7001))?)
    })?;
    let allowed = ttl1_socket(&topo.client, at(CLIENT_ADDR, 6001))?;
    counted(&natctl, "ttl_expired", "a TTL-1 datagram to P:7000", || {
        Ok(allowed.send_to(b"ttl 1", at(PUBLIC_ADDR, 7000))?)
    })?;
    let e = wait_error(&allowed, ARRIVAL).context("the allowed datagram")?;
    assert_eq!(
        (e.icmp_type, e.offender),
        (ICMP_TIME_EXCEEDED, PUBLIC_ADDR),
        "{e:?}"
    );
    // The allowed datagram's answer came back, so the denied one's would have too.
    assert_eq!(next_error(&denied)?, None, "the denied datagram");
    let exceeded = client_icmp.pending(|s| s.icmp_type == ICMP_TIME_EXCEEDED);
    assert_eq!(
        exceeded.len(),
        1,
        "time exceeded at the client: {exceeded:?}"
    );

    let denied = ttl1_socket(&topo.guest, at(GUEST_ADDR, 5000))?;
    natctl.dropped(
        PUBLIC_ADDR,
        Way::Out,
        "a TTL-1 datagram to port 6001",
        || Ok(denied.send_to(b"ttl 1", at(CLIENT_ADDR, 6001))?),
    )?;
    let allowed = ttl1_socket(&topo.guest, at(GUEST_ADDR, 5001))?;
    counted(
        &natctl,
        "ttl_expired",
        "a TTL-1 datagram to port 6000",
        || Ok(allowed.send_to(b"ttl 1", at(CLIENT_ADDR, 6000))?),
    )?;
    let e = wait_error(&allowed, ARRIVAL).context("the guest's allowed datagram")?;
    assert_eq!(
        (e.icmp_type, e.offender),
        (ICMP_TIME_EXCEEDED, ROUTER_GUEST_ADDR),
        "{e:?}"
    );
    assert_eq!(next_error(&denied)?, None, "the guest's denied datagram");
    let exceeded = guest_icmp.pending(|s| s.icmp_type == ICMP_TIME_EXCEEDED);
    assert_eq!(
        exceeded.len(),
        1,
        "time exceeded at the guest: {exceeded:?}"
    );
    Ok(())
}

/// The same on the kernel path: fragmented TTL-1 datagrams (the XDP program passes fragments
/// to the kernel, which reassembles them before it routes): the one to a port no rule opens
/// draws no time exceeded, the one to an open port draws one from P.
#[test]
fn a_denied_fragmented_ttl1_packet_draws_no_time_exceeded() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let config = format!(
        "{ONE_MAPPING}[[rule]]\npublic = \"203.0.113.10\"\nproto = \"udp\"\nports = \"7000\"\n"
    );
    let _natd = Natd::start(&topo, Some(&config))?;
    let router0 = topo.router.ip_counter("ReasmOKs")?;
    let denied = ttl1_socket(&topo.client, at(CLIENT_ADDR, 6000))?;
    denied.send_to(&payload(3000), at(PUBLIC_ADDR, 7001))?;
    let allowed = ttl1_socket(&topo.client, at(CLIENT_ADDR, 6001))?;
    allowed.send_to(&payload(3000), at(PUBLIC_ADDR, 7000))?;
    let e = wait_error(&allowed, ARRIVAL).context("the allowed datagram")?;
    assert_eq!(
        (e.icmp_type, e.offender),
        (ICMP_TIME_EXCEEDED, PUBLIC_ADDR),
        "{e:?}"
    );
    assert_eq!(next_error(&denied)?, None, "the denied datagram");
    assert_eq!(
        topo.router.ip_counter("ReasmOKs")? - router0,
        2,
        "the router reassembled both (the kernel path)"
    );
    Ok(())
}

/// The second guest network's public IP, the hairpin target.
const P_TARGET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
/// A second address of the first guest namespace, with a public IP of its own.
const V_OTHER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);

/// Two guests (10.0.0.10 and 10.0.0.20) reach the second network's guest through its public IP
/// from the same source port at the same time, by UDP and by TCP: the target sees both from
/// the router's address on its side, from two different ports, and each guest gets its own
/// answers and nothing else, all through the fast path.
#[test]
fn hairpin_flows_from_the_same_source_port_each_get_their_own_answers() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let target = topo.add_guest("guest2", GUEST2_LINK)?;
    topo.guest
        .ip(&["addr", "add", &format!("{V_OTHER}/24"), "dev", HOST_IF])?;
    topo.router.exec(
        "ping",
        &["-n", "-q", "-c", "1", "-W", "5", &V_OTHER.to_string()],
    )?;
    let config = format!(
        "{ONE_MAPPING}[[mapping]]\npublic = \"{V_OTHER_P}\"\nprivate = \"{V_OTHER}\"\n\
         [[mapping]]\npublic = \"{P_TARGET}\"\nprivate = \"{GUEST2_ADDR}\"\n\
         [[rule]]\npublic = \"{P_TARGET}\"\nproto = \"udp\"\nports = \"7000\"\n\
         [[rule]]\npublic = \"{P_TARGET}\"\nproto = \"tcp\"\nports = \"8080\"\n",
        V_OTHER_P = "203.0.113.20"
    );
    let natd = Natd::start_with(
        &topo,
        &NatdOptions {
            guest_ifaces: vec![ROUTER_GUEST_IF.into(), ROUTER_GUEST2_IF.into()],
            config: Some(config),
            ..NatdOptions::default()
        },
    )?;
    let natctl = natd.natctl()?;
    let before = natctl.stats()?;

    let service = udp_bind(&target, at(GUEST2_ADDR, 7000))?;
    let mut senders = Vec::new();
    let mut ports = Vec::new();
    for (i, v) in [GUEST_ADDR, V_OTHER].into_iter().enumerate() {
        let s = udp_bind(&topo.guest, at(v, 5000))?;
        s.send_to(format!("from guest {i}").as_bytes(), at(P_TARGET, 7000))?;
        let (data, from) = udp_receive(&service)?;
        let from = v4(from, "the target saw")?;
        assert_eq!(data, format!("from guest {i}").as_bytes());
        assert_eq!(*from.ip(), ROUTER_GUEST2_ADDR, "guest {i}");
        senders.push(s);
        ports.push(from);
    }
    ensure!(
        ports[0].port() != ports[1].port(),
        "the target saw both flows from {}",
        ports[0]
    );
    for (i, p) in ports.iter().enumerate() {
        service.send_to(format!("to guest {i}").as_bytes(), p)?;
    }
    for (i, s) in senders.iter().enumerate() {
        let (data, from) = udp_receive(s).with_context(|| format!("guest {i}'s answer"))?;
        assert_eq!(
            (data, v4(from, "the guest saw")?),
            (format!("to guest {i}").into_bytes(), at(P_TARGET, 7000)),
            "guest {i}"
        );
        assert_no_datagram(s).with_context(|| format!("guest {i}"))?;
    }

    let listener = tcp_listen(&target, at(GUEST2_ADDR, 8080))?;
    let mut conns = Vec::new();
    for v in [GUEST_ADDR, V_OTHER] {
        let c =
            TcpAttempt::start_from(&topo.guest, at(v, 5001), at(P_TARGET, 8080))?.connected()?;
        let (accepted, peer) = accept(&listener)?;
        conns.push((c, accepted, v4(peer, "the target saw")?));
    }
    ensure!(
        conns[0].2 != conns[1].2 && conns.iter().all(|c| *c.2.ip() == ROUTER_GUEST2_ADDR),
        "the target saw the connections from {} and {}",
        conns[0].2,
        conns[1].2
    );
    for (i, (c, accepted, _)) in conns.iter_mut().enumerate() {
        accepted.write_all(format!("hello {i}").as_bytes())?;
        expect_bytes(c, format!("hello {i}").as_bytes())?;
        c.write_all(format!("bye {i}").as_bytes())?;
        expect_bytes(accepted, format!("bye {i}").as_bytes())?;
    }
    let after = natctl.stats()?;
    ensure!(
        reason(&after, "hairpin_collision")? == reason(&before, "hairpin_collision")?,
        "a collision was passed to the kernel"
    );
    let mut segments = 0;
    for (c, accepted, _) in &conns {
        segments += segs_in(c)? + segs_in(accepted)?;
    }
    fastpath::carried(
        &before,
        &after,
        &[
            Arrived::new("hairpin_forwarded", 4, "datagrams and answers"),
            Arrived::new("hairpin_forwarded", segments, "TCP segments, both ends"),
        ],
    )
}

/// A UDP-Lite socket (`IPPROTO_UDPLITE`) in `ns` bound to `bind`.
fn udplite_socket(ns: &Netns, bind: std::net::SocketAddrV4) -> anyhow::Result<UdpSocket> {
    ns.run(|| -> anyhow::Result<UdpSocket> {
        // SAFETY: plain syscall; the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::IPPROTO_UDPLITE,
            )
        };
        ensure!(
            fd >= 0,
            "UDP-Lite socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let s = UdpSocket::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: bind.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*bind.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: valid fd and a correctly sized `sockaddr_in`.
        let rc = unsafe {
            libc::bind(
                s.as_raw_fd(),
                (&raw const sa).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        ensure!(
            rc == 0,
            "binding {bind}: {}",
            std::io::Error::last_os_error()
        );
        Ok(s)
    })?
}

/// The `UdpLite:` counter `name` of `ns` (`/proc/net/snmp`).
fn udplite_counter(ns: &Netns, name: &str) -> anyhow::Result<u64> {
    let text = ns.exec("cat", &["/proc/net/snmp"])?;
    let mut lines = text.lines().filter(|l| l.starts_with("UdpLite: "));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        anyhow::bail!("/proc/net/snmp has no UdpLite lines:\n{text}");
    };
    let i = names
        .split_whitespace()
        .position(|n| n == name)
        .with_context(|| format!("no UdpLite counter {name}: {names}"))?;
    values
        .split_whitespace()
        .nth(i)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no value for UdpLite {name}: {values}"))
}

/// A UDP-Lite datagram from the guest (whose checksum covers the addresses) is left to the
/// kernel (`unsupported_proto`) and arrives at the client from P with a valid checksum (a
/// UDP-Lite socket takes nothing else; the client counts no checksum error); the client's
/// answer comes back to the guest the same way.
#[test]
fn udplite_is_left_to_the_kernel_and_arrives_intact() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let server = udplite_socket(&topo.client, at(CLIENT_ADDR, 9000))?;
    let guest = udplite_socket(&topo.guest, at(GUEST_ADDR, 9001))?;
    counted(
        &natctl,
        "unsupported_proto",
        "the guest's UDP-Lite datagram",
        || Ok(guest.send_to(b"lite", at(CLIENT_ADDR, 9000))?),
    )?;
    let (data, from) = udp_receive(&server).context("the guest's datagram at the client")?;
    assert_eq!(
        (data.as_slice(), v4(from, "the client saw")?),
        (&b"lite"[..], at(PUBLIC_ADDR, 9001))
    );
    counted(&natctl, "unsupported_proto", "the client's answer", || {
        Ok(server.send_to(b"lite back", from)?)
    })?;
    let (data, from) = udp_receive(&guest).context("the answer at the guest")?;
    assert_eq!(
        (data.as_slice(), v4(from, "the guest saw")?),
        (&b"lite back"[..], at(CLIENT_ADDR, 9000))
    );
    for ns in [&topo.client, &topo.guest] {
        assert_eq!(udplite_counter(ns, "InCsumErrors")?, 0, "{}", ns.name());
    }
    Ok(())
}

/// The internet checksum (RFC 1071) of `data` after `sum` (unfolded, of earlier words).
fn checksum(mut sum: u32, data: &[u8]) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The sum of DCCP's pseudo-header (RFC 4340 9.1: addresses, protocol 33, length).
fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, len: usize) -> u32 {
    let word = |o: [u8; 4], i: usize| u32::from(u16::from_be_bytes([o[i], o[i + 1]]));
    let (s, d) = (src.octets(), dst.octets());
    word(s, 0) + word(s, 2) + word(d, 0) + word(d, 2) + IPPROTO_DCCP + len as u32
}

const IPPROTO_DCCP: u32 = 33;

/// A DCCP-Request from `src`:`sport` to `dst`:`dport` (20 bytes: generic header with a 48-bit
/// sequence number, and a service code), its checksum covering the whole packet.
fn dccp_request(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend(sport.to_be_bytes());
    p.extend(dport.to_be_bytes());
    p.push(5); // data offset, in 32-bit words
    p.push(0); // CCVal 0, checksum coverage 0: all of it
    p.extend([0, 0]); // checksum, below
    p.push(1); // type 0 (Request), X = 1 (48-bit sequence numbers)
    p.push(0);
    p.extend([0, 0, 0, 0, 0x12, 0x34]); // sequence number
    p.extend(*b"xsn1"); // service code
    let sum = checksum(pseudo_header(src, dst, p.len()), &p);
    p[6..8].copy_from_slice(&sum.to_be_bytes());
    p
}

/// A raw socket for DCCP (protocol 33) in `ns`: sends DCCP packets (the kernel adds the IPv4
/// header) and receives a copy of every DCCP packet the namespace receives, IPv4 header
/// included, whether or not the kernel speaks DCCP.
fn dccp_raw_socket(ns: &Netns) -> anyhow::Result<OwnedFd> {
    ns.run(|| -> anyhow::Result<OwnedFd> {
        // SAFETY: plain syscall; the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                IPPROTO_DCCP as libc::c_int,
            )
        };
        ensure!(
            fd >= 0,
            "raw DCCP socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: ARRIVAL.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: valid fd and a correctly sized `timeval`.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        ensure!(rc == 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        Ok(fd)
    })?
}

/// A DCCP packet from the guest (whose checksum covers the addresses, like UDP-Lite's) is left
/// to the kernel (`unsupported_proto`) and must arrive at the client translated, from P, with
/// a checksum that is valid for the addresses it arrives with, or not at all: never corrupted.
/// (This kernel has no DCCP sockets; raw sockets send and receive the packets.)
#[test]
fn a_dccp_packet_is_never_corrupted() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let (sender, receiver) = (
        dccp_raw_socket(&topo.guest)?,
        dccp_raw_socket(&topo.client)?,
    );
    let packet = dccp_request(GUEST_ADDR, CLIENT_ADDR, 5001, 5002);
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(CLIENT_ADDR).to_be(),
        },
        sin_zero: [0; 8],
    };
    counted(
        &natctl,
        "unsupported_proto",
        "the guest's DCCP packet",
        || {
            // SAFETY: valid fd; the buffer and the `sockaddr_in` outlive the call, sizes passed.
            let n = unsafe {
                libc::sendto(
                    sender.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const to).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            ensure!(
                usize::try_from(n) == Ok(packet.len()),
                "sending DCCP: {}",
                std::io::Error::last_os_error()
            );
            Ok(())
        },
    )?;
    let mut buf = [0u8; 1500];
    // SAFETY: valid fd; the buffer outlives the call and its length is passed.
    let n = unsafe { libc::recv(receiver.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = usize::try_from(n)
        .map_err(|_| std::io::Error::last_os_error())
        .context("no DCCP packet at the client")?;
    let ihl = usize::from(buf[0] & 0x0f) * 4;
    let (src, dst) = (
        Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]),
        Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]),
    );
    let dccp = &buf[ihl..n];
    assert_eq!(
        (src, dst),
        (PUBLIC_ADDR, CLIENT_ADDR),
        "the DCCP packet's addresses"
    );
    assert_eq!(
        checksum(pseudo_header(src, dst, dccp.len()), dccp),
        0,
        "the DCCP checksum does not hold for {src} -> {dst}: {dccp:02x?}"
    );
    Ok(())
}
