//! Section 2: forwarding rate and CPU cost of kernel forwarding, iptables static NAT and the
//! project (with `--policy xdp`, and with `--policy kernel` behind the same iptables rules),
//! side by side in one run, inbound and outbound, over established flows; beside them the
//! floor of any flow table in live traffic (an XDP router that reads one per-flow slot).
use crate::{
    report::{Chart, Section, Table},
    topo::{Setup, Topo},
    traffic::{self, Direction, Flows, Run},
    util::{self, Summary, ratios, show},
    verdict::{self, Target},
};

const SETUPS: [Setup; 5] = [
    Setup::Plain,
    Setup::Iptables,
    Setup::Natd,
    Setup::NatdKernel,
    Setup::Floor,
];
/// The traffic kinds measured, in table order.
const KINDS: [(Flows, Direction); 4] = [
    (Flows::Many, Direction::Inbound),
    (Flows::One, Direction::Inbound),
    (Flows::Many, Direction::Outbound),
    (Flows::One, Direction::Outbound),
];
/// The fixed offered load of the CPU-cost measurement, frames/s.
pub const FIXED_RATE: u64 = 100_000;

struct Params {
    repeats: usize,
    max_secs: f64,
    fixed_secs: f64,
}

/// Section 2; `bpf_stats`: also time natd's program alone (see `Args::bpf_stats`).
pub fn section(quick: bool, bpf_stats: bool) -> anyhow::Result<Section> {
    let p = if quick {
        Params {
            repeats: 3,
            max_secs: 1.0,
            fixed_secs: 1.0,
        }
    } else {
        Params {
            repeats: 5,
            max_secs: 2.0,
            fixed_secs: 3.0,
        }
    };
    let topos: Vec<Topo> = SETUPS
        .iter()
        .map(|s| Topo::new(*s))
        .collect::<anyhow::Result<_>>()?;
    // runs[mode][row][kind], one Run per repeat; mode 0 = flat out, 1 = fixed load; row 0 =
    // generator straight into the sink (no router), then the setups.
    let rows = SETUPS.len() + 1;
    let mut runs = vec![vec![vec![Vec::<Run>::new(); KINDS.len()]; rows]; 2];
    // natd's program alone, ns per packet, per setup (SETUPS order) and kind (with
    // `bpf_stats`; the setups that run natd).
    let mut prog = vec![vec![Vec::new(); KINDS.len()]; SETUPS.len()];
    for r in 0..p.repeats {
        eprintln!("bench: forwarding: repeat {}/{}", r + 1, p.repeats);
        // Rotate the order so no setup always runs first.
        for k in 0..rows {
            let row = (k + r) % rows;
            let (topo, direct) = if row == 0 {
                (&topos[0], true)
            } else {
                (&topos[row - 1], false)
            };
            for (ki, (flows, dir)) in KINDS.iter().enumerate() {
                util::check_interrupted()?;
                if !direct {
                    traffic::establish(topo, *flows, *dir)?;
                }
                runs[0][row][ki].push(traffic::timed(
                    topo, *flows, *dir, p.max_secs, None, direct,
                )?);
                runs[1][row][ki].push(traffic::timed(
                    topo,
                    *flows,
                    *dir,
                    p.fixed_secs,
                    Some(FIXED_RATE),
                    direct,
                )?);
                if bpf_stats && !direct && topo.natd.is_some() {
                    // A run of its own: the statistics cost every program run two clock
                    // reads, which the figures above must not include.
                    let _on = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
                    let run = traffic::timed(topo, *flows, *dir, 0.5, Some(FIXED_RATE), false)?;
                    prog[row - 1][ki].extend(run.prog_ns);
                }
            }
        }
    }
    let mut section = report(&runs, &p);
    if bpf_stats {
        section.tables.push(program_table(&runs, &prog));
    }
    Ok(section)
}

