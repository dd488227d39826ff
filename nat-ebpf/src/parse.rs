//! Header parsing and sanity checks, shared by the XDP program and the tc programs (one parser
//! for every program that reads packets). Offsets are constants (no IP options, no VLAN),
//! which also keeps every packet access trivially provable for the verifier; header fields are
//! read through network-types' structs.
use core::mem::offset_of;

use nat_common::{FlowTuple, Reason, Segment, proto};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

pub const ETH_LEN: usize = EthHdr::LEN;
pub const IP_OFF: usize = ETH_LEN;
pub const IP_LEN: usize = Ipv4Hdr::LEN;
pub const L4_OFF: usize = IP_OFF + IP_LEN;
/// Embedded IPv4 header of an ICMP error (after the 8-byte ICMP header).
pub const EMB_IP_OFF: usize = L4_OFF + 8;
/// Embedded transport header of an ICMP error.
pub const EMB_L4_OFF: usize = EMB_IP_OFF + IP_LEN;

pub const IP_CSUM: usize = IP_OFF + offset_of!(Ipv4Hdr, check);
pub const IP_TTL: usize = IP_OFF + offset_of!(Ipv4Hdr, ttl);
pub const IP_SRC: usize = IP_OFF + offset_of!(Ipv4Hdr, src_addr);
pub const IP_DST: usize = IP_OFF + offset_of!(Ipv4Hdr, dst_addr);
/// Offset of the identifier in an ICMP query (RFC 792).
pub const ICMP_ID_AT: usize = 4;
/// Offset of the ICMP checksum.
pub const ICMP_CSUM_AT: usize = 2;
/// Length of DCCP's generic header without extended sequence numbers (RFC 4340 §5.1), the
/// least netfilter accepts (`sizeof(struct dccp_hdr)`).
pub const DCCP_HDR_LEN: usize = 12;
/// DCCP packet types from 10 on are reserved (RFC 4340 §5.1); netfilter deems them INVALID.
const DCCP_PKT_INVALID: u8 = 10;

/// TCP flag bits of byte 13 of the TCP header (RFC 9293).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;

/// RFC 792/RFC 1812 ICMP error types whose payload starts with the offending IP header.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// A packet buffer: the XDP frame, or the socket buffer's linear data for the tc programs.
pub trait Frame {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
}

impl Frame for aya_ebpf::programs::XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        aya_ebpf::programs::XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        aya_ebpf::programs::XdpContext::data_end(self)
    }
}

impl Frame for aya_ebpf::programs::TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        aya_ebpf::programs::TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        aya_ebpf::programs::TcContext::data_end(self)
    }
}

/// The one bounds-checked accessor: a pointer to a `T` at `offset`, if it lies in the frame.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Frame, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// A 32-bit header field at an even offset. Header structs are byte arrays (alignment 1), so
/// the compiler splits every access to one of their fields into single bytes; the IPv4 header
/// starts at offset 14, so its 32-bit fields are 2-aligned but not 4-aligned. Read or written
/// as this type, a 32-bit field takes two 16-bit accesses and a 16-bit field one. Frames
/// start at an even address (XDP headroom, or the skb's), which is all this assumes.
#[repr(C, packed(2))]
#[derive(Clone, Copy)]
struct Even32(u32);

/// The native-order 32-bit field at `p` (an even address).
///
/// # Safety
/// `p` must be in bounds of the frame for 4 bytes.
#[inline(always)]
pub unsafe fn get32(p: *const u8) -> u32 {
    // SAFETY: in bounds per the caller; `Even32` needs only 2-byte alignment.
    unsafe { core::ptr::read(p as *const Even32) }.0
}

/// Writes a native-order 32-bit field at `p` (an even address).
///
/// # Safety
/// As [`get32`].
#[inline(always)]
pub unsafe fn put32(p: *mut u8, v: u32) {
    // SAFETY: as above.
    unsafe { core::ptr::write(p as *mut Even32, Even32(v)) }
}

