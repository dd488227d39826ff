//! Policy: connection tracking first (ESTABLISHED, RELATED), then the ingress firewall of the
//! public IP or the egress policy of the guest network for a packet that opens a flow.
//!
//! Cost per packet is a fixed number of map lookups whatever the number of rules: two LPM
//! lookups (ingress: source, service) or three (egress: source, destination, service) whose
//! rule bitmaps must intersect (see `nat_common::RuleBits`).
use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use nat_common::{
    EG_SVC_BASE_BITS, EgSvcData, Event, FW_SRC_BASE_BITS, FW_SVC_BASE_BITS, FlowKey, FlowState,
    FwSrcData, FwSvcData, ORIGIN_GUEST, ORIGIN_PUBLIC, Reason,
    conntrack::{self, Config, Conn, Dir, State, Timeout, Verdict},
};

use crate::{
    CONFIG, CONNTRACK, EG_DST, EG_SRC, EG_SVC, FW_SRC, FW_SVC,
    parse::{Packet, Transport},
    stats,
};

/// netfilter's tracking settings as the program applies them: it keeps no TCP windows and
/// nothing of the last packet yet, so only the flags of a segment count (netfilter with
/// `nf_conntrack_tcp_no_window_check=1`).
const TRACKING: Config = Config {
    tcp_no_window_check: true,
    ..Config::NETFILTER
};

/// Idle timeout of a timer slot: natd's setting, or netfilter's default if natd set none.
#[inline(always)]
pub fn timeout_ns(t: Timeout) -> u64 {
    let configured = CONFIG
        .get(0)
        .and_then(|c| c.timeouts_ns.get(t as usize).copied())
        .unwrap_or(0);
    if configured != 0 {
        configured
    } else {
        t.default_secs() * 1_000_000_000
    }
}

/// Whether the flow `st` is still live at `now`.
#[inline(always)]
pub fn live(st: &FlowState, now: u64) -> bool {
    let timer = Timeout::from_u8(st.timer).unwrap_or(Timeout::Other);
    now.wrapping_sub(st.last_seen) <= timeout_ns(timer)
}

/// What a packet found in the connection table.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Track {
    /// Part of a live flow (ESTABLISHED), which it advanced.
    Hit,
    /// No live flow (absent, expired, over), or not a tracked message.
    Miss,
    /// A live flow that netfilter would not let this packet belong to (INVALID): the flow
    /// stays as it was and the packet may not replace it.
    Invalid,
}

/// Looks `key` up and, if the flow is live, advances its state. `from_guest`: the packet
/// travels from the guest side.
#[inline(always)]
pub fn track(key: &FlowKey, proto: u8, l4: &Transport, from_guest: bool, now: u64) -> Track {
    if !tracked(proto, l4) {
        return Track::Miss;
    }
    let Some(st) = CONNTRACK.get_ptr_mut(key) else {
        stats::event(Event::ConntrackMiss);
        return Track::Miss;
    };
    // SAFETY: a live map value; concurrent writers on other CPUs only race on plain fields,
    // which at worst loses a state step that the next packet repeats.
    let st = unsafe { &mut *st };
    if !live(st, now) {
        stats::event(Event::ConntrackExpired);
        stats::event(Event::ConntrackMiss);
        return Track::Miss;
    }
    let reply = (st.origin == ORIGIN_GUEST) != from_guest;
    // ICMP queries: requests go the flow's way, replies come back (RFC 792).
    if proto == PROTO_ICMP && conntrack::icmp_opens(l4.service[0]) == reply {
        stats::event(Event::ConntrackMiss);
        return Track::Miss;
    }
    let state = State::from_u8(st.state).unwrap_or(State::Other);
    let timer = Timeout::from_u8(st.timer).unwrap_or(Timeout::Other);
    let mut c = Conn::forgotten(state, st.flags, timer);
    let pkt = conntrack::Packet::flags_only(l4.tcp_flags);
    match conntrack::packet(&mut c, proto, Dir::of(reply), &pkt, &TRACKING, timeout_ns) {
        Verdict::Accept(t) => {
            st.state = c.state;
            st.flags = c.flags;
            if let Some(t) = t {
                st.timer = t as u8;
                st.last_seen = now;
            }
        }
        Verdict::Ignore => st.flags = c.flags,
        Verdict::Close => {
            let _ = CONNTRACK.remove(key);
        }
        Verdict::New => {
            stats::event(Event::ConntrackMiss);
            return Track::Miss;
        }
        Verdict::Invalid { .. } => {
            stats::event(Event::ConntrackMiss);
            return Track::Invalid;
        }
    }
    stats::event(Event::ConntrackHit);
    Track::Hit
}

const PROTO_ICMP: u8 = 1;

/// Whether connection tracking applies: every protocol, but of ICMP only queries (errors
/// enter as RELATED to the flow they quote; other ICMP messages are judged by the rules
/// alone).
#[inline(always)]
fn tracked(proto: u8, l4: &Transport) -> bool {
    proto != PROTO_ICMP || conntrack::icmp_query(l4.service[0]).is_some()
}

/// Whether a live flow matches `key`, without touching it (for RELATED ICMP errors).
#[inline(always)]
fn is_live(key: &FlowKey, now: u64) -> bool {
    // SAFETY: read-only look at a live map value.
    match unsafe { CONNTRACK.get(key) } {
        Some(st) => live(st, now),
        None => false,
    }
}

