//! The test bench: a namespace with the topology below, the XDP program loaded from
//! `nat_userspace::EBPF_OBJECT` with its maps filled, a runner over `BPF_PROG_TEST_RUN`, and the
//! [`Model`] configured from the same facts.
//!
//! ```text
//!  pub0 198.51.100.1/24 (PUBLIC)  -- pub1     neighbour 198.51.100.2 (gateway to 192.0.2.0/24)
//!  gst0 10.0.0.1/24 mtu 1400 (GUEST) -- gst1  neighbours 10.0.0.10, 10.0.0.11; 10.0.0.20 none
//!  oth0 203.0.113.1/24 (not in IFACES) -- oth1 neighbour 203.0.113.2
//!  lo   (down, not in IFACES)
//! ```
//!
//! Each run reads `STATS` and every mapping's counters (summed over CPUs) and turns the deltas
//! into the [`Outcome`]'s reason and counted mapping, failing unless exactly one reason slot
//! moved by one frame of the frame's length and at most one mapping did.
use std::{cell::RefCell, collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context as _, anyhow, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{DevMapHash, HashMap, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use nat_common::{
    Counter, IfaceConfig, MAP_DEVMAP, MAP_IFACES, MAP_NAT_IN, MAP_NAT_OUT, MAP_STATS, NatEntry,
    ROLE_GUEST, ROLE_PUBLIC, Reason,
};

use crate::{
    model::{Direction, Fib, Iface, Model, Outcome},
    netns::NetnsGuard,
};

const fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

pub const PUB_ADDR: Ipv4Addr = ip(198, 51, 100, 1);
pub const PUB_GW: Ipv4Addr = ip(198, 51, 100, 2);
pub const PUB_GW_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x02];
/// On the public subnet, no neighbour entry.
pub const PUB_NO_NEIGH: Ipv4Addr = ip(198, 51, 100, 3);
/// Routed via [`PUB_GW`].
pub const REMOTE_NET: Ipv4Addr = ip(192, 0, 2, 0);
pub const REMOTE: Ipv4Addr = ip(192, 0, 2, 7);

pub const GST_ADDR: Ipv4Addr = ip(10, 0, 0, 1);
pub const GST_MTU: u16 = 1400;
pub const V1: Ipv4Addr = ip(10, 0, 0, 10);
pub const V1_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0a];
pub const V2: Ipv4Addr = ip(10, 0, 0, 11);
pub const V2_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0b];
/// A guest without a neighbour entry.
pub const V3: Ipv4Addr = ip(10, 0, 0, 20);
/// Outbound-only mapping source.
pub const V4: Ipv4Addr = ip(10, 0, 0, 12);

pub const OTH_ADDR: Ipv4Addr = ip(203, 0, 113, 1);
pub const OTH_HOST: Ipv4Addr = ip(203, 0, 113, 2);
pub const OTH_HOST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x03];
/// Not routed anywhere.
pub const UNROUTED: Ipv4Addr = ip(10, 99, 0, 1);

pub const P1: Ipv4Addr = ip(198, 51, 100, 10);
pub const P2: Ipv4Addr = ip(198, 51, 100, 11);
pub const P3: Ipv4Addr = ip(198, 51, 100, 20);
pub const P4: Ipv4Addr = ip(198, 51, 100, 12);
/// Inbound-only mappings whose private side cannot be forwarded to a guest.
pub const P_TO_REMOTE: Ipv4Addr = ip(198, 51, 100, 30);
pub const P_TO_UNROUTED: Ipv4Addr = ip(198, 51, 100, 40);
pub const P_TO_OTHER: Ipv4Addr = ip(198, 51, 100, 50);
pub const P_TO_LOCAL: Ipv4Addr = ip(198, 51, 100, 60);
pub const P_TO_BCAST: Ipv4Addr = ip(198, 51, 100, 70);