/// The native-order 16-bit field at `p` (an even address).
///
/// # Safety
/// `p` must be in bounds of the frame for 2 bytes.
#[inline(always)]
pub unsafe fn get16(p: *const u8) -> u16 {
    // SAFETY: in bounds per the caller; even, as frames and their fields are.
    unsafe { core::ptr::read(p as *const u16) }
}

/// Writes a native-order 16-bit field at `p` (an even address).
///
/// # Safety
/// As [`get16`].
#[inline(always)]
pub unsafe fn put16(p: *mut u8, v: u16) {
    // SAFETY: as above.
    unsafe { core::ptr::write(p as *mut u16, v) }
}

/// Reads a native-order word at `offset` (see `nat_common::csum` for why native order), an
/// even offset as every header field's is.
#[inline(always)]
pub fn load16(ctx: &impl Frame, offset: usize) -> Result<u16, Reason> {
    let p = ptr_at::<[u8; 2]>(ctx, offset).ok_or(Reason::Malformed)?;
    // SAFETY: in bounds per `ptr_at`.
    Ok(unsafe { get16(p as *const u8) })
}

/// Writes a native-order word at the even `offset`.
#[inline(always)]
pub fn store16(ctx: &impl Frame, offset: usize, v: u16) -> Result<(), Reason> {
    let p = ptr_at::<[u8; 2]>(ctx, offset).ok_or(Reason::Malformed)?;
    // SAFETY: in bounds per `ptr_at`.
    unsafe { put16(p as *mut u8, v) };
    Ok(())
}

/// Writes a native-order 32-bit field at the even `offset`.
#[inline(always)]
pub fn store32(ctx: &impl Frame, offset: usize, v: u32) -> Result<(), Reason> {
    let p = ptr_at::<[u8; 4]>(ctx, offset).ok_or(Reason::Malformed)?;
    // SAFETY: in bounds per `ptr_at`.
    unsafe { put32(p as *mut u8, v) };
    Ok(())
}

/// The IPv4 facts every later stage needs.
#[derive(Clone, Copy)]
pub struct Packet {
    /// IPv4 total length (host order).
    pub tot_len: u16,
    pub proto: u8,
    pub tos: u8,
    pub ttl: u8,
    /// A first fragment (MF set; only [`Packet::parse_leaving`] lets one through): its UDP
    /// length is the whole datagram's.
    pub first_fragment: bool,
    /// Network byte order, as in the packet.
    pub saddr: u32,
    pub daddr: u32,
}

/// Transport facts: the flow identity for connection tracking and the firewall.
#[derive(Clone, Copy)]
pub struct Transport {
    /// Source and destination port, network byte order (0 without ports). For an ICMP query
    /// the identifier is `sport`; `dport` is unused.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// What the firewall matches besides the protocol: destination port (network order bytes)
    /// for TCP/UDP, `[type, code]` for ICMP, zero otherwise.
    pub service: [u8; 2],
    /// An ICMP error (its quoted packet is parsed on demand by [`embedded`]).
    pub icmp_error: bool,
    /// The packet may open a flow (cleared for one netfilter deems INVALID for the flow it
    /// belongs to).
    pub opens: bool,
}

impl Transport {
    /// The packet's key in the flow table, if its protocol is tracked by tuple: the protocols
    /// with ports (TCP, UDP, UDP-Lite, DCCP), the ICMP queries (identifier and type), and
    /// other protocols but ICMP errors.
    #[inline(always)]
    pub fn tuple(&self, pkt: &Packet) -> Option<FlowTuple> {
        let dport = match pkt.proto {
            proto::ICMP if nat_common::conntrack::icmp_query(self.service[0]).is_some() => {
                u16::from_ne_bytes([0, self.service[0]])
            }
            proto::ICMP => return None,
            // The protocols with ports; the others have none parsed (0).
            _ => self.dport,
        };
        Some(FlowTuple::new(
            pkt.saddr, pkt.daddr, self.sport, dport, pkt.proto,
        ))
    }
}

