//! Every map of the program, declared once: name, type, key, value, capacity and flags in
//! [`MAPS`]. The XDP program defines its maps from these specs (`nat-ebpf/src/main.rs`), natd
//! opens them by the same names, checks pinned maps against them when it adopts an earlier
//! natd's fast path, and a test checks that the compiled object matches them.
//!
//! Keys and values are `#[repr(C)]` with explicit, zeroed padding and a size assertion.
//! Addresses and ports are kept in network byte order as they appear in the packet.
use crate::flow::{FlowEntry, FlowTuple, Slot};

/// Version of this layout, stamped in the pins (`META`): bumped whenever a key, a value or the
/// meaning of a field changes, so a natd never adopts maps it would misread.
pub const LAYOUT_VERSION: u32 = 5;

/// Kernel map types (`enum bpf_map_type`) the program uses.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Hash = 1,
    Array = 2,
    PerCpuArray = 6,
    LruHash = 9,
    LpmTrie = 11,
    DevMapHash = 25,
}

impl MapKind {
    pub const fn name(self) -> &'static str {
        match self {
            MapKind::Hash => "hash",
            MapKind::Array => "array",
            MapKind::PerCpuArray => "percpu_array",
            MapKind::LruHash => "lru_hash",
            MapKind::LpmTrie => "lpm_trie",
            MapKind::DevMapHash => "devmap_hash",
        }
    }
}

/// What natd does when a pinned map differs from this layout only in its capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resize {
    /// Capacity is fixed by the layout: a different one is a layout mismatch.
    Fixed,
    /// natd chooses the capacity at load (config): a pinned map of another size is migrated
    /// (entries copied into a new map of the configured size).
    Copy,
    /// A counter array: a pinned one of another size is re-created, its counts carried over
    /// slot by slot as far as both reach.
    Counters,
    /// A cache natd sizes when it creates it (config): a pinned one of another capacity (a
    /// power of two) is kept as it is, since its contents are not all in the table it caches
    /// yet; the configured capacity applies when natd next creates the maps.
    Keep,
}

/// One map of the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    /// Capacity the object declares (natd may set another at load where `resize` says so).
    pub max_entries: u32,
    /// `BPF_F_*` map flags.
    pub flags: u32,
    pub resize: Resize,
}

const fn size<T>() -> u32 {
    core::mem::size_of::<T>() as u32
}

/// `BPF_F_NO_PREALLOC`: entries allocated as inserted.
pub const BPF_F_NO_PREALLOC: u32 = 1;
/// `BPF_F_RDONLY_PROG`: the program only reads the map.
pub const BPF_F_RDONLY_PROG: u32 = 1 << 7;
/// `BPF_F_MMAPABLE`: an array whose values start on a page (so 128-byte values sit on
/// cache-line pairs).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// LPM tries must be created without preallocation.
const LPM_FLAGS: u32 = BPF_F_NO_PREALLOC;

/// Most mappings the maps can be configured to hold (natd's `[limits] mappings`).
pub const MAX_MAPPINGS: u32 = 1 << 20;
/// Default mapping capacity: the size of the per-CPU counter array ([`MAPPING_STATS`]) and of
/// the translation maps. A CloudStack router has at most a few thousand public IPs.
pub const DEFAULT_MAPPINGS: u32 = 65_536;
/// Most interfaces natd can attach to.
pub const MAX_IFACES: u32 = 64;
/// Most ingress rules per public IP (bits of [`RuleBits`]).
pub const MAX_RULES_PER_IP: usize = 256;
/// Most egress exception rules.
pub const MAX_EGRESS_RULES: usize = 256;
/// Size of [`FW_SRC`]: distinct (public IP, source CIDR) pairs.
pub const MAX_FW_SRC: u32 = 1 << 17;
/// Size of [`FW_SVC`]: (public IP, protocol, port prefix) entries; a port range splits into at
/// most 30 prefixes.
pub const MAX_FW_SVC: u32 = 1 << 18;
/// Size of each egress trie.
pub const MAX_EG: u32 = 1 << 14;
/// Default capacity of [`FLOWS`] in flows (each flow is two entries, one per direction).
pub const DEFAULT_CONNTRACK_SIZE: u32 = 262_144;

