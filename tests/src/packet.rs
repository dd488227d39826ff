//! A small frame builder (Ethernet, IPv4 with options and fragment fields, TCP, UDP,
//! UDP-Lite, DCCP, ICMP including errors that quote an inner packet) producing correct
//! checksums, and a checker
//! that recomputes every checksum of a frame from scratch.
//!
//! Checksums are computed with `nat_common::csum::{checksum, sum_words}` over the whole
//! header or segment, never incrementally, so they are an independent reference for the
//! program's RFC 1624 updates.
use std::net::Ipv4Addr;

use nat_common::csum::{checksum, fold_wide, sum_words};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_DCCP: u8 = 33;
pub const PROTO_UDPLITE: u8 = 136;
pub const PROTO_GRE: u8 = 47;
pub const PROTO_ESP: u8 = 50;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// Default DF flag, as most hosts send.
pub const DF: u16 = 0x4000;
pub const MF: u16 = 0x2000;

/// An IPv4 header description. `build` fills in IHL, total length and checksum.
#[derive(Clone, Debug)]
pub struct Ip {
    pub tos: u8,
    pub id: u16,
    /// Flags and fragment offset, as the 16-bit field.
    pub frag: u16,
    pub ttl: u8,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Options, padded with zeros to a multiple of four by `build`.
    pub options: Vec<u8>,
}

impl Ip {
    pub fn new(proto: u8, src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Self {
            tos: 0,
            id: 0x1c46,
            frag: DF,
            ttl: 64,
            proto,
            src,
            dst,
            options: Vec::new(),
        }
    }

    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn frag(mut self, frag: u16) -> Self {
        self.frag = frag;
        self
    }

    pub fn options(mut self, options: &[u8]) -> Self {
        self.options = options.to_vec();
        self
    }

    /// The header (with valid checksum) for a payload of `payload_len` bytes.
    pub fn header(&self, payload_len: usize) -> Vec<u8> {
        let mut opts = self.options.clone();
        opts.resize(opts.len().div_ceil(4) * 4, 0);
        let hlen = 20 + opts.len();
        let tot_len = u16::try_from(hlen + payload_len).expect("IPv4 packet too long");
        let mut h = Vec::with_capacity(hlen);
        h.push(0x40 | (hlen / 4) as u8);
        h.push(self.tos);
        h.extend_from_slice(&tot_len.to_be_bytes());
        h.extend_from_slice(&self.id.to_be_bytes());
        h.extend_from_slice(&self.frag.to_be_bytes());
        h.push(self.ttl);
        h.push(self.proto);
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(&opts);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_ne_bytes());
        h
    }

    /// Header and payload.
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let mut p = self.header(payload.len());
        p.extend_from_slice(payload);
        p
    }
}

/// Sum of the TCP/UDP pseudo-header (RFC 793 §3.1, RFC 768) as native-order words.
fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u64 {
    let mut ph = Vec::with_capacity(12);
    ph.extend_from_slice(&src.octets());
    ph.extend_from_slice(&dst.octets());
    ph.extend_from_slice(&[0, proto]);
    ph.extend_from_slice(&(len as u16).to_be_bytes());
    sum_words(&ph, 0)
}

/// Checksum of a TCP/UDP segment whose checksum field is zero.
fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, seg: &[u8]) -> u16 {
    !fold_wide(sum_words(seg, pseudo_sum(src, dst, proto, seg.len())))
}

/// TCP flag bits (RFC 9293).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// A TCP segment with a valid checksum and flags PSH|ACK. `options` are padded to a multiple
/// of four.
pub fn tcp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    tcp_flags(src, dst, sport, dport, TCP_PSH | TCP_ACK, options, payload)
}

/// Sequence and acknowledgment number of [`tcp_flags`] segments: the same both ways, so that
/// every segment of a test's flow falls within the window the flow has shown (what one side
/// sent is what the other acknowledged).
pub const TCP_SEQ: u32 = 0x1122_3344;

/// A TCP segment with a valid checksum and the given flags byte, numbered [`TCP_SEQ`].
pub fn tcp_flags(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let ports = (sport, dport);
    tcp_seq(src, dst, ports, flags, (TCP_SEQ, TCP_SEQ), options, payload)
}

/// A TCP segment with a valid checksum, the given flags byte and `(seq, ack)` numbers.
pub fn tcp_seq(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    (sport, dport): (u16, u16),
    flags: u8,
    (seq, ack): (u32, u32),
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut opts = options.to_vec();
    opts.resize(opts.len().div_ceil(4) * 4, 0);
    let doff = (20 + opts.len()) / 4;
    assert!(doff <= 15, "TCP options too long");
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&seq.to_be_bytes());
    s.extend_from_slice(&ack.to_be_bytes());
    s.push((doff as u8) << 4);
    s.push(flags);
    s.extend_from_slice(&64240u16.to_be_bytes()); // window
    s.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    s.extend_from_slice(&opts);
    s.extend_from_slice(payload);
    let c = l4_checksum(src, dst, PROTO_TCP, &s);
    s[16..18].copy_from_slice(&c.to_ne_bytes());
    s
}

