//! Golden frames the program leaves to the kernel: verdict PASS, bytes untouched, no mapping
//! counted, and exactly the one reason given here. The bench's public IPs accept TCP, UDP and
//! ICMP from anywhere (`open_harness`), so the policy lets through what reaches it.
use std::net::Ipv4Addr;

use nat_common::Reason::{self, *};
use nat_tests::{
    harness::*,
    model::{Events, Outcome, XDP_PASS},
    packet::*,
};

use crate::common::*;

const UNRELATED: Reason = IcmpErrorUnrelated;

struct Cases<'a> {
    h: &'a Harness,
    errs: Vec<String>,
    count: usize,
}

impl Cases<'_> {
    fn new(h: &Harness) -> Cases<'_> {
        Cases {
            h,
            errs: Vec::new(),
            count: 0,
        }
    }

    fn pass(&mut self, name: &str, ingress: u32, frame: Vec<u8>, reason: Reason) {
        let want = Outcome {
            action: XDP_PASS,
            reason,
            frame: frame.clone(),
            counted: None,
            denied: None,
            events: Events::default(),
        };
        expect(self.h, &mut self.errs, name, ingress, &frame, &want);
        self.count += 1;
    }
}

/// A table of `name, ingress, frame => reason;` rows, one per line (rustfmt leaves macro
/// bodies as written).
macro_rules! table {
    ($c:ident; $($name:literal, $ingress:expr, $frame:expr => $reason:ident;)*) => {
        $($c.pass($name, $ingress, $frame, $reason);)*
    };
}

fn edit(frame: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[at..at + bytes.len()].copy_from_slice(bytes);
    f
}

fn be(v: u16) -> [u8; 2] {
    v.to_be_bytes()
}

fn udp_in(dst: Ipv4Addr) -> Vec<u8> {
    udp_ip(REMOTE, dst, 64, b"data", true)
}

fn udp_out(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    udp_ip(src, dst, 64, b"data", true)
}

/// An inbound error to P1 quoting `quote` bytes of `inner_src -> REMOTE` with `vihl` patched.
fn error_in(inner_src: Ipv4Addr, vihl: u8, quote: usize) -> Vec<u8> {
    let mut q = udp_out(inner_src, REMOTE);
    q[0] = vihl;
    icmp_ip(
        ROUTER,
        P1,
        64,
        &icmp_error(ICMP_DEST_UNREACH, 4, 1400, &q, quote),
    )
}

/// An outbound error from V1 quoting `quoted` whole.
fn error_out(quoted: &[u8]) -> Vec<u8> {
    icmp_ip(
        V1,
        REMOTE,
        64,
        &icmp_error(ICMP_DEST_UNREACH, 3, 0, quoted, quoted.len()),
    )
}

/// A UDP packet of `len` bytes (IP header included).
fn big(src: Ipv4Addr, dst: Ipv4Addr, len: usize) -> Vec<u8> {
    udp_ip(src, dst, 64, &vec![1; len - 28], true)
}

fn ip(proto: u8, src: Ipv4Addr, dst: Ipv4Addr) -> Ip {
    Ip::new(proto, src, dst)
}

