//! The full path of a packet without a flow: classify by ingress role and mappings, judge it
//! (the public IP's ingress firewall, or the egress policy for what the route sends out of a
//! public interface), route it, open its flow and translate it.
//!
//! Classification: on a public interface a packet to a mapped public IP is inbound (DNAT); one
//! to a mapped private address is dropped (a guest is reached only through its public IP). On
//! a guest interface a packet to a mapped public IP is hairpin (DNAT, and SNAT to the router's
//! address on the egress guest interface); one from a mapped private address is outbound
//! (SNAT). Everything else is passed untouched. A denied packet is dropped before anything
//! could answer it (TTL, route), so a scan learns nothing.
use aya_ebpf::{bindings::xdp_action::XDP_DROP, programs::XdpContext};
use nat_common::{
    COUNT_IN, COUNT_OUT, FlowTuple, HAIRPIN_PORT_TRIES, NatValue, ROLE_GUEST, ROLE_PUBLIC, Reason,
    conntrack,
    flow::{hairpin_port, reply_of, rewrite},
    proto,
};

use crate::{
    IFACES, NAT_IN, NAT_OUT,
    flows::{self, Kind, NewFlow},
    forward::{self, Query, Route},
    parse::{self, Packet, Transport},
    policy, rewrite, stats,
};

type Verdict = Result<(u32, Reason), Reason>;

#[inline(always)]
fn mapping(map: &aya_ebpf::maps::HashMap<u32, nat_common::NatValue>, k: u32) -> Option<NatValue> {
    // SAFETY: a shared read of a value natd only replaces whole.
    unsafe { map.get(&k) }.copied()
}

/// A BPF function of its own (at most five arguments, the result's slot counted).
/// `may_open`: the packet may open a flow (not one netfilter deems INVALID for an existing
/// flow, which is judged by the rules but leaves that flow as it is).
#[inline(never)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, l4: &Transport, may_open: bool) -> Verdict {
    let ingress = ctx.ingress_ifindex() as u32;
    let l4 = &Transport {
        opens: may_open,
        ..*l4
    };
    // SAFETY: as above.
    let role = unsafe { IFACES.get(&ingress) }
        .ok_or(Reason::UnknownIface)?
        .role;
    // `--policy kernel`: a mapped packet of no flow is the kernel's to judge.
    let kernel = flows::kernel_policy();
    if role == ROLE_PUBLIC {
        if let Some(m) = mapping(&NAT_IN, pkt.daddr) {
            if kernel {
                return Err(Reason::KernelDecides);
            }
            return inbound(ctx, pkt, l4, ingress, &m);
        }
        if mapping(&NAT_OUT, pkt.daddr).is_some() {
            if kernel {
                return Err(Reason::KernelDecides);
            }
            return Ok((XDP_DROP, Reason::DirectToPrivate));
        }
        return Err(Reason::Unmapped);
    }
    if let Some(m) = mapping(&NAT_IN, pkt.daddr) {
        if kernel {
            return Err(Reason::KernelDecides);
        }
        return hairpin(ctx, pkt, l4, ingress, &m);
    }
    let m = mapping(&NAT_OUT, pkt.saddr).ok_or(Reason::Unmapped)?;
    if kernel {
        return Err(Reason::KernelDecides);
    }
    outbound(ctx, pkt, l4, ingress, &m)
}

/// The state, status bits and timer a packet opens its flow with, if it opens one: a tracked
/// protocol netfilter would track as new, and of ICMP only a query's request (errors relate
/// to flows, other messages are judged alone).
#[inline(always)]
fn opens(pkt: &Packet, l4: &Transport) -> Option<(u8, u8, u8)> {
    if !l4.opens || (pkt.proto == proto::ICMP && !conntrack::icmp_opens(l4.service[0])) {
        return None;
    }
    let seg = conntrack::Packet::flags_only(l4.tcp_flags);
    let c = conntrack::open(pkt.proto, &seg, &flows::TRACKING, flows::timeout_ns)?;
    Some((c.state, c.flags, c.timer))
}

/// Passes what the program does not translate: TTL 1 (the kernel answers).
#[inline(always)]
fn translatable(pkt: &Packet) -> Result<(), Reason> {
    if pkt.ttl <= 1 {
        return Err(Reason::TtlExpired);
    }
    Ok(())
}

