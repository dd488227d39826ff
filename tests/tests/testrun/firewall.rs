//! Golden policy cases for rules: the ingress firewall of each public IP (closed without
//! rules; a rule opens exactly its protocol, port range or ICMP type/code, and source CIDRs)
//! and the egress policy (default deny or allow, exceptions, protocol `all`). Probes sit just
//! inside and just outside every range and prefix. Rules go in through natd's desired state
//! and compile step; the last test checks the bench writes the maps exactly as natd does.
use std::net::Ipv4Addr;

use nat_common::{
    ORIGIN_PUBLIC,
    conntrack::State::{Icmp as IcmpState, TcpSynSent, UdpUnreplied},
};
use nat_tests::{
    harness::*,
    model::Tracked,
    packet::{PROTO_ESP, PROTO_GRE, PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_SYN},
};
use nat_userspace::{
    cidr::Cidr,
    ebpf::{Dataplane, FastPath as _},
    firewall::{
        Proto::{self, *},
        icmp_field,
    },
    state::DesiredState,
    tables::{Tables, plan},
};

use crate::common::*;

fn cidr(s: &str) -> Cidr {
    s.parse().expect("CIDR")
}

fn ingress(
    s: &mut DesiredState,
    public: Ipv4Addr,
    proto: Proto,
    ports: Option<(u16, u16)>,
    icmp: Option<(u8, Option<u8>)>,
    cidrs: &[&str],
) {
    let cidrs = cidrs.iter().map(|c| cidr(c)).collect();
    s.add_ingress(None, public, service(proto, ports, icmp), cidrs)
        .expect("valid ingress rule");
}

fn egress(s: &mut DesiredState, proto: Proto, ports: Option<(u16, u16)>, cidrs: &[&str]) {
    let cidrs = cidrs.iter().map(|c| cidr(c)).collect();
    s.add_egress(None, service(proto, ports, None), cidrs)
        .expect("valid egress rule");
}

/// ICMP type and code as CloudStack gives them (-1 = any), through natd's conversion.
fn cloudstack_icmp(ty: i64, code: i64) -> Option<(u8, Option<u8>)> {
    let ty = icmp_field("icmp type", Some(ty)).expect("type");
    let code = icmp_field("icmp code", Some(code)).expect("code");
    ty.map(|t| (t, code))
}

const R6: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 6);
const R127: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 127);
const R128: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 128);
const R200: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
const SYN: u8 = TCP_SYN;

#[test]
fn public_ip_without_rules_drops_everything() {
    let h = harness();
    let mut p = Probe::new(&h);
    let syn = |sp| move |a, t| tcp_l3(REMOTE, a, (sp, 22), SYN, t);
    p.inbound("tcp syn", G1, false, miss(), syn(40000));
    p.inbound("tcp ack", G1, false, miss(), |a, t| {
        tcp_l3(REMOTE, a, (40000, 22), TCP_ACK, t)
    });
    p.inbound("udp", G1, false, miss(), |a, t| {
        udp_l3(REMOTE, a, (5353, 53), t)
    });
    p.inbound("ping", G1, false, miss(), |a, t| {
        icmp_l3(REMOTE, a, 8, 0, 7, t)
    });
    p.inbound("gre", G1, false, miss(), |a, t| {
        raw_l3(PROTO_GRE, REMOTE, a, t)
    });
    p.inbound(
        "frag needed about nothing tracked",
        G1,
        false,
        untracked(),
        |a, t| {
            let q = udp_l3(a, REMOTE, (5353, 53), 63);
            error_l3(ROUTER, a, (3, 4), &q, usize::MAX, t)
        },
    );
    p.flows("nothing tracked", &[]);

    // Opening P2 leaves P1 closed.
    let mut s = base_state();
    ingress(&mut s, P2, Tcp, None, None, &["0.0.0.0/0"]);
    h.set_policy(&s).expect("policy");
    p.inbound("P1 still closed", G1, false, miss(), syn(40001));
    p.inbound("P2 open", G2, true, new_flow(), syn(40001));
    p.finish("closed public IP");
}

