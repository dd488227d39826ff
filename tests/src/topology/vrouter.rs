//! The router namespace dressed as a CloudStack virtual router doing static NAT: the iptables
//! ruleset the router's scripts build for one public IP with static NAT (`cs/CsAddress.py`
//! `fw_router`, `configure.py` `processStaticNatRule` and `CsAcl.AclIP`, isolated network,
//! default-allow egress), the packets its DROP rules and policies counted, and the kernel's
//! connection table as `conntrack -L` shows it. Everything acts on the topology's router only.
use std::net::Ipv4Addr;

use anyhow::{Context as _, ensure};

use super::{
    COMMAND_TIMEOUT, GUEST_ADDR, PUBLIC_ADDR, ROUTER_GUEST_ADDR, ROUTER_GUEST_IF,
    ROUTER_PUBLIC_ADDR, ROUTER_PUBLIC_IF, Topology, run_bounded,
};

/// An ingress or egress firewall rule: a protocol and, for tcp/udp, one destination port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Tcp(u16),
    Udp(u16),
    /// Every ICMP type (CloudStack's `icmp_type: -1`).
    Icmp,
}

impl Service {
    /// The iptables match, as `CsAcl.AclIP.add_rule` writes it.
    fn matcher(self) -> String {
        match self {
            Service::Tcp(p) => format!("-p tcp -m tcp --dport {p}"),
            Service::Udp(p) => format!("-p udp -m udp --dport {p}"),
            Service::Icmp => "-p icmp -m icmp --icmp-type any".to_string(),
        }
    }
}

/// The static NAT of the topology's P to V on a virtual router whose public interface is pub0
/// (CloudStack's eth2, source NAT address 198.51.100.1) and guest interface gst0 (eth0,
/// 10.0.0.1/24).
#[derive(Debug, Clone)]
pub struct VirtualRouter {
    /// What the public IP's ingress rules open (`FIREWALL_<P>`, from anywhere).
    pub ingress: Vec<Service>,
    /// The egress exceptions (default allow, so each one is a DROP in `FW_EGRESS_RULES`).
    pub egress_denied: Vec<Service>,
}

impl VirtualRouter {
    /// The `iptables-restore` text of the router's ruleset.
    pub fn ruleset(&self) -> String {
        let (p, v) = (PUBLIC_ADDR, GUEST_ADDR);
        let (public, guest) = (ROUTER_PUBLIC_IF, ROUTER_GUEST_IF);
        let mut r = String::new();
        let mut add = |line: String| {
            r.push_str(&line);
            r.push('\n');
        };
        add("*mangle".into());
        for chain in ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"] {
            add(format!(":{chain} ACCEPT [0:0]"));
        }
        for chain in [
            format!("FIREWALL_{p}"),
            format!("VPN_{p}"),
            format!("PREROUTING-{public}-def"),
        ] {
            add(format!(":{chain} - [0:0]"));
        }
        add(format!(
            "-A PREROUTING -s {v}/32 -m state --state NEW -j PREROUTING-{public}-def"
        ));
        add(format!("-A PREROUTING -d {p}/32 -j FIREWALL_{p}"));
        add(format!("-A PREROUTING -d {p}/32 -j VPN_{p}"));
        add(
            "-A PREROUTING -m state --state RELATED,ESTABLISHED -j CONNMARK --restore-mark \
             --nfmask 0xffffffff --ctmask 0xffffffff"
                .into(),
        );
        add(format!(
            "-A PREROUTING -i {public} -m state --state NEW -j CONNMARK --set-xmark 0x2/0xffffffff"
        ));
        for s in &self.ingress {
            add(format!(
                "-A FIREWALL_{p} -s 0.0.0.0/0 {} -j ACCEPT",
                s.matcher()
            ));
        }
        add(format!(
            "-A FIREWALL_{p} -m state --state RELATED,ESTABLISHED -j ACCEPT"
        ));
        add(format!("-A FIREWALL_{p} -j DROP"));
        add(format!(
            "-A VPN_{p} -m state --state RELATED,ESTABLISHED -j ACCEPT"
        ));
        add(format!("-A VPN_{p} -j RETURN"));
        add(format!(
            "-A PREROUTING-{public}-def -j MARK --set-xmark 0x66/0xffffffff"
        ));
        add(format!(
            "-A PREROUTING-{public}-def -j CONNMARK --save-mark --nfmask 0xffffffff \
             --ctmask 0xffffffff"
        ));
        add("COMMIT".into());

