//! The client/router/guest topology the end-to-end tests and the demo run natd on: three
//! namespaces `<prefix>client`, `<prefix>router`, `<prefix>guest`, wired as below. Public side
//! from RFC 5737 (client link 198.51.100.0/24, mapped addresses 203.0.113.0/24), guest side
//! from 10.0.0.0/8; no namespace has a route anywhere else, so traffic cannot leave it.
//!
//! ```text
//! client eth0 198.51.100.2 ── pub0 198.51.100.1  router  gst0 10.0.0.1 ── eth0 10.0.0.10 guest
//!   route 203.0.113.0/24 via 198.51.100.1   (natd: XDP, nftables)   default via 10.0.0.1
//! ```
use std::net::Ipv4Addr;

use crate::netns::Netns;

/// The router's interface towards the client (natd's `--public-iface`).
pub const ROUTER_PUBLIC_IF: &str = "pub0";
/// The router's interface towards the guest (natd's `--guest-iface`).
pub const ROUTER_GUEST_IF: &str = "gst0";
/// The client's and the guest's interface.
pub const HOST_IF: &str = "eth0";

pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const ROUTER_PUBLIC_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const ROUTER_GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The guest's private address, V.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
/// The public address mapped to the guest, P.
pub const PUBLIC_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// Where the client routes through the router.
pub const MAPPED_NET: &str = "203.0.113.0/24";

/// The three namespaces, wired; each deleted when dropped (also if wiring fails).
pub struct ThreeNamespaces {
    pub client: Netns,
    pub router: Netns,
    pub guest: Netns,
}

impl ThreeNamespaces {
    /// Creates `<prefix>client`, `<prefix>router` and `<prefix>guest` and wires them.
    pub fn create(prefix: &str) -> anyhow::Result<Self> {
        // Each guard exists as soon as its namespace does, so a failure below removes it.
        let ns = Self {
            client: Netns::create(format!("{prefix}client"))?,
            router: Netns::create(format!("{prefix}router"))?,
            guest: Netns::create(format!("{prefix}guest"))?,
        };
        ns.wire()?;
        Ok(ns)
    }

    fn wire(&self) -> anyhow::Result<()> {
        let (c, r, g) = (&self.client, &self.router, &self.guest);
        // Both veth pairs are created in the router with the peer placed directly in the other
        // namespace: no interface ever appears in the host's namespace.
        for (dev, peer_ns) in [(ROUTER_PUBLIC_IF, c), (ROUTER_GUEST_IF, g)] {
            r.ip(&[
                "link",
                "add",
                dev,
                "type",
                "veth",
                "peer",
                "name",
                HOST_IF,
                "netns",
                peer_ns.name(),
            ])?;
        }
        for (ns, dev, addr) in [
            (c, HOST_IF, CLIENT_ADDR),
            (r, ROUTER_PUBLIC_IF, ROUTER_PUBLIC_ADDR),
            (r, ROUTER_GUEST_IF, ROUTER_GUEST_ADDR),
            (g, HOST_IF, GUEST_ADDR),
        ] {
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        for ns in [c, r, g] {
            ns.ip(&["link", "set", "lo", "up"])?;
        }
        r.sysctl(&["net.ipv4.ip_forward=1"])?;
        let (via_public, via_guest) = (
            ROUTER_PUBLIC_ADDR.to_string(),
            ROUTER_GUEST_ADDR.to_string(),
        );
        c.ip(&["route", "add", MAPPED_NET, "via", &via_public])?;
        g.ip(&["route", "add", "default", "via", &via_guest])?;
        for ns in [c, g] {
            // XDP_REDIRECT into a veth delivers only if the receiving peer has NAPI (GRO on).
            // TX checksum offload off: the ends send full checksums, as hosts on a wire would,
            // instead of veth's partial ones, which do not survive XDP_REDIRECT.
            ns.exec("ethtool", &["-K", HOST_IF, "gro", "on", "tx", "off"])?;
        }
        Ok(())
    }
}
