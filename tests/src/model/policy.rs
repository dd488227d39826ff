//! The model's policy stage, run after transport parsing and before the route lookup: its own
//! connection table first (ESTABLISHED, then RELATED for ICMP errors), then the ingress rules of
//! the public IP or the egress policy.
//!
//! Rules are matched by a linear scan over the rules as natd holds them (protocol, port range,
//! ICMP type/code, CIDRs), never through the LPM entries natd compiles them into, so a test
//! that agrees with the program also checks that compilation. The TCP/UDP state machine is
//! `nat_common::conntrack` (host-tested there; the golden tests pin its transitions).
use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use nat_common::{
    Event, FlowKey, FlowState, ORIGIN_GUEST, ORIGIN_PUBLIC, Reason, TIMEOUT_SLOTS,
    conntrack::{self, State},
};
use nat_userspace::{
    cidr::Cidr,
    firewall::{EgressRule, IngressRule, Proto, Service},
    state::DesiredState,
};

/// Conntrack events of one frame, by [`Event`] discriminant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Events(pub [u64; Event::COUNT as usize]);

impl Events {
    pub fn of(list: &[(Event, u64)]) -> Self {
        let mut e = Events::default();
        for (ev, n) in list {
            e.0[*ev as usize] += n;
        }
        e
    }

    pub fn get(&self, e: Event) -> u64 {
        self.0[e as usize]
    }

    fn bump(&mut self, e: Event) {
        self.0[e as usize] += 1;
    }
}

impl fmt::Display for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let moved: Vec<_> = Event::ALL
            .iter()
            .filter(|e| self.get(**e) != 0)
            .map(|e| format!("{}={}", e.name(), self.get(*e)))
            .collect();
        if moved.is_empty() {
            f.write_str("no events")
        } else {
            f.write_str(&moved.join(" "))
        }
    }
}

/// Network-order `u16` as the program stores ports, from a host-order port.
fn wire16(v: u16) -> u16 {
    u16::from_ne_bytes(v.to_be_bytes())
}

fn host16(v: u16) -> u16 {
    u16::from_be_bytes(v.to_ne_bytes())
}

fn wire32(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// A flow in the guest's view (private address, after DNAT / before SNAT). Ports are host
/// order: 0 without ports, the identifier twice for ICMP echo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Flow {
    pub guest: Ipv4Addr,
    pub remote: Ipv4Addr,
    pub guest_port: u16,
    pub remote_port: u16,
    pub proto: u8,
}

impl Flow {
    /// The program's `CONNTRACK` key (kind [`nat_common::FLOW_NAT`]).
    pub fn key(&self) -> FlowKey {
        FlowKey {
            guest: wire32(self.guest),
            remote: wire32(self.remote),
            guest_port: wire16(self.guest_port),
            remote_port: wire16(self.remote_port),
            proto: self.proto,
            ..FlowKey::default()
        }
    }

    pub fn from_key(k: &FlowKey) -> Self {
        Flow {
            guest: Ipv4Addr::from(k.guest.to_ne_bytes()),
            remote: Ipv4Addr::from(k.remote.to_ne_bytes()),
            guest_port: host16(k.guest_port),
            remote_port: host16(k.remote_port),
            proto: k.proto,
        }
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "proto {} {}:{} <-> {}:{}",
            self.proto, self.guest, self.guest_port, self.remote, self.remote_port
        )
    }
}

/// What the tests compare of a conntrack entry: all but the time of its last packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracked {
    pub state: State,
    /// [`ORIGIN_GUEST`] or [`ORIGIN_PUBLIC`].
    pub origin: u8,
    /// [`conntrack::FIN_ORIG`] | [`conntrack::FIN_REPLY`].
    pub fins: u8,
}

impl Tracked {
    pub fn new(state: State, origin: u8, fins: u8) -> Self {
        Tracked {
            state,
            origin,
            fins,
        }
    }

    /// The program's `CONNTRACK` value with this state, last seen at `last_seen`.
    pub fn value(&self, last_seen: u64) -> FlowState {
        FlowState {
            last_seen,
            state: self.state as u8,
            origin: self.origin,
            fins: self.fins,
            ..FlowState::default()
        }
    }

