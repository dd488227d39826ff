//! The counting sink on the receiving end: counts (per CPU; the bench sums) and drops
//! IPv4 UDP frames with either port in `PORT_LO..=PORT_HI` (the generated flows and their
//! answers); passes everything else to the stack.
#![no_std]
#![no_main]

mod common;

use aya_ebpf::{
    Global,
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};

#[unsafe(no_mangle)]
static PORT_LO: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static PORT_HI: Global<u32> = Global::new(0);

/// Frames counted, per CPU.
#[map]
static COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 38 > end {
        return XDP_PASS;
    }
    let at = |off: usize| data as *const u8 as usize + off;
    // SAFETY: every offset read lies within the 38 bytes checked above.
    let (ethertype, proto, sport, dport) = unsafe {
        (
            *(at(12) as *const [u8; 2]),
            *(at(23) as *const u8),
            u16::from_be_bytes(*(at(34) as *const [u8; 2])),
            u16::from_be_bytes(*(at(36) as *const [u8; 2])),
        )
    };
    if ethertype != [0x08, 0x00] || proto != 17 {
        return XDP_PASS;
    }
    let (lo, hi) = (PORT_LO.load(), PORT_HI.load());
    let ours = |p: u16| (lo..=hi).contains(&u32::from(p));
    if !ours(sport) && !ours(dport) {
        return XDP_PASS;
    }
    if let Some(c) = COUNT.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; nothing else writes it while we run.
        unsafe { *c += 1 };
    }
    XDP_DROP
}