/// The sequence facts of a TCP packet whose header [`Packet::transport`] checked (`None` if
/// it is not there after all).
#[inline(always)]
pub fn segment(ctx: &impl Frame, pkt: &Packet) -> Option<Segment> {
    let h = ptr_at::<TcpHdr>(ctx, L4_OFF)?;
    // SAFETY: in bounds per `ptr_at`.
    let h = unsafe { &*h };
    let bits = ptr_at::<[u8; 2]>(ctx, L4_OFF + offset_of!(TcpHdr, _bitfield_1))?;
    // SAFETY: in bounds per `ptr_at`.
    let [doff, flags] = unsafe { *bits };
    let headers = (IP_LEN + (doff >> 4) as usize * 4) as u32;
    Some(Segment {
        seq: u32::from_be_bytes(h.seq),
        ack: u32::from_be_bytes(h.ack_seq),
        len: (pkt.tot_len as u32).saturating_sub(headers),
        flags,
    })
}

impl Packet {
    /// Ethernet + IPv4 sanity. Errors are the pass reasons of the design card, in this order:
    /// not IPv4, malformed (truncated, bad version/IHL/length), IP options, fragment.
    #[inline(always)]
    pub fn parse(ctx: &impl Frame) -> Result<Self, Reason> {
        Self::parse_with(ctx, true)
    }

    /// [`Packet::parse`] for a socket buffer leaving the router (the tc learner): only its
    /// headers are in the linear data, and a first fragment (offset 0) carries the ports.
    #[inline(always)]
    pub fn parse_leaving(ctx: &impl Frame) -> Result<Self, Reason> {
        Self::parse_with(ctx, false)
    }

