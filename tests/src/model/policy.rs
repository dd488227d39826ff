//! The model's policy: the rules natd holds (ingress firewall of each public IP, egress
//! policy), and the flow table's settings and netfilter's answer to a packet.
//!
//! What a packet does to its flow is netfilter's answer, from the model's own encoding of it
//! ([`super::nf_state`], not `nat_common::conntrack`), limited to what the program keeps
//! ([`Kept`]). Of ICMP only queries (echo, timestamp, information, address mask) are tracked,
//! keyed by identifier and type; only a request opens a flow; errors get in as RELATED or by a
//! rule, other messages by a rule. A SYN on a TIME_WAIT or CLOSE flow ends it and is judged as
//! new; a packet netfilter marks INVALID for its flow is judged by the rules but neither joins
//! nor replaces the flow.
//!
//! Rules are matched by a linear scan over the rules as natd holds them (protocol, port range,
//! ICMP type/code, CIDRs), never through the LPM entries natd compiles them into, so a test
//! that agrees with the program also checks that compilation.
use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use nat_common::{
    Event, FLOW_HAIRPIN, FLOW_NAT, FlowKey, ORIGIN_GUEST, TIMEOUT_SLOTS,
    conntrack::{State, Timeout},
};
use nat_userspace::{
    cidr::Cidr,
    firewall::{EgressRule, IngressRule, Proto, Service},
    state::DesiredState,
};

pub use super::nf_state::{Kept, Seg};
use super::{
    nf_state::{self, NfConn, Timer},
    table::{Rec, Table},
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

    pub fn bump(&mut self, e: Event) {
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

/// What a logical flow entry is (`natctl conntrack list`'s view).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A translated flow, in the guest's view ([`FLOW_NAT`]).
    Nat,
    /// A hairpin flow: sender V2 -> public IP P ([`FLOW_HAIRPIN`]).
    HairpinFwd,
    /// A hairpin flow's reply direction: target V1 <-> router address R, naming the sender
    /// (a view of the flow's reply entry, not an entry of its own).
    HairpinRev,
}

impl Kind {
    /// The program's `FlowKey::kind` of a flow of this kind.
    pub fn raw(self) -> u8 {
        match self {
            Kind::Nat => FLOW_NAT,
            Kind::HairpinFwd | Kind::HairpinRev => FLOW_HAIRPIN,
        }
    }
}

/// A connection-table key. For [`Kind::Nat`] the guest's view (private address, after DNAT /
/// before SNAT); for the hairpin legs see [`Kind`]. Ports are host order: 0 without ports; for
/// an ICMP query the identifier and the type the guest sends in the flow (the identifier twice
/// for the hairpin legs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Flow {
    pub guest: Ipv4Addr,
    pub remote: Ipv4Addr,
    pub guest_port: u16,
    pub remote_port: u16,
    pub proto: u8,
    pub kind: Kind,
}

impl Flow {
    /// The program's `FlowKey` of a flow (not of a [`Kind::HairpinRev`] view) opened by
    /// `origin`.
    pub fn key(&self, origin: u8) -> FlowKey {
        FlowKey {
            guest: wire32(self.guest),
            remote: wire32(self.remote),
            guest_port: wire16(self.guest_port),
            remote_port: wire16(self.remote_port),
            proto: self.proto,
            kind: self.kind.raw(),
            origin,
            _pad: 0,
        }
    }

    /// The flow of a program's `FlowKey`; `None` for a kind it never writes or padding set.
    pub fn from_key(k: &FlowKey) -> Option<Self> {
        if k._pad != 0 {
            return None;
        }
        let kind = match k.kind {
            FLOW_NAT => Kind::Nat,
            FLOW_HAIRPIN => Kind::HairpinFwd,
            _ => return None,
        };
        Some(Flow {
            guest: Ipv4Addr::from(k.guest.to_ne_bytes()),
            remote: Ipv4Addr::from(k.remote.to_ne_bytes()),
            guest_port: host16(k.guest_port),
            remote_port: host16(k.remote_port),
            proto: k.proto,
            kind,
        })
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "proto {} {}:{} <-> {}:{}",
            self.proto, self.guest, self.guest_port, self.remote, self.remote_port
        )?;
        match self.kind {
            Kind::Nat => Ok(()),
            Kind::HairpinFwd => f.write_str(" (hairpin forward leg)"),
            Kind::HairpinRev => f.write_str(" (hairpin reply binding)"),
        }
    }
}

/// What the tests compare of a conntrack entry: all but the time of its last packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracked {
    pub state: State,
    /// [`ORIGIN_GUEST`] or [`ORIGIN_PUBLIC`].
    pub origin: u8,
    /// `conntrack::SEEN_REPLY` | `conntrack::ASSURED`.
    pub flags: u8,
    /// The idle timer the last packet started.
    pub timer: Timeout,
    /// The sender's address and port (host order) of a hairpin reply binding; zeros for every
    /// other entry (as in the map, where a binding of sender 0.0.0.0:0 looks the same).
    pub peer: (Ipv4Addr, u16),
}

