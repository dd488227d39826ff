//! Section 1b: where the established path's time goes, and issue 3's firewall LPM lookups.
//! Each part of the path measured alone by a program of `bench-parts`, which compiles the XDP
//! program's own modules (parse, flows, rewrite, stats, forward) and runs them on the loaded
//! program's own maps: they are pinned for the moment of loading and the bench object is
//! pointed at the pins (`EbpfLoader::map_pin_path`), so the lookups find the entries natd's
//! writers and the seeded flows put there. Beside the cold `FLOWS` lookups, the memory floor
//! ([`floor`]): random reads in maps of the same footprint, with nothing else.
mod floor;

use std::path::PathBuf;

use anyhow::{Context as _, ensure};
use aya::{
    Ebpf,
    maps::{Array, LpmTrie, lpm_trie::Key},
};
use nat_common::{
    Event, FW_SRC_BASE_BITS, FlowEntry, FlowTuple, FwSrcData, MAP_FLOWS, Reason, RuleBits, proto,
};
use nat_userspace::{pins::PinDir, state::Mapping};

use crate::{
    bpf,
    mapops::{REPS, run_prog},
    netns::unique_stem,
    report::{Chart, Section, Table},
    testrun::{
        Plan,
        setup::{Bed, DPORT, H0, H1, SPORT, SRC, chain_addr},
    },
    util::{self, Summary, show},
};

fn ne(a: std::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// Loads `bench-parts` on the maps of `bed`'s program, with the hot flow's facts as globals.
fn load_parts(bed: &mut Bed) -> anyhow::Result<Ebpf> {
    let dir = PinDir::prepare(&std::path::Path::new("/sys/fs/bpf").join(unique_stem()))?;
    let result = (|| {
        let mut pins: Vec<(&str, PathBuf)> = Vec::new();
        // `bench-parts` declares every map of the program (nat-ebpf's own declarations): all
        // of them are the loaded program's.
        for name in nat_common::maps::MAPS.map(|m| m.name) {
            let path = dir.maps().join(name);
            bed.dp
                .ebpf_mut()
                .map(name)
                .with_context(|| format!("no map {name}"))?
                .pin(&path)
                .with_context(|| format!("pinning {name}"))?;
            pins.push((name, path));
        }
        let slot = bed.hot_slot()?;
        let cycle_slot = bed.cycle_slots()?;
        let (src, public, private) = (ne(SRC), ne(H0), ne(H1));
        let (sport, dport) = (SPORT.to_be(), DPORT.to_be());
        let gst0 = bed.gst0;
        let (chain, base) = (bed.chain.max(1), u32::from(chain_addr(0)));
        bpf::load(bpf::PARTS, |l| {
            for (name, path) in &pins {
                l.map_pin_path(name, path.as_path());
            }
            l.override_global("SRC", &src, true)
                .override_global("PUBLIC", &public, true)
                .override_global("PRIVATE", &private, true)
                .override_global("SPORT", &sport, true)
                .override_global("DPORT", &dport, true)
                .override_global("OUT_IFINDEX", &gst0, true)
                .override_global("SLOT", &slot, true)
                .override_global("CYCLE_SLOT", &cycle_slot, true)
                .override_global("CYCLE_N", &chain, true)
                .override_global("CYCLE_BASE", &base, true);
        })
    })();
    // The pins only carried the maps to the loader; the maps live on with their users.
    let _ = std::fs::remove_dir_all(dir.root());
    let mut parts = result?;
    // The rewrite's entry: a copy of the hot flow's, and a one-entry trie beside FW_SRC.
    let hot = FlowTuple::new(ne(SRC), ne(H0), SPORT.to_be(), DPORT.to_be(), proto::UDP);
    let flows: aya::maps::HashMap<_, FlowTuple, FlowEntry> = bed
        .dp
        .ebpf_mut()
        .map(MAP_FLOWS)
        .context("no map FLOWS")?
        .try_into()?;
    let entry = flows.get(&hot, 0).context("the hot flow is not in FLOWS")?;
    let mut e: Array<_, FlowEntry> = parts.map_mut("ENTRY").context("no map ENTRY")?.try_into()?;
    e.set(0, entry, 0)?;
    let mut lpm1: LpmTrie<_, FwSrcData, RuleBits> =
        parts.map_mut("LPM1").context("no map LPM1")?.try_into()?;
    let all = RuleBits {
        bits: [u64::MAX; 4],
    };
    let data = FwSrcData {
        public: H0.octets(),
        source: [0; 4],
    };
    lpm1.insert(&Key::new(FW_SRC_BASE_BITS, data), all, 0)?;
    Ok(parts)
}

/// What proves a part's operation happened on every run, besides its own hit count.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Moved {
    Nothing,
    Stats,
    Events,
    MappingStats,
    Creates,
}