        add("*nat".into());
        for chain in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
            add(format!(":{chain} ACCEPT [0:0]"));
        }
        add(format!(
            "-A PREROUTING -d {p}/32 -j DNAT --to-destination {v}"
        ));
        add(format!("-A OUTPUT -d {p}/32 -j DNAT --to-destination {v}"));
        // Hairpin: guests reaching V through P see the router's guest address.
        add(format!(
            "-A POSTROUTING -s 10.0.0.0/24 -d {v}/32 -o {guest} -j SNAT --to-source \
             {ROUTER_GUEST_ADDR}"
        ));
        add(format!(
            "-A POSTROUTING -o {public} -s {v}/32 -j SNAT --to-source {p}"
        ));
        for private in ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"] {
            add(format!("-A POSTROUTING -o {public} -d {private} -j RETURN"));
        }
        add(format!(
            "-A POSTROUTING -o {public} -j SNAT --to-source {ROUTER_PUBLIC_ADDR}"
        ));
        add("COMMIT".into());

        add("*filter".into());
        add(":INPUT DROP [0:0]".into());
        add(":FORWARD DROP [0:0]".into());
        add(":OUTPUT ACCEPT [0:0]".into());
        for chain in ["FW_OUTBOUND", "FW_EGRESS_RULES", "NETWORK_STATS"] {
            add(format!(":{chain} - [0:0]"));
        }
        add("-A INPUT -j NETWORK_STATS".into());
        for dev in [public, guest] {
            add(format!(
                "-A INPUT -i {dev} -m state --state RELATED,ESTABLISHED -j ACCEPT"
            ));
        }
        add("-A INPUT -p icmp -j ACCEPT".into());
        add("-A INPUT -i lo -j ACCEPT".into());
        add("-A FORWARD -j NETWORK_STATS".into());
        add(format!(
            "-A FORWARD -i {public} -o {guest} -d {v}/32 -m state --state NEW -j ACCEPT"
        ));
        add(format!(
            "-A FORWARD -i {public} -o {guest} -m state --state RELATED,ESTABLISHED -j ACCEPT"
        ));
        add(format!(
            "-A FORWARD -i {guest} -o {guest} -m state --state NEW -j ACCEPT"
        ));
        add(format!(
            "-A FORWARD -i {guest} -o {guest} -m state --state RELATED,ESTABLISHED -j ACCEPT"
        ));
        add(format!(
            "-A FORWARD -i {guest} -o {public} -m state --state RELATED,ESTABLISHED -j ACCEPT"
        ));
        add(format!("-A FORWARD -i {guest} -o {public} -j FW_OUTBOUND"));
        add("-A FW_OUTBOUND -j FW_EGRESS_RULES".into());
        for s in &self.egress_denied {
            add(format!("-A FW_EGRESS_RULES {} -j DROP", s.matcher()));
        }
        add("-A FW_EGRESS_RULES -j ACCEPT".into());
        add("-A OUTPUT -j NETWORK_STATS".into());
        add(format!("-A NETWORK_STATS -i {guest} -o {public}"));
        add(format!("-A NETWORK_STATS -i {public} -o {guest}"));
        add("COMMIT".into());
        r
    }
}

/// One entry of the kernel's connection table, from a line of `conntrack -L`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEntry {
    pub line: String,
    /// Seconds left before the kernel forgets it.
    pub timeout: u64,
    /// Packets the kernel counted in the original and the reply direction (with
    /// `nf_conntrack_acct=1`).
    pub packets: Option<(u64, u64)>,
}

impl KernelEntry {
    fn parse(line: &str) -> anyhow::Result<Self> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let timeout = words
            .get(2)
            .and_then(|w| w.parse().ok())
            .with_context(|| format!("conntrack -L printed {line:?}"))?;
        let packets: Vec<u64> = words
            .iter()
            .filter_map(|w| w.strip_prefix("packets="))
            .filter_map(|n| n.parse().ok())
            .collect();
        Ok(Self {
            line: line.to_string(),
            timeout,
            packets: match packets[..] {
                [orig, reply] => Some((orig, reply)),
                _ => None,
            },
        })
    }
}

