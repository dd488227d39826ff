//! The established path: a packet whose flow entry holds a resolved route it may use as it
//! is. One hash lookup (done by the caller), the rewrite, two per-CPU counters and the
//! redirect; a TCP segment is noted in the entry (for the window check of RST and FIN); the direction's last-seen time is refreshed at most once a second.
use aya_ebpf::programs::XdpContext;
use nat_common::{ENTRY_FAST, Event, FlowEntry, Reason, proto};

use crate::{
    flows::{self, Found},
    forward,
    parse::{self, Packet, TCP_FIN, TCP_RST, TCP_SYN, Transport},
    rewrite, stats,
};

/// Forwards the packet by its entry, or `None` when it needs the full path: another ingress,
/// a packet that may change the flow's state (TCP SYN/FIN/RST, or a state that is not
/// stable), a stale route, TTL 1, more than the route's MTU, or a flow that expired.
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    pkt: &Packet,
    l4: &Transport,
    found: &Found,
    ingress: u32,
) -> Option<(u32, Reason)> {
    // SAFETY: a live map value, valid for the program's run; other CPUs only write plain
    // fields of it (last-seen times, flags), a race at worst repeats a refresh.
    let e = unsafe { &mut *found.entry };
    if e.in_ifindex != ingress || e.flags & ENTRY_FAST == 0 {
        return None;
    }
    if pkt.proto == proto::TCP && l4.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
        return None;
    }
    // natd's settings, read once for the packet.
    let cfg = flows::config();
    if e.route_gen != flows::route_gen_in(cfg) || pkt.ttl <= 1 || pkt.tot_len > e.mtu {
        return None;
    }
    let j = flows::jiffies();
    if j.wrapping_sub(e.seen) >= flows::refresh_jiffies_in(cfg) && !refresh(found, e, j) {
        return None;
    }
    rewrite::apply(ctx, pkt, e).ok()?;
    // After the rewrite (which leaves sequence numbers alone), for the verifier: noted before
    // it, the segment's values live across the rewrite and the program's own frame grows past
    // 128 bytes; 6.1's verifier rounds every frame up to 32 bytes (one without stack too) and
    // then refuses the chain nat -> newflow::forward -> memcpy (160 + 352 + 32 > 512).
    if pkt.proto == proto::TCP
        && let Some(seg) = parse::segment(ctx, pkt)
    {
        nat_common::note_segment(e, &seg);
    }
    stats::forwarded(e.slot, e.counter, (ctx.data_end() - ctx.data()) as u64);
    stats::event(Event::FastPath);
    Some((
        forward::redirect(e.out_ifindex),
        Reason::from_index(e.reason as u32),
    ))
}

/// Once a second per direction: the flow must still be live (else the full path judges the
/// packet), and the direction's last-seen time moves to now. The flow's last-seen time is
/// the later of its two entries' (see [`FlowEntry::last_seen`]), so a direction seen within
/// the flow's timeout shows the flow live by itself; only a direction idle that long reaches
/// the other entry.
#[inline(always)]
fn refresh(found: &Found, e: &mut FlowEntry, j: u64) -> bool {
    let mut now = flows::coarse_ns();
    if !flows::live_by(e, now) {
        // Idle past its timeout by the coarse clock, or seen by the full path within the
        // tick that clock lags by: judged by the precise clock.
        now = flows::now_ns();
        let Some(peer) = flows::lookup_in(found.pending, &e.peer) else {
            return false;
        };
        // SAFETY: a live map value (the other direction's entry, never `e` itself).
        let peer = unsafe { &*peer };
        let (o, r) = if e.is_orig() {
            (&*e, &*peer)
        } else {
            (&*peer, &*e)
        };
        if flows::expired(o, r, now) {
            return false;
        }
        if !e.is_orig() {
            e.timer = peer.timer;
        }
    }
    e.last_seen = now;
    e.seen = j;
    true
}
