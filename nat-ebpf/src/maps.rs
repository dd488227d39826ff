//! The program's maps, each from its one declaration in `nat_common::maps` (the name is the
//! static's name). One file, so that the bench's programs (`bench-ebpf`'s `bench-parts`),
//! which call this program's modules on its own maps, declare them by including it.
use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use nat_common::{
    Counter, EgSvcData, FlowEntry, FlowTuple, FwSrcData, FwSvcData, IfaceConfig, MappingStats,
    NatConfig, NatValue, RuleBits, Scratch, Slot, maps as spec,
};

/// Public address -> private address and counter slot (natd writes).
#[map]
pub static NAT_IN: HashMap<u32, NatValue> =
    HashMap::with_max_entries(spec::NAT_IN.max_entries, spec::NAT_IN.flags);
/// Private address -> public address and counter slot (natd writes).
#[map]
pub static NAT_OUT: HashMap<u32, NatValue> =
    HashMap::with_max_entries(spec::NAT_OUT.max_entries, spec::NAT_OUT.flags);
/// Counter slot -> a mapping's counters, per CPU (we count, natd sums and zeroes).
#[map]
pub static MAPPING_STATS: PerCpuArray<MappingStats> =
    PerCpuArray::with_max_entries(spec::MAPPING_STATS.max_entries, spec::MAPPING_STATS.flags);
/// Wire tuple -> one direction of an assured flow (we write; natd collects expired flows).
#[map]
pub static FLOWS: LruHashMap<FlowTuple, FlowEntry> =
    LruHashMap::with_max_entries(spec::FLOWS.max_entries, spec::FLOWS.flags);
/// Wire tuple -> one direction of a flow not yet assured.
#[map]
pub static PENDING: LruHashMap<FlowTuple, FlowEntry> =
    LruHashMap::with_max_entries(spec::PENDING.max_entries, spec::PENDING.flags);
/// ifindex -> role of each interface natd attached to (natd writes).
#[map]
pub static IFACES: HashMap<u32, IfaceConfig> =
    HashMap::with_max_entries(spec::IFACES.max_entries, spec::IFACES.flags);
/// ifindex -> ifindex, redirect targets; natd keeps it a superset of `IFACES`.
#[map]
pub static DEVMAP: DevMapHash = DevMapHash::with_max_entries(spec::DEVMAP.max_entries, 0);
/// Reason -> frames and bytes, per CPU (we write, natd sums).
#[map]
pub static STATS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(spec::STATS.max_entries, spec::STATS.flags);
/// Event -> count, per CPU (we write, natd sums).
#[map]
pub static EVENTS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(spec::EVENTS.max_entries, spec::EVENTS.flags);
/// (public IP, source prefix) -> ingress rules whose CIDRs contain it (natd writes).
#[map]
pub static FW_SRC: LpmTrie<FwSrcData, RuleBits> =
    LpmTrie::with_max_entries(spec::FW_SRC.max_entries, 0);
/// (public IP, protocol, port/ICMP prefix) -> ingress rules matching it (natd writes).
#[map]
pub static FW_SVC: LpmTrie<FwSvcData, RuleBits> =
    LpmTrie::with_max_entries(spec::FW_SVC.max_entries, 0);
/// Guest source prefix -> egress rules whose source CIDRs contain it (natd writes).
#[map]
pub static EG_SRC: LpmTrie<[u8; 4], RuleBits> =
    LpmTrie::with_max_entries(spec::EG_SRC.max_entries, 0);
/// Destination prefix -> egress rules whose CIDRs contain it (natd writes).
#[map]
pub static EG_DST: LpmTrie<[u8; 4], RuleBits> =
    LpmTrie::with_max_entries(spec::EG_DST.max_entries, 0);
/// (protocol, port/ICMP prefix) -> egress rules matching it (natd writes).
#[map]
pub static EG_SVC: LpmTrie<EgSvcData, RuleBits> =
    LpmTrie::with_max_entries(spec::EG_SVC.max_entries, 0);
/// Settings and the route generation (natd writes).
#[map]
pub static CONFIG: Array<NatConfig> =
    Array::with_max_entries(spec::CONFIG.max_entries, spec::CONFIG.flags);
/// Per-CPU scratch space (see `nat_common::maps::SCRATCH`).
#[map]
pub static SCRATCH: PerCpuArray<Scratch> =
    PerCpuArray::with_max_entries(spec::SCRATCH.max_entries, spec::SCRATCH.flags);
/// The layout version of the pins (natd's; never read here).
#[map]
pub static META: Array<u32> = Array::with_max_entries(spec::META.max_entries, spec::META.flags);
/// Slot index -> a copy of a `FLOWS` entry (see `nat_common::Slot`; we alone write).
#[map]
pub static SLOTS: Array<Slot> = Array::with_max_entries(spec::SLOTS.max_entries, spec::SLOTS.flags);
