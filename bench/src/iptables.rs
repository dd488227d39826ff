//! The static NAT ruleset a CloudStack virtual router installs with iptables, for comparison.
//!
//! Per mapping P -> V, from the VR's `configure.py` (`CsForwardingRules.processStaticNatRule`)
//! and `CsAddress` (the public IP's FIREWALL_/VPN_ chains): mark and connmark new guest flows,
//! DNAT P -> V in PREROUTING and OUTPUT, SNAT V -> P out of the public interface, hairpin
//! SNAT to the router's guest address, FORWARD accept of new flows to V; the public IP's
//! ingress firewall in mangle (established/related accepted, each rule RETURNs, the rest
//! dropped). Base policy as on the VR: FORWARD drops what no rule accepts, established and
//! related pass, guests may go out. The VR's DHCP CHECKSUM rule is left out (it never matches
//! this traffic). Interfaces: eth2 public, eth0 guest (10.0.0.0/24, router 10.0.0.1).
use std::{fmt::Write as _, net::Ipv4Addr};

use crate::topo::{GEN_PORT_HI, GEN_PORT_LO, ROUTER_GST};

/// `iptables-restore` input for `mappings`; the first mapping's public IP allows UDP to the
/// generated traffic's ports from anywhere (CloudStack firewall rule), the others nothing.
pub fn ruleset(mappings: &[(Ipv4Addr, Ipv4Addr)]) -> String {
    let mut m = String::from(
        "*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:PREROUTING-eth2-def - [0:0]\n",
    );
    for (p, _) in mappings {
        let _ = writeln!(m, ":FIREWALL_{p} - [0:0]\n:VPN_{p} - [0:0]");
    }
    m.push_str("-A PREROUTING -m state --state RELATED,ESTABLISHED -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff\n");
    for (i, (p, _)) in mappings.iter().enumerate() {
        let _ = writeln!(m, "-A PREROUTING -d {p}/32 -j VPN_{p}");
        let _ = writeln!(m, "-A PREROUTING -d {p}/32 -j FIREWALL_{p}");
        let _ = writeln!(
            m,
            "-A FIREWALL_{p} -m state --state RELATED,ESTABLISHED -j ACCEPT"
        );
        if i == 0 {
            let _ = writeln!(
                m,
                "-A FIREWALL_{p} -s 0.0.0.0/0 -p udp -m udp --dport {GEN_PORT_LO}:{GEN_PORT_HI} -j RETURN"
            );
        }
        let _ = writeln!(m, "-A FIREWALL_{p} -j DROP");
        let _ = writeln!(
            m,
            "-A VPN_{p} -m state --state RELATED,ESTABLISHED -j ACCEPT"
        );
        let _ = writeln!(m, "-A VPN_{p} -j RETURN");
    }
    for (_, v) in mappings {
        let _ = writeln!(
            m,
            "-A PREROUTING -s {v}/32 -m state --state NEW -j PREROUTING-eth2-def"
        );
    }
    m.push_str("-A PREROUTING-eth2-def -j MARK --set-xmark 0x66/0xffffffff\n");
    m.push_str("-A PREROUTING-eth2-def -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff\nCOMMIT\n");
    let mut n = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    for (p, v) in mappings {
        let _ = writeln!(n, "-A PREROUTING -d {p}/32 -j DNAT --to-destination {v}");
        let _ = writeln!(
            n,
            "-A POSTROUTING -o eth2 -s {v}/32 -j SNAT --to-source {p}"
        );
        let _ = writeln!(n, "-A OUTPUT -d {p}/32 -j DNAT --to-destination {v}");
        let _ = writeln!(
            n,
            "-A POSTROUTING -s 10.0.0.0/24 -d {v}/32 -o eth0 -j SNAT --to-source {ROUTER_GST}"
        );
    }
    n.push_str("COMMIT\n");
    let mut f = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n-A FORWARD -m state --state RELATED,ESTABLISHED -j ACCEPT\n",
    );
    for (_, v) in mappings {
        let _ = writeln!(
            f,
            "-A FORWARD -i eth2 -o eth0 -d {v}/32 -m state --state NEW -j ACCEPT"
        );
    }
    f.push_str("-A FORWARD -i eth0 -o eth2 -j ACCEPT\nCOMMIT\n");
    m + &n + &f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_dnat_and_snat_per_mapping() {
        let p = Ipv4Addr::new(203, 0, 113, 10);
        let v = Ipv4Addr::new(10, 0, 0, 10);
        let r = ruleset(&[(p, v)]);
        assert!(r.contains("-A PREROUTING -d 203.0.113.10/32 -j DNAT --to-destination 10.0.0.10"));
        assert!(
            r.contains("-A POSTROUTING -o eth2 -s 10.0.0.10/32 -j SNAT --to-source 203.0.113.10")
        );
        assert_eq!(r.matches("COMMIT").count(), 3);
    }
}