/// Opens the flow of a packet keyed `key` that becomes `to` (when it opens one) and
/// translates the packet.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn open_and_translate(
    ctx: &XdpContext,
    pkt: &Packet,
    l4: &Transport,
    key: Option<FlowTuple>,
    to: FlowTuple,
    kind: Kind,
    ingress: u32,
    route: &Route,
    m: &NatValue,
) -> Verdict {
    let scratch;
    let e = match (key, opens(pkt, l4)) {
        (Some(key), Some(conn)) => flows::create(&NewFlow {
            orig: key,
            orig_to: to,
            kind,
            conn,
            ingress,
            route,
            slot: m.slot,
        })
        .ok_or(Reason::NoRoute)?,
        // Translated without a flow (e.g. an ICMP reply a rule allows).
        _ => {
            let from = FlowTuple::new(pkt.saddr, pkt.daddr, to.sport, to.dport, pkt.proto);
            scratch = &mut flows::scratch().ok_or(Reason::NoRoute)?.entries[0];
            flows::fill(scratch, &rewrite(&from, &to), 0);
            flows::set_route(scratch, route, 0);
            &*scratch
        }
    };
    rewrite::apply(ctx, pkt, e)?;
    let (reason, counter) = match kind {
        Kind::Inbound => (Reason::InboundForwarded, COUNT_IN),
        Kind::Outbound => (Reason::OutboundForwarded, COUNT_OUT),
        Kind::Hairpin => (Reason::HairpinForwarded, COUNT_IN),
    };
    stats::forwarded(m.slot, counter, (ctx.data_end() - ctx.data()) as u64);
    Ok((forward::redirect(route.ifindex), reason))
}

/// The ports as the packet carries them (ICMP queries: identifier, type), for the rewrite.
#[inline(always)]
fn ports(pkt: &Packet, l4: &Transport) -> (u16, u16) {
    match l4.tuple(pkt) {
        Some(t) => (t.sport, t.dport),
        None => (l4.sport, l4.dport),
    }
}

/// Public -> P, P mapped to V (`m`): DNAT.
#[inline(always)]
fn inbound(ctx: &XdpContext, pkt: &Packet, l4: &Transport, ingress: u32, m: &NatValue) -> Verdict {
    let (public, private) = (pkt.daddr, m.addr);
    if m.ifindex != 0 && m.ifindex != ingress {
        stats::denied(m.slot, COUNT_IN);
        return Ok((XDP_DROP, Reason::WrongNetwork));
    }
    let quote = if l4.icmp_error {
        Some(parse::embedded(ctx, pkt, true, public)?)
    } else {
        None
    };
    let related = quote.as_ref().is_some_and(|q| relates(q, true, private));
    if !related && !policy::firewall_allows(public, pkt.saddr, pkt, l4) {
        stats::denied(m.slot, COUNT_IN);
        return Ok((XDP_DROP, Reason::InboundDenied));
    }
    translatable(pkt)?;
    if let Some(q) = quote {
        return translate_error(ctx, pkt, &q, true, public, private, m);
    }
    let q = Query {
        src: pkt.saddr,
        dst: private,
        sport: l4.sport,
        dport: l4.dport,
        want: ROLE_GUEST,
    };
    let route = forward::lookup(ctx, pkt, &q).map_err(|n| n.reason)?;
    let (sport, dport) = ports(pkt, l4);
    let to = FlowTuple::new(pkt.saddr, private, sport, dport, pkt.proto);
    open_and_translate(
        ctx,
        pkt,
        l4,
        l4.tuple(pkt),
        to,
        Kind::Inbound,
        ingress,
        &route,
        m,
    )
}

/// Guest V -> anywhere, V mapped to P (`m`): SNAT, if the route leaves through a public
/// interface (the egress policy applies only there); the router's own addresses and other
/// guest networks are passed untouched.
#[inline(always)]
fn outbound(ctx: &XdpContext, pkt: &Packet, l4: &Transport, ingress: u32, m: &NatValue) -> Verdict {
    let (private, public) = (pkt.saddr, m.addr);
    let quote = if l4.icmp_error {
        Some(parse::embedded(ctx, pkt, false, private)?)
    } else {
        None
    };
    if let Some(q) = &quote
        && relates(q, false, public)
    {
        translatable(pkt)?;
        return translate_error(ctx, pkt, q, false, private, public, m);
    }
    let q = Query {
        src: public,
        dst: pkt.daddr,
        sport: l4.sport,
        dport: l4.dport,
        want: ROLE_PUBLIC,
    };
    let route = match forward::lookup(ctx, pkt, &q) {
        Ok(r) => Ok(r),
        // Leaving for the public side, but the kernel must resolve the neighbour or fragment:
        // judged here, passed if allowed.
        Err(n)
            if n.reason == Reason::FragNeeded
                || (n.reason == Reason::NoNeighbour && forward::role(n.ifindex) == ROLE_PUBLIC) =>
        {
            Err(n.reason)
        }
        Err(n) => return Err(n.reason),
    };
    if !policy::egress_allows(pkt, l4) {
        stats::denied(m.slot, COUNT_OUT);
        return Ok((XDP_DROP, Reason::OutboundDenied));
    }
    translatable(pkt)?;
    let route = route?;
    if let Some(q) = quote {
        return translate_error(ctx, pkt, &q, false, private, public, m);
    }
    let (sport, dport) = ports(pkt, l4);
    let to = FlowTuple::new(public, pkt.daddr, sport, dport, pkt.proto);
    open_and_translate(
        ctx,
        pkt,
        l4,
        l4.tuple(pkt),
        to,
        Kind::Outbound,
        ingress,
        &route,
        m,
    )
}

