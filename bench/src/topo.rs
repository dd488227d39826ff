//! The three-namespace topology of sections 2-4, in one of five router setups:
//!
//! ```text
//! client eth0 198.51.100.2 -- eth2 198.51.100.1  router  eth0 10.0.0.1 -- eth0 guest
//!   routes 203.0.113.0/24, 10.0.0.0/24 via router       10.0.0.10 (V1), .11 (V2), .12 (V3)
//! ```
//!
//! Router interfaces are named as on a CloudStack virtual router (eth2 public, eth0 guest).
//! A second veth pair joins client and guest directly (eth1 on both: the generator-and-sink
//! cost without a router). Every neighbour is permanent, every veth end has GRO on (NAPI, so
//! frames redirected into it are delivered) and TX checksum offload off (full checksums
//! survive XDP rewrites). Guest and client each run a counting [`Sink`] in native XDP on both
//! their interfaces: it counts and drops the generated UDP (either port in
//! [`GEN_PORT_LO`]..=[`GEN_PORT_HI`]: the generated flows and their answers) and passes
//! everything else to the stack. Each namespace, natd and the sinks' links go when the
//! topology drops.
use std::net::Ipv4Addr;

use anyhow::Context as _;
use aya::{Ebpf, programs::XdpMode};

use crate::{
    bpf,
    natd::Natd,
    netns::{self, Netns, mac_str, unique_stem},
};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const ROUTER_PUB: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const ROUTER_GST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const V1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
pub const V2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
pub const V3: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);
pub const P1: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const P2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
pub const P3: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 12);
/// Destination ports of generated traffic (allowed on P1 by its one rule).
pub const GEN_PORT_LO: u16 = 5000;
pub const GEN_PORT_HI: u16 = 5015;

/// How the router forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    /// Kernel IPv4 forwarding, no NAT, no netfilter.
    Plain,
    /// CloudStack's iptables static NAT rules for P1 -> V1 and P2 -> V2, with conntrack.
    Iptables,
    /// natd in native XDP mode with the same mappings and rule.
    Natd,
    /// The iptables ruleset of [`Setup::Iptables`], and natd with `--policy kernel` and the
    /// same mappings (no rules of its own): the kernel judges and translates each flow's
    /// first packets, natd's tc learner enters the flows the kernel admitted, and XDP carries
    /// them from then on.
    NatdKernel,
    /// No NAT: the bench's own XDP router (`bench-fwd`), which reads one 64-byte slot per
    /// flow (a direct-mapped table of as many slots as natd's `FLOWS` holds entries) and
    /// redirects the frame: the least any flow table costs per packet.
    Floor,
}

impl Setup {
    pub fn name(self) -> &'static str {
        match self {
            Setup::Plain => "kernel forwarding, no NAT",
            Setup::Iptables => "iptables static NAT (CloudStack rules)",
            Setup::Natd => "xdp-static-nat (natd, native XDP)",
            Setup::NatdKernel => "xdp-static-nat --policy kernel behind the iptables rules",
            Setup::Floor => "XDP forwarding with one per-flow slot read, no NAT (the floor)",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Setup::Plain => "kernel fwd",
            Setup::Iptables => "iptables NAT",
            Setup::Natd => "XDP NAT",
            Setup::NatdKernel => "XDP NAT, policy kernel",
            Setup::Floor => "XDP floor",
        }
    }

    /// Where generated traffic is sent.
    pub fn target(self) -> Ipv4Addr {
        if matches!(self, Setup::Plain | Setup::Floor) {
            V1
        } else {
            P1
        }
    }
}

/// A namespace's counting XDP program (`bench-sink`), attached to its eth0 and eth1 (the
/// links go with the object).
pub struct Sink {
    ebpf: Ebpf,
}

impl Sink {
    fn attach(ns: &Netns) -> anyhow::Result<Self> {
        let (lo, hi) = (u32::from(GEN_PORT_LO), u32::from(GEN_PORT_HI));
        let mut ebpf = bpf::load(bpf::SINK, |l| {
            l.override_global("PORT_LO", &lo, true)
                .override_global("PORT_HI", &hi, true);
        })?;
        let prog = bpf::xdp(&mut ebpf, "bench_sink")?;
        ns.run(|| -> anyhow::Result<()> {
            for dev in ["eth0", "eth1"] {
                prog.attach(dev, XdpMode::Driver)
                    .with_context(|| format!("attaching the sink to {} {dev}", ns.name()))?;
            }
            Ok(())
        })??;
        Ok(Self { ebpf })
    }