#[test]
fn rule_opens_exactly_its_ports_and_sources() {
    let h = harness();
    let mut s = base_state();
    ingress(&mut s, P1, Tcp, Some((1000, 2000)), None, &["192.0.2.0/25"]);
    ingress(&mut s, P1, Udp, None, None, &["192.0.2.7/32"]);
    ingress(&mut s, P2, Tcp, Some((22, 22)), None, &[]);
    h.set_policy(&s).expect("policy");
    let mut p = Probe::new(&h);
    // Each probe its own source port: allowed ones open flows the next must not hit.
    let tcp = |src, sp, dp| move |a, t| tcp_l3(src, a, (sp, dp), SYN, t);
    let udp = |src, sp, dp| move |a, t| udp_l3(src, a, (sp, dp), t);
    p.inbound(
        "tcp 999, below the range",
        G1,
        false,
        miss(),
        tcp(REMOTE, 1, 999),
    );
    p.inbound(
        "tcp 1000, first port",
        G1,
        true,
        new_flow(),
        tcp(REMOTE, 2, 1000),
    );
    p.inbound(
        "tcp 2000, last port",
        G1,
        true,
        new_flow(),
        tcp(REMOTE, 3, 2000),
    );
    p.inbound(
        "tcp 2001, above the range",
        G1,
        false,
        miss(),
        tcp(REMOTE, 4, 2001),
    );
    p.inbound(
        "last address of /25",
        G1,
        true,
        new_flow(),
        tcp(R127, 5, 1500),
    );
    p.inbound(
        "first address after /25",
        G1,
        false,
        miss(),
        tcp(R128, 6, 1500),
    );
    p.inbound(
        "source on another net",
        G1,
        false,
        miss(),
        tcp(PUB_GW, 7, 1500),
    );
    p.inbound(
        "udp not in the tcp rule",
        G1,
        false,
        miss(),
        udp(R6, 8, 1500),
    );
    p.inbound("udp, any port: 1", G1, true, new_flow(), udp(REMOTE, 9, 1));
    p.inbound(
        "udp, any port: 65535",
        G1,
        true,
        new_flow(),
        udp(REMOTE, 10, 65535),
    );
    p.inbound(
        "udp from the /32's neighbour",
        G1,
        false,
        miss(),
        udp(R6, 11, 53),
    );
    p.inbound("no icmp rule", G1, false, miss(), |a, t| {
        icmp_l3(REMOTE, a, 8, 0, 12, t)
    });
    p.inbound("P2's port on P1", G1, false, miss(), tcp(R200, 13, 22));
    p.inbound(
        "P2 port 22, empty CIDRs = any",
        G2,
        true,
        new_flow(),
        tcp(R200, 14, 22),
    );
    p.inbound("P2 port 23", G2, false, miss(), tcp(R200, 15, 23));
    p.inbound("P2 port 21", G2, false, miss(), tcp(R200, 16, 21));
    let syn_sent = Tracked::new(TcpSynSent, ORIGIN_PUBLIC, 0);
    let unreplied = Tracked::new(UdpUnreplied, ORIGIN_PUBLIC, 0);
    p.flows(
        "one flow per allowed probe",
        &[
            (flow(G1, REMOTE, PROTO_TCP, (1000, 2)), syn_sent),
            (flow(G1, REMOTE, PROTO_TCP, (2000, 3)), syn_sent),
            (flow(G1, R127, PROTO_TCP, (1500, 5)), syn_sent),
            (flow(G1, REMOTE, PROTO_UDP, (1, 9)), unreplied),
            (flow(G1, REMOTE, PROTO_UDP, (65535, 10)), unreplied),
            (flow(G2, R200, PROTO_TCP, (22, 14)), syn_sent),
        ],
    );
    p.finish("port and source");
}

