//! Map operations in isolation (section 5): a mapping's counters in a per-CPU array indexed
//! by a slot (the project's layout: the slot comes from the mapping's hash value or, on the
//! fast path, from the flow entry) against a per-CPU hash whose value carries them and a plain
//! hash updated atomically. Each measured by a small XDP program of `bench-ebpf`
//! (`bench-mapops`) doing one lookup and one count per run, timed with `BPF_PROG_TEST_RUN`.
//! Beside them, the flow table's kind: a flow-sized entry looked up in an LRU hash
//! (preallocated, as `FLOWS`) and in a hash that allocates entries as they are inserted.
use anyhow::{Context as _, ensure};
use aya::{
    Ebpf,
    maps::{Array, HashMap, PerCpuHashMap, PerCpuValues},
};

use crate::{
    bpf::{self, XDP_PASS},
    report::{Chart, Section, Table},
    testrun::{Plan, setup::is_enomem},
    util::{self, Summary, show},
};

/// Repetitions per run: these programs do not modify the frame, so one call can repeat freely.
pub const REPS: u32 = 1_000_000;

/// The count in `HITS` of `ebpf` (runs whose operation succeeded), reset to 0.
pub fn take_hits(ebpf: &mut Ebpf) -> anyhow::Result<u64> {
    let mut hits: Array<_, u64> = ebpf.map_mut("HITS").context("no map HITS")?.try_into()?;
    let n = hits.get(&0, 0)?;
    hits.set(0, 0, 0)?;
    Ok(n)
}

