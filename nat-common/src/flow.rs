//! Flows: connection tracking and the per-flow cache in one table ([`crate::maps::FLOWS`],
//! [`crate::maps::PENDING`]), the way netfilter's conntrack hashes both tuples of a
//! connection and nf_flowtable caches the route of each.
//!
//! Each flow is two entries, one per direction, each keyed by the packet as it arrives
//! ([`FlowTuple`]: the wire 5-tuple) and holding everything its direction's rewrite needs: the
//! translated addresses and ports, the checksum deltas precomputed, the egress interface and
//! MACs, the route generation they were resolved under and the mapping's counter slot. The
//! *original* direction's entry ([`ENTRY_ORIG`], the direction of the flow's first packet)
//! holds the flow's state (netfilter's states and timeouts); each entry holds its direction's
//! last-seen time, refreshed at most once per second, and the reply entry finds the original
//! through [`FlowEntry::peer`] when its own time does not show the flow live. Both
//! carry the flow's identity in the guest's view ([`FlowKey`]) for listing and flushing.
//!
//! An established packet costs one lookup: an entry whose ingress, route generation and
//! [`ENTRY_FAST`] flag hold is applied as it is. Anything else (TCP SYN/FIN/RST, a state that
//! a packet may change, a stale route) takes the program's full path, which advances the
//! state, resolves the route and updates both entries.
use crate::csum;

/// Key of [`crate::maps::FLOWS`] and [`crate::maps::PENDING`]: a packet as it arrives.
/// TCP/UDP: the ports (network order). ICMP queries (echo, timestamp, information, address
/// mask): `sport` is the identifier and `dport` the message type as a network-order 16-bit
/// value (so a request and a reply with the same identifier are different keys). Other
/// protocols: zero ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowTuple {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Padding, always zero (part of the key). Two fields rather than `[u8; 3]`, which the
    /// eBPF compiler zeroes with a call to `memset` on every packet.
    pub _pad: u8,
    pub _pad2: u16,
}
const _: () = assert!(core::mem::size_of::<FlowTuple>() == 16);

