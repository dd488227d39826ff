//! Golden policy cases for connection tracking: replies to guest-initiated flows come in
//! without rules, a flow outlives the rule that admitted it, ICMP errors about tracked flows
//! are RELATED, TCP states progress as netfilter's do, and flows expire after their state's
//! idle timeout (configured, or netfilter's default when the setting is 0). The expected
//! states are written out here, independently of the model (which is compared as well).
use std::time::Duration;

use nat_common::{
    Event::*,
    ORIGIN_GUEST, ORIGIN_PUBLIC, TIMEOUT_SLOTS,
    conntrack::State::{self, *},
};
use nat_tests::{
    harness::*,
    model::Tracked,
    packet::{PROTO_GRE, PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};
use nat_userspace::{cidr::Cidr, firewall::Proto};

use crate::common::*;

const SYN: u8 = TCP_SYN;
const ACK: u8 = TCP_ACK;

fn guest(state: State) -> Tracked {
    Tracked::new(state, ORIGIN_GUEST, 0)
}

fn public(state: State) -> Tracked {
    Tracked::new(state, ORIGIN_PUBLIC, 0)
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
    p.inbound("tcp syn-ack", G1, true, hit(), |a, t| {
        tcp_l3(REMOTE, a, (443, 40000), SYN | ACK, t)
    });
    p.outbound("tcp ack", G1, true, hit(), |a, t| {
        tcp_l3(a, REMOTE, tcp, ACK, t)
    });
    p.outbound("udp query", G1, true, new_flow(), |a, t| {
        udp_l3(a, REMOTE, udp, t)
    });
    p.inbound("udp answer", G1, true, hit(), |a, t| {
        udp_l3(REMOTE, a, (53, 5353), t)
    });
    p.outbound("ping", G2, true, new_flow(), |a, t| {
        icmp_l3(a, REMOTE, 8, 0, 0x77, t)
    });
    p.inbound("pong", G2, true, hit(), |a, t| {
        icmp_l3(REMOTE, a, 0, 0, 0x77, t)
    });
    p.outbound("gre", G2, true, new_flow(), |a, t| {
        raw_l3(PROTO_GRE, a, REMOTE, t)
    });
    p.inbound("gre back", G2, true, hit(), |a, t| {
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
    p.inbound("udp to the tcp flow's ports", G1, false, miss(), |a, t| {
        udp_l3(REMOTE, a, (443, 40000), t)
    });
    p.flows(
        "four flows",
        &[
            (flow(G1, REMOTE, PROTO_TCP, tcp), guest(TcpEstablished)),
            (flow(G1, REMOTE, PROTO_UDP, udp), guest(UdpReplied)),
            (flow(G2, REMOTE, PROTO_ICMP, (0x77, 0x77)), guest(Icmp)),
            (flow(G2, REMOTE, PROTO_GRE, (0, 0)), guest(Other)),
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
    p.outbound("syn-ack", G1, true, hit(), |a, t| {
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
            public(TcpEstablished),
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
    p.inbound("frag needed about it", G1, true, miss(), |a, t| {
        error_l3(ROUTER, a, (3, 4), &q(a, 5353), usize::MAX, t)
    });
    p.inbound(
        "port unreachable from the remote",
        G1,
        true,
        miss(),
        |a, t| error_l3(REMOTE, a, (3, 3), &q(a, 5353), 28, t),
    );
    p.inbound("time exceeded about the ping", G1, true, miss(), |a, t| {
        let ping = icmp_l3(a, REMOTE, 8, 0, 9, 1);
        error_l3(ROUTER, a, (11, 0), &ping, usize::MAX, t)
    });
    p.inbound("about another port", G1, false, miss(), |a, t| {
        error_l3(ROUTER, a, (3, 4), &q(a, 5354), usize::MAX, t)
    });
    p.inbound("quoting no ports", G1, false, miss(), |a, t| {
        error_l3(ROUTER, a, (3, 4), &q(a, 5353), 20, t)
    });
    p.inbound(
        "about a tcp flow on those ports",
        G1,
        false,
        miss(),
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
    p.outbound("port unreachable about it", G1, true, miss(), |a, t| {
        error_l3(a, REMOTE, (3, 3), &got(a, 40000), usize::MAX, t)
    });
    p.outbound("about another query", G1, false, miss(), |a, t| {
        error_l3(a, REMOTE, (3, 3), &got(a, 40001), usize::MAX, t)
    });
    p.flows(
        "errors open nothing",
        &[
            (flow(G1, REMOTE, PROTO_UDP, (5353, 53)), guest(UdpUnreplied)),
            (flow(G1, REMOTE, PROTO_ICMP, (9, 9)), guest(Icmp)),
            (
                flow(G1, REMOTE, PROTO_UDP, (53, 40000)),
                public(UdpUnreplied),
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
    let steps: [(&str, bool, u8, State, u8); 8] = [
        ("syn", true, SYN, TcpSynSent, 0),
        ("syn-ack", false, SYN | ACK, TcpSynRecv, 0),
        ("ack", true, ACK, TcpEstablished, 0),
        (
            "fin from the originator",
            true,
            TCP_FIN | ACK,
            TcpFinWait,
            1,
        ),
        (
            "fin from the responder",
            false,
            TCP_FIN | ACK,
            TcpTimeWait,
            3,
        ),
        ("last ack", true, ACK, TcpTimeWait, 3),
        ("new syn reopens", true, SYN, TcpSynSent, 0),
        ("rst", false, TCP_RST, TcpClose, 0),
    ];
    for (i, (name, inbound, flags, state, fins)) in steps.into_iter().enumerate() {
        let events = if i == 0 { new_flow() } else { hit() };
        if inbound {
            p.inbound(name, G1, true, events, |a, t| {
                tcp_l3(REMOTE, a, (40000, 80), flags, t)
            });
        } else {
            p.outbound(name, G1, true, events, |a, t| {
                tcp_l3(a, REMOTE, (80, 40000), flags, t)
            });
        }
        let want = Tracked::new(state, ORIGIN_PUBLIC, fins);
        p.flows(name, &[(key, want)]);
    }
    h.clear_flows().expect("clear");
    let out = flow(G1, REMOTE, PROTO_TCP, (40001, 80));
    p.outbound("guest syn", G1, true, new_flow(), |a, t| {
        tcp_l3(a, REMOTE, (40001, 80), SYN, t)
    });
    p.flows("guest syn", &[(out, guest(TcpSynSent))]);
    p.inbound("refused: rst-ack", G1, true, hit(), |a, t| {
        tcp_l3(REMOTE, a, (80, 40001), TCP_RST | ACK, t)
    });
    p.flows("rst-ack", &[(out, guest(TcpClose))]);
    p.inbound("bare rst opens nothing", G1, true, miss(), |a, t| {
        tcp_l3(REMOTE, a, (40002, 80), TCP_RST, t)
    });
    p.inbound(
        "mid-stream ack: loose pickup",
        G1,
        true,
        new_flow(),
        |a, t| tcp_l3(REMOTE, a, (40003, 80), ACK, t),
    );
    let picked = flow(G1, REMOTE, PROTO_TCP, (80, 40003));
    p.flows(
        "rst and pickup",
        &[(out, guest(TcpClose)), (picked, public(TcpEstablished))],
    );
    p.finish("tcp state");
}

#[test]
fn flows_expire_after_their_idle_timeout() {
    let h = harness();
    let mut timeouts = [TEST_TIMEOUT_NS; TIMEOUT_SLOTS];
    timeouts[UdpUnreplied as usize] = 1;
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
    p.inbound("error about it: not related", G1, false, miss(), |a, t| {
        let q = udp_l3(a, REMOTE, (5353, 53), 63);
        error_l3(ROUTER, a, (3, 4), &q, usize::MAX, t)
    });
    p.flows("expired flow stays", &[(key, guest(UdpUnreplied))]);
    let recreated = ev(&[
        (ConntrackExpired, 1),
        (ConntrackMiss, 1),
        (ConntrackCreate, 1),
    ]);
    p.outbound("query again: replaced", G1, true, recreated, |a, t| {
        udp_l3(a, REMOTE, (5353, 53), t)
    });
    p.flows("replaced", &[(key, guest(UdpUnreplied))]);

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
        let ports = if proto == PROTO_ICMP {
            (port, port)
        } else {
            (port, 7)
        };
        let f = flow(G1, REMOTE, proto, ports);
        h.put_flow(f, public(state), ago(secs)).expect("put flow");
        let name = format!("{state:?} last seen {secs} s ago");
        let events = if live { hit() } else { expired };
        let back = (ports.1, ports.0);
        p.inbound(&name, G1, live, events, |a, t| match proto {
            PROTO_UDP => udp_l3(REMOTE, a, back, t),
            PROTO_ICMP => icmp_l3(REMOTE, a, 0, 0, port, t),
            _ => tcp_l3(REMOTE, a, back, ACK, t),
        });
    }
    p.finish("expiry");
}

/// Reproducer of a program bug (not fixed here): `policy::check` looks every frame up as a flow
/// of its own first, ICMP errors included, and every ICMP message but echo gets ports 0 in its
/// key. So once a guest has sent a non-echo ICMP message (or a ping with identifier 0) to a
/// host, any ICMP error from that host, about any flow, and any non-echo ICMP message or
/// identifier-0 ping from it, is ESTABLISHED and passes without a rule. Expected (netfilter,
/// and the program's own comment "ICMP errors ... only as RELATED"): an error gets in only as
/// RELATED to the flow it quotes. Run with `-- --ignored`.
#[test]
#[ignore = "program bug: ICMP errors and non-echo ICMP match a flow keyed with ports 0"]
fn icmp_errors_only_enter_as_related() {
    let h = harness();
    let mut p = Probe::new(&h);
    p.outbound(
        "guest sends a timestamp request",
        G1,
        true,
        new_flow(),
        |a, t| icmp_l3(a, REMOTE, 13, 0, 0, t),
    );
    p.inbound(
        "error about a flow never seen",
        G1,
        false,
        miss(),
        |a, t| {
            let q = udp_l3(a, REMOTE, (1234, 9999), 63);
            error_l3(REMOTE, a, (3, 3), &q, usize::MAX, t)
        },
    );
    p.inbound("redirect", G1, false, miss(), |a, t| {
        icmp_l3(REMOTE, a, 5, 1, 0, t)
    });
    p.inbound("echo request, identifier 0", G1, false, miss(), |a, t| {
        icmp_l3(REMOTE, a, 8, 0, 0, t)
    });
    p.finish("icmp error");
}

/// Reproducer of a divergence from netfilter (and so from natd's nftables slow path), not fixed
/// here: `conntrack::next` only lets the originator's SYN reopen a closed flow; a SYN from the
/// other side of a guest-initiated flow in TIME_WAIT (or CLOSE, or any state) is a hit, so the
/// remote opens a connection to the guest's port without an ingress rule. netfilter kills the
/// old entry and tracks that SYN as NEW, which the ingress rules then refuse.
#[test]
#[ignore = "program bug: a reply-direction SYN on a closed flow is admitted as ESTABLISHED"]
fn reply_side_syn_does_not_reopen_a_closed_flow() {
    let h = harness();
    let mut p = Probe::new(&h);
    let out = |flags| move |a, t| tcp_l3(a, REMOTE, (40000, 80), flags, t);
    let back = |flags| move |a, t| tcp_l3(REMOTE, a, (80, 40000), flags, t);
    p.outbound("syn", G1, true, new_flow(), out(SYN));
    p.inbound("syn-ack", G1, true, hit(), back(SYN | ACK));
    p.outbound("ack", G1, true, hit(), out(ACK));
    p.outbound("fin", G1, true, hit(), out(TCP_FIN | ACK));
    p.inbound("fin", G1, true, hit(), back(TCP_FIN | ACK));
    p.outbound("last ack", G1, true, hit(), out(ACK));
    let key = flow(G1, REMOTE, PROTO_TCP, (40000, 80));
    p.flows(
        "time wait",
        &[(key, Tracked::new(TcpTimeWait, ORIGIN_GUEST, 3))],
    );
    p.inbound("new syn from the remote", G1, false, miss(), back(SYN));
    p.finish("reply-side syn");
}
