//! Section 1b's memory floor (`bench-floor`): one random read in an array as big as the flow
//! table (values the size of a `FLOWS` element, and 64-byte values), and a random lookup in
//! LRU hashes of as many flow-like entries whose values are 64, 104 and 128 bytes; next to
//! the cold `FLOWS` hit they say how much of it the memory system alone costs, and what the
//! value's size adds.
use anyhow::{Context as _, ensure};
use aya::Ebpf;

use super::{Case, case};
use crate::{
    bpf::{self, XDP_PASS},
    mapops::take_hits,
    report::format_value,
    util::{self, Summary, show},
};

/// The floor's rows of the cache-cold table, each against its key's production. `_dep`: each
/// run waits for the last run's read (one access's latency); the others as the `FLOWS` rows,
/// whose successive runs the CPU may overlap.
pub const FLOOR: [Case; 9] = [
    case(
        "key only (a pseudo-random index of the floor maps' entries)",
        "f_key",
        "f_key",
    ),
    case(
        "floor: one 8-byte read of a random value of an array of as many values as `FLOWS` holds entries, each the size of a `FLOWS` element; each run waits for the last run's read",
        "f_arr_elem_dep",
        "f_key",
    ),
    case(
        "floor: the same, the runs independent (the CPU overlaps successive reads)",
        "f_arr_elem",
        "f_key",
    ),
    case(
        "floor: the same with 64-byte values, each run waiting for the last",
        "f_arr64_dep",
        "f_key",
    ),
    case(
        "floor: the same with 64-byte values, the runs independent",
        "f_arr64",
        "f_key",
    ),
    case(
        "key only (the same index in a 16-byte flow-like key)",
        "f_key_lru",
        "f_key_lru",
    ),
    case(
        "value size: an LRU hash of as many flow-like entries, a random key each run, 64-byte value (3 words of it read), the runs independent",
        "f_lru64",
        "f_key_lru",
    ),
    case(
        "value size: the same, 104-byte value (3 words across its first 72 bytes)",
        "f_lru104",
        "f_key_lru",
    ),
    case(
        "value size: the same, 128-byte value (3 words of its first 64 bytes)",
        "f_lru128",
        "f_key_lru",
    ),
];

/// The LRU hashes, their fill programs and their value sizes in bytes, in [`FLOOR`] order.
const LRUS: [(&str, &str, &str); 3] = [
    ("LRU64", "fill_lru64", "f_lru64"),
    ("LRU104", "fill_lru104", "f_lru104"),
    ("LRU128", "fill_lru128", "f_lru128"),
];

/// The loaded `bench-floor` with every map holding `entries` entries.
pub struct Floor {
    pub ebpf: Ebpf,
    pub entries: u32,
}

impl Floor {
    /// Loads `bench-floor` with maps of `entries` entries and fills the hashes (one insert
    /// per run of its fill program, keys in order). Fails unless every insert succeeded.
    pub fn load(entries: u32) -> anyhow::Result<Self> {
        // An LRU map may evict before it is full (per-CPU free lists): room to spare.
        let spare = entries + entries / 4 + 1024;
        let mut ebpf = bpf::load(bpf::FLOOR, |l| {
            l.map_max_entries("ARR_ELEM", entries)
                .map_max_entries("ARR64", entries);
            for (map, _, _) in LRUS {
                l.map_max_entries(map, spare);
            }
            l.override_global("N", &entries, true);
        })?;
        let frame = [0u8; 60];
        for (map, fill, _) in LRUS {
            util::check_interrupted()?;
            take_hits(&mut ebpf)?;
            let r = bpf::test_run(bpf::xdp(&mut ebpf, fill)?, &frame, 0, entries)
                .with_context(|| format!("filling {map}"))?;
            let done = take_hits(&mut ebpf)?;
            ensure!(
                done == u64::from(entries) && r.retval == XDP_PASS,
                "filling {map}: {done} of {entries} inserts succeeded"
            );
        }
        Ok(Self { ebpf, entries })
    }

    /// The summary's sentences from the floor's net samples (`nets`, in [`FLOOR`] order) and
    /// the cold `FLOWS` hit's (`flows`, paired by repeat).
    pub fn summary(&self, nets: &[Vec<f64>], flows: &[f64]) -> anyhow::Result<Vec<String>> {
        let net = |prog: &str| super::net(&FLOOR, nets, prog);
        let ns = |prog: &str| show(Summary::of(net(prog)), 1);
        let elem = bpf::value_size(&self.ebpf, "ARR_ELEM")?;
        let floor = net("f_arr_elem_dep");
        let mut sizes = Vec::new();
        for (map, _, prog) in LRUS {
            sizes.push(format!(
                "{}-byte value {} ns",
                bpf::value_size(&self.ebpf, map)?,
                ns(prog)
            ));
        }
        Ok(vec![
            format!(
                "- A cache-cold random read in a map of the same footprint costs {} ns: the \
                 floor of any per-flow lookup (one 8-byte read of a random one of {} \
                 {elem}-byte values of an array, {} MiB: as many values as `FLOWS` holds \
                 entries, each the size of a `FLOWS` element; each run waiting for the last \
                 run's read; {} ns when the CPU may overlap successive runs' reads; with \
                 64-byte values {} ns waiting, {} ns overlapped). The cold `FLOWS` hit (its runs overlapped as the \
                 CPU can) costs {} times that floor (median (min–max) of the per-repeat \
                 ratios).",
                ns("f_arr_elem_dep"),
                self.entries,
                format_value(f64::from(self.entries) * f64::from(elem) / 1048576.0),
                ns("f_arr_elem"),
                ns("f_arr64_dep"),
                ns("f_arr64"),
                show(Summary::of(&util::ratios(flows, floor)), 2),
            ),
            format!(
                "- The value's size, cache-cold: a lookup in an LRU hash of {} flow-like \
                 entries (16-byte key, preallocated as `FLOWS`), a random key each run, and \
                 the read of the words a fast path reads: {}; `FlowEntry` is {} bytes today.",
                self.entries,
                sizes.join(", "),
                size_of::<nat_common::FlowEntry>()
            ),
            crate::verdict::compare(
                &format!(
                    "A {}-byte value, cache-cold",
                    bpf::value_size(&self.ebpf, "LRU64")?
                ),
                &format!("a {}-byte one", bpf::value_size(&self.ebpf, "LRU104")?),
                "time",
                &util::ratios(net("f_lru64"), net("f_lru104")),
            ),
        ])
    }
}

#[cfg(test)]
mod root_tests {
    use super::*;
    use crate::mapops::run_prog;

    /// The verifier takes every floor program, the fills insert every key, and every lookup
    /// of every program hits. Needs root (BPF maps and programs), as `cargo xtask test` runs
    /// it; fails saying so without.
    #[test]
    fn floor_programs_load_and_hit() {
        // SAFETY: plain syscall without arguments.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "needs root (BPF maps and programs)");
        let mut f = Floor::load(1_000).unwrap();
        for c in &FLOOR {
            run_prog(&mut f.ebpf, c.prog, &[0u8; 60], 0).unwrap();
        }
        assert_eq!(bpf::value_size(&f.ebpf, "ARR64").unwrap(), 64);
    }
}