/// Opens a flow for `key` if this packet may open one; returns what it stored.
#[inline(always)]
pub fn create(
    key: &FlowKey,
    proto: u8,
    l4: &Transport,
    from_guest: bool,
    now: u64,
) -> Option<FlowState> {
    // Only a query request opens an ICMP flow.
    if proto == PROTO_ICMP && !conntrack::icmp_opens(l4.service[0]) {
        return None;
    }
    let pkt = conntrack::Packet::flags_only(l4.tcp_flags);
    let c = conntrack::open(proto, &pkt, &TRACKING, timeout_ns)?;
    let st = FlowState {
        last_seen: now,
        state: c.state,
        origin: if from_guest {
            ORIGIN_GUEST
        } else {
            ORIGIN_PUBLIC
        },
        flags: c.flags,
        timer: c.timer,
        ..FlowState::default()
    };
    if CONNTRACK.insert(key, &st, 0).is_ok() {
        stats::event(Event::ConntrackCreate);
    }
    Some(st)
}

/// Ingress firewall of `public`: allowed if one rule matches both the source and the service.
#[inline(always)]
pub fn firewall_allows(public: u32, pkt: &Packet, l4: &Transport) -> bool {
    let public = public.to_ne_bytes();
    let src = Key::new(
        FW_SRC_BASE_BITS + 32,
        FwSrcData {
            public,
            source: pkt.saddr.to_ne_bytes(),
        },
    );
    let Some(a) = FW_SRC.get(&src) else {
        return false;
    };
    let svc = Key::new(
        FW_SVC_BASE_BITS + 16,
        FwSvcData {
            public,
            proto: pkt.proto,
            service: l4.service,
            _pad: 0,
        },
    );
    match FW_SVC.get(&svc) {
        Some(b) => a.intersects(b),
        None => false,
    }
}

/// Egress policy: the default, inverted by any exception rule that matches the guest source,
/// the destination and the service.
#[inline(always)]
fn egress_allows(pkt: &Packet, l4: &Transport) -> bool {
    let default_allow = CONFIG.get(0).is_none_or(|c| c.egress_default_deny == 0);
    let src = Key::new(32, pkt.saddr.to_ne_bytes());
    let dst = Key::new(32, pkt.daddr.to_ne_bytes());
    let svc = Key::new(
        EG_SVC_BASE_BITS + 16,
        EgSvcData {
            proto: pkt.proto,
            service: l4.service,
            _pad: 0,
        },
    );
    let matched = match (EG_SRC.get(&src), EG_DST.get(&dst), EG_SVC.get(&svc)) {
        (Some(s), Some(a), Some(b)) => s.intersects3(a, b),
        _ => false,
    };
    default_allow != matched
}

/// The flow key of this packet, in the guest's view (`guest` is the private address V).
#[inline(always)]
pub fn flow_key(pkt: &Packet, l4: &Transport, inbound: bool, guest: u32) -> FlowKey {
    let (remote, guest_port, remote_port) = if inbound {
        (pkt.saddr, l4.dport, l4.sport)
    } else {
        (pkt.daddr, l4.sport, l4.dport)
    };
    FlowKey {
        guest,
        remote,
        guest_port,
        remote_port: icmp_remote_port(pkt.proto, l4, !inbound, remote_port),
        proto: pkt.proto,
        ..FlowKey::default()
    }
}

/// The key's `remote_port` of an ICMP query: the type the guest sends in its flow
/// (`conntrack::icmp_flow_type`), so a remote's request reusing the identifier of a guest's
/// request is another flow; `port` for anything else.
#[inline(always)]
pub fn icmp_remote_port(proto: u8, l4: &Transport, from_guest: bool, port: u16) -> u16 {
    if proto != PROTO_ICMP {
        return port;
    }
    match conntrack::icmp_flow_type(l4.service[0], from_guest) {
        Some(t) => u16::from_ne_bytes([0, t]),
        None => port,
    }
}

/// What policy made of a packet it lets through.
pub enum Admit {
    /// Part of a tracked flow (state advanced), an ICMP error (RELATED or allowed), or a
    /// packet INVALID for its flow that the rules allow: opens nothing.
    Tracked,
    /// Allowed by a rule and opens this flow once the packet is known to be forwarded (so
    /// traffic to the router itself or without a route leaves no trace).
    Open(FlowKey),
}

/// Decides a translated-direction packet. `public`/`private` are the mapping's addresses.
/// Returns the drop reason if policy forbids it.
#[inline(always)]
pub fn check(
    pkt: &Packet,
    l4: &Transport,
    inbound: bool,
    public: u32,
    private: u32,
) -> Result<Admit, Reason> {
    let now = now();
    let key = flow_key(pkt, l4, inbound, private);
    let found = track(&key, pkt.proto, l4, !inbound, now);
    if found == Track::Hit {
        return Ok(Admit::Tracked);
    }
    // RELATED: an ICMP error about a tracked flow.
    if let Some(e) = &l4.icmp_error
        && let Some((guest_port, remote_port)) = e.ports
    {
        let related = FlowKey {
            guest: private,
            remote: e.remote,
            guest_port,
            remote_port,
            proto: e.proto,
            ..FlowKey::default()
        };
        if is_live(&related, now) {
            return Ok(Admit::Tracked);
        }
    }
    let allowed = if inbound {
        firewall_allows(public, pkt, l4)
    } else {
        egress_allows(pkt, l4)
    };
    if !allowed {
        return Err(if inbound {
            Reason::InboundDenied
        } else {
            Reason::OutboundDenied
        });
    }
    // ICMP errors never open flows (netfilter tracks them only as RELATED), and a packet
    // INVALID for its flow neither joins nor replaces it.
    if l4.icmp_error.is_some() || found == Track::Invalid {
        return Ok(Admit::Tracked);
    }
    Ok(Admit::Open(key))
}

/// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC, the clock natd's collector compares with.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}
