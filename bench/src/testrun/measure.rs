//! The scenarios, their interleaved repeats and the checks that each ran the intended path.
use std::net::Ipv4Addr;

use anyhow::{Context as _, ensure};
use aya::programs::{Xdp, XdpMode};
use nat_common::{DEFAULT_MAPPINGS, Event, Reason};
use nat_userspace::ebpf::Sizes;

use super::{
    runs::Expect,
    setup::{
        Bed, DPORT, DPORT_OTHER_RULE, H0, H1, REPS_PER_CALL, Rules, SPORT, SRC, Z, build_topology,
        chain_addr,
    },
    tcp,
};
use crate::{
    bpf::{self, XDP_PASS},
    netns::{self, Netns, unique_stem},
    report::Section,
    util,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// The bench's `return XDP_PASS` program, 254 repetitions per call.
    Empty,
    /// The same, one repetition per call (measured beside [`Scenario::NewFlow`]).
    EmptyOnce,
    /// The project's program on an interface natd did not configure: parse, two flow-table
    /// misses, the interface lookup.
    UnknownIface,
    /// A `FLOWS` hit on the hot pair: the fast path (rewrite, count, redirect).
    Established,
    /// The same over the cycle of every other mapping: each pass a different mapping and flow.
    EstablishedCycle,
    /// A packet of a flow never seen: firewall allows it, route, both entries created.
    NewFlow,
    /// [`Scenario::Established`] measured the way [`Scenario::NewFlow`] is (one repetition
    /// per call): what that method adds to a path both ways measure.
    EstablishedOnce,
    /// New flows in the test-run loop: guests of the cycle open flows to a remote port no
    /// flow used, each repetition the next mapping (its rewrite leads to a fresh tuple).
    NewFlowWalk,
    /// [`Scenario::Established`] with TCP: the hot pair's TCP flows, opened by a handshake;
    /// the remote's data segments (PSH|ACK), each noted in the flow entry for the window
    /// check. Every repetition of a measurement carries the same sequence numbers (the program
    /// does not change them); each measurement sends the next segment.
    TcpEstablished,
    /// The TCP flow measured as [`Scenario::EstablishedOnce`] is, each packet the next
    /// segment in order (each moves the noted sequence end).
    TcpEstablishedOnce,
    /// A mapped public IP without any rule: one trie searched, dropped.
    DenyNoRule,
    /// 256 rules: the source matches rule 0, the port rule 1: both tries searched, dropped.
    DenyOtherRule,
}

impl Scenario {
    pub fn label(self) -> &'static str {
        match self {
            Scenario::Empty => "empty program (`return XDP_PASS`)",
            Scenario::EmptyOnce => "empty program, one repetition per call",
            Scenario::UnknownIface => "no flow, interface not configured (parse, 2 misses, IFACES)",
            Scenario::Established => "established flow, hot mapping (fast path)",
            Scenario::EstablishedCycle => {
                "established flow, a different mapping each packet (fast path)"
            }
            Scenario::NewFlow => "new flow (firewall allows, route, flow created)",
            Scenario::EstablishedOnce => {
                "established flow, hot mapping, measured as the new flow is (one repetition per call)"
            }
            Scenario::NewFlowWalk => {
                "new flow, a different mapping each packet (outbound, egress policy, route, flow created)"
            }
            Scenario::TcpEstablished => {
                "established TCP flow, hot mapping (fast path, window note; the same segment \
                 repeated: after each flow's first packet the note stores nothing)"
            }
            Scenario::TcpEstablishedOnce => {
                "established TCP flow, hot mapping, in order (each packet the next segment, the \
                 note stores its end), one repetition per call"
            }
            Scenario::DenyNoRule => "firewall deny (public IP without rules)",
            Scenario::DenyOtherRule => "firewall deny (source and port match different rules)",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Scenario::Empty => "empty prog",
            Scenario::EmptyOnce => "empty prog, 1 rep",
            Scenario::UnknownIface => "unknown iface",
            Scenario::Established => "established",
            Scenario::EstablishedCycle => "established, cold",
            Scenario::NewFlow => "new flow",
            Scenario::EstablishedOnce => "established, 1 rep",
            Scenario::NewFlowWalk => "new flow, cycle",
            Scenario::TcpEstablished => "TCP established",
            Scenario::TcpEstablishedOnce => "TCP established, in order, 1 rep",
            Scenario::DenyNoRule => "deny, no rule",
            Scenario::DenyOtherRule => "deny, 256 rules",
        }
    }
}

