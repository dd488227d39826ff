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
    /// Zero.
    pub _pad: u32,
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
}
const _: () = assert!(core::mem::size_of::<NatEntry>() == 24);

impl NatEntry {
    /// A fresh entry pointing at `addr` (network byte order) with zero counters.
    pub const fn new(addr: u32) -> Self {
        Self {
            addr,
            _pad: 0,
            packets: 0,
            bytes: 0,
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
