//! Hairpin NAT, CloudStack-style: a guest V2 sending to a mapped public IP P1 reaches P1's
//! guest V1 with the source rewritten to the router's own address R on the egress guest
//! interface; V1's replies to R come back to V2 from P1. The ingress firewall of P1 applies.
//!
//! Two conntrack entries per flow: the forward leg {V2, P1, sport, dport} holds the state
//! (origin guest); the reverse leg {V1, R, dport, sport} binds the reply to V2:sport and is
//! refreshed with it. Source ports are kept: if the reverse binding is taken by another flow
//! the packet goes to the kernel, whose NAT picks another port.
use aya_ebpf::programs::XdpContext;
use nat_common::{
    FLOW_HAIRPIN_FWD, FLOW_HAIRPIN_REV, FlowKey, FlowState, NatEntry, ROLE_GUEST, Reason,
};

use crate::{
    CONNTRACK, NAT_OUT, forward,
    parse::{Packet, Transport},
    policy::{self, Track},
    rewrite,
};

#[inline(always)]
fn key(guest: u32, remote: u32, guest_port: u16, remote_port: u16, proto: u8, kind: u8) -> FlowKey {
    FlowKey {
        guest,
        remote,
        guest_port,
        remote_port,
        proto,
        kind,
        _pad: [0; 2],
    }
}

/// Keeps the reverse leg alive and in the forward leg's state and timer, so natd's collector
/// and the LRU treat both alike (nothing if the forward leg is gone).
#[inline(always)]
fn refresh(rev: &FlowKey, now: u64, fwd: &FlowKey) {
    // SAFETY: read-only look at a live map value.
    let Some((state, timer)) = unsafe { CONNTRACK.get(fwd) }.map(|s| (s.state, s.timer)) else {
        return;
    };
    if let Some(r) = CONNTRACK.get_ptr_mut(rev) {
        // SAFETY: a live map value; racing writers store the same facts.
        unsafe {
            (*r).last_seen = now;
            (*r).state = state;
            (*r).timer = timer;
        }
    }
}

#[inline(always)]
fn check_no_icmp_error(l4: &Transport) -> Result<(), Reason> {
    // Errors about hairpinned packets are rare; the kernel's conntrack handles them.
    if l4.icmp_error.is_some() {
        Err(Reason::IcmpErrorUnrelated)
    } else {
        Ok(())
    }
}

/// V2 -> P1, P1 mapped to V1 (`entry` is P1's `NAT_IN` value).
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    pkt: &Packet,
    entry: *mut NatEntry,
) -> Result<(u32, Reason), Reason> {
    let (v2, p1) = (pkt.saddr, pkt.daddr);
    // SAFETY: this CPU's copy of the value, valid for the program's run.
    let v1 = unsafe { (*entry).addr };
    if pkt.ttl <= 1 {
        return Err(Reason::TtlExpired);
    }
    let l4 = pkt.transport(ctx, true, p1)?;
    check_no_icmp_error(&l4)?;
    let route = forward::lookup(ctx, pkt, &l4, v2, v1, ROLE_GUEST)?;
    let r = route.addr;
    if r == 0 {
        return Err(Reason::WrongEgress);
    }
    let now = policy::now();
    let fwd = key(v2, p1, l4.sport, l4.dport, pkt.proto, FLOW_HAIRPIN_FWD);
    let rev = key(v1, r, l4.dport, l4.sport, pkt.proto, FLOW_HAIRPIN_REV);
    let found = policy::track(&fwd, pkt.proto, &l4, true, now);
    if found == Track::Hit {
        refresh(&rev, now, &fwd);
    } else {
        // SAFETY: read-only look at a live map value.
        if let Some(b) = unsafe { CONNTRACK.get(&rev) }
            && (b.peer_addr != v2 || b.peer_port != l4.sport)
            && policy::live(b, now)
        {
            return Err(Reason::HairpinCollision);
        }
        let as_seen = Packet { saddr: v2, ..*pkt };
        if !policy::firewall_allows(p1, &as_seen, &l4) {
            // SAFETY: as above; per-CPU.
            unsafe { (*entry).denied += 1 };
            return Ok((
                aya_ebpf::bindings::xdp_action::XDP_DROP,
                Reason::InboundDenied,
            ));
        }
        // A packet INVALID for its flow neither joins nor replaces it.
        if found == Track::Miss
            && let Some(st) = policy::create(&fwd, pkt.proto, &l4, true, now)
        {
            let binding = FlowState {
                last_seen: now,
                state: st.state,
                origin: nat_common::ORIGIN_GUEST,
                timer: st.timer,
                peer_addr: v2,
                peer_port: l4.sport,
                ..FlowState::default()
            };
            let _ = CONNTRACK.insert(&rev, &binding, 0);
        }
    }
    rewrite::translate_both(ctx, pkt, &l4, (v2, r), (p1, v1))?;
    rewrite::forward_l2(ctx, &route)?;
    // SAFETY: as above; per-CPU.
    unsafe {
        (*entry).packets += 1;
        (*entry).bytes += (ctx.data_end() - ctx.data()) as u64;
    }
    Ok((forward::redirect(route.ifindex), Reason::HairpinForwarded))
}

/// V1 -> R: the reply leg of a hairpin flow, if one is bound; `None` if this packet is not one.
#[inline(always)]
pub fn reply(ctx: &XdpContext, pkt: &Packet) -> Result<Option<(u32, Reason)>, Reason> {
    let (v1, r) = (pkt.saddr, pkt.daddr);
    let l4 = pkt.transport(ctx, false, v1)?;
    let rev = key(v1, r, l4.sport, l4.dport, pkt.proto, FLOW_HAIRPIN_REV);
    // SAFETY: read-only look at a live map value.
    let Some(b) = (unsafe { CONNTRACK.get(&rev) }) else {
        return Ok(None);
    };
    let (v2, v2_port) = (b.peer_addr, b.peer_port);
    check_no_icmp_error(&l4)?;
    if pkt.ttl <= 1 {
        return Err(Reason::TtlExpired);
    }
    let entry = NAT_OUT.get_ptr_mut(&v1).ok_or(Reason::Unmapped)?;
    // SAFETY: this CPU's copy of the value.
    let p1 = unsafe { (*entry).addr };
    let now = policy::now();
    let fwd = key(v2, p1, v2_port, l4.sport, pkt.proto, FLOW_HAIRPIN_FWD);
    if policy::track(&fwd, pkt.proto, &l4, false, now) != Track::Hit {
        // The flow is gone: the binding is stale; let the kernel decide.
        return Err(Reason::Unmapped);
    }
    refresh(&rev, now, &fwd);
    let route = forward::lookup(ctx, pkt, &l4, p1, v2, ROLE_GUEST)?;
    rewrite::translate_both(ctx, pkt, &l4, (v1, p1), (r, v2))?;
    rewrite::forward_l2(ctx, &route)?;
    // SAFETY: as above; per-CPU.
    unsafe {
        (*entry).packets += 1;
        (*entry).bytes += (ctx.data_end() - ctx.data()) as u64;
    }
    Ok(Some((
        forward::redirect(route.ifindex),
        Reason::HairpinForwarded,
    )))
}