/// One loaded program with its mappings, rules and flows, and what to measure on it.
pub struct Setting {
    pub name: String,
    pub bed: Bed,
    scenarios: Vec<Scenario>,
    /// Next position in the mapping cycle.
    pos: u32,
    /// Next never-used flow of [`Scenario::NewFlow`].
    next_flow: u32,
    /// Next mapping and never-used remote port of [`Scenario::NewFlowWalk`].
    walk_pos: u32,
    next_port: u32,
    /// Next data segment of the hot pair's TCP flows ([`super::runs::Frames::tcp_data`]).
    tcp_seg: u32,
    pub samples: Vec<(Scenario, Vec<f64>)>,
}

impl Setting {
    pub fn samples_of(&self, s: Scenario) -> Option<&[f64]> {
        self.samples
            .iter()
            .find(|(sc, _)| *sc == s)
            .map(|(_, v)| v.as_slice())
            .filter(|v| !v.is_empty())
    }

    fn push(&mut self, s: Scenario, v: f64) {
        if let Some((_, samples)) = self.samples.iter_mut().find(|(sc, _)| *sc == s) {
            samples.push(v);
        }
    }

    /// Measures `s` (`NewFlow` also measures `EmptyOnce`) and records the samples.
    fn measure(&mut self, s: Scenario, empty: &Xdp, plan: &Plan) -> anyhow::Result<()> {
        let (calls, newflow_calls, walk_calls) = (plan.calls, plan.newflow_calls, plan.walk_calls);
        let reps = u64::from(calls) * u64::from(REPS_PER_CALL);
        let (pub0, oth0) = (self.bed.pub0, self.bed.oth0);
        let f = self.bed.frames;
        match s {
            Scenario::Empty => {
                let frame = self.bed.frame(H0, DPORT);
                let mut total = 0u64;
                for _ in 0..calls {
                    let r = bpf::test_run(empty, &frame, pub0, REPS_PER_CALL)?;
                    ensure!(r.retval == XDP_PASS, "empty program returned {}", r.retval);
                    total += u64::from(r.duration_ns) * u64::from(REPS_PER_CALL);
                }
                self.push(s, total as f64 / reps as f64);
                return Ok(());
            }
            Scenario::NewFlow | Scenario::EstablishedOnce | Scenario::TcpEstablishedOnce => {
                return self.once(s, empty, newflow_calls);
            }
            _ => {}
        }
        let before = self.bed.counters()?;
        let inbound = |dst, dport| move |_| f.inbound(SRC, SPORT, dst, dport);
        // (ns per repetition, repetitions, the reason each must end with, the one event each
        // must count if any)
        let (ns, n, reason, event) = match s {
            Scenario::UnknownIface => (
                self.bed.walk(oth0, reps, inbound(H0, DPORT))?,
                reps,
                Reason::UnknownIface,
                None,
            ),
            Scenario::Established => (
                self.bed.walk(pub0, reps, inbound(H0, DPORT))?,
                reps,
                Reason::InboundForwarded,
                Some(Event::FastPath),
            ),
            Scenario::TcpEstablished => {
                let k = self.tcp_seg;
                self.tcp_seg += 1;
                (
                    self.bed.walk(pub0, reps, |_| f.tcp_data(H0, k))?,
                    reps,
                    Reason::InboundForwarded,
                    Some(Event::FastPath),
                )
            }
            Scenario::EstablishedCycle => {
                let (start, n) = (u64::from(self.pos), u64::from(self.bed.chain));
                let ns = self.bed.walk(pub0, reps, |k| {
                    f.inbound(SRC, SPORT, chain_addr(((start + k) % n) as u32), DPORT)
                })?;
                self.pos = ((start + reps) % n) as u32;
                (ns, reps, Reason::InboundForwarded, Some(Event::FastPath))
            }
            Scenario::NewFlowWalk => {
                // Guests open flows to a remote port no flow used yet, one port per call: the
                // k-th repetition is mapping `pos - k` of the cycle (its guest is
                // chain_addr(pos - k + 1)), whose rewrite leads to the next one down.
                let (pos, n, port0) = (
                    u64::from(self.walk_pos),
                    u64::from(self.bed.chain),
                    self.next_port,
                );
                let reps = u64::from(walk_calls) * u64::from(REPS_PER_CALL);
                let gst0 = self.bed.gst0;
                let ns = self.bed.walk(gst0, reps, |k| {
                    let m = (pos + n - k % n) % n;
                    let call = port0 + (k / u64::from(REPS_PER_CALL)) as u32;
                    f.outbound_to(chain_addr(((m + 1) % n) as u32), remote_port(call))
                })?;
                self.walk_pos = ((pos + n - reps % n) % n) as u32;
                self.next_port += walk_calls;
                (
                    ns,
                    reps,
                    Reason::OutboundForwarded,
                    Some(Event::ConntrackCreate),
                )
            }
            Scenario::DenyNoRule => (
                self.bed.walk(pub0, reps, inbound(Z, DPORT))?,
                reps,
                Reason::InboundDenied,
                None,
            ),
            Scenario::DenyOtherRule => (
                self.bed.walk(pub0, reps, inbound(H0, DPORT_OTHER_RULE))?,
                reps,
                Reason::InboundDenied,
                None,
            ),
            Scenario::Empty
            | Scenario::EmptyOnce
            | Scenario::NewFlow
            | Scenario::EstablishedOnce
            | Scenario::TcpEstablishedOnce => unreachable!("above"),
        };
        // Every repetition must have ended with the intended reason and taken the intended
        // path (events), or the figure is not what it claims.
        // A packet of no flow (a new flow's first, a denied one) first missed the flow table,
        // which the program counts (one on an interface natd did not configure is refused
        // before the lookup).
        let mut events: Vec<(Event, u64)> = event.map(|e| (e, n)).into_iter().collect();
        if matches!(
            s,
            Scenario::NewFlowWalk | Scenario::DenyNoRule | Scenario::DenyOtherRule
        ) {
            events.push((Event::ConntrackMiss, n));
        }
        self.bed.check(
            &format!("{}: {s:?}", self.name),
            &before,
            n,
            &Expect {
                reason,
                events: &events,
            },
        )?;
        if s == Scenario::TcpEstablished {
            // Both flows of the pair noted the segment on the fast path.
            let end = tcp_end(self.tcp_seg - 1);
            for public in [H0, H1] {
                self.bed.check_tcp_note(public, end)?;
            }
        }
        self.push(s, ns);
        Ok(())
    }

