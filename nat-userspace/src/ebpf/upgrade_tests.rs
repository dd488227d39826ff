//! Adoption and migration against the kernel: pins one `Dataplane` leaves under a bpffs
//! directory of the test's own (removed when the test ends, also on failure) are opened again
//! with other sizes. Needs root, as `the_object_matches_the_map_specs` does.
use std::os::fd::{FromRawFd as _, OwnedFd};

use nat_common::{ENTRY_ORIG, MAP_SLOTS, proto};

use super::{earlier::FlowEntryV2, plan::Remedy, *};

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

/// Pins in place of `name` a map of layout 2's shape (`FLOWS` and `PENDING`: an LRU hash of
/// 16-byte keys and 104-byte values) holding `entries`. Created with the `bpf` syscall: aya
/// creates standalone maps only of a few other types.
fn pin_v2_flow_table(
    pins: &TmpPins,
    name: &str,
    capacity: u32,
    entries: &[(FlowTuple, FlowEntryV2)],
) {
    /// The head of `union bpf_attr` for `BPF_MAP_CREATE` (the kernel takes the rest as 0).
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let attr = MapCreate {
        map_type: spec::FLOWS.kind as u32,
        key_size: size_of::<FlowTuple>() as u32,
        value_size: size_of::<FlowEntryV2>() as u32,
        max_entries: capacity,
        map_flags: spec::FLOWS.flags,
    };
    const BPF_MAP_CREATE: nix::libc::c_long = 0;
    // SAFETY: `attr` outlives the call and the size passed is its own.
    let fd = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const MapCreate,
            size_of::<MapCreate>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let data = MapData::from_fd(fd).unwrap();
    let path = pins.0.map(name);
    std::fs::remove_file(&path).unwrap();
    data.pin(&path).unwrap();
    let mut m: HashMap<_, FlowTuple, FlowEntryV2> =
        HashMap::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap();
    for (k, e) in entries {
        m.insert(k, e, 0).unwrap();
    }
}

/// Flow `n` of layout 2: both entries, every field set (from `n`), last seen at `n`.
fn v2_flow(n: u16) -> [(FlowTuple, FlowEntryV2); 2] {
    let flow = FlowKey {
        guest: u32::from(n),
        remote: 0xc633_6401,
        guest_port: n,
        remote_port: 443,
        proto: proto::TCP,
        kind: 1,
        origin: 1,
        _pad: 0,
    };
    let entry = |peer, flags| FlowEntryV2 {
        saddr: 0x0a00_0000 + u32::from(n),
        daddr: 0xc633_6401,
        sport: n,
        dport: 443,
        ip_delta: 0x1234,
        l4_delta: 0x5678,
        in_ifindex: 2,
        out_ifindex: 3,
        dmac: [2, 0, 0, 0, 0, n as u8],
        smac: [2, 0, 0, 0, 1, n as u8],
        mtu: 1500,
        l4_csum: 16,
        flags,
        route_gen: 7,
        slot: 5,
        reason: 3,
        counter: 1,
        state: 4,
        ct_flags: 3,
        timer: 2,
        _pad: [0; 3],
        seen: 1000 + u64::from(n),
        last_seen: u64::from(n) * 1_000_000_000,
        peer,
        flow,
    };
    [
        (tuple(n), entry(tuple(1000 + n), ENTRY_ORIG)),
        (tuple(1000 + n), entry(tuple(n), 0)),
    ]
}

/// What layout 3 holds of a v2 entry: every field as it was, no segment or acknowledgment
/// noted (written out here rather than taken from the conversion under test).
fn as_v3(e: &FlowEntryV2) -> FlowEntry {
    FlowEntry {
        saddr: e.saddr,
        daddr: e.daddr,
        sport: e.sport,
        dport: e.dport,
        ip_delta: e.ip_delta,
        l4_delta: e.l4_delta,
        in_ifindex: e.in_ifindex,
        out_ifindex: e.out_ifindex,
        dmac: e.dmac,
        smac: e.smac,
        mtu: e.mtu,
        l4_csum: e.l4_csum,
        flags: e.flags,
        route_gen: e.route_gen,
        slot: e.slot,
        reason: e.reason,
        counter: e.counter,
        state: e.state,
        ct_flags: e.ct_flags,
        timer: e.timer,
        _pad: e._pad,
        seen: e.seen,
        last_seen: e.last_seen,
        seq_end: 0,
        max_ack: 0,
        peer: e.peer,
        flow: e.flow,
    }
}

