//! Map operations in isolation (section 5: per-CPU mapping values carrying their counters vs
//! a plain hash plus per-CPU counters) and the firewall's LPM lookups (issue 3), each as a raw
//! XDP program doing one operation per run, timed with `BPF_PROG_TEST_RUN`.
use anyhow::{Context as _, ensure};
use nat_common::{
    MAP_CONFIG, MAP_CONNTRACK, MAP_DEVMAP, MAP_FW_SRC, MAP_FW_SVC, MAP_IFACES, MAP_NAT_IN,
    MAP_STATS,
};

use crate::{
    bpf::{
        asm::XDP_PASS,
        progs::{self, KeySource, Op},
        sys::{self, F_NO_PREALLOC, MAP_ARRAY, MAP_HASH, MAP_PERCPU_ARRAY, MAP_PERCPU_HASH, Map},
    },
    report::{Chart, Section, Table},
    testrun::{
        Plan,
        setup::{Bed, DPORT, H0, H1, SRC},
    },
    util::{self, Summary, show},
};

/// Repetitions per run: these programs do not modify the frame, so one call can repeat freely.
const REPS: u32 = 1_000_000;

/// The hit counter of the [`progs::map_op`] programs: an array of one u64.
struct Hits(Map);

impl Hits {
    fn new() -> anyhow::Result<Self> {
        Ok(Self(Map::create("bench_hits", MAP_ARRAY, 4, 8, 1, 0)?))
    }

    fn fd(&self) -> i32 {
        self.0.raw()
    }

    /// The count so far, reset to 0.
    fn take(&self) -> anyhow::Result<u64> {
        let mut v = [0u8; 8];
        self.0.lookup(&0u32.to_ne_bytes(), &mut v)?;
        self.0.update(&0u32.to_ne_bytes(), &[0u8; 8])?;
        Ok(u64::from_ne_bytes(v))
    }
}

/// Runs `insns` (a [`progs::map_op`] program counting into `hits`) [`REPS`] times; ns per
/// run from the kernel's timer. Fails unless every run's operation hit: a lookup that missed
/// is cheaper and would pass for a fast one.
fn run_prog(insns: &[crate::bpf::asm::Insn], name: &str, hits: &Hits) -> anyhow::Result<f64> {
    let prog = sys::Prog::load_xdp(name, insns)?;
    let frame = [0u8; 60];
    hits.take()?;
    let r = sys::test_run(prog.raw(), &frame, 0, REPS, None)?;
    let hit = hits.take()?;
    ensure!(
        hit == u64::from(REPS) && r.retval == XDP_PASS as u32,
        "{name}: the operation succeeded in {hit} of {REPS} runs (the last returned {}): a \
         lookup missed, so its time is not that of a hit",
        r.retval
    );
    Ok(f64::from(r.duration_ns))
}

