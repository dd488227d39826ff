//! Golden hairpin cases the program treats specially: a sender whose source port another live
//! flow already holds towards the same target (another port is taken), flows that expired,
//! ICMP errors, frames that cannot be routed, and a flow from the public side taking a hairpin
//! flow's answers; and the order in which the guest side classifies a frame.
use std::{net::Ipv4Addr, time::Duration};

use nat_common::{
    Event::*,
    ORIGIN_GUEST,
    Reason::*,
    TIMEOUT_SLOTS,
    conntrack::{State::*, Timeout},
};
use nat_tests::{
    harness::*,
    model::{Direction, Flow, Kind, Outcome, Tracked, XDP_REDIRECT},
    packet::{Ip, PROTO_ICMP, PROTO_TCP, PROTO_UDP, icmp_error, udp},
};
use nat_userspace::{cidr::Cidr, firewall::Proto};

use crate::{
    common::*,
    hairpin::{
        ACK, Host, Hp, R, RA, SYN, bench, hairpin_policy, hosts, legs, ping, tcp_f, timed, udp_f,
    },
};

fn secs_ago(s: u64) -> u64 {
    let now = monotonic_ns();
    let d = Duration::from_secs(s).as_nanos() as u64;
    assert!(now > d, "uptime too short");
    now - d
}

/// The source port (host order) the hairpin flow of a sender using `sport` takes at its
/// `attempt`-th try: the sender's own first, then a fixed sequence over 1024..=65535.
fn nth_port(sport: u16, attempt: u32) -> u16 {
    if attempt == 0 {
        return sport;
    }
    (1024 + (u32::from(sport) + attempt * 7919) % 64512) as u16
}

/// A hairpin flow from `sender:sport` to P1:80 that reaches V1 from `r:port`, in `state`.
fn moved(
    sender: Ipv4Addr,
    sport: u16,
    r: Ipv4Addr,
    port: u16,
    state: nat_common::conntrack::State,
    flags: u8,
) -> [(Flow, Tracked); 2] {
    let t = Tracked::new(state, ORIGIN_GUEST, flags);
    [
        (
            Flow {
                guest: sender,
                remote: P1,
                guest_port: sport,
                remote_port: 80,
                proto: PROTO_TCP,
                kind: Kind::HairpinFwd,
            },
            t,
        ),
        (
            Flow {
                guest: V1,
                remote: r,
                guest_port: 80,
                remote_port: port,
                proto: PROTO_TCP,
                kind: Kind::HairpinRev,
            },
            Tracked {
                flags: 0,
                peer: (sender, sport),
                ..t
            },
        ),
    ]
}