impl FlowTuple {
    pub const fn new(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> Self {
        FlowTuple {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            _pad: 0,
            _pad2: 0,
        }
    }
}

/// Flow kinds ([`FlowKey::kind`]).
pub const FLOW_NAT: u8 = 0;
/// A hairpin flow: a guest reaching another guest through its public IP.
pub const FLOW_HAIRPIN: u8 = 1;

/// A flow's identity in the guest's view: `guest` is the private address V of the mapping
/// (after DNAT, before SNAT), `remote` the other end as the guest sees it; ports as the guest
/// sees them (network order; for ICMP queries the identifier twice, for other protocols 0).
/// For a hairpin flow `guest`/`guest_port` are the sender V2 and its port and `remote` /
/// `remote_port` the public IP P1 and port it reached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub guest: u32,
    pub remote: u32,
    pub guest_port: u16,
    pub remote_port: u16,
    pub proto: u8,
    /// [`FLOW_NAT`] or [`FLOW_HAIRPIN`].
    pub kind: u8,
    /// [`ORIGIN_PUBLIC`] or [`ORIGIN_GUEST`]: who opened the flow.
    pub origin: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

/// Who opened a flow.
pub const ORIGIN_PUBLIC: u8 = 1;
pub const ORIGIN_GUEST: u8 = 2;

/// [`FlowEntry::flags`]: the flow's original direction; holds the state.
pub const ENTRY_ORIG: u8 = 1;
/// A packet without SYN, FIN or RST cannot change the flow's state: it may take the entry as
/// it is (ESTABLISHED TCP, replied UDP, tracked ICMP queries, other protocols, and the
/// original direction of unreplied UDP).
pub const ENTRY_FAST: u8 = 2;
/// The rewrite follows RFC 768: a UDP checksum of 0 stays 0, a computed 0 is sent as 0xFFFF.
pub const ENTRY_UDP: u8 = 4;
/// The entry lives in [`crate::maps::PENDING`] (the flow is not assured yet).
pub const ENTRY_PENDING: u8 = 8;
/// Written by the tc learner from a packet the kernel translated.
pub const ENTRY_LEARNED: u8 = 16;
/// TCP: [`FlowEntry::seq_end`] holds what this direction sent.
pub const ENTRY_SEQ: u8 = 32;
/// TCP: [`FlowEntry::max_ack`] holds what this direction acknowledged.
pub const ENTRY_ACKED: u8 = 64;

/// [`FlowEntry::counter`]: which half of the mapping's [`crate::MappingStats`] counts the
/// direction.
pub const COUNT_IN: u8 = 0;
pub const COUNT_OUT: u8 = 1;

/// Value of [`crate::maps::FLOWS`] and [`crate::maps::PENDING`]: one direction of a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// The source address the packet leaves with (network order).
    pub saddr: u32,
    /// The destination address the packet leaves with.
    pub daddr: u32,
    /// TCP/UDP: the ports the packet leaves with (written back for TCP and UDP only).
    pub sport: u16,
    pub dport: u16,
    /// One's complement sum ([`csum::apply`]) of the IPv4 header words that change: the
    /// addresses and the TTL decrement.
    pub ip_delta: u16,
    /// Of the transport checksum's words that change: pseudo-header addresses and ports.
    pub l4_delta: u16,
    /// The interface packets of this direction arrive on.
    pub in_ifindex: u32,
    /// Where they leave: interface and next hop (from `bpf_fib_lookup`).
    pub out_ifindex: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// Largest IPv4 total length the egress route takes; longer packets go to the kernel.
    pub mtu: u16,
    /// Offset of the transport checksum within the transport header (TCP 16, UDP 6), 0 if
    /// the rewrite changes no word it covers.
    pub l4_csum: u8,
    /// `ENTRY_*`.
    pub flags: u8,
    /// The route generation the route fields were resolved under; 0: not resolved yet.
    pub route_gen: u32,
    /// The mapping's slot in [`crate::maps::MAPPING_STATS`] (0: revoked mappings).
    pub slot: u32,
    /// [`crate::Reason`] counted for a forwarded packet of this direction.
    pub reason: u8,
    /// [`COUNT_IN`] or [`COUNT_OUT`].
    pub counter: u8,
    /// Original entry: the flow's [`crate::conntrack::State`].
    pub state: u8,
    /// Original entry: [`crate::conntrack::SEEN_REPLY`] | [`crate::conntrack::ASSURED`].
    pub ct_flags: u8,
    /// Original entry: the [`crate::conntrack::Timeout`] the last packet started. Reply
    /// entry: a copy of it, taken when the flow's state is settled and when the established
    /// path reached the original entry (it lets a reply direction that was seen recently show
    /// the flow live without a second lookup).
    pub timer: u8,
    pub _pad: [u8; 3],
    /// `bpf_jiffies64()` when this direction last refreshed the flow's last-seen time.
    pub seen: u64,
    /// CLOCK_MONOTONIC (ns) of the last packet of this direction that refreshed it (to a
    /// second on the established path, which refreshes it once a second; the full path writes
    /// the original entry's); 0: never. The flow's last-seen time is the later of its two
    /// entries'.
    pub last_seen: u64,
    /// TCP, with [`ENTRY_SEQ`]: the furthest end ([`Segment::end`]) of the segments this
    /// direction sent through the router, in sequence space (see [`note_segment`]).
    pub seq_end: u32,
    /// TCP, with [`ENTRY_ACKED`]: the furthest acknowledgment number this direction sent.
    pub max_ack: u32,
    /// The other direction's key.
    pub peer: FlowTuple,
    /// The flow's identity, the same in both entries.
    pub flow: FlowKey,
}
const _: () = assert!(core::mem::size_of::<FlowEntry>() == 112);

impl FlowEntry {
    #[inline(always)]
    pub const fn is_orig(&self) -> bool {
        self.flags & ENTRY_ORIG != 0
    }
}

/// What the window check of TCP RST and FIN segments looks at (see [`note_segment`] and
/// [`in_window`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub seq: u32,
    pub ack: u32,
    /// Payload length.
    pub len: u32,
    /// Byte 13 of the TCP header.
    pub flags: u8,
}

