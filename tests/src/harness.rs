//! The test bench: a namespace with the topology below, the XDP program loaded from
//! `nat_userspace::EBPF_OBJECT` with its maps filled, a runner over `BPF_PROG_TEST_RUN`, and the
//! [`Model`] configured from the same facts. Firewall rules and the egress policy come from a
//! natd [`DesiredState`] ([`Harness::set_policy`]): natd's compile step fills the program's LPM
//! maps, the model gets the rules themselves.
//!
//! ```text
//!  pub0 198.51.100.1/24 (PUBLIC)  -- pub1     neighbour 198.51.100.2 (gateway to 192.0.2.0/24)
//!                                             neighbour 198.51.100.4 (a second gateway)
//!  gst0 10.0.0.1/24 mtu 1400 (GUEST, addr 10.0.0.1) -- gst1
//!                                neighbours V1 10.0.0.10, V2 10.0.0.11, V4 10.0.0.12;
//!                                V3 10.0.0.20 none
//!  gsb0 10.0.1.1/24 (GUEST, addr 10.0.1.1) -- gsb1   neighbour V5 10.0.1.10, and V6 10.0.2.10
//!                                                    (another MAC) for when 10.0.2.0/24 moves here
//!  gsn0 no address, route 10.0.2.0/24 (GUEST, addr 0) -- gsn1   neighbour V6 10.0.2.10
//!  pbb0 no address (PUBLIC) -- pbb1   a second public network: every mapping's public IP is
//!                                      on pub0's, so new inbound flows arriving here are dropped
//!  oth0 203.0.113.1/24 (not in IFACES) -- oth1 neighbour 203.0.113.2
//!  lo   (down, not in IFACES)
//! ```
//!
//! `IFACES` holds each managed interface's role and, as natd writes it, the router's address
//! on it (0 without one): the source of hairpinned frames leaving a guest interface and the
//! destination of their replies. Hairpin between two guest interfaces goes gst0 <-> gsb0;
//! gsn0 is a guest network the program cannot hairpin into (no address).
//!
//! Each run reads `STATS`, `EVENTS` and every mapping's counters (`MAPPING_STATS` by slot,
//! summed over CPUs) and turns the deltas into the [`Outcome`]'s reason, events and counted
//! mapping, failing unless exactly one reason slot moved by one frame of the frame's length and
//! at most one mapping did. Each mapping pair gets a slot (a pair in both `NAT_IN` and
//! `NAT_OUT` one slot); a slot's inbound half is reported as `(Inbound, P)`, its outbound half
//! as `(Outbound, V)`.
//!
//! Between packets, `env` changes neighbours, routes and mappings in the namespace, the
//! program's maps and the model alike, as an operator and natd would.
//!
//! Connection-tracking timeouts are [`TEST_TIMEOUT_NS`] for every state unless a test sets
//! others, so no flow expires while a test runs; the refresh interval of the flows' last-seen
//! times is set beyond any test's length (a flow's once-a-second liveness check runs only for
//! entries a test wrote with [`flows::STALE_SEEN`]). Rules, timeouts and the flow tables of
//! program and model are set and read through the methods in `policy` and `flows`.
pub mod env;
pub mod flows;
pub mod maps;
mod policy;

pub use self::policy::{allow_all, base_state, service};

use std::{
    cell::{Cell, RefCell},
    collections::BTreeMap,
    net::Ipv4Addr,
};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{DevMapHash, HashMap, PerCpuArray},
    programs::{ProgramError, TestRun as _, TestRunOptions, Xdp},
};
use nat_common::{
    Counter, IfaceConfig, MAP_DEVMAP, MAP_FLOWS, MAP_IFACES, MAP_MAPPING_STATS, MAP_NAT_IN,
    MAP_NAT_OUT, MAP_PENDING, MAP_SLOTS, MAP_STATS, MappingStats, NatConfig, NatValue, ROLE_GUEST,
    ROLE_PUBLIC, Reason, SLOT_CACHE_GLOBAL, SLOT_MASK_GLOBAL, TIMEOUT_SLOTS,
};
use nat_userspace::{state::DesiredState, tables::Tables};

pub use nat_testbed::mac_str;

use crate::{
    model::{Direction, Events, Fib, Iface, IfaceRole, Leg, Model, Outcome, Path},
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
/// Outbound-only mapping source (has a neighbour entry, so it can receive hairpin replies).
pub const V4: Ipv4Addr = ip(10, 0, 0, 12);
pub const V4_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0c];

