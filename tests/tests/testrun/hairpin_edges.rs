//! Golden hairpin cases the program leaves to the kernel or treats specially: a reply binding
//! taken by another live sender (collision), bindings whose flow has expired or refuses the
//! packet (stale), ICMP errors, and frames that cannot be routed; and the order in which the
//! guest side classifies a frame (hairpin forward, hairpin reply, outbound).
use std::{net::Ipv4Addr, time::Duration};

use nat_common::{
    Event::*,
    Reason::*,
    TIMEOUT_SLOTS,
    conntrack::{State::*, Timeout},
};
use nat_tests::{
    harness::*,
    model::{Flow, Tracked},
    packet::{Ip, PROTO_ICMP, PROTO_TCP, PROTO_UDP, icmp_error, udp},
};

use crate::{
    common::*,
    hairpin::{ACK, Host, Hp, R, RA, SYN, bench, hosts, legs, ping, tcp_f, timed, udp_f},
};

/// Seeds both legs of a hairpin flow in program and model, last seen `last_seen`.
fn put_legs(h: &Harness, legs: [(Flow, Tracked); 2], last_seen: u64) {
    for (f, t) in legs {
        h.put_flow(f, t, last_seen).expect("put flow");
    }
}

fn secs_ago(s: u64) -> u64 {
    let now = monotonic_ns();
    let d = Duration::from_secs(s).as_nanos() as u64;
    assert!(now > d, "uptime too short");
    now - d
}

#[test]
fn hairpin_collision_passes_to_the_kernel() {
    let h = bench();
    let t = hosts(&h.topo);
    let (v1, v2, v4, v5, r) = (t.v1, t.v2, t.v4, t.v5, GST_ADDR);
    let mut b = Hp::new(&h);
    let syn = tcp_f((40000, 80), SYN);
    b.forward("V2 opens", v2, P1, v1, r, new_flow(), &syn);
    b.passed("V4, same ports", v4, P1, HairpinCollision, miss(), &syn);
    b.passed(
        "V5 on gsb0, same ports",
        v5,
        P1,
        HairpinCollision,
        miss(),
        &syn,
    );
    b.forward(
        "V4, another port",
        v4,
        P1,
        v1,
        r,
        new_flow(),
        tcp_f((40001, 80), SYN),
    );
    b.forward("V2 again", v2, P1, v1, r, hit(), &syn);
    let v2_legs = |s| legs(V2, P1, V1, r, PROTO_TCP, (40000, 80), s, 0);
    let v4_other = legs(V4, P1, V1, r, PROTO_TCP, (40001, 80), TcpSynSent, 0);
    b.flows(
        "no leg for the collisions",
        &[v2_legs(TcpSynSent), v4_other].concat(),
    );

    // Once V2's flow has expired its binding is free: V4 takes it, and V2 collides.
    h.set_timeouts([0; TIMEOUT_SLOTS]).expect("timeouts");
    put_legs(&h, v2_legs(TcpSynSent), secs_ago(121));
    b.forward(
        "V4 takes the expired binding",
        v4,
        P1,
        v1,
        r,
        new_flow(),
        &syn,
    );
    b.reply(
        "the reply goes to V4",
        v1,
        r,
        v4,
        P1,
        hit(),
        tcp_f((80, 40000), SYN | ACK),
    );
    let expired = ev(&[(ConntrackExpired, 1), (ConntrackMiss, 1)]);
    b.passed("V2 now collides", v2, P1, HairpinCollision, expired, &syn);
    let v4_legs = legs(V4, P1, V1, r, PROTO_TCP, (40000, 80), TcpSynRecv, R);
    b.flows(
        "V2's forward leg stays until collected",
        &[
            v2_legs(TcpSynSent)[0],
            v4_legs[0],
            v4_legs[1],
            v4_other[0],
            v4_other[1],
        ],
    );
    b.finish("hairpin collision");
}