/// Guest V2 -> P1, P1 mapped to V1 (`m`): to V1 from the router's address R on V1's guest
/// interface, CloudStack-style, with the ingress firewall of P1. The sender's source port is
/// kept unless another flow holds the translated 4-tuple; then the first free port of
/// [`hairpin_port`] is taken (the kernel's NAT gets the flow if none is free).
#[inline(always)]
fn hairpin(ctx: &XdpContext, pkt: &Packet, l4: &Transport, ingress: u32, m: &NatValue) -> Verdict {
    let (v2, p1, v1) = (pkt.saddr, pkt.daddr, m.addr);
    if l4.icmp_error {
        // Errors about hairpinned packets are rare; the kernel's conntrack handles them.
        return Err(Reason::IcmpErrorUnrelated);
    }
    if !policy::firewall_allows(p1, v2, pkt, l4) {
        stats::denied(m.slot, COUNT_IN);
        return Ok((XDP_DROP, Reason::InboundDenied));
    }
    translatable(pkt)?;
    let q = Query {
        src: v2,
        dst: v1,
        sport: l4.sport,
        dport: l4.dport,
        want: ROLE_GUEST,
    };
    let route = forward::lookup(ctx, pkt, &q).map_err(|n| n.reason)?;
    let r = route.addr;
    if r == 0 {
        return Err(Reason::WrongEgress);
    }
    let key = l4.tuple(pkt);
    let (sport, dport) = ports(pkt, l4);
    let mut port = sport;
    if let Some(k) = key
        && opens(pkt, l4).is_some()
    {
        port = free_port(&k, r, v1)?;
    }
    let to = FlowTuple::new(r, v1, port, dport, pkt.proto);
    open_and_translate(ctx, pkt, l4, key, to, Kind::Hairpin, ingress, &route, m)
}

/// The first source port for a hairpin flow keyed `k` (to R -> V1) whose reply key no live
/// flow holds. Protocols without ports have one try.
#[inline(always)]
fn free_port(k: &FlowTuple, r: u32, v1: u32) -> Result<u16, Reason> {
    let tries = if matches!(
        k.proto,
        proto::TCP | proto::UDP | proto::UDPLITE | proto::DCCP | proto::ICMP
    ) {
        HAIRPIN_PORT_TRIES
    } else {
        1
    };
    // Bounded for the verifier: at most HAIRPIN_PORT_TRIES lookups.
    for attempt in 0..HAIRPIN_PORT_TRIES {
        if attempt >= tries {
            break;
        }
        let port = hairpin_port(k.sport, attempt);
        let reply = reply_of(&FlowTuple::new(r, v1, port, k.dport, k.proto));
        match flows::lookup(&reply) {
            None => return Ok(port),
            Some(f) if !flows::live(&f) => {
                flows::remove_stale(&f, &reply);
                return Ok(port);
            }
            Some(_) => {}
        }
    }
    Err(Reason::HairpinCollision)
}

/// Whether an ICMP error quotes a packet of a live flow (RELATED): the flow is looked up by
/// the key the quoted packet had before its translation (inbound: the quoted P -> R left as
/// V -> R; outbound: the quoted R -> V came as R -> P); `new` is the translated address.
#[inline(always)]
fn relates(q: &parse::Embedded, inbound: bool, new: u32) -> bool {
    let Some((qs, qd)) = q.ports else {
        return false;
    };
    let key = if inbound {
        FlowTuple::new(new, q.remote, qs, qd, q.proto)
    } else {
        FlowTuple::new(q.remote, new, qs, qd, q.proto)
    };
    matches!(flows::lookup(&key), Some(f) if flows::live(&f))
}

/// Translates an ICMP error (`old` -> `new` outside and in the quote) and forwards it. Errors
/// never open flows (netfilter tracks them only as RELATED).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn translate_error(
    ctx: &XdpContext,
    pkt: &Packet,
    q: &parse::Embedded,
    inbound: bool,
    old: u32,
    new: u32,
    m: &NatValue,
) -> Verdict {
    let (src, dst, want) = if inbound {
        (pkt.saddr, new, ROLE_GUEST)
    } else {
        (new, pkt.daddr, ROLE_PUBLIC)
    };
    let query = Query {
        src,
        dst,
        sport: 0,
        dport: 0,
        want,
    };
    let route = forward::lookup(ctx, pkt, &query).map_err(|n| n.reason)?;
    rewrite::icmp_error(ctx, pkt, q, inbound, old, new, &route)?;
    let (reason, counter) = if inbound {
        (Reason::InboundForwarded, COUNT_IN)
    } else {
        (Reason::OutboundForwarded, COUNT_OUT)
    };
    stats::forwarded(m.slot, counter, (ctx.data_end() - ctx.data()) as u64);
    Ok((forward::redirect(route.ifindex), reason))
}