/// Public address -> [`NatValue`] (private address, counter slot). Written by natd; a
/// mapping is installed reverse entry ([`NAT_OUT`]) first.
pub const NAT_IN: MapSpec = MapSpec {
    name: "NAT_IN",
    kind: MapKind::Hash,
    key_size: size::<u32>(),
    value_size: size::<NatValue>(),
    max_entries: DEFAULT_MAPPINGS,
    flags: BPF_F_NO_PREALLOC,
    resize: Resize::Copy,
};
/// Private address -> [`NatValue`] (public address, counter slot). Written by natd.
pub const NAT_OUT: MapSpec = MapSpec {
    name: "NAT_OUT",
    ..NAT_IN
};
/// Counter slot -> [`MappingStats`], per CPU: what each mapping's flows translated and what
/// its policy dropped. Slot 0 counts the flows of revoked mappings. Written by the program,
/// zeroed by natd when it hands a slot to a new mapping.
pub const MAPPING_STATS: MapSpec = MapSpec {
    name: "MAPPING_STATS",
    kind: MapKind::PerCpuArray,
    key_size: size::<u32>(),
    value_size: size::<MappingStats>(),
    max_entries: DEFAULT_MAPPINGS,
    flags: 0,
    resize: Resize::Counters,
};
/// Wire tuple -> [`FlowEntry`]: connection tracking and the per-flow cache, one entry per
/// direction of each flow (see [`crate::flow`]). An LRU hash shared by all CPUs. Written by
/// the program (and the tc learner); expired flows collected by natd.
pub const FLOWS: MapSpec = MapSpec {
    name: "FLOWS",
    kind: MapKind::LruHash,
    key_size: size::<FlowTuple>(),
    value_size: size::<FlowEntry>(),
    max_entries: 2 * DEFAULT_CONNTRACK_SIZE,
    flags: 0,
    resize: Resize::Copy,
};
/// Flows not yet assured (one side has spoken: unreplied UDP, TCP before the handshake
/// completed, pickups), same layout as [`FLOWS`]. A flood of new flows evicts only these;
/// a flow moves to [`FLOWS`] when it becomes assured, as netfilter's early drop spares
/// assured flows.
pub const PENDING: MapSpec = MapSpec {
    name: "PENDING",
    max_entries: DEFAULT_CONNTRACK_SIZE / 2,
    ..FLOWS
};
/// ifindex -> [`IfaceConfig`]: the role of every interface natd attached to. Written by natd.
pub const IFACES: MapSpec = MapSpec {
    name: "IFACES",
    kind: MapKind::Hash,
    key_size: size::<u32>(),
    value_size: size::<IfaceConfig>(),
    max_entries: MAX_IFACES,
    flags: 0,
    resize: Resize::Fixed,
};
/// ifindex -> ifindex devmap used to redirect translated frames; natd keeps it a superset of
/// [`IFACES`]. The value is the kernel's `struct bpf_devmap_val` (ifindex, program fd); the
/// program never reads it (`BPF_F_RDONLY_PROG`).
pub const DEVMAP: MapSpec = MapSpec {
    name: "DEVMAP",
    kind: MapKind::DevMapHash,
    key_size: size::<u32>(),
    value_size: 8,
    max_entries: MAX_IFACES,
    flags: BPF_F_RDONLY_PROG,
    resize: Resize::Fixed,
};
/// [`crate::Reason`] -> [`Counter`], per CPU. Written by the program, summed by natd.
pub const STATS: MapSpec = MapSpec {
    name: "STATS",
    kind: MapKind::PerCpuArray,
    key_size: size::<u32>(),
    value_size: size::<Counter>(),
    max_entries: crate::Reason::COUNT,
    flags: 0,
    resize: Resize::Counters,
};
/// [`crate::Event`] -> count, per CPU: conntrack hits, misses, creations...
pub const EVENTS: MapSpec = MapSpec {
    name: "EVENTS",
    kind: MapKind::PerCpuArray,
    key_size: size::<u32>(),
    value_size: size::<u64>(),
    max_entries: crate::Event::COUNT,
    flags: 0,
    resize: Resize::Counters,
};
/// (public IP, source prefix) -> [`RuleBits`] of the ingress rules whose CIDRs contain that
/// prefix. LPM trie written by natd; data is [`FwSrcData`].
pub const FW_SRC: MapSpec = MapSpec {
    name: "FW_SRC",
    kind: MapKind::LpmTrie,
    key_size: 4 + size::<FwSrcData>(),
    value_size: size::<RuleBits>(),
    max_entries: MAX_FW_SRC,
    flags: LPM_FLAGS,
    resize: Resize::Fixed,
};
/// (public IP, protocol, port prefix) -> [`RuleBits`] of the ingress rules whose protocol and
/// port range (or ICMP type/code) contain that prefix; data is [`FwSvcData`]. A packet is
/// allowed when the two lookups share a bit.
pub const FW_SVC: MapSpec = MapSpec {
    name: "FW_SVC",
    key_size: 4 + size::<FwSvcData>(),
    max_entries: MAX_FW_SVC,
    ..FW_SRC
};
/// Guest source prefix -> [`RuleBits`] of the egress rules whose source CIDRs (CloudStack's
/// `source_cidr_list`; a rule without any matches every source) contain it; data is the
/// address (`[u8; 4]`). An egress rule matches a packet when this lookup, [`EG_DST`]'s and
/// [`EG_SVC`]'s share its bit.
pub const EG_SRC: MapSpec = MapSpec {
    name: "EG_SRC",
    key_size: 4 + 4,
    max_entries: MAX_EG,
    ..FW_SRC
};
/// Destination prefix -> [`RuleBits`] of the egress rules whose destination CIDRs contain it.
pub const EG_DST: MapSpec = MapSpec {
    name: "EG_DST",
    key_size: 4 + 4,
    max_entries: MAX_EG,
    ..FW_SRC
};
/// (protocol, port prefix) -> [`RuleBits`] of the egress rules that match it; data is
/// [`EgSvcData`].
pub const EG_SVC: MapSpec = MapSpec {
    name: "EG_SVC",
    key_size: 4 + size::<EgSvcData>(),
    max_entries: MAX_EG,
    ..FW_SRC
};
/// Index 0 -> [`NatConfig`]: settings natd writes at start and the route generation it bumps
/// on every kernel route, neighbour, address or link change.
pub const CONFIG: MapSpec = MapSpec {
    name: "CONFIG",
    kind: MapKind::Array,
    key_size: size::<u32>(),
    value_size: size::<NatConfig>(),
    max_entries: 1,
    flags: 0,
    resize: Resize::Fixed,
};
/// Most slots of the flow cache in front of [`FLOWS`] (a power of two; 64 MiB): the
/// count at the default flow table size ([`slots_for`]).
pub const SLOT_COUNT: u32 = 1 << 19;
/// Fewest slots natd gives the flow cache.
pub const MIN_SLOTS: u32 = 1 << 10;

