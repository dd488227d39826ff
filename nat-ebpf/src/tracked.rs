//! The full path of a packet that belongs to a tracked flow: its state advances (netfilter's
//! state machine on the original entry), a flow that became assured moves to `FLOWS`, and the
//! direction's route is resolved when it never was or the route generation moved.
use aya_ebpf::programs::XdpContext;
use nat_common::{
    Event, ROLE_GUEST, ROLE_PUBLIC, Reason,
    conntrack::{self, Dir, Verdict},
};

use crate::{
    flows::{self, Found},
    forward::{self, Query},
    parse::{self, Packet, TCP_FIN, TCP_RST, TCP_SYN, Transport},
    rewrite, stats,
};

/// What became of a packet of a tracked flow.
pub enum Tracked {
    /// Forwarded (or dropped) as part of its flow.
    Done(u32, Reason),
    /// It belongs to no live flow after all (the entry was stale, the flow expired, or the
    /// packet starts a new connection on a closed one): judged as new; the flow's entries are
    /// gone.
    New,
    /// netfilter's INVALID: not part of the flow, which stays as it was; the rules judge the
    /// packet, which may not open or replace a flow.
    Invalid,
}

/// A BPF function of its own (at most five arguments, the result's slot counted): the key
/// and ingress are taken again from the packet and the context.
#[inline(never)]
pub fn forward(
    ctx: &XdpContext,
    pkt: &Packet,
    l4: &Transport,
    found: &Found,
) -> Result<Tracked, Reason> {
    let ingress = ctx.ingress_ifindex() as u32;
    let Some(key) = l4.tuple(pkt) else {
        return Ok(Tracked::New);
    };
    let tuple = &key;
    // SAFETY: a live map value; see `fast::forward` on races.
    let (in_ifindex, is_orig, peer) = unsafe {
        let e = &*found.entry;
        (e.in_ifindex, e.is_orig(), e.peer)
    };
    // The packet must arrive on the entry's side of the router (a reply may come back on
    // another interface of that side). From the other side it is not this flow's: judged by
    // the rules, it may not replace the flow.
    if in_ifindex != ingress && forward::role(in_ifindex) != forward::role(ingress) {
        return Ok(Tracked::Invalid);
    }
    let (orig_key, reply_key) = if is_orig {
        (*tuple, peer)
    } else {
        (peer, *tuple)
    };
    let (Some(orig), Some(reply)) = (
        flows::lookup_in(found.pending, &orig_key),
        flows::lookup_in(found.pending, &reply_key),
    ) else {
        // Half a flow (the LRU evicted its other entry): gone.
        flows::remove_flow(found.pending, &orig_key, &reply_key);
        stats::event(Event::ConntrackMiss);
        return Ok(Tracked::New);
    };
    // SAFETY: a live map value; see `fast::forward` on races.
    let o = unsafe { &mut *orig };
    // SAFETY: as above (read only: its last-seen time).
    let r = unsafe { &*reply };
    let now = flows::now_ns();
    if flows::kernel_policy() {
        // The kernel tracks every flow; its tc learner moves ours. The program only resolves
        // the route of an assured flow's packet that cannot change its state (the learner
        // left its route unresolved), and hands everything else to the kernel.
        // SAFETY: as above.
        let cur = unsafe { &*found.entry };
        let stable = cur.flags & nat_common::ENTRY_FAST != 0
            && !(pkt.proto == nat_common::proto::TCP
                && l4.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0);
        if !stable || pkt.ttl <= 1 {
            return Err(Reason::KernelDecides);
        }
        return resolve_and_forward(ctx, pkt, tuple, ingress, false, &orig_key, &reply_key);
    }
    if flows::expired(o, r, now) {
        flows::remove_flow(found.pending, &orig_key, &reply_key);
        stats::event(Event::ConntrackExpired);
        stats::event(Event::ConntrackMiss);
        return Ok(Tracked::New);
    }
    // An RST or FIN outside the window the flow has shown is not part of it (a blind,
    // spoofed one): INVALID, the flow stays as it was.
    if pkt.proto == nat_common::proto::TCP
        && l4.tcp_flags & (TCP_FIN | TCP_RST) != 0
        && l4.tcp_flags & TCP_SYN == 0
        && let Some(s) = parse::segment(ctx, pkt)
    {
        let (sender, receiver) = if is_orig { (&*o, r) } else { (r, &*o) };
        if !nat_common::in_window(sender, receiver, &s) {
            stats::event(Event::ConntrackMiss);
            return Ok(Tracked::Invalid);
        }
    }
    let mut c = flows::conn(o);
    let seg = conntrack::Packet::flags_only(l4.tcp_flags);
    let verdict = conntrack::packet(
        &mut c,
        pkt.proto,
        Dir::of(!is_orig),
        &seg,
        &flows::TRACKING,
        flows::timeout_ns,
    );
    match verdict {
        Verdict::New => {
            flows::remove_flow(found.pending, &orig_key, &reply_key);
            stats::event(Event::ConntrackMiss);
            return Ok(Tracked::New);
        }
        Verdict::Invalid { .. } => {
            stats::event(Event::ConntrackMiss);
            return Ok(Tracked::Invalid);
        }
        Verdict::Accept(timer) => {
            if let Some(t) = timer {
                o.timer = t as u8;
                o.last_seen = now;
            }
        }
        Verdict::Ignore | Verdict::Close => {}
    }
    (o.state, o.ct_flags) = (c.state, c.flags);
    stats::event(Event::ConntrackHit);
    flows::settle(found.pending, orig, reply);
    let close = verdict == Verdict::Close;

    if pkt.ttl <= 1 {
        return Err(Reason::TtlExpired);
    }
    resolve_and_forward(ctx, pkt, tuple, ingress, close, &orig_key, &reply_key)
}

