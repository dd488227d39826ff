//! The test-run bed: topology, the program loaded by natd's loader, mappings and rules (the
//! flows are opened in `runs`).
use std::net::Ipv4Addr;

use anyhow::{Context as _, bail};
use aya::maps::{DevMapHash, HashMap};
use nat_common::{
    IfaceConfig, MAP_DEVMAP, MAP_IFACES, MAP_NAT_IN, NatConfig, NatValue, ROLE_GUEST, ROLE_PUBLIC,
    TIMEOUT_SLOTS,
};
use nat_userspace::{
    cidr::Cidr,
    ebpf::{Dataplane, FastPath as _, Mode, Role, Sizes},
    firewall::{PortRange, Proto, Service},
    state::{DesiredState, Mapping},
    tables::{Op, Tables, plan},
};

use super::runs::Frames;
use crate::{netns::Netns, util};

pub const PUB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const PUB_GW: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const GST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const GST_GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const GW_MAC: &str = "02:00:00:00:00:02";
/// The hot pair: H0 maps to H1 and H1 to H0.
pub const H0: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
pub const H1: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
/// A mapped public address without any rule (the "no rule" deny).
pub const Z: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 3);
const Z_PRIVATE: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 4);
/// The remote sender, inside rule 0's CIDRs of [`Rules::Many`].
pub const SRC: Ipv4Addr = Ipv4Addr::new(16, 0, 0, 1);
pub const SPORT: u16 = 40_000;
/// Allowed by [`Rules::Open`] and by rule 0 of [`Rules::Many`].
pub const DPORT: u16 = 10_000;
/// Matches rule 1's port while the source matches rule 0's CIDRs: denied by [`Rules::Many`].
pub const DPORT_OTHER_RULE: u16 = 10_001;
/// Idle timeout of every timer while measuring: nothing expires.
pub const HOUR_NS: u64 = 3_600_000_000_000;
/// Repetitions per `BPF_PROG_TEST_RUN` call of a rewriting path: the TTL of a 255-TTL frame
/// allows 254 passes.
pub const REPS_PER_CALL: u32 = 254;
/// The i-th address of the mapping cycle.
pub fn chain_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 65, 0, 0)) + i)
}

/// Ingress rules of H0 and H1 (Z never has any).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rules {
    /// One rule: UDP, every port, from 0.0.0.0/0.
    Open,
    /// 256 rules; rule r: UDP port 10000 + r from the 256 CIDRs 16.r.j.0/24 (65,536 CIDRs).
    Many,
}

fn key(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// Spare interfaces `hd0..`: each program under test stays attached to one of them, so the
/// kernel's XDP dispatcher keeps it and a test run does not rebuild the dispatcher (two RCU
/// grace periods, milliseconds, per `BPF_PROG_TEST_RUN` of an unattached XDP program).
pub const HOLDERS: usize = 8;

/// Creates the topology (run before entering the namespace).
pub fn build_topology(ns: &Netns) -> anyhow::Result<()> {
    let holders: String = (0..HOLDERS)
        .map(|i| format!("link add hd{i} type veth peer name hd{i}p\nlink set dev hd{i} up\n"))
        .collect();
    ns.ip_batch(&format!(
        "link add pub0 type veth peer name pub1
link add gst0 type veth peer name gst1
link add oth0 type veth peer name oth1
link set dev pub0 up
link set dev pub1 up
link set dev gst0 up
link set dev gst1 up
link set dev oth0 up
link set dev oth1 up
addr add {PUB_ADDR}/24 dev pub0
addr add {GST_ADDR}/24 dev gst0
neigh add {PUB_GW} lladdr {GW_MAC} dev pub0 nud permanent
neigh add {GST_GW} lladdr {GW_MAC} dev gst0 nud permanent
route add 16.0.0.0/8 via {PUB_GW}
route add 100.64.0.0/10 via {GST_GW}
{holders}"
    ))?;
    ns.sysctl(&["net.ipv4.ip_forward=1", "net.ipv4.conf.all.forwarding=1"])
}

/// Whether an error or one of its sources is ENOMEM.
pub fn is_enomem(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOMEM))
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The loaded program and its maps; lives on the thread that entered the namespace.
pub struct Bed {
    pub dp: Dataplane,
    pub pub0: u32,
    pub gst0: u32,
    pub oth0: u32,
    pub frames: Frames,
    /// Number of mappings in the cycle (0: none).
    pub chain: u32,
    rules: Option<(DesiredState, Tables)>,
    /// Transient ENOMEM answers to mapping inserts (retried).
    pub enomem_retries: u64,
}