    /// The comparable part of a `CONNTRACK` value; `None` if a field the program never writes
    /// (padding, hairpin peer) is nonzero.
    pub fn from_value(v: &FlowState) -> Option<Self> {
        let clean = FlowState {
            last_seen: v.last_seen,
            state: v.state,
            origin: v.origin,
            fins: v.fins,
            ..FlowState::default()
        };
        (clean == *v && usize::from(v.state) < TIMEOUT_SLOTS).then(|| Tracked {
            state: State::from_u8(v.state),
            origin: v.origin,
            fins: v.fins,
        })
    }
}

/// Which part of the policy decided a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Path {
    /// A live flow (ESTABLISHED).
    Established,
    /// An ICMP error quoting a live flow (RELATED).
    Related,
    /// Allowed by an ingress rule or the egress policy.
    Rule,
    /// Dropped.
    Denied,
}

/// The rules of a desired state, as natd holds them.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    pub ingress: Vec<IngressRule>,
    pub egress_default_deny: bool,
    pub egress: Vec<EgressRule>,
}

impl Rules {
    pub fn of(state: &DesiredState) -> Self {
        Rules {
            ingress: state.ingress_rules().map(|r| r.rule.clone()).collect(),
            egress_default_deny: !state.egress_default_allow(),
            egress: state.egress_rules().map(|r| r.rule.clone()).collect(),
        }
    }
}

fn cidr_contains(c: &Cidr, a: Ipv4Addr) -> bool {
    let len = u32::from(c.prefix_len());
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(a) & mask == u32::from(c.addr()) & mask
}

/// The transport facts the policy looks at, from the model's own parse.
#[derive(Clone, Copy, Debug)]
pub struct Facts {
    pub proto: u8,
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    /// Host order; 0 without ports; the echo identifier twice for ICMP echo.
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    /// ICMP type and code.
    pub icmp: Option<(u8, u8)>,
    /// For an ICMP error (types 3, 11, 12) about this mapping: the quoted packet.
    pub quoted: Option<Quoted>,
}

/// The quoted packet of an ICMP error.
#[derive(Clone, Copy, Debug)]
pub struct Quoted {
    /// The quoted packet's other end (not the mapping's address).
    pub remote: Ipv4Addr,
    pub proto: u8,
    /// (guest's port, remote's port), host order, when the quote holds 8 transport bytes of
    /// TCP, UDP or ICMP echo.
    pub ports: Option<(u16, u16)>,
}

fn service_matches(s: &Service, f: &Facts) -> bool {
    match s.proto {
        Proto::All => true,
        Proto::Tcp | Proto::Udp => {
            Some(f.proto) == s.proto.number()
                && s.ports
                    .is_none_or(|r| (r.first..=r.last).contains(&f.dport))
        }
        Proto::Icmp => match f.icmp {
            Some((ty, code)) => {
                f.proto == 1
                    && s.icmp_type.is_none_or(|t| t == ty)
                    && s.icmp_code.is_none_or(|c| c == code)
            }
            None => false,
        },
    }
}

impl Rules {
    /// Some ingress rule of `public` has a CIDR holding the source and matches the service.
    pub fn ingress_allows(&self, public: Ipv4Addr, f: &Facts) -> bool {
        self.ingress.iter().any(|r| {
            r.public == public
                && r.cidrs.iter().any(|c| cidr_contains(c, f.saddr))
                && service_matches(&r.service, f)
        })
    }

    /// The egress default, inverted if some exception rule matches destination and service.
    pub fn egress_allows(&self, f: &Facts) -> bool {
        let matched = self.egress.iter().any(|r| {
            r.cidrs.iter().any(|c| cidr_contains(c, f.daddr)) && service_matches(&r.service, f)
        });
        let default_allow = !self.egress_default_deny;
        default_allow != matched
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    tracked: Tracked,
    last_seen: u64,
}

/// The model's connection table and its settings (`CONFIG` timeouts, 0 = netfilter default).
#[derive(Clone, Debug, Default)]
pub struct Conntrack {
    flows: BTreeMap<Flow, Entry>,
    pub timeouts_ns: [u64; TIMEOUT_SLOTS],
}

impl Conntrack {
    fn timeout_ns(&self, s: State) -> u64 {
        match self.timeouts_ns[s as usize] {
            0 => s.default_timeout_secs() * 1_000_000_000,
            t => t,
        }
    }