/// A UDP datagram, with a valid checksum (a computed 0 sent as 0xFFFF) or none (0).
pub fn udp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
    with_checksum: bool,
) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut s = Vec::with_capacity(len);
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&(len as u16).to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(payload);
    if with_checksum {
        let c = match l4_checksum(src, dst, PROTO_UDP, &s) {
            0 => 0xffff,
            c => c,
        };
        s[6..8].copy_from_slice(&c.to_ne_bytes());
    }
    s
}

/// A UDP-Lite datagram (RFC 3828 §3.1) with a valid checksum over `coverage` bytes (0: the
/// whole datagram; else clamped to it) and the pseudo-header, a computed 0 sent as 0xFFFF.
pub fn udplite(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
    coverage: u16,
) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut s = Vec::with_capacity(len);
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&coverage.to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(payload);
    let c = match checksum_covered(src, dst, PROTO_UDPLITE, &s, udplite_coverage(&s)) {
        0 => 0xffff,
        c => c,
    };
    s[6..8].copy_from_slice(&c.to_ne_bytes());
    s
}

/// DCCP packet types (RFC 4340 §5.1).
pub const DCCP_REQUEST: u8 = 0;
pub const DCCP_DATA: u8 = 2;

/// A DCCP packet (RFC 4340 §5.1) of type `ty` with extended (48-bit) sequence numbers, no
/// options, `payload` after the header, checksum coverage `cscov` (0: everything, RFC 4340
/// §9.2) and a valid checksum (§9.1). Request and Data carry no acknowledgement number.
pub fn dccp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    ty: u8,
    cscov: u8,
    payload: &[u8],
) -> Vec<u8> {
    // Request: 4 bytes of service code after the 16-byte generic header; Data: nothing more;
    // other types: an 8-byte acknowledgement subheader.
    let extra = match ty {
        DCCP_REQUEST => 4,
        DCCP_DATA => 0,
        _ => 8,
    };
    let doff = (16 + extra) / 4;
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.push(doff as u8);
    s.push(cscov & 0x0f);
    s.extend_from_slice(&[0, 0]); // checksum
    s.push((ty << 1) | 1); // X = 1
    s.push(0);
    s.extend_from_slice(&[0, 0, 0, 0x01, 0x02, 0x03]); // 48-bit sequence number (bytes 10..16)
    s.resize(16 + extra, 0);
    s.extend_from_slice(payload);
    let c = checksum_covered(src, dst, PROTO_DCCP, &s, dccp_coverage(&s));
    s[6..8].copy_from_slice(&c.to_ne_bytes());
    s
}

/// Bytes of a UDP-Lite datagram its checksum covers (RFC 3828 §3.1): the coverage field, 0
/// meaning everything; `None` if the field is illegal.
fn udplite_coverage(s: &[u8]) -> Option<usize> {
    let cov = u16::from_be_bytes([s[4], s[5]]) as usize;
    match cov {
        0 => Some(s.len()),
        8.. if cov <= s.len() => Some(cov),
        _ => None,
    }
}

/// Bytes of a DCCP packet its checksum covers (RFC 4340 §9.2): the header (data offset) plus
/// `(CsCov - 1) * 4` bytes of payload, everything for CsCov 0; `None` if beyond the packet.
fn dccp_coverage(s: &[u8]) -> Option<usize> {
    let doff = s[4] as usize * 4;
    let cscov = (s[5] & 0x0f) as usize;
    let cov = if cscov == 0 {
        s.len()
    } else {
        doff + (cscov - 1) * 4
    };
    (doff >= 12 && doff <= s.len() && cov <= s.len()).then_some(cov)
}

/// The checksum of `seg` (checksum field zero) over the pseudo-header (with the whole
/// length) and its first `cov` bytes (the whole segment if `None`).
fn checksum_covered(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    seg: &[u8],
    cov: Option<usize>,
) -> u16 {
    let cov = cov.unwrap_or(seg.len());
    !fold_wide(sum_words(
        &seg[..cov],
        pseudo_sum(src, dst, proto, seg.len()),
    ))
}

/// An ICMP message with a valid checksum: type, code, the 4-byte "rest of header" and body.
pub fn icmp(ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_ne_bytes());
    m
}

