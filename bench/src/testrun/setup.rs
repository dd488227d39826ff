//! The test-run bed: topology, the program loaded by natd's loader, mappings, rules, flows.
use std::{net::Ipv4Addr, os::fd::AsFd as _, os::fd::AsRawFd as _};

use anyhow::{Context as _, bail};
use aya::maps::{DevMapHash, HashMap};
use nat_common::{
    Event, FlowKey, FlowState, IfaceConfig, MAP_CONNTRACK, MAP_DEVMAP, MAP_IFACES, NatConfig,
    ORIGIN_GUEST, ROLE_GUEST, ROLE_PUBLIC, Reason, TIMEOUT_SLOTS,
    conntrack::{ASSURED, SEEN_REPLY, State, Timeout},
};
use nat_userspace::{
    cidr::Cidr,
    ebpf::{Dataplane, FastPath as _, Mode, Role},
    firewall::{PortRange, Proto, Service},
    state::{DesiredState, Mapping},
    tables::{Op, Tables, plan},
};

use crate::{frame::Udp, netns::Netns, util};

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
/// Idle timeout while measuring (nothing expires), and the one that expires everything.
pub const HOUR_NS: u64 = 3_600_000_000_000;
pub const EXPIRE_NS: u64 = 1;

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
    pub pub0: (u32, [u8; 6]),
    pub pub1_mac: [u8; 6],
    pub gst0: u32,
    pub oth0: u32,
    /// Number of mappings in the cycle (0: none).
    pub chain: u32,
    rules: Option<(DesiredState, Tables)>,
    /// Transient ENOMEM answers to mapping inserts (retried).
    pub enomem_retries: u64,
}