/// Every entry of the flow table `name`, by key.
fn flow_table(dp: &mut Dataplane, name: &'static str) -> BTreeMap<FlowTuple, FlowEntry> {
    let m: HashMap<_, FlowTuple, FlowEntry> = HashMap::try_from(dp.map(name).unwrap()).unwrap();
    m.iter().map(|kv| kv.unwrap()).collect()
}

fn layout_version(pins: &TmpPins) -> u32 {
    let m = aya::maps::Map::Array(MapData::from_pin(pins.0.map(MAP_META)).unwrap());
    Array::<_, u32>::try_from(m).unwrap().get(&0, 0).unwrap()
}

fn set_layout_version(pins: &TmpPins, v: u32) {
    let m = aya::maps::Map::Array(MapData::from_pin(pins.0.map(MAP_META)).unwrap());
    Array::<_, u32>::try_from(m).unwrap().set(0, v, 0).unwrap();
}

/// Count of `EVENTS` slot `i` on each CPU in the pins [`make_layout_3`] makes.
fn known_count(i: u32) -> u64 {
    100 + u64::from(i)
}

/// Makes this layout's pins look like layout 3's (and 2's, whose other maps are layout 3's):
/// no `SLOTS` pin, an `EVENTS` one counter shorter (no `slot_hit`) counting
/// [`known_count`] on every CPU, `META` stamped 3.
fn make_layout_3(pins: &TmpPins) {
    std::fs::remove_file(pins.0.map(MAP_SLOTS)).unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    let mut old = PerCpuArray::<MapData, u64>::create(spec::EVENTS.max_entries - 1, 0).unwrap();
    for i in 0..spec::EVENTS.max_entries - 1 {
        let counts = PerCpuValues::try_from(vec![known_count(i); cpus]).unwrap();
        old.set(i, counts, 0).unwrap();
    }
    let path = pins.0.map(MAP_EVENTS);
    std::fs::remove_file(&path).unwrap();
    old.pin(&path).unwrap();
    set_layout_version(pins, 3);
}

/// Each slot of the pinned `EVENTS`, summed over the CPUs.
fn pinned_events(pins: &TmpPins) -> Vec<u64> {
    let m = aya::maps::Map::PerCpuArray(MapData::from_pin(pins.0.map(MAP_EVENTS)).unwrap());
    let m = PerCpuArray::<_, u64>::try_from(m).unwrap();
    (0..m.len())
        .map(|i| m.get(&i, 0).unwrap().iter().sum())
        .collect()
}

/// What `EVENTS` holds once the pins of [`make_layout_3`] are upgraded: the counts carried
/// over, `slot_hit` 0.
fn upgraded_events() -> Vec<u64> {
    let cpus = aya::util::nr_cpus().unwrap() as u64;
    let mut want: Vec<u64> = (0..spec::EVENTS.max_entries - 1)
        .map(|i| known_count(i) * cpus)
        .collect();
    want.push(0);
    want
}

/// The pinned `SLOTS` as the kernel describes it: (capacity, value size, flags).
fn pinned_slots(pins: &TmpPins) -> (u32, u32, u32) {
    let info = MapInfo::from_pin(pins.0.map(MAP_SLOTS)).unwrap();
    (info.max_entries(), info.value_size(), info.map_flags())
}

/// `SLOTS` as natd creates it for a flow table of `flows` flows.
const fn slots_as_wanted(flows: u32) -> (u32, u32, u32) {
    (
        spec::slots_for(flows),
        spec::SLOTS.value_size,
        spec::SLOTS.flags,
    )
}

/// Writes `e` keyed `t` into its slot of the pinned `SLOTS` (of `count` slots), as the
/// program fills a slot: what fast packets change lives there until merged.
fn put_in_slot(pins: &TmpPins, count: u32, t: &FlowTuple, e: FlowEntry) {
    let m = aya::maps::Map::Array(MapData::from_pin(pins.0.map(MAP_SLOTS)).unwrap());
    let mut slots = Array::<_, nat_common::Slot>::try_from(m).unwrap();
    let slot = nat_common::Slot { key: *t, entry: e };
    slots
        .set(nat_common::slot_index(t, count - 1), slot, 0)
        .unwrap();
}

