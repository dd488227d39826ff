//! Golden translated frames, both directions: the expected output is built from scratch with
//! the translated addresses (so with checksums computed in full, not incrementally), and the
//! program's output is also checked field by field and by recomputing every checksum. The
//! bench's public IPs accept TCP, UDP and ICMP from anywhere (`open_harness`).
use std::net::Ipv4Addr;

use nat_common::Reason;
use nat_tests::{
    harness::*,
    model::{Direction, Events, Outcome, XDP_REDIRECT},
    packet::*,
};

use crate::common::*;

/// A translated case: `build(addr, ttl)` makes the IP packet carrying the mapping's address
/// (public before an inbound translation, private after it; the reverse outbound) with the
/// outer TTL `ttl` (64 before, 63 after).
struct Fwd {
    name: &'static str,
    dir: Direction,
    public: Ipv4Addr,
    private: Ipv4Addr,
    guest_mac: [u8; 6],
    build: Box<dyn Fn(Ipv4Addr, u8) -> Vec<u8>>,
}

type Guest = (Ipv4Addr, Ipv4Addr, [u8; 6]);
const G1: Guest = (P1, V1, V1_MAC);
const G2: Guest = (P2, V2, V2_MAC);
use Direction::{Inbound as IN, Outbound as OUT};

fn fwd(
    name: &'static str,
    dir: Direction,
    (public, private, guest_mac): Guest,
    build: impl Fn(Ipv4Addr, u8) -> Vec<u8> + 'static,
) -> Fwd {
    Fwd {
        name,
        dir,
        public,
        private,
        guest_mac,
        build: Box::new(build),
    }
}

/// Two payload bytes for which `src -> dst` UDP has a computed checksum of 0, sent as 0xFFFF.
fn data_for_ffff_checksum(src: Ipv4Addr, dst: Ipv4Addr) -> [u8; 2] {
    (0..=u16::MAX)
        .map(u16::to_be_bytes)
        .find(|d| udp(src, dst, 5353, 53, d, true)[6..8] == [0xff, 0xff])
        .expect("some payload sums to zero")
}

// What a guest sent, as it left translated (source P): inbound errors quote it.
fn sent_udp(p: Ipv4Addr, csum: bool) -> Vec<u8> {
    udp_ip(p, REMOTE, 63, b"abcd", csum)
}
fn sent_tcp(p: Ipv4Addr) -> Vec<u8> {
    tcp_ip(p, REMOTE, 63, &[2, 4, 5, 0xb4], b"GET /")
}
// What a guest received, translated (destination V): outbound errors quote it.
fn got_udp(v: Ipv4Addr) -> Vec<u8> {
    udp_ip(REMOTE, v, 60, b"reply", true)
}
fn got_tcp(v: Ipv4Addr) -> Vec<u8> {
    tcp_ip(REMOTE, v, 60, &[], b"")
}
fn error(ty: u8, code: u8, quoted: &[u8], n: usize) -> Vec<u8> {
    icmp_error(ty, code, 1400, quoted, n)
}