    /// `calls` packets, one per `BPF_PROG_TEST_RUN` call, alternating with the empty program
    /// on the same frame; records both means (the call's fixed cost is in both and cancels).
    /// [`Scenario::NewFlow`]: each packet the first of a flow never seen (a fresh source
    /// address and port); [`Scenario::EstablishedOnce`]: the hot flow's;
    /// [`Scenario::TcpEstablishedOnce`]: the hot TCP flow's next segment.
    fn once(&mut self, s: Scenario, empty: &Xdp, calls: u32) -> anyhow::Result<()> {
        let pub0 = self.bed.pub0;
        let f = self.bed.frames;
        let before = self.bed.counters()?;
        let (mut project, mut baseline) = (0u64, 0u64);
        for _ in 0..calls {
            let frame = if s == Scenario::NewFlow {
                let i = self.next_flow;
                self.next_flow += 1;
                // 16.0.1.1 and up (inside rule 0's CIDRs of `Rules::Many`), ports 1024 and up.
                let src =
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(16, 0, 1, 1)) + (i / 64_000) * 256);
                f.inbound(src, 1024 + (i % 64_000) as u16, H0, DPORT)
            } else if s == Scenario::TcpEstablishedOnce {
                self.tcp_seg += 1;
                f.tcp_data(H0, self.tcp_seg - 1)
            } else {
                f.inbound(SRC, SPORT, H0, DPORT)
            };
            let e = bpf::test_run(empty, &frame, pub0, 1)?;
            ensure!(e.retval == XDP_PASS, "empty program returned {}", e.retval);
            let p = bpf::test_run(self.bed.prog()?, &frame, pub0, 1)?;
            baseline += u64::from(e.duration_ns);
            project += u64::from(p.duration_ns);
        }
        let n = u64::from(calls);
        let event = if s == Scenario::NewFlow {
            Event::ConntrackCreate
        } else {
            Event::FastPath
        };
        // A new flow's packet first missed the flow table.
        let miss = (Event::ConntrackMiss, n);
        let events: &[(Event, u64)] = if s == Scenario::NewFlow {
            &[(event, n), miss]
        } else {
            &[(event, n)]
        };
        self.bed.check(
            &format!("{}: {s:?}", self.name),
            &before,
            n,
            &Expect {
                reason: Reason::InboundForwarded,
                events,
            },
        )?;
        if s == Scenario::TcpEstablishedOnce {
            self.bed.check_tcp_note(H0, tcp_end(self.tcp_seg - 1))?;
        }
        self.push(s, project as f64 / n as f64);
        if s == Scenario::NewFlow {
            self.push(Scenario::EmptyOnce, baseline as f64 / n as f64);
        }
        Ok(())
    }
}

