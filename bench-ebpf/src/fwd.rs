//! Section 2's floor of a per-flow table in live traffic: an XDP router that keeps one
//! 64-byte slot per flow and does nothing else a NAT must. For each IPv4 UDP frame (no IP
//! options) it reads the slot its 5-tuple hashes to in `SLOTS` (a direct-mapped table: one
//! cache line, the fewest memory accesses any per-flow lookup can make), decrements the TTL
//! (incremental checksum), writes the next hop's MACs and redirects the frame out of the other
//! interface. The slot's word takes part in choosing that interface (it is zero: the loader
//! fills nothing), so the read cannot be skipped and the frame waits for it, as a frame waits
//! for its flow entry. Everything else is passed to the stack.
#![no_std]
#![no_main]

mod common;

use core::ptr::read_volatile;

use aya_ebpf::{
    Global,
    bindings::xdp_action::XDP_PASS,
    helpers::bpf_redirect,
    macros::{map, xdp},
    maps::Array,
    programs::XdpContext,
};

/// The router's public interface (the client's side) and guest interface.
#[unsafe(no_mangle)]
static IF_PUB: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static IF_GST: Global<u32> = Global::new(0);
/// MAC addresses (the low 6 bytes, first byte of the address lowest): the frame leaving by
/// the public interface goes from `PUB_SRC` to `PUB_DST`, by the guest interface from
/// `GST_SRC` to `GST_DST`.
#[unsafe(no_mangle)]
static PUB_SRC: Global<u64> = Global::new(0);
#[unsafe(no_mangle)]
static PUB_DST: Global<u64> = Global::new(0);
#[unsafe(no_mangle)]
static GST_SRC: Global<u64> = Global::new(0);
#[unsafe(no_mangle)]
static GST_DST: Global<u64> = Global::new(0);
/// Slots in `SLOTS`, a power of two (the loader sets the map's size to it).
#[unsafe(no_mangle)]
static SLOTS_N: Global<u32> = Global::new(1);

/// One 64-byte slot per flow (sized by the loader).
#[map]
static SLOTS: Array<[u64; 8]> = Array::with_max_entries(1, 0);

/// The slot of a flow: its addresses and ports through splitmix64's finaliser.
#[inline(always)]
fn slot_of(saddr: u32, daddr: u32, ports: u32) -> u32 {
    let x = common::mix64(
        ((u64::from(saddr) << 32) | u64::from(daddr))
            ^ u64::from(ports).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    (x as u32) & (SLOTS_N.load().max(1) - 1)
}

#[inline(always)]
fn mac(v: u64) -> [u8; 6] {
    let b = v.to_le_bytes();
    [b[0], b[1], b[2], b[3], b[4], b[5]]
}

#[xdp]
pub fn bench_fwd(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    // Ethernet (14), IPv4 without options (20), UDP (8).
    if data + 42 > end {
        return XDP_PASS;
    }
    let p = data as *mut u8;
    // SAFETY: every offset read or written lies within the 42 bytes checked above.
    unsafe {
        if *p.add(12) != 0x08 || *p.add(13) != 0x00 || *p.add(14) != 0x45 || *p.add(23) != 17 {
            return XDP_PASS;
        }
        let ttl = *p.add(22);
        if ttl <= 1 {
            return XDP_PASS;
        }
        let word = |off: usize| u32::from_ne_bytes(*(p.add(off) as *const [u8; 4]));
        let slot = slot_of(word(26), word(30), word(34));
        let Some(s) = SLOTS.get(slot) else {
            return XDP_PASS;
        };
        let got = read_volatile(&s[0]) as u32;
        let ingress = ctx.ingress_ifindex() as u32;
        let (out, src, dst) = if ingress == IF_PUB.load() {
            (IF_GST.load(), GST_SRC.load(), GST_DST.load())
        } else {
            (IF_PUB.load(), PUB_SRC.load(), PUB_DST.load())
        };
        // The kernel's ip_decrease_ttl: the TTL is the high byte of its 16-bit word.
        *p.add(22) = ttl - 1;
        let csum = p.add(24) as *mut [u8; 2];
        let mut c = u32::from(u16::from_be_bytes(*csum)) + 0x0100;
        c = (c & 0xffff) + (c >> 16);
        *csum = (c as u16).to_be_bytes();
        *(p as *mut [u8; 6]) = mac(dst);
        *(p.add(6) as *mut [u8; 6]) = mac(src);
        // XDP_REDIRECT, or XDP_ABORTED for an interface that is not there.
        bpf_redirect(out ^ got, 0) as u32
    }
}