/// The router on the second guest network (hairpin across guest interfaces).
pub const GSB_ADDR: Ipv4Addr = ip(10, 0, 1, 1);
pub const V5: Ipv4Addr = ip(10, 0, 1, 10);
pub const V5_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x15];
/// A guest on the third guest network, whose interface has no address.
pub const GSN_NET: Ipv4Addr = ip(10, 0, 2, 0);
pub const V6: Ipv4Addr = ip(10, 0, 2, 10);
pub const V6_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x16];

pub const OTH_ADDR: Ipv4Addr = ip(203, 0, 113, 1);
pub const OTH_HOST: Ipv4Addr = ip(203, 0, 113, 2);
pub const OTH_HOST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x03];
/// Not routed anywhere.
pub const UNROUTED: Ipv4Addr = ip(10, 99, 0, 1);

pub const P1: Ipv4Addr = ip(198, 51, 100, 10);
pub const P2: Ipv4Addr = ip(198, 51, 100, 11);
pub const P3: Ipv4Addr = ip(198, 51, 100, 20);
pub const P4: Ipv4Addr = ip(198, 51, 100, 12);
pub const P5: Ipv4Addr = ip(198, 51, 100, 13);
pub const P6: Ipv4Addr = ip(198, 51, 100, 14);
/// Inbound-only mappings whose private side cannot be forwarded to a guest.
pub const P_TO_REMOTE: Ipv4Addr = ip(198, 51, 100, 30);
pub const P_TO_UNROUTED: Ipv4Addr = ip(198, 51, 100, 40);
pub const P_TO_OTHER: Ipv4Addr = ip(198, 51, 100, 50);
pub const P_TO_LOCAL: Ipv4Addr = ip(198, 51, 100, 60);
pub const P_TO_BCAST: Ipv4Addr = ip(198, 51, 100, 70);

/// `NAT_IN`: public -> private.
pub const NAT_IN: [(Ipv4Addr, Ipv4Addr); 10] = [
    (P1, V1),
    (P2, V2),
    (P3, V3),
    (P5, V5),
    (P6, V6),
    (P_TO_REMOTE, ip(192, 0, 2, 30)),
    (P_TO_UNROUTED, UNROUTED),
    (P_TO_OTHER, OTH_HOST),
    (P_TO_LOCAL, GST_ADDR),
    (P_TO_BCAST, ip(10, 0, 0, 255)),
];
/// `NAT_OUT`: private -> public.
pub const NAT_OUT: [(Ipv4Addr, Ipv4Addr); 6] =
    [(V1, P1), (V2, P2), (V3, P3), (V4, P4), (V5, P5), (V6, P6)];

/// Capacity of `NAT_IN`, `NAT_OUT` and `MAPPING_STATS` in tests.
pub const TEST_MAX_MAPPINGS: u32 = 1024;
/// Capacity of the flow table in tests, in flows (`FLOWS` holds twice as many entries,
/// `PENDING` as many): far above the flows any test keeps at once (tests that send many frames
/// clear the table regularly), so the LRU never evicts.
pub const TEST_CONNTRACK_SIZE: u32 = 16_384;
/// Slots of the flow cache (`SLOTS`) in tests: so few that the flows of a scenario share
/// slots (take each other's, or stay on `FLOWS` while the slot's flow is busy), which the
/// differential tests must not be able to tell from a cache of one slot per flow.
pub const TEST_SLOTS: u32 = 16;
/// The route generation the bench starts with.
pub const TEST_ROUTE_GEN: u32 = 1;
/// Idle timeout of every conntrack state in tests (one hour): nothing expires by itself.
pub const TEST_TIMEOUT_NS: u64 = 3_600_000_000_000;

/// An interface of the namespace.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    pub ifindex: u32,
    pub mac: [u8; 6],
}

#[derive(Clone, Copy, Debug)]
pub struct Topology {
    pub pub0: Link,
    /// A second public interface, owning none of the mappings' public IPs.
    pub pbb0: Link,
    pub gst0: Link,
    pub gsb0: Link,
    pub gsn0: Link,
    pub oth0: Link,
    pub lo: Link,
}

/// Mapping counters (packets, bytes, denied) summed over CPUs, by table and key.
type MappingCounters = BTreeMap<(Direction, Ipv4Addr), (u64, u64, u64)>;