/// One micro-benchmark: a `bench-parts` program, the baseline program subtracted from it,
/// and whether it is a part of the established (fast) path.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    prog: &'static str,
    base: &'static str,
    moved: Moved,
    fast_path: u32,
}

const fn case(name: &'static str, prog: &'static str, base: &'static str) -> Case {
    Case {
        name,
        prog,
        base,
        moved: Moved::Nothing,
        fast_path: 0,
    }
}

/// The established path's parts (`fast_path`: how often a packet makes the operation).
const PARTS: [Case; 18] = [
    case(
        "nothing (the run's own count: the baseline)",
        "p_none",
        "p_none",
    ),
    Case {
        fast_path: 1,
        ..case(
            "parse: Ethernet, IPv4 and UDP checks, the flow tuple",
            "p_parse",
            "p_none",
        )
    },
    case(
        "key only (the hot flow's tuple, from constants)",
        "p_key",
        "p_none",
    ),
    Case {
        fast_path: 1,
        ..case(
            "the flow's slot copied (`SLOTS`: key check and 12 words under the sequence lock; minus the key)",
            "p_slot",
            "p_key",
        )
    },
    case(
        "`FLOWS` lookup, hit (LRU hash; a packet whose slot holds another flow; minus the key)",
        "p_flows",
        "p_key",
    ),
    Case {
        fast_path: 2,
        ..case(
            "`CONFIG` lookup (array; 2 per packet: the slot's age, route generation and refresh interval)",
            "p_config",
            "p_none",
        )
    },
    Case {
        fast_path: 2,
        ..case(
            "`bpf_jiffies64()` (the slot's age, the refresh)",
            "p_jiffies",
            "p_none",
        )
    },
    case(
        "entry only (a one-entry array: the rewrite's baseline)",
        "p_entry",
        "p_none",
    ),
    Case {
        fast_path: 1,
        ..case(
            "rewrite from the entry (addresses, ports, checksum deltas, TTL, MACs)",
            "p_rewrite",
            "p_entry",
        )
    },
    Case {
        fast_path: 1,
        moved: Moved::Stats,
        ..case("`STATS` count (per-CPU array)", "p_stats", "p_none")
    },
    Case {
        fast_path: 2,
        moved: Moved::Events,
        ..case(
            "`EVENTS` count (per-CPU array; 2 per packet: fast path, slot hit)",
            "p_events",
            "p_none",
        )
    },
    Case {
        fast_path: 1,
        moved: Moved::MappingStats,
        ..case(
            "`MAPPING_STATS` count by slot (per-CPU array)",
            "p_mapstats",
            "p_none",
        )
    },
    Case {
        fast_path: 1,
        ..case("`bpf_redirect_map()` (DEVMAP hash)", "p_redirect", "p_none")
    },
    case(
        "not on the fast path: route resolution, `bpf_fib_lookup()` + `IFACES` (a flow's first packets)",
        "p_fib",
        "p_none",
    ),
    case(
        "not on the fast path: `bpf_ktime_get_ns()`, the program's clock (once a second per direction)",
        "p_now_ns",
        "p_none",
    ),
    case(
        "not on the fast path: `FLOWS` and `PENDING` lookups of a flow neither holds (a new flow's two misses; minus the key)",
        "p_flows_miss",
        "p_key",
    ),
    case(
        "not on the fast path: an entry written into `PENDING` (LRU hash; a new flow writes 2; minus the key)",
        "p_pend_ins",
        "p_key",
    ),
    Case {
        moved: Moved::Creates,
        ..case(
            "not on the fast path: a flow opened (`flows::create`: both entries built and written into `PENDING`; minus the key)",
            "p_create",
            "p_key",
        )
    },
];

