//! Golden hairpin frames: a guest V2 sending to a mapped public IP P1 reaches P1's guest V1
//! from R, the router's address on V1's interface, ports kept; V1's replies to R reach V2 from
//! P1. The expected output is built from scratch (full checksums) and recomputed; program and
//! model must agree on everything after every frame, the connection table (both legs, the
//! binding's peer) included. P1's ingress rules decide, with V2 as the source. Collisions,
//! stale bindings, ICMP errors and what hairpin leaves to the kernel are in `hairpin_edges`.
use std::{collections::BTreeMap, net::Ipv4Addr};

use nat_common::{
    ORIGIN_GUEST, Reason,
    conntrack::{
        ASSURED, SEEN_REPLY,
        State::{self, *},
        Timeout,
    },
};
use nat_tests::{
    harness::*,
    model::{Direction, Events, Flow, Kind, Outcome, Tracked, XDP_PASS, XDP_REDIRECT},
    packet::{
        ETH_P_IP, Ip, PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_SYN, ether, tcp, udp,
        verify_checksums,
    },
};
use nat_userspace::{cidr::Cidr, firewall::Proto, state::DesiredState};

use crate::common::*;

pub const SYN: u8 = TCP_SYN;
pub const ACK: u8 = TCP_ACK;
pub const FIN: u8 = TCP_FIN;
/// Status: answered; answered and assured.
pub const R: u8 = SEEN_REPLY;
pub const RA: u8 = SEEN_REPLY | ASSURED;

/// A host behind a guest interface.
#[derive(Clone, Copy, Debug)]
pub struct Host {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub link: Link,
}

/// V1, V2 and V4 on gst0, V5 on gsb0, V6 on gsn0 (no router address).
pub struct Hosts {
    pub v1: Host,
    pub v2: Host,
    pub v4: Host,
    pub v5: Host,
    pub v6: Host,
}

pub fn hosts(t: &Topology) -> Hosts {
    let host = |ip, mac, link| Host { ip, mac, link };
    Hosts {
        v1: host(V1, V1_MAC, t.gst0),
        v2: host(V2, V2_MAC, t.gst0),
        v4: host(V4, V4_MAC, t.gst0),
        v5: host(V5, V5_MAC, t.gsb0),
        v6: host(V6, V6_MAC, t.gsn0),
    }
}

/// [`base_state`] with hairpin-friendly rules: P1 and P5 accept TCP 80, UDP 53 and echo
/// requests from the guest networks (10.0.0.0/8); P1 accepts TCP 22 from 192.0.2.0/24 only;
/// P5 accepts any ICMP from anywhere. P2 has no rule.
pub fn hairpin_policy() -> DesiredState {
    let guests: Cidr = "10.0.0.0/8".parse().expect("CIDR");
    let remote: Cidr = "192.0.2.0/24".parse().expect("CIDR");
    let mut s = base_state();
    for public in [P1, P5] {
        for svc in [
            service(Proto::Tcp, Some((80, 80)), None),
            service(Proto::Udp, Some((53, 53)), None),
            service(Proto::Icmp, None, Some((8, Some(0)))),
        ] {
            s.add_ingress(None, public, svc, vec![guests])
                .expect("valid rule");
        }
    }
    s.add_ingress(
        None,
        P1,
        service(Proto::Tcp, Some((22, 22)), None),
        vec![remote],
    )
    .expect("valid rule");
    s.add_ingress(None, P5, service(Proto::Icmp, None, None), vec![Cidr::ANY])
        .expect("valid rule");
    s
}