/// natd's XDP program alone beside the router's whole CPU time per packet (`--bpf-stats`),
/// for each setup that runs natd; `prog` is indexed by setup (SETUPS order), then kind.
fn program_table(runs: &[Vec<Vec<Vec<Run>>>], prog: &[Vec<Vec<f64>>]) -> (String, Table) {
    let mut t = Table::new(&[
        "setup",
        "traffic",
        "natd's XDP program, ns/packet (BPF statistics)",
        "router CPU, ns/packet (above)",
    ]);
    for (si, kinds) in prog.iter().enumerate() {
        if kinds.iter().all(Vec::is_empty) {
            continue;
        }
        for (ki, samples) in kinds.iter().enumerate() {
            let router = fixed_cost(runs, si + 1, ki);
            t.row(vec![
                SETUPS[si].name().into(),
                kind_label(ki),
                show(Summary::of(samples), 0),
                show(Summary::of(&router), 0),
            ]);
        }
    }
    (
        format!(
            "natd's XDP program alone (`--bpf-stats`): its run time per packet as the kernel's \
             BPF run-time statistics count it (`run_time_ns / run_cnt` of the program natd \
             attached), in separate runs of 0.5 s at {FIXED_RATE} frames/s with the statistics \
             on (each program run then also pays two clock reads); the rest of the router's \
             time is the kernel's: the veth receive, the redirect and the transmit:"
        ),
        t,
    )
}

fn col(runs: &[Run], f: impl Fn(&Run) -> f64) -> Vec<f64> {
    runs.iter().map(f).collect()
}

/// The router's CPU per packet at the fixed load, run by run: row `row`'s (0 = no router)
/// pipeline time for traffic kind `ki` minus the generator-and-sink share measured beside it.
fn fixed_cost(runs: &[Vec<Vec<Vec<Run>>>], row: usize, ki: usize) -> Vec<f64> {
    minus(
        &col(&runs[1][row][ki], |r| r.kernel_ns),
        &col(&runs[1][0][ki], |r| r.kernel_ns),
    )
}

fn minus(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(a, b)| a - b).collect()
}

fn kind_label(ki: usize) -> String {
    let (flows, dir) = KINDS[ki];
    format!("{}, {}", dir.label(), flows.label())
}

