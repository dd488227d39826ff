//! The flow table of program and model side by side: the program's entries (`FLOWS`,
//! `PENDING`) turned into what the model holds (each direction's [`DirView`], and the logical
//! view `natctl conntrack list` gives), checked for the program's own invariants on the way,
//! and flows written into both as a test describes them.
use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context as _, bail, ensure};
use nat_common::{
    COUNT_IN, ENTRY_ACKED, ENTRY_FAST, ENTRY_ORIG, ENTRY_PENDING, ENTRY_SEQ, FLOW_HAIRPIN,
    FlowEntry, FlowTuple, ORIGIN_GUEST, ORIGIN_PUBLIC, Reason,
    conntrack::{ASSURED, State},
    flow::rewrite,
};

use super::{Harness, maps};
use crate::model::{
    DirView, Direction, Flow, Kind, NO_PEER, Tracked, Tuple, nf_state,
    policy::conn_of,
    table::{Dir, Rec, Window},
};

/// `seen` of an entry a test writes: its once-a-second liveness check is due at once
/// (`jiffies - seen` wraps to more than any refresh interval).
pub const STALE_SEEN: u64 = u64::MAX - (1 << 40);

const ICMP: u8 = 1;

fn host16(v: u16) -> u16 {
    u16::from_be_bytes(v.to_ne_bytes())
}

fn wire16(v: u16) -> u16 {
    u16::from_ne_bytes(v.to_be_bytes())
}

fn host32(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a.to_ne_bytes())
}

