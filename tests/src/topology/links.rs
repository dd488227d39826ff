//! More topology on request: a further namespace wired to the router by its own veth pair and
//! subnet, as a second guest network or as a second public network's upstream ("gateway"); and
//! what `nft` shows of natd's table (addresses, MACs and neighbours: [`Netns::ipv4_addrs`],
//! [`Netns::mac`], [`Netns::neighbour`]). Each further
//! namespace comes back as a guard the test holds; dropping it deletes the namespace and with
//! it the veth pair. The interface on the router's side goes with it.
//!
//! ```text
//! guest2   eth0 10.0.1.10  ── gst1 10.0.1.1   router   (a second guest network)
//! upstream eth0 192.0.2.2  ── pub1 192.0.2.1  router   (a second public network)
//! ```
//!
//! [`Topology::add_link`] wires a further link into a namespace that exists already (the
//! client's second way to the router, say); it goes when that namespace does.
use std::net::Ipv4Addr;

use anyhow::{Context as _, ensure};

pub use nat_testbed::netns::{AddrInfo, Neighbour};

use super::{COMMAND_TIMEOUT, HOST_IF, Netns, Topology, run_bounded};

/// The router's interface towards the second guest.
pub const ROUTER_GUEST2_IF: &str = "gst1";
pub const ROUTER_GUEST2_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
/// The second guest's address, on its own subnet 10.0.1.0/24.
pub const GUEST2_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
/// The router's interface towards the second public network's upstream.
pub const ROUTER_PUBLIC2_IF: &str = "pub1";
pub const ROUTER_PUBLIC2_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The second public network's upstream, 192.0.2.0/24 (RFC 5737).
pub const UPSTREAM2_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

/// One point-to-point subnet between the router and a further namespace.
#[derive(Debug, Clone, Copy)]
pub struct Link<'a> {
    /// The router's end (the far end is always `eth0`).
    pub router_if: &'a str,
    pub router_addr: Ipv4Addr,
    pub peer_addr: Ipv4Addr,
    pub prefix: u8,
}

/// The second guest network: gst1 10.0.1.1/24 -- guest2 10.0.1.10.
pub const GUEST2_LINK: Link<'static> = Link {
    router_if: ROUTER_GUEST2_IF,
    router_addr: ROUTER_GUEST2_ADDR,
    peer_addr: GUEST2_ADDR,
    prefix: 24,
};

/// The second public network: pub1 192.0.2.1/24 -- upstream 192.0.2.2.
pub const PUBLIC2_LINK: Link<'static> = Link {
    router_if: ROUTER_PUBLIC2_IF,
    router_addr: ROUTER_PUBLIC2_ADDR,
    peer_addr: UPSTREAM2_ADDR,
    prefix: 24,
};

impl Topology {
    /// A further guest: a namespace named `...-<role>` behind `link`, default route via the
    /// router. natd needs `--guest-iface link.router_if` to serve it.
    pub fn add_guest(&self, role: &str, link: Link<'_>) -> anyhow::Result<Netns> {
        let via = link.router_addr.to_string();
        self.add_namespace(role, link, &[&["default", "via", &via]])
    }

    /// A further public network's upstream: a namespace named `...-<role>` behind `link` that
    /// routes the mapped range 203.0.113.0/24 back to the router. natd needs
    /// `--public-iface link.router_if` to serve it.
    pub fn add_upstream(&self, role: &str, link: Link<'_>) -> anyhow::Result<Netns> {
        let via = link.router_addr.to_string();
        self.add_namespace(role, link, &[&["203.0.113.0/24", "via", &via]])
    }

    fn add_namespace(
        &self,
        role: &str,
        link: Link<'_>,
        routes: &[&[&str]],
    ) -> anyhow::Result<Netns> {
        let prefix = self
            .router
            .name()
            .strip_suffix("router")
            .context("the router namespace's name does not end in \"router\"")?;
        // The guard exists as soon as the namespace does, so a failure below removes it.
        let ns = Netns::create(format!("{prefix}{role}"))?;
        self.add_link(&ns, HOST_IF, link)?;
        ns.ip(&["link", "set", "lo", "up"])?;
        for route in routes {
            let args: Vec<&str> = ["route", "add"].iter().chain(*route).copied().collect();
            ns.ip(&args)?;
        }
        Ok(ns)
    }

    /// A veth pair from the router (`link.router_if`) to `peer_if` in `ns`, with the
    /// link's addresses, up, with NAPI on the far end (see [`Topology::new`]); the router has
    /// reached the far end once (so it knows its neighbour).
    pub fn add_link(&self, ns: &Netns, peer_if: &str, link: Link<'_>) -> anyhow::Result<()> {
        let r = &self.router;
        r.ip(&[
            "link",
            "add",
            link.router_if,
            "type",
            "veth",
            "peer",
            "name",
            peer_if,
            "netns",
            ns.name(),
        ])?;
        for (n, dev, addr) in [
            (r, link.router_if, link.router_addr),
            (ns, peer_if, link.peer_addr),
        ] {
            n.ip(&[
                "addr",
                "add",
                &format!("{addr}/{}", link.prefix),
                "dev",
                dev,
            ])?;
            n.ip(&["link", "set", dev, "up"])?;
        }
        // As for the first two: NAPI for XDP_REDIRECT, full checksums on the wire.
        ns.exec("ethtool", &["-K", peer_if, "gro", "on", "tx", "off"])?;
        let peer = link.peer_addr.to_string();
        r.exec("ping", &["-n", "-q", "-c", "1", "-W", "5", &peer])
            .with_context(|| format!("the router cannot reach {peer}"))?;
        Ok(())
    }

    /// natd's nftables table in the router as `nft list table` text (no handles, so two
    /// installs of the same ruleset print the same), or `None` if it is absent.
    pub fn nft_text(&self) -> anyhow::Result<Option<String>> {
        let table = nat_userspace::netfilter::TABLE;
        let out = run_bounded(
            self.router
                .command("nft")
                .args(["list", "table", "ip", table]),
            COMMAND_TIMEOUT,
        )?;
        if out.status.success() {
            return Ok(Some(out.stdout));
        }
        ensure!(
            out.stderr.contains("No such file or directory"),
            "nft list table ip {table} failed: {}",
            out.stderr.trim()
        );
        Ok(None)
    }
}
