//! Random firewall scenarios for the differential test: a policy (ingress rules per public IP,
//! egress default and exceptions, conntrack timeouts) drawn from small universes so that
//! packets match it, and a sequence of steps: packets that open flows, answer or repeat earlier
//! packets (with other TCP flags), the same packet from another guest (hairpin collisions), ICMP
//! errors quoting earlier packets as they left the router, and arbitrary, often damaged frames
//! from [`crate::strategy`]; between packets, changes of the bench's neighbours, routes,
//! route generation and mappings ([`env`]).
//!
//! Flows go inbound, outbound, or hairpin: a guest (a [`Sender`]) to another guest's public
//! address, answered by that guest to the router's address on its interface.
//!
//! A [`Scenario`] is the shrinkable description; [`Scenario::actions`] turns it into frames
//! and changes. A [`RouteScenario`] is a narrower kind: established flows through an open
//! policy meeting changes of the surroundings.
pub mod env;
mod flow;
mod routes;

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

pub use self::{
    flow::{GUESTS, Guest, L4, Net, Pkt, SENDERS, Sender, Way},
    routes::{RouteScenario, RouteStep, route_scenario},
};
use crate::{
    harness::{env::Change, *},
    packet::{TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
    strategy::{FrameSpec, frame_spec},
};

/// Indexes of [`GUESTS`] and [`SENDERS`], the likelier ones repeated.
const GUEST_PICK: [usize; 12] = [0, 0, 0, 0, 1, 1, 1, 2, 3, 4, 4, 5];
const SENDER_PICK: [usize; 9] = [0, 0, 0, 1, 1, 2, 3, 4, 5];

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
/// Guest networks appear often, so hairpin senders get through.
const CIDRS: [&str; 14] = [
    "0.0.0.0/0",
    "10.0.0.0/24",
    "10.0.0.0/24",
    "10.0.1.0/24",
    "10.0.0.0/8",
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
/// Guest sources of egress rules: whole networks, single guests (V1 10.0.0.10), a few of them
/// (10.0.0.8/30 holds V1 and V2), everyone.
const GUEST_SOURCES: [&str; 6] = [
    "10.0.0.0/24",
    "10.0.0.10/32",
    "10.0.0.8/30",
    "10.0.1.0/24",
    "10.0.0.0/8",
    "0.0.0.0/0",
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

/// Flags of blind packets: what a spoofer sends to end a connection, and data.
const BLIND_FLAGS: [u8; 4] = [
    TCP_RST,
    TCP_RST | TCP_ACK,
    TCP_FIN | TCP_ACK,
    TCP_PSH | TCP_ACK,
];

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
    /// The answer to an earlier hairpin forward packet (to any packet if there was none).
    HairpinReply {
        of: Index,
        flags: u8,
    },
    /// Of an earlier TCP packet's flow: an acknowledgment each way, then the packet (`reply`:
    /// its answer) with `flags` and a blind sequence number: a spoofed RST, FIN or data
    /// segment against a live flow. Skipped for other protocols.
    Blind {
        of: Index,
        flags: u8,
        reply: bool,
    },
    /// An earlier hairpin forward packet (any packet if there was none) again from another
    /// sender: a collision while the first flow lives.
    OtherSender {
        of: Index,
        sender: Sender,
    },
    Error {
        of: Index,
        ty: u8,
        code: u8,
        from_router: bool,
        quote: usize,
    },
    Frame(FrameSpec),
    /// A change of the surroundings, and natd's generation bump after it if `bump`.
    Env {
        change: Change,
        bump: bool,
    },
}

/// What a step became: a frame arriving, or a change of the surroundings.
pub enum Action {
    Frame { ingress: u32, frame: Vec<u8> },
    Env(Change),
}

/// The rules and timeouts of a scenario.
#[derive(Clone, Debug)]
pub struct PolicySpec {
    pub ingress: Vec<(Ipv4Addr, Service, Vec<Cidr>)>,
    pub egress_default_allow: bool,
    /// (service, destinations, guest sources).
    pub egress: Vec<(Service, Vec<Cidr>, Vec<Cidr>)>,
    /// Per conntrack timer: [`TEST_TIMEOUT_NS`], 0 (netfilter's default, seconds or more) or
    /// 1 ns (a flow whose timer that is has expired at its next packet).
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
        for (service, cidrs, sources) in &self.egress {
            let _ = s.add_egress_from(None, service.clone(), cidrs.clone(), sources.clone());
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
    /// The frames and changes of the steps, in order.
    pub fn actions(&self, topo: &Topology) -> Vec<Action> {
        let mut history: Vec<Pkt> = Vec::new();
        let mut out = Vec::new();
        for step in &self.steps {
            let earlier = |of: &Index| (!history.is_empty()).then(|| *of.get(&history));
            let hairpins: Vec<Pkt> = history
                .iter()
                .filter(|p| p.way == Way::HairpinForward)
                .copied()
                .collect();
            let earlier_hairpin = |of: &Index| match hairpins.is_empty() {
                true => earlier(of),
                false => Some(*of.get(&hairpins)),
            };
            let pkt = match step {
                Step::Open(p) => Some(*p),
                Step::Reply { of, flags } => earlier(of).map(|p| p.reply(*flags)),
                Step::Again { of, flags } => earlier(of).map(|p| p.again(*flags)),
                Step::Blind { of, flags, reply } => {
                    // Of a TCP flow: an acknowledgment each way first (so that the flow has
                    // shown a window, if it lives), then the blind packet.
                    if let Some(p) = earlier(of).filter(|p| matches!(p.l4, L4::Tcp { .. })) {
                        let blind = match reply {
                            true => p.reply(*flags),
                            false => p.again(*flags),
                        }
                        .blind();
                        for q in [p.again(TCP_ACK), p.reply(TCP_ACK), blind] {
                            let (ingress, frame) = q.frame(topo);
                            out.push(Action::Frame { ingress, frame });
                        }
                    }
                    None
                }
                Step::HairpinReply { of, flags } => earlier_hairpin(of).map(|p| p.reply(*flags)),
                Step::OtherSender { of, sender } => earlier_hairpin(of).map(|p| p.sent_by(*sender)),
                Step::Error {
                    of,
                    ty,
                    code,
                    from_router,
                    quote,
                } => {
                    if let Some(p) = earlier(of) {
                        let (ingress, frame) = p.error(topo, *ty, *code, *from_router, *quote);
                        out.push(Action::Frame { ingress, frame });
                    }
                    None
                }
                Step::Frame(spec) => {
                    out.push(Action::Frame {
                        ingress: spec.ingress_ifindex(topo),
                        frame: spec.build(),
                    });
                    None
                }
                Step::Env { change, bump } => {
                    out.push(Action::Env(*change));
                    if *bump {
                        out.push(Action::Env(Change::Bump));
                    }
                    None
                }
            };
            if let Some(p) = pkt {
                let (ingress, frame) = p.frame(topo);
                out.push(Action::Frame { ingress, frame });
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

/// Mostly none (every guest), as most CloudStack egress rules.
fn guest_sources() -> impl Strategy<Value = Vec<Cidr>> {
    prop_oneof![
        2 => Just(Vec::new()),
        1 => vec(select(&GUEST_SOURCES[..]), 1..=2).prop_map(|v| {
            v.iter()
                .map(|c| c.parse().expect("guest source universe"))
                .collect()
        }),
    ]
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
    let publics = [P1, P1, P1, P2, P2, P3, P4, P5, P6, P_TO_REMOTE];
    let ingress = vec(
        (select(publics.to_vec()), rule_service(false), cidrs()),
        0..=16,
    );
    let egress = vec((rule_service(true), cidrs(), guest_sources()), 0..=5);
    (
        ingress,
        any::<bool>(),
        egress,
        proptest::array::uniform15(timeout()),
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
        35 => select(&TCP_FLAGS[..]).prop_map(|flags| L4::Tcp { flags, blind: false }),
        5 => any::<u8>().prop_map(|flags| L4::Tcp { flags, blind: false }),
        30 => Just(L4::Udp),
        4 => Just(L4::UdpLite),
        4 => Just(L4::Dccp),
        15 => any::<bool>().prop_map(|request| L4::Echo { request }),
        8 => (select(&ICMP_OTHER_TYPES[..]), 0u8..2).prop_map(|(ty, code)| L4::Icmp { ty, code }),
        7 => select(&[47u8, 50, 132][..]).prop_map(L4::Other),
    ]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![9 => select(&PORTS[..]), 1 => any::<u16>()]
}

fn way() -> impl Strategy<Value = Way> {
    prop_oneof![
        7 => Just(Way::Inbound),
        7 => Just(Way::Outbound),
        6 => Just(Way::HairpinForward),
        1 => Just(Way::HairpinReply),
    ]
}

fn sender() -> impl Strategy<Value = Sender> {
    select(&SENDER_PICK[..]).prop_map(|i| SENDERS[i])
}

fn pkt() -> impl Strategy<Value = Pkt> {
    (
        way(),
        select(&GUEST_PICK[..]),
        select(&REMOTES[..]),
        sender(),
        port(),
        port(),
        l4(),
    )
        .prop_map(|(way, g, remote, sender, guest_port, remote_port, l4)| {
            let (guest_port, remote_port) = match l4 {
                L4::Tcp { .. } | L4::Udp | L4::UdpLite | L4::Dccp => (guest_port, remote_port),
                L4::Echo { .. } => (guest_port, guest_port),
                L4::Icmp { .. } | L4::Other(_) => (0, 0),
            };
            Pkt {
                way,
                guest: GUESTS[g],
                remote,
                sender,
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
        24 => (any::<Index>(), flags()).prop_map(|(of, flags)| Step::Reply { of, flags }),
        8 => (any::<Index>(), flags()).prop_map(|(of, flags)| Step::HairpinReply { of, flags }),
        10 => (any::<Index>(), flags()).prop_map(|(of, flags)| Step::Again { of, flags }),
        8 => (any::<Index>(), sender()).prop_map(|(of, sender)| Step::OtherSender { of, sender }),
        6 => (any::<Index>(), select(&BLIND_FLAGS[..]), any::<bool>())
            .prop_map(|(of, flags, reply)| Step::Blind { of, flags, reply }),
        14 => error,
        18 => frame_spec().prop_map(Step::Frame),
        2 => env::change_and_bump().prop_map(|(change, bump)| Step::Env { change, bump }),
    ]
}

/// A random scenario of up to `max_steps` steps.
pub fn scenario(max_steps: usize) -> impl Strategy<Value = Scenario> {
    (policy(), vec(step(), 1..=max_steps)).prop_map(|(policy, steps)| Scenario { policy, steps })
}