/// The forward leg of `sender:sport -> p:dport` in `state` with status `flags`, and its reply
/// binding at `target` <-> `r` (same state and timer, no status); timers the state's own.
#[allow(clippy::too_many_arguments)]
pub fn legs(
    sender: Ipv4Addr,
    p: Ipv4Addr,
    target: Ipv4Addr,
    r: Ipv4Addr,
    proto: u8,
    (sport, dport): (u16, u16),
    state: State,
    flags: u8,
) -> [(Flow, Tracked); 2] {
    // An echo flow: the identifier and the type each side sends (request to P, reply to R).
    let (fwd_ports, rev_ports) = if proto == PROTO_ICMP {
        ((sport, 8), (sport, 0))
    } else {
        ((sport, dport), (dport, sport))
    };
    let fwd = Flow {
        guest: sender,
        remote: p,
        guest_port: fwd_ports.0,
        remote_port: fwd_ports.1,
        proto,
        kind: Kind::HairpinFwd,
    };
    let rev = Flow {
        guest: target,
        remote: r,
        guest_port: rev_ports.0,
        remote_port: rev_ports.1,
        proto,
        kind: Kind::HairpinRev,
    };
    [
        (fwd, Tracked::new(state, ORIGIN_GUEST, flags)),
        (rev, Tracked::binding(state, (sender, sport))),
    ]
}

/// The two legs of a hairpin ICMP query flow: identifier `id`, `request` type to P and its
/// answering type back to R.
#[allow(clippy::too_many_arguments)]
pub fn icmp_legs(
    sender: Ipv4Addr,
    p: Ipv4Addr,
    target: Ipv4Addr,
    r: Ipv4Addr,
    id: u16,
    request: u8,
    state: State,
    flags: u8,
) -> [(Flow, Tracked); 2] {
    let [(mut fwd, ft), (mut rev, rt)] =
        legs(sender, p, target, r, PROTO_ICMP, (id, id), state, flags);
    fwd.remote_port = u16::from(request);
    // Echo (8) is answered by 0; timestamp, information, address mask by the next type.
    rev.remote_port = u16::from(if request == 8 { 0 } else { request + 1 });
    [(fwd, ft), (rev, rt)]
}

/// `legs` whose last packet started `timer` (both legs run the forward leg's).
pub fn timed(legs: [(Flow, Tracked); 2], timer: Timeout) -> [(Flow, Tracked); 2] {
    legs.map(|(f, t)| (f, t.with_timer(timer)))
}

/// Golden hairpin cases; `l3(src, dst, ttl)` builds the IP packet with the addresses of the
/// side it is seen on.
pub struct Hp<'a> {
    pub h: &'a Harness,
    pub errs: Vec<String>,
    pub count: usize,
}