/// The counter slot of every mapping pair: slot -> (public, private).
fn slots() -> BTreeMap<u32, (Ipv4Addr, Ipv4Addr)> {
    let mut pairs: Vec<(Ipv4Addr, Ipv4Addr)> = NAT_IN.to_vec();
    for (v, p) in NAT_OUT {
        if !pairs.contains(&(p, v)) {
            pairs.push((p, v));
        }
    }
    pairs
        .into_iter()
        .enumerate()
        .map(|(i, pv)| (i as u32 + 1, pv))
        .collect()
}

/// The loaded program in its namespace. Not `Send`: runs must happen on the creating thread.
pub struct Harness {
    ebpf: RefCell<Ebpf>,
    pub topo: Topology,
    model: RefCell<Model>,
    /// The desired state whose rules are installed, and natd's image of it.
    policy: RefCell<(DesiredState, Tables)>,
    /// Last seen `STATS`, summed over CPUs.
    stats: RefCell<Vec<Counter>>,
    /// Last seen `EVENTS`, summed over CPUs.
    events: RefCell<Events>,
    /// Last seen mapping counters.
    mappings: RefCell<MappingCounters>,
    /// Counter slot -> mapping pair.
    pub(crate) slots: BTreeMap<u32, (Ipv4Addr, Ipv4Addr)>,
    /// Neighbours, routes or mappings changed since the last [`Harness::reset_env`].
    env_changed: Cell<bool>,
    /// Dropped last: leaves and deletes the namespace.
    _netns: NetnsGuard,
}

/// `CLOCK_MONOTONIC` in nanoseconds: the program's `bpf_ktime_get_ns` clock.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and pointer to a live timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn topology_script() -> String {
    format!(
        "link add pub0 type veth peer name pub1
link add gst0 type veth peer name gst1
link add gsb0 type veth peer name gsb1
link add gsn0 type veth peer name gsn1
link add oth0 type veth peer name oth1
link add pbb0 type veth peer name pbb1
link set dev gst0 mtu {GST_MTU}
link set dev pub0 up
link set dev pub1 up
link set dev gst0 up
link set dev gst1 up
link set dev gsb0 up
link set dev gsb1 up
link set dev gsn0 up
link set dev gsn1 up
link set dev oth0 up
link set dev oth1 up
link set dev pbb0 up
link set dev pbb1 up
addr add {PUB_ADDR}/24 dev pub0
addr add {GST_ADDR}/24 dev gst0
addr add {GSB_ADDR}/24 dev gsb0
addr add {OTH_ADDR}/24 dev oth0
route add {GSN_NET}/24 dev gsn0
neigh add {PUB_GW} lladdr {} dev pub0 nud permanent
neigh add {V1} lladdr {} dev gst0 nud permanent
neigh add {V2} lladdr {} dev gst0 nud permanent
neigh add {V4} lladdr {} dev gst0 nud permanent
neigh add {V5} lladdr {} dev gsb0 nud permanent
neigh add {V6} lladdr {} dev gsn0 nud permanent
neigh add {OTH_HOST} lladdr {} dev oth0 nud permanent
neigh add {} lladdr {} dev pub0 nud permanent
neigh add {V6} lladdr {} dev gsb0 nud permanent
route add {REMOTE_NET}/24 via {PUB_GW}
",
        mac_str(PUB_GW_MAC),
        mac_str(V1_MAC),
        mac_str(V2_MAC),
        mac_str(V4_MAC),
        mac_str(V5_MAC),
        mac_str(V6_MAC),
        mac_str(OTH_HOST_MAC),
        env::PUB_GW2,
        mac_str(env::PUB_GW2_MAC),
        mac_str(env::V6_GSB_MAC),
    )
}

/// Reads ifindex and MAC of every link with `ip -j link show` (sysfs is per mount namespace,
/// not per thread network namespace, so it would show the host's links).
fn read_links(ns: &NetnsGuard) -> anyhow::Result<Topology> {
    let links = ns.links()?;
    let find = |name: &str| -> anyhow::Result<Link> {
        let l = links
            .iter()
            .find(|l| l.name == name)
            .with_context(|| format!("no link {name}"))?;
        Ok(Link {
            ifindex: l.ifindex,
            mac: l.mac,
        })
    };
    Ok(Topology {
        pub0: find("pub0")?,
        pbb0: find("pbb0")?,
        gst0: find("gst0")?,
        gsb0: find("gsb0")?,
        gsn0: find("gsn0")?,
        oth0: find("oth0")?,
        lo: find("lo")?,
    })
}

