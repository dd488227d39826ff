//! Two public networks, each with its own gateway, and CloudStack's policy routing by source:
//! a per-network routing table with a default route via that network's gateway and an
//! `ip rule from P table N` for each public IP P the network owns. The main table's default
//! points at network 1's gateway. The same "internet" address is behind both gateways, so only
//! the router's routing decides which one a packet reaches.
//!
//! ```text
//! upstream1 (the client) 198.51.100.2 ── pub0 198.51.100.1         gst0 ── guest 10.0.0.10
//!                                               router                          10.0.0.20
//! upstream2              192.0.2.2    ── pub1 192.0.2.1
//! both upstreams: 203.0.113.200/32 on lo
//! P1 203.0.113.10 -> 10.0.0.10, table 101: default via 198.51.100.2
//! P2 203.0.113.20 -> 10.0.0.20, table 102: default via 192.0.2.2
//! ```
use std::net::Ipv4Addr;

use super::{
    GUEST_ADDR, HOST_IF, Natd, NatdOptions, Netns, ROUTER_GUEST_IF, ROUTER_PUBLIC_IF, Topology,
    links::{PUBLIC2_LINK, ROUTER_PUBLIC2_IF},
};

pub const P1: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const P2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
pub const V1: Ipv4Addr = GUEST_ADDR;
pub const V2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);
/// The "internet" address both upstreams answer on.
pub const REMOTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 200);
pub const GATEWAY1: &str = "198.51.100.2";
pub const GATEWAY2: &str = "192.0.2.2";

/// P1 -> V1 and P2 -> V2, no rules.
pub const TWO_MAPPINGS: &str = "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n\
                                [[mapping]]\npublic = \"203.0.113.20\"\nprivate = \"10.0.0.20\"\n";

pub struct TwoNetworks {
    // Field order is drop order: natd stops before the namespaces go.
    pub natd: Natd,
    pub upstream2: Netns,
    pub topo: Topology,
}

impl TwoNetworks {
    /// The two networks, natd serving both with [`TWO_MAPPINGS`].
    pub fn new() -> anyhow::Result<Self> {
        Self::with(TWO_MAPPINGS, |_, _| Ok(()))
    }

    /// The two networks; `prepare` changes them further (given the topology and upstream2)
    /// before natd starts with `config` (TOML text).
    pub fn with(
        config: &str,
        prepare: impl FnOnce(&Topology, &Netns) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        let topo = Topology::new()?;
        let upstream2 = topo.add_upstream("upstream2", PUBLIC2_LINK)?;
        for ns in [&topo.client, &upstream2] {
            ns.ip(&["addr", "add", &format!("{REMOTE}/32"), "dev", "lo"])?;
        }
        topo.guest
            .ip(&["addr", "add", &format!("{V2}/24"), "dev", HOST_IF])?;
        let r = &topo.router;
        let (p1, p2) = (P1.to_string(), P2.to_string());
        for cmd in [
            &[
                "route",
                "add",
                "default",
                "via",
                GATEWAY1,
                "dev",
                ROUTER_PUBLIC_IF,
            ][..],
            &[
                "route",
                "add",
                "default",
                "via",
                GATEWAY1,
                "dev",
                ROUTER_PUBLIC_IF,
                "table",
                "101",
            ],
            &[
                "route",
                "add",
                "default",
                "via",
                GATEWAY2,
                "dev",
                ROUTER_PUBLIC2_IF,
                "table",
                "102",
            ],
            &["rule", "add", "from", &p1, "table", "101"],
            &["rule", "add", "from", &p2, "table", "102"],
        ] {
            r.ip(cmd)?;
        }
        // The router knows the guest's second address before natd runs, as it knows the first.
        r.exec("ping", &["-n", "-q", "-c", "1", "-W", "5", &V2.to_string()])?;
        prepare(&topo, &upstream2)?;
        let natd = Natd::start_with(
            &topo,
            &NatdOptions {
                public_ifaces: vec![ROUTER_PUBLIC_IF.into(), ROUTER_PUBLIC2_IF.into()],
                guest_ifaces: vec![ROUTER_GUEST_IF.into()],
                config: Some(config.into()),
                ..NatdOptions::default()
            },
        )?;
        Ok(Self {
            natd,
            upstream2,
            topo,
        })
    }
}