    /// Frames counted so far.
    pub fn count(&self) -> anyhow::Result<u64> {
        bpf::percpu_sum(&self.ebpf, "COUNT", 0)
    }
}

pub struct Topo {
    pub setup: Setup,
    pub client: Netns,
    pub router: Netns,
    pub guest: Netns,
    pub client_if: u32,
    pub client_mac: [u8; 6],
    pub router_pub_mac: [u8; 6],
    pub guest_if: u32,
    pub guest_mac: [u8; 6],
    pub router_gst_mac: [u8; 6],
    /// A veth pair straight from the client (eth1) to the guest (eth1), both with a sink: the
    /// generator-and-sink cost without any router, subtracted to get the router's share.
    pub client_direct_if: u32,
    pub client_direct_mac: [u8; 6],
    pub guest_direct_if: u32,
    pub guest_direct_mac: [u8; 6],
    /// Counts what reaches the guest (inbound traffic) and the client (outbound traffic).
    pub guest_sink: Sink,
    pub client_sink: Sink,
    /// Declared after the namespaces it runs in, so it stops before they go... see Drop.
    pub natd: Option<Natd>,
    /// [`Setup::Floor`]'s router program (its links go with it).
    pub floor: Option<Ebpf>,
}

impl Drop for Topo {
    fn drop(&mut self) {
        // natd first (it detaches XDP and removes its nftables table and pins), then the
        // namespaces (fields).
        self.natd.take();
    }
}