/// The interfaces natd manages: link, role, and the address `IFACES` holds for it.
fn managed(t: &Topology) -> [(Link, u32, Ipv4Addr); 5] {
    [
        (t.pub0, ROLE_PUBLIC, PUB_ADDR),
        (t.pbb0, ROLE_PUBLIC, Ipv4Addr::UNSPECIFIED),
        (t.gst0, ROLE_GUEST, GST_ADDR),
        (t.gsb0, ROLE_GUEST, GSB_ADDR),
        (t.gsn0, ROLE_GUEST, Ipv4Addr::UNSPECIFIED),
    ]
}

fn model_for(t: &Topology) -> Model {
    let mut fib = Fib::default();
    for (link, mtu) in [
        (t.pub0, 1500),
        (t.pbb0, 1500),
        (t.gst0, GST_MTU),
        (t.gsb0, 1500),
        (t.gsn0, 1500),
        (t.oth0, 1500),
    ] {
        fib.add_iface(Iface {
            ifindex: link.ifindex,
            mac: link.mac,
            mtu,
        });
    }
    fib.add_address(t.pub0.ifindex, PUB_ADDR, 24);
    fib.add_address(t.gst0.ifindex, GST_ADDR, 24);
    fib.add_address(t.gsb0.ifindex, GSB_ADDR, 24);
    fib.add_address(t.oth0.ifindex, OTH_ADDR, 24);
    fib.add_device_route(t.gsn0.ifindex, GSN_NET, 24);
    fib.add_neighbour(t.pub0.ifindex, PUB_GW, PUB_GW_MAC);
    fib.add_neighbour(t.gst0.ifindex, V1, V1_MAC);
    fib.add_neighbour(t.gst0.ifindex, V2, V2_MAC);
    fib.add_neighbour(t.gst0.ifindex, V4, V4_MAC);
    fib.add_neighbour(t.gsb0.ifindex, V5, V5_MAC);
    fib.add_neighbour(t.gsn0.ifindex, V6, V6_MAC);
    fib.add_neighbour(t.oth0.ifindex, OTH_HOST, OTH_HOST_MAC);
    fib.add_neighbour(t.pub0.ifindex, env::PUB_GW2, env::PUB_GW2_MAC);
    fib.add_neighbour(t.gsb0.ifindex, V6, env::V6_GSB_MAC);
    fib.add_gateway_route(t.pub0.ifindex, REMOTE_NET, 24, PUB_GW);
    let ifaces = managed(t)
        .into_iter()
        .map(|(l, role, addr)| (l.ifindex, IfaceRole { role, addr }))
        .collect();
    let mut m = Model {
        ifaces,
        nat_in: NAT_IN.into(),
        nat_out: NAT_OUT.into(),
        fib,
        route_gen: TEST_ROUTE_GEN,
        // natd's owner of a public IP: the public interface whose network holds it.
        owner: NAT_IN.iter().map(|(p, _)| (*p, t.pub0.ifindex)).collect(),
        ..Model::default()
    };
    m.policy.conntrack.timeouts_ns = [TEST_TIMEOUT_NS; TIMEOUT_SLOTS];
    m
}

/// Loads `prog`. The verifier gives up with EAGAIN when a signal is pending (seen under heavy
/// load with the whole suite running): that is retried a few times.
fn load_verified(prog: &mut Xdp) -> anyhow::Result<()> {
    let mut tries = 0;
    loop {
        match prog.load() {
            Ok(()) => return Ok(()),
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && tries < 5 =>
            {
                tries += 1;
            }
            Err(e) => return Err(e).context("verifier rejected nat"),
        }
    }
}