/// The sequence number after the hot TCP flows' data segment `k`.
fn tcp_end(k: u32) -> u32 {
    tcp::REMOTE_ISN
        .wrapping_add(1)
        .wrapping_add((k + 1).wrapping_mul(tcp::PAYLOAD as u32))
}

/// Sizes and repeat counts of one run.
pub struct Plan {
    pub repeats: usize,
    /// Calls of [`REPS_PER_CALL`] repetitions per measurement.
    pub calls: u32,
    /// Calls of one repetition per new-flow measurement.
    pub newflow_calls: u32,
    /// Calls of [`REPS_PER_CALL`] new flows per cycle new-flow measurement.
    pub walk_calls: u32,
    pub big: u32,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                repeats: 3,
                calls: 400,
                newflow_calls: 2_000,
                walk_calls: 20,
                big: 100_000,
            }
        } else {
            Self {
                repeats: 5,
                calls: 2_000,
                newflow_calls: 5_000,
                walk_calls: 50,
                big: 1_000_000,
            }
        }
    }
}

/// Sections 1 and 1b.
pub fn run(quick: bool) -> anyhow::Result<Vec<Section>> {
    let plan = Plan::new(quick);
    let ns = netns::create(format!("{}-testrun", unique_stem()))?;
    build_topology(&ns)?;
    ns.run(|| in_namespace(&ns, &plan))?
}

/// The remote port of the `i`-th call of [`Scenario::NewFlowWalk`]: 1024 and up, never the
/// seeded flows' [`SPORT`].
fn remote_port(i: u32) -> u16 {
    let p = 1024 + (i % 60_000) as u16;
    if p >= SPORT { p + 1 } else { p }
}

/// Capacities for a bed with a cycle of `chain` mappings: room for every flow of the cycle
/// with a quarter to spare, and for every flow the new-flow measurements open (an LRU map must
/// never evict one while it is measured).
fn sizes(chain: u32) -> Sizes {
    Sizes {
        flows: (chain + chain / 4 + 65_536).max(1 << 18),
        mappings: (chain + 4).max(DEFAULT_MAPPINGS),
    }
}

