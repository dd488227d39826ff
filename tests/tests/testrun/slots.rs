//! The flow cache (`SLOTS`, see `nat_common::Slot`) with the tests' 16 slots (8 pairs): an
//! established flow's packets are served from its slot; three flows sharing a pair of slots
//! are translated as the model says (which knows no cache) while two of them hold the slots,
//! and once one is idle the third takes its slot over with the first's segment notes kept in
//! `FLOWS`; a slot past its refill time
//! sends its next packet to `FLOWS`, which refills it; with the cache off (as natd loads the
//! program off x86-64), the same packets are forwarded alike from `FLOWS`. Every frame is also
//! compared with the model, and the flow table read merged with the slots (as natd reads it)
//! after each.
use std::net::Ipv4Addr;

use nat_common::{FlowTuple, proto};
use nat_tests::{
    harness::*,
    model::{Outcome, XDP_REDIRECT},
    packet::{TCP_ACK, TCP_SYN},
};

use crate::common::*;

/// A key as the program keys a packet (addresses and ports in network byte order).
fn key(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> FlowTuple {
    key_of(proto::UDP, src, dst, sport, dport)
}

fn key_of(p: u8, src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> FlowTuple {
    FlowTuple::new(
        u32::from_ne_bytes(src.octets()),
        u32::from_ne_bytes(dst.octets()),
        sport.to_be(),
        dport.to_be(),
        p,
    )
}

/// A UDP flow from V1 (port `sport`) to REMOTE:53: its key as it leaves the guest and as its
/// answers arrive.
struct Flow {
    sport: u16,
    out: FlowTuple,
    reply: FlowTuple,
}

fn flow(sport: u16) -> Flow {
    Flow {
        sport,
        out: key(V1, REMOTE, sport, 53),
        reply: key(REMOTE, P1, 53, sport),
    }
}

/// Runs `frame`: program and model must agree on everything, and the flow table (merged with
/// the slots) must equal the model's.
fn agree(h: &Harness, name: &str, ingress: u32, frame: &[u8]) -> Outcome {
    let got = h
        .run(ingress, frame)
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let model = h.run_model(ingress, frame);
    assert_eq!(
        got,
        model,
        "{name}: program gave {}, model {}; {}",
        describe(&got),
        describe(&model),
        diff(&got.frame, &model.frame)
    );
    h.check_flows().unwrap_or_else(|e| panic!("{name}: {e:#}"));
    got
}

fn out(h: &Harness, f: &Flow, name: &str) -> Outcome {
    let w = Wire(h.topo);
    let frame = w.arriving_guest(V1_MAC, &udp_l3(V1, REMOTE, (f.sport, 53), 64));
    agree(h, name, h.topo.gst0.ifindex, &frame)
}

fn answer(h: &Harness, f: &Flow, name: &str) -> Outcome {
    let w = Wire(h.topo);
    let frame = w.arriving_public(&udp_l3(REMOTE, P1, (53, f.sport), 64));
    agree(h, name, h.topo.pub0.ifindex, &frame)
}

/// Opens the flow and makes it assured both ways (in `FLOWS`, each direction's slot filled
/// if free).
fn warm_up(h: &Harness, f: &Flow) {
    for i in 0..3 {
        out(h, f, &format!("{}: out {i}", f.sport));
        answer(h, f, &format!("{}: answer {i}", f.sport));
    }
}

/// An established packet forwarded on the fast path.
fn assert_fast(o: &Outcome, name: &str) {
    assert!(
        o.action == XDP_REDIRECT && o.events == fast(),
        "{name}: not forwarded on the fast path: {}",
        describe(o)
    );
}

/// The pair of slots a key may live in (its own slot and the other of its pair).
fn pair(k: &FlowTuple) -> u32 {
    Harness::slot_index(k) / 2
}

/// The first source port from `from` whose flow's two keys are in different pairs of slots.
fn apart(from: u16) -> Flow {
    (from..)
        .map(flow)
        .find(|f| pair(&f.out) != pair(&f.reply))
        .expect("some port")
}

/// The first `N` flows from source port `from` whose outgoing keys share one pair of
/// slots, each with its reply key in another pair (`by`: a flow's outgoing and reply keys).
fn sharing<F, const N: usize>(
    from: u16,
    make: impl Fn(u16) -> F,
    by: impl Fn(&F) -> (FlowTuple, FlowTuple),
) -> [F; N] {
    let first = (from..)
        .map(&make)
        .find(|f| {
            let (o, r) = by(f);
            pair(&o) != pair(&r)
        })
        .expect("some port");
    let (o, _) = by(&first);
    let shared = pair(&o);
    let mut found = vec![first];
    let mut sport = from;
    while found.len() < N {
        sport += 1;
        let f = make(sport);
        let (o, r) = by(&f);
        if pair(&o) == shared && pair(&r) != shared && found.iter().all(|g| by(g).0 != o) {
            found.push(f);
        }
    }
    match found.try_into() {
        Ok(all) => all,
        Err(_) => unreachable!("N flows found"),
    }
}

#[test]
fn an_established_flow_is_served_from_its_slot() {
    let h = open_harness();
    let f = apart(5353);
    warm_up(&h, &f);
    out(&h, &f, "fills the slot");
    let before = h.slot_hits().expect("EVENTS");
    const N: u64 = 10;
    for i in 0..N {
        assert_fast(&out(&h, &f, &format!("out {i}")), "out");
    }
    let hits = h.slot_hits().expect("EVENTS") - before;
    assert_eq!(
        hits, N,
        "{N} established packets, {hits} served from the slot"
    );
    assert_eq!(h.slot_key(&f.out).expect("SLOTS"), f.out);
}

#[test]
fn flows_sharing_a_pair_of_slots_are_translated_alike_and_the_busy_ones_keep_them() {
    let h = open_harness();
    let [a, c, b] = sharing(5353, flow, |f| (f.out, f.reply));
    warm_up(&h, &a);
    out(&h, &a, "a fills a slot");
    warm_up(&h, &c);
    out(&h, &c, "c fills the other slot");
    warm_up(&h, &b);
    let before = h.slot_hits().expect("EVENTS");
    const N: u64 = 10;
    for i in 0..N {
        assert_fast(&out(&h, &a, &format!("a {i}")), "a");
        assert_fast(&out(&h, &c, &format!("c {i}")), "c");
        assert_fast(&out(&h, &b, &format!("b {i}")), "b");
    }
    let hits = h.slot_hits().expect("EVENTS") - before;
    // A and C hold the pair's slots from their warm-ups on: a slot is taken over only from
    // a flow idle for `Slot::TAKEOVER_REFRESHES` seconds, and the tests' second is
    // `u32::MAX` jiffies. B stays on `FLOWS`.
    assert_eq!(
        hits,
        2 * N,
        "{} packets of three flows in one pair of slots, {hits} served from them",
        3 * N
    );
    assert_eq!(h.slot_key(&a.out).expect("SLOTS"), a.out);
    assert_eq!(h.slot_key(&c.out).expect("SLOTS"), c.out);
    assert_ne!(h.slot_key(&b.out).expect("SLOTS"), b.out, "b has a slot");
}

#[test]
fn a_slot_past_its_refill_time_is_refilled_from_flows() {
    let h = open_harness();
    let f = apart(5353);
    warm_up(&h, &f);
    out(&h, &f, "fills the slot");
    assert!(
        h.age_slot(&f.out).expect("SLOTS"),
        "the slot holds the flow"
    );
    let before = h.slot_hits().expect("EVENTS");
    assert_fast(
        &out(&h, &f, "after the refill time"),
        "after the refill time",
    );
    let hits = h.slot_hits().expect("EVENTS") - before;
    assert_eq!(hits, 0, "an old slot served a packet");
    assert_fast(&out(&h, &f, "refilled"), "refilled");
    let hits = h.slot_hits().expect("EVENTS") - before;
    assert_eq!(hits, 1, "the refilled slot did not serve the next packet");
}

#[test]
fn with_the_cache_off_established_flows_are_forwarded_alike_from_flows() {
    let h = Harness::with_cache(false)
        .unwrap_or_else(|e| panic!("test bench setup failed (needs root, netns and BPF): {e:#}"));
    h.set_policy(&allow_all())
        .unwrap_or_else(|e| panic!("installing allow-all rules failed: {e:#}"));
    let f = apart(5353);
    warm_up(&h, &f);
    let before = h.slot_hits().expect("EVENTS");
    for i in 0..10 {
        assert_fast(&out(&h, &f, &format!("out {i}")), "out");
        assert_fast(&answer(&h, &f, &format!("answer {i}")), "answer");
    }
    assert_eq!(
        h.slot_hits().expect("EVENTS") - before,
        0,
        "a slot served a packet"
    );
    for k in [f.out, f.reply] {
        assert_eq!(
            h.slot_key(&k).expect("SLOTS"),
            FlowTuple::default(),
            "a slot was filled"
        );
    }
}

/// A TCP connection from V1 (port `sport`) to REMOTE:443, and its segments.
struct Tcp {
    sport: u16,
    out: FlowTuple,
    reply: FlowTuple,
    /// The guest's next sequence number.
    seq: u32,
}

const GUEST_ISN: u32 = 1000;
const REMOTE_ISN: u32 = 5000;

impl Tcp {
    fn new(sport: u16) -> Self {
        Tcp {
            sport,
            out: key_of(proto::TCP, V1, REMOTE, sport, 443),
            reply: key_of(proto::TCP, REMOTE, P1, 443, sport),
            seq: GUEST_ISN,
        }
    }

    fn out(&self, h: &Harness, flags: u8, name: &str) -> Outcome {
        let w = Wire(h.topo);
        let l3 = tcp_l3_seq(
            V1,
            REMOTE,
            (self.sport, 443),
            flags,
            (self.seq, REMOTE_ISN + 1),
            64,
        );
        agree(h, name, h.topo.gst0.ifindex, &w.arriving_guest(V1_MAC, &l3))
    }

    fn answer(&self, h: &Harness, flags: u8, name: &str) -> Outcome {
        let w = Wire(h.topo);
        let l3 = tcp_l3_seq(
            REMOTE,
            P1,
            (443, self.sport),
            flags,
            (REMOTE_ISN, self.seq),
            64,
        );
        agree(h, name, h.topo.pub0.ifindex, &w.arriving_public(&l3))
    }

    /// The handshake; the connection is then established and assured (in `FLOWS`).
    fn open(&mut self, h: &Harness) {
        self.out(h, TCP_SYN, "syn");
        self.seq += 1;
        self.answer(h, TCP_SYN | TCP_ACK, "syn-ack");
        self.out(h, TCP_ACK, "ack");
    }

    /// `n` guest segments of 100 bytes' worth of sequence numbers each, on the fast path.
    fn send(&mut self, h: &Harness, n: u32, name: &str) {
        for i in 0..n {
            self.seq += 100;
            assert_fast(&self.out(h, TCP_ACK, &format!("{name} {i}")), name);
        }
    }
}

#[test]
fn an_idle_flows_slot_is_taken_over_and_its_segment_notes_stay_with_its_flow() {
    let h = open_harness();
    let [mut a, mut c, mut b] = sharing(40000, Tcp::new, |f| (f.out, f.reply));
    a.open(&h);
    // The first segment fills A's slot; the next ones are noted there only (the tables are
    // compared with the model merged with the slots after each).
    a.send(&h, 4, "a");
    assert_eq!(h.slot_key(&a.out).expect("SLOTS"), a.out);
    c.open(&h);
    c.send(&h, 2, "c fills the other slot");
    assert_eq!(h.slot_key(&c.out).expect("SLOTS"), c.out);
    b.open(&h);
    b.send(&h, 2, "b while a and c are busy");
    assert_eq!(
        h.slot_key(&a.out).expect("SLOTS"),
        a.out,
        "a busy flow lost its slot"
    );
    assert_eq!(
        h.slot_key(&c.out).expect("SLOTS"),
        c.out,
        "a busy flow lost its slot"
    );

    assert!(h.idle_slot(&a.out).expect("SLOTS"), "a's slot");
    let before = h.slot_hits().expect("EVENTS");
    // B's next segment takes the slot over: A's notes go to its `FLOWS` entry first (the
    // table compared after the frame shows them), B's are in the slot from then on.
    b.send(&h, 1, "b takes the slot");
    assert_eq!(
        h.slot_key(&b.out).expect("SLOTS"),
        b.out,
        "b did not take the slot"
    );
    b.send(&h, 3, "b from its slot");
    assert_eq!(h.slot_hits().expect("EVENTS") - before, 3);
    assert_eq!(
        h.slot_key(&c.out).expect("SLOTS"),
        c.out,
        "the busy flow lost its slot"
    );
    // A's next segment finds its flow whole in `FLOWS` (its window notes as it left them).
    a.send(&h, 1, "a after losing its slot");
}
