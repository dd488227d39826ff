//! End to end, operating natd: restarts that keep traffic flowing, upgrades that migrate or
//! refuse an earlier natd's pinned maps, Prometheus scraping its metrics, CloudStack payloads
//! (natctl apply and the drop-in directory) and their databag semantics, two public networks
//! with policy routing by source, natd managing the mapped public IPs on the public interface,
//! and the slow path's output hook and restoration. One module per topic under `e2e_ops/`.
//!
//! Same ground rules as `e2e.rs`: each test builds its own namespaces and natd and removes them
//! when it ends, also on failure; every check is on something observed (the peer address a
//! socket saw, ICMP packets a namespace received, natctl's JSON, `ip -j`, nftables, what a
//! Prometheus server answers). Waits are bounded and poll for the observation.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Context as _;
use nat_tests::topology::{Natctl, Topology, policy::EgressPolicy};
use nat_userspace::firewall::IngressRule;

// A test crate's root looks for modules beside it, where cargo would take them for test
// crates of their own: they live in `e2e_ops/`.
#[path = "e2e_ops/addresses.rs"]
mod addresses;
#[path = "e2e_ops/cloudstack.rs"]
mod cloudstack;
#[path = "e2e_ops/databags.rs"]
mod databags;
#[path = "e2e_ops/dropdir.rs"]
mod dropdir;
#[path = "e2e_ops/prometheus.rs"]
mod prometheus;
#[path = "e2e_ops/restart.rs"]
mod restart;
#[path = "e2e_ops/routing.rs"]
mod routing;
#[path = "e2e_ops/slow_path.rs"]
mod slow_path;
#[path = "e2e_ops/upgrade.rs"]
mod upgrade;

/// P 203.0.113.10 <-> V 10.0.0.10, open to TCP, UDP and ICMP from anywhere.
const ONE_MAPPING_OPEN: &str = "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n\
                                [[rule]]\npublic = \"203.0.113.10\"\nproto = \"tcp\"\n\
                                [[rule]]\npublic = \"203.0.113.10\"\nproto = \"udp\"\n\
                                [[rule]]\npublic = \"203.0.113.10\"\nproto = \"icmp\"\n";

fn at(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

/// The mappings natctl lists, without counters.
fn pairs(natctl: &Natctl) -> anyhow::Result<Vec<(Ipv4Addr, Ipv4Addr)>> {
    Ok(natctl
        .mappings()?
        .iter()
        .map(|m| (m.public, m.private))
        .collect())
}

/// natctl's `status --json`, parsed.
fn status(natctl: &Natctl) -> anyhow::Result<serde_json::Value> {
    let out = natctl.ok(&["status", "--json"])?;
    serde_json::from_str(&out).with_context(|| format!("parsing `natctl status --json`: {out}"))
}

/// Everything natd was told, as natctl and nftables show it: what must survive a restart and
/// what a refused change must leave as it was. Counters and flows are not part of it.
#[derive(Debug, Clone, PartialEq)]
struct Desired {
    mappings: Vec<(Ipv4Addr, Ipv4Addr)>,
    firewall: Vec<IngressRule>,
    egress: EgressPolicy,
    generation: u64,
    nft: Option<String>,
}

impl Desired {
    fn of(topo: &Topology, natctl: &Natctl) -> anyhow::Result<Self> {
        let status = status(natctl)?;
        Ok(Self {
            mappings: pairs(natctl)?,
            firewall: natctl.firewall_rules()?,
            egress: natctl.egress()?,
            generation: status["generation"]
                .as_u64()
                .with_context(|| format!("status --json: no generation: {status}"))?,
            nft: topo.nft_text()?,
        })
    }
}
