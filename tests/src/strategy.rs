//! Random frames for the differential property test: mostly well-formed frames aimed at the
//! harness's mappings and routes (so every reason, including the three forwarded ones, is
//! reached), then optionally damaged: truncated, bytes flipped or overwritten in the headers,
//! total length rewritten. A [`FrameSpec`] is the shrinkable description; [`FrameSpec::build`]
//! the bytes.
//!
//! On the guest interfaces a frame goes out to the internet, to a mapped public IP (hairpin
//! forward) or to the router's address on that interface (hairpin reply) from one of the hosts
//! behind it. Ports come often from a pool of three and echo identifiers from two, so replies
//! find the bindings earlier frames created and other senders collide with them.
use std::net::Ipv4Addr;

use proptest::{collection::vec, prelude::*, sample::select};

use crate::{
    harness::*,
    packet::{self, DF, Ip, MF},
};

/// Where a frame arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingress {
    /// `pub0`.
    Public,
    /// `pbb0`: a second public network, owning no mapping's public IP.
    PublicB,
    /// `gst0`.
    Guest,
    /// `gsb0`: the second guest network.
    GuestB,
    /// `gsn0`: a guest network without a router address.
    GuestN,
    /// `oth0`: exists, not in `IFACES`.
    Other,
    /// `lo`: exists in every namespace, not in `IFACES`.
    Loopback,
}

/// The quoted packet of an ICMP error.
#[derive(Clone, Debug)]
pub struct Inner {
    /// Quote the reverse of the outer packet (inner src = outer dst, inner dst = outer src),
    /// which is what a real error about a translated flow looks like in either direction.
    pub related: bool,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub udp_csum: bool,
    pub payload: usize,
    /// Option words in the inner IP header (nonzero makes it unrelated).
    pub options: usize,
}

#[derive(Clone, Debug)]
pub enum Transport {
    Tcp {
        sport: u16,
        dport: u16,
        option_words: usize,
        payload: usize,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: usize,
        csum: bool,
    },
    /// UDP-Lite with checksum coverage `coverage` (0: the whole datagram; may be illegal).
    UdpLite {
        sport: u16,
        dport: u16,
        payload: usize,
        coverage: u16,
    },
    /// DCCP of packet type `ty` (may be reserved) and checksum coverage `cscov`.
    Dccp {
        sport: u16,
        dport: u16,
        ty: u8,
        cscov: u8,
        payload: usize,
    },
    Echo {
        ty: u8,
        id: u16,
        payload: usize,
    },
    /// `quote` bytes of the inner packet (clamped to its length).
    Error {
        ty: u8,
        code: u8,
        inner: Inner,
        quote: usize,
    },
    Other {
        proto: u8,
        payload: usize,
    },
}

/// Damage applied to the built frame, in order.
#[derive(Clone, Debug)]
pub enum Mutation {
    /// Cut to `14 + n % (len - 13)` bytes (`BPF_PROG_TEST_RUN` refuses frames under 14 bytes).
    Truncate(usize),
    Xor {
        at: usize,
        mask: u8,
    },
    Set {
        at: usize,
        value: u8,
    },
    TotLen(u16),
    /// Add to the total length (wrapping), for values just around the real one.
    TotLenDelta(i16),
    /// Overwrite the 16-bit word at `at` (a checksum field) with `value`, e.g. 0 or 0xFFFF.
    Word {
        at: usize,
        value: u16,
    },
}

/// Frame offsets of every checksum the program may update: outer IP, ICMP, UDP, TCP, quoted IP,
/// quoted UDP, quoted TCP.
const CSUM_OFFSETS: [usize; 7] = [24, 36, 40, 50, 52, 68, 78];

#[derive(Clone, Debug)]
pub struct FrameSpec {
    pub ingress: Ingress,
    pub ethertype: u16,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub tos: u8,
    pub ttl: u8,
    pub frag: u16,
    pub option_words: usize,
    pub transport: Transport,
    /// Grow the payload so the IP packet is this long (around the 1400/1500 MTUs).
    pub big: Option<usize>,
    /// Ethernet padding after the IP packet.
    pub padding: usize,
    pub mutations: Vec<Mutation>,
}