impl Bed {
    /// Loads the program, declares the interfaces, installs the hot pair, Z and a cycle of
    /// `chain` mappings. Must run in the namespace.
    pub fn new(ns: &Netns, holder: &str, chain: u32, conntrack_size: u32) -> anyhow::Result<Self> {
        let pub0 = ns.link("pub0")?;
        let (_, pub1_mac) = ns.link("pub1")?;
        let (gst0, _) = ns.link("gst0")?;
        let (oth0, _) = ns.link("oth0")?;
        let mut dp = Dataplane::load(conntrack_size).context("loading the XDP program")?;
        {
            let ebpf = dp.ebpf_mut();
            let mut ifaces: HashMap<_, u32, IfaceConfig> =
                ebpf.map_mut(MAP_IFACES).context("IFACES")?.try_into()?;
            ifaces.insert(
                pub0.0,
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
            for i in [pub0.0, gst0] {
                devmap.insert(i, i, None, 0)?;
            }
        }
        dp.attach(holder, Role::Public, Mode::Native)
            .with_context(|| format!("attaching to {holder}"))?;
        let mut bed = Self {
            dp,
            pub0,
            pub1_mac,
            gst0,
            oth0,
            chain,
            rules: None,
            enomem_retries: 0,
        };
        bed.set_timeouts(HOUR_NS)?;
        let mut add = |public, private| -> anyhow::Result<()> {
            let op = Op::AddMapping(Mapping { public, private });
            // A burst of inserts into the per-CPU, non-preallocated mapping maps meets
            // transient ENOMEM (the kernel's per-CPU element cache refills asynchronously):
            // retried here and counted (see RESULTS.md).
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

    pub fn set_timeouts(&mut self, ns: u64) -> anyhow::Result<()> {
        self.dp.write_config(&NatConfig {
            egress_default_deny: 0,
            _pad: 0,
            timeouts_ns: [ns; TIMEOUT_SLOTS],
        })?;
        Ok(())
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
                Op::Set(..) | Op::Unset(..) | Op::EgressDefaultDeny(_) => self.dp.apply(&op)?,
                Op::AddMapping(_) | Op::RemoveMapping(_) => {}
            }
        }
        self.rules = Some((state, tables));
        Ok(())
    }

    /// Writes established (UDP replied, opened by the guest) flows for inbound frames from
    /// [`SRC`]:[`SPORT`] to `dport` on each of `privates` (the guest's view of the flow).
    pub fn forge_established(
        &mut self,
        privates: impl Iterator<Item = Ipv4Addr>,
        dport: u16,
    ) -> anyhow::Result<()> {
        let now = util::monotonic_ns();
        let mut ct: HashMap<_, FlowKey, FlowState> = self
            .dp
            .ebpf_mut()
            .map_mut(MAP_CONNTRACK)
            .context("CONNTRACK")?
            .try_into()?;
        let value = FlowState {
            last_seen: now,
            state: State::UdpReplied as u8,
            origin: ORIGIN_GUEST,
            flags: SEEN_REPLY | ASSURED,
            timer: Timeout::UdpReplied as u8,
            ..FlowState::default()
        };
        for (n, guest) in privates.enumerate() {
            let k = FlowKey {
                guest: key(guest),
                remote: key(SRC),
                guest_port: u16::from_ne_bytes(dport.to_be_bytes()),
                remote_port: u16::from_ne_bytes(SPORT.to_be_bytes()),
                proto: 17,
                ..FlowKey::default()
            };
            ct.insert(k, value, 0)?;
            if n % 65_536 == 0 {
                util::check_interrupted()?;
            }
        }
        Ok(())
    }

    /// The raw fd of the loaded program.
    pub fn prog_fd(&mut self) -> anyhow::Result<i32> {
        let ebpf = self.dp.ebpf_mut();
        let prog: &aya::programs::Xdp = ebpf
            .program(nat_userspace::ebpf::PROGRAM)
            .context("no program")?
            .try_into()?;
        Ok(prog.fd()?.as_fd().as_raw_fd())
    }

    /// The raw fd of one of the program's maps.
    pub fn map_fd(&mut self, name: &str) -> anyhow::Result<i32> {
        let map = self
            .dp
            .ebpf_mut()
            .map(name)
            .with_context(|| format!("no map {name}"))?;
        use aya::maps::Map as M;
        let data = match map {
            M::LpmTrie(m)
            | M::HashMap(m)
            | M::LruHashMap(m)
            | M::PerCpuHashMap(m)
            | M::PerCpuArray(m)
            | M::Array(m)
            | M::DevMapHash(m) => m,
            _ => bail!("map {name}: unexpected type"),
        };
        Ok(data.fd().as_fd().as_raw_fd())
    }

    /// (reason counters, event counters), summed over CPUs.
    pub fn counters(&mut self) -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
        let s = self.dp.stats()?;
        let e = self.dp.events()?;
        Ok((
            Reason::ALL
                .iter()
                .map(|r| s.get(r).map_or(0, |c| c.packets))
                .collect(),
            Event::ALL
                .iter()
                .map(|v| e.get(v).copied().unwrap_or(0))
                .collect(),
        ))
    }

    /// The conntrack key of the hot inbound flow to H0 (guest's view: H1).
    pub fn hot_flow_key(&self) -> [u8; 16] {
        let k = FlowKey {
            guest: key(H1),
            remote: key(SRC),
            guest_port: u16::from_ne_bytes(DPORT.to_be_bytes()),
            remote_port: u16::from_ne_bytes(SPORT.to_be_bytes()),
            proto: 17,
            ..FlowKey::default()
        };
        let mut out = [0u8; 16];
        out[0..4].copy_from_slice(&k.guest.to_ne_bytes());
        out[4..8].copy_from_slice(&k.remote.to_ne_bytes());
        out[8..10].copy_from_slice(&k.guest_port.to_ne_bytes());
        out[10..12].copy_from_slice(&k.remote_port.to_ne_bytes());
        out[12] = k.proto;
        out
    }

    /// An inbound frame from the remote sender to `dst`.
    pub fn frame(&self, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
        Udp {
            dst_mac: self.pub0.1,
            src_mac: self.pub1_mac,
            src: SRC,
            dst,
            sport: SPORT,
            dport,
            ttl: 255,
            checksum: true,
        }
        .build(60)
    }
}