/// Two senders reaching V1 through P1 from the same source port would share the translated
/// 4-tuple (R:port -> V1:80): the second flow takes the next free port of a fixed sequence, so
/// each guest gets its own answers. With every port of the sequence held by a live flow the
/// kernel gets the packet (its NAT picks a port); an expired flow's port is free again.
#[test]
fn hairpin_collisions_take_another_port() {
    let h = bench();
    let t = hosts(&h.topo);
    let (v1, v2, v4, v5, r) = (t.v1, t.v2, t.v4, t.v5, GST_ADDR);
    let mut b = Hp::new(&h);
    let syn = tcp_f((40000, 80), SYN);
    let (alt1, alt2) = (nth_port(40000, 1), nth_port(40000, 2));
    b.forward("V2 opens", v2, P1, v1, r, new_flow(), &syn);
    b.forward_as(
        "V4, same ports: the next port",
        v4,
        P1,
        v1,
        r,
        new_flow(),
        &syn,
        tcp_f((alt1, 80), SYN),
    );
    b.forward_as(
        "V5 on gsb0, same ports: the port after",
        v5,
        P1,
        v1,
        r,
        new_flow(),
        &syn,
        tcp_f((alt2, 80), SYN),
    );
    b.reply_as(
        "V1 answers V4's flow: to V4",
        v1,
        r,
        v4,
        P1,
        first_answer(),
        tcp_f((80, alt1), SYN | ACK),
        tcp_f((80, 40000), SYN | ACK),
    );
    b.reply(
        "V1 answers V2's flow: to V2",
        v1,
        r,
        v2,
        P1,
        first_answer(),
        tcp_f((80, 40000), SYN | ACK),
    );
    b.forward("V2 again", v2, P1, v1, r, hit(), tcp_f((40000, 80), ACK));
    b.flows(
        "three flows, three ports",
        &[
            moved(V2, 40000, r, 40000, TcpEstablished, RA),
            moved(V4, 40000, r, alt1, TcpSynRecv, R),
            moved(V5, 40000, r, alt2, TcpSynSent, 0),
        ]
        .concat(),
    );

    // Every port of the sequence held by a live flow of another sender: the kernel's.
    h.clear_flows().expect("clear");
    let now = monotonic_ns();
    for attempt in 0..8 {
        let port = nth_port(40000, attempt);
        let sender = Ipv4Addr::new(10, 0, 0, 100 + attempt as u8);
        for (f, tr) in legs(sender, P1, V1, r, PROTO_TCP, (port, 80), TcpSynSent, 0) {
            if f.kind == Kind::HairpinFwd {
                h.put_flow(f, tr, now).expect("put flow");
            }
        }
    }
    b.passed("every port taken", v2, P1, HairpinCollision, miss(), &syn);

    // Once the flow holding the first port has expired, the port is free again.
    h.clear_flows().expect("clear");
    h.set_timeouts([0; TIMEOUT_SLOTS]).expect("timeouts");
    let [held, _] = legs(V4, P1, V1, r, PROTO_TCP, (40000, 80), TcpSynSent, 0);
    h.put_flow(held.0, held.1, secs_ago(121)).expect("put flow");
    b.forward(
        "V2 takes the expired flow's port",
        v2,
        P1,
        v1,
        r,
        new_flow(),
        &syn,
    );
    b.flows(
        "the expired flow is gone",
        &legs(V2, P1, V1, r, PROTO_TCP, (40000, 80), TcpSynSent, 0),
    );
    b.finish("hairpin collision");
}

/// A hairpin flow that expired is gone once a packet finds it so: its answer is then V1's own
/// packet to the router, and the sender's next query opens a new flow. A target's SYN on a
/// closed flow is judged afresh (to the router itself: the kernel's).
#[test]
fn expired_and_closed_hairpin_flows() {
    let h = bench();
    let t = hosts(&h.topo);
    let (v1, v2, r) = (t.v1, t.v2, GST_ADDR);
    let mut b = Hp::new(&h);
    let mut timeouts = [TEST_TIMEOUT_NS; TIMEOUT_SLOTS];
    timeouts[Timeout::UdpUnreplied as usize] = 1;
    h.set_timeouts(timeouts).expect("timeouts");
    let expired = ev(&[(ConntrackExpired, 1), (ConntrackMiss, 1)]);
    let udp_legs = legs(V2, P1, V1, r, PROTO_UDP, (5353, 53), UdpUnreplied, 0);
    b.forward("query", v2, P1, v1, r, new_flow(), udp_f((5353, 53)));
    b.passed(
        "answer after 1 ns: to the router itself",
        v1,
        r,
        NoRoute,
        expired,
        udp_f((53, 5353)),
    );
    b.flows("the flow is gone", &[]);
    b.forward(
        "query again: a new flow",
        v2,
        P1,
        v1,
        r,
        new_flow(),
        udp_f((5353, 53)),
    );
    b.flows("opened again", &udp_legs);

    h.set_timeouts([TEST_TIMEOUT_NS; TIMEOUT_SLOTS])
        .expect("timeouts");
    h.clear_flows().expect("clear");
    let closed = legs(V2, P1, V1, r, PROTO_TCP, (40000, 80), TcpTimeWait, R);
    h.put_flow(closed[0].0, closed[0].1, monotonic_ns())
        .expect("put flow");
    // A SYN on TIME_WAIT ends the flow; V1 -> R is then outbound to the router itself.
    b.passed(
        "syn from the target of a closed flow",
        v1,
        r,
        NoRoute,
        miss(),
        tcp_f((80, 40000), SYN),
    );
    b.flows("closed flow ended", &[]);
    b.forward(
        "the sender opens it again",
        v2,
        P1,
        v1,
        r,
        new_flow(),
        tcp_f((40000, 80), SYN),
    );
    b.forward("ping", v2, P1, v1, r, new_flow(), ping(8, 3));
    // An echo request from the target is not the flow's answer (another type): outbound to
    // the router itself.
    b.passed(
        "echo request from the target",
        v1,
        r,
        NoRoute,
        miss(),
        ping(8, 3),
    );
    b.reply("echo reply", v1, r, v2, P1, first_answer(), ping(0, 3));
    b.finish("expired and closed hairpin flows");
}

