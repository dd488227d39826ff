//! Random firewall scenarios for the differential test: a policy (ingress rules per public IP,
//! egress default and exceptions, conntrack timeouts) drawn from small universes so that
//! packets match it, and a sequence of steps: packets that open flows, answer or repeat earlier
//! packets (with other TCP flags), ICMP errors quoting earlier packets as they left the router,
//! and arbitrary, often damaged frames from [`crate::strategy`].
//!
//! A [`Scenario`] is the shrinkable description; [`Scenario::frames`] turns it into frames.
use std::net::Ipv4Addr;

use nat_common::TIMEOUT_SLOTS;
use nat_userspace::{
    cidr::Cidr,
    firewall::{PortRange, Proto, Service},
    state::DesiredState,
};
use proptest::{
    collection::vec,
    prelude::*,
    sample::{Index, select},
};

use crate::{
    harness::*,
    packet::{
        self, Ip, PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN,
    },
    strategy::{FrameSpec, frame_spec},
};

/// A mapping the scenario's flows go through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Guest {
    pub public: Ipv4Addr,
    pub private: Ipv4Addr,
    pub mac: [u8; 6],
}

/// Two forwardable guests (most traffic), one without a neighbour entry (inbound passes after
/// the policy), one outbound-only (inbound is unmapped).
pub const GUESTS: [Guest; 4] = [
    Guest {
        public: P1,
        private: V1,
        mac: V1_MAC,
    },
    Guest {
        public: P2,
        private: V2,
        mac: V2_MAC,
    },
    Guest {
        public: P3,
        private: V3,
        mac: [2, 0, 0, 0, 0, 0x14],
    },
    Guest {
        public: P4,
        private: V4,
        mac: [2, 0, 0, 0, 0, 0x0c],
    },
];
const GUEST_PICK: [usize; 9] = [0, 0, 0, 0, 1, 1, 1, 2, 3];

/// The other ends of flows: mostly in 192.0.2.0/24 (routed via the gateway), some on the public
/// link (one without neighbour), one behind the interface natd does not manage.
const REMOTES: [Ipv4Addr; 11] = [
    REMOTE,
    REMOTE,
    REMOTE,
    Ipv4Addr::new(192, 0, 2, 6),
    Ipv4Addr::new(192, 0, 2, 130),
    Ipv4Addr::new(192, 0, 2, 200),
    Ipv4Addr::new(192, 0, 2, 1),
    Ipv4Addr::new(192, 0, 2, 1),
    PUB_GW,
    PUB_NO_NEIGH,
    OTH_HOST,
];

/// Ports of packets: the rule range ends and one past them.
const PORTS: [u16; 16] = [
    0, 1, 22, 53, 80, 443, 999, 1000, 1024, 2000, 2001, 5353, 8080, 40000, 40001, 65535,
];
const RANGE_FIRSTS: [u16; 8] = [1, 22, 53, 80, 443, 1000, 1024, 8000];
const RANGE_LENGTHS: [u16; 6] = [0, 0, 1, 23, 1000, 64511];
const ICMP_TYPES: [u8; 5] = [0, 3, 8, 11, 13];
const ICMP_CODES: [u8; 4] = [0, 1, 3, 4];
/// ICMP messages that are neither echo nor errors (no ports; tracked by type alone).
const ICMP_OTHER_TYPES: [u8; 5] = [13, 14, 5, 9, 17];
const CIDRS: [&str; 10] = [
    "0.0.0.0/0",
    "192.0.2.0/24",
    "192.0.2.0/25",
    "192.0.2.128/25",
    "192.0.2.7/32",
    "192.0.2.0/29",
    "192.0.2.192/26",
    "198.51.100.0/24",
    "10.0.0.0/8",
    "203.0.113.2/32",
];
const TCP_FLAGS: [u8; 10] = [
    TCP_SYN,
    TCP_SYN,
    TCP_SYN | TCP_ACK,
    TCP_ACK,
    TCP_PSH | TCP_ACK,
    TCP_FIN | TCP_ACK,
    TCP_FIN | TCP_ACK,
    TCP_RST,
    TCP_RST | TCP_ACK,
    TCP_SYN | TCP_FIN,
];

