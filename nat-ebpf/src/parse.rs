//! Header parsing and sanity checks. Offsets are constants (no IP options, no VLAN), which also
//! keeps every packet access trivially provable for the verifier.
use aya_ebpf::programs::XdpContext;
use nat_common::{Reason, conntrack};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

pub const ETH_LEN: usize = 14;
pub const IP_OFF: usize = ETH_LEN;
pub const IP_LEN: usize = 20;
pub const L4_OFF: usize = IP_OFF + IP_LEN;
/// Embedded IPv4 header of an ICMP error (after the 8-byte ICMP header).
pub const EMB_IP_OFF: usize = L4_OFF + 8;
/// Embedded transport header of an ICMP error.
pub const EMB_L4_OFF: usize = EMB_IP_OFF + IP_LEN;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// RFC 792/RFC 1812 ICMP error types whose payload starts with the offending IP header.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// A packet buffer: the XDP frame, or the socket buffer's linear data for the tc learner.
pub trait Frame {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
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

/// Reads a native-order word at `offset` (see `nat_common::csum` for why native order).
#[inline(always)]
pub fn load16(ctx: &XdpContext, offset: usize) -> Result<u16, Reason> {
    let p = ptr_at::<[u8; 2]>(ctx, offset).ok_or(Reason::Malformed)?;
    // SAFETY: in bounds per `ptr_at`.
    Ok(u16::from_ne_bytes(unsafe { *p }))
}

#[inline(always)]
pub fn store16(ctx: &XdpContext, offset: usize, v: u16) -> Result<(), Reason> {
    let p = ptr_at::<[u8; 2]>(ctx, offset).ok_or(Reason::Malformed)?;
    // SAFETY: in bounds per `ptr_at`.
    unsafe { *p = v.to_ne_bytes() };
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
    /// Network byte order, as in the packet.
    pub saddr: u32,
    pub daddr: u32,
}

/// Transport facts: checksum locations that depend on the translated address, and the flow
/// identity for connection tracking and the firewall.
pub struct Transport {
    /// Offset of the TCP/UDP checksum, if the protocol has a pseudo-header.
    pub csum_at: Option<usize>,
    /// UDP rules apply to that checksum (0 = none).
    pub udp: bool,
    /// Source and destination port, network byte order (0 without ports). For an ICMP query
    /// the identifier is both ports' stand-in: `sport` = `dport` = identifier.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// What the firewall matches besides the protocol: destination port (network order bytes)
    /// for TCP/UDP, `[type, code]` for ICMP, zero otherwise.
    pub service: [u8; 2],
    /// ICMP error whose embedded packet must be translated too.
    pub icmp_error: Option<Embedded>,
}

/// The embedded packet of an ICMP error.
pub struct Embedded {
    /// Offset of the embedded address that equals the translated one (source for inbound
    /// errors, destination for outbound ones).
    pub addr_at: usize,
    /// Offset of the embedded TCP/UDP checksum, when the error carries it.
    pub csum_at: Option<usize>,
    pub udp: bool,
    /// The quoted packet's other address (the remote end of the flow) and protocol.
    pub remote: u32,
    pub proto: u8,
    /// The quoted packet's ports seen from the guest (guest's port, remote's port), when the
    /// first 8 bytes of its transport header are quoted; for an ICMP query the identifier and
    /// the type the guest sends in its flow (as `policy::flow_key` makes them).
    pub ports: Option<(u16, u16)>,
}

impl Packet {
    /// Ethernet + IPv4 sanity. Errors are the pass reasons of the design card, in this order:
    /// not IPv4, malformed (truncated, bad version/IHL/length), IP options, fragment.
    #[inline(always)]
    pub fn parse(ctx: &XdpContext) -> Result<Self, Reason> {
        let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(Reason::NotIpv4)?;
        // SAFETY: in bounds per `ptr_at`.
        if unsafe { (*eth).ether_type } != network_types::eth::EtherType::Ipv4 as u16 {
            return Err(Reason::NotIpv4);
        }
        let ip = ptr_at::<Ipv4Hdr>(ctx, IP_OFF).ok_or(Reason::Malformed)?;
        // SAFETY: in bounds per `ptr_at`.
        let ip = unsafe { &*ip };
        let (version, ihl) = (ip.vihl >> 4, ip.vihl & 0x0f);
        if version != 4 || ihl < 5 {
            return Err(Reason::Malformed);
        }
        let tot_len = u16::from_be_bytes(ip.tot_len);
        let frame = ctx.data_end() - ctx.data();
        if (tot_len as usize) < (ihl as usize) * 4 || ETH_LEN + tot_len as usize > frame {
            return Err(Reason::Malformed);
        }
        if ihl != 5 {
            return Err(Reason::IpOptions);
        }
        // MF flag or a nonzero offset (RFC 791).
        if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
            return Err(Reason::Fragment);
        }
        Ok(Packet {
            tot_len,
            proto: ip.proto,
            tos: ip.tos,
            ttl: ip.ttl,
            saddr: u32::from_ne_bytes(ip.src_addr),
            daddr: u32::from_ne_bytes(ip.dst_addr),
        })
    }

