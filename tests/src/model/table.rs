//! The model's flow table: each flow with both of its directions, as the program keeps them in
//! `FLOWS` / `PENDING` (one entry per direction, keyed by the packet as it arrives), written
//! from the spec rather than from the program's layout: a direction is its key, what the
//! packet becomes, where it arrives, the next hop it was resolved to (and under which route
//! generation), and the mapping counter it counts on.
//!
//! A flow is pending until netfilter calls it assured; only an assured flow's directions may
//! take the established path (no state machine) when their state is stable. The logical view
//! ([`Table::flows`]) is what `natctl conntrack list` shows: one entry per flow in the guest's
//! view, plus, for a hairpin flow, its reply direction as a binding naming the sender.
use std::{collections::BTreeMap, net::Ipv4Addr};

use nat_common::conntrack::{State, Timeout};

use super::{
    Direction, Hop,
    nf_state::NfConn,
    policy::{Flow, Kind, NO_PEER, Tracked},
};
use nat_common::{ORIGIN_GUEST, Reason};

/// A packet as it arrives (host-order ports; an ICMP query: identifier and type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tuple {
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

const ICMP: u8 = 1;

impl Tuple {
    /// The packet the other side sends back to a packet leaving as `self`: addresses
    /// swapped, ports swapped, or for an ICMP query the same identifier with the answering
    /// type.
    pub fn reply(&self) -> Tuple {
        let (sport, dport) = if self.proto == ICMP {
            let ty = self.dport as u8;
            let answer = super::nf_state::icmp_inverse(ty).unwrap_or(ty);
            (self.sport, u16::from(answer))
        } else {
            (self.dport, self.sport)
        };
        Tuple {
            saddr: self.daddr,
            daddr: self.saddr,
            sport,
            dport,
            proto: self.proto,
        }
    }
}

/// One direction of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dir {
    /// What its packets become.
    pub to: Tuple,
    /// Where they arrive.
    pub ingress: u32,
    /// The next hop and MTU, and the route generation they were resolved under; `None`: not
    /// resolved yet.
    pub route: Option<(Hop, u16, u32)>,
    /// The mapping counter a forwarded packet counts on.
    pub counted: (Direction, Ipv4Addr),
    pub reason: Reason,
    /// Its once-a-second liveness check is due on the next established packet (an entry the
    /// test wrote with an old refresh time; the program's own entries are never due within a
    /// test, whose refresh interval is set beyond its length).
    pub due: bool,
    /// TCP: what this direction's forwarded segments showed (see [`Window`]).
    pub window: Window,
}

/// What the program notes of the TCP segments a flow direction sent, for the window check of
/// RST and FIN (issue 10: a blind, spoofed RST may not end a connection). Written from the
/// rule, not from the program: every TCP segment the program forwards through an existing
/// flow (the established path and the tracked path; not the packet that opens the flow, nor
/// what the tc learner sees) moves the direction's furthest end (sequence number + payload +
/// SYN + FIN, in sequence space, RFC 1982), unless it starts more than one unscaled window
/// ([`SLACK`]) beyond it, and, with ACK, its furthest acknowledgment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Window {
    pub end: Option<u32>,
    pub ack: Option<u32>,
}

/// One unscaled TCP window (65,535), standing in for the receiver's advertised window.
pub const SLACK: u32 = 65_535;

/// Sequence-space `a > b`, as netfilter's `after()`: `(s32)(b - a) < 0`.
fn seq_after(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) < 0
}

/// The sequence number after a segment: payload, SYN and FIN each count.
fn seg_end(seq: u32, len: u32, flags: u8) -> u32 {
    seq.wrapping_add(len)
        .wrapping_add(u32::from(flags & 0x02 != 0))
        .wrapping_add(u32::from(flags & 0x01 != 0))
}

impl Window {
    /// Notes a forwarded segment.
    pub fn note(&mut self, seq: u32, ack: u32, len: u32, flags: u8) {
        let end = seg_end(seq, len, flags);
        self.end = match self.end {
            None => Some(end),
            Some(e) if seq_after(end, e) && !seq_after(seq, e.wrapping_add(SLACK)) => Some(end),
            kept => kept,
        };
        if flags & 0x10 != 0 && self.ack.is_none_or(|a| seq_after(ack, a)) {
            self.ack = Some(ack);
        }
    }

    /// Whether an RST or FIN from the direction that noted `sender` may change the flow, by
    /// the receiver's furthest acknowledgment `A` and the sender's furthest end `E`: nothing
    /// beyond `max(E, A) + SLACK`; an RST not before `A` (netfilter's "invalid rst"), a FIN
    /// ending no earlier than `A - SLACK`. Unchecked until the sender sent and the receiver
    /// acknowledged.
    pub fn allows(sender: &Window, receiver: &Window, seq: u32, len: u32, flags: u8) -> bool {
        let (Some(end), Some(acked)) = (sender.end, receiver.ack) else {
            return true;
        };
        let top = if seq_after(end, acked) { end } else { acked };
        if seq_after(seq, top.wrapping_add(SLACK)) {
            return false;
        }
        if flags & 0x04 != 0 {
            !seq_after(acked, seq)
        } else {
            !seq_after(acked.wrapping_sub(SLACK), seg_end(seq, len, flags))
        }
    }
}

