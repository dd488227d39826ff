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
//! namespace has a route anywhere else, so test traffic cannot leave the topology. `process`
//! runs natd and natctl; `policy` drives natctl's firewall, egress and conntrack commands;
//! `observe` records what endpoints saw; `fastpath` checks from that that the fast path
//! carried it; `attempt` sends traffic that may be dropped and checks
//! that nothing arrived; `icmp_error` reads the ICMP errors a sender got; `flood` opens many
//! flows at once; `links` adds further guests and public networks to the three;
//! `two_networks` builds two public networks with policy routing by source; `stream`
//! keeps traffic flowing while natd restarts; `capture` counts the frames an interface
//! receives by destination MAC; `prometheus` runs a Prometheus server; `vrouter` gives the
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
pub mod stream;
pub mod two_networks;
pub mod vrouter;

use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};

pub use process::{CmdOutput, Natctl, Natd, NatdOptions, run_bounded};

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
/// The public address the tests map to the guest, P.
pub const PUBLIC_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// How long one external command (ip, nft, ethtool, ping, natctl) may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

static SEQ: AtomicU32 = AtomicU32::new(0);

/// `xsn-e2e-<pid>-<n>-`, unique within this host while this process lives.
fn unique_prefix() -> String {
    format!(
        "xsn-e2e-{}-{}-",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
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

/// A named network namespace this process created; deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    fn create(name: String) -> anyhow::Result<Self> {
        run_bounded(
            Command::new("ip").args(["netns", "add", &name]),
            COMMAND_TIMEOUT,
        )?
        .ok()
        .with_context(|| format!("creating namespace {name}"))?;
        Ok(Self { name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, for `nsenter --net=` and `setns`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `f` on a fresh thread that entered this namespace, and returns its result. Sockets
    /// `f` creates stay in this namespace wherever they are used afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).with_context(|| format!("open {}", path.display()))?;
                // SAFETY: plain syscall on a valid namespace fd; affects only this thread,
                // which ends when `f` returns.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!(
                        "setns({}): {}",
                        path.display(),
                        std::io::Error::last_os_error()
                    );
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// `ip netns exec NAME PROGRAM`: a command run inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `PROGRAM ARGS...` in this namespace; returns stdout, fails unless it exits 0.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        run_bounded(self.command(program).args(args), COMMAND_TIMEOUT)?.ok()
    }

    /// `ip -n NAME ARGS...`; returns stdout, fails unless it exits 0.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        run_bounded(
            Command::new("ip").args(["-n", &self.name]).args(args),
            COMMAND_TIMEOUT,
        )?
        .ok()
    }

    /// This namespace's IPv4 MIB counter `name` (`ReasmOKs`, `InReceives`, ...) from
    /// `/proc/net/snmp`, which shows the namespace of the process reading it.
    pub fn ip_counter(&self, name: &str) -> anyhow::Result<u64> {
        let text = self.exec("cat", &["/proc/net/snmp"])?;
        let mut ip = text.lines().filter(|l| l.starts_with("Ip: "));
        let (Some(names), Some(values)) = (ip.next(), ip.next()) else {
            bail!("/proc/net/snmp has no Ip lines:\n{text}");
        };
        let i = names
            .split_whitespace()
            .position(|n| n == name)
            .with_context(|| format!("/proc/net/snmp has no Ip counter {name}: {names}"))?;
        values
            .split_whitespace()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("/proc/net/snmp: no value for {name}: {values}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let r = run_bounded(
            Command::new("ip").args(["netns", "del", &self.name]),
            COMMAND_TIMEOUT,
        )
        .and_then(CmdOutput::ok);
        if let Err(e) = r {
            eprintln!("cleanup: deleting namespace {}: {e:#}", self.name);
        }
    }
}

/// A directory this process created for natd's socket, config and log; removed on drop.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates `$TMPDIR/xsn-e2e-<pid>-<n>`.
    pub fn new() -> anyhow::Result<Self> {
        Self::create(&unique_prefix())
    }

    fn create(prefix: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(prefix.trim_end_matches('-'));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("cleanup: removing {}: {e}", self.0.display());
        }
    }
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
        let topo = Self {
            client: Netns::create(format!("{prefix}client"))?,
            router: Netns::create(format!("{prefix}router"))?,
            guest: Netns::create(format!("{prefix}guest"))?,
            dir: ScratchDir::create(&prefix)?,
        };
        topo.wire().context("wiring the topology")?;
        topo.resolve_neighbours()
            .context("checking the topology before natd runs")?;
        Ok(topo)
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
        r.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        let (via_public, via_guest) = (
            ROUTER_PUBLIC_ADDR.to_string(),
            ROUTER_GUEST_ADDR.to_string(),
        );
        c.ip(&["route", "add", "203.0.113.0/24", "via", &via_public])?;
        g.ip(&["route", "add", "default", "via", &via_guest])?;
        for ns in [c, g] {
            // XDP_REDIRECT into a veth delivers only if the receiving peer has NAPI (GRO on).
            // TX checksum offload off: the ends send full checksums, as hosts on a wire would,
            // instead of veth's partial ones, which do not survive XDP_REDIRECT.
            ns.exec("ethtool", &["-K", HOST_IF, "gro", "on", "tx", "off"])?;
        }
        Ok(())
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
        let out = run_bounded(
            self.router
                .command("nft")
                .args(["-j", "list", "table", "ip", table]),
            COMMAND_TIMEOUT,
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
