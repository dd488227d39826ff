//! Types and arithmetic shared by the XDP program (`nat-ebpf`) and userspace (`nat-userspace`).
//!
//! Everything here is `no_std` and free of kernel dependencies so the host can test it.
//! Map keys and values are `#[repr(C)]` with explicit, zeroed padding; addresses are kept in
//! network byte order exactly as they appear in the packet (a `u32` made with
//! [`u32::from_ne_bytes`] from the four octets), so the program never byte-swaps them.
#![no_std]

pub mod conntrack;
pub mod csum;
pub mod maps;
pub mod reason;

pub use maps::*;
pub use reason::{Event, Reason};