/// `memlock` of a map fd as /proc reports it (bytes the map accounts for).
fn memlock(fd: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

fn counter_map() -> anyhow::Result<Map> {
    Map::create("bench_ctr", MAP_ARRAY, 4, 8, 1, 0)
}

/// Variant maps with `n` entries, keys 0..n.
struct Variants {
    percpu: Map,
    hash: Map,
    counters: Map,
    atomic: Map,
    /// Transient ENOMEM answers while filling (retried).
    retries: u64,
}

impl Variants {
    fn new(n: u32) -> anyhow::Result<Self> {
        let cpus = sys::possible_cpus()?;
        let percpu = Map::create("bench_pcpu", MAP_PERCPU_HASH, 4, 32, n, F_NO_PREALLOC)?;
        let hash = Map::create("bench_hash", MAP_HASH, 4, 8, n, F_NO_PREALLOC)?;
        let counters = Map::create("bench_cnt", MAP_PERCPU_ARRAY, 4, 16, n, 0)?;
        let atomic = Map::create("bench_atom", MAP_HASH, 4, 32, n, F_NO_PREALLOC)?;
        let pv = vec![0u8; 32 * cpus];
        let mut retries = 0;
        for i in 0..n {
            let k = i.to_ne_bytes();
            retries += percpu.update_retry(&k, &pv)?;
            let mut v = [0u8; 8];
            v[4..].copy_from_slice(&i.to_ne_bytes());
            retries += hash.update_retry(&k, &v)?;
            retries += atomic.update_retry(&k, &[0u8; 32])?;
            if i % 65_536 == 0 {
                util::check_interrupted()?;
            }
        }
        Ok(Self {
            percpu,
            hash,
            counters,
            atomic,
            retries,
        })
    }

    fn ops(&self) -> [(&'static str, Op); 4] {
        [
            ("key only", Op::KeyOnly),
            (
                "per-CPU hash, counters in the value (project)",
                Op::PerCpuValue {
                    map: self.percpu.raw(),
                },
            ),
            (
                "hash + per-CPU array of counters",
                Op::HashThenPerCpuArray {
                    hash: self.hash.raw(),
                    counters: self.counters.raw(),
                },
            ),
            (
                "hash, atomic counters in the value",
                Op::HashAtomic {
                    map: self.atomic.raw(),
                },
            ),
        ]
    }
}

/// Section 5.
pub fn section(quick: bool) -> anyhow::Result<Section> {
    let plan = Plan::new(quick);
    let sizes = [1u32, 10_000, plan.big];
    let ctr = counter_map()?;
    let hits = Hits::new()?;
    let mut t = Table::new(&[
        "entries",
        "key",
        "variant",
        "ns/op (minus key only)",
        "ratio to project layout",
        "memory (memlock)",
    ]);
    let mut bars = Vec::new();
    let mut retries = 0;
    // At the largest size, for the verdict: per key kind, each layout's time per run over
    // the project's (paired runs), and each layout's memory.
    let mut big = Big::default();
    for n in sizes {
        eprintln!("bench: map ops: {n} entries");
        let v = Variants::new(n)?;
        retries += v.retries;
        let keys = [
            ("same key", KeySource::Hot(0)),
            (
                "next key each run",
                KeySource::Cycle {
                    map: ctr.raw(),
                    base: 0,
                    n,
                    shift: 0,
                },
            ),
        ];
        let progs: Vec<Vec<Vec<crate::bpf::asm::Insn>>> = keys
            .iter()
            .map(|(_, k)| {
                v.ops()
                    .iter()
                    .map(|(_, op)| progs::map_op(*k, *op, hits.fd()))
                    .collect()
            })
            .collect();
        // samples[key][op]
        let mut samples = vec![vec![Vec::new(); 4]; keys.len()];
        for _ in 0..plan.repeats {
            for (ki, per_op) in progs.iter().enumerate() {
                for (oi, p) in per_op.iter().enumerate() {
                    util::check_interrupted()?;
                    samples[ki][oi].push(run_prog(p, "bench_mapop", &hits)?);
                }
            }
        }
        let mem = [
            None,
            memlock(v.percpu.raw()),
            memlock(v.hash.raw())
                .zip(memlock(v.counters.raw()))
                .map(|(a, b)| a + b),
            memlock(v.atomic.raw()),
        ];
        for (ki, (kname, _)) in keys.iter().enumerate() {
            let base = &samples[ki][0];
            let net: Vec<Vec<f64>> = samples[ki]
                .iter()
                .map(|s| s.iter().zip(base).map(|(a, b)| a - b).collect())
                .collect();
            if n == plan.big {
                big.ratios[ki] = (0..4)
                    .map(|oi| net[oi].iter().zip(&net[1]).map(|(a, b)| a / b).collect())
                    .collect();
                big.mem = mem;
            }
            for (oi, (oname, _)) in v.ops().iter().enumerate() {
                let (cell, ratio) = if oi == 0 {
                    (
                        show(Summary::of(&samples[ki][0]), 1) + " (absolute)",
                        String::new(),
                    )
                } else {
                    let r: Vec<f64> = net[oi].iter().zip(&net[1]).map(|(a, b)| a / b).collect();
                    (
                        show(Summary::of(&net[oi]), 1),
                        if oi == 1 {
                            "1".into()
                        } else {
                            show(Summary::of(&r), 2)
                        },
                    )
                };
                let m = mem[oi].map_or(String::new(), |b| {
                    format!("{:.1} MiB", b as f64 / 1048576.0)
                });
                t.row(vec![
                    n.to_string(),
                    kname.to_string(),
                    oname.to_string(),
                    cell,
                    ratio,
                    if ki == 0 { m } else { String::new() },
                ]);
                if oi > 0
                    && let Some(s) = Summary::of(&net[oi])
                {
                    bars.push((format!("{n} · {} · {}", short_key(ki), short_op(oi)), s));
                }
            }
        }
    }
    Ok(Section {
        title: "5. Mapping values: per-CPU with counters vs plain hash plus counters".into(),
        intro: format!(
            "The program cannot be rebuilt here in a second layout without the project's eBPF \
             crate, so the map operations themselves are measured: raw XDP programs that each \
             do one lookup of a u32 key and count one 60-byte packet, timed by \
             `BPF_PROG_TEST_RUN` ({REPS} repetitions per run, median (min–max) over {} \
             interleaved repeats). Maps are created like the project's (`BPF_F_NO_PREALLOC` \
             hashes). 'Next key each run' walks all entries in turn (a one-entry array counter \
             picks the key), so lookups miss the caches as traffic spread over many mappings \
             would; the cost of producing the key ('key only') is subtracted. Memory is the \
             kernel's `memlock` accounting of the maps at that size on this {}-CPU machine \
             (per-CPU values scale with the CPU count). Each run is on one CPU, so what several \
             CPUs updating the same mapping cost is not measured.",
            plan.repeats,
            sys::possible_cpus().unwrap_or(0)
        ),
        tables: vec![(String::new(), t)],
        notes: verdict(&big, plan.big).join("\n")
            + &format!(
                "\n- Filling these maps from userspace met {retries} transient ENOMEM answers \
                 (each retried until it succeeded).\n"
            ),
        summary: verdict(&big, plan.big),
        charts: vec![Chart {
            file: "mapops.svg".into(),
            title: "One mapping lookup + counter update, by layout".into(),
            unit: "ns per operation (minus key production)".into(),
            bars,
        }],
    })
}

/// What the verdict of section 5 is made from, at the largest size.
#[derive(Default)]
struct Big {
    /// [key kind][layout] -> per-run time over the project's (index 1 is the project).
    ratios: [Vec<Vec<f64>>; 2],
    /// memlock bytes per layout.
    mem: [Option<u64>; 4],
}

/// The layouts compared with the project's, by key kind, and which is faster in every run;
/// then their memory. Another layout wins only if it was faster in every cold-key run.
fn verdict(big: &Big, n: u32) -> Vec<String> {
    let mut out = Vec::new();
    for (ki, ratios) in big.ratios.iter().enumerate() {
        for oi in [2, 3] {
            if let Some(r) = ratios.get(oi) {
                out.push(crate::verdict::compare(
                    &format!("{n} entries, {}: '{}'", short_key(ki), short_op(oi)),
                    "the project's per-CPU value",
                    "time",
                    r,
                ));
            }
        }
    }
    let cold = &big.ratios[1];
    let winners: Vec<&str> = [2, 3]
        .into_iter()
        .filter(|oi| {
            cold.get(*oi)
                .is_some_and(|r| !r.is_empty() && r.iter().all(|x| *x < 1.0))
        })
        .map(short_op)
        .collect();
    out.push(if winners.is_empty() {
        format!(
            "- Verdict: no layout was faster than the project's in every run with {n} entries \
             and cycling keys; the project's layout stays."
        )
    } else {
        format!(
            "- Verdict: faster than the project's layout in every run with {n} entries and \
             cycling keys: {}.",
            winners.join(", ")
        )
    });
    let mib = |b: Option<u64>| {
        b.map_or("n/a".to_string(), |b| {
            format!("{:.1} MiB", b as f64 / 1048576.0)
        })
    };
    out.push(format!(
        "- Memory at {n} entries (memlock): per-CPU value {}, hash + per-CPU array {}, hash \
         with atomics {}.",
        mib(big.mem[1]),
        mib(big.mem[2]),
        mib(big.mem[3])
    ));
    out
}

fn short_key(ki: usize) -> &'static str {
    if ki == 0 { "same key" } else { "cycling keys" }
}

fn short_op(oi: usize) -> &'static str {
    [
        "key only",
        "per-CPU value",
        "hash+per-CPU array",
        "hash+atomics",
    ][oi]
}