/// The same lookup with a different flow each run, on the big table.
const COLD: [Case; 6] = [
    case(
        "key only (cycling over every flow of the cycle)",
        "p_key_cyc",
        "p_key_cyc",
    ),
    case(
        "`FLOWS` lookup, hit, a different flow each run",
        "p_flows_cyc",
        "p_key_cyc",
    ),
    case(
        "key only (cycling over every mapping's counter slot, in a scattered order)",
        "p_key_slot_cyc",
        "p_key_slot_cyc",
    ),
    case(
        "`MAPPING_STATS` count, a different mapping's slot each run",
        "p_mapstats_cyc",
        "p_key_slot_cyc",
    ),
    case(
        "an entry written into `PENDING`, a different key each run",
        "p_pend_ins_cyc",
        "p_key_cyc",
    ),
    Case {
        moved: Moved::Creates,
        ..case(
            "a flow opened (`flows::create`), a different flow each run",
            "p_create_cyc",
            "p_key_cyc",
        )
    },
];

const LPM: [Case; 6] = [
    case("key only (same source)", "p_key_src", "p_key_src"),
    case("FW_SRC, 1 CIDR (0.0.0.0/0)", "p_lpm1", "p_key_src"),
    case(
        "FW_SRC, 65,536 CIDRs, same source",
        "p_lpm_src",
        "p_key_src",
    ),
    case("FW_SVC, 256 rules, same port", "p_lpm_svc", "p_key_src"),
    case(
        "key only (cycling source)",
        "p_key_src_cyc",
        "p_key_src_cyc",
    ),
    case(
        "FW_SRC, 65,536 CIDRs, each lookup another /24",
        "p_lpm_src_cyc",
        "p_key_src_cyc",
    ),
];

/// A counter of `bed` a part moves.
fn moved_count(bed: &mut Bed, m: Moved) -> anyhow::Result<u64> {
    Ok(match m {
        Moved::Nothing => 0,
        Moved::Stats => bed.counters()?.0[Reason::InboundForwarded as usize],
        Moved::Events => bed.counters()?.1[Event::FastPath as usize],
        Moved::Creates => bed.counters()?.1[Event::ConntrackCreate as usize],
        Moved::MappingStats => {
            bed.dp
                .counters(Mapping {
                    public: H0,
                    private: H1,
                })?
                .inbound_packets
        }
    })
}

/// Every case of `cases` once per repeat (interleaved); samples[case][repeat], ns per run.
fn measure(
    bed: &mut Bed,
    parts: &mut Ebpf,
    cases: &[Case],
    repeats: usize,
) -> anyhow::Result<Vec<Vec<f64>>> {
    let frame = bed.frame(H0, DPORT);
    let pub0 = bed.pub0;
    let mut samples = vec![Vec::new(); cases.len()];
    for _ in 0..repeats {
        for (i, c) in cases.iter().enumerate() {
            util::check_interrupted()?;
            let before = moved_count(bed, c.moved)?;
            let ns = run_prog(parts, c.prog, &frame, pub0).with_context(|| c.name)?;
            let moved = moved_count(bed, c.moved)? - before;
            ensure!(
                c.moved == Moved::Nothing || moved == u64::from(REPS),
                "{}: its counter moved by {moved} in {REPS} runs",
                c.name
            );
            samples[i].push(ns);
        }
    }
    Ok(samples)
}

