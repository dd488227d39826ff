//! The packets of a scenario's flows: which guest, which way (inbound, outbound, hairpin
//! forward or reply), ports and transport, and the frames they make: as they arrive, as the
//! router sent them on (what an ICMP error quotes), their answers and errors about them.
use std::net::Ipv4Addr;

use crate::{
    harness::*,
    packet::{self, Ip, PROTO_ICMP, PROTO_TCP, PROTO_UDP},
};

/// A guest network of the bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    /// gst0, router address [`GST_ADDR`].
    Gst,
    /// gsb0, router address [`GSB_ADDR`].
    Gsb,
    /// gsn0: no router address in `IFACES`.
    Gsn,
}

impl Net {
    pub fn link(self, t: &Topology) -> Link {
        match self {
            Net::Gst => t.gst0,
            Net::Gsb => t.gsb0,
            Net::Gsn => t.gsn0,
        }
    }

    /// Where a hairpin target sends its answers: the router's address (for gsn0, which has
    /// none, the network's first address).
    pub fn router(self) -> Ipv4Addr {
        match self {
            Net::Gst => GST_ADDR,
            Net::Gsb => GSB_ADDR,
            Net::Gsn => Ipv4Addr::new(10, 0, 2, 1),
        }
    }
}

/// A mapping the scenario's flows go through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Guest {
    pub public: Ipv4Addr,
    pub private: Ipv4Addr,
    pub mac: [u8; 6],
    pub net: Net,
}

/// Two forwardable guests on gst0 (most traffic), one without a neighbour entry (inbound passes
/// after the policy), one outbound-only (inbound is unmapped), one on gsb0, one on gsn0 (hairpin
/// cannot reach it).
pub const GUESTS: [Guest; 6] = [
    Guest {
        public: P1,
        private: V1,
        mac: V1_MAC,
        net: Net::Gst,
    },
    Guest {
        public: P2,
        private: V2,
        mac: V2_MAC,
        net: Net::Gst,
    },
    Guest {
        public: P3,
        private: V3,
        mac: [2, 0, 0, 0, 0, 0x14],
        net: Net::Gst,
    },
    Guest {
        public: P4,
        private: V4,
        mac: V4_MAC,
        net: Net::Gst,
    },
    Guest {
        public: P5,
        private: V5,
        mac: V5_MAC,
        net: Net::Gsb,
    },
    Guest {
        public: P6,
        private: V6,
        mac: V6_MAC,
        net: Net::Gsn,
    },
];
/// A host on a guest network that sends hairpin traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sender {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub net: Net,
}

/// Hairpin senders: mapped guests on every network (V1 to its own P1 too), and a host no
/// mapping names (without a neighbour entry, so answers to it pass).
pub const SENDERS: [Sender; 6] = [
    Sender {
        ip: V2,
        mac: V2_MAC,
        net: Net::Gst,
    },
    Sender {
        ip: V4,
        mac: V4_MAC,
        net: Net::Gst,
    },
    Sender {
        ip: V1,
        mac: V1_MAC,
        net: Net::Gst,
    },
    Sender {
        ip: V5,
        mac: V5_MAC,
        net: Net::Gsb,
    },
    Sender {
        ip: V6,
        mac: V6_MAC,
        net: Net::Gsn,
    },
    Sender {
        ip: Ipv4Addr::new(10, 0, 0, 99),
        mac: [2, 0, 0, 0, 0, 0x63],
        net: Net::Gst,
    },
];
/// Transport of a flow's packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        flags: u8,
        /// Its sequence number is a guess far from the flow's ([`BLIND_SEQ`]), as a spoofer
        /// who cannot see the connection sends.
        blind: bool,
    },
    Udp,
    /// UDP-Lite, checksum over the whole datagram.
    UdpLite,
    /// DCCP-Data packets.
    Dccp,
    /// Echo request or reply; the identifier is the flow's guest port.
    Echo {
        request: bool,
    },
    /// Another non-error ICMP message.
    Icmp {
        ty: u8,
        code: u8,
    },
    /// GRE, ESP, SCTP...: IP header only.
    Other(u8),
}

/// The sequence number of a blind TCP packet: a quarter of the sequence space away from the
/// flow's own ([`packet::TCP_SEQ`]).
pub const BLIND_SEQ: u32 = packet::TCP_SEQ.wrapping_add(1 << 30);