#[test]
fn icmp_rules_match_type_and_code() {
    let h = harness();
    let mut s = base_state();
    ingress(&mut s, P1, Icmp, None, cloudstack_icmp(8, 0), &[]);
    ingress(
        &mut s,
        P1,
        Icmp,
        None,
        cloudstack_icmp(3, -1),
        &["192.0.2.0/24"],
    );
    ingress(
        &mut s,
        P2,
        Icmp,
        None,
        cloudstack_icmp(-1, -1),
        &["0.0.0.0/0"],
    );
    h.set_policy(&s).expect("policy");
    let mut p = Probe::new(&h);
    let msg = |ty, code, id| move |a, t| icmp_l3(REMOTE, a, ty, code, id, t);
    // An error about a flow nothing tracks: only a rule can let it in (and it opens nothing).
    let error = |src, ty, code| {
        move |a, t| {
            let q = udp_l3(a, REMOTE, (5000, 9), 63);
            error_l3(src, a, (ty, code), &q, usize::MAX, t)
        }
    };
    p.inbound("echo request 8/0", G1, true, new_flow(), msg(8, 0, 1));
    p.inbound("echo request, code 1", G1, false, miss(), msg(8, 1, 2));
    p.inbound("echo reply", G1, false, miss(), msg(0, 0, 3));
    p.inbound("timestamp", G1, false, miss(), msg(13, 0, 0));
    p.inbound(
        "frag needed, type 3 any code",
        G1,
        true,
        untracked(),
        error(ROUTER, 3, 4),
    );
    p.inbound(
        "host unreachable 3/1",
        G1,
        true,
        untracked(),
        error(ROUTER, 3, 1),
    );
    p.inbound(
        "type 3 from outside the CIDR",
        G1,
        false,
        untracked(),
        error(PUB_GW, 3, 4),
    );
    p.inbound(
        "time exceeded",
        G1,
        false,
        untracked(),
        error(ROUTER, 11, 0),
    );
    p.inbound("any icmp: timestamp", G2, true, new_flow(), msg(13, 0, 0));
    p.inbound("any icmp: echo", G2, true, new_flow(), msg(8, 0, 9));
    p.inbound(
        "any icmp: time exceeded",
        G2,
        true,
        untracked(),
        error(ROUTER, 11, 0),
    );
    let icmp = Tracked::new(IcmpState, ORIGIN_PUBLIC, 0);
    // Keyed by identifier and the type the guest answers with.
    p.flows(
        "query requests open flows, nothing else does",
        &[
            (flow(G1, REMOTE, PROTO_ICMP, (1, 0)), icmp),
            (flow(G2, REMOTE, PROTO_ICMP, (9, 0)), icmp),
            (flow(G2, REMOTE, PROTO_ICMP, (0, 14)), icmp),
        ],
    );
    p.finish("icmp rule");
}

#[test]
fn egress_default_deny_with_allow_exception() {
    let h = harness();
    let mut s = base_state();
    s.set_egress_default_allow(false);
    egress(&mut s, Tcp, Some((443, 443)), &["192.0.2.0/24"]);
    h.set_policy(&s).expect("policy");
    let mut p = Probe::new(&h);
    let tcp = |dst, sp, dp| move |a, t| tcp_l3(a, dst, (sp, dp), SYN, t);
    p.outbound(
        "tcp 443 to the net",
        G1,
        true,
        new_flow(),
        tcp(REMOTE, 40000, 443),
    );
    p.outbound("tcp 80", G1, false, miss(), tcp(REMOTE, 40001, 80));
    p.outbound("tcp 444", G1, false, miss(), tcp(REMOTE, 40002, 444));
    p.outbound(
        "tcp 443 elsewhere",
        G1,
        false,
        miss(),
        tcp(PUB_GW, 40003, 443),
    );
    p.outbound("udp 443", G1, false, miss(), |a, t| {
        udp_l3(a, REMOTE, (40004, 443), t)
    });
    p.outbound("ping", G2, false, miss(), |a, t| {
        icmp_l3(a, REMOTE, 8, 0, 1, t)
    });
    p.outbound("gre", G2, false, miss(), |a, t| {
        raw_l3(PROTO_GRE, a, REMOTE, t)
    });
    // The allowed flow's reply needs no ingress rule.
    p.inbound(
        "reply to the allowed flow",
        G1,
        true,
        first_answer(),
        |a, t| tcp_l3(REMOTE, a, (443, 40000), SYN | TCP_ACK, t),
    );
    p.inbound("reply to a denied one", G1, false, miss(), |a, t| {
        tcp_l3(REMOTE, a, (80, 40001), SYN | TCP_ACK, t)
    });
    p.finish("egress default deny");
}

