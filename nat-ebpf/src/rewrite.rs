//! Packet rewrite after every check has passed: nothing here fails on a frame `parse` accepted,
//! so a frame is either fully translated or untouched.
use aya_ebpf::programs::XdpContext;
use nat_common::{
    ENTRY_UDP, FlowEntry, Reason, csum,
    flow::{ICMP_ID_CSUM_AT, TCP_CSUM_AT, UDP_CSUM_AT},
};
use network_types::eth::EthHdr;

use crate::{
    forward::Route,
    parse::{
        EMB_IP_OFF, EMB_L4_OFF, Embedded, ICMP_CSUM_AT, ICMP_ID_AT, IP_CSUM, IP_DST, IP_SRC,
        IP_TTL, L4_OFF, Packet, QuotedCsum, load16, ptr_at, store16, store32,
    },
};

/// Applies a flow entry's rewrite: addresses, ports (TCP, UDP, UDP-Lite, DCCP: offsets 0 and
/// 2) or identifier (ICMP), the checksums by their precomputed deltas, the TTL and the MACs.
#[inline(always)]
pub fn apply(ctx: &XdpContext, pkt: &Packet, e: &FlowEntry) -> Result<(), Reason> {
    // By the entry's checksum position, not the protocol (which the verifier would explore
    // one path per protocol for): the protocols with ports have their checksum at TCP's or
    // UDP's offset; only an ICMP query whose identifier the rewrite changes has one to write
    // (other messages carry other data there). One arm per checksum position: the verifier
    // only proves packet accesses at constant offsets here (a variable offset loses its
    // bounds when the compiler spills it).
    match e.l4_csum {
        TCP_CSUM_AT => {
            ports(ctx, e)?;
            l4_csum::<{ L4_OFF + TCP_CSUM_AT as usize }>(ctx, e)?
        }
        UDP_CSUM_AT => {
            ports(ctx, e)?;
            l4_csum::<{ L4_OFF + UDP_CSUM_AT as usize }>(ctx, e)?
        }
        ICMP_ID_CSUM_AT => {
            store16(ctx, L4_OFF + ICMP_ID_AT, e.sport)?;
            l4_csum::<{ L4_OFF + ICMP_CSUM_AT }>(ctx, e)?
        }
        _ => {}
    }
    store32(ctx, IP_SRC, e.saddr)?;
    store32(ctx, IP_DST, e.daddr)?;
    let ttl_word = u16::from_ne_bytes([pkt.ttl - 1, pkt.proto]);
    store16(ctx, IP_TTL, ttl_word)?;
    let ip = load16(ctx, IP_CSUM)?;
    store16(ctx, IP_CSUM, csum::apply(ip, e.ip_delta))?;
    l2(ctx, &e.smac, &e.dmac)
}

/// Writes the entry's ports (offsets 0 and 2 of TCP, UDP, UDP-Lite and DCCP).
#[inline(always)]
fn ports(ctx: &XdpContext, e: &FlowEntry) -> Result<(), Reason> {
    store16(ctx, L4_OFF, e.sport)?;
    store16(ctx, L4_OFF + 2, e.dport)
}

/// Applies the entry's transport checksum delta to the checksum at `AT`.
#[inline(always)]
fn l4_csum<const AT: usize>(ctx: &XdpContext, e: &FlowEntry) -> Result<(), Reason> {
    let c = load16(ctx, AT)?;
    let c = if e.flags & ENTRY_UDP != 0 {
        csum::apply_udp(c, e.l4_delta)
    } else {
        csum::apply(c, e.l4_delta)
    };
    store16(ctx, AT, c)
}

/// Writes the next hop's MAC addresses.
#[inline(always)]
pub fn l2(ctx: &XdpContext, smac: &[u8; 6], dmac: &[u8; 6]) -> Result<(), Reason> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(Reason::Malformed)?;
    // SAFETY: in bounds per `ptr_at`.
    unsafe {
        (*eth).dst_addr = *dmac;
        (*eth).src_addr = *smac;
    }
    Ok(())
}

/// An ICMP error about a translated flow: replaces `old` by `new` in the outer header
/// (destination if inbound, source if outbound) and in the quoted packet (its source if
/// inbound, its destination if outbound, with its IP and transport checksums), the ICMP
/// checksum over every word that changed, the TTL and the MACs (RFC 5508 §4.2: NAT translates
/// the quoted packet too). Offsets are constants in each arm, for the verifier.
#[inline(always)]
pub fn icmp_error(
    ctx: &XdpContext,
    pkt: &Packet,
    q: &Embedded,
    inbound: bool,
    old: u32,
    new: u32,
    route: &Route,
) -> Result<(), Reason> {
    let icmp_csum_at = L4_OFF + ICMP_CSUM_AT;
    let mut icmp = load16(ctx, icmp_csum_at)?;
    if inbound {
        store32(ctx, EMB_IP_OFF + 12, new)?;
    } else {
        store32(ctx, EMB_IP_OFF + 16, new)?;
    }
    icmp = csum::replace4(icmp, old, new);

    let emb_ip_csum_at = EMB_IP_OFF + 10;
    let c = load16(ctx, emb_ip_csum_at)?;
    let c2 = csum::replace4(c, old, new);
    store16(ctx, emb_ip_csum_at, c2)?;
    icmp = csum::replace2(icmp, c, c2);

    match q.quoted_csum {
        QuotedCsum::Tcp => icmp = quoted::<{ EMB_L4_OFF + 16 }>(ctx, icmp, old, new, false)?,
        QuotedCsum::Udp => icmp = quoted::<{ EMB_L4_OFF + 6 }>(ctx, icmp, old, new, true)?,
        QuotedCsum::Dccp => icmp = quoted::<{ EMB_L4_OFF + 6 }>(ctx, icmp, old, new, false)?,
        QuotedCsum::None => {}
    }
    store16(ctx, icmp_csum_at, icmp)?;

    let ip = load16(ctx, IP_CSUM)?;
    store32(ctx, if inbound { IP_DST } else { IP_SRC }, new)?;
    let ip = csum::replace4(ip, old, new);
    let ttl_word = load16(ctx, IP_TTL)?;
    let ttl_word2 = u16::from_ne_bytes([pkt.ttl - 1, pkt.proto]);
    store16(ctx, IP_TTL, ttl_word2)?;
    store16(ctx, IP_CSUM, csum::replace2(ip, ttl_word, ttl_word2))?;
    l2(ctx, &route.smac, &route.dmac)
}

/// Updates the quoted transport checksum at `AT` for `old` -> `new`; returns the ICMP
/// checksum updated for that change.
#[inline(always)]
fn quoted<const AT: usize>(
    ctx: &XdpContext,
    icmp: u16,
    old: u32,
    new: u32,
    udp: bool,
) -> Result<u16, Reason> {
    let c = load16(ctx, AT)?;
    let c2 = if udp {
        csum::replace4_udp(c, old, new)
    } else {
        csum::replace4(c, old, new)
    };
    store16(ctx, AT, c2)?;
    Ok(csum::replace2(icmp, c, c2))
}