/// Which way a flow's packet travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// From the internet (`remote`) to the guest's public address.
    Inbound,
    /// From the guest to `remote` on the internet.
    Outbound,
    /// From `sender` to the guest's public address (hairpin).
    HairpinForward,
    /// From the guest to the router's address on its network, answering `sender`.
    HairpinReply,
}

/// A packet of a flow, in the guest's view: the guest's port and the other end's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pkt {
    pub way: Way,
    pub guest: Guest,
    /// The other end on the internet (inbound, outbound).
    pub remote: Ipv4Addr,
    /// The other end on a guest network (hairpin).
    pub sender: Sender,
    pub guest_port: u16,
    pub remote_port: u16,
    pub l4: L4,
}

/// An IP packet `src -> dst` with `l4`, ports `sport -> dport` (identifier `sport` for echo).
fn ip_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, l4: L4, ttl: u8) -> Vec<u8> {
    match l4 {
        L4::Tcp { flags, blind } => {
            let seq = if blind { BLIND_SEQ } else { packet::TCP_SEQ };
            let numbers = (seq, packet::TCP_SEQ);
            Ip::new(PROTO_TCP, src, dst)
                .ttl(ttl)
                .packet(&packet::tcp_seq(
                    src,
                    dst,
                    (sport, dport),
                    flags,
                    numbers,
                    &[],
                    b"",
                ))
        }
        L4::Udp => Ip::new(PROTO_UDP, src, dst)
            .ttl(ttl)
            .packet(&packet::udp(src, dst, sport, dport, b"data", true)),
        L4::UdpLite => Ip::new(packet::PROTO_UDPLITE, src, dst)
            .ttl(ttl)
            .packet(&packet::udplite(src, dst, sport, dport, b"lite", 0)),
        L4::Dccp => Ip::new(packet::PROTO_DCCP, src, dst)
            .ttl(ttl)
            .packet(&packet::dccp(
                src,
                dst,
                sport,
                dport,
                packet::DCCP_DATA,
                0,
                b"dccp",
            )),
        L4::Echo { request } => {
            let ty = if request {
                packet::ICMP_ECHO
            } else {
                packet::ICMP_ECHO_REPLY
            };
            Ip::new(PROTO_ICMP, src, dst)
                .ttl(ttl)
                .packet(&packet::icmp_echo(ty, sport, 1, b"ping"))
        }
        L4::Icmp { ty, code } => Ip::new(PROTO_ICMP, src, dst).ttl(ttl).packet(&packet::icmp(
            ty,
            code,
            [0, 1, 0, 2],
            b"",
        )),
        L4::Other(proto) => Ip::new(proto, src, dst).ttl(ttl).packet(&[0x5c; 12]),
    }
}

impl Pkt {
    /// An Ethernet frame carrying `l3` from `mac` into `link`.
    fn into_link(link: Link, mac: [u8; 6], l3: &[u8]) -> (u32, Vec<u8>) {
        let f = packet::ether(link.mac, mac, packet::ETH_P_IP, l3);
        (link.ifindex, f)
    }

    /// The frame as it arrives: ingress ifindex and bytes.
    pub fn frame(&self, topo: &Topology) -> (u32, Vec<u8>) {
        let (g, s) = (self.guest, self.sender);
        let (gp, rp) = (self.guest_port, self.remote_port);
        match self.way {
            Way::Inbound => {
                let l3 = ip_packet(self.remote, g.public, rp, gp, self.l4, 64);
                let f = packet::ether(topo.pub0.mac, PUB_GW_MAC, packet::ETH_P_IP, &l3);
                (topo.pub0.ifindex, f)
            }
            Way::Outbound => {
                let l3 = ip_packet(g.private, self.remote, gp, rp, self.l4, 64);
                Self::into_link(g.net.link(topo), g.mac, &l3)
            }
            Way::HairpinForward => {
                let l3 = ip_packet(s.ip, g.public, rp, gp, self.l4, 64);
                Self::into_link(s.net.link(topo), s.mac, &l3)
            }
            Way::HairpinReply => {
                let l3 = ip_packet(g.private, g.net.router(), gp, rp, self.l4, 64);
                Self::into_link(g.net.link(topo), g.mac, &l3)
            }
        }
    }

