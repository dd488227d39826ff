//! Types and arithmetic shared by the XDP program (`nat-ebpf`) and userspace (`nat-userspace`).
//!
//! Everything here is `no_std` and free of kernel dependencies so the host can test it.
//! Map keys and values are `#[repr(C)]` with explicit, zeroed padding; addresses are kept in
//! network byte order exactly as they appear in the packet (a `u32` made with
//! [`u32::from_ne_bytes`] from the four octets), so the program never byte-swaps them.
#![no_std]

pub mod conntrack;
pub mod csum;
pub mod flow;
pub mod maps;
pub mod marks;
pub mod reason;

pub use flow::*;
pub use maps::*;
pub use reason::{Event, Reason};

/// IP protocol numbers (IANA), defined once.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    /// DCCP and UDP-Lite: ports at offsets 0 and 2 and a checksum at 6 that covers the IPv4
    /// pseudo-header (RFC 4340 §9.1, RFC 3828 §3.2), translated like UDP's.
    pub const DCCP: u8 = 33;
    pub const UDPLITE: u8 = 136;
}
