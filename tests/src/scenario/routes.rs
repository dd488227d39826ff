//! Route scenarios: a few flows through an open policy, each opened and established (TCP's
//! handshake, a query and its answer and one more packet), then their packets both ways,
//! mostly ones that take the established path, mixed with changes of the surroundings (see
//! `harness::env`): neighbours moving or gone, the remote network's route moving, natd's
//! generation bumps, mappings removed and installed again. What the firewall scenarios reach
//! rarely (flows with resolved routes meeting a change) is here the rule.
use proptest::{collection::vec, prelude::*, sample::Index, sample::select};

use super::{Action, GUEST_PICK, GUESTS, L4, PORTS, Pkt, Way, env, sender};
use crate::{
    harness::{PUB_GW, REMOTE, Topology, env::Change, env::PUB_GW2},
    packet::{TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
};

/// Remote ends: mostly behind the route that changes, some on the public link itself.
const REMOTES: [std::net::Ipv4Addr; 5] = [
    REMOTE,
    REMOTE,
    std::net::Ipv4Addr::new(192, 0, 2, 6),
    PUB_GW,
    PUB_GW2,
];

/// One step after the flows opened.
#[derive(Clone, Debug)]
pub enum RouteStep {
    /// A packet of an opened flow, in its original direction or the reply's; TCP with
    /// `flags`.
    Packet { of: Index, reply: bool, flags: u8 },
    /// A change of the surroundings, and natd's generation bump after it if `bump`.
    Env { change: Change, bump: bool },
}

#[derive(Clone, Debug)]
pub struct RouteScenario {
    /// The first packet of each flow.
    pub flows: Vec<Pkt>,
    pub steps: Vec<RouteStep>,
}

impl RouteScenario {
    /// The frames that open every flow, then the steps' frames and changes.
    pub fn actions(&self, topo: &Topology) -> Vec<Action> {
        let frame = |p: Pkt| {
            let (ingress, frame) = p.frame(topo);
            Action::Frame { ingress, frame }
        };
        let mut out = Vec::new();
        for p in &self.flows {
            out.push(frame(*p));
            out.push(frame(p.reply(TCP_SYN | TCP_ACK)));
            out.push(frame(p.again(TCP_ACK)));
        }
        for s in &self.steps {
            match s {
                RouteStep::Packet { of, reply, flags } => {
                    let p = of.get(&self.flows);
                    out.push(frame(if *reply {
                        p.reply(*flags)
                    } else {
                        p.again(*flags)
                    }));
                }
                RouteStep::Env { change, bump } => {
                    out.push(Action::Env(*change));
                    if *bump {
                        out.push(Action::Env(Change::Bump));
                    }
                }
            }
        }
        out
    }
}

/// The first packet of a flow: inbound, outbound or hairpin, TCP (a SYN), UDP, an echo
/// request or GRE.
fn opener() -> impl Strategy<Value = Pkt> {
    (
        prop_oneof![
            4 => Just(Way::Inbound),
            4 => Just(Way::Outbound),
            2 => Just(Way::HairpinForward),
        ],
        select(&GUEST_PICK[..]),
        select(&REMOTES[..]),
        sender(),
        select(&PORTS[..]),
        select(&PORTS[..]),
        prop_oneof![
            5 => Just(L4::Tcp {
                flags: TCP_SYN,
                blind: false
            }),
            3 => Just(L4::Udp),
            2 => Just(L4::Echo { request: true }),
            1 => Just(L4::Other(47)),
        ],
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

fn step() -> impl Strategy<Value = RouteStep> {
    let flags = prop_oneof![
        8 => Just(TCP_ACK),
        4 => Just(TCP_PSH | TCP_ACK),
        1 => Just(TCP_FIN | TCP_ACK),
        1 => Just(TCP_RST),
        1 => Just(TCP_SYN),
    ];
    prop_oneof![
        12 => (any::<Index>(), any::<bool>(), flags)
            .prop_map(|(of, reply, flags)| RouteStep::Packet { of, reply, flags }),
        4 => env::change_and_bump().prop_map(|(change, bump)| RouteStep::Env { change, bump }),
    ]
}

/// A route scenario of 1 to 4 flows and up to `max_steps` steps.
pub fn route_scenario(max_steps: usize) -> impl Strategy<Value = RouteScenario> {
    (vec(opener(), 1..=4), vec(step(), 1..=max_steps))
        .prop_map(|(flows, steps)| RouteScenario { flows, steps })
}