fn cases() -> Vec<Fwd> {
    let zero_in = data_for_ffff_checksum(REMOTE, V1);
    let zero_out = data_for_ffff_checksum(P2, REMOTE);
    let ffff_before = data_for_ffff_checksum(REMOTE, P1);
    vec![
        fwd("tcp in", IN, G1, |a, t| tcp_ip(REMOTE, a, t, &[], b"hello")),
        fwd("tcp out", OUT, G1, |a, t| {
            tcp_ip(a, REMOTE, t, &[], b"hello")
        }),
        fwd("tcp with options in", IN, G2, |a, t| {
            tcp_ip(REMOTE, a, t, &[2, 4, 5, 0xb4, 1, 3, 3, 7, 4, 2], b"x")
        }),
        fwd("udp in", IN, G1, |a, t| {
            udp_ip(REMOTE, a, t, b"answer", true)
        }),
        fwd("udp out", OUT, G2, |a, t| {
            udp_ip(a, REMOTE, t, b"query", true)
        }),
        fwd("udp no checksum in", IN, G1, |a, t| {
            udp_ip(REMOTE, a, t, b"nock", false)
        }),
        fwd("udp no checksum out", OUT, G1, |a, t| {
            udp_ip(a, REMOTE, t, b"", false)
        }),
        fwd("udp result 0 sent as ffff in", IN, G1, move |a, t| {
            udp_ip(REMOTE, a, t, &zero_in, true)
        }),
        fwd("udp result 0 sent as ffff out", OUT, G2, move |a, t| {
            udp_ip(a, REMOTE, t, &zero_out, true)
        }),
        fwd("udp ffff before in", IN, G1, move |a, t| {
            udp_ip(REMOTE, a, t, &ffff_before, true)
        }),
        fwd("udp length below tot_len in", IN, G1, |a, t| {
            let mut seg = udp(REMOTE, a, 1, 2, b"abc", true);
            seg.extend_from_slice(&[0xee; 5]); // inside the IP packet, after the datagram
            Ip::new(PROTO_UDP, REMOTE, a).ttl(t).packet(&seg)
        }),
        fwd("icmp echo in", IN, G1, |a, t| {
            icmp_ip(REMOTE, a, t, &icmp_echo(ICMP_ECHO, 0x1234, 1, b"ping"))
        }),
        fwd("icmp echo reply out", OUT, G1, |a, t| {
            icmp_ip(
                a,
                REMOTE,
                t,
                &icmp_echo(ICMP_ECHO_REPLY, 0x1234, 1, b"ping"),
            )
        }),
        // Ingress rules name TCP, UDP or ICMP only: GRE comes in as the reply to a guest's.
        fwd("gre out, opens the flow for gre in", OUT, G1, |a, t| {
            Ip::new(PROTO_GRE, a, REMOTE)
                .ttl(t)
                .packet(&[0, 0, 8, 0, 1, 2])
        }),
        fwd("gre in, IP header only", IN, G1, |a, t| {
            Ip::new(PROTO_GRE, REMOTE, a)
                .ttl(t)
                .packet(&[0, 0, 8, 0, 1, 2])
        }),
        fwd("esp out, IP header only", OUT, G2, |a, t| {
            Ip::new(PROTO_ESP, a, REMOTE).ttl(t).packet(&[0x5c; 24])
        }),
        // TTL 2 before (t = 64), 1 after (t = 63).
        fwd("ttl 2 in", IN, G1, |a, t| {
            udp_ip(REMOTE, a, t - 62, b"", true)
        }),
        fwd("frag needed quoting udp in", IN, G1, |a, t| {
            let q = sent_udp(a, true);
            icmp_ip(ROUTER, a, t, &error(ICMP_DEST_UNREACH, 4, &q, q.len()))
        }),
        fwd(
            "frag needed quoting udp without checksum in",
            IN,
            G2,
            |a, t| {
                let q = sent_udp(a, false);
                icmp_ip(ROUTER, a, t, &error(ICMP_DEST_UNREACH, 4, &q, q.len()))
            },
        ),
        fwd("frag needed quoting tcp in", IN, G1, |a, t| {
            let q = sent_tcp(a);
            icmp_ip(ROUTER, a, t, &error(ICMP_DEST_UNREACH, 4, &q, q.len()))
        }),
        fwd("time exceeded quoting 8 bytes of udp in", IN, G1, |a, t| {
            icmp_ip(
                ROUTER,
                a,
                t,
                &error(ICMP_TIME_EXCEEDED, 0, &sent_udp(a, true), 28),
            )
        }),
        fwd("time exceeded quoting an echo in", IN, G1, |a, t| {
            let q = icmp_ip(a, REMOTE, 1, &icmp_echo(ICMP_ECHO, 9, 9, b"trace"));
            icmp_ip(ROUTER, a, t, &error(ICMP_TIME_EXCEEDED, 0, &q, q.len()))
        }),
        fwd("tcp quoted 8 bytes in", IN, G1, |a, t| {
            icmp_ip(ROUTER, a, t, &error(ICMP_DEST_UNREACH, 1, &sent_tcp(a), 28))
        }),
        fwd("port unreachable quoting udp out", OUT, G1, |a, t| {
            let q = got_udp(a);
            icmp_ip(a, REMOTE, t, &error(ICMP_DEST_UNREACH, 3, &q, q.len()))
        }),
        fwd("time exceeded quoting tcp out", OUT, G2, |a, t| {
            let q = got_tcp(a);
            icmp_ip(a, REMOTE, t, &error(ICMP_TIME_EXCEEDED, 0, &q, q.len()))
        }),
        fwd("parameter problem quoting udp out", OUT, G1, |a, t| {
            icmp_ip(
                a,
                REMOTE,
                t,
                &error(ICMP_PARAMETER_PROBLEM, 0, &got_udp(a), 36),
            )
        }),
        fwd("tcp quoted 8 bytes out", OUT, G1, |a, t| {
            icmp_ip(a, REMOTE, t, &error(ICMP_DEST_UNREACH, 13, &got_tcp(a), 28))
        }),
        fwd("1400 bytes through mtu 1400 in", IN, G1, |a, t| {
            udp_ip(REMOTE, a, t, &[7; 1400 - 28], true)
        }),
        fwd("1500 bytes through mtu 1500 out", OUT, G1, |a, t| {
            tcp_ip(a, REMOTE, t, &[], &[7; 1500 - 40])
        }),
    ]
}