/// Runs program `name` of `ebpf` [`REPS`] times on `frame` as if arriving on `ifindex`; ns
/// per run from the kernel's timer. Fails unless every run's operation succeeded (counted in
/// the object's `HITS`): a lookup that missed is cheaper and would pass for a fast one.
pub fn run_prog(ebpf: &mut Ebpf, name: &str, frame: &[u8], ifindex: u32) -> anyhow::Result<f64> {
    take_hits(ebpf)?;
    let r = bpf::test_run(bpf::xdp(ebpf, name)?, frame, ifindex, REPS)?;
    let hit = take_hits(ebpf)?;
    ensure!(
        hit == u64::from(REPS) && r.retval == XDP_PASS,
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

/// The programs' maps with `n` entries, keys 0..n.
struct Variants {
    ebpf: Ebpf,
    /// Transient ENOMEM answers while filling (retried).
    retries: u64,
}

/// `op` retried on transient ENOMEM (non-preallocated hashes refill their element cache
/// asynchronously); adds the retries to `retries`.
fn retry(
    retries: &mut u64,
    mut op: impl FnMut() -> Result<(), aya::maps::MapError>,
) -> anyhow::Result<()> {
    for _ in 0..1000 {
        match op() {
            Ok(()) => return Ok(()),
            Err(e) if is_enomem(&e) => {
                *retries += 1;
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("bpf_map_update_elem: ENOMEM 1000 times in a row")
}

/// The layouts, in table order: index 1 is the project's.
const OPS: [(&str, &str); 4] = [
    ("key only", "key"),
    ("hash + per-CPU array of counters by slot (project)", "hash"),
    ("per-CPU hash, counters in the value", "pcpu"),
    ("hash, atomic counters in the value", "atomic"),
];

impl Variants {
    fn new(n: u32) -> anyhow::Result<Self> {
        let cpus = bpf::possible_cpus()?;
        let mut ebpf = bpf::load(bpf::MAPOPS, |l| {
            for m in ["PCPU", "HASH", "CNT", "ATOM", "FLOW_HASH"] {
                l.map_max_entries(m, n);
            }
            // An LRU map may evict before it is full (per-CPU free lists): room to spare.
            l.map_max_entries("FLOW_LRU", n + n / 4 + 1024);
            l.override_global("CYCLE_N", &n, true);
        })?;
        let mut retries = 0;
        {
            let [pcpu, hash, atom] = ebpf.maps_disjoint_mut(["PCPU", "HASH", "ATOM"]);
            let mut pcpu: PerCpuHashMap<_, u32, [u64; 4]> =
                pcpu.context("no map PCPU")?.try_into()?;
            let mut hash: HashMap<_, u32, [u32; 2]> = hash.context("no map HASH")?.try_into()?;
            let mut atom: HashMap<_, u32, [u64; 4]> = atom.context("no map ATOM")?.try_into()?;
            for i in 0..n {
                retry(&mut retries, || {
                    let zeros = PerCpuValues::try_from(vec![[0u64; 4]; cpus])
                        .map_err(aya::maps::MapError::IoError)?;
                    pcpu.insert(i, zeros, 0)
                })?;
                retry(&mut retries, || hash.insert(i, [i, i], 0))?;
                retry(&mut retries, || atom.insert(i, [0u64; 4], 0))?;
                if i % 65_536 == 0 {
                    util::check_interrupted()?;
                }
            }
        }
        {
            // Flows inserted in a scattered order (a stride through the keys): entries are
            // laid out in insertion order, so inserting them in the order the cycling key
            // visits them would make the lookups read memory almost sequentially.
            let [lru, hash] = ebpf.maps_disjoint_mut(["FLOW_LRU", "FLOW_HASH"]);
            let mut lru: aya::maps::HashMap<_, [u32; 4], [u64; 13]> =
                lru.context("no map FLOW_LRU")?.try_into()?;
            let mut hash: HashMap<_, [u32; 4], [u64; 13]> =
                hash.context("no map FLOW_HASH")?.try_into()?;
            for j in 0..u64::from(n) {
                let i = (j * 7_919 % u64::from(n)) as u32;
                retry(&mut retries, || lru.insert([i, 1, 2, 3], [0u64; 13], 0))?;
                retry(&mut retries, || hash.insert([i, 1, 2, 3], [0u64; 13], 0))?;
                if j % 65_536 == 0 {
                    util::check_interrupted()?;
                }
            }
        }
        Ok(Self { ebpf, retries })
    }

    fn memlock(&self, map: &str) -> Option<u64> {
        bpf::map_fd(&self.ebpf, map).ok().and_then(memlock)
    }
}

/// The flow-table kinds, in table order: index 0 is the project's.
const FLOW_OPS: [(&str, &str); 2] = [
    ("LRU hash, preallocated (the kind of FLOWS)", "flru"),
    ("hash, BPF_F_NO_PREALLOC", "fhash"),
];

/// Section 5.
pub fn section(quick: bool) -> anyhow::Result<Section> {
    let plan = Plan::new(quick);
    let sizes = [1u32, 10_000, plan.big];
    let frame = [0u8; 60];
    let mut t = Table::new(&[
        "entries",
        "key",
        "variant",
        "ns/op (minus key only)",
        "ratio to project layout",
        "memory (memlock)",
    ]);
    let mut flows_t = Table::new(&[
        "entries",
        "key",
        "flow table",
        "ns/lookup (minus key only)",
        "ratio to LRU",
        "memory (memlock)",
    ]);
    let mut bars = Vec::new();
    let mut retries = 0;
    // At the largest size, for the verdict: per key kind, each layout's time per run over
    // the project's (paired runs), and each layout's memory.
    let mut big = Big::default();
    for n in sizes {
        eprintln!("bench: map ops: {n} entries");
        let mut v = Variants::new(n)?;
        retries += v.retries;
        let keys = [("same key", "hot"), ("next key each run", "cyc")];
        // samples[key][op], then the flow tables' flow_samples[key][kind]
        let mut samples = vec![vec![Vec::new(); OPS.len()]; keys.len()];
        let mut flow_samples = vec![vec![Vec::new(); FLOW_OPS.len()]; keys.len()];
        for _ in 0..plan.repeats {
            for (ki, (_, kp)) in keys.iter().enumerate() {
                for (oi, (_, op)) in OPS.iter().enumerate() {
                    util::check_interrupted()?;
                    let name = format!("{kp}_{op}");
                    samples[ki][oi].push(run_prog(&mut v.ebpf, &name, &frame, 0)?);
                }
                for (fi, (_, op)) in FLOW_OPS.iter().enumerate() {
                    util::check_interrupted()?;
                    let name = format!("{kp}_{op}");
                    flow_samples[ki][fi].push(run_prog(&mut v.ebpf, &name, &frame, 0)?);
                }
            }
        }
        let flow_mem = [v.memlock("FLOW_LRU"), v.memlock("FLOW_HASH")];
        for (ki, (kname, _)) in keys.iter().enumerate() {
            let base = &samples[ki][0];
            let net: Vec<Vec<f64>> = flow_samples[ki]
                .iter()
                .map(|s| s.iter().zip(base).map(|(a, b)| a - b).collect())
                .collect();
            for (fi, (fname, _)) in FLOW_OPS.iter().enumerate() {
                let r: Vec<f64> = net[fi].iter().zip(&net[0]).map(|(a, b)| a / b).collect();
                flows_t.row(vec![
                    n.to_string(),
                    kname.to_string(),
                    fname.to_string(),
                    show(Summary::of(&net[fi]), 1),
                    if fi == 0 {
                        "1".into()
                    } else {
                        show(Summary::of(&r), 2)
                    },
                    flow_mem[fi].map_or(String::new(), |b| {
                        format!("{:.1} MiB", b as f64 / 1048576.0)
                    }),
                ]);
                if n == plan.big && ki == 1 && fi == 1 {
                    big.flow_ratios = r;
                }
            }
        }
        let mem = [
            None,
            v.memlock("HASH").zip(v.memlock("CNT")).map(|(a, b)| a + b),
            v.memlock("PCPU"),
            v.memlock("ATOM"),
        ];
        for (ki, (kname, _)) in keys.iter().enumerate() {
            let base = &samples[ki][0];
            let net: Vec<Vec<f64>> = samples[ki]
                .iter()
                .map(|s| s.iter().zip(base).map(|(a, b)| a - b).collect())
                .collect();
            if n == plan.big {
                big.ratios[ki] = (0..OPS.len())
                    .map(|oi| net[oi].iter().zip(&net[1]).map(|(a, b)| a / b).collect())
                    .collect();
                big.mem = mem;
            }
            for (oi, (oname, _)) in OPS.iter().enumerate() {
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
        title: "5. Mapping counters: per-CPU array by slot vs per-CPU value vs atomics".into(),
        intro: format!(
            "One lookup of a u32 key and the count of one 60-byte packet per run, in three \
             layouts, each a small XDP program of the bench's own (`bench-ebpf`), timed by \
             `BPF_PROG_TEST_RUN` ({REPS} repetitions per run, median (min–max) over {} \
             interleaved repeats); a run counts only if every lookup hit. The project's \
             layout: the mapping's hash value names a counter slot in a per-CPU array \
             (`NAT_IN`/`NAT_OUT` -> `MAPPING_STATS`; on the fast path the flow entry carries \
             the slot, so only the array is touched). Hashes are created like the project's \
             (`BPF_F_NO_PREALLOC`). 'Next key each run' walks all entries in turn (a one-entry \
             array counter picks the key), so lookups miss the caches as traffic spread over \
             many mappings would; the cost of producing the key ('key only') is subtracted. \
             Memory is the kernel's `memlock` accounting of the maps at that size on this \
             {}-CPU machine (per-CPU values scale with the CPU count). Each run is on one CPU, \
             so what several CPUs updating the same mapping cost is not measured.",
            plan.repeats,
            bpf::possible_cpus().unwrap_or(0)
        ),
        tables: vec![
            (String::new(), t),
            (
                "The flow table's kind: one lookup of a flow-sized entry (16-byte key, 104-byte \
                 value, as `FLOWS`), the flows inserted in a scattered order:"
                    .into(),
                flows_t,
            ),
        ],
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
    /// Cycling keys: the hash without preallocation's time per lookup over the LRU's.
    flow_ratios: Vec<f64>,
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
                    "the project's hash + per-CPU array",
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
        "- Memory at {n} entries (memlock): hash + per-CPU array (project) {}, per-CPU value {}, \
         hash with atomics {}.",
        mib(big.mem[1]),
        mib(big.mem[2]),
        mib(big.mem[3])
    ));
    if !big.flow_ratios.is_empty() {
        out.push(crate::verdict::compare(
            &format!("{n} flows, cycling keys: a hash without preallocation"),
            "an LRU hash (the kind of FLOWS)",
            "time",
            &big.flow_ratios,
        ));
    }
    out
}

fn short_key(ki: usize) -> &'static str {
    if ki == 0 { "same key" } else { "cycling keys" }
}

fn short_op(oi: usize) -> &'static str {
    [
        "key only",
        "hash+per-CPU array",
        "per-CPU value",
        "hash+atomics",
    ][oi]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_follows_the_numbers() {
        let mut big = Big::default();
        // Cycling keys: per-CPU value faster in one run only, atomics in every run.
        big.ratios[1] = vec![vec![], vec![1.0, 1.0], vec![0.9, 1.1], vec![0.8, 0.9]];
        big.mem = [None, Some(1 << 20), None, Some(3 << 20)];
        let v = verdict(&big, 100);
        assert!(
            v.iter()
                .any(|l| l.contains("'per-CPU value': no clear difference"))
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
            "hash + per-CPU array (project) 1.0 MiB, per-CPU value n/a, hash with atomics 3.0 MiB"
        )));
        big.ratios[1][3] = vec![0.8, 1.2];
        assert!(
            verdict(&big, 100)
                .iter()
                .any(|l| l.contains("no layout was faster"))
        );
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
        let frame = [0u8; 60];
        let mut v = Variants::new(4).unwrap();
        for p in ["hot_atomic", "cyc_atomic", "hot_hash", "cyc_pcpu"] {
            run_prog(&mut v.ebpf, p, &frame, 0).unwrap();
        }
        // Key 0 and (cycling over 4) key 3 were counted: REPS hot plus REPS / 4 cycled.
        let atom: HashMap<_, u32, [u64; 4]> = v.ebpf.map("ATOM").unwrap().try_into().unwrap();
        assert_eq!(atom.get(&0, 0).unwrap()[1], u64::from(REPS + REPS / 4));
        assert_eq!(atom.get(&3, 0).unwrap()[1], u64::from(REPS / 4));
        // A key that is not in the map: every lookup misses, and the run is refused.
        atom_remove(&mut v.ebpf, 0);
        let e = run_prog(&mut v.ebpf, "hot_atomic", &frame, 0).unwrap_err();
        assert!(format!("{e:#}").contains("succeeded in 0 of"), "{e:#}");
    }

    fn atom_remove(ebpf: &mut Ebpf, k: u32) {
        let mut atom: HashMap<_, u32, [u64; 4]> = ebpf.map_mut("ATOM").unwrap().try_into().unwrap();
        atom.remove(&k).unwrap();
    }
}