impl Hp<'_> {
    pub fn new(h: &Harness) -> Hp<'_> {
        Hp {
            h,
            errs: Vec::new(),
            count: 0,
        }
    }

    fn run(&mut self, name: &str, from: Host, input: Vec<u8>, want: Outcome) -> Option<Outcome> {
        self.count += 1;
        let ingress = from.link.ifindex;
        let got = expect_exact(self.h, &mut self.errs, name, ingress, &input, &want)?;
        if got.action == XDP_REDIRECT
            && let Err(e) = verify_checksums(&got.frame)
        {
            self.errs
                .push(format!("{name}: output fails {e}: {}", hex(&got.frame)));
        }
        Some(got)
    }

    /// `from` sends to public `p`; `to` (P's guest) gets it from router address `r`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        name: &str,
        from: Host,
        p: Ipv4Addr,
        to: Host,
        r: Ipv4Addr,
        events: Events,
        l3: impl Fn(Ipv4Addr, Ipv4Addr, u8) -> Vec<u8>,
    ) -> Option<Outcome> {
        let input = ether(from.link.mac, from.mac, ETH_P_IP, &l3(from.ip, p, 64));
        let want = Outcome {
            action: XDP_REDIRECT,
            reason: Reason::HairpinForwarded,
            frame: ether(to.mac, to.link.mac, ETH_P_IP, &l3(r, to.ip, 63)),
            counted: Some((Direction::Inbound, p)),
            denied: None,
            events,
        };
        self.run(name, from, input, want)
    }

    /// [`Hp::forward`] where the packet leaves as `out(r, to, ttl)` (another source port).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_as(
        &mut self,
        name: &str,
        from: Host,
        p: Ipv4Addr,
        to: Host,
        r: Ipv4Addr,
        events: Events,
        l3: impl Fn(Ipv4Addr, Ipv4Addr, u8) -> Vec<u8>,
        out: impl Fn(Ipv4Addr, Ipv4Addr, u8) -> Vec<u8>,
    ) -> Option<Outcome> {
        let input = ether(from.link.mac, from.mac, ETH_P_IP, &l3(from.ip, p, 64));
        let want = Outcome {
            action: XDP_REDIRECT,
            reason: Reason::HairpinForwarded,
            frame: ether(to.mac, to.link.mac, ETH_P_IP, &out(r, to.ip, 63)),
            counted: Some((Direction::Inbound, p)),
            denied: None,
            events,
        };
        self.run(name, from, input, want)
    }

    /// [`Hp::reply`] where `from` answers as `l3` and `to` gets `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn reply_as(
        &mut self,
        name: &str,
        from: Host,
        r: Ipv4Addr,
        to: Host,
        p: Ipv4Addr,
        events: Events,
        l3: impl Fn(Ipv4Addr, Ipv4Addr, u8) -> Vec<u8>,
        out: impl Fn(Ipv4Addr, Ipv4Addr, u8) -> Vec<u8>,
    ) -> Option<Outcome> {
        let input = ether(from.link.mac, from.mac, ETH_P_IP, &l3(from.ip, r, 64));
        let want = Outcome {
            action: XDP_REDIRECT,
            reason: Reason::HairpinForwarded,
            frame: ether(to.mac, to.link.mac, ETH_P_IP, &out(p, to.ip, 63)),
            counted: Some((Direction::Outbound, from.ip)),
            denied: None,
            events,
        };
        self.run(name, from, input, want)
    }

    /// `from` (a hairpin target) answers router address `r`; `to` gets it from `p`.
    #[allow(clippy::too_many_arguments)]
    pub fn reply(
        &mut self,
        name: &str,
        from: Host,
        r: Ipv4Addr,
        to: Host,
        p: Ipv4Addr,
        events: Events,
        l3: impl Fn(Ipv4Addr, Ipv4Addr, u8) -> Vec<u8>,
    ) -> Option<Outcome> {
        let input = ether(from.link.mac, from.mac, ETH_P_IP, &l3(from.ip, r, 64));
        let want = Outcome {
            action: XDP_REDIRECT,
            reason: Reason::HairpinForwarded,
            frame: ether(to.mac, to.link.mac, ETH_P_IP, &l3(p, to.ip, 63)),
            counted: Some((Direction::Outbound, from.ip)),
            denied: None,
            events,
        };
        self.run(name, from, input, want)
    }

    /// `from` sends to public `p`, whose firewall drops it.
    pub fn denied(
        &mut self,
        name: &str,
        from: Host,
        p: Ipv4Addr,
        events: Events,
        l3: impl Fn(Ipv4Addr, Ipv4Addr, u8) -> Vec<u8>,
    ) {
        let input = ether(from.link.mac, from.mac, ETH_P_IP, &l3(from.ip, p, 64));
        let key = (Direction::Inbound, p);
        let want = dropped(&input, Reason::InboundDenied, key, events);
        self.run(name, from, input, want);
    }

    /// `from` sends `l3(from, dst, ttl)`, which the program passes untouched for `reason`.
    pub fn passed(
        &mut self,
        name: &str,
        from: Host,
        dst: Ipv4Addr,
        reason: Reason,
        events: Events,
        l3: impl Fn(Ipv4Addr, Ipv4Addr, u8) -> Vec<u8>,
    ) {
        self.passed_frame(name, from, l3(from.ip, dst, 64), reason, events);
    }

    /// `from` sends the IP packet `l3`, which the program passes untouched for `reason`.
    pub fn passed_frame(
        &mut self,
        name: &str,
        from: Host,
        l3: Vec<u8>,
        reason: Reason,
        events: Events,
    ) {
        let input = ether(from.link.mac, from.mac, ETH_P_IP, &l3);
        let want = Outcome {
            action: XDP_PASS,
            reason,
            frame: input.clone(),
            counted: None,
            denied: None,
            events,
        };
        self.run(name, from, input, want);
    }

    /// The program's connection table must be exactly `want` (the model's is compared after
    /// every frame).
    pub fn flows(&mut self, name: &str, want: &[(Flow, Tracked)]) {
        let want: BTreeMap<Flow, Tracked> = want.iter().copied().collect();
        match self.h.flows() {
            Ok(got) if got == want => {}
            Ok(got) => self.errs.push(format!(
                "{name}: CONNTRACK holds {got:#?}\n  want {want:#?}"
            )),
            Err(e) => self.errs.push(format!("{name}: {e:#}")),
        }
    }

    pub fn finish(self, what: &str) {
        assert_no_errors(&self.errs);
        eprintln!("{} {what} cases", self.count);
    }
}

