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
        IP_TTL, L4_OFF, Packet, QuotedCsum, get16, get32, load16, ptr_at, put16, put32, store16,
        store32,
    },
};

/// Applies a flow entry's rewrite: addresses, ports (TCP, UDP, UDP-Lite, DCCP: offsets 0 and
/// 2) or identifier (ICMP), the checksums by their precomputed deltas, the TTL and the MACs.
///
/// The headers are bounds-checked once, for as many bytes as the arm writes (which `parse`
/// already proved the frame holds), and written through that one pointer: checked access by
/// access, the compiler reloads the frame's bounds from the context after every store.
#[inline(always)]
pub fn apply(ctx: &XdpContext, pkt: &Packet, e: &FlowEntry) -> Result<(), Reason> {
    // By the entry's checksum position, not the protocol (which the verifier would explore
    // one path per protocol for): the protocols with ports have their checksum at TCP's or
    // UDP's offset; only an ICMP query whose identifier the rewrite changes has one to write
    // (other messages carry other data there). One arm per checksum position: the verifier
    // only proves packet accesses at constant offsets here (a variable offset loses its
    // bounds when the compiler spills it).
    match e.l4_csum {
        TCP_CSUM_AT => ported::<{ L4_OFF + TCP_CSUM_AT as usize + 2 }>(ctx, pkt, e)?,
        UDP_CSUM_AT => ported::<{ L4_OFF + UDP_CSUM_AT as usize + 2 }>(ctx, pkt, e)?,
        ICMP_ID_CSUM_AT => {
            let h = headers::<{ L4_OFF + ICMP_ID_AT + 2 }>(ctx)?;
            // SAFETY (this arm and the next): offsets below the length `headers` checked.
            unsafe {
                put16(h.add(L4_OFF + ICMP_ID_AT), e.sport);
                l4_csum(h.add(L4_OFF + ICMP_CSUM_AT), e);
                ip_l2(h, pkt, e);
            }
        }
        _ => {
            let h = headers::<L4_OFF>(ctx)?;
            unsafe { ip_l2(h, pkt, e) };
        }
    }
    Ok(())
}

/// The rewrite of a protocol with ports (TCP, UDP, UDP-Lite, DCCP) whose transport checksum
/// ends at byte `END` of the frame.
#[inline(always)]
fn ported<const END: usize>(ctx: &XdpContext, pkt: &Packet, e: &FlowEntry) -> Result<(), Reason> {
    let h = headers::<END>(ctx)?;
    // SAFETY: the ports and the checksum (the two bytes before `END`) lie in the headers
    // `headers` checked.
    unsafe {
        ports(h, e);
        l4_csum(h.add(END - 2), e);
        ip_l2(h, pkt, e);
    }
    Ok(())
}

/// The frame's first `N` bytes, bounds-checked.
#[inline(always)]
fn headers<const N: usize>(ctx: &XdpContext) -> Result<*mut u8, Reason> {
    ptr_at::<[u8; N]>(ctx, 0)
        .map(|p| p as *mut u8)
        .ok_or(Reason::Malformed)
}

/// Writes the entry's ports (offsets 0 and 2 of TCP, UDP, UDP-Lite and DCCP).
///
/// # Safety
/// `h` must hold the headers up to the ports' end.
#[inline(always)]
unsafe fn ports(h: *mut u8, e: &FlowEntry) {
    // SAFETY: per the caller.
    unsafe {
        put16(h.add(L4_OFF), e.sport);
        put16(h.add(L4_OFF + 2), e.dport);
    }
}

/// Applies the entry's transport checksum delta to the checksum at `c`.
///
/// # Safety
/// `c` must be in the frame for 2 bytes.
#[inline(always)]
unsafe fn l4_csum(c: *mut u8, e: &FlowEntry) {
    // SAFETY: per the caller.
    let old = unsafe { get16(c) };
    let new = if e.flags & ENTRY_UDP != 0 {
        csum::apply_udp(old, e.l4_delta)
    } else {
        csum::apply(old, e.l4_delta)
    };
    // SAFETY: as above.
    unsafe { put16(c, new) }
}

/// The IPv4 header's part of the rewrite (addresses, TTL, checksum) and the MACs.
///
/// # Safety
/// `h` must hold the Ethernet and IPv4 headers.
#[inline(always)]
unsafe fn ip_l2(h: *mut u8, pkt: &Packet, e: &FlowEntry) {
    // SAFETY: per the caller, every offset is inside the two headers.
    unsafe {
        put32(h.add(IP_SRC), e.saddr);
        put32(h.add(IP_DST), e.daddr);
        put16(h.add(IP_TTL), u16::from_ne_bytes([pkt.ttl - 1, pkt.proto]));
        put16(
            h.add(IP_CSUM),
            csum::apply(get16(h.add(IP_CSUM)), e.ip_delta),
        );
        macs(h, &e.smac, &e.dmac);
    }
}

/// Writes the next hop's MAC addresses into the Ethernet header at `h`.
///
/// # Safety
/// `h` must hold the Ethernet header.
#[inline(always)]
unsafe fn macs(h: *mut u8, smac: &[u8; 6], dmac: &[u8; 6]) {
    let (d, s) = (dmac.as_ptr(), smac.as_ptr());
    // SAFETY: per the caller; the MACs are read as the 16-bit words they are made of (map
    // values and routes are at least 2-aligned, their MAC fields at even offsets).
    unsafe {
        put16(h, get16(d));
        put32(h.add(2), get32(d.add(2)));
        put16(h.add(6), get16(s));
        put32(h.add(8), get32(s.add(2)));
    }
}

/// Writes the next hop's MAC addresses.
#[inline(always)]
pub fn l2(ctx: &XdpContext, smac: &[u8; 6], dmac: &[u8; 6]) -> Result<(), Reason> {
    let h = headers::<{ EthHdr::LEN }>(ctx)?;
    // SAFETY: `headers` checked the Ethernet header.
    unsafe { macs(h, smac, dmac) };
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