/// Issue 3's figure (one lookup in the firewall tries as natd filled them with 256 rules and
/// 65,536 CIDRs per public IP, next to a one-entry trie) and the cost of each helper and map
/// operation the established path makes, in the same loaded program's maps.
pub fn breakdown_section(bed: &mut Bed, plan: &Plan) -> anyhow::Result<Section> {
    let src_trie = bed.map_fd(MAP_FW_SRC)?;
    let svc_trie = bed.map_fd(MAP_FW_SVC)?;
    let ctr = counter_map()?;
    let hits = Hits::new()?;
    let public = u32::from_ne_bytes(H0.octets());
    let src = u32::from_ne_bytes(SRC.octets());
    // A trie with one entry: (H0, 0.0.0.0/0).
    let small = Map::create("bench_lpm1", 11, 12, 32, 16, F_NO_PREALLOC)?;
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&32u32.to_ne_bytes());
    k[4..8].copy_from_slice(&H0.octets());
    small.update(&k, &[0xffu8; 32])?;
    let key4 = |v: u32| {
        let mut k = [0u8; 16];
        k[..4].copy_from_slice(&v.to_ne_bytes());
        k
    };
    let lookup = |map: i32, key: [u8; 16]| Op::Lookup { map, key };
    let cycle = KeySource::Cycle {
        map: ctr.raw(),
        base: src,
        n: 65_536,
        shift: 8,
    };
    let hot = KeySource::Hot(src);
    let lpm: Vec<(&str, KeySource, Op)> = vec![
        ("key only (same source)", hot, Op::KeyOnly),
        (
            "FW_SRC, 1 CIDR (0.0.0.0/0)",
            hot,
            Op::LpmSrc {
                map: small.raw(),
                public,
            },
        ),
        (
            "FW_SRC, 65,536 CIDRs, same source",
            hot,
            Op::LpmSrc {
                map: src_trie,
                public,
            },
        ),
        (
            "FW_SVC, 256 rules, same port",
            KeySource::Hot(u32::from(DPORT)),
            Op::LpmSvc {
                map: svc_trie,
                public,
            },
        ),
        ("key only (cycling source)", cycle, Op::KeyOnly),
        (
            "FW_SRC, 65,536 CIDRs, each lookup another /24",
            cycle,
            Op::LpmSrc {
                map: src_trie,
                public,
            },
        ),
    ];
    let parts: Vec<(&str, KeySource, Op)> = vec![
        ("key only", hot, Op::KeyOnly),
        (
            "IFACES lookup (hash, ingress role)",
            hot,
            lookup(bed.map_fd(MAP_IFACES)?, key4(bed.pub0.0)),
        ),
        (
            "NAT_IN lookup (per-CPU hash)",
            hot,
            lookup(bed.map_fd(MAP_NAT_IN)?, key4(public)),
        ),
        (
            "CONFIG lookup (array; the path makes 1-2)",
            hot,
            lookup(bed.map_fd(MAP_CONFIG)?, key4(0)),
        ),
        ("bpf_ktime_get_ns()", hot, Op::Ktime),
        (
            "CONNTRACK lookup (LRU hash, hit)",
            hot,
            lookup(bed.map_fd(MAP_CONNTRACK)?, bed.hot_flow_key()),
        ),
        (
            "EVENTS / STATS slot (per-CPU array)",
            hot,
            lookup(bed.map_fd(MAP_STATS)?, key4(0)),
        ),
        (
            "bpf_fib_lookup() of the translated packet",
            hot,
            Op::Fib {
                ifindex: bed.pub0.0,
                src,
                dst: u32::from_ne_bytes(H1.octets()),
            },
        ),
        (
            "IFACES lookup (hash, egress role)",
            hot,
            lookup(bed.map_fd(MAP_IFACES)?, key4(bed.gst0)),
        ),
        (
            "bpf_redirect_map() (DEVMAP hash)",
            hot,
            Op::Redirect {
                devmap: bed.map_fd(MAP_DEVMAP)?,
                ifindex: bed.gst0,
            },
        ),
    ];
    let measure = |cases: &[(&str, KeySource, Op)]| -> anyhow::Result<Vec<Vec<f64>>> {
        let progs: Vec<_> = cases
            .iter()
            .map(|(_, k, o)| progs::map_op(*k, *o, hits.fd()))
            .collect();
        let mut samples = vec![Vec::new(); cases.len()];
        for _ in 0..plan.repeats {
            for (i, p) in progs.iter().enumerate() {
                util::check_interrupted()?;
                samples[i].push(
                    run_prog(p, "bench_part", &hits).with_context(|| cases[i].0.to_string())?,
                );
            }
        }
        Ok(samples)
    };
    let table = |cases: &[(&str, KeySource, Op)],
                 samples: &[Vec<f64>],
                 bars: &mut Vec<(String, Summary)>| {
        let mut t = Table::new(&["operation", "ns/run", "ns/operation (minus key only)"]);
        let mut base = &samples[0];
        for (i, (name, _, op)) in cases.iter().enumerate() {
            if matches!(op, Op::KeyOnly) {
                base = &samples[i];
                t.row(vec![
                    name.to_string(),
                    show(Summary::of(&samples[i]), 1),
                    String::new(),
                ]);
                continue;
            }
            let net: Vec<f64> = samples[i].iter().zip(base).map(|(a, b)| a - b).collect();
            t.row(vec![
                name.to_string(),
                show(Summary::of(&samples[i]), 1),
                show(Summary::of(&net), 1),
            ]);
            if let Some(s) = Summary::of(&net) {
                bars.push((name.to_string(), s));
            }
        }
        t
    };
    let (mut lpm_bars, mut part_bars) = (Vec::new(), Vec::new());
    let lpm_samples = measure(&lpm)?;
    let parts_samples = measure(&parts)?;
    let lpm_t = table(&lpm, &lpm_samples, &mut lpm_bars);
    let parts_t = table(&parts, &parts_samples, &mut part_bars);
    let summary = vec![
        format!(
            "- Firewall LPM lookups, ns per lookup with the key's cost subtracted, median \
             (min–max) over the runs: {}.",
            lpm_bars
                .iter()
                .map(|(name, s)| format!("{name} {}", s.show(0)))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        costliest(&part_bars),
    ];
    Ok(Section {
        title: "1b. Where the time goes: firewall LPM lookups (issue 3) and the established path's operations".into(),
        intro: format!(
            "One operation per run of a raw XDP program, in the loaded program's own maps \
             (the '1 mapping, 256 rules' setting above): `FW_SRC` / `FW_SVC` as natd's \
             compile step filled them with 256 UDP rules on each of two public IPs (rule r: \
             port 10000+r from 16.r.j.0/24, j = 0..255: 65,536 CIDRs per IP, 131,072 `FW_SRC` \
             entries in all), next to a one-entry trie; then each helper call and map lookup \
             the established inbound path makes. {REPS} repetitions per run, median (min–max) \
             over {} interleaved repeats; the cost of building the key is subtracted. A packet \
             that opens a flow costs one `FW_SRC` plus (if that finds a rule) one `FW_SVC` \
             lookup; packets of tracked flows skip both.",
            plan.repeats
        ),
        tables: vec![
            ("Firewall LPM lookups:".into(), lpm_t),
            ("Operations of the established inbound path (each measured alone):".into(), parts_t),
        ],
        notes: summary.join("\n") + "\n",
        summary,
        charts: vec![
            Chart {
                file: "lpm.svg".into(),
                title: "Firewall LPM lookup cost".into(),
                unit: "ns per lookup (minus key production)".into(),
                bars: lpm_bars,
            },
            Chart {
                file: "breakdown.svg".into(),
                title: "Operations of the established path, each alone".into(),
                unit: "ns per operation (minus key production)".into(),
                bars: part_bars,
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
    fn verdict_and_costliest_follow_the_numbers() {
        let mut big = Big::default();
        // Cycling keys: hash+per-CPU array faster in one run only, atomics in every run.
        big.ratios[1] = vec![vec![], vec![1.0, 1.0], vec![0.9, 1.1], vec![0.8, 0.9]];
        big.mem = [None, Some(1 << 20), None, Some(3 << 20)];
        let v = verdict(&big, 100);
        assert!(
            v.iter()
                .any(|l| l.contains("'hash+per-CPU array': no clear difference"))
        );
        assert!(
            v.iter()
                .any(|l| l.contains("'hash+atomics': less time than"))
        );
        assert!(
            v.iter()
                .any(|l| l.contains("every run with 100 entries and cycling keys: hash+atomics."))
        );
        assert!(v.iter().any(|l| l.contains(
            "per-CPU value 1.0 MiB, hash + per-CPU array n/a, hash with atomics 3.0 MiB"
        )));
        big.ratios[1][3] = vec![0.8, 1.2];
        assert!(
            verdict(&big, 100)
                .iter()
                .any(|l| l.contains("no layout was faster"))
        );
        let parts = vec![
            ("a".to_string(), s(&[10.0])),
            ("fib".to_string(), s(&[100.0, 120.0])),
        ];
        assert!(costliest(&parts).contains("of the 2 operations"));
        assert!(costliest(&parts).contains("fib, 110 (100–120) ns"));
    }
}

#[cfg(test)]
mod root_tests {
    use super::*;

    /// The variants' lookups hit, and a program whose lookups miss is refused. Needs root
    /// (BPF maps and programs), as `cargo xtask test` runs it; fails saying so without.
    #[test]
    fn variant_lookups_hit_and_misses_are_refused() {
        // SAFETY: plain syscall without arguments.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "needs root (BPF maps and programs)");
        let v = Variants::new(4).unwrap();
        let hits = Hits::new().unwrap();
        for key in [KeySource::Hot(0), KeySource::Hot(3)] {
            let p = progs::map_op(
                key,
                Op::HashAtomic {
                    map: v.atomic.raw(),
                },
                hits.fd(),
            );
            run_prog(&p, "t", &hits).unwrap();
        }
        // A key that is not in the map: every lookup misses, and the run is refused.
        let p = progs::map_op(
            KeySource::Hot(4),
            Op::HashAtomic {
                map: v.atomic.raw(),
            },
            hits.fd(),
        );
        let e = run_prog(&p, "t", &hits).unwrap_err();
        assert!(format!("{e:#}").contains("succeeded in 0 of"), "{e:#}");
        for k in [0u32, 3] {
            let mut val = [0u8; 32];
            v.atomic.lookup(&k.to_ne_bytes(), &mut val).unwrap();
            let packets = u64::from_ne_bytes(val[8..16].try_into().unwrap());
            assert_eq!(packets, u64::from(REPS), "key {k}");
        }
    }
}