/// `NAT_IN`: public -> private.
pub const NAT_IN: [(Ipv4Addr, Ipv4Addr); 8] = [
    (P1, V1),
    (P2, V2),
    (P3, V3),
    (P_TO_REMOTE, ip(192, 0, 2, 30)),
    (P_TO_UNROUTED, UNROUTED),
    (P_TO_OTHER, OTH_HOST),
    (P_TO_LOCAL, GST_ADDR),
    (P_TO_BCAST, ip(10, 0, 0, 255)),
];
/// `NAT_OUT`: private -> public.
pub const NAT_OUT: [(Ipv4Addr, Ipv4Addr); 4] = [(V1, P1), (V2, P2), (V3, P3), (V4, P4)];

/// Capacity of `NAT_IN` and `NAT_OUT` in tests (natd uses `nat_common::MAX_MAPPINGS`).
pub const TEST_MAX_MAPPINGS: u32 = 1024;

/// An interface of the namespace.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    pub ifindex: u32,
    pub mac: [u8; 6],
}

#[derive(Clone, Copy, Debug)]
pub struct Topology {
    pub pub0: Link,
    pub gst0: Link,
    pub oth0: Link,
    pub lo: Link,
}

/// The loaded program in its namespace. Not `Send`: runs must happen on the creating thread.
pub struct Harness {
    ebpf: Ebpf,
    pub topo: Topology,
    pub model: Model,
    /// Last seen `STATS`, summed over CPUs.
    stats: RefCell<Vec<Counter>>,
    /// Last seen mapping counters (packets, bytes), summed over CPUs.
    mappings: RefCell<BTreeMap<(Direction, Ipv4Addr), (u64, u64)>>,
    /// Dropped last: leaves and deletes the namespace.
    _netns: NetnsGuard,
}

fn topology_script() -> String {
    format!(
        "link add pub0 type veth peer name pub1
link add gst0 type veth peer name gst1
link add oth0 type veth peer name oth1
link set dev gst0 mtu {GST_MTU}
link set dev pub0 up
link set dev pub1 up
link set dev gst0 up
link set dev gst1 up
link set dev oth0 up
link set dev oth1 up
addr add {PUB_ADDR}/24 dev pub0
addr add {GST_ADDR}/24 dev gst0
addr add {OTH_ADDR}/24 dev oth0
neigh add {PUB_GW} lladdr {} dev pub0 nud permanent
neigh add {V1} lladdr {} dev gst0 nud permanent
neigh add {V2} lladdr {} dev gst0 nud permanent
neigh add {OTH_HOST} lladdr {} dev oth0 nud permanent
route add {REMOTE_NET}/24 via {PUB_GW}
",
        mac_str(PUB_GW_MAC),
        mac_str(V1_MAC),
        mac_str(V2_MAC),
        mac_str(OTH_HOST_MAC)
    )
}

pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let v = s
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("MAC {s}"))?;
    v.try_into().map_err(|_| anyhow!("MAC {s}: not 6 bytes"))
}

/// Reads ifindex and MAC of every link with `ip -j link show` (sysfs is per mount namespace,
/// not per thread network namespace, so it would show the host's links).
fn read_links(ns: &NetnsGuard) -> anyhow::Result<Topology> {
    let json: serde_json::Value = serde_json::from_str(&ns.ip(&["-j", "link", "show"])?)?;
    let links = json.as_array().context("ip -j link: not an array")?;
    let find = |name: &str| -> anyhow::Result<Link> {
        let l = links
            .iter()
            .find(|l| l["ifname"] == name)
            .with_context(|| format!("no link {name}"))?;
        let ifindex = l["ifindex"].as_u64().context("ifindex")? as u32;
        let mac = parse_mac(l["address"].as_str().context("address")?)?;
        Ok(Link { ifindex, mac })
    };
    Ok(Topology {
        pub0: find("pub0")?,
        gst0: find("gst0")?,
        oth0: find("oth0")?,
        lo: find("lo")?,
    })
}