#[test]
fn hairpin_icmp_errors_pass() {
    let h = bench();
    let t = hosts(&h.topo);
    let (v1, v2, r) = (t.v1, t.v2, GST_ADDR);
    let mut b = Hp::new(&h);
    let error = |quoted: Vec<u8>, n: usize| {
        move |s, d, t| icmp_ip(s, d, t, &icmp_error(3, 3, 0, &quoted, n))
    };
    // V2 -> P1 errors: about a packet from P1, or anything else.
    let from_p1 = udp_l3(P1, V2, (53, 5353), 60);
    b.passed(
        "port unreachable to P1",
        v2,
        P1,
        IcmpErrorUnrelated,
        untracked(),
        error(from_p1.clone(), usize::MAX),
    );
    b.passed(
        "quoting 8 bytes",
        v2,
        P1,
        IcmpErrorUnrelated,
        untracked(),
        error(from_p1.clone(), 28),
    );
    b.passed(
        "quoting 10 bytes",
        v2,
        P1,
        IcmpErrorUnrelated,
        untracked(),
        error(from_p1, 10),
    );
    let other = udp_l3(REMOTE, V2, (53, 5353), 60);
    b.passed(
        "about another packet",
        v2,
        P1,
        IcmpErrorUnrelated,
        untracked(),
        error(other, usize::MAX),
    );
    // V1 -> R errors about what R sent it.
    b.forward("query", v2, P1, v1, r, new_flow(), udp_f((5353, 53)));
    let from_r = udp_l3(r, V1, (5353, 53), 63);
    // No ICMP binding: an outbound error to the router itself.
    b.passed(
        "error to R without binding",
        v1,
        r,
        NoRoute,
        untracked(),
        error(from_r.clone(), usize::MAX),
    );
    let not_v1 = udp_l3(r, V2, (5353, 53), 63);
    b.passed(
        "error to R about another guest",
        v1,
        r,
        IcmpErrorUnrelated,
        untracked(),
        error(not_v1, usize::MAX),
    );
    // An echo flow with identifier 0: an error to R still quotes no packet of it.
    b.forward("ping, identifier 0", v2, P1, v1, r, new_flow(), ping(8, 0));
    b.passed(
        "error to R with an echo flow",
        v1,
        r,
        NoRoute,
        untracked(),
        error(from_r, usize::MAX),
    );
    b.flows(
        "errors opened nothing",
        &[
            legs(V2, P1, V1, r, PROTO_UDP, (5353, 53), UdpUnreplied, 0),
            legs(V2, P1, V1, r, PROTO_ICMP, (0, 0), Icmp, 0),
        ]
        .concat(),
    );
    b.finish("hairpin icmp error");
}

