//! Golden policy cases for connection tracking: replies to guest-initiated flows come in
//! without rules, a flow outlives the rule that admitted it, ICMP errors about tracked flows
//! are RELATED, ICMP queries are tracked by identifier and direction, TCP states progress as
//! netfilter's do, an RST or FIN outside the window the flow has shown changes nothing (a
//! blind, spoofed one), a SYN on a closed flow is new, and flows expire
//! after the idle timer their last packet started (configured, or netfilter's default when the
//! setting is 0). The expected states, status bits and timers are written out here,
//! independently of the model (which is compared as well).
use std::time::Duration;

use nat_common::{
    Event::*,
    ORIGIN_GUEST, ORIGIN_PUBLIC, Reason, TIMEOUT_SLOTS,
    conntrack::{
        ASSURED, SEEN_REPLY,
        State::{self, *},
        Timeout,
    },
};
use nat_tests::{
    harness::*,
    model::{Events, Outcome, Tracked, XDP_PASS},
    packet::{PROTO_GRE, PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};
use nat_userspace::{cidr::Cidr, firewall::Proto};

use crate::common::*;

const SYN: u8 = TCP_SYN;
const ACK: u8 = TCP_ACK;
/// Status: answered; answered and assured.
const R: u8 = SEEN_REPLY;
const RA: u8 = SEEN_REPLY | ASSURED;

/// A guest-opened entry in `state` with status `flags`, its timer the state's own.
fn guest(state: State, flags: u8) -> Tracked {
    Tracked::new(state, ORIGIN_GUEST, flags)
}

fn public(state: State, flags: u8) -> Tracked {
    Tracked::new(state, ORIGIN_PUBLIC, flags)
}

/// [`base_state`] with one ingress rule on P1 from anywhere.
fn p1_open(proto: Proto, port: u16) -> nat_userspace::state::DesiredState {
    let mut s = base_state();
    let svc = service(proto, Some((port, port)), None);
    s.add_ingress(None, P1, svc, vec![Cidr::ANY])
        .expect("valid rule");
    s
}

#[test]
fn guest_initiated_flows_get_their_replies() {
    let h = harness();
    let mut p = Probe::new(&h);
    let (tcp, udp) = ((40000, 443), (5353, 53));
    p.outbound("tcp syn", G1, true, new_flow(), |a, t| {
        tcp_l3(a, REMOTE, tcp, SYN, t)
    });
    p.inbound("tcp syn-ack", G1, true, first_answer(), |a, t| {
        tcp_l3(REMOTE, a, (443, 40000), SYN | ACK, t)
    });
    p.outbound("tcp ack", G1, true, hit(), |a, t| {
        tcp_l3(a, REMOTE, tcp, ACK, t)
    });
    p.outbound("udp query", G1, true, new_flow(), |a, t| {
        udp_l3(a, REMOTE, udp, t)
    });
    p.inbound("udp answer", G1, true, first_answer(), |a, t| {
        udp_l3(REMOTE, a, (53, 5353), t)
    });
    p.outbound("ping", G2, true, new_flow(), |a, t| {
        icmp_l3(a, REMOTE, 8, 0, 0x77, t)
    });
    p.inbound("pong", G2, true, first_answer(), |a, t| {
        icmp_l3(REMOTE, a, 0, 0, 0x77, t)
    });
    p.outbound("gre", G2, true, new_flow(), |a, t| {
        raw_l3(PROTO_GRE, a, REMOTE, t)
    });
    p.inbound("gre back", G2, true, first_answer(), |a, t| {
        raw_l3(PROTO_GRE, REMOTE, a, t)
    });
    // Anything else from outside stays out.
    p.inbound("tcp to another port", G1, false, miss(), |a, t| {
        tcp_l3(REMOTE, a, (443, 40001), SYN | ACK, t)
    });
    p.inbound("udp from another host", G1, false, miss(), |a, t| {
        udp_l3(PUB_GW, a, (53, 5353), t)
    });
    p.inbound("pong with another id", G2, false, miss(), |a, t| {
        icmp_l3(REMOTE, a, 0, 0, 0x78, t)
    });
    p.inbound(
        "a remote's ping with the same id",
        G2,
        false,
        miss(),
        |a, t| icmp_l3(REMOTE, a, 8, 0, 0x77, t),
    );
    p.inbound("udp to the tcp flow's ports", G1, false, miss(), |a, t| {
        udp_l3(REMOTE, a, (443, 40000), t)
    });
    p.flows(
        "four flows",
        &[
            (flow(G1, REMOTE, PROTO_TCP, tcp), guest(TcpEstablished, RA)),
            // Answered, but the answer itself still ran the unreplied timer.
            (
                flow(G1, REMOTE, PROTO_UDP, udp),
                guest(UdpReplied, R).with_timer(Timeout::UdpUnreplied),
            ),
            // Keyed by identifier and the type the guest sends (echo request).
            (flow(G2, REMOTE, PROTO_ICMP, (0x77, 8)), guest(Icmp, R)),
            (flow(G2, REMOTE, PROTO_GRE, (0, 0)), guest(Other, R)),
        ],
    );
    p.finish("guest-initiated");
}

#[test]
fn established_flow_outlives_its_rule() {
    let h = harness();
    h.set_policy(&p1_open(Proto::Tcp, 22)).expect("policy");
    let mut p = Probe::new(&h);
    let syn = |sp| move |a, t| tcp_l3(REMOTE, a, (sp, 22), SYN, t);
    p.inbound(
        "syn while the rule exists",
        G1,
        true,
        new_flow(),
        syn(40000),
    );
    // natd deletes the rule's LPM entries.
    h.set_policy(&base_state()).expect("policy");
    assert_eq!(
        h.firewall_entries().expect("maps"),
        vec![],
        "rule entries left"
    );
    p.outbound("syn-ack", G1, true, first_answer(), |a, t| {
        tcp_l3(a, REMOTE, (22, 40000), SYN | ACK, t)
    });
    p.inbound("ack", G1, true, hit(), |a, t| {
        tcp_l3(REMOTE, a, (40000, 22), ACK, t)
    });
    p.inbound("new syn refused", G1, false, miss(), syn(40001));
    p.flows(
        "the old flow only",
        &[(
            flow(G1, REMOTE, PROTO_TCP, (22, 40000)),
            public(TcpEstablished, RA),
        )],
    );
    p.finish("rule deleted");
}

#[test]
fn icmp_errors_about_tracked_flows_are_related() {
    let h = harness();
    let mut p = Probe::new(&h);
    let q = |a, sport| udp_l3(a, REMOTE, (sport, 53), 63);
    p.outbound("udp query opens a flow", G1, true, new_flow(), |a, t| {
        udp_l3(a, REMOTE, (5353, 53), t)
    });
    p.outbound("ping opens a flow", G1, true, new_flow(), |a, t| {
        icmp_l3(a, REMOTE, 8, 0, 9, t)
    });
    p.inbound("frag needed about it", G1, true, untracked(), |a, t| {
        error_l3(ROUTER, a, (3, 4), &q(a, 5353), usize::MAX, t)
    });
    p.inbound(
        "port unreachable from the remote",
        G1,
        true,
        untracked(),
        |a, t| error_l3(REMOTE, a, (3, 3), &q(a, 5353), 28, t),
    );
    p.inbound(
        "time exceeded about the ping",
        G1,
        true,
        untracked(),
        |a, t| {
            let ping = icmp_l3(a, REMOTE, 8, 0, 9, 1);
            error_l3(ROUTER, a, (11, 0), &ping, usize::MAX, t)
        },
    );
    p.inbound("about another port", G1, false, untracked(), |a, t| {
        error_l3(ROUTER, a, (3, 4), &q(a, 5354), usize::MAX, t)
    });
    p.inbound("quoting no ports", G1, false, untracked(), |a, t| {
        error_l3(ROUTER, a, (3, 4), &q(a, 5353), 20, t)
    });
    p.inbound(
        "about a tcp flow on those ports",
        G1,
        false,
        untracked(),
        |a, t| {
            let q = tcp_l3(a, REMOTE, (5353, 53), SYN, 63);
            error_l3(ROUTER, a, (3, 4), &q, usize::MAX, t)
        },
    );

    // Outbound: only conntrack lets the guest's errors out under default deny.
    let mut s = p1_open(Proto::Udp, 53);
    s.set_egress_default_allow(false);
    h.set_policy(&s).expect("policy");
    let got = |a, sport| udp_l3(REMOTE, a, (sport, 53), 60);
    p.inbound("query to the guest", G1, true, new_flow(), |a, t| {
        udp_l3(REMOTE, a, (40000, 53), t)
    });
    p.outbound(
        "port unreachable about it",
        G1,
        true,
        untracked(),
        |a, t| error_l3(a, REMOTE, (3, 3), &got(a, 40000), usize::MAX, t),
    );
    p.outbound("about another query", G1, false, untracked(), |a, t| {
        error_l3(a, REMOTE, (3, 3), &got(a, 40001), usize::MAX, t)
    });
    p.flows(
        "errors open nothing",
        &[
            (
                flow(G1, REMOTE, PROTO_UDP, (5353, 53)),
                guest(UdpUnreplied, 0),
            ),
            (flow(G1, REMOTE, PROTO_ICMP, (9, 8)), guest(Icmp, 0)),
            (
                flow(G1, REMOTE, PROTO_UDP, (53, 40000)),
                public(UdpUnreplied, 0),
            ),
        ],
    );
    p.finish("related");
}

#[test]
fn tcp_states_progress_like_netfilter() {
    let h = harness();
    h.set_policy(&p1_open(Proto::Tcp, 80)).expect("policy");
    let mut p = Probe::new(&h);
    let key = flow(G1, REMOTE, PROTO_TCP, (80, 40000));
    // (step, from the remote, flags, events, the entry after it: `None` = deleted)
    let steps: [(&str, bool, u8, Events, Option<Tracked>); 8] = [
        ("syn", true, SYN, new_flow(), Some(public(TcpSynSent, 0))),
        (
            "syn-ack",
            false,
            SYN | ACK,
            first_answer(),
            Some(public(TcpSynRecv, R)),
        ),
        ("ack", true, ACK, hit(), Some(public(TcpEstablished, RA))),
        (
            "fin from the originator",
            true,
            TCP_FIN | ACK,
            hit(),
            Some(public(TcpFinWait, RA)),
        ),
        (
            "fin from the responder",
            false,
            TCP_FIN | ACK,
            hit(),
            Some(public(TcpLastAck, RA)),
        ),
        ("last ack", true, ACK, hit(), Some(public(TcpTimeWait, RA))),
        // A SYN on TIME_WAIT is a new connection: the rule admits it, a new flow replaces.
        (
            "new syn is new",
            true,
            SYN,
            new_flow(),
            Some(public(TcpSynSent, 0)),
        ),
        // An RST as the only answer: netfilter deletes the flow.
        ("rst", false, TCP_RST, first_answer(), None),
    ];
    for (name, inbound, flags, events, want) in steps {
        if inbound {
            p.inbound(name, G1, true, events, |a, t| {
                tcp_l3(REMOTE, a, (40000, 80), flags, t)
            });
        } else {
            p.outbound(name, G1, true, events, |a, t| {
                tcp_l3(a, REMOTE, (80, 40000), flags, t)
            });
        }
        let want: Vec<_> = want.map(|w| (key, w)).into_iter().collect();
        p.flows(name, &want);
    }
    h.clear_flows().expect("clear");
    let out = flow(G1, REMOTE, PROTO_TCP, (40001, 80));
    p.outbound("guest syn", G1, true, new_flow(), |a, t| {
        tcp_l3(a, REMOTE, (40001, 80), SYN, t)
    });
    p.flows("guest syn", &[(out, guest(TcpSynSent, 0))]);
    p.inbound("refused: rst-ack", G1, true, first_answer(), |a, t| {
        tcp_l3(REMOTE, a, (80, 40001), TCP_RST | ACK, t)
    });
    p.flows("rst-ack deletes the flow", &[]);
    p.inbound("bare rst opens nothing", G1, true, miss(), |a, t| {
        tcp_l3(REMOTE, a, (40002, 80), TCP_RST, t)
    });
    // netfilter's default timers from here: ESTABLISHED's is longer than UNACK's.
    h.set_timeouts([0; TIMEOUT_SLOTS]).expect("timeouts");
    p.inbound(
        "mid-stream ack: loose pickup",
        G1,
        true,
        new_flow(),
        |a, t| tcp_l3(REMOTE, a, (40003, 80), ACK, t),
    );
    let picked = flow(G1, REMOTE, PROTO_TCP, (80, 40003));
    // Unanswered pickups run the UNACK timer, not ESTABLISHED's five days.
    let pickup = public(TcpEstablished, 0).with_timer(Timeout::TcpUnack);
    p.flows("pickup", &[(picked, pickup)]);
    p.inbound("impossible flags: invalid", G1, true, miss(), |a, t| {
        tcp_l3(REMOTE, a, (40003, 80), SYN | TCP_FIN, t)
    });
    p.inbound(
        "syn-ack from the originator: invalid",
        G1,
        true,
        miss(),
        |a, t| tcp_l3(REMOTE, a, (40003, 80), SYN | ACK, t),
    );
    p.flows("invalid packets change nothing", &[(picked, pickup)]);
    // A late SYN/ACK of the responder is ignored: forwarded with the flow, state and timer
    // stay; the flow is answered now (netfilter marks every reply it accepts, IGNORE too).
    p.outbound(
        "syn-ack from the responder: ignored",
        G1,
        true,
        first_answer(),
        |a, t| tcp_l3(a, REMOTE, (80, 40003), SYN | ACK, t),
    );
    p.flows(
        "ignored",
        &[(
            picked,
            public(TcpEstablished, R).with_timer(Timeout::TcpUnack),
        )],
    );
    p.finish("tcp state");
}

#[test]
fn flows_expire_after_their_idle_timeout() {
    let h = harness();
    let mut timeouts = [TEST_TIMEOUT_NS; TIMEOUT_SLOTS];
    timeouts[Timeout::UdpUnreplied as usize] = 1;
    h.set_timeouts(timeouts).expect("timeouts");
    let mut p = Probe::new(&h);
    let expired = ev(&[(ConntrackExpired, 1), (ConntrackMiss, 1)]);
    let key = flow(G1, REMOTE, PROTO_UDP, (5353, 53));
    p.outbound("query", G1, true, new_flow(), |a, t| {
        udp_l3(a, REMOTE, (5353, 53), t)
    });
    p.inbound("answer after 1 ns: expired", G1, false, expired, |a, t| {
        udp_l3(REMOTE, a, (53, 5353), t)
    });
    p.inbound(
        "error about it: not related",
        G1,
        false,
        untracked(),
        |a, t| {
            let q = udp_l3(a, REMOTE, (5353, 53), 63);
            error_l3(ROUTER, a, (3, 4), &q, usize::MAX, t)
        },
    );
    // The packet that found the flow expired removed it (netfilter's table never holds an
    // expired flow either).
    p.flows("expired flow is gone", &[]);
    p.outbound("query again: a new flow", G1, true, new_flow(), |a, t| {
        udp_l3(a, REMOTE, (5353, 53), t)
    });
    p.flows("replaced", &[(key, guest(UdpUnreplied, 0))]);

    // 0 = netfilter's default: flows last seen a while ago, either side of it; no rule, so an
    // expired flow's packet is dropped.
    h.set_timeouts([0; TIMEOUT_SLOTS]).expect("timeouts");
    h.clear_flows().expect("clear");
    let now = monotonic_ns();
    let ago = |s: u64| now - Duration::from_secs(s).as_nanos() as u64;
    assert!(
        now > Duration::from_secs(200).as_nanos() as u64,
        "uptime too short"
    );
    let cases: [(u16, State, u64, bool); 6] = [
        (1, TcpClose, 9, true),
        (2, TcpClose, 11, false),
        (3, TcpEstablished, 11, true),
        (4, UdpReplied, 110, true),
        (5, UdpReplied, 130, false),
        (6, Icmp, 31, false),
    ];
    for (port, state, secs, live) in cases {
        let proto = match state {
            UdpReplied => PROTO_UDP,
            Icmp => PROTO_ICMP,
            _ => PROTO_TCP,
        };
        // An echo flow is keyed by identifier and the type the guest sends.
        let ports = if proto == PROTO_ICMP {
            (port, 8)
        } else {
            (port, 7)
        };
        let f = flow(G1, REMOTE, proto, ports);
        let flags = if state == UdpReplied { R } else { 0 };
        h.put_flow(f, public(state, flags), ago(secs))
            .expect("put flow");
        let name = format!("{state:?} last seen {secs} s ago");
        // A flow a test writes has its routes unresolved: the first answer resolves its own.
        let events = if live { first_answer() } else { expired };
        let back = (7, port);
        p.inbound(&name, G1, live, events, |a, t| match proto {
            PROTO_UDP => udp_l3(REMOTE, a, back, t),
            PROTO_ICMP => icmp_l3(REMOTE, a, 0, 0, port, t),
            _ => tcp_l3(REMOTE, a, back, ACK, t),
        });
    }
    p.finish("expiry");
}

/// ICMP queries (echo, timestamp, information, address mask) are tracked, errors only as
/// RELATED to the flow they quote (as netfilter does): a guest's timestamp request or ping
/// with identifier 0 lets its reply in, but gives no ICMP error from that host a way in, nor
/// any other message or a request from it. (Formerly a reproducer: the program keyed every
/// non-echo ICMP message with ports 0 and looked errors up as flows of their own; later only
/// echo was tracked, so the router's answer to a timestamp request was dropped.)
#[test]
fn icmp_errors_only_enter_as_related() {
    let h = harness();
    let mut p = Probe::new(&h);
    p.outbound(
        "guest sends a timestamp request: opens a flow",
        G1,
        true,
        new_flow(),
        |a, t| icmp_l3(a, REMOTE, 13, 0, 0, t),
    );
    p.inbound(
        "error about a flow never seen",
        G1,
        false,
        untracked(),
        |a, t| {
            let q = udp_l3(a, REMOTE, (1234, 9999), 63);
            error_l3(REMOTE, a, (3, 3), &q, usize::MAX, t)
        },
    );
    p.inbound("redirect", G1, false, untracked(), |a, t| {
        icmp_l3(REMOTE, a, 5, 1, 0, t)
    });
    p.inbound("timestamp reply", G1, true, first_answer(), |a, t| {
        icmp_l3(REMOTE, a, 14, 0, 0, t)
    });
    p.inbound(
        "timestamp request from the remote",
        G1,
        false,
        miss(),
        |a, t| icmp_l3(REMOTE, a, 13, 0, 0, t),
    );
    p.inbound("echo request, identifier 0", G1, false, miss(), |a, t| {
        icmp_l3(REMOTE, a, 8, 0, 0, t)
    });
    let timestamp = (flow(G1, REMOTE, PROTO_ICMP, (0, 13)), guest(Icmp, R));
    p.flows("the timestamp query", &[timestamp]);
    // A ping with identifier 0 opens a flow: its reply gets in, a request the other way and
    // other ICMP messages do not; an error quoting the ping is RELATED.
    p.outbound("guest pings, identifier 0", G1, true, new_flow(), |a, t| {
        icmp_l3(a, REMOTE, 8, 0, 0, t)
    });
    p.inbound(
        "echo request against the flow",
        G1,
        false,
        miss(),
        |a, t| icmp_l3(REMOTE, a, 8, 0, 0, t),
    );
    p.inbound("echo reply", G1, true, first_answer(), |a, t| {
        icmp_l3(REMOTE, a, 0, 0, 0, t)
    });
    p.inbound("redirect again", G1, false, untracked(), |a, t| {
        icmp_l3(REMOTE, a, 5, 1, 0, t)
    });
    p.inbound(
        "error about another flow again",
        G1,
        false,
        untracked(),
        |a, t| {
            let q = udp_l3(a, REMOTE, (1234, 9999), 63);
            error_l3(REMOTE, a, (3, 3), &q, usize::MAX, t)
        },
    );
    p.inbound("error quoting the ping", G1, true, untracked(), |a, t| {
        let q = icmp_l3(a, REMOTE, 8, 0, 0, 1);
        error_l3(ROUTER, a, (11, 0), &q, usize::MAX, t)
    });
    p.outbound(
        "guest's echo reply opens nothing",
        G1,
        true,
        miss(),
        |a, t| icmp_l3(a, REMOTE, 0, 0, 0x99, t),
    );
    p.flows(
        "the ping and the timestamp query",
        &[
            (flow(G1, REMOTE, PROTO_ICMP, (0, 8)), guest(Icmp, R)),
            timestamp,
        ],
    );
    p.finish("icmp error");
}

/// netfilter (and so natd's nftables slow path) treats a SYN from the responder of a
/// TIME_WAIT flow as a new connection the other way (and the product does so on CLOSE too):
/// the old flow ends (netfilter kills it and evaluates the packet again), the ingress rules
/// decide, and a flow opened by it is the remote's (origin public). (Formerly a reproducer:
/// the program admitted it as ESTABLISHED.)
#[test]
fn reply_side_syn_does_not_reopen_a_closed_flow() {
    let h = harness();
    let mut p = Probe::new(&h);
    let out = |flags| move |a, t| tcp_l3(a, REMOTE, (40000, 80), flags, t);
    let back = |flags| move |a, t| tcp_l3(REMOTE, a, (80, 40000), flags, t);
    p.outbound("syn", G1, true, new_flow(), out(SYN));
    p.inbound("syn-ack", G1, true, first_answer(), back(SYN | ACK));
    p.outbound("ack", G1, true, hit(), out(ACK));
    p.outbound("fin", G1, true, hit(), out(TCP_FIN | ACK));
    p.inbound("fin", G1, true, hit(), back(TCP_FIN | ACK));
    p.outbound("last ack", G1, true, hit(), out(ACK));
    let key = flow(G1, REMOTE, PROTO_TCP, (40000, 80));
    let time_wait = Tracked::new(TcpTimeWait, ORIGIN_GUEST, RA);
    p.flows("time wait", &[(key, time_wait)]);
    p.inbound("new syn from the remote", G1, false, miss(), back(SYN));
    p.flows("time wait flow ended", &[]);

    // With a rule for the guest's port the remote's SYN opens a flow of its own.
    let mut s = base_state();
    let svc = service(Proto::Tcp, Some((40000, 40000)), None);
    s.add_ingress(None, P1, svc.clone(), vec![Cidr::ANY])
        .expect("valid rule");
    s.add_ingress(None, P3, svc, vec![Cidr::ANY])
        .expect("valid rule");
    h.set_policy(&s).expect("policy");
    p.inbound(
        "allowed syn from the remote",
        G1,
        true,
        new_flow(),
        back(SYN),
    );
    p.flows("replaced, origin public", &[(key, public(TcpSynSent, 0))]);
    p.outbound("guest's syn-ack", G1, true, first_answer(), out(SYN | ACK));
    p.flows(
        "the new flow progresses",
        &[(key, Tracked::new(TcpSynRecv, ORIGIN_PUBLIC, R))],
    );

    // V3 has no neighbour entry: the remote's SYN on V3's closed flow ends it, is allowed, then
    // passed to the kernel (a flow opens only for a forwarded packet).
    let g3 = Guest {
        public: P3,
        private: V3,
        mac: [2, 0, 0, 0, 0, 0x14],
    };
    h.clear_flows().expect("clear");
    let key3 = flow(g3, REMOTE, PROTO_TCP, (40000, 80));
    h.put_flow(key3, time_wait, monotonic_ns())
        .expect("put flow");
    let input = p.w.arriving_public(&back(SYN)(P3, 64));
    let want = Outcome {
        action: XDP_PASS,
        reason: Reason::NoNeighbour,
        frame: input.clone(),
        counted: None,
        denied: None,
        events: miss(),
    };
    p.count += 1;
    let pub0 = h.topo.pub0.ifindex;
    expect_exact(
        &h,
        &mut p.errs,
        "allowed syn, no neighbour",
        pub0,
        &input,
        &want,
    );
    p.flows("V3's closed flow ended", &[]);
    p.finish("reply-side syn");
}

/// netfilter tracks a guest's ping and a remote's ping with the same identifier as two
/// connections (the request of one is not the reply tuple of the other), so the reply to the
/// guest's own ping still gets in. (Formerly a reproducer: echo flows were keyed by identifier
/// without direction, and the remote's request, admitted by an echo-request rule, replaced
/// the guest's flow.)
#[test]
fn remote_ping_does_not_take_over_a_guest_ping() {
    let h = harness();
    let mut s = base_state();
    s.add_ingress(
        None,
        P1,
        service(Proto::Icmp, None, Some((8, None))),
        vec![Cidr::ANY],
    )
    .expect("valid rule");
    h.set_policy(&s).expect("policy");
    let mut p = Probe::new(&h);
    p.outbound("guest pings, id 5", G1, true, new_flow(), |a, t| {
        icmp_l3(a, REMOTE, 8, 0, 5, t)
    });
    // A connection of its own.
    p.inbound(
        "remote pings the guest, id 5",
        G1,
        true,
        new_flow(),
        |a, t| icmp_l3(REMOTE, a, 8, 0, 5, t),
    );
    p.inbound(
        "reply to the guest's ping",
        G1,
        true,
        first_answer(),
        |a, t| icmp_l3(REMOTE, a, 0, 0, 5, t),
    );
    p.outbound(
        "the guest answers the remote",
        G1,
        true,
        first_answer(),
        |a, t| icmp_l3(a, REMOTE, 0, 0, 5, t),
    );
    p.flows(
        "two flows",
        &[
            (flow(G1, REMOTE, PROTO_ICMP, (5, 8)), guest(Icmp, R)),
            (flow(G1, REMOTE, PROTO_ICMP, (5, 0)), public(Icmp, R)),
        ],
    );
    p.finish("ping takeover");
}

/// A blind RST or FIN (a sequence number far from the connection's, or an RST below what the
/// other side acknowledged) is INVALID: the flow stays ESTABLISHED, and the packet is judged
/// by the rules as one of no flow (port 80 is open, so it is forwarded, opening nothing). An
/// RST at the connection's own next sequence number closes the flow, from either side.
#[test]
fn blind_rst_and_fin_leave_the_flow_established() {
    let h = harness();
    h.set_policy(&p1_open(Proto::Tcp, 80)).expect("policy");
    let mut p = Probe::new(&h);
    let key = flow(G1, REMOTE, PROTO_TCP, (80, 40000));
    let (remote_isn, guest_isn) = (1_000u32, 5_000u32);
    let from_remote = |flags, seq: u32, ack: u32| {
        move |a, t| tcp_l3_seq(REMOTE, a, (40000, 80), flags, (seq, ack), t)
    };
    let from_guest = |flags, seq: u32, ack: u32| {
        move |a, t| tcp_l3_seq(a, REMOTE, (80, 40000), flags, (seq, ack), t)
    };
    p.inbound("syn", G1, true, new_flow(), from_remote(SYN, remote_isn, 0));
    p.outbound(
        "syn-ack",
        G1,
        true,
        first_answer(),
        from_guest(SYN | ACK, guest_isn, remote_isn + 1),
    );
    p.inbound(
        "ack",
        G1,
        true,
        hit(),
        from_remote(ACK, remote_isn + 1, guest_isn + 1),
    );
    let established = [(key, public(TcpEstablished, RA))];
    p.flows("handshake", &established);
    let (remote_next, guest_next) = (remote_isn + 1, guest_isn + 1);
    let blind: [(&str, bool, u8, u32); 5] = [
        (
            "rst far ahead",
            true,
            TCP_RST,
            remote_next.wrapping_add(1 << 30),
        ),
        (
            "rst|ack far ahead",
            true,
            TCP_RST | ACK,
            remote_next.wrapping_add(1 << 30),
        ),
        (
            "rst below what the guest acknowledged",
            true,
            TCP_RST,
            remote_next - 1,
        ),
        (
            "fin far ahead",
            true,
            TCP_FIN | ACK,
            remote_next.wrapping_add(1 << 30),
        ),
        (
            "guest rst far behind",
            false,
            TCP_RST,
            guest_next.wrapping_sub(1 << 30),
        ),
    ];
    for (name, inbound, flags, seq) in blind {
        if inbound {
            p.inbound(name, G1, true, miss(), from_remote(flags, seq, guest_next));
        } else {
            p.outbound(name, G1, true, miss(), from_guest(flags, seq, remote_next));
        }
        p.flows(name, &established);
    }
    // Data within the window moves nothing the check needs; an RST at the next sequence
    // number ends the flow (netfilter's CLOSE).
    p.inbound(
        "rst in the window",
        G1,
        true,
        hit(),
        from_remote(TCP_RST, remote_next, 0),
    );
    p.flows(
        "rst in the window",
        &[(key, public(TcpClose, RA).with_timer(Timeout::TcpClose))],
    );
    p.finish("blind rst and fin");
}