/// The flow cache's slot count for a flow table of `flows` flows: one slot per entry (two per
/// flow), a power of two, from [`MIN_SLOTS`] to [`SLOT_COUNT`] (128 bytes each).
pub const fn slots_for(flows: u32) -> u32 {
    let entries = flows.saturating_mul(2);
    if entries >= SLOT_COUNT {
        return SLOT_COUNT;
    }
    let n = entries.next_power_of_two();
    if n < MIN_SLOTS { MIN_SLOTS } else { n }
}
const _: () = assert!(slots_for(DEFAULT_CONNTRACK_SIZE) == SLOT_COUNT);
/// The program's global holding `SLOTS`' slot count minus one: natd sets it with the map's
/// capacity ([`slots_for`] its flow table, or a pinned cache's), as the tests do to make flows
/// share slots; [`SLOT_COUNT`] `- 1` if no loader does.
pub const SLOT_MASK_GLOBAL: &str = "SLOT_MASK";
/// The program's global that turns the flow cache on (1, the default) or off (0). Its
/// sequence lock re-reads the sequence word with a plain load, which orders the copy before
/// it only where loads are not reordered with loads (x86-64): natd turns the cache off on
/// other architectures, where every packet then takes `FLOWS`.
pub const SLOT_CACHE_GLOBAL: &str = "SLOT_CACHE";
/// Slot index -> [`Slot`]: a copy of a `FLOWS` entry where its key hashes to (or the other
/// slot of that pair, [`crate::other_slot`]), for the
/// established path (see [`Slot`]). Written by the program only. Sized by natd from the flow
/// table ([`slots_for`]; its slot mask, [`SLOT_MASK_GLOBAL`], set to match).
pub const SLOTS: MapSpec = MapSpec {
    name: "SLOTS",
    kind: MapKind::Array,
    key_size: size::<u32>(),
    value_size: size::<Slot>(),
    max_entries: SLOT_COUNT,
    flags: BPF_F_MMAPABLE,
    resize: Resize::Keep,
};
/// Index 0 -> [`LAYOUT_VERSION`] of the natd that created the pins. Never read by the
/// program.
pub const META: MapSpec = MapSpec {
    name: "META",
    kind: MapKind::Array,
    key_size: size::<u32>(),
    value_size: size::<u32>(),
    max_entries: 1,
    flags: 0,
    resize: Resize::Fixed,
};