/// Frames stopped by parsing and classification.
#[test]
fn passes_what_it_cannot_parse() {
    let h = open_harness();
    let w = Wire(h.topo);
    let (pub0, gst0, lo, oth0) = (
        h.topo.pub0.ifindex,
        h.topo.gst0.ifindex,
        h.topo.lo.ifindex,
        h.topo.oth0.ifindex,
    );
    let n = |l3: Vec<u8>| w.arriving_public(&l3);
    let g = |l3: Vec<u8>| w.arriving_guest(V1_MAC, &l3);
    let pad = |f: Vec<u8>, n: usize| [f, vec![0; n]].concat();
    let good = n(udp_in(P1));
    let tcp = n(tcp_ip(REMOTE, P1, 64, &[], b""));
    // The first `len` bytes of a TCP header, IP tot_len matching.
    let cut_tcp = |len: usize| n(ip(PROTO_TCP, REMOTE, P1).packet(&tcp[34..34 + len]));
    let gst_mac = h.topo.gst0.mac;
    let frag = |f: u16| ip(PROTO_UDP, REMOTE, P1).frag(f).packet(&good[34..]);
    let opts = |o: &[u8]| ip(PROTO_UDP, REMOTE, P1).options(o).packet(&good[34..]);
    let mut c = Cases::new(&h);

    table! { c;
        "arp", pub0, arp_request(PUB_GW_MAC, PUB_GW, PUB_ADDR) => NotIpv4;
        "ipv6", gst0, ether(gst_mac, V1_MAC, 0x86dd, &[0x60; 60]) => NotIpv4;
        "vlan", gst0, ether(gst_mac, V1_MAC, 0x8100, &good[12..]) => NotIpv4;
        "ethernet header only", pub0, good[..14].to_vec() => Malformed;
        "ip header cut at 33", pub0, good[..33].to_vec() => Malformed;
        "version 6", pub0, edit(&good, 14, &[0x65]) => Malformed;
        "ihl 4", pub0, edit(&good, 14, &[0x44]) => Malformed;
        "ihl 0", pub0, edit(&good, 14, &[0x40]) => Malformed;
        "tot_len one beyond frame", pub0, edit(&good, 16, &be(good.len() as u16 - 13)) => Malformed;
        "tot_len 19", pub0, edit(&good, 16, &be(19)) => Malformed;
        "tot_len 0", pub0, edit(&good, 16, &be(0)) => Malformed;
        // IHL 7: a tot_len shorter than the header beats "options".
        "tot_len below ihl", pub0, edit(&n(opts(&[1; 8])), 16, &be(24)) => Malformed;
        "ip options", pub0, n(opts(&[0x94, 4, 0, 0])) => IpOptions;
        "ip options, fragment", pub0, edit(&n(opts(&[1; 4])), 20, &be(MF)) => IpOptions;
        "fragment MF", pub0, n(frag(MF)) => Fragment;
        "fragment MF and DF", pub0, n(frag(MF | DF)) => Fragment;
        "fragment offset", pub0, n(frag(185)) => Fragment;
        "fragment offset and DF", pub0, n(frag(DF | 1)) => Fragment;
        "last fragment out", gst0, g(ip(PROTO_UDP, V1, REMOTE).frag(185).packet(b"x")) => Fragment;
        "fragment, unmapped", pub0, edit(&n(udp_in(REMOTE)), 20, &be(MF)) => Fragment;
        "unmapped in", pub0, n(udp_in(Ipv4Addr::new(198, 51, 100, 99))) => Unmapped;
        "unmapped out", gst0, g(udp_out(Ipv4Addr::new(10, 0, 0, 99), REMOTE)) => Unmapped;
        "public address out", gst0, g(udp_out(P1, REMOTE)) => Unmapped;
        "unmapped, ttl 1", gst0, g(udp_ip(GST_ADDR, REMOTE, 1, b"", true)) => Unmapped;
        "ttl 1 in", pub0, n(udp_ip(REMOTE, P1, 1, b"", true)) => TtlExpired;
        "ttl 0 out", gst0, g(tcp_ip(V1, REMOTE, 0, &[], b"")) => TtlExpired;
        "ttl 1, unroutable", pub0, n(udp_ip(REMOTE, P_TO_REMOTE, 1, b"", true)) => TtlExpired;
        // A malformed transport header is malformed whatever the TTL (it is parsed first).
        "ttl 1, tcp cut", pub0, edit(&cut_tcp(10), 22, &[1]) => Malformed;
        "tcp cut at 19", pub0, cut_tcp(19) => Malformed;
        "tcp cut at 10, padded", pub0, pad(cut_tcp(10), 20) => Malformed;
        "tcp doff 4", pub0, edit(&tcp, 46, &[0x40]) => Malformed;
        "tcp doff 0", pub0, edit(&tcp, 46, &[0x00]) => Malformed;
        "tcp doff beyond segment", pub0, edit(&tcp, 46, &[0x60]) => Malformed;
        "udp header cut", pub0, n(ip(PROTO_UDP, REMOTE, P1).packet(&good[34..41])) => Malformed;
        "udp length 7", pub0, edit(&good, 38, &be(7)) => Malformed;
        "udp length 0", pub0, edit(&good, 38, &be(0)) => Malformed;
        "udp length beyond packet", pub0, edit(&good, 38, &be(13)) => Malformed;
        "udp length in the padding", pub0, pad(edit(&good, 16, &be(28)), 4) => Malformed;
        "icmp header cut", pub0, n(icmp_ip(REMOTE, P1, 64, &[8, 0, 0, 0, 0, 0, 0])) => Malformed;
        "icmp error cut", pub0, n(icmp_ip(REMOTE, P1, 64, &[3, 0, 0, 0, 0, 0, 0])) => Malformed;
        "icmp error quoting nothing", pub0, n(error_in(P1, 0x45, 0)) => UNRELATED;
        "icmp error quoting 19 bytes", pub0, n(error_in(P1, 0x45, 19)) => UNRELATED;
        "icmp error quoting 19, padded", pub0, pad(n(error_in(P1, 0x45, 19)), 30) => UNRELATED;
        "icmp error about another host", pub0, n(error_in(P2, 0x45, 40)) => UNRELATED;
        "icmp error quoting options", pub0, n(error_in(P1, 0x46, 40)) => UNRELATED;
        "icmp error quoting ipv6", pub0, n(error_in(P1, 0x65, 40)) => UNRELATED;
        "outbound error about V2", gst0, g(error_out(&udp_out(REMOTE, V2))) => UNRELATED;
        // Outbound errors must quote the guest as destination, not as source.
        "outbound error quoting own", gst0, g(error_out(&udp_out(V1, REMOTE))) => UNRELATED;
        "loopback ingress", lo, good.clone() => UnknownIface;
        "ingress not in IFACES", oth0, good.clone() => UnknownIface;
        // The interface's role is looked up only for a packet of no flow: a frame is parsed
        // first, wherever it arrives.
        "unknown iface, parsed first", lo, good[..14].to_vec() => Malformed;
    }
    // A guest is reached only through its public address: dropped, no mapping counted.
    let private_in = n(udp_in(V1));
    let want = Outcome {
        action: nat_tests::model::XDP_DROP,
        reason: DirectToPrivate,
        frame: private_in.clone(),
        counted: None,
        denied: None,
        events: Events::default(),
    };
    expect(
        &h,
        &mut c.errs,
        "private address in",
        pub0,
        &private_in,
        &want,
    );
    assert_no_errors(&c.errs);
    eprintln!("{} parse/classify pass cases", c.count);
}