pub fn bench() -> Harness {
    let h = harness();
    h.set_policy(&hairpin_policy())
        .unwrap_or_else(|e| panic!("installing the hairpin rules failed: {e:#}"));
    h
}

/// Two payload bytes for which the UDP checksum of `src -> dst`, ports 5353 -> 53, computes
/// to 0 and is sent as 0xFFFF.
fn data_for_ffff(src: Ipv4Addr, dst: Ipv4Addr) -> [u8; 2] {
    (0..=u16::MAX)
        .map(u16::to_be_bytes)
        .find(|d| udp(src, dst, 5353, 53, d, true)[6..8] == [0xff, 0xff])
        .expect("some payload sums to zero")
}

pub fn ping(ty: u8, id: u16) -> impl Fn(Ipv4Addr, Ipv4Addr, u8) -> Vec<u8> {
    move |s, d, t| icmp_l3(s, d, ty, 0, id, t)
}

pub fn tcp_f(ports: (u16, u16), flags: u8) -> impl Fn(Ipv4Addr, Ipv4Addr, u8) -> Vec<u8> {
    move |s, d, t| tcp_l3(s, d, ports, flags, t)
}

pub fn udp_f(ports: (u16, u16)) -> impl Fn(Ipv4Addr, Ipv4Addr, u8) -> Vec<u8> {
    move |s, d, t| udp_l3(s, d, ports, t)
}

#[test]
fn hairpin_translates_both_ways() {
    let h = bench();
    let t = hosts(&h.topo);
    let (v1, v2) = (t.v1, t.v2);
    let r = GST_ADDR;
    let mut b = Hp::new(&h);
    let ping_legs = |flags| legs(V2, P1, V1, r, PROTO_ICMP, (0x77, 0x77), Icmp, flags);

    b.forward("ping", v2, P1, v1, r, new_flow(), ping(8, 0x77));
    b.flows("ping opens both legs", &ping_legs(0));
    b.reply("pong", v1, r, v2, P1, first_answer(), ping(0, 0x77));
    b.forward("second ping", v2, P1, v1, r, hit(), ping(8, 0x77));

    let (out, back) = ((40000, 80), (80, 40000));
    let tcp_legs = |s, flags| legs(V2, P1, V1, r, PROTO_TCP, out, s, flags);
    b.forward("syn", v2, P1, v1, r, new_flow(), tcp_f(out, SYN));
    b.flows("syn", &[ping_legs(R), tcp_legs(TcpSynSent, 0)].concat());
    b.reply(
        "syn-ack",
        v1,
        r,
        v2,
        P1,
        first_answer(),
        tcp_f(back, SYN | ACK),
    );
    b.flows(
        "binding follows",
        &[ping_legs(R), tcp_legs(TcpSynRecv, R)].concat(),
    );
    b.forward("ack", v2, P1, v1, r, hit(), tcp_f(out, ACK));
    b.forward("data with options", v2, P1, v1, r, fast(), |s, d, t| {
        Ip::new(PROTO_TCP, s, d).ttl(t).packet(&tcp(
            s,
            d,
            40000,
            80,
            &[2, 4, 5, 0xb4, 1, 1, 4, 2],
            b"GET /",
        ))
    });
    b.reply("data back", v1, r, v2, P1, fast(), |s, d, t| {
        Ip::new(PROTO_TCP, s, d)
            .ttl(t)
            .packet(&tcp(s, d, 80, 40000, &[], &[0x42; 700]))
    });
    b.reply(
        "fin from the target",
        v1,
        r,
        v2,
        P1,
        hit(),
        tcp_f(back, FIN | ACK),
    );
    b.flows(
        "status on the forward leg only",
        &[ping_legs(R), tcp_legs(TcpFinWait, RA)].concat(),
    );

    let q = (5353, 53);
    let udp_legs = |s, flags| legs(V2, P1, V1, r, PROTO_UDP, q, s, flags);
    b.forward("udp query", v2, P1, v1, r, new_flow(), udp_f(q));
    b.reply(
        "udp answer",
        v1,
        r,
        v2,
        P1,
        first_answer(),
        udp_f((53, 5353)),
    );
    b.forward("udp without checksum", v2, P1, v1, r, hit(), |s, d, t| {
        udp_ip(s, d, t, b"nock", false)
    });
    let zero_out = data_for_ffff(r, V1);
    b.forward(
        "udp result 0 sent as ffff",
        v2,
        P1,
        v1,
        r,
        fast(),
        move |s, d, t| udp_ip(s, d, t, &zero_out, true),
    );
    let ffff_in = data_for_ffff(V2, P1);
    b.forward("udp ffff before", v2, P1, v1, r, fast(), move |s, d, t| {
        udp_ip(s, d, t, &ffff_in, true)
    });
    b.forward(
        "1400 bytes through mtu 1400",
        v2,
        P1,
        v1,
        r,
        fast(),
        |s, d, t| udp_ip(s, d, t, &[7; 1400 - 28], true),
    );
    b.flows(
        "three flows, six entries",
        &[
            ping_legs(R),
            tcp_legs(TcpFinWait, RA),
            udp_legs(UdpReplied, RA),
        ]
        .concat(),
    );
    b.finish("hairpin translation");
}