    #[inline(always)]
    fn parse_with(ctx: &impl Frame, whole: bool) -> Result<Self, Reason> {
        let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(Reason::NotIpv4)?;
        // SAFETY: in bounds per `ptr_at`.
        if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
            return Err(Reason::NotIpv4);
        }
        let ip = ptr_at::<Ipv4Hdr>(ctx, IP_OFF).ok_or(Reason::Malformed)?;
        let at = ip as *const u8;
        // SAFETY: in bounds per `ptr_at`.
        let ip = unsafe { &*ip };
        let (version, ihl) = (ip.vihl >> 4, ip.vihl & 0x0f);
        if version != 4 || ihl < 5 {
            return Err(Reason::Malformed);
        }
        // SAFETY (the three reads below): fields of the header `ptr_at` checked.
        let tot_len = u16::from_be(unsafe { get16(at.add(offset_of!(Ipv4Hdr, tot_len))) });
        let frame = ctx.data_end() - ctx.data();
        if (tot_len as usize) < (ihl as usize) * 4 || (whole && ETH_LEN + tot_len as usize > frame)
        {
            return Err(Reason::Malformed);
        }
        if ihl != 5 {
            return Err(Reason::IpOptions);
        }
        // MF flag or a nonzero offset (RFC 791); leaving, only the offset matters.
        let frag_mask = if whole { 0x3fff } else { 0x1fff };
        let frags = u16::from_be(unsafe { get16(at.add(offset_of!(Ipv4Hdr, frags))) });
        if frags & frag_mask != 0 {
            return Err(Reason::Fragment);
        }
        Ok(Packet {
            tot_len,
            proto: ip.proto,
            tos: ip.tos,
            ttl: ip.ttl,
            first_fragment: frags & 0x2000 != 0,
            saddr: unsafe { get32(at.add(offset_of!(Ipv4Hdr, src_addr))) },
            daddr: unsafe { get32(at.add(offset_of!(Ipv4Hdr, dst_addr))) },
        })
    }

    /// Transport sanity and what policy and the flow table look at.
    #[inline(always)]
    pub fn transport(&self, ctx: &impl Frame) -> Result<Transport, Reason> {
        let l4_len = self.tot_len as usize - IP_LEN;
        let mut t = Transport {
            sport: 0,
            dport: 0,
            tcp_flags: 0,
            service: [0, 0],
            icmp_error: false,
            opens: true,
        };
        match self.proto {
            proto::TCP => {
                let h = ptr_at::<TcpHdr>(ctx, L4_OFF).ok_or(Reason::Malformed)?;
                // SAFETY: in bounds per `ptr_at`.
                let h = unsafe { &*h };
                // Data offset (high nibble) and flags: the two bytes of the header's bitfield.
                let bits = ptr_at::<[u8; 2]>(ctx, L4_OFF + offset_of!(TcpHdr, _bitfield_1))
                    .ok_or(Reason::Malformed)?;
                // SAFETY: in bounds per `ptr_at`.
                let [doff, flags] = unsafe { *bits };
                let doff = (doff >> 4) as usize * 4;
                if l4_len < TcpHdr::LEN || doff < TcpHdr::LEN || doff > l4_len {
                    return Err(Reason::Malformed);
                }
                let at = h as *const TcpHdr as *const u8;
                // SAFETY: fields of the header `ptr_at` checked.
                (t.sport, t.dport) = unsafe {
                    (
                        get16(at.add(offset_of!(TcpHdr, source))),
                        get16(at.add(offset_of!(TcpHdr, dest))),
                    )
                };
                t.tcp_flags = flags;
                t.service = h.dest;
            }
            proto::UDP => {
                let h = ptr_at::<UdpHdr>(ctx, L4_OFF).ok_or(Reason::Malformed)?;
                // SAFETY: in bounds per `ptr_at`.
                let h = unsafe { &*h };
                let at = h as *const UdpHdr as *const u8;
                // SAFETY: fields of the header `ptr_at` checked.
                let ulen = u16::from_be(unsafe { get16(at.add(offset_of!(UdpHdr, len))) }) as usize;
                if l4_len < UdpHdr::LEN
                    || ulen < UdpHdr::LEN
                    || (ulen > l4_len && !self.first_fragment)
                {
                    return Err(Reason::Malformed);
                }
                // SAFETY: as above.
                (t.sport, t.dport) = unsafe {
                    (
                        get16(at.add(offset_of!(UdpHdr, src))),
                        get16(at.add(offset_of!(UdpHdr, dst))),
                    )
                };
                t.service = h.dst;
            }
            proto::ICMP => {
                let h = ptr_at::<[u8; 8]>(ctx, L4_OFF).ok_or(Reason::Malformed)?;
                if l4_len < 8 {
                    return Err(Reason::Malformed);
                }
                // SAFETY: in bounds per `ptr_at`.
                let h = unsafe { &*h };
                t.service = [h[0], h[1]];
                if nat_common::conntrack::icmp_query(h[0]).is_some() {
                    t.sport = u16::from_ne_bytes([h[ICMP_ID_AT], h[ICMP_ID_AT + 1]]);
                    t.dport = t.sport;
                }
                t.icmp_error = matches!(
                    h[0],
                    ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
                );
            }
            // UDP-Lite and DCCP ([`ported`]); other protocols (GRE, ESP, SCTP...) are
            // translated at the IP header only.
            _ => {
                if let Some((sport, dport)) = ported(ctx, l4_len, self.first_fragment)? {
                    (t.sport, t.dport) = (sport, dport);
                }
            }
        }
        Ok(t)
    }
}