impl Segment {
    /// The sequence number after the segment: its payload, SYN and FIN each count.
    #[inline(always)]
    pub const fn end(&self) -> u32 {
        let syn = (self.flags & crate::conntrack::TCP_SYN != 0) as u32;
        let fin = (self.flags & crate::conntrack::TCP_FIN != 0) as u32;
        self.seq
            .wrapping_add(self.len)
            .wrapping_add(syn)
            .wrapping_add(fin)
    }
}

/// How far (in sequence space) a segment may start beyond what a direction was seen to send
/// and still move it, and how far an RST or FIN may lie beyond what the flow has shown: one
/// unscaled TCP window. It stands in for the receiver's advertised window, which the program
/// does not keep (its scale is in the SYN options).
pub const WINDOW_SLACK: u32 = 65_535;

/// Notes a TCP segment a direction sent, in its entry: the furthest end it reached
/// ([`FlowEntry::seq_end`]; a segment starting more than [`WINDOW_SLACK`] beyond it, such as
/// a blind guess, does not move it) and, with ACK, the furthest acknowledgment. Every segment
/// of a flow that the program forwards is noted, on the established path too (stores into the
/// entry's own cache line, which the packet has read already); the packet that opens a flow
/// is not.
#[inline(always)]
pub fn note_segment(e: &mut FlowEntry, s: &Segment) {
    use crate::conntrack::window::after;
    let end = s.end();
    if e.flags & ENTRY_SEQ == 0 {
        e.seq_end = end;
        e.flags |= ENTRY_SEQ;
    } else if after(end, e.seq_end) && !after(s.seq, e.seq_end.wrapping_add(WINDOW_SLACK)) {
        e.seq_end = end;
    }
    if s.flags & crate::conntrack::TCP_ACK != 0
        && (e.flags & ENTRY_ACKED == 0 || after(s.ack, e.max_ack))
    {
        e.max_ack = s.ack;
        e.flags |= ENTRY_ACKED;
    }
}

/// Whether an RST or FIN segment `s` from the direction `sender` falls within the window the
/// flow has shown, so that it may change the flow's state (issue 10: a blind, spoofed RST must
/// not end a connection). As netfilter's `tcp_in_window` and its RST check, with the
/// receiver's furthest acknowledgment `A` and the sender's furthest end `E`, and
/// `T = max(E, A) + WINDOW_SLACK` standing in for the receiver's window's right edge:
/// - an RST from `A` (netfilter's "invalid rst" below `td_maxack`) up to `T`;
/// - a FIN up to `T`, ending no earlier than `A - WINDOW_SLACK` (a retransmission).
///
/// Until the sender was seen sending and the receiver acknowledging (a flow's first packets,
/// a flow learned from the kernel or carried over from an older natd) the segment is not
/// checked: the state table alone judges it.
#[inline(always)]
pub fn in_window(sender: &FlowEntry, receiver: &FlowEntry, s: &Segment) -> bool {
    use crate::conntrack::window::{after, before};
    if sender.flags & ENTRY_SEQ == 0 || receiver.flags & ENTRY_ACKED == 0 {
        return true;
    }
    let acked = receiver.max_ack;
    let top = if after(sender.seq_end, acked) {
        sender.seq_end
    } else {
        acked
    };
    if after(s.seq, top.wrapping_add(WINDOW_SLACK)) {
        return false;
    }
    if s.flags & crate::conntrack::TCP_RST != 0 {
        !before(s.seq, acked)
    } else {
        !before(s.end(), acked.wrapping_sub(WINDOW_SLACK))
    }
}

/// The key the answers to a packet leaving as `t` arrive with: addresses swapped, and ports
/// swapped (TCP, UDP, other protocols) or, for an ICMP query, the same identifier with the
/// reply type.
#[inline(always)]
pub const fn reply_of(t: &FlowTuple) -> FlowTuple {
    let (sport, dport) = if t.proto == crate::proto::ICMP {
        let ty = t.dport.to_ne_bytes()[1];
        let reply = match crate::conntrack::icmp_query(ty) {
            Some((_, reply)) => reply,
            None => ty,
        };
        (t.sport, u16::from_ne_bytes([0, reply]))
    } else {
        (t.dport, t.sport)
    };
    FlowTuple::new(t.daddr, t.saddr, sport, dport, t.proto)
}

