//! Shared helpers of the `testrun` tests: bench setup, short frame constructors, and the
//! comparison of program, model and hand-written expectation.
use std::net::Ipv4Addr;

use nat_tests::{
    harness::{Harness, PUB_GW_MAC, Topology},
    model::Outcome,
    packet::{ETH_P_IP, Ip, PROTO_ICMP, PROTO_TCP, PROTO_UDP, ether, tcp, udp},
};

pub fn harness() -> Harness {
    match Harness::new() {
        Ok(h) => h,
        Err(e) => panic!("test bench setup failed (needs root, netns and BPF): {e:#}"),
    }
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
    format!("action {} {:?} counted {:?}", o.action, o.reason, o.counted)
}

/// Runs `frame` through program and model and compares both with `want`; mismatches go to
/// `errs`. Returns the program's outcome for further checks.
pub fn expect(
    h: &Harness,
    errs: &mut Vec<String>,
    name: &str,
    ingress: u32,
    frame: &[u8],
    want: &Outcome,
) -> Option<Outcome> {
    let got = match h.run(ingress, frame) {
        Ok(o) => o,
        Err(e) => {
            errs.push(format!("{name}: {e:#}"));
            return None;
        }
    };
    for (who, o) in [("program", &got), ("model", &h.model.run(ingress, frame))] {
        if o != want {
            let (d, w) = (describe(o), describe(want));
            errs.push(format!(
                "{name}: {who} gave {d}, want {w}; {}",
                diff(&o.frame, &want.frame)
            ));
        }
    }
    Some(got)
}

pub fn assert_no_errors(errs: &[String]) {
    assert!(
        errs.is_empty(),
        "{} failures:\n{}",
        errs.len(),
        errs.join("\n")
    );
}