impl Topo {
    pub fn new(setup: Setup) -> anyhow::Result<Self> {
        let stem = unique_stem();
        let client = netns::create(format!("{stem}-client"))?;
        let router = netns::create(format!("{stem}-router"))?;
        let guest = netns::create(format!("{stem}-guest"))?;
        router.ip(&[
            "link",
            "add",
            "eth2",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            client.name(),
        ])?;
        router.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            guest.name(),
        ])?;
        client.ip(&[
            "link",
            "add",
            "eth1",
            "type",
            "veth",
            "peer",
            "name",
            "eth1",
            "netns",
            guest.name(),
        ])?;
        client.ip(&["link", "set", "eth1", "up"])?;
        guest.ip(&["link", "set", "eth1", "up"])?;
        let (client_direct_if, client_direct_mac) = client.link("eth1")?;
        let (guest_direct_if, guest_direct_mac) = guest.link("eth1")?;
        let (client_if, client_mac) = client.link("eth0")?;
        let (router_pub_if, router_pub_mac) = router.link("eth2")?;
        let (router_gst_if, router_gst_mac) = router.link("eth0")?;
        let (guest_if, guest_mac) = guest.link("eth0")?;
        client.ip_batch(&format!(
            "addr add {CLIENT}/24 dev eth0\nlink set eth0 up\n\
             route add 203.0.113.0/24 via {ROUTER_PUB}\nroute add 10.0.0.0/24 via {ROUTER_PUB}\n\
             neigh add {ROUTER_PUB} lladdr {} dev eth0 nud permanent\n",
            mac_str(router_pub_mac)
        ))?;
        router.ip_batch(&format!(
            "addr add {ROUTER_PUB}/24 dev eth2\naddr add {ROUTER_GST}/24 dev eth0\n\
             link set eth2 up\nlink set eth0 up\n\
             neigh add {CLIENT} lladdr {} dev eth2 nud permanent\n\
             neigh add {V1} lladdr {g} dev eth0 nud permanent\n\
             neigh add {V2} lladdr {g} dev eth0 nud permanent\n\
             neigh add {V3} lladdr {g} dev eth0 nud permanent\n",
            mac_str(client_mac),
            g = mac_str(guest_mac)
        ))?;
        guest.ip_batch(&format!(
            "addr add {V1}/24 dev eth0\naddr add {V2}/24 dev eth0\naddr add {V3}/24 dev eth0\n\
             link set eth0 up\nroute add default via {ROUTER_GST}\n\
             neigh add {ROUTER_GST} lladdr {} dev eth0 nud permanent\n",
            mac_str(router_gst_mac)
        ))?;
        router.sysctl(&[
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.eth2.rp_filter=0",
            "net.ipv4.conf.eth0.rp_filter=0",
        ])?;
        for (ns, dev) in [
            (&client, "eth0"),
            (&client, "eth1"),
            (&router, "eth2"),
            (&router, "eth0"),
            (&guest, "eth0"),
            (&guest, "eth1"),
        ] {
            ns.exec("ethtool", &["-K", dev, "gro", "on", "tx", "off"])?;
        }
        let guest_sink = Sink::attach(&guest)?;
        let client_sink = Sink::attach(&client)?;
        let mut topo = Self {
            setup,
            client,
            router,
            guest,
            client_if,
            client_mac,
            router_pub_mac,
            guest_if,
            guest_mac,
            router_gst_mac,
            client_direct_if,
            client_direct_mac,
            guest_direct_if,
            guest_direct_mac,
            guest_sink,
            client_sink,
            natd: None,
            floor: None,
        };
        match setup {
            Setup::Plain => {}
            Setup::Iptables => topo.install_iptables()?,
            Setup::Natd => topo.natd = Some(Natd::start(&topo.router, Some(&natd_config()))?),
            Setup::NatdKernel => {
                topo.install_iptables()?;
                topo.natd = Some(Natd::start_with(
                    &topo.router,
                    Some(&mappings_config()),
                    &["--policy", "kernel"],
                )?);
            }
            Setup::Floor => topo.floor = Some(topo.attach_floor(router_pub_if, router_gst_if)?),
        }
        Ok(topo)
    }

    /// Loads [`Setup::Floor`]'s router (`bench-fwd`) with this topology's interfaces and
    /// neighbours and a table of as many slots as natd's `FLOWS` holds entries by default, and
    /// attaches it to the router's eth2 and eth0 in native mode.
    fn attach_floor(&self, pub_if: u32, gst_if: u32) -> anyhow::Result<Ebpf> {
        let slots = nat_common::maps::FLOWS.max_entries.next_power_of_two();
        let word = |m: [u8; 6]| {
            let mut b = [0u8; 8];
            b[..6].copy_from_slice(&m);
            u64::from_le_bytes(b)
        };
        let (pub_src, pub_dst) = (word(self.router_pub_mac), word(self.client_mac));
        let (gst_src, gst_dst) = (word(self.router_gst_mac), word(self.guest_mac));
        let mut ebpf = bpf::load(bpf::FWD, |l| {
            l.map_max_entries("SLOTS", slots)
                .override_global("SLOTS_N", &slots, true)
                .override_global("IF_PUB", &pub_if, true)
                .override_global("IF_GST", &gst_if, true)
                .override_global("PUB_SRC", &pub_src, true)
                .override_global("PUB_DST", &pub_dst, true)
                .override_global("GST_SRC", &gst_src, true)
                .override_global("GST_DST", &gst_dst, true);
        })?;
        let prog = bpf::xdp(&mut ebpf, "bench_fwd")?;
        self.router.run(|| -> anyhow::Result<()> {
            for dev in ["eth2", "eth0"] {
                prog.attach(dev, XdpMode::Driver)
                    .with_context(|| format!("attaching the floor router to {dev}"))?;
            }
            Ok(())
        })??;
        Ok(ebpf)
    }

    /// CloudStack's iptables static NAT rules for P1 -> V1 and P2 -> V2 in the router.
    fn install_iptables(&self) -> anyhow::Result<()> {
        self.router
            .exec_input(
                "iptables-restore",
                &[],
                &crate::iptables::ruleset(&[(P1, V1), (P2, V2)]),
            )
            .map(drop)
            .context("installing the iptables ruleset")
    }

    /// natd of a [`Setup::Natd`] topology.
    pub fn natd(&self) -> anyhow::Result<&Natd> {
        self.natd.as_ref().context("this topology runs no natd")
    }

    /// Replaces natd (killed, see [`Natd::kill`]) with a fresh one (empty state) with `config`.
    pub fn restart_natd(&mut self, config: Option<&str>) -> anyhow::Result<()> {
        if let Some(old) = self.natd.take() {
            old.kill()?;
        }
        self.natd = Some(Natd::start(&self.router, config)?);
        Ok(())
    }
}

/// natd's config: the two mappings and P1's rule (the generated traffic's ports).
pub fn natd_config() -> String {
    format!(
        "{}\n[[rule]]\npublic = \"{P1}\"\nproto = \"udp\"\nports = \"{GEN_PORT_LO}-{GEN_PORT_HI}\"\n",
        mappings_config()
    )
}

/// The two mappings alone (with `--policy kernel` the rules are the kernel's).
fn mappings_config() -> String {
    format!(
        "[[mapping]]\npublic = \"{P1}\"\nprivate = \"{V1}\"\n\n\
         [[mapping]]\npublic = \"{P2}\"\nprivate = \"{V2}\"\n"
    )
}