fn model_for(t: &Topology) -> Model {
    let mut fib = Fib::default();
    fib.add_iface(Iface {
        ifindex: t.pub0.ifindex,
        mac: t.pub0.mac,
        mtu: 1500,
    });
    fib.add_iface(Iface {
        ifindex: t.gst0.ifindex,
        mac: t.gst0.mac,
        mtu: GST_MTU,
    });
    fib.add_iface(Iface {
        ifindex: t.oth0.ifindex,
        mac: t.oth0.mac,
        mtu: 1500,
    });
    fib.add_address(t.pub0.ifindex, PUB_ADDR, 24);
    fib.add_address(t.gst0.ifindex, GST_ADDR, 24);
    fib.add_address(t.oth0.ifindex, OTH_ADDR, 24);
    fib.add_neighbour(t.pub0.ifindex, PUB_GW, PUB_GW_MAC);
    fib.add_neighbour(t.gst0.ifindex, V1, V1_MAC);
    fib.add_neighbour(t.gst0.ifindex, V2, V2_MAC);
    fib.add_neighbour(t.oth0.ifindex, OTH_HOST, OTH_HOST_MAC);
    fib.add_gateway_route(t.pub0.ifindex, REMOTE_NET, 24, PUB_GW);
    Model {
        roles: [(t.pub0.ifindex, ROLE_PUBLIC), (t.gst0.ifindex, ROLE_GUEST)].into(),
        nat_in: NAT_IN.into(),
        nat_out: NAT_OUT.into(),
        fib,
    }
}

