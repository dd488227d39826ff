//! The demo's three network namespaces, named `xsn-demo-<pid>-<role>` and deleted on drop.
//! Only namespaces this guard created are ever deleted.
//!
//! ```text
//! client eth0 198.51.100.2 ── pub0 198.51.100.1  router  gst0 10.0.0.1 ── eth0 10.0.0.10 guest
//!   route 203.0.113.0/24 via 198.51.100.1     (natd: XDP)      default via 10.0.0.1
//! ```
//! Public side from RFC 5737 (198.51.100.0/24, mapped addresses in 203.0.113.0/24), guest side
//! from 10.0.0.0/8; nothing is routed anywhere else.

use std::process::Command;

use anyhow::Result;

use crate::util::{self, command};

/// The router's interface towards the client (natd's `--public-iface`).
pub const ROUTER_PUBLIC_IF: &str = "pub0";
/// The router's interface towards the guest (natd's `--guest-iface`).
pub const ROUTER_GUEST_IF: &str = "gst0";
/// The client's and the guest's interface.
pub const HOST_IF: &str = "eth0";

pub const CLIENT_ADDR: &str = "198.51.100.2";
pub const GUEST_ADDR: &str = "10.0.0.10";
pub const MAPPED_PUBLIC_ADDR: &str = "203.0.113.10";

pub struct Topology {
    pub client: String,
    pub router: String,
    pub guest: String,
    created: Vec<String>,
}

impl Topology {
    pub fn create() -> Result<Self> {
        let prefix = format!("xsn-demo-{}-", std::process::id());
        let mut topo = Self {
            client: format!("{prefix}client"),
            router: format!("{prefix}router"),
            guest: format!("{prefix}guest"),
            created: Vec::new(),
        };
        for ns in [topo.client.clone(), topo.router.clone(), topo.guest.clone()] {
            util::run(command("ip").args(["netns", "add", &ns]))?;
            topo.created.push(ns);
        }
        topo.wire()?;
        Ok(topo)
    }

    /// `ip -n NS ARGS...`
    fn ip(&self, ns: &str, args: &[&str]) -> Result<()> {
        util::run(command("ip").arg("-n").arg(ns).args(args))
    }

    /// A command run inside namespace `ns` (`ip netns exec`).
    pub fn exec(&self, ns: &str, program: &str) -> Command {
        let mut cmd = command("ip");
        cmd.args(["netns", "exec", ns, program]);
        cmd
    }

    fn wire(&self) -> Result<()> {
        let (c, r, g) = (&self.client, &self.router, &self.guest);
        // Each veth is created inside the router's namespace with its peer placed directly in
        // the other namespace, so no interface ever appears in the host's namespace.
        self.ip(
            r,
            &[
                "link",
                "add",
                ROUTER_PUBLIC_IF,
                "type",
                "veth",
                "peer",
                "name",
                HOST_IF,
                "netns",
                c,
            ],
        )?;
        self.ip(
            r,
            &[
                "link",
                "add",
                ROUTER_GUEST_IF,
                "type",
                "veth",
                "peer",
                "name",
                HOST_IF,
                "netns",
                g,
            ],
        )?;
        self.ip(c, &["addr", "add", "198.51.100.2/24", "dev", HOST_IF])?;
        self.ip(
            r,
            &["addr", "add", "198.51.100.1/24", "dev", ROUTER_PUBLIC_IF],
        )?;
        self.ip(r, &["addr", "add", "10.0.0.1/24", "dev", ROUTER_GUEST_IF])?;
        self.ip(g, &["addr", "add", "10.0.0.10/24", "dev", HOST_IF])?;
        for (ns, dev) in [
            (c, HOST_IF),
            (r, ROUTER_PUBLIC_IF),
            (r, ROUTER_GUEST_IF),
            (g, HOST_IF),
        ] {
            self.ip(ns, &["link", "set", dev, "up"])?;
        }
        for ns in [c, r, g] {
            self.ip(ns, &["link", "set", "lo", "up"])?;
        }
        util::output(self.exec(r, "sysctl").args(["-w", "net.ipv4.ip_forward=1"]))?;
        self.ip(
            c,
            &["route", "add", "203.0.113.0/24", "via", "198.51.100.1"],
        )?;
        self.ip(g, &["route", "add", "default", "via", "10.0.0.1"])?;
        for ns in [c, g] {
            // XDP_REDIRECT into a veth delivers only if the receiving peer has NAPI (GRO on).
            // TX checksum offload off: the endpoints send full checksums, as hosts on a wire
            // would, instead of veth's partial ones, which do not survive XDP_REDIRECT.
            util::output(
                self.exec(ns, "ethtool")
                    .args(["-K", HOST_IF, "gro", "on", "tx", "off"]),
            )?;
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.created.drain(..).rev() {
            let mut del = command("ip");
            del.args(["netns", "del", &ns]);
            match del.status() {
                Ok(s) if s.success() => {}
                Ok(s) => eprintln!("demo: cleanup: `{}` failed ({s})", util::describe(&del)),
                Err(e) => eprintln!("demo: cleanup: cannot run `{}`: {e}", util::describe(&del)),
            }
        }
    }
}