    fn live(&self, e: &Entry, now: u64) -> bool {
        now.wrapping_sub(e.last_seen) <= self.timeout_ns(e.tracked.state)
    }

    /// Every entry, live or not.
    pub fn flows(&self) -> BTreeMap<Flow, Tracked> {
        self.flows.iter().map(|(k, e)| (*k, e.tracked)).collect()
    }

    pub fn put(&mut self, flow: Flow, tracked: Tracked, last_seen: u64) {
        self.flows.insert(flow, Entry { tracked, last_seen });
    }

    pub fn clear(&mut self) {
        self.flows.clear();
    }

    /// ESTABLISHED: a live flow advances its state.
    fn track(
        &mut self,
        flow: &Flow,
        f: &Facts,
        from_guest: bool,
        now: u64,
        ev: &mut Events,
    ) -> bool {
        let Some(e) = self.flows.get(flow).copied() else {
            ev.bump(Event::ConntrackMiss);
            return false;
        };
        if !self.live(&e, now) {
            ev.bump(Event::ConntrackExpired);
            ev.bump(Event::ConntrackMiss);
            return false;
        }
        let t = e.tracked;
        let reply = (t.origin == ORIGIN_GUEST) != from_guest;
        // TODO(model update in progress): None = a new flow the other way.
        let Some((state, fins)) = conntrack::next(t.state, t.fins, f.proto, f.tcp_flags, reply)
        else {
            ev.bump(Event::ConntrackMiss);
            return false;
        };
        self.put(*flow, Tracked { state, fins, ..t }, now);
        ev.bump(Event::ConntrackHit);
        true
    }
}

/// Rules plus connection table: the whole policy stage.
#[derive(Clone, Debug, Default)]
pub struct PolicyModel {
    pub rules: Rules,
    pub conntrack: Conntrack,
}

impl PolicyModel {
    /// Decides a mapped, parsed frame of the mapping `public` <-> `private` at time `now`;
    /// `Err` is the drop reason. Events go to `ev`.
    pub fn check(
        &mut self,
        f: &Facts,
        inbound: bool,
        public: Ipv4Addr,
        private: Ipv4Addr,
        now: u64,
        ev: &mut Events,
    ) -> (Path, Result<(), Reason>) {
        let flow = if inbound {
            Flow {
                guest: private,
                remote: f.saddr,
                guest_port: f.dport,
                remote_port: f.sport,
                proto: f.proto,
            }
        } else {
            Flow {
                guest: private,
                remote: f.daddr,
                guest_port: f.sport,
                remote_port: f.dport,
                proto: f.proto,
            }
        };
        if self.conntrack.track(&flow, f, !inbound, now, ev) {
            return (Path::Established, Ok(()));
        }
        if let Some(Quoted {
            remote,
            proto,
            ports: Some((guest_port, remote_port)),
        }) = f.quoted
        {
            let related = Flow {
                guest: private,
                remote,
                guest_port,
                remote_port,
                proto,
            };
            let ct = &self.conntrack;
            if ct.flows.get(&related).is_some_and(|e| ct.live(e, now)) {
                return (Path::Related, Ok(()));
            }
        }
        let allowed = if inbound {
            self.rules.ingress_allows(public, f)
        } else {
            self.rules.egress_allows(f)
        };
        if !allowed {
            let reason = if inbound {
                Reason::InboundDenied
            } else {
                Reason::OutboundDenied
            };
            return (Path::Denied, Err(reason));
        }
        if f.quoted.is_none()
            && let Some(state) = conntrack::initial(f.proto, f.tcp_flags)
        {
            let origin = if inbound { ORIGIN_PUBLIC } else { ORIGIN_GUEST };
            self.conntrack
                .put(flow, Tracked::new(state, origin, 0), now);
            ev.bump(Event::ConntrackCreate);
        }
        (Path::Rule, Ok(()))
    }
}