fn in_namespace(ns: &Netns, plan: &Plan) -> anyhow::Result<Vec<Section>> {
    use Scenario::*;
    let mut empty_obj = bpf::load(bpf::EMPTY, |_| {})?;
    let empty = bpf::xdp(&mut empty_obj, "bench_empty")?;
    // Attached to a spare interface, as every program under test: see `setup::HOLDERS`.
    empty
        .attach("hd0", XdpMode::Driver)
        .context("attaching the empty program to hd0")?;
    let empty: &Xdp = empty;
    let big = plan.big;
    let big_name = if big >= 1_000_000 {
        "1,000,000".to_string()
    } else {
        format!("{big}")
    };
    let specs: Vec<(String, u32, Rules, Vec<Scenario>)> = vec![
        (
            "1 mapping".into(),
            0,
            Rules::Open,
            vec![
                Empty,
                UnknownIface,
                Established,
                TcpEstablished,
                EstablishedOnce,
                TcpEstablishedOnce,
                NewFlow,
                DenyNoRule,
            ],
        ),
        (
            "1 mapping, 256 rules".into(),
            0,
            Rules::Many,
            vec![Empty, Established, TcpEstablished, NewFlow, DenyOtherRule],
        ),
        (
            "10,000 mappings".into(),
            10_000,
            Rules::Open,
            vec![
                Empty,
                Established,
                TcpEstablished,
                EstablishedCycle,
                NewFlow,
                NewFlowWalk,
                DenyNoRule,
            ],
        ),
        (
            format!("{big_name} mappings"),
            big,
            Rules::Open,
            vec![
                Empty,
                Established,
                TcpEstablished,
                EstablishedCycle,
                NewFlow,
                NewFlowWalk,
                DenyNoRule,
            ],
        ),
        (
            format!("{big_name} mappings, 256 rules"),
            big,
            Rules::Many,
            vec![
                Empty,
                Established,
                TcpEstablished,
                EstablishedCycle,
                NewFlow,
                NewFlowWalk,
                DenyOtherRule,
            ],
        ),
    ];
    let mut settings = Vec::new();
    for (i, (name, chain, rules, scenarios)) in specs.into_iter().enumerate() {
        eprintln!("bench: testrun: loading '{name}'");
        let t = std::time::Instant::now();
        let mut bed = Bed::new(ns, &format!("hd{}", i + 1), chain, sizes(chain))?;
        bed.set_rules(rules)?;
        eprintln!(
            "bench: testrun: '{name}': loaded and filled in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let t = std::time::Instant::now();
        bed.seed()
            .with_context(|| format!("{name}: opening the established flows"))?;
        bed.seed_tcp()
            .with_context(|| format!("{name}: opening the hot pair's TCP flows"))?;
        eprintln!(
            "bench: testrun: '{name}': {} flows opened in {:.1} s",
            chain + 4,
            t.elapsed().as_secs_f64()
        );
        let mut samples: Vec<(Scenario, Vec<f64>)> =
            scenarios.iter().map(|s| (*s, Vec::new())).collect();
        if scenarios.contains(&NewFlow) {
            samples.push((EmptyOnce, Vec::new()));
        }
        settings.push(Setting {
            name,
            bed,
            scenarios,
            pos: 0,
            next_flow: 0,
            walk_pos: 0,
            next_port: 0,
            tcp_seg: 0,
            samples,
        });
    }
    // Interleaved: every repeat measures every scenario of every setting once, so a busy
    // moment on the shared machine hits all of them alike.
    for r in 0..plan.repeats {
        eprintln!("bench: testrun: repeat {}/{}", r + 1, plan.repeats);
        for st in &mut settings {
            for i in 0..st.scenarios.len() {
                util::check_interrupted()?;
                let s = st.scenarios[i];
                st.measure(s, empty, plan)
                    .with_context(|| format!("{}: {}", st.name, s.label()))?;
            }
        }
    }
    let lpm = {
        let (small, large) = settings.split_at_mut(3);
        let whole = super::report::net_of(&small[1], Established);
        // The base of the 1,000,000-mapping targets: the 1-mapping established path.
        let base = small[0].samples_of(Established).unwrap_or(&[]).to_vec();
        crate::breakdown::section(&mut small[1].bed, &mut large[0].bed, &whole, &base, plan)?
    };
    Ok(vec![super::report::section(&settings, plan), lpm])
}