#[test]
fn hairpin_passes_what_it_cannot_route() {
    let h = bench();
    let t = hosts(&h.topo);
    let (v1, v2, v6, r) = (t.v1, t.v2, t.v6, GST_ADDR);
    let mut b = Hp::new(&h);
    let q = udp_f((5353, 53));
    // The firewall comes first (a denied packet gets no answer): open UDP 53 on every public
    // IP whose route fails.
    let mut policy = hairpin_policy();
    let guests: Cidr = "10.0.0.0/8".parse().expect("CIDR");
    for p in [
        P3,
        P6,
        P_TO_REMOTE,
        P_TO_OTHER,
        P_TO_LOCAL,
        P_TO_BCAST,
        P_TO_UNROUTED,
    ] {
        policy
            .add_ingress(
                None,
                p,
                service(Proto::Udp, Some((53, 53)), None),
                vec![guests],
            )
            .expect("rule");
    }
    h.set_policy(&policy).expect("policy");
    let none = miss();
    b.passed(
        "to a guest without neighbour",
        v2,
        P3,
        NoNeighbour,
        none,
        &q,
    );
    b.passed(
        "mapped to a remote address",
        v2,
        P_TO_REMOTE,
        WrongEgress,
        none,
        &q,
    );
    b.passed("mapped behind oth0", v2, P_TO_OTHER, WrongEgress, none, &q);
    b.passed("mapped to the router", v2, P_TO_LOCAL, NoRoute, none, &q);
    b.passed("mapped to a broadcast", v2, P_TO_BCAST, NoRoute, none, &q);
    b.passed(
        "mapped to an unrouted address",
        v2,
        P_TO_UNROUTED,
        NoRoute,
        none,
        &q,
    );
    b.passed(
        "into gsn0, no router address",
        v2,
        P6,
        WrongEgress,
        none,
        &q,
    );
    b.passed(
        "1401 bytes to mtu 1400",
        v2,
        P1,
        FragNeeded,
        none,
        |s, d, t| udp_ip(s, d, t, &[7; 1401 - 28], true),
    );
    b.passed("ttl 1", v2, P1, TtlExpired, none, |s, d, _| {
        udp_l3(s, d, (5353, 53), 1)
    });
    // gsn0's own network address is not the router's: outbound, no neighbour.
    let gsn_first = Ipv4Addr::new(10, 0, 2, 1);
    b.passed("V6 to 10.0.2.1", v6, gsn_first, NoNeighbour, miss(), &q);
    b.flows("nothing opened", &[]);

    b.forward("query", v2, P1, v1, r, new_flow(), &q);
    // Part of the flow: its state advances (netfilter tracks it before the kernel's TTL check).
    b.passed("answer with ttl 1", v1, r, TtlExpired, hit(), |s, d, _| {
        udp_l3(s, d, (53, 5353), 1)
    });
    b.passed(
        "answer too big for gst0",
        v1,
        r,
        FragNeeded,
        hit(),
        |s, d, t| {
            Ip::new(PROTO_UDP, s, d)
                .ttl(t)
                .packet(&udp(s, d, 53, 5353, &[7; 1401 - 28], true))
        },
    );
    // The state advanced all the same: replied, then (a second answer) assured.
    b.flows(
        "replied, not forwarded",
        &legs(V2, P1, V1, r, PROTO_UDP, (5353, 53), UdpReplied, RA),
    );
    b.finish("hairpin route pass");
}

