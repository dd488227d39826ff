//! What every bench program needs: the panic handler and the license. Parameters are
//! `aya_ebpf::Global`s the loader sets (`EbpfLoader::override_global`); the verifier sees
//! their values as constants (aya freezes `.rodata`), so branches on them cost nothing.
//! Each program defines its own `HITS` (runs that did what they measure) and `CTR` (a run
//! counter) arrays and passes them to [`finish`] and [`tick`].
use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    maps::Array,
};

/// A run's verdict: `XDP_PASS` and one more in `hits` if it did what it measures (`ok`),
/// else `XDP_DROP` (the bench refuses a measurement whose runs did not all pass).
#[allow(dead_code)]
#[inline(always)]
pub fn finish(hits: &Array<u64>, ok: bool) -> u32 {
    if !ok {
        return XDP_DROP;
    }
    match hits.get_ptr_mut(0) {
        // SAFETY: the array's only slot; a test run runs on one CPU.
        Some(h) => unsafe {
            *h += 1;
            XDP_PASS
        },
        None => XDP_DROP,
    }
}

/// The run counter `ctr` before this run, incremented.
#[allow(dead_code)]
#[inline(always)]
pub fn tick(ctr: &Array<u64>) -> Option<u64> {
    let c = ctr.get_ptr_mut(0)?;
    // SAFETY: the array's only slot; a test run runs on one CPU.
    unsafe {
        let v = *c;
        *c = v + 1;
        Some(v)
    }
}

/// splitmix64's finaliser: spreads `x` over all 64 bits (the bench's pseudo-random indexes
/// and flow hashes; the caller first multiplies by the golden ratio, 0x9e37_79b9_7f4a_7c15).
#[allow(dead_code)]
#[inline(always)]
pub fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