#[test]
fn egress_default_allow_with_deny_exceptions() {
    let h = harness();
    let mut s = base_state();
    egress(&mut s, Udp, Some((53, 53)), &["192.0.2.7/32"]);
    s.add_egress(None, service(Icmp, None, Some((8, None))), vec![Cidr::ANY])
        .expect("valid egress rule");
    h.set_policy(&s).expect("policy");
    let mut p = Probe::new(&h);
    let udp = |dst, sp, dp| move |a, t| udp_l3(a, dst, (sp, dp), t);
    p.outbound("udp 53 to the /32", G1, false, miss(), udp(REMOTE, 1, 53));
    p.outbound(
        "udp 54 to the /32",
        G1,
        true,
        new_flow(),
        udp(REMOTE, 2, 54),
    );
    p.outbound("udp 53 next door", G1, true, new_flow(), udp(R6, 3, 53));
    p.outbound("tcp 53 to the /32", G1, true, new_flow(), |a, t| {
        tcp_l3(a, REMOTE, (4, 53), SYN, t)
    });
    p.outbound("echo request", G1, false, miss(), |a, t| {
        icmp_l3(a, PUB_GW, 8, 0, 5, t)
    });
    p.outbound("timestamp opens a flow", G1, true, new_flow(), |a, t| {
        icmp_l3(a, PUB_GW, 13, 0, 0, t)
    });
    p.finish("egress default allow");
}

/// While natd turns the egress default over, egress is closed: no guest opens a flow, whatever
/// the rules say; a flow opened before goes on. Opened again, the default and its exceptions
/// apply as before.
#[test]
fn closed_egress_opens_no_flow_but_open_flows_go_on() {
    let h = harness();
    let mut s = base_state();
    egress(&mut s, Udp, Some((53, 53)), &["192.0.2.7/32"]);
    h.set_policy(&s).expect("policy");
    let mut p = Probe::new(&h);
    let udp = |dst, sp, dp| move |a, t| udp_l3(a, dst, (sp, dp), t);
    p.outbound("open: udp 54", G1, true, new_flow(), udp(REMOTE, 2, 54));
    h.set_egress_closed(true).expect("close egress");
    p.outbound("closed: udp 55", G1, false, miss(), udp(REMOTE, 3, 55));
    p.outbound("closed: tcp 443", G2, false, miss(), |a, t| {
        tcp_l3(a, REMOTE, (4, 443), SYN, t)
    });
    p.outbound(
        "closed: the flow opened before",
        G1,
        true,
        hit(),
        udp(REMOTE, 2, 54),
    );
    h.set_egress_closed(false).expect("open egress");
    p.outbound(
        "open again: udp 55",
        G1,
        true,
        new_flow(),
        udp(REMOTE, 3, 55),
    );
    p.outbound(
        "open again: udp 53 to the /32",
        G1,
        false,
        miss(),
        udp(REMOTE, 5, 53),
    );
    p.finish("egress closed");
}