/// `NAT_IN` keys, the forwardable ones twice as likely.
const NAT_IN_KEYS: [Ipv4Addr; 16] = [
    P1,
    P1,
    P2,
    P2,
    P1,
    P3,
    P5,
    P5,
    P6,
    P_TO_REMOTE,
    P_TO_UNROUTED,
    P_TO_OTHER,
    P_TO_LOCAL,
    P_TO_BCAST,
    P2,
    P1,
];
/// Hosts behind each guest interface (mapped or not), as sources.
const GST_HOSTS: [Ipv4Addr; 6] = [V1, V2, V2, V4, V3, Ipv4Addr::new(10, 0, 0, 99)];
const GSB_HOSTS: [Ipv4Addr; 2] = [V5, Ipv4Addr::new(10, 0, 1, 99)];
const GSN_HOSTS: [Ipv4Addr; 1] = [V6];
/// The router's addresses on the guest side (gsn0's network has none; 10.0.2.1 is nobody).
const GUEST_ROUTERS: [Ipv4Addr; 3] = [GST_ADDR, GSB_ADDR, Ipv4Addr::new(10, 0, 2, 1)];
/// Ports most frames use, so flows meet again.
const POOL_PORTS: [u16; 3] = [53, 80, 40000];
/// `NAT_OUT` keys.
const NAT_OUT_KEYS: [Ipv4Addr; 6] = [V1, V2, V3, V4, V5, V6];
/// Destinations with every kind of route answer.
const DESTINATIONS: [Ipv4Addr; 23] = [
    Ipv4Addr::new(10, 0, 0, 0),
    Ipv4Addr::new(198, 51, 100, 0),
    Ipv4Addr::UNSPECIFIED,
    Ipv4Addr::BROADCAST,
    Ipv4Addr::new(224, 0, 0, 1),
    Ipv4Addr::LOCALHOST,
    REMOTE,
    REMOTE,
    REMOTE,
    Ipv4Addr::new(192, 0, 2, 200),
    PUB_GW,
    PUB_NO_NEIGH,
    PUB_ADDR,
    Ipv4Addr::new(198, 51, 100, 255),
    UNROUTED,
    OTH_HOST,
    GST_ADDR,
    V1,
    V2,
    P1,
    GSB_ADDR,
    V5,
    P5,
];

fn addr(pool: &'static [Ipv4Addr]) -> BoxedStrategy<Ipv4Addr> {
    prop_oneof![
        8 => select(pool),
        1 => select(&DESTINATIONS[..]),
        1 => any::<[u8; 4]>().prop_map(Ipv4Addr::from),
    ]
    .boxed()
}

fn ingress() -> impl Strategy<Value = Ingress> {
    prop_oneof![
        40 => Just(Ingress::Public),
        4 => Just(Ingress::PublicB),
        36 => Just(Ingress::Guest),
        10 => Just(Ingress::GuestB),
        4 => Just(Ingress::GuestN),
        5 => Just(Ingress::Other),
        5 => Just(Ingress::Loopback),
    ]
}

fn addresses(ing: Ingress) -> BoxedStrategy<(Ipv4Addr, Ipv4Addr)> {
    let (hosts, router): (&'static [Ipv4Addr], Ipv4Addr) = match ing {
        Ingress::Guest => (&GST_HOSTS, GST_ADDR),
        Ingress::GuestB => (&GSB_HOSTS, GSB_ADDR),
        Ingress::GuestN => (&GSN_HOSTS, GUEST_ROUTERS[2]),
        _ => return (addr(&DESTINATIONS), addr(&NAT_IN_KEYS)).boxed(),
    };
    let out_dst = prop_oneof![1 => Just(REMOTE), 2 => addr(&DESTINATIONS)];
    let router = prop_oneof![4 => Just(router), 1 => select(&GUEST_ROUTERS[..])];
    prop_oneof![
        10 => (addr(&NAT_OUT_KEYS), out_dst),
        7 => (addr(hosts), addr(&NAT_IN_KEYS)),
        5 => (addr(hosts), router),
    ]
    .boxed()
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![1 => any::<u16>(), 1 => select(&POOL_PORTS[..])]
}

fn small() -> impl Strategy<Value = usize> {
    prop_oneof![3 => 0usize..=8, 2 => 0usize..=48]
}

