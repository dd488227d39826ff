//! The test-run bed: topology, the program loaded by natd's loader, mappings, rules, and
//! established flows opened by sending their first packets through the program.
use std::net::Ipv4Addr;

use anyhow::{Context as _, bail, ensure};
use aya::maps::{DevMapHash, HashMap};
use nat_common::{
    Event, IfaceConfig, MAP_DEVMAP, MAP_IFACES, MAP_NAT_IN, NatConfig, NatValue, ROLE_GUEST,
    ROLE_PUBLIC, Reason, TIMEOUT_SLOTS,
};
use nat_userspace::{
    cidr::Cidr,
    ebpf::{Dataplane, FastPath as _, Mode, Role, Sizes},
    firewall::{PortRange, Proto, Service},
    state::{DesiredState, Mapping},
    tables::{Op, Tables, plan},
};

use crate::{bpf, frame::Udp, netns::Netns, util};

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
/// Flows opened per round while seeding a cycle: `PENDING` holds them until they are assured.
const SEED_CHUNK: u32 = 16_384;
/// The seeding order's stride through the cycle (a prime: coprime with the cycle lengths).
const SEED_STRIDE: u64 = 7_919;

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

/// (reason counters, event counters), summed over CPUs, in `Reason::ALL` / `Event::ALL`
/// order.
pub type Counters = (Vec<u64>, Vec<u64>);