/// Transport of a flow's packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        flags: u8,
    },
    Udp,
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

/// A packet of a flow, in the guest's view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pkt {
    /// Arrives from the internet for the public address (else from the guest).
    pub inbound: bool,
    pub guest: Guest,
    pub remote: Ipv4Addr,
    pub guest_port: u16,
    pub remote_port: u16,
    pub l4: L4,
}

/// An IP packet `src -> dst` with `l4`, ports `sport -> dport` (identifier `sport` for echo).
fn ip_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, l4: L4, ttl: u8) -> Vec<u8> {
    match l4 {
        L4::Tcp { flags } => Ip::new(PROTO_TCP, src, dst)
            .ttl(ttl)
            .packet(&packet::tcp_flags(src, dst, sport, dport, flags, &[], b"")),
        L4::Udp => Ip::new(PROTO_UDP, src, dst)
            .ttl(ttl)
            .packet(&packet::udp(src, dst, sport, dport, b"data", true)),
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
    /// The frame as it arrives: ingress ifindex and bytes.
    pub fn frame(&self, topo: &Topology) -> (u32, Vec<u8>) {
        let g = self.guest;
        if self.inbound {
            let l3 = ip_packet(
                self.remote,
                g.public,
                self.remote_port,
                self.guest_port,
                self.l4,
                64,
            );
            let f = packet::ether(topo.pub0.mac, PUB_GW_MAC, packet::ETH_P_IP, &l3);
            (topo.pub0.ifindex, f)
        } else {
            let l3 = ip_packet(
                g.private,
                self.remote,
                self.guest_port,
                self.remote_port,
                self.l4,
                64,
            );
            let f = packet::ether(topo.gst0.mac, g.mac, packet::ETH_P_IP, &l3);
            (topo.gst0.ifindex, f)
        }
    }

    /// The IP packet as the router sent it on (translated, TTL 63): what an error quotes.
    fn translated(&self) -> Vec<u8> {
        let g = self.guest;
        if self.inbound {
            ip_packet(
                self.remote,
                g.private,
                self.remote_port,
                self.guest_port,
                self.l4,
                63,
            )
        } else {
            ip_packet(
                g.public,
                self.remote,
                self.guest_port,
                self.remote_port,
                self.l4,
                63,
            )
        }
    }

    /// The answer from the other end, TCP with `flags`.
    fn reply(&self, flags: u8) -> Pkt {
        let l4 = match self.l4 {
            L4::Tcp { .. } => L4::Tcp { flags },
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
        Pkt {
            inbound: !self.inbound,
            l4,
            ..*self
        }
    }

    /// The same packet again, TCP with `flags`.
    fn again(&self, flags: u8) -> Pkt {
        let l4 = match self.l4 {
            L4::Tcp { .. } => L4::Tcp { flags },
            l4 => l4,
        };
        Pkt { l4, ..*self }
    }

    /// An ICMP error about this packet, sent back towards its sender: from `ROUTER` or the
    /// remote end to the public address if the packet left to the internet, from the guest to
    /// the remote end if it came in.
    fn error(
        &self,
        topo: &Topology,
        ty: u8,
        code: u8,
        from_router: bool,
        quote: usize,
    ) -> (u32, Vec<u8>) {
        let q = self.translated();
        let msg = packet::icmp_error(ty, code, 1400, &q, quote);
        let g = self.guest;
        if self.inbound {
            let l3 = Ip::new(PROTO_ICMP, g.private, self.remote).packet(&msg);
            (
                topo.gst0.ifindex,
                packet::ether(topo.gst0.mac, g.mac, packet::ETH_P_IP, &l3),
            )
        } else {
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
    }
}

/// One step of a scenario; `of` picks an earlier flow packet (the step is skipped if none).
#[derive(Clone, Debug)]
pub enum Step {
    Open(Pkt),
    Reply {
        of: Index,
        flags: u8,
    },
    Again {
        of: Index,
        flags: u8,
    },
    Error {
        of: Index,
        ty: u8,
        code: u8,
        from_router: bool,
        quote: usize,
    },
    Frame(FrameSpec),
}

/// What a step became.
pub struct StepFrame {
    pub ingress: u32,
    pub frame: Vec<u8>,
    /// Built from a flow packet or an error about one (not damaged).
    pub clean: bool,
}

/// The rules and timeouts of a scenario.
#[derive(Clone, Debug)]
pub struct PolicySpec {
    pub ingress: Vec<(Ipv4Addr, Service, Vec<Cidr>)>,
    pub egress_default_allow: bool,
    pub egress: Vec<(Service, Vec<Cidr>)>,
    /// Per conntrack state: [`TEST_TIMEOUT_NS`], 0 (netfilter's default, seconds or more) or
    /// 1 ns (a flow in that state is expired at its next packet).
    pub timeouts_ns: [u64; TIMEOUT_SLOTS],
}

impl PolicySpec {
    /// The desired state: [`base_state`] plus every rule natd accepts (duplicates are refused
    /// and left out).
    pub fn state(&self) -> DesiredState {
        let mut s = base_state();
        s.set_egress_default_allow(self.egress_default_allow);
        for (public, service, cidrs) in &self.ingress {
            let _ = s.add_ingress(None, *public, service.clone(), cidrs.clone());
        }
        for (service, cidrs) in &self.egress {
            let _ = s.add_egress(None, service.clone(), cidrs.clone());
        }
        s
    }
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub policy: PolicySpec,
    pub steps: Vec<Step>,
}

impl Scenario {
    /// The frames of the steps, in order.
    pub fn frames(&self, topo: &Topology) -> Vec<StepFrame> {
        let mut history: Vec<Pkt> = Vec::new();
        let mut out = Vec::new();
        for step in &self.steps {
            let earlier = |of: &Index| (!history.is_empty()).then(|| *of.get(&history));
            let pkt = match step {
                Step::Open(p) => Some(*p),
                Step::Reply { of, flags } => earlier(of).map(|p| p.reply(*flags)),
                Step::Again { of, flags } => earlier(of).map(|p| p.again(*flags)),
                Step::Error {
                    of,
                    ty,
                    code,
                    from_router,
                    quote,
                } => {
                    if let Some(p) = earlier(of) {
                        let (ingress, frame) = p.error(topo, *ty, *code, *from_router, *quote);
                        out.push(StepFrame {
                            ingress,
                            frame,
                            clean: true,
                        });
                    }
                    None
                }
                Step::Frame(spec) => {
                    out.push(StepFrame {
                        ingress: spec.ingress_ifindex(topo),
                        frame: spec.build(),
                        clean: spec.mutations.is_empty(),
                    });
                    None
                }
            };
            if let Some(p) = pkt {
                let (ingress, frame) = p.frame(topo);
                out.push(StepFrame {
                    ingress,
                    frame,
                    clean: true,
                });
                history.push(p);
            }
        }
        out
    }
}

fn cidrs() -> impl Strategy<Value = Vec<Cidr>> {
    vec(select(&CIDRS[..]), 0..=3).prop_map(|v| {
        v.iter()
            .map(|c| c.parse().expect("CIDR universe"))
            .collect()
    })
}

fn port_range() -> impl Strategy<Value = Option<PortRange>> {
    prop_oneof![
        1 => Just(None),
        3 => (select(&RANGE_FIRSTS[..]), select(&RANGE_LENGTHS[..])).prop_map(|(first, n)| {
            Some(PortRange {
                first,
                last: first.saturating_add(n),
            })
        }),
    ]
}

fn rule_service(egress: bool) -> BoxedStrategy<Service> {
    let ports = (
        prop_oneof![Just(Proto::Tcp), Just(Proto::Udp)],
        port_range(),
    )
        .prop_map(|(proto, ports)| Service {
            proto,
            ports,
            icmp_type: None,
            icmp_code: None,
        });
    let icmp = (
        proptest::option::weighted(0.7, select(&ICMP_TYPES[..])),
        proptest::option::of(select(&ICMP_CODES[..])),
    )
        .prop_map(|(ty, code)| Service {
            proto: Proto::Icmp,
            ports: None,
            icmp_type: ty,
            icmp_code: ty.and(code),
        });
    let all = Just(Service {
        proto: Proto::All,
        ports: None,
        icmp_type: None,
        icmp_code: None,
    });
    if egress {
        prop_oneof![5 => ports, 3 => icmp, 2 => all].boxed()
    } else {
        prop_oneof![6 => ports, 4 => icmp].boxed()
    }
}

fn timeout() -> impl Strategy<Value = u64> {
    prop_oneof![6 => Just(TEST_TIMEOUT_NS), 2 => Just(0u64), 2 => Just(1u64)]
}

fn policy() -> impl Strategy<Value = PolicySpec> {
    let publics = [P1, P1, P1, P2, P2, P3, P4, P_TO_REMOTE];
    let ingress = vec(
        (select(publics.to_vec()), rule_service(false), cidrs()),
        0..=16,
    );
    let egress = vec((rule_service(true), cidrs()), 0..=5);
    (
        ingress,
        any::<bool>(),
        egress,
        proptest::array::uniform10(timeout()),
    )
        .prop_map(
            |(ingress, egress_default_allow, egress, timeouts_ns)| PolicySpec {
                ingress,
                egress_default_allow,
                egress,
                timeouts_ns,
            },
        )
}

fn l4() -> impl Strategy<Value = L4> {
    prop_oneof![
        35 => select(&TCP_FLAGS[..]).prop_map(|flags| L4::Tcp { flags }),
        5 => any::<u8>().prop_map(|flags| L4::Tcp { flags }),
        30 => Just(L4::Udp),
        15 => any::<bool>().prop_map(|request| L4::Echo { request }),
        8 => (select(&ICMP_OTHER_TYPES[..]), 0u8..2).prop_map(|(ty, code)| L4::Icmp { ty, code }),
        7 => select(&[47u8, 50, 132][..]).prop_map(L4::Other),
    ]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![9 => select(&PORTS[..]), 1 => any::<u16>()]
}

fn pkt() -> impl Strategy<Value = Pkt> {
    (
        any::<bool>(),
        select(&GUEST_PICK[..]),
        select(&REMOTES[..]),
        port(),
        port(),
        l4(),
    )
        .prop_map(|(inbound, g, remote, guest_port, remote_port, l4)| {
            let (guest_port, remote_port) = match l4 {
                L4::Tcp { .. } | L4::Udp => (guest_port, remote_port),
                L4::Echo { .. } => (guest_port, guest_port),
                L4::Icmp { .. } | L4::Other(_) => (0, 0),
            };
            Pkt {
                inbound,
                guest: GUESTS[g],
                remote,
                guest_port,
                remote_port,
                l4,
            }
        })
}

fn step() -> impl Strategy<Value = Step> {
    let flags = || prop_oneof![9 => select(&TCP_FLAGS[..]), 1 => any::<u8>()];
    let error = (
        any::<Index>(),
        prop_oneof![
            4 => Just((3u8, 4u8)),
            2 => Just((3, 3)),
            1 => Just((3, 1)),
            2 => Just((11, 0)),
            1 => Just((12, 0)),
        ],
        any::<bool>(),
        prop_oneof![4 => Just(usize::MAX), 3 => Just(28usize), 1 => Just(20), 1 => Just(24)],
    )
        .prop_map(|(of, (ty, code), from_router, quote)| Step::Error {
            of,
            ty,
            code,
            from_router,
            quote,
        });
    prop_oneof![
        30 => pkt().prop_map(Step::Open),
        28 => (any::<Index>(), flags()).prop_map(|(of, flags)| Step::Reply { of, flags }),
        10 => (any::<Index>(), flags()).prop_map(|(of, flags)| Step::Again { of, flags }),
        14 => error,
        18 => frame_spec().prop_map(Step::Frame),
    ]
}

/// A random scenario of up to `max_steps` steps.
pub fn scenario(max_steps: usize) -> impl Strategy<Value = Scenario> {
    (policy(), vec(step(), 1..=max_steps)).prop_map(|(policy, steps)| Scenario { policy, steps })
}