impl Bed {
    /// Loads the program with `sizes`, declares the interfaces, installs the hot pair, Z and a
    /// cycle of `chain` mappings. Must run in the namespace.
    pub fn new(ns: &Netns, holder: &str, chain: u32, sizes: Sizes) -> anyhow::Result<Self> {
        let (pub0, pub0_mac) = ns.link("pub0")?;
        let (_, pub1_mac) = ns.link("pub1")?;
        let (gst0, gst0_mac) = ns.link("gst0")?;
        let (_, gst1_mac) = ns.link("gst1")?;
        let (oth0, _) = ns.link("oth0")?;
        let frames = Frames {
            pub0_mac,
            pub1_mac,
            gst0_mac,
            gst1_mac,
        };
        let mut dp = Dataplane::load(sizes).context("loading the XDP program")?;
        {
            let ebpf = dp.ebpf_mut();
            let mut ifaces: HashMap<_, u32, IfaceConfig> =
                ebpf.map_mut(MAP_IFACES).context("IFACES")?.try_into()?;
            ifaces.insert(
                pub0,
                IfaceConfig {
                    role: ROLE_PUBLIC,
                    addr: key(PUB_ADDR),
                },
                0,
            )?;
            ifaces.insert(
                gst0,
                IfaceConfig {
                    role: ROLE_GUEST,
                    addr: key(GST_ADDR),
                },
                0,
            )?;
            let mut devmap: DevMapHash<_> =
                ebpf.map_mut(MAP_DEVMAP).context("DEVMAP")?.try_into()?;
            for i in [pub0, gst0] {
                devmap.insert(i, i, None, 0)?;
            }
        }
        // The holder carries no traffic and no address, so its role changes nothing the
        // program does; guest, because natd's mapping writer looks up the addresses of every
        // attached public interface (a netlink dump) for each mapping it installs, which makes
        // filling a million mappings take many minutes.
        dp.attach(holder, Role::Guest, Mode::Native)
            .with_context(|| format!("attaching to {holder}"))?;
        // As natd writes it: route generation 1 (0 marks never-resolved entries), the kernel's
        // tick rate (a flow refreshes its last-seen time once a second); nothing expires.
        dp.write_config(&NatConfig {
            jiffies_per_sec: nat_userspace::clock::jiffies_per_sec(),
            ..NatConfig::with_timeouts([HOUR_NS; TIMEOUT_SLOTS])
        })?;
        let mut bed = Self {
            dp,
            pub0,
            gst0,
            oth0,
            frames,
            chain,
            rules: None,
            enomem_retries: 0,
        };
        let mut add = |public, private| -> anyhow::Result<()> {
            let op = Op::AddMapping(Mapping { public, private });
            // A burst of inserts into the non-preallocated mapping maps may meet transient
            // ENOMEM (the kernel refills its element cache asynchronously): retried here and
            // counted (see RESULTS.md).
            for _ in 0..1000 {
                match bed.dp.apply(&op) {
                    Ok(()) => return Ok(()),
                    Err(e) if is_enomem(&e) => {
                        bed.enomem_retries += 1;
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                    Err(e) => {
                        return Err(e).with_context(|| format!("mapping {public} -> {private}"));
                    }
                }
            }
            bail!("mapping {public} -> {private}: ENOMEM 1000 times in a row")
        };
        add(H0, H1)?;
        add(H1, H0)?;
        add(Z, Z_PRIVATE)?;
        for i in 0..chain {
            add(chain_addr(i), chain_addr((i + 1) % chain))?;
            if i % 65_536 == 0 {
                util::check_interrupted()?;
            }
        }
        Ok(bed)
    }

    /// Installs `rules` on H0 and H1 with natd's compile step and write plan.
    pub fn set_rules(&mut self, rules: Rules) -> anyhow::Result<()> {
        let mut state = DesiredState::default();
        // Placeholders: the state validates rules against mapped public IPs; the program's
        // mappings are the bench's own, written above.
        for (i, p) in [H0, H1, Z].into_iter().enumerate() {
            let private = Ipv4Addr::new(10, 255, 0, i as u8 + 1);
            state.add_mapping(Mapping { public: p, private })?;
        }
        let udp = |ports: Option<PortRange>| Service {
            proto: Proto::Udp,
            ports,
            icmp_type: None,
            icmp_code: None,
        };
        for public in [H0, H1] {
            match rules {
                Rules::Open => {
                    state.add_ingress(None, public, udp(None), vec![Cidr::ANY])?;
                }
                Rules::Many => {
                    for r in 0..256u32 {
                        let port = DPORT + r as u16;
                        let cidrs = (0..256u32)
                            .map(|j| {
                                Cidr::new(Ipv4Addr::new(16, r as u8, j as u8, 0), 24)
                                    .context("a /24")
                            })
                            .collect::<anyhow::Result<Vec<_>>>()?;
                        let ports = Some(PortRange {
                            first: port,
                            last: port,
                        });
                        state.add_ingress(None, public, udp(ports), cidrs)?;
                    }
                }
            }
        }
        let tables = Tables::of(&state);
        let (old_state, old_tables) = self
            .rules
            .take()
            .unwrap_or_else(|| (DesiredState::default(), Tables::default()));
        for (op, _) in plan(&old_state, &old_tables, &state, &tables) {
            match op {
                Op::Set(..) | Op::Unset(..) | Op::EgressDefaultDeny(_) | Op::EgressClosed => {
                    self.dp.apply(&op)?
                }
                Op::AddMapping(_) | Op::RemoveMapping(_) => {}
            }
        }
        self.rules = Some((state, tables));
        Ok(())
    }

    /// The loaded program.
    pub fn prog(&mut self) -> anyhow::Result<&aya::programs::Xdp> {
        let prog: &aya::programs::Xdp = self
            .dp
            .ebpf_mut()
            .program(nat_userspace::ebpf::PROGRAM)
            .context("no program")?
            .try_into()?;
        Ok(prog)
    }

    /// The counter slot of the mapping of `public` (from its `NAT_IN` value).
    fn slot(&mut self, public: Ipv4Addr) -> anyhow::Result<u32> {
        let m: HashMap<_, u32, NatValue> = self
            .dp
            .ebpf_mut()
            .map(MAP_NAT_IN)
            .context("NAT_IN")?
            .try_into()?;
        Ok(m.get(&key(public), 0)?.slot)
    }

    /// The hot mapping's counter slot.
    pub fn hot_slot(&mut self) -> anyhow::Result<u32> {
        self.slot(H0)
    }

    /// The first mapping of the cycle's counter slot, checked to be the first of as many
    /// consecutive slots as the cycle has mappings (0 without a cycle).
    pub fn cycle_slots(&mut self) -> anyhow::Result<u32> {
        if self.chain == 0 {
            return Ok(0);
        }
        let first = self.slot(chain_addr(0))?;
        let last = self.slot(chain_addr(self.chain - 1))?;
        anyhow::ensure!(
            last == first + self.chain - 1,
            "the cycle's counter slots are not consecutive ({first}..={last})"
        );
        Ok(first)
    }

    /// An inbound frame from the remote sender ([`SRC`]:[`SPORT`]) to `dst`:`dport`.
    pub fn frame(&self, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
        self.frames.inbound(SRC, SPORT, dst, dport)
    }
}