fn inner() -> impl Strategy<Value = Inner> {
    (
        prop::bool::weighted(0.7),
        addr(&DESTINATIONS),
        addr(&NAT_OUT_KEYS),
        prop_oneof![3 => select(&[6u8, 17, 1, 33, 136][..]), 1 => any::<u8>()],
        any::<bool>(),
        small(),
        prop_oneof![9 => Just(0usize), 1 => 1usize..=3],
    )
        .prop_map(
            |(related, src, dst, proto, udp_csum, payload, options)| Inner {
                related,
                src,
                dst,
                proto,
                udp_csum,
                payload,
                options,
            },
        )
}

fn tcp() -> impl Strategy<Value = Transport> {
    let option_words = prop_oneof![4 => Just(0usize), 1 => 0usize..=10];
    (port(), port(), option_words, small()).prop_map(|(sport, dport, w, payload)| Transport::Tcp {
        sport,
        dport,
        option_words: w,
        payload,
    })
}

fn udp() -> impl Strategy<Value = Transport> {
    (port(), port(), small(), prop::bool::weighted(0.8)).prop_map(
        |(sport, dport, payload, csum)| Transport::Udp {
            sport,
            dport,
            payload,
            csum,
        },
    )
}

fn udplite<S: Strategy<Value = u16>>(port: impl Fn() -> S) -> impl Strategy<Value = Transport> {
    let coverage = prop_oneof![6 => Just(0u16), 3 => 8u16..=16, 1 => any::<u16>()];
    (port(), port(), small(), coverage).prop_map(|(sport, dport, payload, coverage)| {
        Transport::UdpLite {
            sport,
            dport,
            payload,
            coverage,
        }
    })
}

fn dccp<S: Strategy<Value = u16>>(port: impl Fn() -> S) -> impl Strategy<Value = Transport> {
    let ty = prop_oneof![8 => 0u8..10, 1 => 10u8..16];
    let cscov = prop_oneof![6 => Just(0u8), 3 => 1u8..=4, 1 => 0u8..16];
    (port(), port(), ty, cscov, small()).prop_map(|(sport, dport, ty, cscov, payload)| {
        Transport::Dccp {
            sport,
            dport,
            ty,
            cscov,
            payload,
        }
    })
}

fn echo() -> impl Strategy<Value = Transport> {
    let id = prop_oneof![3 => Just(0x77u16), 1 => Just(0)];
    (select(&[0u8, 8][..]), id, small()).prop_map(|(ty, id, payload)| Transport::Echo {
        ty,
        id,
        payload,
    })
}

fn icmp_error() -> impl Strategy<Value = Transport> {
    let ty = prop_oneof![7 => select(&[3u8, 11, 12][..]), 3 => any::<u8>()];
    let quote = prop_oneof![2 => Just(usize::MAX), 3 => 0usize..=64];
    (ty, 0u8..16, inner(), quote).prop_map(|(ty, code, inner, quote)| Transport::Error {
        ty,
        code,
        inner,
        quote,
    })
}

fn other() -> impl Strategy<Value = Transport> {
    let proto = prop_oneof![select(&[47u8, 50, 132][..]), any::<u8>()];
    (proto, small()).prop_map(|(proto, payload)| Transport::Other { proto, payload })
}

