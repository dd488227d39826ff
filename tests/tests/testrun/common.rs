//! Shared helpers of the `testrun` tests: bench setup, short frame constructors, the
//! comparison of program, model and hand-written expectation, and [`Probe`] for the policy
//! tests.
use std::{collections::BTreeMap, net::Ipv4Addr};

use nat_common::{
    Event::{self, *},
    Reason,
};
use nat_tests::{
    harness::{Harness, P1, P2, PUB_GW_MAC, Topology, V1, V1_MAC, V2, V2_MAC, allow_all},
    model::{Direction, Events, Flow, Kind, Outcome, Tracked, XDP_DROP, XDP_REDIRECT},
    packet::{
        ETH_P_IP, Ip, PROTO_ICMP, PROTO_TCP, PROTO_UDP, ether, icmp, icmp_error, tcp, tcp_flags,
        tcp_seq, udp,
    },
};

/// A bench without firewall rules (every public IP closed) and egress allowed.
pub fn harness() -> Harness {
    match Harness::new() {
        Ok(h) => h,
        Err(e) => panic!("test bench setup failed (needs root, netns and BPF): {e:#}"),
    }
}

/// A bench whose public IPs accept TCP, UDP and ICMP from anywhere ([`allow_all`]).
pub fn open_harness() -> Harness {
    let h = harness();
    h.set_policy(&allow_all())
        .unwrap_or_else(|e| panic!("installing allow-all rules failed: {e:#}"));
    h
}

/// A router on the Internet side that sends ICMP errors.
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

pub fn udp_ip(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, data: &[u8], csum: bool) -> Vec<u8> {
    Ip::new(PROTO_UDP, src, dst)
        .ttl(ttl)
        .packet(&udp(src, dst, 5353, 53, data, csum))
}

pub fn tcp_ip(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, opts: &[u8], data: &[u8]) -> Vec<u8> {
    Ip::new(PROTO_TCP, src, dst)
        .ttl(ttl)
        .packet(&tcp(src, dst, 40000, 443, opts, data))
}

pub fn icmp_ip(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, msg: &[u8]) -> Vec<u8> {
    Ip::new(PROTO_ICMP, src, dst).ttl(ttl).packet(msg)
}

/// Ethernet framing as on the bench's links.
#[derive(Clone, Copy)]
pub struct Wire(pub Topology);

