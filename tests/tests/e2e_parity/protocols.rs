//! The protocols whose checksums cover the addresses besides TCP and UDP (UDP-Lite, DCCP):
//! the XDP fast path translates them itself, whatever the kernel's conntrack knows of them
//! (this kernel marks UDP-Lite INVALID and has no DCCP tracker), and what it forwards arrives
//! with a checksum valid for the addresses it arrives with, never corrupted.
use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd as _, OwnedFd},
};

use anyhow::Context as _;
use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, Natd, Netns, PUBLIC_ADDR, Topology,
    attempt::udp_receive,
    observe::ARRIVAL,
    sock::{self, raw_send},
};

use super::{ONE_MAPPING, at, counted, v4};

/// A UDP-Lite socket (`IPPROTO_UDPLITE`) in `ns` bound to `bind`.
fn udplite_socket(ns: &Netns, bind: SocketAddrV4) -> anyhow::Result<UdpSocket> {
    ns.run(|| -> anyhow::Result<UdpSocket> {
        let fd = sock::open(
            libc::AF_INET,
            libc::SOCK_DGRAM,
            libc::IPPROTO_UDPLITE,
            "UDP-Lite",
        )?;
        sock::bind(&fd, bind)?;
        Ok(UdpSocket::from(fd))
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

/// A UDP-Lite datagram from the guest (whose checksum covers the addresses) is translated by
/// the fast path (`outbound_forwarded`) and arrives at the client from P with a valid
/// checksum (a UDP-Lite socket takes nothing else; the client counts no checksum error); the
/// client's answer comes back to the guest the same way (`inbound_forwarded`).
#[test]
fn udplite_is_translated_by_the_fast_path_and_arrives_intact() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let server = udplite_socket(&topo.client, at(CLIENT_ADDR, 9000))?;
    let guest = udplite_socket(&topo.guest, at(GUEST_ADDR, 9001))?;
    counted(
        &natctl,
        "outbound_forwarded",
        "the guest's UDP-Lite datagram",
        || Ok(guest.send_to(b"lite", at(CLIENT_ADDR, 9000))?),
    )?;
    let (data, from) = udp_receive(&server).context("the guest's datagram at the client")?;
    assert_eq!(
        (data.as_slice(), v4(from, "the client saw")?),
        (&b"lite"[..], at(PUBLIC_ADDR, 9001))
    );
    counted(&natctl, "inbound_forwarded", "the client's answer", || {
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

/// DCCP packet types (RFC 4340 §5.1).
const DCCP_REQUEST: u8 = 0;
const DCCP_RESPONSE: u8 = 1;

/// A DCCP-Request (20 bytes: generic header with a 48-bit sequence number, and a service
/// code) or DCCP-Response (28 bytes: also an acknowledgement number) from `src`:`sport` to
/// `dst`:`dport`, its checksum covering the whole packet.
fn dccp_packet(ty: u8, src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend(sport.to_be_bytes());
    p.extend(dport.to_be_bytes());
    p.push(if ty == DCCP_RESPONSE { 7 } else { 5 }); // data offset, in 32-bit words
    p.push(0); // CCVal 0, checksum coverage 0: all of it
    p.extend([0, 0]); // checksum, below
    p.push(ty << 1 | 1); // type, X = 1 (48-bit sequence numbers)
    p.push(0);
    p.extend([0, 0, 0, 0, 0x12, 0x34]); // sequence number
    if ty == DCCP_RESPONSE {
        p.extend([0, 0, 0, 0, 0, 0, 0x12, 0x34]); // acknowledgement number
    }
    p.extend(*b"xsn1"); // service code
    let sum = checksum(pseudo_header(src, dst, p.len()), &p);
    p[6..8].copy_from_slice(&sum.to_be_bytes());
    p
}

/// Sends `packet` (a DCCP packet) from the raw socket `fd` to `dst`.
fn send_dccp(fd: &OwnedFd, packet: &[u8], dst: Ipv4Addr) -> anyhow::Result<()> {
    raw_send(fd, packet, dst, "DCCP")
}

/// Receives the next DCCP packet at the raw socket `fd` and checks that it came `src` ->
/// `dst` with a checksum valid for those addresses; returns its DCCP bytes.
fn receive_dccp(fd: &OwnedFd, what: &str, src: Ipv4Addr, dst: Ipv4Addr) -> anyhow::Result<Vec<u8>> {
    let mut buf = [0u8; 1500];
    // SAFETY: valid fd; the buffer outlives the call and its length is passed.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = usize::try_from(n)
        .map_err(|_| std::io::Error::last_os_error())
        .with_context(|| format!("no DCCP packet at {what}"))?;
    let ihl = usize::from(buf[0] & 0x0f) * 4;
    let got = (
        Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]),
        Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]),
    );
    let dccp = &buf[ihl..n];
    assert_eq!(
        got,
        (src, dst),
        "the addresses of the DCCP packet at {what}"
    );
    assert_eq!(
        checksum(pseudo_header(src, dst, dccp.len()), dccp),
        0,
        "the DCCP checksum at {what} does not hold for {src} -> {dst}: {dccp:02x?}"
    );
    Ok(dccp.to_vec())
}

/// A raw socket for DCCP (protocol 33) in `ns`: sends DCCP packets (the kernel adds the IPv4
/// header) and receives a copy of every DCCP packet the namespace receives, IPv4 header
/// included, whether or not the kernel speaks DCCP.
fn dccp_raw_socket(ns: &Netns) -> anyhow::Result<OwnedFd> {
    ns.run(|| -> anyhow::Result<OwnedFd> {
        let fd = sock::open(
            libc::AF_INET,
            libc::SOCK_RAW,
            IPPROTO_DCCP as libc::c_int,
            "raw DCCP",
        )?;
        sock::receive_timeout(&fd, ARRIVAL)?;
        Ok(fd)
    })?
}

/// A DCCP-Request from the guest (whose checksum covers the addresses, like UDP-Lite's) is
/// translated by the fast path (`outbound_forwarded`) and arrives at the client from P with a
/// checksum valid for the addresses it arrives with, never corrupted; the client's
/// DCCP-Response comes back to the guest the same way (`inbound_forwarded`), ports intact.
/// (This kernel has no DCCP sockets; raw sockets send and receive the packets.)
#[test]
fn a_dccp_flow_is_translated_by_the_fast_path_intact() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let (guest, client) = (
        dccp_raw_socket(&topo.guest)?,
        dccp_raw_socket(&topo.client)?,
    );
    let request = dccp_packet(DCCP_REQUEST, GUEST_ADDR, CLIENT_ADDR, 5001, 5002);
    counted(
        &natctl,
        "outbound_forwarded",
        "the guest's DCCP-Request",
        || send_dccp(&guest, &request, CLIENT_ADDR),
    )?;
    let got = receive_dccp(&client, "the client", PUBLIC_ADDR, CLIENT_ADDR)?;
    assert_eq!(got[..6], request[..6], "ports and header at the client");
    assert_eq!(got[8..], request[8..], "the rest of the DCCP-Request");
    let response = dccp_packet(DCCP_RESPONSE, CLIENT_ADDR, PUBLIC_ADDR, 5002, 5001);
    counted(
        &natctl,
        "inbound_forwarded",
        "the client's DCCP-Response",
        || send_dccp(&client, &response, PUBLIC_ADDR),
    )?;
    let got = receive_dccp(&guest, "the guest", CLIENT_ADDR, GUEST_ADDR)?;
    assert_eq!(got[..6], response[..6], "ports and header at the guest");
    assert_eq!(got[8..], response[8..], "the rest of the DCCP-Response");
    Ok(())
}