/// Each case's table row and its net samples (minus its baseline, run by run).
fn table(cases: &[Case], samples: &[Vec<f64>]) -> (Table, Vec<Vec<f64>>) {
    let mut t = Table::new(&["operation", "ns/run", "ns/operation (minus its baseline)"]);
    let mut nets = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let base = cases.iter().position(|b| b.prog == c.base).unwrap_or(i);
        let net: Vec<f64> = if base == i {
            Vec::new()
        } else {
            samples[i]
                .iter()
                .zip(&samples[base])
                .map(|(a, b)| a - b)
                .collect()
        };
        t.row(vec![
            c.name.to_string(),
            show(Summary::of(&samples[i]), 1),
            if base == i {
                "(baseline)".into()
            } else {
                show(Summary::of(&net), 1)
            },
        ]);
        nets.push(net);
    }
    (t, nets)
}

/// The net samples of the case running `prog`.
fn net<'a>(cases: &[Case], nets: &'a [Vec<f64>], prog: &str) -> &'a [f64] {
    cases
        .iter()
        .position(|c| c.prog == prog)
        .and_then(|i| nets.get(i))
        .map_or(&[], Vec::as_slice)
}

/// What section 1's cold target leaves for a cache-cold flow, beside the memory floor: at
/// most 1.5x the 1-mapping established path (`base`) is half of it beyond the hot path, per
/// run; `floor` is one cache-cold read (the runs independent: the cheapest such a read was
/// measured, the CPU overlapping successive runs' reads) in a map of `FLOWS`'s
/// footprint at `flows` mappings; the two are paired repeat by repeat.
fn cold_allowance(base: &[f64], floor: &[f64], flows: u32) -> Option<String> {
    let allowance: Vec<f64> = base.iter().map(|b| 0.5 * b).collect();
    let r = util::ratios(floor, &allowance);
    let least = r.iter().copied().reduce(f64::min)?;
    let most = r.iter().copied().reduce(f64::max)?;
    let verdict = if least > 1.0 {
        "more than the whole allowance in every run, so no flow table that reads a \
         cache-cold entry per packet can meet that target on this machine"
    } else if most <= 1.0 {
        "within the allowance in every run"
    } else {
        "within the allowance in some runs only"
    };
    Some(format!(
        "- Section 1's target at {flows} mappings, cache-cold (at most 1.5x the 1-mapping \
         established path, {} ns/packet), leaves {} ns per packet for all that a cache-cold \
         flow costs beyond a hot one (half that path, run by run). One cache-cold read in a \
         map of the same footprint (the floor above with the runs independent, the cheapest a \
         cache-cold read was measured: the CPU overlaps successive runs' reads) costs {} \
         times that allowance (median (min–max) of the per-repeat ratios): {verdict}.",
        show(Summary::of(base), 1),
        show(Summary::of(&allowance), 1),
        show(Summary::of(&r), 2),
    ))
}