/// On the guest side a frame is first parsed (transport included), then looked up as a packet
/// of a flow; a frame of no flow is a hairpin forward if its destination is mapped, else
/// outbound if its source is.
#[test]
fn guest_side_classification_order() {
    let h = bench();
    let t = hosts(&h.topo);
    let (v1, v2) = (t.v1, t.v2);
    let r = GST_ADDR;
    let mut b = Hp::new(&h);
    let unmapped = Ipv4Addr::new(10, 0, 0, 99);
    let stranger = Host { ip: unmapped, ..v2 };
    let cut_tcp = |s, d, ttl| {
        let full = tcp_l3(s, d, (1, 2), ACK, ttl);
        Ip::new(PROTO_TCP, s, d).ttl(ttl).packet(&full[20..30])
    };
    b.passed_frame(
        "cut tcp to P1, ttl 1",
        v2,
        cut_tcp(V2, P1, 1),
        Malformed,
        untracked(),
    );
    b.passed_frame(
        "cut tcp to P1",
        v2,
        cut_tcp(V2, P1, 64),
        Malformed,
        untracked(),
    );
    b.passed_frame(
        "cut tcp to R, ttl 1",
        v1,
        cut_tcp(V1, r, 1),
        Malformed,
        untracked(),
    );
    b.passed_frame(
        "cut tcp to a remote, ttl 1",
        v1,
        cut_tcp(V1, REMOTE, 1),
        Malformed,
        untracked(),
    );
    b.passed_frame(
        "unmapped source, cut tcp to R",
        v1,
        cut_tcp(unmapped, r, 64),
        Malformed,
        untracked(),
    );
    b.passed_frame(
        "unmapped source, cut tcp to a remote",
        v1,
        cut_tcp(unmapped, REMOTE, 64),
        Malformed,
        untracked(),
    );
    // A mapped destination wins over a mapped source, whatever the source.
    b.forward(
        "unmapped source to P1",
        stranger,
        P1,
        v1,
        r,
        new_flow(),
        udp_f((7, 53)),
    );
    // No neighbour entry for it: the kernel resolves one.
    b.passed("answer to it", v1, r, NoNeighbour, hit(), udp_f((53, 7)));
    b.denied(
        "mapped source to P2, no rule",
        v1,
        P2,
        miss(),
        udp_f((7, 53)),
    );
    // To R without a flow: outbound (and local).
    b.passed("V1 to R, no flow", v1, r, NoRoute, miss(), udp_f((53, 8)));
    let fwd_ok = timed(
        legs(unmapped, P1, V1, r, PROTO_UDP, (7, 53), UdpReplied, R),
        Timeout::UdpUnreplied,
    );
    b.flows("one hairpin flow", &fwd_ok);
    b.finish("classification order");
}

/// A flow opened from the public side whose answers would arrive as a hairpin flow's do (a
/// datagram from the router's guest address R to P1, with the ports the hairpin flow reached
/// V1 with: V1 answers both to R) replaces the hairpin flow, both its entries, as the model's
/// table does: no half of it is left naming an entry of the new flow. The hairpin sender's next
/// datagram opens its flow again, on the next free port.
#[test]
fn a_new_flow_replaces_the_flow_holding_its_answers() {
    let h = bench();
    let t = hosts(&h.topo);
    let (v1, v5, r) = (t.v1, t.v5, GST_ADDR);
    let wire = Wire(h.topo);
    let mut b = Hp::new(&h);
    let ports = (53000, 53);
    b.forward("V5 to P1", v5, P1, v1, r, new_flow(), udp_f(ports));
    b.flows(
        "the hairpin flow",
        &legs(V5, P1, V1, r, PROTO_UDP, ports, UdpUnreplied, 0),
    );
    let want = Outcome {
        action: XDP_REDIRECT,
        reason: InboundForwarded,
        frame: wire.leaving_guest(V1_MAC, &udp_l3(r, V1, ports, 63)),
        counted: Some((Direction::Inbound, P1)),
        denied: None,
        events: new_flow(),
    };
    b.count += 1;
    expect_exact(
        &h,
        &mut b.errs,
        "R to P1 from the public side, the same ports",
        h.topo.pub0.ifindex,
        &wire.arriving_public(&udp_l3(r, P1, ports, 64)),
        &want,
    );
    match h.flows() {
        Ok(f) if f.len() == 1 && f.keys().all(|k| k.kind == Kind::Nat) => {}
        other => b
            .errs
            .push(format!("only the new flow must be left: {other:?}")),
    }
    b.forward_as(
        "V5 again: its flow opens anew, on the next port",
        v5,
        P1,
        v1,
        r,
        new_flow(),
        udp_f(ports),
        udp_f((nth_port(53000, 1), 53)),
    );
    b.finish("flow replacement");
}