#[test]
fn hairpin_across_guest_interfaces() {
    let h = bench();
    let t = hosts(&h.topo);
    let mut b = Hp::new(&h);
    // gsb0 -> gst0: the source becomes the router's gst0 address.
    b.forward(
        "V5 to P1",
        t.v5,
        P1,
        t.v1,
        GST_ADDR,
        new_flow(),
        tcp_f((1234, 80), SYN),
    );
    b.reply(
        "V1 answers",
        t.v1,
        GST_ADDR,
        t.v5,
        P1,
        first_answer(),
        tcp_f((80, 1234), SYN | ACK),
    );
    // gst0 -> gsb0: the router's gsb0 address.
    b.forward(
        "V1 to P5",
        t.v1,
        P5,
        t.v5,
        GSB_ADDR,
        new_flow(),
        udp_f((5353, 53)),
    );
    b.reply(
        "V5 answers",
        t.v5,
        GSB_ADDR,
        t.v1,
        P5,
        first_answer(),
        udp_f((53, 5353)),
    );
    b.forward(
        "1401 bytes to mtu 1500",
        t.v1,
        P5,
        t.v5,
        GSB_ADDR,
        hit(),
        |s, d, t| udp_ip(s, d, t, &[7; 1401 - 28], true),
    );
    // gsn0 has no router address, but a sender there can hairpin into gst0.
    b.forward("V6 to P1", t.v6, P1, t.v1, GST_ADDR, new_flow(), ping(8, 6));
    b.reply(
        "V1 answers V6",
        t.v1,
        GST_ADDR,
        t.v6,
        P1,
        first_answer(),
        ping(0, 6),
    );
    // A reply to the router's address of another interface is not a hairpin reply.
    b.passed(
        "V1 to the gsb0 address",
        t.v1,
        GSB_ADDR,
        Reason::NoRoute,
        miss(),
        udp_f((53, 5353)),
    );
    b.flows(
        "a binding on each target's interface",
        &[
            legs(V5, P1, V1, GST_ADDR, PROTO_TCP, (1234, 80), TcpSynRecv, R),
            legs(V1, P5, V5, GSB_ADDR, PROTO_UDP, (5353, 53), UdpReplied, RA),
            legs(V6, P1, V1, GST_ADDR, PROTO_ICMP, (6, 6), Icmp, R),
        ]
        .concat(),
    );
    b.finish("hairpin across interfaces");
}

