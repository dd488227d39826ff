//! The tc egress learner: makes flows the kernel forwarded known to the fast path. A packet
//! leaving a public interface from a mapped public IP P was SNATed by the kernel (V -> P); one
//! leaving a guest interface to a mapped private address V was DNATed (P -> V). The learner
//! opens that flow in the flow table from the packet as the kernel received it (its original
//! direction) if it has none, or advances its state; its routes are resolved by the XDP
//! program on their first packets. Frames XDP redirects never pass here, nor what the router
//! itself sends. Only packets that crossed from one side to the other are read: one that
//! arrived on the side it leaves (hairpin, which the kernel also SNATs to the router's own
//! address, or guest to guest) or on an interface natd does not watch carries no translation
//! the learner could read off it, and stays the kernel's.
use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use nat_common::{
    ENTRY_LEARNED, FlowTuple, ROLE_PUBLIC,
    conntrack::{self, Dir, Verdict},
};

use crate::{
    IFACES, NAT_IN, NAT_OUT,
    flows::{self, Kind, NewFlow},
    forward::Route,
    parse::{L4_OFF, Packet},
};

#[classifier]
pub fn learn(ctx: TcContext) -> i32 {
    try_learn(&ctx);
    TC_ACT_OK as i32
}

/// Headers the learner reads must be in the linear part of the buffer.
const HEADERS: u32 = (L4_OFF + 20) as u32;

#[inline(always)]
fn try_learn(ctx: &TcContext) -> Option<()> {
    // SAFETY: reads fields of the context the program was given.
    let (ifindex, ingress) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).ingress_ifindex) };
    // Only forwarded packets: the router's own have no ingress interface.
    if ingress == 0 {
        return None;
    }
    // SAFETY: a shared read of a value natd only replaces whole.
    let role = unsafe { IFACES.get(&ifindex) }?.role;
    // SAFETY: as above.
    if unsafe { IFACES.get(&ingress) }?.role == role {
        return None;
    }
    let _ = ctx.pull_data(HEADERS);
    let pkt = Packet::parse_leaving(ctx).ok()?;
    let l4 = pkt.transport(ctx).ok()?;
    let out = l4.tuple(&pkt)?;
    // The packet as the kernel received it, and which way the flow goes from the learner's
    // view (its first packet seen here).
    let (m, key, kind) = if role == ROLE_PUBLIC {
        // SAFETY: as above.
        let m = *unsafe { NAT_IN.get(&pkt.saddr) }?;
        let key = FlowTuple::new(m.addr, out.daddr, out.sport, out.dport, out.proto);
        (m, key, Kind::Outbound)
    } else {
        // SAFETY: as above.
        let m = *unsafe { NAT_OUT.get(&pkt.daddr) }?;
        let key = FlowTuple::new(out.saddr, m.addr, out.sport, out.dport, out.proto);
        (m, key, Kind::Inbound)
    };
    if let Some(found) = flows::lookup(&key) {
        advance(&found, &key, pkt.proto, l4.tcp_flags);
        return Some(());
    }
    if pkt.proto == nat_common::proto::ICMP && !conntrack::icmp_opens(l4.service[0]) {
        return None;
    }
    let seg = conntrack::Packet::flags_only(l4.tcp_flags);
    let c = conntrack::open(pkt.proto, &seg, &flows::TRACKING, flows::timeout_ns)?;
    // Resolved by the XDP program on the first packet (generation 0 is never current).
    let route = Route {
        addr: 0,
        ifindex,
        smac: [0; 6],
        dmac: [0; 6],
        mtu: 0,
    };
    let f = NewFlow {
        orig: key,
        orig_to: out,
        kind,
        conn: (c.state, c.flags, c.timer),
        ingress,
        route: &route,
        slot: m.slot,
    };
    let o = flows::create(&f)?;
    let _ = o;
    mark_learned(&key);
    Some(())
}

/// Advances the state of the flow the kernel forwarded a packet of.
#[inline(always)]
fn advance(found: &flows::Found, key: &FlowTuple, proto: u8, tcp_flags: u8) {
    // SAFETY: a live map value.
    let (is_orig, peer) = unsafe { ((*found.entry).is_orig(), (*found.entry).peer) };
    let (orig_key, reply_key) = if is_orig { (*key, peer) } else { (peer, *key) };
    let (Some(orig), Some(reply)) = (
        flows::lookup_in(found.pending, &orig_key),
        flows::lookup_in(found.pending, &reply_key),
    ) else {
        return;
    };
    // SAFETY: as above.
    let o = unsafe { &mut *orig };
    let mut c = flows::conn(o);
    let seg = conntrack::Packet::flags_only(tcp_flags);
    let v = conntrack::packet(
        &mut c,
        proto,
        Dir::of(!is_orig),
        &seg,
        &flows::TRACKING,
        flows::timeout_ns,
    );
    match v {
        Verdict::Accept(timer) => {
            if let Some(t) = timer {
                o.timer = t as u8;
                o.last_seen = flows::now_ns();
            }
        }
        Verdict::Ignore => {}
        // The kernel forwarded it; the next packet through XDP finds out the rest.
        Verdict::Close | Verdict::New | Verdict::Invalid { .. } => return,
    }
    (o.state, o.ct_flags) = (c.state, c.flags);
    flows::settle(found.pending, orig, reply);
}

/// Marks the entries of a flow the learner opened, and leaves its routes unresolved.
#[inline(always)]
fn mark_learned(key: &FlowTuple) {
    if let Some(found) = flows::lookup(key) {
        // SAFETY: a live map value.
        unsafe {
            (*found.entry).flags |= ENTRY_LEARNED;
            (*found.entry).route_gen = 0;
        }
    }
}