#[test]
fn egress_rule_for_all_protocols() {
    let h = harness();
    let mut s = base_state();
    s.set_egress_default_allow(false);
    egress(&mut s, All, None, &["192.0.2.0/24"]);
    h.set_policy(&s).expect("policy");
    let mut p = Probe::new(&h);
    let raw = |proto, dst| move |a, t| raw_l3(proto, a, dst, t);
    p.outbound(
        "deny, all allowed: gre",
        G1,
        true,
        new_flow(),
        raw(PROTO_GRE, REMOTE),
    );
    p.outbound(
        "deny, all allowed: esp",
        G1,
        true,
        new_flow(),
        raw(PROTO_ESP, REMOTE),
    );
    p.outbound("deny, all allowed: udp", G1, true, new_flow(), |a, t| {
        udp_l3(a, R200, (1, 2), t)
    });
    p.outbound(
        "deny, outside: gre",
        G1,
        false,
        miss(),
        raw(PROTO_GRE, PUB_GW),
    );

    let mut s = base_state();
    egress(&mut s, All, None, &["192.0.2.7/32"]);
    h.set_policy(&s).expect("policy");
    h.clear_flows().expect("clear");
    p.outbound(
        "allow, all denied: gre",
        G1,
        false,
        miss(),
        raw(PROTO_GRE, REMOTE),
    );
    p.outbound("allow, all denied: tcp", G1, false, miss(), |a, t| {
        tcp_l3(a, REMOTE, (1, 2), SYN, t)
    });
    p.outbound(
        "allow, outside: gre",
        G1,
        true,
        new_flow(),
        raw(PROTO_GRE, R6),
    );
    p.outbound(
        "allow, outside: esp",
        G2,
        true,
        new_flow(),
        raw(PROTO_ESP, PUB_GW),
    );
    p.finish("egress all");
}

/// The bench writes the LPM maps itself (small mapping maps); natd's `Dataplane` must write the
/// same entries for the same states, additions and removals alike.
#[test]
fn bench_writes_firewall_maps_as_natd_does() {
    let h = harness();
    let sizes = nat_userspace::ebpf::Sizes {
        flows: 1024,
        mappings: 1024,
    };
    let mut dp = Dataplane::load(sizes).unwrap_or_else(|e| panic!("natd's Dataplane::load: {e:#}"));
    let mut a = base_state();
    ingress(
        &mut a,
        P1,
        Tcp,
        Some((1000, 2000)),
        None,
        &["192.0.2.0/25", "10.0.0.0/8"],
    );
    ingress(&mut a, P1, Icmp, None, Some((3, Some(4))), &[]);
    ingress(&mut a, P2, Udp, Some((1, 65535)), None, &["192.0.2.7/32"]);
    ingress(&mut a, P2, Icmp, None, Some((8, None)), &["192.0.2.0/24"]);
    a.set_egress_default_allow(false);
    egress(&mut a, Tcp, Some((443, 444)), &["192.0.2.0/24"]);
    egress(&mut a, All, None, &["198.51.100.0/24"]);
    let mut b = base_state();
    ingress(&mut b, P2, Udp, Some((1, 65535)), None, &["192.0.2.7/32"]);
    egress(&mut b, Udp, None, &["192.0.2.7/32"]);

    let (mut state, mut tables) = (DesiredState::default(), Tables::default());
    for (name, next) in [("rules added", &a), ("rules removed", &b)] {
        let next_tables = Tables::of(next);
        for (op, _) in plan(&state, &tables, next, &next_tables) {
            dp.apply(&op)
                .unwrap_or_else(|e| panic!("{name}: natd applying {op:?}: {e:#}"));
        }
        (state, tables) = (next.clone(), next_tables);
        h.set_policy(next).expect("policy");
        let natd = nat_tests::harness::maps::firewall_entries(dp.ebpf_mut()).expect("natd maps");
        let bench = h.firewall_entries().expect("bench maps");
        assert!(!natd.is_empty(), "{name}: no entries");
        assert_eq!(
            bench, natd,
            "{name}: bench and natd wrote different entries"
        );
        let deny = dp.config().expect("natd CONFIG").egress_default_deny;
        assert_eq!(deny, u32::from(!next.egress_default_allow()), "{name}");
    }
}