/// The program's per-CPU scratch space ([`Scratch`]): what does not fit the 512-byte BPF
/// stack next to everything else a path keeps there. Never read by natd, never pinned.
pub const SCRATCH: MapSpec = MapSpec {
    name: "SCRATCH",
    kind: MapKind::PerCpuArray,
    key_size: size::<u32>(),
    value_size: size::<Scratch>(),
    max_entries: 1,
    flags: 0,
    resize: Resize::Fixed,
};

/// Value of [`SCRATCH`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scratch {
    /// A new flow's two entries, built here and inserted from here.
    pub entries: [FlowEntry; 2],
    /// The `struct bpf_fib_lookup` a route lookup fills (64 bytes, 8-aligned).
    pub fib: [u64; 8],
}
const _: () = assert!(core::mem::size_of::<Scratch>() == 2 * 112 + 64);

/// Every map of the program, for loading, pinning and adoption.
pub const MAPS: [MapSpec; 18] = [
    NAT_IN,
    NAT_OUT,
    MAPPING_STATS,
    FLOWS,
    PENDING,
    IFACES,
    DEVMAP,
    STATS,
    EVENTS,
    FW_SRC,
    FW_SVC,
    EG_SRC,
    EG_DST,
    EG_SVC,
    CONFIG,
    META,
    SCRATCH,
    SLOTS,
];

/// Map names, for code that only needs the name.
pub const MAP_NAT_IN: &str = NAT_IN.name;
pub const MAP_NAT_OUT: &str = NAT_OUT.name;
pub const MAP_MAPPING_STATS: &str = MAPPING_STATS.name;
pub const MAP_FLOWS: &str = FLOWS.name;
pub const MAP_PENDING: &str = PENDING.name;
pub const MAP_IFACES: &str = IFACES.name;
pub const MAP_DEVMAP: &str = DEVMAP.name;
pub const MAP_STATS: &str = STATS.name;
pub const MAP_EVENTS: &str = EVENTS.name;
pub const MAP_FW_SRC: &str = FW_SRC.name;
pub const MAP_FW_SVC: &str = FW_SVC.name;
pub const MAP_EG_SRC: &str = EG_SRC.name;
pub const MAP_EG_DST: &str = EG_DST.name;
pub const MAP_EG_SVC: &str = EG_SVC.name;
pub const MAP_CONFIG: &str = CONFIG.name;
pub const MAP_META: &str = META.name;
pub const MAP_SCRATCH: &str = SCRATCH.name;
pub const MAP_SLOTS: &str = SLOTS.name;

/// Interface role: frames arriving here from the internet are DNATed (P -> V).
pub const ROLE_PUBLIC: u32 = 1;
/// Interface role: frames arriving here from guests are SNATed (V -> P).
pub const ROLE_GUEST: u32 = 2;

/// Value of [`IFACES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceConfig {
    /// [`ROLE_PUBLIC`] or [`ROLE_GUEST`].
    pub role: u32,
    /// The router's own IPv4 address on this interface (network byte order), 0 if none: the
    /// source of hairpinned traffic sent out of a guest interface.
    pub addr: u32,
}
const _: () = assert!(core::mem::size_of::<IfaceConfig>() == 8);

/// Value of [`NAT_IN`] and [`NAT_OUT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatValue {
    /// The address to write, network byte order.
    pub addr: u32,
    /// The mapping's slot in [`MAPPING_STATS`] (never 0).
    pub slot: u32,
    /// [`NAT_IN`]: the public interface whose network owns the public IP (new inbound flows
    /// arriving on another public interface are dropped); 0 = any public interface.
    /// [`NAT_OUT`]: 0.
    pub ifindex: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<NatValue>() == 16);