/// Frames that parse and are mapped but that the route lookup hands to the kernel.
#[test]
fn passes_what_it_cannot_route() {
    let h = open_harness();
    let w = Wire(h.topo);
    let (pub0, gst0) = (h.topo.pub0.ifindex, h.topo.gst0.ifindex);
    let n = |l3: Vec<u8>| w.arriving_public(&l3);
    let g = |l3: Vec<u8>| w.arriving_guest(V1_MAC, &l3);
    let mut c = Cases::new(&h);

    table! { c;
        "inbound to a guest without neighbour", pub0, n(udp_in(P3)) => NoNeighbour;
        "outbound to a host without neighbour", gst0, g(udp_out(V1, PUB_NO_NEIGH)) => NoNeighbour;
        // Without a hairpin binding, a frame to the router's guest address is outbound (and
        // local); one to its address on another interface is outbound anyway.
        "outbound to the router's guest address", gst0, g(udp_out(V1, GST_ADDR)) => NoRoute;
        "outbound to the router on gsb0", gst0, g(udp_out(V1, GSB_ADDR)) => NoRoute;
        "inbound mapped to a remote address", pub0, n(udp_in(P_TO_REMOTE)) => WrongEgress;
        "inbound mapped behind oth0", pub0, n(udp_in(P_TO_OTHER)) => WrongEgress;
        "outbound to another guest", gst0, g(udp_out(V1, V2)) => WrongEgress;
        "outbound behind oth0", gst0, g(udp_out(V1, OTH_HOST)) => WrongEgress;
        "inbound mapped to an unrouted address", pub0, n(udp_in(P_TO_UNROUTED)) => NoRoute;
        "inbound mapped to a local address", pub0, n(udp_in(P_TO_LOCAL)) => NoRoute;
        "inbound mapped to a broadcast address", pub0, n(udp_in(P_TO_BCAST)) => NoRoute;
        "outbound to an unrouted address", gst0, g(udp_out(V1, UNROUTED)) => NoRoute;
        "outbound to the host", gst0, g(udp_out(V1, PUB_ADDR)) => NoRoute;
        "outbound to the limited broadcast", gst0, g(udp_out(V1, Ipv4Addr::BROADCAST)) => NoRoute;
        "outbound to multicast", gst0, g(udp_out(V1, Ipv4Addr::new(224, 0, 0, 251))) => NoRoute;
        "inbound 1401 bytes to mtu 1400", pub0, n(big(REMOTE, P1, 1401)) => FragNeeded;
        "too big beats no neighbour", pub0, n(big(REMOTE, P3, 1401)) => FragNeeded;
        "too big beats wrong egress", pub0, n(big(REMOTE, P_TO_REMOTE, 1501)) => FragNeeded;
        "outbound 1501 bytes to mtu 1500", gst0, g(big(V1, REMOTE, 1501)) => FragNeeded;
    }
    assert_no_errors(&c.errs);
    eprintln!("{} route pass cases", c.count);
}