/// Layout 4's pins (each key in its own slot only) are adopted as they are, the slots with
/// them, and stamped with this layout.
#[test]
fn layout_4_pins_are_adopted_with_their_slots() {
    let pins = TmpPins::new("layout4");
    let mut dp = pins.open(16, 8).unwrap();
    insert_flow(&mut dp, 1);
    let flows = flow_table(&mut dp, MAP_FLOWS);
    drop(dp);
    let mut e = flows[&tuple(1)];
    e.last_seen = 5000;
    put_in_slot(&pins, spec::slots_for(16), &tuple(1), e);
    set_layout_version(&pins, 4);

    let mut dp = pins.open(16, 8).unwrap();
    assert!(dp.adopted());
    assert_eq!(layout_version(&pins), spec::LAYOUT_VERSION);
    assert_eq!(pinned_slots(&pins), slots_as_wanted(16));
    assert_eq!(
        dp.flow_entry(&tuple(1)).unwrap().map(|e| e.last_seen),
        Some(5000),
        "the slot's last-seen time"
    );
}

#[test]
fn the_flow_cache_is_sized_by_the_flow_table_and_kept_at_its_pinned_size() {
    let pins = TmpPins::new("slots");
    let mut dp = pins.open(16, 8).unwrap();
    insert_flow(&mut dp, 1);
    drop(dp);
    assert_eq!(pinned_slots(&pins), slots_as_wanted(16));
    let small = spec::slots_for(16);
    // A fast packet's later last-seen time, in the flow's slot only.
    let mut e = flow_table(&mut pins.open(16, 8).unwrap(), MAP_FLOWS)[&tuple(1)];
    e.last_seen = 5000;
    put_in_slot(&pins, small, &tuple(1), e);

    // A larger flow table asks for more slots: the pinned cache is kept, and read with its
    // own slot count (the slot still merges into its flow).
    assert!(spec::slots_for(4096) > small);
    let mut dp = pins.open(4096, 8).unwrap();
    assert_eq!(pins.capacity(MAP_FLOWS), 8192);
    assert_eq!(pinned_slots(&pins), slots_as_wanted(16));
    assert_eq!(
        dp.flow_entry(&tuple(1)).unwrap().map(|e| e.last_seen),
        Some(5000)
    );
    drop(dp);
    drop(pins);
    // Created afresh, the cache has the flow table's size.
    let pins = TmpPins::new("slots-fresh");
    drop(pins.open(4096, 8).unwrap());
    assert_eq!(pinned_slots(&pins), slots_as_wanted(4096));
    assert_eq!(spec::slots_for(4096), 8192);
}

#[test]
fn layout_3_pins_are_adopted_and_the_flow_cache_created() {
    let pins = TmpPins::new("layout3");
    let mut dp = pins.open(16, 8).unwrap();
    insert_flow(&mut dp, 1);
    insert_flow(&mut dp, 2);
    let v = NatValue {
        addr: 7,
        slot: 1,
        ..NatValue::default()
    };
    dp.nat_map(MAP_NAT_IN).unwrap().insert(9, v, 0).unwrap();
    let flows = flow_table(&mut dp, MAP_FLOWS);
    drop(dp);
    make_layout_3(&pins);
    assert!(
        !pins.pins().iter().any(|p| p == MAP_SLOTS),
        "{:?}",
        pins.pins()
    );
    assert_eq!(layout_version(&pins), 3);

    let mut dp = pins.open(16, 8).unwrap();
    assert!(dp.adopted());
    assert_eq!(flow_table(&mut dp, MAP_FLOWS), flows);
    assert_eq!(flow_keys(&mut dp), [1, 2, 1001, 1002]);
    assert_eq!(dp.nat_map(MAP_NAT_IN).unwrap().get(&9, 0).unwrap(), v);
    assert_eq!(pinned_events(&pins), upgraded_events());
    assert_eq!(pinned_slots(&pins), slots_as_wanted(16));
    assert_eq!(layout_version(&pins), spec::LAYOUT_VERSION);
    assert!(
        !pins.pins().iter().any(|p| p.ends_with("_migrating")),
        "{:?}",
        pins.pins()
    );
    drop(dp);
    // Adopted as it is now, SLOTS with it.
    let mut dp = pins.open(16, 8).unwrap();
    assert_eq!(flow_table(&mut dp, MAP_FLOWS), flows);
    assert_eq!(pinned_events(&pins), upgraded_events());
    assert_eq!(pinned_slots(&pins), slots_as_wanted(16));
}