fn key(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

impl Harness {
    /// Creates and enters a namespace, builds the topology, loads and configures the program.
    pub fn new() -> anyhow::Result<Self> {
        Self::with_cache(true)
    }

    /// [`Harness::new`] with the flow cache on or off (`SLOT_CACHE`, as natd loads the program
    /// where the cache cannot be used).
    pub fn with_cache(cache: bool) -> anyhow::Result<Self> {
        let netns = NetnsGuard::new()?;
        netns.ip_batch(&topology_script())?;
        netns.sysctl(&["net.ipv4.ip_forward=1", "net.ipv4.conf.all.forwarding=1"])?;
        let topo = read_links(&netns)?;

        // Harmless on kernels that account BPF memory to the cgroup (5.11+).
        let rlim = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: plain syscall with a valid struct.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };

        // Small capacities change nothing the tests look at and load fast.
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_NAT_IN, TEST_MAX_MAPPINGS)
            .map_max_entries(MAP_NAT_OUT, TEST_MAX_MAPPINGS)
            .map_max_entries(MAP_MAPPING_STATS, TEST_MAX_MAPPINGS)
            .map_max_entries(MAP_FLOWS, 2 * TEST_CONNTRACK_SIZE)
            .map_max_entries(MAP_PENDING, TEST_CONNTRACK_SIZE)
            .map_max_entries(MAP_SLOTS, TEST_SLOTS)
            .override_global(SLOT_MASK_GLOBAL, &(TEST_SLOTS - 1), true)
            .override_global(SLOT_CACHE_GLOBAL, &u32::from(cache), true)
            .load(nat_userspace::EBPF_OBJECT)
            .context("load EBPF_OBJECT")?;
        let prog: &mut Xdp = ebpf
            .program_mut("nat")
            .context("no program nat")?
            .try_into()
            .context("nat is not XDP")?;
        load_verified(prog)?;

        let links = managed(&topo);
        let mut ifaces: HashMap<_, u32, IfaceConfig> = ebpf
            .map_mut(MAP_IFACES)
            .context("no map IFACES")?
            .try_into()?;
        for (l, role, addr) in links {
            let addr = key(addr);
            ifaces.insert(l.ifindex, IfaceConfig { role, addr }, 0)?;
        }
        let mut devmap: DevMapHash<_> = ebpf
            .map_mut(MAP_DEVMAP)
            .context("no map DEVMAP")?
            .try_into()?;
        for (l, _, _) in links {
            devmap.insert(l.ifindex, l.ifindex, None, 0)?;
        }
        let slots = slots();
        let slot_of = |p: Ipv4Addr, v: Ipv4Addr| -> anyhow::Result<u32> {
            slots
                .iter()
                .find(|(_, pv)| **pv == (p, v))
                .map(|(s, _)| *s)
                .with_context(|| format!("no slot for {p} <-> {v}"))
        };
        let mut nat_in: HashMap<_, u32, NatValue> = ebpf
            .map_mut(MAP_NAT_IN)
            .context("no map NAT_IN")?
            .try_into()?;
        for (p, v) in NAT_IN {
            let value = NatValue {
                addr: key(v),
                slot: slot_of(p, v)?,
                ifindex: topo.pub0.ifindex,
                ..NatValue::default()
            };
            nat_in.insert(key(p), value, 0)?;
        }
        let mut nat_out: HashMap<_, u32, NatValue> = ebpf
            .map_mut(MAP_NAT_OUT)
            .context("no map NAT_OUT")?
            .try_into()?;
        for (v, p) in NAT_OUT {
            let value = NatValue {
                addr: key(p),
                slot: slot_of(p, v)?,
                ..NatValue::default()
            };
            nat_out.insert(key(v), value, 0)?;
        }

        let config = NatConfig {
            egress_default_deny: 0,
            route_gen: TEST_ROUTE_GEN,
            // Beyond any test's length: see the module's documentation.
            jiffies_per_sec: u32::MAX,
            policy: nat_common::POLICY_XDP,
            timeouts_ns: [TEST_TIMEOUT_NS; TIMEOUT_SLOTS],
        };
        maps::write_config(&mut ebpf, &config)?;

        let base = base_state();
        let tables = Tables::of(&base);
        ensure!(tables.entries.is_empty() && !tables.egress_default_deny);
        let h = Self {
            ebpf: RefCell::new(ebpf),
            topo,
            model: RefCell::new(model_for(&topo)),
            policy: RefCell::new((base, tables)),
            stats: RefCell::new(Vec::new()),
            events: RefCell::new(Events::default()),
            mappings: RefCell::new(BTreeMap::new()),
            slots,
            env_changed: Cell::new(false),
            _netns: netns,
        };
        *h.stats.borrow_mut() = h.read_stats()?;
        *h.events.borrow_mut() = maps::read_events(&h.ebpf.borrow())?;
        *h.mappings.borrow_mut() = h.read_mappings()?;
        Ok(h)
    }

    /// Runs `frame` through the model, now.
    pub fn run_model(&self, ingress: u32, frame: &[u8]) -> Outcome {
        self.model.borrow_mut().run(ingress, frame, monotonic_ns())
    }

    /// The leg the model's last frame took, and which part of the policy decided it.
    pub fn model_decision(&self) -> (Option<Leg>, Option<Path>) {
        let m = self.model.borrow();
        (m.last_leg, m.last_path)
    }

    /// Whether the model judged the last frame an RST or FIN outside its flow's window.
    pub fn model_out_of_window(&self) -> bool {
        self.model.borrow().last_out_of_window
    }

    fn read_stats(&self) -> anyhow::Result<Vec<Counter>> {
        let ebpf = self.ebpf.borrow();
        let m: PerCpuArray<_, Counter> = ebpf.map(MAP_STATS).context("no map STATS")?.try_into()?;
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

    fn read_mappings(&self) -> anyhow::Result<MappingCounters> {
        let ebpf = self.ebpf.borrow();
        let m: PerCpuArray<_, MappingStats> = ebpf
            .map(MAP_MAPPING_STATS)
            .context("no map MAPPING_STATS")?
            .try_into()?;
        let mut out = BTreeMap::new();
        for (slot, (p, v)) in &self.slots {
            let mut sum = MappingStats::default();
            for c in m.get(slot, 0)?.iter() {
                sum.in_packets += c.in_packets;
                sum.in_bytes += c.in_bytes;
                sum.in_denied += c.in_denied;
                sum.out_packets += c.out_packets;
                sum.out_bytes += c.out_bytes;
                sum.out_denied += c.out_denied;
            }
            out.insert(
                (Direction::Inbound, *p),
                (sum.in_packets, sum.in_bytes, sum.in_denied),
            );
            out.insert(
                (Direction::Outbound, *v),
                (sum.out_packets, sum.out_bytes, sum.out_denied),
            );
        }
        Ok(out)
    }

    /// The program's slot hits so far (the flow cache's own count, left out of the events
    /// the model is compared on).
    pub fn slot_hits(&self) -> anyhow::Result<u64> {
        maps::slot_hits(&self.ebpf.borrow())
    }

    /// The key held by the slot `k` hashes to (`proto` 0: empty).
    pub fn slot_key(&self, k: &nat_common::FlowTuple) -> anyhow::Result<nat_common::FlowTuple> {
        maps::slot_key(&self.ebpf.borrow(), k)
    }

    /// Makes `k`'s slot look filled long ago; whether a slot held `k`.
    pub fn age_slot(&self, k: &nat_common::FlowTuple) -> anyhow::Result<bool> {
        maps::age_slot(&mut self.ebpf.borrow_mut(), k)
    }

    /// Makes the flow in `k`'s slot look idle; whether a slot held `k`.
    pub fn idle_slot(&self, k: &nat_common::FlowTuple) -> anyhow::Result<bool> {
        maps::idle_slot(&mut self.ebpf.borrow_mut(), k)
    }

    /// The slot `k` hashes to in the tests' `SLOTS`.
    pub fn slot_index(k: &nat_common::FlowTuple) -> u32 {
        nat_common::slot_index(k, TEST_SLOTS - 1)
    }

    /// Runs `frame` as if received on `ingress` and reports what the program did.
    pub fn run(&self, ingress: u32, frame: &[u8]) -> anyhow::Result<Outcome> {
        let len = frame.len();
        let ctx: Vec<u8> = [0, len as u32, 0, ingress, 0, 0]
            .iter()
            .flat_map(|v: &u32| v.to_ne_bytes())
            .collect();
        let mut out = vec![0u8; len + 256];
        let res = {
            let ebpf = self.ebpf.borrow();
            let prog: &Xdp = ebpf.program("nat").context("no program nat")?.try_into()?;
            prog.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN on ifindex {ingress}, {len} bytes"))?
        };
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

        let events = maps::read_events(&self.ebpf.borrow())?;
        let mut before = self.events.borrow_mut();
        let mut delta = Events::default();
        for (d, (a, b)) in delta.0.iter_mut().zip(events.0.iter().zip(before.0.iter())) {
            *d = a.wrapping_sub(*b);
        }
        *before = events;

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
                    v.2.wrapping_sub(before[k].2),
                )
            })
            .collect();
        *before = mappings;
        let (counted, denied) = match moved[..] {
            [] => (None, None),
            [(k, 1, bytes, 0)] if bytes == len as u64 => (Some(k), None),
            [(k, 0, 0, 1)] => (None, Some(k)),
            _ => bail!(
                "mapping counters must move by at most one frame of {len} bytes or one denied \
                 frame: {moved:?}"
            ),
        };
        Ok(Outcome {
            action: res.return_value,
            reason,
            frame: out,
            counted,
            denied,
            events: delta,
        })
    }
}