/// Attempts a hairpin flow makes at a free source port (the sender's own port first).
pub const HAIRPIN_PORT_TRIES: u32 = 8;

/// The source port (network order) a hairpin flow from `sport` tries at `attempt`
/// (0..[`HAIRPIN_PORT_TRIES`]): the sender's port first, then ports spread over
/// 1024..=65535.
#[inline(always)]
pub const fn hairpin_port(sport: u16, attempt: u32) -> u16 {
    if attempt == 0 {
        return sport;
    }
    let host = u16::from_be(sport) as u32;
    let port = 1024 + (host + attempt * 7919) % 64512;
    (port as u16).to_be()
}

/// The rewrite of one direction: the translated addresses and ports and the checksum deltas,
/// computed once when the entry is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rewrite {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub ip_delta: u16,
    pub l4_delta: u16,
    pub l4_csum: u8,
    pub udp: bool,
}

/// Offsets of the TCP and UDP checksums in their headers. UDP-Lite (RFC 3828 §3.1) and DCCP
/// (RFC 4340 §5.1) keep theirs where UDP does.
pub const TCP_CSUM_AT: u8 = 16;
pub const UDP_CSUM_AT: u8 = 6;
/// Offset of the ICMP checksum, which covers the identifier an ICMP query's rewrite may
/// change (hairpin flows that had to take another identifier).
pub const ICMP_ID_CSUM_AT: u8 = 2;

