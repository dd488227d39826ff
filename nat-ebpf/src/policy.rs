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
    conntrack::{self, State},
};

use crate::{
    CONFIG, CONNTRACK, EG_DST, EG_SRC, EG_SVC, FW_SRC, FW_SVC,
    parse::{Packet, Transport},
    stats,
};

/// Idle timeout of `state`: natd's setting, or netfilter's default if natd set none.
#[inline(always)]
pub fn timeout_ns(state: State) -> u64 {
    let configured = CONFIG
        .get(0)
        .and_then(|c| c.timeouts_ns.get(state as usize).copied())
        .unwrap_or(0);
    if configured != 0 {
        configured
    } else {
        state.default_timeout_secs() * 1_000_000_000
    }
}

/// Looks `key` up and, if the flow is live, advances its state. `from_guest`: the packet
/// travels from the guest side.
#[inline(always)]
pub fn track(key: &FlowKey, proto: u8, l4: &Transport, from_guest: bool, now: u64) -> bool {
    if !tracked(proto, l4) {
        return false;
    }
    let Some(st) = CONNTRACK.get_ptr_mut(key) else {
        stats::event(Event::ConntrackMiss);
        return false;
    };
    // SAFETY: a live map value; concurrent writers on other CPUs only race on plain fields,
    // which at worst loses a state step that the next packet repeats.
    let st = unsafe { &mut *st };
    let state = State::from_u8(st.state);
    if now.wrapping_sub(st.last_seen) > timeout_ns(state) {
        stats::event(Event::ConntrackExpired);
        stats::event(Event::ConntrackMiss);
        return false;
    }
    let reply = (st.origin == ORIGIN_GUEST) != from_guest;
    // ICMP echo: requests go the flow's way, replies come back (RFC 792).
    if proto == PROTO_ICMP && (l4.service[0] == ICMP_ECHO_REPLY) != reply {
        stats::event(Event::ConntrackMiss);
        return false;
    }
    let Some((next, fins)) = conntrack::next(state, st.fins, proto, l4.tcp_flags, reply) else {
        stats::event(Event::ConntrackMiss);
        return false;
    };
    st.state = next as u8;
    st.fins = fins;
    st.last_seen = now;
    stats::event(Event::ConntrackHit);
    true
}

const PROTO_ICMP: u8 = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

/// Whether connection tracking applies: every protocol, but of ICMP only echo (errors enter
/// as RELATED to the flow they quote; other ICMP messages are judged by the rules alone).
#[inline(always)]
fn tracked(proto: u8, l4: &Transport) -> bool {
    proto != PROTO_ICMP || matches!(l4.service[0], ICMP_ECHO_REPLY | ICMP_ECHO_REQUEST)
}

/// Whether a live flow matches `key`, without touching it (for RELATED ICMP errors).
#[inline(always)]
fn is_live(key: &FlowKey, now: u64) -> bool {
    // SAFETY: read-only look at a live map value.
    match unsafe { CONNTRACK.get(key) } {
        Some(st) => now.wrapping_sub(st.last_seen) <= timeout_ns(State::from_u8(st.state)),
        None => false,
    }
}

/// Opens a flow for `key` if this packet may open one; returns its initial state.
#[inline(always)]
pub fn create(
    key: &FlowKey,
    proto: u8,
    l4: &Transport,
    from_guest: bool,
    now: u64,
) -> Option<State> {
    // Only an echo request opens an ICMP flow.
    if proto == PROTO_ICMP && l4.service[0] != ICMP_ECHO_REQUEST {
        return None;
    }
    let state = conntrack::initial(proto, l4.tcp_flags)?;
    let st = FlowState {
        last_seen: now,
        state: state as u8,
        origin: if from_guest {
            ORIGIN_GUEST
        } else {
            ORIGIN_PUBLIC
        },
        ..FlowState::default()
    };
    if CONNTRACK.insert(key, &st, 0).is_ok() {
        stats::event(Event::ConntrackCreate);
    }
    Some(state)
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
        remote_port,
        proto: pkt.proto,
        ..FlowKey::default()
    }
}

/// What policy made of a packet it lets through.
pub enum Admit {
    /// Part of a tracked flow (state advanced) or an ICMP error about one.
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
    if track(&key, pkt.proto, l4, !inbound, now) {
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
    // ICMP errors never open flows (netfilter tracks them only as RELATED).
    if l4.icmp_error.is_some() {
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