/// What section 1's new-flow target leaves beside the work issue 9's design gives a new
/// flow, all measured alone and hot, run by run: its route resolved (`fib`: `bpf_fib_lookup`
/// and the egress interface's role) and an entry per direction written into an LRU hash
/// (`insert`: one `PENDING` insert, counted twice), against `limit` ns per packet.
fn new_flow_floor(fib: &[f64], insert: &[f64], limit: f64) -> Option<String> {
    let sum: Vec<f64> = fib.iter().zip(insert).map(|(f, i)| f + 2.0 * i).collect();
    let r: Vec<f64> = sum.iter().map(|s| s / limit).collect();
    let least = r.iter().copied().reduce(f64::min)?;
    let most = r.iter().copied().reduce(f64::max)?;
    let verdict = if least > 1.0 {
        "more than the whole target in every run, so no flow table that resolves each new \
         flow's route with `bpf_fib_lookup()` and writes an entry per direction into the \
         kernel's LRU hash can meet that target on this machine"
    } else if most <= 1.0 {
        "within the target in every run"
    } else {
        "within the target in some runs only"
    };
    Some(format!(
        "- A new flow's own work in issue 9's design, each part measured alone and hot: its \
         route resolved on its first packet ({} ns) and an entry per direction written into \
         an LRU hash (two `PENDING` inserts, {} ns each) add up to {} ns per flow, run by run, \
         before its parse, its firewall lookups, the lookups that find it new and the \
         test-run loop: {} times section 1's new-flow target of {limit:.0} ns/packet \
         (median (min–max) of the per-repeat ratios): {verdict}.",
        show(Summary::of(fib), 1),
        show(Summary::of(insert), 1),
        show(Summary::of(&sum), 1),
        show(Summary::of(&r), 2),
    ))
}

fn bars(cases: &[Case], nets: &[Vec<f64>]) -> Vec<(String, Summary)> {
    cases
        .iter()
        .zip(nets)
        .filter_map(|(c, n)| Summary::of(n).map(|s| (c.name.to_string(), s)))
        .collect()
}