fn transport() -> impl Strategy<Value = Transport> {
    prop_oneof![
        30 => tcp(),
        30 => udp(),
        5 => udplite(port),
        5 => dccp(port),
        10 => echo(),
        25 => icmp_error(),
        5 => other(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let word = prop_oneof![select(&[0u16, 0xffff, 0xfffe, 1][..]), any::<u16>()];
    prop_oneof![
        3 => any::<usize>().prop_map(Mutation::Truncate),
        3 => (0usize..96, any::<u8>()).prop_map(|(at, mask)| Mutation::Xor { at, mask }),
        2 => (0usize..96, any::<u8>()).prop_map(|(at, value)| Mutation::Set { at, value }),
        1 => any::<u16>().prop_map(Mutation::TotLen),
        2 => (-48i16..48).prop_map(Mutation::TotLenDelta),
        2 => (select(&CSUM_OFFSETS[..]), word).prop_map(|(at, value)| Mutation::Word { at, value }),
    ]
}

fn ethertype() -> impl Strategy<Value = u16> {
    let other = prop_oneof![select(&[0x0806u16, 0x86dd, 0x8100][..]), any::<u16>()];
    prop_oneof![19 => Just(packet::ETH_P_IP), 1 => other]
}

fn ttl() -> impl Strategy<Value = u8> {
    prop_oneof![6 => Just(64u8), 3 => select(&[0u8, 1, 2, 255][..]), 1 => any::<u8>()]
}

fn frag() -> impl Strategy<Value = u16> {
    let offset = (1u16..0x2000).prop_map(|o| o | DF);
    let fragment = prop_oneof![select(&[MF, MF | DF][..]), offset, any::<u16>()];
    prop_oneof![16 => select(&[0u16, DF][..]), 4 => fragment]
}

/// A random frame description.
pub fn frame_spec() -> impl Strategy<Value = FrameSpec> {
    let mutations = prop_oneof![Just(Vec::new()), vec(mutation(), 1..=2)];
    frame_spec_with(transport(), mutations)
}

/// A random frame description carrying an ICMP message with an error type or not, quoting
/// (mostly) a packet of the flow: the deepest translation path.
/// Damage is limited to checksum fields set to edge values, so most frames get translated.
pub fn icmp_error_frame_spec() -> impl Strategy<Value = FrameSpec> {
    let word = prop_oneof![select(&[0u16, 0xffff, 0xfffe, 1][..]), any::<u16>()];
    let word =
        (select(&CSUM_OFFSETS[..]), word).prop_map(|(at, value)| Mutation::Word { at, value });
    let mutations = prop_oneof![2 => Just(Vec::new()), 1 => vec(word, 1..=2)];
    frame_spec_with(icmp_error(), mutations)
}

/// The ports (TCP; UDP, UDP-Lite and DCCP) and echo identifier the quoted packet of an ICMP
/// error carries (see [`Inner`]).
const QUOTED_TCP_PORTS: (u16, u16) = (40000, 443);
const QUOTED_PORTS: (u16, u16) = (5000, 53);
const QUOTED_ECHO_ID: u16 = 7;

/// A well-formed frame from `src` to `dst` arriving on `ingress`, of the flow an ICMP error of
/// [`Inner`] quotes for protocol `proto`.
fn opener(ingress: Ingress, src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> FrameSpec {
    let (sport, dport) = QUOTED_PORTS;
    let transport = match proto {
        packet::PROTO_TCP => Transport::Tcp {
            sport: QUOTED_TCP_PORTS.0,
            dport: QUOTED_TCP_PORTS.1,
            option_words: 0,
            payload: 8,
        },
        packet::PROTO_ICMP => Transport::Echo {
            ty: 8,
            id: QUOTED_ECHO_ID,
            payload: 8,
        },
        packet::PROTO_UDPLITE => Transport::UdpLite {
            sport,
            dport,
            payload: 8,
            coverage: 0,
        },
        packet::PROTO_DCCP => Transport::Dccp {
            sport,
            dport,
            ty: packet::DCCP_DATA,
            cscov: 0,
            payload: 8,
        },
        _ => Transport::Udp {
            sport,
            dport,
            payload: 8,
            csum: true,
        },
    };
    FrameSpec {
        ingress,
        ethertype: packet::ETH_P_IP,
        src,
        dst,
        tos: 0,
        ttl: 64,
        frag: 0,
        option_words: 0,
        transport,
        big: None,
        padding: 0,
        mutations: Vec::new(),
    }
}

/// Two frames: one that opens a flow (a guest's, outbound, or a remote host's to a public IP,
/// inbound), then an ICMP error about it from the flow's other end (type 3, 11 or 12, the
/// quote whole or cut anywhere), so errors quoting live flows (RELATED) are frequent.
pub fn related_error_pair() -> impl Strategy<Value = Vec<FrameSpec>> {
    // (guest, its interface, its public IP)
    const GUESTS: [(Ipv4Addr, Ingress, Ipv4Addr); 5] = [
        (V1, Ingress::Guest, P1),
        (V2, Ingress::Guest, P2),
        (V4, Ingress::Guest, P4),
        (V5, Ingress::GuestB, P5),
        (V6, Ingress::GuestN, P6),
    ];
    const PROTOS: [u8; 5] = [
        packet::PROTO_TCP,
        packet::PROTO_UDP,
        packet::PROTO_ICMP,
        packet::PROTO_UDPLITE,
        packet::PROTO_DCCP,
    ];
    const REMOTES: [Ipv4Addr; 3] = [REMOTE, REMOTE, Ipv4Addr::new(192, 0, 2, 200)];
    let ty = select(&[3u8, 11, 12][..]);
    let quote = prop_oneof![3 => Just(usize::MAX), 1 => 0usize..=64];
    (
        any::<bool>(),
        select(&GUESTS[..]),
        select(&REMOTES[..]),
        select(&PROTOS[..]),
        ty,
        0u8..16,
        quote,
    )
        .prop_map(|(outbound, (v, side, p), r, proto, ty, code, quote)| {
            let (first, (ingress, src, dst)) = if outbound {
                (opener(side, v, r, proto), (Ingress::Public, r, p))
            } else {
                (opener(Ingress::Public, r, p, proto), (side, v, r))
            };
            let inner = Inner {
                related: true,
                src,
                dst,
                proto,
                udp_csum: true,
                payload: 8,
                options: 0,
            };
            let error = FrameSpec {
                transport: Transport::Error {
                    ty,
                    code,
                    inner,
                    quote,
                },
                ..opener(ingress, src, dst, proto)
            };
            vec![first, error]
        })
}

/// Frames on the guest side aimed at hairpin: a host sends to a mapped public IP, or a
/// hairpin target answers the router's address on its interface; ports nearly always and echo
/// identifiers from the pools, so bindings are created, found and collided with. Few frames are
/// damaged (checksum fields set to edge values) or carry TTL 1.
pub fn hairpin_frame_spec() -> impl Strategy<Value = FrameSpec> {
    let ends = prop_oneof![
        6 => Just(Ingress::Guest),
        3 => Just(Ingress::GuestB),
        1 => Just(Ingress::GuestN),
    ]
    .prop_flat_map(|ing| (Just(ing), hairpin_addresses(ing)));
    let pooled = || prop_oneof![9 => select(&POOL_PORTS[..]), 1 => any::<u16>()];
    let tcp = (pooled(), pooled(), small()).prop_map(|(sport, dport, payload)| Transport::Tcp {
        sport,
        dport,
        option_words: 0,
        payload,
    });
    let udp = (pooled(), pooled(), small(), prop::bool::weighted(0.8)).prop_map(
        |(sport, dport, payload, csum)| Transport::Udp {
            sport,
            dport,
            payload,
            csum,
        },
    );
    let transport = prop_oneof![
        30 => tcp,
        30 => udp,
        5 => udplite(pooled),
        5 => dccp(pooled),
        25 => echo(),
        10 => icmp_error(),
        5 => other(),
    ];
    let word = prop_oneof![select(&[0u16, 0xffff, 0xfffe, 1][..]), any::<u16>()];
    let word =
        (select(&CSUM_OFFSETS[..]), word).prop_map(|(at, value)| Mutation::Word { at, value });
    let mutations = prop_oneof![9 => Just(Vec::new()), 1 => vec(word, 1..=2)];
    let ip = (
        any::<u8>(),
        prop_oneof![19 => Just(64u8), 1 => select(&[1u8, 2][..])],
        select(&[0u16, DF][..]),
        Just(0usize),
    );
    frame_spec_from(
        ends.boxed(),
        Just(packet::ETH_P_IP),
        ip,
        transport,
        mutations,
    )
}

/// Guest-side addresses of [`hairpin_frame_spec`]: a host of the interface to a public IP
/// (mostly ones hairpin can reach), or a target of the interface to the router's address on it.
fn hairpin_addresses(ing: Ingress) -> BoxedStrategy<(Ipv4Addr, Ipv4Addr)> {
    const PUBLICS: [Ipv4Addr; 8] = [P1, P1, P1, P2, P2, P5, P5, P6];
    let (hosts, targets, router): (&'static [Ipv4Addr], &'static [Ipv4Addr], Ipv4Addr) = match ing {
        Ingress::Guest => (&GST_HOSTS, &[V1, V1, V2, V4], GST_ADDR),
        Ingress::GuestB => (&GSB_HOSTS, &[V5], GSB_ADDR),
        _ => (&GSN_HOSTS, &GSN_HOSTS, GUEST_ROUTERS[2]),
    };
    prop_oneof![
        1 => (select(hosts), select(&PUBLICS[..])),
        1 => (select(targets), Just(router)),
    ]
    .boxed()
}

fn frame_spec_with(
    transport: impl Strategy<Value = Transport>,
    mutations: impl Strategy<Value = Vec<Mutation>>,
) -> impl Strategy<Value = FrameSpec> {
    let ip = (
        any::<u8>(),
        ttl(),
        frag(),
        prop_oneof![19 => Just(0usize), 1 => 1usize..=10],
    );
    let ends = ingress()
        .prop_flat_map(|ing| (Just(ing), addresses(ing)))
        .boxed();
    frame_spec_from(ends, ethertype(), ip, transport, mutations)
}

/// A frame from its parts: ingress and addresses, ethertype, IP fields (TOS, TTL, fragment
/// field, option words), transport, damage; size and padding drawn here.
fn frame_spec_from(
    ends: BoxedStrategy<(Ingress, (Ipv4Addr, Ipv4Addr))>,
    ethertype: impl Strategy<Value = u16>,
    ip: impl Strategy<Value = (u8, u8, u16, usize)>,
    transport: impl Strategy<Value = Transport>,
    mutations: impl Strategy<Value = Vec<Mutation>>,
) -> impl Strategy<Value = FrameSpec> {
    let size = (
        prop_oneof![9 => Just(None), 1 => (1380usize..=1520).prop_map(Some)],
        prop_oneof![3 => Just(0usize), 1 => 1usize..=20],
    );
    (ends, ethertype, ip, transport, size, mutations).prop_map(
        |((ingress, (src, dst)), ethertype, ip, transport, (big, padding), mutations)| {
            let (tos, ttl, frag, option_words) = ip;
            FrameSpec {
                ingress,
                ethertype,
                src,
                dst,
                tos,
                ttl,
                frag,
                option_words,
                transport,
                big,
                padding,
                mutations,
            }
        },
    )
}

fn payload(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(37).wrapping_add(11))
        .collect()
}

/// `n` bytes of NOP options ending with EOL (for IP and TCP).
fn options(words: usize) -> Vec<u8> {
    let mut o = vec![1u8; words * 4];
    if let Some(last) = o.last_mut() {
        *last = 0;
    }
    o
}

impl Inner {
    fn packet(&self, outer_src: Ipv4Addr, outer_dst: Ipv4Addr) -> Vec<u8> {
        let (src, dst) = if self.related {
            (outer_dst, outer_src)
        } else {
            (self.src, self.dst)
        };
        let body = match self.proto {
            6 => packet::tcp(
                src,
                dst,
                QUOTED_TCP_PORTS.0,
                QUOTED_TCP_PORTS.1,
                &[],
                &payload(self.payload),
            ),
            17 => packet::udp(
                src,
                dst,
                QUOTED_PORTS.0,
                QUOTED_PORTS.1,
                &payload(self.payload),
                self.udp_csum,
            ),
            136 => packet::udplite(
                src,
                dst,
                QUOTED_PORTS.0,
                QUOTED_PORTS.1,
                &payload(self.payload),
                0,
            ),
            33 => packet::dccp(
                src,
                dst,
                QUOTED_PORTS.0,
                QUOTED_PORTS.1,
                packet::DCCP_DATA,
                0,
                &payload(self.payload),
            ),
            1 => packet::icmp_echo(8, QUOTED_ECHO_ID, 1, &payload(self.payload)),
            _ => payload(self.payload),
        };
        Ip::new(self.proto, src, dst)
            .ttl(1)
            .options(&options(self.options))
            .packet(&body)
    }
}

impl FrameSpec {
    /// The ifindex the frame arrives on.
    pub fn ingress_ifindex(&self, t: &Topology) -> u32 {
        match self.ingress {
            Ingress::Public => t.pub0.ifindex,
            Ingress::PublicB => t.pbb0.ifindex,
            Ingress::Guest => t.gst0.ifindex,
            Ingress::GuestB => t.gsb0.ifindex,
            Ingress::GuestN => t.gsn0.ifindex,
            Ingress::Other => t.oth0.ifindex,
            Ingress::Loopback => t.lo.ifindex,
        }
    }

    /// The frame's bytes. `big` grows the transport payload (not for ICMP errors).
    pub fn build(&self) -> Vec<u8> {
        let ip = Ip {
            tos: self.tos,
            id: 0x4242,
            frag: self.frag,
            ttl: self.ttl,
            proto: 0,
            src: self.src,
            dst: self.dst,
            options: options(self.option_words),
        };
        let overhead = 20 + self.option_words * 4;
        let grow = |fixed: usize, n: usize| match self.big {
            Some(total) => total.saturating_sub(overhead + fixed).max(n),
            None => n,
        };
        let (proto, l4) = match &self.transport {
            Transport::Tcp {
                sport,
                dport,
                option_words,
                payload: n,
            } => {
                let n = grow(20 + option_words * 4, *n);
                let seg = packet::tcp(
                    self.src,
                    self.dst,
                    *sport,
                    *dport,
                    &options(*option_words),
                    &payload(n),
                );
                (packet::PROTO_TCP, seg)
            }
            Transport::Udp {
                sport,
                dport,
                payload: n,
                csum,
            } => {
                let n = grow(8, *n);
                (
                    packet::PROTO_UDP,
                    packet::udp(self.src, self.dst, *sport, *dport, &payload(n), *csum),
                )
            }
            Transport::UdpLite {
                sport,
                dport,
                payload: n,
                coverage,
            } => {
                let n = grow(8, *n);
                (
                    packet::PROTO_UDPLITE,
                    packet::udplite(self.src, self.dst, *sport, *dport, &payload(n), *coverage),
                )
            }
            Transport::Dccp {
                sport,
                dport,
                ty,
                cscov,
                payload: n,
            } => {
                let n = grow(24, *n);
                (
                    packet::PROTO_DCCP,
                    packet::dccp(self.src, self.dst, *sport, *dport, *ty, *cscov, &payload(n)),
                )
            }
            Transport::Echo { ty, id, payload: n } => (
                packet::PROTO_ICMP,
                packet::icmp_echo(*ty, *id, 3, &payload(grow(8, *n))),
            ),
            Transport::Error {
                ty,
                code,
                inner,
                quote,
            } => {
                let q = inner.packet(self.src, self.dst);
                (
                    packet::PROTO_ICMP,
                    packet::icmp_error(*ty, *code, 1400, &q, *quote),
                )
            }
            Transport::Other { proto, payload: n } => (*proto, payload(grow(0, *n))),
        };
        let l3 = Ip { proto, ..ip }.packet(&l4);
        let mut f = packet::ether(
            [2, 0, 0, 0, 0, 0xee],
            [2, 0, 0, 0, 0, 0xdd],
            self.ethertype,
            &l3,
        );
        f.extend(std::iter::repeat_n(0xa5u8, self.padding));
        for m in &self.mutations {
            match *m {
                Mutation::Truncate(n) => f.truncate(14 + n % (f.len() - 13)),
                Mutation::Xor { at, mask } => {
                    if let Some(b) = f.get_mut(at) {
                        *b ^= mask;
                    }
                }
                Mutation::Set { at, value } => {
                    if let Some(b) = f.get_mut(at) {
                        *b = value;
                    }
                }
                Mutation::TotLen(v) => {
                    if f.len() >= 18 {
                        f[16..18].copy_from_slice(&v.to_be_bytes());
                    }
                }
                Mutation::Word { at, value } => {
                    if let Some(w) = f.get_mut(at..at + 2) {
                        w.copy_from_slice(&value.to_be_bytes());
                    }
                }
                Mutation::TotLenDelta(d) => {
                    if f.len() >= 18 {
                        let v = u16::from_be_bytes([f[16], f[17]]).wrapping_add_signed(d);
                        f[16..18].copy_from_slice(&v.to_be_bytes());
                    }
                }
            }
        }
        f
    }
}