fn report(runs: &[Vec<Vec<Vec<Run>>>], p: &Params) -> Section {
    let mut max = Table::new(&[
        "setup",
        "traffic",
        "delivered, kpps (wall clock)",
        "ratio to kernel forwarding",
        "delivered / sent",
        "pipeline, ns/frame",
        "router, ns/frame",
        "router capacity of one CPU, kpps",
    ]);
    let mut cpu = Table::new(&[
        "setup",
        "traffic",
        "delivered / offered",
        "router CPU, ns/packet",
        "ratio to kernel forwarding",
        "ratio to iptables NAT",
        "/proc/stat softirq, ns/packet",
        "frames on natd's fast path",
        "of those, from their slot",
        "natd's own CPU, share of one CPU",
    ]);
    let mut rate_bars = Vec::new();
    let mut cost_bars = Vec::new();
    let mut summary = Vec::new();
    let xdp = SETUPS.iter().position(|s| *s == Setup::Natd);
    let plain = SETUPS.iter().position(|s| *s == Setup::Plain);
    let ipt = SETUPS.iter().position(|s| *s == Setup::Iptables);
    for (ki, _) in KINDS.iter().enumerate() {
        let label = kind_label(ki);
        let direct_max = col(&runs[0][0][ki], |r| r.kernel_ns);
        max.row(vec![
            "generator into the sink, no router".into(),
            label.clone(),
            show(
                Summary::of(&col(&runs[0][0][ki], |r| r.delivered_pps() / 1e3)),
                0,
            ),
            String::new(),
            show(
                Summary::of(&col(&runs[0][0][ki], Run::delivered_fraction)),
                3,
            ),
            show(Summary::of(&direct_max), 0),
            String::new(),
            String::new(),
        ]);
        let base_pps = col(&runs[0][1][ki], |r| r.delivered_pps() / 1e3);
        // The router's CPU per packet at the fixed load, per setup (SETUPS order), per run.
        let cost_of = |si: usize| fixed_cost(runs, si + 1, ki);
        if let Some(x) = xdp {
            for (si, setup) in SETUPS.iter().enumerate().filter(|(si, _)| *si != x) {
                summary.push(verdict::compare(
                    &format!(
                        "{} router CPU per packet at {FIXED_RATE} frames/s, {label}",
                        SETUPS[x].name(),
                    ),
                    setup.name(),
                    "CPU",
                    &ratios(&cost_of(x), &cost_of(si)),
                ));
            }
        }
        for (si, setup) in SETUPS.iter().enumerate() {
            let m = &runs[0][si + 1][ki];
            let pps = col(m, |r| r.delivered_pps() / 1e3);
            let router = minus(&col(m, |r| r.kernel_ns), &direct_max);
            let capacity: Vec<f64> = router.iter().map(|ns| 1e6 / ns.max(1.0)).collect();
            max.row(vec![
                setup.name().into(),
                label.clone(),
                show(Summary::of(&pps), 0),
                show(Summary::of(&ratios(&pps, &base_pps)), 2),
                show(Summary::of(&col(m, Run::delivered_fraction)), 3),
                show(Summary::of(&col(m, |r| r.kernel_ns)), 0),
                show(Summary::of(&router), 0),
                show(Summary::of(&capacity), 0),
            ]);
            let bar = format!("{} · {label}", setup.short());
            if let Some(s) = Summary::of(&pps) {
                rate_bars.push((bar.clone(), s));
            }
            let c = &runs[1][si + 1][ki];
            let cost = cost_of(si);
            let ratio_to = |other: Option<usize>| {
                other.map_or(String::new(), |o| {
                    show(Summary::of(&ratios(&cost, &cost_of(o))), 2)
                })
            };
            let fast: Vec<f64> = c.iter().filter_map(Run::fast_path_share).collect();
            let slot: Vec<f64> = c.iter().filter_map(Run::slot_share).collect();
            let daemon: Vec<f64> = c.iter().filter_map(Run::natd_cpu_share).collect();
            cpu.row(vec![
                setup.name().into(),
                label.clone(),
                show(Summary::of(&col(c, Run::delivered_fraction)), 3),
                show(Summary::of(&cost), 0),
                ratio_to(plain),
                ratio_to(ipt),
                show(Summary::of(&col(c, Run::softirq_ns)), 0),
                if fast.is_empty() {
                    String::new()
                } else {
                    show(Summary::of(&fast), 3)
                },
                if slot.is_empty() {
                    String::new()
                } else {
                    show(Summary::of(&slot), 3)
                },
                if daemon.is_empty() {
                    String::new()
                } else {
                    show(Summary::of(&daemon), 3)
                },
            ]);
            if let Some(s) = Summary::of(&cost) {
                cost_bars.push((bar, s));
            }
        }
    }
    let targets = targets(runs);
    summary.extend(flow_state_cost(runs));
    summary.extend(floor_verdict(runs));
    let intro = format!(
        "Three namespaces (client, router, guest) joined by veth pairs; 60-byte frames (64 \
         on the wire) of UDP through the router in each setup, inbound (client to the guest's \
         public address) and outbound (guest to the client): kernel forwarding without NAT \
         (to and from the guest's own address), iptables static NAT exactly as CloudStack's \
         router writes it for the mapping (mangle FIREWALL_/VPN_ chains with the one ingress \
         rule, marks, DNAT/SNAT, FORWARD; conntrack), natd in native XDP mode \
         (`--detach-on-exit`, its own state dir, bpffs and metrics port; the mapping and the \
         same rule), and natd with `--policy kernel` in native XDP mode behind that same \
         iptables ruleset (the mapping, no rules of its own: the kernel judges and \
         translates each flow's first packets, natd's tc learner enters the flows the kernel \
         admitted, and XDP carries them from then on). The fifth setup is no NAT but the \
         floor of any flow table: the bench's own XDP router (`bench-fwd`, on the router's \
         two interfaces) reads, for each frame, the 64-byte slot its 5-tuple hashes to in a \
         direct-mapped table of as many slots as natd's `FLOWS` holds entries (one cache line \
         per packet, the fewest memory accesses a per-flow lookup can make; the word read \
         takes part in choosing the output interface, so the frame waits for it), decrements \
         the TTL, writes the MACs and redirects the frame; everything natd does beyond that \
         (the rest of its lookup, the translation, the counters) it leaves out. The five \
         topologies exist side by side and every repeat measures each setup in turn (the order rotates), so the ratios compare runs made moments apart; \
         median (min–max) over {r} repeats.\n\n\
         Generator: the bench's own XDP program (`bench-gen`) run with `BPF_PROG_TEST_RUN` in \
         live-frames mode on the sender's veth; it writes the headers afresh into every frame \
         (pages are recycled after the router rewrote them) and returns `XDP_TX`, which sends \
         the frame to the router. 'Many flows': a random port of 64,512 per frame (the \
         client's in inbound flows, the guest's in outbound ones); 'one flow': a fixed \
         5-tuple. Before each measurement every flow of the traffic is established through \
         the router as real traffic establishes it: each flow's first packet, the other end's \
         answer, the flow's second packet (UDP flows are assured, in netfilter and in natd, \
         from the first packet after a reply; natd's fast path carries assured flows only, \
         one-way traffic would take its full path on every packet; with `--policy kernel` the \
         same three packets go through the kernel and its learner). The last column shows the \
         share of the measured frames that took natd's fast path (its `fast_path` event \
         count, read from natd's pinned `EVENTS`), and the share of those forwarded from the \
         copy in their flow's slot of the flow cache (`slot_hit`; the others looked their \
         flow up in `FLOWS`: a slot another flow holds, or a copy older than its refill \
         time). The table's last column is natd's own CPU time during the run (user and \
         system, from `/proc/PID/stat`: the kernel's work for its ctnetlink requests is its \
         system time) as a share of \
         one CPU: its collector walks the flow tables every 10 s and, with `--policy kernel`, \
         a round reads them and refreshes the kernel's entries every 5 s, so a run holds a \
         walk or not. Delivered = frames counted by an XDP sink \
         (`bench-sink`) on the receiving end (which drops them). Each batch of 64 frames is \
         flushed and the router's and the receiver's NAPI polls run inline, as softirqs on the \
         generator's CPU: the generator cannot outrun the router, and the kernel's own timer \
         of each generator call ('pipeline, ns/frame') is the CPU time of generator + router \
         + sink per frame, not counting time the thread was preempted. The same generator \
         into a veth pair straight to the other end's sink gives the generator + sink share, \
         which is subtracted to give the router's CPU time per packet; its inverse is the rate \
         one fully available CPU would forward. The wall-clock delivered rate is what the run \
         achieved on this machine: both cores are shared by generator, router and whatever \
         else runs (other engineers' test suites), so it swings with the machine's load; hence \
         the repeats, min/max and ratios measured side by side.\n\n\
         CPU cost at a fixed load: the same traffic paced at {FIXED_RATE} frames/s (a batch \
         every 10 ms; the 'delivered / offered' column shows whether a setup sustained it), \
         {fs} s per run. The router's CPU per packet is again pipeline minus \
         generator-and-sink, from the kernel's timer. The softirq time of `/proc/stat` (all \
         CPUs, per delivered packet) is shown beside it as a cross-check; where the kernel \
         samples CPU time at its tick (without `CONFIG_IRQ_TIME_ACCOUNTING`), it charges the \
         NAPI polls run inside the generator's own system call to system time rather than to \
         softirq, and it counts whatever else the machine does: the timer figures are the \
         ones the comparisons use.",
        r = p.repeats,
        fs = p.fixed_secs,
    );
    Section {
        title: "2. Forwarding rate and CPU cost".into(),
        intro,
        tables: vec![
            (
                format!(
                    "Highest delivered rate (flat out, {} s per run):",
                    p.max_secs
                ),
                max,
            ),
            (
                format!("CPU per packet at a fixed offered load of {FIXED_RATE} frames/s:"),
                cpu,
            ),
        ],
        notes: targets
            .iter()
            .chain(&summary)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
            + "\n",
        summary: targets.into_iter().chain(summary).collect(),
        charts: vec![
            Chart {
                file: "forwarding.svg".into(),
                title: "Delivered rate, 64-byte UDP, generator and router on 2 shared cores".into(),
                unit: "thousand packets per second delivered (wall clock)".into(),
                bars: rate_bars,
            },
            Chart {
                file: "router-cpu.svg".into(),
                title: "Router CPU time per packet at 100k packets/s".into(),
                unit: "ns per packet (kernel timer, generator and sink subtracted)".into(),
                bars: cost_bars,
            },
        ],
    }
}

