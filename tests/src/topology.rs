//! End-to-end topology for natd: three network namespaces this process creates, wired as
//! below, each deleted when its guard drops (also while unwinding from a panic). Names are
//! `xsn-e2e-<pid>-<n>-<role>`, unique per topology, so tests run in parallel without meeting;
//! nothing this module did not create is ever touched.
//!
//! ```text
//! client eth0 198.51.100.2 ── pub0 198.51.100.1  router  gst0 10.0.0.1 ── eth0 10.0.0.10 guest
//!   route 203.0.113.0/24 via 198.51.100.1   (natd: XDP, nftables)   default via 10.0.0.1
//! ```
//!
//! Public side from RFC 5737 (client link 198.51.100.0/24, mapped addresses 203.0.113.0/24,
//! extra client addresses from 192.0.2.0/24 on request), guest side from 10.0.0.0/8. No
//! namespace has a route anywhere else, so test traffic cannot leave the topology. The
//! namespaces, their wiring (shared with `cargo xtask demo`) and the bounded command runner
//! come from `nat_testbed`; what is natd's own stays here. `process`
//! runs natd and natctl; `policy` drives natctl's firewall, egress and conntrack commands;
//! `observe` records what endpoints saw; `fastpath` checks from that that the fast path
//! carried it; `attempt` sends traffic that may be dropped and checks
//! that nothing arrived; `icmp_error` reads the ICMP errors a sender got; `flood` opens many
//! flows at once; `links` adds further guests and public networks to the three;
//! `two_networks` builds two public networks with policy routing by source; `stream`
//! keeps traffic flowing while natd restarts; `capture` counts the frames an interface
//! receives by destination MAC; `sniff` sees every packet of one IP protocol a namespace
//! receives, with its addresses and whether its checksums hold; `tcp_tap` reads the TCP
//! segments an address receives and forges segments from it; `sock` holds the socket plumbing
//! they share; `prometheus` runs a Prometheus server; `vrouter` gives the
//! router a CloudStack virtual router's iptables and reads the kernel's flows.
pub mod attempt;
pub mod capture;
pub mod fastpath;
pub mod flood;
pub mod icmp_error;
pub mod links;
pub mod observe;
pub mod policy;
pub mod process;
pub mod prometheus;
pub mod sniff;
pub mod sock;
pub mod stream;
pub mod tcp_tap;
pub mod two_networks;
pub mod vrouter;

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, ensure};
pub use nat_testbed::{
    CmdOutput, Netns, ScratchDir, run_bounded,
    topology::{
        CLIENT_ADDR, GUEST_ADDR, HOST_IF, PUBLIC_ADDR, ROUTER_GUEST_ADDR, ROUTER_GUEST_IF,
        ROUTER_PUBLIC_ADDR, ROUTER_PUBLIC_IF,
    },
};
use nat_testbed::{topology::ThreeNamespaces, unique_stem};

pub use process::{Natctl, Natd, NatdOptions};

/// How long one external command (ip, nft, ethtool, ping, natctl) may take.
pub const COMMAND_TIMEOUT: Duration = nat_testbed::netns::COMMAND_TIMEOUT;

/// `xsn-e2e-<pid>-<n>-`, unique within this host while this process lives.
fn unique_prefix() -> String {
    format!("{}-", unique_stem("xsn-e2e-"))
}

/// Fails unless running as root: the tests must not pass by skipping.
pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: plain syscall without arguments.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "the end-to-end tests need root (network namespaces, XDP, nftables); euid is {euid}"
    );
    Ok(())
}

/// The three namespaces, wired and checked (the router reaches both ends before natd runs).
/// Dropping it also removes the bpffs pins natd made for it (fields drop after this).
pub struct Topology {
    pub client: Netns,
    pub router: Netns,
    pub guest: Netns,
    pub dir: ScratchDir,
}

impl Drop for Topology {
    fn drop(&mut self) {
        let pins = Natd::pin_dir(self);
        if pins.exists()
            && let Err(e) = std::fs::remove_dir_all(&pins)
        {
            eprintln!("cleanup: removing {}: {e}", pins.display());
        }
    }
}

impl Topology {
    pub fn new() -> anyhow::Result<Self> {
        require_root()?;
        let prefix = unique_prefix();
        // Each guard exists as soon as its namespace does, so a failure below removes it.
        let ThreeNamespaces {
            client,
            router,
            guest,
        } = ThreeNamespaces::create(&prefix).context("wiring the topology")?;
        let topo = Self {
            client,
            router,
            guest,
            dir: ScratchDir::create(prefix.trim_end_matches('-'))?,
        };
        topo.resolve_neighbours()
            .context("checking the topology before natd runs")?;
        Ok(topo)
    }