fn key(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

fn nr_cpus() -> anyhow::Result<usize> {
    aya::util::nr_cpus().map_err(|(path, e)| anyhow!("{path}: {e}"))
}

impl Harness {
    /// Creates and enters a namespace, builds the topology, loads and configures the program.
    pub fn new() -> anyhow::Result<Self> {
        let netns = NetnsGuard::new()?;
        netns.ip_batch(&topology_script())?;
        netns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.forwarding=1",
        ])?;
        let topo = read_links(&netns)?;

        // Harmless on kernels that account BPF memory to the cgroup (5.11+).
        let rlim = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: plain syscall with a valid struct.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };

        // The mapping maps are preallocated per-CPU hashes of a million entries, whose creation
        // takes seconds; a small capacity changes nothing the tests look at.
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_NAT_IN, TEST_MAX_MAPPINGS)
            .map_max_entries(MAP_NAT_OUT, TEST_MAX_MAPPINGS)
            .load(nat_userspace::EBPF_OBJECT)
            .context("load EBPF_OBJECT")?;
        let prog: &mut Xdp = ebpf
            .program_mut("nat")
            .context("no program nat")?
            .try_into()
            .context("nat is not XDP")?;
        prog.load().context("verifier rejected nat")?;

        let ncpu = nr_cpus()?;
        let links = [(topo.pub0, ROLE_PUBLIC), (topo.gst0, ROLE_GUEST)];
        let mut ifaces: HashMap<_, u32, IfaceConfig> = ebpf
            .map_mut(MAP_IFACES)
            .context("no map IFACES")?
            .try_into()?;
        for (l, role) in links {
            ifaces.insert(l.ifindex, IfaceConfig { role, addr: 0 }, 0)?;
        }
        let mut devmap: DevMapHash<_> = ebpf
            .map_mut(MAP_DEVMAP)
            .context("no map DEVMAP")?
            .try_into()?;
        for (l, _) in links {
            devmap.insert(l.ifindex, l.ifindex, None, 0)?;
        }
        for (name, table) in [(MAP_NAT_IN, &NAT_IN[..]), (MAP_NAT_OUT, &NAT_OUT[..])] {
            let mut m: PerCpuHashMap<_, u32, NatEntry> = ebpf
                .map_mut(name)
                .with_context(|| format!("no map {name}"))?
                .try_into()?;
            for (from, to) in table {
                let v = PerCpuValues::try_from(vec![NatEntry::new(key(*to)); ncpu])?;
                m.insert(key(*from), v, 0)?;
            }
        }

        let h = Self {
            ebpf,
            topo,
            model: model_for(&topo),
            stats: RefCell::new(Vec::new()),
            mappings: RefCell::new(BTreeMap::new()),
            _netns: netns,
        };
        *h.stats.borrow_mut() = h.read_stats()?;
        *h.mappings.borrow_mut() = h.read_mappings()?;
        Ok(h)
    }

    fn read_stats(&self) -> anyhow::Result<Vec<Counter>> {
        let m: PerCpuArray<_, Counter> = self
            .ebpf
            .map(MAP_STATS)
            .context("no map STATS")?
            .try_into()?;
        (0..Reason::COUNT)
            .map(|i| {
                let v = m.get(&i, 0)?;
                Ok(v.iter().fold(Counter::default(), |a, c| Counter {
                    packets: a.packets + c.packets,
                    bytes: a.bytes + c.bytes,
                }))
            })
            .collect()
    }

    fn read_mappings(&self) -> anyhow::Result<BTreeMap<(Direction, Ipv4Addr), (u64, u64)>> {
        let mut out = BTreeMap::new();
        for (dir, name, table) in [
            (Direction::Inbound, MAP_NAT_IN, &NAT_IN[..]),
            (Direction::Outbound, MAP_NAT_OUT, &NAT_OUT[..]),
        ] {
            let m: PerCpuHashMap<_, u32, NatEntry> = self
                .ebpf
                .map(name)
                .with_context(|| format!("no map {name}"))?
                .try_into()?;
            for (from, to) in table {
                let v = m.get(&key(*from), 0)?;
                let mut sum = (0, 0);
                for e in v.iter() {
                    ensure!(
                        e.addr == key(*to) && e._pad == 0,
                        "{name}[{from}] changed: {e:?}"
                    );
                    sum = (sum.0 + e.packets, sum.1 + e.bytes);
                }
                out.insert((dir, *from), sum);
            }
        }
        Ok(out)
    }

    /// Runs `frame` as if received on `ingress` and reports what the program did.
    pub fn run(&self, ingress: u32, frame: &[u8]) -> anyhow::Result<Outcome> {
        let len = frame.len();
        let ctx: Vec<u8> = [0, len as u32, 0, ingress, 0, 0]
            .iter()
            .flat_map(|v: &u32| v.to_ne_bytes())
            .collect();
        let mut out = vec![0u8; len + 256];
        let prog: &Xdp = self
            .ebpf
            .program("nat")
            .context("no program nat")?
            .try_into()?;
        let res = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN on ifindex {ingress}, {len} bytes"))?;
        out.truncate(res.data_size_out as usize);

        let stats = self.read_stats()?;
        let mut before = self.stats.borrow_mut();
        let moved: Vec<_> = Reason::ALL
            .iter()
            .zip(stats.iter().zip(before.iter()))
            .filter(|(_, (a, b))| a != b)
            .map(|(r, (a, b))| {
                (
                    *r,
                    a.packets.wrapping_sub(b.packets),
                    a.bytes.wrapping_sub(b.bytes),
                )
            })
            .collect();
        *before = stats;
        let reason = match moved[..] {
            [(r, 1, bytes)] if bytes == len as u64 => r,
            _ => bail!("STATS must move by exactly one frame of {len} bytes, moved {moved:?}"),
        };

        let mappings = self.read_mappings()?;
        let mut before = self.mappings.borrow_mut();
        let moved: Vec<_> = mappings
            .iter()
            .filter(|(k, v)| before.get(k) != Some(v))
            .map(|(k, v)| {
                (
                    *k,
                    v.0.wrapping_sub(before[k].0),
                    v.1.wrapping_sub(before[k].1),
                )
            })
            .collect();
        *before = mappings;
        let counted = match moved[..] {
            [] => None,
            [(k, 1, bytes)] if bytes == len as u64 => Some(k),
            _ => bail!("mapping counters must move by at most one frame of {len} bytes: {moved:?}"),
        };
        Ok(Outcome {
            action: res.return_value,
            reason,
            frame: out,
            counted,
        })
    }
}
