//! Adoption and migration against the kernel: pins one `Dataplane` leaves under a bpffs
//! directory of the test's own (removed when the test ends, also on failure) are opened again
//! with other sizes. Needs root, as `the_object_matches_the_map_specs` does.
use nat_common::{ENTRY_ORIG, proto};

use super::{plan::Remedy, *};

/// A pin directory of the test's own under /sys/fs/bpf, removed on drop.
struct TmpPins(PinDir);

impl TmpPins {
    fn new(tag: &str) -> Self {
        let root = format!("/sys/fs/bpf/xsn-unit-{}-{tag}", std::process::id());
        let dir = PinDir::prepare(Path::new(&root)).unwrap_or_else(|e| panic!("{root}: {e}"));
        TmpPins(dir)
    }

    fn open(&self, flows: u32, mappings: u32) -> Result<Dataplane, DataplaneError> {
        let sizes = Sizes { flows, mappings };
        Dataplane::open(crate::EBPF_OBJECT, sizes, Some(self.0.clone()))
    }

    /// The capacity of the pinned map `name`.
    fn capacity(&self, name: &str) -> u32 {
        MapInfo::from_pin(self.0.map(name)).unwrap().max_entries()
    }

    /// Names of the files under `maps/`.
    fn pins(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.0.maps())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        out.sort();
        out
    }
}

impl Drop for TmpPins {
    fn drop(&mut self) {
        if let Err(e) = self.0.remove_all() {
            eprintln!("cleanup: {e}");
        }
    }
}

fn tuple(n: u16) -> FlowTuple {
    FlowTuple::new(1, 2, n, 80, proto::TCP)
}

/// Inserts flow `n` (original entry key `n`, reply key `1000 + n`) last seen at `n`.
fn insert_flow(dp: &mut Dataplane, n: u16) {
    let mut m: HashMap<_, FlowTuple, FlowEntry> =
        HashMap::try_from(dp.map(MAP_FLOWS).unwrap()).unwrap();
    let orig = FlowEntry {
        flags: ENTRY_ORIG,
        last_seen: u64::from(n),
        peer: tuple(1000 + n),
        slot: 1,
        ..FlowEntry::default()
    };
    let reply = FlowEntry {
        peer: tuple(n),
        slot: 1,
        ..FlowEntry::default()
    };
    m.insert(tuple(n), orig, 0).unwrap();
    m.insert(tuple(1000 + n), reply, 0).unwrap();
}

/// Every entry key of `FLOWS` (its source port).
fn flow_keys(dp: &mut Dataplane) -> Vec<u16> {
    let m: HashMap<_, FlowTuple, FlowEntry> =
        HashMap::try_from(dp.map(MAP_FLOWS).unwrap()).unwrap();
    let mut out: Vec<u16> = m.keys().map(|k| k.unwrap().sport).collect();
    out.sort();
    out
}

#[test]
fn a_smaller_flow_table_keeps_the_newest_whole_flows() {
    // One CPU: the kernel's per-CPU LRU free lists then fill exactly to the capacity.
    let mut one = nix::sched::CpuSet::new();
    one.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).unwrap();
    let pins = TmpPins::new("flows");
    let mut dp = pins.open(16, 8).unwrap();
    for n in 1..=10 {
        insert_flow(&mut dp, n);
    }
    drop(dp);
    // A staging pin a natd that stopped midway left (of another shape altogether).
    Array::<MapData, u32>::create(1, 0)
        .unwrap()
        .pin(pins.0.maps().join("FLOWS_migrating"))
        .unwrap();

    let mut dp = pins.open(4, 8).unwrap();
    assert!(dp.adopted());
    assert_eq!(
        flow_keys(&mut dp),
        [7, 8, 9, 10, 1007, 1008, 1009, 1010],
        "the 4 most recently seen flows, both entries"
    );
    assert_eq!((pins.capacity("FLOWS"), pins.capacity("PENDING")), (8, 4));
    assert!(
        !pins.pins().iter().any(|p| p.ends_with("_migrating")),
        "{:?}",
        pins.pins()
    );
    drop(dp);
    // Adopted as it is now.
    let mut dp = pins.open(4, 8).unwrap();
    assert_eq!(flow_keys(&mut dp).len(), 8);
}

#[test]
fn fewer_mappings_than_the_slots_in_use_are_refused_and_change_nothing() {
    let pins = TmpPins::new("mappings");
    let mut dp = pins.open(16, 64).unwrap();
    for map in [MAP_NAT_IN, MAP_NAT_OUT] {
        let v = NatValue {
            addr: 7,
            slot: 40,
            ..NatValue::default()
        };
        dp.nat_map(map).unwrap().insert(9, v, 0).unwrap();
    }
    let cpus = dp.nr_cpus;
    let mut stats =
        PerCpuArray::<_, MappingStats>::try_from(dp.map(MAP_MAPPING_STATS).unwrap()).unwrap();
    let counted = MappingStats {
        in_packets: 5,
        ..MappingStats::default()
    };
    let values = PerCpuValues::try_from(vec![counted; cpus]).unwrap();
    stats.set(40, values, 0).unwrap();
    drop(dp);
    let before = pins.pins();

    let err = pins
        .open(16, 32)
        .err()
        .expect("natd adopted slot 40 in 32 slots");
    match &err {
        DataplaneError::Refused { remedy, .. } => {
            assert_eq!(*remedy, Remedy::Mappings { at_least: 41 }, "{err}")
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("counter slot 40 in use"), "{err}");
    assert_eq!(pins.pins(), before);
    assert_eq!(pins.capacity(MAP_MAPPING_STATS), 64, "{err}");

    let mut dp = pins.open(16, 48).unwrap();
    assert_eq!(pins.capacity(MAP_MAPPING_STATS), 48);
    assert_eq!(pins.capacity(MAP_NAT_IN), 48);
    assert_eq!(
        dp.nat_map(MAP_NAT_OUT).unwrap().get(&9, 0).unwrap().slot,
        40
    );
    let stats =
        PerCpuArray::<_, MappingStats>::try_from(dp.map(MAP_MAPPING_STATS).unwrap()).unwrap();
    let sum: u64 = stats
        .get(&40, 0)
        .unwrap()
        .iter()
        .map(|s| s.in_packets)
        .sum();
    assert_eq!(sum, 5 * cpus as u64);
}