#[test]
fn stale_binding_after_flow_expiry() {
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
        "answer after 1 ns: stale",
        v1,
        r,
        Unmapped,
        expired,
        udp_f((53, 5353)),
    );
    b.flows("both legs stay", &udp_legs);
    let recreated = ev(&[
        (ConntrackExpired, 1),
        (ConntrackMiss, 1),
        (ConntrackCreate, 1),
    ]);
    b.forward(
        "query again: same sender",
        v2,
        P1,
        v1,
        r,
        recreated,
        udp_f((5353, 53)),
    );
    b.flows("replaced", &udp_legs);

    // A binding whose forward leg is gone, or refuses the packet.
    h.set_timeouts([TEST_TIMEOUT_NS; TIMEOUT_SLOTS])
        .expect("timeouts");
    h.clear_flows().expect("clear");
    let [_, binding] = legs(V2, P1, V1, r, PROTO_UDP, (5353, 53), UdpReplied, 0);
    h.put_flow(binding.0, binding.1, monotonic_ns())
        .expect("put");
    b.passed(
        "binding without its flow",
        v1,
        r,
        Unmapped,
        miss(),
        udp_f((53, 5353)),
    );
    let closed = legs(V2, P1, V1, r, PROTO_TCP, (40000, 80), TcpTimeWait, RA);
    put_legs(&h, closed, monotonic_ns());
    b.passed(
        "syn from the target of a closed flow",
        v1,
        r,
        Unmapped,
        miss(),
        tcp_f((80, 40000), SYN),
    );
    b.reply(
        "its last ack",
        v1,
        r,
        t.v2,
        P1,
        hit(),
        tcp_f((80, 40000), ACK),
    );
    // A SYN on TIME_WAIT is a new flow: P1's rule admits it, both legs are replaced.
    b.forward(
        "the sender reopens it",
        v2,
        P1,
        v1,
        r,
        new_flow(),
        tcp_f((40000, 80), SYN),
    );
    let reopened = legs(V2, P1, V1, r, PROTO_TCP, (40000, 80), TcpSynSent, 0);
    b.flows(
        "reopened, binding follows",
        &[binding, reopened[0], reopened[1]],
    );
    b.forward("ping", v2, P1, v1, r, new_flow(), ping(8, 3));
    b.passed(
        "echo request from the target",
        v1,
        r,
        Unmapped,
        miss(),
        ping(8, 3),
    );
    // A query is bound by its identifier: none with identifier 0, so outbound to the router
    // itself (a tracked message: looked up, not found).
    b.passed(
        "timestamp from the target",
        v1,
        r,
        NoRoute,
        miss(),
        |s, d, t| icmp_l3(s, d, 13, 0, 0, t),
    );
    b.reply("echo reply", v1, r, v2, P1, hit(), ping(0, 3));
    b.finish("stale binding");
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
    // An echo flow with identifier 0 binds the key every ICMP error to R has.
    b.forward("ping, identifier 0", v2, P1, v1, r, new_flow(), ping(8, 0));
    b.passed(
        "error to R with a binding",
        v1,
        r,
        IcmpErrorUnrelated,
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
    let none = untracked();
    // The route comes before the firewall: P3 has no rule, V3 no neighbour.
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
    b.passed("answer with ttl 1", v1, r, TtlExpired, none, |s, d, _| {
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
    // The state advanced all the same.
    b.flows(
        "replied, not forwarded",
        &timed(
            legs(V2, P1, V1, r, PROTO_UDP, (5353, 53), UdpReplied, R),
            Timeout::UdpUnreplied,
        ),
    );
    b.finish("hairpin route pass");
}

/// On the guest side a frame is a hairpin forward if its destination is mapped, else a hairpin
/// reply if it is for the router's address and a binding exists, else outbound. Each leg has
/// its own order of checks; a frame to the router's address is parsed (transport, ICMP error)
/// before its TTL and mapping are looked at.
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
        TtlExpired,
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
        TtlExpired,
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
        Unmapped,
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
    // Not for R without a binding: outbound (and local).
    b.passed(
        "V1 to R, no binding",
        v1,
        r,
        NoRoute,
        miss(),
        udp_f((53, 8)),
    );
    let fwd_ok = timed(
        legs(unmapped, P1, V1, r, PROTO_UDP, (7, 53), UdpReplied, R),
        Timeout::UdpUnreplied,
    );
    b.flows("one hairpin flow", &fwd_ok);
    b.finish("classification order");
}