/// Issue 9's targets, many flows, inbound and outbound, run by run: natd's router CPU per
/// packet at most 0.5x plain kernel forwarding's and at most 0.25x iptables static NAT's, with
/// `--policy xdp` and (established flows, which every measured frame belongs to) with
/// `--policy kernel`.
fn targets(runs: &[Vec<Vec<Vec<Run>>>]) -> Vec<String> {
    let row = |s: Setup| SETUPS.iter().position(|x| *x == s).map(|i| i + 1);
    let (Some(plain), Some(ipt)) = (row(Setup::Plain), row(Setup::Iptables)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (setup, policy) in [(Setup::Natd, ""), (Setup::NatdKernel, ", --policy kernel")] {
        let Some(x) = row(setup) else {
            continue;
        };
        for (ki, (flows, dir)) in KINDS.iter().enumerate() {
            if *flows != Flows::Many {
                continue;
            }
            let cost = |row: usize| fixed_cost(runs, row, ki);
            for (other, limit, what) in [
                (plain, 0.5, "plain kernel forwarding"),
                (ipt, 0.25, "iptables static NAT"),
            ] {
                let name = format!(
                    "XDP router CPU per packet{policy}, {}, many flows, at most {limit}x {what}",
                    dir.label()
                );
                out.push(
                    Target {
                        name: &name,
                        limit,
                        below: true,
                        unit: "x",
                    }
                    .line(&ratios(&cost(x), &cost(other)), 0),
                );
            }
        }
    }
    out
}

/// What many flows cost beyond one, per setup and direction: the router's CPU per packet at
/// the fixed load with many flows minus with one flow, repeat by repeat. Kernel forwarding
/// keeps no state per flow; iptables NAT (conntrack) and natd (its flow table) read one
/// flow's state per packet, which with many flows is rarely in the CPU's caches.
fn flow_state_cost(runs: &[Vec<Vec<Vec<Run>>>]) -> Vec<String> {
    let mut out = Vec::new();
    for dir in [Direction::Inbound, Direction::Outbound] {
        let kind = |f: Flows| KINDS.iter().position(|k| *k == (f, dir));
        let (Some(many), Some(one)) = (kind(Flows::Many), kind(Flows::One)) else {
            continue;
        };
        let cost = |row: usize, ki: usize| fixed_cost(runs, row, ki);
        let parts: Vec<String> = SETUPS
            .iter()
            .enumerate()
            .map(|(si, setup)| {
                let extra = minus(&cost(si + 1, many), &cost(si + 1, one));
                format!("{} {}", setup.name(), show(Summary::of(&extra), 0))
            })
            .collect();
        out.push(format!(
            "- What many flows (random source port) add to the router's CPU per packet over one \
             flow at {FIXED_RATE} frames/s, {}, ns (the difference in each repeat; median \
             (min–max)): {}.",
            dir.label(),
            parts.join("; ")
        ));
    }
    out
}

/// What the floor router (one cache-cold per-flow slot read per packet, nothing else a NAT
/// does) says about issue 9's many-flows target against kernel forwarding, run by run: if the
/// floor alone costs more than half of kernel forwarding's CPU per packet in every run, no
/// flow table that reads per-flow state for each packet meets that target on this machine;
/// otherwise the floor leaves natd the difference.
fn floor_verdict(runs: &[Vec<Vec<Vec<Run>>>]) -> Vec<String> {
    const LIMIT: f64 = 0.5;
    let row = |s: Setup| SETUPS.iter().position(|x| *x == s).map(|i| i + 1);
    let (Some(plain), Some(floor)) = (row(Setup::Plain), row(Setup::Floor)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (ki, (flows, dir)) in KINDS.iter().enumerate() {
        if *flows != Flows::Many {
            continue;
        }
        let cost = |row: usize| fixed_cost(runs, row, ki);
        let (floor_ns, plain_ns) = (cost(floor), cost(plain));
        let r = ratios(&floor_ns, &plain_ns);
        // What the target leaves natd per packet beyond the floor, run by run.
        let room: Vec<f64> = floor_ns
            .iter()
            .zip(&plain_ns)
            .map(|(f, p)| LIMIT * p - f)
            .collect();
        out.push(format!(
            "- {}, many flows: {}.",
            dir.label(),
            floor_sentence(&r, &room, LIMIT)
        ));
    }
    if out.is_empty() {
        return out;
    }
    out.insert(
        0,
        format!(
            "- The floor of a per-flow table in live traffic (the bench's XDP router that reads \
             one cache-cold 64-byte slot per packet and redirects, no NAT), router CPU per \
             packet at {FIXED_RATE} frames/s as a multiple of kernel forwarding's, against the \
             {LIMIT}x target:"
        ),
    );
    out
}

/// The floor's verdict from its per-run ratios to kernel forwarding (`r`) and what `limit`
/// leaves beyond it per packet (`room`, ns).
fn floor_sentence(r: &[f64], room: &[f64], limit: f64) -> String {
    let list = |v: &[f64], d: usize| {
        v.iter()
            .map(|x| format!("{x:.d$}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let verdict = if !r.is_empty() && r.iter().all(|x| *x > limit) {
        format!(
            "the floor alone is above {limit}x in every run, so with this many flows no flow \
             table that reads per-flow state for each packet meets that target on this machine"
        )
    } else if !r.is_empty() && r.iter().all(|x| *x <= limit) {
        format!(
            "the floor is within {limit}x in every run; the target leaves a NAT {} ns per \
             packet beyond it (run by run)",
            list(room, 0)
        )
    } else {
        format!("the floor is above {limit}x in some runs and within it in others")
    };
    format!("runs {} x: {verdict}", list(r, 3))
}

#[cfg(test)]
mod tests {
    use super::floor_sentence;

    #[test]
    fn the_floor_verdict_follows_every_run() {
        assert!(
            floor_sentence(&[0.6, 0.7], &[-50.0, -80.0], 0.5)
                .contains("above 0.5x in every run, so with this many flows no flow table")
        );
        let within = floor_sentence(&[0.3, 0.4], &[150.0, 80.0], 0.5);
        assert!(within.contains("within 0.5x in every run"), "{within}");
        assert!(within.contains("150, 80 ns"), "{within}");
        assert!(floor_sentence(&[0.4, 0.6], &[80.0, -80.0], 0.5).contains("in some runs"));
        assert!(floor_sentence(&[], &[], 0.5).contains("in some runs"));
    }
}