impl Topology {
    /// Replaces the router's iptables with `rules` (`iptables-restore` text).
    pub fn install_iptables(&self, rules: &str) -> anyhow::Result<()> {
        let path = self.dir.path().join("iptables.rules");
        std::fs::write(&path, rules).with_context(|| format!("writing {}", path.display()))?;
        let file = path.display().to_string();
        self.router
            .exec("iptables-restore", &[&file])
            .with_context(|| format!("iptables-restore of\n{rules}"))?;
        Ok(())
    }

    /// Packets the router's iptables dropped so far: the counters of every DROP rule and of
    /// every chain whose policy is DROP, in every table.
    pub fn iptables_drops(&self) -> anyhow::Result<u64> {
        let text = self.router.exec("iptables-save", &["-c"])?;
        let mut total = 0;
        for line in text.lines() {
            let counters = if line.starts_with('[') && line.ends_with("-j DROP") {
                line.split_whitespace().next()
            } else if line.starts_with(':') && line.contains(" DROP [") {
                line.split_whitespace().nth(2)
            } else {
                continue;
            };
            let packets = counters
                .and_then(|c| c.trim_start_matches('[').split(':').next())
                .and_then(|n| n.parse::<u64>().ok())
                .with_context(|| format!("iptables-save -c printed {line:?}"))?;
            total += packets;
        }
        Ok(total)
    }

    /// The router's iptables as `iptables-save -c` prints them, for failure messages.
    pub fn iptables_text(&self) -> String {
        self.router
            .exec("iptables-save", &["-c"])
            .unwrap_or_else(|e| format!("{e:#}"))
    }

    /// The kernel's UDP or TCP flows (`proto`) in the router whose original direction goes
    /// from `src` to port `dport`.
    pub fn kernel_flows(
        &self,
        proto: &str,
        src: Ipv4Addr,
        dport: u16,
    ) -> anyhow::Result<Vec<KernelEntry>> {
        let (src, dport) = (src.to_string(), dport.to_string());
        let out = run_bounded(
            self.router
                .command("conntrack")
                .args(["-L", "-p", proto, "-s", &src, "--dport", &dport]),
            COMMAND_TIMEOUT,
        )?;
        // It exits 0 with or without entries; its summary goes to stderr.
        ensure!(out.status.success(), "conntrack -L: {}", out.stderr.trim());
        out.stdout.lines().map(KernelEntry::parse).collect()
    }

    /// Forgets every flow of the router's kernel connection table (`conntrack -F`).
    pub fn flush_kernel_flows(&self) -> anyhow::Result<()> {
        self.router.exec("conntrack", &["-F"])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_conntrack_line_with_accounting() {
        let f = KernelEntry::parse(
            "udp      17 117 src=10.0.0.10 dst=198.51.100.2 sport=40000 dport=7000 packets=3 \
             bytes=99 src=198.51.100.2 dst=203.0.113.10 sport=7000 dport=40000 packets=2 \
             bytes=66 [ASSURED] mark=0 use=1",
        )
        .unwrap();
        assert_eq!((f.timeout, f.packets), (117, Some((3, 2))));
    }

    #[test]
    fn the_ruleset_opens_what_it_is_told() {
        let r = VirtualRouter {
            ingress: vec![Service::Tcp(22), Service::Icmp],
            egress_denied: vec![Service::Tcp(25)],
        }
        .ruleset();
        assert!(r.contains(
            "-A FIREWALL_203.0.113.10 -s 0.0.0.0/0 -p tcp -m tcp --dport 22 -j ACCEPT\n"
        ));
        assert!(r.contains("-A FW_EGRESS_RULES -p tcp -m tcp --dport 25 -j DROP\n"));
        assert!(
            r.contains("-A POSTROUTING -o pub0 -s 10.0.0.10/32 -j SNAT --to-source 203.0.113.10\n")
        );
        assert_eq!(r.matches("COMMIT").count(), 3);
    }
}