/// What a run of the program must have done: every repetition ended with `reason`, and the
/// events moved by exactly `events` (every other event stayed still).
pub struct Expect<'a> {
    pub reason: Reason,
    pub events: &'a [(Event, u64)],
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
        dp.attach(holder, Role::Public, Mode::Native)
            .with_context(|| format!("attaching to {holder}"))?;
        // Route generation 1 (0 marks never-resolved entries), nothing expires.
        dp.write_config(&NatConfig::with_timeouts([HOUR_NS; TIMEOUT_SLOTS]))?;
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
                Op::Set(..) | Op::Unset(..) | Op::EgressDefaultDeny(_) => self.dp.apply(&op)?,
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

    /// Counters summed over CPUs.
    pub fn counters(&mut self) -> anyhow::Result<Counters> {
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

    /// Fails unless the counters moved from `before` as `want` says for `n` runs.
    pub fn check(
        &mut self,
        what: &str,
        before: &Counters,
        n: u64,
        want: &Expect,
    ) -> anyhow::Result<()> {
        let (s1, e1) = self.counters()?;
        let ds: Vec<u64> = s1
            .iter()
            .zip(&before.0)
            .map(|(a, b)| a.wrapping_sub(*b))
            .collect();
        let de: Vec<u64> = e1
            .iter()
            .zip(&before.1)
            .map(|(a, b)| a.wrapping_sub(*b))
            .collect();
        let moved = |names: Vec<(&str, u64)>| {
            names
                .into_iter()
                .filter(|(_, d)| *d > 0)
                .map(|(n, d)| format!("{n} {d}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let reasons = moved(
            Reason::ALL
                .iter()
                .map(|r| r.name())
                .zip(ds.iter().copied())
                .collect(),
        );
        let events = moved(
            Event::ALL
                .iter()
                .map(|e| e.name())
                .zip(de.iter().copied())
                .collect(),
        );
        let total: u64 = ds.iter().sum();
        let events_ok = Event::ALL.iter().zip(&de).all(|(e, d)| {
            *d == want
                .events
                .iter()
                .find(|(w, _)| w == e)
                .map_or(0, |(_, n)| *n)
        });
        ensure!(
            ds[want.reason as usize] == n && total == n && events_ok,
            "{what}: expected {n} x {} with events {:?}; STATS moved: {reasons}; EVENTS moved: \
             {events}",
            want.reason.name(),
            want.events
                .iter()
                .map(|(e, n)| format!("{} {n}", e.name()))
                .collect::<Vec<_>>()
        );
        Ok(())
    }

    /// Runs the program `n` times as if arriving on `ifindex`, in calls of at most
    /// [`REPS_PER_CALL`] repetitions, each call starting from `frame_at(k)` (k = repetitions
    /// already run); returns the kernel's time per repetition (ns), summed over calls.
    pub fn walk(
        &mut self,
        ifindex: u32,
        n: u64,
        frame_at: impl FnMut(u64) -> Vec<u8>,
    ) -> anyhow::Result<f64> {
        self.walk_by(ifindex, n, REPS_PER_CALL, frame_at)
    }

    /// [`Bed::walk`] in calls of at most `per_call` repetitions.
    pub fn walk_by(
        &mut self,
        ifindex: u32,
        n: u64,
        per_call: u32,
        mut frame_at: impl FnMut(u64) -> Vec<u8>,
    ) -> anyhow::Result<f64> {
        let prog = self.prog()?;
        let (mut done, mut total_ns) = (0u64, 0u64);
        while done < n {
            let reps = (n - done).min(u64::from(per_call)) as u32;
            let r = bpf::test_run(prog, &frame_at(done), ifindex, reps)?;
            total_ns += u64::from(r.duration_ns) * u64::from(reps);
            done += u64::from(reps);
        }
        Ok(total_ns as f64 / n.max(1) as f64)
    }

    /// Opens and assures the guest-opened UDP flows of the hot pair (H1 -> [`SRC`] leaving as
    /// H0, and H0 -> SRC leaving as H1) and of every mapping of the cycle, by sending their
    /// first packets through the program: the guest's request (the flow opens, in
    /// `PENDING`), the remote's reply (its route is resolved), the guest's next request (the
    /// flow is assured and moves to `FLOWS`). Every step is checked against the counters.
    /// Afterwards an inbound frame from SRC to any mapped public address of the pair or the
    /// cycle is a `FLOWS` hit whose rewrite leads to the next one.
    ///
    /// One packet per call, the cycle's flows in a scattered order (a stride through the
    /// cycle): the table's entries are taken in the order flows open, so flows opened along
    /// the cycle would lie in memory in the order a walk along the cycle visits them, and the
    /// "different flow each packet" walk would read memory almost sequentially, unlike
    /// traffic.
    pub fn seed(&mut self) -> anyhow::Result<()> {
        self.seed_flows("hot pair", 2, |k| if k == 0 { (H1, H0) } else { (H0, H1) })?;
        let n = self.chain;
        let mut a = 0;
        while a < n {
            util::check_interrupted()?;
            let b = (a + SEED_CHUNK).min(n);
            // Mapping m is chain_addr(m) -> chain_addr(m + 1): its guest is chain_addr(m + 1).
            let (nn, a64) = (u64::from(n), u64::from(a));
            self.seed_flows(
                &format!("cycle, flows {a}..{b} in seeding order"),
                b - a,
                |k| {
                    let m = ((a64 + k) * SEED_STRIDE % nn) as u32;
                    (chain_addr((m + 1) % n), chain_addr(m))
                },
            )?;
            a = b;
        }
        Ok(())
    }

    /// Opens `flows` flows; flow k is the one whose guest (private address) and public
    /// address `addrs(k)` gives.
    fn seed_flows(
        &mut self,
        what: &str,
        flows: u32,
        addrs: impl Fn(u64) -> (Ipv4Addr, Ipv4Addr),
    ) -> anyhow::Result<()> {
        let (pub0, gst0) = (self.pub0, self.gst0);
        let n = u64::from(flows);
        let steps = [
            (
                "guest's first requests",
                Reason::OutboundForwarded,
                Event::ConntrackCreate,
                None,
            ),
            (
                "replies",
                Reason::InboundForwarded,
                Event::ConntrackHit,
                Some(Event::RouteResolved),
            ),
            (
                "guest's second requests",
                Reason::OutboundForwarded,
                Event::ConntrackHit,
                None,
            ),
        ];
        for (step, reason, event, extra) in steps {
            let before = self.counters()?;
            let f = self.frames;
            if reason == Reason::OutboundForwarded {
                self.walk_by(gst0, n, 1, |k| f.outbound(addrs(k).0))?;
            } else {
                self.walk_by(pub0, n, 1, |k| f.inbound(SRC, SPORT, addrs(k).1, DPORT))?;
            }
            let mut events = vec![(event, n)];
            events.extend(extra.map(|e| (e, n)));
            self.check(
                &format!("seeding {what}: {step}"),
                &before,
                n,
                &Expect {
                    reason,
                    events: &events,
                },
            )?;
        }
        Ok(())
    }

    /// The hot mapping's counter slot (from its `NAT_IN` value).
    pub fn hot_slot(&mut self) -> anyhow::Result<u32> {
        let m: HashMap<_, u32, NatValue> = self
            .dp
            .ebpf_mut()
            .map(MAP_NAT_IN)
            .context("NAT_IN")?
            .try_into()?;
        Ok(m.get(&key(H0), 0)?.slot)
    }

    /// An inbound frame from the remote sender ([`SRC`]:[`SPORT`]) to `dst`:`dport`.
    pub fn frame(&self, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
        self.frames.inbound(SRC, SPORT, dst, dport)
    }
}

/// The MAC addresses frames need: inbound ones arrive on pub0 from pub1, the guests' on gst0
/// from gst1.
#[derive(Clone, Copy, Debug)]
pub struct Frames {
    pub pub0_mac: [u8; 6],
    pub pub1_mac: [u8; 6],
    pub gst0_mac: [u8; 6],
    pub gst1_mac: [u8; 6],
}

impl Frames {
    /// An inbound frame from `src`:`sport` to `dst`:`dport`, arriving on pub0.
    pub fn inbound(&self, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
        Udp {
            dst_mac: self.pub0_mac,
            src_mac: self.pub1_mac,
            src,
            dst,
            sport,
            dport,
            ttl: 255,
            checksum: true,
        }
        .build(60)
    }

    /// A guest's frame from `guest`:[`DPORT`] to [`SRC`]:[`SPORT`], arriving on gst0.
    pub fn outbound(&self, guest: Ipv4Addr) -> Vec<u8> {
        self.outbound_to(guest, SPORT)
    }

    /// A guest's frame from `guest`:[`DPORT`] to [`SRC`]:`port`, arriving on gst0.
    pub fn outbound_to(&self, guest: Ipv4Addr, port: u16) -> Vec<u8> {
        Udp {
            dst_mac: self.gst0_mac,
            src_mac: self.gst1_mac,
            src: guest,
            dst: SRC,
            sport: DPORT,
            dport: port,
            ttl: 255,
            checksum: true,
        }
        .build(60)
    }
}
