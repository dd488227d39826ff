//! The model's policy stage, run after transport parsing and before the route lookup: its own
//! connection table first (ESTABLISHED, then RELATED for ICMP errors), then the ingress rules of
//! the public IP or the egress policy. A packet the rules admit opens its flow only once the
//! route lookup has forwarded it ([`Admit::Open`]).
//!
//! What a packet does to its flow is netfilter's answer, from the model's own encoding of it
//! ([`super::nf_state`], not `nat_common::conntrack`), limited to what the program keeps
//! ([`Kept`]). Of ICMP only queries (echo, timestamp, information, address mask) are tracked,
//! keyed by identifier and the type the guest sends: a request follows its flow's direction,
//! a reply answers it, only a request opens a flow; errors get in as RELATED or by a rule,
//! other messages by a rule, without any lookup. A SYN on a TIME_WAIT or CLOSE flow is a
//! miss, judged as new; a flow it opens replaces the old entry. A packet netfilter marks
//! INVALID for its flow is judged by the rules but neither joins nor replaces the flow. The
//! table also holds the two legs of hairpin flows ([`Kind`]), which `super::hairpin` drives
//! with the same tracking.
//!
//! Rules are matched by a linear scan over the rules as natd holds them (protocol, port range,
//! ICMP type/code, CIDRs), never through the LPM entries natd compiles them into, so a test
//! that agrees with the program also checks that compilation.
use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use nat_common::{
    Event, FLOW_HAIRPIN_FWD, FLOW_HAIRPIN_REV, FLOW_NAT, FlowKey, FlowState, ORIGIN_GUEST,
    ORIGIN_PUBLIC, Reason, TIMEOUT_SLOTS,
    conntrack::{State, Timeout},
};
use nat_userspace::{
    cidr::Cidr,
    firewall::{EgressRule, IngressRule, Proto, Service},
    state::DesiredState,
};

use super::nf_state::{self, NfConn, Ret, Timer};
pub use super::nf_state::{Kept, Seg};

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

/// Which leg of a flow a connection-table entry is: the program's `FlowKey::kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A translated flow, keyed by the guest's private address ([`FLOW_NAT`]).
    Nat,
    /// The forward leg of a hairpin flow: sender V2 -> public IP P ([`FLOW_HAIRPIN_FWD`]).
    HairpinFwd,
    /// The reply binding of a hairpin flow: target V1 <-> router address R, whose entry names
    /// the sender ([`FLOW_HAIRPIN_REV`]).
    HairpinRev,
}

impl Kind {
    pub fn raw(self) -> u8 {
        match self {
            Kind::Nat => FLOW_NAT,
            Kind::HairpinFwd => FLOW_HAIRPIN_FWD,
            Kind::HairpinRev => FLOW_HAIRPIN_REV,
        }
    }