impl Wire {
    /// Arriving on pub0 from the gateway.
    pub fn arriving_public(&self, l3: &[u8]) -> Vec<u8> {
        ether(self.0.pub0.mac, PUB_GW_MAC, ETH_P_IP, l3)
    }
    /// Arriving on gst0 from a guest.
    pub fn arriving_guest(&self, mac: [u8; 6], l3: &[u8]) -> Vec<u8> {
        ether(self.0.gst0.mac, mac, ETH_P_IP, l3)
    }
    /// Redirected out of gst0 to a guest.
    pub fn leaving_guest(&self, mac: [u8; 6], l3: &[u8]) -> Vec<u8> {
        ether(mac, self.0.gst0.mac, ETH_P_IP, l3)
    }
    /// Redirected out of pub0 to the gateway.
    pub fn leaving_public(&self, l3: &[u8]) -> Vec<u8> {
        ether(PUB_GW_MAC, self.0.pub0.mac, ETH_P_IP, l3)
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where two frames differ, for failure messages.
pub fn diff(a: &[u8], b: &[u8]) -> String {
    if a.len() != b.len() {
        return format!("lengths {} vs {}", a.len(), b.len());
    }
    let at: Vec<_> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    if at.is_empty() {
        return "same bytes".into();
    }
    format!("bytes differ at {at:?}:\n  {}\n  {}", hex(a), hex(b))
}

pub fn describe(o: &Outcome) -> String {
    format!(
        "action {} {:?} counted {:?} denied {:?}, {}",
        o.action, o.reason, o.counted, o.denied, o.events
    )
}

/// Runs `frame` through program and model: they must agree on everything (events included),
/// and both must match `want` on the verdict (action, reason, bytes, counters) and, if
/// `with_events`, on the events too. Mismatches go to `errs`. Returns the program's outcome.
fn expect_with(
    h: &Harness,
    errs: &mut Vec<String>,
    name: &str,
    ingress: u32,
    frame: &[u8],
    want: &Outcome,
    with_events: bool,
) -> Option<Outcome> {
    let got = match h.run(ingress, frame) {
        Ok(o) => o,
        Err(e) => {
            errs.push(format!("{name}: {e:#}"));
            return None;
        }
    };
    let model = h.run_model(ingress, frame);
    if got != model {
        errs.push(format!(
            "{name}: program gave {}, model {}; {}",
            describe(&got),
            describe(&model),
            diff(&got.frame, &model.frame)
        ));
    }
    if let Err(e) = h.check_flows() {
        errs.push(format!("{name}: {e:#}"));
    }
    for (who, o) in [("program", &got), ("model", &model)] {
        let same = if with_events {
            o == want
        } else {
            o.same_verdict(want)
        };
        if !same {
            let (d, w) = (describe(o), describe(want));
            errs.push(format!(
                "{name}: {who} gave {d}, want {w}; {}",
                diff(&o.frame, &want.frame)
            ));
        }
    }
    Some(got)
}

/// [`expect_with`], the events left to the program/model comparison.
pub fn expect(
    h: &Harness,
    errs: &mut Vec<String>,
    name: &str,
    ingress: u32,
    frame: &[u8],
    want: &Outcome,
) -> Option<Outcome> {
    expect_with(h, errs, name, ingress, frame, want, false)
}

/// [`expect_with`], events included.
pub fn expect_exact(
    h: &Harness,
    errs: &mut Vec<String>,
    name: &str,
    ingress: u32,
    frame: &[u8],
    want: &Outcome,
) -> Option<Outcome> {
    expect_with(h, errs, name, ingress, frame, want, true)
}

pub fn assert_no_errors(errs: &[String]) {
    assert!(
        errs.is_empty(),
        "{} failures:\n{}",
        errs.len(),
        errs.join("\n")
    );
}

/// Conntrack events, by name.
pub fn ev(list: &[(Event, u64)]) -> Events {
    Events::of(list)
}
/// A frame that found no flow and opened one.
pub fn new_flow() -> Events {
    ev(&[(ConntrackMiss, 1), (ConntrackCreate, 1)])
}
/// A frame of a live flow through the state machine.
pub fn hit() -> Events {
    ev(&[(ConntrackHit, 1)])
}
/// The first frame of a flow's reply direction: through the state machine, its route
/// resolved.
pub fn first_answer() -> Events {
    ev(&[(ConntrackHit, 1), (RouteResolved, 1)])
}
/// A frame of an assured flow that took its direction's cached rewrite and route.
pub fn fast() -> Events {
    ev(&[(FastPath, 1)])
}
/// A frame that found no flow and opened none (denied, a bare RST, an echo reply).
pub fn miss() -> Events {
    ev(&[(ConntrackMiss, 1)])
}
/// A frame connection tracking does not look up: ICMP other than queries (errors, RELATED
/// or not, and other messages). It opens no flow either.
pub fn untracked() -> Events {
    Events::default()
}

/// A mapping as the policy tests use it.
#[derive(Clone, Copy, Debug)]
pub struct Guest {
    pub public: Ipv4Addr,
    pub private: Ipv4Addr,
    pub mac: [u8; 6],
}
pub const G1: Guest = Guest {
    public: P1,
    private: V1,
    mac: V1_MAC,
};
pub const G2: Guest = Guest {
    public: P2,
    private: V2,
    mac: V2_MAC,
};

pub fn tcp_l3(src: Ipv4Addr, dst: Ipv4Addr, ports: (u16, u16), flags: u8, ttl: u8) -> Vec<u8> {
    Ip::new(PROTO_TCP, src, dst).ttl(ttl).packet(&tcp_flags(
        src,
        dst,
        ports.0,
        ports.1,
        flags,
        &[],
        b"",
    ))
}

/// A TCP segment with its own sequence and acknowledgment numbers.
pub fn tcp_l3_seq(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ports: (u16, u16),
    flags: u8,
    seq_ack: (u32, u32),
    ttl: u8,
) -> Vec<u8> {
    Ip::new(PROTO_TCP, src, dst).ttl(ttl).packet(&tcp_seq(
        src,
        dst,
        ports,
        flags,
        seq_ack,
        &[],
        b"",
    ))
}

pub fn udp_l3(src: Ipv4Addr, dst: Ipv4Addr, ports: (u16, u16), ttl: u8) -> Vec<u8> {
    Ip::new(PROTO_UDP, src, dst)
        .ttl(ttl)
        .packet(&udp(src, dst, ports.0, ports.1, b"data", true))
}

/// An ICMP message `ty`/`code` with identifier `id` (echo) and a short body.
pub fn icmp_l3(src: Ipv4Addr, dst: Ipv4Addr, ty: u8, code: u8, id: u16, ttl: u8) -> Vec<u8> {
    let [a, b] = id.to_be_bytes();
    icmp_ip(src, dst, ttl, &icmp(ty, code, [a, b, 0, 1], b"ping"))
}

/// An ICMP error `ty`/`code` quoting the first `quote` bytes of `quoted`.
pub fn error_l3(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    (ty, code): (u8, u8),
    quoted: &[u8],
    quote: usize,
    ttl: u8,
) -> Vec<u8> {
    icmp_ip(src, dst, ttl, &icmp_error(ty, code, 1400, quoted, quote))
}

pub fn raw_l3(proto: u8, src: Ipv4Addr, dst: Ipv4Addr, ttl: u8) -> Vec<u8> {
    Ip::new(proto, src, dst).ttl(ttl).packet(&[0x5c; 12])
}

/// Golden policy cases: each frame is built by `l3(addr, ttl)` with the mapping's address
/// (public before an inbound translation, private after; the reverse outbound); an allowed
/// frame must come out translated towards the guest or the gateway, a denied one dropped
/// untouched with the mapping's `denied` counted. Program and model must also agree, and the
/// events be exactly the given ones.
pub struct Probe<'a> {
    pub h: &'a Harness,
    pub w: Wire,
    pub errs: Vec<String>,
    pub count: usize,
}

impl Probe<'_> {
    pub fn new(h: &Harness) -> Probe<'_> {
        Probe {
            h,
            w: Wire(h.topo),
            errs: Vec::new(),
            count: 0,
        }
    }

    /// From the internet to `g.public`.
    pub fn inbound(
        &mut self,
        name: &str,
        g: Guest,
        allowed: bool,
        events: Events,
        l3: impl Fn(Ipv4Addr, u8) -> Vec<u8>,
    ) -> Option<Outcome> {
        let input = self.w.arriving_public(&l3(g.public, 64));
        let want = if allowed {
            Outcome {
                action: XDP_REDIRECT,
                reason: Reason::InboundForwarded,
                frame: self.w.leaving_guest(g.mac, &l3(g.private, 63)),
                counted: Some((Direction::Inbound, g.public)),
                denied: None,
                events,
            }
        } else {
            dropped(
                &input,
                Reason::InboundDenied,
                (Direction::Inbound, g.public),
                events,
            )
        };
        self.count += 1;
        let ingress = self.h.topo.pub0.ifindex;
        expect_exact(self.h, &mut self.errs, name, ingress, &input, &want)
    }

    /// From guest `g.private` to the internet.
    pub fn outbound(
        &mut self,
        name: &str,
        g: Guest,
        allowed: bool,
        events: Events,
        l3: impl Fn(Ipv4Addr, u8) -> Vec<u8>,
    ) -> Option<Outcome> {
        let input = self.w.arriving_guest(g.mac, &l3(g.private, 64));
        let want = if allowed {
            Outcome {
                action: XDP_REDIRECT,
                reason: Reason::OutboundForwarded,
                frame: self.w.leaving_public(&l3(g.public, 63)),
                counted: Some((Direction::Outbound, g.private)),
                denied: None,
                events,
            }
        } else {
            let key = (Direction::Outbound, g.private);
            dropped(&input, Reason::OutboundDenied, key, events)
        };
        self.count += 1;
        let ingress = self.h.topo.gst0.ifindex;
        expect_exact(self.h, &mut self.errs, name, ingress, &input, &want)
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

/// A frame dropped by policy: untouched, `denied` counted on `key`.
pub fn dropped(
    frame: &[u8],
    reason: Reason,
    key: (Direction, Ipv4Addr),
    events: Events,
) -> Outcome {
    Outcome {
        action: XDP_DROP,
        reason,
        frame: frame.to_vec(),
        counted: None,
        denied: Some(key),
        events,
    }
}

/// A flow of `g` with `remote`, ports (guest's, remote's).
pub fn flow(g: Guest, remote: Ipv4Addr, proto: u8, ports: (u16, u16)) -> Flow {
    Flow {
        guest: g.private,
        remote,
        guest_port: ports.0,
        remote_port: ports.1,
        proto,
        kind: Kind::Nat,
    }
}
