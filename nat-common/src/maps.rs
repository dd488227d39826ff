//! Map names, keys and values. Each map is declared once in `nat-ebpf/src/main.rs` under the
//! name given here; userspace opens it by the same constant.

/// Public address -> [`NatEntry`] (private address + inbound counters). Per-CPU hash written by
/// natd; the program only bumps the counters of its own CPU's copy.
pub const MAP_NAT_IN: &str = "NAT_IN";
/// Private address -> [`NatEntry`] (public address + outbound counters). Same shape as
/// [`MAP_NAT_IN`].
pub const MAP_NAT_OUT: &str = "NAT_OUT";
/// ifindex -> [`IfaceConfig`]: the role of every interface natd attached to. Written by natd.
pub const MAP_IFACES: &str = "IFACES";
/// ifindex -> ifindex devmap used to redirect translated frames. Written by natd.
pub const MAP_DEVMAP: &str = "DEVMAP";
/// [`crate::Reason`] -> [`Counter`], per CPU. Written by the program, summed by natd.
pub const MAP_STATS: &str = "STATS";

/// Every map of the program, for pinning and adoption by name.
pub const ALL_MAPS: [&str; 13] = [
    MAP_NAT_IN,
    MAP_NAT_OUT,
    MAP_IFACES,
    MAP_DEVMAP,
    MAP_STATS,
    MAP_FW_SRC,
    MAP_FW_SVC,
    MAP_EG_SRC,
    MAP_EG_DST,
    MAP_EG_SVC,
    MAP_CONNTRACK,
    MAP_CONFIG,
    MAP_EVENTS,
];

/// Most mappings the maps hold (each of [`MAP_NAT_IN`] and [`MAP_NAT_OUT`]).
pub const MAX_MAPPINGS: u32 = 1 << 20;
/// Most interfaces natd can attach to.
pub const MAX_IFACES: u32 = 64;

/// Interface role: frames arriving here from the internet are DNATed (P -> V).
pub const ROLE_PUBLIC: u32 = 1;
/// Interface role: frames arriving here from guests are SNATed (V -> P).
pub const ROLE_GUEST: u32 = 2;

/// Value of [`MAP_IFACES`].
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

/// Value of [`MAP_NAT_IN`] and [`MAP_NAT_OUT`]: the translated address and this direction's
/// counters for frames the fast path translated and forwarded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    /// Address to write, network byte order.
    pub addr: u32,
    /// Zero.
    pub _pad: u32,
    /// Frames translated and redirected in this direction.
    pub packets: u64,
    /// Bytes of those frames (Ethernet header included).
    pub bytes: u64,
    /// Frames dropped by policy in this direction: the ingress firewall of the public IP
    /// (in [`MAP_NAT_IN`]) or the egress policy (in [`MAP_NAT_OUT`]).
    pub denied: u64,
}
const _: () = assert!(core::mem::size_of::<NatEntry>() == 32);

impl NatEntry {
    /// A fresh entry pointing at `addr` (network byte order) with zero counters.
    pub const fn new(addr: u32) -> Self {
        Self {
            addr,
            _pad: 0,
            packets: 0,
            bytes: 0,
            denied: 0,
        }
    }
}

/// Value of [`MAP_STATS`]: frames and bytes that ended with one reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::IfaceConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counter {}
}

// ---------------------------------------------------------------------------------------------
// Firewall (ingress per public IP, egress per guest network) and connection tracking.
// ---------------------------------------------------------------------------------------------

/// (public IP, source prefix) -> [`RuleBits`] of the ingress rules whose CIDRs contain that
/// prefix. LPM trie written by natd; data is [`FwSrcData`].
pub const MAP_FW_SRC: &str = "FW_SRC";
/// (public IP, protocol, port prefix) -> [`RuleBits`] of the ingress rules whose protocol and
/// port range (or ICMP type/code) contain that prefix. LPM trie written by natd; data is
/// [`FwSvcData`]. A packet is allowed when the two lookups share a bit.
pub const MAP_FW_SVC: &str = "FW_SVC";
/// Guest source prefix -> [`RuleBits`] of the egress rules whose source CIDRs (CloudStack's
/// `source_cidr_list`; a rule without any matches every source) contain it. LPM trie written by
/// natd; data is the address (`[u8; 4]`, network order). An egress rule matches a packet when
/// this lookup, [`MAP_EG_DST`]'s and [`MAP_EG_SVC`]'s share its bit.
pub const MAP_EG_SRC: &str = "EG_SRC";
/// Destination prefix -> [`RuleBits`] of the egress rules whose destination CIDRs contain it.
pub const MAP_EG_DST: &str = "EG_DST";
/// (protocol, port prefix) -> [`RuleBits`] of the egress rules that match it; data is
/// [`EgSvcData`].
pub const MAP_EG_SVC: &str = "EG_SVC";
/// [`FlowKey`] -> [`FlowState`]: connection tracking, an LRU hash shared by all CPUs (the two
/// directions of a flow arrive on different interfaces and CPUs). Written by the program,
/// expired entries collected by natd.
pub const MAP_CONNTRACK: &str = "CONNTRACK";
/// Index 0 -> [`NatConfig`]: settings natd writes at start.
pub const MAP_CONFIG: &str = "CONFIG";
/// [`crate::Event`] -> count, per CPU: conntrack hits, misses, creations.
pub const MAP_EVENTS: &str = "EVENTS";