fn wire32(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// A program key as the model writes it.
pub fn tuple(k: &FlowTuple) -> Tuple {
    Tuple {
        saddr: host32(k.saddr),
        daddr: host32(k.daddr),
        sport: host16(k.sport),
        dport: host16(k.dport),
        proto: k.proto,
    }
}

/// A model key as the program writes it.
pub fn wire(t: &Tuple) -> FlowTuple {
    FlowTuple::new(
        wire32(t.saddr),
        wire32(t.daddr),
        wire16(t.sport),
        wire16(t.dport),
        t.proto,
    )
}

/// Whether a flow in `state` lets packets without SYN, FIN or RST skip the state machine once
/// assured (the program's `ENTRY_FAST`).
fn stable(state: State) -> bool {
    matches!(
        state,
        State::TcpEstablished | State::UdpReplied | State::Icmp | State::Other
    )
}

/// What the tests compare of the flow table.
pub struct Seen {
    pub flows: BTreeMap<Flow, Tracked>,
    pub entries: BTreeMap<Tuple, DirView>,
}

impl Harness {
    /// The counter key of slot `slot`'s `counter` half.
    fn counted(&self, slot: u32, counter: u8) -> anyhow::Result<(Direction, Ipv4Addr)> {
        let (p, v) = *self
            .slots
            .get(&slot)
            .with_context(|| format!("entry counts on slot {slot}, which no mapping has"))?;
        Ok(if counter == COUNT_IN {
            (Direction::Inbound, p)
        } else {
            (Direction::Outbound, v)
        })
    }

    /// The program's flow table, checked for its invariants: both directions of every flow
    /// present, in the same map, naming each other and the same flow; the original holds the
    /// state; the FAST flag is set exactly on assured flows in a stable state; padding zero.
    pub fn program_flows(&self) -> anyhow::Result<Seen> {
        let all = maps::read_entries(&mut self.ebpf.borrow_mut())?;
        let mut flows = BTreeMap::new();
        let mut entries = BTreeMap::new();
        for (k, (e, pending)) in &all {
            let orig = e.flags & ENTRY_ORIG != 0;
            let (peer, peer_pending) = all
                .get(&e.peer)
                .with_context(|| format!("{k:?}: its other direction {:?} is missing", e.peer))?;
            ensure!(
                peer.peer == *k && peer.flow == e.flow && *peer_pending == *pending,
                "{k:?} and {:?} do not form one flow: {e:?} / {peer:?}",
                e.peer
            );
            ensure!(
                (e.flags & ENTRY_PENDING != 0) == *pending
                    && (peer.flags & ENTRY_ORIG != 0) != orig,
                "{k:?}: flags {:#x} in {}",
                e.flags,
                if *pending { "PENDING" } else { "FLOWS" }
            );
            ensure!(
                e._pad == [0; 3] && k._pad == 0 && k._pad2 == 0,
                "{k:?}: padding set: {e:?}"
            );
            let o = if orig { e } else { peer };
            let state =
                State::from_u8(o.state).with_context(|| format!("{k:?}: state {}", o.state))?;
            let fast = !*pending && o.ct_flags & ASSURED != 0 && stable(state);
            ensure!(
                (e.flags & ENTRY_FAST != 0) == fast,
                "{k:?}: FAST flag {} in state {state:?}, {}",
                e.flags & ENTRY_FAST != 0,
                if *pending { "pending" } else { "assured" }
            );
            let to = Tuple {
                saddr: host32(e.saddr),
                daddr: host32(e.daddr),
                sport: host16(e.sport),
                dport: host16(e.dport),
                proto: k.proto,
            };
            entries.insert(
                tuple(k),
                DirView {
                    to,
                    orig,
                    pending: *pending,
                    ingress: e.in_ifindex,
                    route: (e.out_ifindex, e.smac, e.dmac, e.mtu, e.route_gen),
                    counted: self.counted(e.slot, e.counter)?,
                    reason: Reason::from_index(u32::from(e.reason)),
                    window: Window {
                        end: (e.flags & ENTRY_SEQ != 0).then_some(e.seq_end),
                        ack: (e.flags & ENTRY_ACKED != 0).then_some(e.max_ack),
                    },
                },
            );
            if !orig {
                continue;
            }
            let flow = Flow::from_key(&e.flow)
                .with_context(|| format!("{k:?}: flow identity {:?}", e.flow))?;
            let timer = nat_common::conntrack::Timeout::from_u8(e.timer)
                .with_context(|| format!("{k:?}: timer {}", e.timer))?;
            flows.insert(
                flow,
                Tracked {
                    state,
                    origin: e.flow.origin,
                    flags: e.ct_flags,
                    timer,
                    peer: NO_PEER,
                },
            );
            if e.flow.kind == FLOW_HAIRPIN {
                let r = tuple(&e.peer);
                flows.insert(
                    Flow {
                        guest: r.saddr,
                        remote: r.daddr,
                        guest_port: r.sport,
                        remote_port: r.dport,
                        proto: r.proto,
                        kind: Kind::HairpinRev,
                    },
                    Tracked {
                        state,
                        origin: ORIGIN_GUEST,
                        flags: 0,
                        timer,
                        peer: (flow.guest, flow.guest_port),
                    },
                );
            }
        }
        Ok(Seen { flows, entries })
    }

    /// The model's flow table.
    pub fn model_seen(&self) -> Seen {
        let m = self.model.borrow();
        Seen {
            flows: m.policy.conntrack.flows(),
            entries: m.policy.conntrack.table.entries(),
        }
    }

    /// Writes a flow into program and model as a test describes it: its logical entry (a
    /// translated flow, or a hairpin flow by its sender's side), last seen at `last_seen`.
    /// Both directions' routes are unresolved (their first packets resolve them) and their
    /// liveness checks due; an assured flow goes to `FLOWS`, any other to `PENDING`.
    pub fn put_flow(&self, flow: Flow, t: Tracked, last_seen: u64) -> anyhow::Result<()> {
        let m = self.model.borrow();
        let public_of = |v: Ipv4Addr| -> anyhow::Result<Ipv4Addr> {
            m.nat_out
                .get(&v)
                .copied()
                .or_else(|| m.nat_in.iter().find(|(_, w)| **w == v).map(|(p, _)| *p))
                .with_context(|| format!("{v} is mapped by no public address"))
        };
        // An ICMP query's key carries the type of the message: the guest sends
        // `remote_port`, the remote its counterpart.
        let remote_type = |ty: u16| u16::from(nf_state::icmp_inverse(ty as u8).unwrap_or(ty as u8));
        let (key, to, kind) = match (flow.kind, t.origin) {
            (Kind::Nat, ORIGIN_GUEST) => {
                let p = public_of(flow.guest)?;
                let key = Tuple {
                    saddr: flow.guest,
                    daddr: flow.remote,
                    sport: flow.guest_port,
                    dport: flow.remote_port,
                    proto: flow.proto,
                };
                (key, Tuple { saddr: p, ..key }, 0)
            }
            (Kind::Nat, ORIGIN_PUBLIC) => {
                let p = public_of(flow.guest)?;
                let key = if flow.proto == ICMP {
                    Tuple {
                        saddr: flow.remote,
                        daddr: p,
                        sport: flow.guest_port,
                        dport: remote_type(flow.remote_port),
                        proto: flow.proto,
                    }
                } else {
                    Tuple {
                        saddr: flow.remote,
                        daddr: p,
                        sport: flow.remote_port,
                        dport: flow.guest_port,
                        proto: flow.proto,
                    }
                };
                (
                    key,
                    Tuple {
                        daddr: flow.guest,
                        ..key
                    },
                    1,
                )
            }
            (Kind::HairpinFwd, ORIGIN_GUEST) => {
                let v1 = *m
                    .nat_in
                    .get(&flow.remote)
                    .with_context(|| format!("{} is not mapped", flow.remote))?;
                let dev = m.fib.route_dev(v1).context("no route to V1")?;
                let r = m
                    .ifaces
                    .get(&dev)
                    .map(|i| i.addr)
                    .context("V1's interface")?;
                let key = Tuple {
                    saddr: flow.guest,
                    daddr: flow.remote,
                    sport: flow.guest_port,
                    dport: flow.remote_port,
                    proto: flow.proto,
                };
                (
                    key,
                    Tuple {
                        saddr: r,
                        daddr: v1,
                        ..key
                    },
                    2,
                )
            }
            other => bail!("a test can write translated and hairpin flows, not {other:?}"),
        };
        let (p, v) = match kind {
            0 => (to.saddr, key.saddr),
            1 => (key.daddr, to.daddr),
            _ => (key.daddr, to.daddr),
        };
        let slot = self
            .slots
            .iter()
            .find(|(_, pv)| **pv == (p, v))
            .map(|(s, _)| *s)
            .with_context(|| format!("no mapping {p} <-> {v}"))?;
        let ingress = m
            .fib
            .route_dev(key.saddr)
            .context("no route to the sender")?;
        let egress = m
            .fib
            .route_dev(to.daddr)
            .context("no route to the receiver")?;
        let (ins, outs) = ((Direction::Inbound, p), (Direction::Outbound, v));
        let (reason, counted, reply_reason, reply_counted) = match kind {
            0 => (
                Reason::OutboundForwarded,
                outs,
                Reason::InboundForwarded,
                ins,
            ),
            1 => (
                Reason::InboundForwarded,
                ins,
                Reason::OutboundForwarded,
                outs,
            ),
            _ => (
                Reason::HairpinForwarded,
                ins,
                Reason::HairpinForwarded,
                outs,
            ),
        };
        let pending = t.flags & ASSURED == 0;
        let rec = Rec {
            flow,
            origin: t.origin,
            conn: conn_of(t.state, t.flags, t.timer),
            last_seen,
            pending,
            orig_key: key,
            orig: Dir {
                to,
                ingress,
                route: None,
                counted,
                reason,
                due: true,
                window: Default::default(),
            },
            reply_key: to.reply(),
            reply: Dir {
                to: key.reply(),
                ingress: egress,
                route: None,
                counted: reply_counted,
                reason: reply_reason,
                due: true,
                window: Default::default(),
            },
        };
        drop(m);
        let fast = !pending && stable(t.state);
        let entry = |from: &Tuple, to: &Tuple, d: &Dir, orig: bool, peer: &Tuple| {
            let rw = rewrite(&wire(from), &wire(to));
            FlowEntry {
                saddr: rw.saddr,
                daddr: rw.daddr,
                sport: rw.sport,
                dport: rw.dport,
                ip_delta: rw.ip_delta,
                l4_delta: rw.l4_delta,
                l4_csum: rw.l4_csum,
                flags: if orig { ENTRY_ORIG } else { 0 }
                    | if pending { ENTRY_PENDING } else { 0 }
                    | if fast { ENTRY_FAST } else { 0 }
                    | if rw.udp { nat_common::ENTRY_UDP } else { 0 },
                in_ifindex: d.ingress,
                slot,
                reason: d.reason as u8,
                counter: if d.counted.0 == Direction::Inbound {
                    COUNT_IN
                } else {
                    nat_common::COUNT_OUT
                },
                state: if orig { t.state as u8 } else { 0 },
                ct_flags: if orig { t.flags } else { 0 },
                timer: if orig { t.timer as u8 } else { 0 },
                seen: STALE_SEEN,
                last_seen: if orig { last_seen } else { 0 },
                peer: wire(peer),
                flow: flow.key(t.origin),
                ..FlowEntry::default()
            }
        };
        let o = entry(&rec.orig_key, &rec.orig.to, &rec.orig, true, &rec.reply_key);
        let r = entry(
            &rec.reply_key,
            &rec.reply.to,
            &rec.reply,
            false,
            &rec.orig_key,
        );
        {
            let mut ebpf = self.ebpf.borrow_mut();
            maps::put_entry(&mut ebpf, pending, &wire(&rec.reply_key), &r)?;
            maps::put_entry(&mut ebpf, pending, &wire(&rec.orig_key), &o)?;
        }
        self.model.borrow_mut().policy.conntrack.table.insert(rec);
        Ok(())
    }
}