/// The rewrite that turns packets keyed `from` into `to` (addresses and, for the protocols
/// with ports, ports), decrementing the TTL. The transport checksums of TCP, UDP, UDP-Lite and
/// DCCP cover the pseudo-header's addresses and the ports (RFC 9293 §3.1, RFC 768, RFC 3828
/// §3.2, RFC 4340 §9.1). UDP-Lite takes UDP's rule for a computed zero (sent as 0xFFFF, as
/// netfilter's `udplite_manip_pkt` does; a zero UDP-Lite checksum is illegal and never
/// translated); DCCP's has no special value.
#[inline(always)]
pub const fn rewrite(from: &FlowTuple, to: &FlowTuple) -> Rewrite {
    let addrs = csum::delta4(from.saddr, to.saddr) + csum::delta4(from.daddr, to.daddr);
    let ip_delta = csum::fold(addrs + csum::TTL_DECREMENT);
    let (l4_csum, udp, ports) = match from.proto {
        crate::proto::TCP | crate::proto::UDP | crate::proto::UDPLITE | crate::proto::DCCP => (
            if from.proto == crate::proto::TCP {
                TCP_CSUM_AT
            } else {
                UDP_CSUM_AT
            },
            matches!(from.proto, crate::proto::UDP | crate::proto::UDPLITE),
            csum::delta2(from.sport, to.sport) + csum::delta2(from.dport, to.dport),
        ),
        // The ICMP checksum covers no address; only a changed identifier touches it.
        crate::proto::ICMP if from.sport != to.sport => {
            (ICMP_ID_CSUM_AT, false, csum::delta2(from.sport, to.sport))
        }
        _ => (0, false, 0),
    };
    Rewrite {
        saddr: to.saddr,
        daddr: to.daddr,
        sport: to.sport,
        dport: to.dport,
        ip_delta,
        l4_delta: if l4_csum == ICMP_ID_CSUM_AT {
            csum::fold(ports)
        } else {
            csum::fold(addrs + ports)
        },
        l4_csum,
        udp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csum::{checksum, fold_wide, sum_words};

    /// An IPv4+UDP header pair with valid checksums (pseudo-header included).
    fn packet(t: &FlowTuple, ttl: u8) -> [u8; 28] {
        let mut p = [0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[8] = ttl;
        p[9] = t.proto;
        p[12..16].copy_from_slice(&t.saddr.to_ne_bytes());
        p[16..20].copy_from_slice(&t.daddr.to_ne_bytes());
        let ip = checksum(&p[..20]);
        p[10..12].copy_from_slice(&ip.to_ne_bytes());
        p[20..22].copy_from_slice(&t.sport.to_ne_bytes());
        p[22..24].copy_from_slice(&t.dport.to_ne_bytes());
        p[24..26].copy_from_slice(&8u16.to_be_bytes());
        let c = l4_csum(&p);
        p[26..28].copy_from_slice(&c);
        p
    }

    fn l4_csum(p: &[u8; 28]) -> [u8; 2] {
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&p[12..20]);
        pseudo[9] = p[9];
        pseudo[10..12].copy_from_slice(&8u16.to_be_bytes());
        let mut udp = [0u8; 8];
        udp.copy_from_slice(&p[20..28]);
        udp[6] = 0;
        udp[7] = 0;
        let sum = sum_words(&udp, sum_words(&pseudo, 0));
        match !fold_wide(sum) {
            0 => 0xffffu16.to_ne_bytes(),
            c => c.to_ne_bytes(),
        }
    }

    proptest::proptest! {
        /// Applying the precomputed deltas gives the checksums a full recompute gives.
        #[test]
        fn deltas_match_a_full_recompute(
            a in proptest::prelude::any::<[u32; 4]>(),
            p in proptest::prelude::any::<[u16; 4]>(),
            ttl in 2u8..=255,
            proto in proptest::sample::select(&[17u8, 136][..]),
        ) {
            let from = FlowTuple::new(a[0], a[1], p[0], p[1], proto);
            let to = FlowTuple::new(a[2], a[3], p[2], p[3], proto);
            let mut pkt = packet(&from, ttl);
            let rw = rewrite(&from, &to);
            let ip = u16::from_ne_bytes([pkt[10], pkt[11]]);
            let l4 = u16::from_ne_bytes([pkt[26], pkt[27]]);
            pkt[8] = ttl - 1;
            pkt[12..16].copy_from_slice(&rw.saddr.to_ne_bytes());
            pkt[16..20].copy_from_slice(&rw.daddr.to_ne_bytes());
            pkt[20..22].copy_from_slice(&rw.sport.to_ne_bytes());
            pkt[22..24].copy_from_slice(&rw.dport.to_ne_bytes());
            pkt[10..12].copy_from_slice(&csum::apply(ip, rw.ip_delta).to_ne_bytes());
            pkt[26..28].copy_from_slice(&csum::apply_udp(l4, rw.l4_delta).to_ne_bytes());
            let mut hdr = pkt;
            hdr[10] = 0;
            hdr[11] = 0;
            proptest::prop_assert_eq!(
                u16::from_ne_bytes([pkt[10], pkt[11]]),
                checksum(&hdr[..20])
            );
            proptest::prop_assert_eq!([pkt[26], pkt[27]], l4_csum(&pkt));
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): plain `#[repr(C)]` integers and byte arrays with explicit padding; every
    // bit pattern is valid.
    unsafe impl aya::Pod for super::FlowTuple {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowEntry {}
    unsafe impl aya::Pod for super::Slot {}
}

/// Value of [`crate::maps::SLOTS`]: a copy of one [`FlowEntry`] of `FLOWS` and its key, in
/// the slot its key hashes to ([`slot_index`]) or the other of that pair ([`other_slot`]),
/// so that an established packet reads one
/// 128-byte, line-aligned slot instead of the hash table's bucket and then its element.
///
/// The program alone writes slots, under [`Slot::seq`] (a sequence lock: odd while a CPU
/// writes the slot; readers copy the entry and use the copy only if `seq` was even and
/// unchanged around the copy). The copy's fields a fast packet changes (last-seen times, TCP
/// segment notes, the timer copy) are written back to the slot; whoever looks the key up
/// in `FLOWS` merges them into the `FLOWS` entry and empties the slot first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    /// The entry's key; `proto` 0: the slot is empty. Its padding holds nothing.
    pub key: FlowTuple,
    /// The entry, except `flow` (the guest view, not needed on the fast path), whose first
    /// 8 bytes are the sequence lock.
    pub entry: FlowEntry,
}
const _: () = assert!(core::mem::size_of::<Slot>() == 128);

impl Slot {
    /// Byte offset of the 64-bit sequence word (`entry.flow.guest` and `remote`).
    pub const SEQ_OFFSET: usize = 16 + 96;
    /// Byte offset of the `bpf_jiffies64()` when the slot was filled (`entry.flow`'s second
    /// half).
    pub const FILLED_OFFSET: usize = 16 + 104;
    /// Seconds a slot serves before its packets take `FLOWS` again (which refills it): a
    /// flow's `FLOWS` entry is touched that often (the LRU sees it used), and a slot whose
    /// entry the LRU evicted anyway outlives it that long at most.
    pub const REFILL_SECS: u64 = 8;
    /// Refresh intervals the flow in a slot must have been idle (its `seen` that old) before
    /// another flow of the pair takes the slot over. Two, not one: a busy flow's `seen` moves
    /// only with its first packet a whole interval after the last move, so a flow with a
    /// packet at least once an interval shows a `seen` up to two intervals old; with one
    /// interval, such flows could take a slot from each other again and again (each time two
    /// `FLOWS` lookups and the slot rewritten).
    pub const TAKEOVER_REFRESHES: u64 = 2;
}

/// The slot of [`crate::maps::SLOTS`] a key belongs in (`mask`: the slot count minus one):
/// splitmix64's finaliser over the key's words. The key lives there or in the other slot of
/// its pair ([`other_slot`]): two flows whose keys hash to one slot each keep a slot.
/// (`Slot::TAKEOVER_REFRESHES` says when a third one takes one of them.)
#[inline(always)]
pub fn slot_index(t: &FlowTuple, mask: u32) -> u32 {
    let a = ((t.saddr as u64) << 32) | t.daddr as u64;
    let b = ((t.sport as u64) << 24) | ((t.dport as u64) << 8) | t.proto as u64;
    let mut x = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x as u32) & mask
}

/// The other slot of slot `i`'s pair (slots `2n` and `2n + 1`, one 256-byte block).
#[inline(always)]
pub const fn other_slot(i: u32) -> u32 {
    i ^ 1
}

impl Slot {
    /// `e` (keyed `t`) with what fast packets changed in this slot merged in, if the slot
    /// holds `t`: how a reader outside the program sees the whole entry.
    pub fn merged_into(&self, t: &FlowTuple, mut e: FlowEntry) -> FlowEntry {
        if self.key == *t {
            Slot::merge(&mut e, &self.entry);
        }
        e
    }

    /// Merges into `e` what fast packets changed in `copy` (a slot's entry): the later
    /// last-seen time, the direction's refresh time and timer copy, and the TCP segment notes
    /// the copy holds. The program's full path does this before it uses a `FLOWS` entry
    /// (`slots::take`), readers outside it through [`Slot::merged_into`]. Without branches
    /// but the maximum, for the verifier, which walks it at every lookup of the full path.
    #[inline(always)]
    pub fn merge(e: &mut FlowEntry, copy: &FlowEntry) {
        e.last_seen = e.last_seen.max(copy.last_seen);
        e.seen = copy.seen;
        e.timer = copy.timer;
        e.flags |= copy.flags & (ENTRY_SEQ | ENTRY_ACKED);
        let (seq, ack) = (
            flag_mask(copy.flags, ENTRY_SEQ),
            flag_mask(copy.flags, ENTRY_ACKED),
        );
        e.seq_end = (copy.seq_end & seq) | (e.seq_end & !seq);
        e.max_ack = (copy.max_ack & ack) | (e.max_ack & !ack);
    }
}

/// All ones if `flags` has the one-bit `flag`, else zero, without a branch.
#[inline(always)]
fn flag_mask(flags: u8, flag: u8) -> u32 {
    0u32.wrapping_sub((flags as u32 >> flag.trailing_zeros()) & 1)
}