/// Most ingress rules per public IP (bits of [`RuleBits`]).
pub const MAX_RULES_PER_IP: usize = 256;
/// Most egress exception rules.
pub const MAX_EGRESS_RULES: usize = 256;
/// Size of [`MAP_FW_SRC`]: distinct (public IP, source CIDR) pairs.
pub const MAX_FW_SRC: u32 = 1 << 17;
/// Size of [`MAP_FW_SVC`]: (public IP, protocol, port prefix) entries; a port range splits
/// into at most 30 prefixes.
pub const MAX_FW_SVC: u32 = 1 << 18;
/// Size of [`MAP_EG_SRC`], [`MAP_EG_DST`] and [`MAP_EG_SVC`].
pub const MAX_EG: u32 = 1 << 14;
/// Default size of [`MAP_CONNTRACK`] (natd may change it at load).
pub const DEFAULT_CONNTRACK_SIZE: u32 = 262_144;

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

/// Data of an LPM key of [`MAP_FW_SRC`]: the public IP (always all 32 bits matched) then the
/// source address; prefix length = 32 + CIDR length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwSrcData {
    /// Network byte order.
    pub public: [u8; 4],
    pub source: [u8; 4],
}

/// Data of an LPM key of [`MAP_FW_SVC`]: public IP, protocol, then the 16-bit "service": the
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

/// Data of an LPM key of [`MAP_EG_SVC`]: protocol then service as in [`FwSvcData`]; prefix
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

/// Conntrack key kinds.
pub const FLOW_NAT: u8 = 0;
/// The guest->P leg of a hairpin flow: `guest` = sender V2, `remote` = P.
pub const FLOW_HAIRPIN_FWD: u8 = 1;
/// The reply leg of a hairpin flow: `guest` = target V1, `remote` = router's guest address.
pub const FLOW_HAIRPIN_REV: u8 = 2;

/// Key of [`MAP_CONNTRACK`], always in the guest's view (private address V, after DNAT /
/// before SNAT), so both directions of a flow find the same entry. Ports in network order;
/// for ICMP echo both are the identifier; 0 for protocols without
/// ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub guest: u32,
    pub remote: u32,
    pub guest_port: u16,
    pub remote_port: u16,
    pub proto: u8,
    /// [`FLOW_NAT`], [`FLOW_HAIRPIN_FWD`] or [`FLOW_HAIRPIN_REV`].
    pub kind: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

/// Who opened a flow.
pub const ORIGIN_PUBLIC: u8 = 1;
pub const ORIGIN_GUEST: u8 = 2;

/// Value of [`MAP_CONNTRACK`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last packet.
    pub last_seen: u64,
    /// [`crate::conntrack::State`] as u8.
    pub state: u8,
    /// [`ORIGIN_PUBLIC`] or [`ORIGIN_GUEST`].
    pub origin: u8,
    /// [`crate::conntrack::SEEN_REPLY`] | [`crate::conntrack::ASSURED`].
    pub flags: u8,
    /// [`crate::conntrack::Timeout`] as u8: the idle timer the last packet started.
    pub timer: u8,
    /// Hairpin legs: the other leg's address and port (network order), see [`FlowKey::kind`].
    pub peer_port: u16,
    pub _pad2: u16,
    pub peer_addr: u32,
    pub _pad3: u32,
}
const _: () = assert!(core::mem::size_of::<FlowState>() == 24);

/// Idle timeouts, indexed by [`crate::conntrack::Timeout`].
pub const TIMEOUT_SLOTS: usize = crate::conntrack::Timeout::COUNT;

/// Value of [`MAP_CONFIG`] (one element).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatConfig {
    /// 0 (the zeroed default): guests may reach anything but the egress exception rules;
    /// 1: only what the exception rules allow (CloudStack `default_egress_policy: false`).
    pub egress_default_deny: u32,
    pub _pad: u32,
    /// Idle timeouts in nanoseconds, by [`crate::conntrack::Timeout`] (0: netfilter's).
    pub timeouts_ns: [u64; TIMEOUT_SLOTS],
}
const _: () = assert!(core::mem::size_of::<NatConfig>() == 8 + 8 * TIMEOUT_SLOTS);

#[cfg(feature = "user")]
mod pod_fw {
    // SAFETY: `#[repr(C)]` integers and byte arrays with explicit padding.
    unsafe impl aya::Pod for super::RuleBits {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FwSrcData {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FwSvcData {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EgSvcData {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatConfig {}
}