/// The ports of a UDP-Lite or DCCP packet (`None` for other protocols), after the sanity
/// checks netfilter makes (`udplite_error`, `dccp_error`): their packets then take the same
/// path as any other protocol's, keyed and rewritten by their ports like UDP's.
///
/// The protocol is read again from the packet, as a value of its own: the verifier learns it
/// here only, not for the rest of the program, which stays one path for every protocol but
/// TCP, UDP and ICMP (6.1's verifier explores each protocol the program knows apart).
#[inline(always)]
fn ported(
    ctx: &impl Frame,
    l4_len: usize,
    first_fragment: bool,
) -> Result<Option<(u16, u16)>, Reason> {
    let p = ptr_at::<u8>(ctx, IP_OFF + offset_of!(Ipv4Hdr, proto)).ok_or(Reason::Malformed)?;
    // SAFETY: in bounds per `ptr_at`.
    let p = unsafe { core::ptr::read_volatile(p) };
    if p != proto::UDPLITE && p != proto::DCCP {
        return Ok(None);
    }
    let h = ptr_at::<[u8; DCCP_HDR_LEN]>(ctx, L4_OFF);
    let h8 = ptr_at::<[u8; 8]>(ctx, L4_OFF).ok_or(Reason::Malformed)?;
    // SAFETY: in bounds per `ptr_at`.
    let h8 = unsafe { &*h8 };
    if p == proto::UDPLITE {
        // RFC 3828 §3.1: UDP's header with the length field holding the checksum coverage (0:
        // the whole datagram, else 8 up to the datagram's length); a zero checksum is illegal.
        let cov = u16::from_be_bytes([h8[4], h8[5]]) as usize;
        if l4_len < 8
            || (cov != 0 && cov < 8)
            || (cov > l4_len && !first_fragment)
            || (h8[6] | h8[7]) == 0
        {
            return Err(Reason::Malformed);
        }
    } else {
        // RFC 4340 §5.1: data offset (32-bit words) at 4, checksum coverage in the low nibble
        // of 5, type in bits 1-4 of 8; the generic header is 12 bytes at least.
        let h = h.ok_or(Reason::Malformed)?;
        // SAFETY: in bounds per `ptr_at`.
        let h = unsafe { &*h };
        let doff = h[4] as usize * 4;
        let cscov = (h[5] & 0x0f) as usize;
        if l4_len < DCCP_HDR_LEN
            || doff < DCCP_HDR_LEN
            || (doff > l4_len && !first_fragment)
            || (cscov != 0 && (cscov - 1) * 4 > l4_len && !first_fragment)
            || (h[8] >> 1) & 0x0f >= DCCP_PKT_INVALID
        {
            return Err(Reason::Malformed);
        }
    }
    Ok(Some((
        u16::from_ne_bytes([h8[0], h8[1]]),
        u16::from_ne_bytes([h8[2], h8[3]]),
    )))
}

/// Which transport checksum an ICMP error quotes whole.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum QuotedCsum {
    None,
    Tcp,
    /// UDP and UDP-Lite (offset 6, RFC 768's zero rule).
    Udp,
    /// DCCP (offset 6, no zero rule).
    Dccp,
}

/// The quoted packet of an ICMP error.
pub struct Embedded {
    /// The quoted TCP/UDP checksum, when the error carries it.
    pub quoted_csum: QuotedCsum,
    /// The quoted packet's other address (the remote end of the flow) and protocol.
    pub remote: u32,
    pub proto: u8,
    /// The quoted packet's ports as it travelled (source, destination), when the first 8 bytes
    /// of its transport header are quoted; for an ICMP query (identifier, type).
    pub ports: Option<(u16, u16)>,
}