/// Value of [`MAPPING_STATS`]: one mapping's counters, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappingStats {
    /// Frames translated public -> guest and redirected (inbound and hairpin forward legs).
    pub in_packets: u64,
    pub in_bytes: u64,
    /// Frames the public IP's ingress firewall dropped.
    pub in_denied: u64,
    /// Frames translated guest -> public and redirected (outbound and hairpin reply legs).
    pub out_packets: u64,
    pub out_bytes: u64,
    /// Frames the egress policy dropped.
    pub out_denied: u64,
}
const _: () = assert!(core::mem::size_of::<MappingStats>() == 48);

/// Value of [`STATS`]: frames and bytes that ended with one reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// A set of rule slots, bit `i` = rule slot `i`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleBits {
    pub bits: [u64; 4],
}
const _: () = assert!(core::mem::size_of::<RuleBits>() * 8 == MAX_RULES_PER_IP);

impl RuleBits {
    pub const fn set(&mut self, slot: usize) {
        self.bits[slot / 64] |= 1 << (slot % 64);
    }
    pub const fn union(&mut self, other: &RuleBits) {
        let mut i = 0;
        while i < 4 {
            self.bits[i] |= other.bits[i];
            i += 1;
        }
    }
    /// Whether the two sets share a rule.
    #[inline(always)]
    pub const fn intersects(&self, other: &RuleBits) -> bool {
        (self.bits[0] & other.bits[0])
            | (self.bits[1] & other.bits[1])
            | (self.bits[2] & other.bits[2])
            | (self.bits[3] & other.bits[3])
            != 0
    }
    /// Whether the three sets share a rule (one bit set in all three).
    #[inline(always)]
    pub const fn intersects3(&self, b: &RuleBits, c: &RuleBits) -> bool {
        (self.bits[0] & b.bits[0] & c.bits[0])
            | (self.bits[1] & b.bits[1] & c.bits[1])
            | (self.bits[2] & b.bits[2] & c.bits[2])
            | (self.bits[3] & b.bits[3] & c.bits[3])
            != 0
    }
    pub const fn is_empty(&self) -> bool {
        (self.bits[0] | self.bits[1] | self.bits[2] | self.bits[3]) == 0
    }
}

/// Data of an LPM key of [`FW_SRC`]: the public IP (always all 32 bits matched) then the
/// source address; prefix length = 32 + CIDR length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwSrcData {
    /// Network byte order.
    pub public: [u8; 4],
    pub source: [u8; 4],
}

/// Data of an LPM key of [`FW_SVC`]: public IP, protocol, then the 16-bit "service": the
/// destination port (big-endian) for TCP/UDP, `type << 8 | code` for ICMP; prefix length =
/// 40 + service prefix. The last byte is never matched.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwSvcData {
    pub public: [u8; 4],
    pub proto: u8,
    pub service: [u8; 2],
    pub _pad: u8,
}

/// Data of an LPM key of [`EG_SVC`]: protocol then service as in [`FwSvcData`]; prefix
/// length = 0 for "all protocols", 8 + service prefix otherwise.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgSvcData {
    pub proto: u8,
    pub service: [u8; 2],
    pub _pad: u8,
}

/// Prefix length of the address part that every [`FwSrcData`] key matches in full.
pub const FW_SRC_BASE_BITS: u32 = 32;
/// Prefix length of the (public, protocol) part that every [`FwSvcData`] key matches in full.
pub const FW_SVC_BASE_BITS: u32 = 40;
/// Prefix length of the protocol part of an [`EgSvcData`] key.
pub const EG_SVC_BASE_BITS: u32 = 8;

/// Idle timeouts, indexed by [`crate::conntrack::Timeout`].
pub const TIMEOUT_SLOTS: usize = crate::conntrack::Timeout::COUNT;

