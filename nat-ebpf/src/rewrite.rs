//! Packet rewrite after every check has passed: nothing here fails on a frame `parse` accepted,
//! so a frame is either fully translated or untouched.
use aya_ebpf::programs::XdpContext;
use nat_common::{Reason, csum};
use network_types::eth::EthHdr;

use crate::{
    forward::Route,
    parse::{IP_OFF, L4_OFF, Packet, Transport, load16, ptr_at, store16},
};

const IP_CSUM: usize = IP_OFF + 10;
const IP_TTL: usize = IP_OFF + 8;
const IP_SRC: usize = IP_OFF + 12;
const IP_DST: usize = IP_OFF + 16;

#[inline(always)]
fn store32(ctx: &XdpContext, offset: usize, v: u32) -> Result<(), Reason> {
    let p = ptr_at::<[u8; 4]>(ctx, offset).ok_or(Reason::Malformed)?;
    // SAFETY: in bounds per `ptr_at`.
    unsafe { *p = v.to_ne_bytes() };
    Ok(())
}

/// Replaces `old` by `new` (destination if inbound, source if outbound) with every checksum
/// that covers it (RFC 1624), and the embedded packet of an ICMP error; decrements the TTL.
#[inline(always)]
pub fn translate(
    ctx: &XdpContext,
    pkt: &Packet,
    l4: &Transport,
    inbound: bool,
    old: u32,
    new: u32,
) -> Result<(), Reason> {
    // Transport checksum over the pseudo-header (RFC 793, RFC 768).
    if let Some(at) = l4.csum_at {
        let c = load16(ctx, at)?;
        let c = if l4.udp {
            csum::replace4_udp(c, old, new)
        } else {
            csum::replace4(c, old, new)
        };
        store16(ctx, at, c)?;
    }
    // ICMP error: the quoted packet, then the ICMP checksum over every word that changed.
    if let Some(e) = &l4.icmp_error {
        let icmp_csum_at = L4_OFF + 2;
        let mut icmp = load16(ctx, icmp_csum_at)?;
        store32(ctx, e.addr_at, new)?;
        icmp = csum::replace4(icmp, old, new);

        let emb_ip_csum_at = crate::parse::EMB_IP_OFF + 10;
        let c = load16(ctx, emb_ip_csum_at)?;
        let c2 = csum::replace4(c, old, new);
        store16(ctx, emb_ip_csum_at, c2)?;
        icmp = csum::replace2(icmp, c, c2);

        if let Some(at) = e.csum_at {
            let c = load16(ctx, at)?;
            let c2 = if e.udp {
                csum::replace4_udp(c, old, new)
            } else {
                csum::replace4(c, old, new)
            };
            store16(ctx, at, c2)?;
            icmp = csum::replace2(icmp, c, c2);
        }
        store16(ctx, icmp_csum_at, icmp)?;
    }
    // IPv4 header: the address, then the TTL (RFC 1812 §5.3.1), each folded into the checksum.
    let ip = load16(ctx, IP_CSUM)?;
    store32(ctx, if inbound { IP_DST } else { IP_SRC }, new)?;
    let ip = csum::replace4(ip, old, new);
    let ip = decrement_ttl(ctx, pkt, ip)?;
    store16(ctx, IP_CSUM, ip)
}

/// Decrements the TTL; returns the IP checksum `ip` updated for it.
#[inline(always)]
fn decrement_ttl(ctx: &XdpContext, pkt: &Packet, ip: u16) -> Result<u16, Reason> {
    let ttl_word = load16(ctx, IP_TTL)?;
    let ttl_word2 = u16::from_ne_bytes([pkt.ttl - 1, pkt.proto]);
    store16(ctx, IP_TTL, ttl_word2)?;
    Ok(csum::replace2(ip, ttl_word, ttl_word2))
}

/// Hairpin: replaces both addresses (source `src.0 -> src.1`, destination `dst.0 -> dst.1`)
/// with the transport and IP checksums, and decrements the TTL. ICMP errors never get here.
#[inline(always)]
pub fn translate_both(
    ctx: &XdpContext,
    pkt: &Packet,
    l4: &Transport,
    src: (u32, u32),
    dst: (u32, u32),
) -> Result<(), Reason> {
    if let Some(at) = l4.csum_at {
        let c = load16(ctx, at)?;
        let c = if l4.udp {
            csum::replace4_udp(csum::replace4_udp(c, src.0, src.1), dst.0, dst.1)
        } else {
            csum::replace4(csum::replace4(c, src.0, src.1), dst.0, dst.1)
        };
        store16(ctx, at, c)?;
    }
    let ip = load16(ctx, IP_CSUM)?;
    store32(ctx, IP_SRC, src.1)?;
    store32(ctx, IP_DST, dst.1)?;
    let ip = csum::replace4(csum::replace4(ip, src.0, src.1), dst.0, dst.1);
    let ip = decrement_ttl(ctx, pkt, ip)?;
    store16(ctx, IP_CSUM, ip)
}

/// Writes the next hop's MAC addresses from the route lookup.
#[inline(always)]
pub fn forward_l2(ctx: &XdpContext, route: &Route) -> Result<(), Reason> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(Reason::Malformed)?;
    // SAFETY: in bounds per `ptr_at`.
    unsafe {
        (*eth).dst_addr = route.dmac;
        (*eth).src_addr = route.smac;
    }
    Ok(())
}