    /// Pings both ends from the router: proves the links work and leaves the router with
    /// neighbour entries, so translated frames take the XDP fast path from the first one.
    fn resolve_neighbours(&self) -> anyhow::Result<()> {
        for addr in [CLIENT_ADDR, GUEST_ADDR] {
            let addr = addr.to_string();
            self.router
                .exec("ping", &["-n", "-q", "-c", "1", "-W", "5", &addr])
                .with_context(|| format!("the router cannot reach {addr}"))?;
        }
        Ok(())
    }

    /// Gives the client a second address (a host of 192.0.2.0/24, RFC 5737), which sockets can
    /// bind to as their source, and routes it back from the router over the client link.
    pub fn add_client_address(&self, addr: Ipv4Addr) -> anyhow::Result<()> {
        ensure!(
            addr.octets()[..3] == [192, 0, 2],
            "{addr} is not in 192.0.2.0/24"
        );
        let (host, via) = (format!("{addr}/32"), CLIENT_ADDR.to_string());
        self.client.ip(&["addr", "add", &host, "dev", HOST_IF])?;
        self.router
            .ip(&["route", "add", &host, "via", &via, "dev", ROUTER_PUBLIC_IF])?;
        Ok(())
    }

    /// `ip -n ROUTER -d link show dev DEV`.
    pub fn router_link(&self, dev: &str) -> anyhow::Result<String> {
        self.router.ip(&["-d", "link", "show", "dev", dev])
    }

    /// natd's nftables table in the router as `nft -j` JSON text, or `None` if it is absent.
    pub fn nft_table(&self) -> anyhow::Result<Option<String>> {
        let table = nat_userspace::netfilter::TABLE;
        let out = self.router.bounded(
            self.router
                .command("nft")
                .args(["-j", "list", "table", "ip", table]),
        )?;
        if out.status.success() {
            return Ok(Some(out.stdout));
        }
        // nft says "No such file or directory" for a missing table; anything else is a failure.
        ensure!(
            out.stderr.contains("No such file or directory"),
            "nft list table ip {table} failed: {}",
            out.stderr.trim()
        );
        Ok(None)
    }

    /// The packets counted so far by the named counter `name` of natd's nftables table.
    pub fn nft_counter(&self, name: &str) -> anyhow::Result<u64> {
        let table = nat_userspace::netfilter::TABLE;
        let out = self.router.bounded(
            self.router
                .command("nft")
                .args(["-j", "list", "counter", "ip", table, name]),
        )?;
        ensure!(
            out.status.success(),
            "nft list counter ip {table} {name}: {}",
            out.stderr.trim()
        );
        let json: serde_json::Value =
            serde_json::from_str(&out.stdout).context("parsing nft -j")?;
        json["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|o| o["counter"]["packets"].as_u64())
            .with_context(|| format!("nft -j: no packets of counter {name}: {}", out.stdout))
    }

    /// The elements of each map in natd's nftables table (`dnat_v4`, `snat_v4`), or `None` if
    /// the table is absent.
    pub fn nft_maps(&self) -> anyhow::Result<Option<NftMaps>> {
        let Some(text) = self.nft_table()? else {
            return Ok(None);
        };
        let json: serde_json::Value = serde_json::from_str(&text).context("parsing nft -j")?;
        let mut maps = NftMaps::new();
        let objects = json["nftables"]
            .as_array()
            .context("nft -j: no nftables array")?;
        for map in objects.iter().filter_map(|o| o.get("map")) {
            let name = map["name"].as_str().context("nft -j: a map without name")?;
            let mut elems = Vec::new();
            // `elem` is absent for an empty map.
            for e in map["elem"].as_array().into_iter().flatten() {
                let pair = |i: usize| -> anyhow::Result<Ipv4Addr> {
                    e[i].as_str()
                        .with_context(|| format!("nft -j: map {name}: element {e}"))?
                        .parse()
                        .with_context(|| format!("nft -j: map {name}: element {e}"))
                };
                elems.push((pair(0)?, pair(1)?));
            }
            maps.insert(name.to_string(), elems);
        }
        Ok(Some(maps))
    }
}

/// nft map name -> its (key, value) elements.
pub type NftMaps = std::collections::BTreeMap<String, Vec<(Ipv4Addr, Ipv4Addr)>>;