/// Value of [`CONFIG`] (one element).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatConfig {
    /// [`EGRESS_ALLOW`] (the zeroed default), [`EGRESS_DENY`] or [`EGRESS_CLOSED`].
    pub egress_default_deny: u32,
    /// Bumped by natd on every kernel route, neighbour, address or link change: a flow entry
    /// whose `route_gen` differs resolves its route again on its next packet. Never 0 once
    /// natd ran (0 marks an entry whose route was never resolved).
    pub route_gen: u32,
    /// Kernel ticks per second (`CONFIG_HZ`): a flow entry refreshes its last-seen time at
    /// most once per this many jiffies. 0: 1000 (at least a second on any kernel).
    pub jiffies_per_sec: u32,
    /// [`POLICY_XDP`] (the zeroed default) or [`POLICY_KERNEL`].
    pub policy: u32,
    /// Idle timeouts in nanoseconds, by [`crate::conntrack::Timeout`] (0: netfilter's).
    pub timeouts_ns: [u64; TIMEOUT_SLOTS],
}
const _: () = assert!(core::mem::size_of::<NatConfig>() == 16 + 8 * TIMEOUT_SLOTS);

impl NatConfig {
    /// Settings with the given timeouts, route generation 1, egress allowed by default and
    /// the XDP policy.
    pub const fn with_timeouts(timeouts_ns: [u64; TIMEOUT_SLOTS]) -> Self {
        NatConfig {
            egress_default_deny: EGRESS_ALLOW,
            route_gen: 1,
            jiffies_per_sec: 0,
            policy: POLICY_XDP,
            timeouts_ns,
        }
    }
}

/// [`NatConfig::egress_default_deny`]: guests may reach anything but the egress exception
/// rules.
pub const EGRESS_ALLOW: u32 = 0;
/// [`NatConfig::egress_default_deny`]: guests reach only what the exception rules allow
/// (CloudStack `default_egress_policy: false`).
pub const EGRESS_DENY: u32 = 1;
/// [`NatConfig::egress_default_deny`]: no new egress flow, whatever the rules, while natd
/// turns the default over. The exceptions of one default are the opposite verdict under the
/// other, so the default and the exceptions cannot change together: natd closes egress,
/// rewrites the exceptions, then writes the new default (established flows go on).
pub const EGRESS_CLOSED: u32 = 2;

/// [`NatConfig::policy`]: the program judges new flows (firewall, egress policy,
/// connection tracking) and fast-paths them.
pub const POLICY_XDP: u32 = 0;
/// [`NatConfig::policy`]: the kernel's netfilter judges and tracks every flow (e.g. a
/// CloudStack router's own iptables); the program only fast-paths the established flows the tc
/// learner saw the kernel translate, and hands everything else to the kernel untouched.
pub const POLICY_KERNEL: u32 = 1;

/// The checks above for every spec: sizes agree with the types.
const _: () = {
    assert!(FLOWS.key_size == 16);
    assert!(NAT_IN.value_size == 16);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): plain `#[repr(C)]` integers and byte arrays with explicit padding; every
    // bit pattern is valid.
    unsafe impl aya::Pod for super::IfaceConfig {}
    unsafe impl aya::Pod for super::NatValue {}
    unsafe impl aya::Pod for super::MappingStats {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::RuleBits {}
    unsafe impl aya::Pod for super::FwSrcData {}
    unsafe impl aya::Pod for super::FwSvcData {}
    unsafe impl aya::Pod for super::EgSvcData {}
    unsafe impl aya::Pod for super::NatConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flow_cache_has_a_slot_per_flow_entry_within_its_bounds() {
        assert_eq!(slots_for(DEFAULT_CONNTRACK_SIZE), SLOT_COUNT);
        assert_eq!(slots_for(u32::MAX), SLOT_COUNT);
        assert_eq!(slots_for(1 << 20), SLOT_COUNT);
        assert_eq!(slots_for(16_384), 32_768);
        assert_eq!(slots_for(20_000), 65_536);
        assert_eq!(slots_for(100), MIN_SLOTS);
        assert_eq!(slots_for(0), MIN_SLOTS);
        for f in [
            0, 1, 511, 512, 513, 65_535, 65_536, 200_000, 262_144, 262_145,
        ] {
            let n = slots_for(f);
            assert!(
                n.is_power_of_two() && (MIN_SLOTS..=SLOT_COUNT).contains(&n),
                "{f}"
            );
            assert!(n >= f.saturating_mul(2).min(SLOT_COUNT), "{f}");
        }
    }
}