/// An echo request or reply.
pub fn icmp_echo(ty: u8, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let [a, b] = id.to_be_bytes();
    let [c, d] = seq.to_be_bytes();
    icmp(ty, 0, [a, b, c, d], payload)
}

/// An ICMP error quoting the first `quote` bytes of `offending` (an IP packet).
/// Destination unreachable / fragmentation needed carries `mtu` in the rest of the header.
pub fn icmp_error(ty: u8, code: u8, mtu: u16, offending: &[u8], quote: usize) -> Vec<u8> {
    let [a, b] = mtu.to_be_bytes();
    icmp(
        ty,
        code,
        [0, 0, a, b],
        &offending[..quote.min(offending.len())],
    )
}

/// An Ethernet frame.
pub fn ether(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A minimal ARP request frame (not IPv4 to the program).
pub fn arp_request(src_mac: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&src_mac);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&tpa.octets());
    ether([0xff; 6], src_mac, ETH_P_ARP, &a)
}

/// Whether the one's complement sum over `data` is negative zero, i.e. a valid checksum.
fn sums_to_ffff(data: &[u8], acc: u64) -> bool {
    fold_wide(sum_words(data, acc)) == 0xffff
}

/// Recomputes every checksum of an IPv4 frame from scratch and reports the first that is
/// wrong: the IP header, the whole TCP segment / UDP datagram (unless its checksum is 0) /
/// ICMP message, and for ICMP errors the quoted IP header and, when the quote holds the whole
/// inner TCP segment or UDP datagram, its checksum too.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let ip = frame.get(14..).ok_or("no IP header")?;
    let ihl = (ip.first().ok_or("no IP header")? & 0x0f) as usize * 4;
    let tot = u16::from_be_bytes([*ip.get(2).ok_or("IP header cut")?, ip[3]]) as usize;
    let ip = ip.get(..tot).ok_or("frame shorter than tot_len")?;
    if ihl < 20 || ihl > tot {
        return Err(format!("IHL {ihl} with tot_len {tot}"));
    }
    if !sums_to_ffff(&ip[..ihl], 0) {
        return Err("IP header checksum".into());
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[ihl..];
    let ok = match ip[9] {
        PROTO_TCP => sums_to_ffff(l4, pseudo_sum(src, dst, PROTO_TCP, l4.len())),
        PROTO_UDP => {
            let head = l4.get(..8).ok_or("UDP header cut")?;
            let ulen = u16::from_be_bytes([head[4], head[5]]) as usize;
            let dgram = l4.get(..ulen).ok_or("UDP length beyond packet")?;
            head[6..8] == [0, 0] || sums_to_ffff(dgram, pseudo_sum(src, dst, PROTO_UDP, ulen))
        }
        PROTO_UDPLITE => {
            let head = l4.get(..8).ok_or("UDP-Lite header cut")?;
            let cov = udplite_coverage(l4).ok_or("UDP-Lite coverage")?;
            head[6..8] != [0, 0]
                && sums_to_ffff(&l4[..cov], pseudo_sum(src, dst, PROTO_UDPLITE, l4.len()))
        }
        PROTO_DCCP => {
            l4.get(..12).ok_or("DCCP header cut")?;
            let cov = dccp_coverage(l4).ok_or("DCCP data offset or coverage")?;
            sums_to_ffff(&l4[..cov], pseudo_sum(src, dst, PROTO_DCCP, l4.len()))
        }
        PROTO_ICMP => sums_to_ffff(l4, 0),
        _ => true,
    };
    if !ok {
        return Err(format!("protocol {} checksum", ip[9]));
    }
    let errors = [
        ICMP_DEST_UNREACH,
        ICMP_TIME_EXCEEDED,
        ICMP_PARAMETER_PROBLEM,
    ];
    if ip[9] == PROTO_ICMP
        && let Some(&ty) = l4.first()
        && errors.contains(&ty)
    {
        let quoted = l4.get(8..).ok_or("ICMP error header cut")?;
        verify_quoted(quoted).map_err(|e| format!("quoted packet: {e}"))?;
    }
    Ok(())
}

/// The quoted packet of an ICMP error: its IP header always; its transport checksum when the
/// quote holds the whole segment (as the inner tot_len says).
fn verify_quoted(q: &[u8]) -> Result<(), String> {
    if q.len() < 20 {
        return Ok(());
    }
    if !sums_to_ffff(&q[..20], 0) {
        return Err("IP header checksum".into());
    }
    let tot = u16::from_be_bytes([q[2], q[3]]) as usize;
    if q.len() < tot {
        return Ok(()); // truncated quote: nothing more to check from scratch
    }
    let mut inner = vec![0u8; 14];
    inner.extend_from_slice(&q[..tot]);
    verify_checksums(&inner)
}