/// An ICMP error relates to the mapping when its quoted header is whole, has no options and
/// carries the translated address `old` on the other side: an inbound error about a packet P
/// sent has P as quoted source; an outbound error from V about a packet V got has V as quoted
/// destination. Anything else goes to the kernel, whose conntrack judges it.
#[inline(always)]
pub fn embedded(
    ctx: &impl Frame,
    pkt: &Packet,
    inbound: bool,
    old: u32,
) -> Result<Embedded, Reason> {
    let l4_len = pkt.tot_len as usize - IP_LEN;
    let ip = ptr_at::<Ipv4Hdr>(ctx, EMB_IP_OFF).ok_or(Reason::IcmpErrorUnrelated)?;
    if l4_len < 8 + IP_LEN {
        return Err(Reason::IcmpErrorUnrelated);
    }
    // SAFETY: in bounds per `ptr_at`.
    let ip = unsafe { &*ip };
    let (addr, remote) = if inbound {
        (ip.src_addr, ip.dst_addr)
    } else {
        (ip.dst_addr, ip.src_addr)
    };
    if ip.vihl != 0x45 || u32::from_ne_bytes(addr) != old {
        return Err(Reason::IcmpErrorUnrelated);
    }
    // The quoted transport checksum is only there if the error quoted enough of it.
    let quoted = l4_len - 8 - IP_LEN;
    let quoted_csum = match ip.proto {
        proto::TCP if quoted >= 18 => QuotedCsum::Tcp,
        proto::UDP | proto::UDPLITE if quoted >= 8 => QuotedCsum::Udp,
        // netfilter rewrites a quoted DCCP checksum only when the whole generic header is
        // quoted (`dccp_manip_pkt`).
        proto::DCCP if quoted >= DCCP_HDR_LEN => QuotedCsum::Dccp,
        _ => QuotedCsum::None,
    };
    let ports = match ptr_at::<[u8; 8]>(ctx, EMB_L4_OFF) {
        Some(h) if quoted >= 8 => {
            // SAFETY: in bounds per `ptr_at`.
            let h = unsafe { &*h };
            match ip.proto {
                proto::TCP | proto::UDP | proto::UDPLITE | proto::DCCP => Some((
                    u16::from_ne_bytes([h[0], h[1]]),
                    u16::from_ne_bytes([h[2], h[3]]),
                )),
                proto::ICMP if nat_common::conntrack::icmp_query(h[0]).is_some() => Some((
                    u16::from_ne_bytes([h[ICMP_ID_AT], h[ICMP_ID_AT + 1]]),
                    u16::from_ne_bytes([0, h[0]]),
                )),
                _ => None,
            }
        }
        _ => None,
    };
    Ok(Embedded {
        quoted_csum,
        remote: u32::from_ne_bytes(remote),
        proto: ip.proto,
        ports,
    })
}

/// Longest IPv4 header (IHL 15).
pub const IP_MAX_LEN: usize = 60;

/// The flow-table key of a packet arriving at the kernel, as the XDP program keys it
/// ([`Transport::tuple`]) but for what it passes on: the IPv4 header may carry options, and a
/// first fragment (offset 0, MF set) is keyed by the ports its transport header carries. A
/// later fragment and an ICMP error have no key. Only the headers need to be in the linear
/// data.
#[inline(always)]
pub fn wire_tuple(ctx: &impl Frame) -> Option<FlowTuple> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: in bounds per `ptr_at`.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return None;
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, IP_OFF)?;
    // SAFETY: in bounds per `ptr_at`.
    let ip = unsafe { &*ip };
    let (version, ihl) = (ip.vihl >> 4, (ip.vihl & 0x0f) as usize);
    if version != 4 || ihl < 5 || u16::from_be_bytes(ip.frags) & 0x1fff != 0 {
        return None;
    }
    let l4 = IP_OFF + ihl * 4;
    let (sport, dport) = match ip.proto {
        proto::TCP | proto::UDP | proto::UDPLITE | proto::DCCP => {
            let h = ptr_at::<[u8; 4]>(ctx, l4)?;
            // SAFETY: in bounds per `ptr_at`.
            let h = unsafe { &*h };
            (
                u16::from_ne_bytes([h[0], h[1]]),
                u16::from_ne_bytes([h[2], h[3]]),
            )
        }
        proto::ICMP => {
            let h = ptr_at::<[u8; 8]>(ctx, l4)?;
            // SAFETY: in bounds per `ptr_at`.
            let h = unsafe { &*h };
            nat_common::conntrack::icmp_query(h[0])?;
            (
                u16::from_ne_bytes([h[ICMP_ID_AT], h[ICMP_ID_AT + 1]]),
                u16::from_ne_bytes([h[0], 0]),
            )
        }
        _ => (0, 0),
    };
    Some(FlowTuple::new(
        u32::from_ne_bytes(ip.src_addr),
        u32::from_ne_bytes(ip.dst_addr),
        sport,
        dport,
        ip.proto,
    ))
}