#[test]
fn layout_2_flows_are_converted_and_the_other_maps_adopted() {
    // One CPU: the kernel's per-CPU LRU free lists then fill exactly to the capacity.
    let mut one = nix::sched::CpuSet::new();
    one.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).unwrap();
    let pins = TmpPins::new("layout2");
    // Layout 2's pins: layout 3's but for the flow tables (see `make_layout_3`).
    let mut dp = pins.open(16, 8).unwrap();
    let v = NatValue {
        addr: 7,
        slot: 5,
        ..NatValue::default()
    };
    dp.nat_map(MAP_NAT_IN).unwrap().insert(9, v, 0).unwrap();
    drop(dp);
    make_layout_3(&pins);
    let flows: Vec<_> = [1, 2, 3].into_iter().flat_map(v2_flow).collect();
    let pending = v2_flow(4);
    pin_v2_flow_table(&pins, MAP_FLOWS, 32, &flows);
    pin_v2_flow_table(&pins, MAP_PENDING, 16, &pending);
    set_layout_version(&pins, 2);

    // The flow table shrinks to 2 flows (4 entries) as well.
    let mut dp = pins.open(2, 8).unwrap();
    assert!(dp.adopted());
    let want: BTreeMap<FlowTuple, FlowEntry> =
        flows[2..].iter().map(|(k, e)| (*k, as_v3(e))).collect();
    assert_eq!(
        flow_table(&mut dp, MAP_FLOWS),
        want,
        "flows 2 and 3, the most recently seen, every field in place"
    );
    let want: BTreeMap<FlowTuple, FlowEntry> =
        pending.iter().map(|(k, e)| (*k, as_v3(e))).collect();
    assert_eq!(flow_table(&mut dp, MAP_PENDING), want);
    assert_eq!(dp.nat_map(MAP_NAT_IN).unwrap().get(&9, 0).unwrap(), v);
    assert_eq!(layout_version(&pins), spec::LAYOUT_VERSION);
    assert_eq!(pinned_events(&pins), upgraded_events());
    assert_eq!(pinned_slots(&pins), slots_as_wanted(2));
    assert_eq!(
        (pins.capacity(MAP_FLOWS), pins.capacity(MAP_PENDING)),
        (4, 2)
    );
    let value_size = MapInfo::from_pin(pins.0.map(MAP_FLOWS))
        .unwrap()
        .value_size();
    assert_eq!(value_size, spec::FLOWS.value_size);
    assert!(
        !pins.pins().iter().any(|p| p.ends_with("_migrating")),
        "{:?}",
        pins.pins()
    );
    drop(dp);
    // Adopted as it is now.
    let mut dp = pins.open(2, 8).unwrap();
    assert_eq!(flow_table(&mut dp, MAP_FLOWS).len(), 4);
}

#[test]
fn an_upgrade_that_stopped_midway_is_completed() {
    let pins = TmpPins::new("layout2-midway");
    let mut dp = pins.open(16, 8).unwrap();
    insert_flow(&mut dp, 1);
    drop(dp);
    // A layout 3 natd's upgrade from layout 2: FLOWS converted and put in place, PENDING not
    // yet, META still 2 (so no SLOTS yet either).
    make_layout_3(&pins);
    let pending = v2_flow(4);
    pin_v2_flow_table(&pins, MAP_PENDING, 16, &pending);
    set_layout_version(&pins, 2);

    let mut dp = pins.open(16, 8).unwrap();
    assert_eq!(flow_keys(&mut dp), [1, 1001]);
    let want: BTreeMap<FlowTuple, FlowEntry> =
        pending.iter().map(|(k, e)| (*k, as_v3(e))).collect();
    assert_eq!(flow_table(&mut dp, MAP_PENDING), want);
    assert_eq!(pinned_events(&pins), upgraded_events());
    assert_eq!(pinned_slots(&pins), slots_as_wanted(16));
    assert_eq!(layout_version(&pins), spec::LAYOUT_VERSION);
}

#[test]
fn pins_of_a_layout_natd_does_not_upgrade_from_are_refused_and_change_nothing() {
    let pins = TmpPins::new("layout1");
    drop(pins.open(16, 8).unwrap());
    set_layout_version(&pins, 1);
    let before = pins.pins();
    let err = pins.open(16, 8).err().expect("natd adopted layout 1");
    assert!(
        err.to_string().contains(&format!(
            "META: layout version found 1, wanted {}",
            spec::LAYOUT_VERSION
        )),
        "{err}"
    );
    assert_eq!(pins.pins(), before);
    assert_eq!(layout_version(&pins), 1);
}