/// Section 1b on `hot` (the '1 mapping, 256 rules' bed: the LPM tries and the hot flow) and
/// `big` (the cold `FLOWS` lookups); `whole` is the established path minus the empty program
/// measured in section 1 on `hot`, and `base` the 1-mapping established path (test-run loop
/// included: the base of section 1's 1.5x targets), run by run.
pub fn section(
    hot: &mut Bed,
    big: &mut Bed,
    whole: &[f64],
    base: &[f64],
    plan: &Plan,
) -> anyhow::Result<Section> {
    let mut parts = load_parts(hot)?;
    let lpm_samples = measure(hot, &mut parts, &LPM, plan.repeats)?;
    let part_samples = measure(hot, &mut parts, &PARTS, plan.repeats)?;
    drop(parts);
    let mut cold_parts = load_parts(big)?;
    // The floor's maps hold as many entries as `FLOWS` does (two per flow); the cold rows
    // and the floor's are interleaved, repeat by repeat.
    let mut floor = floor::Floor::load(2 * big.chain).context("loading the memory floor")?;
    let cold_cases: Vec<Case> = COLD.iter().chain(&floor::FLOOR).copied().collect();
    let mut cold_samples = vec![Vec::new(); cold_cases.len()];
    for _ in 0..plan.repeats {
        let mut s = measure(big, &mut cold_parts, &COLD, 1)?;
        s.extend(measure(big, &mut floor.ebpf, &floor::FLOOR, 1)?);
        for (all, one) in cold_samples.iter_mut().zip(s) {
            all.extend(one);
        }
    }
    let (lpm_t, lpm_nets) = table(&LPM, &lpm_samples);
    let (parts_t, part_nets) = table(&PARTS, &part_samples);
    let (cold_t, cold_nets) = table(&cold_cases, &cold_samples);
    let flows_cold = net(&cold_cases, &cold_nets, "p_flows_cyc");
    let floor_summary = floor.summary(&cold_nets[COLD.len()..], flows_cold)?;
    drop(floor);
    // The fast path's parts, added up run by run.
    let sum: Vec<f64> = (0..plan.repeats)
        .map(|r| {
            PARTS
                .iter()
                .zip(&part_nets)
                .filter(|(c, _)| c.fast_path > 0)
                .map(|(c, n)| f64::from(c.fast_path) * n.get(r).copied().unwrap_or(0.0))
                .sum()
        })
        .collect();
    let fast: Vec<(String, Summary)> = PARTS
        .iter()
        .zip(&part_nets)
        .filter(|(c, _)| c.fast_path > 0)
        .filter_map(|(c, n)| Summary::of(n).map(|s| (c.name.to_string(), s)))
        .collect();
    let mut summary = vec![
        format!(
            "- Firewall LPM lookups, ns per lookup with the key's cost subtracted, median \
             (min–max) over the runs: {}.",
            bars(&LPM, &lpm_nets)
                .iter()
                .map(|(name, s)| format!("{name} {}", s.show(0)))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        costliest(&fast),
        format!(
            "- The fast path's parts measured alone add up to {} ns per packet (each counted \
             as often as a packet makes it); the whole path measured in section 1 on the same \
             table costs {} ns beyond the empty program.",
            show(Summary::of(&sum), 1),
            show(Summary::of(whole), 1)
        ),
        format!(
            "- A `FLOWS` hit costs {} ns when the same flow is looked up every run and {} ns \
             when every run looks up another of {} flows (cache-cold); counting on the \
             mapping's `MAPPING_STATS` slot costs {} ns hot and {} ns when every run counts on \
             another mapping's.",
            show(Summary::of(net(&PARTS, &part_nets, "p_flows")), 1),
            show(Summary::of(flows_cold), 1),
            big.chain,
            show(Summary::of(net(&PARTS, &part_nets, "p_mapstats")), 1),
            show(Summary::of(net(&COLD, &cold_nets, "p_mapstats_cyc")), 1),
        ),
    ];
    summary.extend(floor_summary);
    summary.extend(cold_allowance(
        base,
        net(&cold_cases, &cold_nets, "f_arr_elem"),
        big.chain,
    ));
    summary.extend(new_flow_floor(
        net(&PARTS, &part_nets, "p_fib"),
        net(&PARTS, &part_nets, "p_pend_ins"),
        crate::testrun::report::NEW_FLOW_LIMIT_NS,
    ));
    let mut all_bars = bars(&PARTS, &part_nets);
    all_bars.extend(bars(&cold_cases, &cold_nets));
    Ok(Section {
        title:
            "1b. Where the time goes: the established path's parts, and the firewall's LPM lookups"
                .into(),
        intro: format!(
            "One operation per run of a small XDP program (`bench-parts`), {REPS} repetitions \
             per run, median (min–max) over {} interleaved repeats; the baseline named in each \
             row (producing the key, or reading the rewrite's entry) is subtracted run by run. \
             The programs call the XDP program's own code (its parse, flows, rewrite, stats \
             and forward modules compiled in unchanged) on the loaded program's own maps (the \
             '1 mapping, 256 rules' setting above, with its seeded flows; the cold `FLOWS` \
             lookups on the {} mappings setting). Every run must succeed: each lookup hit, the \
             route found, the redirect target present (counted by the program), and each \
             counter part must have moved its counter once per run; a measurement that missed \
             is refused. The firewall tries are as natd's compile step filled them with 256 UDP \
             rules on each of two public IPs (rule r: port 10000+r from 16.r.j.0/24, j = \
             0..255: 65,536 CIDRs per public IP, 131,072 `FW_SRC` entries in all), next to a \
             one-entry trie; a packet that opens a flow costs one `FW_SRC` plus (if that finds \
             a rule) one `FW_SVC` lookup, packets of tracked flows none. The cache-cold \
             table ends with the memory floor, measured by programs of its own (`bench-floor`) \
             on maps of their own holding {} entries each (as many as `FLOWS` holds: two per \
             flow): each run takes a pseudo-random index (a counter through splitmix64's \
             finaliser) and reads one word of that value of an array, or looks up the \
             flow-like key made from it in an LRU hash (preallocated, as `FLOWS`; filled in key \
             order, so the random keys read memory at random) and reads the words a fast path \
             reads. The array reads are measured twice: with each run's index waiting for the \
             last run's read (one access's latency: the floor), and with the runs independent, \
             as every other row is (the CPU may then overlap one run's memory accesses with \
             the next runs').",
            plan.repeats,
            big.chain,
            2 * big.chain
        ),
        tables: vec![
            ("Firewall LPM lookups:".into(), lpm_t),
            (
                "The established (fast) path's operations, each measured alone:".into(),
                parts_t,
            ),
            (
                "Cache-cold (a different flow each run, over every flow of the big table):".into(),
                cold_t,
            ),
        ],
        notes: summary.join("\n") + "\n",
        summary,
        charts: vec![
            Chart {
                file: "lpm.svg".into(),
                title: "Firewall LPM lookup cost".into(),
                unit: "ns per lookup (minus key production)".into(),
                bars: bars(&LPM, &lpm_nets),
            },
            Chart {
                file: "breakdown.svg".into(),
                title: "Operations of the established path, each alone".into(),
                unit: "ns per operation (minus its baseline)".into(),
                bars: all_bars,
            },
        ],
    })
}

/// "The costliest operation measured alone: NAME, X ns (min–max), of the N measured."
fn costliest(parts: &[(String, Summary)]) -> String {
    match parts
        .iter()
        .max_by(|a, b| a.1.median.total_cmp(&b.1.median))
    {
        Some((name, s)) => format!(
            "- The costliest of the {} operations of the established path, each measured \
             alone: {name}, {} ns (median (min–max)).",
            parts.len(),
            s.show(0)
        ),
        None => "- No operation of the established path was measured.".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[f64]) -> Summary {
        Summary::of(v).unwrap()
    }

    #[test]
    fn costliest_follows_the_numbers() {
        let parts = vec![
            ("a".to_string(), s(&[10.0])),
            ("fib".to_string(), s(&[100.0, 120.0])),
        ];
        assert!(costliest(&parts).contains("of the 2 operations"));
        assert!(costliest(&parts).contains("fib, 110 (100–120) ns"));
    }

    #[test]
    fn cold_allowance_follows_the_numbers() {
        // Base 80 and 100 ns: allowances 40 and 50; floors 60 and 75: 1.5x each.
        let line = cold_allowance(&[80.0, 100.0], &[60.0, 75.0], 1000).unwrap();
        assert!(line.contains("leaves 45.0 (40.0–50.0) ns"), "{line}");
        assert!(line.contains("costs 1.50 (1.50–1.50) times"), "{line}");
        assert!(
            line.contains("more than the whole allowance in every run"),
            "{line}"
        );
        let line = cold_allowance(&[80.0, 100.0], &[30.0, 75.0], 1000).unwrap();
        assert!(line.contains("in some runs only"), "{line}");
        let line = cold_allowance(&[80.0, 100.0], &[30.0, 40.0], 1000).unwrap();
        assert!(line.contains("within the allowance in every run"), "{line}");
        assert_eq!(cold_allowance(&[], &[], 1000), None);
    }

    #[test]
    fn new_flow_floor_follows_the_numbers() {
        // Route 100 and 140 ns, inserts 80 and 100 ns: 260 and 340 ns, 0.87x and 1.13x of 300.
        let line = new_flow_floor(&[100.0, 140.0], &[80.0, 100.0], 300.0).unwrap();
        assert!(line.contains("add up to 300.0 (260.0–340.0) ns"), "{line}");
        assert!(line.contains("in some runs only"), "{line}");
        let line = new_flow_floor(&[150.0, 140.0], &[80.0, 100.0], 300.0).unwrap();
        assert!(
            line.contains("more than the whole target in every run"),
            "{line}"
        );
        let line = new_flow_floor(&[50.0, 40.0], &[80.0, 100.0], 300.0).unwrap();
        assert!(line.contains("within the target in every run"), "{line}");
        assert_eq!(new_flow_floor(&[], &[], 300.0), None);
    }

    #[test]
    fn every_case_has_its_baseline_in_its_table() {
        for cases in [&PARTS[..], &COLD[..], &LPM[..], &floor::FLOOR[..]] {
            for c in cases {
                assert!(cases.iter().any(|b| b.prog == c.base), "{}", c.name);
            }
        }
    }
}