#[test]
fn hairpin_to_own_public_ip() {
    let h = bench();
    let t = hosts(&h.topo);
    let (v1, r) = (t.v1, GST_ADDR);
    let mut b = Hp::new(&h);
    b.forward("V1 to P1", v1, P1, v1, r, new_flow(), udp_f((5353, 53)));
    b.reply(
        "V1 answers itself",
        v1,
        r,
        v1,
        P1,
        first_answer(),
        udp_f((53, 5353)),
    );
    b.forward(
        "same ports both ends",
        v1,
        P1,
        v1,
        r,
        new_flow(),
        tcp_f((80, 80), SYN),
    );
    b.reply(
        "answer",
        v1,
        r,
        v1,
        P1,
        first_answer(),
        tcp_f((80, 80), SYN | ACK),
    );
    b.forward("V1 pings P1", v1, P1, v1, r, new_flow(), ping(8, 1));
    b.reply("and answers", v1, r, v1, P1, first_answer(), ping(0, 1));
    b.flows(
        "the guest is both ends",
        &[
            // Answered once: the answer still ran the unreplied timer.
            timed(
                legs(V1, P1, V1, r, PROTO_UDP, (5353, 53), UdpReplied, R),
                Timeout::UdpUnreplied,
            ),
            legs(V1, P1, V1, r, PROTO_TCP, (80, 80), TcpSynRecv, R),
            legs(V1, P1, V1, r, PROTO_ICMP, (1, 1), Icmp, R),
        ]
        .concat(),
    );
    b.finish("hairpin to own public IP");
}

#[test]
fn hairpin_obeys_the_public_ips_firewall() {
    let h = bench();
    let t = hosts(&h.topo);
    let (v1, v2, v5, r) = (t.v1, t.v2, t.v5, GST_ADDR);
    let mut b = Hp::new(&h);
    b.denied("P2 has no rule", v1, P2, miss(), tcp_f((40000, 80), SYN));
    b.denied("P1, another port", v2, P1, miss(), tcp_f((40000, 81), SYN));
    b.denied(
        "P1 port 22: remote sources only",
        v2,
        P1,
        miss(),
        tcp_f((40000, 22), SYN),
    );
    b.denied("echo reply to P1", v2, P1, miss(), ping(0, 5));
    b.denied("timestamp to P1", v2, P1, miss(), ping(13, 0));
    b.denied("udp 53 from the public net", v2, P1, miss(), |_, d, t| {
        udp_l3(PUB_GW, d, (5353, 53), t)
    });
    b.flows("nothing opened", &[]);
    // P5 accepts any ICMP: queries open flows, messages that open nothing still get through.
    let v5r = GSB_ADDR;
    b.forward("timestamp to P5", v1, P5, v5, v5r, new_flow(), ping(13, 0));
    b.forward("echo reply to P5", v1, P5, v5, v5r, miss(), ping(0, 9));
    b.forward("ping P5, code 1", v1, P5, v5, v5r, new_flow(), |s, d, t| {
        icmp_l3(s, d, 8, 1, 10, t)
    });
    b.flows(
        "only the requests opened flows",
        &[
            icmp_legs(V1, P5, V5, v5r, 0, 13, Icmp, 0),
            icmp_legs(V1, P5, V5, v5r, 10, 8, Icmp, 0),
        ]
        .concat(),
    );

    // An established hairpin flow outlives its rule; a new one does not.
    h.clear_flows().expect("clear");
    b.forward(
        "syn while the rule exists",
        v2,
        P1,
        v1,
        r,
        new_flow(),
        tcp_f((40000, 80), SYN),
    );
    h.set_policy(&base_state()).expect("policy");
    b.reply(
        "syn-ack",
        v1,
        r,
        v2,
        P1,
        first_answer(),
        tcp_f((80, 40000), SYN | ACK),
    );
    b.forward("ack", v2, P1, v1, r, hit(), tcp_f((40000, 80), ACK));
    b.denied("new flow refused", v2, P1, miss(), tcp_f((40001, 80), SYN));
    b.flows(
        "the old flow only",
        &legs(V2, P1, V1, r, PROTO_TCP, (40000, 80), TcpEstablished, RA),
    );
    b.finish("hairpin firewall");
}