/// Resolves the route of the packet's direction if it never was, the route generation moved,
/// the packet is larger than its MTU or it arrived on another interface of its side, then
/// translates and forwards it; `close`: the flow ends with this packet.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn resolve_and_forward(
    ctx: &XdpContext,
    pkt: &Packet,
    tuple: &nat_common::FlowTuple,
    ingress: u32,
    close: bool,
    orig_key: &nat_common::FlowTuple,
    reply_key: &nat_common::FlowTuple,
) -> Result<Tracked, Reason> {
    // The entry again: `settle` may have moved the flow to `FLOWS`.
    let live = flows::lookup(tuple).ok_or(Reason::NoRoute)?;
    // SAFETY: as above.
    let cur = unsafe { &mut *live.entry };
    let generation = flows::route_gen();
    if cur.route_gen != generation || pkt.tot_len > cur.mtu || cur.in_ifindex != ingress {
        let want = if cur.reason == Reason::OutboundForwarded as u8 {
            ROLE_PUBLIC
        } else {
            ROLE_GUEST
        };
        let q = Query {
            src: cur.saddr,
            dst: cur.daddr,
            sport: cur.sport,
            dport: cur.dport,
            want,
        };
        let route = match forward::lookup(ctx, pkt, &q) {
            Ok(r) => r,
            Err(n) => {
                if close {
                    flows::remove_flow(live.pending, orig_key, reply_key);
                }
                return Err(n.reason);
            }
        };
        flows::set_route(cur, &route, generation);
        cur.in_ifindex = ingress;
        stats::event(Event::RouteResolved);
    }
    if pkt.proto == nat_common::proto::TCP
        && let Some(seg) = parse::segment(ctx, pkt)
    {
        nat_common::note_segment(cur, &seg);
    }
    rewrite::apply(ctx, pkt, cur)?;
    stats::forwarded(cur.slot, cur.counter, (ctx.data_end() - ctx.data()) as u64);
    let done = Tracked::Done(
        forward::redirect(cur.out_ifindex),
        Reason::from_index(cur.reason as u32),
    );
    if close {
        // The flow ends with this packet (an RST that was its only answer).
        flows::remove_flow(live.pending, orig_key, reply_key);
    }
    Ok(done)
}