/// The `peer` of an entry that is not a hairpin reply binding.
pub const NO_PEER: (Ipv4Addr, u16) = (Ipv4Addr::UNSPECIFIED, 0);

impl Tracked {
    /// An entry in `state` with status `flags`, its timer the state's own.
    pub fn new(state: State, origin: u8, flags: u8) -> Self {
        Tracked {
            state,
            origin,
            flags,
            timer: nf_state::state_slot(state),
            peer: NO_PEER,
        }
    }

    /// The same with another running timer.
    pub fn with_timer(self, timer: Timeout) -> Self {
        Tracked { timer, ..self }
    }

    /// A hairpin reply binding to `peer` (always opened by a guest, no status kept).
    pub fn binding(state: State, peer: (Ipv4Addr, u16)) -> Self {
        Tracked {
            peer,
            ..Tracked::new(state, ORIGIN_GUEST, 0)
        }
    }
}

/// The rules of a desired state, as natd holds them.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    pub ingress: Vec<IngressRule>,
    pub egress_default_deny: bool,
    /// natd is turning the default over (`nat_common::EGRESS_CLOSED`): no new egress flow.
    pub egress_closed: bool,
    pub egress: Vec<EgressRule>,
}

impl Rules {
    pub fn of(state: &DesiredState) -> Self {
        Rules {
            ingress: state.ingress_rules().map(|r| r.rule.clone()).collect(),
            egress_default_deny: !state.egress_default_allow(),
            egress_closed: false,
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
    /// Host order; 0 without ports; the identifier twice for an ICMP query.
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    /// What TCP tracking reads of the header (zeros for other protocols).
    pub seg: Seg,
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
    /// The quoted packet's (source, destination) ports as it travelled, host order, when the
    /// quote holds 8 transport bytes of TCP or UDP; for an ICMP query (identifier, type).
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

    /// The egress default, inverted if some exception rule matches the guest source, the
    /// destination and the service; nothing while egress is closed.
    pub fn egress_allows(&self, f: &Facts) -> bool {
        if self.egress_closed {
            return false;
        }
        let matched = self.egress.iter().any(|r| {
            r.sources.iter().any(|c| cidr_contains(c, f.saddr))
                && r.cidrs.iter().any(|c| cidr_contains(c, f.daddr))
                && service_matches(&r.service, f)
        });
        let default_allow = !self.egress_default_deny;
        default_allow != matched
    }
}

const ICMP: u8 = 1;

/// The model's flow table and its settings (`CONFIG` timeouts, 0 = netfilter's default; what
/// of netfilter's per-flow data is kept).
#[derive(Clone, Debug, Default)]
pub struct Conntrack {
    pub table: Table,
    pub timeouts_ns: [u64; TIMEOUT_SLOTS],
    pub kept: Kept,
}

impl Conntrack {
    fn timeout_ns(&self, t: Timeout) -> u64 {
        nf_state::length_ns(&self.timeouts_ns, Timer::of_slot(t))
    }

    /// Whether the flow has been idle past its running timer at `now`.
    pub fn expired(&self, r: &Rec, now: u64) -> bool {
        let (_, _, timer) = r.encoded();
        now.wrapping_sub(r.last_seen) > self.timeout_ns(timer)
    }

    /// The logical view (see [`Table::flows`]).
    pub fn flows(&self) -> BTreeMap<Flow, Tracked> {
        self.table.flows()
    }

    pub fn clear(&mut self) {
        self.table.clear();
    }

    /// The flow a first packet opens, if it may open one: a tracked protocol netfilter would
    /// track as new; of ICMP only a query's request.
    pub fn opens(&self, f: &Facts, now: u64) -> Option<NfConn> {
        if f.proto == ICMP {
            let (ty, _) = f.icmp?;
            if !nf_state::icmp_valid_new(ty) {
                return None;
            }
        }
        NfConn::open(f.proto, &f.seg, &self.kept, &self.timeouts_ns, now)
    }
}

/// Rules plus flow table: the whole policy.
#[derive(Clone, Debug, Default)]
pub struct PolicyModel {
    pub rules: Rules,
    pub conntrack: Conntrack,
}

/// A stored state as the model takes it (the program stores state, status bits and timer).
pub fn conn_of(state: State, flags: u8, timer: Timeout) -> NfConn {
    NfConn::from_encoded(state, flags, timer)
}

/// Marks a flow opened by the guest side.
pub const FROM_GUEST: u8 = ORIGIN_GUEST;