    pub fn from_raw(v: u8) -> Option<Self> {
        [Kind::Nat, Kind::HairpinFwd, Kind::HairpinRev]
            .into_iter()
            .find(|k| k.raw() == v)
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
    /// The program's `CONNTRACK` key.
    pub fn key(&self) -> FlowKey {
        FlowKey {
            guest: wire32(self.guest),
            remote: wire32(self.remote),
            guest_port: wire16(self.guest_port),
            remote_port: wire16(self.remote_port),
            proto: self.proto,
            kind: self.kind.raw(),
            ..FlowKey::default()
        }
    }

    /// The flow of a `CONNTRACK` key; `None` for a kind the program never writes.
    pub fn from_key(k: &FlowKey) -> Option<Self> {
        Some(Flow {
            guest: Ipv4Addr::from(k.guest.to_ne_bytes()),
            remote: Ipv4Addr::from(k.remote.to_ne_bytes()),
            guest_port: host16(k.guest_port),
            remote_port: host16(k.remote_port),
            proto: k.proto,
            kind: Kind::from_raw(k.kind)?,
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

    /// The program's `CONNTRACK` value with this state, last seen at `last_seen`.
    pub fn value(&self, last_seen: u64) -> FlowState {
        FlowState {
            last_seen,
            state: self.state as u8,
            origin: self.origin,
            flags: self.flags,
            timer: self.timer as u8,
            peer_addr: wire32(self.peer.0),
            peer_port: wire16(self.peer.1),
            ..FlowState::default()
        }
    }

    /// The comparable part of a `CONNTRACK` value; `None` if padding is nonzero or the state or
    /// timer is out of range.
    pub fn from_value(v: &FlowState) -> Option<Self> {
        let clean = FlowState {
            last_seen: v.last_seen,
            state: v.state,
            origin: v.origin,
            flags: v.flags,
            timer: v.timer,
            peer_addr: v.peer_addr,
            peer_port: v.peer_port,
            ..FlowState::default()
        };
        if clean != *v {
            return None;
        }
        Some(Tracked {
            state: State::from_u8(v.state)?,
            origin: v.origin,
            flags: v.flags,
            timer: Timeout::from_u8(v.timer)?,
            peer: (
                Ipv4Addr::from(v.peer_addr.to_ne_bytes()),
                host16(v.peer_port),
            ),
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
    /// Hairpin: the reply binding belongs to a live flow of another sender (passed).
    Collision,
    /// Hairpin reply: a binding exists, but the flow it names is gone or refuses the packet
    /// (passed).
    Stale,
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
    /// (guest's port, remote's port), host order, when the quote holds 8 transport bytes of
    /// TCP, UDP or an ICMP query (identifier, type the guest sends in its flow).
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
    /// destination and the service.
    pub fn egress_allows(&self, f: &Facts) -> bool {
        let matched = self.egress.iter().any(|r| {
            r.sources.iter().any(|c| cidr_contains(c, f.saddr))
                && r.cidrs.iter().any(|c| cidr_contains(c, f.daddr))
                && service_matches(&r.service, f)
        });
        let default_allow = !self.egress_default_deny;
        default_allow != matched
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// What the program stores.
    tracked: Tracked,
    /// What netfilter keeps (of which the model uses what [`Conntrack::kept`] says).
    conn: NfConn,
    last_seen: u64,
}

const ICMP: u8 = 1;

/// ICMP type of a query message, `None` for anything else (other protocols included).
fn query_type(f: &Facts) -> Option<u8> {
    match f.icmp {
        Some((ty, _)) if f.proto == ICMP && nf_state::icmp_inverse(ty).is_some() => Some(ty),
        _ => None,
    }
}

/// What a packet found in the connection table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Part of a live flow (ESTABLISHED).
    Hit,
    /// No live flow, a flow it ends (SYN on a closed one), or not a tracked message.
    Miss,
    /// A live flow that netfilter would not let this packet belong to: the flow stays.
    Invalid,
}

/// The model's connection table and its settings (`CONFIG` timeouts, 0 = netfilter default;
/// what of netfilter's per-flow data is kept).
#[derive(Clone, Debug, Default)]
pub struct Conntrack {
    flows: BTreeMap<Flow, Entry>,
    pub timeouts_ns: [u64; TIMEOUT_SLOTS],
    pub kept: Kept,
}

impl Conntrack {
    fn timeout_ns(&self, t: Timeout) -> u64 {
        nf_state::length_ns(&self.timeouts_ns, Timer::of_slot(t))
    }

    fn live(&self, e: &Entry, now: u64) -> bool {
        now.wrapping_sub(e.last_seen) <= self.timeout_ns(e.tracked.timer)
    }

    /// The entry of `flow` if it exists and has not expired, untouched.
    pub(super) fn live_entry(&self, flow: &Flow, now: u64) -> Option<Tracked> {
        let e = self.flows.get(flow)?;
        self.live(e, now).then_some(e.tracked)
    }

    /// The entry of `flow`, live or not.
    pub(super) fn entry(&self, flow: &Flow) -> Option<Tracked> {
        self.flows.get(flow).map(|e| e.tracked)
    }

    /// Every entry, live or not.
    pub fn flows(&self) -> BTreeMap<Flow, Tracked> {
        self.flows.iter().map(|(k, e)| (*k, e.tracked)).collect()
    }

    /// Writes an entry as the program would find it (nothing known beyond what it stores).
    pub fn put(&mut self, flow: Flow, tracked: Tracked, last_seen: u64) {
        let conn = NfConn::from_encoded(tracked.state, tracked.flags, tracked.timer);
        self.flows.insert(
            flow,
            Entry {
                tracked,
                conn,
                last_seen,
            },
        );
    }

    pub fn clear(&mut self) {
        self.flows.clear();
    }

    /// ESTABLISHED: a live flow advances its state. Of ICMP only queries are tracked (no
    /// lookup, no event otherwise), a request in the flow's direction and a reply against it.
    pub(super) fn track(
        &mut self,
        flow: &Flow,
        f: &Facts,
        from_guest: bool,
        now: u64,
        ev: &mut Events,
    ) -> Found {
        if f.proto == ICMP && query_type(f).is_none() {
            return Found::Miss;
        }
        let Some(mut e) = self.flows.get(flow).copied() else {
            ev.bump(Event::ConntrackMiss);
            return Found::Miss;
        };
        if !self.live(&e, now) {
            ev.bump(Event::ConntrackExpired);
            ev.bump(Event::ConntrackMiss);
            return Found::Miss;
        }
        let reply = (e.tracked.origin == ORIGIN_GUEST) != from_guest;
        if query_type(f).is_some_and(|ty| nf_state::icmp_valid_new(ty) == reply) {
            ev.bump(Event::ConntrackMiss);
            return Found::Miss;
        }
        let ret = e
            .conn
            .packet(reply, &f.seg, &self.kept, &self.timeouts_ns, now);
        let found = match ret {
            Ret::Accept(refresh) => {
                if refresh.is_some() {
                    e.last_seen = now;
                }
                Found::Hit
            }
            Ret::Ignore => Found::Hit,
            Ret::Close => {
                self.flows.remove(flow);
                ev.bump(Event::ConntrackHit);
                return Found::Hit;
            }
            Ret::New => Found::Miss,
            Ret::Invalid(lower) => {
                // nf_tcp_handle_invalid: at least two minutes left and more than UNACK's.
                let unack = Timer::Tcp(nf_state::names::UNACK);
                let left = self
                    .timeout_ns(e.tracked.timer)
                    .saturating_sub(now.wrapping_sub(e.last_seen));
                let unack_ns = nf_state::length_ns(&self.timeouts_ns, unack);
                if lower && left >= 120_000_000_000 && left > unack_ns {
                    e.conn.timer = unack;
                    e.last_seen = now;
                }
                Found::Invalid
            }
        };
        if found != Found::Miss {
            let (state, flags, timer) = e.conn.encoded();
            e.tracked = Tracked {
                state,
                flags,
                timer,
                ..e.tracked
            };
            self.flows.insert(*flow, e);
        }
        ev.bump(if found == Found::Hit {
            Event::ConntrackHit
        } else {
            Event::ConntrackMiss
        });
        found
    }

    /// Opens `flow` for a packet the policy admitted and the route forwards, unless the packet
    /// cannot open one (ICMP other than a query request, TCP netfilter would not track as new);
    /// replaces whatever entry was there. Returns the new entry.
    pub(super) fn open(
        &mut self,
        flow: Flow,
        f: &Facts,
        from_guest: bool,
        now: u64,
        ev: &mut Events,
    ) -> Option<Tracked> {
        if f.proto == ICMP && !query_type(f).is_some_and(nf_state::icmp_valid_new) {
            return None;
        }
        let conn = NfConn::open(f.proto, &f.seg, &self.kept, &self.timeouts_ns, now)?;
        let (state, flags, timer) = conn.encoded();
        let origin = if from_guest {
            ORIGIN_GUEST
        } else {
            ORIGIN_PUBLIC
        };
        let tracked = Tracked {
            state,
            origin,
            flags,
            timer,
            peer: NO_PEER,
        };
        self.flows.insert(
            flow,
            Entry {
                tracked,
                conn,
                last_seen: now,
            },
        );
        ev.bump(Event::ConntrackCreate);
        Some(tracked)
    }

    /// Keeps `rev` (if present) alive and in the state and timer of `fwd` (if present).
    pub(super) fn refresh(&mut self, rev: &Flow, fwd: &Flow, now: u64) {
        let of_fwd = self
            .flows
            .get(fwd)
            .map(|e| (e.tracked.state, e.tracked.timer));
        if let (Some((state, timer)), Some(e)) = (of_fwd, self.flows.get_mut(rev)) {
            e.last_seen = now;
            e.tracked.state = state;
            e.tracked.timer = timer;
        }
    }
}

/// What the policy made of a packet it lets through.
#[derive(Clone, Copy, Debug)]
pub enum Admit {
    /// A live flow's packet, an ICMP error (RELATED or allowed by a rule), or a packet INVALID
    /// for its flow that the rules allow: opens nothing.
    Tracked,
    /// Allowed by a rule: opens this flow once the route lookup has forwarded the packet.
    Open(Flow),
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
    ) -> (Path, Result<Admit, Reason>) {
        let (remote, guest_port, remote_port) = if inbound {
            (f.saddr, f.dport, f.sport)
        } else {
            (f.daddr, f.sport, f.dport)
        };
        // An ICMP query's flow is named by the type the guest sends in it.
        let remote_port = match query_type(f) {
            Some(ty) => nf_state::icmp_guest_type(ty, !inbound).map_or(remote_port, u16::from),
            None => remote_port,
        };
        let flow = Flow {
            guest: private,
            remote,
            guest_port,
            remote_port,
            proto: f.proto,
            kind: Kind::Nat,
        };
        let found = self.conntrack.track(&flow, f, !inbound, now, ev);
        if found == Found::Hit {
            return (Path::Established, Ok(Admit::Tracked));
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
                kind: Kind::Nat,
            };
            if self.conntrack.live_entry(&related, now).is_some() {
                return (Path::Related, Ok(Admit::Tracked));
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
        // ICMP errors never open flows, nor does a packet INVALID for its flow.
        if f.quoted.is_some() || found == Found::Invalid {
            return (Path::Rule, Ok(Admit::Tracked));
        }
        (Path::Rule, Ok(Admit::Open(flow)))
    }
}