/// A flow: its state (netfilter's, held by the original direction) and both directions.
#[derive(Clone, Copy, Debug)]
pub struct Rec {
    /// The guest's view, and who opened it.
    pub flow: Flow,
    pub origin: u8,
    pub conn: NfConn,
    pub last_seen: u64,
    /// Not assured yet.
    pub pending: bool,
    pub orig_key: Tuple,
    pub orig: Dir,
    pub reply_key: Tuple,
    pub reply: Dir,
}

impl Rec {
    pub fn encoded(&self) -> (State, u8, Timeout) {
        self.conn.encoded()
    }

    /// The direction whose key is `key`, and whether it is the original one.
    pub fn dir(&self, key: &Tuple) -> (&Dir, bool) {
        if *key == self.orig_key {
            (&self.orig, true)
        } else {
            (&self.reply, false)
        }
    }

    pub fn dir_mut(&mut self, orig: bool) -> &mut Dir {
        if orig {
            &mut self.orig
        } else {
            &mut self.reply
        }
    }
}

/// A direction as the tests compare it with the program's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DirView {
    pub to: Tuple,
    pub orig: bool,
    pub pending: bool,
    pub ingress: u32,
    /// Egress ifindex, source and destination MAC, MTU, route generation (all 0 unresolved).
    pub route: (u32, [u8; 6], [u8; 6], u16, u32),
    pub counted: (Direction, Ipv4Addr),
    pub reason: Reason,
    pub window: Window,
}

/// Flows by their original key, and every key to its flow.
#[derive(Clone, Debug, Default)]
pub struct Table {
    recs: BTreeMap<Tuple, Rec>,
    index: BTreeMap<Tuple, Tuple>,
}

impl Table {
    /// The flow a packet keyed `key` belongs to.
    pub fn find(&self, key: &Tuple) -> Option<&Rec> {
        self.recs.get(self.index.get(key)?)
    }

    pub fn find_mut(&mut self, key: &Tuple) -> Option<&mut Rec> {
        let orig = *self.index.get(key)?;
        self.recs.get_mut(&orig)
    }

    /// Inserts a flow; entries of others under its keys are overwritten (as map inserts do).
    pub fn insert(&mut self, rec: Rec) {
        for k in [rec.orig_key, rec.reply_key] {
            if let Some(old) = self.index.get(&k).copied() {
                self.remove(&old);
            }
        }
        self.index.insert(rec.orig_key, rec.orig_key);
        self.index.insert(rec.reply_key, rec.orig_key);
        self.recs.insert(rec.orig_key, rec);
    }

    /// Removes the flow `key` belongs to.
    pub fn remove(&mut self, key: &Tuple) {
        if let Some(orig) = self.index.get(key).copied()
            && let Some(rec) = self.recs.remove(&orig)
        {
            self.index.remove(&rec.orig_key);
            self.index.remove(&rec.reply_key);
        }
    }

    pub fn clear(&mut self) {
        self.recs.clear();
        self.index.clear();
    }

    pub fn recs(&self) -> impl Iterator<Item = &Rec> {
        self.recs.values()
    }

    /// The logical view: each flow in the guest's view, and each hairpin flow's reply
    /// direction as the binding that names the sender.
    pub fn flows(&self) -> BTreeMap<Flow, Tracked> {
        let mut out = BTreeMap::new();
        for r in self.recs.values() {
            let (state, flags, timer) = r.encoded();
            out.insert(
                r.flow,
                Tracked {
                    state,
                    origin: r.origin,
                    flags,
                    timer,
                    peer: NO_PEER,
                },
            );
            if r.flow.kind == Kind::HairpinFwd {
                let k = r.reply_key;
                out.insert(
                    Flow {
                        guest: k.saddr,
                        remote: k.daddr,
                        guest_port: k.sport,
                        remote_port: k.dport,
                        proto: k.proto,
                        kind: Kind::HairpinRev,
                    },
                    Tracked {
                        state,
                        origin: ORIGIN_GUEST,
                        flags: 0,
                        timer,
                        peer: (r.flow.guest, r.flow.guest_port),
                    },
                );
            }
        }
        out
    }

    /// Every direction by its key.
    pub fn entries(&self) -> BTreeMap<Tuple, DirView> {
        let mut out = BTreeMap::new();
        for r in self.recs.values() {
            for (key, d, orig) in [(r.orig_key, r.orig, true), (r.reply_key, r.reply, false)] {
                let route = match d.route {
                    Some((hop, mtu, generation)) => {
                        (hop.ifindex, hop.smac, hop.dmac, mtu, generation)
                    }
                    None => (0, [0; 6], [0; 6], 0, 0),
                };
                out.insert(
                    key,
                    DirView {
                        to: d.to,
                        orig,
                        pending: r.pending,
                        ingress: d.ingress,
                        route,
                        counted: d.counted,
                        reason: d.reason,
                        window: d.window,
                    },
                );
            }
        }
        out
    }
}

impl std::fmt::Display for Tuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "proto {} {}:{} -> {}:{}",
            self.proto, self.saddr, self.sport, self.daddr, self.dport
        )
    }
}