    /// Transport sanity and the checksum locations a translation of `old` touches.
    #[inline(always)]
    pub fn transport(
        &self,
        ctx: &XdpContext,
        inbound: bool,
        old: u32,
    ) -> Result<Transport, Reason> {
        let l4_len = self.tot_len as usize - IP_LEN;
        let mut t = Transport {
            csum_at: None,
            udp: false,
            sport: 0,
            dport: 0,
            tcp_flags: 0,
            service: [0, 0],
            icmp_error: None,
        };
        match self.proto {
            PROTO_TCP => {
                let h = ptr_at::<[u8; 20]>(ctx, L4_OFF).ok_or(Reason::Malformed)?;
                // SAFETY: in bounds per `ptr_at`.
                let h = unsafe { &*h };
                let doff = (h[12] >> 4) as usize * 4;
                if l4_len < 20 || doff < 20 || doff > l4_len {
                    return Err(Reason::Malformed);
                }
                t.sport = u16::from_ne_bytes([h[0], h[1]]);
                t.dport = u16::from_ne_bytes([h[2], h[3]]);
                t.tcp_flags = h[13];
                t.service = [h[2], h[3]];
                t.csum_at = Some(L4_OFF + 16);
            }
            PROTO_UDP => {
                let h = ptr_at::<[u8; 8]>(ctx, L4_OFF).ok_or(Reason::Malformed)?;
                // SAFETY: in bounds per `ptr_at`.
                let h = unsafe { &*h };
                let ulen = u16::from_be_bytes([h[4], h[5]]) as usize;
                if l4_len < 8 || ulen < 8 || ulen > l4_len {
                    return Err(Reason::Malformed);
                }
                t.sport = u16::from_ne_bytes([h[0], h[1]]);
                t.dport = u16::from_ne_bytes([h[2], h[3]]);
                t.service = [h[2], h[3]];
                t.csum_at = Some(L4_OFF + 6);
                t.udp = true;
            }
            PROTO_ICMP => {
                let h = ptr_at::<[u8; 8]>(ctx, L4_OFF).ok_or(Reason::Malformed)?;
                if l4_len < 8 {
                    return Err(Reason::Malformed);
                }
                // SAFETY: in bounds per `ptr_at`.
                let h = unsafe { &*h };
                t.service = [h[0], h[1]];
                if conntrack::icmp_query(h[0]).is_some() {
                    t.sport = u16::from_ne_bytes([h[4], h[5]]);
                    t.dport = t.sport;
                }
                if matches!(
                    h[0],
                    ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
                ) {
                    t.icmp_error = Some(embedded(ctx, l4_len, inbound, old)?);
                }
            }
            // Other protocols (GRE, ESP, SCTP...) are translated at the IP header only.
            _ => {}
        }
        Ok(t)
    }
}

/// An ICMP error relates to the mapping when its embedded header is whole, has no options and
/// carries the translated address on the other side: an inbound error about a packet P sent
/// has P as embedded source; an outbound error from V about a packet V got has V as embedded
/// destination. Anything else goes to the kernel, whose conntrack judges it.
#[inline(always)]
fn embedded(ctx: &XdpContext, l4_len: usize, inbound: bool, old: u32) -> Result<Embedded, Reason> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, EMB_IP_OFF).ok_or(Reason::IcmpErrorUnrelated)?;
    if l4_len < 8 + IP_LEN {
        return Err(Reason::IcmpErrorUnrelated);
    }
    // SAFETY: in bounds per `ptr_at`.
    let ip = unsafe { &*ip };
    let (addr, addr_at, remote) = if inbound {
        (ip.src_addr, EMB_IP_OFF + 12, ip.dst_addr)
    } else {
        (ip.dst_addr, EMB_IP_OFF + 16, ip.src_addr)
    };
    if ip.vihl != 0x45 || u32::from_ne_bytes(addr) != old {
        return Err(Reason::IcmpErrorUnrelated);
    }
    // The embedded transport checksum is only there if the error quoted enough of it.
    let quoted = l4_len - 8 - IP_LEN;
    let (csum_at, udp) = match ip.proto {
        PROTO_TCP if quoted >= 18 => (Some(EMB_L4_OFF + 16), false),
        PROTO_UDP if quoted >= 8 => (Some(EMB_L4_OFF + 6), true),
        _ => (None, false),
    };
    // The quoted packet went guest -> remote for an inbound error, remote -> guest for an
    // outbound one; ports are reported as (guest's, remote's).
    let ports = match ptr_at::<[u8; 8]>(ctx, EMB_L4_OFF) {
        Some(h) if quoted >= 8 => {
            // SAFETY: in bounds per `ptr_at`.
            let h = unsafe { &*h };
            let (a, b) = (
                u16::from_ne_bytes([h[0], h[1]]),
                u16::from_ne_bytes([h[2], h[3]]),
            );
            match ip.proto {
                PROTO_TCP | PROTO_UDP if inbound => Some((a, b)),
                PROTO_TCP | PROTO_UDP => Some((b, a)),
                // A query: its identifier and the type the guest sends in its flow (the
                // quoted packet came from the guest for an inbound error).
                PROTO_ICMP => conntrack::icmp_flow_type(h[0], inbound)
                    .map(|t| (u16::from_ne_bytes([h[4], h[5]]), u16::from_ne_bytes([0, t]))),
                _ => None,
            }
        }
        _ => None,
    };
    Ok(Embedded {
        addr_at,
        csum_at,
        udp,
        remote: u32::from_ne_bytes(remote),
        proto: ip.proto,
        ports,
    })
}