/// Field checks on the program's output, independent of the frame builder's expectation.
fn check_fields(w: Wire, c: &Fwd, input: &[u8], out: &[u8], errs: &mut Vec<String>) {
    let name = c.name;
    if let Err(e) = verify_checksums(out) {
        errs.push(format!("{name}: output fails {e}: {}", hex(out)));
    }
    let (src, dst, dmac, smac) = (&out[26..30], &out[30..34], &out[0..6], &out[6..12]);
    let t = w.0;
    let ok = match c.dir {
        IN => {
            let macs = dmac == c.guest_mac && smac == t.gst0.mac;
            macs && dst == c.private.octets() && src == &input[26..30]
        }
        OUT => {
            let macs = dmac == PUB_GW_MAC && smac == t.pub0.mac;
            macs && src == c.public.octets() && dst == &input[30..34]
        }
    };
    if !ok || out[22] != input[22] - 1 || out.len() != input.len() {
        errs.push(format!(
            "{name}: addresses, TTL, MACs or length wrong: {}",
            hex(out)
        ));
    }
    if input[23] == PROTO_ICMP && matches!(input[34], 3 | 11 | 12) {
        // Quoted source (inbound) or destination (outbound) is the translated address.
        let (at, addr) = if c.dir == IN {
            (54, c.private)
        } else {
            (58, c.public)
        };
        if out[at..at + 4] != addr.octets() {
            errs.push(format!(
                "{name}: quoted address not translated: {}",
                hex(out)
            ));
        }
    }
}

#[test]
fn translates_and_forwards() {
    let h = open_harness();
    let w = Wire(h.topo);
    let mut errs = Vec::new();
    let cases = cases();
    for c in &cases {
        let (input, want, ingress, key, reason) = match c.dir {
            IN => (
                w.arriving_public(&(c.build)(c.public, 64)),
                w.leaving_guest(c.guest_mac, &(c.build)(c.private, 63)),
                h.topo.pub0.ifindex,
                c.public,
                Reason::InboundForwarded,
            ),
            OUT => (
                w.arriving_guest(c.guest_mac, &(c.build)(c.private, 64)),
                w.leaving_public(&(c.build)(c.public, 63)),
                h.topo.gst0.ifindex,
                c.private,
                Reason::OutboundForwarded,
            ),
        };
        let want = Outcome {
            action: XDP_REDIRECT,
            reason,
            frame: want,
            counted: Some((c.dir, key)),
            denied: None,
            events: Events::default(),
        };
        if let Some(got) = expect(&h, &mut errs, c.name, ingress, &input, &want) {
            check_fields(w, c, &input, &got.frame, &mut errs);
        }
    }
    assert_no_errors(&errs);
    eprintln!("{} forwarded cases", cases.len());
}

/// An inbound ICMP error quoting 17 bytes of TCP, in a frame with Ethernet padding: the quote
/// ends inside the quoted TCP checksum, so that checksum is left alone, and so is the padding
/// that holds the rest of it.
#[test]
fn partial_tcp_quote_leaves_checksum_and_padding() {
    let h = open_harness();
    let w = Wire(h.topo);
    let quote = |a: Ipv4Addr| {
        let sent = tcp_ip(P1, REMOTE, 63, &[], b"data");
        let mut q = Ip::new(PROTO_TCP, a, REMOTE)
            .ttl(63)
            .header(sent.len() - 20);
        q.extend_from_slice(&sent[20..20 + 17]); // as sent: first byte of P's TCP checksum
        q
    };
    let l3 = |a: Ipv4Addr, ttl: u8| {
        icmp_ip(
            ROUTER,
            a,
            ttl,
            &icmp(ICMP_DEST_UNREACH, 3, [0; 4], &quote(a)),
        )
    };
    let padding = [0x5a; 9];
    let input = [w.arriving_public(&l3(P1, 64)), padding.to_vec()].concat();
    let want = Outcome {
        action: XDP_REDIRECT,
        reason: Reason::InboundForwarded,
        frame: [w.leaving_guest(V1_MAC, &l3(V1, 63)), padding.to_vec()].concat(),
        counted: Some((IN, P1)),
        denied: None,
        events: Events::default(),
    };
    let mut errs = Vec::new();
    let got = expect(
        &h,
        &mut errs,
        "partial quote",
        h.topo.pub0.ifindex,
        &input,
        &want,
    );
    assert_no_errors(&errs);
    let got = got.expect("ran");
    // Quoted TCP at 62: its checksum's first byte is the IP packet's last (78), the second
    // would be the padding's first (79).
    assert_eq!(
        got.frame[78], input[78],
        "quoted TCP checksum byte rewritten"
    );
    assert_eq!(got.frame[79..], padding, "padding rewritten");
}