    /// The IP packet as the router sent it on (translated, TTL 63): what an error quotes.
    pub(super) fn translated(&self) -> Vec<u8> {
        let (g, s) = (self.guest, self.sender);
        let (gp, rp) = (self.guest_port, self.remote_port);
        match self.way {
            Way::Inbound => ip_packet(self.remote, g.private, rp, gp, self.l4, 63),
            Way::Outbound => ip_packet(g.public, self.remote, gp, rp, self.l4, 63),
            Way::HairpinForward => ip_packet(g.net.router(), g.private, rp, gp, self.l4, 63),
            Way::HairpinReply => ip_packet(g.public, s.ip, gp, rp, self.l4, 63),
        }
    }

    /// The answer from the other end, TCP with `flags`.
    pub(super) fn reply(&self, flags: u8) -> Pkt {
        let l4 = match self.l4 {
            L4::Tcp { .. } => L4::Tcp {
                flags,
                blind: false,
            },
            L4::Echo { request } => L4::Echo { request: !request },
            L4::Icmp { ty, code } => L4::Icmp {
                ty: match ty {
                    13 | 15 | 17 => ty + 1,
                    _ => ty,
                },
                code,
            },
            l4 => l4,
        };
        let way = match self.way {
            Way::Inbound => Way::Outbound,
            Way::Outbound => Way::Inbound,
            Way::HairpinForward => Way::HairpinReply,
            Way::HairpinReply => Way::HairpinForward,
        };
        Pkt { way, l4, ..*self }
    }

    /// The same packet with a blind sequence number (TCP; other protocols as they are).
    pub(super) fn blind(&self) -> Pkt {
        let l4 = match self.l4 {
            L4::Tcp { flags, .. } => L4::Tcp { flags, blind: true },
            l4 => l4,
        };
        Pkt { l4, ..*self }
    }

    /// The same packet again, TCP with `flags`.
    pub(super) fn again(&self, flags: u8) -> Pkt {
        let l4 = match self.l4 {
            L4::Tcp { .. } => L4::Tcp {
                flags,
                blind: false,
            },
            l4 => l4,
        };
        Pkt { l4, ..*self }
    }

    /// The same packet to the same guest's public address from `sender` (a hairpin collision
    /// if the first was a hairpin packet the same way).
    pub(super) fn sent_by(&self, sender: Sender) -> Pkt {
        Pkt {
            way: Way::HairpinForward,
            sender,
            ..*self
        }
    }

    /// An ICMP error about this packet, sent back towards its sender: from `ROUTER` or the
    /// remote end to the public address if the packet left to the internet, from the guest to
    /// the remote end if it came in; for hairpin, from the receiving guest to the address the
    /// packet came from.
    pub(super) fn error(
        &self,
        topo: &Topology,
        ty: u8,
        code: u8,
        from_router: bool,
        quote: usize,
    ) -> (u32, Vec<u8>) {
        let q = self.translated();
        let msg = packet::icmp_error(ty, code, 1400, &q, quote);
        let (g, s) = (self.guest, self.sender);
        match self.way {
            Way::Inbound => {
                let l3 = Ip::new(PROTO_ICMP, g.private, self.remote).packet(&msg);
                Self::into_link(g.net.link(topo), g.mac, &l3)
            }
            Way::Outbound => {
                let src = if from_router {
                    Ipv4Addr::new(192, 0, 2, 1)
                } else {
                    self.remote
                };
                let l3 = Ip::new(PROTO_ICMP, src, g.public).packet(&msg);
                (
                    topo.pub0.ifindex,
                    packet::ether(topo.pub0.mac, PUB_GW_MAC, packet::ETH_P_IP, &l3),
                )
            }
            Way::HairpinForward => {
                let l3 = Ip::new(PROTO_ICMP, g.private, g.net.router()).packet(&msg);
                Self::into_link(g.net.link(topo), g.mac, &l3)
            }
            Way::HairpinReply => {
                let l3 = Ip::new(PROTO_ICMP, s.ip, g.public).packet(&msg);
                Self::into_link(s.net.link(topo), s.mac, &l3)
            }
        }
    }
}
